"""Every sampler, with the exact score, reproduces the Gaussian mixture it was given (docs/math.md §8).

For each SDE × solver, samples are assigned to their nearest mode; the mode frequencies must match
the weights within 5 binomial standard errors, and the within-mode spread must match that of exact
draws from the mixture (same assignment rule) to a few percent.
"""
import math

import pytest
import torch

import solvers
from models import MixtureScore, random_mixture, ring_mixture
from sde_lib import SDES, VESDE, VPSDE

N_SAMPLES = 3000
PROBLEMS = {"ring2d": ring_mixture, "mix16d": random_mixture}
# Options per solver for the default test: the defaults, except that the Langevin corrector runs
# with per-sample norms on the 16-D problem too (the batch-independent setting).
SOLVER_CASES = [
    ("euler_maruyama", {}), ("reverse_diffusion", {}), ("ancestral", {}), ("ancestral", {"variance": "posterior"}),
    ("pc", {}), ("pc", {"predictor": "ancestral", "corrector": "ald"}), ("ald", {}), ("pf_ode", {}),
    ("pf_ode", {"method": "rk4"}),
]


def mode_statistics(mixture, x):
    """Nearest-mode frequencies (K,) and the RMS distance of samples to their nearest mode."""
    flat = x.double().flatten(1)
    k = torch.cdist(flat, mixture.means).argmin(1)
    freq = torch.bincount(k, minlength=len(mixture.weights)).double() / len(flat)
    spread = (flat - mixture.means[k]).pow(2).sum(1).mean().sqrt()
    return freq, spread


