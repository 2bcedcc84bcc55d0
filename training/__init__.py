"""Training score models: losses (MATH.md §5) and the loop with EMA and exact-resume checkpoints."""
from training.config import TrainConfig
from training.losses import LOSSES, ddpm_loss, dsm_loss, get_loss, ncsn_loss
from training.loop import TrainingError, train

__all__ = ["train", "TrainConfig", "TrainingError", "dsm_loss", "ddpm_loss", "ncsn_loss", "LOSSES", "get_loss"]
