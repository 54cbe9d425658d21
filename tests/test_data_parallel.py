"""Data-parallel training: `train_step{data-parallel}` in one process and in a simulated world
(synchronised batch norm in a world of threads), then `mpiexec -n 2 mlc train` against one process
with the same global batch (weights, losses, accuracy, a resume; a model with batch norm),
`compile_train_step(..., data_parallel=True)`, and a failing, killed or hung process ending the job
instead of leaving the other waiting."""
import importlib.util
import json
import os
import signal
import sys
import textwrap
import threading

import numpy as np
import pytest

import mlc
from mlc.api import run_passes
from mlc.compiler import lower
from mlc.ir.collectives import using
from mlc.ir.interpreter import Interpreter
from mlc.train import META, Options, fit

from helpers import find_mpiexec, run_session

MODEL = """module @tiny attributes {seed = 3} {
  mlc.global @w1 : tensor<8x16xf32> {init = "he_uniform", trainable}
  mlc.global @b1 : tensor<16xf32> {init = "zeros", trainable}
  mlc.global @w2 : tensor<16x3xf32> {init = "glorot_uniform", trainable}
  mlc.global @b2 : tensor<3xf32> {init = "zeros", trainable}
  mlc.global @rng : tensor<2xi64> {init = dense<[7, 0]> : tensor<2xi64>}

  func.func @forward(%x: tensor<?x8xf32>) -> tensor<?x3xf32> {
    %w1 = mlc.global_load @w1 : tensor<8x16xf32>
    %b1 = mlc.global_load @b1 : tensor<16xf32>
    %w2 = mlc.global_load @w2 : tensor<16x3xf32>
    %b2 = mlc.global_load @b2 : tensor<3xf32>
    %z1 = mlc.matmul %x, %w1 : (tensor<?x8xf32>, tensor<8x16xf32>) -> tensor<?x16xf32>
    %s1 = mlc.add %z1, %b1 : (tensor<?x16xf32>, tensor<16xf32>) -> tensor<?x16xf32>
    %h1 = mlc.tanh %s1
    %z2 = mlc.matmul %h1, %w2 : (tensor<?x16xf32>, tensor<16x3xf32>) -> tensor<?x3xf32>
    %logits = mlc.add %z2, %b2 : (tensor<?x3xf32>, tensor<3xf32>) -> tensor<?x3xf32>
    return %logits : tensor<?x3xf32>
  }

  func.func @loss(%x: tensor<?x8xf32>, %labels: tensor<?xi64>) -> tensor<f32> {
    %logits = func.call @forward(%x) : (tensor<?x8xf32>) -> tensor<?x3xf32>
    %l = mlc.cross_entropy %logits, %labels : (tensor<?x3xf32>, tensor<?xi64>) -> tensor<f32>
    return %l : tensor<f32>
  }
}
"""
# MODEL with batch norm on the hidden layer: @loss trains it (batch statistics, stores the running ones)
BN_MODEL = """module @norm attributes {seed = 5} {
  mlc.global @w1 : tensor<8x16xf32> {init = "he_uniform", trainable}
  mlc.global @bn.weight : tensor<16xf32> {init = "ones", trainable}
  mlc.global @bn.bias : tensor<16xf32> {init = "zeros", trainable}
  mlc.global @bn.running_mean : tensor<16xf32> {init = "zeros"}
  mlc.global @bn.running_var : tensor<16xf32> {init = "ones"}
  mlc.global @w2 : tensor<16x3xf32> {init = "glorot_uniform", trainable}
  mlc.global @b2 : tensor<3xf32> {init = "zeros", trainable}

  func.func private @net(%x: tensor<?x8xf32>, %training: tensor<i1>) -> (tensor<?x3xf32>, tensor<16xf32>, tensor<16xf32>) {
    %w1 = mlc.global_load @w1 : tensor<8x16xf32>
    %g = mlc.global_load @bn.weight : tensor<16xf32>
    %b = mlc.global_load @bn.bias : tensor<16xf32>
    %m = mlc.global_load @bn.running_mean : tensor<16xf32>
    %v = mlc.global_load @bn.running_var : tensor<16xf32>
    %w2 = mlc.global_load @w2 : tensor<16x3xf32>
    %b2 = mlc.global_load @b2 : tensor<3xf32>
    %z1 = mlc.matmul %x, %w1 : (tensor<?x8xf32>, tensor<8x16xf32>) -> tensor<?x16xf32>
    %n, %m_next, %v_next = mlc.batch_norm %z1, %g, %b, %m, %v, %training
      : (tensor<?x16xf32>, tensor<16xf32>, tensor<16xf32>, tensor<16xf32>, tensor<16xf32>, tensor<i1>)
      -> (tensor<?x16xf32>, tensor<16xf32>, tensor<16xf32>)
    %h = mlc.tanh %n
    %z2 = mlc.matmul %h, %w2 : (tensor<?x16xf32>, tensor<16x3xf32>) -> tensor<?x3xf32>
    %logits = mlc.add %z2, %b2 : (tensor<?x3xf32>, tensor<3xf32>) -> tensor<?x3xf32>
    return %logits, %m_next, %v_next : tensor<?x3xf32>, tensor<16xf32>, tensor<16xf32>
  }

  func.func @forward(%x: tensor<?x8xf32>) -> tensor<?x3xf32> {
    %eval = mlc.constant dense<false> : tensor<i1>
    %logits, %m, %v = func.call @net(%x, %eval) : (tensor<?x8xf32>, tensor<i1>) -> (tensor<?x3xf32>, tensor<16xf32>, tensor<16xf32>)
    return %logits : tensor<?x3xf32>
  }

  func.func @loss(%x: tensor<?x8xf32>, %labels: tensor<?xi64>) -> tensor<f32> {
    %train = mlc.constant dense<true> : tensor<i1>
    %logits, %m, %v = func.call @net(%x, %train) : (tensor<?x8xf32>, tensor<i1>) -> (tensor<?x3xf32>, tensor<16xf32>, tensor<16xf32>)
    mlc.global_store @bn.running_mean, %m : tensor<16xf32>
    mlc.global_store @bn.running_var, %v : tensor<16xf32>
    %l = mlc.cross_entropy %logits, %labels : (tensor<?x3xf32>, tensor<?xi64>) -> tensor<f32>
    return %l : tensor<f32>
  }
}
"""
# 45 examples in global batches of 7: shares of 4 and 3, and a last batch of 3 (shares 2 and 1)
TRAIN = ["--data", "d.npz", "--eval", "d.npz", "--batch-size", "7", "--clip-norm", "0.5", "--lr", "0.01", "--quiet"]


