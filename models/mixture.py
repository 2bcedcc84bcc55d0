"""Exact Gaussian-mixture scores under any linear SDE (docs/math.md §8).

If p_0 = Σ_k w_k N(μ_k, Σ_k), then p_t = Σ_k w_k N(α μ_k, α² Σ_k + s² I). With
Σ_k = U_k diag(λ_k) U_kᵀ, every component's covariance at time t is U_k diag(α² λ_k + s²) U_kᵀ,
so the score and log-density at any t cost one rotation per component.
"""
from __future__ import annotations

import math

import torch

from models.errors import ModelError
from models.networks import given_cond
from sde_lib import SDE

Tensor = torch.Tensor

__all__ = ["GaussianMixture", "MixtureScore", "ring_mixture", "random_mixture"]


class GaussianMixture:
    """A Gaussian mixture Σ_k w_k N(μ_k, Σ_k) on data of shape ``event_shape`` (flattened to D).

    Args:
        weights: (K,) non-negative, normalised here.
        means: (K, D).
        covs: (K, D, D) symmetric positive definite, or (K, D) diagonal variances, or (K,)
            isotropic variances.
        event_shape: shape of one sample, default (D,).
    """

    def __init__(self, weights, means, covs, event_shape: tuple[int, ...] | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2:
            raise ModelError(f"means must have shape (K, D), got {tuple(means.shape)}.")
        K, D = means.shape
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or not (torch.isfinite(weights).all() and (weights >= 0).all()
                                         and weights.sum() > 0):
            raise ModelError(f"weights must be {K} non-negative numbers with a positive sum.")
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.shape == (K,):
            covs = covs[:, None].expand(K, D)
        if covs.shape == (K, D):
            eigvals, eigvecs = covs.clone(), torch.eye(D, dtype=torch.float64).expand(K, D, D).clone()
        elif covs.shape == (K, D, D):
            eigvals, eigvecs = torch.linalg.eigh(0.5 * (covs + covs.transpose(1, 2)))
        else:
            raise ModelError(f"covs must have shape (K,), (K, D) or (K, D, D) with K={K}, D={D}; "
                             f"got {tuple(covs.shape)}.")
        if covs.dim() == 3 and not torch.allclose(covs, covs.transpose(1, 2), rtol=1e-10, atol=1e-12):
            raise ModelError("every mixture covariance must be symmetric.")
        if not (torch.isfinite(means).all() and torch.isfinite(covs).all()):
            raise ModelError("mixture means and covariances must be finite.")
        if not (eigvals > 0).all():
            raise ModelError("every mixture covariance must be positive definite.")
        self.weights = weights / weights.sum()
        self.means = means
        self.eigvals = eigvals
        self.eigvecs = eigvecs
        self.event_shape = tuple(event_shape) if event_shape is not None else (D,)
        if math.prod(self.event_shape) != D:
            raise ModelError(f"event_shape {self.event_shape} does not hold D={D} values.")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def covariances(self) -> Tensor:
        """The component covariances Σ_k, shape (K, D, D)."""
        return self.eigvecs @ torch.diag_embed(self.eigvals) @ self.eigvecs.transpose(1, 2)

    @property
    def std(self) -> float:
        """The per-dimension standard deviation of the mixture, √(tr Cov(x)/D) (EDM's σ_data)."""
        mean = self.weights @ self.means
        second = self.weights @ (self.means.pow(2).sum(1) + self.eigvals.sum(1))     # E‖x‖² per component
        return math.sqrt(float((second - mean.pow(2).sum()) / self.dim))

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32,
               device=None) -> tuple[Tensor, Tensor]:
        """Draw n samples; returns (x of shape (n, *event_shape), component labels (n,))."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.means[k] + torch.einsum("nij,nj->ni", self.eigvecs[k], self.eigvals[k].sqrt() * z)
        return x.reshape(n, *self.event_shape).to(dtype=dtype, device=device), k.to(device)

    def mode_report(self, x: Tensor) -> tuple[float, float]:
        """Sample quality against the known modes: each sample is assigned to its nearest mean.

        Returns (the largest |frequency − weight| over modes, the samples' RMS distance to their
        mode divided by that of exact draws under the same rule). A perfect sampler gives (≈0, ≈1).
        """
        freq, spread = _nearest_mode_stats(self.means, x)
        exact, _ = self.sample(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        return (freq - self.weights).abs().max().item(), (spread / _nearest_mode_stats(self.means, exact)[1]).item()

    def log_prob(self, x: Tensor) -> Tensor:
        """log p_0(x) per sample (nats)."""
        flat = x.flatten(1)
        return self._components(flat, torch.ones(len(flat), dtype=x.dtype, device=x.device),
                                torch.zeros(len(flat), dtype=x.dtype, device=x.device))[0]

    def entropy_mc(self, n: int = 200_000, seed: int = 0) -> float:
        """Monte-Carlo estimate of the differential entropy −E log p_0 (nats)."""
        g = torch.Generator().manual_seed(seed)
        x, _ = self.sample(n, generator=g, dtype=torch.float64)
        return -self.log_prob(x).mean().item()

    def _components(self, flat: Tensor, alpha: Tensor, var: Tensor):
        """log p_t and score for flat x (B, D), given α (B,) and s² (B,) at each sample's t."""
        if flat.shape[1] != self.dim:
            raise ModelError(f"this mixture is over {self.dim} dimensions (samples of shape {self.event_shape}), "
                             f"got data with {flat.shape[1]} per sample; use shape (B, {', '.join(map(str, self.event_shape))}).")
        dtype, device = flat.dtype, flat.device
        U = self.eigvecs.to(dtype=dtype, device=device)                     # (K, D, D)
        lam = self.eigvals.to(dtype=dtype, device=device)                   # (K, D)
        mu = self.means.to(dtype=dtype, device=device)                      # (K, D)
        logw = self.weights.to(dtype=dtype, device=device).log()            # (K,)
        cov_eig = alpha[:, None, None] ** 2 * lam + var[:, None, None]      # (B, K, D)
        r = flat[:, None, :] - alpha[:, None, None] * mu                    # (B, K, D)
        y = torch.einsum("kdj,bkd->bkj", U, r)                              # Uᵀ r
        log_n = -0.5 * ((y**2 / cov_eig).sum(-1) + cov_eig.log().sum(-1)
                        + self.dim * math.log(2 * math.pi))                 # (B, K)
        joint = logw + log_n
        logp = torch.logsumexp(joint, dim=1)
        resp = torch.softmax(joint, dim=1)                                  # (B, K)
        comp_score = -torch.einsum("kdj,bkj->bkd", U, y / cov_eig)          # (B, K, D)
        score = (resp[..., None] * comp_score).sum(1)
        return logp, score


