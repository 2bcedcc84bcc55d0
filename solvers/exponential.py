"""Exponential integrators of the probability-flow ODE: DDIM (η = 0) is the first-order one.

For any of the linear SDEs, x_t = α(t) x_0 + s(t) ε, the PF-ODE in the variables x/α and
σ = s/α reads d(x/α)/dσ = ε̂(x, t) (MATH.md §4; Song et al. 2021a, Lu et al. 2022). Holding ε̂
fixed over a step integrates the rest exactly:

    x_{t'} = α(t') x̂_0 + s(t') ε̂,   x̂_0 = (x_t − s(t) ε̂)/α(t),   ε̂ = −s(t) s_θ(x_t, t),

which is DDIM's deterministic update. Its error is first order in the step of λ = log(α/s).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from sde_lib import SDE
from solvers.base import CountedScore, Solver, SolverError, register
from solvers.noise import NoiseSource

Tensor = torch.Tensor

__all__ = ["DDIM", "time_grid"]


def time_grid(sde: SDE, eps: float, steps: int, kind: str, dtype=torch.float64) -> Tensor:
    """steps + 1 times from T down to eps: uniform in t ("t") or in the half log-SNR λ ("log_snr")."""
    if kind == "t":
        return torch.linspace(sde.T, eps, steps + 1, dtype=dtype)
    if kind == "log_snr":
        lam = torch.linspace(sde.half_log_snr(torch.tensor(sde.T, dtype=torch.float64)).item(),
                             sde.half_log_snr(torch.tensor(eps, dtype=torch.float64)).item(), steps + 1,
                             dtype=torch.float64)
        t = sde.t_from_half_log_snr(lam)
        t[0], t[-1] = sde.T, eps                 # exact end points, whatever the inverse's rounding
        return t.to(dtype)
    raise SolverError(f"grid must be 't' or 'log_snr', got {kind!r}.")


@dataclasses.dataclass
class _DDIMOptions:
    grid: Literal["t", "log_snr"] = "t"    # time steps uniform in t (DDIM's) or in log-SNR


@register
class DDIM(Solver):
    """DDIM with η = 0 on the PF-ODE, one score evaluation per step; for every SDE."""

    name = "ddim"
    stochastic = False
    Options = _DDIMOptions
    default_step_count = 100

    def run(self, sde: SDE, score: CountedScore, x: Tensor, eps: float, steps: int | None,
            noise: NoiseSource) -> Tensor:
        steps = steps or self.default_step_count
        ts = time_grid(sde, eps, steps, self.options.grid)
        alpha = sde.log_mean_coeff(ts).exp()
        std = sde.marginal_std(ts)
        ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        for k in range(steps):
            # ε̂ at the current point, then the exact flow of the rest to the next time.
            eps_hat = -float(std[k]) * score(x, float(ts[k]) * ones)
            x0_hat = (x - float(std[k]) * eps_hat) / float(alpha[k])
            x = float(alpha[k + 1]) * x0_hat + float(std[k + 1]) * eps_hat
        return x
