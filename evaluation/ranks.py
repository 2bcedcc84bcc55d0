"""Sampling and likelihoods split across the ranks of a torchrun job, put back together on every rank.

Each rank takes a contiguous block of the samples (or points), ``core_lib.distributed.shard``, and
solves it with the counter-based noise at its global index (``index_offset``), so sample b's noise
and Hutchinson probes are the same whichever rank computes it. Fixed-step solvers then give the
single-process samples bit for bit (a network's forward is row-wise); adaptive ones control the error
of each sample (``error_norm="sample"``) and agree with one process to their tolerance. No rank ever
waits for another inside a solve: ranks may take different numbers of adaptive steps, and meet only
to gather the results. In a single process both functions are ``solvers.sample`` and
``solvers.log_likelihood`` themselves.
"""
from __future__ import annotations

import dataclasses

import torch

import solvers
from core_lib import distributed

__all__ = ["sample_on_ranks", "log_likelihood_on_ranks"]


def _seed(seed: int | None) -> int:
    """A seed every rank shares: the caller's, or one rank 0 draws."""
    if seed is not None:
        return seed
    return distributed.broadcast(int(torch.randint(0, 2**62, (1,)).item()))


def _rows(kwargs: dict, start: int, stop: int, n: int) -> dict:
    """``kwargs`` with every per-sample tensor of ``cond`` (first dimension n, e.g. the labels y) cut to rows start:stop."""
    cond = kwargs.get("cond")
    if not cond:
        return kwargs
    cut = {k: v[start:stop] if torch.is_tensor(v) and v.dim() > 0 and len(v) == n else v for k, v in cond.items()}
    return {**kwargs, "cond": cut}


def sample_on_ranks(sde, score_fn, shape, seed: int | None = None, z: torch.Tensor | None = None,
                    progress: bool = False, **kwargs) -> solvers.SampleResult:
    """``solvers.sample`` of ``shape[0]`` samples, this rank drawing its block; the whole result on every rank.

    ``nfe`` and ``seconds`` are the slowest rank's; a trajectory is recorded by rank 0 (the first samples).
    ``z`` (the whole batch's prior noise) and per-sample conditioning (``cond={"y": labels}``) are split the same way.
    """
    shape = tuple(z.shape) if z is not None else tuple(shape)
    if distributed.world_size() == 1:
        return solvers.sample(sde, score_fn, shape, seed=seed, z=z, progress=progress, **kwargs)
    if shape[0] < distributed.world_size():   # decided alike on every rank, before any of them solves
        raise solvers.SolverError(f"{shape[0]} samples cannot be split over {distributed.world_size()} processes; "
                                  "ask for at least one sample per process.")
    seed = _seed(seed)
    start, stop = distributed.shard(shape[0])
    trajectory = kwargs.pop("trajectory", 0)
    kwargs = _rows(kwargs, start, stop, shape[0])
    part = solvers.sample(sde, score_fn, (stop - start, *shape[1:]), seed=seed, index_offset=start,
                          z=None if z is None else z[start:stop], progress=progress and distributed.is_main(),
                          trajectory=min(trajectory, stop - start) if distributed.is_main() else 0, **kwargs)
    costs = distributed.gather_objects((part.nfe, part.seconds))
    return dataclasses.replace(part, samples=distributed.gather_rows(part.samples), z=distributed.gather_rows(part.z),
                               nfe=max(c[0] for c in costs), seconds=max(c[1] for c in costs))


def log_likelihood_on_ranks(sde, score_fn, x: torch.Tensor, seed: int | None = None, progress: bool = False,
                            **kwargs) -> solvers.LikelihoodResult:
    """``solvers.log_likelihood`` of the points x (all of them, on every rank), this rank solving its block;
    the per-point result on every rank (per-point ``cond`` tensors split alike). ``nfe`` and ``seconds`` are the slowest rank's."""
    if distributed.world_size() == 1:
        return solvers.log_likelihood(sde, score_fn, x, seed=seed, progress=progress, **kwargs)
    if len(x) < distributed.world_size():
        raise solvers.SolverError(f"{len(x)} points cannot be split over {distributed.world_size()} processes; "
                                  "score at least one point per process (likelihood.n_eval).")
    seed = _seed(seed)
    start, stop = distributed.shard(len(x))
    part = solvers.log_likelihood(sde, score_fn, x[start:stop], seed=seed, index_offset=start,
                                  progress=progress and distributed.is_main(), **_rows(kwargs, start, stop, len(x)))
    costs = distributed.gather_objects((part.nfe, part.seconds))
    probes = distributed.gather_rows(part.logp_probes.T.contiguous()).T    # (K, B): gathered along the points
    return dataclasses.replace(part, logp=distributed.gather_rows(part.logp), bpd=distributed.gather_rows(part.bpd),
                               z=distributed.gather_rows(part.z), logp_stderr=distributed.gather_rows(part.logp_stderr),
                               logp_probes=probes, nfe=max(c[0] for c in costs), seconds=max(c[1] for c in costs))
