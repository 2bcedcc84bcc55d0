"""Tests for ``models.mixture``: the exact Gaussian-mixture density and score under a linear SDE.

docs/math.md §8: if p_0 = Σ_k w_k N(μ_k, Σ_k), then p_t = Σ_k w_k N(α μ_k, α² Σ_k + s² I). The
references here are torch.distributions.MultivariateNormal, autograd and numerical quadrature.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from models import GaussianMixture, MixtureScore, random_mixture, ring_mixture
from sde_lib import VESDE, VPSDE, subVPSDE

F64 = torch.float64

parametrize_sdes = pytest.mark.parametrize(
    "sde", [VPSDE(), subVPSDE(), VESDE()], ids=lambda s: type(s).__name__)


def _alpha_and_var(sde, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α(t) and s(t)² from the SDE (their closed forms are tested in tests/sde_lib/test_sde.py)."""
    return sde.log_mean_coeff(t).exp(), sde.marginal_var(t)


def _reference_log_prob(mixture: GaussianMixture, sde, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log Σ_k w_k N(x; α μ_k, α² Σ_k + s² I) per sample, with MultivariateNormal, one t per sample."""
    flat = x.flatten(1)
    covs = mixture.covariances()
    eye = torch.eye(mixture.dim, dtype=F64)
    out = []
    for b in range(len(flat)):
        alpha, var = _alpha_and_var(sde, t[b])
        comps = torch.distributions.MultivariateNormal(alpha * mixture.means, alpha**2 * covs + var * eye)
        out.append(torch.logsumexp(mixture.weights.log() + comps.log_prob(flat[b]), 0))
    return torch.stack(out)


def _diffused_points(mixture: GaussianMixture, sde, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x_t = α x_0 + s z for x_0 ~ p_0, one per entry of t, in float64: typical points of p_t."""
    x0, _ = mixture.sample(len(t), generator=gen, dtype=F64)
    mean, std = sde.marginal_prob(x0, t)
    return mean + std.reshape(-1, *([1] * (x0.dim() - 1))) * torch.randn(x0.shape, dtype=F64, generator=gen)


_MIXTURES = {"ring2d": ring_mixture(), "random16d": random_mixture(dim=16)}


# ---- score = ∇ log p_t ------------------------------------------------------------------------

@parametrize_sdes
@pytest.mark.parametrize("mixture_name", list(_MIXTURES))
@pytest.mark.parametrize("t", [1e-3, 0.1, 0.5, 1.0, "mixed"])
def test_score_is_gradient_of_log_prob(sde, mixture_name, t):
    mixture = _MIXTURES[mixture_name]
    model = MixtureScore(sde, mixture)
    gen = torch.Generator().manual_seed(0)
    B = 32
    tt = torch.rand(B, dtype=F64, generator=gen) if t == "mixed" else torch.full((B,), t, dtype=F64)
    x = _diffused_points(mixture, sde, tt, gen)
    x[:4] *= 3.0                                                     # a few points far in the tails
    x.requires_grad_(True)
    grad, = torch.autograd.grad(model.log_prob(x, tt).sum(), x)
    score = model(x.detach(), tt)
    assert score.shape == x.shape and score.dtype == F64
    assert_close(score, grad, rtol=1e-9, atol=1e-9 * grad.abs().max().item())
    assert_close(model.score_fn(x.detach(), tt), score, rtol=0, atol=0)


# ---- log p_t against closed forms -------------------------------------------------------------

@parametrize_sdes
@pytest.mark.parametrize("t", [0.0, 0.05, 0.5, 1.0])
def test_single_component_is_the_diffused_gaussian(sde, t):
    """One component: p_t = N(α μ, α² Σ + s² I); log p_t and its score in closed form."""
    gen = torch.Generator().manual_seed(1)
    D = 3
    A = torch.randn(D, D, dtype=F64, generator=gen)
    cov = A @ A.T + 0.1 * torch.eye(D, dtype=F64)
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    model = MixtureScore(sde, GaussianMixture([1.0], mu[None], cov[None]))
    tt = torch.full((10,), t, dtype=F64)
    alpha, var = _alpha_and_var(sde, tt[0])
    cov_t = alpha**2 * cov + var * torch.eye(D, dtype=F64)
    ref = torch.distributions.MultivariateNormal(alpha * mu, cov_t)
    # Points from N(α μ, (1.5)² cov_t): typical ones and some in the tails.
    x = alpha * mu + 1.5 * torch.randn(10, D, dtype=F64, generator=gen) @ torch.linalg.cholesky(cov_t).T
    assert_close(model.log_prob(x, tt), ref.log_prob(x), rtol=1e-10, atol=1e-10)
    expected_score = -torch.linalg.solve(cov_t, (x - alpha * mu).T).T
    assert_close(model(x, tt), expected_score, rtol=1e-9, atol=1e-10)


@parametrize_sdes
@pytest.mark.parametrize("cov_form", ["full", "diagonal", "isotropic"])
def test_log_prob_matches_mixture_of_multivariate_normals(sde, cov_form):
    """Several components, each covariance form the constructor accepts, one t per sample."""
    gen = torch.Generator().manual_seed(2)
    K, D = 3, 4
    means = 2.0 * torch.randn(K, D, dtype=F64, generator=gen)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    if cov_form == "full":
        A = torch.randn(K, D, D, dtype=F64, generator=gen)
        covs = A @ A.transpose(1, 2) + 0.2 * torch.eye(D, dtype=F64)
    elif cov_form == "diagonal":
        covs = 0.2 + torch.rand(K, D, dtype=F64, generator=gen)
    else:
        covs = torch.tensor([0.3, 1.0, 2.5], dtype=F64)
    mixture = GaussianMixture(weights, means, covs)
    expected_covs = {"full": covs, "diagonal": torch.diag_embed(covs),
                     "isotropic": covs[:, None, None] * torch.eye(D, dtype=F64)}[cov_form]
    assert_close(mixture.covariances(), expected_covs, rtol=1e-12, atol=1e-12)

    t = torch.tensor([0.0, 1e-3, 0.1, 0.3, 0.6, 0.9, 1.0], dtype=F64)
    x = _diffused_points(mixture, sde, t, gen)
    assert_close(MixtureScore(sde, mixture).log_prob(x, t), _reference_log_prob(mixture, sde, x, t),
                 rtol=1e-10, atol=1e-10)
    # At t = 0 under VP/sub-VP (α = 1, s = 0) p_t is p_0 itself.
    if not isinstance(sde, VESDE):
        assert_close(mixture.log_prob(x), MixtureScore(sde, mixture).log_prob(x, torch.zeros(len(x), dtype=F64)),
                     rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sde, t", [(VPSDE(), 0.5), (subVPSDE(), 0.5), (VESDE(), 0.5), (VPSDE(), 0.05),
                                    (None, 0.0)],
                         ids=["VPSDE-0.5", "subVPSDE-0.5", "VESDE-0.5", "VPSDE-0.05", "p0"])
