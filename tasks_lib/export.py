"""``task=export``: any ``ckpt=`` as a sampling-only model in the run directory.

``task.format=safetensors`` (the default) writes ``export/`` holding ``model.safetensors`` (the EMA
weights under their ``state_dict`` names) and ``config.json`` (format tag, ``model_spec``, step, the
training config, a SHA-256 per weight), the directory layout of diffusers' ``save_pretrained``;
``task.format=pt`` writes ``export/model.pt`` in this project's checkpoint format. Either loads with
``models.load_checkpoint`` and as ``ckpt=`` in every task, and samples bit for bit like its source.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from core_lib import UserError, distributed
from evaluation import RunOutput
from models import CheckpointError, load_checkpoint
from sde_lib import sde_name
from tasks_lib.model_source import build_sde, shipped_checkpoint

__all__ = ["export_task", "EXPORT_NAMES"]

#: What each ``task.format`` writes, relative to the run directory.
EXPORT_NAMES = {"safetensors": "export", "pt": "export/model.pt"}


def export_source(cfg: DictConfig) -> Path:
    """The checkpoint ``cfg.ckpt`` names: a path, or for ``pretrained`` the shipped model of the data and SDE.

    Unlike ``resolve_model`` it loads no data: a model exports on a machine without its training data.
    ``check_config`` calls it, so ckpt=exact or a missing pretrained model is refused before any work.
    """
    if cfg.ckpt == "exact":
        raise UserError("task=export writes a trained network, and ckpt=exact is the data's exact score (no weights); "
                        "give ckpt=<run dir>/checkpoints/last.pt or ckpt=pretrained.")
    if cfg.ckpt != "pretrained":
        return Path(cfg.ckpt)
    return shipped_checkpoint(cfg.data.name, sde_name(build_sde(cfg.sde)), "give ckpt=<run dir>/checkpoints/last.pt.")


def export_task(cfg: DictConfig, run_dir: Path, overridden: set[str]) -> dict[str, Any]:
    """Export the model ``cfg.ckpt`` names (a run's checkpoint, an export, or the pretrained one), read back.

    Everything runs on the CPU, whatever ``device`` says: an export holds CPU tensors.
    """
    out = RunOutput(run_dir)
    cpu, fmt = torch.device("cpu"), cfg.task.format
    source = export_source(cfg)
    model = load_checkpoint(source, cpu)
    written = out.export(EXPORT_NAMES[fmt], source, fmt)
    metrics = {"task": "export", "sde": type(model.sde).__name__, "data": model.data.get("name"),
               "model": "pretrained" if cfg.ckpt == "pretrained" else "checkpoint", "format": fmt,
               "source": str(source), "export": str(written), "train_steps": model.step,
               "n_params": sum(p.numel() for p in model.score_fn.parameters())}
    if distributed.is_main():   # the export must give back its source's weights, bit for bit
        weights, loaded = model.score_fn.state_dict(), load_checkpoint(written, cpu).score_fn.state_dict()
        if weights.keys() != loaded.keys() or not all(torch.equal(weights[k], loaded[k]) for k in weights):
            raise CheckpointError(f"{written} does not read back as the weights of {source}; this is a bug.")
        metrics["bytes"] = sum(f.stat().st_size for f in ([written] if written.is_file() else written.iterdir()))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["used"] = {"model": metrics["model"], "path": str(source), "train_steps": model.step,
                        "sde": {"class": type(model.sde).__name__, **model.sde.hparams()}}
    out.write_text("config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
    return out.metrics(metrics)
