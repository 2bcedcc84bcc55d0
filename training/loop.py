"""The training loop: denoising score matching with Adam, warmup, clipping, EMA and exact resume.

``train(config, model, data, out_dir)`` trains from Python with plain objects; ``python run.py
task=train`` builds those objects from hydra and calls it. Step k's batch (indices, flips) is a
function of (seed, k) (``training.batches``); t and the noise come from one torch.Generator whose
state is checkpointed with the global torch RNG (dropout), so a run stopped at step k and resumed
ends with the same weights as an uninterrupted run. Evaluation uses its own generator and the counter-based sampler noise, so it
never perturbs training. Every file goes through ``evaluation.RunOutput``.

Under torchrun the same loop is data-parallel (``DistributedDataParallel``): every rank reads its own
rows of each global batch (``core_lib.distributed.shard``), draws the whole batch's times and noise
from the same generator and computes its rows of the loss, so K ranks compute the loss of one
process on the same batch, up to the order of the sums. Each rank keeps its own global RNG stream
(dropout), and checkpoints hold every rank's, so resuming a K-rank run is exact. On SIGTERM every rank finishes its step, the
step is checkpointed, and the run stops with ``core_lib.Preempted``; ``resume="auto"`` continues
from the run directory's newest readable checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from core_lib import Preempted, RunInterrupted, build_options, distributed
from data_lib import Dataset
from evaluation import LikelihoodConfig, RunOutput, held_out_likelihood, sample_on_ranks, save_samples
from models import ScoreModel
from models.checkpoint import TRAINING_KEYS, CheckpointError, model_spec, read_checkpoint
from sde_lib import VESDE, VPSDE
from training.config import DEFAULT_LABEL_DROPOUT, TrainConfig, TrainingError
from training.batches import batch_loader
from training.ema import EMA
from training.losses import get_loss

log = logging.getLogger(__name__)

__all__ = ["train", "resume", "evaluate", "learning_rate", "check_train_config", "check_batch_split", "score_scale",
           "newest_checkpoint", "check_conditioning"]


def check_train_config(config: TrainConfig | dict) -> TrainConfig:
    """A TrainConfig with every field of the right type and in range (``TrainConfig.validate``), or TrainingError."""
    given = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return build_options(TrainConfig, given, "task=train", TrainingError)


def check_batch_split(batch_size: int) -> None:
    """The global batch splits evenly over the processes of this run, or a TrainingError naming the fix."""
    world = distributed.world_size()
    if batch_size % world:
        raise TrainingError(f"task.batch_size={batch_size} is the global batch and must split evenly over the {world} "
                            f"processes; use a multiple of {world}, or start fewer processes (torchrun --nproc_per_node).")


def check_conditioning(config: TrainConfig, model: ScoreModel, data: Dataset) -> float | None:
    """The label dropout p of a class-conditional model (``task.label_dropout``, null: 0.1), None for an
    unconditional one; a TrainingError when the model's classes and the data's labels do not fit."""
    if not model.conditional:
        if config.label_dropout is not None:
            raise TrainingError(f"task.label_dropout={config.label_dropout} applies to class-conditional models; "
                                "set model.num_classes=K (the data's class count) or drop task.label_dropout.")
        return None
    K = model.num_classes
    if data.num_classes == 0:
        raise TrainingError(f"model.num_classes={K} makes a class-conditional model, but data={data.name} has no "
                            "class labels; train on labelled data (ring, mix16d, moons, checkerboard, digits, an "
                            "image folder of class sub-folders, data=array with data.labels_key) or set "
                            "model.num_classes=0.")
    if K != data.num_classes:
        raise TrainingError(f"model.num_classes={K} differs from the {data.num_classes} classes of data={data.name} "
                            f"({', '.join(data.classes[:12])}{', ...' if data.num_classes > 12 else ''}); set "
                            f"model.num_classes={data.num_classes}.")
    return DEFAULT_LABEL_DROPOUT if config.label_dropout is None else float(config.label_dropout)


def _test_labels(data: Dataset, model: ScoreModel, start: int, stop: int) -> torch.Tensor | None:
    """The labels of test rows start..stop for a conditional model (None for an unconditional one)."""
    return data.test_labels[start:stop].to(data.test.device) if model.conditional else None


@torch.no_grad()
def _test_loss(model, sde, data: Dataset, loss_fn, loss_options, batch_size: int, seed: int) -> float:
    """The mean loss over the test split (a conditional model's at the points' own labels), each batch with
    noise of its own seed, the batches shared out over the ranks."""
    starts = list(range(0, len(data.test), batch_size))
    first, stop = distributed.shard(len(starts))
    total = torch.zeros(2, dtype=torch.float64, device=data.test.device)   # sum of losses, count
    for b in range(first, stop):
        x0 = data.decode(data.test[starts[b]:starts[b] + batch_size])
        labels = _test_labels(data, model, starts[b], starts[b] + len(x0))
        gen = torch.Generator(device=data.test.device).manual_seed(seed + 1_000_003 * b)
        total[0] += loss_fn(model, sde, x0, generator=gen, labels=labels, **loss_options).double() * len(x0)
        total[1] += len(x0)
    total = distributed.all_sum(total)
    return (total[0] / total[1]).item()


@torch.no_grad()
def score_scale(model, sde, x0: torch.Tensor, seed: int, times=(0.1, 0.5, 1.0), batch_size: int = 256,
                labels: torch.Tensor | None = None) -> float:
    """max over t of E‖s_θ(x_t)‖² s(t)²/D on noised test points: at most 1 for the true score.

    By Jensen, E‖∇log p_t(x_t)‖² ≤ E‖∇log p(x_t | x_0)‖² = D/s(t)² for any data, so a model far above
    1 has a score whose magnitude exploded, whatever its loss says (the same bound holds for the
    conditional score at the points' ``labels``). The points go through the network
    ``batch_size`` at a time (a U-Net's activations for 256 images of 32×32 take a gigabyte).
    """
    gen = torch.Generator(device=x0.device).manual_seed(seed + 13)
    worst = 0.0
    for t in times:
        tt = torch.full((len(x0),), t * sde.T, dtype=x0.dtype, device=x0.device)
        mean, std = sde.marginal_prob(x0, tt)
        std = std.reshape(-1, *[1] * (x0.dim() - 1))
        x = mean + std * torch.randn(x0.shape, generator=gen, dtype=x0.dtype, device=x0.device)
        score = torch.cat([model(x[i:i + batch_size], tt[i:i + batch_size],
                                 **({} if labels is None else {"y": labels[i:i + batch_size]}))
                           for i in range(0, len(x), batch_size)])
        power = score.flatten(1).pow(2).sum(1) * std.flatten() ** 2 / x0[0].numel()
        worst = max(worst, power.mean().item())
    return worst


def evaluate(model: ScoreModel, data: Dataset, config: TrainConfig, likelihood: LikelihoodConfig, seed: int,
             loss_fn, loss_options, step: int, out: RunOutput) -> dict[str, Any]:
    """Test loss, a sample figure and the test NLL through the ODE (bits/dim with the data's levels)."""
    sde = model.sde
    row: dict[str, Any] = {"step": step}
    row["test_loss"] = _test_loss(model, sde, data, loss_fn, loss_options, config.batch_size, seed + 7)
    n = config.eval_samples
    cond, labels = {}, None
    if model.conditional:   # the conditional branch, which every label dropout trains: an even split over the classes
        labels = torch.arange(n) * model.num_classes // n
        cond = {"y": labels[slice(*distributed.shard(n))].to(data.test.device)}   # this rank's rows
    samples = sample_on_ranks(sde, model, (n, *data.event_shape), solver="pf_ode", seed=seed,
                              device=data.test.device, cond=cond).samples
    out.write_figure("samples.png", save_samples, samples.cpu(), f"EMA samples at step {step}",
                     value_range=data.data_range, step=step, labels=labels, classes=data.classes)
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
    """The training generator's state (the same on every rank) and the global torch RNG's: this process's,
    and under torchrun every rank's, in rank order (a collective: every rank calls it)."""
    state = {"train": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if distributed.world_size() > 1:
        state["torch_ranks"] = distributed.gather_objects(torch.get_rng_state())
        if torch.cuda.is_available():
            state["cuda_ranks"] = distributed.gather_objects(torch.cuda.get_rng_state().cpu())
    return state


def _set_rng_state(gen: torch.Generator, state: dict[str, Any]) -> None:
    # RNG states must be CPU byte tensors, but read_checkpoint maps every tensor to the run's device.
    gen.set_state(state["train"].cpu())
    ranks = state.get("torch_ranks")
    world, rank = distributed.world_size(), distributed.rank()
    if world > 1 or ranks is not None:
        if ranks is None or len(ranks) != world:   # each rank keeps the dropout stream it was seeded with
            log.warning("the checkpoint was written by %d process(es) and this run has %d: the batches continue "
                        "exactly, the dropout streams do not", len(ranks) if ranks is not None else 1, world)
        else:
            torch.set_rng_state(ranks[rank].cpu())
            if torch.cuda.is_available() and "cuda_ranks" in state:
                torch.cuda.set_rng_state(state["cuda_ranks"][rank].cpu())
        return
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s global RNG (dropout) in a multi-process run: distinct per rank."""
    return (seed * 1_000_003 + 7919 * (rank + 1)) % 2**63


class _Replica:
    """The model as the losses call it, through ``DistributedDataParallel``'s forward (which all-reduces the
    gradients in the backward pass): ``model(x, t)`` the score, ``model.eps(x, t)`` the ε-prediction."""

    def __init__(self, ddp: DistributedDataParallel):
        self.ddp = ddp

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.ddp(x, t, **cond)

    def eps(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.ddp(x, t, output="eps", **cond)


class _StopRequest:
    """SIGTERM during training (a scheduler's preemption, torchrun shutting the job down) asks the loop to stop
    after the step it is in, which is then checkpointed; a second SIGTERM before that stops at once
    (KeyboardInterrupt). Installed for the loop only, and only in the main thread (where Python delivers
    signals). After a stop it asked for, SIGTERM stays ignored: the process is on its way out, and torchrun
    signals the ranks that are still exiting when the first one has gone."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _request(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        self.requested = True

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._request)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN if self.requested else self._previous)


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
           gen: torch.Generator, total_steps: int, device: torch.device,
           scaler: torch.amp.GradScaler | None = None) -> int:
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
        if scaler is not None and scaler.is_enabled() and "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this model ({str(err).splitlines()[0]}); "
                              "resume with the config it was trained with.") from None
    step = int(state["step"])
    if step > total_steps:
        raise CheckpointError(f"checkpoint {path} is at step {step}, past task.steps={total_steps}; "
                              "raise task.steps to continue.")
    log.info("resumed from %s at step %d", path, step)
    return step


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The run's newest readable training checkpoint: last.pt, else prev.pt when last.pt is corrupt or
    truncated (a machine lost mid-write), else None (start fresh). Each candidate is read in full (checksums)."""
    for path in (ckpt_dir / "last.pt", ckpt_dir / "prev.pt"):
        if not path.is_file():
            continue
        try:
            state = read_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping %s: %s", path, err)
            continue
        if all(k in state for k in TRAINING_KEYS):
            return path
    return None


def train(config: TrainConfig, model: ScoreModel, data: Dataset, out_dir: str | Path,
          likelihood: LikelihoodConfig | None = None, seed: int = 0, device: str | torch.device = "cpu",
          record: dict[str, Any] | None = None, precision: str = "fp32", compile: bool = False,
          logger: str = "csv") -> dict[str, Any]:
    """Train ``model`` on ``data`` as ``config`` says; write checkpoints, logs, plots and metrics.json into out_dir.

    Args:
        config: the training settings (``TrainConfig``; checked before any work). ``config.resume``: a
            checkpoint path, or "auto" for out_dir's own newest readable checkpoint (none: start fresh).
        model: a ``ScoreModel`` built by ``models.build_score_model`` (its SDE is the model's ``sde``). The
            global torch RNG is used only for the model's initialisation (seed it before building the model)
            and dropout, and is checkpointed.
        data: the data set; its train split is trained on, its test split evaluated.
        out_dir: the run directory (refused if it already holds a finished run's metrics.json).
        likelihood: how the evaluations' test likelihood is computed.
        seed: seeds the batches, times, noise and evaluations: the same seed gives the same run.
        device: where to train (under torchrun, this rank's device).
        record: the run's full config, stored in every checkpoint and in config.yaml (``python run.py`` passes
            the resolved hydra config); None stores ``config``, ``likelihood``, ``seed`` and the data's name.
        precision: the network's forward in "fp32", "bf16" or "fp16" autocast (``ScoreModel.set_precision``);
            fp16 scales the loss (``torch.amp.GradScaler``, checkpointed). The loss, its reduction, the
            optimizer and the EMA stay in the weights' dtype.
        compile: run the network through ``torch.compile``.
        logger: "csv", or "tensorboard" to also write the log rows and sample figures as TensorBoard events
            into out_dir/tensorboard/ (``evaluation.RunOutput``).

    Returns:
        The metrics written to metrics.json: the last evaluation's test loss, NLL, bpd (and KL
        against the exact density where it is known), and the world size.
    """
    config = check_train_config(config)
    likelihood = likelihood or LikelihoodConfig()
    likelihood.validate()   # the evaluations' settings, checked before the first step rather than at the first evaluation
    check_batch_split(config.batch_size)
    world, rank = distributed.world_size(), distributed.rank()
    device = torch.device(device)
    sde = model.sde
    if config.loss == "ddpm" and not isinstance(sde, VPSDE) or config.loss == "ncsn" and not isinstance(sde, VESDE):
        raise TrainingError(f"task.loss={config.loss} needs {'sde=vp' if config.loss == 'ddpm' else 'sde=ve'} "
                            f"(its discrete chain), got {type(sde).__name__}; use task.loss=dsm.")
    label_dropout = check_conditioning(config, model, data)
    if model.conditional:
        model.classes, model.label_dropout = tuple(data.classes), label_dropout
    out = RunOutput(out_dir, logger=logger)
    data = dataclasses.replace(data, test=data.test.to(device))   # the training split stays on the host: batch_loader
    spec = model_spec(model, {"name": data.name, "levels": data.levels,
                              "data_range": list(data.data_range) if data.data_range is not None else None})
    if record is None:
        record = {"task": dataclasses.asdict(config), "likelihood": dataclasses.asdict(likelihood), "seed": seed,
                  "data": {"name": data.name}}
    model.to(device)
    model.set_precision(precision, compile)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if world > 1:   # every rank starts from the same weights (DDP also broadcasts rank 0's); dropout differs per rank
        torch.manual_seed(_rank_seed(seed, rank))
    ema = EMA(model, config.ema_decay)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=tuple(config.betas), eps=1e-8,
                                 weight_decay=config.weight_decay)
    gen = torch.Generator(device=device).manual_seed(seed)
    loss_fn = get_loss(config.loss)
    loss_options = {"reduction": config.reduction}
    if config.loss == "dsm":
        loss_options.update(eps=config.eps, weighting=config.weighting, importance_sampling=config.importance_sampling)
    # this rank's rows of every global batch; the losses draw t and the noise for the whole batch
    rows = slice(*distributed.shard(config.batch_size))
    replica = _Replica(DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)) \
        if world > 1 else model

    step = 0
    last_good = None   # the newest checkpoint of this run's weights, for messages
    resume_from = config.resume
    if resume_from == "auto":   # this run directory's own newest readable checkpoint, the same on every rank
        found = newest_checkpoint(out.ckpt_dir) if out.writes else None
        resume_from = distributed.broadcast(str(found) if found else None)
        if resume_from is None:
            log.info("task.resume=auto: no checkpoint in %s yet, starting fresh", out.ckpt_dir)
    if resume_from:
        step = resume(resume_from, spec, model, ema, optimizer, gen, config.steps, device, scaler)
        last_good = Path(resume_from)
    if config.resume == "auto":   # rows logged after the checkpoint are done again: drop them
        for name in ("train_log", "eval_log"):
            out.truncate_log(name, step)
    out.write_text("config.yaml", _config_yaml(record, world))
    n_params = sum(p.numel() for p in model.parameters())
    out.say(f"training a {spec['net']['kind']} network of {n_params:,} parameters (n_params) on {data.name} "
            f"{data.event_shape}, {world} process(es), from step {step}")

    def snapshot() -> dict[str, Any]:
        return {"model_spec": spec, "model": model.state_dict(), "ema": ema.module.state_dict(),
                "ema_updates": ema.updates, "optimizer": optimizer.state_dict(), "step": step,
                "rng": _rng_state(gen), "config": record,
                **({"grad_scaler": scaler.state_dict()} if scaler.is_enabled() else {})}

    def evaluation() -> dict[str, Any]:
        scale = score_scale(ema.module, sde, data.test_points(256), seed, batch_size=config.batch_size,
                            labels=_test_labels(data, model, 0, 256))
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
    stop_flag = torch.zeros((), dtype=torch.float64, device=device)   # filled each step: no host-to-device copy
    bar = out.start_progress(config.steps, step)
    batches = iter(batch_loader(data, config.batch_size, rows, seed, step, config.steps, device, label_dropout))
    eval_row: dict[str, Any] = {}
    window_start, window_steps = time.perf_counter(), 0
    try:
        with _StopRequest() as stop:
            while step < config.steps:
                lr = learning_rate(step, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x0, labels = next(batches)   # this rank's rows of the step's batch (labels: conditional models)
                x0 = x0.to(device, non_blocking=True)
                if labels is not None:
                    labels = labels.to(device, non_blocking=True)
                loss = loss_fn(replica, sde, x0, generator=gen, rows=rows, batch_size=config.batch_size,
                               labels=labels, **loss_options)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)   # (both the identity unless fp16)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                # One check (one host sync) for all: a NaN loss has NaN gradients, and clipping cannot repair a
                # non-finite gradient; stepping would put NaN weights (and EMA) into the next last.pt. Under
                # torchrun the loss and the stop request are summed over the ranks first (the gradient already
                # is), so that every rank takes the same decision.
                shared = distributed.all_sum(torch.stack([loss.detach().to(torch.float64),
                                                          stop_flag.fill_(float(stop.requested))]))
                loss_mean, stopping = (shared[0] / world).to(loss.dtype), shared[1] > 0
                # fp16's scaled gradients overflow now and then by design: the scaler skips that step
                finite = torch.isfinite(loss_mean + (0 if scaler.is_enabled() else grad_norm))
                diverged = guard.diverged(loss_mean)
                ok, stopping = torch.stack([finite & ~diverged, stopping]).tolist()
                if not ok:
                    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                    if not finite:
                        raise TrainingError(f"the loss ({loss_mean.item():.4g}) or its gradient norm "
                                            f"({grad_norm.item():.4g}) became non-finite at step {step + 1}; {kept}; "
                                            f"lower task.lr (now {config.lr}) or task.grad_clip (now {config.grad_clip}).")
                    line = (f"the loss ({loss_mean.item():.4g}) exceeded {config.divergence_factor:g}x its running mean "
                            f"({guard.mean.item():.4g}) at step {step + 1}: training diverges; {kept}")
                    if config.on_divergence == "stop":
                        raise TrainingError(f"{line}; lower task.lr (now {config.lr}), or set task.on_divergence=warn "
                                            "or task.divergence_factor=null to go on.")
                    out.say(f"warning: {line}")
                scaler.step(optimizer)
                scaler.update()
                ema.update(model)
                step += 1
                window_steps += 1
                bar.update()
                if step % config.log_every == 0 or step == config.steps:
                    now = time.perf_counter()
                    out.log_row("train_log", {"step": step, "loss": loss_mean.item(), "lr": lr,
                                              "grad_norm": grad_norm.item(),
                                              "steps_per_second": window_steps / (now - window_start)})
                    bar.set_postfix(loss=f"{loss_mean.item():.4f}", lr=f"{lr:.1e}")
                    window_start, window_steps = now, 0
                if stopping or step % config.ckpt_every == 0 or step == config.steps:
                    out.checkpoint(snapshot(), step, keep=step == config.steps)
                    last_good = out.ckpt_dir / "last.pt"
                if stopping and step < config.steps:
                    distributed.barrier()   # no rank leaves before rank 0's checkpoint is on disk
                    raise Preempted(f"stopped by SIGTERM at step {step} of {config.steps}, checkpointed in "
                                    f"{last_good}; continue with task.resume=auto and the same hydra.run.dir (or "
                                    f"task.resume={last_good} into a new run directory).")
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
               "model": spec["net"]["kind"], "loss": config.loss,
               "n_params": n_params,
               **({"num_classes": model.num_classes, "label_dropout": label_dropout} if model.conditional else {}),
               **{k: v for k, v in eval_row.items() if k != "step"}}
    return out.metrics(metrics)


def _config_yaml(record: dict[str, Any], world: int) -> str:
    """config.yaml of a training run: its config, and under ``used`` how it ran (the world size)."""
    return OmegaConf.to_yaml(OmegaConf.create({**record, "used": {**record.get("used", {}), "world_size": world}}))
