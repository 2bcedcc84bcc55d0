"""Time grids apart from samplers: where the steps of a fixed-step solve go, from T down to eps.

Any solver with a fixed number of steps takes its grid from here through :class:`GridOptions`
(the options ``grid``, ``rho``, ``focus``, ``focus_width_noise``, ``focus_width_data``, ``coverage``,
``uniform_share``, ``times``, ``warp``)
and :func:`solve_times`: ``multistep``, ``ddim``, ``heun``, ``pf_ode`` with a fixed-grid method,
and ``euler_maruyama``. A new grid is one branch of :func:`time_grid` (docs/math.md §4.3).
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Literal, Optional

import torch

from sde_lib import SDE
from solvers.base import SolverError

Tensor = torch.Tensor

__all__ = ["GRIDS", "GridKind", "GridOptions", "time_grid", "solve_times", "with_start_step", "half_log_snr_at",
           "warped", "MAX_WARP_KNOTS"]

GRIDS = ("t", "log_snr", "edm", "focus", "user")
GridKind = Literal["t", "log_snr", "edm", "focus", "user"]


def half_log_snr_at(sde: SDE, t: float) -> float:
    """λ(t) = log(α/s) at one time, as a Python float."""
    return float(sde.half_log_snr(torch.tensor(t, dtype=torch.float64)))


def time_grid(sde: SDE, eps: float, steps: int, kind: str, rho: float = 7.0,
              times: Optional[List[float]] = None, focus_sigma: float = 2.5,
              focus_width: tuple[float, float] = (1.5, 1.6), coverage: float = 0.0,
              uniform_share: float = 0.0, dtype=torch.float64) -> Tensor:
    """steps + 1 times from T down to eps (float64).

    kinds: "t" uniform in t; "log_snr" uniform in the half log-SNR λ; "edm" EDM's ρ-spacing of
    σ = s/α, σ_i^{1/ρ} uniform (Karras et al. 2022, eq. 5); "focus": step density in λ
    ∝ sech((λ − λ_c)/w) with λ_c = −log(focus_sigma), i.e. steps concentrated around the noise
    level where the data's modes separate, and w = focus_width[0] on the noisy side (λ < λ_c),
    focus_width[1] on the data side (w → ∞ gives "log_snr"; w = 1 on both sides is a grid
    uniform in arctan(σ/focus_sigma)); "user": ``times`` as given (T first, strictly
    decreasing, eps last; ``steps`` is then len(times) − 1). ``coverage`` and ``uniform_share``
    (focus only) mix the focus density with the "edm" and the "log_snr" densities, in those
    proportions: the focus thins out exponentially towards both ends, where a trained network is
    rougher in λ than an exact score, and a uniform share keeps every step in λ at most
    1/uniform_share times the uniform grid's, which keeps a multistep fit in λ stable (docs/math.md §4.3).
    """
    if kind == "t":
        return torch.linspace(sde.T, eps, steps + 1, dtype=dtype)
    if kind == "user":
        if not times or len(times) < 2:
            raise SolverError("grid='user' needs times=[T, ..., eps], at least two decreasing times.")
        t = torch.tensor([float(v) for v in times], dtype=torch.float64)
        if not bool((t[1:] < t[:-1]).all()) or abs(t[0].item() - sde.T) > 1e-12 or abs(t[-1].item() - eps) > 1e-12:
            raise SolverError(f"times must decrease strictly from T = {sde.T} to eps = {eps}, got {list(times)}.")
        return t.to(dtype)
    lam_T, lam_eps = half_log_snr_at(sde, sde.T), half_log_snr_at(sde, eps)
    if kind == "log_snr":
        lam = torch.linspace(lam_T, lam_eps, steps + 1, dtype=torch.float64)
    elif kind == "edm":
        if not rho > 0:
            raise SolverError(f"rho must be positive, got {rho}.")
        hi, lo = math.exp(-lam_T / rho), math.exp(-lam_eps / rho)       # σ^{1/ρ} at T and at eps
        lam = -rho * torch.log(torch.linspace(hi, lo, steps + 1, dtype=torch.float64))
    elif kind == "focus":
        noisy, clean = focus_width
        if not (focus_sigma > 0 and noisy > 0 and clean > 0):
            raise SolverError(f"focus_sigma and the focus widths must be positive, got {focus_sigma}, {focus_width}.")
        if not (0 <= coverage <= 1 and 0 <= uniform_share <= 1 and coverage + uniform_share <= 1):
            raise SolverError(f"coverage and uniform_share must be in [0, 1] with a sum at most 1, got {coverage} "
                              f"and {uniform_share}.")
        lam_c = -math.log(focus_sigma)
        if coverage > 0 or uniform_share > 0:
            lam = _mixed_focus(steps, lam_T, lam_eps, lam_c, focus_width, rho, coverage, uniform_share)
        else:
            # Equal steps of the density's CDF, inverted in closed form: w·asinh(tan(g/w)).
            ends = _focus_cdf(torch.tensor([lam_T, lam_eps], dtype=torch.float64) - lam_c, focus_width)
            cdf = torch.linspace(ends[0].item(), ends[1].item(), steps + 1, dtype=torch.float64)
            w = torch.full_like(cdf, clean).masked_fill(cdf < 0, noisy)
            lam = lam_c + w * torch.asinh(torch.tan(cdf / w))
    else:
        raise SolverError(f"grid must be one of {', '.join(GRIDS)}, got {kind!r}.")
    t = sde.t_from_half_log_snr(lam)
    t[0], t[-1] = sde.T, eps                 # exact end points, whatever the inverse's rounding
    return t.to(dtype)


def with_start_step(sde: SDE, times: Tensor, fraction: float) -> Tensor:
    """``times`` with one more time, ``fraction`` of the way from T to times[1] in λ: a short first step.

    Near T a network that predicts the noise gives x̂₀ = x̃ − σ ε̂, its error multiplied by σ, and that x̂₀ moves
    fast over the first few per cent of σ; a step from T as long as the grid's first misses that motion
    (docs/math.md §4.3, benchmarks/results/peers_log.md §14).
    """
    lam = sde.half_log_snr(times[:2].to(torch.float64))
    inner = sde.t_from_half_log_snr(lam[:1] + fraction * (lam[1] - lam[0])).to(times.dtype)
    return torch.cat([times[:1], inner, times[1:]])


#: the most knots a grid's warp may have (``GridOptions.warp``)
MAX_WARP_KNOTS = 64


def warped(sde: SDE, times: Tensor, warp: List[float]) -> Tensor:
    """``times`` with each step's length in λ multiplied by e^{w}, w the piecewise-linear interpolant of ``warp``'s
    knots (equally spaced from the first step to the last), then all scaled back to the same span: T and eps stay.

    All-zero knots give ``times`` back. A warp is what ``solvers.calibrate`` fits to one model and budget.
    """
    if not any(warp):
        return times
    lam = sde.half_log_snr(times.to(torch.float64))
    steps = lam[1:] - lam[:-1]
    knots = torch.tensor(warp, dtype=torch.float64)
    where = torch.linspace(0, len(warp) - 1, len(steps), dtype=torch.float64)
    low = where.floor().long().clamp(max=len(warp) - 1)
    high = (low + 1).clamp(max=len(warp) - 1)
    w = knots[low] + (where - low) * (knots[high] - knots[low])
    scaled = steps * w.exp()
    scaled = scaled * (steps.sum() / scaled.sum())
    out = sde.t_from_half_log_snr(torch.cat([lam[:1], lam[0] + torch.cumsum(scaled, 0)])).to(times.dtype)
    out[0], out[-1] = times[0], times[-1]
    return out


def _focus_cdf(v: Tensor, widths: tuple[float, float]) -> Tensor:
    """The focus density's CDF from v = λ − λ_c = 0: w·gd(v/w), gd(v) = atan(sinh v) the Gudermannian,
    with w = widths[0] on the noisy side (v < 0) and widths[1] on the data side."""
    w = torch.full_like(v, widths[1]).masked_fill(v < 0, widths[0])
    return w * torch.atan(torch.sinh(v / w))


def _mixed_focus(steps: int, lam_T: float, lam_eps: float, lam_c: float, widths: tuple[float, float],
                 rho: float, coverage: float, uniform_share: float) -> Tensor:
    """steps + 1 values of λ for the density (1 − coverage − uniform_share)·focus + coverage·edm +
    uniform_share·uniform, by bisection on its CDF.

    The three CDFs are closed forms on [λ_T, λ_eps], normalised to [0, 1]: the focus's is ``_focus_cdf``,
    the edm grid's is linear in σ^{1/ρ} = e^{−λ/ρ}, the uniform one linear in λ. Their mixture is
    increasing, so 60 bisections place each of the equally spaced levels to float64 precision.
    """
    lo_f, hi_f = _focus_cdf(torch.tensor([lam_T, lam_eps], dtype=torch.float64) - lam_c, widths).tolist()
    lo_e, hi_e = math.exp(-lam_T / rho), math.exp(-lam_eps / rho)

    def cdf(x: Tensor) -> Tensor:
        f = (_focus_cdf(x - lam_c, widths) - lo_f) / (hi_f - lo_f)
        e = (lo_e - torch.exp(-x / rho)) / (lo_e - hi_e)
        u = (x - lam_T) / (lam_eps - lam_T)
        return (1 - coverage - uniform_share) * f + coverage * e + uniform_share * u

    levels = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    a, b = torch.full_like(levels, lam_T), torch.full_like(levels, lam_eps)
    for _ in range(60):
        mid = (a + b) / 2
        below = cdf(mid) < levels
        a, b = torch.where(below, mid, a), torch.where(below, b, mid)
    return (a + b) / 2


#: the default focus grid by budget: (fewest steps, settings), the last row that applies; a setting the user gives is
#: kept at every budget. Half the steps are uniform in λ at every budget (§6); from 6 to 39 steps the focus sits lower
#: and narrower on the data side (§12: at 5 steps that grid's first step lands too far from a network's own flow);
#: from 40 the data side widens (§11) and 35 % of the steps are edm-spaced (§7) (benchmarks/results/peers_log.md).
#: ``focus`` is in units of σ_data·√(D/2).
GRID_BY_STEPS = (
    (1, {"focus": 0.8, "focus_width_data": 1.6, "coverage": 0.0, "uniform_share": 0.5}),
    (6, {"focus": 0.3, "focus_width_data": 1.0, "coverage": 0.0, "uniform_share": 0.5}),
    (40, {"focus": 0.8, "focus_width_data": 2.5, "coverage": 0.35, "uniform_share": 0.5}))
#: where the sampler's last budget row starts (its many-step regime: solvers/exponential.py's FIT_BY_STEPS too)
MANY_STEPS = GRID_BY_STEPS[-1][0]


def by_budget(table, steps: int):
    """The settings of the last row of ``table`` (rows (fewest steps, settings), ascending) that ``steps`` reaches."""
    return [settings for fewest, settings in table if steps >= fewest][-1]


@dataclasses.dataclass
class GridOptions:
    """Where the steps go (see :func:`time_grid`); the ``focus`` grid is placed relative to the solve's σ_data."""

    grid: GridKind = "focus"
    rho: float = 7.0                   # grid="edm": ρ
    focus: Optional[float] = None      # grid="focus": steps concentrate at σ = s/α = focus · sigma_data · √(D/2), D the data's
                                       # dimension; None: 0.8, 0.3 from 6 to 39 steps (GRID_BY_STEPS)
    focus_width_noise: float = 1.5     # grid="focus": the concentration's width towards the noise, in log-SNR units
    focus_width_data: Optional[float] = None   # grid="focus": and towards the data; None: 1.6, 1.0 from 6 to 39 steps,
                                               # 2.5 from 40
    times: Optional[List[float]] = None   # grid="user": [T, ..., eps]
    coverage: Optional[float] = None   # grid="focus": share of the steps spread as grid="edm"; None: 0.35 from 40 steps, else 0
    uniform_share: Optional[float] = None   # grid="focus": share spread as grid="log_snr"; None: 0.5
    warp: Optional[List[float]] = None   # any grid but "user": knots of the log step-length change in λ (see warped);
                                         # solvers.calibrate fits one per model and budget; None: no warp

    def validate(self):
        for name in ("coverage", "uniform_share"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise SolverError(f"{name} must be in [0, 1] or None, got {value}.")
        if not all(math.isfinite(v) and v > 0
                   for v in (self.rho, self.focus, self.focus_width_noise, self.focus_width_data) if v is not None):
            raise SolverError(f"rho, focus, focus_width_noise and focus_width_data must be finite and positive, got "
                              f"{self.rho}, {self.focus}, {self.focus_width_noise}, {self.focus_width_data}.")
        if self.grid == "user" and not self.times:
            raise SolverError("grid='user' needs times=[T, ..., eps].")
        if self.warp is not None:
            if self.grid == "user":
                raise SolverError("warp changes a grid of ours; with grid='user' put the warped times in times "
                                  "instead.")
            if (not isinstance(self.warp, (list, tuple)) or not 1 <= len(self.warp) <= MAX_WARP_KNOTS
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) and abs(v) <= 10 for v in self.warp)):
                raise SolverError(f"warp must be a list of 1 to {MAX_WARP_KNOTS} numbers in [-10, 10] (log step-length "
                                  f"changes; solvers.calibrate.calibrate_grid makes one) or None, got {self.warp!r}.")


