"""``TrainConfig``: every setting of ``task=train``, with its type, default and meaning."""
from __future__ import annotations

import dataclasses
from typing import List, Optional

__all__ = ["TrainConfig"]


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
