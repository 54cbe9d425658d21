"""Collective ops (mlc.all_reduce, mlc.broadcast, mlc.rank, mlc.world_size): syntax and verification,
their meaning in one process, in a simulated world and across two real MPI processes, their gradients,
what passes may do with them, and compiled code against the interpreter."""
import importlib.util
import re
import sys
import textwrap

import numpy as np
import pytest

import mlc
from helpers import errors, find_mpiexec, func, run_session
from mlc.compiler import lower
from mlc.ir.collectives import check_root, current, using


class ShiftedWorld:
    """A simulated world of `size` processes in which process k holds this process's array plus
    k - rank (so every reduction, and the root of a broadcast, gives a different answer)."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def peers(self, a):
        return [a + np.asarray(k - self.rank).astype(a.dtype) for k in range(self.size)]

    def allreduce(self, a, reduction):
        p = np.stack(self.peers(a))
        p = p.astype(np.float64) if a.dtype.kind == "f" else p
        return {"sum": p.sum(0), "mean": p.mean(0), "max": p.max(0), "min": p.min(0)}[reduction].astype(a.dtype)

    def bcast(self, a, root):
        check_root(root, self.size)
        return self.peers(a)[root]


COLLECTIVES = """module {
  func.func @f(%x: tensor<?x3xf32>) -> (tensor<?x3xf32>, tensor<?x3xf32>, tensor<i64>, tensor<i64>) {
    %a = mlc.all_reduce %x {reduction = "mean"} : (tensor<?x3xf32>) -> tensor<?x3xf32>
    %b = mlc.broadcast %x {root = 0} : (tensor<?x3xf32>) -> tensor<?x3xf32>
    %r = mlc.rank : tensor<i64>
    %n = mlc.world_size : tensor<i64>
    return %a, %b, %r, %n : tensor<?x3xf32>, tensor<?x3xf32>, tensor<i64>, tensor<i64>
  }
}
"""


# --- syntax and verification -------------------------------------------------------------------------

def test_print_parse_round_trip():
    m = mlc.parse(COLLECTIVES)
    assert str(mlc.parse(str(m))) == str(m)
    assert '%a = mlc.all_reduce %x {reduction = "mean"} : (tensor<?x3xf32>) -> tensor<?x3xf32>' in str(m)
    assert "%r = mlc.rank : tensor<i64>" in str(m)
    # the signature may be left out (inferred); the generic form parses too; reduction defaults to sum
    short = mlc.parse(func('    %s = mlc.all_reduce %x\n    %m = "mlc.all_reduce"(%s) {reduction = "max"} : '
                           '(tensor<2x3xf32>) -> tensor<2x3xf32>\n    %n = mlc.world_size\n'
                           '    %b = mlc.broadcast %m {root = 3}\n    return %b : tensor<2x3xf32>'))
    assert str(mlc.parse(str(short))) == str(short)
    ops = [op for op in short.functions["f"].body if op.name.startswith("mlc.")]
    assert [op.attr("reduction") for op in ops[:2]] == ["sum", "max"] and ops[3].attr("root") == 3


@pytest.mark.parametrize("line, message", [
    ('%y = mlc.all_reduce %x {reduction = "prod"}', 'one of "sum", "mean", "max", "min"'),
    ('%y = mlc.all_reduce %x {reduction = 1}', "reduction"),
    ('%y = mlc.broadcast %x {root = -1}', "'root' must be a rank"),
    ('%y = mlc.all_reduce %x : (tensor<2x3xf32>) -> tensor<3x2xf32>', "tensor<3x2xf32>"),
    ('%y = "mlc.all_reduce"(%x, %x) : (tensor<2x3xf32>, tensor<2x3xf32>) -> tensor<2x3xf32>', "operand"),
])
def test_verifier_errors(line, message):
    diag = errors(func(f"    {line}\n    return %y : tensor<2x3xf32>"))[0]
    assert message in diag[2], diag


def test_element_types():
    mean_of_ints = func('    %y = mlc.all_reduce %x {reduction = "mean"}\n    return %y : tensor<4xi32>',
                        "%x: tensor<4xi32>", "tensor<4xi32>")
    assert "floating-point" in errors(mean_of_ints)[0][2]
    assert "non-i1" in errors(func("    %y = mlc.all_reduce %x\n    return %y : tensor<4xi1>", "%x: tensor<4xi1>", "tensor<4xi1>"))[0][2]
    mlc.parse(func('    %y = mlc.all_reduce %x {reduction = "max"}\n    return %y : tensor<4xi32>', "%x: tensor<4xi32>", "tensor<4xi32>"))
    mlc.parse(func("    %y = mlc.broadcast %x\n    return %y : tensor<4xi1>", "%x: tensor<4xi1>", "tensor<4xi1>"))


# --- meaning -----------------------------------------------------------------------------------------

def test_one_process_is_the_identity():
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    a, b, r, n = mlc.interpret(mlc.parse(COLLECTIVES), "f", x)
    np.testing.assert_array_equal(a, x)
    np.testing.assert_array_equal(b, x)
    assert (int(r), int(n)) == (0, 1) and r.dtype == np.int64


def test_a_simulated_world():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with using(ShiftedWorld(rank=1, size=3)):
        a, b, r, n = mlc.interpret(mlc.parse(COLLECTIVES), "f", x)
    np.testing.assert_array_equal(a, x)  # mean of x - 1, x, x + 1
    np.testing.assert_array_equal(b, x - 1)  # root 0's
    assert (int(r), int(n)) == (1, 3)
    assert current().size == 1  # restored


def test_a_broadcast_from_a_rank_outside_the_world_is_an_error():
    m = mlc.parse(func("    %y = mlc.broadcast %x {root = 1}\n    return %y : tensor<2x3xf32>"))
    x = np.ones((2, 3), np.float32)
    with pytest.raises(mlc.DiagnosticError, match="root 1 is not a rank of a world of 1 process"):
        mlc.interpret(m, "f", x)
    with pytest.raises(mlc.DiagnosticError, match="'mlc.broadcast': failed across processes"):
        mlc.compile(m, cache=False)["f"](x)


# --- passes ------------------------------------------------------------------------------------------

def test_passes_neither_merge_nor_remove_collectives():
    text = func('''    %a = mlc.all_reduce %x
    %b = mlc.all_reduce %x
    %unused = mlc.all_reduce %x {reduction = "max"}
    %c = mlc.broadcast %x
    %r1 = mlc.rank : tensor<i64>
    %r2 = mlc.rank : tensor<i64>
    %n = mlc.world_size : tensor<i64>
    %s = mlc.add %a, %b
    %t = mlc.add %s, %c
    return %t, %r1, %r2 : tensor<2x3xf32>, tensor<i64>, tensor<i64>''', results="(tensor<2x3xf32>, tensor<i64>, tensor<i64>)")
    m = mlc.run_passes(mlc.parse(text), "canonicalize,cse,dce,canonicalize")
    names = [op.name for op in m.functions["f"].body]
    assert names.count("mlc.all_reduce") == 3 and names.count("mlc.broadcast") == 1
    assert names.count("mlc.rank") == 2  # read twice: not merged
    assert "mlc.world_size" not in names  # reads only: dead when unused
    lowered = [op.name for op in lower(mlc.parse(text)).functions["f"].body]  # the loop-level passes too
    assert lowered.count("mem.all_reduce_start") == lowered.count("mem.all_reduce_wait") == 3
    assert lowered.count("mem.broadcast") == 1 and lowered.count("mem.rank") == 2


# --- gradients ---------------------------------------------------------------------------------------

def _loss(body: str, shape=(2, 3)) -> mlc.Module:
    t = f"tensor<{shape[0]}x{shape[1]}xf64>"
    text = f"""module {{ func.func @loss(%x: {t}, %w: {t}) -> tensor<f64> {{
      {body}
      %p = mlc.mul %y, %w : ({t}, {t}) -> {t}
      %l = mlc.reduce_sum %p : ({t}) -> tensor<f64>
      return %l : tensor<f64> }} }}"""
    return mlc.run_passes(mlc.parse(text), "grad{func=@loss}")


def _numeric_gradient(m, x, w, eps=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += eps
        minus[idx] -= eps
        g[idx] = (mlc.interpret(m, "loss", plus, w) - mlc.interpret(m, "loss", minus, w)) / (2 * eps)
    return g


@pytest.mark.parametrize("body", [
    '%y = mlc.all_reduce %x {reduction = "sum"}',
    '%y = mlc.all_reduce %x {reduction = "mean"}',
    '%e = mlc.exp %x\n%y = mlc.all_reduce %e {reduction = "max"}',
    '%y = mlc.all_reduce %x {reduction = "min"}',
    '%y = mlc.broadcast %x {root = 0}',
])
def test_gradients_match_finite_differences(body):
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    m = _loss(body)
    g = mlc.interpret(m, "loss_grad", x, w)[1]
    np.testing.assert_allclose(g, _numeric_gradient(m, x, w), rtol=1e-6, atol=1e-8)


class ReplicatedWorld(ShiftedWorld):
    """A simulated world of `size` processes that all hold the same arrays."""

    def peers(self, a):
        return [a] * self.size


def test_gradient_rules_in_a_simulated_world():
    """The gradient of the sum of every process's loss sum(collective(x) * w), all processes alike:
    through a sum, n w; a mean, w; a max (a tie everywhere: the sum split n ways), w; a broadcast, n w
    at the root and nothing elsewhere."""
    rng = np.random.default_rng(2)
    x, w = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    n = 4
    for rank in (0, 1):
        with using(ReplicatedWorld(rank, n)):
            for body, want in (('%y = mlc.all_reduce %x', n * w), ('%y = mlc.all_reduce %x {reduction = "mean"}', w),
                               ('%y = mlc.all_reduce %x {reduction = "max"}', w),
                               ('%y = mlc.broadcast %x {root = 1}', n * w if rank == 1 else 0 * w)):
                np.testing.assert_allclose(mlc.interpret(_loss(body), "loss_grad", x, w)[1], want, err_msg=body)


# --- compiled code -----------------------------------------------------------------------------------

MIXED = """module {
  func.func @f(%x: tensor<?x3xf32>, %h: tensor<4xf16>, %b: tensor<4xbf16>, %i: tensor<5xi32>, %d: tensor<f64>)
      -> (tensor<?x3xf32>, tensor<?x3xf32>, tensor<?x3xf32>, tensor<4xf16>, tensor<4xbf16>, tensor<5xi32>, tensor<5xi32>,
          tensor<f64>, tensor<?x3xf32>, tensor<5xi32>, tensor<i64>, tensor<i64>) {
    %e = mlc.exp %x
    %s = mlc.all_reduce %e {reduction = "sum"}
    %m = mlc.all_reduce %x {reduction = "mean"}
    %t = mlc.tanh %m
    %hx = mlc.all_reduce %h {reduction = "max"}
    %bs = mlc.all_reduce %b {reduction = "sum"}
    %is = mlc.all_reduce %i {reduction = "sum"}
    %im = mlc.all_reduce %i {reduction = "min"}
    %dm = mlc.all_reduce %d {reduction = "mean"}
    %b0 = mlc.broadcast %x {root = 0}
    %b2 = mlc.broadcast %i {root = 2}
    %r = mlc.rank : tensor<i64>
    %n = mlc.world_size : tensor<i64>
    return %s, %m, %t, %hx, %bs, %is, %im, %dm, %b0, %b2, %r, %n : tensor<?x3xf32>, tensor<?x3xf32>, tensor<?x3xf32>,
        tensor<4xf16>, tensor<4xbf16>, tensor<5xi32>, tensor<5xi32>, tensor<f64>, tensor<?x3xf32>, tensor<5xi32>, tensor<i64>, tensor<i64>
  }
}
"""


def test_compiled_code_agrees_with_the_interpreter():
    """One native code in two simulated worlds (3 and 5 processes): the world is asked at run time,
    never compiled in. Every element type the CPU backend takes a collective of, `?` dims included."""
    m = mlc.parse(MIXED)
    exe = mlc.compile(m, cache=False)
    rng = np.random.default_rng(3)
    args = [rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=4).astype(np.float16),
            rng.normal(size=4).astype(np.float32), rng.integers(-9, 9, 5).astype(np.int32), np.array(0.25)]
    args[2] = mlc.ir.round_to_element(args[2], mlc.ir.ElementType("bf16"))
    for world in (ShiftedWorld(0, 3), ShiftedWorld(2, 5)):
        with using(world):
            want = mlc.interpret(m, "f", *args)
            got = exe["f"](*args)
        for k, (w, g) in enumerate(zip(want, got)):
            assert w.dtype == g.dtype and w.shape == g.shape, k
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=1e-6, atol=1e-6, err_msg=f"result {k}")
        assert (int(got[-2]), int(got[-1])) == (world.rank, world.size)
        np.testing.assert_array_equal(got[8], args[0] - world.rank)  # root 0's x


def test_compiled_code_in_one_process():
    m = mlc.parse(COLLECTIVES)
    x = np.random.default_rng(4).normal(size=(3, 3)).astype(np.float32)
    got, want = mlc.compile(m, cache=False)["f"](x), mlc.interpret(m, "f", x)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


class InFlightWorld(ShiftedWorld):
    """ShiftedWorld whose all-reduces are begun and finished apart (as MPI's), logging both."""

    def __init__(self, rank: int, size: int):
        super().__init__(rank, size)
        self.log = []

    def iallreduce(self, buffer, reduction):
        world, result = self, self.allreduce(buffer.copy(), reduction)
        self.log.append("start")

        class Pending:
            def test(self):
                world.log.append("test")
                return False

            def wait(self):
                world.log.append("wait")
                buffer[...] = result
        return Pending()


OVERLAPPED = """module {
  func.func @f(%x: tensor<?x3xf32>, %a: tensor<?xf32>, %b: tensor<?xf32>) -> (tensor<?x3xf32>, tensor<?xf32>) {
    %s = mlc.all_reduce %x {reduction = "sum"} : (tensor<?x3xf32>) -> tensor<?x3xf32>
    %e = mlc.exp %a : (tensor<?xf32>) -> tensor<?xf32>
    %y = mlc.add %e, %b : (tensor<?xf32>, tensor<?xf32>) -> tensor<?xf32>
    %t = mlc.tanh %s : (tensor<?x3xf32>) -> tensor<?x3xf32>
    return %t, %y : tensor<?x3xf32>, tensor<?xf32>
  }
}
"""


def test_an_all_reduce_in_flight_while_other_kernels_run():
    """Compiled and on the interpreter at loop level: the all-reduce begins, the kernel that does not
    need it runs (a progress call after it), then the wait. A kernel that fails meanwhile still lets
    the all-reduce finish before its buffer is freed, and reports its own error."""
    m = mlc.parse(OVERLAPPED)
    exe, lowered = mlc.compile(m, cache=False), lower(m)
    loops = [op.name for op in lowered.functions["f"].body]
    start, wait = loops.index("mem.all_reduce_start"), loops.index("mem.all_reduce_wait")
    assert loops[start + 1:wait].count("loop.for") == 1 and loops[wait - 1] == "mem.collective_progress"
    rng = np.random.default_rng(5)
    x, a, b = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=6).astype(np.float32), rng.normal(size=6).astype(np.float32)
    with using(ShiftedWorld(1, 3)):
        want = mlc.interpret(m, "f", x, a, b)
    for run in (lambda: exe["f"](x, a, b), lambda: mlc.interpret(lowered, "f", x, a, b)):
        world = InFlightWorld(1, 3)
        with using(world):
            got = run()
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-6)
        assert world.log[0] == "start" and world.log[-1] == "wait" and "test" in world.log, world.log
    world = InFlightWorld(1, 3)
    with using(world), pytest.raises(mlc.DiagnosticError, match="cannot be broadcast together"):
        exe["f"](x, a, b[:5])
    assert world.log[0] == "start" and world.log[-1] == "wait", world.log


