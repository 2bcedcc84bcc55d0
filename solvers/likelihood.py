"""Exact likelihood through the probability-flow ODE (docs/math.md §6).

The ODE is integrated forward from eps to T together with the divergence of its drift:
``log p_eps(x) = log p_T(x_T) + ∫_eps^T ∇·f̃(x_t, t) dt``, with the prior N(0, prior_std² I)
standing in for p_T. The divergence is exact (D vector–Jacobian products, vectorised with
torch.func) or the Hutchinson–Skilling estimate with K probes held fixed along the path, which
gives K estimates of log p from one trajectory and so a standard error.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Literal, Optional

import torch
from torch.func import vjp, vmap

from core_lib import build_options
from sde_lib import SDE
from solvers.base import CountedScore, ScoreFn, SolverError, TimeProgress, check_finite
from solvers.exponential import ORDERS, _ExponentialState, integral_weights, step_orders
from solvers.grids import GridKind, GridOptions, solve_times
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
    """

    logp: Tensor
    bpd: Tensor
    z: Tensor
    nfe: int
    logp_stderr: Tensor
    logp_probes: Tensor
    seconds: float


#: ``method="multistep"``: the ODE's own integral form (solvers/exponential.py) with the divergence on the same nodes
MULTISTEP = "multistep"


@dataclasses.dataclass
class _LikelihoodOptions(GridOptions):
    method: str = "dopri5"          # torchdiffeq method (adaptive, or fixed-grid with steps), or "multistep"
    steps: int | None = None        # step count for fixed-grid methods and multistep (NFE known in advance)
    grid: Optional[GridKind] = None  # fixed-grid methods and multistep: the time grid; null: multistep's focus, else uniform t
    order: int = 3                  # multistep: polynomial order (ramped up 1, 2, .. and capped at few steps)
    variable: Literal["log_snr", "sigma", "angle"] = "angle"  # multistep: x̂_0 in λ, ε̂ in σ or F in the angle
    corrector: bool = True          # multistep: re-fit through each new point (no extra NFE)
    probes: int = 1                 # Hutchinson probes K (divergence="hutchinson")
    probe: Literal["rademacher", "gaussian"] = "rademacher"
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
            if self.steps is None:
                raise SolverError("method 'multistep' takes a fixed budget: give steps (NFE = steps + 1).")
            if self.order not in ORDERS:
                raise SolverError(f"order must be one of {ORDERS}, got {self.order}.")
        else:
            check_method(self.method, self.steps)
        if self.grid is not None and self.method in ADAPTIVE_METHODS:
            raise SolverError(f"grid={self.grid!r} needs a fixed budget (multistep or {', '.join(FIXED_METHODS)}); "
                              f"the adaptive {self.method!r} chooses its own steps.")
        GridOptions.validate(self)
        if self.method in FIXED_METHODS and self.steps is None:
            raise SolverError(f"method {self.method!r} is fixed-grid: give steps (the NFE is then known in advance), "
                              f"or use an adaptive method ({', '.join(ADAPTIVE_METHODS)}).")
        if self.probes < 1:
            raise SolverError(f"probes must be >= 1, got {self.probes}.")
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


def _divergence_hutchinson(drift_t: Callable[[Tensor], Tensor], x: Tensor, v: Tensor):
    """f(x) and K Hutchinson estimates vᵀ (∂f/∂x) v, shape (K, B), one VJP per probe."""
    out, pullback = vjp(drift_t, x)
    vjps = vmap(pullback)(v)[0]
    return out, (vjps * v).flatten(2).sum(-1)


