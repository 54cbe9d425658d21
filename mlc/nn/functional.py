"""torch.nn.functional under its names and signatures, recorded as mlc ops (images NCHW, weights as
PyTorch lays them out). Called outside a trace on numpy arrays, each runs on the interpreter."""
from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..ops import as_tensor, emit, log_softmax, relu, sigmoid, softmax, tanh, traceable  # noqa: F401
from ..tensor import Buffer
from ..trace_stack import current_trace, tracing_error

gelu = traceable(lambda input, approximate="none": ops.gelu(input, approximate))
gelu.__name__ = "gelu"


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _padding4(padding, kernel, dilation):
    """torch's padding argument (int, (h, w), "valid", "same") as mlc's [top, left, bottom, right]."""
    if padding == "valid":
        return [0, 0, 0, 0]
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2]
    ph, pw = _pair(padding)
    return [ph, pw, ph, pw]


def _bias(y, bias):
    return y if bias is None else y + ops.reshape(bias, (1, -1, 1, 1))


@traceable
def linear(input, weight, bias=None):
    y = ops.matmul(input, ops.transpose(weight))
    return y if bias is None else y + bias


@traceable
def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    kernel = as_tensor(weight).shape[2:]
    if padding == "same" and _pair(stride) != (1, 1):
        raise tracing_error("padding='same' needs stride 1 (as in torch)")
    y = emit("mlc.conv2d", input, weight, stride=list(_pair(stride)), padding=_padding4(padding, kernel, _pair(dilation)),
             dilation=list(_pair(dilation)), groups=groups)
    return _bias(y, bias)


@traceable
def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    ph, pw = _pair(padding)
    y = emit("mlc.conv2d_transpose", input, weight, stride=list(_pair(stride)), padding=[ph, pw, ph, pw],
             output_padding=list(_pair(output_padding)), dilation=list(_pair(dilation)), groups=groups)
    return _bias(y, bias)


def _pool_args(kernel_size, stride, padding, ceil_mode):
    if ceil_mode:
        raise tracing_error("ceil_mode=True is not supported")
    k = _pair(kernel_size)
    ph, pw = _pair(padding)
    return dict(kernel=list(k), stride=list(_pair(stride if stride else k)), padding=[ph, pw, ph, pw])


@traceable
def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    if _pair(dilation) != (1, 1):
        raise tracing_error("max_pool2d: dilation is not supported")
    return emit("mlc.max_pool2d", input, **_pool_args(kernel_size, stride, padding, ceil_mode))


@traceable
def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    return emit("mlc.avg_pool2d", input, count_include_pad=count_include_pad, **_pool_args(kernel_size, stride, padding, ceil_mode))


