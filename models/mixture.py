"""Exact Gaussian-mixture scores under any linear SDE (docs/math.md §8).

If p_0 = Σ_k w_k N(μ_k, Σ_k), then p_t = Σ_k w_k N(α μ_k, α² Σ_k + s² I). With
Σ_k = U_k diag(λ_k) U_kᵀ, every component's covariance at time t is U_k diag(α² λ_k + s²) U_kᵀ,
so the score and log-density at any t cost one rotation per component.
"""
from __future__ import annotations

import math

import torch

from models.errors import ModelError
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
        return self._log_prob_and_score(flat, torch.ones(len(flat), dtype=x.dtype, device=x.device),
                                        torch.zeros(len(flat), dtype=x.dtype, device=x.device))[0]

    def entropy_mc(self, n: int = 200_000, seed: int = 0) -> float:
        """Monte-Carlo estimate of the differential entropy −E log p_0 (nats)."""
        g = torch.Generator().manual_seed(seed)
        x, _ = self.sample(n, generator=g, dtype=torch.float64)
        return -self.log_prob(x).mean().item()

    def condition(self, mask, values) -> "GaussianMixture":
        """The exact conditional p_0(x_B | x_A = values) of the unknown coordinates B given the known ones A.

        Args:
            mask: 0/1 over one sample (shape ``event_shape`` or (D,)), 1 where the coordinate is known.
            values: the known entries: either the |A| of them in flattened order, or a whole sample of
                shape ``event_shape`` / (D,) whose entries where mask = 0 are ignored.

        Returns:
            A GaussianMixture over the |B| unknown coordinates (flattened order), event shape (|B|,):
            weights w_k' ∝ w_k N(values; μ_k,A, Σ_k,AA) and components
            N(μ_k,B + Σ_k,BA Σ_k,AA⁻¹ (values − μ_k,A), Σ_k,BB − Σ_k,BA Σ_k,AA⁻¹ Σ_k,AB) (docs/inpainting.md §1).
        """
        D = self.dim
        mask = torch.as_tensor(mask).detach().cpu()
        if mask.numel() != D:
            raise ModelError(f"mask must have one entry per coordinate ({D}, shape {self.event_shape}), "
                             f"got shape {tuple(mask.shape)}.")
        mask = mask.reshape(D).to(torch.float64)
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ModelError("mask must hold only 0 (unknown) and 1 (known).")
        known = mask.bool()
        n_known = int(known.sum())
        if n_known == D:
            raise ModelError("mask marks every coordinate known: there is nothing left to condition on them.")
        values = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1)
        if values.numel() == D and n_known != D:
            values = values[known]
        if values.numel() != n_known or not bool(torch.isfinite(values).all()):
            raise ModelError(f"values must be the {n_known} known entries (or a whole sample of {D}), all finite; "
                             f"got {values.numel()} values.")
        cov = self.covariances()
        mu_a, mu_b = self.means[:, known], self.means[:, ~known]
        if n_known == 0:
            return GaussianMixture(self.weights, mu_b, cov, event_shape=(D,))
        cov_aa = cov[:, known][:, :, known]
        cov_ba = cov[:, ~known][:, :, known]
        cov_bb = cov[:, ~known][:, :, ~known]
        chol = torch.linalg.cholesky(cov_aa)                                          # (K, a, a)
        r = (values - mu_a).unsqueeze(-1)                                             # (K, a, 1)
        white = torch.linalg.solve_triangular(chol, r, upper=False)                   # L⁻¹ r
        log_lik = (-0.5 * white.squeeze(-1).pow(2).sum(-1) - chol.diagonal(dim1=1, dim2=2).log().sum(-1)
                   - 0.5 * n_known * math.log(2 * math.pi))
        log_w = self.weights.log() + log_lik
        weights = torch.softmax(log_w, dim=0)
        gain = torch.cholesky_solve(cov_ba.transpose(1, 2), chol).transpose(1, 2)     # Σ_BA Σ_AA⁻¹, (K, b, a)
        means = mu_b + (gain @ r).squeeze(-1)
        covs = cov_bb - gain @ cov_ba.transpose(1, 2)
        return GaussianMixture(weights, means, 0.5 * (covs + covs.transpose(1, 2)))

    def _components(self, flat: Tensor, alpha: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """Per component, for flat x (B, D) given α (B,) and s² (B,) at each sample's t:
        log w_k + log N(x; α μ_k, α² Σ_k + s² I) (B, K) and the component's score (B, K, D)."""
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
        comp_score = -torch.einsum("kdj,bkj->bkd", U, y / cov_eig)          # (B, K, D)
        return logw + log_n, comp_score

    def _log_prob_and_score(self, flat: Tensor, alpha: Tensor, var: Tensor,
                            label: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """log p_t(x) and its score (B,), (B, D); rows with label k ≥ 0 those of p_t(x | k) = N(x; α μ_k, α² Σ_k + s² I)."""
        joint, comp_score = self._components(flat, alpha, var)
        logp = torch.logsumexp(joint, dim=1)
        score = (torch.softmax(joint, dim=1)[..., None] * comp_score).sum(1)
        if label is not None:
            k = label.clamp_min(0)
            given = (label >= 0)
            log_n = joint.gather(1, k[:, None])[:, 0] - self.weights.to(joint).log()[k]
            logp = torch.where(given, log_n, logp)
            score = torch.where(given[:, None], comp_score[torch.arange(len(k), device=k.device), k], score)
        return logp, score


def _nearest_mode_stats(means: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest-mean frequencies (K,) and the RMS distance of the samples to their nearest mean."""
    flat = x.detach().double().cpu().flatten(1)
    k = torch.cdist(flat, means).argmin(1)
    freq = torch.bincount(k, minlength=len(means)).double() / len(flat)
    return freq, (flat - means[k]).pow(2).sum(1).mean().sqrt()


class MixtureScore(torch.nn.Module):
    """The exact score ∇ₓ log p_t of a Gaussian mixture diffused by ``sde``: a ready ``score_fn``.

    ``score_fn(x, t, y=None)`` takes x of shape (B, *event_shape) and t of shape (B,) and returns the
    score in the shape of x. It is also the exact class-conditional model with class = component
    (docs/guidance.md): with labels y (B,), a row with y_b = k ≥ 0 gets ∇ₓ log p_t(x | k), the score of
    the one Gaussian N(α μ_k, α² Σ_k + s² I), and a row with y_b = −1 (``NULL_LABEL``) the mixture's.
    :meth:`classifier` is the exact noise-conditional classifier log p_t(k | x) (logits, shape (B, K)).
    ``log_prob(x, t, y=None)`` is the exact log p_t(x) (or log p_t(x | y)) per sample (nats).
    Computations run in the dtype of x; use float64 for reference solutions.
    """

    #: labels select a component (class-conditional mode)
    conditional = True

    def __init__(self, sde: SDE, mixture: GaussianMixture):
        super().__init__()
        self.sde = sde
        self.mixture = mixture
        self.sigma_data = mixture.std    # the data scale, as a trained ScoreModel carries it
        self.num_classes = len(mixture.weights)
        self.label_dropout = None        # not trained: both branches are exact

    def _coeffs(self, x: Tensor, t: Tensor):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return self.sde.log_mean_coeff(t).exp(), self.sde.marginal_var(t)

    def _label(self, x: Tensor, y, cond: dict) -> Tensor | None:
        if cond:
            raise ModelError(f"a MixtureScore takes only the class label y, got {', '.join(cond)}.")
        if y is None:
            return None
        y = torch.as_tensor(y, device=x.device)
        if y.dim() == 0:
            y = y.expand(x.shape[0])
        if y.shape != (x.shape[0],) or y.is_floating_point():
            raise ModelError(f"y must be integer labels of shape ({x.shape[0]},), got {tuple(y.shape)} {y.dtype}.")
        return y.long()

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, **cond) -> Tensor:
        alpha, var = self._coeffs(x, t)
        label = self._label(x, y, cond)
        return self.mixture._log_prob_and_score(x.flatten(1), alpha, var, label)[1].reshape(x.shape)

    score_fn = forward

    def log_prob(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """log p_t(x) per sample (nats); rows with a label k ≥ 0: log p_t(x | k)."""
        alpha, var = self._coeffs(x, t)
        return self.mixture._log_prob_and_score(x.flatten(1), alpha, var, self._label(x, y, {}))[0]

    def classifier(self, x: Tensor, t: Tensor) -> Tensor:
        """The exact classifier of the diffused data: log p_t(k | x) for each component k, shape (B, K).

        As logits, softmax gives the responsibilities; ∇ₓ of entry y is ∇ₓ log p_t(x | y) − ∇ₓ log p_t(x),
        so classifier guidance with it at scale 1 is the exact conditional score."""
        alpha, var = self._coeffs(x, t)
        joint, _ = self.mixture._components(x.flatten(1), alpha, var)
        return torch.log_softmax(joint, dim=1)


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
