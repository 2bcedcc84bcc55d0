"""The fast stochastic samplers of solvers/stochastic.py (docs/math.md §11): closed forms, NFE, noise, options."""
import math

import pytest
import torch

import solvers
from models import MixtureScore, ring_mixture
from sde_lib import SDES, VPSDE
from solvers.stochastic import GAMMA_CAP, AdaptiveSDE

NEW = ["edm_sde", "sde_adaptive"]


def gaussian_score(sde, std):
    """The exact score of data N(0, std² I) diffused by ``sde``: −x/(α² std² + s²)."""
    def score(x, t):
        alpha, var = sde.log_mean_coeff(t).exp().to(x.dtype), sde.marginal_var(t).to(x.dtype)
        return -x / (alpha**2 * std**2 + var)[:, None]
    return score


class Recorder:
    """An exact ring score that records the time of every call."""

    def __init__(self, sde):
        self.exact = MixtureScore(sde, ring_mixture())
        self.sigma_data = self.exact.sigma_data
        self.times: list[float] = []

    def __call__(self, x, t):
        self.times.append(t[0].item())
        return self.exact(x, t)


def sigma_of(sde, t: float) -> float:
    tt = torch.tensor(t, dtype=torch.float64)
    return float(sde.marginal_std(tt) / sde.log_mean_coeff(tt).exp())


# ---- closed forms ----------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", NEW)
def test_ring_mode_weights_and_spread(solver, sde_name):
    """On the exact ring, the default settings give the mode weights (5 binomial SE) and the spread (3 %)."""
    mix, sde = ring_mixture(), SDES[sde_name]()
    n = 4000
    out = solvers.sample(sde, MixtureScore(sde, mix), (n, 2), solver=solver, seed=5)
    weight_error, spread = mix.mode_report(out.samples)
    assert weight_error < 5 * math.sqrt(0.125 * 0.875 / n)
    assert spread == pytest.approx(1.0, abs=0.03)
    assert out.nfe <= 200


@pytest.mark.parametrize("solver,options", [("edm_sde", {"steps": 100}), ("sde_adaptive", {})])
def test_gaussian_data_std(solver, options, sde_name):
    """Data N(0, σ_d² I) in 8 dimensions: the samples' std is σ_d (the score is closed form)."""
    sde, std = SDES[sde_name](), 0.5
    out = solvers.sample(sde, gaussian_score(sde, std), (2000, 8), solver=solver, seed=2, sigma_data=std,
                         dtype=torch.float64, **options)
    # 16 000 values: the sample std's standard error is 0.5 %
    assert out.samples.std().item() == pytest.approx(std, rel=0.02)
    assert out.samples.mean().item() == pytest.approx(0.0, abs=0.02)


def test_edm_sde_without_churn_is_heun():
    sde = VPSDE()
    score = MixtureScore(sde, ring_mixture())
    a = solvers.sample(sde, score, (64, 2), solver="edm_sde", steps=12, seed=0, s_churn=0.0)
    b = solvers.sample(sde, score, (64, 2), solver="heun", steps=12, seed=0)
    assert torch.equal(a.samples, b.samples)


def test_edm_sde_churns_inside_its_window_only(sde_name):
    """Step i's first evaluation is at σ̂ = σ_i (1 + γ) inside [s_tmin, s_tmax]·σ_data and at σ_i outside,
    never above σ(T); its second is at σ_{i+1}."""
    sde = SDES[sde_name]()
    score = Recorder(sde)
    steps, churn, lo, hi = 10, 3.0, 0.2, 5.0
    solvers.sample(sde, score, (4, 2), solver="edm_sde", steps=steps, seed=0, dtype=torch.float64,
                   s_churn=churn, s_tmin=lo, s_tmax=hi)
    grid = solvers.time_grid(sde, sde.default_eps, steps, "edm").tolist()
    gamma = min(churn / steps, GAMMA_CAP)
    sigma_T, sd = sigma_of(sde, sde.T), score.sigma_data
    inside = 0
    for i in range(steps):
        sigma_i = sigma_of(sde, grid[i])
        expected = min(sigma_i * (1 + gamma), sigma_T) if lo * sd <= sigma_i <= hi * sd else sigma_i
        inside += expected > sigma_i
        assert sigma_of(sde, score.times[2 * i]) == pytest.approx(expected, rel=1e-6)
        assert score.times[2 * i + 1] == pytest.approx(grid[i + 1], rel=1e-9)
    assert 0 < inside < steps - 1