@pytest.fixture(scope="module")
def exact_spread():
    out = {}
    for name, make in PROBLEMS.items():
        mix = make()
        x, _ = mix.sample(200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        out[name] = mode_statistics(mix, x)[1].item()
    return out


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("solver,options", SOLVER_CASES, ids=[f"{s}-{'-'.join(map(str, o.values())) or 'default'}"
                                                              for s, o in SOLVER_CASES])
def test_sampler_matches_mixture(solver, options, sde_name, problem, exact_spread):
    mix = PROBLEMS[problem]()
    sde = SDES[sde_name]()
    steps = 500 if solver not in ("pf_ode", "ald") or options.get("method") == "rk4" else None
    result = solvers.sample(sde, MixtureScore(sde, mix), (N_SAMPLES, mix.dim), solver=solver, steps=steps,
                            seed=3, **options)
    freq, spread = mode_statistics(mix, result.samples)
    se = torch.sqrt(mix.weights * (1 - mix.weights) / N_SAMPLES)
    assert torch.all((freq - mix.weights).abs() < 5 * se), (freq, mix.weights)
    if solver != "ald":  # ALD has no predictor and is biased at a finite budget: see the tests below
        assert spread.item() == pytest.approx(exact_spread[problem], rel=0.04)
    assert result.nfe > 0


def ald_excess_spread(sde, steps, exact):
    mix = ring_mixture()
    r = solvers.sample(sde, MixtureScore(sde, mix), (N_SAMPLES, 2), solver="ald", steps=steps, seed=3)
    return mode_statistics(mix, r.samples)[1].item() / exact - 1


def test_ald_bias_falls_with_budget(sde_name, exact_spread):
    """Annealed Langevin converges: the excess spread shrinks as the number of noise levels grows."""
    excess = [ald_excess_spread(SDES[sde_name](), n, exact_spread["ring2d"]) for n in (500, 2000)]
    assert 0 < excess[1] < 0.6 * excess[0] and excess[1] < 0.1, excess


@pytest.mark.slow
def test_ald_matches_mixture_at_large_budget(sde_name, exact_spread):
    assert abs(ald_excess_spread(SDES[sde_name](), 4000, exact_spread["ring2d"])) < 0.04


def test_langevin_per_sample_norms_converge_with_dimension():
    """norm="sample" (batch-independent) is heavy-tailed in low D and fine in high D: its bias falls with D."""
    errors = []
    for dim in (16, 64):
        mix, sde = random_mixture(dim=dim), VPSDE()
        x, _ = mix.sample(100_000, generator=torch.Generator().manual_seed(1))
        exact = mode_statistics(mix, x)[1].item()
        r = solvers.sample(sde, MixtureScore(sde, mix), (2000, dim), solver="pc", steps=500, norm="sample", seed=0)
        errors.append(mode_statistics(mix, r.samples)[1].item() / exact - 1)
    assert errors[1] < 0.5 * errors[0] and errors[1] < 0.06, errors


def test_every_solver_runs_with_every_sde(sde_name):
    """Each registered solver samples from each SDE at a small budget: finite samples, counted NFE."""
    sde = SDES[sde_name](N=40)
    score = MixtureScore(sde, ring_mixture())
    for name in solvers.available():
        steps = None if solvers.get_solver(name)().nfe_per_step() is None else 30
        options = {"rtol": 1e-3, "atol": 1e-3} if name == "pf_ode" else {}
        out = solvers.sample(sde, score, (16, 2), solver=name, steps=steps, seed=0, **options)
        assert out.samples.shape == (16, 2) and torch.isfinite(out.samples).all(), name
        assert out.nfe >= 30 if steps else out.nfe > 0, name


def test_nfe_is_counted_not_computed():
    """NFE is what the score function saw: count the calls independently of the solver."""
    sde = VPSDE()
    exact = MixtureScore(sde, ring_mixture())
    calls = []

    def score(x, t):
        calls.append(1)
        return exact(x, t)

    cases = [("euler_maruyama", 50, {}), ("pc", 50, {"n_steps": 2}), ("ald", 40, {"n_steps": 3}),
             ("pf_ode", None, {}), ("pf_ode", 30, {"method": "midpoint"}), ("pf_ode", None, {"denoise": True})]
    for solver, steps, options in cases:
        calls.clear()
        result = solvers.sample(sde, score, (64, 2), solver=solver, steps=steps, seed=0, **options)
        assert result.nfe == len(calls) > 0
    # the closed forms the counts must agree with where they exist
    assert solvers.sample(sde, score, (8, 2), solver="pc", steps=50, n_steps=2, seed=0).nfe == 150
    assert solvers.sample(sde, score, (8, 2), solver="pf_ode", steps=30, method="midpoint").nfe == 60


def test_pc_with_batch_norms_matches_reference_formula():
    """One Langevin corrector step with norm='batch' uses the batch-mean norms of the reference code."""
    sde = VESDE()
    mix = ring_mixture()
    score = MixtureScore(sde, mix)
    z = sde.prior_sampling((32, 2), generator=torch.Generator().manual_seed(0)).double()
    r = solvers.sample(sde, score, solver="pc", z=z, steps=2, predictor="none", corrector="langevin",
                       n_steps=1, snr=0.16, denoise=False, seed=5)
    # Recompute both steps (index N−1 at t = T, index 0 at t = 0) by hand with the same noise draws.
    from solvers.noise import NoiseSource
    noise = NoiseSource(5)
    noise.skip()  # the prior's draw
    t = torch.ones(32, dtype=torch.float64)
    grad = score(z, t)
    n = noise.normal(z.shape, z.dtype)
    step = 2 * (0.16 * n.norm(dim=1).mean() / grad.norm(dim=1).mean()) ** 2
    x = z + step * grad + torch.sqrt(2 * step) * n
    t2 = torch.zeros(32, dtype=torch.float64)    # the chain's index 0: NCSN's σ_min, at t = 0
    grad2 = score(x, t2)
    n2 = noise.normal(z.shape, z.dtype)
    step2 = 2 * (0.16 * n2.norm(dim=1).mean() / grad2.norm(dim=1).mean()) ** 2
    x2 = x + step2 * grad2 + torch.sqrt(2 * step2) * n2
    torch.testing.assert_close(r.samples, x2, rtol=1e-10, atol=1e-10)
    assert math.isfinite(r.samples.sum().item())
