"""The solver registry, the counted score wrapper, result types and :func:`sample`.

A solver is a small class: its options are a dataclass (typed, documented where declared), it
names the SDE classes it accepts, and it implements one method, ``run``. The registry key is
the name used by ``solvers.sample(solver=...)``, by ``conf/solver/<name>.yaml`` and on the
command line.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, ClassVar

import torch
from tqdm import tqdm

from core_lib import UserError, build_options
from sde_lib import SDE
from solvers.noise import NoiseSource

Tensor = torch.Tensor
#: The one calling convention of every model: ``score_fn(x (B, ...), t (B,), **cond) -> (B, ...)``, the score
#: ∇ₓ log p_t(x | cond). ``cond`` holds conditioning inputs by name (empty for an unconditional model).
ScoreFn = Callable[..., Tensor]

#: The data scale σ_data assumed when neither the caller nor the model gives one.
DEFAULT_SIGMA_DATA = 1.0

__all__ = ["Solver", "SOLVERS", "register", "available", "get_solver", "sample", "SampleResult",
           "CountedScore", "SolverError", "NonFiniteError", "ScoreFn", "DEFAULT_SIGMA_DATA", "resolve_sigma_data"]


class SolverError(UserError):
    """Bad input to a solver: an unknown name or option, a wrong shape, an incompatible SDE."""


class NonFiniteError(UserError, RuntimeError):
    """The score function (or the state it drives) produced NaN or inf: the model or the step sizes are at fault."""


@dataclasses.dataclass
class SampleResult:
    """What :func:`sample` returns.

    Attributes:
        samples: (B, ...) the generated data, on the device and in the dtype of the run.
        nfe: score evaluations actually made (each batched call counts once).
        seconds: wall-clock time of the solve.
        solver: registry name of the solver used.
        seed: the seed of the noise (the prior draw and every stochastic step).
        z: (B, ...) the prior noise the run started from.
        trajectory: with ``trajectory=k``, (times (S,), states (S, k, ...)): the first k samples at
            every score evaluation, in the order made (adaptive ODE methods include their trial
            stages), then the final samples; None otherwise.
    """

    samples: Tensor
    nfe: int
    seconds: float
    solver: str
    seed: int
    z: Tensor
    trajectory: tuple[Tensor, Tensor] | None = None


def resolve_sigma_data(score_fn: ScoreFn, sigma_data: float | None) -> float:
    """σ_data: the caller's, else the model's own ``sigma_data`` attribute (ScoreModel, MixtureScore), else 1."""
    value = sigma_data if sigma_data is not None else getattr(score_fn, "sigma_data", None)
    if value is None:
        value = DEFAULT_SIGMA_DATA
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise SolverError(f"sigma_data must be a finite positive number (the data's per-dimension std), got {value!r}.")
    return float(value)


class CountedScore:
    """Wraps a ``score_fn(x, t, **cond)`` to count its evaluations and check what it returns.

    t may be passed as a scalar tensor; it is expanded to shape (B,). ``cond`` is passed to every
    call. The first call checks the output fully (tensor, shape, finite) so that a broken model
    fails before any solving; later calls check the shape, which costs nothing on any device.
    ``sigma_data`` is the data scale the solve assumes (:func:`resolve_sigma_data`).
    """

    def __init__(self, score_fn: ScoreFn, record: int = 0, progress: "TimeProgress | None" = None,
                 cond: dict[str, Any] | None = None, sigma_data: float | None = None):
        if not callable(score_fn):
            raise SolverError(f"score_fn must be callable as score_fn(x, t), got {type(score_fn).__name__}.")
        if cond is not None and not isinstance(cond, dict):
            raise SolverError(f"cond must be a dict of conditioning inputs by name, got {type(cond).__name__}.")
        self.score_fn = score_fn
        self.cond = dict(cond or {})
        self.sigma_data = resolve_sigma_data(score_fn, sigma_data)
        #: the model's x̂₀ is x̃ − σ ε̂ (or x̃ + σ² s̃), its error multiplied by σ at high noise: what the model
        #: declares (``ScoreModel.predicts_noise``); a plain callable declares nothing (False)
        self.predicts_noise = bool(getattr(score_fn, "predicts_noise", False))
        self.nfe = 0
        self.record = record
        self.progress = progress
        self.visited: list[tuple[float, Tensor]] = []  # (t, x[:record]) at every call, when record > 0
        #: ``constraint(x, t, noise) -> x``, applied by solvers that declare ``takes_constraint`` to their state after
        #: every step, t (B,) being the time the step ended at (inpainting's replacement); None: left as stepped
        self.constraint: Callable[[Tensor, Tensor, NoiseSource], Tensor] | None = None

    def after_step(self, x: Tensor, t: Tensor, noise: NoiseSource) -> Tensor:
        """The state a solver continues from after a step that ended at time t: ``constraint``'s, else x itself."""
        return x if self.constraint is None else self.constraint(x, t, noise)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        out = self.score_fn(x, t, **self.cond)
        if not torch.is_tensor(out) or out.shape != x.shape:
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise SolverError(f"score_fn returned {got} for input of shape {tuple(x.shape)}; "
                              "it must return a tensor of the input's shape.")
        if self.nfe == 0 and not torch.isfinite(out).all():
            raise NonFiniteError(f"score_fn returned NaN or inf at its first call (t = {t[0].item():.4g}); "
                                 "check the model and its weights.")
        self.nfe += 1
        if self.record:
            self.visited.append((t[0].item(), x[:self.record].detach().clone()))
        if self.progress is not None:
            self.progress.at(t[0].item(), self.nfe)
        return out