def test_edm_sde_gamma_is_capped():
    sde = VPSDE()
    score = Recorder(sde)
    solvers.sample(sde, score, (4, 2), solver="edm_sde", steps=4, seed=0, dtype=torch.float64, s_churn=100.0)
    grid = solvers.time_grid(sde, sde.default_eps, 4, "edm").tolist()
    assert sigma_of(sde, score.times[2]) == pytest.approx(sigma_of(sde, grid[1]) * math.sqrt(2), rel=1e-6)


# ---- NFE ------------------------------------------------------------------------------------------

def test_edm_sde_spends_two_evaluations_per_step():
    sde = VPSDE()
    score = Recorder(sde)
    out = solvers.sample(sde, score, (8, 2), solver="edm_sde", steps=17, seed=0)
    assert out.nfe == len(score.times) == 34 == 17 * solvers.get_solver("edm_sde")().nfe_per_step()
    default = solvers.sample(sde, score, (8, 2), solver="edm_sde", seed=0)
    assert default.nfe == 2 * solvers.get_solver("edm_sde").default_step_count


def test_sde_adaptive_counts_and_reuses_the_score_after_a_rejection(sde_name):
    """A first step over the whole span is rejected; its retry reuses the score at T: one call at T in all.

    NFE = 2 per accepted step + 1 per rejected one + 1 for the denoising step at eps.
    """
    sde = SDES[sde_name]()
    score = Recorder(sde)
    out = solvers.sample(sde, score, (32, 2), solver="sde_adaptive", seed=0, h_init=1.0)
    times = score.times
    assert out.nfe == len(times)
    assert times.count(sde.T) == 1 and times[0] == sde.T
    assert times[-1] == pytest.approx(sde.default_eps, rel=1e-6) == times[-2]
    trial_ends = times[1:-1]                     # x′'s times and the new states' times, in call order
    accepted = sum(1 for a, b in zip(trial_ends, trial_ends[1:]) if a == b)
    rejected = out.nfe - 1 - 2 * accepted - 1
    assert rejected >= 1 and accepted >= 5
    plain = solvers.sample(sde, score, (32, 2), solver="sde_adaptive", seed=0, h_init=1.0, denoise=False)
    assert plain.nfe == out.nfe - 1


def test_sde_adaptive_tolerance_sets_the_cost():
    sde = VPSDE()
    score = MixtureScore(sde, ring_mixture())
    nfe = [solvers.sample(sde, score, (256, 2), solver="sde_adaptive", seed=0, rtol=tol, atol=tol / 5).nfe
           for tol in (0.2, 0.05, 0.0125)]
    assert nfe[0] < nfe[1] < nfe[2]


def test_sde_adaptive_gives_up_past_its_evaluation_cap(monkeypatch):
    monkeypatch.setattr(AdaptiveSDE, "max_evaluations", 40)
    sde = VPSDE()
    with pytest.raises(solvers.NonFiniteError, match="more than 40 evaluations"):
        solvers.sample(sde, MixtureScore(sde, ring_mixture()), (8, 2), solver="sde_adaptive", seed=0,
                       rtol=1e-6, atol=1e-6)


# ---- noise and reproducibility ----------------------------------------------------------------------

@pytest.mark.parametrize("solver", NEW)
def test_same_seed_same_samples(solver, sde_name):
    sde = SDES[sde_name]()
    score = MixtureScore(sde, ring_mixture())
    kw = dict(solver=solver, steps=20 if solver == "edm_sde" else None)
    a = solvers.sample(sde, score, (64, 2), seed=3, **kw)
    b = solvers.sample(sde, score, (64, 2), seed=3, **kw)
    c = solvers.sample(sde, score, (64, 2), seed=4, **kw)
    given = solvers.sample(sde, score, z=a.z, seed=3, **kw)
    assert torch.equal(a.samples, b.samples) and a.nfe == b.nfe
    assert torch.equal(a.samples, given.samples)
    assert not torch.allclose(a.samples, c.samples)
    # From the same prior draw, another seed changes the added noise only.
    other = solvers.sample(sde, score, z=a.z, seed=4, **kw)
    assert not torch.allclose(a.samples, other.samples)


