"""``task=calibrate``: a grid fitted to the model at each budget, and its use by ``task=sample``.

``python run.py task=calibrate ckpt=... solver=multistep task.budgets=[8,20]`` fits, for each budget, a warp of the
solver's grid on ``task.pilot`` samples against their exact flow (``solvers.calibrate``, docs/math.md §4.3.1) and
writes ``grid_calibration.json``; ``task=sample solver.steps=8 task.calibration=<run>/grid_calibration.json`` then
samples on the warped grid. A calibration belongs to one model, solver, set of options and eps: ``calibrated_warp``
refuses it for any other solve, before any work (tasks_lib/sample.py; it cannot tell two models apart: that is the
user's part).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import solvers
from core_lib import UserError
from evaluation import RunOutput
from solvers.calibrate import calibrate_grid, check_request
from tasks_lib.model_source import resolve_model
from tasks_lib.sample import (CALIBRATION_FILE, check_solver_options, dtype_of, header, non_default_options,
                             write_config)

__all__ = ["calibrate_task", "check_calibration"]


def _fitted_options(cfg: DictConfig) -> dict[str, Any]:
    """The solver's options that differ from its defaults: what the calibration records."""
    return non_default_options(cfg.solver.name, OmegaConf.to_container(cfg.solver.options, resolve=True))


def check_calibration(cfg: DictConfig) -> None:
    """``task=calibrate``'s solver and settings, before any work."""
    check_solver_options(cfg)
    tc = cfg.task
    try:
        check_request(cfg.solver.name, _fitted_options(cfg), list(tc.budgets), tc.pilot, tc.knots, tc.evaluations,
                      tc.reference_rtol)
    except solvers.SolverError as err:
        raise UserError(f"task=calibrate with solver={cfg.solver.name}: {err}") from None


def calibrate_task(cfg: DictConfig, run_dir: Path, overridden: set[str]) -> dict[str, Any]:
    """Fit a warp per budget in ``task.budgets`` and write them to ``grid_calibration.json``."""
    out = RunOutput(run_dir)
    model = resolve_model(cfg, overridden, cfg.device)
    tc = cfg.task
    cal = calibrate_grid(model.sde, model.score_fn, list(tc.budgets), event_shape=tuple(model.event_shape),
                         eps=tc.eps, solver=cfg.solver.name, options=_fitted_options(cfg), pilot=tc.pilot,
                         seed=cfg.seed, knots=tc.knots, evaluations=tc.evaluations, reference_rtol=tc.reference_rtol,
                         device=cfg.device, dtype=dtype_of(cfg))
    metrics = {**header(cfg, model), "solver": cfg.solver.name, "eps": cal.eps, "pilot": cal.pilot,
               "reference_nfe": cal.reference_nfe}
    for steps in sorted(cal.warps):
        before, after = cal.pilot_errors[steps]
        metrics.update({f"pilot_error_{steps}": before, f"pilot_error_calibrated_{steps}": after,
                        f"fit_nfe_{steps}": cal.nfe[steps]})
    out.write_text(CALIBRATION_FILE, cal.to_json())
    write_config(out, cfg, model)
    return out.metrics(metrics)
