"""Training score models: losses (docs/math.md §5) and the loop with EMA and exact-resume checkpoints.

Public API::

    training.train(config: TrainConfig, model: ScoreModel, data: Dataset, out_dir, likelihood=None, seed=0,
                   device="cpu")                # from Python, no config system needed
    training.TrainConfig, training.TrainingError, training.LOSSES, training.get_loss
"""
from training.config import TrainConfig, TrainingError
from training.losses import LOSSES, ddpm_loss, dsm_loss, get_loss, ncsn_loss
from training.loop import check_batch_split, check_train_config, resume, train

__all__ = ["train", "resume", "check_train_config", "check_batch_split", "TrainConfig", "TrainingError", "dsm_loss", "ddpm_loss", "ncsn_loss", "LOSSES",
           "get_loss"]
