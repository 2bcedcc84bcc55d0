"""Score-matching losses (docs/math.md §5): continuous DSM with s² or likelihood weighting, DDPM's ε-loss, NCSN's.

Every loss takes a model exposing ``model(x, t)`` (the score) and, for DDPM, ``model.eps(x, t)``
(``models.ScoreModel``), a batch x0 (B, ...) and a torch.Generator for t and the noise, and returns
a scalar: the per-sample loss reduced over dimensions by ``reduction`` ("mean" or "sum"), then
averaged over the batch.

``rows`` (a slice) makes a loss compute only those rows of the batch, after drawing t and the noise
for all of it: the ranks of a data-parallel job each take their rows of one global batch and together
compute what one process computes on the whole batch (the mean of their losses is its loss, up to the
order of the sums). With ``batch_size`` (the global batch) x0 holds only those rows, as the training
loop's batches do (each rank prepares its own); without it x0 is the whole batch.

``labels`` (B,) int64, the class of each row of x0 (``NULL_LABEL`` −1: a row trained unconditionally, what
label dropout made of it), go to a class-conditional model as ``model(x, t, y=labels)``: the loss is then
the conditional DSM of docs/math.md §5.5. They are taken like x0 (only this rank's rows with
``batch_size``); None (the default) calls the model without labels.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch

from sde_lib import SDE, VESDE, VPSDE, batch_broadcast
from training.config import TrainingError

Tensor = torch.Tensor

__all__ = ["dsm_loss", "ddpm_loss", "ncsn_loss", "LOSSES", "get_loss"]


def _reduce(per_element: Tensor, reduction: str) -> Tensor:
    if reduction not in ("mean", "sum"):
        raise TrainingError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    flat = per_element.flatten(1)
    return (flat.mean(1) if reduction == "mean" else flat.sum(1)).mean()


def _randn_like(x: Tensor, generator: torch.Generator | None, n: int | None = None) -> Tensor:
    """Standard normal noise for ``n`` samples of x's event shape (all of x's rows: None)."""
    shape = x.shape if n is None else (n, *x.shape[1:])
    return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)


def _rows(x0: Tensor, rows: slice, batch_size: int | None) -> Tensor:
    """This rank's rows of the batch: x0[rows] for a whole batch, x0 itself when it holds only them."""
    if batch_size is None:
        return x0[rows]
    start, stop, step = rows.indices(batch_size)
    if step != 1 or stop - start != x0.shape[0]:
        raise TrainingError(f"x0 holds {x0.shape[0]} rows, but rows {rows} of a batch of {batch_size} "
                            f"are {stop - start}.")
    return x0


def _cond(labels: Tensor | None, x0: Tensor, rows: slice, batch_size: int | None) -> dict:
    """The model's conditioning inputs for this rank's rows: ``{"y": labels}``, or none without labels."""
    if labels is None:
        return {}
    if batch_size is None:
        labels = labels[rows]
    if labels.shape != (x0.shape[0],):
        raise TrainingError(f"labels must hold one label per row of x0, shape ({x0.shape[0]},), got "
                            f"{tuple(labels.shape)}.")
    return {"y": labels.to(x0.device)}


def _rand(n: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator, device=like.device, dtype=like.dtype)


def dsm_loss(model: Callable[[Tensor, Tensor], Tensor], sde: SDE, x0: Tensor, generator: torch.Generator | None = None,
             eps: float = 1e-5, weighting: Literal["s2", "likelihood"] = "s2", importance_sampling: bool = False,
             reduction: Literal["mean", "sum"] = "mean", rows: slice = slice(None),
             batch_size: int | None = None, labels: Tensor | None = None) -> Tensor:
    """Continuous denoising score matching, E_t λ(t) E ‖s_θ(α x0 + s z, t) + z/s‖², t ~ U(eps, T).

    ``weighting="s2"``: λ = s², i.e. ‖s s_θ + z‖² (the default). ``weighting="likelihood"``: λ = g²,
    which makes the loss an upper bound on the negative log-likelihood (Song et al. 2021b). With
    ``importance_sampling``, t is drawn with density ∝ g²/s²: since dλ/dt = −½ g²/s² for the half
    log-SNR λ of any linear SDE, that is λ uniform on [λ(T), λ(eps)], and the estimator becomes
    Z/(T − eps) · ‖s s_θ + z‖² with Z = 2(λ(eps) − λ(T)) — same expectation, lower variance.
    """
    n = x0.shape[0] if batch_size is None else batch_size
    u = _rand(n, x0, generator)
    if importance_sampling:
        if weighting != "likelihood":
            raise TrainingError("importance_sampling applies to weighting='likelihood' only.")
        lam_T = sde.half_log_snr(torch.tensor(sde.T, dtype=torch.float64)).item()
        lam_eps = sde.half_log_snr(torch.tensor(eps, dtype=torch.float64)).item()
        t = sde.t_from_half_log_snr(lam_T + u.double() * (lam_eps - lam_T)).to(x0.dtype).clamp(eps, sde.T)
        scale = 2 * (lam_eps - lam_T) / (sde.T - eps)
    else:
        t = eps + u * (sde.T - eps)
        scale = None
    z = _randn_like(x0, generator, n)
    x0, t, z = _rows(x0, rows, batch_size), t[rows], z[rows]
    cond = _cond(labels, x0, rows, batch_size)
    mean, std = sde.marginal_prob(x0, t)
    xt = mean + batch_broadcast(std, x0) * z
    residual = batch_broadcast(std, x0) * model(xt, t, **cond) + z          # s s_θ + z
    per_element = residual.pow(2)
    if weighting == "likelihood":
        weight = scale if importance_sampling else batch_broadcast(sde.diffusion_sq(t).to(x0.dtype) / std**2, x0)
        per_element = per_element * weight
    elif weighting != "s2":
        raise TrainingError(f"weighting must be 's2' or 'likelihood', got {weighting!r}.")
    return _reduce(per_element, reduction)


