"""Training quality where the answer is known: KL(data ‖ model) on the ring, for VP, sub-VP and VE.

Trains the default model (``python run.py task=train``, default settings) once per SDE and reads
its final evaluation: the test-set NLL through the ODE minus the exact NLL of the same points,
i.e. an estimate of KL(data ‖ model) in nats (the issue's target: below 0.05). Each run is a
subprocess with its own run directory under benchmarks/results/train_quality/; the table goes
to benchmarks/results/train_quality.md. Run from the repository root::

    python benchmarks/train_quality.py                 # all three SDEs, one after the other
    python benchmarks/train_quality.py sde=vp          # one, with any extra overrides
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def train_once(sde: str, extra: list[str]) -> dict:
    """Train with ``sde`` and the overrides; return the run's metrics.json plus its wall time."""
    run_dir = OUT / "train_quality" / sde
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "task=train", f"sde={sde}", *extra,
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"training with sde={sde} failed:\n{proc.stderr[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["seconds"] = time.perf_counter() - start
    return metrics


def main() -> None:
    args = sys.argv[1:]
    chosen = [a.split("=", 1)[1] for a in args if a.startswith("sde=")] or ["vp", "subvp", "ve"]
    extra = [a for a in args if not a.startswith("sde=")]
    rows = []
    for sde in chosen:
        m = train_once(sde, extra)
        rows.append(f"| {m['sde']} | {m['steps']} | {m['test_nll_nats']:.4f} | {m['data_nll_nats']:.4f} | "
                    f"{m['kl_nats']:.4f} | {m['seconds']:.0f} |")
        print(rows[-1], flush=True)
    table = ("| SDE | steps | test NLL (nats) | exact NLL, same points | KL(data ‖ model) | seconds |\n"
             "|---|---|---|---|---|---|\n" + "\n".join(rows))
    header = (f"# Training quality on the ring (exact density known)\n\n`python benchmarks/train_quality.py "
              f"{' '.join(args)}`".rstrip() + "`, default settings otherwise; 1000 test points, ODE at "
              "rtol = atol = 1e-5.\n\n")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "train_quality.md").write_text(header + table + "\n")
    print(f"written to {OUT / 'train_quality.md'}")


if __name__ == "__main__":
    main()
