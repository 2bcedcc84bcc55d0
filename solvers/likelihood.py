"""Exact likelihood through the probability-flow ODE (docs/math.md §6).

The ODE is integrated forward from eps to T together with the divergence of its drift:
``log p_eps(x) = log p_T(x_T) + ∫_eps^T ∇·f̃(x_t, t) dt``, with the prior N(0, prior_std² I)
standing in for p_T. The divergence is exact (D vector–Jacobian products, vectorised with
torch.func) or the Hutchinson–Skilling estimate with K probes held fixed along the path, which
gives K estimates of log p from one trajectory and so a standard error; optionally with a Gaussian control
variate or Hutch++ (docs/math.md §6.2). ``method="multistep"`` spends a fixed budget of evaluations, restarts a
point's order after a jump, estimates each point's error and can solve the worst points again (§6.1).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Literal, Optional

import torch
from torch.func import jacrev, vjp, vmap

from core_lib import build_options, finite_positive
from sde_lib import SDE
from solvers.base import CountedScore, ScoreFn, SolverError, TimeProgress, check_finite
from solvers.exponential import (ORDERS, _ExponentialState, check_step_at_t, integral_weights, step_at_t,
                                  step_orders)
from solvers.grids import GridKind, GridOptions, by_budget, solve_times, time_grid, with_start_step
from solvers.noise import NoiseSource
from solvers.ode import ADAPTIVE_METHODS, FIXED_METHODS, check_method, odeint_between, pf_ode_drift

Tensor = torch.Tensor

__all__ = ["log_likelihood", "LikelihoodResult", "bits_per_dim"]


@dataclasses.dataclass
class LikelihoodResult:
    """What :func:`log_likelihood` returns.

    Attributes:
        logp: (B,) log-density of each input in nats (the mean over probes for Hutchinson).
        bpd: (B,) bits per dimension, with the dequantisation offset when ``levels`` was given.
        z: (B, ...) the latent x_T the ODE maps each input to.
        nfe: score evaluations actually made (each batched forward counts once).
        logp_stderr: (B,) standard error of logp across Hutchinson probes (zeros for exact).
        logp_probes: (K, B) the per-probe estimates (K = 1 for exact).
        seconds: wall-clock time.
        logp_error: (B,) method="multistep": the per-point error estimate in nats (see ``refine``); None otherwise.
        nfe_per_point: (B,) method="multistep": the evaluations each point took part in (steps + 1, plus
            refine_steps + 1 where it was solved again); ``nfe`` counts the batched evaluations of both solves.
    """

    logp: Tensor
    bpd: Tensor
    z: Tensor
    nfe: int
    logp_stderr: Tensor
    logp_probes: Tensor
    seconds: float
    logp_error: Tensor | None = None
    nfe_per_point: Tensor | None = None


#: the default ``refine_steps`` as a multiple of ``steps``
REFINE_FACTOR = 4
#: the multistep likelihood's default grid (``grid=None``), by budget: (fewest steps, settings of the focus grid of
#: solvers/grids.py), the last row that applies. Below 35 steps the sampler's earlier focus (0.8, before its own moved:
#: benchmarks/results/peers_log.md §12) serves the exact problems best. From 35 (where it first beats that row on
#: all three shipped networks) a closer, narrower focus with 45 % of the steps uniform in λ, near the sampler's own,
#: brings the networks within 0.01 nats at 40 NFE; from 40 a wider data side and a third of edm-spaced steps serve the
#: networks, whose divergence is rough at both ends (benchmarks/results/likelihood.md).
LIKELIHOOD_GRIDS = (
    (1, {"focus": 0.8, "focus_width_noise": 1.5, "focus_width_data": 1.6, "coverage": 0.0, "uniform_share": 0.0}),
    (35, {"focus": 0.4, "focus_width_noise": 1.5, "focus_width_data": 1.0, "coverage": 0.0, "uniform_share": 0.45}),
    (40, {"focus": 0.6, "focus_width_noise": 1.5, "focus_width_data": 2.2, "coverage": 0.35, "uniform_share": 0.0}))
#: a model that predicts the noise (CountedScore.predicts_noise) gets, in ``method="multistep"`` from END_STEP_FROM
#: steps, the sampler's start step at the grid's other end: the last step, into T, split at START_STEP of its length
#: in λ (the budget's grid for one step fewer). Its F moves fast near T (docs/math.md §4.3); on the digits U-Net its
#: mean error falls 1.4–2.5× at 40 NFE (two sets of test points) and 3× at 80; at 20 NFE, on the grid without a
#: uniform share, it costs (benchmarks/results/likelihood.md).
END_STEP_FROM = 35

#: ``method="multistep"``: the ODE's own integral form (solvers/exponential.py) with the divergence on the same nodes
MULTISTEP = "multistep"


@dataclasses.dataclass
class _LikelihoodOptions(GridOptions):
    method: str = "dopri5"          # torchdiffeq method (adaptive, or fixed-grid with steps), or "multistep"
    steps: int | None = None        # step count for fixed-grid methods and multistep (NFE known in advance)
    grid: Optional[GridKind] = None  # fixed-grid methods and multistep: the time grid; null: LIKELIHOOD_GRIDS, else uniform t
    order: int = 3                  # multistep: polynomial order (ramped up 1, 2, .. and capped at few steps)
    variable: Literal["log_snr", "sigma", "angle"] = "angle"  # multistep: x̂_0 in λ, ε̂ in σ or F in the angle
    corrector: bool = True          # multistep: re-fit through each new point (no extra NFE)
    uniform_share: Optional[float] = 0.0   # grid="focus": no uniform-λ share (the sampler's default has one, set for sampling)
    end_step: Optional[float] = None   # multistep: a last step (into T) this fraction of the grid's last in λ (0: none);
                                       # None: START_STEP from END_STEP_FROM steps for a model that predicts the noise
    restart: float | None = 0.005   # multistep: restart a point's order ramp when its predictor–corrector gap
                                    # (RMS over dimensions, in z = x/κ) exceeds this; None: never
    refine: float | None = None     # multistep, exact divergence: solve again the points whose error estimate
                                    # (logp_error, nats) exceeds this; None: the fixed budget alone
    refine_steps: int | None = None  # multistep: the re-solve's steps (None: REFINE_FACTOR × steps)
    probes: int = 1                 # Hutchinson probes K (divergence="hutchinson")
    probe: Literal["rademacher", "gaussian"] = "rademacher"
    # Hutchinson in multistep: the data's (D, D) covariance C; the Jacobian of N(0, C)'s flow is a control variate
    control_covariance: Optional[Tensor] = None
    sketch: int = 0                 # Hutch++: rank m of a sketch whose trace is exact (2m more VJPs); 0: plain
    seed: int | None = None         # seed of the Hutchinson probes
    index_offset: int = 0           # global index of x's first row: row b's probes depend on (seed, index_offset + b) only
    levels: int | None = None       # number of levels K per dimension of discrete data, for the bpd offset
    data_range: tuple | list | None = None   # (low, high) the levels are scaled to; default (0, 1)
    chunk: int | None = None        # exact divergence: basis vectors per vmap call (None: all D at once)
    # Adaptive error control: the worst sample's RMS, so that rtol/atol hold for every sample
    # ("batch": torchdiffeq's batch RMS, fewer NFE, but an outlier's error is averaged away).
    error_norm: Literal["sample", "batch"] = "sample"
    progress: bool = False          # a progress bar over t (on stderr)

    def validate(self):
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise SolverError(f"steps must be a positive integer, got {self.steps!r}.")
        if self.method == MULTISTEP:
            if self.steps is None and not (self.grid == "user" and self.times):
                raise SolverError("method 'multistep' takes a fixed budget: give steps (NFE = steps + 1).")
            if self.grid == "user" and (self.refine is not None or self.refine_steps is not None):
                raise SolverError("refine re-solves on a finer grid of the same kind, which grid='user' times do not "
                                  "define: give a grid kind (or null for the likelihood's own), or drop refine.")
            if self.order not in ORDERS:
                raise SolverError(f"order must be one of {ORDERS}, got {self.order}.")
            check_step_at_t("end_step", self.end_step, self.grid, "last")
            for key in ("steps", "refine_steps"):
                if self.end_step and getattr(self, key) is not None and getattr(self, key) < 2:
                    raise SolverError(f"end_step needs at least 2 steps, got {key}={getattr(self, key)}.")
        else:
            if self.end_step is not None:
                raise SolverError(f"end_step belongs to method='multistep', not to {self.method!r}: use "
                                  f"method='multistep' with steps, or drop it.")
            check_method(self.method, self.steps)
            if self.refine is not None or self.refine_steps is not None:
                raise SolverError(f"refine and refine_steps belong to method='multistep' (its error estimate), "
                                  f"not to {self.method!r}: use method='multistep' with steps, or drop them.")
        if self.refine is not None and not (isinstance(self.refine, (int, float)) and finite_positive(self.refine)):
            raise SolverError(f"refine must be a positive error estimate in nats (e.g. 0.3) or None, "
                              f"got {self.refine!r}.")
        if self.restart is not None and not (isinstance(self.restart, (int, float)) and finite_positive(self.restart)):
            raise SolverError(f"restart must be a positive threshold or None (never restart), got {self.restart!r}.")
        if self.refine_steps is not None and (not isinstance(self.refine_steps, int) or self.refine_steps < 1):
            raise SolverError(f"refine_steps must be a positive integer or None, got {self.refine_steps!r}.")
        if self.grid is not None and self.method in ADAPTIVE_METHODS:
            raise SolverError(f"grid={self.grid!r} needs a fixed budget (multistep or {', '.join(FIXED_METHODS)}); "
                              f"the adaptive {self.method!r} chooses its own steps.")
        GridOptions.validate(self)
        if self.method in FIXED_METHODS and self.steps is None:
            raise SolverError(f"method {self.method!r} is fixed-grid: give steps (the NFE is then known in advance), "
                              f"or use an adaptive method ({', '.join(ADAPTIVE_METHODS)}).")
        if self.probes < 1:
            raise SolverError(f"probes must be >= 1, got {self.probes}.")
        if not isinstance(self.sketch, int) or self.sketch < 0:
            raise SolverError(f"sketch must be a non-negative integer (0: plain Hutchinson), got {self.sketch!r}.")
        if self.levels is not None and self.levels < 2:
            raise SolverError(f"levels must be >= 2 (the number of values per dimension), got {self.levels}.")
        if self.data_range is not None and (len(self.data_range) != 2
                                            or not float(self.data_range[1]) > float(self.data_range[0])):
            raise SolverError(f"data_range must be (low, high) with high > low, got {self.data_range!r}.")
        if self.chunk is not None and self.chunk < 1:
            raise SolverError(f"chunk must be >= 1, got {self.chunk}.")


def bits_per_dim(logp: Tensor, dim: int, levels: int | None = None,
                 data_range: tuple[float, float] | None = None) -> Tensor:
    """bpd = −log p/(D ln 2) + log₂(K/w) for K levels per dimension on an interval of width w (docs/math.md §6).

    The offset converts the density of dequantised data y (uniform within each bin of width w/K)
    to the probability of the discrete data: +8 for 256 levels on [0, 1], +7 on [−1, 1].
    Without ``levels`` the data are taken as continuous and no offset is added.
    """
    bpd = -logp / (dim * math.log(2))
    if levels is not None:
        low, high = data_range if data_range is not None else (0.0, 1.0)
        bpd = bpd + math.log2(levels / (float(high) - float(low)))
    return bpd


def _divergence_exact(drift_t: Callable[[Tensor], Tensor], x: Tensor, chunk: int | None):
    """f(x) and its exact divergence (B,): one forward, then the D rows of the Jacobian by VJPs."""
    out, pullback = vjp(drift_t, x)
    d = x[0].numel()
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    div = x.new_zeros(x.shape[0])
    step = chunk or d
    for start in range(0, d, step):
        basis = eye[start:start + step]                                        # (c, D)
        cot = basis[:, None, :].expand(-1, x.shape[0], -1).reshape(-1, *x.shape)  # (c, B, ...)
        rows = vmap(pullback)(cot)[0].flatten(2)                               # (c, B, D)
        div = div + torch.einsum("cbc->b", rows[:, :, start:start + step])
    return out, div[None]


def _divergence_hutchinson(drift_t: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, control: Tensor | None = None):
    """f(x) and K Hutchinson estimates vᵀ (∂f/∂x) v, shape (K, B), one VJP per probe.

    With ``control`` M (D, D), a matrix close to ∂f/∂x whose trace is known: vᵀ(∂f/∂x − M)v + tr M, unbiased for
    any M (a control variate); its variance is that of the difference (docs/math.md §6.2)."""
    out, pullback = vjp(drift_t, x)
    vjps = vmap(pullback)(v)[0]
    estimate = (vjps * v).flatten(2).sum(-1)
    if control is not None:
        flat = v.flatten(2)
        estimate = estimate - torch.einsum("kbi,ij,kbj->kb", flat, control, flat) + torch.diagonal(control).sum()
    return out, estimate


def _gaussian_score(sde: SDE, covariance: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """The score of N(0, C) diffused by the SDE, −(α²C + s²I)⁻¹ x: the linear model whose Jacobian is the
    control variate (the mean does not enter a Jacobian)."""
    lam, u = torch.linalg.eigh(covariance)

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        alpha, std = sde.log_mean_coeff(t[:1]).exp().to(x.dtype), sde.marginal_std(t[:1]).to(x.dtype)
        flat = x.flatten(1) @ u.to(x.dtype)
        return (-(flat / (alpha**2 * lam.to(x.dtype) + std**2)) @ u.T.to(x.dtype)).reshape(x.shape)

    return score_fn


def _control_matrix(f_lin: Callable[[Tensor], Tensor], like: Tensor) -> Tensor:
    """The (D, D) Jacobian of a linear map f_lin of one point shaped like ``like[0]``."""
    jac = jacrev(f_lin)(torch.zeros_like(like[:1]))
    d = like[0].numel()
    return jac.reshape(d, d)


def _likelihood_times(opts: _LikelihoodOptions, sde: SDE, eps: float, steps: int, sigma_data: float,
                      end: float = 0.0) -> list[float]:
    """The multistep likelihood's grid of ``steps`` steps, eps first and T last: ``grid`` as given, or by default the
    likelihood's own (LIKELIHOOD_GRIDS, fixed here so that it does not move with the sampler's defaults; docs/math.md
    §6.1). ``end`` > 0: the grid of steps − 1 steps with its last step, into T, split at that fraction in λ."""
    n = steps - 1 if end else steps
    if opts.grid is not None:
        ts = solve_times(opts, sde, eps, n, n, sigma_data)
    else:
        g = by_budget(LIKELIHOOD_GRIDS, n)
        ts = time_grid(sde, eps, n, "focus", focus_sigma=g["focus"] * sigma_data,
                       focus_width=(g["focus_width_noise"], g["focus_width_data"]), coverage=g["coverage"],
                       uniform_share=g["uniform_share"])
    if end:
        ts = with_start_step(sde, ts, end)
    return ts.flip(0).tolist()


def _divergence_hutchpp(drift_t: Callable[[Tensor], Tensor], x: Tensor, sketch: Tensor, v: Tensor):
    """f(x) and K Hutch++ estimates of ∇·f (Meyer et al. 2021), shape (K, B): the exact trace of ∂f/∂x on the span Q of
    (∂f/∂x)ᵀ S (m = len(sketch) VJPs, then m more on Q), plus one Hutchinson estimate per probe of the rest,
    vᵀ(I − QQᵀ)(∂f/∂x)(I − QQᵀ)v (K VJPs): 2m + K VJPs in all. Unbiased for any Q, since the first part is exact."""
    out, pullback = vjp(drift_t, x)
    m = sketch.shape[0]
    rows = vmap(pullback)(sketch)[0].flatten(2)                               # (m, B, D): Sᵀ J
    q = torch.linalg.qr(rows.permute(1, 2, 0)).Q                               # (B, D, m): an orthonormal basis of Jᵀ S
    g = v.flatten(2).permute(1, 2, 0)                                          # (B, D, K)
    g = g - q @ (q.transpose(1, 2) @ g)
    probes = torch.cat([q, g], dim=2).permute(2, 0, 1)                         # (m + K, B, D)
    quad = (vmap(pullback)(probes.reshape(-1, *x.shape))[0].flatten(2) * probes).sum(-1)   # (m + K, B)
    return out, quad[:m].sum(0)[None] + quad[m:]


def _multistep_flow(sde: SDE, score: CountedScore, x: Tensor, eps: float, steps: int, opts: _LikelihoodOptions,
                    trace: Callable, control: Callable | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """x_T, ∫ ∇·f̃ dt + the coordinate change, and an error estimate per point, by the multistep integral form run
    from eps to T (docs/math.md §6.1).

    In the solver's coordinate z = x/κ the PF-ODE is dz/dv = c(v)·y(x) with y = x̂_0, ε̂ or F (see
    ``_ExponentialState.flow_coordinate``), so log p_x(x_eps) = log p_x(x_T) + D log(κ_T/κ_eps) + ∫ c κ ∇_x·y dv.
    x steps as in sampling (predictor, evaluation, corrector); the divergence, measured at each evaluation
    alongside y, is integrated by the polynomial through the step's start, the new point and the previous
    ``order − 1`` points. ``steps`` steps cost steps + 1 evaluations, one at each grid time. ``control``: the
    score of a linear model, whose y's Jacobian is handed to ``trace`` as its control variate.

    The error estimate (B,) is Σ over steps of |that increment − the increment one order lower through the same
    new point| (the oldest node dropped; for order 1 the left rectangle): no extra evaluation. Its value tracks the
    real error of the few points whose divergence jumps within a step (a mode boundary crossed), where it is of
    the order of the error itself; elsewhere it is 10–100× larger than the error (benchmarks/results/likelihood.md).
    """
    end = step_at_t(opts.end_step, score, steps, END_STEP_FROM, opts.grid)
    ts = _likelihood_times(opts, sde, eps, steps, score.sigma_data, end)
    orders = step_orders(len(ts) - 1, opts.order, lower_order_final=False, few_step_orders=True)
    state = _ExponentialState(sde, score, x, opts.variable, score.sigma_data, history=max(orders))
    linear = None
    if control is not None:
        linear = _ExponentialState(sde, CountedScore(control, sigma_data=score.sigma_data), x[:1], opts.variable,
                                   score.sigma_data)

    def evaluate(y: Tensor, t: float) -> tuple[Tensor, float, Tensor]:
        alpha, std, lam = state.coefficients(t)
        kappa, c = state.flow_coordinate(t)
        with torch.enable_grad():
            m = None if linear is None else _control_matrix(lambda u: linear.value(u, t, alpha, std), y)
            value, div = trace(lambda u: state.value(u, t, alpha, std), y, m)
        return value.detach(), state.node(alpha, std, lam), (c * kappa) * div.detach()

    value, node, div = evaluate(x, ts[0])
    nodes, values, divs = [node], [value], [div]
    delta = torch.zeros_like(div)
    error = torch.zeros_like(div[0])
    # per point, how many of the remembered nodes lie after its last jump (all of them until one is met)
    age = torch.ones_like(error, dtype=torch.long)
    for i, order in enumerate(orders):
        own = age.clamp(max=order)                                            # (B,) each point's order on this step
        own_x = own.reshape(-1, *[1] * (x.dim() - 1))
        x_pred = _per_point(own_x, order, lambda k: state.step(x, ts[i], ts[i + 1], nodes[:k], values[:k]))
        value, new_node, div = evaluate(x_pred, ts[i + 1])
        x_corr = _per_point(own_x, order,
                            lambda k: state.correct(x, ts[i], ts[i + 1], nodes, values, new_node, value, k))
        # the predictor–corrector gap in the unit-scale coordinate z = x/κ: probe-independent, so the path is too
        shift = ((x_corr - x_pred) / state.flow_coordinate(ts[i + 1])[0]).flatten(1).pow(2).mean(1).sqrt()
        x = x_corr if opts.corrector else x_pred
        # The divergence does not feed back into x: its integral always takes the new point too.
        fit_nodes, fit_divs = [nodes[0], new_node, *nodes[1:order]], [divs[0], div, *divs[1:order]]
        increment = _per_point(own, order, lambda k: _integral(fit_nodes[:k + 1], fit_divs[:k + 1], new_node))
        lower = _per_point(own, order, lambda k: _integral(fit_nodes[:k], fit_divs[:k], new_node))
        delta = delta + increment
        error = error + (increment - lower).mean(0).abs()
        if opts.restart is not None:
            age = torch.where(shift > opts.restart, torch.ones_like(age), age + 1)
        else:
            age = age + 1
        nodes, values = state.remember(nodes, values, new_node, value)
        divs = [div, *divs][:state.history]
    kappa_eps, kappa_T = state.flow_coordinate(ts[0])[0], state.flow_coordinate(ts[-1])[0]
    return x, delta + x[0].numel() * math.log(kappa_T / kappa_eps), error


def _per_point(own: Tensor, order: int, result: Callable[[int], Tensor]) -> Tensor:
    """result(k) for each point's own order k = own[b] ≤ order, with no host sync: every order is computed and
    selected by mask (a few vector sums, cheap next to the evaluation). ``own`` is (B,) shaped to broadcast
    against the results: (B, 1, ..) for states, (B,) for the (K, B) increments."""
    out = result(order)
    for k in range(1, order):
        out = torch.where(own == k, result(k), out)
    return out


def _integral(nodes: list[float], values: list[Tensor], target: float) -> Tensor:
    """∫ from nodes[0] to ``target`` of the polynomial through (nodes, values)."""
    return sum(w * v for w, v in zip(integral_weights(nodes, target), values))


def log_likelihood(sde: SDE, score_fn: ScoreFn, x: Tensor, eps: float = 1e-5, rtol: float = 1e-5, atol: float = 1e-5,
                   divergence: Literal["exact", "hutchinson"] = "exact", cond: dict | None = None,
                   **options) -> LikelihoodResult:
    """Per-sample log-likelihood of x under the model's probability-flow ODE.

    Args:
        sde: the forward SDE the score belongs to.
        score_fn: ``score_fn(x, t, **cond)``; must be differentiable in x (torch.func.vjp is applied). The
            result is not differentiable with respect to the model's parameters.
        x: (B, ...) data. For discrete data pass them dequantised (uniform noise within each bin)
            and give ``levels`` (and ``data_range``) so that bpd includes the offset log₂(K/w).
        eps: the time the data sit at; the ODE runs from eps to T.
        rtol, atol: tolerances of adaptive methods.
        divergence: "exact" (D VJPs; right for small D) or "hutchinson" (``probes`` VJPs).
        cond: conditioning inputs passed to every score call (None: none).
        **options: method (a torchdiffeq method, or "multistep": the exponential integrator of
            ``solver="multistep"`` with a fixed budget of steps + 1 evaluations), steps, grid options
            (``solvers.grids.GridOptions``; grid None: the likelihood's own), order, variable, corrector,
            restart (the per-point order restart's threshold; None: off), refine (re-solve the points whose
            error estimate exceeds this many nats; exact divergence only), refine_steps (multistep), probes,
            probe ("rademacher" | "gaussian"), control_covariance (the data's (D, D) covariance: a control
            variate for Hutchinson in multistep), sketch (Hutch++'s rank), seed, index_offset (x's first row's
            global index, for a batch split across processes), levels, data_range, chunk, error_norm ("sample":
            rtol/atol hold for every sample; "batch"), progress (a bar over t on stderr).

    Returns:
        :class:`LikelihoodResult`: ``.logp`` in nats per sample, ``.bpd``, ``.z``, ``.nfe``; for multistep also
        ``.logp_error`` and ``.nfe_per_point``.
    """
    opts = build_options(_LikelihoodOptions, options, "log_likelihood", SolverError)
    if divergence not in ("exact", "hutchinson"):
        raise SolverError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}.")
    if not torch.is_tensor(x) or x.dim() < 2 or not x.is_floating_point():
        raise SolverError("x must be a floating-point tensor of shape (B, ...), e.g. (1000, 2).")
    check_finite(x, "the data passed to log_likelihood")
    control = None
    if opts.control_covariance is not None:
        d = x[0].numel()
        c = opts.control_covariance
        if divergence != "hutchinson" or opts.method != MULTISTEP or opts.sketch:
            raise SolverError("control_covariance is a control variate of Hutchinson's estimate in method='multistep': "
                              "use it with divergence='hutchinson', method='multistep' and sketch=0, or drop it.")
        if (c.shape != (d, d) or not torch.isfinite(c).all() or not torch.allclose(c, c.T)
                or torch.linalg.eigvalsh(c.double()).min() < -1e-9 * c.abs().max()):
            raise SolverError(f"control_covariance must be a finite symmetric positive semi-definite ({d}, {d}) matrix "
                              f"(the data's covariance, e.g. torch.cov(train.flatten(1).T)), "
                              f"got shape {tuple(c.shape)}.")
        control = _gaussian_score(sde, c.to(device=x.device, dtype=torch.float64))
    if divergence == "hutchinson" and opts.refine is not None:
        raise SolverError("refine needs divergence='exact': with Hutchinson probes the choice of the points to re-solve "
                          "would depend on the probes and bias log p. Drop refine, or use the exact divergence.")
    if divergence == "exact" and opts.sketch:
        raise SolverError(f"sketch={opts.sketch} is Hutch++'s, a variant of divergence='hutchinson'; the exact "
                          "divergence has no sketch: drop it, or set divergence='hutchinson'.")
    if divergence == "hutchinson" and opts.sketch >= x[0].numel():
        raise SolverError(f"sketch={opts.sketch} must be below the dimension D = {x[0].numel()} (at D VJPs the exact "
                          "divergence costs less): lower sketch, or use divergence='exact'.")
    if not 0 < eps < sde.T:
        raise SolverError(f"eps must be in (0, T={sde.T}), got {eps!r}.")
    if rtol <= 0 or atol <= 0:
        raise SolverError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}.")
    bar = TimeProgress(eps, sde.T, f"likelihood ({divergence})") if opts.progress else None
    score = CountedScore(score_fn, progress=bar, cond=cond)

    v = sketch = None
    if divergence == "hutchinson":
        seed = opts.seed if opts.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        # indexed by sample, so that a batch split across processes (index_offset) gets the same probes
        noise = NoiseSource(seed, opts.index_offset)
        v = noise.normal((x.shape[0], opts.probes, *x.shape[1:]), x.dtype, x.device)
        v = v.transpose(0, 1).contiguous()                                    # (K, B, ...)
        if opts.probe == "rademacher":
            v = torch.sign(v)
        if opts.sketch > 0:
            sketch = noise.normal((x.shape[0], opts.sketch, *x.shape[1:]), x.dtype, x.device).transpose(0, 1)
    n_est = 1 if v is None else opts.probes

    def trace_with(rows: Tensor | None) -> Callable:
        """The divergence of f at y for the points ``rows`` of x (None: all): exact, Hutchinson's or Hutch++."""
        if v is None:
            return lambda f, y, m=None: _divergence_exact(f, y, opts.chunk)
        probes = v if rows is None else v[:, rows]
        if sketch is None:
            return lambda f, y, m=None: _divergence_hutchinson(f, y, probes, m)
        s = sketch if rows is None else sketch[:, rows]
        return lambda f, y, m=None: _divergence_hutchpp(f, y, s, probes)

    start = time.perf_counter()
    error = nfe_per_point = None
    try:
        if opts.method == MULTISTEP:
            steps = opts.steps or len(opts.times) - 1
            z, delta, error = _multistep_flow(sde, score, x, eps, steps, opts, trace_with(None), control)
            nfe_per_point = torch.full((x.shape[0],), steps + 1, dtype=torch.long, device=x.device)
            if opts.refine is not None:
                # One host sync per solve (not per step): which points to solve again, on a finer grid.
                flagged = (error > opts.refine).nonzero().squeeze(1)
                if len(flagged) > 0:
                    steps = opts.refine_steps or REFINE_FACTOR * steps
                    z_f, delta_f, error_f = _multistep_flow(sde, score, x[flagged], eps, steps, opts,
                                                            trace_with(flagged), control)
                    z, delta = z.index_copy(0, flagged, z_f), delta.index_copy(1, flagged, delta_f)
                    error = error.index_copy(0, flagged, error_f)
                    nfe_per_point[flagged] += steps + 1
        else:
            trace = trace_with(None)
            drift = pf_ode_drift(sde, score)
            ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)

            def state_derivative(t, state):
                with torch.enable_grad():
                    out, div = trace(lambda y: drift(y, t * ones), state[0])
                # Detached: a model whose parameters require grad would otherwise chain every step's graph
                # onto the next (4 GB after 20 NFE for a 3×256 MLP on 1000 points).
                return out.detach(), div.detach()

            grid = None
            if opts.grid is not None:
                grid = solve_times(opts, sde, eps, opts.steps, opts.steps, score.sigma_data).flip(0)
            z, delta = odeint_between(state_derivative, (x, x.new_zeros(n_est, x.shape[0])), eps, sde.T,
                                      opts.method, rtol, atol, opts.steps, opts.error_norm, grid=grid)
    finally:
        if bar is not None:
            bar.close()
    logp_probes = sde.prior_logp(z)[None] + delta
    check_finite(logp_probes, "the log-likelihood")
    logp = logp_probes.mean(0)
    stderr = (logp_probes.std(0) / math.sqrt(n_est)) if n_est > 1 else torch.zeros_like(logp)
    bpd = bits_per_dim(logp, x[0].numel(), opts.levels, opts.data_range)
    return LikelihoodResult(logp=logp, bpd=bpd, z=z, nfe=score.nfe, logp_stderr=stderr, logp_probes=logp_probes,
                            seconds=time.perf_counter() - start, logp_error=error, nfe_per_point=nfe_per_point)
