"""The test likelihood of a data set's held-out points, and its distance to the exact one where that is known.

Every place that reports a test NLL (``task=sample``, ``task=likelihood``, ``task=compare`` and
training's evaluations) computes it here, with the same dequantisation, divergence choice and
exact reference, so their numbers compare.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch

import solvers
from core_lib import finite_positive, require
from data_lib import Dataset, dequantize
from evaluation.ranks import log_likelihood_on_ranks
from solvers.likelihood import MULTISTEP
from solvers.ode import ADAPTIVE_METHODS, FIXED_METHODS

Tensor = torch.Tensor

__all__ = ["LikelihoodConfig", "HeldOutLikelihood", "scored_points", "data_log_likelihood", "held_out_likelihood",
           "exact_nll", "EXACT_DIVERGENCE_MAX_DIM"]

#: ``divergence="auto"`` is exact up to this many dimensions, Hutchinson's estimator above.
EXACT_DIVERGENCE_MAX_DIM = 32


@dataclasses.dataclass
class LikelihoodConfig:
    """How test log-likelihoods are computed, by every task that reports one (``solvers.log_likelihood``)."""

    n_eval: int = 1000          # test points whose log-likelihood is computed
    eps: float = 1e-5           # the time the data sit at (the ODE runs from eps to T)
    rtol: float = 1e-5          # adaptive ODE tolerances (per-sample error control)
    atol: float = 1e-5
    divergence: str = "auto"    # exact (D VJPs, vectorised), hutchinson (unbiased, K probes), auto: exact up to 32 dims
    probes: int = 1             # Hutchinson probes per point
    method: str = "dopri5"      # torchdiffeq method: adaptive (dopri5, ...) or fixed-grid (rk4, midpoint, euler) with steps,
                                # or multistep (the exponential integrator, steps + 1 NFE; 79 steps: ~1e-3 nats)
    steps: Optional[int] = None  # fixed-grid and multistep steps: the NFE is known in advance (rk4: 4 per step)
    refine: Optional[float] = None  # multistep, exact divergence: solve again, at 4x the steps, the points whose
                                # error estimate exceeds this many nats (e.g. 0.01); null: the fixed budget alone
    control_variate: bool = False   # multistep, Hutchinson: add the trace of the training data's Gaussian flow
                                # exactly and estimate only the rest (lower standard error on images)

    def validate(self) -> None:
        """Refuse settings that cannot give a likelihood, before any work (messages name the ``likelihood.`` key)."""
        require(self.n_eval >= 1, "likelihood.n_eval", self.n_eval, "must be a positive number of test points")
        require(finite_positive(self.eps) and self.eps < 1, "likelihood.eps", self.eps, "must be in (0, T = 1)")
        for key in ("rtol", "atol"):
            require(finite_positive(getattr(self, key)), f"likelihood.{key}", getattr(self, key),
                    "must be a finite positive number")
        require(self.divergence in ("auto", "exact", "hutchinson"), "likelihood.divergence", self.divergence,
                "must be auto, exact or hutchinson")
        require(self.probes >= 1, "likelihood.probes", self.probes, "must be a positive integer")
        methods = [*ADAPTIVE_METHODS, *FIXED_METHODS, MULTISTEP]
        require(self.method in methods, "likelihood.method", self.method, f"must be one of {', '.join(methods)}")
        require(self.steps is None or self.steps >= 1, "likelihood.steps", self.steps, "must be a positive integer")
        require(self.method in ADAPTIVE_METHODS or self.steps is not None, "likelihood.steps", self.steps,
                f"must be given for the fixed-budget method {self.method} (its NFE is then known in advance)")
        require(self.method not in ADAPTIVE_METHODS or self.steps is None, "likelihood.steps", self.steps,
                f"must be null for the adaptive method {self.method} (rtol/atol set its steps)")
        require(self.refine is None or finite_positive(self.refine), "likelihood.refine", self.refine,
                "must be a positive error estimate in nats (e.g. 0.01) or null")
        require(self.refine is None or self.method == MULTISTEP, "likelihood.refine", self.refine,
                f"needs likelihood.method=multistep (its per-point error estimate), not {self.method}; or drop it")
        require(self.refine is None or self.divergence != "hutchinson", "likelihood.refine", self.refine,
                "needs the exact divergence (with Hutchinson probes the re-solved points would depend on the "
                "probes); set likelihood.divergence=exact, or drop it")
        require(not self.control_variate or (self.method == MULTISTEP and self.divergence != "exact"),
                "likelihood.control_variate", self.control_variate,
                "is a control variate of Hutchinson's estimate in likelihood.method=multistep; set those "
                "(likelihood.divergence=hutchinson), or drop it")

    def divergence_for(self, data: Dataset) -> str:
        """``divergence`` for ``data``: "auto" resolved by the data's dimension; refine and control_variate checked
        against the result (the dimension is known only once the data are loaded)."""
        divergence = _resolve_divergence(self.divergence, data)
        require(self.refine is None or divergence == "exact", "likelihood.refine", self.refine,
                f"needs the exact divergence, but likelihood.divergence=auto is Hutchinson's on {data.name}'s "
                f"{math.prod(data.event_shape)} dimensions; set likelihood.divergence=exact, or drop it")
        require(not self.control_variate or divergence == "hutchinson", "likelihood.control_variate",
                self.control_variate, f"needs Hutchinson's estimate, but likelihood.divergence=auto is exact on "
                f"{data.name}'s {math.prod(data.event_shape)} dimensions; set likelihood.divergence=hutchinson, "
                "or drop it")
        return divergence

    def options_for(self, data: Dataset) -> dict[str, Any]:
        """The ``solvers.log_likelihood`` options for ``data``: divergence resolved (:meth:`divergence_for`),
        and with ``control_variate`` the training data's covariance."""
        options = {**self.solver_options(), "divergence": self.divergence_for(data)}
        if self.control_variate:
            options["control_covariance"] = data.train_covariance()
        return options

    def solver_options(self) -> dict[str, Any]:
        """The ``solvers.log_likelihood`` options these settings stand for (``divergence`` still possibly "auto")."""
        return {"eps": self.eps, "rtol": self.rtol, "atol": self.atol, "divergence": self.divergence,
                "probes": self.probes, "method": self.method, "steps": self.steps,
                **({"refine": self.refine} if self.refine is not None else {})}


