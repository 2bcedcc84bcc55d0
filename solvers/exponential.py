"""Fast PF-ODE samplers: exponential-integrator multistep methods (DDIM is order 1) and EDM's Heun.

For any of the linear SDEs, x_t = α(t) x_0 + s(t) ε, the PF-ODE has exact integral forms (docs/math.md §4.4–§4.5;
Lu et al. 2022a/b, Karras et al. 2022). With σ = s/α and λ = log(α/s) = −log σ,

    data prediction, in λ:   x_t = (s_t/s_u) x_u + α_t ∫_{λ_u}^{λ_t} e^{λ−λ_t} x̂_0(λ) dλ,
    noise prediction, in σ:  x_t/α_t = x_u/α_u + ∫_{σ_u}^{σ_t} ε̂(σ) dσ,
    EDM's F, in the angle u = arctan(σ/σ_data):  y_t = y_u − ∫_{u_u}^{u_t} F du,  y = x/(α √(σ² + σ_data²)),

with x̂_0 = (x + s² s_θ)/α, ε̂ = −s s_θ and F = (x̂_0 − c_skip x/α)/c_out EDM's preconditioned
output (F = 0 for zero-mean Gaussian data of std σ_data, where the last form is exact). A multistep method
of order k replaces the integrand by the polynomial through its last k values and integrates that
exactly: in λ the polynomial-exact form of DPM-Solver++(kM), in σ an Adams–Bashforth rule on EDM's
ODE dx̃/dσ = ε̂ (DEIS's ρAB). Order 1 in λ or σ is DDIM. A corrector re-fits the polynomial
through the value at the new point as well and redoes the step (an exponential Adams–Moulton step,
as in UniPC's corrector); it costs no score evaluation, since the next step needs that value
anyway. The adaptive variant chooses steps in λ from the predictor–corrector difference (Milne's
estimate).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import numpy
import torch

from core_lib import finite_positive
from sde_lib import SDE
from solvers.base import CountedScore, NonFiniteError, Solver, SolverError, register
from solvers.grids import (MANY_STEPS, GridKind, GridOptions, by_budget, half_log_snr_at, solve_times,
                           with_start_step)
from solvers.noise import NoiseSource

Tensor = torch.Tensor

__all__ = ["DDIM", "Multistep", "Heun", "AdaptiveMultistep", "step_orders", "integral_weights"]

ORDERS = (1, 2, 3, 4)
#: (most steps, highest order): over few long steps a high-order polynomial extrapolates a network's
#: irregularities (its x̂₀ is far rougher in λ than an exact score's) instead of the flow; measured on
#: the shipped networks, order 4 at 8 steps is 10× worse than order 2 (benchmarks/results/peers_log.md).
FEW_STEP_ORDERS = ((6, 2), (10, 3))
#: the multistep fit's defaults by budget, (fewest steps, settings), the last row that applies; its last row starts
#: where the grid's does (MANY_STEPS). Below it the polynomial is fitted in λ (``lambda_nodes``) and each step's
#: weights' gain Σ|w| / |Σ w| is bounded (``max_gain``): over few long steps on a trained network a fit that
#: extrapolates with large alternating weights amplifies the network's roughness in λ
#: (benchmarks/results/peers_log.md §6).
FIT_BY_STEPS = ((1, {"lambda_nodes": True, "max_gain": 2.5}),
                (20, {"lambda_nodes": True, "max_gain": 4.0}),
                (MANY_STEPS, {"lambda_nodes": False, "max_gain": math.inf}))
#: a network that predicts the noise (CountedScore.predicts_noise) gets a start step from START_STEP_FROM steps on
#: (docs/math.md §4.3): the budget's grid for one step fewer with its first step split at START_STEP of its length
#: in λ, the value at T then dropped from the fit (the order ramps up again). Below 10 steps the step it takes
#: from the rest weighs more (benchmarks/results/peers_log.md §14).
START_STEP = 0.25
START_STEP_FROM = 10


def check_step_at_t(name: str, value, grid, which: str) -> None:
    """Refuse a ``start_step``-like option ``name`` (the sampler's, the likelihood's ``end_step``) that is not a
    fraction in [0, 1) or None, or that would split a user grid's ``which`` step."""
    if value is not None and not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise SolverError(f"{name} must be a fraction in [0, 1) (0: no {name.replace('_', ' ')}) or None, "
                          f"got {value!r}.")
    if value and grid == "user":
        raise SolverError(f"{name} splits the grid's {which} step; with grid='user' put that time in times instead.")


