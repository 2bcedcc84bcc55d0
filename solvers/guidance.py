"""Conditioning and guidance in one wrapper around ``score_fn(x, t, **cond)`` (docs/guidance.md).

Every sampler sees a plain score function; :class:`GuidedScore` is that function for a guided solve:

    s_guided(x, t) = s(x, t) + w (s(x, t, y) − s(x, t)) + γ ∇ₓ log p(y | x, t)

with w the classifier-free guidance scale (Ho & Salimans 2022), γ the classifier scale
(Dhariwal & Nichol 2021; Song et al. 2021 §5) and p(y | x, t) = softmax(clf(x, t))_y. w = 1 is the
conditional model, w = 0 the unconditional one; w defaults to 1 without a classifier and to 0 with one,
so that ``classifier=`` alone guides an unconditional model. Both branches of classifier-free guidance
run in one forward of the doubled batch (x and x again, labels y and ``NULL_LABEL``) when the model
declares ``conditional``; any other function is called twice, with y and with ``y=None``.

Guidance on x̂₀, ε̂ or EDM's F is the same as guidance on the score: each is affine in the score with
coefficients that depend on (x, t) alone, identical for both branches, so the exponential integrators
(which fit polynomials to x̂₀ or F) take the guided x̂₀ exactly. Dynamic thresholding (Saharia et al.
2022) acts on that x̂₀: per sample, c = max(quantile_p |x̂₀|, 1), x̂₀ ← clip(x̂₀, −c, c)/c, for data in
[−1, 1] (images).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch

from sde_lib import SDE, batch_broadcast
from solvers.base import SolverError

Tensor = torch.Tensor

__all__ = ["GuidedScore", "GuidanceWarning", "check_labels", "NULL_LABEL"]

#: A row's label for the unconditional branch (the same constant as ``models.NULL_LABEL``).
NULL_LABEL = -1


class GuidanceWarning(UserWarning):
    """Guidance will run but may be poor (e.g. the model never learnt its unconditional branch)."""


def check_labels(y: Any, batch: int, num_classes: int | None, device=None) -> Tensor:
    """``y`` as an int64 tensor (B,) on ``device``, checked: an int (every row) or B labels in [−1, K).

    −1 (``NULL_LABEL``) marks a row that takes the unconditional branch. One host sync (the range
    check), once per solve, before any model call.
    """
    if isinstance(y, bool) or not (isinstance(y, int) or torch.is_tensor(y)):
        raise SolverError(f"cond['y'] must be an int or an integer tensor of shape ({batch},), "
                          f"got {type(y).__name__}.")
    if isinstance(y, int):
        y = torch.full((batch,), y, dtype=torch.int64, device=device)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise SolverError(f"cond['y'] must hold integer class labels, got dtype {y.dtype}.")
    if y.dim() == 0:
        y = y.expand(batch)
    if tuple(y.shape) != (batch,):
        raise SolverError(f"cond['y'] must have shape ({batch},), one label per sample, got {tuple(y.shape)}.")
    y = y.to(device=device, dtype=torch.int64)
    if len(y):
        lo, hi = int(y.min()), int(y.max())
        top = f"{num_classes - 1}" if num_classes else "K−1"
        if lo < NULL_LABEL or (num_classes and hi >= num_classes):
            raise SolverError(f"cond['y'] holds labels in [{lo}, {hi}], outside 0..{top} "
                              f"(−1 = unconditional row); use a label the model was trained on.")
    return y


def _scale(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SolverError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


class GuidedScore:
    """The guided score of ``score_fn`` as a plain ``(x, t) -> score`` (the formula of the module docstring).

    Args:
        score_fn: ``score_fn(x, t, **cond)``; called with ``y`` (conditional branch) and without it.
        sde: the forward SDE (α(t), s(t) for dynamic thresholding).
        cond: conditioning inputs; ``cond["y"]`` the labels (an int, or (B,) with −1 for unconditional rows).
        batch: B, the number of samples.
        guidance_scale: w; None: 1 without a classifier, 0 with one.
        classifier: ``clf(x, t) -> logits (B, K)``, differentiable in x; None: none.
        classifier_scale: γ.
        dynamic_threshold: the quantile p ∈ (0, 1) of |x̂₀| for dynamic thresholding; None: off.
    """

    def __init__(self, score_fn: Callable, sde: SDE, cond: dict[str, Any], batch: int,
                 guidance_scale: float | None = None, classifier: Callable | None = None,
                 classifier_scale: float | None = None, dynamic_threshold: float | None = None):
        cond = dict(cond)
        y = cond.pop("y", None)
        if classifier is not None and not callable(classifier):
            raise SolverError(f"classifier must be callable as classifier(x, t) -> logits (B, K), "
                              f"got {type(classifier).__name__}.")
        if y is None and (guidance_scale is not None or classifier is not None):
            raise SolverError("guidance needs labels: pass cond={'y': labels} (an int or one label per sample).")
        if classifier_scale is not None and classifier is None:
            raise SolverError("classifier_scale needs a classifier: pass classifier=clf (clf(x, t) -> logits).")
        declared = getattr(score_fn, "conditional", None)
        if y is not None and declared is False and classifier is None:
            raise SolverError("this model is unconditional and takes no labels; drop cond['y'] (or guidance_scale), "
                              "or guide it with a classifier (classifier=clf).")
        if y is not None and declared is False and guidance_scale not in (None, 0):
            raise SolverError("guidance_scale needs a class-conditional model (this one is unconditional); "
                              "use classifier guidance (classifier=, classifier_scale=) instead.")
        num_classes = getattr(score_fn, "num_classes", None) or getattr(classifier, "num_classes", None)
        self.y = None if y is None else check_labels(y, batch, num_classes)
        self.w = (0.0 if classifier is not None else 1.0) if guidance_scale is None else _scale("guidance_scale",
                                                                                               guidance_scale)
        self.gamma = 1.0 if classifier_scale is None else _scale("classifier_scale", classifier_scale)
        if dynamic_threshold is not None and not (isinstance(dynamic_threshold, (int, float))
                                                  and not isinstance(dynamic_threshold, bool)
                                                  and 0 < dynamic_threshold < 1):
            raise SolverError(f"dynamic_threshold must be a quantile in (0, 1), e.g. 0.995, or None; "
                              f"got {dynamic_threshold!r}.")
        self.score_fn, self.sde, self.cond = score_fn, sde, cond
        self.classifier, self.threshold = classifier, dynamic_threshold
        self.batched = bool(declared)
        self.sigma_data = getattr(score_fn, "sigma_data", None)
        self.predicts_noise = getattr(score_fn, "predicts_noise", False)
        if self.w not in (0.0, 1.0) and getattr(score_fn, "label_dropout", None) == 0:
            warnings.warn(f"guidance_scale={self.w:g} on a model trained without label dropout: its unconditional "
                          "branch s(x, t) was never trained, so the guided score may be poor; train with "
                          "task.label_dropout > 0 (e.g. 0.1) for classifier-free guidance.", GuidanceWarning,
                          stacklevel=3)

    def _labels(self, x: Tensor) -> Tensor:
        """The labels on x's device (moved once, not at every evaluation)."""
        if self.y.device != x.device:
            self.y = self.y.to(x.device)
        return self.y

    def _model(self, x: Tensor, t: Tensor) -> Tensor:
        """s(x, t) + w (s(x, t, y) − s(x, t)): one call for w ∈ {0, 1}, else both branches."""
        if self.y is None or self.w == 0:
            return self.score_fn(x, t, **self.cond)
        y = self._labels(x)
        if self.w == 1:
            return self.score_fn(x, t, y=y, **self.cond)
        if self.batched:
            both = self.score_fn(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, NULL_LABEL)]),
                                 **self.cond)
            conditional, unconditional = both.chunk(2)
        else:
            conditional, unconditional = self.score_fn(x, t, y=y, **self.cond), self.score_fn(x, t, **self.cond)
        return unconditional + self.w * (conditional - unconditional)

    def _classifier_grad(self, x: Tensor, t: Tensor) -> Tensor:
        """∇ₓ log p(y | x, t) from the classifier's logits; 0 on rows with the null label."""
        y = self._labels(x)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = self.classifier(xg, t)
            if not torch.is_tensor(logits) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                got = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
                raise SolverError(f"classifier returned {got}; it must return logits of shape ({x.shape[0]}, K).")
            chosen = torch.log_softmax(logits.to(x.dtype), dim=1).gather(1, y.clamp_min(0)[:, None])[:, 0]
            grad, = torch.autograd.grad((chosen * (y >= 0)).sum(), xg)
        return grad

    def _thresholded(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """The score whose x̂₀ = (x + s² score)/α is dynamically thresholded at quantile p."""
        alpha = batch_broadcast(self.sde.log_mean_coeff(t).exp().to(x.dtype), x)
        var = batch_broadcast(self.sde.marginal_var(t).to(x.dtype), x)
        x0 = (x + var * score) / alpha
        c = torch.quantile(x0.flatten(1).abs(), self.threshold, dim=1).clamp_min(1.0)
        c = batch_broadcast(c, x)
        x0 = torch.maximum(torch.minimum(x0, c), -c) / c
        return (alpha * x0 - x) / var

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        score = self._model(x, t)
        if self.classifier is not None and self.gamma != 0:
            score = score + self.gamma * self._classifier_grad(x, t)
        if self.threshold is not None:
            score = self._thresholded(x, t, score)
        return score
