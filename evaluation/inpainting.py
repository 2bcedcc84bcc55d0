"""Inpainting measured against the exact conditional of a Gaussian mixture (docs/inpainting.md §5).

For each input, ``GaussianMixture.condition`` gives the exact p₀(x_B | x_A). Its modes are the conditional
components of weight ≥ ``min_weight``, ranked by weight. Every completion (and every exact conditional draw
of the reference) is assigned to its nearest mode in the unknown coordinates. Reported:

- ``tv``: the total variation ½ Σ_j |f_j − f*_j| between the completions' frequencies of mode ranks j and
  those of exact draws under the same rule (for one shared input: the error of the conditional mode weights);
- ``spread``: the completions' RMS distance to their nearest mode over that of exact draws (1 is exact);
- ``tv_floor``: the ``tv`` of as many fresh exact draws as there are completions: the Monte-Carlo noise level.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from models import GaussianMixture

Tensor = torch.Tensor

__all__ = ["ConditionalError", "conditional_error"]


@dataclasses.dataclass
class ConditionalError:
    """Completions against the exact conditional (see the module docstring): tv, spread, the noise floor, n."""

    tv: float
    spread: float
    tv_floor: float
    n: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in dataclasses.asdict(self).items()}


def _ranks_and_sq(cond: GaussianMixture, pts: Tensor, min_weight: float) -> tuple[Tensor, Tensor]:
    """Each point's nearest-mode rank (by weight) and squared distance to that mode's mean."""
    order = torch.argsort(cond.weights, descending=True)
    order = order[cond.weights[order] >= min_weight]
    dist = torch.cdist(pts, cond.means[order]).pow(2)
    sq, rank = dist.min(1)
    return rank, sq


def conditional_error(mixture: GaussianMixture, mask: Tensor, known: Tensor, completions: Tensor,
                      reference: int = 200_000, seed: int = 0, min_weight: float = 1e-3) -> ConditionalError:
    """How far ``completions`` are from draws of the exact conditionals p₀(x_B | x_A = known_A).

    Args:
        mixture: the data's exact distribution.
        mask: 0/1, 1 = known, of one sample's shape or of ``known``'s (one mask per input).
        known: (n, ...) the inputs (read where mask = 1).
        completions: (n, ...) the inpainted samples, one per input.
        reference: exact conditional draws in all (split over the distinct inputs in proportion to their rows).
        seed: seed of the exact draws.
        min_weight: a conditional component lighter than this is not a mode.
    """
    n = len(completions)
    flat_known = known.detach().double().cpu().reshape(n, -1)
    flat_done = completions.detach().double().cpu().reshape(n, -1)
    masks = mask.detach().double().cpu().reshape(-1, flat_known.shape[1]).expand(n, -1)
    keys = torch.cat([masks, torch.where(masks.bool(), flat_known, 0.0)], dim=1)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    g = torch.Generator().manual_seed(seed)
    ranks, sqs, ref_ranks, ref_sqs, floor_ranks = [], [], [], [], []
    for c in range(len(unique)):
        rows = (inverse == c).nonzero().squeeze(1)
        m = masks[rows[0]].bool()
        cond = mixture.condition(m.double(), flat_known[rows[0]])
        rank, sq = _ranks_and_sq(cond, flat_done[rows][:, ~m], min_weight)
        ranks.append(rank)
        sqs.append(sq)
        draws, _ = cond.sample(max(1, math.ceil(reference * len(rows) / n)), generator=g, dtype=torch.float64)
        rank, sq = _ranks_and_sq(cond, draws, min_weight)
        ref_ranks.append(rank)
        ref_sqs.append(sq)
        fresh, _ = cond.sample(len(rows), generator=g, dtype=torch.float64)
        floor_ranks.append(_ranks_and_sq(cond, fresh, min_weight)[0])
    size = 1 + max(int(r.max()) for r in ranks + ref_ranks + floor_ranks)

    def freq(parts: list[Tensor]) -> Tensor:
        r = torch.cat(parts)
        return torch.bincount(r, minlength=size).double() / len(r)

    ref = freq(ref_ranks)
    tv = 0.5 * (freq(ranks) - ref).abs().sum().item()
    tv_floor = 0.5 * (freq(floor_ranks) - ref).abs().sum().item()
    spread = (torch.cat(sqs).mean().sqrt() / torch.cat(ref_sqs).mean().sqrt()).item()
    return ConditionalError(tv=tv, spread=spread, tv_floor=tv_floor, n=n)
