"""Exponential moving average of a model's weights, with the usual warmup of the decay."""
from __future__ import annotations

import copy
from typing import Any

import torch

from training.config import TrainingError


class EMA:
    """θ_ema ← d θ_ema + (1 − d) θ after every update, with d_n = min(decay, (1 + n)/(10 + n)).

    The warmup keeps early averages from being dominated by the random initial weights. The
    averaged copy (``module``) is in eval mode and needs no gradients. Buffers are copied.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise TrainingError(f"train.ema_decay must be in [0, 1), got {decay}.")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), 1.0 - d)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"], strict=True)
        self.updates = int(state["updates"])
