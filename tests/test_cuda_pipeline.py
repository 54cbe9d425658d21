"""The cuda pipeline on the lockstep interpreter: every stage keeps the results of the tensor program,
and the kernels it makes are race-free (the interpreter would report a race as an error)."""
import numpy as np
import pytest
from hypothesis import given

import mlc
from mlc.passes import PipelineError
from mlc.testing import check_pipeline, programs

from test_loops import SUPPORTED

GPU_STAGES = ["lower-to-loops,expand-products", "lower-to-loops,expand-products,map-to-gpu",
              "lower-to-loops,tile-gpu{bm=32 bn=32 bk=4 tm=2 tn=4}", "cuda", "cuda{block=32}"]


@pytest.mark.parametrize("pipeline", GPU_STAGES)
@given(p=programs(max_ops=6, families=SUPPORTED))
def test_gpu_stages_keep_results(pipeline, p):
    lowered = check_pipeline(p, pipeline, rtol=1e-4, atol=1e-5)
    if "map-to-gpu" in pipeline or pipeline.startswith("cuda"):
        _only_host_code_outside_launches(lowered)


@pytest.mark.parametrize("pipeline", GPU_STAGES)
def test_attention_heads_are_read_and_written_in_place_on_the_gpu(pipeline):
    """layout's interleaved products (attention's heads where they lie, the keys transposed too) through
    every GPU stage, against the tensor program."""
    from mlc.testing import Program
    t = "tensor<2x5x3x4xf32>"
    text = f"""module {{ func.func @f(%q: {t}, %k: {t}, %v: {t}) -> {t} {{
      %s = mlc.matmul %q, %k {{transpose_b, interleaved_a, interleaved_b}} : ({t}, {t}) -> tensor<2x3x5x5xf32>
      %o = mlc.matmul %s, %v {{interleaved_b, interleaved_c}} : (tensor<2x3x5x5xf32>, {t}) -> {t}
      return %o : {t} }} }}"""
    r = np.random.default_rng(0)
    q, k, v = (r.standard_normal((2, 5, 3, 4)).astype(np.float32) for _ in range(3))
    heads = lambda x: np.swapaxes(x, 1, 2)  # noqa: E731
    want = heads(heads(q) @ np.swapaxes(heads(k), -1, -2) @ heads(v))
    np.testing.assert_allclose(mlc.interpret(mlc.parse(text), "f", q, k, v), want, rtol=1e-5, atol=1e-5)
    check_pipeline(Program(mlc.parse(text), "f", [q, k, v]), pipeline, rtol=1e-4, atol=1e-5)


def _only_host_code_outside_launches(module):
    """Outside the kernels: allocation, sizes and checks on them, the loops of the host."""
    for f in module.functions.values():
        for op in f.body.walk():
            if op.name in ("mem.load", "mem.store", "vector.load", "vector.store"):
                parent = op.parent_op
                while parent is not None and parent.name != "gpu.launch":
                    parent = parent.parent_op
                assert parent is not None, f"{op.name} outside a kernel in\n{module}"


def test_map_to_gpu_collapses_a_nest_and_guards_the_tail():
    text = """module { func.func @f(%t: tensor<?x5xf32>) -> tensor<?x5xf32> {
      %e = mlc.exp %t : tensor<?x5xf32>
      return %e : tensor<?x5xf32> } }"""
    m = mlc.run_passes(mlc.parse(text), "cuda{block=64}")
    launches = [op for op in m.walk() if op.name == "gpu.launch"]
    assert len(launches) == 1 and list(launches[0].attr("block")) == [64]
    # both loops collapsed: the one loop left is the grid-stride loop over rounds of the grid
    assert [op.name for op in launches[0].regions[0].walk() if op.name == "loop.for"] == ["loop.for"]
    x = np.random.default_rng(2).standard_normal((13, 5)).astype(np.float32)  # 65 elements: 2 blocks, 63 idle threads
    np.testing.assert_allclose(mlc.interpret(m, "f", x), np.exp(x), rtol=1e-6)
    strided = mlc.run_passes(mlc.parse(text), "cuda{block=32 max-blocks=1}")  # one block, 3 rounds
    np.testing.assert_allclose(mlc.interpret(strided, "f", x), np.exp(x), rtol=1e-6)


def test_map_to_gpu_rejects_a_block_that_is_not_whole_warps():
    with pytest.raises(PipelineError, match="map-to-gpu needs a block of 32 to 1024 threads, a multiple of 32, and max-blocks >= 1"):
        mlc.run_passes(mlc.parse("module { }"), "map-to-gpu{block=48}")


