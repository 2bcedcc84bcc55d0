"""Our ``multistep`` on a grid calibrated to each problem and budget (``solvers.calibrate``), against the peers.

For each problem of ``benchmarks/peers.py`` and each budget, ``calibrate_grid`` fits a warp of our default grid
on a pilot draw of its own (seed ``PILOT_SEED``, validated on seed ``PILOT_SEED`` + 1; the table's samples are
seed 0, the held-out ones seed 1). Then, side by side:

- on the table's samples: ours calibrated and ours by default, ÷ the cell's best peer as stored by the last full
  ``benchmarks/peers.py`` run (``peers.json``; the peers' errors are deterministic on the posed problems);
- on held-out samples (seed ``HELD_OUT_SEED``, their own exact flow): ours calibrated and by default, ÷ the
  cell's winning peer setting run here from its installed package (not chosen again, as in ``peers_outliers.py``).

    python benchmarks/peers_calibrated.py                 # every problem (~75 min on one core; in parallel parts:)
    python benchmarks/peers_calibrated.py ring, 16-D ring_vp ring_subvp & python benchmarks/peers_calibrated.py ring_ve digits

Each problem's numbers go to ``benchmarks/results/peers_calibrated/<problem>.json``; every run rewrites
``benchmarks/results/peers_calibrated.md`` from all the problems measured so far.
"""
from __future__ import annotations

import json
import pathlib
import re
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.peer_samplers import peer_settings, reference_flow, rms_distance  # noqa: E402
from benchmarks.peers import BUDGETS, RESULTS, fail, problems, require_peers  # noqa: E402
from benchmarks.peers_outliers import HELD_OUT_SEED  # noqa: E402
from solvers.calibrate import calibrate_grid  # noqa: E402

#: the pilot's starting noise (neither the table's, seed 0, nor the held-out draw's)
PILOT_SEED = 777
#: pilot samples per problem (the digits U-Net, 64 samples in the table, gets as many as the table)
PILOT, PILOT_DIGITS = 256, 64
#: Nelder–Mead's solves of the pilot per budget (the digits U-Net, ~50 ms per evaluation of its pilot on one core,
#: gets fewer)
EVALUATIONS, EVALUATIONS_DIGITS = 200, 80
PARTS = RESULTS / "peers_calibrated"


def measure(posed) -> dict:
    """One problem: the calibration and, per budget, ours (calibrated, default) and the peer on both draws."""
    name = posed.problem.name
    cells = json.loads((RESULTS / "peers.json").read_text())["cells"][name]
    settings = {s.label: s for s in peer_settings()}
    start = time.time()
    digits = name.startswith("digits")
    cal = calibrate_grid(posed.sde, posed.score, BUDGETS, event_shape=tuple(posed.problem.x_start.shape[1:]),
                         eps=posed.eps, pilot=PILOT_DIGITS if digits else PILOT, seed=PILOT_SEED,
                         evaluations=EVALUATIONS_DIGITS if digits else EVALUATIONS, reference_rtol=posed.reference_rtol,
                         sigma_data=posed.sigma_data)
    fitted = time.time() - start
    held = posed.resampled(HELD_OUT_SEED)
    reference = reference_flow(posed.problem, rtol=posed.reference_rtol)
    held_reference = reference_flow(held.problem, rtol=posed.reference_rtol)
    rows = {}
    for budget in BUDGETS:
        warp = cal.warp(budget)
        label = cells[str(budget)][2]
        held_peer = rms_distance(settings[label].run(held.problem, budget)[0], held_reference)
        rows[budget] = {
            "peer": label, "table_peer": cells[str(budget)][1], "held_peer": held_peer,
            "table_default": rms_distance(posed.ours(budget)[0], reference),
            "table_calibrated": rms_distance(posed.ours(budget, warp=warp)[0], reference),
            "held_default": rms_distance(held.ours(budget)[0], held_reference),
            "held_calibrated": rms_distance(held.ours(budget, warp=warp)[0], held_reference),
            "pilot": cal.pilot_errors[budget], "fit_nfe": cal.nfe[budget], "warp": warp}
        r = rows[budget]
        print(f"  {name} {budget}: table {r['table_default'] / r['table_peer']:.2f} → "
              f"{r['table_calibrated'] / r['table_peer']:.2f}, held out {r['held_default'] / held_peer:.2f} → "
              f"{r['held_calibrated'] / held_peer:.2f}", flush=True)
    return {"name": name, "pilot": cal.pilot, "fit_seconds": round(fitted), "seconds": round(time.time() - start),
            "rows": rows}


