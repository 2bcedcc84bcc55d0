"""``task=sample`` and ``task=likelihood``: what they compute, the files they write, the metrics they report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import solvers
from tasks_lib.metrics import sliced_wasserstein
from tasks_lib.model_source import ResolvedModel, resolve_model
from training.loop import data_log_likelihood
from training.plots import save_samples, save_trajectories

__all__ = ["sample_task", "likelihood_task", "RunFiles", "dtype_of"]


def dtype_of(cfg: DictConfig) -> torch.dtype:
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(cfg.dtype)
    if dtype is None:
        raise ValueError(f"dtype must be float32 or float64, got {cfg.dtype!r}; set dtype=float32 or dtype=float64.")
    return dtype


class RunFiles:
    """Where a task's outputs go. Nothing is written until the task has its results, and never over a result."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        if (self.run_dir / "metrics.json").exists():
            raise ValueError(f"{self.run_dir} already holds a run's metrics.json; choose another output directory "
                             "(hydra.run.dir=...) rather than overwrite it.")

    def path(self, name: str) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self.run_dir / name

    def write_config(self, cfg: DictConfig, model: ResolvedModel) -> None:
        """config.yaml: the resolved config, plus the SDE and model actually used (a checkpoint's own)."""
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved["used"] = {"model": model.source, "path": model.path, "train_steps": model.train_steps,
                            "sde": {"class": type(model.sde).__name__, **model.sde.hparams()}, "data": model.data.name}
        self.path("config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        self.path("metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def _likelihood(cfg: DictConfig, model: ResolvedModel, device, dtype) -> tuple[dict[str, Any], Any, torch.Tensor]:
    lc = cfg.likelihood
    x = model.data.test[:lc.n_eval].to(device=device, dtype=dtype)
    lik, scored = data_log_likelihood(model.sde, model.score_fn, model.data, x, cfg.seed, eps=lc.eps, rtol=lc.rtol,
                                      atol=lc.atol, divergence=lc.divergence, probes=lc.probes, method=lc.method,
                                      steps=lc.steps, progress=True)
    nll = -lik.logp.double()
    metrics = {"n_eval": len(x), "nll_nats": nll.mean().item(),
               "nll_stderr_nats": (nll.std() / len(nll) ** 0.5).item() if len(nll) > 1 else 0.0,
               "bpd": lik.bpd.double().mean().item(), "likelihood_nfe": lik.nfe,
               "likelihood_seconds": lik.seconds}
    mixture = model.data.mixture
    if mixture is not None:
        # Paired with the exact density of the same points: the KL(data ‖ model) estimate.
        exact = -mixture.log_prob(scored.double()).mean().item()
        metrics.update(nll_exact_nats=exact, kl_nats=metrics["nll_nats"] - exact)
    return metrics, lik, scored


def _header(cfg: DictConfig, model: ResolvedModel) -> dict[str, Any]:
    return {"task": cfg.task.name, "sde": type(model.sde).__name__, "data": model.data.name, "model": model.source,
            "seed": cfg.seed}


def sample_task(cfg: DictConfig, run_dir: Path, overridden: set[str]) -> dict[str, Any]:
    """Sample with the chosen SDE and solver; quality against held-out data; the ODE likelihood of test data."""
    files = RunFiles(run_dir)
    device, dtype = torch.device(cfg.device), dtype_of(cfg)
    model = resolve_model(cfg, overridden, device)
    tc = cfg.task
    options = OmegaConf.to_container(cfg.solver.options, resolve=True)
    result = solvers.sample(model.sde, model.score_fn, (tc.n_samples, *model.data.event_shape),
                            solver=cfg.solver.name, steps=cfg.solver.steps, eps=tc.eps, seed=cfg.seed, device=device,
                            dtype=dtype, trajectory=tc.trajectories, progress=True, **options)
    samples = result.samples.cpu()
    test = model.data.test
    metrics = {**_header(cfg, model), "solver": cfg.solver.name, "n_samples": tc.n_samples, "nfe": result.nfe,
               "sample_seconds": result.seconds,
               "swd": sliced_wasserstein(samples, test, seed=cfg.seed),
               # The same distance between two held-out sets: what a perfect sampler would score.
               "swd_floor": sliced_wasserstein(model.data.train[:len(samples)], test, seed=cfg.seed)}
    if model.data.mixture is not None:
        weight_error, spread_ratio = model.data.mixture.mode_report(samples)
        metrics.update(mode_weight_error=weight_error, mode_spread_ratio=spread_ratio)
    if tc.likelihood:
        metrics.update(_likelihood(cfg, model, device, dtype)[0])

    files.write_config(cfg, model)
    np.savez(files.path("samples.npz"), samples=samples.numpy(), z=result.z.cpu().numpy())
    title = f"{metrics['sde']}, {cfg.solver.name}: {result.nfe} NFE"
    save_samples(files.path("samples.png"), samples, title, data=None if samples.dim() == 4 else test)
    if result.trajectory is not None:
        save_trajectories(files.path("trajectories.png"), *result.trajectory, title)
    files.write_metrics(metrics)
    return metrics


def likelihood_task(cfg: DictConfig, run_dir: Path, overridden: set[str]) -> dict[str, Any]:
    """The ODE log-likelihood of ``likelihood.n_eval`` held-out points: nats, bits/dim, and per point."""
    files = RunFiles(run_dir)
    device, dtype = torch.device(cfg.device), dtype_of(cfg)
    model = resolve_model(cfg, overridden, device)
    scores, lik, scored = _likelihood(cfg, model, device, dtype)
    metrics = {**_header(cfg, model), **scores}
    files.write_config(cfg, model)
    np.savez(files.path("likelihood.npz"), x=scored.cpu().numpy(), logp=lik.logp.cpu().numpy(),
             bpd=lik.bpd.cpu().numpy(), z=lik.z.cpu().numpy())
    files.write_metrics(metrics)
    return metrics
