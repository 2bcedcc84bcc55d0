"""The discrete chain's variational bound (docs/math.md §7) against closed forms, and the chain's time map."""
import math

import pytest
import torch

from models import MixtureScore, ring_mixture
from sde_lib import VESDE, VPSDE, subVPSDE
from solvers import SolverError
from solvers.bound import variational_bound

F64 = torch.float64


class _PointMassScore:
    """The exact score of data x ≡ c under the chain: q(x_i) = N(A_i c, m_i), so s = −(x − A_i c)/m_i.

    It is looked up by the time the bound evaluates step i at (``sde.chain_times()``), so it is the
    chain's own marginal score, not the continuous one.
    """

    def __init__(self, sde, c):
        self.A, self.m = sde.chain_marginals()
        self.times, self.c = sde.chain_times(), c

    def __call__(self, x, t):
        i = int((self.times - t[0].double()).abs().argmin())
        return -(x - self.A[i] * self.c) / self.m[i]


@pytest.mark.parametrize("sde", [VPSDE(N=200), VESDE(N=200)], ids=["vp", "ve"])
@pytest.mark.parametrize("variance", ["forward", "posterior"])
def test_bound_of_a_point_mass_is_the_closed_form(sde, variance):
    """With the exact score the model's mean is the posterior's; the bound is then deterministic.

    Posterior variance: every KL term vanishes. Forward variance: each is ½(log(v/β̃) + β̃/v − 1) per
    dimension. Prior: KL(N(A c, m) ‖ N(0, σ_T²)). Decoder: ½ D log(2π v_0) (its mean is c exactly).
    """
    c = torch.tensor([[1.5, -0.5, 0.25]], dtype=F64).expand(4, 3)
    a, v = sde.discrete_chain()
    A, m = sde.chain_marginals()
    D, s2 = 3, sde.prior_std**2
    prior = 0.5 * (D * math.log(s2 / m[-1]) + (D * m[-1] + A[-1] ** 2 * c[0].pow(2).sum()) / s2 - D)
    post = m[:-1] * v[1:] / m[1:]
    middle = 0 if variance == "posterior" else (0.5 * D * (torch.log(v[1:] / post) + post / v[1:] - 1)).sum()
    decoder = 0.5 * D * math.log(2 * math.pi * v[0])
    result = variational_bound(sde, _PointMassScore(sde, c[0]), c.clone(), seed=3, variance=variance)
    torch.testing.assert_close(result.nll, torch.full((4,), float(prior + middle + decoder), dtype=F64),
                               rtol=1e-9, atol=1e-6)
    assert result.nfe == sde.N and result.terms.shape == (sde.N + 1,)
    assert result.bpd[0].item() == pytest.approx(result.nll[0].item() / (D * math.log(2)))


def test_bound_is_above_the_exact_nll_and_close_to_it_on_the_ring():
    """VP's chain (DDPM's), exact score, σ_i² = β_i: E[L] ≥ H(data), and with 1000 steps within 0.1 nats."""
    mix, sde = ring_mixture(), VPSDE(N=1000)
    x, _ = mix.sample(1500, generator=torch.Generator().manual_seed(0), dtype=F64)
    result = variational_bound(sde, MixtureScore(sde, mix), x, seed=1)
    gap = result.nll + mix.log_prob(x)            # bound − exact −log p, per point
    mean, se = gap.mean().item(), (gap.std() / len(gap) ** 0.5).item()
    print(f"bound − exact NLL: {mean:+.4f} +- {se:.4f}")
    assert mean > -3 * se and mean < 0.1 and se < 0.05


def test_chain_times_match_the_noise_level():
    for sde in (VPSDE(), VESDE(), VPSDE(N=100)):
        A, m = sde.chain_marginals()
        t = sde.chain_times()
        lam = sde.half_log_snr(t)
        inside = t < sde.T                         # DDPM's last ᾱ lies just beyond VP's α(1)²
        torch.testing.assert_close(lam[inside], (A.log() - 0.5 * m.log())[inside], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(VESDE().chain_times(), torch.arange(1000, dtype=F64) / 999)
    # DDPM's x_i has the noise of t ≈ (i + 1)/N, not i/(N − 1): x_1 is already noisy.
    t = VPSDE().chain_times()
    assert abs(t[0].item() - 1e-3) < 1e-4 and abs(t[499].item() - 0.5) < 2e-3


def test_bound_refuses_a_chain_without_noise():
    with pytest.raises(SolverError, match="chain step without noise"):
        sde = subVPSDE()
        variational_bound(sde, MixtureScore(sde, ring_mixture()), torch.zeros(3, 2))
