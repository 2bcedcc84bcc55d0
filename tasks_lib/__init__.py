"""The application layer behind ``run.py``: typed config schemas, model resolution and the tasks.

``TASKS`` maps each ``task=<name>`` to ``fn(cfg, run_dir, overridden) -> metrics``, where
``overridden`` holds the config keys set on the command line (a checkpoint's own settings yield
only to those). :func:`compose` builds the config from Python, as the command line would.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from core_lib import UserError, distributed
from evaluation import claim_run_dir, load_data
from models import build_score_model
from tasks_lib.calibrate import calibrate_task
from tasks_lib.checks import check_config, check_device
from tasks_lib.classifier import train_classifier_task
from tasks_lib.compare import compare_task
from tasks_lib.export import export_task
from tasks_lib.inpaint import inpaint_task
from tasks_lib.model_source import ResolvedModel, build_sde, overridden_keys, resolve_model
from tasks_lib.report import summary
from tasks_lib.sample import likelihood_config, likelihood_task, sample_task
from tasks_lib.schema import register_configs
from training import TrainConfig, train

__all__ = ["TASKS", "run_task", "check_config", "check_device", "claim_run_dir", "compose", "register_configs",
           "resolve_model", "ResolvedModel", "overridden_keys", "summary"]

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def train_task(cfg: DictConfig, run_dir: Path, overridden: set[str]) -> dict[str, Any]:
    """``task=train``: the config's SDE, network and data as objects, handed to ``training.train``."""
    if cfg.ckpt != "pretrained":
        raise UserError(f"ckpt={cfg.ckpt} does not apply to task=train; continue a run with "
                        "task.resume=<run dir>/checkpoints/last.pt, or drop ckpt.")
    config = TrainConfig(**OmegaConf.to_container(cfg.task, resolve=True))   # checked by train()
    likelihood = likelihood_config(cfg)
    torch.manual_seed(cfg.seed)   # the network's initialisation (and dropout) draw from the global RNG
    data = load_data(cfg.data, cfg.seed)
    likelihood.divergence_for(data)   # likelihood.divergence=auto against refine/control_variate, before training
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    model = build_score_model(build_sde(cfg.sde), cfg.model.kind, data.event_shape,
                              parameterization=cfg.model.parameterization, time_input=cfg.model.time_input,
                              sigma_data=round(data.train_std(), 6), num_classes=cfg.model.num_classes, **net)
    return train(config, model, data, run_dir, likelihood=likelihood, seed=cfg.seed, device=cfg.device,
                 record=OmegaConf.to_container(cfg, resolve=True), precision=cfg.precision, compile=cfg.compile,
                 logger=cfg.logger)


TASKS = {"sample": sample_task, "likelihood": likelihood_task, "compare": compare_task, "train": train_task,
         "calibrate": calibrate_task, "export": export_task, "train_classifier": train_classifier_task,
         "inpaint": inpaint_task}


def run_task(cfg: DictConfig, run_dir: Path, overridden: set[str]) -> dict[str, Any]:
    """Check the whole config (``check_config``), then run ``cfg.task.name``: what ``python run.py`` does."""
    check_config(cfg, overridden)
    device = distributed.init(cfg.device)   # under torchrun: join the job; cuda becomes this rank's GPU
    cfg.device = str(device)
    if device.type == "cuda" and cfg.precision != "fp32":   # reduced precision asked for: TF32 matmuls too
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return TASKS[cfg.task.name](cfg, run_dir, overridden)


def compose(*overrides: str) -> DictConfig:
    """The config ``python run.py <overrides>`` would run with (hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))