@pytest.mark.parametrize("body, reference", [
    ("%y = mlc.softmax %x {axis = -1}", lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)),
    ("%y = mlc.reduce_sum %x {axes = [1], keepdims = true}", lambda x: x.sum(1, keepdims=True)),
    ("""%m = mlc.reduce_mean %x {axes = [1], keepdims = true}
      %d = mlc.sub %x, %m : (tensor<?x45xf32>, tensor<?x1xf32>) -> tensor<?x45xf32>
      %s = mlc.mul %d, %d
      %v = mlc.reduce_mean %s {axes = [1], keepdims = true}
      %e = mlc.constant dense<1.0e-5> : tensor<f32>
      %ve = mlc.add %v, %e : (tensor<?x1xf32>, tensor<f32>) -> tensor<?x1xf32>
      %r = mlc.rsqrt %ve
      %y = mlc.mul %d, %r : (tensor<?x45xf32>, tensor<?x1xf32>) -> tensor<?x45xf32>""",
     lambda x: (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)),
], ids=["softmax", "reduce_sum", "layer_norm"])
def test_row_reductions_run_a_warp_per_row(body, reference):
    out = "tensor<?x1xf32>" if "reduce_sum" in body else "tensor<?x45xf32>"
    m = mlc.parse(f"""module {{ func.func @f(%x: tensor<?x45xf32>) -> {out} {{
      {body}
      return %y : {out} }} }}""")
    lowered = mlc.run_passes(m.clone(), "cuda")
    assert any(op.name == "gpu.shuffle" for op in lowered.walk())  # a warp per row, combined by shuffles
    x = np.random.default_rng(4).standard_normal((11, 45)).astype(np.float32)  # rows of 45: lanes 13..31 idle in the second pass
    np.testing.assert_allclose(mlc.interpret(lowered, "f", x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("element", ["f16", "bf16"])
@pytest.mark.parametrize("rows", [70, 5])
def test_half_products_run_on_tensor_cores(rows, element):
    """A half-precision matmul stays half (tensor cores sum in f32, as widening means) and becomes tiles
    of gpu.mma_sync; ragged rows, columns (48 of a 64-wide tile) and a K of two slices."""
    from mlc.ir.types import ELEMENT_TYPES, round_to_element
    m = mlc.parse(f"""module {{ func.func @f(%a: tensor<?x32x{element}>, %b: tensor<32x48x{element}>) -> tensor<?x48x{element}> {{
      %c = mlc.matmul %a, %b : (tensor<?x32x{element}>, tensor<32x48x{element}>) -> tensor<?x48x{element}>
      return %c : tensor<?x48x{element}> }} }}""")
    lowered = mlc.run_passes(m.clone(), "cuda")
    # rows of 32 and 48 are whole 16-byte pieces: slices arrive by copy_async, two stages, and each warp
    # has registers for 2 x 4 tiles of 16 x 8
    assert sum(op.name == "gpu.mma_sync" for op in lowered.walk()) == 8
    assert any(op.name == "gpu.copy_async" for op in lowered.walk())
    rng = np.random.default_rng(rows)
    e = ELEMENT_TYPES[element]
    a, b = (round_to_element(rng.standard_normal(shape).astype(np.float32), e) for shape in ((rows, 32), (32, 48)))
    got = mlc.interpret(lowered, "f", a, b).astype(np.float32)
    want = round_to_element(a.astype(np.float64) @ b.astype(np.float64), e).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-2 if element == "bf16" else 2e-3, atol=2e-3)


@pytest.mark.parametrize("element", ["f16", "bf16"])
@pytest.mark.parametrize("rows, depth, cols", [(70, 40, 40), (3, 8, 8), (130, 72, 96)])
def test_pipelined_tensor_core_products_with_ragged_slices(element, rows, depth, cols):
    """Batched, with a K that leaves the last 16-deep slice part empty (zero-filled pieces) and columns
    past the tile's edge."""
    from mlc.ir.types import ELEMENT_TYPES, round_to_element
    e = element
    m = mlc.parse(f"""module {{ func.func @f(%a: tensor<2x?x{depth}x{e}>, %b: tensor<{depth}x{cols}x{e}>) -> tensor<2x?x{cols}x{e}> {{
      %c = mlc.matmul %a, %b : (tensor<2x?x{depth}x{e}>, tensor<{depth}x{cols}x{e}>) -> tensor<2x?x{cols}x{e}>
      return %c : tensor<2x?x{cols}x{e}> }} }}""")
    lowered = mlc.run_passes(m.clone(), "cuda")
    assert any(op.name == "gpu.copy_async" for op in lowered.walk())
    rng, t = np.random.default_rng(rows), ELEMENT_TYPES[e]
    a = round_to_element(rng.standard_normal((2, rows, depth)).astype(np.float32), t)
    b = round_to_element(rng.standard_normal((depth, cols)).astype(np.float32), t)
    np.testing.assert_allclose(mlc.interpret(lowered, "f", a, b).astype(np.float32), mlc.interpret(m, "f", a, b).astype(np.float32),
                               rtol=1e-2, atol=2e-2)


def test_f16_convolutions_run_on_tensor_cores():
    """An implicit GEMM of tensor-core tiles: 8 output channels (of a 64-row tile), 3 x 3 x 3 taps
    (27 of a 32-deep pair of slices), 2 x 9 x 9 pixels."""
    m = mlc.parse("""module { func.func @f(%x: tensor<?x3x9x9xf16>, %w: tensor<8x3x3x3xf16>) -> tensor<?x8x9x9xf16> {
      %y = mlc.conv2d %x, %w {padding = [1, 1, 1, 1]} : (tensor<?x3x9x9xf16>, tensor<8x3x3x3xf16>) -> tensor<?x8x9x9xf16>
      return %y : tensor<?x8x9x9xf16> } }""")
    lowered = mlc.run_passes(m.clone(), "cuda")
    assert any(op.name == "gpu.mma_sync" for op in lowered.walk())
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((2, 3, 9, 9)).astype(np.float16), rng.standard_normal((8, 3, 3, 3)).astype(np.float16)
    np.testing.assert_allclose(mlc.interpret(lowered, "f", x, w).astype(np.float32),
                               mlc.interpret(m, "f", x, w).astype(np.float32), rtol=2e-3, atol=2e-3)
