"""The PF-ODE sampler converges to the exact flow at each method's order (docs/math.md §1, §8).

The reference is the same ODE solved in float64 at rtol = atol = 1e-11 from the same noise; its
own accuracy is checked against a second tight solve.
"""
import math

import numpy as np
import pytest
import torch

import solvers
from models import MixtureScore, random_mixture, ring_mixture
from sde_lib import SDES, VPSDE

PROBLEMS = {"ring2d": ring_mixture, "mix16d": random_mixture}


def rms(a, b):
    return (a - b).pow(2).mean().sqrt().item()


def setup(sde_name, problem, n=200):
    sde = SDES[sde_name]()
    mix = PROBLEMS[problem]()
    score = MixtureScore(sde, mix)
    z = sde.prior_sampling((n, mix.dim), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = solvers.sample(sde, score, z=z, solver="pf_ode", method="dopri8", rtol=1e-11, atol=1e-11).samples
    return sde, score, z, exact


@pytest.mark.parametrize("problem", PROBLEMS)
def test_reference_solution_is_converged(sde_name, problem):
    sde, score, z, exact = setup(sde_name, problem)
    other = solvers.sample(sde, score, z=z, solver="pf_ode", method="dopri5", rtol=1e-10, atol=1e-10).samples
    assert rms(other, exact) < 1e-7


# Uniform-t grids; step counts chosen inside each method's asymptotic range. The cosine schedule's β grows like
# tan θ up to its cap, 999 at t ≈ 0.998 (docs/diffusers.md §2): uniform t enters that range only at hundreds of
# steps there, so its orders are measured on a grid uniform in λ, where RK4 reaches its order from 80 steps.
ORDERS = {"euler": (1, [400, 800, 1600]), "midpoint": (2, [100, 200, 400]), "rk4": (4, [40, 80, 160])}
GRIDS = {"vp_cosine": "log_snr"}
STEPS = {("vp_cosine", "rk4"): [80, 160, 320]}


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("method", ORDERS)
def test_fixed_grid_order(method, sde_name, problem):
    order, steps = ORDERS[method]
    steps = STEPS.get((sde_name, method), steps)
    sde, score, z, exact = setup(sde_name, problem)
    grid = {"grid": GRIDS[sde_name]} if sde_name in GRIDS else {}
    errors = [rms(solvers.sample(sde, score, z=z, solver="pf_ode", method=method, steps=n, **grid).samples, exact)
              for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert slope == pytest.approx(order, abs=0.35), errors


def test_adaptive_error_shrinks_with_tolerance(sde_name):
    """dopri5's global error falls roughly in proportion to the tolerance (log–log slope near 1)."""
    sde, score, z, exact = setup(sde_name, "ring2d")
    tols = [1e-4, 1e-5, 1e-6, 1e-7]
    runs = [solvers.sample(sde, score, z=z, solver="pf_ode", rtol=tol, atol=tol) for tol in tols]
    errors = [rms(r.samples, exact) for r in runs]
    nfes = [r.nfe for r in runs]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])), errors
    assert nfes == sorted(nfes)
    slope = np.polyfit(np.log(tols), np.log(errors), 1)[0]
    assert 0.7 < slope < 1.3, errors
    assert errors[1] < 1e-3


def test_float32_sampling_reaches_float32_accuracy():
    sde, score, z, exact = setup("vp", "ring2d")
    r = solvers.sample(sde, score, z=z.float(), solver="pf_ode", rtol=1e-5, atol=1e-5)
    assert r.samples.dtype == torch.float32
    assert rms(r.samples.double(), exact) < 1e-3


def test_adaptive_solver_never_evaluates_below_eps():
    sde = VPSDE()
    exact = MixtureScore(sde, ring_mixture())
    seen = []

    def score(x, t):
        seen.append(t.min().item())
        return exact(x, t)

    solvers.sample(sde, score, (100, 2), solver="pf_ode", seed=0, eps=1e-3)
    assert min(seen) >= 1e-3 * (1 - 1e-6)
    assert max(seen) <= 1.0 + 1e-6


def test_denoise_is_tweedie():
    """The optional last step maps x at eps to E[x_0 | x_eps] = (x + s² ∇log p)/α."""
    sde, score, z, exact = setup("vp", "ring2d")
    r = solvers.sample(sde, score, z=z, solver="pf_ode", method="dopri8", rtol=1e-11, atol=1e-11, denoise=True)
    t = torch.full((len(z),), 1e-3, dtype=torch.float64)
    alpha, var = math.exp(sde.log_mean_coeff(t)[0].item()), sde.marginal_var(t)[0].item()
    torch.testing.assert_close(r.samples, (exact + var * score(exact, t)) / alpha)
