"""The whole composed config checked before any work: every setting a task will use, in one pass.

A mistake found here costs nothing: no model is loaded, no sample drawn, nothing written. Each
message names the key (``likelihood.n_eval: must be a positive number of test points, got 0.``).
"""
from __future__ import annotations

import importlib.util
import os
import shutil

import torch
from omegaconf import DictConfig, OmegaConf

from core_lib import UserError, build_options, distributed
from evaluation import LOGGERS
from models.networks import PRECISIONS
from tasks_lib.calibrate import check_calibration
from tasks_lib.export import export_source
from tasks_lib.inpaint import check_inpaint
from tasks_lib.model_source import build_sde, diffusers_request, keys_in
from tasks_lib.sample import calibrated_warp, check_solver_options, dtype_of, likelihood_config
from tasks_lib.schema import TASK_SCHEMAS, GuidanceConfig, InpaintConfig
from training import check_batch_split, check_train_config

__all__ = ["check_config", "check_device", "check_precision", "check_world", "check_logger", "check_guidance",
           "check_labels_setup"]

#: The tasks that draw samples and so take ``guidance.*``; the others refuse it rather than ignore it.
GUIDED_TASKS = ("sample", "compare")
NO_GUIDANCE_TASKS = ("likelihood", "train", "export")


def check_device(name: str) -> torch.device:
    """``device`` as a torch.device that exists on this machine, or one line saying what is there."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"device: {name!r} is not a device ({str(err).splitlines()[0]}); use cpu, cuda, cuda:1, mps, "
                        "...") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device: {name} is not available (torch {torch.__version__} sees no CUDA device); "
                            "use device=cpu.")
        if device.index is not None and device.index >= count:
            raise UserError(f"device: {name} does not exist (this machine has {count} CUDA device(s): cuda:0.."
                            f"cuda:{count - 1}).")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"device: {name} is not available on this machine; use device=cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device: {name} is not supported; use cpu, cuda or mps.")
    return device


def check_precision(precision: str, compile: bool, device: torch.device) -> None:
    """``precision`` and ``compile`` that this device can run, or one line saying what can."""
    if precision not in PRECISIONS:
        raise UserError(f"precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"precision=fp16 needs a CUDA device (device={device}); on CPU keep precision=fp32 (bf16 pays "
                        "off only on CPUs with bf16 instructions).")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("precision=bf16: this GPU has no bfloat16 support; use precision=fp16 or fp32.")
    if compile:
        try:
            import torch._dynamo as dynamo
            supported = dynamo.is_dynamo_supported()
        except Exception:   # an interpreter or build torch.compile does not support
            supported = False
        if not supported or device.type == "mps":
            raise UserError(f"compile=true: torch.compile is not supported here (torch {torch.__version__}, "
                            f"device {device}); drop it (compile=false).")
        compiler = os.environ.get("CXX", "g++")
        if device.type == "cpu" and not any(shutil.which(c) for c in (compiler, "c++", "clang++")):
            raise UserError("compile=true on CPU needs a C++ compiler (torch.compile's CPU backend builds C++), and none "
                            "is on PATH; install one (g++) or drop it (compile=false).")


def check_world(cfg: DictConfig) -> None:
    """Under torchrun: every count the task splits across the ranks has at least one item per rank."""
    world = distributed.world_size()
    if world == 1:
        return
    name, tc = cfg.task.name, cfg.task
    if name == "train":
        check_batch_split(tc.batch_size)
    if name in ("sample", "compare") and tc.n_samples < world:
        raise UserError(f"task.n_samples={tc.n_samples} is fewer than the {world} processes that share it; ask for at "
                        "least one sample per process, or start fewer processes.")
    if (name in ("likelihood", "compare") or name == "sample" and tc.likelihood) and cfg.likelihood.n_eval < world:
        raise UserError(f"likelihood.n_eval={cfg.likelihood.n_eval} is fewer than the {world} processes that share it; "
                        "score at least one point per process, or start fewer processes.")


def check_logger(logger: str) -> None:
    """``logger`` is one of ``evaluation.LOGGERS``, and the package it writes with is installed."""
    if logger not in LOGGERS:
        raise UserError(f"logger: must be one of {', '.join(LOGGERS)}, got {logger!r}.")
    if logger == "tensorboard":
        missing = 'logger=tensorboard needs the tensorboard package: pip install -e ".[tensorboard]"'
        if importlib.util.find_spec("tensorboard") is None:
            raise UserError(missing)
        try:   # the import the first log row would do: a broken install fails before any work too
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as err:
            raise UserError(f"{missing} (importing it failed: {str(err).splitlines()[0]})") from None


def check_guidance(cfg: DictConfig) -> GuidanceConfig:
    """``guidance.*`` on its own (ranges, a classifier file that exists) and for the task; what fits the model
    is checked once it is loaded (``tasks_lib.model_source.resolve_guidance``)."""
    guidance = build_options(GuidanceConfig, OmegaConf.to_container(cfg.guidance, resolve=True), "guidance", UserError)
    name = cfg.task.name
    set_keys = [f"guidance.{k}" for k in ("y", "scale", "classifier", "threshold") if getattr(guidance, k) is not None]
    if set_keys and name in NO_GUIDANCE_TASKS:
        raise UserError(f"{', '.join(set_keys)} applies to task={' and task='.join(GUIDED_TASKS)}, which draw samples; "
                        f"drop it for task={name}.")
    if name == "compare" and cfg.task.guidance_scales and guidance.scale is not None:
        raise UserError(f"task.guidance_scales={list(cfg.task.guidance_scales)} sweeps the guidance scale, so "
                        f"guidance.scale={guidance.scale} would be ignored; give one of the two.")
    if guidance.classifier is not None and not os.path.isfile(guidance.classifier):
        raise UserError(f"guidance.classifier: no classifier file at {guidance.classifier}; give the .pt written by "
                        "`python run.py task=train_classifier` (or drop guidance.classifier).")
    return guidance


def check_labels_setup(cfg: DictConfig) -> None:
    """``model.num_classes`` and ``task.label_dropout`` of a training run on their own (the data's classes are
    checked against them once it is loaded, ``training.check_conditioning``)."""
    K = cfg.model.get("num_classes", 0)
    if K < 0:
        raise UserError(f"model.num_classes: must be 0 (unconditional) or the data's number of classes K, got {K}.")
    if cfg.task.name == "train" and K == 0 and cfg.task.get("label_dropout") is not None:
        raise UserError(f"task.label_dropout={cfg.task.label_dropout} applies to class-conditional models; set "
                        "model.num_classes=K (the data's class count) or drop task.label_dropout.")


#: where a solver the command line sets would go unused: what the task runs instead
_SOLVER_UNUSED = {
    "compare": "task=compare runs each of task.samplers at each of task.budgets with its defaults: list the solver "
               "there (task.samplers=[...]), or drop it",
    "likelihood": "task=likelihood integrates with likelihood.method (a fixed budget: likelihood.method=multistep "
                  "likelihood.steps=N), or drop it",
}


def check_solver_applies(cfg: DictConfig, overridden: set[str]) -> None:
    """A ``solver``/``solver.*`` setting from the command line that the task would ignore is refused, not dropped."""
    set_here = keys_in(overridden, "solver")
    name = cfg.task.name
    replace = name == "inpaint" and cfg.inpaint.method == "replace"
    if name == "calibrate" and "solver.steps" in set_here:
        raise UserError("solver.steps does not apply to task=calibrate, which fits a warp for each of task.budgets: "
                        "set task.budgets=[N, ...] instead.")
    if replace and "solver.steps" in set_here:
        raise UserError("solver.steps does not apply to task=inpaint, whose solver takes task.steps: set "
                        "task.steps=N instead.")
    if not set_here or name in ("sample", "calibrate") or replace:
        return
    if name == "inpaint":
        instead = (f"inpaint.method={cfg.inpaint.method} samples with its own sampler: set inpaint.method=replace to "
                   "use the solver, or drop it")
    else:
        instead = _SOLVER_UNUSED.get(name, f"task={name} draws no samples with it: drop it")
    raise UserError(f"{set_here[0]} applies to task=sample and to task=inpaint with inpaint.method=replace; {instead}.")


def check_config(cfg: DictConfig, overridden: set[str] | None = None) -> None:
    """Every setting the task of ``cfg`` will use, checked before it starts; the first problem is a UserError.

    ``overridden``: the keys the command line set (``overridden_keys``); a ``ckpt=diffusers:DIR`` is checked
    against them (``diffusers_request``: its scheduler's SDE, its UNet, data for the held-out likelihood).
    """
    device = check_device(cfg.device)
    check_logger(cfg.logger)
    check_precision(cfg.precision, cfg.compile, device)
    check_world(cfg)
    dtype_of(cfg)
    build_sde(cfg.sde)
    diffusers_request(cfg, overridden or set())
    name = cfg.task.name
    task = OmegaConf.to_container(cfg.task, resolve=True)
    if name == "train":
        check_train_config(task)
    else:
        build_options(TASK_SCHEMAS[name], task, f"task={name}", UserError)
    if name not in ("sample", "inpaint") or name == "sample" and cfg.task.likelihood:
        likelihood_config(cfg).validate()
    if name == "compare":
        for key in ("refine", "control_variate"):
            if cfg.likelihood[key] not in (None, False):
                raise UserError(f"likelihood.{key}={cfg.likelihood[key]} does not apply to task=compare, whose NLL "
                                "column runs each solver's own integrator at its budget; use it with task=likelihood, "
                                "or drop it.")
    check_guidance(cfg)
    check_labels_setup(cfg)
    if name == "export":
        export_source(cfg)
    build_options(InpaintConfig, OmegaConf.to_container(cfg.inpaint, resolve=True), "inpaint", UserError)
    set_here = keys_in(overridden or set(), "inpaint")
    if set_here and name != "inpaint":
        raise UserError(f"{set_here[0]} applies to task=inpaint only; add task=inpaint, or drop it.")
    if name == "inpaint":
        check_inpaint(cfg, overridden or set())
    check_solver_applies(cfg, overridden or set())
    if name == "sample":
        steps = cfg.solver.steps
        if steps is not None and steps < 1:
            raise UserError(f"solver.steps: must be a positive integer or null, got {steps}.")
        check_solver_options(cfg)
        calibrated_warp(cfg)
    if name == "calibrate":
        check_calibration(cfg)
