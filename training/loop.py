"""The training loop: denoising score matching with Adam, warmup, clipping, EMA and exact resume.

``train(cfg, run_dir)`` is what ``python run.py task=train`` calls. Everything random in training
(batch indices, t, noise) comes from one torch.Generator whose state is checkpointed with the
global torch RNG (dropout), so a run stopped at step k and resumed ends with the same weights as
an uninterrupted run. Evaluation uses its own generator and the counter-based sampler noise, so
it never perturbs training. Side effects that only one process may have in data-parallel training
(progress bar, logs, plots, checkpoints) all go through :class:`RunOutput`.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError
from tqdm import tqdm

import solvers
from data_lib import Dataset, dequantize, load_dataset
from models.checkpoint import TRAINING_KEYS, CheckpointError, build_from_spec, read_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.ema import EMA
from training.losses import get_loss

log = logging.getLogger(__name__)

__all__ = ["train", "TrainingError", "load_data", "scored_points", "data_log_likelihood", "model_spec_for", "evaluate", "RunOutput"]


def typed_train_config(train_cfg: DictConfig) -> DictConfig:
    """``task.*`` of ``task=train`` checked against :class:`TrainConfig`: a wrong type or unknown key is a ValueError.

    hydra already checks it at composition (``tasks_lib.register_configs``); this repeats the check
    for configs built by hand.
    """
    try:
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), train_cfg)
    except (ValidationError, ConfigKeyError) as err:
        raise ValueError(f"task.{err.full_key}: {str(err).splitlines()[0]}") from None


class TrainingError(RuntimeError):
    """Training cannot go on: the loss turned NaN, or a resume checkpoint does not match the run."""


def load_data(cfg_data: DictConfig, seed: int) -> Dataset:
    """The dataset a ``data`` config section names, with its options."""
    options = OmegaConf.to_container(cfg_data, resolve=True)
    return load_dataset(options.pop("name"), seed=seed, **options)


def model_spec_for(cfg: DictConfig, data: Dataset) -> dict[str, Any]:
    """The checkpoint's ``model_spec``: everything that rebuilds the SDE and the model, no config system needed."""
    sde_cfg = OmegaConf.to_container(cfg.sde, resolve=True)
    target = sde_cfg.pop("_target_")
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    return {
        "sde": {"class": target.rsplit(".", 1)[-1], **sde_cfg},
        "net": {"kind": cfg.model.kind, "event_shape": list(data.event_shape), **net},
        "parameterization": cfg.model.parameterization,
        "time_input": cfg.model.time_input,
        "sigma_data": round(float(data.train.std()), 6),
        "data": {"name": data.name, "levels": data.levels,
                 "data_range": list(data.data_range) if data.data_range is not None else None},
    }


class RunOutput:
    """Every side effect of a run (progress, CSV logs, plots, checkpoints, metrics), on the main process only."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, is_main: bool = True):
        self.run_dir = run_dir
        self.is_main = is_main
        if is_main:  # the CSV logs are opened in it before save_checkpoint would create it
            run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = run_dir / "checkpoints"
        self.progress = tqdm(total=total_steps, initial=start_step, disable=not is_main, unit="step",
                             dynamic_ncols=True, desc="train")
        self._files: dict[str, tuple[Any, csv.DictWriter]] = {}

    def _log(self, name: str, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        if name not in self._files:
            path = self.run_dir / f"{name}.csv"
            f = open(path, "a", newline="")
            writer = csv.DictWriter(f, fieldnames=list(row))
            if path.stat().st_size == 0:
                writer.writeheader()
            self._files[name] = (f, writer)
        f, writer = self._files[name]
        writer.writerow(row)
        f.flush()

    def train_row(self, row: dict[str, Any]) -> None:
        self._log("train_log", row)
        self.progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.1e}")

    def eval_row(self, row: dict[str, Any]) -> None:
        self._log("eval_log", row)
        if self.is_main:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step" and isinstance(v, float))
            self.progress.write(f"step {row['step']}: {shown}")

    def advance(self, n: int = 1) -> None:
        self.progress.update(n)

    def checkpoint(self, state: dict[str, Any], step: int, keep: bool) -> None:
        if not self.is_main:
            return
        save_checkpoint(self.ckpt_dir / "last.pt", state)
        if keep:
            save_checkpoint(self.ckpt_dir / f"step_{step:07d}.pt", state)

    def samples_figure(self, samples: torch.Tensor, step: int) -> None:
        if self.is_main:
            from training.plots import save_samples
            save_samples(self.run_dir / "samples.png", samples.cpu(), f"EMA samples at step {step}")

    def metrics(self, metrics: dict[str, Any]) -> None:
        if self.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    def close(self) -> None:
        self.progress.close()
        for f, _ in self._files.values():
            f.close()


@torch.no_grad()
def _test_loss(model, sde, data: Dataset, loss_fn, loss_options, batch_size: int, seed: int) -> float:
    gen = torch.Generator(device=data.test.device).manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, len(data.test), batch_size):
        x0 = data.test[start:start + batch_size]
        total += loss_fn(model, sde, x0, generator=gen, **loss_options).item() * len(x0)
        count += len(x0)
    return total / count


EXACT_DIVERGENCE_MAX_DIM = 32


def scored_points(data: Dataset, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The points a likelihood of ``data`` is computed at: x itself, or x dequantised (seeded) if the data are discrete."""
    if data.levels is None:
        return x
    return dequantize(x, data.levels, data.data_range, generator=torch.Generator(device=x.device).manual_seed(seed + 11))


