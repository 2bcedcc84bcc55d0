"""solvers.inpaint and GaussianMixture.condition against exact conditionals (docs/inpainting.md).

Monte-Carlo noise: the error of the conditional mode weights (TV, evaluation.inpainting) of n exact draws is
about ½ Σ_j √(2 p_j(1 − p_j)/(π n)): 0.005 for two equal modes at n = 2000 (``tv_floor`` measures it each
time); the spread ratio's relative noise is about 1/√(2 n d) (d unknown coordinates): 0.016 at n = 2000, d = 1.
"""
import math

import pytest
import torch

import models
import sde_lib
import solvers
from evaluation.inpainting import conditional_error
from models.errors import ModelError

VP = sde_lib.VPSDE()
RING = models.ring_mixture()
RING_SCORE = models.MixtureScore(VP, RING)
MIX16 = models.random_mixture(16)
MIX16_SCORE = models.MixtureScore(VP, MIX16)
FIRST = torch.tensor([1.0, 0.0])


def ring_known(x1: float, n: int) -> torch.Tensor:
    return torch.tensor([[x1, 0.0]]).expand(n, 2).clone()


# ---- the exact conditional ----------------------------------------------------------------------------

@pytest.mark.parametrize("mixture,x1", [(RING, 2.0), (RING, 3.4), (models.random_mixture(2, n_modes=3, seed=4), 0.7)])
def test_condition_matches_quadrature_of_the_joint_density(mixture, x1):
    """p(x₂ | x₁) from condition() equals p(x₁, x₂)/∫p(x₁, x₂)dx₂ on a fine grid (trapezoid, error < 1e-8)."""
    grid = torch.linspace(-12, 12, 24001, dtype=torch.float64)
    joint = mixture.log_prob(torch.stack([torch.full_like(grid, x1), grid], 1)).exp()
    exact = joint / torch.trapezoid(joint, grid)
    got = mixture.condition(FIRST, [x1]).log_prob(grid[:, None]).exp()
    assert torch.allclose(got, exact, atol=1e-8, rtol=1e-6)


