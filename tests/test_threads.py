"""The native thread pool behind parallel loops (runtime/threads.py): compiled kernels agree with numpy
at any thread count, from many Python threads at once, in forked children and with parallel loops
inside parallel loops; regions really go through the native pool; nothing hangs (every wait is bounded
by a timeout).
"""
import ctypes
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import mlc
from mlc.runtime import jit

MATMUL = """module {
  func.func @f(%x: tensor<?x256xf32>, %w: tensor<256x192xf32>, %b: tensor<192xf32>) -> tensor<?x192xf32> {
    %y = mlc.matmul %x, %w : (tensor<?x256xf32>, tensor<256x192xf32>) -> tensor<?x192xf32>
    %z = mlc.add %y, %b : (tensor<?x192xf32>, tensor<192xf32>) -> tensor<?x192xf32>
    %r = mlc.relu %z
    return %r : tensor<?x192xf32>
  }
}
"""

SCAN = """module {
  func.func @f(%h0: tensor<64x128xf32>, %xs: tensor<6x64x128xf32>, %w: tensor<128x128xf32>) -> tensor<64x128xf32> {
    %h, %hs = mlc.scan %h0 over %xs : (tensor<64x128xf32>, tensor<6x64x128xf32>) -> (tensor<64x128xf32>, tensor<6x64x128xf32>) {
    ^bb0(%c: tensor<64x128xf32>, %x: tensor<64x128xf32>):
      %m = mlc.matmul %c, %w : (tensor<64x128xf32>, tensor<128x128xf32>) -> tensor<64x128xf32>
      %s = mlc.add %m, %x
      %n = mlc.tanh %s
      mlc.yield %n, %n : tensor<64x128xf32>, tensor<64x128xf32>
    }
    return %h : tensor<64x128xf32>
  }
}
"""

# Native code straight to the pool: @run(counts, rows) adds 1 to each of rows x 64 counters, through a
# parallel loop over rows whose chunks each run a parallel loop over the row's 64 counters.
NESTED = """
declare void @mlc_parallel_for(ptr, ptr, i64, i64)

define void @row(ptr %ctx, i64 %lo, i64 %hi) {
entry:
  %counts = load ptr, ptr %ctx
  %at = getelementptr i64, ptr %ctx, i64 1
  %i = load i64, ptr %at
  %first = mul i64 %i, 64
  br label %loop
loop:
  %j = phi i64 [ %lo, %entry ], [ %j1, %body ]
  %more = icmp slt i64 %j, %hi
  br i1 %more, label %body, label %done
body:
  %k = add i64 %first, %j
  %p = getelementptr i64, ptr %counts, i64 %k
  %v = load i64, ptr %p
  %v1 = add i64 %v, 1
  store i64 %v1, ptr %p
  %j1 = add i64 %j, 1
  br label %loop
done:
  ret void
}

define void @rows(ptr %counts, i64 %lo, i64 %hi) {
entry:
  %ctx = alloca [2 x i64]
  %at = getelementptr i64, ptr %ctx, i64 1
  br label %loop
loop:
  %i = phi i64 [ %lo, %entry ], [ %i1, %body ]
  %more = icmp slt i64 %i, %hi
  br i1 %more, label %body, label %done
body:
  store ptr %counts, ptr %ctx
  store i64 %i, ptr %at
  call void @mlc_parallel_for(ptr @row, ptr %ctx, i64 0, i64 64)
  %i1 = add i64 %i, 1
  br label %loop
done:
  ret void
}

define void @run(ptr %counts, i64 %rows) {
  call void @mlc_parallel_for(ptr @rows, ptr %counts, i64 0, i64 %rows)
  ret void
}
"""

rng = np.random.default_rng(0)


def relu_layer(x, w, b):
    return np.maximum(x.astype(np.float64) @ w + b, 0)


@pytest.fixture
def threads(monkeypatch):
    """Set MLC_NUM_THREADS; the pool reads it when code is compiled or a function is looked up."""
    def set_threads(n: int):
        monkeypatch.setenv("MLC_NUM_THREADS", str(n))
        return jit.native_pool()
    yield set_threads
    monkeypatch.undo()
    jit.native_pool()  # (back to the count of the environment)


@pytest.fixture(scope="module")
def nested_run():
    module = jit.JitModule(NESTED)
    run = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(module.address("run"))
    run.module = module  # (keeps the code loaded)
    return run


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_kernels_match_numpy_at_any_thread_count(threads, n):
    x, w, b = rng.standard_normal((301, 256)), rng.standard_normal((256, 192)), rng.standard_normal(192)
    x, w, b = (a.astype(np.float32) for a in (x, w, b))
    pool = threads(n)
    f = mlc.compile(mlc.parse(MATMUL), cache=False)["f"]
    assert pool.threads == n
    before = pool.stats()["regions"]
    for rows in (301, 1, 2, 7):
        np.testing.assert_allclose(f(x[:rows], w, b), relu_layer(x[:rows], w, b), rtol=1e-4, atol=1e-4)
    assert (pool.stats()["regions"] > before) == (n > 1)  # (regions went to the native pool, not Python's)


def test_a_batch_of_one_splits_its_product_over_the_pool(threads):
    """Rows known at run time: a batch of one takes the loop.if's row loop, whose product (K split in
    blocks) is still a parallel region of its own."""
    pool = threads(2)
    f = mlc.compile(mlc.parse(MATMUL.replace("192", "1024")), cache=False)["f"]
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((1, 256), (256, 1024), (1024,)))
    before = pool.stats()["regions"]
    np.testing.assert_allclose(f(x, w, b), relu_layer(x, w, b), rtol=1e-4, atol=1e-4)
    assert pool.stats()["regions"] > before