def solve_times(options: GridOptions, sde: SDE, eps: float, steps: int | None, default_steps: int,
                sigma_data: float, dim: int = 2) -> Tensor:
    """The grid of one solve (float64, T first, eps last) from a solver's grid options.

    ``steps`` None takes ``default_steps``; with ``grid="user"`` the number of steps is len(times) − 1,
    and a different ``steps`` is refused. ``sigma_data`` and the data's dimension ``dim`` place the ``focus``
    grid: at σ = focus · sigma_data · √(dim/2), where two data points a typical distance √(2·dim)·sigma_data
    apart stop being told apart by the noise (for the 2-D ring the factor is 1).
    """
    kind = options.grid
    if kind == "user":
        if not options.times:
            raise SolverError("grid='user' needs times=[T, ..., eps].")
        if steps is not None and steps != len(options.times) - 1:
            raise SolverError(f"steps={steps} but times has {len(options.times) - 1} steps; give one or the other.")
        return time_grid(sde, eps, len(options.times) - 1, "user", times=options.times)
    steps = steps or default_steps
    row = by_budget(GRID_BY_STEPS, steps)
    focus, width_data, coverage, uniform = (getattr(options, name) if getattr(options, name) is not None else row[name]
                                            for name in ("focus", "focus_width_data", "coverage", "uniform_share"))
    times = time_grid(sde, eps, steps, kind, options.rho, focus_sigma=focus * sigma_data * math.sqrt(dim / 2),
                      focus_width=(options.focus_width_noise, width_data), coverage=coverage,
                      uniform_share=uniform)
    return times if options.warp is None else warped(sde, times, list(options.warp))
