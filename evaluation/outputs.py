"""The one writer of a run's files: result files, CSV logs, checkpoints, the progress bar.

Every task (sample, likelihood, compare, train) writes through :class:`RunOutput`, so the rules
hold for all of them: a run refuses a directory that already holds a finished run's
``metrics.json``; nothing is written until the run has something to write; every result file
and checkpoint is written atomically (``core_lib.atomic_write``: temporary file, fsync, rename),
so a full disk or an interrupt leaves no partial file. Side effects that only one process may have in
a multi-process run go through this class alone: in a torchrun job only rank 0's RunOutput claims the
directory and writes; on the other ranks every method is a no-op (and the progress bar is hidden).

With ``logger="tensorboard"`` the CSV logs are still written, and every row's numeric values also go
to a TensorBoard ``SummaryWriter`` in ``<run dir>/tensorboard/`` (tag ``train/loss`` for column
``loss`` of ``train_log``, at global step ``row["step"]``), and every PNG figure as an image.
"""
from __future__ import annotations

import csv
import datetime
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from core_lib import OutputError, UserError, atomic_write, distributed
from models.checkpoint import export_checkpoint, save_checkpoint

__all__ = ["RunOutput", "RunDirError", "claim_run_dir", "release_run_dir", "run_identity", "LOGGERS"]

#: Where a run's log rows go besides its CSV files (``logger=...``): nowhere else, or TensorBoard event files.
LOGGERS = ("csv", "tensorboard")

log = logging.getLogger(__name__)


class RunDirError(UserError):
    """The run directory cannot take this run (it holds a finished one)."""


_STARTED = datetime.datetime.now().isoformat(timespec="seconds")

#: Run directories this process holds the lock of: path -> the open lock file (the lock lives as long as it).
_HELD: dict[Path, Any] = {}


def claim_run_dir(run_dir: str | Path) -> Path:
    """Take the exclusive lock of ``run_dir`` for this process (until it exits), or refuse with one line.

    Refused when the directory already holds a finished run (``metrics.json``) or another live process
    holds its lock (``.lock``, an advisory ``flock`` that the kernel releases when that process ends,
    however it ends). Nothing in the directory is written but the lock file.
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD:
        return run_dir
    if (run_dir / "metrics.json").exists():
        raise RunDirError(f"{run_dir} already holds a finished run (metrics.json); choose another output directory "
                          "(hydra.run.dir=...) rather than overwrite it.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / ".lock", "a")
    except OSError as err:
        raise OutputError(f"cannot create the run directory {run_dir} ({err.strerror}); choose a writable one "
                          "(hydra.run.dir=...).") from None
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        holder = (run_dir / ".lock").read_text().strip() or "another process"
        raise RunDirError(f"another run ({holder}) is writing into {run_dir}; wait for it, or choose another output "
                          "directory (hydra.run.dir=...).") from None
    lock.truncate(0)
    lock.write(run_identity() + "\n")
    lock.flush()
    _HELD[run_dir] = lock
    return run_dir


def run_identity() -> str:
    """Who this run is: process id, host and start time (in the lock file and in metrics.json)."""
    return f"pid {os.getpid()} on {socket.gethostname()}, started {_STARTED}"


def release_run_dir(run_dir: str | Path) -> None:
    """Give up this process's lock of ``run_dir`` (a run ends: the next run of this process may use it)."""
    lock = _HELD.pop(Path(run_dir).resolve(), None)
    if lock is not None:
        lock.close()