def test_condition_matches_rejection_sampling_in_2d():
    """Joint draws with |x₁ − a| < 0.01 have the conditional's mean and std (within 4σ of their MC noise)."""
    mixture = models.random_mixture(2, n_modes=3, seed=4)
    a = float(mixture.means[0, 0])   # where the joint has mass, between the components
    x, _ = mixture.sample(2_000_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kept = x[(x[:, 0] - a).abs() < 0.01, 1]
    cond = mixture.condition(FIRST, [a])
    draws, _ = cond.sample(400_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    se = kept.std() / math.sqrt(len(kept))
    assert len(kept) > 2000
    assert abs(kept.mean() - draws.mean()) < 4 * se
    assert abs(kept.std() - draws.std()) < 4 * kept.std() / math.sqrt(2 * len(kept))


def test_condition_refuses_bad_masks():
    with pytest.raises(ModelError, match="one entry per coordinate"):
        RING.condition([1, 0, 0], [1.0])
    with pytest.raises(ModelError, match="only 0"):
        RING.condition([0.5, 0], [1.0])
    with pytest.raises(ModelError, match="every coordinate known"):
        RING.condition([1, 1], [1.0, 2.0])


# ---- replace and smc: mechanics ------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["euler_maruyama", "reverse_diffusion", "ancestral", "pc", "ddim"])
def test_replace_runs_with_the_stepping_solvers_and_keeps_known_entries(solver):
    x = ring_known(3.4, 64)
    out = solvers.inpaint(VP, RING_SCORE, x, FIRST, method="replace", solver=solver, steps=40, seed=3)
    again = solvers.inpaint(VP, RING_SCORE, x, FIRST, method="replace", solver=solver, steps=40, seed=3)
    assert torch.equal(out.samples[:, 0], x[:, 0])
    assert torch.equal(out.samples, again.samples)
    assert out.nfe == 40 * (2 if solver == "pc" else 1)
    assert torch.isfinite(out.samples).all() and out.samples[:, 1].std() > 0.5   # the unknown part was sampled


def test_smc_is_reproducible_keeps_known_entries_and_counts_batched_calls():
    x = ring_known(2.0, 32)
    a = solvers.inpaint(VP, RING_SCORE, x, FIRST, steps=10, seed=5, particles=4)
    b = solvers.inpaint(VP, RING_SCORE, x, FIRST, steps=10, seed=5, particles=4)
    c = solvers.inpaint(VP, RING_SCORE, x, FIRST, steps=10, seed=6, particles=4)
    assert torch.equal(a.samples, b.samples) and not torch.equal(a.samples, c.samples)
    assert torch.equal(a.samples[:, 0], x[:, 0])
    assert a.nfe == 10 and a.solver == "smc"


@pytest.mark.parametrize("call,message", [
    (lambda x: solvers.inpaint(VP, RING_SCORE, x, torch.ones(3)), "mask has shape"),
    (lambda x: solvers.inpaint(VP, RING_SCORE, x, torch.tensor([0.5, 0.0])), "only 0"),
    (lambda x: solvers.inpaint(VP, RING_SCORE, torch.full_like(x, float("nan")), FIRST), "NaN or inf in entries"),
    (lambda x: solvers.inpaint(VP, RING_SCORE, x, FIRST, method="resample"), "unknown inpainting method"),
    (lambda x: solvers.inpaint(VP, RING_SCORE, x, FIRST, solver="pc"), "drop solver"),
    (lambda x: solvers.inpaint(VP, RING_SCORE, x, FIRST, method="replace", solver="pf_ode"), "needs a solver"),
    (lambda x: solvers.inpaint(VP, RING_SCORE, x, FIRST, particles=0), "particles must be"),
    (lambda x: solvers.inpaint(VP, RING_SCORE, x, FIRST, ess_treshold=0.5), "unknown option"),
])
def test_bad_input_is_one_clear_solver_error(call, message):
    with pytest.raises(solvers.SolverError, match=message) as err:
        call(ring_known(1.0, 4))
    assert "\n" not in str(err.value)


def test_nan_in_unknown_entries_is_ignored():
    x = ring_known(3.4, 8)
    x[:, 1] = float("nan")
    out = solvers.inpaint(VP, RING_SCORE, x, FIRST, steps=5, seed=0, particles=2)
    assert torch.isfinite(out.samples).all()


# ---- against the exact conditional ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def ring_at_2():
    """x₁ = 2.0 (between the modes: the conditional's weights come from the tails), 100 steps, n = 2000."""
    x = ring_known(2.0, 2000)
    run = {name: solvers.inpaint(VP, RING_SCORE, x, FIRST, steps=100, seed=0, **kw).samples
           for name, kw in [("replace", {"method": "replace"}), ("smc1", {"particles": 1}),
                            ("smc8", {"particles": 8})]}
    return {name: conditional_error(RING, FIRST, x, s, min_weight=0.0) for name, s in run.items()}


def test_smc_beats_replace_on_the_ring_at_the_same_steps(ring_at_2):
    """Same 100 steps (100 NFE each; smc's NFE evaluates 8 particles): measured TV 0.063 vs 0.011, floor 0.005."""
    replace, smc = ring_at_2["replace"], ring_at_2["smc8"]
    assert replace.tv > 6 * replace.tv_floor        # replace's bias is far above the noise
    assert smc.tv <= replace.tv / 3
    assert abs(smc.spread - 1) < 0.06               # the 100-step chain's own dispersion (+3.5%) and noise


def test_smc_error_falls_with_particles(ring_at_2):
    """One particle is the twisted chain without weights (TV 0.13); eight correct it to the noise level."""
    assert ring_at_2["smc8"].tv < ring_at_2["smc1"].tv / 3


def test_smc_beats_replace_on_the_16d_mixture_with_half_known():
    """random_mixture(16), the first 8 coordinates known from one exact draw: replace puts ~20% of its samples
    nearer another component's conditional mean and is 23% too wide; smc (8 particles) is not, at 50 steps."""
    x, _ = MIX16.sample(1, generator=torch.Generator().manual_seed(1))
    x = x.expand(300, 16).clone()
    mask = torch.cat([torch.ones(8), torch.zeros(8)])
    replace = solvers.inpaint(VP, MIX16_SCORE, x, mask, method="replace", steps=50, seed=0).samples
    smc = solvers.inpaint(VP, MIX16_SCORE, x, mask, steps=50, seed=0, particles=8).samples
    e_replace = conditional_error(MIX16, mask, x, replace, min_weight=0.0)
    e_smc = conditional_error(MIX16, mask, x, smc, min_weight=0.0)
    assert e_replace.tv > 0.1 and e_smc.tv <= e_replace.tv / 3
    assert abs(e_smc.spread - 1) <= abs(e_replace.spread - 1) / 3


@pytest.mark.slow
@pytest.mark.parametrize("x1", [2.0, 0.0, 3.4])
def test_ring_replace_and_smc_at_1000_steps(x1):
    """The issue's setting for replace (Euler–Maruyama, 1000 steps) against smc with 8 particles at the same 1000
    steps (1000 NFE each; smc's evaluate 8 particles), 2000 samples. Where replace's TV is far above the noise
    (x₁ = 2.0, 0.0), smc's is at most a third of it; everywhere smc's TV is within 3 noise floors
    (measured at x₁ = 0.0, 16 particles, 4000 samples: smc 0.005 = the floor, replace 0.038)."""
    x = ring_known(x1, 2000)
    replace = solvers.inpaint(VP, RING_SCORE, x, FIRST, method="replace", steps=1000, seed=0).samples
    smc = solvers.inpaint(VP, RING_SCORE, x, FIRST, steps=1000, seed=0, particles=8).samples
    e_replace = conditional_error(RING, FIRST, x, replace, min_weight=0.0)
    e_smc = conditional_error(RING, FIRST, x, smc, min_weight=0.0)
    if e_replace.tv > 6 * e_replace.tv_floor:
        assert e_smc.tv <= e_replace.tv / 3
    assert e_smc.tv <= 3 * max(e_smc.tv_floor, 0.005)
    assert abs(e_smc.spread - 1) < 0.05
