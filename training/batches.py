"""Training batches: a ``torch.utils.data.DataLoader`` whose item k is step k's batch, as float32.

Step k's batch indices (drawn with replacement, as the loop always has) and its flips come from a
generator seeded by (seed, k) alone, so a batch does not depend on which process made it, on how far
the loader's workers ran ahead, or on where a run was resumed: ``num_workers`` changes the speed, never
the numbers. Each process prepares only its own rows of every global batch (its shard,
``core_lib.distributed.shard``): under torchrun a rank reads and converts 1/K of the images of each step.
Samples stored as uint8 levels (images) are converted to float32 here, per batch
(``Dataset.decode``), and flipped left-right at random when ``data.hflip`` is set.
"""
from __future__ import annotations

import numpy as np
import torch

from data_lib import Dataset

__all__ = ["StepBatches", "batch_loader", "step_generator"]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of training step ``step``'s batch: a stream of its own per (seed, step)."""
    state = np.random.SeedSequence(seed, spawn_key=(3, step)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class StepBatches(torch.utils.data.Dataset):
    """Item ``step``: rows ``rows`` of that step's global batch of ``batch_size`` training samples, float32.

    Args:
        data: the data set (its ``train`` split, float32 or uint8 levels, stays where it is: on the host).
        batch_size: the global batch (all processes together).
        rows: this process's rows of it.
        seed: the run's seed.
    """

    def __init__(self, data: Dataset, batch_size: int, rows: slice, seed: int):
        self.data, self.batch_size, self.rows, self.seed = data, batch_size, rows, seed

    def __getitem__(self, step: int) -> torch.Tensor:
        gen = step_generator(self.seed, int(step))
        idx = torch.randint(0, len(self.data.train), (self.batch_size,), generator=gen)[self.rows]
        flip = (torch.rand(self.batch_size, generator=gen) < 0.5)[self.rows]   # drawn always: one stream
        x = self.data.decode(self.data.train[idx])
        if self.data.hflip:
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


def batch_loader(data: Dataset, batch_size: int, rows: slice, seed: int, first_step: int, steps: int,
                 device: torch.device) -> torch.utils.data.DataLoader:
    """The batches of steps ``first_step`` .. ``steps − 1`` in order, prepared by ``data.num_workers`` workers."""
    workers = data.num_workers
    # The loader's own generator: iter() would otherwise draw its workers' base seed from the global RNG
    # (dropout's, which checkpoints hold), and a resumed run would continue a shifted stream.
    return torch.utils.data.DataLoader(StepBatches(data, batch_size, rows, seed), batch_size=None,
                                       sampler=range(first_step, steps), num_workers=workers,
                                       pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                                       generator=torch.Generator().manual_seed(seed))
