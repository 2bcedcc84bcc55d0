"""A grid warped per model and budget (GridOptions.warp), and its fit on pilot samples (solvers.calibrate)."""

import math

import pytest
import torch

import solvers
from models import MixtureScore, ring_mixture
from sde_lib import VESDE, VPSDE
from solvers.calibrate import GridCalibration, calibrate_grid, pilot_error
from solvers.grids import GridOptions, solve_times, time_grid, warped

F64 = torch.float64


@pytest.fixture
def vp():
    sde = VPSDE()
    return sde, MixtureScore(sde, ring_mixture())


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_warp_scales_each_step_in_lambda_and_keeps_the_span(sde):
    times = time_grid(sde, sde.default_eps, 6, "log_snr")
    assert torch.equal(warped(sde, times, [0.0, 0.0, 0.0]), times)
    knots = [0.3, -0.2, 0.1, 0.0, 0.5, -0.4]          # one knot per step: step i scaled by e^{w_i}
    out = warped(sde, times, knots)
    assert out[0] == times[0] and out[-1] == times[-1]
    assert (out[1:] < out[:-1]).all()
    lam, lam0 = sde.half_log_snr(out), sde.half_log_snr(times)
    ratios = (lam[1:] - lam[:-1]) / (lam0[1:] - lam0[:-1])
    expected = torch.tensor(knots, dtype=F64).exp()
    torch.testing.assert_close(ratios / ratios[0], expected / expected[0], rtol=1e-9, atol=0)
    torch.testing.assert_close(lam[-1] - lam[0], lam0[-1] - lam0[0], rtol=1e-12, atol=0)


def test_warp_knots_interpolate_linearly_over_the_steps(vp):
    sde, _ = vp
    times = time_grid(sde, 1e-3, 5, "log_snr")
    lam = sde.half_log_snr(warped(sde, times, [0.0, 1.0]))
    h = lam[1:] - lam[:-1]                           # uniform in λ before: the warp alone sets the ratios
    torch.testing.assert_close(h / h[0], torch.exp(torch.linspace(0, 1, 5, dtype=F64)), rtol=1e-9, atol=0)


def test_solve_times_applies_the_warp_to_the_budgets_grid(vp):
    sde, _ = vp
    plain = solve_times(GridOptions(), sde, 1e-3, 12, 12, 1.0)
    knots = [0.2, -0.1, 0.4]
    torch.testing.assert_close(solve_times(GridOptions(warp=knots), sde, 1e-3, 12, 12, 1.0),
                               warped(sde, plain, knots), rtol=0, atol=0)


@pytest.mark.parametrize("options,match", [
    ({"grid": "user", "times": [1.0, 0.5, 1e-3], "warp": [0.1]}, "with grid='user' put the warped times"),
    ({"warp": [math.nan]}, "warp must be a list of 1 to 64 numbers"),
    ({"warp": []}, "warp must be a list of 1 to 64 numbers"),
    ({"warp": [0.0] * 65}, "warp must be a list of 1 to 64 numbers"),
    ({"warp": [50.0]}, "warp must be a list of 1 to 64 numbers"),
])
def test_bad_warp_is_refused_before_any_work(vp, options, match):
    calls = []
    with pytest.raises(solvers.SolverError, match=match):
        solvers.sample(*vp[:1], lambda x, t: calls.append(1) or x, (4, 2), solver="multistep", steps=2, **options)
    assert not calls


def test_an_adaptive_ode_refuses_a_warp(vp):
    with pytest.raises(solvers.SolverError, match="warp needs a fixed-grid method"):
        solvers.sample(*vp, (4, 2), solver="pf_ode", warp=[0.1])


def test_calibrated_grid_beats_the_default_on_samples_it_was_not_fitted_on(vp, tmp_path):
    """The exact ring at 10 steps: a warp fitted on 64 pilot samples lowers the error on 512 others (measured
    0.54× the default's); the fit's accounting adds up, and the calibration survives a save and load."""
    sde, score = vp
    cal = calibrate_grid(sde, score, [10], event_shape=(2,), pilot=64, evaluations=40, seed=3)
    before, after = cal.pilot_errors[10]
    assert after < before and cal.validation == 64
    assert cal.validation_errors[10][1] < cal.validation_errors[10][0]   # the warp kept beats the grid on both draws
    assert len(cal.warp(10)) == 8
    fit = cal.nfe[10] - cal.reference_nfe   # the default's solve, Nelder–Mead's and 2 validations, 10 NFE each
    assert fit % 10 == 0 and 12 * 10 <= fit <= 42 * 10
    z = sde.prior_sampling((512, 2), generator=torch.Generator().manual_seed(5), dtype=F64)
    ref = solvers.sample(sde, score, z=z, solver="pf_ode", method="dopri8", rtol=1e-8, atol=1e-8).samples
    default = pilot_error(solvers.sample(sde, score, z=z, solver="multistep", steps=10).samples, ref, 1.0)
    tuned = pilot_error(solvers.sample(sde, score, z=z, solver="multistep", steps=10, warp=cal.warp(10)).samples,
                        ref, 1.0)
    assert tuned < 0.8 * default
    cal.save(tmp_path / "cal.json")
    assert GridCalibration.load(tmp_path / "cal.json") == cal


def test_a_warp_that_loses_on_the_validation_draw_is_not_kept(vp):
    """With a pilot of 2 samples the fit follows those two; a warp is kept only where a validation draw of 64
    agrees, and the grid itself (zero knots) otherwise, whatever the pilot says."""
    sde, score = vp
    cal = calibrate_grid(sde, score, [5, 6, 8], event_shape=(2,), pilot=2, validation=64, evaluations=30, seed=11)
    assert {any(cal.warp(steps)) for steps in (5, 6, 8)} == {True, False}   # measured: 6 steps' warp loses there
    for steps in (5, 6, 8):
        before, after = cal.validation_errors[steps]
        kept = any(cal.warp(steps))
        assert kept == (after < before and cal.pilot_errors[steps][1] < cal.pilot_errors[steps][0])
        assert kept or cal.pilot_errors[steps][0] == cal.pilot_errors[steps][1]


def test_asking_for_an_uncalibrated_budget_names_the_fix(vp):
    cal = GridCalibration("multistep", 1e-3, {}, {8: [0.0]}, {8: (1.0, 1.0)}, {8: 10}, 8, 0, 5)
    with pytest.raises(solvers.SolverError, match=r"no warp for steps=10: this calibration has \[8\]"):
        cal.warp(10)


@pytest.mark.parametrize("kwargs,match", [
    ({"solver": "euler_maruyama"}, "has no fixed grid to warp"),
    ({"solver": "nope"}, "unknown solver 'nope'"),
    ({"options": {"warp": [0.1]}}, "options must not set warp"),
    ({"options": {"order": 7}}, "order must be one of"),
    ({"budgets": [1]}, "budgets must be step counts ≥ 2"),
    ({"pilot": 1}, "pilot must be an integer ≥ 2"),
    ({"knots": 0}, "knots must be an integer ≥ 1"),
    ({"reference_rtol": 0.0}, "reference_rtol must be in"),
    ({"validation": 1}, "validation must be 0"),
])
def test_bad_calibration_is_refused_before_any_work(kwargs, match):
    sde, calls = VPSDE(), []
    args = {"budgets": [4], **kwargs}
    with pytest.raises(solvers.SolverError, match=match):
        calibrate_grid(sde, lambda x, t: calls.append(1) or x, args.pop("budgets"), event_shape=(2,), **args)
    assert not calls
