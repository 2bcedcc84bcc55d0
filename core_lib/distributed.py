"""One process or a torchrun job: the rank, the world, and the few collectives the tasks need.

A run started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in its environment) joins
one torch.distributed process group, gloo on CPU and NCCL on CUDA; a plain ``python run.py`` is a
world of one, where every function here is the identity and no process group exists. The tasks
are the same code in both cases: work is split by :func:`shard` and put back together by
:func:`gather_rows`, and only the main rank (rank 0) writes files (``evaluation.RunOutput``).

Public API::

    core_lib.distributed.init(device)       # join torchrun's process group (idempotent); the rank's device
    core_lib.distributed.rank(), world_size(), is_main()
    core_lib.distributed.shard(n)           # this rank's contiguous rows [start, stop) of n
    core_lib.distributed.gather_rows(x)     # the ranks' row blocks, concatenated in rank order, on every rank
    core_lib.distributed.broadcast(obj)     # rank 0's picklable object, on every rank
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from core_lib.errors import UserError

__all__ = ["init", "launched", "rank", "local_rank", "world_size", "is_main", "shard", "gather_rows", "gather_objects",
           "all_sum", "broadcast", "barrier", "close", "DistributedError", "TIMEOUT_SECONDS"]

#: How long a collective waits for a rank that does not arrive before the job fails (a dead or stuck rank).
TIMEOUT_SECONDS = int(os.environ.get("SCOREFLOW_DIST_TIMEOUT", "600"))


class DistributedError(UserError):
    """A torchrun job that cannot run as asked (a device missing for a rank, a batch that does not split)."""


def launched() -> bool:
    """Whether this process was started by torchrun (or any launcher that sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def rank() -> int:
    """This process's global rank (0 in a single process)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0)) if launched() else 0


def local_rank() -> int:
    """This process's rank on its machine (which GPU it takes)."""
    return int(os.environ.get("LOCAL_RANK", 0)) if launched() else 0


def world_size() -> int:
    """How many processes share the run (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1)) if launched() else 1


def is_main() -> bool:
    """Rank 0: the process that writes the run's files and prints its messages."""
    return rank() == 0


def init(device: str | torch.device = "cpu") -> torch.device:
    """Join the torchrun job's process group (once) and return this rank's device.

    ``device="cuda"`` becomes ``cuda:LOCAL_RANK`` with NCCL; anything else keeps gloo. A world of one
    (plain ``python``, or ``torchrun --nproc_per_node=1``) creates no process group: it runs exactly
    the single-process code.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and launched():
        if torch.cuda.device_count() <= local_rank():
            raise DistributedError(f"device=cuda: local rank {local_rank()} has no GPU (this machine has "
                                   f"{torch.cuda.device_count()}); start at most that many processes per node "
                                   "(torchrun --nproc_per_node).")
        device = torch.device("cuda", local_rank())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched() and world_size() > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=TIMEOUT_SECONDS)
        store, rank_, world = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun's store outlives a restart (--max-restarts): keys of this attempt apart from the last one's,
        # or a restarted rank may read a dead peer's address and fail to connect
        store = dist.PrefixStore(f"scoreflow/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank_,
                                world_size=world, timeout=timeout,
                                **({"device_id": device} if device.type == "cuda" else {}))
    return device


def _active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def shard(n: int, part: int | None = None, parts: int | None = None) -> tuple[int, int]:
    """Rows [start, stop) of ``n`` for this rank (or for ``part`` of ``parts``): contiguous blocks in rank order,
    the first ``n % parts`` of them one row longer, so that their concatenation is 0..n−1."""
    part, parts = (rank(), world_size()) if part is None else (part, parts)
    base, extra = divmod(n, parts)
    start = part * base + min(part, extra)
    return start, start + base + (part < extra)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in a single process."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The ranks' blocks of rows (any lengths), concatenated in rank order, on every rank, on x's device."""
    if not _active():
        return x
    return torch.cat([part.to(x.device) for part in gather_objects(x.detach().cpu())])


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the ranks (in place, and returned); x itself in a single process."""
    if _active():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable); ``obj`` itself in a single process."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def close() -> None:
    """Leave the process group at the end of a run (nothing in a single process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank is here (nothing in a single process)."""
    if _active():
        dist.barrier()
