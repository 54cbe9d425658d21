"""Hostile and damaged artifacts and cache entries: whose code runs (signatures), the manifest's schema,
zip bombs, bad object code, damaged cache entries, and the files mlc leaves behind."""
import hashlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

import mlc
from mlc import compiler
from mlc.runtime import artifact, files, jit, trust

MODULE = """module @m {
  mlc.global @w : tensor<4xf32> {init = "zeros", trainable}
  func.func @f(%x: tensor<4xf32>) -> tensor<4xf32> {
    %w = mlc.global_load @w : tensor<4xf32>
    %s = mlc.add %x, %w : (tensor<4xf32>, tensor<4xf32>) -> tensor<4xf32>
    %y = mlc.relu %s
    return %y : tensor<4xf32>
  }
}
"""
FOREIGN = MODULE.replace("mlc.relu", "mlc.neg")  # the same signature, other code: stands for an attacker's
x = np.array([-1, 2, -3, 4], np.float32)
OWN, FOREIGN_RESULT = np.array([0, 2, 0, 4], np.float32), -x


@pytest.fixture(autouse=True)
def keys(tmp_path, monkeypatch):
    """A fresh own key for each test (never the user's), no other trusted keys, a private cache."""
    monkeypatch.setenv("MLC_KEY_FILE", str(tmp_path / "keys" / "own"))
    monkeypatch.delenv("MLC_TRUSTED_KEYS", raising=False)
    monkeypatch.setenv("MLC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "keys"


class Rebuilds:
    """The `rebuild` the top level gives load_executable (the compiler), counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, module, target, arch):
        self.calls += 1
        return compiler.compile(module, target, cache=False)


def save(path, text=MODULE):
    mlc.compile(mlc.parse(text), cache=False).save(path)
    return path


def members(path) -> dict:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def repack(path, out, change=lambda f: None, edit=lambda m: None, sign_with=None, keep_signature=True):
    """Rewrite an artifact as an attacker would: change members, recompute the manifest's checksums and
    sizes, edit it, and sign it with `sign_with` (or keep the old, now wrong, signature)."""
    f = members(path)
    change(f)
    manifest = json.loads(f.pop("manifest.json"))
    signature = f.pop("manifest.sig", None)
    manifest["files"] = {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in f.items()}
    edit(manifest)
    raw = json.dumps(manifest).encode()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", raw)
        if sign_with is not None:
            z.writestr("manifest.sig", trust.sign(raw, sign_with))
        elif keep_signature and signature is not None:
            z.writestr("manifest.sig", signature)
        for n, d in f.items():
            z.writestr(n, d)
    return out


def foreign_code(tmp_path):
    theirs = members(save(tmp_path / "foreign.mlcz", FOREIGN))
    return lambda f: f.update({"code.o": theirs["code.o"], "code.ll": theirs["code.ll"]})


def key_file(path, key=None) -> bytes:
    key = key or os.urandom(32)
    path.parent.mkdir(exist_ok=True)
    path.write_text(key.hex() + "\n")
    path.chmod(0o600)
    return key


# --- 1. native code runs only under a trusted signature -----------------------------------------------------

def test_an_own_artifact_runs_its_code(tmp_path):
    save(tmp_path / "a.mlcz")
    exe = artifact.load_executable(tmp_path / "a.mlcz", rebuild=lambda *a: pytest.fail("rebuilt a signed artifact"))
    np.testing.assert_array_equal(exe["f"](x), OWN)


def test_foreign_code_with_recomputed_checksums_is_not_run(tmp_path):
    repack(save(tmp_path / "a.mlcz"), tmp_path / "b.mlcz", foreign_code(tmp_path))
    rebuild = Rebuilds()
    exe = artifact.load_executable(tmp_path / "b.mlcz", rebuild=rebuild)
    assert rebuild.calls == 1
    np.testing.assert_array_equal(exe["f"](x), OWN)  # the artifact's IR, compiled here
    with pytest.raises(mlc.DiagnosticError, match="b.mlcz.*not signed by a key you trust"):
        artifact.load_executable(tmp_path / "b.mlcz")


@pytest.mark.parametrize("how", ["unsigned", "untrusted key", "forged mac", "junk signature"])
def test_anything_but_a_trusted_signature_is_rebuilt_from_ir(tmp_path, how):
    a = save(tmp_path / "a.mlcz")
    if how == "unsigned":
        repack(a, tmp_path / "b.mlcz", foreign_code(tmp_path), keep_signature=False)
    elif how == "untrusted key":
        repack(a, tmp_path / "b.mlcz", foreign_code(tmp_path), sign_with=os.urandom(32))
    else:
        repack(a, tmp_path / "b.mlcz", foreign_code(tmp_path), keep_signature=False)
        f = members(tmp_path / "b.mlcz")
        own = trust.own_key()
        sig = json.loads(trust.sign(f["manifest.json"], own))
        sig["mac"] = "0" * 64 if how == "forged mac" else [1, 2]
        with zipfile.ZipFile(tmp_path / "b.mlcz", "a") as z:
            z.writestr("manifest.sig", json.dumps(sig))
    rebuild = Rebuilds()
    np.testing.assert_array_equal(artifact.load_executable(tmp_path / "b.mlcz", rebuild=rebuild)["f"](x), OWN)
    assert rebuild.calls == 1


def test_globals_travel_into_a_rebuilt_executable(tmp_path):
    exe = mlc.compile(mlc.parse(MODULE), cache=False)
    exe.set_global("w", np.full(4, 10, np.float32))
    exe.save(tmp_path / "a.mlcz")
    repack(tmp_path / "a.mlcz", tmp_path / "b.mlcz", keep_signature=False)
    loaded = artifact.load_executable(tmp_path / "b.mlcz", rebuild=Rebuilds())
    np.testing.assert_array_equal(loaded["f"](x), x + 10)


def test_keys_named_in_mlc_trusted_keys_are_trusted(tmp_path, keys, monkeypatch):
    """A colleague's key, trusted: their code runs as it is (here the 'foreign' code, on purpose)."""
    theirs = key_file(keys / "colleague")
    repack(save(tmp_path / "a.mlcz"), tmp_path / "b.mlcz", foreign_code(tmp_path), sign_with=theirs)
    monkeypatch.setenv("MLC_TRUSTED_KEYS", os.pathsep.join([str(keys / "nobody-here"), str(keys / "colleague")]))
    with pytest.raises(mlc.DiagnosticError, match="nobody-here"):  # a named key file that is missing is an error
        artifact.load_executable(tmp_path / "b.mlcz", rebuild=Rebuilds())
    monkeypatch.setenv("MLC_TRUSTED_KEYS", str(keys / "colleague"))
    exe = artifact.load_executable(tmp_path / "b.mlcz", rebuild=lambda *a: pytest.fail("rebuilt a trusted artifact"))
    np.testing.assert_array_equal(exe["f"](x), FOREIGN_RESULT)


def test_the_own_key_is_made_once_private_and_atomically(keys, monkeypatch):
    monkeypatch.setenv("MLC_KEY_FILE", str(keys / "sub" / "dir" / "key"))
    old = os.umask(0o022)
    try:
        assert trust.own_key() is None
        key = trust.own_key(create=True)
    finally:
        os.umask(old)
    path = keys / "sub" / "dir" / "key"
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert trust.own_key(create=True) == key and path.read_text().strip() == key.hex()
    assert [p.name for p in path.parent.iterdir()] == ["key"]  # no temporary left


@pytest.mark.parametrize("content,mode,fragment", [
    ("ab" * 32, 0o644, "chmod 600"),
    ("not hex", 0o600, "not an mlc key file"),
    ("ab" * 16, 0o600, "not an mlc key file"),
])
def test_bad_key_files_are_refused(tmp_path, keys, monkeypatch, content, mode, fragment):
    save(tmp_path / "a.mlcz")
    path = keys / "colleague"
    path.write_text(content)
    path.chmod(mode)
    monkeypatch.setenv("MLC_TRUSTED_KEYS", str(path))
    with pytest.raises(mlc.DiagnosticError, match=f"colleague.*{fragment}"):
        artifact.load_executable(tmp_path / "a.mlcz", rebuild=Rebuilds())


def test_without_a_usable_key_artifacts_are_saved_unsigned(tmp_path, keys):
    key_file(keys / "own")
    (keys / "own").chmod(0o644)  # others could sign with it: not used
    with pytest.warns(UserWarning, match="saved unsigned.*chmod 600"):
        save(tmp_path / "a.mlcz")
    assert "manifest.sig" not in members(tmp_path / "a.mlcz")
    (keys / "own").chmod(0o600)
    rebuild = Rebuilds()
    np.testing.assert_array_equal(artifact.load_executable(tmp_path / "a.mlcz", rebuild=rebuild)["f"](x), OWN)
    assert rebuild.calls == 1


def test_gpu_artifacts_follow_the_same_rule(tmp_path, monkeypatch):
    """Signed: its lowered IR and PTX are used; not: rebuilt for its architecture (on the simulated GPU)."""
    from mlc.codegen.nvptx import LIBDEVICE
    if not os.path.exists(LIBDEVICE):
        pytest.skip("no libdevice here: PTX cannot be made")
    monkeypatch.setenv("MLC_GPU_SIMULATE", "1")
    exe = compiler.compile(mlc.parse(MODULE), "cuda", cache=False)
    exe.set_global("w", np.full(4, 10, np.float32))
    exe.save(tmp_path / "a.mlcz")
    signed = artifact.load_executable(tmp_path / "a.mlcz", rebuild=lambda *a: pytest.fail("rebuilt a signed artifact"))
    np.testing.assert_array_equal(signed["f"](x), x + 10)
    repack(tmp_path / "a.mlcz", tmp_path / "b.mlcz", edit=set_in("kernels", {}))
    rebuild = Rebuilds()
    rebuilt = artifact.load_executable(tmp_path / "b.mlcz", rebuild=rebuild)
    assert rebuild.calls == 1 and type(rebuilt).__name__ == "GpuExecutable"
    np.testing.assert_array_equal(rebuilt["f"](x), x + 10)


def cache_entry(tmp_path):
    first = mlc.compile(mlc.parse(MODULE))
    [entry] = (tmp_path / "cache").iterdir()
    return first, entry


def test_cache_entries_with_foreign_code_are_misses(tmp_path):
    _, entry = cache_entry(tmp_path)
    repack(entry, entry, foreign_code(tmp_path))
    again = mlc.compile(mlc.parse(MODULE))
    assert again.compiled_here  # compiled, not taken from the entry
    np.testing.assert_array_equal(again["f"](x), OWN)
    assert not mlc.compile(mlc.parse(MODULE)).compiled_here  # the entry was replaced by a good, signed one


def test_cli_never_runs_foreign_code(tmp_path):
    repack(save(tmp_path / "a.mlcz"), tmp_path / "b.mlcz", foreign_code(tmp_path))
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([sys.executable, "-m", "mlc", "run", str(tmp_path / "b.mlcz"), "--input", f"x={tmp_path / 'x.npy'}",
                        "-o", str(tmp_path / "y.npz")], capture_output=True, text=True)
    assert "Traceback" not in r.stderr
    if r.returncode == 0:  # rebuilt from its IR (the command line gives the compiler to load_executable)
        np.testing.assert_array_equal(np.load(tmp_path / "y.npz")["result0"], OWN)
    else:
        assert "not signed by a key you trust" in r.stderr


# --- 2. the manifest's schema --------------------------------------------------------------------------------

def set_in(*path_and_value):
    *path, value = path_and_value

    def edit(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit,fragment", [
    (set_in("functions", "f", "checks", "x"), r"functions\[\"f\"\].checks must be a list"),
    (set_in("functions", "f", "checks", [[1, 2, 3]]), "must be a list of 5 entries"),
    (set_in("functions", "f", "checks", [["t.ir", -1, 0, "mlc.add", "m"]]), "must be an integer from 0"),
    (set_in("functions", "f", "checks", [["t.ir", True, 0, "mlc.add", "m"]]), "must be an integer"),
    (set_in("functions", "nope", {"checks": []}), "@nope, which is not a public function"),
    (set_in("functions", "f", {}), "exactly the keys checks"),
    (set_in("libm", ["system"]), "libm lists system"),
    (set_in("libm", "tanhf"), "libm must be a list"),
    (set_in("host", "x86"), "host must be an object"),
    (set_in("evil", 1), "exactly the keys"),
    (set_in("compiler", 7), "compiler must be a string"),
    (set_in("files", "code.o", "sha256", "zz"), "sha256 must be a string"),
    (set_in("files", "code.o", "size", -1), "size must be an integer"),
    (set_in("target", ["cuda"]), "unknown target"),
    (set_in("target", "cuda"), "exactly the keys"),
])
def test_manifests_outside_the_schema_are_refused_even_signed(tmp_path, edit, fragment):
    repack(save(tmp_path / "a.mlcz"), tmp_path / "b.mlcz", edit=edit, sign_with=trust.own_key())
    with pytest.raises(mlc.DiagnosticError, match=f"b.mlcz.*{fragment}"):
        artifact.load_executable(tmp_path / "b.mlcz", rebuild=Rebuilds())


