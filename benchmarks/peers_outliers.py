"""Which samples decide a cell of ``peers.md``: ours and the winning peer setting, per sample (issue 14).

The side-by-side table scores a sampler by the RMS over samples of the distance to the exact flow. On a trained
network a few samples start near a ridge between two modes, where the flow pulls neighbouring paths apart and
any sampler's local error is amplified; their distances can carry most of the mean square. For each cell of the
problems asked for, this reruns our default and the peer setting that won the cell in the last full
``benchmarks/peers.py`` run (from ``peers.json``; the peer from its installed package, on the same samples and
exact flow), and reports side by side: the RMS (the table's measure), the median distance, and the share of the
squared distance carried by the worst 0.5 % of samples, for each.

    python benchmarks/peers_outliers.py                 # every problem, into benchmarks/results/peers_outliers.md
    python benchmarks/peers_outliers.py ring_ve.pt      # problems whose name starts with the argument (to stdout)
"""
from __future__ import annotations

import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.peer_samplers import peer_settings, reference_flow  # noqa: E402
from benchmarks.peers import BUDGETS, RESULTS, fail, problems, require_peers  # noqa: E402

#: the worst share of samples whose part of the mean square is reported
WORST = 0.005


def distances(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each sample's Euclidean distance to the exact flow, (n,)."""
    return (x - reference).flatten(1).norm(dim=1)


def summary(d: torch.Tensor) -> tuple[float, float, float]:
    """(RMS, median, share of Σd² carried by the worst WORST of the samples, at least one)."""
    k = max(1, int(WORST * d.numel()))
    squares = d.pow(2).sort(descending=True).values
    return squares.mean().sqrt().item(), d.median().item(), (squares[:k].sum() / squares.sum()).item()


def problem_rows(posed, cells: dict) -> list[str]:
    settings = {s.label: s for s in peer_settings()}
    reference = reference_flow(posed.problem, rtol=posed.reference_rtol)
    rows = []
    for budget in BUDGETS:
        label = cells[str(budget)][2]
        ours = summary(distances(posed.ours(budget)[0], reference))
        peer = summary(distances(settings[label].run(posed.problem, budget)[0], reference))
        rows.append(f"| {budget} | {label} | {ours[0]:.2e} | {peer[0]:.2e} | {ours[0] / peer[0]:.2f} | {ours[1]:.2e} | "
                    f"{peer[1]:.2e} | {ours[1] / peer[1]:.2f} | {ours[2]:.0%} / {peer[2]:.0%} |")
        print(f"  {posed.problem.name} {budget}: " + rows[-1], flush=True)
    return rows


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    cells = json.loads((RESULTS / "peers.json").read_text())["cells"]
    chosen = [p for p in problems() if not argv or any(p.problem.name.startswith(a) for a in argv)]
    if not chosen:
        fail(f"no problem's name starts with {', '.join(map(repr, argv))}; the problems are: "
             + "; ".join(p.problem.name for p in problems()) + ".")
    require_peers(peer_settings())
    head = ["| NFE | the cell's best peer | ours, RMS | peer, RMS | ratio | ours, median | peer, median | ratio | "
            f"worst {WORST:.1%} carry (ours / peer) |", "|---|---|---|---|---|---|---|---|---|"]
    text = [f"# Which samples decide a cell: RMS against median\n\n`python benchmarks/peers_outliers.py`; torch "
            f"{torch.__version__}. Per cell, our default and the peer setting that won it in peers.md, rerun on "
            f"the same samples against the same exact flow; distances per sample. The RMS is the table's measure; "
            f"the last column is the share of Σ distance² carried by the worst {WORST:.1%} of the samples (at least "
            f"one: on the digits U-Net's 64, its worst sample).\n"]
    for posed in chosen:
        text += [f"## {posed.problem.name} ({posed.problem.x_start.shape[0]} samples)\n", *head,
                 *problem_rows(posed, cells[posed.problem.name]), ""]
    if argv:
        print("\n".join(text))
    else:
        (RESULTS / "peers_outliers.md").write_text("\n".join(text))
        print(f"written to {RESULTS / 'peers_outliers.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
