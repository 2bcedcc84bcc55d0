"""Score models behind one convention, ``score_fn(x, t, **cond)``; the exact Gaussian-mixture score."""
from models.checkpoint import CheckpointError, LoadedModel, build_from_spec, load_checkpoint, model_spec
from models.classifier import NoiseClassifier, build_classifier, load_classifier, save_classifier
from models.errors import ModelError
from models.mixture import GaussianMixture, MixtureScore, random_mixture, ring_mixture
from models.networks import (NULL_LABEL, GaussianFourierEmbedding, MLPScoreNet, ScoreModel, SinusoidalEmbedding, UNet,
                             build_network, build_score_model)

__all__ = ["load_checkpoint", "LoadedModel", "CheckpointError", "ModelError", "model_spec", "build_from_spec",
           "GaussianMixture", "MixtureScore", "ring_mixture", "random_mixture", "GaussianFourierEmbedding",
           "SinusoidalEmbedding", "MLPScoreNet", "UNet", "ScoreModel", "build_network", "build_score_model", "NULL_LABEL",
           "NoiseClassifier", "build_classifier", "save_classifier", "load_classifier"]
