"""``task=train_classifier``: a noise-conditional classifier p(y | x_t, t) trained on the data's labels.

The objective (docs/guidance.md) is the cross-entropy of the label under x_t = α(t) x₀ + s(t) ε with
t ~ U(eps, T), the time distribution of the score training: E_{t, x₀, y, ε} [−log p_θ(y | x_t, t)].
Adam with a short warmup and cosine decay, an EMA of the weights (the saved classifier), seeded batches
(step k's batch is a function of (seed, k) alone, ``training.batches.step_generator``). At the end the
held-out accuracy and cross-entropy are measured at ``task.eval_times``; on a Gaussian mixture the exact
classifier (the components' responsibilities under p_t) is measured beside it, with KL(exact ‖ trained).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from core_lib import UserError, build_options, distributed
from data_lib import Dataset
from evaluation import RunOutput, load_data
from models import GaussianMixture, MixtureScore, NoiseClassifier, build_classifier, save_classifier
from sde_lib import SDE, batch_broadcast
from tasks_lib.model_source import build_sde
from tasks_lib.schema import TrainClassifierTask
from training.batches import step_generator
from training.ema import EMA

Tensor = torch.Tensor

__all__ = ["train_classifier_task", "fit_classifier", "classifier_batch", "held_out_accuracy", "exact_classifier",
           "WARMUP"]

#: Steps of linear learning-rate warmup before the cosine decay.
WARMUP = 100


def classifier_batch(data: Dataset, batch_size: int, seed: int, step: int) -> tuple[Tensor, Tensor]:
    """Step ``step``'s training pairs (x₀ float32 (B, ...), y int64 (B,)): rows drawn with replacement (and flips
    with ``data.hflip``) from the generator of (seed, step), as ``training.batches.StepBatches`` draws them."""
    gen = step_generator(seed, step)
    idx = torch.randint(0, len(data.train), (batch_size,), generator=gen)
    flip = torch.rand(batch_size, generator=gen) < 0.5
    x = data.decode(data.train[idx])
    if data.hflip:   # a mirrored image keeps its label
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x, data.train_labels[idx]


def _noised(sde: SDE, x0: Tensor, t: Tensor, generator: torch.Generator) -> Tensor:
    """x_t = α(t) x₀ + s(t) ε."""
    mean, std = sde.marginal_prob(x0, t)
    return mean + batch_broadcast(std, x0) * torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                                                         device=x0.device)


def fit_classifier(classifier: NoiseClassifier, data: Dataset, steps: int, batch_size: int, lr: float,
                   ema_decay: float, seed: int, device: torch.device, eps: float = 1e-5, noisy: bool = True,
                   out: RunOutput | None = None, log_every: int = 100) -> NoiseClassifier:
    """Train ``classifier`` on ``data``'s labelled training split; return the EMA of its weights (eval mode).

    Each step draws a batch (:func:`classifier_batch`), t ~ U(eps, T) per sample and x_t = α x₀ + s ε
    (with ``noisy=False``: t = 0 and x₀ itself, a classifier of clean data), and takes an Adam step on
    the mean cross-entropy −log p_θ(y | x_t, t). t and ε come from a generator seeded by ``seed`` on the
    device; the same seed gives the same weights. ``out`` receives train_log.csv rows every ``log_every`` steps.
    """
    if data.train_labels is None:
        raise UserError(f"data={data.name} has no class labels, and a classifier learns them; use labelled data.")
    sde = classifier.sde
    classifier.to(device).train()
    ema = EMA(classifier, ema_decay)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    gen = torch.Generator(device=device).manual_seed(seed)
    bar = out.start_progress(steps, desc="train_classifier") if out is not None else None
    for step in range(steps):
        rate = lr * min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = rate
        x0, y = (v.to(device, non_blocking=True) for v in classifier_batch(data, batch_size, seed, step))
        if noisy:
            t = eps + torch.rand(batch_size, generator=gen, device=device) * (sde.T - eps)
            x = _noised(sde, x0, t, gen)
        else:
            t, x = torch.zeros(batch_size, device=device), x0
        logits = classifier(x, t)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(classifier)
        if bar is not None:
            bar.update()
        if out is not None and ((step + 1) % log_every == 0 or step + 1 == steps):   # the only host syncs
            accuracy = (logits.argmax(1) == y).float().mean()
            out.log_row("train_log", {"step": step + 1, "loss": loss.item(), "batch_accuracy": accuracy.item(),
                                      "lr": rate})
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema.module


def exact_classifier(sde: SDE, mixture: GaussianMixture) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact p(y | x_t) of a Gaussian mixture whose classes are its components, as logits:
    log w_k + log N(x; α μ_k, α² Σ_k + s² I) (normalised by log_softmax, these are log responsibilities).

    Each term is the exact log-density of the one-component mixture k (``MixtureScore.log_prob``).
    """
    covs = mixture.covariances()
    parts = [MixtureScore(sde, GaussianMixture(torch.ones(1), mixture.means[k:k + 1], covs[k:k + 1],
                                               mixture.event_shape)) for k in range(len(mixture.weights))]
    log_w = mixture.weights.log()

    def logits(x: Tensor, t: Tensor) -> Tensor:
        return torch.stack([part.log_prob(x, t) for part in parts], dim=1) + log_w.to(x.dtype).to(x.device)

    return logits


