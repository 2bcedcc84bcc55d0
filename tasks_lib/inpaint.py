"""``task=inpaint``: fill in masked entries of held-out test points with ``solvers.inpaint`` (docs/inpainting.md).

``python run.py task=inpaint inpaint.mask=center data=digits`` takes ``task.n_samples`` held-out test points
(a seeded choice), hides the entries the mask marks unknown, and completes them. Mask specs (``inpaint.mask``),
over one sample (images: the H×W pixels, all channels alike; vectors: the D coordinates):

- ``left_half``: the left half known (images: columns < W/2; vectors: the first ⌊D/2⌋ coordinates, for the 2-D
  toy sets the first coordinate), the rest filled in;
- ``center``: the central square of side H/2 filled in (vectors: the middle ⌈D/2⌉ coordinates), the rest known;
- ``random:p``: each entry unknown with probability p, per input (seeded);
- ``FILE``: a ``.npy`` of 0/1 (1 = known) of one sample's shape (or H×W for images), or a ``.png`` for images
  (white = known, black = fill in), of H×W pixels.

Writes ``inpaint.npz`` (inputs, masks, completions), ``inpaint.png`` and ``metrics.json``; with ``ckpt=exact``
on a Gaussian-mixture data set also the error against the exact conditional (``evaluation.inpainting``).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import solvers
from core_lib import UserError
from evaluation import RunOutput, load_data
from evaluation.inpainting import conditional_error
from tasks_lib.model_source import resolve_model
from tasks_lib.sample import check_solver_options, dtype_of, header, write_config

__all__ = ["inpaint_task", "check_inpaint", "parse_mask_spec", "build_masks", "MASK_NAMES"]

#: The named masks of ``inpaint.mask`` (besides ``random:p`` and a file).
MASK_NAMES = ("left_half", "center")
_RANDOM = re.compile(r"random:(.+)")


def parse_mask_spec(spec: str) -> tuple[str, Any]:
    """``inpaint.mask`` as (kind, argument): ("left_half", None), ("center", None), ("random", p) or ("file", array).

    Raises a UserError naming ``inpaint.mask`` for anything else: an unknown name, p outside (0, 1), a file that is
    missing, unreadable, not .npy/.png, or not all 0/1.
    """
    spec = str(spec)
    if spec in MASK_NAMES:
        return spec, None
    found = _RANDOM.fullmatch(spec)
    if found:
        try:
            p = float(found[1])
        except ValueError:
            p = float("nan")
        if not 0 < p < 1:
            raise UserError(f"inpaint.mask: random:p needs a fraction p in (0, 1) of entries to fill in, got {spec!r}.")
        return "random", p
    path = Path(spec)
    if path.suffix.lower() not in (".npy", ".png"):
        raise UserError(f"inpaint.mask: {spec!r} is not a mask; use left_half, center, random:p (0 < p < 1) or a .npy "
                        "/ .png file of 0/1 (1 = known).")
    if not path.is_file():
        raise UserError(f"inpaint.mask: the file {spec} does not exist; give a .npy of 0/1 of one sample's shape or a "
                        ".png (white = known).")
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            from PIL import Image
            with Image.open(path) as img:
                array = (np.asarray(img.convert("L")) > 127).astype(np.float32)
    except Exception as err:   # a corrupt file: say which and why, in one line
        raise UserError(f"inpaint.mask: cannot read {spec} ({str(err).splitlines()[0]}).") from None
    array = np.asarray(array, dtype=np.float64)
    if array.size == 0 or not np.isin(array, (0.0, 1.0)).all():
        raise UserError(f"inpaint.mask: {spec} must hold only 0 (fill in) and 1 (known).")
    return "file", array


def _fit_file(array: np.ndarray, shape: tuple[int, ...], spec: str) -> torch.Tensor:
    """A mask file's array as one sample's mask: its own shape, or H×W broadcast over an image's channels."""
    if tuple(array.shape) == shape:
        return torch.as_tensor(array, dtype=torch.float32)
    if len(shape) == 3 and tuple(array.shape) == shape[1:]:
        return torch.as_tensor(array, dtype=torch.float32).expand(shape).clone()
    wanted = f"{shape}" + (f" or {shape[1:]} (H×W)" if len(shape) == 3 else "")
    raise UserError(f"inpaint.mask: {spec} has shape {tuple(array.shape)}, but one sample of this data has shape "
                    f"{wanted}; give a mask of that shape.")


