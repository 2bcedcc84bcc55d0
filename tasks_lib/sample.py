"""``task=sample`` and ``task=likelihood``: what they compute, the files they write, the metrics they report.

With ``guidance.*`` (``tasks_lib.model_source.resolve_guidance``) ``task=sample`` draws class-conditional or
guided samples, scored against the held-out points of the same classes; ``task=likelihood`` of a conditional
model on labelled data also reports log p(x | y) of each point under its own label. On ``data=digits`` the shipped
digits classifier scores the samples too (``classifier_quality``): the Fréchet distance in its features to the
held-out digits, and for class-conditional samples the share it assigns to their labels.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import solvers
from core_lib import UserError, distributed
from data_lib import Dataset
from evaluation import (HeldOutLikelihood, LikelihoodConfig, RunOutput, class_accuracy,
                        frechet_distance, held_out_likelihood, load_digits_classifier, log_likelihood_on_ranks,
                        sample_on_ranks, sample_quality, save_samples, save_trajectories, sliced_wasserstein)
from solvers.calibrate import GridCalibration
from solvers.guidance import GuidanceWarning
from tasks_lib.model_source import Guidance, ResolvedModel, resolve_guidance, resolve_model

__all__ = ["sample_task", "likelihood_task", "check_solver_options", "calibrated_warp", "non_default_options",
           "CALIBRATION_FILE", "dtype_of", "likelihood_config", "write_config",
           "header", "labelled_quality", "quiet_guidance", "digits_classifier", "classifier_quality", "frechet_floor"]


def dtype_of(cfg: DictConfig) -> torch.dtype:
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(cfg.dtype)
    if dtype is None:
        raise UserError(f"dtype must be float32 or float64, got {cfg.dtype!r}; set dtype=float32 or dtype=float64.")
    return dtype


def check_solver_options(cfg: DictConfig) -> None:
    """The solver ``cfg.solver`` names, built from its options: a bad option is one error on the command line's path."""
    try:
        solvers.get_solver(cfg.solver.name)(**OmegaConf.to_container(cfg.solver.options, resolve=True))
    except solvers.SolverError as err:  # the option's own message
        raise UserError(f"solver.options ({cfg.solver.name}): {err}") from None


#: what task=calibrate writes and task=sample's task.calibration reads
CALIBRATION_FILE = "grid_calibration.json"


def non_default_options(solver: str, options: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that differ from ``solver``'s own defaults (its ``Options`` dataclass): what a grid
    calibration records, and what a solve that uses it must match."""
    default = dataclasses.asdict(solvers.get_solver(solver).Options())
    return {k: v for k, v in options.items() if v != default.get(k)}


def calibrated_warp(cfg: DictConfig) -> list[float] | None:
    """The warp ``task.calibration`` holds for this solve, or None without one; a UserError if it does not fit."""
    path = cfg.task.get("calibration")
    if path is None:
        return None
    try:
        cal = GridCalibration.load(path)
    except FileNotFoundError:
        raise UserError(f"task.calibration={path}: no such file; give the {CALIBRATION_FILE} that task=calibrate "
                        "wrote, or drop it.") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"task.calibration={path} is not a grid calibration ({type(err).__name__}: {err}); give the "
                        f"{CALIBRATION_FILE} that task=calibrate wrote.") from None
    options = OmegaConf.to_container(cfg.solver.options, resolve=True)
    if options.get("warp") is not None:
        raise UserError("solver.options.warp and task.calibration both set the grid's warp: drop one.")
    solver = cfg.solver.name
    steps = cfg.solver.steps or solvers.get_solver(solver).default_step_count
    if solver != cal.solver:
        raise UserError(f"task.calibration={path} was fitted for solver={cal.solver}, not solver={solver}: sample "
                        f"with solver={cal.solver}, or calibrate this one.")
    if steps not in cal.warps:
        raise UserError(f"task.calibration={path} has warps for solver.steps in {sorted(cal.warps)}, not {steps}: "
                        f"set solver.steps to one of them, or calibrate with task.budgets=[{steps}].")
    given, fitted = non_default_options(solver, options), non_default_options(solver, cal.options)
    differ = sorted(k for k in set(given) | set(fitted) if given.get(k) != fitted.get(k))
    if differ:
        raise UserError(f"task.calibration={path} was fitted with other solver.options ({', '.join(differ)}): use "
                        "the options it was fitted with, or calibrate with these.")
    eps = cfg.task.eps
    if eps is not None and abs(eps - cal.eps) > 1e-12 * cal.eps:
        raise UserError(f"task.calibration={path} was fitted for eps={cal.eps}, not task.eps={eps}: set "
                        f"task.eps={cal.eps}, or calibrate with task.eps={eps}.")
    return cal.warp(steps)


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


def quiet_guidance():
    """A context in which the solvers' GuidanceWarning stays silent: the tasks print their own one line
    (``Guidance.warning``) before any work instead."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore", GuidanceWarning)
    return stack


