"""The application layer behind ``run.py``: typed config schemas, model resolution and the tasks.

``TASKS`` maps each ``task=<name>`` to ``fn(cfg, run_dir, overridden) -> metrics``, where
``overridden`` holds the config keys set on the command line (a checkpoint's own settings yield
only to those). :func:`compose` builds the config from Python, as the command line would.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tasks_lib.compare import compare_task
from tasks_lib.model_source import ResolvedModel, overridden_keys, resolve_model
from tasks_lib.report import summary
from tasks_lib.sample import likelihood_task, sample_task
from tasks_lib.schema import register_configs

__all__ = ["TASKS", "compose", "register_configs", "resolve_model", "ResolvedModel", "overridden_keys", "summary"]

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def train_task(cfg: DictConfig, run_dir: Path, overridden: set[str]) -> dict[str, Any]:
    """``task=train``: ``training.train`` (it writes its own checkpoints, logs and metrics.json)."""
    from training import train

    if cfg.ckpt != "pretrained":
        raise ValueError(f"ckpt={cfg.ckpt} does not apply to task=train; continue a run with "
                         "task.resume=<run dir>/checkpoints/last.pt, or drop ckpt.")
    return train(cfg, run_dir)


TASKS = {"sample": sample_task, "likelihood": likelihood_task, "compare": compare_task, "train": train_task}


def compose(*overrides: str) -> DictConfig:
    """The config ``python run.py <overrides>`` would run with (hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))
