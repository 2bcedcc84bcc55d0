"""Command-line entry point: ``python run.py sde=vp solver=pf_ode``.

Composes the hydra config in ``conf/`` (typed by ``tasks_lib.schema``) and runs the task:
``task=sample`` (the default) draws samples and scores held-out data, ``task=likelihood`` computes
the ODE log-likelihood of held-out data, ``task=compare`` runs several samplers at several NFE
budgets side by side, ``task=train`` trains a score model. The model is the shipped pretrained one
(``ckpt=pretrained``), the data's exact score (``ckpt=exact``) or a checkpoint (``ckpt=PATH``).
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from core_lib import RunInterrupted, UserError
from tasks_lib import overridden_keys, register_configs, run_task, summary

register_configs()


#: Exit codes: 0 done, 2 a user error (one ``error:`` line), 130 interrupted by SIGINT or SIGTERM.
EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    signal.signal(signal.SIGTERM, _interrupt)   # SIGTERM stops a run as Ctrl-C does
    try:
        metrics = run_task(cfg, out, overridden_keys(HydraConfig.get().overrides.task))
    except UserError as err:  # the user's to fix: one line; anything else is a bug and keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED if isinstance(err, RunInterrupted) else EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print(f"error: interrupted; no result was completed, and every file in {out} is whole (outputs are written "
              "atomically).", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    print(summary(metrics))
    print(f"outputs: {out}")


if __name__ == "__main__":
    main()
