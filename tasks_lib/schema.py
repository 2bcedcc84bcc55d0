"""Typed schemas for every config group, registered in hydra's ConfigStore.

A misspelt key or a value of the wrong type then fails when hydra composes the config, with
hydra's own message, before anything runs. The schemas of the library groups are generated from
the library's own declarations, so a hyperparameter is declared (and documented) once:

- ``sde/<name>``: the SDE class's constructor signature (``sde_lib``);
- ``solver/<name>``: the solver's ``Options`` dataclass (``solvers``);
- ``data/<name>``: the data set's options dataclass (``data_lib``);
- ``model/<kind>``: the network's constructor signature (``models``);
- ``task/<name>``: :class:`SampleTask`, :class:`LikelihoodTask`, :class:`CompareTask`, :class:`ExportTask`
  below and ``training.TrainConfig``; the top level is :class:`Config`.

Each ``conf/<group>/<choice>.yaml`` starts from its schema (``defaults: [/schema/<group>/<choice>@_here_]``),
so the schemas are not choices of their own.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

import sde_lib
import solvers
from solvers.inpaint import METHODS as INPAINT_METHODS
from core_lib import finite_positive, option_fields, require
from data_lib import DATASETS
from evaluation import LikelihoodConfig
from models.checkpoint import EXPORT_FORMATS
from models.classifier import CLASSIFIERS
from models.networks import DERIVED_ARGS, EMBEDDINGS, NETWORKS
from training.config import TrainConfig

__all__ = ["Config", "LikelihoodConfig", "GuidanceConfig", "SampleTask", "LikelihoodTask", "CompareTask", "CalibrateTask",
           "ExportTask", "TrainClassifierTask", "InpaintTask",
           "register_configs",
           "TASK_SCHEMAS", "model_schema"]


@dataclasses.dataclass
class SampleTask:
    """``task=sample``: draw samples with the chosen SDE and solver, then score held-out data."""

    name: str = "sample"
    n_samples: int = 5000       # samples to draw
    eps: Optional[float] = None  # final time of sampling; null: 1e-3 (VP, sub-VP) or 1e-5 (VE)
    trajectories: int = 8       # paths drawn in trajectories.png (0: none; at most n_samples)
    likelihood: bool = True     # also the ODE log-likelihood of likelihood.n_eval test points
    calibration: Optional[str] = None   # grid_calibration.json of task=calibrate: the solve takes its warp for
                                        # solver.steps (same solver, options and eps); null: the solver's own grid

    def validate(self) -> None:
        require(self.n_samples >= 1, "task.n_samples", self.n_samples, "must be a positive integer")
        require(self.eps is None or (finite_positive(self.eps) and self.eps < 1), "task.eps", self.eps,
                "must be null or in (0, T = 1)")
        require(self.trajectories >= 0, "task.trajectories", self.trajectories, "must be a non-negative integer")


@dataclasses.dataclass
class LikelihoodTask:
    """``task=likelihood``: the ODE log-likelihood (nats, bits/dim) of held-out data."""

    name: str = "likelihood"


@dataclasses.dataclass
class GuidanceConfig:
    """``guidance.*``: class-conditional sampling and guidance for ``task=sample`` and ``task=compare``
    (``solvers.sample(cond={"y": y}, guidance_scale=, classifier=, classifier_scale=, dynamic_threshold=)``).

    The guided score is s(x, t) + w (s(x, t, y) − s(x, t)) + γ ∇ₓ log p_t(y | x) (docs/math.md §10).
    """

    y: Optional[int] = None             # the class every sample is drawn for, 0..K-1; null: none, or with scale or
                                        # classifier set an even split of the samples over all K classes
    scale: Optional[float] = None       # w, classifier-free guidance (a conditional model); null: 1 (the conditional
                                        # model), or 0 with a classifier
    classifier: Optional[str] = None    # a noise-conditional classifier (.pt of task=train_classifier) for classifier
                                        # guidance; null: none
    classifier_scale: float = 1.0       # γ, the weight of the classifier's ∇ log p_t(y | x)
    threshold: Optional[float] = None   # dynamic thresholding of x̂₀ (images in [-1, 1]): the quantile p of |x̂₀|,
                                        # e.g. 0.995 (the 99.5th percentile); null: off

    def validate(self) -> None:
        """The settings on their own (what fits the model is checked when it is loaded, ``resolve_guidance``)."""
        require(self.y is None or self.y >= 0, "guidance.y", self.y, "must be a class label 0..K-1 or null")
        require(self.scale is None or math.isfinite(self.scale), "guidance.scale", self.scale,
                "must be a finite number or null")
        require(math.isfinite(self.classifier_scale), "guidance.classifier_scale", self.classifier_scale,
                "must be a finite number")
        require(self.classifier is not None or self.classifier_scale == 1.0, "guidance.classifier_scale",
                self.classifier_scale, "weighs a classifier's gradient: give guidance.classifier=PATH too")
        require(self.threshold is None or 0 < self.threshold < 1, "guidance.threshold", self.threshold,
                "must be a quantile in (0, 1), e.g. 0.995, or null")

    @property
    def active(self) -> bool:
        """Whether any setting differs from plain unconditional sampling."""
        return any(v is not None for v in (self.y, self.scale, self.classifier, self.threshold))


@dataclasses.dataclass
class CompareTask:
    """``task=compare``: several samplers at several NFE budgets from the same noise, in one table."""

    name: str = "compare"
    samplers: List[str] = dataclasses.field(default_factory=lambda: [
        "ancestral", "euler_maruyama", "pc", "ddim", "multistep", "pf_ode_euler", "pf_ode_rk4", "pf_ode"])  # solver names or compare.PRESETS
    budgets: List[int] = dataclasses.field(default_factory=lambda: [10, 20, 50, 100, 200])  # NFE per sample
    n_samples: int = 2000       # samples per sampler and budget, all from the same prior noise
    eps: Optional[float] = None  # final time; null: 1e-3 (VP, sub-VP) or 1e-5 (VE)
    reference_rtol: float = 1e-7  # tolerance of the dopri5 PF-ODE solution the ODE samplers are measured against
    guidance_scales: List[float] = dataclasses.field(default_factory=list)  # a sweep of guidance.scale (w), one row
                                  # per sampler x budget x scale; []: guidance.scale alone

    def validate(self) -> None:
        require(self.n_samples >= 1, "task.n_samples", self.n_samples, "must be a positive integer")
        require(len(self.budgets) > 0 and all(b >= 1 for b in self.budgets), "task.budgets", list(self.budgets),
                "must be positive NFE counts")
        require(all(math.isfinite(w) for w in self.guidance_scales), "task.guidance_scales",
                list(self.guidance_scales), "must be finite numbers (classifier-free guidance scales w)")
        require(self.eps is None or (finite_positive(self.eps) and self.eps < 1), "task.eps", self.eps,
                "must be null or in (0, T = 1)")
        require(finite_positive(self.reference_rtol), "task.reference_rtol", self.reference_rtol,
                "must be a finite positive number")


@dataclasses.dataclass
class CalibrateTask:
    """``task=calibrate``: a warp of the solver's grid fitted to the model at each budget (``solvers.calibrate``),
    written to ``grid_calibration.json`` for ``task=sample task.calibration=PATH``."""

    name: str = "calibrate"
    budgets: List[int] = dataclasses.field(default_factory=lambda: [5, 10, 20])  # steps to fit a warp for
    pilot: int = 256            # pilot samples the warps are fitted on (drawn from seed)
    evaluations: int = 200      # Nelder–Mead's solves of the pilot per budget
    knots: int = 8              # knots of each warp (at most one per step)
    eps: Optional[float] = None  # final time; null: 1e-3 (VP, sub-VP) or 1e-5 (VE); the samples must use the same
    reference_rtol: Optional[float] = None  # tolerance of the pilot's exact flow (pf_ode, dopri8); null: 1e-8 with
                                            # dtype=float64, 1e-6 with float32

    def validate(self) -> None:
        require(len(self.budgets) > 0 and all(b >= 2 for b in self.budgets), "task.budgets", list(self.budgets),
                "must be step counts ≥ 2")
        require(self.pilot >= 2, "task.pilot", self.pilot, "must be an integer ≥ 2")
        require(self.evaluations >= 2, "task.evaluations", self.evaluations, "must be an integer ≥ 2")
        require(self.knots >= 1, "task.knots", self.knots, "must be a positive integer")
        require(self.eps is None or (finite_positive(self.eps) and self.eps < 1), "task.eps", self.eps,
                "must be null or in (0, T = 1)")
        require(self.reference_rtol is None or finite_positive(self.reference_rtol) and self.reference_rtol < 1,
                "task.reference_rtol", self.reference_rtol, "must be null or in (0, 1)")


@dataclasses.dataclass
class ExportTask:
    """``task=export``: the EMA weights of ``ckpt`` as a sampling-only model in the run directory, for any ``ckpt=``."""

    name: str = "export"
    format: str = "safetensors"  # safetensors: export/ holding model.safetensors + config.json; pt: export/model.pt

    def validate(self) -> None:
        require(self.format in EXPORT_FORMATS, "task.format", self.format,
                f"must be one of {', '.join(EXPORT_FORMATS)}")


@dataclasses.dataclass
class TrainClassifierTask:
    """``task=train_classifier``: a noise-conditional classifier p(y | x_t, t) of the data's labels, for classifier
    guidance (docs/guidance.md). Its SDE (``sde``) and time input (``model.time_input``) are the score model's;
    its network is set here."""

    name: str = "train_classifier"
    net: Optional[str] = None   # mlp or conv; null: conv for images (C, H, W), mlp for other data
    hidden: Optional[int] = None  # mlp: residual width (null: 128); conv: channels of the first level (null: 32)
    depth: int = 2              # mlp: residual blocks; conv: levels (channels hidden x 1, 2, 4, ...)
    embedding: str = "fourier"  # time embedding: fourier or sinusoidal
    steps: int = 2000           # optimisation steps
    batch_size: int = 512       # training pairs (x_t, y) per step
    lr: float = 2e-3            # Adam learning rate: linear warmup over 100 steps, then cosine decay to 0
    ema_decay: float = 0.999    # EMA of the weights; the saved classifier is the average
    eps: float = 1e-5           # smallest t: t ~ U(eps, T), as the score training draws it
    # held-out accuracy at these t
    eval_times: List[float] = dataclasses.field(default_factory=lambda: [1e-5, 0.1, 0.3, 0.5, 0.9])
    log_every: int = 100        # rows of train_log.csv

    def validate(self) -> None:
        require(self.net is None or self.net in CLASSIFIERS, "task.net", self.net,
                f"must be null or one of {', '.join(CLASSIFIERS)}")
        require(self.embedding in EMBEDDINGS, "task.embedding", self.embedding,
                f"must be one of {', '.join(EMBEDDINGS)}")
        require(self.hidden is None or self.hidden >= 1, "task.hidden", self.hidden,
                "must be null or a positive integer")
        for key in ("depth", "steps", "batch_size", "log_every"):
            require(getattr(self, key) >= 1, f"task.{key}", getattr(self, key), "must be a positive integer")
        for key in ("lr", "eps"):
            require(finite_positive(getattr(self, key)), f"task.{key}", getattr(self, key),
                    "must be a finite positive number")
        require(self.eps < 1, "task.eps", self.eps, "must be below T = 1")
        require(0 <= self.ema_decay < 1, "task.ema_decay", self.ema_decay, "must be in [0, 1)")
        require(len(self.eval_times) > 0 and all(0 <= t <= 1 for t in self.eval_times), "task.eval_times",
                list(self.eval_times), "must be times in [0, T = 1]")


@dataclasses.dataclass
class InpaintTask:
    """``task=inpaint``: fill in masked entries of held-out test points (``solvers.inpaint``, docs/inpainting.md);
    what to hide and how to fill it in are ``inpaint.*`` (:class:`InpaintConfig`)."""

    name: str = "inpaint"
    n_samples: int = 64         # held-out test points to complete (a seeded choice)
    steps: Optional[int] = None  # steps of the reverse chain; null: 100 for smc, the solver's default for replace
    eps: Optional[float] = None  # final time; null: 1e-3 (VP, sub-VP) or 1e-5 (VE)

    def validate(self) -> None:
        require(self.n_samples >= 1, "task.n_samples", self.n_samples, "must be a positive integer")
        require(self.steps is None or self.steps >= 1, "task.steps", self.steps, "must be null or a positive integer")
        require(self.eps is None or (finite_positive(self.eps) and self.eps < 1), "task.eps", self.eps,
                "must be null or in (0, T = 1)")


@dataclasses.dataclass
class InpaintConfig:
    """``inpaint.*``: the mask and the method of ``task=inpaint`` (``python run.py task=inpaint inpaint.mask=center``)."""

    mask: str = "left_half"     # left_half, center, random:p (each entry unknown with probability p) or a .npy/.png FILE (1/white = known)
    method: str = "smc"         # smc (twisted SMC, asymptotically exact) or replace (score_sde's, with solver=)
    particles: int = 16         # method=smc: particles per completion (each step evaluates them all in one batch)

    def validate(self) -> None:
        require(self.method in INPAINT_METHODS, "inpaint.method", self.method,
                f"must be one of {', '.join(INPAINT_METHODS)}")
        require(self.particles >= 1, "inpaint.particles", self.particles, "must be a positive integer")


TASK_SCHEMAS = {"sample": SampleTask, "likelihood": LikelihoodTask, "compare": CompareTask, "train": TrainConfig,
                "calibrate": CalibrateTask, "export": ExportTask, "train_classifier": TrainClassifierTask,
                "inpaint": InpaintTask}


@dataclasses.dataclass
class Config:
    """The top level of ``conf/config.yaml``; the groups (sde, solver, data, model, task) have schemas of their own."""

    sde: Any = MISSING
    solver: Any = MISSING
    data: Any = MISSING
    model: Any = MISSING
    task: Any = MISSING
    ckpt: str = "pretrained"    # the model: pretrained (shipped, per data and SDE), exact (the data's exact score), a checkpoint (.pt, or task=export's directory), or diffusers:DIR (a diffusers pipeline)
    seed: int = 0               # seeds every draw: the same seed gives the same samples and the same training run
    device: str = "cpu"         # cpu, cuda, cuda:1, ...
    dtype: str = "float32"      # float32 or float64 (sampling and likelihood)
    precision: str = "fp32"     # the network's forward: fp32, bf16 or fp16 (autocast; fp16 needs CUDA); solver state stays in dtype
    compile: bool = False       # run the network through torch.compile (needs a C++ compiler on CPU)
    logger: str = "csv"         # task=train's logs: csv (train_log.csv, eval_log.csv) or tensorboard (also tensorboard/)
    likelihood: LikelihoodConfig = dataclasses.field(default_factory=LikelihoodConfig)
    inpaint: InpaintConfig = dataclasses.field(default_factory=InpaintConfig)
    guidance: GuidanceConfig = dataclasses.field(default_factory=GuidanceConfig)


def _omegaconf_type(annotation: Any) -> Any:
    """The nearest type OmegaConf can check: Literals are strings, tuples lists, other unions untyped."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return type(args[0]) if len({type(a) for a in args}) == 1 else Any
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _omegaconf_type(rest[0]) if len(rest) == 1 else Any
        return Optional[inner] if len(rest) < len(args) and inner is not Any else inner
    if origin in (tuple, list):
        elems = {a for a in args if a is not Ellipsis}
        return List[_omegaconf_type(elems.pop())] if len(elems) == 1 else List[Any]
    if annotation in (int, float, bool, str):
        return annotation
    return Any