class TimeProgress:
    """A tqdm bar for an integration from t_start to t_end, advanced by the times the score is called at."""

    def __init__(self, t_start: float, t_end: float, desc: str):
        self.t_start, self.t_end = t_start, t_end
        self.bar = tqdm(total=1000, desc=desc, dynamic_ncols=True, leave=False,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]")

    def at(self, t: float, nfe: int) -> None:
        done = int(1000 * min(max((t - self.t_start) / (self.t_end - self.t_start), 0.0), 1.0))
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        if nfe % 10 == 0:
            self.bar.set_postfix_str(f"NFE {nfe}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def check_finite(x: Tensor, what: str) -> None:
    """Raise a clear error if x holds NaN or inf (one host sync, at the end of a solve)."""
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"{what} contains NaN or inf: the score function returned non-finite values "
                             "or the solve diverged; check the model, or use smaller steps / tighter tolerances.")


class Solver:
    """Base class of every sampler. Subclasses set ``name``, ``Options`` and ``run``, and declare what they are.

    What a solver declares is what the rest of the framework asks (``task=compare``, the CLI):
    ``deterministic`` (no noise after the prior draw: the PF-ODE's samplers, whose target is the
    flow), and :meth:`nfe_per_step` (score evaluations per step, None when the steps are chosen
    by tolerances). Every solver works with every SDE (``check_sde``).
    """

    name: ClassVar[str]
    #: one line on what the solver is (the compare table's label)
    label: ClassVar[str] = ""
    #: whether ``run`` draws no noise after the prior draw (the samples are a function of z)
    deterministic: ClassVar[bool] = False
    #: whether ``run`` passes its state through ``score.after_step`` after every step (``solvers.inpaint``'s replace)
    takes_constraint: ClassVar[bool] = False

    @dataclasses.dataclass
    class Options:
        pass

    def __init__(self, **options: Any):
        self.options = build_options(self.Options, options, f"solver '{self.name}'", SolverError)

    def nfe_per_step(self) -> int | None:
        """Score evaluations per step with these options; None when tolerances choose the steps."""
        return 1

    def likelihood_options(self, steps: int | None) -> dict[str, Any] | None:
        """``solvers.log_likelihood`` options that integrate the same ODE with the same integrator and budget, or None."""
        return None

    def bound_options(self) -> dict[str, Any] | None:
        """``solvers.variational_bound`` options of the chain this solver walks, when its model is one; else None."""
        return None

    @classmethod
    def check_sde(cls, sde: SDE) -> None:
        if not isinstance(sde, SDE):
            raise SolverError(f"sde must be an sde_lib.SDE (one of sde_lib.SDES), got {type(sde).__name__}.")

    def end_time(self, eps: float) -> float:
        """The time the returned samples belong to: eps, or 0 for samplers that walk the chain to its data."""
        return eps

    def run(self, sde: SDE, score: CountedScore, x: Tensor, eps: float, steps: int | None,
            noise: NoiseSource) -> Tensor:
        raise NotImplementedError


