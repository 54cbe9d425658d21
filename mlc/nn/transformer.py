"""Attention and the Transformer: torch.nn.MultiheadAttention, TransformerEncoderLayer,
TransformerDecoderLayer, TransformerEncoder/Decoder and Transformer with PyTorch's parameters, masks
(bool masks: True means "may not attend", as torch's), dropout placement and initialisation; and
the sinusoidal PositionalEncoding of "Attention is all you need"."""
from __future__ import annotations

import copy
import math

import numpy as np

from .. import ops
from ..tensor import Buffer, Parameter
from . import functional as F
from . import init
from .layers import Dropout, LayerNorm, Linear
from .module import Module, ModuleList


def _additive(mask, like):
    """A torch attention mask as something to add to the scores: bool True -> -inf, floats as they are."""
    m = ops.as_tensor(mask)
    if m.dtype == np.bool_:
        return ops.where(m, -np.inf, ops.zeros((), like.dtype))
    return m


class MultiheadAttention(Module):
    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, batch_first=False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.in_proj_weight = Parameter(init.xavier_uniform((3 * embed_dim, embed_dim)))
        self.in_proj_bias = Parameter(np.zeros(3 * embed_dim, np.float32)) if bias else None
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias)
        if bias:
            init.zeros_(self.out_proj.bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        q, k, v = (ops.as_tensor(t) for t in (query, key, value))
        if not self.batch_first:  # (L, N, E) -> (N, L, E)
            q, k, v = (ops.swapaxes(t, 0, 1) for t in (q, k, v))
        w_q, w_k, w_v = ops.split(ops.as_tensor(self.in_proj_weight), 3)
        b_q, b_k, b_v = ops.split(ops.as_tensor(self.in_proj_bias), 3) if self.in_proj_bias is not None else (None,) * 3
        heads = [self._heads(F.linear(t, w, b)) for t, w, b in ((q, w_q, b_q), (k, w_k, b_k), (v, w_v, b_v))]
        q, k, v = heads
        scores = ops.matmul(q, ops.swapaxes(k, -1, -2)) * (1 / math.sqrt(q.shape[-1]))  # (N, H, L, S)
        if attn_mask is None and is_causal:
            length, source = scores.shape[-2:]
            attn_mask = ~np.tril(np.ones((length, source), bool))
        if attn_mask is not None:
            mask = ops.as_tensor(attn_mask)
            if mask.ndim == 3:  # (N * H, L, S)
                mask = ops.reshape(mask, (-1, self.num_heads) + mask.shape[1:])
            scores = scores + _additive(mask, scores)
        if key_padding_mask is not None:  # (N, S)
            scores = scores + _additive(ops.expand_dims(key_padding_mask, (1, 2)), scores)
        weights = F.softmax(scores, -1)
        if self.dropout and self.training:
            weights = F.dropout(weights, self.dropout)
        out = ops.matmul(weights, v)  # (N, H, L, D)
        n, _, length, _ = out.shape
        out = self.out_proj(ops.reshape(ops.swapaxes(out, 1, 2), (n, length, self.embed_dim)))
        if not self.batch_first:
            out = ops.swapaxes(out, 0, 1)
        if not need_weights:
            return out, None
        return out, (ops.mean(weights, axis=1) if average_attn_weights else weights)

    def _heads(self, t):
        n, length, _ = t.shape
        return ops.swapaxes(ops.reshape(t, (n, length, self.num_heads, self.embed_dim // self.num_heads)), 1, 2)


def _activation(activation):
    if callable(activation):
        return activation
    try:
        return {"relu": ops.relu, "gelu": F.gelu}[activation]
    except KeyError:
        raise ValueError(f"activation should be relu or gelu, not {activation}") from None


def _feed_forward_and_norms(layer, sublayers, d_model, dim_feedforward, dropout, activation, eps, norm_first, bias):
    """The parts both layers have after their attention, in torch's order (so state_dict keys match):
    linear1, dropout, linear2, then a norm and a dropout per sublayer."""
    layer.linear1 = Linear(d_model, dim_feedforward, bias)
    layer.dropout = Dropout(dropout)
    layer.linear2 = Linear(dim_feedforward, d_model, bias)
    layer.norm_first = norm_first
    for i in range(1, sublayers + 1):
        setattr(layer, f"norm{i}", LayerNorm(d_model, eps, bias=bias))
    for i in range(1, sublayers + 1):
        setattr(layer, f"dropout{i}", Dropout(dropout))
    layer.activation = _activation(activation)


class TransformerEncoderLayer(Module):
    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu", layer_norm_eps=1e-5,
                 batch_first=False, norm_first=False, bias=True):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout, bias, batch_first)
        _feed_forward_and_norms(self, 2, d_model, dim_feedforward, dropout, activation, layer_norm_eps, norm_first, bias)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = ops.as_tensor(src)
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))

    def _sa_block(self, x, mask, padding, is_causal):
        return self.dropout1(self.self_attn(x, x, x, padding, False, mask, is_causal=is_causal)[0])

    def _ff_block(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class TransformerDecoderLayer(Module):
    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu", layer_norm_eps=1e-5,
                 batch_first=False, norm_first=False, bias=True):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout, bias, batch_first)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout, bias, batch_first)
        _feed_forward_and_norms(self, 3, d_model, dim_feedforward, dropout, activation, layer_norm_eps, norm_first, bias)

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
        x = ops.as_tensor(tgt)
        sa = lambda y: self.dropout1(self.self_attn(y, y, y, tgt_key_padding_mask, False, tgt_mask, is_causal=tgt_is_causal)[0])  # noqa: E731
        mha = lambda y: self.dropout2(self.multihead_attn(y, memory, memory, memory_key_padding_mask, False, memory_mask,  # noqa: E731
                                                          is_causal=memory_is_causal)[0])
        ff = lambda y: self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(y)))))  # noqa: E731
        if self.norm_first:
            x = x + sa(self.norm1(x))
            x = x + mha(self.norm2(x))
            return x + ff(self.norm3(x))
        x = self.norm1(x + sa(x))
        x = self.norm2(x + mha(x))
        return self.norm3(x + ff(x))


