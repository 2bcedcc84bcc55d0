"""Host memory and speed of training on CIFAR-10-sized data: the images stay uint8 in memory.

    python benchmarks/image_data.py            # about 3 minutes on 2 CPU cores

Writes a CIFAR-10 directory in the official format (six pickled batches of 10 000 random 32×32×3
images: the real file layout and size, random pixels, since nothing is downloaded here), then runs
``python run.py experiment=cifar10_small`` on it for a few steps, and the same run on a copy with ten
training images per batch (and the same 10 000 test images). The resident memory of each run
(``/proc/<pid>/status``) is sampled while it trains; the difference is what the 50 000 training images
cost. Held as float32 they would take 614 MB (50 000 × 3072 values × 4 bytes); as uint8, 154 MB. Also
measures training throughput with ``data.num_workers`` 0 and 2. Writes ``benchmarks/results/image_data.md``.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar10(root: Path, per_batch: int, seed: int = 0, test: int = 10_000) -> Path:
    """A cifar-10-batches-py folder of ``per_batch`` random images per training batch and ``test`` test images,
    pickled as the official files are."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in BATCHES:
        n = test if name == "test_batch" else per_batch
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return root


def _memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of process ``pid`` in MB: resident now, and the peak so far."""
    fields = {line.split(":")[0]: float(line.split()[1]) / 1024
              for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(("VmRSS", "VmHWM"))}
    return fields["VmRSS"], fields["VmHWM"]


def train(root: Path, out: Path, *extra: str) -> tuple[float, float, float]:
    """(peak resident MB over the whole run, largest resident MB while training, steps per second) of a short
    ``experiment=cifar10_small`` run on ``root``. Training has begun once train_log.csv exists."""
    args = [sys.executable, str(ROOT / "run.py"), "experiment=cifar10_small", f"data.root={root}", "task.steps=30",
            "task.log_every=5", "task.eval_samples=4", "likelihood.n_eval=4", "likelihood.steps=2",
            f"hydra.run.dir={out}", *extra]
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = training = 0.0
    while proc.poll() is None:   # sampled until the process is gone
        try:
            now, peak = _memory(proc.pid)
            if (out / "train_log.csv").exists() and not (out / "eval_log.csv").exists():
                training = max(training, now)
        except (OSError, KeyError):
            pass
        time.sleep(0.02)
    if proc.returncode:
        raise RuntimeError(proc.stderr.read()[-2000:])
    rows = np.genfromtxt(out / "train_log.csv", delimiter=",", names=True)
    return peak, training, float(np.median(rows["steps_per_second"][1:]))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full = write_cifar10(tmp / "full", 10_000)
        small = write_cifar10(tmp / "small", 10)   # the same 10 000 test images
        peak_full, training_full, speed_0 = train(full, tmp / "run_full")
        peak_small, training_small, _ = train(small, tmp / "run_small")
        _, _, speed_2 = train(full, tmp / "run_workers", "data.num_workers=2")
    lines = [
        "# Training on CIFAR-10-sized data: host memory and throughput",
        "",
        "`python benchmarks/image_data.py` (2 CPU cores; `experiment=cifar10_small`, 30 steps of batch 32; "
        "a CIFAR-10 directory in the official pickle format with random pixels).",
        "",
        "| run | resident while training | peak of the run (loading included) |",
        "|---|---|---|",
        f"| 50 000 training images | {training_full:.0f} MB | {peak_full:.0f} MB |",
        f"| 50 training images (10 per batch file) | {training_small:.0f} MB | {peak_small:.0f} MB |",
        f"| **the 50 000 images' share** | **{training_full - training_small:.0f} MB** | {peak_full - peak_small:.0f} MB |",
        "",
        "Both runs hold the same 10 000 test images and run the same evaluations, so the difference is what the",
        "training images cost: as uint8 50 000 × 3072 bytes = 154 MB; as float32 they would be 614 MB. The peak",
        "includes reading the pickled batches (each holds its 30 MB of pixels a second time while it is unpickled).",
        "",
        "| data.num_workers | steps/s |",
        "|---|---|",
        f"| 0 (batches prepared in the training process) | {speed_0:.2f} |",
        f"| 2 (two worker processes) | {speed_2:.2f} |",
        "",
        "On 2 cores the workers compete with the training process for the cores; on a GPU machine they take",
        "the batch preparation (indexing, uint8 → float32, flips) off the training loop.",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "image_data.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
