"""Artifacts (.mlcz) and the compile cache: round trips, damage, versions, corrupt cache entries."""
import io
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import mlc
from mlc.runtime import artifact

from helpers import ROOT

MLP = ROOT / "examples" / "mlp.ir"
x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_save_and_load_keep_results_and_globals(tmp_path, cache):
    m = mlc.load(MLP)
    exe = mlc.compile(m)
    exe.globals["b1"][:] = 0.25  # state changed after compiling travels with the artifact
    exe.save(tmp_path / "mlp.mlcz")
    loaded = mlc.load_executable(tmp_path / "mlp.mlcz")
    np.testing.assert_array_equal(loaded["forward"](x), exe["forward"](x))
    np.testing.assert_array_equal(loaded.globals["b1"], np.full(32, 0.25, np.float32))
    with pytest.raises(mlc.DiagnosticError, match="argument 'x' must have dtype float32"):
        loaded["forward"](x.astype(np.float64))


def rewrite(path, out, change):
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    change(files)
    with zipfile.ZipFile(out, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)


def set_manifest(key, value):
    def change(files):
        manifest = json.loads(files["manifest.json"])
        manifest[key] = value
        files["manifest.json"] = json.dumps(manifest).encode()
    return change


@pytest.mark.parametrize("damage,fragment", [
    (lambda data: data[: len(data) // 2], "unreadable archive"),
    (lambda data: b"", "unreadable archive"),
    (lambda data: b"PK\x03\x04" + os.urandom(64), "unreadable archive"),
])
def test_truncated_or_garbage_files_are_refused(tmp_path, cache, damage, fragment):
    mlc.compile(mlc.load(MLP)).save(tmp_path / "a.mlcz")
    (tmp_path / "b.mlcz").write_bytes(damage((tmp_path / "a.mlcz").read_bytes()))
    with pytest.raises(mlc.DiagnosticError, match=fragment):
        mlc.load_executable(tmp_path / "b.mlcz")


def test_a_flipped_byte_anywhere_is_a_diagnostic(tmp_path, cache):
    """Inside compressed data too (zlib's own errors), never a traceback."""
    mlc.compile(mlc.load(MLP)).save(tmp_path / "a.mlcz")
    data = (tmp_path / "a.mlcz").read_bytes()
    for at in range(0, len(data), max(1, len(data) // 40)):
        damaged = bytearray(data)
        damaged[at] ^= 0x5A
        (tmp_path / "b.mlcz").write_bytes(bytes(damaged))
        try:
            mlc.load_executable(tmp_path / "b.mlcz")
        except mlc.DiagnosticError:
            pass


@pytest.mark.parametrize("change,fragment", [
    (lambda f: f.__setitem__("code.o", f["code.o"][:-8] + b"\x00" * 8), "'code.o' does not match its checksum"),
    (lambda f: f.__setitem__("module.ir", f["module.ir"].replace(b"relu", b"tanh")), "'module.ir' does not match its checksum"),
    (lambda f: f.pop("globals/w1.npy"), "members do not match the manifest"),
    (set_manifest("version", 99), "format version 99 is not supported"),
    (set_manifest("format", "zip"), "wrong format name"),
    (lambda f: f.pop("manifest.json"), "no readable manifest.json"),
])
def test_altered_artifacts_are_refused(tmp_path, cache, change, fragment):
    mlc.compile(mlc.load(MLP)).save(tmp_path / "a.mlcz")
    rewrite(tmp_path / "a.mlcz", tmp_path / "b.mlcz", change)
    with pytest.raises(mlc.DiagnosticError, match=fragment):
        mlc.load_executable(tmp_path / "b.mlcz")


def test_other_host_recompiles_from_llvm_ir(tmp_path, cache, monkeypatch):
    exe = mlc.compile(mlc.load(MLP))
    exe.save(tmp_path / "a.mlcz")
    monkeypatch.setattr(artifact, "host_key", lambda: {"cpu": "elsewhere"})
    loaded = mlc.load_executable(tmp_path / "a.mlcz")
    np.testing.assert_array_equal(loaded["forward"](x), exe["forward"](x))


def test_cache_is_used_and_a_corrupt_entry_is_rebuilt(cache):
    m = mlc.load(MLP)
    first = mlc.compile(m)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and first.compiled_here
    second = mlc.compile(mlc.load(MLP))
    assert not second.compiled_here  # came from the cache
    np.testing.assert_array_equal(second["forward"](x), first["forward"](x))
    entries[0].write_bytes(b"garbage")
    third = mlc.compile(mlc.load(MLP))
    assert third.compiled_here
    np.testing.assert_array_equal(third["forward"](x), first["forward"](x))
    assert zipfile.is_zipfile(entries[0])  # replaced by a good entry
    assert not mlc.compile(mlc.load(MLP)).compiled_here


def test_cli_compile_then_run_artifact(tmp_path, cache):
    out = tmp_path / "mlp.mlcz"
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "mlc", "compile", str(MLP), "-o", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and out.exists(), r.stderr
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([sys.executable, "-m", "mlc", "run", str(out), "--input", f"x={tmp_path / 'x.npy'}", "-o", str(tmp_path / "y.npz")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["result0"], mlc.interpret(mlc.load(MLP), "forward", x), rtol=1e-5, atol=1e-6)
    (tmp_path / "bad.mlcz").write_bytes(out.read_bytes()[:100])
    r = subprocess.run([sys.executable, "-m", "mlc", "run", str(tmp_path / "bad.mlcz"), "--random-inputs"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "not an mlc artifact" in r.stderr and "Traceback" not in r.stderr


def test_a_codegen_error_after_parts_were_sent_is_reported_and_stops_the_feeders(cache, monkeypatch):
    """Parts go to the workers while codegen runs: an error later in codegen is the usual located error,
    the threads feeding the workers stop (no hang, no thread left behind), and the next compile works."""
    import threading
    from mlc import compiler
    from mlc.codegen import llvm as codegen
    from mlc.runtime import jit
    m = mlc.load(MLP)
    want = mlc.compile(m, cache=False)["forward"](x)
    monkeypatch.setattr(compiler, "workers_for", lambda ops: 1)
    monkeypatch.setattr(codegen, "PART_CHARS", 1)
    sent, send = [], jit.PartCompiler.send
    monkeypatch.setattr(jit.PartCompiler, "send", lambda self, text: (sent.append(text), send(self, text)))
    threads = threading.active_count()

    def broken_return(emitter, op):
        raise ValueError("codegen failed here")
    monkeypatch.setitem(codegen.OPS, "func.return", broken_return)
    with pytest.raises(mlc.DiagnosticError, match="codegen failed here"):
        mlc.compile(m, cache=False)
    assert len(sent) > 0
    assert threading.active_count() == threads
    monkeypatch.setitem(codegen.OPS, "func.return", codegen._return)
    np.testing.assert_array_equal(mlc.compile(m, cache=False)["forward"](x), want)


def test_no_pickle_in_artifacts(tmp_path, cache):
    mlc.compile(mlc.load(MLP)).save(tmp_path / "a.mlcz")
    with zipfile.ZipFile(tmp_path / "a.mlcz") as z:
        for name in z.namelist():
            if name.endswith(".npy"):
                np.load(io.BytesIO(z.read(name)), allow_pickle=False)


def test_a_module_compiled_in_parts_runs_alike_and_round_trips(tmp_path, cache, monkeypatch):
    """A large module is compiled in parts, sent to worker processes as codegen makes them (runtime/jit.py),
    its object code an archive of theirs: forced here on the MLP, a part per kernel; a worker that fails
    leaves its parts to this process."""
    from mlc import compiler
    from mlc.codegen import llvm as codegen
    from mlc.runtime import jit
    m = mlc.load(MLP)
    want = mlc.compile(m, cache=False)["forward"](x)
    monkeypatch.setattr(compiler, "workers_for", lambda ops: 2)
    monkeypatch.setattr(codegen, "PART_CHARS", 1)
    exe = mlc.compile(m)
    parts = len(jit.unarchive(bytes(exe.jit.object_code)))
    assert parts == len(re.findall(r'^define .*\.par', exe.jit.llvm_ir, re.M)) + 1 > 2  # (the kernels', and the rest)
    np.testing.assert_array_equal(exe["forward"](x), want)
    exe.save(tmp_path / "parts.mlcz")
    np.testing.assert_array_equal(mlc.load_executable(tmp_path / "parts.mlcz")["forward"](x), want)
    np.testing.assert_array_equal(mlc.compile(m)["forward"](x), want)  # (from the cache)
    dead = [subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(2)]
    monkeypatch.setattr(jit, "llvm_workers", lambda n: dead[:n])
    exe = mlc.compile(m, cache=False)
    assert len(jit.unarchive(bytes(exe.jit.object_code))) == parts
    np.testing.assert_array_equal(exe["forward"](x), want)