@pytest.mark.parametrize("change,fragment", [
    (lambda f: f.update({"globals/evil.npy": f["globals/w.npy"]}), "members do not match its IR"),
    (lambda f: f.pop("code.ll"), "members do not match the manifest"),
    (lambda f: f.update({"evil.py": b"import os"}), "must be a string of at most 1024 characters matching"),
    (lambda f: f.update({"globals/w.npy": npy(np.zeros(5, np.float32))}), "global '@w' has shape"),
    (lambda f: f.update({"globals/w.npy": b"\x93NUMPY junk"}), "global '@w' is unreadable"),
    (lambda f: f.update({"globals/w.npy": npy(np.zeros(5, np.float32)).replace(b"(5,)", b"(1000000000000,)")}),
     "global '@w' is unreadable \\(its header claims 4.0 TB of data"),
    (lambda f: f.update({"module.ir": f["module.ir"].replace(b"mlc.relu", b"mlc.relux")}), "module.ir"),
])
def test_members_that_do_not_match_the_ir_are_refused(tmp_path, change, fragment):
    repack(save(tmp_path / "a.mlcz"), tmp_path / "b.mlcz", change, sign_with=trust.own_key())
    with pytest.raises(mlc.DiagnosticError, match=fragment):
        artifact.load_executable(tmp_path / "b.mlcz", rebuild=Rebuilds())


def npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("manifest", [b"[" * 100000 + b"]" * 100000, b"\xff\xfe junk", b"{}", b"[]"],
                         ids=["deeply nested", "not text", "empty object", "a list"])
def test_unreadable_manifests_are_refused(tmp_path, manifest):
    with zipfile.ZipFile(tmp_path / "b.mlcz", "w") as z:
        z.writestr("manifest.json", manifest)
    with pytest.raises(mlc.DiagnosticError, match="b.mlcz.*not an mlc artifact"):
        artifact.load_executable(tmp_path / "b.mlcz", rebuild=Rebuilds())


# --- 3. zip bombs --------------------------------------------------------------------------------------------

@pytest.fixture
def opened(monkeypatch):
    """The members load_executable decompresses."""
    names, real = [], zipfile.ZipFile.open

    def spy(self, name, *a, **k):
        names.append(getattr(name, "filename", name))
        return real(self, name, *a, **k)
    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    return names


def test_a_zip_bomb_is_refused_before_it_is_decompressed(tmp_path, monkeypatch, opened):
    monkeypatch.setattr(artifact, "MAX_BYTES", 16 << 20)
    repack(save(tmp_path / "a.mlcz"), tmp_path / "b.mlcz", lambda f: f.update({"code.ll": bytes(64 << 20)}))
    assert (tmp_path / "b.mlcz").stat().st_size < 1 << 20
    opened.clear()
    with pytest.raises(mlc.DiagnosticError, match="b.mlcz.*artifact too large"):
        artifact.load_executable(tmp_path / "b.mlcz", rebuild=Rebuilds())
    assert "code.ll" not in opened


