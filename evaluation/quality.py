"""Sample quality against held-out data: the sliced Wasserstein distance for any data set, mode statistics for mixtures."""
from __future__ import annotations

import torch

from core_lib import UserError
from data_lib import Dataset

Tensor = torch.Tensor

__all__ = ["sliced_wasserstein", "sample_quality"]


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between the empirical distributions of x (N, ...) and y (M, ...).

    SW₁(x, y) = E_θ W₁(θᵀx, θᵀy) over directions θ uniform on the sphere; each 1-D W₁ is the mean
    absolute difference of the two projections' quantiles at min(N, M) evenly spaced levels. Same
    units as the data. The directions depend only on ``seed`` and the dimension, so two calls with
    the same seed are comparable. Finite samples give a positive floor even for equal distributions,
    and the estimate is noisy (on the ring with 5000 test points, ±20 % between draws of 10 000
    samples): compare with the distance between two held-out sets of the same sizes. W₁ rather
    than W₂ because W₂'s squared tails made it blind to a 10 % error in the ring's spread.
    """
    x, y = x.flatten(1).double(), y.flatten(1).double().to(x.device)
    if x.shape[1] != y.shape[1]:
        raise UserError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}.")
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], n_projections, generator=gen, dtype=torch.float64).to(x.device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    n = min(len(x), len(y))
    levels = (torch.arange(n, dtype=torch.float64, device=x.device) + 0.5) / n
    qx = torch.quantile((x @ theta).contiguous(), levels, dim=0) if len(x) != n else (x @ theta).sort(0).values
    qy = torch.quantile((y @ theta).contiguous(), levels, dim=0) if len(y) != n else (y @ theta).sort(0).values
    return (qx - qy).abs().mean().item()


def sample_quality(samples: Tensor, data: Dataset, seed: int) -> dict[str, float]:
    """How close samples are to ``data``: ``swd`` (sliced W1 to the held-out set), ``swd_floor`` (the same
    distance between two held-out sets of those sizes: a perfect sampler's score) and, for a Gaussian
    mixture, ``mode_weight_error`` (largest |frequency − weight| over modes) and ``mode_spread_ratio``
    (RMS distance to the nearest mode ÷ that of exact draws)."""
    test = data.test_points()
    out = {"swd": sliced_wasserstein(samples, test, seed=seed),
           "swd_floor": sliced_wasserstein(data.decode(data.train[:len(samples)]), test, seed=seed)}
    if data.mixture is not None:
        out["mode_weight_error"], out["mode_spread_ratio"] = data.mixture.mode_report(samples)
    return out