def step_at_t(option: float | None, score: CountedScore, steps: int, since: int, grid) -> float:
    """The fraction at which a solve of ``steps`` steps splits its step at T (0: none): ``option`` when given, else
    START_STEP for a model that predicts the noise from ``since`` steps on, on a grid of our own."""
    if option is not None:
        return option
    return START_STEP if score.predicts_noise and steps >= since and grid != "user" else 0.0


def _phi_integrals(h: float, n: int) -> list[float]:
    """I_j = ∫_0^h e^{u−h} u^j du for j < n: I_0 = 1 − e^{−h}, I_j = h^j − j I_{j−1}."""
    out = [-math.expm1(-h)]
    for j in range(1, n):
        out.append(h**j - j * out[-1])
    return out


def integral_weights(nodes: list[float], target: float) -> list[float]:
    """Weights w_k with Σ_k w_k y_k the integral from nodes[0] to ``target`` of the polynomial through (nodes, y)."""
    return _step_weights(nodes, target, "plain")


def step_orders(steps: int, order: int, lower_order_final: bool, few_step_orders: bool) -> list[int]:
    """The polynomial order of each step of a ``steps``-step multistep solve: ramped up 1, 2, .. from the first step,
    capped by FEW_STEP_ORDERS at few steps, and ≤ 2 on the last step of a short solve (< 15 steps)."""
    top = order
    if few_step_orders:
        top = min([top] + [cap for most, cap in FEW_STEP_ORDERS if steps <= most])
    orders = [min(top, i + 1) for i in range(steps)]
    if lower_order_final and steps < 15:
        orders[-1] = min(orders[-1], 2)
    return orders


def _step_weights(nodes: list[float], target: float, variable: str) -> list[float]:
    """Weights w_k of the values at ``nodes`` (in λ or σ; nodes[0] is the step's start u) such that
    the polynomial through them, integrated from u to ``target``, is Σ_k w_k y_k (before the α_t factor).

    The polynomial is Σ_j c_j (v − u)^j with c = V⁻¹ y, V_kj = (nodes_k − u)^j; its integral is
    Σ_j c_j I_j with I_j the exponential (λ) or plain (σ) moments of the step.
    """
    return _solve_weights(nodes, _moments(target - nodes[0], len(nodes), variable))


def _moments(h: float, n: int, variable: str) -> list[float]:
    """I_j, j < n, of a step of length h: exponential in λ (``_phi_integrals``), else ∫_0^h v^j dv."""
    if variable == "log_snr":
        return _phi_integrals(h, n)
    return [h ** (j + 1) / (j + 1) for j in range(n)]


def _solve_weights(nodes: list[float], moments) -> list[float]:
    """w = V⁻ᵀ I, the weights of y in Σ_j I_j (V⁻¹ y)_j, with V_kj = (nodes_k − nodes_0)^j."""
    u, n = nodes[0], len(nodes)
    V = torch.tensor([[(v - u) ** j for j in range(n)] for v in nodes], dtype=torch.float64)
    return torch.linalg.solve(V.T, torch.as_tensor(moments, dtype=torch.float64)).tolist()


#: Gauss–Legendre nodes and weights on [−1, 1] for the moments of a step whose polynomial is in λ but whose
#: integral is in σ or the angle (smooth integrands over at most a few units of λ: exact to float64)
_GAUSS = [torch.tensor(a, dtype=torch.float64) for a in numpy.polynomial.legendre.leggauss(32)]


def _lambda_node_moments(lam_u: float, lam_t: float, n: int, variable: str, sigma_data: float) -> list[float]:
    """Moments M_j = ∫_{λ_u}^{λ_t} (λ − λ_u)^j (dv/dλ) dλ of a polynomial in λ integrated in v (σ or the angle)."""
    h = lam_t - lam_u
    x, w = _GAUSS
    lam_off = (x + 1) * (h / 2)
    sigma = torch.exp(-(lam_u + lam_off))
    if variable == "sigma":
        dv = -sigma                                                     # σ = e^{−λ}
    else:
        dv = -sigma * sigma_data / (sigma_data**2 + sigma**2)           # u = arctan(σ/σ_data)
    return [float((w * lam_off**j * dv).sum() * (h / 2)) for j in range(n)]


