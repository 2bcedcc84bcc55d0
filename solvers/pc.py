"""Reverse-time SDE samplers: predictors, correctors and the predictor–corrector loop (docs/math.md §3–§4).

Every sampler here is one loop over steps from t = T downwards: at each, the corrector's Langevin
steps, then one predictor step to the next. Samplers that read the discrete chain walk its indices
at their noise-matched times (``sde.chain_times()``); Euler–Maruyama walks a uniform grid to eps. Predictors and
correctors are short functions in the papers' notation; each returns (x, x_mean), x_mean being
the update without its noise, which the optional final denoising step returns.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal, NamedTuple, Optional

import torch

from core_lib import finite_positive
from sde_lib import SDE, VESDE, batch_broadcast
from solvers.base import CountedScore, Solver, SolverError, register
from solvers.grids import GridKind, GridOptions, solve_times
from solvers.noise import NoiseSource

Tensor = torch.Tensor

__all__ = ["Step", "PREDICTORS", "CORRECTORS", "EulerMaruyama", "ReverseDiffusion", "Ancestral", "PredictorCorrector",
           "AnnealedLangevin"]


def _per_sample_norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1)


class Step(NamedTuple):
    """Where one loop iteration is: the score's time t (B,), the next time t_next (B,), and on the
    discrete chain the index i (None for a time grid without a chain)."""

    t: Tensor
    t_next: Tensor
    i: Optional[int]


# ---- predictors: (sde, score, x, step, noise, opts) -> (x, x_mean) ---------------------------------

def euler_maruyama_predictor(sde: SDE, score: CountedScore, x: Tensor, step: Step, noise: NoiseSource,
                             opts) -> tuple[Tensor, Tensor]:
    """Euler–Maruyama on the reverse SDE: x ← x − [f − g² s_θ] Δt + g √Δt z, Δt = t − t_next > 0."""
    dt = batch_broadcast(step.t - step.t_next, x)
    drift, g = sde.reverse(score).sde(x, step.t)
    x_mean = x - drift * dt
    z = noise.normal(x.shape, x.dtype, x.device)
    return x_mean + batch_broadcast(g, x) * dt.sqrt() * z, x_mean


def reverse_diffusion_predictor(sde: SDE, score: CountedScore, x: Tensor, step: Step, noise: NoiseSource,
                                opts) -> tuple[Tensor, Tensor]:
    """Reverse of the forward chain step x_i = a_i x_{i−1} + √v_i z: x ← x − (a_i − 1) x + v_i s_θ + √v_i z.

    This is ``sde.reverse(score).discretize`` at chain index i: the forward step's drift
    f_i = (a_i − 1) x and G_i = √v_i, reversed as x − f_i + G_i² s_θ + G_i z.
    """
    a, v, _ = sde.chain_step(step.i, x)
    x_mean = x - batch_broadcast(a - 1, x) * x + batch_broadcast(v, x) * score(x, step.t)
    z = noise.normal(x.shape, x.dtype, x.device)
    return x_mean + batch_broadcast(v.sqrt(), x) * z, x_mean


def ancestral_predictor(sde: SDE, score: CountedScore, x: Tensor, step: Step, noise: NoiseSource,
                        opts) -> tuple[Tensor, Tensor]:
    """Ancestral sampling from the chain's posterior q(x_{i−1} | x_i, x̂_0) with Tweedie's x̂_0.

    For any chain x_i = a_i x_{i−1} + √v_i z the posterior mean is (x_i + v_i s_θ)/a_i: for VP
    this is DDPM's Algorithm 2 in score form, for VE the SMLD ancestral step. The noise variance
    is v_i ("forward", DDPM's σ_i² = β_i) or the posterior's v_i m_{i−1}/m_i ("posterior",
    DDPM's β̃_i and SMLD's step). Default: forward for VP and sub-VP, posterior for VE, as in the
    reference code. For sub-VP the chain is its Euler–Maruyama discretisation.
    """
    a, v, m = sde.chain_step(step.i, x)
    s = score(x, step.t)
    x_mean = (x + batch_broadcast(v, x) * s) / batch_broadcast(a, x)
    variance = opts.variance or ("posterior" if isinstance(sde, VESDE) else "forward")
    if variance == "forward":
        var = v
    else:  # m_{i−1} = (m_i − v_i)/a_i²; a noiseless step (m_i = 0, sub-VP's first) has none
        var = torch.where(m > 0, v * (m - v) / (a**2 * m.clamp_min(torch.finfo(m.dtype).tiny)), 0.0).clamp_min(0)
    z = noise.normal(x.shape, x.dtype, x.device)
    return x_mean + batch_broadcast(var.sqrt(), x) * z, x_mean


def unchanged(sde, score, x, step, noise, opts):
    """The "none" predictor and corrector: x as it is."""
    return x, x


PREDICTORS: dict[str, Callable] = {
    "euler_maruyama": euler_maruyama_predictor,
    "reverse_diffusion": reverse_diffusion_predictor,
    "ancestral": ancestral_predictor,
    "none": unchanged,
}


# ---- correctors: (sde, score, x, step, noise, opts) -> (x, x_mean) ---------------------------------

def _langevin_steps(score, x, t, noise, opts, step_size) -> tuple[Tensor, Tensor]:
    x_mean = x
    for _ in range(opts.n_steps):
        grad = score(x, t)
        z = noise.normal(x.shape, x.dtype, x.device)
        eps = step_size(grad, z)
        x_mean = x + batch_broadcast(eps, x) * grad
        x = x_mean + batch_broadcast((2 * eps).sqrt(), x) * z
    return x, x_mean


def langevin_corrector(sde: SDE, score: CountedScore, x: Tensor, step: Step, noise: NoiseSource,
                       opts) -> tuple[Tensor, Tensor]:
    """Langevin MCMC with step ε = 2 α_i (r ‖z‖/‖s_θ‖)² (docs/math.md §4).

    α_i = a_i², the chain's squared mean coefficient: 1 − β_i for VP, 1 for VE, and its
    Euler–Maruyama analogue for sub-VP (where the reference code crashes). Norms are batch means
    (the reference) or per sample, so that a sample's update does not depend on its batch.
    """
    alpha = sde.chain_step(step.i, x)[0] ** 2
    tiny = torch.finfo(x.dtype).tiny

    def step_size(grad, z):
        z_norm, grad_norm = _per_sample_norm(z), _per_sample_norm(grad)
        if opts.norm == "batch":
            z_norm, grad_norm = z_norm.mean().expand_as(z_norm), grad_norm.mean().expand_as(grad_norm)
        ratio = opts.snr * z_norm / grad_norm.clamp_min(tiny)
        return 2 * alpha * ratio**2

    return _langevin_steps(score, x, step.t, noise, opts, step_size)


def annealed_langevin_corrector(sde: SDE, score: CountedScore, x: Tensor, step: Step, noise: NoiseSource,
                                opts) -> tuple[Tensor, Tensor]:
    """Annealed Langevin dynamics (NCSN): ε_i = 2 α_i r² m_i, i.e. ∝ σ_i² on NCSN's chain."""
    a, _, m = sde.chain_step(step.i, x)
    eps = 2 * a**2 * opts.snr**2 * m
    return _langevin_steps(score, x, step.t, noise, opts, lambda grad, z: eps)


CORRECTORS: dict[str, Callable] = {
    "langevin": langevin_corrector,
    "ald": annealed_langevin_corrector,
    "none": unchanged,
}


# ---- the loop --------------------------------------------------------------------------------------

def _chain_walk(sde: SDE, x: Tensor) -> list[Step]:
    """The chain's indices N−1, …, 0, each at its noise-matched time ``sde.chain_times()[i]``.

    A noiseless step (m_i = 0: sub-VP's first) has no score of its own; its time is that of the
    first noisy index, where the score is finite (the step does not use it: v_i = 0).
    """
    table = sde.chain_table(x)
    times, m = table[3], table[2]
    score_times = torch.where(m > 0, times, times[m > 0][0])
    ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    return [Step(score_times[i] * ones, (times[i - 1] if i > 0 else times.new_zeros(())) * ones, i)
            for i in range(sde.N - 1, -1, -1)]


def _time_walk(sde: SDE, x: Tensor, eps: float, n: int, times: Tensor | None = None) -> list[Step]:
    """n times from T down to eps (uniform, or ``times``), each stepping to the next (the last to 0)."""
    ts = torch.linspace(sde.T, eps, n, dtype=x.dtype, device=x.device) if times is None else times.to(x)
    t_next = torch.cat([ts[1:], ts.new_zeros(1)])
    ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    return [Step(ts[k] * ones, t_next[k] * ones, None) for k in range(n)]


class _ReverseTime(Solver):
    """The predictor–corrector loop that every solver in this module runs.

    A solver that reads the discrete chain (any predictor but Euler–Maruyama, any corrector)
    walks the chain's own indices i = N−1, …, 0 with ``steps`` re-discretising it, and evaluates
    the score at each index's noise-matched time ``sde.chain_times()[i]``: for VE exactly NCSN's
    σ_i, for VP DDPM's √(1 − ᾱ_i). It ends where the chain ends (x_{−1}, the data), so ``eps``
    does not apply. Euler–Maruyama alone runs on ``steps`` uniform times from T to eps.
    """

    predictor: str = "none"
    corrector: str = "none"
    takes_constraint = True

    def _parts(self) -> tuple[Callable, Callable]:
        opts = self.options
        return (PREDICTORS[getattr(opts, "predictor", self.predictor)],
                CORRECTORS[getattr(opts, "corrector", self.corrector)])

    def nfe_per_step(self) -> int | None:
        predictor, corrector = self._parts()
        return int(predictor is not unchanged) + getattr(self.options, "n_steps", 1) * int(corrector is not unchanged)

    def walks_chain(self) -> bool:
        predictor, corrector = self._parts()
        return not (predictor is euler_maruyama_predictor and corrector is unchanged)

    def end_time(self, eps: float) -> float:
        return 0.0 if self.walks_chain() else eps

    def run(self, sde: SDE, score: CountedScore, x: Tensor, eps: float, steps: int | None,
            noise: NoiseSource) -> Tensor:
        opts = self.options
        predictor, corrector = self._parts()
        n = steps or sde.N
        if n < 2:
            raise SolverError(f"solver '{self.name}' needs steps >= 2, got {n}.")
        if not self.walks_chain():
            grid = getattr(opts, "grid", "t")
            # The walk visits n times (the last steps on to 0), i.e. a grid of n − 1 steps to eps.
            times = None if grid == "t" else solve_times(opts, sde, eps, n - 1 if steps else None, n - 1,
                                                         score.sigma_data, x[0].numel())
            walk = _time_walk(sde, x, eps, len(times) if times is not None else n, times)
            chain_sde = sde
        else:
            chain_sde = sde if n == sde.N else sde.with_steps(n)
            try:  # the chain's coefficients, checked before the first score evaluation
                walk = _chain_walk(chain_sde, x)
            except ValueError as err:
                raise SolverError(f"solver '{self.name}' with steps={n}: {err}") from None
        x_mean = x
        for step in walk:
            if corrector is not unchanged:
                x, x_mean = corrector(chain_sde, score, x, step, noise, opts)
                x = score.after_step(x, step.t, noise)
            if predictor is not unchanged:
                x, x_mean = predictor(chain_sde, score, x, step, noise, opts)
                x = score.after_step(x, step.t_next, noise)
        return x_mean if opts.denoise else x


@dataclasses.dataclass
class _DenoiseOptions:
    denoise: bool = True    # return the last step's mean, without its noise


@dataclasses.dataclass
class _EulerMaruyamaOptions(_DenoiseOptions, GridOptions):
    grid: GridKind = "t"    # the times the steps run through: t (uniform), log_snr, edm, focus or user


@register
class EulerMaruyama(_ReverseTime):
    """Euler–Maruyama on the reverse-time SDE, ``steps`` steps from T to eps on a time grid (then to 0)."""

    name = "euler_maruyama"
    label = "reverse SDE, Euler-Maruyama"
    predictor = "euler_maruyama"
    Options = _EulerMaruyamaOptions


@register
class ReverseDiffusion(_ReverseTime):
    """The reverse-diffusion predictor on the SDE's own N-step chain (``steps`` re-discretises it)."""

    name = "reverse_diffusion"
    label = "reverse diffusion on the SDE's chain"
    predictor = "reverse_diffusion"
    Options = _DenoiseOptions


@dataclasses.dataclass
class _AncestralOptions(_DenoiseOptions):
    variance: Optional[Literal["forward", "posterior"]] = None  # σ_i² = v_i or the posterior's; None: per SDE


@register
class Ancestral(_ReverseTime):
    """Ancestral sampling: DDPM's Algorithm 2 for VP, the SMLD step for VE, the EM chain's for sub-VP."""

    name = "ancestral"
    label = "ancestral sampling (DDPM / SMLD)"
    predictor = "ancestral"
    Options = _AncestralOptions

    def bound_options(self) -> dict:
        return {"variance": self.options.variance}


@dataclasses.dataclass
class _PCOptions(_AncestralOptions):
    predictor: Literal["euler_maruyama", "reverse_diffusion", "ancestral", "none"] = "reverse_diffusion"
    corrector: Literal["langevin", "ald", "none"] = "langevin"
    snr: float = 0.16       # Langevin signal-to-noise ratio r (0.16 is the reference's VE setting)
    n_steps: int = 1        # corrector steps per noise level
    norm: Literal["batch", "sample"] = "batch"    # Langevin norms: batch means (reference; stable in any D) or per sample

    def validate(self):
        if not finite_positive(self.snr) or self.n_steps < 1:
            raise SolverError(f"need a finite snr > 0 and n_steps >= 1, got snr={self.snr}, n_steps={self.n_steps}.")


@register
class PredictorCorrector(_ReverseTime):
    """Predictor–corrector sampling: any predictor followed, at each step, by any corrector."""

    name = "pc"
    label = "predictor-corrector (reverse diffusion + Langevin)"
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
    label = "annealed Langevin dynamics"
    corrector = "ald"
    Options = _ALDOptions