def _class_rows(point_labels: torch.Tensor, counts: dict[int, int]) -> torch.Tensor:
    """The indices of the first counts[k] points of class k, for every k, in class order."""
    return torch.cat([(point_labels == k).nonzero()[:c, 0] for k, c in sorted(counts.items())])


def component_log_density(data: Dataset, x: torch.Tensor) -> torch.Tensor:
    """log N(x; μ_k, Σ_k) of each point under each component k of the data's exact mixture, (B, K) in float64."""
    mixture = data.mixture
    flat = x.detach().double().cpu().flatten(1)
    ones, zeros = torch.ones(len(flat), dtype=torch.float64), torch.zeros(len(flat), dtype=torch.float64)
    joint = mixture._components(flat, ones, zeros)[0]               # log w_k + log N_k at t = 0
    return joint - mixture.weights.log()


def labelled_quality(samples: torch.Tensor, labels: torch.Tensor, data: Dataset, seed: int,
                     floor: bool = True) -> dict[str, float]:
    """Quality of class-conditional samples (labels (n,): the class each was drawn for) against held-out data.

    ``swd``: sliced W1 between the samples and the held-out points of the same classes, m_k of each class k
    from both sides, m_k = min(samples of class k, held-out points of class k) (so the class proportions
    agree); ``swd_floor``: the same between as many training and held-out points of those classes (a
    perfect sampler's score; ``floor=False`` leaves it out, for a caller scoring many sets of the same labels).
    For a Gaussian mixture, ``label_accuracy``: the share of samples whose most
    probable component under the exact p₀(k | x) is their label (below 1 for exact class-conditional draws
    only by the components' overlap: ``label_accuracy_exact``, the same share for the held-out points of
    those classes).
    """
    labels = labels.cpu()
    test, test_labels = data.test_points(), data.test_labels
    counts = {}
    for k in labels.unique().tolist():
        m = min(int((labels == k).sum()), int((test_labels == k).sum()))
        if m:
            counts[k] = m
    out: dict[str, float] = {}
    if counts:
        matched_test = test[_class_rows(test_labels, counts)]
        out["swd"] = sliced_wasserstein(samples[_class_rows(labels, counts)], matched_test, seed=seed)
        if floor:
            train = data.decode(data.train[_class_rows(data.train_labels, counts)])
            out["swd_floor"] = sliced_wasserstein(train, matched_test, seed=seed)
    if data.mixture is not None:
        prior = data.mixture.weights.log()
        guess = (component_log_density(data, samples) + prior).argmax(1)
        out["label_accuracy"] = (guess == labels).double().mean().item()
        mine = torch.isin(test_labels, labels.unique())   # held-out points of the samples' classes
        held = (component_log_density(data, test[mine]) + prior).argmax(1)
        out["label_accuracy_exact"] = (held == test_labels[mine]).double().mean().item()
    return out


def digits_classifier(data: Dataset | None, device: torch.device | str = "cpu"):
    """The shipped digits classifier (``evaluation.load_digits_classifier``) when the data are ``data=digits``,
    which it scores; None for any other data. It was trained on the training split of seed 0: with another
    ``seed`` some of the held-out digits it is scored against were among its training images."""
    if data is None or data.name != "digits" or data.event_shape != (1, 8, 8):
        return None
    return load_digits_classifier(device)