def _resolve_divergence(divergence: str, data: Dataset) -> str:
    """``divergence``, with "auto" the exact divergence up to EXACT_DIVERGENCE_MAX_DIM dimensions, Hutchinson's above."""
    if divergence != "auto":
        return divergence
    return "exact" if math.prod(data.event_shape) <= EXACT_DIVERGENCE_MAX_DIM else "hutchinson"


def scored_points(data: Dataset, x: Tensor, seed: int) -> Tensor:
    """The points a likelihood of ``data`` is computed at: x itself, or x dequantised (seeded) if the data are discrete."""
    if data.levels is None:
        return x
    return dequantize(x, data.levels, data.data_range, generator=torch.Generator(device=x.device).manual_seed(seed + 11))


def data_log_likelihood(sde, score_fn, data: Dataset, x: Tensor, seed: int, divergence: str = "auto",
                        **options) -> tuple[solvers.LikelihoodResult, Tensor]:
    """``solvers.log_likelihood`` of points x of ``data``, dequantised first when the data are discrete.

    Discrete data get uniform noise within each of their bins (seeded) and bits/dim with their
    offset log₂(K/w) (docs/math.md §6). Under torchrun the points are split across the ranks
    (``evaluation.log_likelihood_on_ranks``) and the whole result is on every rank.
    ``divergence="auto"`` is the exact divergence up to :data:`EXACT_DIVERGENCE_MAX_DIM` dimensions
    (D VJPs per step, vectorised) and Hutchinson's estimator above. Returns the LikelihoodResult and the points actually scored.
    """
    divergence = _resolve_divergence(divergence, data)
    x = scored_points(data, x, seed)   # all of them on every rank: the dequantisation noise is drawn for the batch
    lik = log_likelihood_on_ranks(sde, score_fn, x, seed=seed, levels=data.levels, data_range=data.data_range,
                                  divergence=divergence, **options)
    return lik, x


def exact_nll(data: Dataset, points: Tensor) -> float | None:
    """Mean −log p of ``points`` under the data's exact density (nats), or None when it is not known."""
    if data.mixture is None:
        return None
    return -data.mixture.log_prob(points.double()).mean().item()


@dataclasses.dataclass
class HeldOutLikelihood:
    """The ODE likelihood of the first ``n_eval`` held-out points, summarised.

    Attributes:
        n_eval: points scored.
        nll_nats: mean −log p through the ODE (nats); ``nll_stderr_nats`` its standard error over points.
        bpd: mean bits/dim, with the data's dequantisation offset.
        nfe, seconds: score evaluations and wall time of the likelihood solve.
        exact_nll_nats: the exact mean −log p of the same points where the density is known, else None.
        kl_nats: nll_nats − exact_nll_nats, an estimate of KL(data ‖ model); None without an exact density.
        result: the per-point ``solvers.LikelihoodResult``; ``points``: the points as scored (dequantised if discrete).
    """

    n_eval: int
    nll_nats: float
    nll_stderr_nats: float
    bpd: float
    nfe: int
    seconds: float
    exact_nll_nats: float | None
    kl_nats: float | None
    result: solvers.LikelihoodResult
    points: Tensor


def held_out_likelihood(sde, score_fn, data: Dataset, config: LikelihoodConfig, seed: int, device: torch.device | str,
                        dtype: torch.dtype = torch.float32, progress: bool = False) -> HeldOutLikelihood:
    """The ODE likelihood of ``config.n_eval`` held-out points of ``data``, with KL against the exact density when known."""
    config.validate()
    x = data.test_points(config.n_eval).to(device=device, dtype=dtype)
    options = config.options_for(data)
    lik, points = data_log_likelihood(sde, score_fn, data, x, seed, divergence=options.pop("divergence"),
                                      progress=progress, **options)
    nll = -lik.logp.double()
    mean = nll.mean().item()
    exact = exact_nll(data, points)
    return HeldOutLikelihood(n_eval=len(x), nll_nats=mean,
                             nll_stderr_nats=(nll.std() / len(nll) ** 0.5).item() if len(nll) > 1 else 0.0,
                             bpd=lik.bpd.double().mean().item(), nfe=lik.nfe, seconds=lik.seconds,
                             exact_nll_nats=exact, kl_nats=None if exact is None else mean - exact,
                             result=lik, points=points)
