"""The train_step pass: optimiser steps against torch.optim on the same loss, on the interpreter and
the CPU backend; clipping and schedules against torch's utilities."""
import numpy as np
import pytest

import mlc
from mlc.ir.interpreter import Interpreter

torch = pytest.importorskip("torch")

MODEL = """module {
  mlc.global @w : tensor<4x3xf32> {init = "glorot_uniform", trainable}
  mlc.global @b : tensor<3xf32> {init = "normal", trainable}
  func.func @loss(%x: tensor<?x4xf32>, %probe: tensor<?x3xf32>) -> tensor<f32> {
    %w = mlc.global_load @w : tensor<4x3xf32>
    %b = mlc.global_load @b : tensor<3xf32>
    %h = mlc.matmul %x, %w : (tensor<?x4xf32>, tensor<4x3xf32>) -> tensor<?x3xf32>
    %hb = mlc.add %h, %b : (tensor<?x3xf32>, tensor<3xf32>) -> tensor<?x3xf32>
    %t = mlc.tanh %hb
    %p = mlc.mul %t, %probe
    %l = mlc.reduce_mean %p : (tensor<?x3xf32>) -> tensor<f32>
    return %l : tensor<f32>
  }
}"""

CONFIGS = [  # pass options, torch optimiser, its arguments
    ("optimizer=sgd lr=0.5", "SGD", {"lr": 0.5}),
    ("optimizer=sgd lr=0.3 momentum=0.9 dampening=0.2 weight-decay=0.05", "SGD",
     {"lr": 0.3, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.05}),
    ("optimizer=sgd lr=0.3 momentum=0.8 nesterov=true weight-decay=0.01", "SGD",
     {"lr": 0.3, "momentum": 0.8, "nesterov": True, "weight_decay": 0.01}),
    ("optimizer=adam lr=0.05", "Adam", {"lr": 0.05}),
    ("optimizer=adam lr=0.05 beta1=0.8 beta2=0.99 eps=1e-6 weight-decay=0.1", "Adam",
     {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    ("optimizer=adamw lr=0.05", "AdamW", {"lr": 0.05}),
    ("optimizer=adamw lr=0.02 weight-decay=0.3 beta2=0.9", "AdamW", {"lr": 0.02, "weight_decay": 0.3, "betas": (0.9, 0.9)}),
]


def batches(steps, seed=0):
    r = np.random.default_rng(seed)
    return [(r.standard_normal((5, 4)).astype(np.float32), r.standard_normal((5, 3)).astype(np.float32)) for _ in range(steps)]


def torch_run(w, b, data, optimizer, kwargs, clip=0.0, schedule=None):
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    opt = getattr(torch.optim, optimizer)([tw, tb], **kwargs)
    sched = schedule(opt) if schedule else None
    history = []
    for x, probe in data:
        opt.zero_grad()
        loss = (torch.tanh(torch.tensor(x) @ tw + tb) * torch.tensor(probe)).mean()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([tw, tb], clip)
        opt.step()
        if sched:
            sched.step()
        history.append((loss.item(), tw.detach().numpy().copy(), tb.detach().numpy().copy()))
    return history


def trained(options):
    return mlc.run_passes(mlc.parse(MODEL), f"train_step{{loss=@loss {options}}}")


@pytest.mark.parametrize("options,optimizer,kwargs", CONFIGS)
def test_optimiser_steps_match_torch_optim(options, optimizer, kwargs):
    m = trained(options)
    data = batches(6)
    interp = Interpreter(m)
    exe = mlc.compile(m)
    want = torch_run(interp.globals["w"].copy(), interp.globals["b"].copy(), data, optimizer, kwargs)
    for (x, probe), (loss, w, b) in zip(data, want):
        got_loss = interp.call_public("train_step", (x, probe))
        np.testing.assert_allclose(got_loss, loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(interp.globals["w"], w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(interp.globals["b"], b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(exe["train_step"](x, probe), loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(exe.globals["w"], w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(exe.globals["b"], b, rtol=1e-5, atol=1e-6)
    assert exe.globals["train_step.step"] == len(data)


@pytest.mark.parametrize("options,schedule", [
    ("schedule=step step-size=2 gamma=0.5", lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)),
    ("schedule=cosine t-max=4 eta-min=0.01", lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.01)),
])
def test_schedules_and_clipping_match_torch(options, schedule):
    m = trained(f"optimizer=sgd lr=0.5 momentum=0.5 clip-norm=0.05 {options}")
    data = batches(5, seed=1)
    exe = mlc.compile(m)
    want = torch_run(exe.globals["w"].copy(), exe.globals["b"].copy(), data, "SGD", {"lr": 0.5, "momentum": 0.5},
                     clip=0.05, schedule=schedule)
    for (x, probe), (loss, w, b) in zip(data, want):
        exe["train_step"](x, probe)
        np.testing.assert_allclose(exe.globals["w"], w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(exe.globals["b"], b, rtol=1e-5, atol=1e-6)


def test_the_step_is_ordinary_ir_with_its_state_in_globals():
    text = str(trained("optimizer=adam lr=1e-3"))
    for decl in ("mlc.global @w.exp_avg : tensor<4x3xf32>", "mlc.global @w.exp_avg_sq : tensor<4x3xf32>",
                 "mlc.global @b.exp_avg : tensor<3xf32>", "mlc.global @train_step.step : tensor<f64>",
                 "func.func @train_step(%x: tensor<?x4xf32>, %probe: tensor<?x3xf32>) -> tensor<f32>",
                 "mlc.global_store"):
        assert decl in text
    assert "@loss_grad" not in text
    mlc.parse(text)  # prints and parses back


@pytest.mark.parametrize("options,message", [
    ("optimizer=rmsprop", "unknown optimizer 'rmsprop' \\(optimizers: sgd, adam, adamw\\)"),
    ("schedule=linear", "unknown schedule 'linear'"),
    ("weight-decay=lots", "weight-decay takes a number"),
])
def test_bad_options_are_diagnostics(options, message):
    with pytest.raises(mlc.DiagnosticError, match=message):
        trained(options)
    with pytest.raises(mlc.DiagnosticError, match="no loss function @nope"):
        mlc.run_passes(mlc.parse(MODEL), "train_step{loss=@nope}")
    with pytest.raises(mlc.DiagnosticError, match="no trainable globals"):
        mlc.run_passes(mlc.parse(MODEL.replace(", trainable}", "}")), "train_step{loss=@loss}")


def test_mixed_precision_rounds_products_to_bf16_and_keeps_f32_weights():
    """precision="bf16": the product's operands and result rounded to bf16 (sums in f32), the loss,
    the gradients' other ops, the weights and Adam's state f32; training tracks the f32 run."""
    from mlc.ir.types import bf16, round_to_element
    m = mlc.parse("""module { func.func @f(%x: tensor<3x5xf32>, %w: tensor<5x2xf32>) -> tensor<3x2xf32> {
      %y = mlc.matmul %x, %w : (tensor<3x5xf32>, tensor<5x2xf32>) -> tensor<3x2xf32>
      return %y : tensor<3x2xf32> } }""")
    r = np.random.default_rng(0)
    x, w = r.standard_normal((3, 5)).astype(np.float32), r.standard_normal((5, 2)).astype(np.float32)
    want = round_to_element(round_to_element(x, bf16).astype(np.float64) @ round_to_element(w, bf16), bf16)
    np.testing.assert_allclose(mlc.compile(m, precision="bf16")["f"](x, w), want, rtol=1e-6)

    import mlc.nn as nn
    import mlc.nn.functional as F
    data = r.standard_normal((64, 16)).astype(np.float32)
    target = (data @ r.standard_normal((16, 4))).astype(np.float32)

    def train(precision):
        mlc.manual_seed(1)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        step = mlc.compile_train_step(model, F.mse_loss, mlc.optim.Adam(model.parameters(), lr=1e-2), precision=precision)
        return [float(step(data, target)) for _ in range(20)], model
    (full, _), (half, model) = train(None), train("bf16")
    assert half != full and abs(half[-1] - full[-1]) < 0.05 * full[0]  # rounded, yet learning alike
    assert all(p.data.dtype == np.float32 for p in model.parameters())
