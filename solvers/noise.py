"""Counter-based Gaussian noise: each number is a pure function of (seed, sample index, draw, element).

A sample's noise therefore depends on its own global index and not on the batch it is drawn in:
``sample(shape=(16, ...), seed=s)`` equals the first 16 rows of ``sample(shape=(64, ...), seed=s)``,
and a run split across processes (each with its own ``index_offset``) reproduces a single-process
run exactly. The generator is a 32-bit integer hash (Wellons' lowbias32 finaliser) evaluated with
int64 tensor arithmetic on the data's device, followed by the Box–Muller transform. No host
round-trip and no global RNG state are involved.
"""
from __future__ import annotations

import math

import torch

from core_lib import UserError

Tensor = torch.Tensor

__all__ = ["NoiseSource"]

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2³² for 0 ≤ x < 2³², split in 16-bit halves so int64 never overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: Tensor) -> Tensor:
    """lowbias32: a bijective 32-bit mixing function with near-ideal avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _hash_int(v: int) -> int:
    return int(_hash32(torch.tensor(v & _M32, dtype=torch.int64)))


class NoiseSource:
    """Standard normal noise indexed by (seed, global sample index, draw number, element).

    Every call to :meth:`normal` is one numbered draw; a sampler that makes the same sequence of
    calls gets the same numbers. Rows are samples: row b of a batch is sample ``index_offset + b``.
    """

    def __init__(self, seed: int, index_offset: int = 0):
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise UserError(f"seed must be a non-negative integer, got {seed!r}; set seed=0 (or any integer >= 0).")
        self.seed = seed
        self.index_offset = int(index_offset)
        self.draws = 0
        self._seed_key = _hash_int(_hash_int(seed & _M32) ^ (seed >> 32))

    def skip(self) -> None:
        """Advance past one draw without computing it."""
        self.draws += 1

    def normal(self, shape, dtype=torch.float32, device=None) -> Tensor:
        """The next draw: a tensor of the given shape (B, ...) of independent N(0, 1) numbers."""
        shape = tuple(shape)
        draw_key = _hash_int(self._seed_key ^ _hash_int(0x5BD1E995 + self.draws))
        self.draws += 1
        rows = torch.arange(shape[0], dtype=torch.int64, device=device) + self.index_offset
        row_key = _hash32((rows & _M32) ^ draw_key)                       # (B,)
        d = math.prod(shape[1:])
        cols = torch.arange(d, dtype=torch.int64, device=device)
        h1 = _hash32(row_key[:, None] ^ _hash32(2 * cols)[None, :])       # (B, D)
        h2 = _hash32(row_key[:, None] ^ _hash32(2 * cols + 1)[None, :])
        work = torch.float64 if dtype == torch.float64 else torch.float32
        if work == torch.float64:
            u1 = (h1.to(work) + 1) * 2.0**-32                             # (0, 1]
            u2 = h2.to(work) * 2.0**-32
        else:                                                             # 24 bits: exact in float32
            u1 = ((h1 >> 8).to(work) + 1) * 2.0**-24
            u2 = (h2 >> 8).to(work) * 2.0**-24
        z = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
        return z.reshape(shape).to(dtype)
