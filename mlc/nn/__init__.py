"""mlc.nn: PyTorch's modules and functional API, traced into mlc IR (SPEC §6)."""
from ..tensor import Buffer, Parameter  # noqa: F401
from . import functional, init  # noqa: F401
from .layers import (AdaptiveAvgPool2d, AvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, ConvTranspose2d, Dropout,  # noqa: F401
                     Embedding, Flatten, GELU, Identity, LayerNorm, LeakyReLU, Linear, MaxPool2d, ReLU, Sigmoid, SiLU,
                     Softmax, Tanh)
from .recurrent import GRU, LSTM, RNN  # noqa: F401
from .transformer import (MultiheadAttention, PositionalEncoding, Transformer, TransformerDecoder,  # noqa: F401
                          TransformerDecoderLayer, TransformerEncoder, TransformerEncoderLayer)
from .module import Module, ModuleDict, ModuleList, Sequential, functional_call  # noqa: F401