SOLVERS: dict[str, type[Solver]] = {}


def register(cls: type[Solver]) -> type[Solver]:
    """Class decorator adding a solver to the registry under ``cls.name``."""
    SOLVERS[cls.name] = cls
    return cls


def available() -> list[str]:
    """The registered solver names (the keys shared with ``conf/solver/*.yaml``)."""
    return sorted(SOLVERS)


def get_solver(name: str) -> type[Solver]:
    """The solver class registered under ``name``, or a SolverError listing the valid names."""
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise SolverError(f"unknown solver {name!r}; available: {', '.join(available())}.") from None


def _check_steps(steps: Any) -> None:
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise SolverError(f"steps must be a positive integer or None, got {steps!r}.")


def resolve_eps(sde: SDE, eps: float | None) -> float:
    """The stopping time: the SDE's usual default (1e-3 VP/sub-VP, 1e-5 VE) when eps is None."""
    eps = sde.default_eps if eps is None else eps
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < sde.T:
        raise SolverError(f"eps must be a number in (0, T={sde.T}), got {eps!r}.")
    return float(eps)


def sample(sde: SDE, score_fn: ScoreFn, shape=None, solver: str = "pf_ode", steps: int | None = None,
           eps: float | None = None, z: Tensor | None = None, seed: int | None = None,
           device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
           index_offset: int = 0, trajectory: int = 0, progress: bool = False, sigma_data: float | None = None,
           cond: dict[str, Any] | None = None, guidance_scale: float | None = None, classifier: Callable | None = None,
           classifier_scale: float | None = None, dynamic_threshold: float | None = None,
           **options: Any) -> SampleResult:
    """Draw samples by running ``solver`` from the prior at t = T down to t = eps.

    Args:
        sde: the forward SDE (``sde_lib.VPSDE``, ``subVPSDE`` or ``VESDE``).
        score_fn: ``score_fn(x, t, **cond)`` with x (B, ...) and t (B,), returning the score, shape of x.
        shape: (B, ...) of the batch to draw; may be omitted when z is given.
        solver: a name from :func:`available`.
        steps: the number of steps (default: ``sde.N`` for the discrete samplers, the fixed-grid
            ODE methods' own default; adaptive ODE methods take rtol/atol instead).
        eps: the final time (None: 1e-3 for VP and sub-VP, 1e-5 for VE). Samplers that walk the
            discrete chain (ancestral, reverse_diffusion, pc, ald) end where the chain ends instead.
        z: the starting prior noise (B, ...); drawn from the seed when None.
        seed: seed of all noise; the same seed gives the same samples, and sample b's noise
            depends only on (seed, index_offset + b). None draws one from torch's global RNG.
        device, dtype: where and in what precision to sample (default: z's, else CPU float32).
        index_offset: global index of the first sample, for splitting one run across processes.
        trajectory: record the first this-many samples at every score evaluation (for plots;
            costs a copy per evaluation).
        progress: show a progress bar over t (on stderr).
        sigma_data: the data's per-dimension std, which the ``focus`` grid and the ``angle`` variable
            use; None: the model's own ``sigma_data`` attribute when it declares one (``ScoreModel``,
            ``MixtureScore``), else 1.0 (``DEFAULT_SIGMA_DATA``).
        cond: conditioning inputs passed to every call as ``score_fn(x, t, **cond)``; None: none.
            ``cond["y"]``: class labels, an int or (B,) int64 in [0, K), −1 for an unconditional row.
        guidance_scale: w of classifier-free guidance, s + w (s(·, y) − s); None: 1 (the conditional model)
            without a classifier, 0 with one. Needs ``cond["y"]``. See ``solvers.guidance``.
        classifier: ``clf(x, t) -> logits (B, K)``, a noise-conditional classifier whose
            γ ∇ₓ log softmax(clf)_y is added to the score (classifier guidance); None: none.
        classifier_scale: γ (default 1).
        dynamic_threshold: quantile p ∈ (0, 1) of |x̂₀| for dynamic thresholding of data in [−1, 1]; None: off.
        **options: the solver's options (``solvers.get_solver(name).Options`` lists them).

    Returns:
        :class:`SampleResult` with ``.samples`` and ``.nfe`` (score evaluations counted).
    """
    cls = get_solver(solver)
    instance = cls(**options)
    cls.check_sde(sde)
    _check_steps(steps)
    eps = resolve_eps(sde, eps)
    if z is not None:
        if not torch.is_tensor(z):
            raise SolverError(f"z must be a torch.Tensor, got {type(z).__name__}.")
        if shape is not None and tuple(z.shape) != tuple(shape):
            raise SolverError(f"z has shape {tuple(z.shape)} but shape={tuple(shape)} was asked for.")
        shape, device, dtype = tuple(z.shape), z.device, z.dtype
    if shape is None:
        raise SolverError("give the batch shape (B, ...) as shape=, or the prior noise as z=.")
    shape = tuple(shape)
    if len(shape) < 2 or any(not isinstance(n, int) or n < 1 for n in shape):
        raise SolverError(f"shape must be (B, ...) with positive integer sizes, e.g. (1000, 2); got {shape}.")
    if cond is not None and not isinstance(cond, dict):
        raise SolverError(f"cond must be a dict of conditioning inputs by name, got {type(cond).__name__}.")
    guided = (cond or {}).get("y") is not None or any(
        v is not None for v in (guidance_scale, classifier, classifier_scale, dynamic_threshold))
    if guided:   # checked here, before any draw or model call
        from solvers.guidance import GuidedScore
        model = GuidedScore(score_fn, sde, cond or {}, shape[0], guidance_scale=guidance_scale,
                            classifier=classifier, classifier_scale=classifier_scale,
                            dynamic_threshold=dynamic_threshold)
        sigma_data, score_fn, cond = resolve_sigma_data(score_fn, sigma_data), model, None
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    noise = NoiseSource(seed, index_offset)
    if z is None:
        z = sde.prior_std * noise.normal(shape, dtype=dtype, device=device)
    else:
        noise.skip()  # draw 0 is the prior's: later draws keep their numbers whether or not z is given
    if not isinstance(trajectory, int) or isinstance(trajectory, bool) or trajectory < 0:
        raise SolverError(f"trajectory must be a non-negative integer, got {trajectory!r}.")
    bar = TimeProgress(sde.T, eps, f"sampling ({solver})") if progress else None
    score = CountedScore(score_fn, record=trajectory, progress=bar, cond=cond, sigma_data=sigma_data)
    start = time.perf_counter()
    try:
        with torch.no_grad():  # sampling never needs a graph; a trainable model would otherwise build one per NFE
            x = instance.run(sde, score, z, eps, steps, noise)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    check_finite(x, f"the samples of solver '{solver}'")
    path = None
    if trajectory:
        visited = [*score.visited, (instance.end_time(eps), x[:trajectory].detach().clone())]
        path = (torch.tensor([t for t, _ in visited], dtype=torch.float64), torch.stack([v for _, v in visited]))
    return SampleResult(samples=x, nfe=score.nfe, seconds=seconds, solver=solver, seed=seed, z=z, trajectory=path)