class _ExponentialState:
    """The bookkeeping of one solve: which value is fitted (x̂_0, ε̂ or F) in which variable (λ, σ or the angle)."""

    def __init__(self, sde: SDE, score: CountedScore, x: Tensor, variable: str, sigma_data: float = 1.0,
                 history: int = 1, lambda_nodes: bool = False, max_gain: float = math.inf):
        self.sde = sde
        #: fit the polynomial in λ whatever the variable it is integrated in (stable over steps of similar
        #: length in λ; in the angle, steps uniform in λ shrink ~e^{−λ} at high noise and a fit there extrapolates)
        self.lambda_nodes = lambda_nodes or variable == "log_snr"
        #: each step drops its oldest values until its weights' gain Σ|w| / |Σ w| is at most this (inf: no bound)
        self.max_gain = max_gain
        #: how many past values the solve keeps: an order-k predictor fits through k, its corrector through these and the new one
        self.history = history
        self.score = score
        self.variable = variable
        self.sigma_data = sigma_data
        self.ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)

    def coefficients(self, t: float) -> tuple[float, float, float]:
        """α(t), s(t) and λ(t) as Python floats (the solvers' scalar bookkeeping)."""
        tt = torch.tensor(t, dtype=torch.float64)
        alpha = float(self.sde.log_mean_coeff(tt).exp())
        std = float(self.sde.marginal_std(tt))
        return alpha, std, math.log(alpha / std)

    def node(self, alpha: float, std: float, lam: float) -> float:
        if self.lambda_nodes:
            return lam
        if self.variable == "sigma":
            return std / alpha
        return math.atan2(std / alpha, self.sigma_data)

    def evaluate(self, x: Tensor, t: float) -> tuple[Tensor, float]:
        """The value the polynomial is fitted to at (x, t), and its node."""
        alpha, std, lam = self.coefficients(t)
        return self.value(x, t, alpha, std), self.node(alpha, std, lam)

    def value(self, x: Tensor, t: float, alpha: float, std: float) -> Tensor:
        """x̂_0, ε̂ or F at (x, t) from one score evaluation (a function of x alone, for the likelihood's Jacobian)."""
        s = self.score(x, t * self.ones)
        if self.variable == "log_snr":
            value = (x + std**2 * s) / alpha
        elif self.variable == "sigma":
            value = -std * s
        else:  # F = (x̂_0 − c_skip x̃)/c_out, EDM's network output
            sigma, sd = std / alpha, self.sigma_data
            x0 = (x + std**2 * s) / alpha
            value = (x0 - (sd**2 / (sigma**2 + sd**2)) * (x / alpha)) * (math.sqrt(sigma**2 + sd**2) / (sigma * sd))
        return value

    def flow_coordinate(self, t: float) -> tuple[float, float]:
        """(κ, c) with z = x/κ the coordinate the integral form is an ODE in, dz/dv = c(v)·value, and
        ∇_z·(dz/dv) = c κ ∇_x·value: κ = s, c κ = α in λ; κ = α, c = 1 in σ; κ = α√(σ² + σ_d²), c = −1 in the angle."""
        alpha, std, lam = self.coefficients(t)
        if self.variable == "log_snr":
            return std, math.exp(lam)
        if self.variable == "sigma":
            return alpha, 1.0
        return alpha * math.hypot(std / alpha, self.sigma_data), -1.0

    def step(self, x: Tensor, t_from: float, t_to: float, nodes: list[float], values: list[Tensor]) -> Tensor:
        """The exact flow from t_from to t_to of the polynomial through (nodes, values); nodes[0] is t_from's."""
        a_u, s_u, lam_u = self.coefficients(t_from)
        a_t, s_t, lam_t = self.coefficients(t_to)
        moments = self.moments(lam_u, nodes[0], self.node(a_t, s_t, lam_t), len(nodes))
        w = _solve_weights(nodes, moments)
        while len(w) > 1 and sum(map(abs, w)) > self.max_gain * abs(sum(w)):
            nodes, values = nodes[:-1], values[:-1]
            w = _solve_weights(nodes, moments[:len(nodes)])      # the moments do not depend on the nodes
        if self.variable == "log_snr":
            ratio, scale = s_t / s_u, a_t
        elif self.variable == "sigma":
            ratio, scale = a_t / a_u, a_t
        else:  # y = x̃/√(σ² + σ_d²) obeys dy/du = −F
            c_u = math.hypot(s_u / a_u, self.sigma_data)
            c_t = math.hypot(s_t / a_t, self.sigma_data)
            ratio, scale = (a_t * c_t) / (a_u * c_u), -a_t * c_t
        x_new = ratio * x
        for wk, yk in zip(w, values):
            x_new = x_new + (scale * wk) * yk
        return x_new

    def moments(self, lam_u: float, start: float, target: float, n: int) -> list[float]:
        """The step's first n moments (see ``_step_weights``) from the node ``start`` (at λ_u) to ``target``."""
        if self.lambda_nodes and self.variable != "log_snr":
            return _lambda_node_moments(lam_u, target, n, self.variable, self.sigma_data)
        return _moments(target - start, n, self.variable)

    def correct(self, x: Tensor, t_from: float, t_to: float, nodes: list[float], values: list[Tensor],
                node: float, value: Tensor, order: int) -> Tensor:
        """The Adams–Moulton step: the step from t_from redone through the new (node, value) and the last ``order``."""
        return self.step(x, t_from, t_to, [nodes[0], node, *nodes[1:order]], [values[0], value, *values[1:order]])

    def remember(self, nodes: list[float], values: list[Tensor], node: float,
                 value: Tensor) -> tuple[list[float], list[Tensor]]:
        """The history with (node, value) as its newest entry."""
        return [node, *nodes][:self.history], [value, *values][:self.history]


