"""A grid fitted to one model and budget: the default grid warped to minimise the error on pilot samples.

The fixed grids (solvers/grids.py) are chosen once for every model; where a solve's error is decided by the
model's own score (where its modes separate, how rough its x̂₀ is in λ), a grid fitted to that model does better.
``calibrate_grid`` draws pilot starting points from the prior, solves their flow tightly once (``pf_ode``, an
adaptive method at ``reference_rtol``), and for each budget fits the knots of a warp of the solver's own grid
(``GridOptions.warp``: each step's length in λ scaled by e^{w}, w piecewise linear over the steps) by
Nelder–Mead on the log RMS distance of the solver's samples to that flow (docs/math.md §4.3.1; the idea of a
schedule fitted per model is Sabour et al. 2024, "Align Your Steps"). The solver keeps everything else of its
own (orders, start step, fit).

    cal = calibrate_grid(sde, model.score_fn, [8, 20], event_shape=(2,))
    out = sample(sde, model.score_fn, (1000, 2), solver="multistep", steps=8, warp=cal.warp(8))
    cal.save("grid_calibration.json")        # GridCalibration.load(...) gives it back

The cost is paid once per model and budget: the reference flows of the pilot and of a validation draw, and
``evaluations`` solves of the pilot at the budget and two of the validation draw (``nfe`` records them all, in score
evaluations of a batch). The warp is kept only if it lowers the error on both draws: fitted on the pilot, it can
fit the pilot's few samples near a ridge between modes, which decide a trained network's error and which another
draw does not share (benchmarks/results/peers_calibrated.md).
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Iterable

import numpy
import torch
from scipy.optimize import minimize

from sde_lib import SDE
from solvers.base import SolverError, get_solver, sample

Tensor = torch.Tensor

__all__ = ["GridCalibration", "calibrate_grid", "check_request", "pilot_error"]

#: the Nelder–Mead simplex's first step in each knot (a 35 % change of the step lengths there)
SIMPLEX_STEP = 0.3


@dataclasses.dataclass
class GridCalibration:
    """Warps fitted per budget (``warps[steps]``, knots for ``GridOptions.warp``) for one solver and span."""

    solver: str
    eps: float
    options: dict
    warps: dict[int, list[float]]
    #: per budget: the pilot's RMS error with the solver's own grid and with the warp, and the NFE the fit cost
    pilot_errors: dict[int, tuple[float, float]]
    nfe: dict[int, int]
    pilot: int
    seed: int
    #: the NFE of the pilot's and the validation draw's reference flows (part of every budget's ``nfe``)
    reference_nfe: int
    #: per budget: the validation draw's RMS error with the solver's own grid and with the fitted warp (kept only
    #: if both the pilot's and this one fall); empty without a validation draw
    validation_errors: dict[int, tuple[float, float]] = dataclasses.field(default_factory=dict)
    validation: int = 0

    def warp(self, steps: int) -> list[float]:
        if steps not in self.warps:
            raise SolverError(f"no warp for steps={steps}: this calibration has {sorted(self.warps)}; "
                              f"calibrate_grid(..., [{steps}]) fits one.")
        return list(self.warps[steps])

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1) + "\n"

    def save(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "GridCalibration":
        raw = json.loads(pathlib.Path(path).read_text())
        for key in ("warps", "pilot_errors", "nfe", "validation_errors"):
            raw[key] = {int(k): v for k, v in raw.get(key, {}).items()}
        for key in ("pilot_errors", "validation_errors"):
            raw[key] = {k: tuple(v) for k, v in raw[key].items()}
        return cls(**raw)


def pilot_error(samples: Tensor, reference: Tensor, alpha: float) -> float:
    """RMS over samples of the Euclidean distance in x̃ = x/α (the σ-space of docs/math.md §9)."""
    return ((samples - reference) / alpha).flatten(1).pow(2).sum(1).mean().sqrt().item()


def calibrate_grid(sde: SDE, score_fn, budgets: Iterable[int], *, event_shape: tuple[int, ...],
                   eps: float | None = None, solver: str = "multistep", options: dict | None = None,
                   pilot: int = 256, seed: int = 777, knots: int = 8, evaluations: int = 200,
                   validation: int | None = None,
                   reference_rtol: float | None = None, reference_method: str = "dopri8",
                   device: torch.device | str | None = None, dtype: torch.dtype = torch.float64,
                   sigma_data: float | None = None) -> GridCalibration:
    """Fit a warp of ``solver``'s grid for each budget in ``budgets`` (steps) on ``pilot`` samples drawn from ``seed``.

    ``knots``: the warp's knots (at most one per step); ``evaluations``: Nelder–Mead's solves of the pilot per
    budget. ``validation``: samples of a second draw (seed + 1, None: as many as the pilot, 0: none) on which the
    fitted warp must beat the solver's own grid too, or it is not kept. ``options``: the solver's other options, as
    the samples will be drawn with them (a warp fitted to one set of options is not meant for another).
    ``reference_rtol`` None: 1e-8 in float64, 1e-6 in float32 (whose rounding a tighter tolerance would chase).
    """
    options = dict(options or {})
    budgets = sorted({int(b) for b in budgets})
    eps = sde.default_eps if eps is None else eps
    validation = pilot if validation is None else validation
    if reference_rtol is None:
        reference_rtol = 1e-8 if dtype == torch.float64 else 1e-6
    check_request(solver, options, budgets, pilot, knots, evaluations, reference_rtol, validation)
    alpha = float(sde.log_mean_coeff(torch.tensor(eps, dtype=torch.float64)).exp())

    def draw(n: int, draw_seed: int):
        """Starting noise of n samples from draw_seed, and a function of a warp giving their RMS error."""
        z = sde.prior_sampling((n, *event_shape), generator=torch.Generator().manual_seed(draw_seed),
                               dtype=dtype).to(device)
        ref = sample(sde, score_fn, solver="pf_ode", method=reference_method, rtol=reference_rtol,
                     atol=reference_rtol, eps=eps, z=z, sigma_data=sigma_data)

        def error(steps: int, warp) -> float:
            out = sample(sde, score_fn, solver=solver, steps=steps, warp=[float(v) for v in warp], eps=eps, z=z,
                         sigma_data=sigma_data, **options)
            spent[0] += out.nfe
            return pilot_error(out.samples, ref.samples, alpha)
        return error, ref.nfe

    spent = [0]
    fitted, reference_nfe = draw(pilot, seed)
    validated, nfe_v = draw(validation, seed + 1) if validation else (None, 0)
    reference_nfe += nfe_v
    warps, errors, checked, nfe = {}, {}, {}, {}
    for steps in budgets:
        spent[0] = reference_nfe

        def log_error(w) -> float:
            e = fitted(steps, w)
            return math.log(e) if math.isfinite(e) and e > 0 else 1e3

        k = min(knots, steps)
        start = numpy.zeros(k)
        base = math.exp(log_error(start))
        simplex = numpy.vstack([start, SIMPLEX_STEP * numpy.eye(k)])
        fit = minimize(log_error, start, method="Nelder-Mead",
                       options={"maxfev": max(evaluations - 1, k + 1), "initial_simplex": simplex,
                                "xatol": 1e-3, "fatol": 1e-4})
        best, warp = math.exp(fit.fun), [round(float(v), 6) for v in fit.x]
        keep = best < base
        if validated is not None:
            checked[steps] = (validated(steps, start), validated(steps, warp))
            keep = keep and checked[steps][1] < checked[steps][0]
        warps[steps] = warp if keep else [0.0] * k
        errors[steps] = (base, best if keep else base)
        nfe[steps] = spent[0]
    return GridCalibration(solver, float(eps), options, warps, errors, nfe, pilot, seed, reference_nfe, checked,
                           validation)


def check_request(solver: str, options: dict, budgets: list[int], pilot: int, knots: int, evaluations: int,
                  rtol: float | None, validation: int | None = None) -> None:
    """Refuse a calibration that could not be run, before any work."""
    cls = get_solver(solver)
    if "warp" not in getattr(cls.Options, "__dataclass_fields__", {}) or not cls.deterministic:
        raise SolverError(f"solver {solver!r} has no fixed grid to warp; calibrate a deterministic fixed-grid solver "
                          "such as 'multistep', 'ddim' or 'heun'.")
    if "warp" in options or options.get("grid") == "user":
        raise SolverError("options must not set warp or grid='user': the calibration fits the warp of a grid of ours.")
    try:
        cls(**options, warp=[0.0])   # the options' own checks, a warp among them
    except SolverError as err:
        raise SolverError(f"{err} Calibrate a fixed-grid solver such as 'multistep', or fix the option.") from None
    if not budgets or any(b < 2 for b in budgets):
        raise SolverError(f"budgets must be step counts ≥ 2, got {budgets}.")
    for name, value, least in (("pilot", pilot, 2), ("knots", knots, 1), ("evaluations", evaluations, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise SolverError(f"{name} must be an integer ≥ {least}, got {value!r}.")
    if validation is not None and (not isinstance(validation, int) or isinstance(validation, bool) or validation < 0
                                   or validation == 1):
        raise SolverError(f"validation must be 0 (none) or an integer ≥ 2, got {validation!r}.")
    if rtol is not None and not 0 < rtol < 1:
        raise SolverError(f"reference_rtol must be in (0, 1), got {rtol!r}.")