class TransformerEncoder(Module):
    def __init__(self, encoder_layer, num_layers, norm=None):
        super().__init__()
        self.layers = ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers, self.norm = num_layers, norm

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        for layer in self.layers:
            x = layer(x, mask, src_key_padding_mask, is_causal)
        return x if self.norm is None else self.norm(x)


class TransformerDecoder(Module):
    def __init__(self, decoder_layer, num_layers, norm=None):
        super().__init__()
        self.layers = ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.num_layers, self.norm = num_layers, norm

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
        x = tgt
        for layer in self.layers:
            x = layer(x, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask, tgt_is_causal,
                      memory_is_causal)
        return x if self.norm is None else self.norm(x)


class Transformer(Module):
    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
                 dropout=0.1, activation="relu", layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True):
        super().__init__()
        args = (d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first, norm_first, bias)
        self.encoder = TransformerEncoder(TransformerEncoderLayer(*args), num_encoder_layers, LayerNorm(d_model, layer_norm_eps, bias=bias))
        self.decoder = TransformerDecoder(TransformerDecoderLayer(*args), num_decoder_layers, LayerNorm(d_model, layer_norm_eps, bias=bias))
        self.d_model, self.nhead, self.batch_first = d_model, nhead, batch_first
        for p in self.parameters():
            if p.ndim > 1:
                init.xavier_uniform_(p)

    def forward(self, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
                tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=False, tgt_is_causal=False,
                memory_is_causal=False):
        memory = self.encoder(src, src_mask, src_key_padding_mask, src_is_causal)
        return self.decoder(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                            tgt_is_causal, memory_is_causal)

    @staticmethod
    def generate_square_subsequent_mask(sz: int) -> np.ndarray:
        """The float causal mask: -inf above the diagonal, 0 elsewhere."""
        return np.triu(np.full((sz, sz), -np.inf, np.float32), 1)


class PositionalEncoding(Module):
    """x + the sinusoidal encoding of each position (sin on even features, cos on odd), then dropout.
    Input (L, N, E), or (N, L, E) with batch_first."""

    def __init__(self, d_model, max_len=5000, dropout=0.0, batch_first=False):
        super().__init__()
        position = np.arange(max_len, dtype=np.float64)[:, None]
        rates = np.exp(np.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = np.zeros((max_len, d_model), np.float32)
        pe[:, 0::2] = np.sin(position * rates)
        pe[:, 1::2] = np.cos(position * rates[: d_model // 2])
        self.register_buffer("pe", Buffer(pe), persistent=False)
        self.dropout, self.batch_first = Dropout(dropout), batch_first

    def forward(self, x):
        x = ops.as_tensor(x)
        length = x.shape[1] if self.batch_first else x.shape[0]
        pe = ops.as_tensor(self.pe)[:length]
        return self.dropout(x + (pe if self.batch_first else ops.expand_dims(pe, 1)))
