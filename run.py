"""Command-line entry point: ``python run.py sde=vp solver=pf_ode``.

Composes the hydra config in ``conf/`` (typed by ``tasks_lib.schema``) and runs the task:
``task=sample`` (the default) draws samples and scores held-out data, ``task=likelihood`` computes
the ODE log-likelihood of held-out data, ``task=compare`` runs several samplers at several NFE
budgets side by side, ``task=train`` trains a score model, ``task=export`` writes a checkpoint as a
sampling-only ``model.safetensors`` + ``config.json``. The model is the shipped pretrained one
(``ckpt=pretrained``), the data's exact score (``ckpt=exact``), a checkpoint (``ckpt=PATH``: a .pt
file or an export directory) or a diffusers pipeline directory (``ckpt=diffusers:DIR``).

Before hydra starts, the overrides are composed and checked once (a misspelt key, a wrong type or
a value out of range is one ``error:`` line, exit code 2) and the run directory is claimed (refused,
before anything is written, when it holds a finished run or another run's lock). Under ``torchrun``
every rank does the same, rank 0 alone claims and writes the directory, and errors every rank meets
are printed once.
"""
from __future__ import annotations

import datetime
import logging
import re
import shutil
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from core_lib import Preempted, RunInterrupted, UserError, distributed
from tasks_lib import (check_config, check_device, claim_run_dir, compose, overridden_keys, register_configs, run_task,
                       summary)

register_configs()

