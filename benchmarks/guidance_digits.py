"""Classifier-free guidance on 8×8 digits: class accuracy and Fréchet distance against the guidance scale w.

1. Trains ``experiment=digits_cond`` (a class-conditional U-Net with label dropout 0.1) through ``run.py`` in
   benchmarks/results/guidance_digits/train (``--steps`` overrides the experiment's 3000 steps; ``--reuse``
   keeps a finished run of the same command there instead of training again).
2. Samples ``--n-samples`` digits (an even split over the ten classes) from the same prior noise with the
   default fast sampler (``multistep``) at several NFE budgets and with a reverse-SDE sampler
   (``euler_maruyama``), at each guidance scale w (w = 0: the unconditional branch alone; w = 1: the conditional
   model; w > 1: guided).
3. Scores each set with the shipped digits classifier (``evaluation.load_digits_classifier``): the share of
   samples it assigns to their label (class accuracy) and the Fréchet distance in its features to the 359
   held-out digits, beside the same distance for as many training digits (the floor).

Digits are in (0, 1) (``data.data_range`` of ``experiment=digits_cond``), so dynamic thresholding, which clips
x̂₀ to [−1, 1] after rescaling by its quantile, does not apply and is skipped. Writes
benchmarks/results/guidance_digits.md. From the repository root::

    OMP_NUM_THREADS=1 python benchmarks/guidance_digits.py                 # train 3000 steps, then sample
    OMP_NUM_THREADS=1 python benchmarks/guidance_digits.py --steps 1200    # a shorter run
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
RUN_DIR = OUT / "guidance_digits" / "train"
sys.path.insert(0, str(ROOT))
import solvers  # noqa: E402
from evaluation import class_accuracy, frechet_distance, load_data, load_digits_classifier  # noqa: E402
from models import load_checkpoint  # noqa: E402


def train_command(steps: int | None, seed: int, run_dir: pathlib.Path) -> list[str]:
    return [sys.executable, "run.py", "experiment=digits_cond", f"seed={seed}",
            *([f"task.steps={steps}"] if steps is not None else []), f"hydra.run.dir={run_dir}"]


def train(steps: int | None, seed: int, reuse: bool, run_dir: pathlib.Path) -> tuple[float, bool]:
    """Train in ``run_dir`` (or, with ``reuse``, keep a finished run of the same command there): (the training's
    wall seconds, whether an earlier run was kept)."""
    command = train_command(steps, seed, run_dir)
    stamp = run_dir / "benchmark_train.json"
    if reuse and stamp.exists():
        done = json.loads(stamp.read_text())
        if done["command"] == command[1:] and (run_dir / "checkpoints" / "last.pt").exists():
            return done["seconds"], True
    shutil.rmtree(run_dir, ignore_errors=True)   # this benchmark's own scratch directory
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{proc.stderr[-2000:]}")
    seconds = time.perf_counter() - start
    stamp.write_text(json.dumps({"command": command[1:], "seconds": seconds}))
    return seconds, False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the experiment's 3000)")
    parser.add_argument("--reuse", action="store_true", help="keep a finished training run of the same command")
    parser.add_argument("--train-only", action="store_true", help="train, then stop (then run again with --reuse)")
    parser.add_argument("--n-samples", type=int, default=500, help="samples per (sampler, w): n/10 per class")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 20], help="multistep NFE budgets, every w")
    parser.add_argument("--high-budgets", type=int, nargs="*", default=[50],
                        help="multistep NFE budgets run at --high-budget-scales only (to keep the run short)")
    parser.add_argument("--high-budget-scales", type=float, nargs="*", default=[1.0, 4.0])
    parser.add_argument("--sde-sampler", default="edm_sde", help="the reverse-SDE sampler")
    parser.add_argument("--sde-steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=pathlib.Path, default=RUN_DIR, help="the training run's directory")
    parser.add_argument("--out", type=pathlib.Path, default=OUT / "guidance_digits.md")
    args = parser.parse_args()
    RUN = args.run_dir

    train_seconds, reused = train(args.steps, args.seed, args.reuse, RUN)
    print(f"trained in {train_seconds:.0f} s", flush=True)
    if args.train_only:
        return
    loaded = load_checkpoint(RUN / "checkpoints" / "last.pt")
    sde, score_fn = loaded.sde, loaded.score_fn
    config = json.loads((RUN / "metrics.json").read_text())
    steps_trained = config.get("steps", args.steps)
    import yaml
    data_cfg = yaml.safe_load((RUN / "config.yaml").read_text())["data"]
    data = load_data(data_cfg, args.seed)
    clf = load_digits_classifier()
    test = data.test_points()
    n = args.n_samples
    labels = torch.arange(n) * data.num_classes // n     # an even split in blocks, as task=sample's
    floor = frechet_distance(clf, data.decode(data.train[:n]), test, data_range=data.data_range)
    floor_acc = class_accuracy(clf, test, data.test_labels, data_range=data.data_range)

    z = torch.randn(n, *data.event_shape, generator=torch.Generator().manual_seed(args.seed))
    runs = [("multistep", b, w) for b in args.budgets for w in args.scales]
    runs += [("multistep", b, w) for b in args.high_budgets for w in args.high_budget_scales]
    runs += [(args.sde_sampler, args.sde_steps, w) for w in args.scales]
    rows = []
    for solver, steps, w in runs:
        cond = {"y": labels} if w != 0 else {}     # w = 0 is the unconditional branch alone: no labels needed
        result = solvers.sample(sde, score_fn, None, solver=solver, steps=steps, z=z, seed=args.seed,
                                **({"cond": cond, "guidance_scale": w} if cond else {}))
        x = result.samples
        lo, hi = data.data_range
        half_level = (hi - lo) / (data.levels - 1) / 2
        outside = ((x < lo - half_level) | (x > hi + half_level)).double().mean().item()
        clipped = x.clamp(lo, hi)   # what an image file of the samples would hold
        row = {"sampler": solver, "steps": steps, "w": w, "nfe": result.nfe, "seconds": result.seconds,
               "class_accuracy": class_accuracy(clf, x, labels, data_range=data.data_range),
               "frechet": frechet_distance(clf, x, test, data_range=data.data_range), "outside": outside,
               "class_accuracy_clipped": class_accuracy(clf, clipped, labels, data_range=data.data_range),
               "frechet_clipped": frechet_distance(clf, clipped, test, data_range=data.data_range)}
        rows.append(row)
        print(row, flush=True)

    command = " ".join(["OMP_NUM_THREADS=1 python benchmarks/guidance_digits.py", *sys.argv[1:]])
    lines = ["| sampler | steps | w | NFE | class accuracy | Fréchet distance | clipped: class accuracy | "
             "clipped: Fréchet distance | values outside | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['w']:g} | {r['nfe']} | {r['class_accuracy']:.3f} | "
              f"{r['frechet']:.2f} | {r['class_accuracy_clipped']:.3f} | {r['frechet_clipped']:.2f} | "
              f"{r['outside']:.1%} | {r['seconds']:.1f} |" for r in rows]
    header = (
        "# Classifier-free guidance on 8×8 digits\n\n"
        f"`{command}`\n\n"
        f"Model: `python run.py experiment=digits_cond seed={args.seed}"
        + (f" task.steps={args.steps}" if args.steps is not None else "")
        + f"` (class-conditional U-Net, label dropout 0.1, {steps_trained} steps, {train_seconds:.0f} s of training "
        "on a shared 2-core machine with OMP_NUM_THREADS=1, the experiment's final evaluation included"
        + ("; trained by an earlier invocation with the same settings and `--train-only`, kept here by `--reuse`"
           if reused else "") + "). Samplers: `multistep`, the default fast PF-ODE "
        f"sampler (exponential integrator, order 4 + corrector, 1 NFE per step); `{args.sde_sampler}`: "
        f"{solvers.get_solver(args.sde_sampler).label or args.sde_sampler}, a reverse-SDE sampler. "
        f"{n} samples per row, {n // data.num_classes} per digit, all rows from the same prior noise (seed "
        f"{args.seed}); w = 0 is the unconditional branch alone (its class accuracy is chance, about 0.1), w = 1 the "
        "conditional model, w > 1 guided: s + w (s(·, y) − s). Scored by the shipped digits classifier (accuracy "
        f"{floor_acc:.3f} on the held-out digits with their true labels): class accuracy = share of samples it "
        f"assigns to the label they were drawn for; Fréchet distance in its 32 penultimate features to the "
        f"{len(test)} held-out digits ({n if n <= len(data.train) else len(data.train)} training digits: "
        f"**{floor:.2f}**, the floor). NFE as counted (for w ∉ {{0, 1}} one NFE is one forward of the doubled batch, both "
        "branches; w = 0 and w = 1 take one branch); seconds: wall time of the sampling alone. The first two scores take the samples as they are "
        "(as task=sample and task=compare score them); `clipped`: the same after clamping to the data range (0, 1), "
        "as an image file would hold them. `values outside`: share of pixel values more than half a grey level "
        "(1/32) outside (0, 1). Dynamic thresholding is skipped: it rescales x̂₀ into "
        "[−1, 1], and digits are in (0, 1).\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
