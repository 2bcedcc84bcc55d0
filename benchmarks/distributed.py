"""One process against torchrun's two, and fp32 against bf16, side by side on this machine.

    python benchmarks/distributed.py            # about 5 minutes on 2 CPU cores

Each row runs ``run.py`` as a user would (``python run.py`` or ``torchrun --standalone
--nproc_per_node=2 run.py``, one thread per process) and reads the run's own files: training
throughput and how far two ranks' weights drift from one process's, sampling time and whether
the samples are bitwise equal, and bf16 against fp32 for the network's forward. On a 2-core CPU
the processes share the machine, so the speed ratios say what the split costs and saves here,
not what a GPU per rank would give. Writes ``benchmarks/results/distributed.md``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TRAIN = ["task=train", "task.steps=300", "task.batch_size=1024", "task.eval_samples=256", "likelihood.n_eval=100"]
SAMPLE = ["data=digits", "task.n_samples=512", "solver=multistep", "solver.steps=20", "task.likelihood=false"]


def run(args: list[str], out: Path, nproc: int | None = None) -> float:
    """Wall time of one ``run.py`` job writing into ``out``."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *launcher, str(ROOT / "run.py"), *args, f"hydra.run.dir={out}"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return time.perf_counter() - start


def steps_per_second(out: Path) -> float:
    rows = np.genfromtxt(out / "train_log.csv", delimiter=",", names=True)
    return float(np.median(rows["steps_per_second"]))


def weight_gap(a: Path, b: Path) -> float:
    wa, wb = (read_checkpoint(p / "checkpoints" / "last.pt")["model"] for p in (a, b))
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def main() -> None:
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # training: the ring MLP, global batch 1024
        run(TRAIN, root / "t1")
        run(TRAIN, root / "t2", nproc=2)
        run([*TRAIN, "precision=bf16"], root / "tb")
        m1, m2, mb = (json.loads((root / k / "metrics.json").read_text()) for k in ("t1", "t2", "tb"))
        s1, s2, sb = (steps_per_second(root / k) for k in ("t1", "t2", "tb"))
        lines += ["## Training (`task=train`, ring MLP, global batch 1024, 300 steps)", "",
                  "| run | steps/s | ratio to one process | test loss | max \\|weight − one process's\\| |",
                  "|---|---|---|---|---|",
                  f"| `python run.py` | {s1:.1f} | 1 | {m1['test_loss']:.4f} | 0 |",
                  f"| `torchrun --nproc_per_node=2` | {s2:.1f} | {s2 / s1:.2f} | {m2['test_loss']:.4f} | "
                  f"{weight_gap(root / 't1', root / 't2'):.1e} |",
                  f"| `python run.py precision=bf16` | {sb:.1f} | {sb / s1:.2f} | {mb['test_loss']:.4f} | "
                  f"{weight_gap(root / 't1', root / 'tb'):.1e} |", ""]
        # sampling: the shipped digits U-Net, 512 samples, multistep at 20 steps
        w1 = run(SAMPLE, root / "s1")
        w2 = run(SAMPLE, root / "s2", nproc=2)
        wb = run([*SAMPLE, "precision=bf16"], root / "sb")
        k1, k2, kb = (json.loads((root / k / "metrics.json").read_text()) for k in ("s1", "s2", "sb"))
        x1, x2, xb = (np.load(root / k / "samples.npz")["samples"] for k in ("s1", "s2", "sb"))
        rms = float(np.sqrt(((x1 - xb) ** 2).reshape(len(x1), -1).sum(1).mean()))
        norm = float(np.sqrt((x1 ** 2).reshape(len(x1), -1).sum(1).mean()))
        lines += ["## Sampling (`task=sample data=digits`, the shipped U-Net, 512 samples, `multistep` at 20 steps)", "",
                  "| run | sampling seconds | ratio to one process | wall seconds (with start-up) | samples |",
                  "|---|---|---|---|---|",
                  f"| `python run.py` | {k1['sample_seconds']:.1f} | 1 | {w1:.1f} | reference |",
                  f"| `torchrun --nproc_per_node=2` | {k2['sample_seconds']:.1f} | "
                  f"{k2['sample_seconds'] / k1['sample_seconds']:.2f} | {w2:.1f} | "
                  f"{'bitwise equal' if np.array_equal(x1, x2) else 'DIFFERENT'} |",
                  f"| `python run.py precision=bf16` | {kb['sample_seconds']:.1f} | "
                  f"{kb['sample_seconds'] / k1['sample_seconds']:.2f} | {wb:.1f} | RMS distance {rms:.3f} "
                  f"(sample norm {norm:.2f}) |", ""]
    text = (f"# One process against two, fp32 against bf16\n\n`python benchmarks/distributed.py`; torch "
            f"{torch.__version__}, {os.cpu_count()} CPU cores, one thread per process. Speed ratios on a shared "
            "CPU say what splitting costs or saves here, not on one GPU per rank.\n\n" + "\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
