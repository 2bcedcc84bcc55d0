"""Our default ``multistep`` against the peers' errors stored by the last full ``benchmarks/peers.py`` run.

The peers' errors are deterministic on the posed problems (same starting noise, same exact flow; a rerun
of a subset reproduced them bit for bit), so a change to our defaults can be judged in minutes rather
than the full side-by-side run's ~40: this recomputes each problem's exact flow and our error at every
budget, and prints ours ÷ the stored best peer. The side-by-side table itself comes only from
``benchmarks/peers.py``.

    python benchmarks/peers_ours.py                 # every problem
    python benchmarks/peers_ours.py digits          # problems whose name starts with the argument
"""
from __future__ import annotations

import json
import sys

import torch

from benchmarks.peer_samplers import reference_flow, rms_distance
from benchmarks.peers import BUDGETS, RESULTS, problems


def main() -> None:
    torch.set_num_threads(1)
    stored = json.loads((RESULTS / "peers.json").read_text())["cells"]
    print("| problem | " + " | ".join(str(b) for b in BUDGETS) + " |\n|---|" + "---|" * len(BUDGETS), flush=True)
    for posed in problems():
        name = posed.problem.name
        if sys.argv[1:] and not any(name.startswith(a) for a in sys.argv[1:]):
            continue
        reference = reference_flow(posed.problem, rtol=posed.reference_rtol)
        ratios = []
        for budget in BUDGETS:
            ours, nfe = posed.ours(budget)
            assert nfe == budget, (nfe, budget)
            ratios.append(rms_distance(ours, reference) / stored[name][str(budget)][1])
        print(f"| {name} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