def build_masks(spec: str, shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    """The masks (n, *shape) of ``inpaint.mask`` for n inputs of one sample's ``shape`` (1 = known)."""
    kind, arg = parse_mask_spec(spec)
    one = torch.zeros(shape)
    if kind == "file":
        return _fit_file(arg, shape, spec).expand(n, *shape).clone()
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        return (torch.rand((n, *shape), generator=g) >= arg).float()
    if len(shape) == 3:   # images (C, H, W)
        h, w = shape[1:]
        if kind == "left_half":
            one[..., : w // 2] = 1
        else:
            one += 1
            top, left = (h - h // 2) // 2, (w - w // 2) // 2
            one[:, top: top + h // 2, left: left + w // 2] = 0
    else:
        flat = one.reshape(-1)
        d = flat.numel()
        if kind == "left_half":
            flat[: max(d // 2, 1)] = 1
        else:
            hole = math.ceil(d / 2)
            flat += 1
            start = (d - hole) // 2
            flat[start: start + hole] = 0
        one = flat.reshape(shape)
    return one.expand(n, *shape).clone()


def check_inpaint(cfg: DictConfig, overridden: set[str]) -> None:
    """``check_config``'s part for task=inpaint: the mask spec (a file's shape too, when the data say what a
    sample's shape is without loading a model: ckpt=exact or pretrained, or data= given) and, for
    ``inpaint.method=replace``, a solver that can replace (``Solver.takes_constraint``) with valid options."""
    kind, arg = parse_mask_spec(cfg.inpaint.mask)
    if kind == "file" and (cfg.ckpt in ("exact", "pretrained") or any(k == "data" or k.startswith("data.")
                                                                       for k in overridden)):
        _fit_file(arg, tuple(load_data(cfg.data, cfg.seed).event_shape), cfg.inpaint.mask)
    if cfg.inpaint.method == "replace":
        cls = solvers.get_solver(cfg.solver.name)
        if not cls.takes_constraint:
            able = [n for n in solvers.available() if solvers.get_solver(n).takes_constraint]
            raise UserError(f"inpaint.method=replace replaces the known entries after every solver step, and "
                            f"solver={cfg.solver.name} takes no such step; choose one of: {', '.join(able)}.")
        check_solver_options(cfg)


def inpaint_task(cfg: DictConfig, run_dir: Path, overridden: set[str]) -> dict[str, Any]:
    """Complete ``task.n_samples`` masked held-out test points; the figure, the arrays and the metrics."""
    device, dtype = torch.device(cfg.device), dtype_of(cfg)
    model = resolve_model(cfg, overridden, device)
    tc = cfg.task
    if model.data is None:
        raise UserError(f"task=inpaint fills in held-out test points, and ckpt={cfg.ckpt} comes without data: give "
                        f"data= with samples of shape {model.event_shape}.")
    shape = tuple(model.event_shape)
    masks = build_masks(cfg.inpaint.mask, shape, tc.n_samples, cfg.seed)   # a file of the wrong shape fails here, before work
    test = model.data.test_points()
    if tc.n_samples > len(test):
        raise UserError(f"task.n_samples={tc.n_samples} exceeds the {len(test)} held-out test points of "
                        f"data={model.data.name}; ask for at most {len(test)}.")
    out = RunOutput(run_dir)
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))[: tc.n_samples]
    truth = test[pick].to(device=device, dtype=dtype)
    masks = masks.to(device=device, dtype=dtype)
    options = {}
    if cfg.inpaint.method == "replace":
        options = dict(solver=cfg.solver.name, **OmegaConf.to_container(cfg.solver.options, resolve=True))
    else:
        options = {"particles": cfg.inpaint.particles}
    result = solvers.inpaint(model.sde, model.score_fn, truth, masks, method=cfg.inpaint.method, steps=tc.steps,
                             seed=cfg.seed, eps=tc.eps, **options)
    done = result.samples.cpu()
    truth, masks = truth.cpu(), masks.cpu()
    unknown = 1 - masks
    metrics = {**header(cfg, model), "method": cfg.inpaint.method, "solver": result.solver, "n_samples": tc.n_samples,
               "mask": str(cfg.inpaint.mask), "known_fraction": float(masks.mean()), "nfe": result.nfe,
               "inpaint_seconds": result.seconds}
    if cfg.inpaint.method == "smc":
        metrics["particles"] = cfg.inpaint.particles
    # The held-out truth is one draw of the conditional, not its mean: this is a distance, not an accuracy.
    metrics["rmse_unknown"] = float(((done - truth) * unknown).pow(2).sum().div(unknown.sum().clamp_min(1)).sqrt())
    if model.source == "exact" and model.data.mixture is not None:
        metrics.update(conditional_error(model.data.mixture, masks, truth, done, seed=cfg.seed).as_dict("exact_"))

    write_config(out, cfg, model)
    out.write_npz("inpaint.npz", inputs=truth.numpy(), masks=masks.numpy(), completions=done.numpy())
    title = f"{metrics['sde']}, inpaint ({cfg.inpaint.method}): {result.nfe} NFE"
    out.write_figure("inpaint.png", save_inpainting, truth, masks, done, title,
                     value_range=model.data.data_range, background=test)
    return out.metrics(metrics)


def save_inpainting(path: Path, inputs: torch.Tensor, masks: torch.Tensor, completions: torch.Tensor, title: str,
                    value_range: tuple[float, float] | None = None, background: torch.Tensor | None = None) -> None:
    """The figure of ``task=inpaint``: images as rows input / masked / completion (up to 8 columns); vectors as a
    scatter of the completions (the first two coordinates) over held-out data, the known values marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if inputs.dim() == 4:
        k = min(len(inputs), 8)
        lo, hi = value_range if value_range is not None else (float(inputs.min()), float(inputs.max()))
        masked = torch.where(masks.bool(), inputs, torch.full_like(inputs, lo + 0.5 * (hi - lo)))
        fig, axes = plt.subplots(3, k, figsize=(1.3 * k, 4.3), squeeze=False)
        for row, (name, imgs) in enumerate((("input", inputs), ("masked", masked), ("completion", completions))):
            for j in range(k):
                img = imgs[j].float().permute(1, 2, 0).squeeze(-1).numpy()
                axes[row][j].imshow(img, cmap="gray", vmin=lo, vmax=hi)
                axes[row][j].axis("off")
            axes[row][0].set_title(name, fontsize=8, loc="left")
    else:
        fig, ax = plt.subplots(figsize=(5, 5))
        if background is not None:
            bg = background.flatten(1)
            ax.scatter(bg[:, 0], bg[:, 1 % bg.shape[1]], s=1, alpha=0.15, color="grey", label="held-out data")
        pts = completions.flatten(1)
        ax.scatter(pts[:, 0], pts[:, 1 % pts.shape[1]], s=3, alpha=0.6, label="completions")
        ax.set_aspect("equal")
        ax.legend(loc="upper right", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