@traceable
def adaptive_avg_pool2d(input, output_size):
    x = as_tensor(input)
    oh, ow = _pair(output_size)
    h, w = x.shape[2:]
    if (oh, ow) == (1, 1):
        return ops.mean(x, axis=(2, 3), keepdims=True)
    if h is None or w is None or h % oh or w % ow:
        raise tracing_error(f"adaptive_avg_pool2d: output size {(oh, ow)} must divide the input size {(h, w)}")
    return avg_pool2d(x, (h // oh, w // ow))


@traceable
def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """As torch: in training, normalise by the batch's statistics and move running_mean/var (when they
    are buffers, their new values are stored); otherwise use the running statistics."""
    x = as_tensor(input)
    c = x.shape[1]
    one, zero = np.ones(c, x.dtype), np.zeros(c, x.dtype)
    stats = (running_mean if running_mean is not None else zero, running_var if running_var is not None else one)
    op = current_trace().emit("mlc.batch_norm", [x, one if weight is None else weight, zero if bias is None else bias,
                                                 *stats, np.array(bool(training))],
                              eps=float(eps), momentum=float(momentum if momentum is not None else 0.1))
    y, new_mean, new_var = (ops.Tensor(r, current_trace()) for r in op.results)
    if training:
        for var, new in ((running_mean, new_mean), (running_var, new_var)):
            if isinstance(var, Buffer):
                var.assign(new)
    return y


@traceable
def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    x = as_tensor(input)
    axes = tuple(range(x.ndim - len(_tuple(normalized_shape)), x.ndim))
    mean = ops.mean(x, axes, keepdims=True)
    centred = x - mean
    y = centred * ops.rsqrt(ops.mean(ops.square(centred), axes, keepdims=True) + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def _tuple(v):
    return (v,) if isinstance(v, int) else tuple(v)


# --- randomness ----------------------------------------------------------------------------------------

generator = Buffer(np.array([0, 0], np.int64), name="rng")  # (seed, counter): torch's default generator


def manual_seed(seed: int) -> None:
    """Seed parameter initialisation and dropout (torch.manual_seed)."""
    from . import init
    init.seed(seed)
    generator.data[...] = (seed, 0)


def next_key():
    """A fresh key (seed, counter) for a random op; the generator's counter moves on by one."""
    key = as_tensor(generator)
    generator.assign(key + np.array([0, 1], np.int64))
    return key


@traceable
def dropout(input, p=0.5, training=True):
    if not 0 <= p <= 1:
        raise tracing_error(f"dropout probability has to be between 0 and 1, got {p}")
    if not training or p == 0:
        return as_tensor(input)
    return emit("mlc.dropout", input, next_key(), np.array(True), p=float(p))


# --- embedding and attention -------------------------------------------------------------------------

@traceable
def embedding(input, weight, padding_idx=None):
    rows = emit("mlc.gather", weight, as_tensor(input), axis=0)
    if padding_idx is None:
        return rows
    # torch keeps the padding row out of the gradient: its rows enter as constants.
    pad = ops.expand_dims(as_tensor(input) == padding_idx, -1)
    return ops.where(pad, ops.stop_gradient(rows), rows)


@traceable
def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    q = as_tensor(query)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = ops.matmul(q, ops.swapaxes(key, -1, -2)) * scale
    if is_causal:
        length, source = scores.shape[-2:]
        scores = ops.where(np.tril(np.ones((length, source), bool)), scores, -np.inf)
    if attn_mask is not None:
        mask = as_tensor(attn_mask)
        scores = ops.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + mask
    weights = softmax(scores, -1)
    if dropout_p > 0:
        weights = dropout(weights, dropout_p)
    return ops.matmul(weights, value)


# --- activations ---------------------------------------------------------------------------------------

@traceable
def leaky_relu(input, negative_slope=0.01):
    x = as_tensor(input)
    return ops.where(x >= 0, x, x * negative_slope)


@traceable
def silu(input):
    return input * sigmoid(input)


@traceable
def softplus(input):
    x = as_tensor(input)
    return ops.maximum(x, 0) + ops.log1p(ops.exp(-ops.abs(x)))


@traceable
def one_hot(tensor, num_classes):
    t = as_tensor(tensor)
    return ops.astype(ops.expand_dims(t, -1) == np.arange(num_classes), np.int64)


@traceable
def pad(input, pad, value=0.0):
    """torch's pad: (left, right) pairs from the last dimension backwards."""
    x = as_tensor(input)
    widths = [(0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        widths[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    return ops.pad(x, widths, value)


# --- losses ------------------------------------------------------------------------------------------

def _reduce(loss, reduction):
    if reduction == "mean":
        return ops.mean(loss)
    if reduction == "sum":
        return ops.sum(loss)
    if reduction == "none":
        return loss
    raise tracing_error(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


@traceable
def cross_entropy(input, target, reduction="mean", label_smoothing=0.0):
    """Logits [N, C, ...] against class indices [N, ...] or class probabilities [N, C, ...]."""
    x, t = as_tensor(input), as_tensor(target)
    if t.type.element.is_int and reduction == "mean" and not label_smoothing:
        return emit("mlc.cross_entropy", x, t)
    logp = log_softmax(x, 1)
    if t.type.element.is_int:
        classes = np.arange(x.shape[1]).reshape((-1,) + (1,) * (x.ndim - 2))
        t = ops.astype(ops.expand_dims(t, 1) == classes, x.dtype)
    elif t.shape != x.shape:
        raise tracing_error(f"cross_entropy: a floating-point target holds class probabilities shaped like the "
                            f"input {x.shape}, got {t.shape} (class indices must be integers)")
    if label_smoothing:
        t = t * (1 - label_smoothing) + label_smoothing / x.shape[1]
    return _reduce(-ops.sum(t * logp, 1), reduction)


@traceable
def nll_loss(input, target, reduction="mean"):
    x = as_tensor(input)
    classes = np.arange(x.shape[1]).reshape((-1,) + (1,) * (x.ndim - 2))
    picked = ops.sum(x * ops.astype(ops.expand_dims(target, 1) == classes, x.dtype), 1)
    return _reduce(-picked, reduction)


@traceable
def mse_loss(input, target, reduction="mean"):
    return _reduce(ops.square(input - target), reduction)


@traceable
def l1_loss(input, target, reduction="mean"):
    return _reduce(ops.abs(input - target), reduction)


@traceable
def binary_cross_entropy_with_logits(input, target, reduction="mean"):
    x = as_tensor(input)
    return _reduce(ops.maximum(x, 0) - x * target + ops.log1p(ops.exp(-ops.abs(x))), reduction)


@traceable
def binary_cross_entropy(input, target, reduction="mean"):
    """torch clamps each log at -100."""
    x = as_tensor(input)
    loss = -(target * ops.maximum(ops.log(x), -100.0) + (1 - target) * ops.maximum(ops.log(1 - x), -100.0))
    return _reduce(loss, reduction)
