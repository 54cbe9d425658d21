"""Autotuning (mlc/tune.py, runtime/tuning.py): tile sizes measured per shape, kept per host in the
cache directory, applied by later compiles, which still compute the same results."""
import json
import os

import numpy as np
import pytest

import mlc
from mlc import compiler
from mlc.cli import main
from mlc.runtime import artifact, tuning
from mlc.tune import DEFAULT, tune

PRODUCT = """func.func @f(%a: tensor<?x300xf32>, %b: tensor<300x70xf32>) -> tensor<?x70xf32> {
  %c = mlc.matmul %a, %b : (tensor<?x300xf32>, tensor<300x70xf32>) -> tensor<?x70xf32>
  %r = mlc.relu %c : (tensor<?x70xf32>) -> tensor<?x70xf32>
  return %r : tensor<?x70xf32>
}"""
DIRECT = """func.func @d(%x: tensor<1x4x64x64xf32>, %w: tensor<8x4x3x3xf32>) -> tensor<1x8x64x64xf32> {
  %y = mlc.conv2d %x, %w {padding = [1, 1, 1, 1]} : (tensor<1x4x64x64xf32>, tensor<8x4x3x3xf32>) -> tensor<1x8x64x64xf32>
  return %y : tensor<1x8x64x64xf32>
}"""
CONV = """func.func @g(%x: tensor<1x8x12x12xf32>, %w: tensor<16x8x3x3xf32>) -> tensor<1x16x6x6xf32> {
  %y = mlc.conv2d %x, %w {stride = [2, 2], padding = [1, 1, 1, 1]} : (tensor<1x8x12x12xf32>, tensor<16x8x3x3xf32>) -> tensor<1x16x6x6xf32>
  return %y : tensor<1x16x6x6xf32>
}"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLC_CACHE_DIR", str(tmp_path))
    return tmp_path


def k_slices(module) -> set:
    """The steps of the lowered loops (a tuned kc shows as one)."""
    import re
    return {int(s) for s in re.findall(r"step = (\d+)", str(compiler.lower(module)))}


def test_tuning_records_each_shape_and_compiles_apply_it(cache):
    module = mlc.parse(PRODUCT + "\n" + CONV + "\n" + DIRECT)
    results = tune(module, batch=8, candidates=[(24, 64)])
    table = tuning.load()
    # (the direct convolution of a 64 x 64 image has no block sizes: not tuned)
    assert sorted(t.key for t in results) == sorted(table) and len(table) == 2 and not any("64x64" in k for k in table)
    assert all(tuple(v) in (DEFAULT, (24, 64)) for v in table.values())
    assert all(t.best_ms <= t.default_ms for t in results)
    # a table saying kc = 64 for the product: the lowered loops slice K by 64, the results are the same
    product_key = next(k for k in table if k.startswith("mlc.matmul"))
    before = k_slices(module)
    tuning.save({product_key: [24, 64]})
    assert 64 in k_slices(module) and 64 not in before
    a, b = np.random.default_rng(0).standard_normal((50, 300)).astype(np.float32), np.random.default_rng(1).standard_normal((300, 70)).astype(np.float32)
    np.testing.assert_allclose(mlc.compile(module)["f"](a, b), np.maximum(a @ b, 0), rtol=1e-4, atol=1e-4)


def test_compiled_code_is_cached_apart_per_table(cache):
    module = mlc.parse(PRODUCT)
    untuned = artifact._cache_path(module)
    staged = compiler.tensor_stage(module)
    tuning.save({tuning.key(tuning.tuned_ops(staged)[0]): [96, 128]})
    assert artifact._cache_path(module) != untuned


def test_a_damaged_or_foreign_table_is_no_table(cache):
    module = mlc.parse(PRODUCT)
    before = k_slices(module)
    for content in (b"{not json", json.dumps({"format": "mlc-tuning", "version": 1, "host": {"cpu": "elsewhere"},
                                                "entries": {"x": [24, 64]}}).encode()):
        os.makedirs(os.path.dirname(tuning.path()), exist_ok=True)
        with open(tuning.path(), "wb") as f:
            f.write(content)
        assert tuning.load() == {} and tuning.digest() == ""
        assert k_slices(module) == before


def test_bad_tile_sizes_are_reported_at_the_op():
    text = PRODUCT.replace("%c = mlc.matmul %a, %b :", "%c = mlc.matmul %a, %b {mlc.tile = [25, 64]} :")
    with pytest.raises(mlc.DiagnosticError, match=r"<string>:\d+:\d+: error: mem.matmul's tile = \[mc, kc\] needs mc a positive multiple of 8"):
        compiler.lower(mlc.parse(text))


def test_the_command_line(cache, tmp_path, capsys):
    path = tmp_path / "m.ir"
    path.write_text(PRODUCT)
    assert main(["tune", str(path), "--batch", "0"]) == 1
    assert "--batch: error: must be at least 1, got 0" in capsys.readouterr().err
    assert main(["tune", str(path), "--batch", "4"]) == 0
    out, err = capsys.readouterr()
    assert "mlc.matmul" in out and f"wrote {tuning.path()}" in err
    empty = tmp_path / "e.ir"
    empty.write_text("func.func @h(%x: tensor<3xf32>) -> tensor<3xf32> {\n  %y = mlc.exp %x : (tensor<3xf32>) -> tensor<3xf32>\n"
                     "  return %y : tensor<3xf32>\n}")
    assert main(["tune", str(empty)]) == 0
    assert "nothing to tune" in capsys.readouterr().err