@torch.no_grad()
def held_out_accuracy(classifier: Callable[[Tensor, Tensor], Tensor], sde: SDE, data: Dataset,
                      times: list[float], seed: int, exact: Callable[[Tensor, Tensor], Tensor] | None = None,
                      batch_size: int = 1024) -> list[dict[str, float]]:
    """Per t in ``times`` (× T): the accuracy and mean cross-entropy (nats) of ``classifier`` on the test split
    noised to x_t (noise from a generator of ``seed``, the same for every t's draw order), and with ``exact``
    the exact classifier's accuracy, the share of points where the two predict the same class (agreement) and the
    mean KL(exact ‖ classifier) in nats over the same points."""
    rows = []
    device = data.test.device
    for t_value in times:
        gen = torch.Generator(device=device).manual_seed(seed)
        total = torch.zeros(5, dtype=torch.float64, device=device)   # correct, cross-entropy, exact: correct, KL, agree
        for start in range(0, len(data.test), batch_size):
            x0 = data.decode(data.test[start:start + batch_size])
            y = data.test_labels[start:start + batch_size].to(device)
            t = torch.full((len(x0),), t_value * sde.T, dtype=x0.dtype, device=device)
            x = _noised(sde, x0, t, gen)
            logp = torch.log_softmax(classifier(x, t).double(), dim=1)
            total[0] += (logp.argmax(1) == y).sum()
            total[1] -= logp.gather(1, y[:, None]).sum()
            if exact is not None:
                logq = torch.log_softmax(exact(x.double(), t.double()), dim=1)
                total[2] += (logq.argmax(1) == y).sum()
                total[3] += (logq.exp() * (logq - logp)).sum()
                total[4] += (logq.argmax(1) == logp.argmax(1)).sum()
        total = (total / len(data.test)).tolist()
        row = {"t": t_value, "accuracy": total[0], "cross_entropy": total[1]}
        if exact is not None:
            row.update(exact_accuracy=total[2], kl_nats=total[3], agreement=total[4])
        rows.append(row)
    return rows


def train_classifier_task(cfg: DictConfig, run_dir: Path, overridden: set[str]) -> dict[str, Any]:
    """``task=train_classifier``: the config's SDE and data, a classifier network from ``task.*``, trained and
    measured; writes checkpoints/classifier.pt, train_log.csv, classifier_eval.csv, config.yaml and metrics.json."""
    if cfg.ckpt != "pretrained":
        raise UserError(f"ckpt={cfg.ckpt} does not apply to task=train_classifier (it trains on the data, not on a "
                        "score model); drop ckpt.")
    if distributed.world_size() > 1:
        raise UserError("task=train_classifier runs in one process; start it without torchrun.")
    task = build_options(TrainClassifierTask, OmegaConf.to_container(cfg.task, resolve=True), "task=train_classifier")
    sde = build_sde(cfg.sde)
    data = load_data(cfg.data, cfg.seed)
    if data.train_labels is None:
        raise UserError(f"data={data.name} has no class labels, and task=train_classifier learns them; use labelled "
                        "data (digits, an image folder with one sub-folder per class, cifar10, mnist, or a mixture).")
    device = torch.device(cfg.device)
    num_classes = len(data.classes) if data.classes is not None else int(data.train_labels.max()) + 1
    kind = task.net or ("conv" if len(data.event_shape) == 3 else "mlp")
    if kind == "conv":
        net_kwargs = {"base_channels": task.hidden or 32, "channel_mults": tuple(2**i for i in range(task.depth))}
    else:
        net_kwargs = {"hidden": task.hidden or 128, "depth": task.depth}
    torch.manual_seed(cfg.seed)   # the network's initialisation (and the Fourier embedding's frequencies)
    net = build_classifier(kind, data.event_shape, num_classes, embedding=task.embedding, **net_kwargs)
    classifier = NoiseClassifier(net, sde, sigma_data=round(data.train_std(), 6), time_input=cfg.model.time_input,
                                 classes=data.classes)

    out = RunOutput(run_dir, logger=cfg.logger)
    n_params = sum(p.numel() for p in classifier.parameters())
    out.say(f"training a {kind} classifier of {n_params:,} parameters on {data.name} {data.event_shape}, "
            f"{num_classes} classes, with {type(sde).__name__}")
    try:
        trained = fit_classifier(classifier, data, task.steps, task.batch_size, task.lr, task.ema_decay, cfg.seed,
                                 device, eps=task.eps, out=out, log_every=task.log_every)
    finally:
        out.close()
    test = dataclasses.replace(data, test=data.test.to(device), test_labels=data.test_labels.to(device))
    exact = exact_classifier(sde, data.mixture) if data.mixture is not None else None
    rows = held_out_accuracy(trained, sde, test, [max(t, task.eps) for t in task.eval_times], cfg.seed + 17, exact)
    out.write_csv("classifier_eval.csv", rows, list(rows[0]))
    trained.info = {"data": data.name, "data_range": list(data.data_range) if data.data_range else None,
                    "steps": task.steps, "seed": cfg.seed, "eval": rows}
    if out.writes:
        save_classifier(out.ckpt_dir / "classifier.pt", trained)
    out.write_text("config.yaml", OmegaConf.to_yaml(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))))
    metrics: dict[str, Any] = {"task": "train_classifier", "sde": type(sde).__name__, "data": data.name,
                               "model": f"{kind} classifier", "steps": task.steps, "n_params": n_params,
                               "num_classes": num_classes}
    for row in rows:
        metrics.update({f"{key}_t{row['t']:g}": value for key, value in row.items() if key != "t"})
    shown = ", ".join(f"{row['accuracy']:.3f} (t={row['t']:g})" for row in rows)
    metrics["note"] = f"held-out accuracy {shown}"
    if exact is not None:
        metrics["note"] += "; exact classifier " + ", ".join(f"{row['exact_accuracy']:.3f}" for row in rows)
    metrics["note"] += f"; classifier in {out.ckpt_dir / 'classifier.pt'}"
    return out.metrics(metrics)
