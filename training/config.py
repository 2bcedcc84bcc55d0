"""``TrainConfig``: every setting of ``task=train``, with its type, default and meaning."""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

from core_lib import UserError, finite_positive, require

__all__ = ["TrainConfig", "TrainingError", "DEFAULT_LABEL_DROPOUT"]

#: ``task.label_dropout=null`` for a class-conditional model: 10% of the rows train the unconditional branch
#: (Ho & Salimans 2022 found 0.1–0.2 best; the conditional branch keeps 90% of the data).
DEFAULT_LABEL_DROPOUT = 0.1


class TrainingError(UserError):
    """Training cannot start or go on: a setting out of range, a loss that turned NaN, a resume checkpoint that does not fit."""


@dataclasses.dataclass
class TrainConfig:
    """``task=train`` (``python run.py task=train task.steps=2000``); the hydra schema of ``conf/task/train.yaml``.

    The defaults are the ones measured on the ring in ``benchmarks/train_quality.py``. The test-set
    likelihood of the evaluations follows the top-level ``likelihood.*``.
    """

    name: str = "train"
    steps: int = 4000               # optimisation steps
    batch_size: int = 2048          # large batches: on the ring, 512 left KL 0.13 nats after 4000 steps, 2048 0.05
    lr: float = 2e-3                # Adam learning rate after warmup
    warmup: int = 200               # steps of linear learning-rate warmup
    lr_schedule: str = "cosine"     # after warmup: cosine (decay to 0 at steps) or constant
    betas: List[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])  # Adam's β1, β2
    weight_decay: float = 0.0
    grad_clip: float = 1.0          # max global gradient norm
    ema_decay: float = 0.999        # EMA of the weights, used for sampling and evaluation
    loss: str = "dsm"               # dsm (continuous), ddpm (VP's chain, ε-loss), ncsn (VE's chain)
    weighting: str = "s2"           # dsm: s2 (λ = s², default) or likelihood (λ = g²)
    importance_sampling: bool = False  # dsm with likelihood weighting: t ∝ g²/s² (uniform in log-SNR)
    reduction: str = "mean"         # per-sample loss over dimensions: mean or sum
    eps: float = 1e-5               # smallest t of the loss
    log_every: int = 50             # rows of train_log.csv
    ckpt_every: int = 1000          # checkpoints/last.pt every this many steps (and at the end)
    resume: Optional[str] = None    # path of a checkpoint to continue from (exactly)
    eval_every: int = 0             # evaluate every this many steps (0: at the end only)
    eval_samples: int = 2000        # samples drawn for the evaluation figure
    divergence_factor: Optional[float] = 100.0  # a loss above this × its running mean is divergence (null: never)
    on_divergence: str = "stop"     # stop (TrainingError naming the last good checkpoint) or warn (one line, go on)
    label_dropout: Optional[float] = None  # conditional models: share p of rows trained unlabelled (classifier-free
                                           # guidance's null branch); null: 0.1, 0: never (no guidance later)

    def validate(self) -> None:
        """Refuse settings that cannot train, before any work (each message names the ``task.`` key)."""
        def need(ok: bool, key: str, what: str) -> None:
            require(ok, f"task.{key}", getattr(self, key), what, TrainingError)

        for key in ("steps", "batch_size", "log_every", "ckpt_every", "eval_samples"):
            need(getattr(self, key) >= 1, key, "must be a positive integer")
        for key in ("warmup", "eval_every"):
            need(getattr(self, key) >= 0, key, "must be an integer >= 0")
        for key in ("lr", "grad_clip", "eps"):
            need(finite_positive(getattr(self, key)), key, "must be a finite positive number")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be a finite number >= 0")
        need(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        need(self.lr_schedule in ("cosine", "constant"), "lr_schedule", "must be cosine or constant")
        need(self.divergence_factor is None or (finite_positive(self.divergence_factor) and self.divergence_factor > 1),
             "divergence_factor", "must be null or a finite number > 1")
        need(self.on_divergence in ("stop", "warn"), "on_divergence", "must be stop or warn")
        need(self.loss in ("dsm", "ddpm", "ncsn"), "loss", "must be dsm, ddpm or ncsn")
        need(self.weighting in ("s2", "likelihood"), "weighting", "must be s2 or likelihood")
        need(self.reduction in ("mean", "sum"), "reduction", "must be mean or sum")
        need(not self.importance_sampling or self.weighting == "likelihood", "importance_sampling",
             "applies to task.weighting=likelihood only")
        need(self.label_dropout is None or 0 <= self.label_dropout < 1, "label_dropout",
             "must be null (0.1 for a conditional model) or in [0, 1)")