def test_small_nests_of_math_calls_go_to_the_pool_and_small_copies_do_not(threads):
    """A loop nest's work counts a math-library call (tanh) as several elements: 16k tanh go to the
    threads, 16k negations stay on the calling thread (they take less than handing them over)."""
    pool = threads(2)
    text = """module { func.func @f(%x: tensor<32x512xf32>) -> tensor<32x512xf32> {
        %y = mlc.OP %x
        return %y : tensor<32x512xf32>
      } }"""
    x = rng.standard_normal((32, 512)).astype(np.float32)
    for op, reference, parallel in (("neg", np.negative, False), ("tanh", np.tanh, True)):
        f = mlc.compile(mlc.parse(text.replace("OP", op)), cache=False)["f"]
        before = pool.stats()["regions"]
        np.testing.assert_allclose(f(x), reference(x), rtol=1e-5, atol=1e-6)
        assert (pool.stats()["regions"] > before) == parallel, op


def test_many_python_threads_share_the_pool(threads):
    threads(2)
    f = mlc.compile(mlc.parse(MATMUL), cache=False)["f"]
    w, b = rng.standard_normal((256, 192)).astype(np.float32), rng.standard_normal(192).astype(np.float32)
    inputs = [rng.standard_normal((64 + 16 * k, 256)).astype(np.float32) for k in range(8)]
    wrong = []

    def work(x):
        for _ in range(15):
            if not np.allclose(f(x, w, b), relu_layer(x, w, b), rtol=1e-4, atol=1e-4):
                wrong.append(x.shape)
    workers = [threading.Thread(target=work, args=(x,), daemon=True) for x in inputs]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in workers), "a thread hung"
    assert wrong == []


@pytest.mark.parametrize("n", [2, 3, 7])
def test_parallel_loops_inside_parallel_loops_run_each_trip_once(threads, nested_run, n):
    threads(n)
    counts = np.zeros((16, 64), np.int64)
    for _ in range(50):
        nested_run(counts.ctypes.data, 16)
    assert (counts == 50).all()
    for rows in (1, 2, 3, 5, 8, 13, 44, 97, 1000):  # (chunks that shrink in turn still cover every trip once)
        counts = np.zeros((rows, 64), np.int64)
        nested_run(counts.ctypes.data, rows)
        assert (counts == 1).all()


def test_python_threads_racing_for_the_pool_run_each_trip_once(threads, nested_run):
    threads(3)
    counts = [np.zeros((5, 64), np.int64) for _ in range(6)]

    def work(c):
        for _ in range(300):
            nested_run(c.ctypes.data, 5)
    workers = [threading.Thread(target=work, args=(c,), daemon=True) for c in counts]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in workers), "a thread hung"
    assert all((c == 300).all() for c in counts)


def test_a_scan_of_matmuls_matches_numpy(threads):
    """Parallel loops inside a sequential loop: each step hands its matmul to the pool."""
    h0, xs, w = (rng.standard_normal(s).astype(np.float32) for s in ((64, 128), (6, 64, 128), (128, 128)))
    w /= np.sqrt(128)
    pool = threads(2)
    f = mlc.compile(mlc.parse(SCAN), cache=False)["f"]
    before = pool.stats()["regions"]
    got = f(h0, xs, w)
    assert pool.stats()["regions"] >= before + len(xs)  # (each step's matmul is a parallel region)
    h = h0.astype(np.float64)
    for x in xs:
        h = np.tanh(h @ w + x)
    np.testing.assert_allclose(got, h, rtol=1e-4, atol=1e-4)


def test_forked_children_start_their_own_workers():
    """Children forked from a process whose pool has workers, some while another thread is inside a
    parallel region (the pool is held then), compute right and exit."""
    script = textwrap.dedent("""
        import os, sys, threading
        import numpy as np
        import mlc
        from mlc.runtime import jit
        os.environ["MLC_NUM_THREADS"] = "2"
        f = mlc.compile(mlc.parse(sys.argv[1]), cache=False)["f"]
        rng = np.random.default_rng(1)
        x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((256, 256), (256, 192), (192,)))
        want = np.maximum(x.astype(np.float64) @ w + b, 0)
        assert np.allclose(f(x, w, b), want, rtol=1e-4, atol=1e-4)
        busy = True
        def keep_busy():
            while busy:
                f(x, w, b)
        other = threading.Thread(target=keep_busy)
        other.start()
        for _ in range(6):
            pid = os.fork()
            if pid == 0:
                ok = all(np.allclose(f(x, w, b), want, rtol=1e-4, atol=1e-4) for _ in range(5))
                ok = ok and jit.native_pool().stats()["workers"] == 1
                os._exit(0 if ok else 1)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, status
        busy = False
        other.join()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script, MATMUL], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_without_the_native_pool_python_threads_run_the_loops():
    """Where the native pool cannot be built, runtime/jit.py's Python pool takes the regions."""
    script = textwrap.dedent("""
        import os, sys
        import numpy as np
        import mlc
        from mlc.runtime import jit
        jit._native_pool = False  # (as if building it had failed)
        os.environ["MLC_NUM_THREADS"] = "3"
        f = mlc.compile(mlc.parse(sys.argv[1]), cache=False)["f"]
        rng = np.random.default_rng(1)
        x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((256, 256), (256, 192), (192,)))
        assert np.allclose(f(x, w, b), np.maximum(x.astype(np.float64) @ w + b, 0), rtol=1e-4, atol=1e-4)
        assert jit._pool is not None
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script, MATMUL], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
