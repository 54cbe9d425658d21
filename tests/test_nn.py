"""mlc.nn and mlc.optim against PyTorch: with the weights copied through state_dict, forward outputs,
input and parameter gradients, running statistics and optimiser steps match torch (f32: rtol 1e-4,
atol 1e-5 unless a case says otherwise). The interpreter backend runs them; test_cpu_* compile."""
import numpy as np
import pytest

import mlc
import mlc.nn as nn
import mlc.nn.functional as F
from mlc.tracing import flatten

torch = pytest.importorskip("torch")
rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.fixture(autouse=True)
def interp_backend():
    saved = mlc.default_backend()
    mlc.default_backend("interp")
    torch.manual_seed(0)
    yield
    mlc.default_backend(saved)


def tensors(arrays):
    return [torch.tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]


def torch_leaves(out):
    if isinstance(out, (tuple, list)):
        return [leaf for o in out for leaf in torch_leaves(o)]
    return [] if out is None else [out]


def check(model, torch_model, *inputs, rtol=1e-4, atol=1e-5, **kwargs):
    """Forward outputs and, for the loss sum(output^2) over all outputs, the input and parameter
    gradients equal torch's. kwargs (masks) go to both forwards."""
    assert list(model.state_dict()) == list(torch_model.state_dict())
    model.load_state_dict(torch_model.state_dict())
    model.train(torch_model.training)
    torch_model.zero_grad()
    ts = tensors(inputs)
    want = torch_leaves(torch_model(*ts, **{k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}))
    sum(w.pow(2).sum() for w in want).backward()
    params = {k: v.data for k, v in model.named_parameters()}
    differentiable = tuple(i + 1 for i, a in enumerate(inputs) if a.dtype.kind == "f")

    def loss(p, *xs):
        outs = flatten(nn.functional_call(model, p, *xs, **kwargs))[0]
        return sum(mlc.sum(o ** 2) for o in outs)
    value, grads = mlc.value_and_grad(loss, argnums=(0,) + differentiable)(params, *inputs)
    np.testing.assert_allclose(value, sum(w.pow(2).sum() for w in want).item(), rtol=rtol)
    for name, p in torch_model.named_parameters():
        np.testing.assert_allclose(grads[0][name], p.grad.numpy(), rtol=rtol, atol=atol, err_msg=name)
    for g, i in zip(grads[1:], differentiable):
        np.testing.assert_allclose(g, ts[i - 1].grad.numpy(), rtol=rtol, atol=atol, err_msg=f"input {i - 1}")
    got = flatten(model(*inputs, **kwargs))[0]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.detach().numpy(), rtol=rtol, atol=atol)


def same(layer, *args, **kwargs):
    """The mlc and the torch module of one class and arguments."""
    return getattr(nn, layer)(*args, **kwargs), getattr(torch.nn, layer)(*args, **kwargs)


@pytest.mark.parametrize("args,kwargs", [((3, 8, 3), {}), ((4, 6, 3), dict(stride=2, padding=1, groups=2)),
                                         ((3, 4, (3, 2)), dict(dilation=2, padding="same", bias=False)),
                                         ((3, 4, 5), dict(stride=(2, 1), padding=(2, 0)))])
def test_conv2d(args, kwargs):
    check(*same("Conv2d", *args, **kwargs), randn(2, args[0], 9, 8))


@pytest.mark.parametrize("kwargs", [{}, dict(stride=2, padding=1, output_padding=1), dict(groups=2, dilation=2)])
def test_conv_transpose2d(kwargs):
    check(*same("ConvTranspose2d", 4, 6, 3, **kwargs), randn(2, 4, 5, 6))


def test_linear_on_three_dimensional_input():
    check(*same("Linear", 5, 3), randn(2, 4, 5))
    check(*same("Linear", 5, 3, bias=False), randn(4, 5))