def test_sizes_that_disagree_with_the_manifest_are_refused_unopened(tmp_path, opened):
    repack(save(tmp_path / "a.mlcz"), tmp_path / "b.mlcz", edit=set_in("files", "code.ll", "size", 10))
    opened.clear()
    with pytest.raises(mlc.DiagnosticError, match="'code.ll' is [0-9]+ bytes, its manifest says 10"):
        artifact.load_executable(tmp_path / "b.mlcz", rebuild=Rebuilds())
    assert "code.ll" not in opened


def test_a_huge_manifest_is_refused_unopened(tmp_path, monkeypatch, opened):
    monkeypatch.setattr(artifact, "MAX_MANIFEST", 1 << 10)
    repack(save(tmp_path / "a.mlcz"), tmp_path / "b.mlcz", edit=set_in("padding", " " * 4096))
    opened.clear()
    with pytest.raises(mlc.DiagnosticError, match="'manifest.json' is [0-9,]+ bytes, more than 1,024"):
        artifact.load_executable(tmp_path / "b.mlcz", rebuild=Rebuilds())
    assert opened == []


# --- 4. bad object code, even signed, never crashes ----------------------------------------------------------

def test_bad_object_code_is_refused_before_it_is_loaded(tmp_path):
    """In a child process: before the check, llvmlite crashed on each of these."""
    a = save(tmp_path / "a.mlcz")
    good = members(a)["code.o"]
    bad = {
        "empty": b"",
        "junk": os.urandom(4096),
        "header only": good[:64],
        "cut short": good[: len(good) // 2],
        "junk after the header": good[:64] + os.urandom(len(good) - 64),
        "archive cut in a header": jit.archive([good, good])[:100],
        "archive member's size past its end": jit.archive([good, good]).replace(str(len(good)).ljust(10).encode(), b"99999999  ", 1),
        "archive with a junk member": jit.archive([good, os.urandom(4096)]),
        "no symbol @f": good.replace(b"\0f\0", b"\0g\0"),
    }
    for i, obj in enumerate(bad.values()):
        repack(a, tmp_path / f"bad{i}.mlcz", lambda f, obj=obj: f.update({"code.o": obj}), sign_with=trust.own_key())
    script = textwrap.dedent(f"""
        import numpy as np, mlc
        from mlc.runtime import artifact
        for i in range({len(bad)}):
            try:
                exe = artifact.load_executable({str(tmp_path)!r} + f"/bad{{i}}.mlcz")
                exe["f"](np.zeros(4, np.float32))
                print("ran")
            except mlc.DiagnosticError as e:
                print("refused:", str(e).splitlines()[0])
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"the child crashed ({r.returncode}): {r.stderr[-2000:]}"
    lines = r.stdout.splitlines()
    assert len(lines) == len(bad), r.stdout
    for what, line in zip(bad, lines):
        assert "refused:" in line and "damaged artifact: code.o" in line, (what, line)
    assert "does not define @f" in lines[-1]


@pytest.mark.parametrize("example", ["mlp.ir", "cnn.ir", "rnn.ir", "transformer.ir"])
def test_the_object_check_accepts_what_the_compiler_makes(example):
    exe = mlc.compile(mlc.load(os.path.join(os.path.dirname(__file__), "..", "examples", example)), cache=False)
    assert artifact._object_problem(bytes(exe.jit.object_code), list(exe.functions)) is None


# --- 5. damage: a miss in the cache, a clear refusal for an artifact ------------------------------------------

def test_any_damage_to_a_cache_entry_is_a_miss(tmp_path):
    _, entry = cache_entry(tmp_path)
    good = entry.read_bytes()
    damaged = [good[:n] for n in range(0, len(good), len(good) // 10)]
    damaged += [good[:at] + bytes([good[at] ^ 0x5A]) + good[at + 1:] for at in range(0, len(good), len(good) // 40)]
    for data in damaged:
        entry.write_bytes(data)
        np.testing.assert_array_equal(mlc.compile(mlc.parse(MODULE))["f"](x), OWN)
    assert not mlc.compile(mlc.parse(MODULE)).compiled_here  # rebuilt and replaced


@pytest.mark.parametrize("edit", [set_in("libm", ["no_such_function"]), set_in("functions", "g", {"checks": []}),
                                  set_in("functions", "f", "checks", 3)])
def test_cache_entries_with_odd_manifests_are_misses(tmp_path, edit):
    _, entry = cache_entry(tmp_path)
    for key in (None, trust.own_key()):  # unsigned, and signed (as if this user's own mlc had written it)
        repack(entry, entry, edit=edit, sign_with=key, keep_signature=False)
        again = mlc.compile(mlc.parse(MODULE))
        assert again.compiled_here
        np.testing.assert_array_equal(again["f"](x), OWN)


def test_a_cache_entry_that_cannot_be_read_is_a_miss(tmp_path):
    _, entry = cache_entry(tmp_path)
    entry.unlink()
    entry.mkdir()  # IsADirectoryError; not replaceable either, which only costs speed
    np.testing.assert_array_equal(mlc.compile(mlc.parse(MODULE))["f"](x), OWN)


def test_damaged_compressed_data_is_a_damaged_artifact(tmp_path):
    a = save(tmp_path / "a.mlcz")
    data = bytearray(a.read_bytes())
    with zipfile.ZipFile(a) as z:
        info = z.getinfo("code.ll")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # past the local header
    for k in range(8):
        data[start + info.compress_size // 2 + k] ^= 0xFF
    (tmp_path / "b.mlcz").write_bytes(bytes(data))
    with pytest.raises(mlc.DiagnosticError, match="b.mlcz.*damaged artifact: 'code.ll' is unreadable"):
        artifact.load_executable(tmp_path / "b.mlcz", rebuild=Rebuilds())


# --- 6. files: the umask, stale temporaries ------------------------------------------------------------------

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_are_created_with_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save(tmp_path / "a.mlcz")
        files.write_atomically(tmp_path / "b.txt", b"b")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.mlcz").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == mode


def test_a_writer_killed_mid_write_leaves_nothing_for_long(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from mlc.runtime import files
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # dies after writing, before renaming
        files.write_atomically({str(tmp_path / "out" / "a.mlcz")!r}, b"x" * 1000)
    """)
    r = subprocess.run([sys.executable, "-c", script])
    assert r.returncode == -signal.SIGKILL
    [left] = (tmp_path / "out").iterdir()
    assert left.name.startswith(".tmp-")
    files.write_atomically(tmp_path / "out" / "b", b"b")
    assert left.exists()  # a minute's grace: the directory may be shared with another machine's writers
    past = time.time() - 120
    os.utime(left, (past, past))
    files.write_atomically(tmp_path / "out" / "b", b"b")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b"]


def test_only_stale_temporaries_are_removed(tmp_path):
    hour_ago, now = time.time() - 7200, time.time()
    alive = tmp_path / f".tmp-{os.getpid()}-0123abcd-x"      # this process: still writing
    old_style = tmp_path / ".tmp-k2j3h4g5model.mlcz"       # an older mlc's name: only its age tells
    ancient = tmp_path / ".tmp-oldone.mlcz"
    other = tmp_path / "keep.tmp"
    for p, t in ((alive, now), (old_style, now), (ancient, hour_ago), (other, hour_ago)):
        p.write_bytes(b"")
        os.utime(p, (t, t))
    files.write_atomically(tmp_path / "c", b"c")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, old_style.name, other.name, "c"])


def test_create_only_keeps_an_existing_file(tmp_path):
    assert files.write_atomically(tmp_path / "k", b"first", replace=False) is True
    assert files.write_atomically(tmp_path / "k", b"second", replace=False) is False
    assert (tmp_path / "k").read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["k"]
