"""Tests for ``sde_lib``: VP, sub-VP and VE against the closed forms of docs/math.md §1–§3.

Every expected value is written out here from docs/math.md (or a peer's documented number, such as
DDPM's ᾱ_1000 ≈ 4.04e-5), never read back from ``sde_lib``, except where the point of a test is
the consistency between two parts of the library (e.g. the simulated SDE against its marginals).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from sde_lib import SDE, VESDE, VPSDE, ReverseSDE, batch_broadcast, subVPSDE

F64 = torch.float64

# docs/math.md §2 defaults.
BETA_MIN, BETA_MAX = 0.1, 20.0
SIGMA_MIN, SIGMA_MAX = 0.01, 50.0

parametrize_sdes = pytest.mark.parametrize(
    "sde", [VPSDE(), subVPSDE(), VESDE()], ids=lambda s: type(s).__name__)


def _closed_form(sde: SDE, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """f(t), g(t)², log α(t), s(t)² of docs/math.md §2 for the default hyperparameters, in float64."""
    t = t.to(F64)
    if isinstance(sde, VESDE):
        sigma = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** t
        zero = torch.zeros_like(t)
        return dict(f=zero, g2=sigma**2 * 2 * math.log(SIGMA_MAX / SIGMA_MIN), log_alpha=zero, var=sigma**2)
    beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
    log_alpha = -0.25 * t**2 * (BETA_MAX - BETA_MIN) - 0.5 * t * BETA_MIN
    one_minus_alpha_sq = -torch.expm1(2 * log_alpha)
    if isinstance(sde, subVPSDE):
        g2 = beta * -torch.expm1(-2 * BETA_MIN * t - (BETA_MAX - BETA_MIN) * t**2)
        return dict(f=-0.5 * beta, g2=g2, log_alpha=log_alpha, var=one_minus_alpha_sq**2)
    return dict(f=-0.5 * beta, g2=beta, log_alpha=log_alpha, var=one_minus_alpha_sq)


def _drift_coeff_via_sde(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """f(t) read through the public ``sde()`` interface: the drift at x = 1."""
    drift, _ = sde.sde(torch.ones(len(t), 1, dtype=t.dtype), t)
    return drift[:, 0]


# ---- the schedules against docs/math.md §2 ---------------------------------------------------------

@parametrize_sdes
def test_sde_and_marginal_prob_match_closed_forms(sde):
    t = torch.tensor([1e-5, 1e-3, 0.1, 0.37, 0.5, 0.9, 1.0], dtype=F64)
    x = torch.randn(len(t), 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    ref = _closed_form(sde, t)

    drift, g = sde.sde(x, t)
    assert_close(drift, ref["f"][:, None] * x, rtol=1e-12, atol=0)
    assert_close(g, ref["g2"].sqrt(), rtol=1e-12, atol=0)
    assert_close(sde.diffusion_sq(t), ref["g2"], rtol=1e-12, atol=0)

    mean, std = sde.marginal_prob(x, t)
    assert_close(mean, ref["log_alpha"].exp()[:, None] * x, rtol=1e-12, atol=0)
    assert_close(std, ref["var"].sqrt(), rtol=1e-10, atol=0)
    assert_close(sde.marginal_var(t), ref["var"], rtol=1e-10, atol=0)
    # At t = T the marginal is (up to α(T) x_0, ≈ 0.66 % for VP) the prior N(0, prior_std² I).
    assert abs(std[-1].item() - sde.prior_std) / sde.prior_std < 1e-4


# ---- marginal_prob against simulation of the forward SDE --------------------------------------

_MC_STEPS, _MC_PATHS = 2000, 20000
_MC_X0 = torch.tensor([[0.0, 0.0], [3.0, -2.0], [-1.5, 6.0]], dtype=F64)   # (3 starting points, D = 2)
_MC_CHECKS = {200: 0.1, 1000: 0.5, 2000: 1.0}                              # step -> t


def _euler_maruyama_moments(sde: SDE, var0: float, n_steps: int, t_out: float) -> tuple[float, float]:
    """Exact mean factor and variance of Euler–Maruyama's x_n at t_out = n·dt, from x_0 ~ N(x0, var0).

    For dx = f(t) x dt + g(t) dw the scheme is x_{n+1} = (1 + f_n dt) x_n + g_n √dt z, so
    E x_n = a_n x0 with a_{n+1} = (1 + f_n dt) a_n and Var x_n = v_n, v_{n+1} = (1 + f_n dt)² v_n + g_n² dt.
    """
    dt = 1.0 / n_steps
    n_out = round(t_out * n_steps)
    t = torch.arange(n_out, dtype=F64) * dt
    f = _drift_coeff_via_sde(sde, t).tolist()
    g2 = sde.sde(torch.ones(n_out, 1, dtype=F64), t)[1].pow(2).tolist()
    a, v = 1.0, var0
    for fn, g2n in zip(f, g2):
        a, v = (1 + fn * dt) * a, (1 + fn * dt) ** 2 * v + g2n * dt
    return a, v


@parametrize_sdes
def test_marginal_prob_matches_euler_maruyama_simulation(sde):
    """Simulate dx = f dt + g dw from 0 to t and compare the sample moments to marginal_prob.

    The paths start from the t = 0 marginal N(α(0) x0, s(0)² I): x0 itself for VP and sub-VP,
    x0 + σ_min z for VE, whose data carry σ_min noise at t = 0 (docs/math.md §2). The std s(t) is the
    same for every x0 and coordinate, so its estimate pools all 6 · 20000 coordinates
    (standard error s/490: an error of about 1 % in s is detected). Tolerance:
    5 Monte-Carlo standard errors plus the scheme's O(dt) bias, estimated by Richardson
    extrapolation of the exact Euler–Maruyama moments (3× |moment(dt) − moment(dt/2)|, the
    leading-order bias being 2×); that estimate does not involve marginal_prob.
    """
    gen = torch.Generator().manual_seed(1234)
    n0 = len(_MC_X0)
    dt = 1.0 / _MC_STEPS
    mean0, std0 = sde.marginal_prob(_MC_X0, torch.zeros(n0, dtype=F64))
    var0 = std0[0].item() ** 2

    def normal():
        # Standard normals drawn in float32 (5× faster here) and carried in float64: rounding
        # the increments to 24 bits is invisible at this sample size.
        return torch.randn(n0, _MC_PATHS, 2, generator=gen).to(F64)

    moments = {}
    x = mean0[:, None, :] + batch_broadcast(std0, mean0[:, None, :]) * normal()
    for n in range(_MC_STEPS):
        t = torch.full((n0,), n * dt, dtype=F64)
        drift, g = sde.sde(x, t)                       # x: (3, paths, 2) with t: (3,)
        x = x + drift * dt + batch_broadcast(g, x) * math.sqrt(dt) * normal()
        if n + 1 in _MC_CHECKS:
            moments[_MC_CHECKS[n + 1]] = (x.mean(1), x.var(1).mean().sqrt().item())

    n_pooled = n0 * 2 * _MC_PATHS
    for t_out, (emp_mean, emp_std) in moments.items():
        mean, std = sde.marginal_prob(_MC_X0, torch.full((n0,), t_out, dtype=F64))
        assert_close(std, std[:1].expand(n0), rtol=0, atol=0)
        a1, v1 = _euler_maruyama_moments(sde, var0, _MC_STEPS, t_out)
        a2, v2 = _euler_maruyama_moments(sde, var0, 2 * _MC_STEPS, t_out)
        tol_mean = 5 * emp_std / math.sqrt(_MC_PATHS) + 3 * abs(a1 - a2) * _MC_X0.abs() + 1e-12
        tol_std = 5 * emp_std / math.sqrt(2 * n_pooled) + 3 * abs(math.sqrt(v1) - math.sqrt(v2)) + 1e-12
        err_mean = (emp_mean - mean).abs()
        err_std = abs(emp_std - std[0].item())
        assert (err_mean <= tol_mean).all(), f"t={t_out}: mean error {err_mean} > tolerance {tol_mean}"
        assert err_std <= tol_std, f"t={t_out}: std error {err_std} > tolerance {tol_std} (s = {std[0].item()})"


# ---- variance identities -----------------------------------------------------------------------

def test_subvp_variance_is_below_vp():
    t = torch.linspace(0, 1, 201, dtype=F64)[1:]                   # t ∈ (0, 1]
    vp, sub = VPSDE().marginal_var(t), subVPSDE().marginal_var(t)
    assert (sub < vp).all()
    assert_close(sub, vp**2, rtol=1e-12, atol=0)                    # s² = (1 − α²)²


@parametrize_sdes
def test_variance_and_mean_odes_hold(sde):
    """d(s²)/dt = 2 f s² + g² and d(log α)/dt = f, by central differences in float64.

    These tie diffusion_sq to marginal_var and the drift to log_mean_coeff.
    """
    t = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99], dtype=F64)
    h = 1e-5
    f = _drift_coeff_via_sde(sde, t)
    var = sde.marginal_var(t)
    dvar_dt = (sde.marginal_var(t + h) - sde.marginal_var(t - h)) / (2 * h)
    assert_close(dvar_dt, 2 * f * var + sde.diffusion_sq(t), rtol=1e-6, atol=0)
    dlog_alpha_dt = (sde.log_mean_coeff(t + h) - sde.log_mean_coeff(t - h)) / (2 * h)
    assert_close(dlog_alpha_dt, f, rtol=1e-7, atol=1e-12)


# ---- discretisations (docs/math.md §3) --------------------------------------------------------------

_GRID = torch.arange(1000, dtype=F64) / 999                          # t_i = i/(N − 1)


@pytest.mark.parametrize("t_dtype", [torch.float64, torch.float32], ids=["t_f64", "t_f32"])
def test_vp_discretize_is_ddpm(t_dtype):
    sde = VPSDE()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    assert sde.discrete_betas().dtype == F64
    assert_close(sde.discrete_betas(), betas, rtol=0, atol=1e-12)

    x = torch.randn(1000, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    f, G = sde.discretize(x, _GRID.to(t_dtype))
    assert_close(f, (torch.sqrt(1 - betas) - 1)[:, None] * x, rtol=1e-10, atol=1e-15)
    assert_close(G, betas.sqrt(), rtol=1e-12, atol=0)

    # All in float32 (coefficients rounded to float32): still the right index i for every t_i.
    f32, G32 = sde.discretize(x.float(), _GRID.float())
    assert_close(G32.double(), betas.sqrt(), rtol=1e-6, atol=0)
    assert_close(f32.double(), (torch.sqrt(1 - betas) - 1)[:, None] * x, rtol=0, atol=2e-7 * x.abs().max().item())


def test_ddpm_alpha_bar_and_vp_alpha_at_one():
    """ᾱ_1000 ≈ 4.04e-5 (docs/math.md §3) for the discrete chain, α(1)² = e^(−10.05) ≈ 4.32e-5 for VP."""
    sde = VPSDE()
    alpha_bar = torch.prod(1 - sde.discrete_betas()).item()
    assert alpha_bar == pytest.approx(4.04e-5, rel=1e-2)
    alpha_sq = math.exp(2 * sde.log_mean_coeff(torch.tensor(1.0, dtype=F64)).item())
    assert alpha_sq == pytest.approx(math.exp(-10.05), rel=1e-12)
    assert alpha_sq == pytest.approx(4.32e-5, rel=1e-2)


@pytest.mark.parametrize("t_dtype", [torch.float64, torch.float32], ids=["t_f64", "t_f32"])
def test_ve_discretize_is_ncsn(t_dtype):
    sde = VESDE()
    sigmas = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** _GRID             # geometric, σ_min .. σ_max
    assert_close(sde.discrete_sigmas(), sigmas, rtol=1e-12, atol=0)
    assert sde.discrete_sigmas()[0].item() == pytest.approx(SIGMA_MIN, rel=1e-12)
    assert sde.discrete_sigmas()[-1].item() == pytest.approx(SIGMA_MAX, rel=1e-12)

    x = torch.randn(1000, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    f, G = sde.discretize(x, _GRID.to(t_dtype))
    sigma_prev = torch.cat([torch.zeros(1, dtype=F64), sigmas[:-1]])  # σ_{−1} = 0
    assert torch.equal(f, torch.zeros_like(x))
    assert_close(G, torch.sqrt(sigmas**2 - sigma_prev**2), rtol=1e-10, atol=0)
    assert G[0].item() == pytest.approx(SIGMA_MIN, rel=1e-12)


@pytest.mark.parametrize("t_dtype", [torch.float64, torch.float32], ids=["t_f64", "t_f32"])
def test_subvp_discretize_is_euler_maruyama(t_dtype):
    """At any t (on and off the grid i/(N − 1)): f = f(t) x/N and G = √(g(t)²/N), N = 1000."""
    sde = subVPSDE()
    t = torch.cat([_GRID, torch.linspace(1e-3, 1, 777, dtype=F64)]).to(t_dtype)
    ref = _closed_form(sde, t.to(F64))
    x = torch.randn(len(t), 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    f, G = sde.discretize(x, t)
    rtol = 1e-10 if t_dtype == F64 else 1e-6        # float32 t: the coefficients carry its rounding
    assert_close(f, ref["f"][:, None] * x / 1000, rtol=rtol, atol=0)
    assert_close(G, torch.sqrt(ref["g2"] / 1000), rtol=rtol, atol=0)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=lambda s: type(s).__name__)
def test_chain_marginal_variance(sde):
    """chain_coeffs' m_i: 1 − ᾱ_i for DDPM, σ_i² for NCSN."""
    like = torch.zeros(1000, dtype=F64)
    a, v, m = sde.chain_coeffs(_GRID, like)
    if isinstance(sde, VPSDE):
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
        assert_close(a, torch.sqrt(1 - betas), rtol=1e-12, atol=0)
        assert_close(v, betas, rtol=1e-10, atol=0)
        assert_close(m, 1 - torch.cumprod(1 - betas, 0), rtol=1e-10, atol=0)
    else:
        sigmas = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** _GRID
        assert_close(a, torch.ones_like(a))
        assert_close(m, sigmas**2, rtol=1e-10, atol=0)
    a32, v32, m32 = sde.chain_coeffs(_GRID.float(), like.float())
    assert m32.dtype == torch.float32
    assert_close(m32.double(), m, rtol=1e-6, atol=0)


