"""Fast stochastic samplers: EDM's stochastic Heun sampler and an adaptive-step reverse-SDE solver (docs/math.md §11).

- ``edm_sde`` (Karras et al. 2022, Algorithm 2) works on the σ-space ODE dx̃/dσ = ε̂ of x̃ = x/α
  (docs/math.md §4.4, §9). Each step first "churns": it raises the noise level from σ_i to
  σ̂ = σ_i (1 + γ_i) by adding fresh noise of variance σ̂² − σ_i², then takes a deterministic Heun
  step from σ̂ to σ_{i+1}. The added noise lets the sampler forget errors of earlier steps, as the
  reverse SDE does, while the steps stay those of a second-order ODE solver.
- ``sde_adaptive`` ("Gotta Go Fast", Jolicoeur-Martineau et al. 2021, Algorithm 1) integrates the
  reverse SDE in t with a step size chosen by the difference between an Euler–Maruyama step and an
  improved-Euler (stochastic Heun) step on the same Brownian increment.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import torch

from core_lib import finite_positive
from sde_lib import SDE
from solvers.base import CountedScore, NonFiniteError, Solver, SolverError, register
from solvers.exponential import _ExponentialState
from solvers.grids import GridKind, GridOptions, solve_times
from solvers.noise import NoiseSource

Tensor = torch.Tensor

__all__ = ["EDMStochastic", "AdaptiveSDE"]

#: EDM's cap on the churn per step, γ_i ≤ √2 − 1: the added noise never exceeds the noise already present.
GAMMA_CAP = math.sqrt(2) - 1


@dataclasses.dataclass
class _EDMStochasticOptions(GridOptions):
    grid: GridKind = "edm"             # EDM's ρ = 7 grid
    s_churn: float = 10.0              # total churn: γ_i = min(s_churn/steps, √2 − 1) inside [s_tmin, s_tmax]
    s_tmin: float = 0.35               # churn only at σ_i ≥ s_tmin·σ_data (σ = s/α)
    s_tmax: Optional[float] = None     # and at σ_i ≤ s_tmax·σ_data; None: no upper limit
    s_noise: float = 1.0               # the added noise's std is s_noise·√(σ̂² − σ_i²)

    def validate(self):
        if not (math.isfinite(self.s_churn) and self.s_churn >= 0):
            raise SolverError(f"s_churn must be a finite number >= 0 (0 gives the deterministic heun), "
                              f"got {self.s_churn}.")
        if not (math.isfinite(self.s_tmin) and self.s_tmin >= 0):
            raise SolverError(f"s_tmin must be a finite number >= 0 (a noise level in units of sigma_data), "
                              f"got {self.s_tmin}.")
        if self.s_tmax is not None and not self.s_tmax > self.s_tmin:
            raise SolverError(f"s_tmax must exceed s_tmin = {self.s_tmin} (or be None for no upper limit), "
                              f"got {self.s_tmax}.")
        if not finite_positive(self.s_noise):
            raise SolverError(f"s_noise must be finite and positive (EDM uses 1 to 1.007), got {self.s_noise}.")
        super().validate()


@register
class EDMStochastic(Solver):
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): churn, then a Heun step in σ; two NFE per step.

    Step i, from σ_i to σ_{i+1} of the grid (σ = s/α, x̃ = x/α; docs/math.md §11.1)::

        γ_i = min(S_churn/N, √2 − 1) if S_tmin ≤ σ_i ≤ S_tmax else 0
        σ̂ = min(σ_i (1 + γ_i), σ(T)),      x̃̂ = x̃_i + S_noise √(σ̂² − σ_i²) z
        x̃_{i+1} = Heun step of dx̃/dσ = ε̂ from (x̃̂, σ̂) to σ_{i+1}

    The grid ends at σ(eps) > 0, so every step, the last included, takes its second-order correction.
    ``steps`` counts steps (default 50, 100 NFE); S_churn = 0 is ``heun``. The churn window is given in
    units of σ_data (the model's, as for the ``focus`` grid), so that one default serves data of any scale.

    Defaults, measured on the exact ring (σ_data ≈ 2.84, modes of std 0.3) for VP, sub-VP and VE at 50
    steps, 20 000 samples (benchmarks/results/stochastic.md): churning over every noise level widens the
    modes, by 2–3 % of their spread with S_churn = 10 and 3–4 % with 40; the excess comes from churning
    below σ ≈ σ_data/3, near the modes' own width. From S_tmin = 0.35 σ_data up, S_churn = 10 keeps the
    spread within 1 % of exact draws at 30–100 steps (0.1–0.5 % at 50), and S_churn = 40 narrows it by
    about 1 %. With an
    exact score S_noise > 1 only adds error, hence 1. EDM's own best settings (its Table 5, data with
    σ_data = 0.5) are S_churn = 30–80, S_tmin = 0.01–0.05, S_tmax = 1–50 and S_noise = 1.003–1.007; in
    these units S_tmin = 0.02–0.1, S_tmax = 2–100.
    """

    name = "edm_sde"
    label = "EDM stochastic sampler (churn + Heun)"
    Options = _EDMStochasticOptions
    default_step_count = 50

    def nfe_per_step(self) -> int | None:
        return 2

    def run(self, sde: SDE, score: CountedScore, x: Tensor, eps: float, steps: int | None,
            noise: NoiseSource) -> Tensor:
        o = self.options
        ts = solve_times(o, sde, eps, steps, self.default_step_count, score.sigma_data, x[0].numel()).tolist()
        n = len(ts) - 1
        state = _ExponentialState(sde, score, x, "sigma")
        alpha_T, s_T, _ = state.coefficients(sde.T)
        sigma_max = s_T / alpha_T
        gamma_on = min(o.s_churn / n, GAMMA_CAP)
        s_tmin = o.s_tmin * score.sigma_data
        s_tmax = math.inf if o.s_tmax is None else o.s_tmax * score.sigma_data
        for i in range(n):
            alpha_i, s_i, _ = state.coefficients(ts[i])
            sigma_i = s_i / alpha_i
            gamma = gamma_on if s_tmin <= sigma_i <= s_tmax else 0.0
            sigma_hat = min(sigma_i * (1 + gamma), sigma_max)
            # Increase the noise temporarily: x̃̂ = x̃ + S_noise √(σ̂² − σ_i²) z, i.e. x̂ = α̂ x̃̂ at t̂ = t(σ̂).
            t_hat = ts[i]
            if sigma_hat <= sigma_i:
                noise.skip()    # step i's draw keeps its number whether or not it is used
            else:
                z = noise.normal(x.shape, x.dtype, x.device)
                t_hat = sde.T if sigma_hat == sigma_max else float(
                    sde.t_from_half_log_snr(torch.tensor(-math.log(sigma_hat), dtype=torch.float64)))
                alpha_hat = state.coefficients(t_hat)[0]
                x = (alpha_hat / alpha_i) * x + (alpha_hat * o.s_noise * math.sqrt(sigma_hat**2 - sigma_i**2)) * z
            # Euler step from σ̂ to σ_{i+1}.
            d, node = state.evaluate(x, t_hat)
            x_euler = state.step(x, t_hat, ts[i + 1], [node], [d])
            # Apply the 2nd-order correction: the trapezoid through both slopes.
            d_next, node_next = state.evaluate(x_euler, ts[i + 1])
            x = state.step(x, t_hat, ts[i + 1], [node, node_next], [d, d_next])
        return x