def test_density_on_ring_integrates_to_one(sde, t):
    """∫ p_t = 1 on the 2-D ring, by the rectangle rule on [−12, 12]² with h = 0.05.

    The narrowest component has std 0.3 (6 grid steps), where the rectangle rule's error for a
    Gaussian is about exp(−2π² σ²/h²) ≈ 1e-310, and the box edge is more than 9 of the widest
    component's std from every mean; so the 1e-6 asked here (1e-3 would do) is all the library's.
    """
    mixture = ring_mixture()
    h, L = 0.05, 12.0
    axis = torch.arange(-L, L + h / 2, h, dtype=F64)
    grid = torch.cartesian_prod(axis, axis)
    if sde is None:
        logp = mixture.log_prob(grid)
    else:
        logp = MixtureScore(sde, mixture).log_prob(grid, torch.full((len(grid),), t, dtype=F64))
    integral = logp.exp().sum().item() * h**2
    assert integral == pytest.approx(1.0, abs=1e-6)


# ---- sampling ---------------------------------------------------------------------------------

def test_sample_matches_weights_means_and_covariances():
    gen = torch.Generator().manual_seed(3)
    K, D, n = 3, 3, 60000
    weights = torch.tensor([1.0, 2.0, 5.0], dtype=F64)              # normalised by the constructor
    means = torch.tensor([[0.0, 0.0, 0.0], [5.0, -1.0, 2.0], [-3.0, 4.0, 1.0]], dtype=F64)
    A = torch.randn(K, D, D, dtype=F64, generator=gen)
    covs = A @ A.transpose(1, 2) + 0.1 * torch.eye(D, dtype=F64)
    mixture = GaussianMixture(weights, means, covs)

    x, labels = mixture.sample(n, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert x.shape == (n, D) and labels.shape == (n,)
    w = weights / weights.sum()
    freq = torch.bincount(labels, minlength=K).to(F64) / n
    assert (freq - w).abs().le(5 * torch.sqrt(w * (1 - w) / n)).all(), f"frequencies {freq} vs weights {w}"

    for k in range(K):
        xk = x[labels == k]
        nk = len(xk)
        var = covs[k].diagonal()
        assert (xk.mean(0) - means[k]).abs().le(5 * torch.sqrt(var / nk)).all()
        emp_cov = torch.cov(xk.T)
        # Standard error of a sample covariance entry of a Gaussian: √((Σ_ii Σ_jj + Σ_ij²)/n).
        se = torch.sqrt((var[:, None] * var[None, :] + covs[k] ** 2) / nk)
        assert (emp_cov - covs[k]).abs().le(5 * se).all(), f"component {k}: {emp_cov} vs {covs[k]}"

    again, labels_again = mixture.sample(n, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert torch.equal(x, again) and torch.equal(labels, labels_again)
    assert mixture.sample(5, generator=gen)[0].dtype == torch.float32


# ---- event shape ------------------------------------------------------------------------------

def test_event_shape():
    flat = random_mixture(dim=16, n_modes=3, seed=5)
    image = GaussianMixture(flat.weights, flat.means, flat.covariances(), event_shape=(1, 4, 4))
    sde = VPSDE()
    gen = torch.Generator().manual_seed(6)
    x = 2 * torch.randn(5, 1, 4, 4, dtype=F64, generator=gen)
    t = torch.rand(5, dtype=F64, generator=gen)
    score = MixtureScore(sde, image)(x, t)
    assert score.shape == (5, 1, 4, 4)
    assert_close(score.reshape(5, 16), MixtureScore(sde, flat)(x.reshape(5, 16), t), rtol=1e-10, atol=1e-12)
    assert MixtureScore(sde, image).log_prob(x, t).shape == (5,)
    assert image.log_prob(x).shape == (5,)
    assert image.sample(7, generator=gen)[0].shape == (7, 1, 4, 4)


# ---- bad input --------------------------------------------------------------------------------

_NON_PD = [[[1.0, 2.0], [2.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]          # eigenvalues 3 and −1
_SINGULAR = [[[1.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]        # eigenvalue 0


@pytest.mark.parametrize("kwargs", [
    dict(means=[0.0, 1.0]),                                          # means not (K, D)
    dict(means=torch.zeros(2, 2, 1)),
    dict(weights=[1.0, 1.0, 1.0]),                                   # K mismatch
    dict(weights=[1.0, -0.5]),
    dict(weights=[0.0, 0.0]),
    dict(covs=torch.ones(2, 3)),                                     # D mismatch
    dict(covs=torch.ones(3)),                                        # K mismatch
    dict(covs=torch.ones(2, 2, 3)),
    dict(covs=_NON_PD),
    dict(covs=_SINGULAR),
    dict(covs=[1.0, 0.0]),                                           # zero isotropic variance
    dict(covs=[[1.0, -1.0], [1.0, 1.0]]),                            # negative diagonal variance
    dict(event_shape=(3,)),                                          # does not hold D = 2
    # Not numbers at all: NaN is neither a non-negative weight nor a positive variance.
    dict(weights=[math.nan, 1.0]),
    dict(covs=[1.0, math.nan]),
    dict(covs=[[[math.nan, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]),
], ids=["means_1d", "means_3d", "weights_len", "weights_negative", "weights_zero", "covs_D", "covs_K",
        "covs_not_square", "covs_not_pd", "covs_singular", "iso_var_zero", "diag_var_negative", "event_shape",
        "weights_nan", "iso_var_nan", "full_cov_nan"])
def test_bad_input_raises(kwargs):
    args = dict(weights=[1.0, 1.0], means=[[0.0, 0.0], [1.0, 1.0]], covs=[1.0, 1.0])
    GaussianMixture(**args)                                          # the baseline is valid
    with pytest.raises(ValueError):
        GaussianMixture(**{**args, **kwargs})


def test_data_of_the_wrong_dimension_is_refused():
    score = MixtureScore(VPSDE(), ring_mixture())
    with pytest.raises(ValueError, match=r"this mixture is over 2 dimensions .*got data with 3 per sample; "
                                         r"use shape \(B, 2\)"):
        score(torch.zeros(4, 3), torch.full((4,), 0.5))