# --- two real processes ------------------------------------------------------------------------------

MPI_SCRIPT = textwrap.dedent('''
    import numpy as np
    import mlc, mlc.distributed

    world = mlc.distributed.init()
    r, n = world.rank, world.size
    assert n == 2, n
    m = mlc.parse("""module {
      func.func @f(%x: tensor<?x3xf32>, %h: tensor<4xf16>, %i: tensor<5xi64>)
          -> (tensor<?x3xf32>, tensor<?x3xf32>, tensor<4xf16>, tensor<5xi64>, tensor<?x3xf32>, tensor<i64>, tensor<i64>) {
        %s = mlc.all_reduce %x {reduction = "sum"}
        %m = mlc.all_reduce %x {reduction = "mean"}
        %hx = mlc.all_reduce %h {reduction = "max"}
        %im = mlc.all_reduce %i {reduction = "min"}
        %b = mlc.broadcast %x {root = 1}
        %r = mlc.rank : tensor<i64>
        %n = mlc.world_size : tensor<i64>
        return %s, %m, %hx, %im, %b, %r, %n : tensor<?x3xf32>, tensor<?x3xf32>, tensor<4xf16>, tensor<5xi64>, tensor<?x3xf32>, tensor<i64>, tensor<i64>
      }
      func.func @loss(%x: tensor<2x3xf64>, %w: tensor<2x3xf64>) -> tensor<f64> {
        %y = mlc.all_reduce %x {reduction = "sum"} : (tensor<2x3xf64>) -> tensor<2x3xf64>
        %z = mlc.broadcast %x {root = 1} : (tensor<2x3xf64>) -> tensor<2x3xf64>
        %mx = mlc.all_reduce %x {reduction = "max"} : (tensor<2x3xf64>) -> tensor<2x3xf64>
        %s0 = mlc.add %y, %z : (tensor<2x3xf64>, tensor<2x3xf64>) -> tensor<2x3xf64>
        %s = mlc.add %s0, %mx : (tensor<2x3xf64>, tensor<2x3xf64>) -> tensor<2x3xf64>
        %p = mlc.mul %s, %w : (tensor<2x3xf64>, tensor<2x3xf64>) -> tensor<2x3xf64>
        %l = mlc.reduce_sum %p : (tensor<2x3xf64>) -> tensor<f64>
        return %l : tensor<f64>
      }
    }""")
    m = mlc.run_passes(m, "grad{func=@loss}")
    base = np.arange(6, dtype=np.float32).reshape(2, 3)
    x = base + 10 * r
    h = np.array([1, -2, 3, 0.5], np.float16) * (1 - 2 * r)
    i = np.arange(5, dtype=np.int64) - 3 * r
    w = np.linspace(-1, 1, 6).reshape(2, 3) * (r + 1)
    exe = mlc.compile(m, cache=False)
    for how, run in (("interp", lambda f, *a: mlc.interpret(m, f, *a)), ("cpu", lambda f, *a: exe[f](*a))):
        s, mean, hx, im, b, rank, size = run("f", x, h, i)
        np.testing.assert_array_equal(s, 2 * base + 10, err_msg=how)
        np.testing.assert_array_equal(mean, base + 5, err_msg=how)
        np.testing.assert_array_equal(hx, np.abs(np.array([1, -2, 3, 0.5], np.float16)), err_msg=how)
        np.testing.assert_array_equal(im, np.arange(5) - 3, err_msg=how)
        np.testing.assert_array_equal(b, base + 10, err_msg=how)
        assert (int(rank), int(size)) == (r, 2), how
        # the gradient of the sum of both processes' losses: every x gets the sum of the w's through
        # the sum; process 1 gets it once more as the root of the broadcast and once more through the
        # max, whose values it holds
        g = run("loss_grad", x.astype(np.float64), w)[1]
        total = np.linspace(-1, 1, 6).reshape(2, 3) * 3
        np.testing.assert_allclose(g, total * (3 if r == 1 else 1), err_msg=how)
    print(f"rank {r} of {n}: ok", flush=True)
''')


