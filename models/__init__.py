"""Score models behind one convention, ``score_fn(x, t)``; the exact Gaussian-mixture score."""
from models.mixture import GaussianMixture, MixtureScore, random_mixture, ring_mixture

__all__ = ["GaussianMixture", "MixtureScore", "ring_mixture", "random_mixture"]
