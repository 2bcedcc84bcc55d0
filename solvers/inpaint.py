"""Inpainting (imputation) with an unconditional score model: draws of p(x_B | x_A = known) (docs/inpainting.md).

The known coordinates A are marked by a 0/1 ``mask`` (1 = known); the rest, B, are sampled. Two methods:

- ``"smc"`` (the default): sequential Monte Carlo over the reverse chain, the twisted diffusion sampler
  (Wu et al. 2023). K particles per conditional sample walk the chain's kernel (the reverse SDE's
  Euler–Maruyama step on a grid uniform in log-SNR by default, or DDPM's posterior step), pushed towards the observation by the gradient of a twist p̃(y | x_t) built from the
  model's own x̂₀(x_t) = (x_t + s² s_θ)/α, importance-weighted and resampled. The last step conditions
  exactly on the known entries, so the target is the discrete reverse chain conditioned on them: the
  result is exact as K → ∞ (for an exact score and a fine grid, exact altogether).
- ``"replace"``: score_sde's method (Song et al. 2021, Appendix I.2): any stepping solver of the registry
  runs as usual, and after each of its steps the known part of the state is replaced by the forward-noised
  observation α(t) y + s(t) z at the time the step reached. Fast, one sample per sample, and biased.

``solvers.inpaint(...)`` returns a :class:`SampleResult` whose ``.samples`` hold the known entries exactly.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Literal

import torch

from core_lib import build_options
from sde_lib import SDE, batch_broadcast
from solvers.base import (CountedScore, SampleResult, ScoreFn, SolverError, check_finite, get_solver, resolve_eps,
                          available)
from solvers.grids import GridKind, GridOptions, solve_times
from solvers.noise import NoiseSource

Tensor = torch.Tensor

__all__ = ["inpaint", "METHODS", "SMCOptions", "check_mask"]

#: The inpainting methods; the first is the default.
METHODS = ("smc", "replace")
#: The solver ``method="replace"`` steps with when none is named.
DEFAULT_REPLACE_SOLVER = "euler_maruyama"


@dataclasses.dataclass
class SMCOptions(GridOptions):
    """Options of ``method="smc"`` (the steps go through ``steps`` and the time grid of ``solvers.grids``)."""

    grid: GridKind = "log_snr"         # the times the chain visits: log_snr (uniform in λ), t (uniform, as euler_maruyama), edm, ...
    kernel: Literal["euler_maruyama", "posterior"] = "euler_maruyama"   # the chain's step: the reverse SDE's Euler–Maruyama step (euler_maruyama's), or DDPM's posterior (ancestral) step
    proposal: Literal["twisted", "reverse"] = "twisted"   # twisted: the kernel moved by ∇log p̃ (TDS); reverse: the plain kernel (weights alone steer)
    max_shift: float = 3.0             # the twisted proposal's shift is capped at this many kernel stds (RMS per coordinate)
    ess_threshold: float = 0.5         # resample a sample's particles when their effective sample size < this · particles

    def validate(self):
        if not (math.isfinite(self.max_shift) and self.max_shift > 0):
            raise SolverError(f"max_shift must be a finite positive number of kernel stds, got {self.max_shift}.")
        if not 0 < self.ess_threshold <= 1:
            raise SolverError(f"ess_threshold must be in (0, 1] (a fraction of the particles), got {self.ess_threshold}.")
        super().validate()


def check_mask(mask: Any, x_known: Tensor) -> Tensor:
    """The 0/1 mask as a float tensor of x_known's shape (B, ...), on its device; one clear SolverError otherwise.

    ``mask`` may have the shape of x_known or of one sample (x_known.shape[1:]), broadcast over the batch.
    """
    if not torch.is_tensor(mask):
        raise SolverError(f"mask must be a torch.Tensor of 0/1 (1 = known), got {type(mask).__name__}.")
    shape, one = tuple(x_known.shape), tuple(x_known.shape[1:])
    if tuple(mask.shape) not in (shape, one):
        raise SolverError(f"mask has shape {tuple(mask.shape)}; it must have x_known's shape {shape} or one "
                          f"sample's {one} (1 where known, 0 where to fill in).")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise SolverError("mask must hold only 0 (to fill in) and 1 (known); got other values. Threshold it first, "
                          "e.g. (mask > 0.5).")
    return mask.to(dtype=x_known.dtype, device=x_known.device).expand(shape)


def _check_known(x_known: Any) -> Tensor:
    if not torch.is_tensor(x_known) or x_known.dim() < 2 or x_known.shape[0] < 1:
        raise SolverError("x_known must be a torch.Tensor of shape (B, ...) holding the known entries (any value "
                          "where the mask is 0).")
    if not x_known.is_floating_point():
        raise SolverError(f"x_known must be floating point, got {x_known.dtype}.")
    return x_known


def _coefficients(sde: SDE, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """α(t) and s(t), (B,), in the dtype of ``like``."""
    return sde.log_mean_coeff(t).exp().to(like.dtype), sde.marginal_std(t).to(like.dtype)


def inpaint(sde: SDE, score_fn: ScoreFn, x_known: Tensor, mask: Tensor, solver: str | None = None,
            method: str = "smc", steps: int | None = None, seed: int | None = None, eps: float | None = None,
            cond: dict[str, Any] | None = None, particles: int = 16, sigma_data: float | None = None,
            **options: Any) -> SampleResult:
    """Fill in the unknown entries of ``x_known``: draws of p(x_B | x_A = x_known[A]) under the model.

    Args:
        sde: the forward SDE the model was trained with.
        score_fn: ``score_fn(x, t, **cond)``, the unconditional score (``method="smc"`` differentiates it
            with respect to x: a network or ``models.MixtureScore``).
        x_known: (B, ...) the inputs; only their entries where mask = 1 are read (they must be finite there).
        mask: 0/1 of x_known's shape or of one sample's shape (broadcast over the batch), 1 where known.
        solver: ``method="replace"``: the stepping solver to run (default ``euler_maruyama``; any solver with
            ``takes_constraint``: euler_maruyama, reverse_diffusion, ancestral, pc, ald, ddim, multistep,
            heun, multistep_adaptive). ``method="smc"`` has its own kernel: leave it None.
        method: "smc" (default; asymptotically exact) or "replace" (score_sde's replacement; biased).
        steps: steps of the solve (replace: the solver's default when None; smc: 100 when None).
        seed: seed of all noise; the same seed and inputs give the same samples. None draws one.
        eps: the final time (None: the SDE's default). Chain-walking solvers end at the chain's end.
        cond: conditioning inputs passed to every model call.
        particles: ``method="smc"``: K, the particles per conditional sample.
        sigma_data: the data's std (the ``focus`` grid and the smc twist's variance); None: the model's own, else 1.
        **options: replace: the solver's options; smc: :class:`SMCOptions` (grid, proposal, ess_threshold, ...).

    Returns:
        :class:`SampleResult`: ``samples`` (B, ...) with ``samples[mask == 1] == x_known[mask == 1]`` exactly;
        ``nfe`` the batched model calls. For smc one call evaluates all B·K particles and counts once, so a
        solve of N steps costs N NFE like replace's, but K times the model's work per NFE (plus a
        backward pass with the twisted proposal). ``z`` is the prior draw (B·K rows for smc).
    """
    if method not in METHODS:
        raise SolverError(f"unknown inpainting method {method!r}; available: {', '.join(METHODS)}.")
    x_known = _check_known(x_known)
    m = check_mask(mask, x_known)
    known = m.bool()
    if not bool(torch.isfinite(torch.where(known, x_known, 0.0)).all()):
        raise SolverError("x_known holds NaN or inf in entries the mask marks known; fix those inputs or mark them "
                          "unknown (mask 0).")
    y = torch.where(known, x_known, torch.zeros_like(x_known))
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise SolverError(f"steps must be a positive integer or None, got {steps!r}.")
    eps = resolve_eps(sde, eps)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    noise = NoiseSource(seed)
    score = CountedScore(score_fn, cond=cond, sigma_data=sigma_data)
    start = time.perf_counter()
    if method == "replace":
        x, z, name = _replace(sde, score, y, m, solver, steps, eps, noise, options)
    else:
        if solver is not None:
            raise SolverError(f"method='smc' walks its own reverse kernel; drop solver={solver!r} (solvers apply to "
                              "method='replace').")
        if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
            raise SolverError(f"particles must be a positive integer (K per conditional sample), got {particles!r}.")
        opts = build_options(SMCOptions, options, "inpaint method 'smc'", SolverError)
        x, z = _smc(sde, score, y, m, particles, steps, eps, noise, opts)
        name = "smc"
    seconds = time.perf_counter() - start
    x = torch.where(known, x_known, x)   # the known entries, exactly
    check_finite(x, f"the inpainted samples of method '{method}'")
    return SampleResult(samples=x, nfe=score.nfe, seconds=seconds, solver=name, seed=seed, z=z)


# ---- replace ----------------------------------------------------------------------------------------

def _replace(sde: SDE, score: CountedScore, y: Tensor, m: Tensor, solver: str | None, steps: int | None,
             eps: float, noise: NoiseSource, options: dict) -> tuple[Tensor, Tensor, str]:
    """score_sde's replacement: after every solver step, x_A ← α(t) y + s(t) z at the time t the step reached."""
    name = solver or DEFAULT_REPLACE_SOLVER
    cls = get_solver(name)
    if not cls.takes_constraint:
        able = [n for n in available() if get_solver(n).takes_constraint]
        raise SolverError(f"method='replace' needs a solver that steps through its state; {name!r} does not. Use one "
                          f"of: {', '.join(able)}.")
    instance = cls(**options)
    cls.check_sde(sde)

    def replace_known(x: Tensor, t: Tensor, noise: NoiseSource) -> Tensor:
        alpha, std = _coefficients(sde, t, x)
        z = noise.normal(x.shape, x.dtype, x.device)
        return m * (batch_broadcast(alpha, x) * y + batch_broadcast(std, x) * z) + (1 - m) * x

    score.constraint = replace_known
    z = sde.prior_std * noise.normal(y.shape, y.dtype, y.device)
    t_start = torch.full((y.shape[0],), sde.T, dtype=y.dtype, device=y.device)
    with torch.no_grad():
        x = instance.run(sde, score, replace_known(z, t_start, noise), eps, steps, noise)
    return x, z, name


# ---- sequential Monte Carlo (the twisted diffusion sampler) -------------------------------------------

class _Kernel:
    """One Gaussian step of the reverse chain from time t to t' < t, x_t' ~ N(μ, ṽ I) (docs/inpainting.md §3).

    μ = c₀ x̂₀ + c_x x_t with x̂₀ = (x_t + s_t² s_θ)/α_t; ``drift_scale`` is the coefficient of the score in μ,
    so the conditional score s_θ + ∇log p̃ moves μ by drift_scale · ∇log p̃. Kernels:

    - "euler_maruyama": x_t' = x_t − [f x_t − g² s_θ] Δt + g √Δt z, Δt = t − t' (``euler_maruyama``'s step):
      c₀ = g²Δt α_t/s_t², c_x = 1 − fΔt − g²Δt/s_t², ṽ = drift_scale = g²Δt.
    - "posterior": DDPM's ancestral step with the posterior variance; with a = α_t/α_t', v = s_t² − a² s_t'²:
      c₀ = α_t' v/s_t², c_x = a s_t'²/s_t², ṽ = v s_t'²/s_t², drift_scale = v/a.
    """

    def __init__(self, sde: SDE, t: float, t_next: float, kind: str):
        tt = torch.tensor([t, t_next], dtype=torch.float64)
        alpha, std = sde.log_mean_coeff(tt).exp().tolist(), sde.marginal_std(tt).tolist()
        (self.alpha, alpha_next), (self.std, std_next) = alpha, std
        if kind == "euler_maruyama":
            dt = t - t_next
            f, g2 = float(sde.drift_coeff(tt[:1])), float(sde.diffusion_sq(tt[:1]))
            self.mean_x0 = g2 * dt * self.alpha / self.std**2
            self.mean_x = 1 - f * dt - g2 * dt / self.std**2
            self.var = self.drift_scale = g2 * dt
        else:
            a = self.alpha / alpha_next
            v = max(self.std**2 - a**2 * std_next**2, 0.0)
            self.mean_x0 = alpha_next * v / self.std**2
            self.mean_x = a * std_next**2 / self.std**2
            self.var = v * std_next**2 / self.std**2
            self.drift_scale = v / a


def _systematic(log_w: Tensor, u: Tensor) -> Tensor:
    """Systematic resampling per row: indices (B, K) of the particles kept, for log weights (B, K) and u (B,) in [0, 1)."""
    K = log_w.shape[1]
    cdf = torch.softmax(log_w, dim=1).cumsum(1)
    points = (u[:, None] + torch.arange(K, dtype=log_w.dtype, device=log_w.device)) / K
    return torch.searchsorted(cdf.contiguous(), points.contiguous()).clamp_max(K - 1)


def _smc(sde: SDE, score: CountedScore, y: Tensor, m: Tensor, K: int, steps: int | None, eps: float,
         noise: NoiseSource, opts: SMCOptions) -> tuple[Tensor, Tensor]:
    """The twisted diffusion sampler over ``steps`` posterior-kernel steps from T to eps, K particles per sample.

    Particles are rows b·K + k of one batch (sample b's noise depends only on the seed, b and K). Twist:
    log p̃_t(y | x_t) = −‖m ⊙ (y − x̂₀(x_t))‖²/(2 r_t²), r_t² = σ² σ_d²/(σ² + σ_d²), σ = s/α. Resampling
    (systematic) is decided per sample on the device: the indices are computed for every sample and applied
    where the ESS is low, so no step waits for the host.
    """
    B, shape = y.shape[0], tuple(y.shape[1:])
    times = solve_times(opts, sde, eps, steps, 100, score.sigma_data, y[0].numel()).tolist()
    yk, mk = y.repeat_interleave(K, 0), m.repeat_interleave(K, 0)
    twisted = opts.proposal == "twisted"
    sd2 = score.sigma_data**2
    ones = torch.ones(B * K, dtype=y.dtype, device=y.device)

    def look(x: Tensor, kernel: _Kernel, t: float) -> tuple[Tensor, Tensor, Tensor | None]:
        """The kernel's mean μ(x), the log twist at x and its gradient (None for the plain proposal)."""
        sigma2 = (kernel.std / kernel.alpha) ** 2
        r2 = sigma2 * sd2 / (sigma2 + sd2)
        with torch.enable_grad() if twisted else torch.no_grad():
            xg = x.detach().requires_grad_(twisted)
            s = score(xg, t * ones)
            x0 = (xg + kernel.std**2 * s) / kernel.alpha
            log_twist = -(mk * (yk - x0)).pow(2).flatten(1).sum(1) / (2 * r2)
            grad = torch.autograd.grad(log_twist.sum(), xg)[0] if twisted else None
        mean = kernel.mean_x0 * x0.detach() + kernel.mean_x * x
        return mean, log_twist.detach(), grad

    z = sde.prior_std * noise.normal((B * K, *shape), y.dtype, y.device)
    x = z
    log_w = torch.zeros(B, K, dtype=y.dtype, device=y.device)
    kernels = [_Kernel(sde, times[n], times[n + 1], opts.kernel) for n in range(len(times) - 1)]
    mean, log_twist, grad = look(x, kernels[0], times[0])
    log_w = log_w + log_twist.view(B, K)   # the first target: the prior times the twist at T
    for n, kernel in enumerate(kernels):
        # Resample the samples whose particles have degenerated (per sample, without a host sync).
        w = torch.softmax(log_w, dim=1)
        low = 1.0 / w.pow(2).sum(1) < opts.ess_threshold * K
        u = torch.special.ndtr(noise.normal((B * K, 1), y.dtype, y.device).view(B, K)[:, 0])
        keep = torch.arange(K, device=y.device).expand(B, K)
        idx = torch.where(low[:, None], _systematic(log_w, u), keep)
        rows = (idx + K * torch.arange(B, device=y.device)[:, None]).reshape(-1)
        x, mean, log_twist = x[rows], mean[rows], log_twist[rows]
        grad = grad[rows] if grad is not None else None
        log_w = torch.where(low[:, None], torch.zeros_like(log_w), log_w)

        xi = noise.normal(x.shape, x.dtype, x.device)
        sd = math.sqrt(kernel.var)
        if n == len(kernels) - 1:
            # The last step conditions exactly: x_A = y, x_B from the kernel; weight N(y; μ_A, ṽ)/p̃(y | x).
            x = mk * yk + (1 - mk) * (mean + sd * xi)
            log_lik = -(mk * (yk - mean)).pow(2).flatten(1).sum(1) / (2 * kernel.var)
            log_w = log_w + (log_lik - log_twist).view(B, K)
            break
        # Propose from the (twisted) kernel, then weight by p(x'|x) p̃'(y|x') / (q(x'|x) p̃(y|x)).
        shift = kernel.drift_scale * grad if grad is not None else torch.zeros_like(x)
        # Cap the shift at max_shift kernel stds (RMS per coordinate): a network's x̂₀ can be steep at high noise,
        # and any shift is a valid proposal, since q below is the capped one.
        rms = batch_broadcast(shift.flatten(1).pow(2).mean(1).sqrt(), x)
        shift = shift * (opts.max_shift * math.sqrt(kernel.var) / rms.clamp_min(1e-30)).clamp(max=1.0)
        x = mean + shift + sd * xi
        log_p_over_q = ((x - mean - shift).pow(2) - (x - mean).pow(2)).flatten(1).sum(1) / (2 * kernel.var)
        nxt = kernels[n + 1]
        mean, log_twist_next, grad = look(x, nxt, times[n + 1])
        log_w = log_w + (log_p_over_q + log_twist_next - log_twist).view(B, K)
        log_twist = log_twist_next

    # One particle per sample, drawn by its final weight.
    u = torch.special.ndtr(noise.normal((B * K, 1), y.dtype, y.device).view(B, K)[:, 0])
    cdf = torch.softmax(log_w, dim=1).cumsum(1)
    pick = torch.searchsorted(cdf.contiguous(), u[:, None].contiguous()).clamp_max(K - 1).squeeze(1)
    return x.view(B, K, *shape)[torch.arange(B, device=y.device), pick], z