# ---- half log-SNR -----------------------------------------------------------------------------

@parametrize_sdes
def test_half_log_snr_and_its_inverse(sde):
    t = torch.linspace(1e-4, 1, 1001, dtype=F64)
    lam = sde.half_log_snr(t)
    ref = _closed_form(sde, t)
    assert_close(lam, ref["log_alpha"] - 0.5 * ref["var"].log(), rtol=1e-10, atol=1e-10)
    assert (lam.diff() < 0).all()
    assert_close(sde.t_from_half_log_snr(lam), t, rtol=1e-9, atol=0)
    lam_grid = torch.linspace(lam[-1].item(), lam[0].item(), 777, dtype=F64)
    assert_close(sde.half_log_snr(sde.t_from_half_log_snr(lam_grid)), lam_grid, rtol=0, atol=1e-8)


# ---- behaviour at and just outside [0, T] -----------------------------------------------------

_EDGE_T = (-1e-3, 0.0, 1 + 1e-3)


@parametrize_sdes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_schedules_finite_slightly_outside_interval(sde, dtype):
    """Adaptive ODE solvers probe just outside [0, T] (docs/math.md §4): drift, diffusion and marginals stay finite."""
    t = torch.tensor(_EDGE_T, dtype=dtype)
    x = torch.ones(len(t), 2, dtype=dtype)
    drift, g = sde.sde(x, t)
    mean, std = sde.marginal_prob(x, t)
    for name, value in dict(drift=drift, g=g, mean=mean, std=std, diffusion_sq=sde.diffusion_sq(t),
                            marginal_var=sde.marginal_var(t), marginal_std=sde.marginal_std(t)).items():
        assert torch.isfinite(value).all(), f"{name} not finite at t={_EDGE_T}: {value}"
    assert (sde.marginal_var(t) >= 0).all()
    assert (sde.diffusion_sq(t) >= 0).all()


