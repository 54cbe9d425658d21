"""RNN, LSTM and GRU with PyTorch's parameters, gate order and outputs, each layer and direction one
`mlc.scan`: the input projections of the whole sequence are one matrix product before the scan, the
step does the recurrent product and the gates."""
from __future__ import annotations

import math

from .. import ops
from ..tensor import Parameter
from . import functional as F
from . import init
from .module import Module


class _RNNBase(Module):
    gates = 1

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout, self.bidirectional = bias, batch_first, dropout, bidirectional
        directions = 2 if bidirectional else 1
        bound = 1 / math.sqrt(hidden_size)
        for layer in range(num_layers):
            for suffix in ("", "_reverse")[:directions]:
                width = input_size if layer == 0 else hidden_size * directions
                g = self.gates * hidden_size
                setattr(self, f"weight_ih_l{layer}{suffix}", Parameter(init.uniform((g, width), -bound, bound)))
                setattr(self, f"weight_hh_l{layer}{suffix}", Parameter(init.uniform((g, hidden_size), -bound, bound)))
                if bias:
                    setattr(self, f"bias_ih_l{layer}{suffix}", Parameter(init.uniform((g,), -bound, bound)))
                    setattr(self, f"bias_hh_l{layer}{suffix}", Parameter(init.uniform((g,), -bound, bound)))

    def _weights(self, layer, suffix):
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        return [getattr(self, f"{n}_l{layer}{suffix}", None) for n in names]

    def forward(self, input, hx=None):
        x = ops.as_tensor(input)
        batched = x.ndim == 3
        if not batched:
            x = ops.expand_dims(x, 1)
        elif self.batch_first:
            x = ops.swapaxes(x, 0, 1)
        directions = 2 if self.bidirectional else 1
        states = self._initial_states(hx, x, directions, batched)
        finals = []
        for layer in range(self.num_layers):
            outputs = []
            for d, suffix in enumerate(("", "_reverse")[:directions]):
                state = [s[layer * directions + d] for s in states]
                w_ih, w_hh, b_ih, b_hh = self._weights(layer, suffix)
                projected = F.linear(x, w_ih, b_ih)  # the whole sequence at once
                # the recurrent weight transposed once, outside the scan: the step's product then reads
                # rows of it, which it packs with vector copies
                w_t = ops.transpose(w_hh)
                last, ys = ops.scan(lambda s, p: self._step(s, p, w_t, b_hh), tuple(state), projected, reverse=d == 1)
                outputs.append(ys)
                finals.append(last)
            x = ops.concatenate(outputs, axis=-1) if directions == 2 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout)
        output = x if not self.batch_first or not batched else ops.swapaxes(x, 0, 1)
        final = [ops.stack([f[i] for f in finals]) for i in range(len(states))]
        if not batched:
            output, final = ops.squeeze(output, 1), [ops.squeeze(f, 1) for f in final]
        return output, self._pack(final)

    def _initial_states(self, hx, x, directions, batched):
        if hx is None:  # zeros of shape (layers x directions, batch, hidden); the batch may be `?`
            zeros = ops.zeros_like(x[0, :, :1]) + ops.zeros((self.num_layers * directions, 1, self.hidden_size))
            return [zeros] * self.state_count
        hs = list(hx) if isinstance(hx, (tuple, list)) else [hx]
        return [ops.as_tensor(h) if batched else ops.expand_dims(h, 1) for h in hs]

    state_count = 1

    def _pack(self, final):
        return final[0]

    def extra_repr(self):
        return f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"


def _recurrent(h, w_t, b_hh):
    """h @ W_hh^T + b_hh, with W_hh^T given."""
    z = ops.matmul(h, w_t)
    return z if b_hh is None else z + b_hh


class RNN(_RNNBase):
    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"unknown nonlinearity '{nonlinearity}' (tanh or relu)")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional)
        self.nonlinearity = nonlinearity

    def _step(self, state, projected, w_t, b_hh):
        (h,) = state
        z = projected + _recurrent(h, w_t, b_hh)
        h = ops.tanh(z) if self.nonlinearity == "tanh" else ops.relu(z)
        return (h,), h


class LSTM(_RNNBase):
    gates = 4
    state_count = 2

    def _step(self, state, projected, w_t, b_hh):
        h, c = state
        i, f, g, o = ops.split(projected + _recurrent(h, w_t, b_hh), 4, axis=-1)
        c = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
        h = ops.sigmoid(o) * ops.tanh(c)
        return (h, c), h

    def _pack(self, final):
        return tuple(final)


class GRU(_RNNBase):
    gates = 3

    def _step(self, state, projected, w_t, b_hh):
        (h,) = state
        xr, xz, xn = ops.split(projected, 3, axis=-1)
        hr, hz, hn = ops.split(_recurrent(h, w_t, b_hh), 3, axis=-1)
        r, z = ops.sigmoid(xr + hr), ops.sigmoid(xz + hz)
        n = ops.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        return (h,), h