def data_log_likelihood(sde, score_fn, data: Dataset, x: torch.Tensor, seed: int, divergence: str = "auto",
                        **options):
    """``solvers.log_likelihood`` of points x of ``data``, dequantised first when the data are discrete.

    Discrete data get uniform noise within each of their bins (seeded) and bits/dim with their
    offset log₂(K/w). ``divergence="auto"`` is the exact divergence up to 32 dimensions (D VJPs
    per step, vectorised) and Hutchinson's estimator above. Returns the LikelihoodResult and the
    points actually scored.
    """
    if divergence == "auto":
        divergence = "exact" if math.prod(data.event_shape) <= EXACT_DIVERGENCE_MAX_DIM else "hutchinson"
    options["divergence"] = divergence
    x = scored_points(data, x, seed)
    lik = solvers.log_likelihood(sde, score_fn, x, seed=seed, levels=data.levels, data_range=data.data_range,
                                 **options)
    return lik, x


def evaluate(model, sde, data: Dataset, cfg: DictConfig, loss_fn, loss_options, step: int, out: RunOutput) -> dict:
    """Test loss, a sample figure and the test NLL through the ODE (bits/dim with the data's levels)."""
    tc, lc = cfg.task, cfg.likelihood
    row: dict[str, Any] = {"step": step}
    row["test_loss"] = _test_loss(model, sde, data, loss_fn, loss_options, tc.batch_size, cfg.seed + 7)
    samples = solvers.sample(sde, model, (tc.eval_samples, *data.event_shape), solver="pf_ode", seed=cfg.seed,
                             device=data.test.device).samples
    out.samples_figure(samples, step)
    lik, x = data_log_likelihood(sde, model, data, data.test[:lc.n_eval], cfg.seed, eps=lc.eps, rtol=lc.rtol,
                                 atol=lc.atol, divergence=lc.divergence, probes=lc.probes, method=lc.method,
                                 steps=lc.steps)
    row["test_nll_nats"] = -lik.logp.mean().item()
    row["test_bpd"] = lik.bpd.mean().item()
    row["nll_nfe"] = lik.nfe
    if data.mixture is not None:
        # Paired with the exact density on the same points: the KL(data ‖ model) estimate.
        data_nll = -data.mixture.log_prob(x.double()).mean().item()
        row["data_nll_nats"] = data_nll
        row["kl_nats"] = row["test_nll_nats"] - data_nll
    return row


