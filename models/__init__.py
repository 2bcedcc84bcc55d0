"""Score models behind one convention, ``score_fn(x, t)``; the exact Gaussian-mixture score."""
from models.checkpoint import CheckpointError, LoadedModel, load_checkpoint
from models.mixture import GaussianMixture, MixtureScore, random_mixture, ring_mixture
from models.networks import (GaussianFourierEmbedding, MLPScoreNet, ScoreModel, SinusoidalEmbedding, UNet,
                             build_network)

__all__ = ["load_checkpoint", "LoadedModel", "CheckpointError", "GaussianMixture", "MixtureScore", "ring_mixture", "random_mixture",
           "GaussianFourierEmbedding", "SinusoidalEmbedding", "MLPScoreNet", "UNet", "ScoreModel",
           "build_network"]