def part_file(name: str) -> pathlib.Path:
    return PARTS / (re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".json")


def report(parts: list[dict]) -> str:
    order = [p.problem.name for p in problems()]
    parts = sorted(parts, key=lambda p: order.index(p["name"]) if p["name"] in order else len(order))
    head = ["| problem | " + " | ".join(str(b) for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS)]

    def table(draw: str, peer: str) -> list[str]:
        lines = list(head)
        for p in parts:
            cells = [f"{r[draw + '_calibrated'] / r[peer]:.2f} ({r[draw + '_default'] / r[peer]:.2f})"
                     for r in (p["rows"][str(b)] for b in BUDGETS)]
            lines.append(f"| {p['name']} | " + " | ".join(cells) + " |")
        return lines

    def worst(draw: str, peer: str) -> float:
        return max(r[draw + "_calibrated"] / r[peer] for p in parts for r in p["rows"].values())

    cost = ["| problem | pilot samples | fit NFE (batches) at 5 / 20 / 100 steps | pilot error ÷ default's "
            "at 5 / 20 / 100 | budgets whose warp was kept | minutes |", "|---|---|---|---|---|---|"]
    for p in parts:
        rows = p["rows"]
        cost.append(f"| {p['name']} | {p['pilot']} | " + " / ".join(str(rows[b]["fit_nfe"]) for b in ("5", "20", "100"))
                    + " | " + " / ".join(f"{rows[b]['pilot'][1] / rows[b]['pilot'][0]:.2f}" for b in ("5", "20", "100"))
                    + " | " + (", ".join(b for b, r in rows.items() if any(r["warp"])) or "none")
                    + f" | {p['seconds'] / 60:.0f} |")
    return "\n".join([
        "# Our `multistep` on a calibrated grid, against the peers\n",
        f"`python benchmarks/peers_calibrated.py`; torch {torch.__version__}. Per problem and budget, "
        f"`solvers.calibrate.calibrate_grid` fits a warp of our default grid ({EVALUATIONS} Nelder–Mead solves, "
        f"{EVALUATIONS_DIGITS} on the digits U-Net, of a pilot draw, seed {PILOT_SEED}, against the pilot's own exact "
        f"flow) and keeps it where a validation draw of as many samples (seed {PILOT_SEED + 1}) agrees; the samples "
        "below are neither's. Where no warp was kept the calibrated sampler is the default. "
        "Each cell: ours calibrated ÷ the best peer, ours by default ÷ the same peer in brackets (goal ≤ 0.5).\n",
        f"## The table's samples (seed 0), ÷ the stored best peer of `peers.json` (worst calibrated cell "
        f"{worst('table', 'table_peer'):.2f})\n", *table("table", "table_peer"), "",
        f"## Held-out samples (seed {HELD_OUT_SEED}), ÷ the cell's winning peer setting run on them (worst calibrated "
        f"cell {worst('held', 'held_peer'):.2f})\n", *table("held", "held_peer"), "",
        "## What the calibration costs\n", *cost, ""])


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    chosen = [p for p in problems() if not argv or any(p.problem.name.startswith(a) for a in argv)]
    if not chosen:
        fail(f"no problem's name starts with {', '.join(map(repr, argv))}; the problems are: "
             + "; ".join(p.problem.name for p in problems()) + ".")
    require_peers(peer_settings())
    PARTS.mkdir(parents=True, exist_ok=True)
    for posed in chosen:
        part = measure(posed)
        part_file(part["name"]).write_text(json.dumps(part, indent=1) + "\n")
    parts = [json.loads(f.read_text()) for f in sorted(PARTS.glob("*.json"))]
    (RESULTS / "peers_calibrated.md").write_text(report(parts))
    print(f"written to {RESULTS / 'peers_calibrated.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
