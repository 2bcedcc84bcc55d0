"""``task=sample`` and ``task=likelihood``: what they compute, the files they write, the metrics they report."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from core_lib import UserError, distributed
from evaluation import (HeldOutLikelihood, LikelihoodConfig, RunOutput, held_out_likelihood, sample_on_ranks,
                        sample_quality, save_samples, save_trajectories)
from tasks_lib.model_source import ResolvedModel, resolve_model

__all__ = ["sample_task", "likelihood_task", "dtype_of", "likelihood_config", "write_config", "header"]


def dtype_of(cfg: DictConfig) -> torch.dtype:
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(cfg.dtype)
    if dtype is None:
        raise UserError(f"dtype must be float32 or float64, got {cfg.dtype!r}; set dtype=float32 or dtype=float64.")
    return dtype


def likelihood_config(cfg: DictConfig) -> LikelihoodConfig:
    """The top-level ``likelihood.*`` as the evaluation's typed settings."""
    return LikelihoodConfig(**OmegaConf.to_container(cfg.likelihood, resolve=True))


def write_config(out: RunOutput, cfg: DictConfig, model: ResolvedModel) -> None:
    """config.yaml: the resolved config, plus the SDE and model actually used (a checkpoint's own)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["used"] = {"model": model.source, "path": model.path, "train_steps": model.train_steps,
                        "sde": {"class": type(model.sde).__name__, **model.sde.hparams()}, "data": _data_name(model),
                        "world_size": distributed.world_size()}
    out.write_text("config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))


def header(cfg: DictConfig, model: ResolvedModel) -> dict[str, Any]:
    """The metrics keys every task reports first: what ran on what."""
    return {"task": cfg.task.name, "sde": type(model.sde).__name__, "data": _data_name(model), "model": model.source,
            "seed": cfg.seed}


def _data_name(model: ResolvedModel) -> str | None:
    return None if model.data is None else model.data.name


#: What ``task=sample`` reports when the model comes without held-out data (a diffusers model given no ``data=``).
NO_DATA_NOTE = ("no data= given: the model comes without held-out data, so sample quality and the test likelihood "
                "are skipped; give data= of the model's sample shape for them")


def _likelihood_metrics(held_out: HeldOutLikelihood) -> dict[str, Any]:
    metrics = {"n_eval": held_out.n_eval, "nll_nats": held_out.nll_nats, "nll_stderr_nats": held_out.nll_stderr_nats,
               "bpd": held_out.bpd, "likelihood_nfe": held_out.nfe, "likelihood_seconds": held_out.seconds}
    if held_out.kl_nats is not None:
        # Paired with the exact density of the same points: the KL(data ‖ model) estimate.
        metrics.update(nll_exact_nats=held_out.exact_nll_nats, kl_nats=held_out.kl_nats)
    return metrics


def sample_task(cfg: DictConfig, run_dir: Path, overridden: set[str]) -> dict[str, Any]:
    """Sample with the chosen SDE and solver; quality against held-out data; the ODE likelihood of test data."""
    out = RunOutput(run_dir)
    device, dtype = torch.device(cfg.device), dtype_of(cfg)
    model = resolve_model(cfg, overridden, device)
    tc = cfg.task
    options = OmegaConf.to_container(cfg.solver.options, resolve=True)
    result = sample_on_ranks(model.sde, model.score_fn, (tc.n_samples, *model.event_shape),
                             solver=cfg.solver.name, steps=cfg.solver.steps, eps=tc.eps, seed=cfg.seed, device=device,
                             dtype=dtype, trajectory=min(tc.trajectories, tc.n_samples), progress=True, **options)
    samples = result.samples.cpu()
    metrics = {**header(cfg, model), "solver": cfg.solver.name, "n_samples": tc.n_samples, "nfe": result.nfe,
               "sample_seconds": result.seconds}
    if model.data is None:
        metrics["note"] = NO_DATA_NOTE
    else:
        metrics.update(sample_quality(samples, model.data, cfg.seed))
    if tc.likelihood and model.data is not None:
        held_out = held_out_likelihood(model.sde, model.score_fn, model.data, likelihood_config(cfg), cfg.seed,
                                       device, dtype, progress=True)
        metrics.update(_likelihood_metrics(held_out))

    write_config(out, cfg, model)
    out.write_npz("samples.npz", samples=samples.numpy(), z=result.z.cpu().numpy())
    title = f"{metrics['sde']}, {cfg.solver.name}: {result.nfe} NFE"
    beside = None if samples.dim() == 4 or model.data is None else model.data.test_points()   # scatter plots only
    shown = model.data.data_range if model.data is not None else None   # images: the data's range, black to white
    out.write_figure("samples.png", save_samples, samples, title, data=beside, value_range=shown)
    if result.trajectory is not None:
        out.write_figure("trajectories.png", save_trajectories, *result.trajectory, title)
    return out.metrics(metrics)


def likelihood_task(cfg: DictConfig, run_dir: Path, overridden: set[str]) -> dict[str, Any]:
    """The ODE log-likelihood of ``likelihood.n_eval`` held-out points: nats, bits/dim, and per point."""
    out = RunOutput(run_dir)
    device, dtype = torch.device(cfg.device), dtype_of(cfg)
    model = resolve_model(cfg, overridden, device)
    held_out = held_out_likelihood(model.sde, model.score_fn, model.data, likelihood_config(cfg), cfg.seed, device,
                                   dtype, progress=True)
    metrics = {**header(cfg, model), **_likelihood_metrics(held_out)}
    write_config(out, cfg, model)
    lik = held_out.result
    out.write_npz("likelihood.npz", x=held_out.points.cpu().numpy(), logp=lik.logp.cpu().numpy(),
         bpd=lik.bpd.cpu().numpy(), z=lik.z.cpu().numpy())
    return out.metrics(metrics)
