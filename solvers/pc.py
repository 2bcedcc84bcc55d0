"""Reverse-time SDE samplers: predictors, correctors and the predictor–corrector loop (MATH.md §3–§4).

Every sampler here is one loop over the grid t_0 = T > … > t_{N−1} = eps: at each t_i, the
corrector's Langevin steps, then one predictor step towards t_{i+1} (t_N = 0). Predictors and
correctors are short functions in the papers' notation; each returns (x, x_mean), x_mean being
the update without its noise, which the optional final denoising step returns.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Optional

import torch

from sde_lib import SDE, VESDE, batch_broadcast
from solvers.base import CountedScore, Solver, SolverError, register
from solvers.noise import NoiseSource

Tensor = torch.Tensor

__all__ = ["PREDICTORS", "CORRECTORS", "EulerMaruyama", "ReverseDiffusion", "Ancestral", "PredictorCorrector",
           "AnnealedLangevin"]


def _per_sample_norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1)


# ---- predictors: (sde, score, x, t, t_next, noise, opts) -> (x, x_mean) ----------------------------

def euler_maruyama_predictor(sde: SDE, score: CountedScore, x: Tensor, t: Tensor, t_next: Tensor,
                             noise: NoiseSource, opts) -> tuple[Tensor, Tensor]:
    """Euler–Maruyama on the reverse SDE: x ← x − [f − g² s_θ] Δt + g √Δt z, Δt = t − t_next > 0."""
    dt = batch_broadcast(t - t_next, x)
    drift, g = sde.reverse(score).sde(x, t)
    x_mean = x - drift * dt
    z = noise.normal(x.shape, x.dtype, x.device)
    return x_mean + batch_broadcast(g, x) * dt.sqrt() * z, x_mean


def reverse_diffusion_predictor(sde: SDE, score: CountedScore, x: Tensor, t: Tensor, t_next: Tensor,
                                noise: NoiseSource, opts) -> tuple[Tensor, Tensor]:
    """Reverse of the forward chain x_{i+1} = x_i + f_i + G_i z: x ← x − f_i + G_i² s_θ + G_i z."""
    rev_f, G = sde.reverse(score).discretize(x, t)
    x_mean = x - rev_f
    z = noise.normal(x.shape, x.dtype, x.device)
    return x_mean + batch_broadcast(G, x) * z, x_mean


def ancestral_predictor(sde: SDE, score: CountedScore, x: Tensor, t: Tensor, t_next: Tensor,
                        noise: NoiseSource, opts) -> tuple[Tensor, Tensor]:
    """Ancestral sampling from the chain's posterior q(x_{i−1} | x_i, x̂_0) with Tweedie's x̂_0.

    For any chain x_i = a_i x_{i−1} + √v_i z the posterior mean is (x_i + v_i s_θ)/a_i: for VP
    this is DDPM's Algorithm 2 in score form, for VE the SMLD ancestral step. The noise variance
    is v_i ("forward", DDPM's σ_i² = β_i) or the posterior's v_i m_{i−1}/m_i ("posterior",
    DDPM's β̃_i and SMLD's step). Default: forward for VP and sub-VP, posterior for VE, as in the
    reference code. For sub-VP the chain is its Euler–Maruyama discretisation.
    """
    a, v, m = sde.chain_coeffs(t, x)
    s = score(x, t)
    x_mean = (x + batch_broadcast(v, x) * s) / batch_broadcast(a, x)
    variance = opts.variance or ("posterior" if isinstance(sde, VESDE) else "forward")
    if variance == "forward":
        var = v
    else:
        var = (v * (m - v) / (a**2 * m)).clamp_min(0)    # m_{i−1} = (m_i − v_i)/a_i²
    z = noise.normal(x.shape, x.dtype, x.device)
    return x_mean + batch_broadcast(var.sqrt(), x) * z, x_mean


def no_predictor(sde, score, x, t, t_next, noise, opts):
    return x, x


PREDICTORS: dict[str, Callable] = {
    "euler_maruyama": euler_maruyama_predictor,
    "reverse_diffusion": reverse_diffusion_predictor,
    "ancestral": ancestral_predictor,
    "none": no_predictor,
}


# ---- correctors: (sde, score, x, t, noise, opts) -> (x, x_mean) -------------------------------------

def _langevin_steps(sde, score, x, t, noise, opts, step_size) -> tuple[Tensor, Tensor]:
    x_mean = x
    for _ in range(opts.n_steps):
        grad = score(x, t)
        z = noise.normal(x.shape, x.dtype, x.device)
        eps = step_size(grad, z)
        x_mean = x + batch_broadcast(eps, x) * grad
        x = x_mean + batch_broadcast((2 * eps).sqrt(), x) * z
    return x, x_mean


def langevin_corrector(sde: SDE, score: CountedScore, x: Tensor, t: Tensor, noise: NoiseSource,
                       opts) -> tuple[Tensor, Tensor]:
    """Langevin MCMC with step ε = 2 α_i (r ‖z‖/‖s_θ‖)², per sample (MATH.md §4).

    α_i = a_i², the chain's squared mean coefficient: 1 − β_i for VP, 1 for VE, and its
    Euler–Maruyama analogue for sub-VP (where the reference code crashes). Norms are per sample,
    so a sample's update does not depend on the rest of its batch.
    """
    alpha = sde.chain_coeffs(t, x)[0] ** 2
    tiny = torch.finfo(x.dtype).tiny

    def step_size(grad, z):
        z_norm, grad_norm = _per_sample_norm(z), _per_sample_norm(grad)
        if opts.norm == "batch":
            z_norm, grad_norm = z_norm.mean().expand_as(z_norm), grad_norm.mean().expand_as(grad_norm)
        ratio = opts.snr * z_norm / grad_norm.clamp_min(tiny)
        return 2 * alpha * ratio**2

    return _langevin_steps(sde, score, x, t, noise, opts, step_size)


def annealed_langevin_corrector(sde: SDE, score: CountedScore, x: Tensor, t: Tensor, noise: NoiseSource,
                                opts) -> tuple[Tensor, Tensor]:
    """Annealed Langevin dynamics (NCSN): ε_i = 2 α_i (r s(t_i))², i.e. ε_i ∝ σ_i² for VE."""
    alpha = sde.chain_coeffs(t, x)[0] ** 2
    eps = 2 * alpha * (opts.snr * sde.marginal_std(t).to(x.dtype)) ** 2
    return _langevin_steps(sde, score, x, t, noise, opts, lambda grad, z: eps)


def no_corrector(sde, score, x, t, noise, opts):
    return x, x


CORRECTORS: dict[str, Callable] = {
    "langevin": langevin_corrector,
    "ald": annealed_langevin_corrector,
    "none": no_corrector,
}


# ---- the loop --------------------------------------------------------------------------------------

class _ReverseTime(Solver):
    """The predictor–corrector loop that every solver in this module runs."""

    predictor: str = "none"
    corrector: str = "none"

    def run(self, sde: SDE, score: CountedScore, x: Tensor, eps: float, steps: int | None,
            noise: NoiseSource) -> Tensor:
        opts = self.options
        predictor = PREDICTORS[getattr(opts, "predictor", self.predictor)]
        corrector = CORRECTORS[getattr(opts, "corrector", self.corrector)]
        n = steps or sde.N
        if n < 2:
            raise SolverError(f"solver '{self.name}' needs steps >= 2, got {n}.")
        chain_sde = sde if n == sde.N else sde.with_steps(n)
        ts = torch.linspace(sde.T, eps, n, dtype=x.dtype, device=x.device)
        if predictor is not euler_maruyama_predictor or corrector is not no_corrector:
            try:  # the chain's coefficients, checked before the first score evaluation
                chain_sde.chain_coeffs(ts[:1], x)
            except ValueError as err:
                raise SolverError(f"solver '{self.name}' with steps={n}: {err}") from None
        t_next = torch.cat([ts[1:], ts.new_zeros(1)])
        ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        x_mean = x
        for i in range(n):
            t = ts[i] * ones
            x, x_mean = corrector(chain_sde, score, x, t, noise, opts)
            if predictor is not no_predictor:
                x, x_mean = predictor(chain_sde, score, x, t, t_next[i] * ones, noise, opts)
        return x_mean if opts.denoise else x


@dataclasses.dataclass
class _DenoiseOptions:
    denoise: bool = True    # return the last step's mean, without its noise


@register
class EulerMaruyama(_ReverseTime):
    """Euler–Maruyama on the reverse-time SDE, ``steps`` uniform steps from T to eps (then to 0)."""

    name = "euler_maruyama"
    predictor = "euler_maruyama"
    Options = _DenoiseOptions


@register
class ReverseDiffusion(_ReverseTime):
    """The reverse-diffusion predictor on the SDE's own N-step chain (``steps`` re-discretises it)."""

    name = "reverse_diffusion"
    predictor = "reverse_diffusion"
    Options = _DenoiseOptions


@dataclasses.dataclass
class _AncestralOptions(_DenoiseOptions):
    variance: Optional[Literal["forward", "posterior"]] = None  # σ_i² = v_i or the posterior's; None: per SDE


@register
class Ancestral(_ReverseTime):
    """Ancestral sampling: DDPM's Algorithm 2 for VP, the SMLD step for VE, the EM chain's for sub-VP."""

    name = "ancestral"
    predictor = "ancestral"
    Options = _AncestralOptions


@dataclasses.dataclass
class _PCOptions(_AncestralOptions):
    predictor: Literal["euler_maruyama", "reverse_diffusion", "ancestral", "none"] = "reverse_diffusion"
    corrector: Literal["langevin", "ald", "none"] = "langevin"
    snr: float = 0.16       # Langevin signal-to-noise ratio r (0.16 is the reference's VE setting)
    n_steps: int = 1        # corrector steps per noise level
    norm: Literal["batch", "sample"] = "batch"    # Langevin norms: batch means (reference; stable in any D) or per sample

    def validate(self):
        if self.snr <= 0 or self.n_steps < 1:
            raise SolverError(f"need snr > 0 and n_steps >= 1, got snr={self.snr}, n_steps={self.n_steps}.")


@register
class PredictorCorrector(_ReverseTime):
    """Predictor–corrector sampling: any predictor followed, at each step, by any corrector."""

    name = "pc"
    Options = _PCOptions


@dataclasses.dataclass
class _ALDOptions(_DenoiseOptions):
    snr: float = 0.4        # r in ε_i = 2 α_i (r s(t_i))² (chosen on the exact 2-D and 16-D mixtures)
    n_steps: int = 1        # Langevin steps per noise level

    def validate(self):
        _PCOptions.validate(self)


@register
class AnnealedLangevin(_ReverseTime):
    """Annealed Langevin dynamics (NCSN): ``n_steps`` Langevin steps at each of ``steps`` noise levels."""

    name = "ald"
    corrector = "ald"
    Options = _ALDOptions