def data() -> dict:
    r = np.random.default_rng(0)
    x = r.normal(size=(45, 8)).astype(np.float32)
    return {"x": x, "labels": ((x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5))}


def options(folder, **kw) -> Options:
    return Options(data=str(folder / "d.npz"), eval=str(folder / "d.npz"), batch_size=7, clip_norm=0.5, lr=0.01, progress=False, **kw)


# --- the pass ----------------------------------------------------------------------------------------

def dropout_model() -> mlc.Module:
    """MODEL with dropout on the hidden layer in @loss, its key advanced every step."""
    text = MODEL.replace("""    %l = mlc.cross_entropy %logits, %labels""", """    %key = mlc.global_load @rng : tensor<2xi64>
    %t = mlc.constant dense<true> : tensor<i1>
    %dropped = mlc.dropout %logits, %key, %t {p = 0.5} : (tensor<?x3xf32>, tensor<2xi64>, tensor<i1>) -> tensor<?x3xf32>
    %one = mlc.constant dense<[0, 1]> : tensor<2xi64>
    %next = mlc.add %key, %one
    mlc.global_store @rng, %next : tensor<2xi64>
    %l = mlc.cross_entropy %dropped, %labels""")
    return mlc.parse(text)


def trained(module, world=None, steps=3):
    """The globals after `steps` steps of the interpreter on the first 7 examples (in `world`)."""
    d = data()
    interp = Interpreter(module)
    with using(world):
        losses = [float(interp.call_public("train_step", (d["x"][:7], d["labels"][:7]))) for _ in range(steps)]
    return losses, {k: np.array(v) for k, v in interp.globals.items()}


