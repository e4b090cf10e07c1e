"""A seeded bijection of [0, n) computed element by element: shuffles with no array of n.

A balanced Feistel network on the smallest even number of bits that covers n is a
permutation of [0, 2^bits); values that land at or past n are sent through it again
(cycle walking) until they fall inside, which keeps it a permutation of [0, n). 2^bits is
less than 4n, so a value takes under four rounds of walking on average. Four Feistel
rounds with a 64-bit mixing function (splitmix64's finaliser) shuffle well enough for
training order; this is not cryptography.

Megatron builds its shuffle index once and memory-maps it; this needs no file at all, and
costs about a microsecond per sequence drawn, computed on the host for each batch.
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """``p[i]`` for index arrays ``i``: a bijection of [0, n) fixed by ``key``."""

    def __init__(self, n: int, key: np.ndarray | list[int]) -> None:
        if n < 1:
            raise ValueError("a permutation needs n >= 1")
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        bits += bits % 2
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        seeds = np.random.default_rng(key).integers(0, 2**63, size=_ROUNDS, dtype=np.int64)
        self.keys = [np.uint64(int(k) * int(_GOLDEN) % 2**64) for k in seeds]

    def _once(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            x = self._once(np.asarray(index, dtype=np.uint64))
            outside = x >= self.n
            while outside.any():
                x[outside] = self._once(x[outside])
                outside = x >= self.n
        return x.astype(np.int64)
