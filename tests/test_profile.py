"""The per-kernel profiler (runtime/profile.py, codegen/llvm.py's timed kernels): profiled code computes
what unprofiled code and the interpreter compute, its report counts every call, and the compile cache
keeps profiled and unprofiled code apart."""
import os
import subprocess
import sys

import numpy as np
import pytest

import mlc
from mlc.compiler import compile as build

from helpers import ROOT


def inputs_for(func, batch: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for a in func.args:
        shape = tuple(batch if d is None else d for d in a.type.shape)
        dtype = a.type.element.np_dtype
        out.append(rng.integers(0, 10, shape).astype(dtype) if dtype.kind == "i" else rng.standard_normal(shape).astype(dtype))
    return out


@pytest.fixture(scope="module", params=["mlp.ir", "cnn.ir"])
def compiled(request):
    path = ROOT / "examples" / request.param
    module = mlc.parse(path.read_text(), str(path))
    return module, build(module, profile=False), build(module, profile=True)


def test_profiled_code_computes_what_unprofiled_code_and_the_interpreter_do(compiled):
    module, plain, profiled = compiled
    profiled.reset_profile()
    calls = {}
    for name in plain.functions:
        for seed in range(2):
            args = inputs_for(module.functions[name], seed=seed)
            want = mlc.interpret(module, name, *args)
            got_plain, got_profiled = plain[name](*args), profiled[name](*args)
            np.testing.assert_allclose(got_plain, want, rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(got_profiled, got_plain)
            calls[name] = calls.get(name, 0) + 1
    report = profiled.profile()
    assert {r.name.split(":")[0] for r in report} == set(calls)  # every function's kernels ran
    for row in report:
        assert row.calls == calls[row.name.split(":")[0]], row
        assert row.ms > 0
    assert sum(r.share for r in report) == pytest.approx(100.0, abs=0.1)
    assert [r.ms for r in report] == sorted((r.ms for r in report), reverse=True)


def test_report_names_kernels_after_their_tensor_ops_and_rates_them(compiled):
    module, _, profiled = compiled
    forward = module.functions["forward"]
    profiled.reset_profile()
    x = inputs_for(forward, batch=16)
    for _ in range(3):
        profiled["forward"](*x)
    report = profiled.profile(reset=True)
    text = str(report)
    assert text.splitlines()[1].split() == ["kernel", "calls", "total", "ms", "share", "rate"]
    products = [r for r in report if "mlc.matmul" in r.name.split(" ")[1] or "mlc.conv2d" in r.name.split(" ")[1]]
    assert products and all(r.product and r.gflops and r.gflops > 0 and "GFLOP/s" in r.rate for r in products)
    assert all(r.calls == 3 and ".ir:" in r.name for r in report)  # each traceable to a line of the source
    if module.name == "mlp":
        assert any(r.name.startswith("forward:0 mlc.matmul %h [?x64 @ 64x32] (fused: add, relu) ") for r in report), text
    assert len(profiled.profile()) == 0  # reset=True zeroed the counters


def test_unprofiled_code_has_no_profiling_code(compiled):
    _, plain, profiled = compiled
    assert not plain.profiled and profiled.profiled
    assert "mlc_profile" not in plain.llvm_ir and "clock_gettime" not in plain.llvm_ir
    assert "clock_gettime" in profiled.llvm_ir
    with pytest.raises(RuntimeError, match="without profiling"):
        plain.profile()


def test_the_cache_keeps_profiled_code_apart(tmp_path, monkeypatch):
    monkeypatch.setenv("MLC_CACHE_DIR", str(tmp_path))
    module = mlc.parse((ROOT / "examples" / "mlp.ir").read_text())
    assert not build(module).profiled
    assert build(module, profile=True).profiled  # not the unprofiled entry
    assert len(list(tmp_path.iterdir())) == 2
    again_plain, again_profiled = build(module), build(module, profile=True)
    assert not again_plain.compiled_here and not again_profiled.compiled_here  # both from the cache
    assert not again_plain.profiled and again_profiled.profiled


def test_mlc_profile_prints_the_table_at_exit(tmp_path):
    script = ("import numpy as np, mlc\n"
              f"m = mlc.parse(open({str(ROOT / 'examples' / 'mlp.ir')!r}).read(), 'mlp.ir')\n"
              "exe = mlc.compile(m)\n"
              "for _ in range(5): exe['forward'](np.ones((8, 64), np.float32))\n"
              "print('ran')\n")
    env = {**os.environ, "MLC_PROFILE": "1", "MLC_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ran"
    assert "mlc profile: @mlp" in done.stderr
    row = next(line for line in done.stderr.splitlines() if line.startswith("forward:0 mlc.matmul %h [?x64 @ 64x32] (fused: add, relu) mlp.ir:11:10"))
    assert row.split()[10] == "5", done.stderr  # calls


def test_mlc_run_profile_prints_the_table(tmp_path):
    """`mlc run --profile` prints each kernel once called, after the results; --backend interp refuses it."""
    r = subprocess.run([sys.executable, "-m", "mlc", "run", str(ROOT / "examples" / "mlp.ir"), "--random-inputs", "--profile"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "result0" in r.stdout, r.stderr
    assert "mlc.matmul %h" in r.stderr and "100.0%" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "mlc", "run", str(ROOT / "examples" / "mlp.ir"), "--random-inputs", "--profile",
                        "--backend", "cuda"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "--profile: error: --profile needs the cpu backend" in r.stderr, r.stderr


def test_a_traced_model_is_profiled_op_by_op():
    """Every op traced from an mlc.nn model carries the caller's line; the profile still has a kernel
    per tensor op (a fusion is one), each named by its op, not one kernel for the whole forward."""
    model = mlc.nn.Sequential(mlc.nn.Linear(32, 64), mlc.nn.ReLU(), mlc.nn.Linear(64, 8))
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    module = mlc.trace(model, x)
    exe = build(module, profile=True, cache=False)
    np.testing.assert_allclose(exe["forward"](x), mlc.interpret(module, "forward", x), rtol=1e-5, atol=1e-5)
    report = exe.profile()
    products = [r for r in report if "mlc.matmul" in r.name]
    assert len(products) == 2 and len(report) >= 2, str(report)
    assert all(r.calls == 1 and " + " not in r.name for r in report), str(report)


def test_a_product_of_a_reshape_is_rated_by_its_own_sizes():
    """The kernel counts a buffer the product reads, to cost a `?` size known only at run time: here the
    reshape's source, freed inside the kernel, holds its `?` 64 times smaller; counted, it rated the
    product 64x too low. The reshape itself is a view, no kernel."""
    module = mlc.parse("""
    func.func @grad(%a: tensor<64x?x32xf32>, %dy: tensor<?x16xf32>) -> tensor<16x32xf32> {
      %x = mlc.mul %a, %a : (tensor<64x?x32xf32>, tensor<64x?x32xf32>) -> tensor<64x?x32xf32>
      %rows = mlc.reshape %x : (tensor<64x?x32xf32>) -> tensor<?x32xf32>
      %g = mlc.matmul %dy, %rows {transpose_a} : (tensor<?x16xf32>, tensor<?x32xf32>) -> tensor<16x32xf32>
      return %g : tensor<16x32xf32>
    }""")
    exe = build(module, profile=True, cache=False)
    rng = np.random.default_rng(0)
    a, dy = rng.standard_normal((64, 3, 32)).astype(np.float32), rng.standard_normal((64 * 3, 16)).astype(np.float32)
    np.testing.assert_allclose(exe["grad"](a, dy), dy.T @ (a * a).reshape(-1, 32), rtol=1e-4, atol=1e-4)
    report = exe.profile()
    (product,) = [r for r in report if "mlc.matmul" in r.name]
    assert product.gflops * product.ms * 1e6 == pytest.approx(2 * 16 * 32 * 64 * 3, rel=1e-6)
    assert not any("mlc.reshape" in r.name for r in report), str(report)  # (a view: no kernel of its own)


def test_winograd_kernels_with_a_batch_known_at_run_time_are_timed_not_rated():
    """Winograd's tiles are the batch times the tiles per image: sampling every `?` at one size costs
    them wrongly (a 1000 GB/s transform was reported), so those kernels get time alone; the product over
    the tiles is rated by its own sizes, the filters' transform (static) as ever."""
    n, c, k, hw = 2, 32, 48, 24
    module = mlc.parse(f"""
    func.func @f(%x: tensor<?x{c}x{hw}x{hw}xf32>, %w: tensor<{k}x{c}x3x3xf32>) -> tensor<?x{k}x{hw}x{hw}xf32> {{
      %y = mlc.conv2d %x, %w {{padding = [1, 1]}} : (tensor<?x{c}x{hw}x{hw}xf32>, tensor<{k}x{c}x3x3xf32>) -> tensor<?x{k}x{hw}x{hw}xf32>
      return %y : tensor<?x{k}x{hw}x{hw}xf32>
    }}""")
    exe = build(module, profile=True, cache=False)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((n, c, hw, hw)).astype(np.float32), rng.standard_normal((k, c, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(exe["f"](x, w), mlc.interpret(module, "f", x, w), rtol=1e-4, atol=1e-3)
    report = exe.profile()
    tiled = [r for r in report if "winograd_input" in r.name or "winograd_output" in r.name]
    assert len(tiled) == 2 and all(r.gflops is None and r.gbytes is None for r in tiled), str(report)
    (filters,) = [r for r in report if "winograd_filter" in r.name]  # (static sizes: rated)
    assert filters.gbytes * filters.ms * 1e6 == pytest.approx((9 + 36) * k * c * 4, rel=1e-6)
    (product,) = [r for r in report if "mlc.matmul" in r.name]
    tiles = n * (hw // 4) ** 2
    assert product.gflops * product.ms * 1e6 == pytest.approx(2 * tiles * 36 * k * c, rel=1e-6)


def test_products_are_named_with_their_operand_shapes_and_kernel_shaping_attributes():
    """Which product or convolution a row is, at a glance: operand shapes, the matmul's marks, a convolution's
    stride, dilation and groups where not 1."""
    text = """func.func @f(%x: tensor<?x4x40x40xf32>, %w: tensor<8x2x3x3xf32>, %a: tensor<?x16xf32>, %b: tensor<32x16xf32>) -> (tensor<?x8x18x18xf32>, tensor<?x32xf32>) {
  %y = mlc.conv2d %x, %w {stride = [2, 2], dilation = [3, 3], groups = 2} : (tensor<?x4x40x40xf32>, tensor<8x2x3x3xf32>) -> tensor<?x8x17x17xf32>
  %p = mlc.pad %y {low = [0, 0, 1, 1], high = [0, 0, 0, 0]} : (tensor<?x8x17x17xf32>) -> tensor<?x8x18x18xf32>
  %h = mlc.matmul %a, %b {transpose_b} : (tensor<?x16xf32>, tensor<32x16xf32>) -> tensor<?x32xf32>
  return %p, %h : tensor<?x8x18x18xf32>, tensor<?x32xf32> }"""
    exe = mlc.compile(mlc.parse(text, "shapes.ir"), profile=True, cache=False)
    r = np.random.default_rng(0)
    exe["f"](*(r.random(s, np.float32) for s in ((2, 4, 40, 40), (8, 2, 3, 3), (3, 16), (32, 16))))
    names = [row.name for row in exe.profile()]
    assert any("mlc.conv2d %y [?x4x40x40 * 8x2x3x3 stride 2 dilation 3 groups 2] shapes.ir:2:8" in n for n in names), names
    assert any("mlc.matmul %h [?x16 @ 32x16 transpose_b] shapes.ir:4:8" in n for n in names), names
    assert any(n.split()[1] == "mlc.pad" and "[" not in n for n in names), names  # (not a product: no shapes)