@parametrize_sdes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_half_log_snr_slightly_outside_interval(sde, dtype):
    """λ = log(α/s) takes t clamped to [0, T]: at t ≤ 0 it is λ(0), at t ≥ T it is λ(T).

    λ(0) is +inf for VP and sub-VP, whose data are noise-free at t = 0 (no finite value would
    be consistent with α(0) = 1, s(0) = 0); VE's s(0) = σ_min > 0 keeps λ(0) = −log σ_min.
    """
    t = torch.tensor(_EDGE_T, dtype=dtype)
    lam = sde.half_log_snr(t)
    if isinstance(sde, VESDE):
        assert lam[1].item() == pytest.approx(-math.log(SIGMA_MIN), rel=1e-6)
    else:
        assert lam[1].item() == math.inf
    assert lam[0].item() == lam[1].item()
    assert lam[2].item() == sde.half_log_snr(torch.tensor([1.0], dtype=dtype)).item()
    assert math.isfinite(lam[2].item())


@parametrize_sdes
@pytest.mark.parametrize("t", [1e-6, 1e-4])
def test_float32_precision_near_zero(sde, t):
    """s(t)² near t = 0 in float32 agrees with float64 to 1e-3 relative (VP needs expm1 here)."""
    t32, t64 = torch.tensor([t], dtype=torch.float32), torch.tensor([t], dtype=F64)
    var64 = sde.marginal_var(t64)
    assert_close(var64, _closed_form(sde, t64)["var"], rtol=1e-10, atol=0)
    assert_close(sde.marginal_var(t32).double(), var64, rtol=1e-3, atol=0)
    assert_close(sde.marginal_std(t32).double(), var64.sqrt(), rtol=1e-3, atol=0)
    assert_close(sde.half_log_snr(t32).double(), sde.half_log_snr(t64), rtol=1e-3, atol=0)


