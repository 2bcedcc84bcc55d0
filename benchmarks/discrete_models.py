"""DDPM and NCSN as discrete models, side by side with the continuous samplers, on the ring.

Trains two discrete models the way their papers do, on the SDEs' N = 1000 chains:

- DDPM: VP's chain (linear β 1e-4…0.02), DDPM's L_simple, ε-prediction, conditioned on the chain index;
- NCSN: VE's chain (geometric σ 0.01…50), NCSN's loss, ε-prediction (NCSNv2's s = −ε/σ), on the index.

Then runs ``task=compare`` on each checkpoint: the discrete samplers (ancestral, annealed Langevin)
and the continuous ones (reverse SDE, PF-ODE) on the same network, with the DDPM/NCSN variational
bound beside the ODE likelihood of the same test points. Writes benchmarks/results/discrete_models.md.
Run from the repository root (about 15 minutes on 2 cores)::

    python benchmarks/discrete_models.py
"""
from __future__ import annotations

import csv
import json
import pathlib
import subprocess
import sys
import time

from benchmarks.train_quality import OUT, ROOT, train_once  # noqa: E402

MODELS = {
    "DDPM": ("vp", ["task.loss=ddpm", "model.parameterization=eps", "model.time_input=index"]),
    "NCSN": ("ve", ["task.loss=ncsn", "model.parameterization=eps", "model.time_input=index"]),
}
SAMPLERS = "[ancestral,ald,euler_maruyama,pc,ddim,pf_ode_rk4,pf_ode]"
BUDGETS = "[100,1000]"


def compare(run_dir: pathlib.Path, ckpt: pathlib.Path) -> tuple[list[dict], float]:
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "task=compare", f"ckpt={ckpt}",
                           f"task.samplers={SAMPLERS}", f"task.budgets={BUDGETS}", "task.n_samples=2000",
                           "likelihood.n_eval=500", f"hydra.run.dir={run_dir}"], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"compare on {ckpt} failed:\n{proc.stderr[-2000:]}")
    with open(run_dir / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((run_dir / "metrics.json").read_text())["swd_floor"]


def fmt(value: str, spec: str = ".3f") -> str:
    return format(float(value), spec) if value not in ("", None) else "—"


def main() -> None:
    sections = []
    for name, (sde, overrides) in MODELS.items():
        base = OUT / "discrete_models" / name.lower()
        start = time.perf_counter()
        metrics = train_once(sde, overrides, export=False, run_dir=base / "train")
        rows, floor = compare(base / "compare", base / "train" / "checkpoints" / "last.pt")
        lines = [f"## {name}: `sde={sde} {' '.join(overrides)}`, 4000 steps",
                 "",
                 f"Training: KL(data ‖ model) through the ODE {metrics['kl_nats']:.4f} nats "
                 f"(test NLL {metrics['test_nll_nats']:.3f}, exact {metrics['data_nll_nats']:.3f}); "
                 f"{time.perf_counter() - start:.0f} s for training and comparison. SW1 between two held-out "
                 f"sets of 2000: {floor:.3f}.",
                 "",
                 "| sampler | steps / tol | NFE | ODE error | SW1 | mode weight error | NLL (ODE, nats) | bound (nats) |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['sampler']} | {r['steps'] or r['tolerance']} | {r['nfe']} | {fmt(r['ode_error_rms'], '.2g')} | "
                         f"{fmt(r['swd'])} | {fmt(r['mode_weight_error'])} | {fmt(r['nll_nats'])} | {fmt(r['bound_nats'])} |")
        sections.append("\n".join(lines))
        print(sections[-1], flush=True)
    header = ("# Discrete models (DDPM, NCSN) under discrete and continuous samplers\n\n"
              "`python benchmarks/discrete_models.py`. Each model is trained with its paper's discrete loss on the "
              "SDE's 1000-step chain, conditioned on the chain index (`model.time_input=index`), then compared with "
              "`task=compare` (2000 samples from one prior noise; NLL and bound on the same 500 test points). The bound is the chain's variational bound (DDPM's L), one "
              "draw per step.\n\n")
    (OUT / "discrete_models.md").write_text(header + "\n\n".join(sections) + "\n")
    print(f"written to {OUT / 'discrete_models.md'}")


if __name__ == "__main__":
    main()
