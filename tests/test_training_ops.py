"""mlc.batch_norm and mlc.dropout: the interpreter against torch, their decomposition and the CPU
backend against the interpreter, gradients against torch.autograd."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mlc

rng = np.random.default_rng(11)


def ttype(shape, e="f32"):
    return "tensor<" + "".join(f"{'?' if d is None else d}x" for d in shape) + e + ">"


def bn_module(shape, training: bool, e="f32", momentum=0.1):
    c = shape[1]
    x, p = ttype(shape, e), ttype((c,), e)
    return mlc.parse(f"""module {{ func.func @f(%x: {x}, %w: {p}, %b: {p}, %rm: {p}, %rv: {p}) -> ({x}, {p}, {p}) {{
      %t = mlc.constant dense<{'true' if training else 'false'}> : tensor<i1>
      %y, %m, %v = mlc.batch_norm %x, %w, %b, %rm, %rv, %t {{momentum = {momentum}}} : ({x}, {p}, {p}, {p}, {p}, tensor<i1>) -> ({x}, {p}, {p})
      return %y, %m, %v : {x}, {p}, {p} }} }}""")


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 4, 3, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_matches_torch_and_its_decomposition(shape, training):
    c = shape[1]
    x = rng.standard_normal(shape).astype(np.float32) * 2 + 1
    w, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    rm, rv = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    m = bn_module(shape, training, momentum=0.3)
    got = mlc.interpret(m, "f", x, w, b, rm, rv)
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    want = F.batch_norm(torch.tensor(x), trm, trv, torch.tensor(w), torch.tensor(b), training=training, momentum=0.3)
    np.testing.assert_allclose(got[0], want.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], trm.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[2], trv.numpy(), rtol=1e-6, atol=1e-6)
    decomposed = mlc.run_passes(m.clone(), "decompose,canonicalize")
    assert "batch_norm" not in str(decomposed)
    for a, bb in zip(mlc.interpret(decomposed, "f", x, w, b, rm, rv), got):
        np.testing.assert_allclose(a, bb, rtol=1e-5, atol=1e-5)
    for a, bb in zip(mlc.compile(m)["f"](x, w, b, rm, rv), got):
        np.testing.assert_allclose(a, bb, rtol=1e-5, atol=1e-5)


def test_batch_norm_gradients_match_torch_autograd():
    shape = (4, 3, 2, 3)
    x = rng.standard_normal(shape)
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    probe = rng.standard_normal(shape)
    xt, p3 = ttype(shape, "f64"), ttype((3,), "f64")
    m = mlc.parse(f"""module {{ func.func @loss(%x: {xt}, %w: {p3}, %b: {p3}, %probe: {xt}) -> tensor<f64> {{
      %t = mlc.constant dense<true> : tensor<i1>
      %z = mlc.constant dense<0.0> : {p3}
      %o = mlc.constant dense<1.0> : {p3}
      %y, %m, %v = mlc.batch_norm %x, %w, %b, %z, %o, %t : ({xt}, {p3}, {p3}, {p3}, {p3}, tensor<i1>) -> ({xt}, {p3}, {p3})
      %p = mlc.mul %y, %probe
      %l = mlc.reduce_sum %p : ({xt}) -> tensor<f64>
      return %l : tensor<f64> }} }}""")
    mlc.run_passes(m, "grad{func=@loss wrt=[x, w, b]}")
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    (F.batch_norm(tx, None, None, tw, tb, training=True) * torch.tensor(probe)).sum().backward()
    for got in (mlc.interpret(m, "loss_grad", x, w, b, probe), mlc.compile(m)["loss_grad"](x, w, b, probe)):
        for g, t in zip(got[1:], (tx, tw, tb)):
            np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-9, atol=1e-10)


def dropout_module(shape, p, training=True):
    x = ttype(shape)
    return mlc.parse(f"""module {{ func.func @f(%x: {x}, %key: tensor<2xi64>) -> {x} {{
      %t = mlc.constant dense<{'true' if training else 'false'}> : tensor<i1>
      %y = mlc.dropout %x, %key, %t {{p = {p}}} : ({x}, tensor<2xi64>, tensor<i1>) -> {x}
      return %y : {x} }} }}""")


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 1.0])
def test_dropout_masks_are_reproducible_and_the_same_on_every_backend(p):
    x = rng.standard_normal((64, 50)).astype(np.float32)
    m = dropout_module(x.shape, p)
    key = np.array([7, 3], np.int64)
    y = mlc.interpret(m, "f", x, key)
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / (1 - p), rtol=1e-6)
    assert abs((~kept).mean() - p) < 0.03
    np.testing.assert_array_equal(mlc.compile(m)["f"](x, key), y)
    np.testing.assert_array_equal(mlc.interpret(mlc.run_passes(m.clone(), "decompose"), "f", x, key), y)
    np.testing.assert_array_equal(mlc.interpret(m, "f", x, key), y)
    if 0 < p < 1:
        assert not np.array_equal(mlc.interpret(m, "f", x, np.array([7, 4], np.int64)) != 0, kept)  # a new step, a new mask
    np.testing.assert_array_equal(mlc.interpret(dropout_module(x.shape, p, training=False), "f", x, key), x)


def test_dropout_gradient_is_the_scaled_mask():
    x = rng.standard_normal((8, 5)).astype(np.float32)
    m = mlc.parse("""module { func.func @loss(%x: tensor<8x5xf32>, %key: tensor<2xi64>) -> tensor<f32> {
      %t = mlc.constant dense<true> : tensor<i1>
      %y = mlc.dropout %x, %key, %t {p = 0.4} : (tensor<8x5xf32>, tensor<2xi64>, tensor<i1>) -> tensor<8x5xf32>
      %l = mlc.reduce_sum %y : (tensor<8x5xf32>) -> tensor<f32>
      return %l : tensor<f32> } }""")
    key = np.array([1, 2], np.int64)
    y = mlc.interpret(m.clone(), "loss", x, key)
    mlc.run_passes(m, "grad{func=@loss}")
    _, gx = mlc.interpret(m, "loss_grad", x, key)
    mask = mlc.interpret(dropout_module(x.shape, 0.4), "f", np.ones_like(x), key)
    np.testing.assert_allclose(gx, mask, rtol=1e-6)
    np.testing.assert_allclose(y, (x * mask).sum(), rtol=1e-5)


def test_bad_operands_are_located_errors():
    with pytest.raises(mlc.DiagnosticError, match="operand 2 \\(training\\) must be tensor<i1>"):
        mlc.parse("""module { func.func @f(%x: tensor<3xf32>, %k: tensor<2xi64>, %t: tensor<3xi1>) -> tensor<3xf32> {
          %y = mlc.dropout %x, %k, %t : (tensor<3xf32>, tensor<2xi64>, tensor<3xi1>) -> tensor<3xf32>
          return %y : tensor<3xf32> } }""")
    with pytest.raises(mlc.DiagnosticError, match="operand 1 must be tensor<4xf32> \\(one per channel\\)"):
        mlc.parse(str(bn_module((2, 4), True)).replace("%w: tensor<4xf32>", "%w: tensor<5xf32>", 1)
                  .replace("(tensor<2x4xf32>, tensor<4xf32>, tensor<4xf32>, tensor<4xf32>, tensor<4xf32>, tensor<i1>)",
                           "(tensor<2x4xf32>, tensor<5xf32>, tensor<4xf32>, tensor<4xf32>, tensor<4xf32>, tensor<i1>)"))