# ---- shapes -----------------------------------------------------------------------------------

@parametrize_sdes
@pytest.mark.parametrize("shape", [(5, 2), (5, 1, 8, 8)], ids=["flat", "image"])
def test_shapes_and_per_sample_broadcasting(sde, shape):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(shape, dtype=F64, generator=gen)
    t = torch.rand(5, dtype=F64, generator=gen)
    B = (5,)
    drift, g = sde.sde(x, t)
    mean, std = sde.marginal_prob(x, t)
    f, G = sde.discretize(x, t)
    assert drift.shape == mean.shape == f.shape == x.shape
    assert g.shape == std.shape == G.shape == B
    assert all(c.shape == B for c in sde.chain_coeffs(t, x))
    assert sde.prior_logp(x).shape == B
    rev_drift, rev_g = sde.reverse(lambda y, s: -y).sde(x, t)
    assert rev_drift.shape == x.shape and rev_g.shape == B
    # Each sample uses its own t.
    for b in range(5):
        mean_b, std_b = sde.marginal_prob(x[b:b + 1], t[b:b + 1])
        assert_close(mean[b:b + 1], mean_b, rtol=1e-14, atol=0)
        drift_b, _ = sde.sde(x[b:b + 1], t[b:b + 1])
        assert_close(drift[b:b + 1], drift_b, rtol=1e-14, atol=0)
    ref = _closed_form(sde, t)
    assert_close(mean, batch_broadcast(ref["log_alpha"].exp(), x) * x, rtol=1e-12, atol=0)