#: Exit codes: 0 done, 2 a user error (one ``error:`` line), 130 interrupted by SIGINT or SIGTERM, 143 training
#: stopped by SIGTERM after checkpointing its last step (``task.resume=auto`` continues it).
EXIT_USER_ERROR, EXIT_INTERRUPTED, EXIT_PREEMPTED = 2, RunInterrupted.exit_code, Preempted.exit_code
#: What a rank other than 0 of a torchrun job adds to hydra's overrides: rank 0 alone writes into the run directory.
QUIET_RANK = ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
#: What a run directory holds before its task has written anything: hydra's record, its log, the lock.
BOOKKEEPING = {".hydra", "run.log", ".lock"}
#: The run directory this invocation created (None: it existed before, or another rank's).
_created: Path | None = None


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    """One ``error:`` line (from rank 0 alone in a torchrun job: every rank meets the same error) and exit."""
    if distributed.is_main():
        print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _out_of_memory(err: BaseException) -> bool:
    """Whether an exception is an allocation failure (CPU or GPU), which a smaller size fixes."""
    text = str(err)
    return isinstance(err, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def _composition_error(err: Exception) -> str:
    """hydra's multi-line composition error as one line that names the key."""
    if isinstance(err, MissingConfigException):
        lines = str(err).splitlines()
        options = [line.strip() for line in lines if line.startswith("\t") and "provider=" not in line]
        missing = re.search(r"Could not find '([^/']+)/([^']+)'", lines[0])
        what = f"{missing[1]}={missing[2]}: no such choice" if missing else lines[0]
        return f"{what}; available: {', '.join(options)}."
    cause = err.__cause__ or err
    key = getattr(cause, "full_key", None)
    lines = str(cause).splitlines()
    what = lines[0]
    inside = re.search(r"full_key: (\S+)", str(cause))
    if key is None and inside and len(lines) > 1:   # raised inside a config group (an experiment preset): the
        key, what = inside[1], lines[1].strip()   # detail is on the message's second line
        where = re.match(r"In '([^']+)'", lines[0])
        if where:
            what += f" (set by {where[1]}, which may be written for another task)"
    return f"{key}: {what}; `python run.py <your overrides> --cfg job` shows the settings." if key else what


def _fresh(base: Path) -> Path:
    """``base``, or ``base-1``, ``base-2``, … : the first that does not exist yet."""
    return next(p for p in (base.with_name(f"{base.name}-{k}") if k else base for k in range(10_000)) if not p.exists())


def _stamp(root: str) -> Path:
    now = datetime.datetime.now()
    return _fresh(Path(root) / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S"))


def _prepare(argv: list[str]) -> list[str]:
    """Compose the overrides and claim the run directory before hydra writes anything; the argv hydra gets.

    Under torchrun every rank composes the same config; rank 0 names and claims the run directory and
    tells the others, which then run without writing into it (``QUIET_RANK``).
    """
    multirun = "-m" in argv or "--multirun" in argv
    if multirun and distributed.world_size() > 1:
        _fail("hydra multirun (-m) cannot run under torchrun; start one torchrun job per setting.")
    if multirun:   # a sweep: its own fresh directory; each job claims its subdirectory
        named = any(a.startswith("hydra.sweep.dir=") for a in argv)
        return argv if named else [*argv, f"hydra.sweep.dir={_stamp('multirun')}"]
    if any(a.startswith("-") for a in argv):   # --cfg, --help, ...: hydra's own
        return argv
    try:
        cfg = compose(*[a for a in argv if not a.startswith("hydra.")])
    except (HydraException, OmegaConfBaseException) as err:
        _fail(_composition_error(err))
    try:   # every setting, before the run directory exists (run_task checks again for callers from Python)
        check_config(cfg, overridden_keys(argv))
    except UserError as err:
        _fail(str(err))
    given = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if cfg.task.name == "train" and cfg.task.resume == "auto" and not given:
        _fail("task.resume=auto continues the run in its own directory: name it with hydra.run.dir=DIR (the same "
              "on every restart).")
    if distributed.world_size() > 1:   # join the job: rank 0 names the run directory for all
        try:
            distributed.init(check_device(cfg.device))
        except UserError as err:
            _fail(str(err))
    global _created
    run_dir, refused = (Path(given[-1]) if given else _stamp("outputs")), None
    if distributed.is_main():
        try:
            if not run_dir.exists():
                _created = run_dir.resolve()
            claim_run_dir(run_dir)
        except UserError as err:
            refused = f"hydra.run.dir: {err}"
    run_dir, refused = distributed.broadcast((str(run_dir), refused))
    if refused:
        _fail(refused)
    # hydra's own naming, made unique: two runs started in the same second get two directories
    extra = [] if given else [f"hydra.run.dir={run_dir}"]
    return [*argv, *extra, *([] if distributed.is_main() else QUIET_RANK)]


def _discard_if_empty(out: Path) -> None:
    """Remove the run directory this invocation created when its task failed before writing anything into it
    (bad data found while loading it: a corrupt image, a missing batch file), so that bad input leaves
    nothing behind. A directory that existed before, or holds anything but hydra's bookkeeping, stays."""
    out = out.resolve()
    if out != _created or not out.is_dir() or not {p.name for p in out.iterdir()} <= BOOKKEEPING:
        return
    logging.shutdown()   # hydra's run.log handler lets go of the file
    shutil.rmtree(out, ignore_errors=True)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    signal.signal(signal.SIGTERM, _interrupt)   # SIGTERM stops a run as Ctrl-C does
    # and SIGINT always does: a run started in the background by a script inherits SIGINT ignored (POSIX
    # shells do that to asynchronous commands), and `kill -INT` would then be lost
    signal.signal(signal.SIGINT, _interrupt)
    try:
        metrics = run_task(cfg, out, overridden_keys(HydraConfig.get().overrides.task))
        # every rank finished: leave together, so that no rank tears its connections down while a peer's last
        # messages are in flight (a failing rank skips this; torchrun then stops the others)
        distributed.barrier()
    except UserError as err:  # the user's to fix: one line; anything else is a bug and keeps its traceback
        _discard_if_empty(out)
        _fail(str(err), err.exit_code if isinstance(err, RunInterrupted) else EXIT_USER_ERROR)
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        if not distributed.is_main():   # an allocation failure is this rank's own: say which rank
            print(f"error: [rank {distributed.rank()}] out of memory ({str(err).splitlines()[0][:160]})", file=sys.stderr)
        _fail(f"out of memory ({str(err).splitlines()[0][:160]}); lower the sizes this run asks for "
              "(task.n_samples, likelihood.n_eval, task.batch_size, the network), or use a larger device.")
    except KeyboardInterrupt:
        _fail(f"interrupted; no result was completed, and every file in {out} is whole (outputs are written "
              "atomically).", EXIT_INTERRUPTED)
    finally:
        distributed.close()
    if distributed.is_main():
        print(summary(metrics))
        print(f"outputs: {out}")


if __name__ == "__main__":
    sys.argv[1:] = _prepare(sys.argv[1:])
    main()
