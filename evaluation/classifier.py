"""Sample quality through a classifier: class accuracy of conditional samples, and the Fréchet distance in the
classifier's feature space (docs/guidance.md).

The shipped digits classifier (``load_digits_classifier``; ``scripts/train_digits_classifier.py`` makes it) is
a small convolutional net trained on clean digits (t = 0). Its features are its penultimate activations,
(B, 32). Every function takes images in the data's range, (0, 1) for ``data=digits`` by default; samples of
a model trained with another ``data.data_range`` are mapped onto the classifier's range with ``data_range=``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from models import ModelError, NoiseClassifier, load_classifier

Tensor = torch.Tensor

__all__ = ["DIGITS_CLASSIFIER", "load_digits_classifier", "class_accuracy", "classifier_features",
           "frechet_distance", "gaussian_frechet_distance"]

#: The shipped digits classifier.
DIGITS_CLASSIFIER = Path(__file__).resolve().parents[1] / "models" / "pretrained" / "digits_classifier.pt"


def load_digits_classifier(device: str | torch.device = "cpu") -> NoiseClassifier:
    """The shipped classifier of 8×8 digits (images (B, 1, 8, 8) in (0, 1)), in eval mode.

    ``info["test_accuracy"]`` is its accuracy on the 359 held-out images of ``data=digits`` (seed 0).
    """
    return load_classifier(DIGITS_CLASSIFIER, device)


def _to_classifier_range(clf: NoiseClassifier, x: Tensor, data_range: tuple[float, float] | None) -> Tensor:
    """x mapped from ``data_range`` onto the range the classifier was trained in (None: already in it)."""
    trained = clf.info.get("data_range")
    if data_range is None or trained is None or tuple(data_range) == tuple(trained):
        return x
    (lo, hi), (a, b) = data_range, trained
    if not hi > lo:
        raise ModelError(f"data_range must be (low, high) with low < high, got {data_range!r}.")
    return a + (x - lo) * ((b - a) / (hi - lo))


@torch.no_grad()
def _apply(fn, x: Tensor, batch_size: int) -> Tensor:
    """``fn(x_batch, t = 0)`` over x in batches, concatenated."""
    return torch.cat([fn(x[i:i + batch_size], torch.zeros(len(x[i:i + batch_size]), dtype=x.dtype, device=x.device))
                      for i in range(0, len(x), batch_size)])


def _on_device(clf: NoiseClassifier, x: Tensor) -> Tensor:
    param = next(clf.parameters())
    return torch.as_tensor(x).to(device=param.device, dtype=param.dtype)


def class_accuracy(clf: NoiseClassifier, samples: Tensor, labels: Tensor,
                   data_range: tuple[float, float] | None = None, batch_size: int = 1024) -> float:
    """The share of ``samples`` (B, ...) that ``clf`` (at t = 0) assigns to their ``labels`` (B,): for samples drawn
    conditionally on those labels, how often the class came out right."""
    x = _to_classifier_range(clf, _on_device(clf, samples), data_range)
    labels = torch.as_tensor(labels).to(x.device)
    if labels.shape != (len(x),):
        raise ModelError(f"labels must have shape ({len(x)},), one per sample, got {tuple(labels.shape)}.")
    predicted = _apply(clf, x, batch_size).argmax(1)
    return (predicted == labels).double().mean().item()


def classifier_features(clf: NoiseClassifier, samples: Tensor, data_range: tuple[float, float] | None = None,
                        batch_size: int = 1024) -> Tensor:
    """The classifier's penultimate activations at t = 0, (B, F), in float64."""
    x = _to_classifier_range(clf, _on_device(clf, samples), data_range)
    return _apply(clf.features, x, batch_size).double()


def _sqrt_psd(a: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigh; negative rounding clipped)."""
    w, v = torch.linalg.eigh(0.5 * (a + a.T))
    return (v * w.clamp_min(0).sqrt()) @ v.T


def gaussian_frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """The Fréchet (2-Wasserstein²) distance between N(μ₁, Σ₁) and N(μ₂, Σ₂), in float64:

    ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}.

    Both square roots are of symmetric PSD matrices (eigh), so the result is real, and ≥ 0 up to rounding.
    """
    mu1, mu2, cov1, cov2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, mu2, cov1, cov2))
    root1 = _sqrt_psd(cov1)
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross).item()


def _moments(features: Tensor) -> tuple[Tensor, Tensor]:
    if len(features) < 2:
        raise ModelError(f"a Fréchet distance needs at least 2 samples per set to fit a covariance, "
                         f"got {len(features)}.")
    return features.mean(0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


def frechet_distance(clf: NoiseClassifier, samples: Tensor, reference: Tensor,
                     data_range: tuple[float, float] | None = None, batch_size: int = 1024) -> float:
    """The Fréchet distance between Gaussians fitted (mean, unbiased covariance) to the classifier's features of
    ``samples`` and of ``reference`` (FID's recipe, with this classifier in place of Inception).

    Like FID it is biased upwards for finite sets (two sets of N draws of one distribution give about
    tr-terms of order F/N, not 0): compare sets of equal sizes.
    """
    mu1, cov1 = _moments(classifier_features(clf, samples, data_range, batch_size))
    mu2, cov2 = _moments(classifier_features(clf, reference, data_range, batch_size))
    return gaussian_frechet_distance(mu1, cov1, mu2, cov2)