def classifier_quality(clf, samples: torch.Tensor, data: Dataset,
                       labels: torch.Tensor | None = None) -> dict[str, float]:
    """Samples scored by ``clf`` (``digits_classifier``): ``frechet_distance`` in its features to all held-out
    points, and with ``labels`` (the class each sample was drawn for) ``class_accuracy``, the share it assigns
    to them. The samples are in the data's ``data_range``, mapped onto the classifier's own; values the sampler
    left outside that range are scored as they are (not clipped)."""
    out = {"frechet_distance": frechet_distance(clf, samples, data.test_points(), data_range=data.data_range)}
    if labels is not None:
        out["class_accuracy"] = class_accuracy(clf, samples, labels, data_range=data.data_range)
    return out


def frechet_floor(clf, data: Dataset, n: int) -> float:
    """``frechet_distance`` of min(n, all) training points to the held-out points: what samples of the data
    distribution itself would score (the distance is biased upwards at small n, so compare sets of equal sizes)."""
    return frechet_distance(clf, data.decode(data.train[:n]), data.test_points(), data_range=data.data_range)


def _labelled(guidance: Guidance, data: Dataset) -> bool:
    """Whether the samples' labels are the data's classes."""
    return guidance.labels is not None and bool(data.num_classes) and data.num_classes == len(guidance.classes or ())


def _guided_quality(samples: torch.Tensor, guidance: Guidance, data: Dataset, seed: int) -> dict[str, Any]:
    """Sample quality: against the held-out points of the samples' classes when the data carry those classes;
    on digits also by the shipped classifier (``classifier_quality``)."""
    labelled = _labelled(guidance, data)
    out = labelled_quality(samples, guidance.labels, data, seed) if labelled else sample_quality(samples, data, seed)
    clf = digits_classifier(data)
    if clf is not None:
        out.update(classifier_quality(clf, samples, data, guidance.labels if labelled else None),
                   frechet_floor=frechet_floor(clf, data, len(samples)))
    return out


def sample_task(cfg: DictConfig, run_dir: Path, overridden: set[str]) -> dict[str, Any]:
    """Sample with the chosen SDE and solver (and ``guidance.*``); quality against held-out data; the ODE
    likelihood of test data."""
    out = RunOutput(run_dir)
    device, dtype = torch.device(cfg.device), dtype_of(cfg)
    model = resolve_model(cfg, overridden, device)
    tc = cfg.task
    if tc.likelihood and model.data is not None:   # likelihood.divergence=auto against refine/control_variate
        likelihood_config(cfg).divergence_for(model.data)
    guidance = resolve_guidance(cfg, model, tc.n_samples, device)
    if guidance.warning:
        out.say(guidance.warning)
    options = OmegaConf.to_container(cfg.solver.options, resolve=True)
    if tc.calibration is not None:   # checked before any work (check_config)
        options["warp"] = calibrated_warp(cfg)
    with quiet_guidance():
        result = sample_on_ranks(model.sde, model.score_fn, (tc.n_samples, *model.event_shape),
                                 solver=cfg.solver.name, steps=cfg.solver.steps, eps=tc.eps, seed=cfg.seed,
                                 device=device, dtype=dtype, trajectory=min(tc.trajectories, tc.n_samples),
                                 progress=True, **options, **guidance.options(device=device))
    samples = result.samples.cpu()
    metrics = {**header(cfg, model), "solver": cfg.solver.name, "n_samples": tc.n_samples, "nfe": result.nfe,
               "sample_seconds": result.seconds}
    if tc.calibration is not None:
        metrics["calibration"] = tc.calibration
    if guidance.describe():
        metrics["guidance"] = guidance.describe()
    if model.data is None:
        metrics["note"] = NO_DATA_NOTE
    else:
        metrics.update(_guided_quality(samples, guidance, model.data, cfg.seed))
    if tc.likelihood and model.data is not None:
        held_out = held_out_likelihood(model.sde, model.score_fn, model.data, likelihood_config(cfg), cfg.seed,
                                       device, dtype, progress=True)
        metrics.update(_likelihood_metrics(held_out))

    write_config(out, cfg, model)
    labelled = {} if guidance.labels is None else {"y": guidance.labels.numpy()}
    out.write_npz("samples.npz", samples=samples.numpy(), z=result.z.cpu().numpy(), **labelled)
    title = f"{metrics['sde']}, {cfg.solver.name}: {result.nfe} NFE" + (f"; {metrics['guidance']}"
                                                                       if "guidance" in metrics else "")
    beside = None if samples.dim() == 4 or model.data is None else model.data.test_points()   # scatter plots only
    shown = model.data.data_range if model.data is not None else None   # images: the data's range, black to white
    out.write_figure("samples.png", save_samples, samples, title, data=beside, value_range=shown,
                     labels=guidance.labels, classes=guidance.classes)
    if result.trajectory is not None:
        out.write_figure("trajectories.png", save_trajectories, *result.trajectory, title)
    return out.metrics(metrics)