def mpiexec_or_skip() -> str:
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install 'mlc[dist]')")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec (the mpich wheel has one: pip install 'mlc[dist]')")
    return mpiexec


def test_two_mpi_processes(tmp_path):
    mpiexec = mpiexec_or_skip()
    script = tmp_path / "collectives.py"
    script.write_text(MPI_SCRIPT)
    # (`-m mpi4py` aborts the whole world when a process fails, instead of leaving the other waiting)
    code, out = run_session([mpiexec, "-n", "2", sys.executable, "-m", "mpi4py", str(script)], tmp_path, timeout=90)
    if code != 0:
        hello = tmp_path / "hello.py"
        hello.write_text("from mpi4py import MPI\nassert MPI.COMM_WORLD.Get_size() == 2\n")
        hello_code, hello_out = run_session([mpiexec, "-n", "2", sys.executable, str(hello)], tmp_path, timeout=60)
        if hello_code != 0:
            pytest.skip(f"MPI cannot start 2 processes here ({mpiexec}): {hello_out[-500:]}")
    assert code == 0, f"exit status {code} (None: timed out)\n{out}"
    assert "rank 0 of 2: ok" in out and "rank 1 of 2: ok" in out, out


# --- a process that hangs ----------------------------------------------------------------------------

HANG_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    import numpy as np
    import mlc, mlc.distributed

    world = mlc.distributed.init()
    exe = mlc.compile(mlc.parse("""module {
      func.func @f(%x: tensor<?xf32>) -> tensor<?xf32> {
        %s = mlc.all_reduce %x {reduction = "sum"} : (tensor<?xf32>) -> tensor<?xf32>
        return %s : tensor<?xf32>
      }
    }"""), cache=False)
    x = np.ones(50_000, np.float32)
    assert exe["f"](x)[0] == 2  # (both processes are there)
    if world.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # alive, and never coming to the next all-reduce
    exe["f"](x)
    print("rank", world.rank, "was not stopped", flush=True)