def _default(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        items = list(value)
        return dataclasses.field(default_factory=lambda: list(items))
    return value


def _schema(name: str, fields: list[tuple[str, Any, Any]]) -> type:
    return dataclasses.make_dataclass(name, [(n, t, _default(d)) for n, t, d in fields])


def _signature_fields(fn, skip: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(fn)
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in ("self", *skip) or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = MISSING if p.default is p.empty else p.default
        out.append((p.name, _omegaconf_type(hints.get(p.name, Any)), default))
    return out


def _dataclass_fields(cls) -> list[tuple[str, Any, Any]]:
    return [(name, _omegaconf_type(hint), default) for name, hint, default in option_fields(cls)]


def sde_schema(choice: str) -> type:
    cls = sde_lib.SDES[choice]
    return _schema(f"{cls.__name__}Config", [("_target_", str, f"{cls.__module__}.{cls.__qualname__}"),
                                             *_signature_fields(cls.__init__, ())])


def solver_schema(name: str) -> type:
    options = _schema(f"{name}_options", _dataclass_fields(solvers.get_solver(name).Options))
    return _schema(f"{name}_solver", [("name", str, name), ("steps", Optional[int], None),
                                      ("options", options, dataclasses.field(default_factory=options))])


def data_schema(name: str) -> type:
    options_cls, _ = DATASETS[name]
    return _schema(f"{name}_data", [("name", str, name), ("n_train", int, 50_000), ("n_test", int, 5_000),
                                    ("hflip", bool, False), ("num_workers", int, 0),
                                    *_dataclass_fields(options_cls)])


def model_schema(kind: str) -> type:
    """``model/<kind>``: kind, parameterisation, time input, ``num_classes`` (K > 0: class-conditional, checked
    against the data's classes by ``task=train``) and ``net``, the network's own constructor arguments."""
    net = _schema(f"{kind}_net", _signature_fields(NETWORKS[kind].__init__, (*DERIVED_ARGS[kind], "num_classes")))
    return _schema(f"{kind}_model", [("kind", str, kind), ("parameterization", str, "x0"),
                                     ("time_input", str, "log_snr"), ("num_classes", int, 0),
                                     ("net", net, dataclasses.field(default_factory=net))])


_registered = False


def register_configs() -> None:
    """Store every schema in hydra's ConfigStore (idempotent); call before composing ``conf/``."""
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for choice in sde_lib.SDES:
        cs.store(group="schema/sde", name=choice, node=sde_schema(choice))
    for name in solvers.available():
        cs.store(group="schema/solver", name=name, node=solver_schema(name))
    for name in DATASETS:
        cs.store(group="schema/data", name=name, node=data_schema(name))
    for kind in NETWORKS:
        cs.store(group="schema/model", name=kind, node=model_schema(kind))
    for name, node in TASK_SCHEMAS.items():
        cs.store(group="schema/task", name=name, node=node)
    _registered = True
