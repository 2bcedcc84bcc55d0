"""The variational bound of the discrete chain (DDPM's L, docs/math.md §7): the discrete-time likelihood.

The ODE gives the exact log-likelihood of the continuous model; this bound is what the same score
network achieves as a discrete model, x_{i−1} ~ p_θ(x_{i−1} | x_i) from the SDE's N-step chain.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Literal

import torch

from sde_lib import SDE, VESDE
from solvers.base import CountedScore, ScoreFn, SolverError, check_finite
from solvers.likelihood import bits_per_dim
from solvers.noise import NoiseSource

Tensor = torch.Tensor

__all__ = ["BoundResult", "variational_bound"]


@dataclasses.dataclass
class BoundResult:
    """What :func:`variational_bound` returns.

    Attributes:
        nll: (B,) the bound on −log p(x) in nats per sample (one noise draw per chain step).
        bpd: (B,) the same in bits per dimension (with the data's dequantisation offset).
        terms: (N + 1,) mean over the batch of each term, in nats: [prior, L_{N−1}, …, L_1, decoder].
        nfe: score evaluations (N, one per chain step).
        seconds: wall time.
    """

    nll: Tensor
    bpd: Tensor
    terms: Tensor
    nfe: int
    seconds: float


def _gauss_kl(mu1: Tensor, var1: Tensor, mu2: Tensor, var2: Tensor) -> Tensor:
    """KL(N(μ₁, var₁) ‖ N(μ₂, var₂)) summed over dimensions, (B,); the variances broadcast per sample."""
    per = 0.5 * (torch.log(var2 / var1) + (var1 + (mu1 - mu2) ** 2) / var2 - 1)
    return per.flatten(1).sum(1)


def variational_bound(sde: SDE, score_fn: ScoreFn, x: Tensor, seed: int = 0,
                      variance: Literal["forward", "posterior"] | None = None, levels: int | None = None,
                      data_range: tuple | list | None = None, cond: dict | None = None) -> BoundResult:
    """DDPM's bound L ≥ −log p_θ(x) of the model's discrete chain, per sample (docs/math.md §7).

    With the chain x_i = a_i x_{i−1} + √v_i z (i = 0..N−1, x_{−1} the data, ``sde.discrete_chain``),
    x_i | x_{−1} ~ N(A_i x_{−1}, m_i) and the reverse kernels p_θ(x_{i−1} | x_i) = N((x_i + v_i s_θ)/a_i, σ_i²)
    of ancestral sampling,

        L = KL(q(x_{N−1} | x) ‖ N(0, σ_T²)) + Σ_{i≥1} KL(q(x_{i−1} | x_i, x) ‖ p_θ(x_{i−1} | x_i)) − log p_θ(x | x_0),

    with q(x_{i−1} | x_i, x) = N(A_{i−1} v_i/m_i · x + a_i m_{i−1}/m_i · x_i, m_{i−1} v_i/m_i) and a
    Gaussian decoder of variance v_0. Each KL is exact; each x_i is one draw from q (counter-based
    noise of ``seed``), so L is an unbiased estimate per sample. The score of step i is evaluated
    at ``sde.chain_times()[i]``, the time whose noise level matches the chain's. σ_i² = v_i
    ("forward", DDPM's β_i) or the posterior's ("posterior", β̃_i); default as in ancestral
    sampling (posterior for VE, forward otherwise). For discrete data pass x dequantised and
    ``levels``/``data_range``: bpd then carries the offset log₂(K/w), as the ODE likelihood's does.

    Args:
        sde: VPSDE (DDPM's chain) or VESDE (NCSN's); sub-VP's chain has a noiseless first step
            and no finite bound.
        score_fn: ``score_fn(x, t)``.
        x: (B, ...) data.

    Returns:
        :class:`BoundResult`.
    """
    if not torch.is_tensor(x) or x.dim() < 2 or not x.is_floating_point():
        raise SolverError("x must be a floating-point tensor of shape (B, ...), e.g. (1000, 2).")
    check_finite(x, "the data passed to variational_bound")
    if variance not in (None, "forward", "posterior"):
        raise SolverError(f"variance must be 'forward', 'posterior' or None, got {variance!r}.")
    a, v = sde.discrete_chain()
    A, m = sde.chain_marginals()
    if not bool((a > 0).all() and (v > 0).all()):
        raise SolverError(f"{sde!r} has a chain step without noise or with a_i <= 0 (sub-VP's first step, or VP "
                          "with N <= β_max), so its variational bound is infinite; use a VPSDE or VESDE with more steps.")
    variance = variance or ("posterior" if isinstance(sde, VESDE) else "forward")
    times = sde.chain_times()
    dt, dev = x.dtype, x.device
    coeffs = torch.stack([a, v, A, m, times]).to(dtype=dt, device=dev)
    a, v, A, m, times = coeffs
    score = CountedScore(score_fn, cond=cond)
    noise = NoiseSource(seed)
    ones = torch.ones(x.shape[0], dtype=dt, device=dev)
    n = len(v)
    start = time.perf_counter()

    prior_var = torch.as_tensor(sde.prior_std ** 2, dtype=dt, device=dev)
    terms = [_gauss_kl(A[-1] * x, m[-1], torch.zeros_like(x), prior_var)]
    for i in range(n - 1, -1, -1):
        x_i = A[i] * x + m[i].sqrt() * noise.normal(x.shape, dt, dev)
        mean_theta = (x_i + v[i] * score(x_i, times[i] * ones)) / a[i]
        if i == 0:  # the decoder: −log N(x; mean, v_0)
            d = x[0].numel()
            terms.append(0.5 * ((x - mean_theta) ** 2).flatten(1).sum(1) / v[0] + 0.5 * d * torch.log(2 * math.pi * v[0]))
            break
        post_var = m[i - 1] * v[i] / m[i]
        post_mean = A[i - 1] * v[i] / m[i] * x + a[i] * m[i - 1] / m[i] * x_i
        model_var = v[i] if variance == "forward" else post_var
        terms.append(_gauss_kl(post_mean, post_var, mean_theta, model_var))
    stacked = torch.stack(terms)                                # (N + 1, B)
    nll = stacked.sum(0)
    check_finite(nll, "the variational bound")
    bpd = bits_per_dim(-nll, x[0].numel(), levels, data_range)
    return BoundResult(nll=nll, bpd=bpd, terms=stacked.mean(1), nfe=score.nfe, seconds=time.perf_counter() - start)