def learning_rate(step: int, tc: DictConfig) -> float:
    """Linear warmup over ``warmup`` steps, then constant or (``lr_schedule=cosine``) cosine decay to 0."""
    if tc.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"task.lr_schedule must be constant or cosine, got {tc.lr_schedule!r}.")
    warm = min(1.0, (step + 1) / max(tc.warmup, 1))
    if tc.lr_schedule == "constant" or step < tc.warmup:
        return tc.lr * warm
    progress = (step - tc.warmup) / max(tc.steps - tc.warmup, 1)
    return tc.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    state = {"train": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(gen: torch.Generator, state: dict[str, Any]) -> None:
    # RNG states must be CPU byte tensors, but read_checkpoint maps every tensor to the run's device.
    gen.set_state(state["train"].cpu())
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train a score model as ``cfg`` says and write checkpoints, logs, plots and metrics into run_dir."""
    tc = typed_train_config(cfg.task)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, cfg.seed)
    data = dataclasses.replace(data, train=data.train.to(device), test=data.test.to(device))
    spec = model_spec_for(cfg, data)
    sde, model = build_from_spec(spec)
    model.to(device)
    ema = EMA(model, tc.ema_decay)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), eps=1e-8,
                                 weight_decay=tc.weight_decay)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    loss_fn = get_loss(tc.loss)
    loss_options = {"reduction": tc.reduction}
    if tc.loss == "dsm":
        loss_options.update(eps=tc.eps, weighting=tc.weighting, importance_sampling=tc.importance_sampling)
    config = OmegaConf.to_container(cfg, resolve=True)

    step = 0
    if tc.resume:
        state = read_checkpoint(tc.resume, map_location=device)
        missing = [k for k in TRAINING_KEYS if k not in state]
        if len(missing) == len(TRAINING_KEYS):
            raise CheckpointError(f"{tc.resume} holds the EMA weights only (an exported model); resuming needs a "
                                  "training checkpoint, such as a run's checkpoints/last.pt.")
        if missing:
            raise CheckpointError(f"{tc.resume} lacks {', '.join(missing)}, which resuming needs; it is incomplete: "
                                  "resume from another checkpoint of the run.")
        if state["model_spec"] != spec:
            raise CheckpointError(f"checkpoint {tc.resume} was trained with model_spec {state['model_spec']}, but this "
                                  f"run asks for {spec}; resume with the same sde, model and data, or start a new run.")
        try:
            model.load_state_dict(state["model"], strict=True)
            ema.load_state_dict({"module": state["ema"], "updates": state["ema_updates"]})
            optimizer.load_state_dict(state["optimizer"])
            _set_rng_state(gen, state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint {tc.resume} does not fit this model ({str(err).splitlines()[0]}); "
                                  "resume with the config it was trained with.") from None
        step = int(state["step"])
        if step > tc.steps:
            raise CheckpointError(f"checkpoint {tc.resume} is at step {step}, past task.steps={tc.steps}; "
                                  "raise task.steps to continue.")
        log.info("resumed from %s at step %d", tc.resume, step)

    def snapshot() -> dict[str, Any]:
        return {"model_spec": spec, "model": model.state_dict(), "ema": ema.module.state_dict(),
                "ema_updates": ema.updates, "optimizer": optimizer.state_dict(), "step": step,
                "rng": _rng_state(gen), "config": config}

    out = RunOutput(run_dir, tc.steps, step)
    eval_row: dict[str, Any] = {}
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < tc.steps:
            lr = learning_rate(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = torch.randint(0, len(data.train), (tc.batch_size,), generator=gen, device=device)
            loss = loss_fn(model, sde, data.train[idx], generator=gen, **loss_options)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            # One check (one host sync) for both: a NaN loss has NaN gradients, and clipping cannot repair a
            # non-finite gradient; stepping would put NaN weights (and EMA) into the next last.pt.
            if not torch.isfinite(loss + grad_norm):
                raise TrainingError(f"the loss ({loss.item():.4g}) or its gradient norm ({grad_norm.item():.4g}) became "
                                    f"non-finite at step {step + 1}; the last good checkpoint is kept at "
                                    f"{out.ckpt_dir / 'last.pt'} (if one was written); lower task.lr (now {tc.lr}) "
                                    f"or task.grad_clip (now {tc.grad_clip}).")
            optimizer.step()
            ema.update(model)
            step += 1
            window_steps += 1
            out.advance()
            if step % tc.log_every == 0 or step == tc.steps:
                now = time.perf_counter()
                out.train_row({"step": step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                               "steps_per_second": window_steps / (now - window_start)})
                window_start, window_steps = now, 0
            if step % tc.ckpt_every == 0 or step == tc.steps:
                out.checkpoint(snapshot(), step, keep=step == tc.steps)
            if (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps:
                eval_row = evaluate(ema.module, sde, data, cfg, loss_fn, loss_options, step, out)
                out.eval_row(eval_row)
        if not eval_row:  # resumed at task.steps: nothing left to train, so evaluate the checkpoint
            eval_row = evaluate(ema.module, sde, data, cfg, loss_fn, loss_options, step, out)
            out.eval_row(eval_row)
    finally:
        out.close()
    metrics = {"task": "train", "steps": step, "sde": type(sde).__name__, "data": data.name,
               "model": cfg.model.kind, "loss": tc.loss, **{k: v for k, v in eval_row.items() if k != "step"}}
    out.metrics(metrics)
    return metrics
