"""Discrete and continuous side by side (docs/math.md §3, §4): DDIM is the PF-ODE's first-order exponential
integrator, and DDPM's ancestral sampler and the reverse SDE's Euler–Maruyama converge to each other."""

import numpy as np
import pytest
import torch

import solvers
from models import MixtureScore, ring_mixture
from sde_lib import SDES, VPSDE

F64 = torch.float64


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
    same Brownian increments. Ancestral walks DDPM's chain at its noise-matched times (≈ (i + 1)/N),
    Euler–Maruyama the uniform grid t_k = (N − k)/N down to eps = 1/N.
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


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("solver, options", [("ancestral", {}), ("reverse_diffusion", {}),
                                             ("pc", {}), ("ald", {"n_steps": 2})], ids=lambda v: str(v or ""))
@pytest.mark.parametrize("steps", [None, 100])
def test_chain_samplers_evaluate_the_score_at_the_chains_noise_levels(name, solver, options, steps):
    """A continuous model in a discrete sampler: index i's score is taken at chain_times()[i] of the
    (re-discretised) chain, whatever steps and eps are; sub-VP's noiseless index 0 borrows index 1's time."""
    sde = SDES[name]()
    chain = sde.with_steps(steps or sde.N)
    expected = chain.chain_times()
    expected[expected == 0] = expected[1] if name == "subvp" else 0.0
    per_level = 1 + options.get("n_steps", 1) if solver == "pc" else options.get("n_steps", 1)
    result = solvers.sample(sde, MixtureScore(sde, ring_mixture()), (8, 2), solver=solver, steps=steps, seed=0,
                            dtype=F64, trajectory=1, eps=0.05, **options)
    times = result.trajectory[0][:-1]                      # the last entry is the returned sample, x_{−1}
    assert result.trajectory[0][-1].item() == 0.0
    assert result.nfe == per_level * chain.N
    torch.testing.assert_close(times, expected.flip(0).repeat_interleave(per_level), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_an_index_conditioned_model_drives_the_continuous_solvers(name):
    """A discrete model (a network that reads the chain index u = τ(N−1), as DDPM's and NCSN's do)
    in the PF-ODE: ScoreModel(time_input="index") feeds it u(t) interpolated between the chain's times.
    This network returns the exact ε at the time the index stands for, so the flow must be the exact one."""
    from models import ScoreModel

    sde = SDES[name]()
    exact = MixtureScore(sde, ring_mixture())
    knots = sde.chain_times()

    class IndexNet(torch.nn.Module):
        def forward(self, x_in, tau):
            u = tau.double() * (sde.N - 1)
            lo = u.floor().long().clamp(0, sde.N - 2)
            t = knots[lo] + (u - lo) * (knots[lo + 1] - knots[lo])        # the time index u stands for
            x = x_in / model_c_in(t)
            return -sde.marginal_std(t)[:, None] * exact(x, t)

    model = ScoreModel(IndexNet(), sde, parameterization="eps", time_input="index")
    model_c_in = lambda t: torch.rsqrt(sde.log_mean_coeff(t).exp() ** 2 + sde.marginal_var(t))[:, None]
    z = sde.prior_std * torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    kw = dict(z=z, solver="pf_ode", rtol=1e-8, atol=1e-8, eps=max(knots[0].item(), 1e-3))
    via_index = solvers.sample(sde, model, **kw).samples
    direct = solvers.sample(sde, exact, **kw).samples
    torch.testing.assert_close(via_index, direct, rtol=0, atol=1e-5)
