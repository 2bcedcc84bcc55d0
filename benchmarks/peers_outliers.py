"""Which samples decide a cell of ``peers.md``, and how far its ratio can be trusted (issue 14).

The side-by-side table scores a sampler by the RMS over samples of the distance to the exact flow. On a trained
network a few samples start near a ridge between two modes, where the flow pulls neighbouring paths apart and
any sampler's local error is amplified; their distances can carry most of the mean square. For each cell of the
problems asked for, this reruns our default and the peer setting that won the cell in the last full
``benchmarks/peers.py`` run (from ``peers.json``; the peer from its installed package, on the same samples and
exact flow), and reports side by side: the RMS (the table's measure), the median distance, and the share of the
squared distance carried by the worst 0.5 % of samples, for each.

Two checks of the ratio itself. A paired bootstrap interval: the table's samples drawn again with replacement,
ours and the peer's distances kept together. And held-out samples: a second draw of starting noise of the same
size (seed ``HELD_OUT_SEED``; the table's is seed 0) with its own exact flow, on which ours and the cell's winning
setting run again, the setting not chosen again. The table's peer is the best of ~220 settings on the table's own
samples, so where a few samples decide a cell, part of its win is the luck of that draw; on held-out samples it is not.

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
from benchmarks.peer_samplers import peer_settings, reference_flow, rms_distance  # noqa: E402
from benchmarks.peers import BUDGETS, RESULTS, fail, problems, require_peers  # noqa: E402

#: the worst share of samples whose part of the mean square is reported
WORST = 0.005
#: the seed of the held-out starting noise; the table's samples are seed 0 (``peers.pose``)
HELD_OUT_SEED = 1
#: the bootstrap interval's level and number of draws
LEVEL = 0.9
DRAWS = 2000


def distances(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each sample's Euclidean distance to the exact flow, (n,)."""
    return (x - reference).flatten(1).norm(dim=1)


def summary(d: torch.Tensor) -> tuple[float, float, float]:
    """(RMS, median, share of Σd² carried by the worst WORST of the samples, at least one)."""
    k = max(1, int(WORST * d.numel()))
    squares = d.pow(2).sort(descending=True).values
    return squares.mean().sqrt().item(), d.median().item(), (squares[:k].sum() / squares.sum()).item()


def ratio_interval(ours: torch.Tensor, peer: torch.Tensor, level: float = LEVEL, draws: int = DRAWS,
                   seed: int = 0) -> tuple[float, float]:
    """The paired bootstrap interval of RMS(ours) ÷ RMS(peer): the samples drawn with replacement ``draws`` times,
    each sample's two distances kept together; the central ``level`` of the ratios."""
    index = torch.randint(ours.numel(), (draws, ours.numel()), generator=torch.Generator().manual_seed(seed))
    ratios = (ours.pow(2)[index].mean(1) / peer.pow(2)[index].mean(1)).sqrt()
    tails = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=ratios.dtype)
    low, high = torch.quantile(ratios, tails).tolist()
    return low, high


def problem_rows(posed, cells: dict) -> tuple[list[str], list[float]]:
    """The problem's rows of the per-cell table, and its held-out ratio per budget."""
    settings = {s.label: s for s in peer_settings()}
    held = posed.resampled(HELD_OUT_SEED)
    reference = reference_flow(posed.problem, rtol=posed.reference_rtol)
    held_reference = reference_flow(held.problem, rtol=posed.reference_rtol)
    rows, held_ratios = [], []
    for budget in BUDGETS:
        label = cells[str(budget)][2]
        setting = settings[label]
        d_ours = distances(posed.ours(budget)[0], reference)
        d_peer = distances(setting.run(posed.problem, budget)[0], reference)
        ours, peer = summary(d_ours), summary(d_peer)
        low, high = ratio_interval(d_ours, d_peer)
        held_ours = rms_distance(held.ours(budget)[0], held_reference)
        held_peer = rms_distance(setting.run(held.problem, budget)[0], held_reference)
        held_ratios.append(held_ours / held_peer)
        rows.append(f"| {budget} | {label} | {ours[0]:.2e} | {peer[0]:.2e} | {ours[0] / peer[0]:.2f} | "
                    f"{low:.2f}–{high:.2f} | {held_ours:.2e} | {held_peer:.2e} | {held_ratios[-1]:.2f} | "
                    f"{ours[1]:.2e} | {peer[1]:.2e} | {ours[1] / peer[1]:.2f} | {ours[2]:.0%} / {peer[2]:.0%} |")
        print(f"  {posed.problem.name} {budget}: " + rows[-1], flush=True)
    return rows, held_ratios


def held_out_table(held: dict[str, list[float]], table: dict) -> list[str]:
    """Problem × budget: the held-out ratio, with the table's in brackets."""
    lines = ["| problem | " + " | ".join(str(b) for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS)]
    for name, ratios in held.items():
        cells = [f"{r:.2f} ({table[name][str(b)][0] / table[name][str(b)][1]:.2f})" for b, r in zip(BUDGETS, ratios)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    cells = json.loads((RESULTS / "peers.json").read_text())["cells"]
    chosen = [p for p in problems() if not argv or any(p.problem.name.startswith(a) for a in argv)]
    if not chosen:
        fail(f"no problem's name starts with {', '.join(map(repr, argv))}; the problems are: "
             + "; ".join(p.problem.name for p in problems()) + ".")
    require_peers(peer_settings())
    head = ["| NFE | the cell's best peer | ours, RMS | peer, RMS | ratio | its "
            f"{LEVEL:.0%} interval | held out: ours | peer | ratio | ours, median | peer, median | ratio | "
            f"worst {WORST:.1%} carry (ours / peer) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    sections, held = [], {}
    for posed in chosen:
        rows, held[posed.problem.name] = problem_rows(posed, cells[posed.problem.name])
        sections += [f"## {posed.problem.name} ({posed.problem.x_start.shape[0]} samples)\n", *head, *rows, ""]
    worst = max(held.items(), key=lambda item: max(item[1]))
    text = [f"# Which samples decide a cell, and how far its ratio can be trusted\n\n`python "
            f"benchmarks/peers_outliers.py`; torch {torch.__version__}. Per cell, our default and the peer setting "
            f"that won it in peers.md, rerun on the same samples against the same exact flow; distances per sample. "
            f"The RMS is the table's measure, with a paired bootstrap {LEVEL:.0%} interval of its ratio ({DRAWS} "
            f"draws). Held out: the same two samplers on as many other samples (seed {HELD_OUT_SEED}) against their "
            f"own exact flow, the peer's setting not chosen again. The last column is the share of Σ distance² "
            f"carried by the worst {WORST:.1%} of the samples (at least one: on the digits U-Net's 64, its worst "
            f"sample).\n",
            f"## Ours ÷ the cell's winning setting on held-out samples (the table's ratio in brackets; worst held-out "
            f"cell {max(worst[1]):.2f}, {worst[0]})\n", *held_out_table(held, cells), "", *sections]
    if argv:
        print("\n".join(text))
    else:
        (RESULTS / "peers_outliers.md").write_text("\n".join(text))
        print(f"written to {RESULTS / 'peers_outliers.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