@pytest.mark.parametrize("layer,shape", [("BatchNorm2d", (4, 3, 5, 5)), ("BatchNorm1d", (6, 3)), ("BatchNorm1d", (4, 3, 7))])
def test_batch_norm_train_and_eval(layer, shape):
    m, tm = same(layer, 3, momentum=0.2)
    x = randn(*shape) * 2 + 1
    check(m, tm, x)  # a training forward: batch statistics
    tm(torch.tensor(x))
    m(x)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        np.testing.assert_allclose(m.state_dict()[key], tm.state_dict()[key].numpy(), rtol=1e-5, err_msg=key)
    tm.eval()
    m.eval()
    check(m, tm, x)


def test_layer_norm_embedding_and_activations():
    check(*same("LayerNorm", (4, 5)), randn(3, 4, 5))
    check(*same("LayerNorm", 5, elementwise_affine=False), randn(3, 5))
    for layer, args in [("ReLU", ()), ("GELU", ()), ("GELU", ("tanh",)), ("Tanh", ()), ("Sigmoid", ()), ("SiLU", ()),
                        ("LeakyReLU", (0.2,)), ("Softmax", (1,)), ("Flatten", ()), ("Identity", ())]:
        check(*same(layer, *args), randn(2, 3, 4))


def test_embedding_keeps_the_padding_row_out_of_the_gradient():
    m, tm = same("Embedding", 10, 4, padding_idx=1)
    assert np.all(m.weight.data[1] == 0)
    check(m, tm, np.array([[1, 2, 3], [4, 1, 9]]))


# --- recurrent layers and attention ----------------------------------------------------------------------

