"""Command-line entry point: ``python run.py sde=vp solver=pf_ode``.

Composes the hydra config in ``conf/`` and runs the task: ``task=sample`` (the default) draws
samples and evaluates the ODE likelihood of test data, with a trained checkpoint (``ckpt=PATH``)
or the exact score of the data distribution (``data=ring``, ``data=mix16d``), which makes every
number checkable; ``task=train`` trains a score model.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import solvers
from models import MixtureScore, load_checkpoint
from training import TrainingError, train
from training.loop import data_log_likelihood, load_data
from training.plots import save_samples


def sample_task(cfg: DictConfig, out: Path) -> dict:
    """Sample with the chosen SDE and solver, then evaluate the ODE likelihood of test data.

    The model is a trained checkpoint (``ckpt=PATH``: its SDE, weights and data) or, without one,
    the exact score of the data distribution, which is known for ``data=ring`` and ``data=mix16d``.
    """
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(cfg.dtype)
    if dtype is None:
        raise ValueError(f"dtype must be float32 or float64, got {cfg.dtype!r}.")
    device = torch.device(cfg.device)
    if cfg.ckpt:
        loaded = load_checkpoint(cfg.ckpt, device=device)
        sde, score = loaded.sde, loaded.score_fn
        trained = OmegaConf.create(loaded.config)
        data = load_data(trained.data, trained.seed)
    else:
        data = load_data(cfg.data, cfg.seed)
        if data.mixture is None:
            raise ValueError(f"data={data.name} has no exact score: train a model (task=train) and pass ckpt=PATH.")
        sde = instantiate(cfg.sde)
        score = MixtureScore(sde, data.mixture)
    options = OmegaConf.to_container(cfg.solver.options, resolve=True)

    result = solvers.sample(sde, score, (cfg.n_samples, *data.event_shape), solver=cfg.solver.name,
                            steps=cfg.solver.steps, eps=cfg.eps, seed=cfg.seed, device=device, dtype=dtype,
                            **options)
    lik, test = data_log_likelihood(sde, score, data, data.test[:cfg.n_eval].to(device=device, dtype=dtype),
                                    cfg.seed, eps=cfg.likelihood.eps, rtol=cfg.likelihood.rtol,
                                    atol=cfg.likelihood.atol, divergence=cfg.likelihood.divergence)
    samples = result.samples.cpu()
    np.savez(out / "samples.npz", samples=samples.numpy(), z=result.z.cpu().numpy())
    save_samples(out / "samples.png", samples, f"{type(sde).__name__}, {cfg.solver.name}: {result.nfe} NFE",
                 data=None if samples.dim() == 4 else test.cpu())
    metrics = {
        "task": "sample", "sde": type(sde).__name__, "solver": cfg.solver.name, "data": data.name,
        "model": "checkpoint" if cfg.ckpt else "exact", "n_samples": cfg.n_samples, "nfe": result.nfe,
        "sample_seconds": result.seconds, "nll_nats": -lik.logp.double().mean().item(),
        "bpd": lik.bpd.double().mean().item(), "likelihood_nfe": lik.nfe, "likelihood_seconds": lik.seconds,
    }
    if data.mixture is not None:
        weight_error, spread_ratio = data.mixture.mode_report(result.samples)
        exact_nll = -data.mixture.log_prob(test.double()).mean().item()
        metrics.update(mode_weight_error=weight_error, mode_spread_ratio=spread_ratio, nll_exact_nats=exact_nll,
                       nll_error_nats=metrics["nll_nats"] - exact_nll)
    return metrics


def summary(metrics: dict) -> str:
    """The lines printed at the end of a run."""
    if metrics["task"] == "train":
        lines = [f"trained {metrics['model']} on {metrics['data']} with {metrics['sde']} for {metrics['steps']} steps: "
                 f"test loss {metrics['test_loss']:.4f}, test NLL {metrics['test_nll_nats']:.4f} nats, "
                 f"{metrics['test_bpd']:.4f} bits/dim"]
        if "kl_nats" in metrics:
            lines.append(f"exact NLL of the same points {metrics['data_nll_nats']:.4f} nats: "
                         f"KL(data || model) ~ {metrics['kl_nats']:.4f} nats")
        return "\n".join(lines)
    lines = [f"{metrics['sde']} + {metrics['solver']} on {metrics['data']} ({metrics['model']} score): "
             f"{metrics['n_samples']} samples, {metrics['nfe']} NFE, {metrics['sample_seconds']:.2f} s"]
    if "mode_weight_error" in metrics:
        lines[0] += (f"; mode weights off by at most {metrics['mode_weight_error']:.3f}, "
                     f"spread {metrics['mode_spread_ratio']:.3f}x the data's")
    line = f"test NLL {metrics['nll_nats']:.4f} nats"
    if "nll_exact_nats" in metrics:
        line += f" (exact {metrics['nll_exact_nats']:.4f}, error {metrics['nll_error_nats']:+.1e})"
    lines.append(line + f", {metrics['bpd']:.4f} bits/dim, {metrics['likelihood_nfe']} NFE, "
                 f"{metrics['likelihood_seconds']:.2f} s")
    return "\n".join(lines)


TASKS = {"sample": sample_task, "train": train}


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    task = TASKS.get(cfg.task)
    try:
        if task is None:
            raise ValueError(f"unknown task {cfg.task!r}; available: {', '.join(TASKS)}.")
        metrics = task(cfg, out)
    except (solvers.SolverError, solvers.NonFiniteError, ValueError, TypeError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if metrics["task"] != "train":  # training writes its own metrics.json
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(summary(metrics))
    print(f"outputs: {out}")


if __name__ == "__main__":
    main()
