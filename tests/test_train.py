"""`mlc train` and `mlc compile --train` end to end, as a user runs them: training reaches its accuracy,
checkpoints survive SIGKILL and resuming gives the weights of an uninterrupted run."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import mlc
from mlc.train import Options, digits, fit

from helpers import ROOT

pytest.importorskip("sklearn")
DIGITS_MLP = ROOT / "examples" / "digits_mlp.ir"
LINEAR = """module attributes {seed = 3} {
  mlc.global @w : tensor<3x2xf32> {init = "glorot_uniform", trainable}
  func.func @forward(%x: tensor<?x3xf32>) -> tensor<?x2xf32> {
    %w = mlc.global_load @w : tensor<3x2xf32>
    %y = mlc.matmul %x, %w : (tensor<?x3xf32>, tensor<3x2xf32>) -> tensor<?x2xf32>
    return %y : tensor<?x2xf32>
  }
  func.func @loss(%x: tensor<?x3xf32>, %y: tensor<?xi64>) -> tensor<f32> {
    %logits = func.call @forward(%x) : (tensor<?x3xf32>) -> tensor<?x2xf32>
    %l = mlc.cross_entropy %logits, %y : (tensor<?x2xf32>, tensor<?xi64>) -> tensor<f32>
    return %l : tensor<f32>
  }
}"""


def mlc_cmd(*args, cwd="/"):
    r = subprocess.run([sys.executable, "-m", "mlc", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)
    return r.returncode, r.stdout, r.stderr


def separable(tmp_path, n=200):
    r = np.random.default_rng(0)
    x = r.standard_normal((n, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) > 0).astype(np.int64)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    (tmp_path / "linear.ir").write_text(LINEAR)
    return tmp_path / "linear.ir", tmp_path / "train.npz"


def test_digits_split_is_fixed_and_stratified():
    (xtr, ytr), (xte, yte) = digits("train"), digits("test")
    assert xtr.shape == (1442, 64) and xte.shape == (355, 64) and xtr.dtype == np.float32
    assert 0 <= xtr.min() and xtr.max() <= 1
    np.testing.assert_array_equal(np.bincount(yte), np.bincount(np.concatenate([ytr, yte])) // 5)  # a fifth of each class
    np.testing.assert_array_equal(digits("test")[0], xte)


def test_train_an_npz_then_run_the_trained_artifact(tmp_path):
    model, data = separable(tmp_path)
    code, _, err = mlc_cmd("train", model, "--data", data, "--eval", data, "--predict", "@forward", "--epochs", "15",
                           "--batch-size", "16", "--lr", "0.05", "-o", tmp_path / "t.mlcz", "--plot", tmp_path / "loss.png", "--quiet")
    assert code == 0, err
    accuracies = [float(line.split("accuracy ")[1].split("%")[0]) for line in err.splitlines() if "accuracy" in line]
    assert len(accuracies) == 15 and accuracies[-1] >= 95, err
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    x = np.load(data)["x"][:5]
    np.save(tmp_path / "x.npy", x)
    code, out, err = mlc_cmd("run", tmp_path / "t.mlcz", "--entry", "@forward", "--input", f"x={tmp_path / 'x.npy'}",
                             "-o", tmp_path / "out.npz")
    assert code == 0, err
    trained = mlc.load_executable(tmp_path / "t.mlcz")
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["result0"], x @ trained.globals["w"], rtol=1e-5)


def test_digits_mlp_learns(tmp_path):
    """A short run of the shipped example (the README's command trains it to >= 97%)."""
    exe = fit(mlc.load(DIGITS_MLP), Options(data="digits", eval="digits", epochs=3, batch_size=32, lr=3e-3, progress=False),
              out=open(os.devnull, "w"))
    assert exe.history["metrics"][-1]["accuracy"] > 0.9
    assert exe.globals["train_step.step"] == 3 * 46  # ceil(1442 / 32) steps per epoch


def _weights(path):
    exe = mlc.load_executable(path)
    return {k: v for k, v in exe.globals.items()}


def test_resume_after_sigkill_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    common = ["train", DIGITS_MLP, "--data", "digits", "--epochs", "3", "--batch-size", "64", "--quiet",
              "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05", "--schedule", "cosine"]
    code, _, err = mlc_cmd(*common, "-o", tmp_path / "whole.mlcz")
    assert code == 0, err
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "mlc", *map(str, common), "--checkpoint-dir", ckpt, "--checkpoint-every", "1",
                             "-o", tmp_path / "resumed.mlcz"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (ckpt / "checkpoint.npz").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.002)
    time.sleep(0.05)  # in the middle of the run: checkpoints are being written every step
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    code, _, err = mlc_cmd(*common, "--checkpoint-dir", ckpt, "--resume", "-o", tmp_path / "resumed.mlcz")
    assert code == 0, err
    assert "resuming at epoch" in err, err
    whole, resumed = _weights(tmp_path / "whole.mlcz"), _weights(tmp_path / "resumed.mlcz")
    assert whole.keys() == resumed.keys()
    for k in whole:
        np.testing.assert_array_equal(resumed[k], whole[k], err_msg=k)


