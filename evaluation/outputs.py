"""The one writer of a run's files: result files, CSV logs, checkpoints, the progress bar.

Every task (sample, likelihood, compare, train) writes through :class:`RunOutput`, so the rules
hold for all of them: a run refuses a directory that already holds a finished run's
``metrics.json``; nothing is written until the run has something to write; every result file
and checkpoint is written atomically (``core_lib.atomic_write``: temporary file, fsync, rename),
so a full disk or an interrupt leaves no partial file. Side effects that only one process may have in
a multi-process run go through this class alone.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from core_lib import OutputError, UserError, atomic_write
from models.checkpoint import save_checkpoint

__all__ = ["RunOutput", "RunDirError"]


class RunDirError(UserError):
    """The run directory cannot take this run (it holds a finished one)."""


class RunOutput:
    """The files of one run in ``run_dir``."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        if (self.run_dir / "metrics.json").exists():
            raise RunDirError(f"{self.run_dir} already holds a run's metrics.json; choose another output directory "
                              "(hydra.run.dir=...) rather than overwrite it.")
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._logs: dict[str, tuple[Any, csv.DictWriter]] = {}
        self.progress: tqdm | None = None

    def path(self, name: str) -> Path:
        """Where file ``name`` of the run goes (the directory is created on first use)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create the run directory {self.run_dir} ({err.strerror}); choose a writable "
                              "one (hydra.run.dir=...).") from None
        return self.run_dir / name

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.path(name), lambda tmp: Path(tmp).write_text(text))

    def write_npz(self, name: str, **arrays) -> None:
        """Arrays (numpy) as one .npz file ``name``."""
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        atomic_write(self.path(name), write)

    def write_figure(self, name: str, plot: Callable[..., None], *args, **kwargs) -> None:
        """``plot(path, *args, **kwargs)`` into file ``name`` (see ``evaluation.plots``)."""
        atomic_write(self.path(name), lambda tmp: plot(Path(tmp), *args, **kwargs))

    def metrics(self, metrics: dict[str, Any]) -> None:
        """metrics.json: the run's flat result keys; written last, it marks the run finished."""
        self.write_text("metrics.json", json.dumps(metrics, indent=2) + "\n")

    def log_row(self, name: str, row: dict[str, Any]) -> None:
        """Append a row to ``<name>.csv`` (header from the first row), flushed at once."""
        if name not in self._logs:
            path = self.path(f"{name}.csv")
            f = open(path, "a", newline="")
            writer = csv.DictWriter(f, fieldnames=list(row))
            if path.stat().st_size == 0:
                writer.writeheader()
            self._logs[name] = (f, writer)
        f, writer = self._logs[name]
        writer.writerow(row)
        f.flush()

    def write_csv(self, name: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
        """A whole table as ``name`` (missing cells left empty)."""
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
        atomic_write(self.path(name), write)

    def checkpoint(self, state: dict[str, Any], step: int, keep: bool) -> None:
        """checkpoints/last.pt, and with ``keep`` also checkpoints/step_XXXXXXX.pt (both atomic)."""
        save_checkpoint(self.ckpt_dir / "last.pt", state)
        if keep:
            save_checkpoint(self.ckpt_dir / f"step_{step:07d}.pt", state)

    def start_progress(self, total: int, initial: int = 0, desc: str = "train", unit: str = "step") -> tqdm:
        self.progress = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, desc=desc)
        return self.progress

    def say(self, line: str) -> None:
        """A line for the person watching, above the progress bar when there is one."""
        (self.progress.write if self.progress is not None else print)(line)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        for f, _ in self._logs.values():
            f.close()
        self._logs.clear()
