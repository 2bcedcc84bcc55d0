"""Uniform dequantisation of discrete data, in the convention of ``solvers.bits_per_dim`` (docs/math.md §6)."""
from __future__ import annotations

import torch

from data_lib.dataset import DataError, check_data_range, check_levels

Tensor = torch.Tensor

__all__ = ["dequantize"]

# Data may sit this far from a level, as a fraction of the level spacing, and still count as on it:
# float32 rounding of lo + k·w/(K−1) is far smaller even for 16-bit data.
_GRID_TOLERANCE = 0.01


def dequantize(x: Tensor, levels: int, data_range: tuple[float, float],
               generator: torch.Generator | None = None) -> Tensor:
    """Spread discrete data uniformly over K bins of width w/K that tile the data range.

    With K = ``levels``, (lo, hi) = ``data_range`` and w = hi − lo, the data take the values
    x = lo + k·w/(K−1), k ∈ {0, …, K−1} (as ``load_dataset("digits")`` scales them). Level k is
    mapped to a uniform point of the k-th bin::

        y = lo + (k + u)·w/K,    u ~ U[0, 1) per element,

    the usual (x·(K−1) + u)/K for 8-bit images in [0, 1]. The K bins are disjoint, tile [lo, hi]
    and each has width w/K, so a density p of y defines the discrete model P(k) = ∫_bin(k) p, and
    by Jensen −log P(k) ≤ E_u[−log p(y)] − D·log(w/K) (equality when p is flat on each bin). Per
    dimension in bits that is

        bpd = −log p(y)/(D ln 2) + log₂(K/w),

    what ``solvers.bits_per_dim(logp, D, levels=K, data_range=(lo, hi))`` computes. A uniform
    K-ary variable gives y uniform on [lo, hi], log p(y) = −D·log w and bpd = log₂ K. Note that y
    has the scale of x shrunk by (K−1)/K about lo; train and evaluate in the same convention.

    Args:
        x: (B, ...) discrete data on the grid lo + k·w/(K−1); any floating dtype.
        levels: K >= 2.
        data_range: (lo, hi) with hi > lo.
        generator: torch generator for the uniform noise, for reproducibility.

    Returns:
        y of the shape and dtype of x, in [lo, hi].

    Raises:
        DataError: x is not floating point, or does not lie on the K-level grid of ``data_range``
            (e.g. it is already dequantised, or scaled to another range).
    """
    levels = check_levels(levels)
    lo, hi = check_data_range(data_range)
    if not torch.is_tensor(x) or not x.is_floating_point():
        got = x.dtype if torch.is_tensor(x) else type(x).__name__
        raise DataError(f"x must be a floating-point tensor, got {got}.")
    width = hi - lo
    # float64 so that k and the bin edges are exact for any K a float32 grid can hold.
    position = (x.double() - lo) / width * (levels - 1)
    k = position.round()
    off_grid = (~((position - k).abs() <= _GRID_TOLERANCE)) | (k < 0) | (k > levels - 1)
    if off_grid.any():
        first = tuple(int(i) for i in off_grid.nonzero()[0])
        raise DataError(f"{int(off_grid.sum())} value(s) of x are not on the {levels}-level grid "
                        f"lo + k·w/{levels - 1} of data_range ({lo:g}, {hi:g}), the first x{list(first)} = "
                        f"{x[first].item():g}; pass the levels and data_range the data were scaled with, "
                        f"and data that are not already dequantised.")
    noise_device = generator.device if generator is not None else x.device
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=noise_device).to(x.device)
    return (lo + (k + u) * (width / levels)).to(x.dtype)