def _chain_sample(sde: SDE, x0: Tensor, generator: torch.Generator | None, n: int):
    """A chain index i ~ U{0..N−1} for each of n samples, at its noise-matched time t_i = ``sde.chain_times()[i]``,
    and the chain's marginal variance m_i there (the network sees the noise level it will be sampled at)."""
    i = torch.randint(0, sde.N, (n,), generator=generator, device=x0.device)
    table = sde.chain_table(x0)
    return table[3, i], table[2, i]


def ddpm_loss(model, sde: SDE, x0: Tensor, generator: torch.Generator | None = None,
              reduction: Literal["mean", "sum"] = "mean", rows: slice = slice(None), batch_size: int | None = None,
              labels: Tensor | None = None, **_) -> Tensor:
    """DDPM's L_simple, E_{i, ε} ‖ε − ε_θ(√ᾱ_i x0 + √(1 − ᾱ_i) ε, t_i)‖², on VP's chain (t_i = chain_times()[i])."""
    if not isinstance(sde, VPSDE):
        raise TrainingError(f"the DDPM loss needs a VPSDE (DDPM's chain), got {type(sde).__name__}; use loss=dsm.")
    n = x0.shape[0] if batch_size is None else batch_size
    t, m = _chain_sample(sde, x0, generator, n)           # m_i = 1 − ᾱ_i
    noise = _randn_like(x0, generator, n)
    x0, t, m, noise = _rows(x0, rows, batch_size), t[rows], m[rows], noise[rows]
    cond = _cond(labels, x0, rows, batch_size)
    xt = batch_broadcast((1 - m).sqrt(), x0) * x0 + batch_broadcast(m.sqrt(), x0) * noise
    return _reduce((noise - model.eps(xt, t, **cond)).pow(2), reduction)


def ncsn_loss(model, sde: SDE, x0: Tensor, generator: torch.Generator | None = None,
              reduction: Literal["mean", "sum"] = "mean", rows: slice = slice(None), batch_size: int | None = None,
              labels: Tensor | None = None, **_) -> Tensor:
    """NCSN's loss, E_i σ_i² E ‖s_θ(x0 + σ_i z, t_i) + z/σ_i‖², on VE's geometric σ chain (t_i = i/(N−1))."""
    if not isinstance(sde, VESDE):
        raise TrainingError(f"the NCSN loss needs a VESDE (NCSN's σ chain), got {type(sde).__name__}; use loss=dsm.")
    n = x0.shape[0] if batch_size is None else batch_size
    t, m = _chain_sample(sde, x0, generator, n)           # m_i = σ_i²
    z = _randn_like(x0, generator, n)
    x0, t, m, z = _rows(x0, rows, batch_size), t[rows], m[rows], z[rows]
    cond = _cond(labels, x0, rows, batch_size)
    sigma = batch_broadcast(m.sqrt(), x0)
    return _reduce((sigma * model(x0 + sigma * z, t, **cond) + z).pow(2), reduction)


LOSSES = {"dsm": dsm_loss, "ddpm": ddpm_loss, "ncsn": ncsn_loss}


def get_loss(name: str) -> Callable:
    """The loss function registered under ``name`` (dsm, ddpm, ncsn)."""
    if name not in LOSSES:
        raise TrainingError(f"unknown loss {name!r}; available: {', '.join(LOSSES)}.")
    return LOSSES[name]