''')


def test_a_process_that_hangs_ends_the_job_after_the_timeout(tmp_path, monkeypatch):
    """Rank 1 stops itself before an all-reduce of compiled code; rank 0 waits MLC_COLLECTIVE_TIMEOUT
    seconds, says so and ends the job."""
    mpiexec = mpiexec_or_skip()
    script = tmp_path / "hang.py"
    script.write_text(HANG_SCRIPT)
    monkeypatch.setenv("MLC_COLLECTIVE_TIMEOUT", "3")
    code, out = run_session([mpiexec, "-n", "2", sys.executable, str(script)], tmp_path, timeout=90)
    assert code is not None, f"the job hung\n{out}"
    assert code != 0 and "not stopped" not in out, out
    assert re.search(r"mlc: rank 0: all_reduce of 200 kB waited 3\.\d s for the other processes "
                     r"\(MLC_COLLECTIVE_TIMEOUT=3\); ending the job", out), out


@pytest.mark.parametrize("text, seconds", [("", 600.0), ("2.5", 2.5), ("0", 0.0), ("soon", None), ("-1", None), ("nan", None)])
def test_the_collective_timeout_variable(monkeypatch, text, seconds):
    from mlc.runtime.distributed import collective_timeout
    monkeypatch.setenv("MLC_COLLECTIVE_TIMEOUT", text)
    if seconds is None:
        with pytest.raises(ValueError, match="MLC_COLLECTIVE_TIMEOUT must be a number of seconds"):
            collective_timeout()
    else:
        assert collective_timeout() == seconds


class FakeRequest:
    """Completes at its `tests`-th Test."""

    def __init__(self, tests):
        self.left = tests

    def Test(self):
        self.left -= 1
        return self.left <= 0


def test_a_wait_spins_then_sleeps_then_gives_up(monkeypatch):
    from mlc.runtime import distributed
    comm = distributed.MPICommunicator.__new__(distributed.MPICommunicator)  # (no MPI needed)
    comm.rank, comm.timeout = 0, 0.3
    given_up = []
    comm.give_up = lambda what, nbytes, waited: given_up.append((what, nbytes, waited)) or (_ for _ in ()).throw(TimeoutError)
    sleeps = []
    monkeypatch.setattr(distributed.time, "sleep", lambda s: sleeps.append(s))
    comm.wait(FakeRequest(1), "all_reduce", 8)
    comm.wait(FakeRequest(1000), "all_reduce", 8)
    assert sleeps == [] and given_up == []  # a quick completion never sleeps
    with pytest.raises(TimeoutError):
        comm.wait(FakeRequest(10 ** 12), "broadcast", 4000)
    assert given_up and given_up[0][:2] == ("broadcast", 4000) and 0.3 <= given_up[0][2] < 1
    assert sleeps and max(sleeps) <= 1e-3
