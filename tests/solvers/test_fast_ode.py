"""The fast PF-ODE solvers (solvers/exponential.py) against the exact flow of the ring (docs/math.md §8).

Every multistep variant must converge at its order: k without the corrector, k + 1 with it
(the corrector re-fits through one more point), and Heun at order 2; the time grids must be
what they say. The exact flow is dopri8 at rtol = atol = 1e-12 from the same noise.
"""
import functools
import math

import numpy as np
import pytest
import torch

import solvers
from models import GaussianMixture, MixtureScore, ScoreModel, ring_mixture
from sde_lib import SDES, VPSDE
from solvers.base import SolverError
from solvers.exponential import _MultistepOptions
from solvers.grids import solve_times, time_grid

F64 = torch.float64
STEPS = [100, 200, 400]


@pytest.fixture(scope="module")
def problems():
    out = {}
    for name, cls in SDES.items():
        sde = cls()
        score = MixtureScore(sde, ring_mixture())
        z = sde.prior_std * torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
        exact = solvers.sample(sde, score, z=z, solver="pf_ode", method="dopri8", rtol=1e-12, atol=1e-12,
                               eps=1e-3).samples
        out[name] = (sde, score, z, exact)
    return out


def _slope(problem, solver, per_step=1, steps=STEPS, **options) -> tuple[float, list[float]]:
    sde, score, z, exact = problem
    errors = []
    for n in steps:
        out = solvers.sample(sde, score, z=z, solver=solver, steps=n, eps=1e-3, **options)
        assert out.nfe == per_step * n
        errors.append((out.samples - exact).pow(2).sum(1).mean().sqrt().item())
    return float(np.polyfit(np.log(steps), np.log(errors), 1)[0]), errors


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("variable", ["log_snr", "sigma", "angle"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("corrector", [False, True])
def test_multistep_converges_at_its_order(problems, name, variable, order, corrector):
    """Slope of the error against steps: −order, or −(order + 1) with the corrector (measured −0.99 to −4.25 on
    the log-SNR grid; the default focus grid is still pre-asymptotic at 100–400 steps for the highest orders)."""
    slope, errors = _slope(problems[name], "multistep", order=order, corrector=corrector, variable=variable,
                           sigma_data=2.0, grid="log_snr")
    expected = order + corrector
    print(f"{name} {variable} order {order} corrector {corrector}: {['%.1e' % e for e in errors]}, slope {slope:.2f}")
    assert -expected - 0.35 < slope < -expected + 0.35, (slope, errors)


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("variable", ["log_snr", "sigma", "angle"])
def test_fourth_order_beats_third(problems, name, variable):
    """Order 4 is asymptotically dominated by its start: the first steps run at orders 1, 2, 3 (as every self-starting
    multistep method does), and their local errors, one step each, decay only as h², h³, h⁴. On the log-SNR grid
    at 200–800 steps the measured slopes are −4.4 to −5.0 with the corrector (−4.4 on VE in σ) and −3.6 to −3.9
    without it (−2.4 on VE in λ, where the start's h² term is already showing). What must hold: with the corrector
    it converges at least at order 4, and it is more accurate than order 3 at every step count."""
    slopes, errors = {}, {}
    for order in (3, 4):
        for corrector in (False, True):
            slopes[order, corrector], errors[order, corrector] = _slope(
                problems[name], "multistep", steps=[200, 400, 800], order=order, corrector=corrector,
                variable=variable, sigma_data=2.0, grid="log_snr")
    slope = slopes[4, True]
    print(name, variable, {k: ['%.1e' % e for e in v] for k, v in errors.items()}, f"slope {slope:.2f}")
    assert slope < -4, (slope, errors[4, True])
    for corrector in (False, True):
        assert all(e4 < e3 for e4, e3 in zip(errors[4, corrector], errors[3, corrector])), errors


@pytest.mark.parametrize("name", list(SDES))
def test_heun_is_second_order_at_two_evaluations_per_step(problems, name):
    slope, errors = _slope(problems[name], "heun", per_step=2)
    assert -2.2 < slope < -1.8, (slope, errors)


@pytest.mark.parametrize("name", list(SDES))
def test_ddim_is_the_first_order_multistep(problems, name):
    sde, score, z, _ = problems[name]
    for grid in ("t", "log_snr", "edm"):
        a = solvers.sample(sde, score, z=z, solver="ddim", steps=30, grid=grid).samples
        for variable in ("log_snr", "sigma"):   # x̂_0 held over a step in λ, or ε̂ in σ: the same step
            b = solvers.sample(sde, score, z=z, solver="multistep", steps=30, grid=grid, order=1, corrector=False,
                               variable=variable).samples
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", list(SDES))
def test_time_grids(name):
    sde = SDES[name]()
    eps = 1e-3
    lam = lambda t: sde.half_log_snr(t)  # noqa: E731
    for kind in ("t", "log_snr", "edm"):
        t = time_grid(sde, eps, 12, kind)
        assert t.shape == (13,) and t[0].item() == sde.T and t[-1].item() == eps
        assert torch.all(t[1:] < t[:-1])
    torch.testing.assert_close(lam(time_grid(sde, eps, 12, "log_snr")).diff(),
                               torch.full((12,), (lam(torch.tensor(eps, dtype=F64)) - lam(torch.tensor(1.0, dtype=F64))).item() / 12,
                                          dtype=F64))
    # EDM: σ^{1/ρ} uniform, σ = s/α = e^{−λ}
    root = torch.exp(-lam(time_grid(sde, eps, 12, "edm", rho=7.0)) / 7.0)
    torch.testing.assert_close(root.diff(), torch.full((12,), root.diff().mean().item(), dtype=F64))
    user = [1.0, 0.5, 0.1, eps]
    assert time_grid(sde, eps, 3, "user", times=user).tolist() == user


@pytest.mark.parametrize("options, match", [
    ({"order": 5}, r"order must be one of \(1, 2, 3, 4\)"),
    ({"focus_width_data": 0.0}, "must be finite and positive"),
    ({"grid": "user"}, "grid='user' needs times"),
    ({"grid": "user", "times": [1.0, 0.5, 0.6, 1e-3]}, "times must decrease strictly"),
    ({"grid": "user", "times": [0.9, 0.5, 1e-3]}, "times must decrease strictly from T"),
    ({"grid": "cosine"}, "grid"),
    ({"start_step": 1.0}, r"start_step must be a fraction in \[0, 1\)"),
    ({"start_step": 0.3, "grid": "user", "times": [1.0, 0.5, 1e-3]}, "with grid='user' put that time in times"),
    ({"start_step": 0.3, "steps": 1}, "start_step needs at least 2 steps"),
])
def test_bad_options_are_refused(options, match):
    sde = VPSDE()
    with pytest.raises(SolverError, match=match):
        solvers.sample(sde, MixtureScore(sde, ring_mixture()), (4, 2), solver="multistep", **options)


def test_user_grid_sets_the_budget():
    sde = VPSDE()
    score = MixtureScore(sde, ring_mixture())
    times = [1.0, 0.6, 0.3, 0.1, 0.03, 1e-3]
    out = solvers.sample(sde, score, (4, 2), solver="multistep", grid="user", times=times, eps=1e-3, seed=0)
    assert out.nfe == len(times) - 1
    with pytest.raises(SolverError, match="steps=7 but times has 5 steps"):
        solvers.sample(sde, score, (4, 2), solver="multistep", grid="user", times=times, eps=1e-3, steps=7)


@pytest.mark.parametrize("name", list(SDES))
def test_adaptive_multistep_meets_its_tolerance(problems, name):
    """Tighter tolerance, more NFE and a smaller error; the error stays within a few tolerances (measured 2–5×)."""
    sde, score, z, exact = problems[name]
    results = []
    for tol in (1e-2, 1e-3, 1e-4):
        out = solvers.sample(sde, score, z=z, solver="multistep_adaptive", rtol=tol, atol=tol, eps=1e-3)
        results.append((tol, out.nfe, (out.samples - exact).pow(2).sum(1).mean().sqrt().item()))
    print(name, results)
    assert [n for _, n, _ in results] == sorted(n for _, n, _ in results)
    assert [e for _, _, e in results] == sorted((e for _, _, e in results), reverse=True)
    assert all(e < 10 * tol for tol, _, e in results), results
    with pytest.raises(SolverError, match="sets its own steps"):
        solvers.sample(sde, score, z=z, solver="multistep_adaptive", steps=10)


def test_focus_grid_spacing():
    """Equal steps of w·gd((λ − λ_c)/w) = w·atan(sinh((λ − λ_c)/w)), λ_c = −log(focus_sigma), with w the noisy
    side's width below λ_c and the data side's above."""
    sde = VPSDE()
    for noisy, clean in ((1.5, 1.5), (1.2, 2.0)):
        t = time_grid(sde, 1e-3, 16, "focus", focus_sigma=2.0, focus_width=(noisy, clean))
        lam = sde.half_log_snr(t)
        v = lam + math.log(2.0)
        w = torch.full_like(v, clean).masked_fill(v < 0, noisy)
        cdf = w * torch.atan(torch.sinh(v / w))
        assert (v[0] < 0 < v[-1]) and t[0].item() == sde.T and t[-1].item() == 1e-3
        torch.testing.assert_close(cdf.diff(), torch.full((16,), cdf.diff().mean().item(), dtype=F64))
    # the steps are densest in λ where σ = e^{−λ} is near focus_sigma
    widest, narrowest = lam.diff().argmax().item(), lam.diff().argmin().item()
    sigma_mid = torch.exp(-(lam[1:] + lam[:-1]) / 2)
    assert abs(math.log(sigma_mid[narrowest].item() / 2.0)) < abs(math.log(sigma_mid[widest].item() / 2.0))


def test_sigma_data_comes_from_the_score():
    """The focus grid and the angle variable use the score's own data scale unless given."""
    mix = ring_mixture()
    x, _ = mix.sample(200_000, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert mix.std == pytest.approx(x.std(0).pow(2).mean().sqrt().item(), rel=5e-3)
    sde = VPSDE()
    score = MixtureScore(sde, mix)
    assert score.sigma_data == mix.std
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    auto = solvers.sample(sde, score, z=z, solver="multistep", steps=12).samples
    given = solvers.sample(sde, score, z=z, solver="multistep", steps=12, sigma_data=mix.std).samples
    other = solvers.sample(sde, score, z=z, solver="multistep", steps=12, sigma_data=1.0).samples
    assert torch.equal(auto, given) and not torch.allclose(auto, other)


def test_third_order_step_matches_the_phi_function_formula():
    """multistep(order 3, λ, no corrector) equals DPM-Solver++'s multistep update written with φ-functions and
    divided differences when the interpolating polynomial is integrated exactly (the benchmark's peer with
    exact=True); the peer's published update, with half the quadratic term, differs at O(h³)."""
    from benchmarks.fast_samplers import dpm_solver_pp_3m

    sde = VPSDE()
    score = MixtureScore(sde, ring_mixture())
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    ours = solvers.sample(sde, score, z=z, solver="multistep", steps=12, eps=1e-3, order=3, variable="log_snr",
                          grid="log_snr", corrector=False, lower_order_final=False, max_gain=math.inf).samples
    torch.testing.assert_close(ours, dpm_solver_pp_3m(sde, score, z, 12, 1e-3, exact=True), rtol=0, atol=1e-9)
    assert (ours - dpm_solver_pp_3m(sde, score, z, 12, 1e-3)).abs().max() > 1e-3


def test_coverage_mixes_the_focus_and_edm_grids():
    """coverage → 0 is the focus grid, coverage = 1 the edm grid, uniform_share = 1 the log_snr grid; the default
    mixes in 0.5 of uniform λ at every budget and 0.35 of edm from 40 steps, with the focus scaled by √(D/2) and
    placed by budget (GRID_BY_STEPS: lower and narrower on the data side from 6 to 39 steps, wider from 40)."""
    from solvers.grids import GRID_BY_STEPS, MANY_STEPS, GridOptions, by_budget, solve_times
    sde = VPSDE()
    focus = time_grid(sde, 1e-3, 30, "focus", focus_sigma=2.0)
    assert torch.allclose(time_grid(sde, 1e-3, 30, "focus", focus_sigma=2.0, coverage=1e-12), focus, atol=1e-10)
    assert torch.allclose(time_grid(sde, 1e-3, 30, "focus", focus_sigma=2.0, coverage=1.0),
                          time_grid(sde, 1e-3, 30, "edm"), atol=1e-12)
    mixed = time_grid(sde, 1e-3, 30, "focus", focus_sigma=2.0, coverage=0.5)
    assert bool((mixed[1:] < mixed[:-1]).all()) and mixed[0] == sde.T and mixed[-1] == 1e-3
    assert torch.allclose(time_grid(sde, 1e-3, 30, "focus", focus_sigma=2.0, uniform_share=1.0),
                          time_grid(sde, 1e-3, 30, "log_snr"), atol=1e-12)
    # a uniform share u keeps every step in λ at most 1/u times the uniform grid's
    lam = sde.half_log_snr(time_grid(sde, 1e-3, 30, "focus", focus_sigma=2.0, uniform_share=0.5))
    uniform_step = (lam[-1] - lam[0]) / 30
    assert (lam.diff() <= uniform_step / 0.5 + 1e-9).all()
    assert lam.diff().max() > 1.5 * uniform_step      # and the focus still makes the steps uneven
    # the budget's row of GRID_BY_STEPS, on both sides of each switch
    rows = [by_budget(GRID_BY_STEPS, s) for s in (5, 6, 39, 40)]
    assert [(r["focus"], r["focus_width_data"], r["coverage"], r["uniform_share"]) for r in rows] == [
        (0.8, 1.6, 0.0, 0.5), (0.3, 1.0, 0.0, 0.5), (0.3, 1.0, 0.0, 0.5), (0.8, 2.5, 0.35, 0.5)]
    assert MANY_STEPS == 40
    options = GridOptions()
    for steps in (5, 6, MANY_STEPS - 1, MANY_STEPS):
        row = by_budget(GRID_BY_STEPS, steps)
        for dim in (2, 64):
            assert torch.equal(solve_times(options, sde, 1e-3, steps, 20, 2.5, dim),
                               time_grid(sde, 1e-3, steps, "focus",
                                         focus_sigma=row["focus"] * 2.5 * math.sqrt(dim / 2),
                                         focus_width=(1.5, row["focus_width_data"]), coverage=row["coverage"],
                                         uniform_share=row["uniform_share"]))
    # a focus or width the user gives is kept at every budget, the others still follow the budget
    for steps in (5, MANY_STEPS - 1, MANY_STEPS):
        row = by_budget(GRID_BY_STEPS, steps)
        assert torch.equal(solve_times(GridOptions(focus_width_data=2.0), sde, 1e-3, steps, 20, 2.5),
                           time_grid(sde, 1e-3, steps, "focus", focus_sigma=row["focus"] * 2.5,
                                     focus_width=(1.5, 2.0), coverage=row["coverage"],
                                     uniform_share=row["uniform_share"]))
        assert torch.equal(solve_times(GridOptions(focus=0.5), sde, 1e-3, steps, 20, 2.5),
                           time_grid(sde, 1e-3, steps, "focus", focus_sigma=0.5 * 2.5,
                                     focus_width=(1.5, row["focus_width_data"]), coverage=row["coverage"],
                                     uniform_share=row["uniform_share"]))
    for bad in ({"coverage": 1.5}, {"uniform_share": -0.1}, {"coverage": 0.6, "uniform_share": 0.6}):
        with pytest.raises(SolverError, match="coverage|uniform_share"):
            solvers.sample(sde, MixtureScore(sde, ring_mixture()), (4, 2), solver="multistep", steps=5, **bad)


def test_lambda_nodes_keep_the_angle_form_exact_for_gaussian_data():
    """F fitted in λ and integrated in the angle (lambda_nodes) is still exact when F = 0 (Gaussian data of std
    σ_data), at any order and grid; its weights integrate polynomials in λ exactly (Gauss–Legendre moments)."""
    from solvers.exponential import _lambda_node_moments, _solve_weights
    sde = VPSDE()
    sigma_d = 1.7
    mix = GaussianMixture([1.0], [[0.0, 0.0]], [sigma_d**2])
    score = MixtureScore(sde, mix)
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = solvers.sample(sde, score, z=z, solver="pf_ode", eps=1e-3, rtol=1e-10, atol=1e-10).samples
    for grid in ("log_snr", "focus", "edm"):
        ours = solvers.sample(sde, score, z=z, solver="multistep", steps=6, eps=1e-3, grid=grid, lambda_nodes=True,
                              few_step_orders=False, max_gain=math.inf, sigma_data=sigma_d).samples
        torch.testing.assert_close(ours, exact, rtol=0, atol=1e-7)
    # the weights of nodes 0, −0.4, −0.9 (in λ from the start) integrate 1, v and v² times du/dλ exactly:
    # ∫ du = u(λ_t) − u(λ_u), and a quadratic through the nodes is reproduced
    lam_u, lam_t, nodes = 0.3, 1.1, [0.3, -0.1, -0.6]
    w = _solve_weights(nodes, _lambda_node_moments(lam_u, lam_t, 3, "angle", sigma_d))
    u = lambda lam: math.atan(math.exp(-lam) / sigma_d)   # noqa: E731
    assert abs(sum(w) - (u(lam_t) - u(lam_u))) < 1e-13
    dense = torch.linspace(lam_u, lam_t, 200_001, dtype=F64)
    du = -torch.exp(-dense) * sigma_d / (sigma_d**2 + torch.exp(-2 * dense))
    quad = torch.trapezoid((dense - lam_u) ** 2 * du, dense).item()
    assert abs(sum(wk * (v - lam_u) ** 2 for wk, v in zip(w, nodes)) - quad) < 1e-9


def test_gain_bound_lowers_the_order_only_where_the_weights_alternate():
    """max_gain: a step keeps its order while Σ|w| ≤ g·|Σ w| and drops its oldest values otherwise; inf is no bound,
    and the default bounds the gain below 40 steps only (2.5 below 20, 4 below 40: FIT_BY_STEPS)."""
    from solvers.exponential import FIT_BY_STEPS
    from solvers.grids import GRID_BY_STEPS
    sde = VPSDE()
    score = MixtureScore(sde, ring_mixture())
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=F64)

    def run(steps, **options):
        return solvers.sample(sde, score, z=z, solver="multistep", steps=steps, eps=1e-3, **options).samples

    assert [(fewest, fit["max_gain"]) for fewest, fit in FIT_BY_STEPS] == [(1, 2.5), (20, 4.0), (40, math.inf)]
    assert FIT_BY_STEPS[-1][0] == GRID_BY_STEPS[-1][0]       # the fit's many-step regime starts with the grid's
    assert torch.equal(run(12), run(12, max_gain=2.5)) and not torch.equal(run(12), run(12, max_gain=math.inf))
    assert torch.equal(run(30), run(30, max_gain=4.0))
    assert torch.equal(run(40), run(40, max_gain=math.inf))
    # and the fit in λ is the default below 40 steps only
    assert torch.equal(run(39), run(39, lambda_nodes=True)) and torch.equal(run(40), run(40, lambda_nodes=False))
    assert not torch.equal(run(39), run(39, lambda_nodes=False))
    # a bound of 1 allows only weights of one sign: an extrapolating predictor drops to order 1 at every step
    assert torch.equal(run(12, max_gain=1.0, corrector=False), run(12, order=1, corrector=False))
    with pytest.raises(SolverError, match="max_gain"):
        solvers.sample(sde, score, (4, 2), solver="multistep", steps=5, max_gain=0.5)


def test_few_steps_cap_the_order():
    """At ≤ 6 steps order 4 runs as order 2, at ≤ 10 as order 3 (few_step_orders), and as asked without the cap."""
    sde = VPSDE()
    score = MixtureScore(sde, ring_mixture())
    z = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    run = lambda steps, **o: solvers.sample(sde, score, z=z, solver="multistep", steps=steps, **o).samples  # noqa: E731
    assert torch.equal(run(6), run(6, order=2))
    assert torch.equal(run(10), run(10, order=3))
    assert torch.equal(run(11), run(11, order=4))
    assert not torch.equal(run(6), run(6, few_step_orders=False))
    assert torch.equal(run(6, few_step_orders=False), run(6, order=4, few_step_orders=False))


def _visited_times(recording_ring_score, predicts_noise, steps: int, solver: str = "multistep",
                   **options) -> list[float]:
    """The times a solve of the exact ring evaluates its score at, the score declaring ``predicts_noise``
    (None: not at all, as a plain function)."""
    sde = VPSDE()
    score, times = recording_ring_score(sde, predicts_noise)
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = solvers.sample(sde, score, z=z, solver=solver, steps=steps, eps=1e-3, **options)
    assert out.nfe == steps == len(times)
    return times


def test_start_step_for_a_model_that_predicts_the_noise(recording_ring_score):
    """From 10 steps, a model whose x̂₀ comes from ε or the score (it declares ``predicts_noise``) takes a short
    first step: the grid of one step fewer with its first step split at 0.25 of its length in λ; any other model,
    and fewer steps, the budget's grid. DDIM, a published discretisation, never does. (Its effect on a network:
    tests/solvers/test_networks.py.)"""
    sde = VPSDE()
    visited = functools.partial(_visited_times, recording_ring_score)
    sigma_data = MixtureScore(sde, ring_mixture()).sigma_data
    plain = visited(False, 12)
    assert plain == visited(None, 12)
    assert plain == solve_times(_MultistepOptions(), sde, 1e-3, 12, 20, sigma_data, 2)[:-1].tolist()
    split = visited(True, 12)
    shorter = solve_times(_MultistepOptions(), sde, 1e-3, 11, 20, sigma_data, 2)
    lam = sde.half_log_snr(torch.tensor(split[:2], dtype=F64))
    lam_grid = sde.half_log_snr(shorter[:2])
    assert split[0] == sde.T and split[2:] == shorter[1:-1].tolist()
    assert (lam[1] - lam[0]).item() == pytest.approx(0.25 * (lam_grid[1] - lam_grid[0]).item(), rel=1e-9)
    assert visited(True, 9) == visited(False, 9)  # below 10 steps: none
    assert visited(True, 12, start_step=0.0) == plain  # turned off
    assert visited(False, 12, start_step=0.25) == split  # asked for
    ddim = visited(True, 12, solver="ddim")
    assert ddim == torch.linspace(sde.T, 1e-3, 13, dtype=F64)[:-1].tolist()


def test_which_models_predict_the_noise():
    """ScoreModel's parameterization eps and score do, x0 does not; an exact score declares nothing."""
    sde = VPSDE()
    net = torch.nn.Linear(2, 2)
    declared = [ScoreModel(net, sde, parameterization=p).predicts_noise for p in ("eps", "score", "x0")]
    assert declared == [True, True, False]
    assert not hasattr(MixtureScore(sde, ring_mixture()), "predicts_noise")
