"""Training batches: a ``torch.utils.data.DataLoader`` whose item k is step k's batch: (x float32, labels or None).

Step k's batch indices (drawn with replacement, as the loop always has) and its flips come from a
generator seeded by (seed, k) alone, so a batch does not depend on which process made it, on how far
the loader's workers ran ahead, or on where a run was resumed: ``num_workers`` changes the speed, never
the numbers. Each process prepares only its own rows of every global batch (its shard,
``core_lib.distributed.shard``): under torchrun a rank reads and converts 1/K of the images of each step.
Samples stored as uint8 levels (images) are converted to float32 here, per batch
(``Dataset.decode``), and flipped left-right at random when ``data.hflip`` is set.

For a class-conditional model the batch carries the samples' labels, each replaced by ``NULL_LABEL``
with probability ``label_dropout`` (classifier-free guidance's unconditional rows): the mask is drawn for
the whole global batch from the step's generator, after the indices and flips, so it too depends on
(seed, step) alone, and unlabelled batches keep the numbers they had before labels existed.
"""
from __future__ import annotations

import numpy as np
import torch

from data_lib import Dataset
from models import NULL_LABEL

__all__ = ["StepBatches", "batch_loader", "step_generator", "drop_labels"]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of training step ``step``'s batch: a stream of its own per (seed, step)."""
    state = np.random.SeedSequence(seed, spawn_key=(3, step)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def drop_labels(y: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """y (B,) with each label replaced by ``NULL_LABEL`` independently with probability p (a copy).

    The mask is one ``torch.rand(B)`` of the generator (on y's device), u < p: drawn whatever p is, so that
    the generator's stream does not depend on p.
    """
    u = torch.rand(y.shape, generator=generator, device=y.device)
    return torch.where(u < p, torch.full_like(y, NULL_LABEL), y)


class StepBatches(torch.utils.data.Dataset):
    """Item ``step``: rows ``rows`` of that step's global batch of ``batch_size`` training samples, as
    (x float32, labels int64 or None).

    Args:
        data: the data set (its ``train`` split, float32 or uint8 levels, stays where it is: on the host).
        batch_size: the global batch (all processes together).
        rows: this process's rows of it.
        seed: the run's seed.
        label_dropout: None: no labels (an unconditional model); p: the rows' labels, each replaced by
            ``NULL_LABEL`` with probability p (:func:`drop_labels` on the whole global batch).
    """

    def __init__(self, data: Dataset, batch_size: int, rows: slice, seed: int, label_dropout: float | None = None):
        self.data, self.batch_size, self.rows, self.seed = data, batch_size, rows, seed
        self.label_dropout = label_dropout

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        gen = step_generator(self.seed, int(step))
        idx = torch.randint(0, len(self.data.train), (self.batch_size,), generator=gen)
        flip = (torch.rand(self.batch_size, generator=gen) < 0.5)[self.rows]   # drawn always: one stream
        y = None
        if self.label_dropout is not None:   # the whole batch's mask, then this rank's rows: as one process does
            y = drop_labels(self.data.train_labels[idx], self.label_dropout, gen)[self.rows]
        idx = idx[self.rows]
        x = self.data.decode(self.data.train[idx])
        if self.data.hflip:
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, y


def batch_loader(data: Dataset, batch_size: int, rows: slice, seed: int, first_step: int, steps: int,
                 device: torch.device, label_dropout: float | None = None) -> torch.utils.data.DataLoader:
    """The batches (x, labels or None) of steps ``first_step`` .. ``steps − 1`` in order, prepared by
    ``data.num_workers`` workers; ``label_dropout`` as in :class:`StepBatches`."""
    workers = data.num_workers
    # The loader's own generator: iter() would otherwise draw its workers' base seed from the global RNG
    # (dropout's, which checkpoints hold), and a resumed run would continue a shifted stream.
    return torch.utils.data.DataLoader(StepBatches(data, batch_size, rows, seed, label_dropout), batch_size=None,
                                       sampler=range(first_step, steps), num_workers=workers,
                                       pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                                       generator=torch.Generator().manual_seed(seed))
