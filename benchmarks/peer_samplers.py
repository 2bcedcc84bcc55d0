"""The samplers users run, from their own packages, on one problem posed in σ-space (docs/math.md §9).

With x̃ = x/α and σ = s/α, every linear SDE's probability-flow ODE is dx̃/dσ = (x̃ − D(x̃, σ))/σ. A
``SigmaProblem`` fixes σ_max, σ_min, x̃ at σ_max and the denoiser D, so every peer solves the same
ODE over the same span. Each ``PeerSetting`` starts at x̃_start at σ_max, stops at σ_min (not at 0),
reaches the model only through ``problem.denoiser`` (counted: that count is the NFE reported) and
returns x̃ at σ_min in float64. Every update is computed by the installed package: diffusers'
``scheduler.step`` and k-diffusion's ``sample_*`` and ``get_sigmas_*``; this module only poses the
problem for them. Run ``python benchmarks/peer_samplers.py`` to print the sanity table on the ring
(every setting's error as the NFE doubles, and its observed order); it takes several minutes.

diffusers (``UniPCMultistepScheduler``, ``SASolverScheduler``, ``DEISMultistepScheduler``,
``DPMSolverMultistepScheduler``, ``EDMDPMSolverMultistepScheduler``)
    The VP schedulers discretise an ᾱ table. Ours has 1000 entries with σ_k geometric from σ_min
    (k = 0) to σ_max, ᾱ_k = 1/(1 + σ_k²), passed as ``trained_betas``; since diffusers multiplies
    float32 factors 1 − β, each β is chosen against the float32 product before it, and the table is
    checked to match ᾱ to float32 rounding. Near σ_min that rounding is coarse in σ (ᾱ ≈ 1 − σ²
    holds σ² = 4e-6 to one float32 step), so the table's σ_min is 0.002 to within 0.1 %. The
    scheduler's state is x = α x̃ with α = 1/√(1 + σ²) at its own σ (``scheduler.sigmas[i]``), the
    denoiser is called at that σ, and ``prediction_type="sample"`` makes D the model output as it
    is. ``final_sigmas_type="sigma_min"`` where the class has it. Karras, exponential and beta grids
    (and every EDM grid) end by repeating σ_min, a step of length zero that would cost an NFE: those
    are scheduled for steps + 1 and stopped before it, so ``budget`` steps run from σ_max to σ_min.
    Options swept: every ``timestep_spacing`` that starts at σ_max (linspace, trailing) with the
    table's σ, and ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas``, for
    UniPC (bh1, bh2; orders 2, 3; with and without UniC), SA-Solver (τ = 0; predictor and corrector
    orders 1–4), DEIS (orders 1–3) and DPM-Solver (dpmsolver++ and dpmsolver, orders 2, 3).
    ``lower_order_final`` keeps its default: it lowers the order of the last steps, meant for the
    jump to σ = 0, and at σ_min = 0.002 D hardly changes over them. The EDM scheduler works on x̃
    itself and takes the raw network output F, which its ``precondition_outputs`` turns into
    D = c_skip x̃ + c_out F; it has no x₀ mode, so it runs with ``prediction_type="epsilon"`` and
    receives the F that its own c_skip, c_out map back to D (``precondition_inputs`` is not used:
    D takes x̃ directly, and σ_data then cancels). Its grids: Karras with ρ ∈ {1, 3, 5, 7, 9} and exponential.
    Every diffusers table and step runs in float32 where the scheduler does (σ tables, the
    coefficients computed from them); samples stay float64. That is the peers' own arithmetic.

k-diffusion (``sample_euler``, ``heun``, ``dpm_2``, ``lms``, ``dpmpp_2m``, ``dpmpp_3m_sde``,
``dpm_fast``, ``dpm_adaptive``)
    The package ``__init__`` imports all of k-diffusion (torchvision, clip, wandb). Where the
    package is not imported yet, ``k_diffusion_sampling()`` registers an empty package module built
    from its import spec (same ``__path__``, ``__init__`` not run) and imports ``k_diffusion.sampling``
    and ``k_diffusion.utils`` from the installed files. ``utils`` imports
    ``torchvision.transforms.functional`` for image helpers the samplers never call: if that import
    fails, placeholder modules stand in for torchvision during this one import and are removed from
    ``sys.modules`` afterwards. (The empty ``k_diffusion`` package stays registered, so a later
    ``import k_diffusion`` in the same process sees only what was loaded this way.) The model is
    ``model(x̃, σ) = D`` with σ of shape (n,), which is the problem's denoiser as it is. Calls run
    with float64 as torch's default dtype, so grids and σ tensors are float64. Grids:
    ``get_sigmas_karras`` (ρ ∈ {1, 3, 5, 7, 9}), ``get_sigmas_exponential``,
    ``get_sigmas_polyexponential`` (ρ = 2; ρ = 1 is the exponential grid), and ``get_sigmas_vp`` with
    β_min at its default and β_d, ε_s solved so that it spans [σ_min, σ_max]; each with ``steps + 1``
    points and the appended 0 dropped, so the last step ends at σ_min and no sampler takes its
    σ_next = 0 branch (heun and dpm_2 spend 2 NFE on every step). ``dpmpp_3m_sde`` runs with
    eta = 0, the probability-flow ODE, and a noise sampler that must never be called.
    ``dpm_fast(n)`` spends exactly n NFE. ``dpm_adaptive`` (orders 2, 3) is run over a sweep of rtol
    (atol in the default ratio to rtol); for a budget B the run at the tightest tolerance whose
    counted NFE ≤ B is returned. With its default first step (h_init = 0.05 in log σ) it needs a few
    dozen NFE on a span of ten e-folds, so small budgets are out of its reach; it stops once within
    1e-5 of log σ_min, its own criterion.

Excluded: ``timestep_spacing="leading"`` (its first step is below σ_max: another problem);
``use_lu_lambdas`` (λ = −log σ, so a λ-uniform grid is the exponential σ grid); flow-matching σ
(``use_flow_sigmas``, dynamic shifting) and every stochastic variant (SDE solvers, eta > 0,
ancestral samplers, SA-Solver with τ ≠ 0), which solve other equations.

Peer behaviour the sanity table shows, measured rather than assumed here: diffusers' SA-Solver
(corrector order ≥ 3, or predictor order 4) and DEIS at order 3 lose accuracy as the steps shrink,
because they compute their coefficients from the float32 tables by formulas that cancel (with the
tables cast to float64 they converge at their order); the order-3 multistep DPM-Solver of both
packages (diffusers' ``solver_order=3``, VP and EDM; k-diffusion's ``dpmpp_3m_sde``) weighs the
second difference by one half and converges at order 2 on a smooth problem; Karras ρ = 1 (uniform
in σ) and beta σ grids leave one long step in log σ near σ_min, so they converge late.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import math
import sys
import types
import weakref
from typing import Callable

import torch
from torchdiffeq import odeint

from models import MixtureScore, ring_mixture
from sde_lib import VESDE

__all__ = ["SigmaProblem", "PeerSetting", "BudgetTooSmall", "peer_settings", "scored_run", "best_peer", "sanity_table",
           "rms_distance", "reference_flow", "ring_problem", "k_diffusion_sampling"]

F64 = torch.float64
#: Entries of the ᾱ table handed to diffusers' VP schedulers.
TABLE_SIZE = 1000
#: Relative tolerance on a k-diffusion grid's end points: float64 rounding (the Karras ρ = 1 grid
#: reaches σ_min as σ_max + (σ_min − σ_max), a few 1e-12 off).
_F64_RTOL = 1e-10
#: Relative tolerances on a diffusers schedule's first and last σ, which are float32. At σ_max that
#: is float32 rounding. Near σ_min a VP table holds ᾱ ≈ 1 − σ² to one float32 step (6e-8), which
#: moves σ_min = 0.002 by 8e-4, and the EDM scheduler's float32 Karras grid with ρ = 1 ends 5e-4 away.
_F32_START_RTOL = 1e-6
_F32_END_RTOL = 2e-3
#: A final step shorter than this in log σ repeats σ_min: it is not a step of the schedule.
_REPEAT_LOG_GAP = 1e-3
_KARRAS_RHOS = (1.0, 3.0, 5.0, 7.0, 9.0)
#: Relative tolerances swept for ``sample_dpm_adaptive``, loosest first.
ADAPTIVE_RTOLS = tuple(10 ** (-k / 2) for k in range(2, 17))


@dataclasses.dataclass
class SigmaProblem:
    """One probability-flow problem in σ-space (docs/math.md §9): dx̃/dσ = (x̃ − D(x̃, σ))/σ.

    The solve runs from σ = ``sigma_max``, where x̃ = ``x_start`` (float64, shape (n, *event)), down to
    σ = ``sigma_min``. ``denoiser(x̃, σ)`` is x̂₀, with σ of shape (n,), float64 in and out.
    """

    name: str
    sigma_max: float
    sigma_min: float
    x_start: torch.Tensor
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class PeerSetting:
    """One peer sampler with one choice of its options.

    ``run(problem, budget)`` returns (x̃ at ``problem.sigma_min``, the counted NFE) with NFE ≤ budget:
    the largest step count that fits, or for an adaptive solver the tightest tolerance that fits.
    It raises ``BudgetTooSmall`` when no run fits. ``nfe_per_step`` is None for adaptive solvers.
    ``order`` is the convergence order the method is built for (None for adaptive solvers).
    """

    peer: str
    setting: str
    nfe_per_step: int | None
    run: Callable[[SigmaProblem, int], tuple[torch.Tensor, int]]
    order: int | None = None

    @property
    def label(self) -> str:
        return f"{self.peer} ({self.setting})"


class BudgetTooSmall(ValueError):
    """The NFE budget is below the fewest evaluations this peer setting can run with."""


class _CountedDenoiser:
    """``problem.denoiser`` behind a counter: ``nfe`` is the number of calls on the batch so far."""

    def __init__(self, problem: SigmaProblem):
        self.denoiser = problem.denoiser
        self.n = problem.x_start.shape[0]
        self.nfe = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.denoiser(x.to(F64), torch.as_tensor(sigma, dtype=F64).expand(self.n))


# ----------------------------------------------------------------------------------------------------
# The exact flow, the development problem and the error measure

def reference_flow(problem: SigmaProblem, rtol: float = 1e-10, atol: float | None = None) -> torch.Tensor:
    """x̃ at ``sigma_min`` by torchdiffeq's dopri8 on dx̃/dr = x̃ − D(x̃, eʳ), with r = log σ.

    In r the ten e-folds of σ are evenly scaled. ``atol`` defaults to ``rtol``. Returns float64
    shaped like ``problem.x_start``.
    """
    ones = torch.ones(problem.x_start.shape[0], dtype=F64)

    def velocity(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x - problem.denoiser(x, r.exp() * ones)

    span = torch.tensor([math.log(problem.sigma_max), math.log(problem.sigma_min)], dtype=F64)
    return odeint(velocity, problem.x_start.to(F64), span, method="dopri8", rtol=rtol,
                  atol=rtol if atol is None else atol)[-1]


def ring_problem(n_samples: int = 2000, seed: int = 0, sigma_max: float = 80.0,
                 sigma_min: float = 0.002) -> SigmaProblem:
    """The 2-D ring of 8 Gaussians (radius 4, std 0.3) with its exact denoiser; x̃_start = σ_max z.

    Under the VE SDE x̃ = x and σ = s, so D(x̃, σ) = x̃ + σ² ∇log p_t(x̃) at the t where s(t) = σ.
    """
    sde = VESDE(sigma_min=0.001, sigma_max=100.0)
    score = MixtureScore(sde, ring_mixture())

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = sde.t_from_half_log_snr(-sigma.log())
        return x + sigma[:, None] ** 2 * score(x, t)

    z = torch.randn(n_samples, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return SigmaProblem("ring", sigma_max, sigma_min, sigma_max * z, denoiser)


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS over samples of the Euclidean distance between a and b, each sample flattened."""
    return (a - b).flatten(1).pow(2).sum(1).mean().sqrt().item()


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * abs(b)