class TwinWorld:
    """Rank 1 of 2 processes holding the same arrays: a sum doubles, a broadcast changes nothing."""
    rank, size = 1, 2

    def allreduce(self, a, reduction):
        return a * 2 if reduction == "sum" else a

    def bcast(self, a, root):
        return a


def test_the_pass_reduces_once_before_clipping_and_offsets_random_keys():
    plain, parallel = dropout_model(), dropout_model()
    run_passes(plain, "train_step{loss=@loss clip-norm=0.5}")
    run_passes(parallel, "train_step{loss=@loss clip-norm=0.5 data-parallel=true}")
    ops = list(parallel.functions["train_step"].body.walk())
    names = [op.name for op in ops]
    assert names.count("mlc.all_reduce") == 1 and names.count("mlc.rank") == 1  # one bucket: loss and gradients
    assert ops[names.index("mlc.all_reduce")].attr("reduction") == "sum"
    assert names.index("mlc.all_reduce") < names.index("mlc.sqrt")  # clipping sees the global norm
    random = next(op for op in ops if op.name == "mlc.random_uniform")
    assert random.operands[0].defining_op().name == "mlc.add"  # the key plus rank * 2**40
    # in one process, and in a world of two that hold the same batch, it is the plain step
    want_losses, want = trained(plain)
    for world in (None, TwinWorld()):
        losses, got = trained(parallel.clone() if world else parallel)
        np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
        for name in ("w1", "b2", "w2.exp_avg", "rng"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_other_ranks_draw_other_dropout_masks():
    parallel = dropout_model()
    run_passes(parallel, "train_step{loss=@loss data-parallel=true}")
    zero, _ = trained(parallel, steps=1)
    one, globals_one = trained(parallel, TwinWorld(), steps=1)
    assert zero != one  # (a twin's average is its own: the loss differs only by the mask)
    np.testing.assert_array_equal(globals_one["rng"], [7, 1])  # the key global itself is the same everywhere


# --- synchronised batch norm ----------------------------------------------------------------------------

class ThreadWorld:
    """A world of `size` threads of this process (rank: the calling thread's), whose collectives meet
    at a barrier: what several processes do, in one."""

    def __init__(self, size):
        self.size = self.local_size = size
        self.local = threading.local()
        self.slots = [None] * size
        self.barrier = threading.Barrier(size, timeout=60)

    @property
    def rank(self):
        return self.local.rank

    def allreduce(self, a, reduction):
        self.slots[self.rank] = np.array(a)
        self.barrier.wait()
        p = np.stack(self.slots)
        out = {"sum": p.sum(0), "mean": p.mean(0), "max": p.max(0), "min": p.min(0)}[reduction].astype(p.dtype)
        self.barrier.wait()
        return out

    def bcast(self, a, root):
        self.slots[self.rank] = np.array(a)
        self.barrier.wait()
        out = self.slots[root].copy()
        self.barrier.wait()
        return out

    def run(self, fn):
        """fn(rank) on every rank, each in its thread; their results by rank."""
        results, errors = [None] * self.size, []
        def main(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as e:
                errors.append(e); self.barrier.abort()
        threads = [threading.Thread(target=main, args=(r,)) for r in range(self.size)]
        with using(self):
            for t in threads: t.start()
            for t in threads: t.join()
        if errors: raise errors[0]
        return results



def bn_batches():
    """The 45 examples in global batches of 7 (the last one 3)."""
    return [np.arange(b, min(b + 7, 45)) for b in range(0, 45, 7)]


def trained_in(world, pipeline, batches=None):
    """(losses, globals) of each rank after an epoch of the interpreter on BN_MODEL (by default in
    bn_batches()), each rank taking its contiguous share of every global batch (world None: one process)."""
    m = mlc.parse(BN_MODEL)
    run_passes(m, pipeline)
    d = data()

    def train(rank):
        interp = Interpreter(m)
        losses = []
        for idx in batches or bn_batches():
            mine = np.array_split(idx, world.size)[rank] if world else idx
            losses.append(float(interp.call_public("train_step", (d["x"][mine], d["labels"][mine]))))
        return losses, {k: np.array(v) for k, v in interp.globals.items()}
    return world.run(train) if world else [train(0)]


def test_synchronised_batch_norm_all_reduces_its_sums_forward_and_backward():
    for sync, want in (("true", 3), ("false", 1)):
        m = mlc.parse(BN_MODEL)
        run_passes(m, f"train_step{{loss=@loss data-parallel=true sync-batch-norm={sync}}}")
        reduces = [op for op in m.functions["train_step"].body.walk() if op.name == "mlc.all_reduce"]
        # the statistics (forward), their cotangents (backward), then the gradients
        assert len(reduces) == want, sync
        if sync == "true":
            assert [op.operands[0].type.shape for op in reduces[:2]] == [(33,), (33,)]  # 16 sums, 16 squares, the count
        assert sorted(m.functions) == ["forward", "loss", "net", "train_step"]  # (the synchronised copy is gone)
        assert not any(op.name == "mlc.all_reduce" for op in m.functions["net"].body.walk())  # inference is untouched


@pytest.mark.parametrize("size", [2, 3])
def test_synchronised_batch_norm_trains_as_one_process(size):
    """Shares of 4 and 3 (3, 2 and 2), a last batch of 3 (a process with one example): with the global
    batch's statistics, N processes give one process's losses, weights, optimiser state and running
    statistics; with each process's own statistics they do not."""
    pipeline = "train_step{loss=@loss lr=0.01 clip-norm=0.5}"
    (want_losses, want), = trained_in(None, pipeline)
    parallel = pipeline.replace("}", " data-parallel=true}")
    for rank, (losses, got) in enumerate(trained_in(ThreadWorld(size), parallel)):
        np.testing.assert_allclose(losses, want_losses, rtol=1e-5, err_msg=f"rank {rank}")
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-6, err_msg=f"rank {rank}: {name}")
    (losses, got), *_ = trained_in(ThreadWorld(size), parallel.replace("}", " sync-batch-norm=false}"))
    assert not np.allclose(got["w1"], want["w1"], rtol=1e-3, atol=1e-4)


def test_the_options_reach_the_pass():
    from mlc.cli import build_parser
    from mlc.train import train_step_pipeline
    for flag, want in (([], True), (["--no-sync-batch-norm"], False)):
        args = build_parser().parse_args(["train", "m.ir", "--data", "digits", *flag])
        assert args.sync_batch_norm is want
        pipeline = train_step_pipeline(Options(sync_batch_norm=want), data_parallel=True)
        assert ("sync-batch-norm=false" in pipeline) is not want and "data-parallel=true" in pipeline
    assert build_parser().parse_args(["train", "m.ir", "--data", "digits"]).bucket_mb == 1.0
    assert "bucket-mb=0.25" in train_step_pipeline(Options(bucket_mb=0.25), data_parallel=True)


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # (the interpreter's loss of no examples)
def test_synchronised_batch_norm_with_a_process_without_examples():
    """A global batch of one example: process 1 has none (its loss is nan), and adds nothing."""
    batches = [np.arange(0, 7), np.arange(7, 8), np.arange(8, 15)]
    (want_losses, want), = trained_in(None, "train_step{loss=@loss lr=0.01}", batches)
    for losses, got in trained_in(ThreadWorld(2), "train_step{loss=@loss lr=0.01 data-parallel=true}", batches):
        np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
        for name in ("w1", "bn.weight", "bn.bias", "w2", "b2", "bn.running_mean"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_gradient_buckets_overlap_the_backward_pass_and_train_as_one_process():
    """bucket-mb so small that every value travels alone: the step begins each one's all-reduce as
    soon as the backward pass has computed it, and the CPU pipeline waits for it only where the update
    reads it, with kernels and progress calls between. Compiled, in a world of two threads (whose
    all-reduces happen at the wait, so a read before it would see this process's value alone), the
    step trains as one process does on the interpreter."""
    pipeline = "train_step{loss=@loss lr=0.01 clip-norm=0.5}"
    (want_losses, want), = trained_in(None, pipeline)
    m = mlc.parse(BN_MODEL)
    run_passes(m, pipeline.replace("}", " data-parallel=true bucket-mb=1e-9}"))
    ops = m.functions["train_step"].body.ops
    reduces = [k for k, op in enumerate(ops) if op.name == "mlc.all_reduce"]
    # batch norm's two, then the loss, the two running statistics and the five gradients, each alone
    assert len(reduces) == 2 + 8
    last_product = max(k for k, op in enumerate(ops) if op.name in ("mlc.matmul", "mlc.dot_general"))
    assert sum(k < last_product for k in reduces[2:]) >= 4  # begun while the backward pass still runs
    exes = [mlc.compile(m) for _ in range(2)]  # (a rank each: its own globals)
    loops = [op.name for op in lower(m).functions["train_step"].body]
    assert loops.count("mem.all_reduce_start") == loops.count("mem.all_reduce_wait") == 10 and "mem.all_reduce" not in loops
    assert loops.count("mem.collective_progress") >= 10
    d = data()

    def train(rank):
        step = exes[rank]["train_step"]
        losses = [float(step(d["x"][mine], d["labels"][mine])) for mine in (np.array_split(idx, 2)[rank] for idx in bn_batches())]
        return losses, exes[rank].globals
    for rank, (losses, got) in enumerate(ThreadWorld(2).run(train)):
        np.testing.assert_allclose(losses, want_losses, rtol=1e-5, err_msg=f"rank {rank}")
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-6, err_msg=f"rank {rank}: {name}")


# --- real processes ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mpi(tmp_path_factory):
    """(mpiexec, a folder with the model and data), or a skip saying why MPI cannot run here."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install 'mlc[dist]')")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec (the mpich wheel has one: pip install 'mlc[dist]')")
    folder = tmp_path_factory.mktemp("dp")
    (folder / "hello.py").write_text("from mpi4py import MPI\nassert MPI.COMM_WORLD.Get_size() == 2\n")
    code, out = run_session([mpiexec, "-n", "2", sys.executable, "hello.py"], folder, timeout=60)
    if code != 0:
        pytest.skip(f"MPI cannot start 2 processes here ({mpiexec}): {out[-500:]}")
    (folder / "tiny.ir").write_text(MODEL)
    (folder / "bn.ir").write_text(BN_MODEL)
    np.savez(folder / "d.npz", **data())
    return mpiexec, folder


def mlc_train(mpi, *args, script=None, timeout=90, model="tiny.ir"):
    mpiexec, folder = mpi
    command = [sys.executable, script] if script else [sys.executable, "-m", "mlc.cli"]
    return run_session([mpiexec, "-n", "2", *command, "train", model, *TRAIN, *args], folder, timeout)


def checkpoint(path) -> tuple[dict, dict]:
    with np.load(path) as z:
        arrays = {k.removeprefix("global/"): z[k] for k in z.files if k != META}
        return arrays, json.loads(z[META].tobytes().decode())


def test_two_processes_train_as_one_with_the_same_global_batch_and_resume(mpi):
    _, folder = mpi
    one = fit(mlc.parse(MODEL), options(folder, epochs=2))
    code, out = mlc_train(mpi, "--epochs", "1", "--checkpoint-dir", "ckpt", "-o", "first.mlcz")
    assert code == 0, f"exit status {code} (None: timed out)\n{out}"
    assert "on 2 processes" in out and out.count("epoch 1/1:") == 1, out  # progress printed once
    code, out = mlc_train(mpi, "--epochs", "2", "--checkpoint-dir", "ckpt", "--resume", "-o", "two.mlcz")
    assert code == 0, f"exit status {code} (None: timed out)\n{out}"
    assert out.count("resuming at epoch 2") == 1 and out.count("wrote two.mlcz") == 1, out
    weights, state = checkpoint(folder / "ckpt" / "checkpoint.npz")
    for name, value in one.globals.items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(state["losses"], one.history["losses"], rtol=1e-5)
    assert state["metrics"] == one.history["metrics"]  # the same accuracy after each epoch
    assert (folder / "two.mlcz").exists()


def test_two_processes_train_a_batch_norm_model_as_one(mpi):
    """Compiled code, MPI: batch norm's statistics over the global batch make two processes one; every
    gradient in a bucket of its own, all-reduced while the backward pass goes on."""
    _, folder = mpi
    one = fit(mlc.parse(BN_MODEL), options(folder, epochs=2))
    code, out = mlc_train(mpi, "--epochs", "2", "--checkpoint-dir", "bn-ckpt", "-o", "bn.mlcz", "--bucket-mb", "1e-9", model="bn.ir")
    assert code == 0, f"exit status {code} (None: timed out)\n{out}"
    weights, state = checkpoint(folder / "bn-ckpt" / "checkpoint.npz")
    for name, value in one.globals.items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(state["losses"], one.history["losses"], rtol=1e-5)
    assert state["metrics"] == one.history["metrics"]


KILLER = textwrap.dedent("""
    import os, signal, sys
    import mlc.train
    from mlc.cli import main

    share, calls = mlc.train.share, []

    def dying_share(batch, comm):
        calls.append(1)
        if comm.rank == 1 and len(calls) == {at}:
            {action}
        return share(batch, comm)

    mlc.train.share = dying_share
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("action, message", [
    ("os.kill(os.getpid(), signal.SIGKILL)", "signal 9"),
    ("raise RuntimeError('boom')", "process 1 of 2 failed; ending the others"),
    # alive but stuck: rank 0 gives up waiting in the step's all-reduce (slow: the 10 s timeout;
    # test_distributed.py's test_a_process_that_hangs_ends_the_job_after_the_timeout runs by default)
    pytest.param("os.kill(os.getpid(), signal.SIGSTOP)", "rank 0: all_reduce of 788 bytes waited 10 s for the other processes",
                 marks=pytest.mark.slow),
])
def test_a_process_that_dies_or_hangs_ends_the_job(mpi, monkeypatch, action, message):
    _, folder = mpi
    monkeypatch.setenv("MLC_COLLECTIVE_TIMEOUT", "10")  # (not less: the processes compile at their own pace)
    script = folder / "dies.py"
    script.write_text(KILLER.replace("{at}", "3").replace("{action}", action))
    code, out = mlc_train(mpi, "--epochs", "50", script=str(script), timeout=60)
    assert code is not None, f"the job hung after a process died\n{out}"
    assert code != 0 and message.lower() in out.lower(), out


API = textwrap.dedent("""
    import numpy as np
    import mlc
    import mlc.distributed
    from mlc.nn import functional as F

    def model_and_step(data_parallel):
        mlc.manual_seed(1)
        # (batch norm synchronised; no bias before it: its gradient is 0 up to rounding, which Adam amplifies)
        model = mlc.nn.Sequential(mlc.nn.Linear(8, 16, bias=False), mlc.nn.BatchNorm1d(16), mlc.nn.Tanh(), mlc.nn.Linear(16, 3))
        opt = mlc.optim.Adam(model.parameters(), lr=0.05)
        step = mlc.compile_train_step(model, F.cross_entropy, opt, backend="interp", data_parallel=data_parallel)
        return model, step  # (the interpreter: no compile time; `mlc train` checks compiled code)

    d = np.load("d.npz")
    x, y = d["x"], d["labels"]
    parallel, step = model_and_step(True)  # (joins the MPI world)
    rank, size = mlc.distributed.rank(), mlc.distributed.world_size()
    if rank == 1:  # different initial weights: the first call gives everyone rank 0's
        for p in parallel.parameters():
            p.data[...] += 1
    single, single_step = model_and_step(False)
    for b in range(0, 45, 10):
        mine = np.array_split(np.arange(b, min(b + 10, 45)), size)[rank]
        loss = step(x[mine], y[mine])
        want = single_step(x[b: b + 10], y[b: b + 10])
        np.testing.assert_allclose(loss, want, rtol=1e-5)
    for (name, p), q in zip(parallel.state_dict().items(), single.state_dict().values()):
        np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=1e-5, atol=1e-6, err_msg=name)
    print(f"rank {rank} of {size}: ok", flush=True)
""")


def test_compile_train_step_data_parallel(mpi):
    mpiexec, folder = mpi
    (folder / "api.py").write_text(API)
    code, out = run_session([mpiexec, "-n", "2", sys.executable, "-m", "mpi4py", "api.py"], folder, timeout=90)
    assert code == 0, f"exit status {code} (None: timed out)\n{out}"
    assert "rank 0 of 2: ok" in out and "rank 1 of 2: ok" in out, out
