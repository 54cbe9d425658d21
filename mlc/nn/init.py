"""Parameter initialisation with PyTorch's distributions (torch.nn.init), drawn from mlc's own
generator: `mlc.manual_seed(s)` makes model construction reproducible. The numbers differ from
torch's (a different generator); copy weights with load_state_dict to match a torch model exactly."""
from __future__ import annotations

import math

import numpy as np

_generator = [np.random.default_rng(0)]


def seed(value: int) -> None:
    _generator[0] = np.random.default_rng(value)


def _fans(shape) -> tuple[int, int]:
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    fan_in = shape[1] * receptive if len(shape) > 1 else shape[0]
    fan_out = shape[0] * receptive
    return fan_in, fan_out


def uniform(shape, low: float, high: float) -> np.ndarray:
    return _generator[0].uniform(low, high, shape).astype(np.float32)


def normal(shape, mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    return (mean + std * _generator[0].standard_normal(shape)).astype(np.float32)


def kaiming_uniform(shape, a: float = math.sqrt(5)) -> np.ndarray:
    """torch's default for Linear and Conv weights: U(-b, b), b = sqrt(6 / ((1 + a^2) fan_in))."""
    fan_in, _ = _fans(shape)
    bound = math.sqrt(6.0 / ((1 + a * a) * fan_in)) if fan_in else 0.0
    return uniform(shape, -bound, bound)


def fan_in_uniform(shape, fan_in: int) -> np.ndarray:
    """torch's default for biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return uniform(shape, -bound, bound)


def xavier_uniform(shape, gain: float = 1.0) -> np.ndarray:
    fan_in, fan_out = _fans(shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform(shape, -bound, bound)


def xavier_uniform_(param, gain: float = 1.0):
    param.data[...] = xavier_uniform(param.shape, gain)
    return param


def normal_(param, mean: float = 0.0, std: float = 1.0):
    param.data[...] = normal(param.shape, mean, std)
    return param


def zeros_(param):
    param.data[...] = 0
    return param


def ones_(param):
    param.data[...] = 1
    return param
