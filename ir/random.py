"""Counter-based random numbers: Philox-4x32-10 (Salmon et al., SC'11), the definition every
backend reproduces bit for bit.

Element i (row-major) of a random tensor drawn with key (seed, offset) takes lane i % 4 of
    philox4x32_10(counter = (b & 0xffffffff, b >> 32, offset & 0xffffffff, offset >> 32),
                  key     = (seed & 0xffffffff, seed >> 32)),    b = i // 4.
uniform: u = (word >> 8) * 2**-24 in [0, 1), scaled to [low, high).
normal:  Box-Muller on lanes (0, 1) and (2, 3) of the same block: u1 = ((w0 >> 8) + 1) * 2**-24 in
         (0, 1], u2 = (w1 >> 8) * 2**-24; lane 0 (and 2) get r*cos(2*pi*u2), lane 1 (and 3) r*sin(2*pi*u2),
         r = sqrt(-2 ln u1); then mean + std * z.
"""
from __future__ import annotations

import zlib

import numpy as np

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Vectorised Philox-4x32: counters are uint32 arrays, keys uint32 scalars; returns 4 arrays."""
    k0, k1 = np.uint32(k0), np.uint32(k1)
    with np.errstate(over="ignore"):
        return _rounds(c0, c1, c2, c3, k0, k1, rounds)


def _rounds(c0, c1, c2, c3, k0, k1, rounds):
    for r in range(rounds):
        p0 = M0 * c0.astype(np.uint64)
        p1 = M1 * c2.astype(np.uint64)
        hi0, lo0 = (p0 >> np.uint64(32)).astype(np.uint32), (p0 & MASK32).astype(np.uint32)
        hi1, lo1 = (p1 >> np.uint64(32)).astype(np.uint32), (p1 & MASK32).astype(np.uint32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r < rounds - 1:
            k0, k1 = k0 + W0, k1 + W1
    return c0, c1, c2, c3


def random_bits(n: int, seed: int, offset: int, start: int = 0) -> np.ndarray:
    """n uint32 words for flat element indices start..start+n-1 (start a multiple of 4)."""
    blocks = (n + 3) // 4
    b = np.arange(start // 4, start // 4 + blocks, dtype=np.uint64)
    c0 = (b & MASK32).astype(np.uint32)
    c1 = (b >> np.uint64(32)).astype(np.uint32)
    seed, offset = int(seed) & (2**64 - 1), int(offset) & (2**64 - 1)
    c2 = np.full(blocks, offset & 0xFFFFFFFF, np.uint32)
    c3 = np.full(blocks, offset >> 32, np.uint32)
    words = philox4x32(c0, c1, c2, c3, seed & 0xFFFFFFFF, seed >> 32)
    return np.stack(words, axis=1).reshape(-1)[:n]


CHUNK = 1 << 20  # elements drawn at a time: a large tensor takes no more than its own memory


def _drawn(shape, dtype, draw) -> np.ndarray:
    """An array of `shape` filled chunk by chunk: draw(start, count) gives flat elements start.. in f64."""
    n = int(np.prod(shape, dtype=np.int64))
    out = np.empty(n, dtype)
    for start in range(0, n, CHUNK):
        out[start:start + CHUNK] = draw(start, min(CHUNK, n - start))
    return out.reshape(shape)


def uniform(shape, seed: int, offset: int, low=0.0, high=1.0, dtype=np.float32) -> np.ndarray:
    def draw(start, count):
        u = (random_bits(count, seed, offset, start) >> np.uint32(8)).astype(np.float64) * 2.0**-24
        return low + (high - low) * u
    return _drawn(shape, dtype, draw)


def normal(shape, seed: int, offset: int, mean=0.0, std=1.0, dtype=np.float32) -> np.ndarray:
    def draw(start, count):  # (start is a multiple of 4: whole Philox blocks)
        words = random_bits((count + 3) // 4 * 4, seed, offset, start).reshape(-1, 2, 2)  # (block, pair, lane)
        u1 = ((words[:, :, 0] >> np.uint32(8)).astype(np.float64) + 1.0) * 2.0**-24
        u2 = (words[:, :, 1] >> np.uint32(8)).astype(np.float64) * 2.0**-24
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.stack([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)], axis=-1).reshape(-1)[:count]
        return mean + std * z
    return _drawn(shape, dtype, draw)


def name_offset(name: str) -> int:
    """A stable per-global stream, so adding a global does not change the others' initial values."""
    return zlib.crc32(name.encode()) << 32
