"""The call path of compiled functions: a call on C-contiguous arrays of the declared dtypes reuses the
argument block built for its signature (runtime/executable.py, CallPlan) and a jit function or nn module
finds its compiled code by one dict lookup (mlc/jit.py); anything else takes the full checks. Both paths
give the same results and the same diagnostics; results are the caller's own arrays; nothing leaks;
threads share one function.
"""
import gc
import os
import threading

import numpy as np
import pytest

import mlc
import mlc.nn as nn

from helpers import ROOT

DYNAMIC = """module {
  func.func @f(%x: tensor<?x4xf32>, %w: tensor<4x3xf32>) -> (tensor<?x3xf32>, tensor<f32>) {
    %y = mlc.matmul %x, %w : (tensor<?x4xf32>, tensor<4x3xf32>) -> tensor<?x3xf32>
    %s = mlc.reduce_sum %y : (tensor<?x3xf32>) -> tensor<f32>
    return %y, %s : tensor<?x3xf32>, tensor<f32>
  }
}
"""


@pytest.fixture(scope="module")
def exe():
    return mlc.compile(mlc.parse(DYNAMIC), cache=False)


@pytest.fixture(scope="module")
def mlp():
    return mlc.compile(mlc.load(ROOT / "examples" / "mlp.ir"), cache=False)


def test_alternating_batch_sizes_match_the_slow_path(exe):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    f = exe["f"]
    for n in [1, 5, 1, 7, 5, 0, 1, 33] * 3:
        x = rng.standard_normal((n, 4)).astype(np.float32)
        y, s = f(x, w)
        slow_y, slow_s = f(np.asfortranarray(x), w=w)  # (a keyword: the full checks)
        np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(y, slow_y)
        assert y.shape == (n, 3) and s.shape == () and s.dtype == np.float32
        np.testing.assert_allclose(s, slow_s, rtol=1e-6)
    assert set(f.plans) >= {((1, 4), (4, 3)), ((5, 4), (4, 3))}


def _message(f, *args, **kwargs) -> str:
    with pytest.raises(mlc.DiagnosticError) as e:
        f(*args, **kwargs)
    return str(e.value)


def test_a_wrong_argument_after_the_signature_is_cached_reports_as_before():
    f = mlc.compile(mlc.parse(DYNAMIC), cache=False)["f"]
    x, w = np.ones((2, 4), np.float32), np.ones((4, 3), np.float32)
    cases = [((x.astype(np.float64), w), {}), ((x, w.astype(np.int32)), {}), ((x, np.ones((3, 4), np.float32)), {}),
             ((np.ones((2, 4, 1), np.float32), w), {}), ((x,), {}), ((x, w, w), {}), ((x,), {"v": w}),
             ((x, w), {"w": w}), ((x, [[1, 2], [3]]), {})]
    before = [_message(f, *args, **kwargs) for args, kwargs in cases]
    assert not f.plans
    f(x, w)
    assert f.plans
    assert [_message(f, *args, **kwargs) for args, kwargs in cases] == before
    assert "argument 'x' must have dtype float32 (tensor<?x4xf32>), got float64" in before[0]
    assert "argument 'w' must have shape [4, 3] (tensor<4x3xf32>), got [3, 4] (dim 0)" in before[2]
    np.testing.assert_allclose(f(x, w=w)[0], x @ w)  # keywords still bind


def test_non_contiguous_and_other_inputs_are_copied_as_before(exe):
    f = exe["f"]
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    big = rng.standard_normal((8, 8)).astype(np.float32)
    x = big[::2, 1:5]  # a strided view
    assert not x.flags.c_contiguous
    f(np.ascontiguousarray(x), w)  # (its signature cached)
    np.testing.assert_allclose(f(x, w)[0], x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f(x, np.asfortranarray(w))[0], x @ w, rtol=1e-5, atol=1e-5)
    readonly = np.ascontiguousarray(x)
    readonly.flags.writeable = False
    np.testing.assert_allclose(f(readonly, w)[0], x @ w, rtol=1e-5, atol=1e-5)
    with pytest.raises(mlc.DiagnosticError, match="must have dtype float32"):
        f(np.ascontiguousarray(x).astype(">f4"), w)  # (a byte-swapped float32 is refused, as before)


def test_results_are_independent_arrays(mlp):
    f = mlp["forward"]
    x = np.ones((2, 64), np.float32)
    a = f(x)
    want = a.copy()
    a[...] = 123.0
    b = f(x)
    np.testing.assert_array_equal(b, want)
    assert a.ctypes.data != b.ctypes.data and not np.shares_memory(a, b)
    view = f(x)[1:]  # a view keeps its result's memory
    gc.collect()
    f(x), f(x)
    np.testing.assert_array_equal(view, want[1:])
    assert b.flags.writeable and b.flags.c_contiguous


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_calls_do_not_leak(mlp):
    f = mlp["forward"]
    x = np.ones((64, 64), np.float32)
    for _ in range(2000):
        f(x)
    gc.collect()
    before = _rss_bytes()
    for _ in range(20000):
        f(x)
    gc.collect()
    assert _rss_bytes() - before < 8 << 20  # (each result is 2560 bytes: 20000 kept would be 50 MiB and more)


def test_threads_share_a_function(exe):
    f = exe["f"]
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    xs = [rng.standard_normal((k % 3 + 1, 4)).astype(np.float32) for k in range(8)]  # (threads share signatures)
    errors = []

    def work(k):
        try:
            for _ in range(300):
                y, s = f(xs[k], w)
                np.testing.assert_allclose(y, xs[k] @ w, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(s, (xs[k] @ w).sum(), rtol=1e-4, atol=1e-4)
        except Exception as e:  # (reported by the test, not lost in the thread)
            errors.append(e)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_jit_alternating_shapes_and_dtypes():
    @mlc.jit(dynamic_batch=True)
    def layer(x, w):
        return mlc.relu(x @ w)

    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    for n in [1, 4, 1, 9, 4]:
        x = rng.standard_normal((n, 4)).astype(np.float32)
        np.testing.assert_allclose(layer(x, w), np.maximum(x @ w, 0), rtol=1e-5, atol=1e-5)
    assert len(layer.cache) == 1  # (one compiled function for every batch size)
    x64 = rng.standard_normal((2, 4))
    np.testing.assert_allclose(layer(x64, w.astype(np.float64)), np.maximum(x64 @ w, 0), rtol=1e-5)
    assert len(layer.cache) == 2
    strided = np.ascontiguousarray(x64[:, ::-1])[:, ::-1]  # (the same values, not C-contiguous)
    np.testing.assert_allclose(layer(strided, w.astype(np.float64)), np.maximum(x64 @ w, 0), rtol=1e-5)
    with pytest.raises(TypeError, match="pass arguments by position"):
        layer(x64, w=w)


def test_module_calls_follow_mode_and_weight_changes():
    mlc.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = np.ones((3, 4), np.float32)
    first = model(x)
    np.testing.assert_array_equal(model(x), first)
    model.train()  # a mode change reaches the cached call: dropout now drops
    assert len({model(x).tobytes() for _ in range(4)}) > 1 and len(model._compiled) == 2
    model[1].training = False  # one submodule's flag alone
    np.testing.assert_array_equal(model(x), first)
    assert len(model._compiled) == 3
    model.eval()
    np.testing.assert_array_equal(model(x), first)
    model[3].weight.data[...] = 0  # weights are read on every call
    np.testing.assert_allclose(model(x), np.broadcast_to(model[3].bias.data, (3, 2)))
    assert len(model._compiled) == 3