# ----------------------------------------------------------------------------------------------------
# diffusers

def _vp_alpha(sigma: float) -> float:
    """α = 1/√(1 + σ²), the VP scale at noise level σ = s/α."""
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


def _table_alpha_bar(sigma_min: float, sigma_max: float, size: int = TABLE_SIZE) -> torch.Tensor:
    """ᾱ_k = 1/(1 + σ_k²) for σ_k geometric from sigma_min (k = 0) to sigma_max."""
    log_sigma = torch.linspace(math.log(sigma_min), math.log(sigma_max), size, dtype=F64)
    return 1.0 / (1.0 + (2 * log_sigma).exp())


@functools.lru_cache(maxsize=16)
def _vp_trained_betas(sigma_min: float, sigma_max: float) -> tuple[float, ...]:
    """β with ᾱ_k = Π_{j≤k} (1 − β_j) equal to ``_table_alpha_bar``: β_k = 1 − ᾱ_k/ᾱ_{k−1}.

    diffusers stores 1 − β in float32 and multiplies, so each β_k is taken against the product of
    the float32 factors before it: the table then misses its targets by one float32 rounding rather
    than by the accumulated roundings of a thousand factors.
    """
    betas, product = [], 1.0
    for target in _table_alpha_bar(sigma_min, sigma_max).tolist():
        beta = 1.0 - target / product
        product *= float(1.0 - torch.tensor(beta, dtype=torch.float32))
        betas.append(beta)
    return tuple(betas)


