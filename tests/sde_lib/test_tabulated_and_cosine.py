"""``VPCosineSDE`` and ``TabulatedVPSDE`` against closed forms (docs/diffusers.md §1–§2).

Expected values are written out here: the cosine schedule's formulas, scipy's PCHIP interpolant of a
β table's log ᾱ, DDPM's linear betas and VPSDE, never read back from the class under test except where
a test's point is the consistency of two of its parts (an inverse, an ODE between two schedules).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.interpolate import PchipInterpolator
from torch.testing import assert_close

from sde_lib import SDEError, SDES, TabulatedVPSDE, VPCosineSDE, VPSDE, get_sde

F64 = torch.float64
S = 0.008                                          # Nichol & Dhariwal's offset

LINEAR = torch.linspace(1e-4, 0.02, 1000, dtype=F64)                    # DDPM's betas
SCALED_LINEAR = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2   # latent diffusion's


def _cosine_betas(n: int) -> torch.Tensor:
    """diffusers' ``squaredcos_cap_v2``: β_i = min(1 − f((i+1)/n)/f(i/n), 0.999), f(t) = cos²((t + s)/(1 + s)·π/2)."""
    f = lambda t: math.cos((t + S) / (1 + S) * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=F64)


SDE_CASES = [VPCosineSDE(), TabulatedVPSDE(LINEAR), TabulatedVPSDE(SCALED_LINEAR), TabulatedVPSDE(_cosine_betas(1000)),
             TabulatedVPSDE(LINEAR[::10] * 10)]
IDS = ["cosine", "table_linear", "table_scaled_linear", "table_cosine", "table_linear_100"]
parametrize_sdes = pytest.mark.parametrize("sde", SDE_CASES, ids=IDS)


# ---- the cosine schedule's closed forms ----------------------------------------------------------

def test_cosine_schedule_is_nichol_dhariwal_below_the_cap():
    sde = VPCosineSDE()
    t = torch.tensor([0.0, 1e-5, 1e-3, 0.1, 0.5, 0.9, 0.99, 0.997], dtype=F64)
    theta = (t + S) / (1 + S) * math.pi / 2
    alpha_bar = torch.cos(theta) ** 2 / math.cos(S / (1 + S) * math.pi / 2) ** 2
    assert_close(sde.log_mean_coeff(t), 0.5 * alpha_bar.log(), rtol=1e-12, atol=1e-15)
    assert_close(sde.marginal_var(t), 1 - alpha_bar, rtol=1e-9, atol=1e-15)
    beta = math.pi / (1 + S) * torch.tan(theta)
    assert_close(sde.diffusion_sq(t), beta, rtol=1e-12, atol=0)
    assert_close(sde.drift_coeff(t), -0.5 * beta, rtol=1e-12, atol=0)
    assert sde.prior_std == 1.0


def test_cosine_cap_keeps_beta_continuous_at_beta_max():
    """β = min(π tan θ/(1 + s), β_max): β(t_c) = 999 at t_c ≈ 0.998, log ᾱ continuous there, linear after."""
    sde = VPCosineSDE()
    t_c = (math.atan(999.0 * (1 + S) / math.pi) * 2 / math.pi) * (1 + S) - S
    assert sde.t_cap == pytest.approx(t_c, rel=1e-12) and 0.9979 < t_c < 0.9981
    below, above = torch.tensor([t_c - 1e-9], dtype=F64), torch.tensor([t_c + 1e-9], dtype=F64)
    assert sde.diffusion_sq(below).item() == pytest.approx(999.0, rel=1e-5)
    assert sde.diffusion_sq(above).item() == 999.0
    assert (sde.log_mean_coeff(above) - sde.log_mean_coeff(below)).abs().item() < 1e-6
    ends = torch.tensor([t_c, 1.0], dtype=F64)
    log_alpha_bar = 2 * sde.log_mean_coeff(ends)
    assert (log_alpha_bar[0] - log_alpha_bar[1]).item() == pytest.approx(999.0 * (1 - t_c), rel=1e-9)
    assert math.exp(log_alpha_bar[1].item()) == pytest.approx(1.3174e-6, rel=1e-3)     # ᾱ(1), λ(1) ≈ −6.77


def test_cosine_chain_is_squaredcos_cap_v2():
    for n in (1000, 37):
        a, v = VPCosineSDE(N=n).discrete_chain()
        assert_close(v, _cosine_betas(n), rtol=1e-15, atol=0)
        assert_close(a, torch.sqrt(1 - _cosine_betas(n)), rtol=1e-15, atol=0)
    # Below the cap (t_c ≈ 0.998) the chain's ᾱ_i is the cosine's at (i + 1)/N, so that is index i's time; above
    # it the capped SDE is less noisy than the cosine, so the chain's indices land later; the last (β_999
    # clipped at 0.999) beyond T, which the schedules read as T.
    sde = VPCosineSDE()
    times, nominal = sde.chain_times(), torch.arange(1, 1001, dtype=F64) / 1000
    below = nominal <= sde.t_cap
    assert below.sum() == 997
    assert_close(times[below], nominal[below], rtol=0, atol=1e-12)
    assert (times[~below] > nominal[~below]).all() and times[-1] > 1.0