class RunOutput:
    """The files of one run in ``run_dir``, which it claims (:func:`claim_run_dir`) for this process.

    ``writes`` is False on the ranks other than 0 of a torchrun job: they claim nothing and write nothing.
    ``logger``: one of :data:`LOGGERS`; "tensorboard" also writes the log rows and PNG figures as TensorBoard
    events into ``run_dir/tensorboard/`` (the writer is opened at the first of them).
    """

    def __init__(self, run_dir: str | Path, logger: str = "csv"):
        if logger not in LOGGERS:
            raise UserError(f"logger: must be one of {', '.join(LOGGERS)}, got {logger!r}.")
        self.run_dir = Path(run_dir)
        self.writes = distributed.is_main()
        self.logger = logger
        if self.writes:
            claim_run_dir(self.run_dir)
            log.info("run: %s, in %s", run_identity(), self.run_dir)   # hydra's run.log carries who wrote it
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._logs: dict[str, tuple[Any, csv.DictWriter]] = {}
        self.progress: tqdm | None = None
        self._board = None               # the SummaryWriter, opened on first use
        self._step = 0                   # the newest logged row's step: where a figure without a step goes
        self._purge_step: int | None = None   # a resumed run's first redone step (truncate_log)

    def path(self, name: str) -> Path:
        """Where file ``name`` of the run goes (the directory is created on first use)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create the run directory {self.run_dir} ({err.strerror}); choose a writable "
                              "one (hydra.run.dir=...).") from None
        return self.run_dir / name

    def write_text(self, name: str, text: str) -> None:
        if not self.writes:
            return
        atomic_write(self.path(name), lambda tmp: Path(tmp).write_text(text))

    def write_npz(self, name: str, **arrays) -> None:
        """Arrays (numpy) as one .npz file ``name``."""
        if not self.writes:
            return
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        atomic_write(self.path(name), write)

    def write_figure(self, name: str, plot: Callable[..., None], *args, step: int | None = None, **kwargs) -> None:
        """``plot(path, *args, **kwargs)`` into file ``name`` (see ``evaluation.plots``).

        With ``logger="tensorboard"`` a PNG also goes in as image ``<name without .png>`` at global step
        ``step`` (None: the step of the newest logged row, 0 before any).
        """
        if not self.writes:
            return
        atomic_write(self.path(name), lambda tmp: plot(Path(tmp), *args, **kwargs))
        if self.logger == "tensorboard" and name.endswith(".png"):
            from matplotlib.image import imread

            image = imread(self.path(name))[..., :3]   # float RGB(A) in [0, 1], height x width x channels
            self._writer().add_image(Path(name).stem, image, global_step=self._step if step is None else step,
                                     dataformats="HWC")
            self._board.flush()

    def export(self, name: str, src: str | Path, format: str) -> Path:
        """A sampling-only export of checkpoint ``src`` as ``name`` (``models.checkpoint.export_checkpoint``:
        a directory for format "safetensors", a .pt file for "pt"); returns its path."""
        if self.writes:
            export_checkpoint(src, self.path(name), format)
        return self.run_dir / name

    def metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """metrics.json: the run's flat result keys and ``run`` (its identity); written last, it marks the run
        finished and frees the directory. Returns what was written."""
        metrics = {**metrics, "world_size": distributed.world_size(), "run": run_identity()}
        if self.writes:
            self.write_text("metrics.json", json.dumps(metrics, indent=2) + "\n")
            release_run_dir(self.run_dir)
        return metrics

    def log_row(self, name: str, row: dict[str, Any]) -> None:
        """Append a row to ``<name>.csv`` (header from the first row), flushed at once."""
        if not self.writes:
            return
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
        if "step" in row:
            self._step = int(row["step"])
        if self.logger == "tensorboard":   # train_log -> train/<column>, eval_log -> eval/<column>
            board, prefix = self._writer(), name.removesuffix("_log")
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                    board.add_scalar(f"{prefix}/{key}", value, global_step=self._step)
            board.flush()

    def _writer(self):
        """The TensorBoard writer of ``run_dir/tensorboard/``; a resumed run's (``truncate_log``) opens with
        ``purge_step``, so TensorBoard drops what an earlier attempt logged past the checkpoint."""
        if self._board is None:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(self.path("tensorboard")), purge_step=self._purge_step)
            self._purge_step = None   # once: a writer reopened later must not hide what this one writes
        return self._board

    def truncate_log(self, name: str, step: int) -> None:
        """Drop the rows of ``<name>.csv`` past ``step`` (a run resumed in its own directory redoes them).

        With ``logger="tensorboard"`` the event files are kept, and the writer opens with ``purge_step=step + 1``:
        TensorBoard then hides the earlier attempt's events past ``step`` (its own restart rule).
        """
        path = self.run_dir / f"{name}.csv"
        if self.logger == "tensorboard" and self._purge_step != step + 1:
            self._purge_step = step + 1
            self._close_writer()   # reopened at its next use, with the purge step
        if not self.writes or not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns, rows = reader.fieldnames or [], [r for r in reader if int(r["step"]) <= step]
        if not columns:   # not even a header: the next row writes one
            path.unlink()
            return
        self.write_csv(f"{name}.csv", rows, columns)

    def write_csv(self, name: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
        """A whole table as ``name`` (missing cells left empty)."""
        if not self.writes:
            return
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
        atomic_write(self.path(name), write)

    def checkpoint(self, state: dict[str, Any], step: int, keep: bool) -> None:
        """checkpoints/last.pt (the one before it kept as prev.pt), and with ``keep`` checkpoints/step_XXXXXXX.pt.

        All atomic: a crash or a full disk leaves last.pt and prev.pt whole, so a resume can fall back to
        prev.pt if last.pt is ever found corrupt.
        """
        if not self.writes:
            return
        last, prev = self.ckpt_dir / "last.pt", self.ckpt_dir / "prev.pt"
        if last.exists():   # a hard link, then a rename: prev.pt is never missing or torn
            tmp = self.ckpt_dir / ".prev.pt.link"
            tmp.unlink(missing_ok=True)
            os.link(last, tmp)
            os.replace(tmp, prev)
        save_checkpoint(last, state)
        if keep:
            save_checkpoint(self.ckpt_dir / f"step_{step:07d}.pt", state)

    def start_progress(self, total: int, initial: int = 0, desc: str = "train", unit: str = "step") -> tqdm:
        self.progress = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, desc=desc,
                             disable=not self.writes)
        return self.progress

    def say(self, line: str) -> None:
        """A line for the person watching, above the progress bar when there is one (rank 0 alone speaks)."""
        if not self.writes:
            return
        (self.progress.write if self.progress is not None else print)(line)

    def close(self) -> None:
        """Close the progress bar, the CSV logs and the TensorBoard writer (flushed)."""
        if self.progress is not None:
            self.progress.close()
        for f, _ in self._logs.values():
            f.close()
        self._logs.clear()
        self._close_writer()

    def _close_writer(self) -> None:
        if self._board is not None:
            self._board.close()   # flushes
            self._board = None