def _multistep_flow(sde: SDE, score: CountedScore, x: Tensor, eps: float, opts: _LikelihoodOptions,
                    trace: Callable) -> tuple[Tensor, Tensor]:
    """x_T and ∫ ∇·f̃ dt + the coordinate change, by the multistep integral form run from eps to T (docs/math.md §6.1).

    In the solver's coordinate z = x/κ the PF-ODE is dz/dv = c(v)·y(x) with y = x̂_0, ε̂ or F (see
    ``_ExponentialState.flow_coordinate``), so log p_x(x_eps) = log p_x(x_T) + D log(κ_T/κ_eps) + ∫ c κ ∇_x·y dv.
    x steps as in sampling (predictor, evaluation, corrector); the divergence, measured at each evaluation
    alongside y, is integrated by the polynomial through the step's start, the new point and the previous
    ``order − 1`` points. ``steps`` steps cost steps + 1 evaluations, one at each grid time.
    """
    grid = dataclasses.replace(opts, grid=opts.grid or "focus")
    ts = solve_times(grid, sde, eps, opts.steps, opts.steps, score.sigma_data).flip(0).tolist()
    orders = step_orders(len(ts) - 1, opts.order, lower_order_final=False, few_step_orders=True)
    state = _ExponentialState(sde, score, x, opts.variable, score.sigma_data, history=max(orders))

    def evaluate(y: Tensor, t: float) -> tuple[Tensor, float, Tensor]:
        alpha, std, lam = state.coefficients(t)
        kappa, c = state.flow_coordinate(t)
        with torch.enable_grad():
            value, div = trace(lambda u: state.value(u, t, alpha, std), y)
        return value.detach(), state.node(alpha, std, lam), (c * kappa) * div.detach()

    value, node, div = evaluate(x, ts[0])
    nodes, values, divs = [node], [value], [div]
    delta = torch.zeros_like(div)
    for i, order in enumerate(orders):
        x_pred = state.step(x, ts[i], ts[i + 1], nodes[:order], values[:order])
        value, new_node, div = evaluate(x_pred, ts[i + 1])
        x = state.correct(x, ts[i], ts[i + 1], nodes, values, new_node, value, order) if opts.corrector else x_pred
        # The divergence does not feed back into x: its integral always takes the new point too.
        w = integral_weights([nodes[0], new_node, *nodes[1:order]], new_node)
        for wk, dk in zip(w, [divs[0], div, *divs[1:order]]):
            delta = delta + wk * dk
        nodes, values = state.remember(nodes, values, new_node, value)
        divs = [div, *divs][:state.history]
    kappa_eps, kappa_T = state.flow_coordinate(ts[0])[0], state.flow_coordinate(ts[-1])[0]
    return x, delta + x[0].numel() * math.log(kappa_T / kappa_eps)


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
            (``solvers.grids.GridOptions``), order, variable, corrector (multistep), probes, probe
            ("rademacher" | "gaussian"), seed, index_offset (x's first row's global index, for a batch split
            across processes), levels, data_range, chunk, error_norm ("sample": rtol/atol
            hold for every sample; "batch"), progress (a bar over t on stderr).

    Returns:
        :class:`LikelihoodResult`: ``.logp`` in nats per sample, ``.bpd``, ``.z``, ``.nfe``.
    """
    opts = build_options(_LikelihoodOptions, options, "log_likelihood", SolverError)
    if divergence not in ("exact", "hutchinson"):
        raise SolverError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}.")
    if not torch.is_tensor(x) or x.dim() < 2 or not x.is_floating_point():
        raise SolverError("x must be a floating-point tensor of shape (B, ...), e.g. (1000, 2).")
    check_finite(x, "the data passed to log_likelihood")
    if not 0 < eps < sde.T:
        raise SolverError(f"eps must be in (0, T={sde.T}), got {eps!r}.")
    if rtol <= 0 or atol <= 0:
        raise SolverError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}.")
    bar = TimeProgress(eps, sde.T, f"likelihood ({divergence})") if opts.progress else None
    score = CountedScore(score_fn, progress=bar, cond=cond)

    if divergence == "exact":
        def trace(f: Callable[[Tensor], Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
            return _divergence_exact(f, y, opts.chunk)
        n_est = 1
    else:
        seed = opts.seed if opts.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        # indexed by sample, so that a batch split across processes (index_offset) gets the same probes
        v = NoiseSource(seed, opts.index_offset).normal((x.shape[0], opts.probes, *x.shape[1:]), x.dtype, x.device)
        v = v.transpose(0, 1).contiguous()                                    # (K, B, ...)
        if opts.probe == "rademacher":
            v = torch.sign(v)

        def trace(f: Callable[[Tensor], Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
            return _divergence_hutchinson(f, y, v)
        n_est = opts.probes

    start = time.perf_counter()
    try:
        if opts.method == MULTISTEP:
            z, delta = _multistep_flow(sde, score, x, eps, opts, trace)
        else:
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
    return LikelihoodResult(logp=logp, bpd=bpd, z=z, nfe=score.nfe, logp_stderr=stderr,
                            logp_probes=logp_probes, seconds=time.perf_counter() - start)