@dataclasses.dataclass
class _MultistepOptions(GridOptions):
    order: int = 4                     # polynomial order k (1 = DDIM); the first steps ramp up 1, 2, ..
    variable: Literal["log_snr", "sigma", "angle"] = "angle"   # x̂_0 in λ (DPM-Solver++), ε̂ in σ (Adams–Bashforth), F in arctan(σ/σ_data)
    corrector: bool = True             # re-fit through the new point and redo the step (no extra NFE)
    lower_order_final: bool = True     # order ≤ 2 on the last step when steps < 15 (the step nearest the data is the stiffest)
    few_step_orders: bool = True       # cap the order at 2 for ≤ 6 steps and at 3 for ≤ 10 (see FEW_STEP_ORDERS)
    lambda_nodes: Optional[bool] = None   # fit the polynomial in λ, whatever the variable; None: below 40 steps (FIT_BY_STEPS)
    max_gain: Optional[float] = None   # lower a step's order until Σ|w| ≤ max_gain·|Σ w|; None: 2.5 below 20 steps, 4 below 40, else none (inf)
    start_step: Optional[float] = None   # a first step this fraction of the grid's first in λ, its value at T then
                                         # dropped from the fit (0: none); None: 0.25 from 10 steps for a model that
                                         # predicts the noise (START_STEP), else 0

    def validate(self):
        if self.order not in ORDERS:
            raise SolverError(f"order must be one of {ORDERS}, got {self.order}.")
        check_step_at_t("start_step", self.start_step, self.grid, "first")
        if self.max_gain is not None and not self.max_gain >= 1:
            raise SolverError(f"max_gain must be a number ≥ 1 (inf: no bound; null: the default), got {self.max_gain}.")
        super().validate()


