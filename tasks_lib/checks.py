"""The whole composed config checked before any work: every setting a task will use, in one pass.

A mistake found here costs nothing: no model is loaded, no sample drawn, nothing written. Each
message names the key (``likelihood.n_eval: must be a positive number of test points, got 0.``).
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

import solvers
from core_lib import UserError, build_options
from tasks_lib.model_source import build_sde
from tasks_lib.sample import dtype_of, likelihood_config
from tasks_lib.schema import TASK_SCHEMAS
from training import check_train_config

__all__ = ["check_config", "check_device"]


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


def check_config(cfg: DictConfig) -> None:
    """Every setting the task of ``cfg`` will use, checked before it starts; the first problem is a UserError."""
    check_device(cfg.device)
    dtype_of(cfg)
    build_sde(cfg.sde)
    name = cfg.task.name
    task = OmegaConf.to_container(cfg.task, resolve=True)
    if name == "train":
        check_train_config(task)
    else:
        build_options(TASK_SCHEMAS[name], task, f"task={name}", UserError)
    if name != "sample" or cfg.task.likelihood:
        likelihood_config(cfg).validate()
    if name == "sample":
        steps = cfg.solver.steps
        if steps is not None and steps < 1:
            raise UserError(f"solver.steps: must be a positive integer or null, got {steps}.")
        solvers.get_solver(cfg.solver.name)(**OmegaConf.to_container(cfg.solver.options, resolve=True))