#: the step-size controller of Jolicoeur-Martineau et al. (2021): h ← θ h E^{−r}
SAFETY, EXPONENT = 0.9, 0.9


@dataclasses.dataclass
class _AdaptiveSDEOptions:
    rtol: float = 0.05                 # ε_rel: the error is measured against max(atol, rtol·max(|x'|, |x'_prev|))
    atol: float = 0.01                 # ε_abs, in the units of x
    error_norm: Literal["batch", "sample"] = "batch"   # the error E: batch RMS of per-sample RMS, or the worst sample's
    h_init: float = 0.01               # the first trial step, as a fraction of T − eps (steps=n sets it to 1/n)
    denoise: bool = True               # finish with Tweedie's step x ← (x + s(eps)² s_θ)/α(eps) (one more NFE)

    def validate(self):
        if not (finite_positive(self.rtol) and finite_positive(self.atol)):
            raise SolverError(f"rtol and atol must be finite and positive, got rtol={self.rtol}, atol={self.atol}.")
        if not (finite_positive(self.h_init) and self.h_init <= 1):
            raise SolverError(f"h_init must be in (0, 1] (a fraction of T − eps), got {self.h_init}.")


@register
class AdaptiveSDE(Solver):
    """The reverse SDE with adaptive steps ("Gotta Go Fast", Jolicoeur-Martineau et al. 2021, Algorithm 1).

    From (x, t), with step h and one draw z (docs/math.md §11.2; drifts in reverse time,
    F(x, t) = −[f(t) x − g(t)² s_θ(x, t)])::

        x'  = x + h F(x, t) + √h g(t) z                        Euler–Maruyama
        x̃   = x + h F(x', t − h) + √h g(t − h) z
        x'' = (x' + x̃)/2                                        improved Euler, the same z
        δ = max(atol, rtol · max(|x'|, |x'_prev|)),   E = RMS((x' − x'')/δ)

    The step is accepted when E ≤ 1 (x ← x'', the higher-order value, and x'_prev ← x'); either way
    h ← min(t − eps, θ h E^{−r}) with θ = r = 0.9. A rejected step redraws z (the next numbered draw
    of the noise source, so a seed fixes the samples) and reuses the score at (x, t): it costs one
    evaluation, an accepted step two. ``error_norm="batch"`` takes E over the whole batch, so the
    steps, and hence a sample's noise, depend on the batch it is drawn in; ``"sample"`` (the worst
    sample's E) makes the steps follow the batch's hardest sample. ``denoise`` ends with Tweedie's
    x̂₀ at eps (one more evaluation), as the paper does. ``steps=n``, when given, only sets the first
    trial step to (T − eps)/n.

    The defaults rtol = 0.05, atol = 0.01 keep the exact ring within 0.01 of its mode weights and 2 %
    of its spread for VP, sub-VP and VE at 105–165 NFE (20 000 samples; benchmarks/results/stochastic.md);
    twice as loose (0.1, 0.02) costs 65–100 NFE but is at the edge for VE (spread −1.9 %). The paper
    used rtol = 0.01–0.05 with atol one grey level of images in [−1, 1] (0.0078).
    """

    name = "sde_adaptive"
    label = "reverse SDE, adaptive steps (EM vs improved Euler)"
    Options = _AdaptiveSDEOptions

    max_evaluations = 10_000

    def nfe_per_step(self) -> int | None:
        return None

    def run(self, sde: SDE, score: CountedScore, x: Tensor, eps: float, steps: int | None,
            noise: NoiseSource) -> Tensor:
        o = self.options
        batch = x.shape[0]
        ones = torch.ones(batch, dtype=x.dtype, device=x.device)

        def coefficients(t: float) -> tuple[float, float]:
            tt = torch.tensor(t, dtype=torch.float64)
            return float(sde.drift_coeff(tt)), math.sqrt(float(sde.diffusion_sq(tt)))

        def reverse_drift(x: Tensor, s: Tensor, f: float, g: float) -> Tensor:
            return g**2 * s - f * x

        span = sde.T - eps
        h = span / steps if steps is not None else o.h_init * span
        t = sde.T
        x_prime_prev = x
        s_x = None                                # the score at (x, t), kept through rejected steps
        while t > eps:
            if score.nfe > self.max_evaluations:
                raise NonFiniteError(f"sde_adaptive took more than {self.max_evaluations} evaluations: the score is "
                                     "not smooth enough for these tolerances (raise rtol/atol), or returns NaN.")
            h = min(h, t - eps)
            last = t - h <= eps + 1e-12 * span
            t_next = eps if last else t - h
            h = t - t_next
            f, g = coefficients(t)
            f_next, g_next = coefficients(t_next)
            if s_x is None:
                s_x = score(x, t * ones)
            z = noise.normal(x.shape, x.dtype, x.device)
            # Euler–Maruyama proposal, then the improved-Euler one on the same increment √h z.
            x_prime = x + h * reverse_drift(x, s_x, f, g) + (math.sqrt(h) * g) * z
            s_prime = score(x_prime, t_next * ones)
            x_tilde = x + h * reverse_drift(x_prime, s_prime, f_next, g_next) + (math.sqrt(h) * g_next) * z
            x_second = (x_prime + x_tilde) / 2
            # The local error relative to the mixed tolerance, elementwise, then RMS per sample.
            delta = torch.clamp(o.rtol * torch.maximum(x_prime.abs(), x_prime_prev.abs()), min=o.atol)
            ratio = ((x_prime - x_second) / delta).reshape(batch, -1).pow(2).mean(1)
            error = float((ratio.max() if o.error_norm == "sample" else ratio.mean()).sqrt())
            if not math.isfinite(error):
                raise NonFiniteError("sde_adaptive met NaN or inf in the score's output or the state.")
            if error <= 1.0:
                x, t, x_prime_prev, s_x = x_second, t_next, x_prime, None
            h = SAFETY * h * max(error, 1e-10) ** -EXPONENT
        if o.denoise:
            alpha = math.exp(float(sde.log_mean_coeff(torch.tensor(eps, dtype=torch.float64))))
            var = float(sde.marginal_var(torch.tensor(eps, dtype=torch.float64)))
            x = (x + var * score(x, eps * ones)) / alpha
        return x