@register
class Multistep(Solver):
    """Exponential-integrator multistep PF-ODE solver of order 1–4, one score evaluation per step."""

    name = "multistep"
    label = "PF-ODE, multistep exponential integrator (order 4 + corrector)"
    deterministic = True
    takes_constraint = True   # the predicted state is passed through score.after_step before the model sees it
    Options = _MultistepOptions
    default_step_count = 20

    def likelihood_options(self, steps: int | None) -> dict | None:
        # The same integrator and order on the likelihood's ODE, over the likelihood's own grid (solvers/likelihood.py).
        o = self.options
        return {"method": "multistep", "steps": steps or self.default_step_count, "order": o.order,
                "variable": o.variable, "corrector": o.corrector}

    def run(self, sde: SDE, score: CountedScore, x: Tensor, eps: float, steps: int | None,
            noise: NoiseSource) -> Tensor:
        o = self.options
        n = steps or self.default_step_count
        start = self.start_fraction(score, n)
        ts = solve_times(o, sde, eps, n - 1 if start else steps, self.default_step_count, score.sigma_data, x[0].numel())
        if start:
            ts = with_start_step(sde, ts, start)
        ts = ts.tolist()
        n = len(ts) - 1
        # after a start step the fit starts afresh: the order ramps up again from its end
        orders = ([1] + step_orders(n - 1, o.order, o.lower_order_final, o.few_step_orders) if start
                  else step_orders(n, o.order, o.lower_order_final, o.few_step_orders))
        fit = by_budget(FIT_BY_STEPS, n)
        lambda_nodes = o.lambda_nodes if o.lambda_nodes is not None else fit["lambda_nodes"]
        max_gain = o.max_gain if o.max_gain is not None else fit["max_gain"]
        state = _ExponentialState(sde, score, x, o.variable, score.sigma_data, history=max(orders),
                                  lambda_nodes=lambda_nodes, max_gain=max_gain)
        value, node = state.evaluate(x, ts[0])
        nodes, values = [node], [value]
        for i, order in enumerate(orders):
            x_pred = score.after_step(state.step(x, ts[i], ts[i + 1], nodes[:order], values[:order]),
                                      ts[i + 1] * state.ones, noise)
            if i == n - 1:
                return x_pred
            value, node = state.evaluate(x_pred, ts[i + 1])
            x = state.correct(x, ts[i], ts[i + 1], nodes, values, node, value, order) if o.corrector else x_pred
            nodes, values = state.remember(nodes, values, node, value)
            if start and i == 0:
                nodes, values = nodes[:1], values[:1]
        return x

    def start_fraction(self, score: CountedScore, steps: int) -> float:
        """The start step's fraction of the grid's first step (0: none) for a solve of ``steps`` steps."""
        o = self.options
        if o.start_step and steps < 2:
            raise SolverError(f"start_step needs at least 2 steps, got steps={steps}.")
        return step_at_t(o.start_step, score, steps, START_STEP_FROM, o.grid)


@dataclasses.dataclass
class _DDIMOptions(GridOptions):
    grid: GridKind = "t"               # DDIM's uniform t, or another grid (see time_grid)


@register
class DDIM(Multistep):
    """DDIM with η = 0: the first-order exponential integrator of the PF-ODE, one NFE per step."""

    name = "ddim"
    label = "DDIM (eta = 0): PF-ODE, first-order exponential integrator"
    Options = _DDIMOptions
    default_step_count = 100

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        # order 1 in λ (x̂_0 held) and in σ (ε̂ held) is the same step, DDIM's
        self.options = _MultistepOptions(order=1, corrector=False, variable="log_snr", start_step=0.0,
                                         **dataclasses.asdict(o))


@dataclasses.dataclass
class _HeunOptions(GridOptions):
    grid: GridKind = "edm"             # EDM's ρ = 7 grid


@register
class Heun(Multistep):
    """EDM's deterministic sampler: Heun's method on dx̃/dσ = ε̂ (x̃ = x/α), two NFE per step.

    ``steps`` counts Heun steps; the budget is 2·steps score evaluations.
    """

    name = "heun"
    label = "PF-ODE, Heun on EDM's grid"
    Options = _HeunOptions
    default_step_count = 10

    def nfe_per_step(self) -> int | None:
        return 2

    def likelihood_options(self, steps: int | None) -> dict | None:
        return None

    def run(self, sde: SDE, score: CountedScore, x: Tensor, eps: float, steps: int | None,
            noise: NoiseSource) -> Tensor:
        ts = solve_times(self.options, sde, eps, steps, self.default_step_count, score.sigma_data,
                         x[0].numel()).tolist()
        state = _ExponentialState(sde, score, x, "sigma")
        for i in range(len(ts) - 1):
            d, node = state.evaluate(x, ts[i])                         # Euler step
            x_euler = state.step(x, ts[i], ts[i + 1], [node], [d])
            d_next, node_next = state.evaluate(x_euler, ts[i + 1])     # 2nd-order correction: the trapezoid
            x = state.step(x, ts[i], ts[i + 1], [node, node_next], [d, d_next])
            x = score.after_step(x, ts[i + 1] * state.ones, noise)
        return x