# ---- prior ------------------------------------------------------------------------------------

@parametrize_sdes
def test_prior_sampling_std_and_reproducibility(sde):
    assert sde.prior_std == (SIGMA_MAX if isinstance(sde, VESDE) else 1.0)
    z = sde.prior_sampling((20000, 2), generator=torch.Generator().manual_seed(5), dtype=F64)
    assert z.shape == (20000, 2) and z.dtype == F64
    n = z.numel()
    assert abs(z.std().item() - sde.prior_std) < 5 * sde.prior_std / math.sqrt(2 * n)
    assert abs(z.mean().item()) < 5 * sde.prior_std / math.sqrt(n)
    again = sde.prior_sampling((20000, 2), generator=torch.Generator().manual_seed(5), dtype=F64)
    other = sde.prior_sampling((20000, 2), generator=torch.Generator().manual_seed(6), dtype=F64)
    assert torch.equal(z, again)
    assert not torch.equal(z, other)


@parametrize_sdes
@pytest.mark.parametrize("shape", [(6, 2), (6, 1, 8, 8)], ids=["flat", "image"])
def test_prior_logp_is_gaussian_log_density(sde, shape):
    z = sde.prior_sampling(shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    z = z * torch.linspace(0.1, 3.0, shape[0], dtype=F64).reshape(-1, *([1] * (len(shape) - 1)))
    # loc and scale as float64 tensors: from Python floats, Normal would store them in float32.
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(sde.prior_std, dtype=F64))
    expected = normal.log_prob(z).flatten(1).sum(1)
    assert_close(sde.prior_logp(z), expected, rtol=1e-12, atol=1e-10)


