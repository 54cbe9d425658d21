"""The command line end to end, through subprocesses, as a user runs it."""
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import mlc

from helpers import EXAMPLES, ROOT


def mlc_cmd(*args, stdin=None):
    r = subprocess.run([sys.executable, "-m", "mlc", *map(str, args)], capture_output=True, text=True,
                       input=stdin, cwd="/", timeout=300)
    return r.returncode, r.stdout, r.stderr


MLP = ROOT / "examples" / "mlp.ir"


def test_version_and_help():
    code, out, _ = mlc_cmd("--version")
    assert code == 0 and out.strip() == f"mlc {mlc.__version__}"
    code, out, _ = mlc_cmd("--help")
    assert code == 0 and "verify" in out and "opt" in out and "run" in out
    code, out, _ = mlc_cmd("run", "--help")
    assert code == 0 and "--random-inputs" in out
    code, _, _ = mlc_cmd()
    assert code == 1


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_verify_and_run(path):
    assert mlc_cmd("verify", path) == (0, "", "")
    code, out, err = mlc_cmd("run", path, "--random-inputs", "--seed", "3")
    assert code == 0, err
    assert out.startswith("result0: tensor<")


def test_verify_reports_every_error_with_location(tmp_path):
    bad = tmp_path / "bad.ir"
    text = (MLP.read_text().replace("tensor<64x32xf32>) -> tensor<?x32xf32>", "tensor<64x32xf32>) -> tensor<?x33xf32>")
            .replace("%a = mlc.relu %hb", "%a = mlc.relu %hb {bogus = 1}"))
    bad.write_text(text)
    line_of = {w: next(i + 1 for i, line in enumerate(text.splitlines()) if w in line) for w in ("?x33", "bogus")}
    code, out, err = mlc_cmd("verify", bad)
    assert code == 1 and out == ""
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert lines[0].startswith(f"{bad}:{line_of['?x33']}:10: error: 'mlc.matmul': result type tensor<?x33xf32> does not match")
    assert f"{bad}:{line_of['bogus']}:10: error: 'mlc.relu': unknown attribute 'bogus'" in "\n".join(lines)
    assert "Traceback" not in err


@pytest.mark.parametrize("content,fragment", [
    (None, "no such file"),
    (b"\x7fELF\x00\x01\xff\xfe", "not UTF-8 text"),
    (b"module {\n  func.func @f(", "syntax error: unexpected end of input"),
    (b"module { func.func @f() { %x = mlc.add } }", "expects 2 operands"),
])
def test_bad_files(tmp_path, content, fragment):
    path = tmp_path / "m.ir"
    if content is not None:
        path.write_bytes(content)
    code, _, err = mlc_cmd("verify", path)
    assert code == 1 and fragment in err and "Traceback" not in err, err


def test_opt_writes_output_and_round_trips(tmp_path):
    out = tmp_path / "out.ir"
    code, stdout, err = mlc_cmd("opt", ROOT / "examples" / "transformer.ir", "--pass-pipeline", "inline,symbol-dce,canonicalize,cse", "-o", out)
    assert code == 0 and stdout == "", err
    text = out.read_text()
    assert "func.call" not in text and "@layer_norm" not in text
    assert mlc_cmd("verify", out)[0] == 0
    code, again, _ = mlc_cmd("opt", out)
    assert again == text


def test_opt_pipeline_errors():
    code, _, err = mlc_cmd("opt", MLP, "--pass-pipeline", "canonicalize{nope=1}")
    assert code == 1 and "pass 'canonicalize' has no option 'nope'" in err
    code, out, _ = mlc_cmd("opt", "--list-passes")
    assert code == 0 and "symbol-dce" in out


def test_run_with_inputs_and_output(tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    labels = np.array([1, 2, 3, 4, 5])
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "labels.npy", labels)
    code, _, err = mlc_cmd("run", MLP, "--entry", "@loss", "--input", f"x={tmp_path / 'x.npy'}",
                           "--input", f"labels={tmp_path / 'labels.npy'}", "-o", tmp_path / "out.npz")
    assert code == 0, err
    got = np.load(tmp_path / "out.npz")["result0"]
    want = mlc.interpret(mlc.load(MLP), "loss", x, labels)
    np.testing.assert_allclose(got, want, rtol=1e-6)  # the CPU backend (default) against the interpreter
    np.savez(tmp_path / "in.npz", x=x)
    code, out, err = mlc_cmd("run", MLP, "--input", tmp_path / "in.npz")
    assert code == 0 and "result0: tensor<?x10xf32>" in out, err


@pytest.mark.parametrize("args,fragment", [
    (["--entry", "@nope", "--random-inputs"], "no function '@nope'"),
    ([], "missing input 'x' (tensor<?x64xf32>)"),
    (["--input", "y=whatever.npy"], "has no argument 'y' (arguments: x)"),
    (["--input", "x=/does/not/exist.npy"], "/does/not/exist.npy: error: no such file"),
    (["--input", "x"], "expected NAME=FILE.npy"),
    (["--random-inputs", "--dynamic-size", "-5"], "--dynamic-size: error: must be at least 0, got -5"),
])
def test_run_errors(args, fragment):
    code, _, err = mlc_cmd("run", MLP, *args)
    assert code == 1 and fragment in err and "Traceback" not in err, err


