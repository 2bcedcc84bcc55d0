"""Discrete and continuous side by side (MATH.md §3, §4): DDIM is the PF-ODE's first-order exponential
integrator, and DDPM's ancestral sampler and the reverse SDE's Euler–Maruyama converge to each other."""
import math

import numpy as np
import pytest
import torch

import solvers
from models import MixtureScore, ring_mixture
from sde_lib import VESDE, VPSDE, subVPSDE

F64 = torch.float64
SDES = {"vp": VPSDE, "subvp": subVPSDE, "ve": VESDE}


def _slope(steps, errors) -> float:
    return float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("grid", ["t", "log_snr"])
def test_ddim_converges_to_the_pf_ode_at_first_order(name, grid):
    """RMS distance to a tight dopri5 solution from the same noise falls like 1/steps."""
    sde = SDES[name]()
    score = MixtureScore(sde, ring_mixture())
    z = sde.prior_std * torch.randn(400, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = solvers.sample(sde, score, z=z, solver="pf_ode", rtol=1e-10, atol=1e-10).samples
    steps = [50, 100, 200, 400]
    errors = []
    for n in steps:
        out = solvers.sample(sde, score, z=z, solver="ddim", steps=n, grid=grid)
        assert out.nfe == n
        errors.append((out.samples - exact).pow(2).sum(1).mean().sqrt().item())
    slope = _slope(steps, errors)
    print(f"{name}, grid {grid}: errors {['%.2e' % e for e in errors]}, slope {slope:.2f}")
    assert -1.25 < slope < -0.8 and errors[-1] < 0.05


@pytest.mark.parametrize("variance", ["forward", "posterior"])
def test_ddpm_ancestral_and_euler_maruyama_converge_to_each_other(variance):
    """Same N, same seed: both samplers take the same z_i at step i (counter-based noise), i.e. the
    same Brownian increments, on the grid t_k = (N − k)/N that DDPM's chain lives on (eps = 1/N).
    Both discretise the reverse SDE, so their paths meet as N grows, the distance falling like 1/N
    (additive noise: strong order 1). The median over samples is used: a path that starts near the
    boundary between two modes may end in either, and a few such splits dominate an RMS.

    With σ_i² = β̃_i (posterior) the noise differs from EM's by the factor m_{i−1}/m_i, which is
    O(1) away from 1 over the last few steps (whose noise is O(N^{-1/2})): the distance still
    vanishes, at the slower rate N^{-1/2} to N^{-1}."""
    mix = ring_mixture()
    steps = [250, 500, 1000, 2000]
    medians = []
    for n in steps:
        sde = VPSDE().with_steps(n)
        score = MixtureScore(sde, mix)
        kw = dict(steps=n, seed=7, dtype=F64, denoise=False, eps=1.0 / n)
        a = solvers.sample(sde, score, (400, 2), solver="ancestral", variance=variance, **kw).samples
        b = solvers.sample(sde, score, (400, 2), solver="euler_maruyama", **kw).samples
        medians.append((a - b).norm(dim=1).median().item())
    slope = _slope(steps, medians)
    print(f"ancestral ({variance}) vs Euler–Maruyama, median distance: {['%.2e' % d for d in medians]}, "
          f"slope {slope:.2f}")
    if variance == "forward":
        assert -1.25 < slope < -0.8 and medians[-1] < 5e-3
    else:
        assert -1.0 < slope < -0.45 and medians == sorted(medians, reverse=True)