def test_compile_train_puts_the_step_in_the_artifact(tmp_path):
    model, data = separable(tmp_path)
    code, _, err = mlc_cmd("compile", model, "--train", "--loss", "@loss", "--optimizer", "sgd", "--lr", "0.1",
                           "-o", tmp_path / "m.mlcz")
    assert code == 0, err
    exe = mlc.load_executable(tmp_path / "m.mlcz")
    d = np.load(data)
    before = exe.globals["w"].copy()
    loss0 = exe["loss"](d["x"], d["y"])
    np.testing.assert_allclose(exe["train_step"](d["x"], d["y"]), loss0, rtol=1e-6)
    assert not np.array_equal(exe.globals["w"], before)
    assert exe["loss"](d["x"], d["y"]) < loss0


@pytest.mark.parametrize("args,message", [
    (["--data", "missing.npz"], "missing.npz: error: no such file"),
    (["--data", "{bad}"], "not a readable .npz file"),
    (["--data", "{wrong}"], "has no array for argument %y of @loss \\(it has: x, labels\\)"),
    (["--data", "{data}", "--resume"], "--resume: error: needs --checkpoint-dir"),
    (["--data", "{data}", "--epochs", "0"], "--epochs"),
    (["--data", "{data}", "--loss", "@nope"], "no loss function @nope"),
    (["--data", "{data}", "--lr", "-1"], "the learning rate must be positive"),
    (["--data", "{data}", "--checkpoint-dir", "{ckpt}", "--resume"], "checkpoint.npz: error: not a readable .npz file"),
])
def test_bad_training_input_is_a_clear_error(tmp_path, args, message):
    model, data = separable(tmp_path)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really")
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 3), np.float32), labels=np.zeros(4, np.int64))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "checkpoint.npz").write_bytes(b"damaged")
    subs = {"{bad}": tmp_path / "bad.npz", "{wrong}": tmp_path / "wrong.npz", "{data}": data, "{ckpt}": tmp_path / "ckpt"}
    code, out, err = mlc_cmd("train", model, *[str(subs.get(a, a)) for a in args], "--quiet", "-o", tmp_path / "o.mlcz",
                             cwd=tmp_path)
    assert code == 1 and "Traceback" not in err and "internal error" not in err, err
    assert re.search(message, err), err


def test_a_closed_pipe_does_not_lose_the_run(tmp_path):
    """`mlc train ... 2>&1 | head -2`: the reader goes away after two lines; training still runs every
    epoch, writes its checkpoint and artifact, and exits 0 without a traceback."""
    model, data = separable(tmp_path)
    command = (f"{sys.executable} -m mlc train {model} --data {data} --eval {data} --predict @forward --epochs 6 "
               f"--batch-size 4 --checkpoint-dir {tmp_path / 'ck'} -o {tmp_path / 't.mlcz'} 2>&1 | head -2; "
               "exit ${PIPESTATUS[0]}")
    r = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and len(r.stdout.splitlines()) <= 2 and "Traceback" not in r.stdout + r.stderr, r
    code, _, err = mlc_cmd("train", model, "--data", data, "--epochs", "6", "--batch-size", "4", "-o", tmp_path / "whole.mlcz")
    assert code == 0, err
    np.testing.assert_array_equal(mlc.load_executable(tmp_path / "t.mlcz").globals["w"],
                                  mlc.load_executable(tmp_path / "whole.mlcz").globals["w"])  # every epoch ran