def _check_vp_table(scheduler, sigma_min: float, sigma_max: float) -> None:
    """Check that the scheduler's ᾱ table is ours to float32 rounding."""
    alpha_bar = scheduler.alphas_cumprod.to(F64)
    target = _table_alpha_bar(sigma_min, sigma_max, len(alpha_bar))
    # Two float32 roundings: the factor 1 − β and the stored product.
    if not ((alpha_bar - target).abs() <= 2 * torch.finfo(torch.float32).eps * target).all():
        raise RuntimeError(f"{type(scheduler).__name__}'s ᾱ table is not the σ table built for it")


def _diffusers_schedule(scheduler, steps: int, sigma_min: float, sigma_max: float) -> None:
    """``set_timesteps`` for ``steps`` steps of positive length from σ_max to σ_min, checked.

    A schedule ending in a repeat of σ_min is set for steps + 1; the caller stops before the repeat.
    """
    scheduler.set_timesteps(steps)
    last, final = scheduler.sigmas[-2:].tolist()
    if final > 0 and abs(math.log(last / final)) < _REPEAT_LOG_GAP:
        scheduler.set_timesteps(steps + 1)
    sigmas = scheduler.sigmas[: steps + 1].tolist()
    if not _close(sigmas[0], sigma_max, _F32_START_RTOL):
        raise RuntimeError(f"the schedule starts at σ = {sigmas[0]:.6g}, not σ_max = {sigma_max:.6g}")
    if not _close(sigmas[-1], sigma_min, _F32_END_RTOL):
        raise RuntimeError(f"the schedule ends at σ = {sigmas[-1]:.6g}, not σ_min = {sigma_min:.6g}")
    if any(b >= a for a, b in zip(sigmas, sigmas[1:])):
        raise RuntimeError("the schedule's σ does not decrease strictly")