def test_the_cuda_target_compiles_to_ptx_and_runs_only_with_a_gpu(tmp_path):
    from mlc.codegen.nvptx import LIBDEVICE
    code, out, err = mlc_cmd("compile", MLP, "--target", "cuda", "--emit", "ptx")
    if os.path.exists(LIBDEVICE):
        assert code == 0 and ".visible .entry forward_k0(" in out and ".target sm_90" in out, err
    else:
        assert code == 1 and "libdevice" in err and "Traceback" not in err, err
    code, out, err = mlc_cmd("compile", MLP, "--target", "cuda", "--emit", "loops")
    assert code == 0 and "gpu.launch" in out, err
    code, _, err = mlc_cmd("compile", MLP, "--target", "cuda", "-o", tmp_path / "m.mlcz")
    if os.path.exists(LIBDEVICE):  # an artifact with the PTX, which runs where there is a GPU
        assert code == 0 and (tmp_path / "m.mlcz").exists(), err
    try:
        import pycuda  # noqa: F401
    except ImportError:
        for source in [MLP, "--backend", "cuda"], [tmp_path / "m.mlcz"]:
            if not os.path.exists(source[0]):
                continue
            code, _, err = mlc_cmd("run", *source, "--random-inputs")
            assert code == 1 and "cannot run them here: pycuda is not installed" in err and "Traceback" not in err, err


def test_run_rejects_bad_arrays(tmp_path):
    np.save(tmp_path / "wrong.npy", np.ones((5, 63), np.float32))
    code, _, err = mlc_cmd("run", MLP, "--input", f"x={tmp_path / 'wrong.npy'}")
    assert code == 1 and "argument 'x' must have shape [?, 64]" in err
    np.save(tmp_path / "f64.npy", np.ones((5, 64)))
    code, _, err = mlc_cmd("run", MLP, "--input", f"x={tmp_path / 'f64.npy'}")
    assert code == 1 and "argument 'x' must have dtype float32" in err
    (tmp_path / "junk.npy").write_bytes(b"not an npy")
    code, _, err = mlc_cmd("run", MLP, "--input", f"x={tmp_path / 'junk.npy'}")
    assert code == 1 and "not a readable .npy file" in err
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    code, _, err = mlc_cmd("run", MLP, "--input", f"x={tmp_path / 'obj.npy'}")
    assert code == 1 and "not a readable .npy file" in err and "Traceback" not in err
    # a header claiming more data than the file holds: refused before numpy allocates it
    huge = (tmp_path / "f64.npy").read_bytes().replace(b"(5, 64)", b"(10000000000000, 64)")
    (tmp_path / "huge.npy").write_bytes(huge)
    code, _, err = mlc_cmd("run", MLP, "--input", f"x={tmp_path / 'huge.npy'}")
    assert code == 1 and "huge.npy: error: not a readable .npy file (its header claims 5.1 PB of data" in err, err
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("x.npy", huge)
    code, _, err = mlc_cmd("run", MLP, "--input", tmp_path / "huge.npz")
    assert code == 1 and "huge.npz: error: not a readable .npz file ('x.npy' is damaged) (its header claims" in err, err


def test_run_time_errors_are_located(tmp_path):
    path = tmp_path / "dyn.ir"
    path.write_text("module {\n  func.func @f(%x: tensor<?x3xf32>, %y: tensor<4x3xf32>) -> tensor<4x3xf32> {\n"
                    "    %z = mlc.add %x, %y : (tensor<?x3xf32>, tensor<4x3xf32>) -> tensor<4x3xf32>\n"
                    "    return %z : tensor<4x3xf32>\n  }\n}\n")
    for backend in ("cpu", "interp"):
        code, _, err = mlc_cmd("run", path, "--random-inputs", "--dynamic-size", "2", "--backend", backend)
        assert code == 1 and err.startswith(f"{path}:3:10: error: 'mlc.add'"), err


def test_stdin_is_dash():
    code, out, err = mlc_cmd("opt", "-", stdin=MLP.read_text())
    assert code == 0 and out == str(mlc.load(MLP)), err


def test_an_artifact_runs_on_the_interpreter_with_its_weights(tmp_path):
    """`mlc run x.mlcz --backend interp` runs the artifact's IR, with the weights it holds, on the
    interpreter: the same numbers as its native code."""
    exe = mlc.compile(mlc.parse(MLP.read_text()))
    exe.set_global("w1", exe.globals["w1"] * 3)  # (weights that differ from the module's initial ones)
    exe.save(tmp_path / "m.mlcz")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32))
    results = []
    for backend in ("cpu", "interp"):
        code, _, err = mlc_cmd("run", tmp_path / "m.mlcz", "--input", f"x={tmp_path / 'x.npy'}", "--backend", backend,
                               "-o", tmp_path / f"{backend}.npz")
        assert code == 0, err
        results.append(np.load(tmp_path / f"{backend}.npz")["result0"])
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-6)
    want = mlc.interpret(mlc.parse(MLP.read_text()), "forward", np.load(tmp_path / "x.npy"))
    assert not np.allclose(results[1], want)  # (its weights, not the module's)