def conditional_likelihood(model: ResolvedModel, held_out: HeldOutLikelihood, config: LikelihoodConfig, seed: int,
                           device: torch.device, progress: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """log p(x | y) of the points ``held_out`` scored, each under its own held-out label: (metrics, arrays).

    The same points (dequantised alike), ODE settings and Hutchinson probes as the unconditional likelihood,
    so the two are paired: their difference per point is log p(y | x) − log p(y). For a Gaussian mixture whose
    classes are its components the exact −log p₀(x | y) gives ``kl_cond_nats``.
    """
    data = model.data
    y = data.test_labels[:held_out.n_eval]
    options = config.options_for(data)
    lik = log_likelihood_on_ranks(model.sde, model.score_fn, held_out.points, seed=seed, levels=data.levels,
                                  data_range=data.data_range, progress=progress,
                                  cond={"y": y.to(device)}, **options)
    nll = -lik.logp.double()
    metrics = {"nll_cond_nats": nll.mean().item(),
               "nll_cond_stderr_nats": (nll.std() / len(nll) ** 0.5).item() if len(nll) > 1 else 0.0,
               "bpd_cond": lik.bpd.double().mean().item(), "likelihood_cond_nfe": lik.nfe}
    if data.mixture is not None and data.mixture.weights.numel() == data.num_classes:
        exact = -component_log_density(data, held_out.points).gather(1, y[:, None])[:, 0]
        metrics.update(nll_cond_exact_nats=exact.mean().item(), kl_cond_nats=metrics["nll_cond_nats"] - exact.mean().item())
    return metrics, {"y": y.numpy(), "logp_cond": lik.logp.cpu().numpy()}


def likelihood_task(cfg: DictConfig, run_dir: Path, overridden: set[str]) -> dict[str, Any]:
    """The ODE log-likelihood of ``likelihood.n_eval`` held-out points: nats, bits/dim, and per point; for a
    class-conditional model on labelled data also log p(x | y) under each point's own label (``nll_cond_nats``)."""
    out = RunOutput(run_dir)
    device, dtype = torch.device(cfg.device), dtype_of(cfg)
    model = resolve_model(cfg, overridden, device)
    config = likelihood_config(cfg)
    conditional = bool(getattr(model.score_fn, "conditional", False))
    K = int(getattr(model.score_fn, "num_classes", 0) or 0)
    if conditional and model.data.num_classes and model.data.num_classes != K:
        raise UserError(f"data={model.data.name} has {model.data.num_classes} classes but ckpt={cfg.ckpt} has {K}; "
                        "log p(x | y) needs the labels the model was trained on: drop the data override.")
    held_out = held_out_likelihood(model.sde, model.score_fn, model.data, config, cfg.seed, device,
                                   dtype, progress=True)
    metrics = {**header(cfg, model), **_likelihood_metrics(held_out)}
    arrays: dict[str, Any] = {}
    if conditional and model.data.num_classes:
        extra, arrays = conditional_likelihood(model, held_out, config, cfg.seed, device, progress=True)
        metrics.update(extra)
    write_config(out, cfg, model)
    lik = held_out.result
    out.write_npz("likelihood.npz", x=held_out.points.cpu().numpy(), logp=lik.logp.cpu().numpy(),
         bpd=lik.bpd.cpu().numpy(), z=lik.z.cpu().numpy(), **arrays)
    return out.metrics(metrics)
