"""The probability-flow ODE sampler, dx/dt = f(x, t) − ½ g(t)² s_θ(x, t), solved with torchdiffeq.

Everything stays on the data's device: no host round-trip per evaluation. Adaptive methods
(dopri5, bosh3, …) take rtol/atol and land exactly on t = eps (``step_t``), so they never
evaluate the score below eps; fixed-grid methods (euler, midpoint, rk4, …) take ``steps``
steps on any time grid of ``solvers.grids`` (uniform in t by default). Only torchdiffeq's public
``odeint`` and its documented options are used.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Optional

import torch
from torchdiffeq import odeint

from core_lib import finite_positive
from sde_lib import SDE, batch_broadcast
from solvers.base import CountedScore, NonFiniteError, Solver, SolverError, register
from solvers.grids import GridKind, GridOptions, solve_times
from solvers.noise import NoiseSource

Tensor = torch.Tensor

__all__ = ["ProbabilityFlowODE", "pf_ode_drift", "odeint_between", "per_sample_norm", "FIXED_METHODS", "ADAPTIVE_METHODS"]

#: torchdiffeq's fixed-grid methods with a fixed number of evaluations per step, and that number.
#: (Its Adams methods are left out: their evaluations per step vary.)
FIXED_METHOD_NFE = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}
FIXED_METHODS = sorted(FIXED_METHOD_NFE)
#: torchdiffeq's adaptive Runge–Kutta methods (rtol/atol).
ADAPTIVE_METHODS = sorted(["adaptive_heun", "bosh3", "dopri5", "dopri8", "fehlberg2"])


def pf_ode_drift(sde: SDE, score: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """The PF-ODE drift (x, t (B,)) ↦ f(t) x − ½ g(t)² s_θ(x, t), in forward time."""

    def drift(x: Tensor, t: Tensor) -> Tensor:
        f = batch_broadcast(sde.drift_coeff(t).to(x.dtype), x) * x
        half_g2 = batch_broadcast(0.5 * sde.diffusion_sq(t).to(x.dtype), x)
        return f - half_g2 * score(x, t)

    return drift


def check_method(method: str, steps: int | None) -> None:
    """Refuse an unknown torchdiffeq method, or ``steps`` given to an adaptive one."""
    if method not in FIXED_METHODS and method not in ADAPTIVE_METHODS:
        raise SolverError(f"unknown ODE method {method!r}; adaptive: {', '.join(ADAPTIVE_METHODS)}; "
                          f"fixed-grid: {', '.join(FIXED_METHODS)}.")
    if steps is not None and method in ADAPTIVE_METHODS:
        raise SolverError(f"method {method!r} is adaptive and sets its own steps from rtol/atol; to fix the "
                          f"number of steps choose a fixed-grid method ({', '.join(FIXED_METHODS)}).")


def per_sample_norm(batch: int) -> Callable:
    """An error norm for torchdiffeq: the largest per-sample RMS over the batch.

    Each state tensor has the batch on dim 0, or on dim 1 behind a leading probe dimension
    (K, B). With it, rtol/atol bound every sample's local error, not the batch average, so a
    sample's accuracy does not depend on the rest of its batch.
    """

    def norm(state):
        parts = state if isinstance(state, tuple) else (state,)
        worst = [(p.reshape(batch, -1) if p.shape[0] == batch else p.reshape(p.shape[0], batch).T)
                 .pow(2).mean(1).max() for p in parts]
        return torch.stack(worst).max().sqrt()

    return norm


def odeint_between(func, y0, t0: float, t1: float, method: str, rtol: float, atol: float,
                   steps: int | None, error_norm: str = "batch", grid: Tensor | None = None):
    """Integrate dy/dt = func(t, y) from t0 to t1 and return y(t1).

    Adaptive methods are made to land on t1 exactly and measure their local error with the
    batch RMS ("batch", torchdiffeq's default) or the worst sample's RMS ("sample"); fixed-grid
    methods take ``steps`` uniform steps, or step through ``grid`` (t0 first, t1 last) when given.
    A solver failure caused by NaN is a NonFiniteError.
    """
    first = y0[0] if isinstance(y0, tuple) else y0
    t = torch.tensor([t0, t1], dtype=first.dtype, device=first.device)
    lo, hi = min(t0, t1), max(t0, t1)
    inner = func
    # torchdiffeq's initial-step heuristic probes far outside [t0, t1]; a model never sees those times.
    func = lambda tt, y: inner(tt.clamp(lo, hi), y)  # noqa: E731
    if method in FIXED_METHODS:
        if grid is None:
            grid = torch.linspace(t0, t1, steps + 1, dtype=first.dtype, device=first.device)
        grid = grid.to(dtype=first.dtype, device=first.device)
        options = {"grid_constructor": lambda f, y, tt: grid}
    else:
        options = {"step_t": t[1:]}
        if error_norm == "sample":
            options["norm"] = per_sample_norm(first.shape[0])
    try:
        out = odeint(func, y0, t, method=method, rtol=rtol, atol=atol, options=options)
    except AssertionError as err:  # torchdiffeq's step-size underflow, which NaNs cause
        if "underflow" in str(err):
            raise NonFiniteError(f"the ODE solver's step size underflowed ({err}): the score function returned "
                                 "NaN or inf, or the ODE is too stiff for these tolerances.") from None
        raise
    return tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1]


@dataclasses.dataclass
class _ODEOptions(GridOptions):
    method: str = "dopri5"  # a torchdiffeq method: adaptive (dopri5, bosh3, …) or fixed-grid (euler, rk4, …)
    rtol: float = 1e-5      # relative tolerance of adaptive methods
    atol: float = 1e-5      # absolute tolerance of adaptive methods
    denoise: bool = False   # finish with Tweedie's step x ← (x + s(eps)² s_θ)/α(eps) (one more NFE)
    error_norm: Literal["batch", "sample"] = "batch"  # adaptive error: batch RMS, or the worst sample's
    grid: Optional[GridKind] = None    # fixed-grid methods: t, log_snr, edm, focus or user; null: uniform t

    def validate(self):
        check_method(self.method, None)
        if not (finite_positive(self.rtol) and finite_positive(self.atol)):
            raise SolverError(f"rtol and atol must be finite and positive, got rtol={self.rtol}, atol={self.atol}.")
        if self.grid is not None and self.method in ADAPTIVE_METHODS:
            raise SolverError(f"grid={self.grid!r} needs a fixed-grid method ({', '.join(FIXED_METHODS)}); "
                              f"the adaptive {self.method!r} chooses its own steps.")
        if self.warp is not None and self.method in ADAPTIVE_METHODS:
            raise SolverError(f"warp needs a fixed-grid method ({', '.join(FIXED_METHODS)}); "
                              f"the adaptive {self.method!r} chooses its own steps.")
        GridOptions.validate(self)


@register
class ProbabilityFlowODE(Solver):
    """Sampling by the probability-flow ODE from T to eps (docs/math.md §1, §4); deterministic given z."""

    name = "pf_ode"
    label = "PF-ODE through torchdiffeq"
    deterministic = True
    Options = _ODEOptions
    default_fixed_steps = 100

    def nfe_per_step(self) -> int | None:
        return FIXED_METHOD_NFE.get(self.options.method)

    def likelihood_options(self, steps: int | None) -> dict:
        o = self.options
        if o.method in FIXED_METHODS:
            return {"method": o.method, "steps": steps or self.default_fixed_steps}
        return {"method": o.method, "rtol": o.rtol, "atol": o.atol}

    def run(self, sde: SDE, score: CountedScore, x: Tensor, eps: float, steps: int | None,
            noise: NoiseSource) -> Tensor:
        opts = self.options
        check_method(opts.method, steps)
        grid = None
        if opts.method in FIXED_METHODS and opts.grid is not None:
            grid = solve_times(opts, sde, eps, steps, self.default_fixed_steps, score.sigma_data, x[0].numel())
        elif opts.method in FIXED_METHODS and steps is None:
            steps = self.default_fixed_steps
        drift = pf_ode_drift(sde, score)
        ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        x = odeint_between(lambda t, y: drift(y, t * ones), x, sde.T, eps, opts.method, opts.rtol,
                           opts.atol, steps, opts.error_norm, grid=grid)
        if opts.denoise:
            t = eps * ones
            alpha, var = sde.log_mean_coeff(t).exp().to(x.dtype), sde.marginal_var(t).to(x.dtype)
            x = (x + batch_broadcast(var, x) * score(x, t)) / batch_broadcast(alpha, x)
        return x