def test_vp_cosine_is_registered_and_refuses_bad_hyperparameters():
    assert SDES["vp_cosine"] is VPCosineSDE and get_sde("vp_cosine", N=50) == VPCosineSDE(N=50)
    for bad in (dict(cosine_s=0.0), dict(cosine_s=float("nan")), dict(beta_max=0.01), dict(beta_max=float("inf"))):
        with pytest.raises(SDEError):
            VPCosineSDE(**bad)


# ---- the tabulated SDE: the table, its interpolant, its chain ---------------------------------------

@pytest.mark.parametrize("betas", [LINEAR, SCALED_LINEAR, _cosine_betas(1000)], ids=IDS[1:4])
def test_table_is_the_pchip_of_log_alpha_bar_through_its_knots(betas):
    """log ᾱ(t) is scipy's PchipInterpolator through (0, 0), ((i + 1)/M, log ᾱ_i); β = −its derivative."""
    sde = TabulatedVPSDE(betas)
    M = len(betas)
    knots = np.arange(M + 1) / M
    log_alpha_bar = np.concatenate([[0.0], np.cumsum(np.log1p(-betas.numpy()))])
    pchip = PchipInterpolator(knots, log_alpha_bar)
    t = torch.cat([torch.linspace(0, 1, 4001, dtype=F64), torch.tensor(knots)])
    assert_close(2 * sde.log_mean_coeff(t), torch.from_numpy(pchip(t.numpy())), rtol=1e-12, atol=1e-13)
    assert_close(sde.diffusion_sq(t), torch.from_numpy(-pchip.derivative()(t.numpy())), rtol=1e-9, atol=1e-9)
    assert (sde.diffusion_sq(t) >= 0).all()


@pytest.mark.parametrize("betas", [LINEAR, _cosine_betas(1000)], ids=["linear", "cosine"])
def test_table_chain_is_the_table_and_index_i_sits_at_i_plus_one_over_m(betas):
    sde = TabulatedVPSDE(betas)
    a, v = sde.discrete_chain()
    assert torch.equal(v, betas) and torch.equal(a, torch.sqrt(1 - betas))
    A, m = sde.chain_marginals()
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert_close(A**2, alpha_bar, rtol=1e-12, atol=0)
    assert_close(m, 1 - alpha_bar, rtol=1e-12, atol=0)
    assert_close(sde.chain_times(), torch.arange(1, 1001, dtype=F64) / 1000, rtol=0, atol=1e-13)
    t = torch.tensor([0.0, 5e-4, 0.001, 0.0015, 0.5, 0.5004, 1.0], dtype=F64)
    assert_close(sde.chain_position(t), torch.tensor([0.0, 0.0, 0.0, 0.5, 499.0, 499.4, 999.0], dtype=F64),
                 rtol=0, atol=1e-9)


def test_table_with_other_steps_is_the_same_sde_on_a_coarser_chain():
    """N = 50 on a 1000-step table: ᾱ_j = ᾱ((j + 1)/50) = the table's ᾱ_{20j+19}, i.e. the trailing timesteps."""
    sde = TabulatedVPSDE(LINEAR)
    coarse = sde.with_steps(50)
    assert coarse.N == 50 and coarse.betas == sde.betas and coarse == TabulatedVPSDE(LINEAR, N=50)
    A, m = coarse.chain_marginals()
    alpha_bar = torch.cumprod(1 - LINEAR, 0)[19::20]
    assert_close(A**2, alpha_bar, rtol=1e-12, atol=0)
    assert_close(m, 1 - alpha_bar, rtol=1e-10, atol=0)
    assert_close(coarse.chain_times(), torch.arange(1, 51, dtype=F64) / 50, rtol=0, atol=1e-13)
    assert_close(coarse.marginal_var(torch.tensor([0.3], dtype=F64)), sde.marginal_var(torch.tensor([0.3], dtype=F64)))


