"""Figures a person reads: a scatter of 2-D samples beside data, or a grid of image samples."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


#: The most classes a labelled image grid shows (one row each) and the most images per row.
MAX_CLASS_ROWS, MAX_PER_ROW = 16, 10


def _class_grid(samples: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Rows of up to MAX_PER_ROW images of one class each (the first classes present, in label order), the
    gaps of a class with fewer images left blank: ((rows, cols, C, H, W) images, the label of each row)."""
    present = sorted(set(labels.tolist()))[:MAX_CLASS_ROWS]
    cols = min(MAX_PER_ROW, max(int((labels == k).sum()) for k in present))
    grid = torch.full((len(present), cols, *samples.shape[1:]), float("nan"))
    for r, k in enumerate(present):
        mine = samples[labels == k][:cols]
        grid[r, :len(mine)] = mine
    return grid, present


def save_samples(path: Path, samples: torch.Tensor, title: str, data: torch.Tensor | None = None,
                 value_range: tuple[float, float] | None = None, labels: torch.Tensor | None = None,
                 classes: Sequence[str] | None = None) -> None:
    """Write samples (B, ...) as a PNG: an image grid for (B, C, H, W), else a scatter of the first two coordinates.

    With ``data``, a scatter shows the data beside the samples. Images are shown with ``value_range``
    (the data's (low, high)) as black to white, values beyond it clipped; without it, the samples' own
    range. With ``labels`` (B,) (the class each sample was drawn for; −1: none), images are laid out one row
    per class (at most 16 rows of 10), each row named by ``classes[label]`` (or the label), and scatter
    points are coloured by class, with a legend.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = samples.detach().float().cpu()
    labels = None if labels is None else labels.detach().cpu().long()
    if labels is not None and labels.shape != samples.shape[:1]:
        raise ValueError(f"labels must have shape ({len(samples)},), one per sample, got {tuple(labels.shape)}.")

    def name(k: int) -> str:
        return "no label" if k < 0 else (str(classes[k]) if classes is not None and k < len(classes) else str(k))

    if samples.dim() == 4 and labels is not None:
        imgs, rows = _class_grid(samples, labels)
        lo, hi = value_range if value_range is not None else (samples.min().item(), samples.max().item())
        imgs = ((imgs - lo) / max(hi - lo, 1e-12)).clamp(0.0, 1.0).nan_to_num(1.0)   # blank cells white
        imgs = torch.nn.functional.pad(imgs, (1, 1, 1, 1), value=1.0)
        n_rows, n_cols, c, h, w = imgs.shape
        grid = imgs.permute(0, 3, 1, 4, 2).reshape(n_rows * h, n_cols * w, c)
        fig, ax = plt.subplots(figsize=(0.5 * n_cols + 1.5, 0.5 * n_rows + 1))
        ax.imshow(grid.squeeze(-1).numpy(), cmap="gray" if c == 1 else None, vmin=0.0, vmax=1.0)
        ax.set_xticks([])
        ax.set_yticks([h * (r + 0.5) for r in range(n_rows)], [name(k) for k in rows], fontsize=7)
        for side in ax.spines.values():
            side.set_visible(False)
    elif samples.dim() == 4:
        n = min(len(samples), 64)
        side = int(n**0.5)
        imgs = samples[:side * side]
        lo, hi = value_range if value_range is not None else (imgs.min().item(), imgs.max().item())
        imgs = ((imgs - lo) / max(hi - lo, 1e-12)).clamp(0.0, 1.0)
        imgs = torch.nn.functional.pad(imgs, (1, 1, 1, 1), value=1.0)  # a white frame per image
        c, h, w = imgs.shape[1:]
        grid = imgs.reshape(side, side, c, h, w).permute(0, 3, 1, 4, 2).reshape(side * h, side * w, c)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(grid.squeeze(-1).numpy(), cmap="gray" if c == 1 else None, vmin=0.0, vmax=1.0)
        ax.axis("off")
    else:
        flat = samples.flatten(1)
        panels = [("samples", flat)] if data is None else [("data", data.detach().float().cpu().flatten(1)),
                                                         ("samples", flat)]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False,
                                 sharex=True, sharey=True)
        for ax, (panel, pts) in zip(axes[0], panels):
            if panel == "samples" and labels is not None:
                for k in sorted(set(labels.tolist())):
                    ax.scatter(pts[labels == k, 0], pts[labels == k, 1], s=1, alpha=0.4, label=name(k))
                if len(set(labels.tolist())) <= 20:
                    ax.legend(fontsize=6, markerscale=6, loc="upper right")
            else:
                ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
            ax.set_title(panel)
            ax.set_aspect("equal")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_trajectories(path: Path, times: torch.Tensor, states: torch.Tensor, title: str) -> None:
    """Write a few sampling paths as a PNG.

    times (S,) and states (S, k, ...) as in ``SampleResult.trajectory``. Images (k, C, H, W):
    one row per path, eight snapshots from t = T to the end. Other data: the paths in the plane
    of the first two coordinates, beside the first coordinate against t.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times, states = times.detach().double().cpu(), states.detach().float().cpu()
    if states.dim() == 5:
        cols = [int((times - t).abs().argmin()) for t in torch.linspace(times[0].item(), times[-1].item(), 8)]
        k = min(states.shape[1], 8)
        fig, axes = plt.subplots(k, len(cols), figsize=(1.2 * len(cols), 1.2 * k + 0.5), squeeze=False)
        for row in range(k):
            for j, s in enumerate(cols):
                img = states[s, row]
                axes[row][j].imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if img.shape[0] == 1 else None)
                axes[row][j].axis("off")
                if row == 0:
                    axes[row][j].set_title(f"t={times[s].item():.3g}", fontsize=7)
    else:
        flat = states.flatten(2)
        dims = min(flat.shape[2], 2)
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), squeeze=False)
        plane, trace = axes[0]
        for j in range(flat.shape[1]):
            line = plane.plot(flat[:, j, 0], flat[:, j, dims - 1], lw=0.8, alpha=0.8)[0]
            plane.plot(flat[-1, j, 0], flat[-1, j, dims - 1], "o", ms=3, color=line.get_color())
            trace.plot(times, flat[:, j, 0], lw=0.8, color=line.get_color())
        plane.set_title("paths (first two coordinates), dots: samples")
        plane.set_aspect("equal")
        trace.set_xlabel("t")
        trace.set_ylabel("first coordinate")
        trace.invert_xaxis()
        trace.set_title("first coordinate against t")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