def _edm_raw_output(scheduler, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The raw output F that the scheduler's ``precondition_outputs`` maps to ``denoised`` at this σ.

    That map is D = c_skip x̃ + c_out F; both coefficients are read from it, so F round-trips with the
    scheduler's own (float32) c_skip and c_out.
    """
    skip = scheduler.precondition_outputs(x, torch.zeros_like(x), sigma)
    unit = torch.ones_like(x[:1])
    c_out = scheduler.precondition_outputs(torch.zeros_like(unit), unit, sigma)
    return (denoised - skip) / c_out


def _run_diffusers(scheduler_cls: type, options: dict, edm: bool, problem: SigmaProblem,
                   budget: int) -> tuple[torch.Tensor, int]:
    """``budget`` steps of a diffusers multistep scheduler, one denoiser call per step."""
    steps = budget
    if steps < 1:
        raise BudgetTooSmall(f"needs at least 1 NFE, got {budget}")
    options = dict(options)
    if options.get("disable_corrector") == "all":
        options["disable_corrector"] = list(range(steps + 1))
    if edm:
        scheduler = scheduler_cls(sigma_min=problem.sigma_min, sigma_max=problem.sigma_max, **options)
    else:
        betas = list(_vp_trained_betas(problem.sigma_min, problem.sigma_max))
        scheduler = scheduler_cls(trained_betas=betas, prediction_type="sample", **options)
        _check_vp_table(scheduler, problem.sigma_min, problem.sigma_max)
    _diffusers_schedule(scheduler, steps, problem.sigma_min, problem.sigma_max)
    # Start at index 0 even if a rounded timestep repeats (diffusers would otherwise pick the second).
    scheduler.set_begin_index(0)
    # SA-Solver draws noise every step (scaled by τ = 0): keep the global generator out of it.
    step_options = ({"generator": torch.Generator().manual_seed(0)}
                    if "generator" in inspect.signature(scheduler.step).parameters else {})

    denoiser = _CountedDenoiser(problem)
    sigmas = scheduler.sigmas.tolist()
    scale = (lambda sigma: 1.0) if edm else _vp_alpha
    x = problem.x_start.to(F64) * scale(sigmas[0])
    for i in range(steps):
        denoised = denoiser(x / scale(sigmas[i]), torch.tensor(sigmas[i], dtype=F64))
        output = _edm_raw_output(scheduler, x, denoised, scheduler.sigmas[i]) if edm else denoised
        x = scheduler.step(output, scheduler.timesteps[i], x, return_dict=False, **step_options)[0]
        if scheduler.step_index != i + 1:
            raise RuntimeError(f"{scheduler_cls.__name__} is at step {scheduler.step_index} after step {i}")
    return x / scale(sigmas[steps]), denoiser.nfe


def _zero_tau(t) -> float:
    """SA-Solver's τ(t) = 0: no injected noise, the probability-flow ODE."""
    return 0.0


def _vp_grids(scheduler_cls: type) -> list[tuple[str, dict]]:
    """The grid options a VP scheduler class accepts, each ending at σ_min."""
    accepted = inspect.signature(scheduler_cls.__init__).parameters
    grids = [("linspace", {"timestep_spacing": "linspace"}), ("trailing", {"timestep_spacing": "trailing"})]
    grids += [(label, {flag: True}) for label, flag in [
        ("karras σ", "use_karras_sigmas"), ("exponential σ", "use_exponential_sigmas"),
        ("beta σ", "use_beta_sigmas")] if flag in accepted]
    if "final_sigmas_type" in accepted:
        grids = [(label, {**grid, "final_sigmas_type": "sigma_min"}) for label, grid in grids]
    return grids


def _diffusers_settings() -> list[PeerSetting]:
    import diffusers

    def over_grids(peer: str, cls: type, label: str, options: dict, order: int) -> list[PeerSetting]:
        return [PeerSetting(peer, f"{label}, {grid}", 1,
                            functools.partial(_run_diffusers, cls, {**options, **grid_options}, False), order)
                for grid, grid_options in _vp_grids(cls)]

    settings = []
    for solver_type in ("bh1", "bh2"):
        for order in (2, 3):
            for corrector in (True, False):
                options = {"solver_type": solver_type, "solver_order": order}
                if not corrector:
                    options["disable_corrector"] = "all"
                label = f"{solver_type}, order {order}, {'UniC' if corrector else 'no corrector'}"
                # UniC raises the order of the predictor by one.
                settings += over_grids("diffusers UniPC", diffusers.UniPCMultistepScheduler, label, options,
                                       order + 1 if corrector else order)
    for predictor in (1, 2, 3, 4):
        for corrector in (1, 2, 3, 4):
            # Predict-evaluate-correct: the corrector's order, at most one above the predictor's.
            settings += over_grids("diffusers SA-Solver", diffusers.SASolverScheduler,
                                   f"τ=0, predictor {predictor}, corrector {corrector}",
                                   {"predictor_order": predictor, "corrector_order": corrector,
                                    "tau_func": _zero_tau}, min(corrector, predictor + 1))
    for order in (1, 2, 3):
        settings += over_grids("diffusers DEIS", diffusers.DEISMultistepScheduler, f"order {order}",
                               {"solver_order": order}, order)
    for algorithm in ("dpmsolver++", "dpmsolver"):
        for order in (2, 3):
            settings += over_grids("diffusers DPM-Solver", diffusers.DPMSolverMultistepScheduler,
                                   f"{algorithm}, order {order}",
                                   {"algorithm_type": algorithm, "solver_order": order}, order)
    edm_grids = ([(f"karras ρ={rho:g}", {"sigma_schedule": "karras", "rho": rho}) for rho in _KARRAS_RHOS]
                 + [("exponential", {"sigma_schedule": "exponential"})])
    for order in (2, 3):
        for grid, grid_options in edm_grids:
            options = {"solver_order": order, "prediction_type": "epsilon", "final_sigmas_type": "sigma_min",
                       **grid_options}
            settings.append(PeerSetting(
                "diffusers EDM DPM-Solver", f"dpmsolver++, order {order}, {grid}", 1,
                functools.partial(_run_diffusers, diffusers.EDMDPMSolverMultistepScheduler, options, True), order))
    return settings


# ----------------------------------------------------------------------------------------------------
# k-diffusion

@contextlib.contextmanager
def _torchvision_stand_in():
    """Placeholder torchvision modules while ``k_diffusion.utils`` imports, if torchvision cannot be.

    They are removed from ``sys.modules`` afterwards; only ``utils``' image helpers refer to them.
    """
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    try:
        importlib.import_module(names[-1])
    except Exception:  # absent, or built against another torch
        pass
    else:
        yield
        return
    saved = {name: sys.modules.get(name) for name in names}
    stand_ins = [types.ModuleType(name, "placeholder: k-diffusion's image helpers are not used here")
                 for name in names]
    for parent, child in zip(stand_ins, stand_ins[1:]):
        setattr(parent, child.__name__.rsplit(".", 1)[1], child)
    sys.modules.update({module.__name__: module for module in stand_ins})
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@functools.lru_cache(maxsize=1)
def k_diffusion_sampling() -> types.ModuleType:
    """The installed ``k_diffusion.sampling``, imported without running the package ``__init__``.

    Raises ImportError when k-diffusion (or a dependency of ``sampling``/``utils``) is not installed.
    """
    if "k_diffusion" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("k-diffusion is not installed (pip install k-diffusion)")
        sys.modules["k_diffusion"] = importlib.util.module_from_spec(spec)
    with _torchvision_stand_in():
        return importlib.import_module("k_diffusion.sampling")


@contextlib.contextmanager
def _float64_default():
    """float64 as torch's default dtype, so that k-diffusion builds its grids and σ in float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _no_noise(sigma, sigma_next):
    raise RuntimeError("the probability-flow samplers run with eta = 0 and never draw noise")


def _vp_grid_options(sigma_min: float, sigma_max: float, beta_min: float) -> dict:
    """``get_sigmas_vp``'s β_d and ε_s for which σ(1) = σ_max and σ(ε_s) = σ_min, given β_min.

    Its σ(t)² = exp(β_d t²/2 + β_min t) − 1: β_d from t = 1, then ε_s as the positive root of
    β_d ε²/2 + β_min ε = log(1 + σ_min²), in the form without cancellation.
    """
    beta_d = 2 * (math.log1p(sigma_max**2) - beta_min)
    target = math.log1p(sigma_min**2)
    return {"beta_d": beta_d, "beta_min": beta_min,
            "eps_s": 2 * target / (beta_min + math.sqrt(beta_min**2 + 2 * beta_d * target))}


def _k_grid(grid: str, grid_options: dict, points: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """``get_sigmas_<grid>`` with ``points`` σ from σ_max to σ_min, its appended 0 dropped."""
    sampling = k_diffusion_sampling()
    with _float64_default():
        if grid == "vp":
            defaults = inspect.signature(sampling.get_sigmas_vp).parameters
            sigmas = sampling.get_sigmas_vp(points, **_vp_grid_options(sigma_min, sigma_max,
                                                                       defaults["beta_min"].default))
        else:
            sigmas = getattr(sampling, f"get_sigmas_{grid}")(points, sigma_min, sigma_max, **grid_options)
    if len(sigmas) != points + 1 or sigmas[-1] != 0:
        raise RuntimeError(f"get_sigmas_{grid} no longer appends a single 0")
    sigmas = sigmas[:-1].to(F64)
    if not (_close(sigmas[0].item(), sigma_max, _F64_RTOL) and _close(sigmas[-1].item(), sigma_min, _F64_RTOL)):
        raise RuntimeError(f"get_sigmas_{grid} does not span [{sigma_min:g}, {sigma_max:g}]")
    return sigmas


def _run_k_grid_sampler(sampler: str, nfe_per_step: int, sampler_options: dict, grid: str, grid_options: dict,
                        problem: SigmaProblem, budget: int) -> tuple[torch.Tensor, int]:
    """``sample_<sampler>`` over budget // nfe_per_step steps of a k-diffusion grid ending at σ_min."""
    steps = budget // nfe_per_step
    if steps < 1:
        raise BudgetTooSmall(f"needs at least {nfe_per_step} NFE, got {budget}")
    sigmas = _k_grid(grid, grid_options, steps + 1, problem.sigma_min, problem.sigma_max)
    denoiser = _CountedDenoiser(problem)
    with _float64_default():
        x = getattr(k_diffusion_sampling(), f"sample_{sampler}")(
            denoiser, problem.x_start.to(F64).clone(), sigmas, disable=True, **sampler_options)
    if denoiser.nfe != steps * nfe_per_step:
        raise RuntimeError(f"sample_{sampler} made {denoiser.nfe} calls in {steps} steps")
    return x, denoiser.nfe


def _run_dpm_fast(problem: SigmaProblem, budget: int) -> tuple[torch.Tensor, int]:
    """``sample_dpm_fast`` with n = budget: order-3 steps uniform in log σ and a lower-order tail."""
    if budget < 1:
        raise BudgetTooSmall(f"needs at least 1 NFE, got {budget}")
    denoiser = _CountedDenoiser(problem)
    with _float64_default():
        x = k_diffusion_sampling().sample_dpm_fast(denoiser, problem.x_start.to(F64).clone(), problem.sigma_min,
                                                   problem.sigma_max, budget, disable=True)
    if denoiser.nfe != budget:
        raise RuntimeError(f"sample_dpm_fast made {denoiser.nfe} calls for n = {budget}")
    return x, denoiser.nfe


class _AdaptiveRuns:
    """``sample_dpm_adaptive`` over ADAPTIVE_RTOLS, each tolerance run once per problem object.

    For a budget B it returns the run at the tightest tolerance whose counted NFE ≤ B. Tolerances run
    loosest first, and the sweep stops at the first run above B (NFE grows as the tolerance shrinks).
    atol keeps the ratio to rtol of the function's defaults.
    """

    def __init__(self, order: int):
        self.order = order
        self._runs: dict[int, tuple[weakref.ref, list]] = {}

    def __call__(self, problem: SigmaProblem, budget: int) -> tuple[torch.Tensor, int]:
        known, runs = self._runs.get(id(problem), (None, None))
        if known is None or known() is not problem:
            self._runs = {key: entry for key, entry in self._runs.items() if entry[0]() is not None}
            runs = []
            self._runs[id(problem)] = (weakref.ref(problem), runs)
        while len(runs) < len(ADAPTIVE_RTOLS) and (not runs or runs[-1][1] <= budget):
            runs.append(self._run(problem, ADAPTIVE_RTOLS[len(runs)]))
        fitting = [run for run in runs if run[1] <= budget]
        if not fitting:
            raise BudgetTooSmall(f"its loosest tolerance takes {runs[0][1]} NFE, more than {budget}")
        return fitting[-1]

    def _run(self, problem: SigmaProblem, rtol: float) -> tuple[torch.Tensor, int]:
        sampling = k_diffusion_sampling()
        defaults = inspect.signature(sampling.sample_dpm_adaptive).parameters
        atol = rtol * defaults["atol"].default / defaults["rtol"].default
        denoiser = _CountedDenoiser(problem)
        with _float64_default():
            x = sampling.sample_dpm_adaptive(denoiser, problem.x_start.to(F64).clone(), problem.sigma_min,
                                             problem.sigma_max, order=self.order, rtol=rtol, atol=atol,
                                             disable=True)
        return x, denoiser.nfe


def _k_diffusion_settings() -> list[PeerSetting]:
    k_diffusion_sampling()  # ImportError here when the package is absent
    grids = ([(f"karras ρ={rho:g}", "karras", {"rho": rho}) for rho in _KARRAS_RHOS]
             + [("exponential", "exponential", {}), ("polyexponential ρ=2", "polyexponential", {"rho": 2.0}),
                ("vp, β_d and ε_s fitted to the span", "vp", {})])
    samplers = [  # (name, NFE per step, options, order)
        ("euler", 1, {}, 1), ("heun", 2, {}, 2), ("dpm_2", 2, {}, 2), ("lms", 1, {"order": 4}, 4),
        ("dpmpp_2m", 1, {}, 2), ("dpmpp_3m_sde", 1, {"eta": 0.0, "noise_sampler": _no_noise}, 3)]
    settings = []
    for name, per_step, options, order in samplers:
        shown = "".join(f"{key}={value}, " for key, value in options.items() if key != "noise_sampler")
        settings += [PeerSetting(f"k-diffusion {name}", shown + label, per_step,
                                 functools.partial(_run_k_grid_sampler, name, per_step, options, grid, grid_options),
                                 order)
                     for label, grid, grid_options in grids]
    settings.append(PeerSetting("k-diffusion dpm_fast", "n = NFE", 1, _run_dpm_fast, 3))
    settings += [PeerSetting("k-diffusion dpm_adaptive", f"order {order}, rtol swept", None, _AdaptiveRuns(order))
                 for order in (2, 3)]
    return settings


# ----------------------------------------------------------------------------------------------------
# The registry and the comparisons

def peer_settings() -> list[PeerSetting]:
    """Every peer sampler × every setting described in the module docstring.

    A package that cannot be imported contributes no settings. The settings are built once per
    process, so that what a setting caches (the adaptive solvers' tolerance sweep) lasts across calls.
    """
    return list(_registry())


@functools.lru_cache(maxsize=1)
def _registry() -> tuple[PeerSetting, ...]:
    settings = []
    for build in (_diffusers_settings, _k_diffusion_settings):
        try:
            settings += build()
        except ImportError:
            pass
    return tuple(settings)


def scored_run(setting: PeerSetting, problem: SigmaProblem, budget: int,
                reference: torch.Tensor) -> tuple[float, int]:
    """(RMS distance to ``reference``, NFE) of one run; raises on a failed or non-finite run."""
    x, nfe = setting.run(problem, budget)
    if nfe > budget:
        raise RuntimeError(f"{setting.label} used {nfe} NFE for a budget of {budget}")
    error = rms_distance(x, reference)
    if not math.isfinite(error):
        raise FloatingPointError("non-finite samples")
    return error, nfe


def best_peer(problem: SigmaProblem, budget: int, reference: torch.Tensor,
              settings: list[PeerSetting] | None = None,
              failures: list[tuple[PeerSetting, str]] | None = None) -> tuple[float, PeerSetting, int]:
    """The smallest RMS distance to ``reference`` over peer settings at this NFE budget.

    Returns (error, setting, NFE used). Settings whose minimum exceeds the budget are passed over;
    settings that raise or return non-finite samples are skipped and, if ``failures`` is a list,
    appended to it with the reason. ``settings`` defaults to ``peer_settings()``.
    """
    best = None
    for setting in peer_settings() if settings is None else settings:
        try:
            error, nfe = scored_run(setting, problem, budget, reference)
        except BudgetTooSmall:
            continue
        except Exception as exc:  # a peer's failure is a result of the comparison, not its end
            if failures is not None:
                failures.append((setting, f"{type(exc).__name__}: {exc}"))
            continue
        if best is None or error < best[0]:
            best = (error, setting, nfe)
    if best is None:
        raise RuntimeError(f"no peer setting ran within {budget} NFE")
    return best


def _observed_order(nfes: tuple[int, ...], errors: tuple[float, ...]) -> float:
    """Minus the least-squares slope of log error against log NFE."""
    xs, ys = [math.log(n) for n in nfes], [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return -sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def sanity_table(problem: SigmaProblem, reference: torch.Tensor, steps: tuple[int, ...] = (10, 20, 40, 80, 160),
                 settings: list[PeerSetting] | None = None, fit_points: int = 3) -> str:
    """Markdown: each peer setting's error at each NFE budget in ``steps``, and its observed order.

    The observed order is the log–log slope over the last ``fit_points`` budgets that ran, beside
    the order the method is built for. A cell shows the NFE in brackets where the run used fewer
    than the budget, "–" below the setting's minimum budget, and "fail" where it raised or returned
    non-finite samples (the reasons follow the table).
    """
    lines = ["| peer | setting | order | " + " | ".join(f"{b} NFE" for b in steps) + " | observed order |",
             "|---|---|---|" + "---|" * len(steps) + "---|"]
    notes = []
    for setting in peer_settings() if settings is None else settings:
        cells, runs = [], []
        for budget in steps:
            try:
                error, nfe = scored_run(setting, problem, budget, reference)
            except BudgetTooSmall:
                cells.append("–")
                continue
            except Exception as exc:
                cells.append("fail")
                notes.append(f"- {setting.label} at {budget} NFE: {type(exc).__name__}: {exc}")
                continue
            cells.append(f"{error:.2e}" + ("" if nfe == budget else f" ({nfe})"))
            runs.append((nfe, error))
        nfes, errors = zip(*runs[-fit_points:]) if runs else ((), ())
        observed = (f"{_observed_order(nfes, errors):.2f}"
                    if len(set(nfes)) >= 2 and all(error > 0 for error in errors) else "–")
        order = "–" if setting.order is None else str(setting.order)
        lines.append(f"| {setting.peer} | {setting.setting} | {order} | " + " | ".join(cells) + f" | {observed} |")
    return "\n".join(lines + ([""] + notes if notes else []))


if __name__ == "__main__":
    torch.set_num_threads(1)
    ring = ring_problem(256)
    print(sanity_table(ring, reference_flow(ring)))