def test_edm_sde_sample_is_independent_of_its_batch(sde_name):
    """Fixed steps and per-row noise: 16 samples are the first 16 rows of 64; a split run is the whole."""
    sde = SDES[sde_name]()
    score = MixtureScore(sde, ring_mixture())
    kw = dict(solver="edm_sde", steps=15, seed=11, dtype=torch.float64)
    whole = solvers.sample(sde, score, (64, 2), **kw).samples
    torch.testing.assert_close(solvers.sample(sde, score, (16, 2), **kw).samples, whole[:16], rtol=0, atol=0)
    tail = solvers.sample(sde, score, (48, 2), index_offset=16, **kw).samples
    torch.testing.assert_close(tail, whole[16:], rtol=0, atol=0)


def test_sde_adaptive_steps_are_shared_by_the_batch():
    """The step sizes come from the batch's error, so a sample depends on its batch: 16 rows of a 64-batch are
    not the 16-batch. What holds: each sample's noise is its own (index-based), so a sample drawn in two batches
    that happen to take the same steps is the same; here the first trial is on one shared step, h_init."""
    sde = VPSDE()
    score = MixtureScore(sde, ring_mixture())
    kw = dict(solver="sde_adaptive", seed=11, dtype=torch.float64)
    whole = solvers.sample(sde, score, (64, 2), **kw)
    head = solvers.sample(sde, score, (16, 2), **kw)
    assert not torch.equal(head.samples, whole.samples[:16])
    # One fixed trial step everywhere (tolerances so loose that every step is accepted): rows agree exactly.
    loose = dict(kw, rtol=1e6, atol=1e6, h_init=0.05)
    whole = solvers.sample(sde, score, (64, 2), **loose)
    head = solvers.sample(sde, score, (16, 2), **loose)
    assert whole.nfe == head.nfe
    torch.testing.assert_close(head.samples, whole.samples[:16], rtol=0, atol=0)


# ---- options ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver,options,message", [
    ("edm_sde", {"s_churn": -1.0}, "s_churn must be a finite number >= 0"),
    ("edm_sde", {"s_churn": float("inf")}, "s_churn must be a finite number >= 0"),
    ("edm_sde", {"s_tmin": -0.1}, "s_tmin must be a finite number >= 0"),
    ("edm_sde", {"s_tmin": 2.0, "s_tmax": 1.0}, "s_tmax must exceed s_tmin = 2.0"),
    ("edm_sde", {"s_noise": 0.0}, "s_noise must be finite and positive"),
    ("edm_sde", {"grid": "user"}, "grid='user' needs times"),
    ("edm_sde", {"rho": -7.0}, "rho, focus, focus_width_noise and focus_width_data must be finite and positive"),
    ("sde_adaptive", {"rtol": 0.0}, "rtol and atol must be finite and positive"),
    ("sde_adaptive", {"atol": float("nan")}, "rtol and atol must be finite and positive"),
    ("sde_adaptive", {"h_init": 1.5}, r"h_init must be in \(0, 1\]"),
    ("sde_adaptive", {"error_norm": "max"}, "option 'error_norm' of solver 'sde_adaptive' must be one of"),
    ("sde_adaptive", {"s_churn": 1.0}, "unknown option 's_churn' for solver 'sde_adaptive'; valid options: rtol"),
])
def test_bad_options_are_refused_before_any_evaluation(solver, options, message):
    calls = []
    sde = VPSDE()
    with pytest.raises(solvers.SolverError, match=message):
        solvers.sample(sde, lambda x, t: calls.append(1) or x, (4, 2), solver=solver, **options)
    assert calls == []


# ---- the goal, at full size -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("solver", NEW)
def test_ring_goal_at_most_200_nfe(solver, sde_name):
    """Mode weights within 0.01 and spread within 2 % of exact draws, at <= 200 NFE (20 000 samples)."""
    mix, sde = ring_mixture(), SDES[sde_name]()
    out = solvers.sample(sde, MixtureScore(sde, mix), (20_000, 2), solver=solver, seed=0)
    weight_error, spread = mix.mode_report(out.samples)
    assert out.nfe <= 200 and weight_error <= 0.01 and abs(spread - 1) <= 0.02, (out.nfe, weight_error, spread)