# ---- reverse-time process ---------------------------------------------------------------------

@parametrize_sdes
@pytest.mark.parametrize("probability_flow", [False, True], ids=["sde", "ode"])
def test_reverse_drift_and_diffusion(sde, probability_flow):
    """Reverse SDE: drift f − g² s, diffusion g; PF-ODE: f − ½ g² s, zero diffusion (docs/math.md §1)."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(7, 2, dtype=F64, generator=gen)
    t = torch.rand(7, dtype=F64, generator=gen)
    rev = sde.reverse(lambda y, s: -y, probability_flow=probability_flow)
    assert isinstance(rev, ReverseSDE) and rev.N == sde.N and rev.T == sde.T
    ref = _closed_form(sde, t)
    weight = 0.5 if probability_flow else 1.0
    drift, diffusion = rev.sde(x, t)
    # score = −x, so f − w g² s = (f + w g²) x; for VP's PF-ODE f + ½ g² = 0 exactly, hence the atol.
    scale = (ref["g2"][:, None] * x).abs().max().item()
    assert_close(drift, (ref["f"] + weight * ref["g2"])[:, None] * x, rtol=1e-12, atol=1e-14 * scale)
    expected_diffusion = torch.zeros(7, dtype=F64) if probability_flow else ref["g2"].sqrt()
    assert diffusion.shape == (7,)
    assert_close(diffusion, expected_diffusion, rtol=1e-12, atol=0)

    # The discrete reverse step, in the same forward-time convention: (f_i − w G_i² s, G_i or 0).
    f, G = sde.discretize(x, t)
    rev_f, rev_G = rev.discretize(x, t)
    assert_close(rev_f, f + weight * G[:, None] ** 2 * x, rtol=1e-12, atol=1e-14 * scale)
    assert_close(rev_G, torch.zeros_like(G) if probability_flow else G, rtol=0, atol=0)


# ---- construction -----------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: VPSDE(beta_min=-1),
    lambda: subVPSDE(beta_min=-1),
    lambda: VPSDE(beta_min=2.0, beta_max=1.0),
    lambda: VESDE(sigma_min=1, sigma_max=0.5),
    lambda: VESDE(sigma_min=0.0),
    lambda: VPSDE(N=1),
    lambda: subVPSDE(N=1),
    lambda: VESDE(N=1),
    lambda: VPSDE(N=2.5),
], ids=["vp_beta_min<0", "subvp_beta_min<0", "vp_beta_min>beta_max", "ve_sigma_min>sigma_max",
        "ve_sigma_min=0", "vp_N=1", "subvp_N=1", "ve_N=1", "vp_N=2.5"])
def test_constructor_rejects_bad_hyperparameters(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("sde", [VPSDE(beta_min=0.2, beta_max=15.0, N=100),
                                 subVPSDE(beta_min=0.05, beta_max=10.0, N=50),
                                 VESDE(sigma_min=0.02, sigma_max=30.0, N=200)],
                         ids=lambda s: type(s).__name__)
def test_with_steps_and_equality(sde):
    old = sde.hparams()
    new = sde.with_steps(37)
    assert type(new) is type(sde)
    assert new.N == 37 and sde.N == old["N"]
    assert {k: v for k, v in new.hparams().items() if k != "N"} == {k: v for k, v in old.items() if k != "N"}
    assert len(new.discrete_chain()[0]) == 37
    # The new chain really has 37 steps: t = T is its last index.
    _, v, _ = new.chain_coeffs(torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64))
    assert_close(v, new.discrete_chain()[1][-1:], rtol=1e-12, atol=0)

    assert new != sde
    assert new.with_steps(sde.N) == sde
    twin = type(sde)(**old)
    assert twin == sde and hash(twin) == hash(sde)
    assert {sde: "x"}[twin] == "x"


def test_equality_needs_same_type():
    # VP and sub-VP share their hyperparameters but are different SDEs.
    assert VPSDE().hparams() == subVPSDE().hparams()
    assert VPSDE() != subVPSDE()
    assert len({VPSDE(), subVPSDE(), VESDE(), VPSDE()}) == 3
