"""The training loop: denoising score matching with Adam, warmup, clipping, EMA and exact resume.

``train(config, model, data, out_dir)`` trains from Python with plain objects; ``python run.py
task=train`` builds those objects from hydra and calls it. Everything random in training (batch
indices, t, noise) comes from one torch.Generator whose state is checkpointed with the global
torch RNG (dropout), so a run stopped at step k and resumed ends with the same weights as an
uninterrupted run. Evaluation uses its own generator and the counter-based sampler noise, so it
never perturbs training. Every file goes through ``evaluation.RunOutput``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

import solvers
from core_lib import RunInterrupted, build_options
from data_lib import Dataset
from evaluation import LikelihoodConfig, RunOutput, held_out_likelihood, save_samples
from models import ScoreModel
from models.checkpoint import TRAINING_KEYS, CheckpointError, model_spec, read_checkpoint
from sde_lib import VESDE, VPSDE
from training.config import TrainConfig, TrainingError
from training.ema import EMA
from training.losses import get_loss

log = logging.getLogger(__name__)

__all__ = ["train", "resume", "evaluate", "learning_rate", "check_train_config", "score_scale"]


def check_train_config(config: TrainConfig | dict) -> TrainConfig:
    """A TrainConfig with every field of the right type and in range (``TrainConfig.validate``), or TrainingError."""
    given = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return build_options(TrainConfig, given, "task=train", TrainingError)


@torch.no_grad()
def _test_loss(model, sde, data: Dataset, loss_fn, loss_options, batch_size: int, seed: int) -> float:
    gen = torch.Generator(device=data.test.device).manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, len(data.test), batch_size):
        x0 = data.test[start:start + batch_size]
        total += loss_fn(model, sde, x0, generator=gen, **loss_options).item() * len(x0)
        count += len(x0)
    return total / count


@torch.no_grad()
def score_scale(model, sde, x0: torch.Tensor, seed: int, times=(0.1, 0.5, 1.0)) -> float:
    """max over t of E‖s_θ(x_t)‖² s(t)²/D on noised test points: at most 1 for the true score.

    By Jensen, E‖∇log p_t(x_t)‖² ≤ E‖∇log p(x_t | x_0)‖² = D/s(t)² for any data, so a model far above
    1 has a score whose magnitude exploded, whatever its loss says.
    """
    gen = torch.Generator(device=x0.device).manual_seed(seed + 13)
    worst = 0.0
    for t in times:
        tt = torch.full((len(x0),), t * sde.T, dtype=x0.dtype, device=x0.device)
        mean, std = sde.marginal_prob(x0, tt)
        std = std.reshape(-1, *[1] * (x0.dim() - 1))
        x = mean + std * torch.randn(x0.shape, generator=gen, dtype=x0.dtype, device=x0.device)
        power = model(x, tt).flatten(1).pow(2).sum(1) * std.flatten() ** 2 / x0[0].numel()
        worst = max(worst, power.mean().item())
    return worst


def evaluate(model: ScoreModel, data: Dataset, config: TrainConfig, likelihood: LikelihoodConfig, seed: int,
             loss_fn, loss_options, step: int, out: RunOutput) -> dict[str, Any]:
    """Test loss, a sample figure and the test NLL through the ODE (bits/dim with the data's levels)."""
    sde = model.sde
    row: dict[str, Any] = {"step": step}
    row["test_loss"] = _test_loss(model, sde, data, loss_fn, loss_options, config.batch_size, seed + 7)
    samples = solvers.sample(sde, model, (config.eval_samples, *data.event_shape), solver="pf_ode", seed=seed,
                             device=data.test.device).samples
    out.write_figure("samples.png", save_samples, samples.cpu(), f"EMA samples at step {step}")
    held_out = held_out_likelihood(sde, model, data, likelihood, seed, device=data.test.device)
    row["test_nll_nats"] = held_out.nll_nats
    row["test_bpd"] = held_out.bpd
    row["nll_nfe"] = held_out.nfe
    if held_out.kl_nats is not None:
        row["data_nll_nats"] = held_out.exact_nll_nats
        row["kl_nats"] = held_out.kl_nats
    return row


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then constant or (``lr_schedule=cosine``) cosine decay to 0."""
    warm = min(1.0, (step + 1) / max(config.warmup, 1))
    if config.lr_schedule == "constant" or step < config.warmup:
        return config.lr * warm
    progress = (step - config.warmup) / max(config.steps - config.warmup, 1)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


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


class _DivergenceGuard:
    """Flags a loss above ``factor`` × the running mean of the losses before it (after ``warmup`` steps).

    Everything stays on the device: the flag joins the NaN check in one host sync per step.
    """

    def __init__(self, factor: float | None, device: torch.device, decay: float = 0.99, warmup: int = 20):
        self.factor, self.decay, self.warmup = factor, decay, warmup
        self.mean = torch.zeros((), device=device)
        self.seen = 0

    def diverged(self, loss: torch.Tensor) -> torch.Tensor:
        if self.factor is None:
            return torch.zeros((), dtype=torch.bool, device=loss.device)
        flag = (loss > self.factor * self.mean) & (self.seen >= self.warmup)
        # A running mean with bias correction; a flagged loss does not enter it.
        weight = 1.0 / min(self.seen + 1, int(1 / (1 - self.decay)))
        self.mean = torch.where(flag | ~torch.isfinite(loss), self.mean, self.mean + weight * (loss - self.mean))
        self.seen += 1
        return flag


def resume(path: str | Path, spec: dict[str, Any], model: ScoreModel, ema: EMA, optimizer: torch.optim.Optimizer,
           gen: torch.Generator, total_steps: int, device: torch.device) -> int:
    """Load the training state of checkpoint ``path`` into model, EMA, optimizer and RNGs; return its step.

    The checkpoint must be a full training checkpoint of the same ``model_spec``, at a step no later
    than ``total_steps``; anything else is a CheckpointError that says what to do.
    """
    state = read_checkpoint(path, map_location=device)
    missing = [k for k in TRAINING_KEYS if k not in state]
    if len(missing) == len(TRAINING_KEYS):
        raise CheckpointError(f"{path} holds the EMA weights only (an exported model); resuming needs a "
                              "training checkpoint, such as a run's checkpoints/last.pt.")
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}, which resuming needs; it is incomplete: "
                              "resume from another checkpoint of the run.")
    if state["model_spec"] != spec:
        raise CheckpointError(f"checkpoint {path} was trained with model_spec {state['model_spec']}, but this "
                              f"run asks for {spec}; resume with the same sde, model and data, or start a new run.")
    try:
        model.load_state_dict(state["model"], strict=True)
        ema.load_state_dict({"module": state["ema"], "updates": state["ema_updates"]})
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(gen, state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this model ({str(err).splitlines()[0]}); "
                              "resume with the config it was trained with.") from None
    step = int(state["step"])
    if step > total_steps:
        raise CheckpointError(f"checkpoint {path} is at step {step}, past task.steps={total_steps}; "
                              "raise task.steps to continue.")
    log.info("resumed from %s at step %d", path, step)
    return step


def train(config: TrainConfig, model: ScoreModel, data: Dataset, out_dir: str | Path,
          likelihood: LikelihoodConfig | None = None, seed: int = 0, device: str | torch.device = "cpu",
          record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``model`` on ``data`` as ``config`` says; write checkpoints, logs, plots and metrics.json into out_dir.

    Args:
        config: the training settings (``TrainConfig``; checked before any work).
        model: a ``ScoreModel`` built by ``models.build_score_model`` (its SDE is the model's ``sde``). The
            global torch RNG is used only for the model's initialisation (seed it before building the model)
            and dropout, and is checkpointed.
        data: the data set; its train split is trained on, its test split evaluated.
        out_dir: the run directory (refused if it already holds a finished run's metrics.json).
        likelihood: how the evaluations' test likelihood is computed.
        seed: seeds the batches, times, noise and evaluations: the same seed gives the same run.
        device: where to train.
        record: the run's full config, stored in every checkpoint (``python run.py`` passes the resolved
            hydra config); None stores ``config``, ``likelihood``, ``seed`` and the data's name.

    Returns:
        The metrics written to metrics.json: the last evaluation's test loss, NLL, bpd (and KL
        against the exact density where it is known).
    """
    config = check_train_config(config)
    likelihood = likelihood or LikelihoodConfig()
    likelihood.validate()   # the evaluations' settings, checked before the first step rather than at the first evaluation
    device = torch.device(device)
    sde = model.sde
    if config.loss == "ddpm" and not isinstance(sde, VPSDE) or config.loss == "ncsn" and not isinstance(sde, VESDE):
        raise TrainingError(f"task.loss={config.loss} needs {'sde=vp' if config.loss == 'ddpm' else 'sde=ve'} "
                            f"(its discrete chain), got {type(sde).__name__}; use task.loss=dsm.")
    out = RunOutput(out_dir)
    data = dataclasses.replace(data, train=data.train.to(device), test=data.test.to(device))
    spec = model_spec(model, {"name": data.name, "levels": data.levels,
                              "data_range": list(data.data_range) if data.data_range is not None else None})
    if record is None:
        record = {"task": dataclasses.asdict(config), "likelihood": dataclasses.asdict(likelihood), "seed": seed,
                  "data": {"name": data.name}}
    model.to(device)
    ema = EMA(model, config.ema_decay)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=tuple(config.betas), eps=1e-8,
                                 weight_decay=config.weight_decay)
    gen = torch.Generator(device=device).manual_seed(seed)
    loss_fn = get_loss(config.loss)
    loss_options = {"reduction": config.reduction}
    if config.loss == "dsm":
        loss_options.update(eps=config.eps, weighting=config.weighting, importance_sampling=config.importance_sampling)

    step = 0
    last_good = None   # the newest checkpoint of this run's weights, for messages
    if config.resume:
        step = resume(config.resume, spec, model, ema, optimizer, gen, config.steps, device)
        last_good = Path(config.resume)

    def snapshot() -> dict[str, Any]:
        return {"model_spec": spec, "model": model.state_dict(), "ema": ema.module.state_dict(),
                "ema_updates": ema.updates, "optimizer": optimizer.state_dict(), "step": step,
                "rng": _rng_state(gen), "config": record}

    def evaluation() -> dict[str, Any]:
        scale = score_scale(ema.module, sde, data.test[:256], seed)
        if config.divergence_factor is not None and not scale <= config.divergence_factor:
            line = (f"the model's score exploded at step {step}: E‖s(x_t)‖² s(t)²/D = {scale:.3g}, where the true "
                    f"score's is at most 1 (task.divergence_factor {config.divergence_factor:g}); the weights before "
                    f"are in {out.ckpt_dir / 'prev.pt'}")
            if config.on_divergence == "stop":
                raise TrainingError(f"{line}; lower task.lr (now {config.lr}), or set task.on_divergence=warn.")
            out.say(f"warning: {line}")
        row = evaluate(ema.module, data, config, likelihood, seed, loss_fn, loss_options, step, out)
        out.log_row("eval_log", row)
        out.say(f"step {row['step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                      if k != "step" and isinstance(v, float)))
        return row

    guard = _DivergenceGuard(config.divergence_factor, device)
    bar = out.start_progress(config.steps, step)
    eval_row: dict[str, Any] = {}
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < config.steps:
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = torch.randint(0, len(data.train), (config.batch_size,), generator=gen, device=device)
            loss = loss_fn(model, sde, data.train[idx], generator=gen, **loss_options)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            # One check (one host sync) for all: a NaN loss has NaN gradients, and clipping cannot repair a
            # non-finite gradient; stepping would put NaN weights (and EMA) into the next last.pt.
            finite = torch.isfinite(loss + grad_norm)
            diverged = guard.diverged(loss.detach())
            if not bool(finite & ~diverged):
                kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                if not finite:
                    raise TrainingError(f"the loss ({loss.item():.4g}) or its gradient norm ({grad_norm.item():.4g}) "
                                        f"became non-finite at step {step + 1}; {kept}; lower task.lr (now {config.lr}) "
                                        f"or task.grad_clip (now {config.grad_clip}).")
                line = (f"the loss ({loss.item():.4g}) exceeded {config.divergence_factor:g}x its running mean "
                        f"({guard.mean.item():.4g}) at step {step + 1}: training diverges; {kept}")
                if config.on_divergence == "stop":
                    raise TrainingError(f"{line}; lower task.lr (now {config.lr}), or set task.on_divergence=warn "
                                        "or task.divergence_factor=null to go on.")
                out.say(f"warning: {line}")
            optimizer.step()
            ema.update(model)
            step += 1
            window_steps += 1
            bar.update()
            if step % config.log_every == 0 or step == config.steps:
                now = time.perf_counter()
                out.log_row("train_log", {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                                          "steps_per_second": window_steps / (now - window_start)})
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
                window_start, window_steps = now, 0
            if step % config.ckpt_every == 0 or step == config.steps:
                out.checkpoint(snapshot(), step, keep=step == config.steps)
                last_good = out.ckpt_dir / "last.pt"
            if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
                eval_row = evaluation()
        if not eval_row:  # resumed at task.steps: nothing left to train, so evaluate the checkpoint
            eval_row = evaluation()
    except KeyboardInterrupt:
        kept = f"the last checkpoint is {last_good}" if last_good else "no checkpoint was written"
        raise RunInterrupted(f"interrupted at step {step} of {config.steps}; {kept}; continue with "
                             f"task.resume={last_good or '<a checkpoint>'} into a new run directory.") from None
    finally:
        out.close()
    metrics = {"task": "train", "steps": step, "sde": type(sde).__name__, "data": data.name,
               "model": spec["net"]["kind"], "loss": config.loss, **{k: v for k, v in eval_row.items() if k != "step"}}
    return out.metrics(metrics)
