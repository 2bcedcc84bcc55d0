"""Figures a person reads: a scatter of 2-D samples beside data, or a grid of image samples."""
from __future__ import annotations

from pathlib import Path

import torch


def save_samples(path: Path, samples: torch.Tensor, title: str, data: torch.Tensor | None = None) -> None:
    """Write samples (B, ...) as a PNG: an image grid for (B, C, H, W), else a scatter of the first two coordinates.

    With ``data``, a scatter shows the data beside the samples.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = samples.detach().float().cpu()
    if samples.dim() == 4:
        n = min(len(samples), 64)
        side = int(n**0.5)
        imgs = samples[:side * side]
        imgs = torch.nn.functional.pad(imgs, (1, 1, 1, 1), value=float(imgs.max()))  # a light frame per image
        c, h, w = imgs.shape[1:]
        grid = imgs.reshape(side, side, c, h, w).permute(0, 3, 1, 4, 2).reshape(side * h, side * w, c)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(grid.squeeze(-1).clamp(grid.min(), grid.max()).numpy(), cmap="gray" if c == 1 else None)
        ax.axis("off")
    else:
        flat = samples.flatten(1)
        panels = [("samples", flat)] if data is None else [("data", data.detach().float().cpu().flatten(1)),
                                                         ("samples", flat)]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False,
                                 sharex=True, sharey=True)
        for ax, (name, pts) in zip(axes[0], panels):
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
            ax.set_title(name)
            ax.set_aspect("equal")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