def test_linear_table_is_close_to_vp():
    """DDPM's linear betas are VPSDE's own chain; the continuous SDEs differ by log(1 − β) ≈ −β and the index offset."""
    vp, table = VPSDE(), TabulatedVPSDE(LINEAR)
    for ours, theirs in zip(table.discrete_chain(), vp.discrete_chain()):
        assert_close(ours, theirs, rtol=1e-15, atol=0)
    # chain times: VP's are close to (i + 1)/N, the last few just beyond T (docs/math.md §3.3)
    assert (vp.chain_times() - table.chain_times()).abs().max() < 4e-3
    t = torch.linspace(0.01, 1, 100, dtype=F64)
    assert_close(table.marginal_std(t), vp.marginal_std(t), rtol=0.03, atol=0)
    assert_close(table.diffusion_sq(t), vp.diffusion_sq(t), rtol=0.04, atol=0)
    # at T: −log ᾱ = Σ −log(1 − β_i) = Σβ_i + Σβ_i²/2 + ... against VP's ∫β = Σβ_i = 10.05
    gap = -2 * (table.log_mean_coeff(torch.tensor(1.0, dtype=F64)) - vp.log_mean_coeff(torch.tensor(1.0, dtype=F64)))
    assert gap.item() == pytest.approx(-torch.log1p(-LINEAR).sum().item() - LINEAR.sum().item(), rel=1e-9)


def test_table_refuses_bad_betas():
    for bad in ([0.1], [0.0, 0.1], [0.5, 1.0], [0.1, float("nan")]):
        with pytest.raises(SDEError, match="betas"):
            TabulatedVPSDE(bad)
    assert "1000 values" in repr(TabulatedVPSDE(LINEAR))


# ---- what every VP SDE satisfies ---------------------------------------------------------------------

@parametrize_sdes
def test_variance_preserving_and_the_variance_ode(sde):
    """α² + s² = 1, and d(s²)/dt = 2 f s² + g², d(log α)/dt = f by central differences (between knots too)."""
    t = torch.tensor([0.0123, 0.1, 0.30571, 0.5, 0.7, 0.9, 0.99, 0.9991], dtype=F64)
    assert_close((2 * sde.log_mean_coeff(t)).exp() + sde.marginal_var(t), torch.ones_like(t), rtol=1e-14, atol=0)
    h = 1e-6
    f, g2, var = sde.drift_coeff(t), sde.diffusion_sq(t), sde.marginal_var(t)
    dvar = (sde.marginal_var(t + h) - sde.marginal_var(t - h)) / (2 * h)
    assert_close(dvar, 2 * f * var + g2, rtol=1e-5, atol=1e-9)
    dlog_alpha = (sde.log_mean_coeff(t + h) - sde.log_mean_coeff(t - h)) / (2 * h)
    assert_close(dlog_alpha, f, rtol=1e-5, atol=1e-9)


@parametrize_sdes
def test_half_log_snr_and_its_inverse(sde):
    t = torch.cat([torch.tensor([1e-6, 1e-5, 3e-4], dtype=F64), torch.linspace(1e-3, 1, 1001, dtype=F64)])
    lam = sde.half_log_snr(t)
    assert_close(lam, sde.log_mean_coeff(t) - 0.5 * sde.marginal_var(t).log(), rtol=0, atol=1e-12)
    assert (lam.diff() < 0).all()
    assert_close(sde.t_from_half_log_snr(lam), t, rtol=1e-10, atol=1e-15)
    assert sde.t_from_half_log_snr(torch.tensor(math.inf, dtype=F64)).item() == 0.0
    # below λ(T) the inverse goes on beyond T, continuously and increasing
    beyond = sde.t_from_half_log_snr(lam[-1] - torch.tensor([0.0, 0.5, 1.0], dtype=F64))
    assert beyond[0].item() == pytest.approx(1.0, abs=1e-12) and (beyond.diff() > 0).all()


@parametrize_sdes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_schedules_keep_the_dtype_and_stay_finite_outside_the_interval(sde, dtype):
    t = torch.tensor([-1e-3, 0.0, 1e-4, 0.5, 1.0, 1 + 1e-3], dtype=dtype)
    for value in (sde.log_mean_coeff(t), sde.marginal_var(t), sde.drift_coeff(t), sde.diffusion_sq(t),
                  sde.half_log_snr(t[2:5])):
        assert value.dtype == dtype and torch.isfinite(value).all()
    assert sde.marginal_var(t)[:2].eq(0).all() and sde.marginal_var(t)[4] == sde.marginal_var(t)[5]
    assert_close(sde.marginal_var(t[2:3]).double(), sde.marginal_var(t[2:3].double()), rtol=1e-5, atol=0)


def test_beta_has_no_kinks_for_an_adaptive_solver():
    """β(t) is continuous: across every knot of the cosine table it changes by no more than between neighbours."""
    sde = TabulatedVPSDE(_cosine_betas(1000))
    knots = torch.arange(1, 999, dtype=F64) / 1000
    jump = (sde.diffusion_sq(knots + 1e-12) - sde.diffusion_sq(knots - 1e-12)).abs()
    assert (jump <= 1e-6 * sde.diffusion_sq(knots)).all()
