"""Evaluation and run outputs, shared by ``training`` and ``tasks_lib``.

Public API::

    evaluation.load_data(options, seed)                 # a data config section -> data_lib.Dataset
    evaluation.LikelihoodConfig                         # how test likelihoods are computed
    evaluation.held_out_likelihood(sde, score_fn, data, config, seed, device)   # NLL, bpd, KL vs exact
    evaluation.data_log_likelihood(...), scored_points(...), exact_nll(...)
    evaluation.sample_quality(samples, data, seed)      # sliced W1, its floor, mode statistics
    evaluation.save_samples(...), save_trajectories(...)
    evaluation.RunOutput(run_dir, logger="csv")         # the one writer of a run's files (LOGGERS: csv, tensorboard)
    evaluation.sample_on_ranks(...), log_likelihood_on_ranks(...)   # split across torchrun's ranks, gathered
    evaluation.load_digits_classifier(), class_accuracy(clf, samples, labels), frechet_distance(clf, x, ref)
"""
from collections.abc import Mapping
from typing import Any

from data_lib import Dataset, load_dataset
from evaluation.classifier import (class_accuracy, frechet_distance, gaussian_frechet_distance,
                                   load_digits_classifier)
from evaluation.likelihood import (EXACT_DIVERGENCE_MAX_DIM, HeldOutLikelihood, LikelihoodConfig, data_log_likelihood,
                                   exact_nll, held_out_likelihood, scored_points)
from evaluation.outputs import LOGGERS, RunDirError, RunOutput, claim_run_dir, release_run_dir
from evaluation.plots import save_samples, save_trajectories
from evaluation.quality import sample_quality, sliced_wasserstein
from evaluation.ranks import log_likelihood_on_ranks, sample_on_ranks

__all__ = ["load_data", "LikelihoodConfig", "HeldOutLikelihood", "held_out_likelihood", "data_log_likelihood",
           "scored_points", "exact_nll", "EXACT_DIVERGENCE_MAX_DIM", "sample_quality", "sliced_wasserstein",
           "save_samples", "save_trajectories", "RunOutput", "LOGGERS", "RunDirError", "claim_run_dir",
           "release_run_dir", "sample_on_ranks", "log_likelihood_on_ranks",
           "load_digits_classifier", "class_accuracy", "frechet_distance", "gaussian_frechet_distance"]


def load_data(options: Mapping[str, Any], seed: int) -> Dataset:
    """The dataset a ``data`` config section names (``{"name": ..., "n_train": ..., <options>}``), with the run's seed."""
    from omegaconf import OmegaConf

    options = OmegaConf.to_container(options, resolve=True) if OmegaConf.is_config(options) else dict(options)
    return load_dataset(options.pop("name"), seed=seed, **options)