def _nearest_mode_stats(means: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest-mean frequencies (K,) and the RMS distance of the samples to their nearest mean."""
    flat = x.detach().double().cpu().flatten(1)
    k = torch.cdist(flat, means).argmin(1)
    freq = torch.bincount(k, minlength=len(means)).double() / len(flat)
    return freq, (flat - means[k]).pow(2).sum(1).mean().sqrt()


class MixtureScore(torch.nn.Module):
    """The exact score ∇ₓ log p_t of a Gaussian mixture diffused by ``sde``: a ready ``score_fn``.

    ``score_fn(x, t, **cond)`` takes x of shape (B, *event_shape) and t of shape (B,) and returns the
    score in the shape of x. ``log_prob(x, t)`` is the exact log p_t(x) per sample (nats).
    Computations run in the dtype of x; use float64 for reference solutions.
    """

    def __init__(self, sde: SDE, mixture: GaussianMixture):
        super().__init__()
        self.sde = sde
        self.mixture = mixture
        self.sigma_data = mixture.std    # the data scale, as a trained ScoreModel carries it

    def _coeffs(self, x: Tensor, t: Tensor):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return self.sde.log_mean_coeff(t).exp(), self.sde.marginal_var(t)

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        given_cond(cond, self)
        alpha, var = self._coeffs(x, t)
        return self.mixture._components(x.flatten(1), alpha, var)[1].reshape(x.shape)

    score_fn = forward

    def log_prob(self, x: Tensor, t: Tensor) -> Tensor:
        alpha, var = self._coeffs(x, t)
        return self.mixture._components(x.flatten(1), alpha, var)[0]


def ring_mixture(n_modes: int = 8, radius: float = 4.0, std: float = 0.3) -> GaussianMixture:
    """The 2-D ring of ``n_modes`` equal-weight isotropic Gaussians (default: 8, radius 4, σ = 0.3)."""
    angles = torch.arange(n_modes, dtype=torch.float64) * (2 * math.pi / n_modes)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(torch.ones(n_modes), means, torch.full((n_modes,), std**2))


def random_mixture(dim: int = 16, n_modes: int = 5, seed: int = 0, spread: float = 3.0,
                   std_range: tuple[float, float] = (0.3, 1.0)) -> GaussianMixture:
    """A fixed random mixture in ``dim`` dimensions with full, anisotropic covariances.

    Means are spread·N(0, I); each covariance is a random rotation of variances whose standard
    deviations are uniform in ``std_range``; weights are uniform in [1, 2], normalised.
    """
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(n_modes, dim, generator=g, dtype=torch.float64)
    lo, hi = std_range
    stds = lo + (hi - lo) * torch.rand(n_modes, dim, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(n_modes, dim, dim, generator=g, dtype=torch.float64))
    covs = q @ torch.diag_embed(stds**2) @ q.transpose(1, 2)
    weights = 1 + torch.rand(n_modes, generator=g, dtype=torch.float64)
    return GaussianMixture(weights, means, covs)