@pytest.mark.parametrize("layer", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("kwargs", [{}, dict(num_layers=2, bidirectional=True, batch_first=True),
                                    dict(num_layers=2, bias=False)])
def test_recurrent_layers(layer, kwargs):
    m, tm = same(layer, 3, 5, **kwargs)
    check(m, tm, randn(4, 6, 3))


def test_recurrent_layers_take_initial_states_and_unbatched_input():
    m, tm = same("LSTM", 3, 4, num_layers=2)
    h0, c0 = randn(2, 2, 4), randn(2, 2, 4)
    m.load_state_dict(tm.state_dict())
    out, (h, c) = m(randn(5, 2, 3), (h0, c0))
    check(m, tm, randn(5, 3))  # unbatched: (L, H_in)
    check(*same("RNN", 3, 4, nonlinearity="relu"), randn(5, 2, 3), randn(1, 2, 4))
    check(*same("GRU", 3, 4), randn(5, 2, 3), randn(1, 2, 4))


def test_multihead_attention_with_masks():
    m, tm = same("MultiheadAttention", 8, 2)
    x, kv = randn(5, 2, 8), randn(6, 2, 8)
    check(m, tm, x, kv, kv)
    padding = np.zeros((2, 6), bool)
    padding[1, 4:] = True
    check(m, tm, x, kv, kv, key_padding_mask=padding, attn_mask=randn(5, 6), average_attn_weights=False)
    m, tm = same("MultiheadAttention", 8, 4, batch_first=True)
    check(m, tm, randn(2, 5, 8), randn(2, 5, 8), randn(2, 5, 8), attn_mask=~np.tril(np.ones((5, 5), bool)), need_weights=False)


@pytest.mark.parametrize("kwargs", [dict(), dict(norm_first=True, activation="gelu", batch_first=True)])
def test_transformer_layers(kwargs):
    enc, tenc = same("TransformerEncoderLayer", 8, 2, 16, dropout=0.0, **kwargs)
    dec, tdec = same("TransformerDecoderLayer", 8, 2, 16, dropout=0.0, **kwargs)
    x, memory = randn(5, 5, 8), randn(5, 6, 8) if kwargs.get("batch_first") else randn(6, 5, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    padding = np.zeros((5, 5), bool)
    padding[2, 3:] = True
    check(enc, tenc, x, src_key_padding_mask=padding)
    check(dec, tdec, x, memory, tgt_mask=causal)


def test_transformer_encoder_decoder():
    m, tm = same("Transformer", 8, 2, 2, 1, 16, dropout=0.0, batch_first=True)
    src, tgt = randn(2, 6, 8), randn(2, 5, 8)
    check(m, tm, src, tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(5), rtol=3e-4, atol=3e-5)
    tm.eval()
    np.testing.assert_allclose(m.eval()(src, tgt), tm(torch.tensor(src), torch.tensor(tgt)).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_positional_encoding_is_sinusoidal():
    pe = nn.PositionalEncoding(6, max_len=10)
    out = pe(np.zeros((4, 1, 6), np.float32))
    position, i = 3, 2
    assert out[position, 0, 2 * i] == pytest.approx(np.sin(position / 10000 ** (2 * i / 6)), rel=1e-6)
    assert out[position, 0, 2 * i + 1] == pytest.approx(np.cos(position / 10000 ** (2 * i / 6)), rel=1e-6)
    assert list(pe.state_dict()) == []


@pytest.mark.parametrize("layer,args", [("MaxPool2d", (2,)), ("MaxPool2d", (3, 2, 1)), ("AvgPool2d", (2,)),
                                        ("AvgPool2d", (3, 2, 1)), ("AdaptiveAvgPool2d", (1,)), ("AdaptiveAvgPool2d", (2,))])
def test_pooling(layer, args):
    check(*same(layer, *args), randn(2, 3, 6, 6))


def test_dropout_masks_scale_and_vary_per_call():
    mlc.manual_seed(5)
    d = nn.Dropout(0.25)
    x = np.ones((200, 50), np.float32)
    a, b = d(x), d(x)
    assert set(np.unique(a)) <= {0, np.float32(1 / 0.75)}
    assert abs((a == 0).mean() - 0.25) < 0.02 and not np.array_equal(a, b)
    mlc.manual_seed(5)
    np.testing.assert_array_equal(d(x), a)  # the same seed, the same masks
    d.eval()
    np.testing.assert_array_equal(d(x), x)


def test_sequential_state_dict_names_and_nesting():
    def make(lib):
        return lib.nn.Sequential(lib.nn.Conv2d(3, 4, 3), lib.nn.BatchNorm2d(4), lib.nn.ReLU(), lib.nn.Flatten(),
                                 lib.nn.Sequential(lib.nn.Linear(64, 8), lib.nn.Tanh()), lib.nn.Linear(8, 3))
    m, tm = make(mlc), make(torch)
    assert [k for k, _ in m.named_parameters()] == [k for k, _ in tm.named_parameters()]
    check(m, tm, randn(2, 3, 6, 6))
    ml = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    assert list(ml.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"] and len(ml) == 2


def test_load_state_dict_refuses_wrong_keys_and_shapes():
    m = nn.Linear(3, 2)
    with pytest.raises(KeyError, match="missing keys \\['bias'\\]"):
        m.load_state_dict({"weight": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="'weight' has shape \\(3, 2\\)"):
        m.load_state_dict({"weight": np.zeros((3, 2)), "bias": np.zeros(2)})


def test_default_initialisation_follows_torch():
    mlc.manual_seed(0)
    lin, conv = nn.Linear(400, 50), nn.Conv2d(8, 4, 3)
    assert np.abs(lin.weight.data).max() <= 1 / 20 and np.abs(lin.weight.data).max() > 0.95 / 20
    assert np.abs(conv.bias.data).max() <= 1 / np.sqrt(72)
    assert abs(nn.Embedding(1000, 10).weight.data.std() - 1) < 0.05


# --- functional -----------------------------------------------------------------------------------------

def test_losses_match_torch():
    x, p, labels = randn(6, 5), randn(6, 5), rng.integers(0, 5, 6)
    probs = np.exp(p) / np.exp(p).sum(1, keepdims=True)
    t = torch.tensor
    for ours, theirs in [
        (F.cross_entropy(x, labels), torch.nn.functional.cross_entropy(t(x), t(labels))),
        (F.cross_entropy(x, labels, reduction="sum", label_smoothing=0.1),
         torch.nn.functional.cross_entropy(t(x), t(labels), reduction="sum", label_smoothing=0.1)),
        (F.cross_entropy(x, labels, reduction="none"), torch.nn.functional.cross_entropy(t(x), t(labels), reduction="none")),
        (F.cross_entropy(x, probs), torch.nn.functional.cross_entropy(t(x), t(probs))),
        (F.nll_loss(F.log_softmax(x, 1), labels), torch.nn.functional.nll_loss(torch.log_softmax(t(x), 1), t(labels))),
        (F.mse_loss(x, p), torch.nn.functional.mse_loss(t(x), t(p))),
        (F.l1_loss(x, p, reduction="sum"), torch.nn.functional.l1_loss(t(x), t(p), reduction="sum")),
        (F.binary_cross_entropy_with_logits(x, probs), torch.nn.functional.binary_cross_entropy_with_logits(t(x), t(probs))),
        (F.binary_cross_entropy(probs, (p > 0).astype(np.float32)),
         torch.nn.functional.binary_cross_entropy(t(probs), t((p > 0).astype(np.float32)))),
    ]:
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-6)


def test_cross_entropy_refuses_float_targets_that_are_not_probabilities():
    with pytest.raises(mlc.TracingError, match="class probabilities shaped like the input"):
        F.cross_entropy(randn(3, 2), np.ones(3, np.float32))


@pytest.mark.parametrize("mask", [None, "causal", "bool", "float"])
def test_scaled_dot_product_attention(mask):
    q, k, v = randn(2, 3, 4, 8), randn(2, 3, 6, 8), randn(2, 3, 6, 5)
    kwargs = {}
    if mask == "causal":
        k, v = k[:, :, :4], v[:, :, :4]
        kwargs = dict(is_causal=True)
    elif mask == "bool":
        kwargs = dict(attn_mask=rng.random((4, 6)) > 0.3)
        kwargs["attn_mask"][:, 0] = True
    elif mask == "float":
        kwargs = dict(attn_mask=randn(4, 6))
    tq, tk, tv = tensors([q, k, v])
    want = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, **{key: torch.tensor(a) if isinstance(a, np.ndarray) else a for key, a in kwargs.items()})
    np.testing.assert_allclose(F.scaled_dot_product_attention(q, k, v, **kwargs), want.detach().numpy(), rtol=1e-4, atol=1e-5)
    want.sum().backward()
    gq = mlc.grad(lambda q, k, v: mlc.sum(F.scaled_dot_product_attention(q, k, v, **kwargs)))(q, k, v)
    np.testing.assert_allclose(gq, tq.grad.numpy(), rtol=1e-4, atol=1e-5)


# --- optimisers ---------------------------------------------------------------------------------------

def small_cnn(lib):
    return lib.nn.Sequential(lib.nn.Conv2d(3, 8, 3, padding=1, bias=False), lib.nn.BatchNorm2d(8), lib.nn.ReLU(),
                             lib.nn.MaxPool2d(2), lib.nn.Flatten(), lib.nn.Linear(128, 10))


OPTIMIZERS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-3)),
    ("AdamW", dict(lr=1e-2)),
]


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS)
def test_compiled_train_steps_match_torch_optim(name, kwargs):
    tm, m = small_cnn(torch), small_cnn(mlc)
    m.load_state_dict(tm.state_dict())
    opt, topt = getattr(mlc.optim, name)(m.parameters(), **kwargs), getattr(torch.optim, name)(tm.parameters(), **kwargs)
    sched, tsched = mlc.optim.lr_scheduler.StepLR(opt, 2, 0.5), torch.optim.lr_scheduler.StepLR(topt, 2, 0.5)
    step = mlc.compile_train_step(m, F.cross_entropy, opt)
    for _ in range(4):
        x, y = randn(8, 3, 8, 8), rng.integers(0, 10, 8)
        loss = step(x, y)
        topt.zero_grad()
        want = torch.nn.functional.cross_entropy(tm(torch.tensor(x)), torch.tensor(y))
        want.backward()
        topt.step()
        sched.step()
        tsched.step()
        np.testing.assert_allclose(loss, want.item(), rtol=1e-5)
    for key, value in tm.state_dict().items():
        np.testing.assert_allclose(m.state_dict()[key], value.numpy(), rtol=1e-4, atol=1e-5, err_msg=key)
    state = opt.state.get(m.parameters()[0], {})
    for key, value in topt.state[next(tm.parameters())].items():
        if key != "step" and value is not None:
            np.testing.assert_allclose(state[key], value.numpy(), rtol=1e-4, atol=1e-6, err_msg=key)
    m.eval()
    tm.eval()
    x = randn(2, 3, 8, 8)
    np.testing.assert_allclose(m(x), tm(torch.tensor(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_schedulers_follow_torch():
    p, tp = nn.Linear(2, 2).parameters(), torch.nn.Linear(2, 2).parameters()
    opt, topt = mlc.optim.SGD(p, lr=0.3), torch.optim.SGD(tp, lr=0.3)
    s, ts = mlc.optim.lr_scheduler.CosineAnnealingLR(opt, 7, 0.01), torch.optim.lr_scheduler.CosineAnnealingLR(topt, 7, 0.01)
    for _ in range(10):
        assert s.get_last_lr()[0] == pytest.approx(ts.get_last_lr()[0], rel=1e-9)
        topt.step()
        s.step()
        ts.step()


def test_cpu_train_step_and_inference_share_the_weights():
    tm, m = small_cnn(torch), small_cnn(mlc)
    m.load_state_dict(tm.state_dict())
    opt, topt = mlc.optim.Adam(m.parameters(), lr=1e-2), torch.optim.Adam(tm.parameters(), lr=1e-2)
    step = mlc.compile_train_step(m, F.cross_entropy, opt, backend="cpu")
    for batch in (8, 5):  # the batch dimension is dynamic: one compilation
        x, y = randn(batch, 3, 8, 8), rng.integers(0, 10, batch)
        topt.zero_grad()
        want = torch.nn.functional.cross_entropy(tm(torch.tensor(x)), torch.tensor(y))
        want.backward()
        topt.step()
        np.testing.assert_allclose(step(x, y), want.item(), rtol=1e-5)
    assert len(step.programs) == 1
    for key, value in tm.state_dict().items():
        np.testing.assert_allclose(m.state_dict()[key], value.numpy(), rtol=1e-4, atol=1e-5, err_msg=key)
    mlc.default_backend("cpu")
    m.eval()
    tm.eval()
    x = randn(4, 3, 8, 8)
    np.testing.assert_allclose(m(x), tm(torch.tensor(x)).detach().numpy(), rtol=1e-4, atol=1e-5)
    m.load_state_dict({k: np.zeros_like(v) for k, v in m.state_dict().items()})  # seen by the next step:
    np.testing.assert_allclose(step(x, np.zeros(4, np.int64)), np.log(10), rtol=1e-6)  # uniform logits


def test_a_frozen_weight_written_in_place_between_steps_is_seen():
    """A weight outside the optimiser is read-only in the step, but bound to an array Python writes
    in place (load_state_dict): the step must read it afresh, not a copy packed at compile time."""
    frozen, head = nn.Linear(16, 24), nn.Linear(24, 3)
    model = nn.Sequential(frozen, nn.ReLU(), head)
    step = mlc.compile_train_step(model, F.mse_loss, mlc.optim.SGD(head.parameters(), lr=0.0), backend="cpu")
    x, y = randn(32, 16), randn(32, 3)
    for scale in (1.0, -2.0):
        frozen.weight.data[...] *= scale
        want = np.mean((np.maximum(x @ frozen.weight.data.T + frozen.bias.data, 0) @ head.weight.data.T + head.bias.data - y) ** 2)
        np.testing.assert_allclose(step(x, y), want, rtol=1e-5)