@dataclasses.dataclass
class _AdaptiveOptions:
    order: int = 4                     # predictor order k; the corrector makes the accepted step order k + 1
    variable: Literal["log_snr", "sigma", "angle"] = "angle"
    rtol: float = 1e-3                 # relative tolerance of the local error
    atol: float = 1e-3                 # absolute tolerance of the local error
    error_norm: Literal["batch", "sample"] = "batch"   # local error: batch RMS, or the worst sample's RMS
    first_step: float = 0.05           # the first step, as a fraction of the λ range

    def validate(self):
        if self.order not in ORDERS:
            raise SolverError(f"order must be one of {ORDERS}, got {self.order}.")
        if not (finite_positive(self.rtol) and finite_positive(self.atol)):
            raise SolverError(f"rtol and atol must be finite and positive, got rtol={self.rtol}, atol={self.atol}.")
        if not 0 < self.first_step <= 1:
            raise SolverError(f"first_step must be in (0, 1], got {self.first_step}.")


@register
class AdaptiveMultistep(Multistep):
    """The multistep method with steps in λ chosen by the local error (Milne's estimate, no extra NFE).

    Each step predicts at order k, evaluates the score there, corrects at order k + 1 and takes
    their difference as the local error, measured against atol + rtol·|x|. A step is accepted
    when that error is at most 1; either way the next step is h·min(2, max(0.2, 0.9 err^{−1/(k+1)})).
    A rejected step costs its one evaluation.
    """

    name = "multistep_adaptive"
    label = "PF-ODE, adaptive multistep"
    Options = _AdaptiveOptions

    max_evaluations = 10_000

    def nfe_per_step(self) -> int | None:
        return None

    def likelihood_options(self, steps: int | None) -> dict | None:
        return None

    def run(self, sde: SDE, score: CountedScore, x: Tensor, eps: float, steps: int | None,
            noise: NoiseSource) -> Tensor:
        o = self.options
        if steps is not None:
            raise SolverError("multistep_adaptive sets its own steps from rtol/atol; for a fixed budget use "
                              "solver=multistep with steps.")
        lam_end, lam = half_log_snr_at(sde, eps), half_log_snr_at(sde, sde.T)
        h = o.first_step * (lam_end - lam)
        t = sde.T
        state = _ExponentialState(sde, score, x, o.variable, score.sigma_data, history=o.order)
        value, node = state.evaluate(x, t)
        nodes, values = [node], [value]
        batch = x.shape[0]
        while lam < lam_end:
            if score.nfe > self.max_evaluations:
                raise NonFiniteError(f"multistep_adaptive took more than {self.max_evaluations} evaluations: "
                                     "the score is not smooth enough for these tolerances, or returns NaN.")
            last = lam + h >= lam_end - 1e-12 * abs(lam_end)
            lam_next = lam_end if last else lam + h
            t_next = eps if last else float(sde.t_from_half_log_snr(torch.tensor(lam_next, dtype=torch.float64)))
            order = min(o.order, len(nodes))
            x_pred = state.step(x, t, t_next, nodes[:order], values[:order])
            value_new, node_new = state.evaluate(x_pred, t_next)
            x_corr = state.correct(x, t, t_next, nodes, values, node_new, value_new, order)
            scale = o.atol + o.rtol * torch.maximum(x.abs(), x_corr.abs())
            ratio = ((x_corr - x_pred) / scale).reshape(batch, -1).pow(2).mean(1)
            err = float((ratio.max() if o.error_norm == "sample" else ratio.mean()).sqrt())
            if not math.isfinite(err):
                raise NonFiniteError("multistep_adaptive met NaN or inf in the score's output.")
            if err <= 1.0:
                x, t, lam = score.after_step(x_corr, t_next * state.ones, noise), t_next, lam_next
                nodes, values = state.remember(nodes, values, node_new, value_new)
            h *= min(2.0, max(0.2, 0.9 * max(err, 1e-10) ** (-1.0 / (order + 1))))
        return x
