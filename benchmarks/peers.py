"""Our default sampler against the samplers users run, side by side on one σ-space problem (issue 14).

Every problem is posed once in σ-space (docs/math.md §9): a span σ_max → σ_min, a starting point
x̃ at σ_max and a denoiser D(x̃, σ) = x̂₀. The peers (``benchmarks/peer_samplers.py``: diffusers'
UniPC, SA-Solver, DEIS, DPM-Solver and EDM DPM-Solver; k-diffusion's lms, dpmpp_2m, dpmpp_3m_sde,
dpm_fast, dpm_adaptive, heun, dpm_2, euler) run from their installed packages, each at its best
setting per budget (every grid and option they offer is swept, the smallest error kept). Ours runs
``solvers.sample(..., solver="multistep", steps=budget)`` with its defaults, on an SDE whose
σ(T) = σ_max and σ(eps) = σ_min, from x = α(T) x̃_start; its samples are compared as x̃ = x/α(eps).
The error is the RMS over samples of the distance to the problem's own exact flow (dopri8 in log σ,
rtol = atol = 1e-10, float64); for a network that is the flow of the network's own denoiser.

Problems: the 2-D ring of 8 Gaussians and the 16-D mixture (exact scores), each over EDM's span
σ 80 → 0.002 and over the VP SDE's span σ(1) ≈ 152 → σ(1e-3) ≈ 0.0105; the shipped networks
``models/pretrained/ring_{vp,subvp,ve}.pt`` over their SDE's span (float64); and the shipped digits U-Net
``digits_vp.pt`` (float32, 64 samples, its flow to rtol 1e-6, against the peer settings that won a cell of
the problems before it: a float64 sweep of every setting would take hours on 2 cores).

The peers' sweep (~220 settings per cell) is ranked on the first 128 samples and its best 8 settings
are run on all samples (``best_peer_screened``); the cells are written after every problem.

Writes ``benchmarks/results/peers.md``, ``peers.png`` and ``peers.json`` (every cell as data). From the
repository root, with the peers installed (README, "Benchmarks")::

    python benchmarks/peers.py                 # every problem
    python benchmarks/peers.py ring_ve.pt      # problems whose name starts with the argument
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import solvers  # noqa: E402
from benchmarks.peer_samplers import (PeerSetting, SigmaProblem, best_peer, peer_settings,  # noqa: E402
                                      reference_flow, rms_distance, scored_run)
from models import MixtureScore, random_mixture, ring_mixture  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from sde_lib import SDE, VESDE, VPSDE  # noqa: E402
from solvers.base import resolve_sigma_data  # noqa: E402
from solvers.grids import half_log_snr_at  # noqa: E402
from tasks_lib.model_source import pretrained_path  # noqa: E402

F64 = torch.float64
RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"
BUDGETS = (5, 6, 8, 10, 12, 15, 20, 25, 30, 50, 100)
N_EXACT = 2000
N_NETWORK = 1000
N_DIGITS = 64
#: the peers' sweep is screened on this many samples; the best SHORTLIST settings are then run on all
SCREEN = 128
SHORTLIST = 8
#: the goal: our error at most half the best peer's in every cell
GOAL = 0.5


@dataclasses.dataclass
class Posed:
    """One problem for the peers (``problem``) and for us: the SDE, score and eps whose span is the problem's."""

    problem: SigmaProblem
    sde: SDE
    score: object
    eps: float
    #: the exact flow's tolerance (dopri8); looser for a float32 network, whose rounding a tighter one would chase
    reference_rtol: float = 1e-10
    #: the peers' sweep: False screens every setting; True, for a network too slow for that (the digits U-Net),
    #: screens only the settings that were best in some cell of the problems before it
    winners_only: bool = False
    #: the data scale the solve assumes, the model's own (``score`` may be a float32 network behind a cast)
    sigma_data: float = 1.0

    def alpha(self, t: float) -> float:
        return float(self.sde.log_mean_coeff(torch.tensor(t, dtype=F64)).exp())

    def ours(self, budget: int, **options) -> tuple[torch.Tensor, int]:
        """x̃ at σ_min from our ``multistep`` at ``budget`` steps, and its NFE."""
        z = self.alpha(self.sde.T) * self.problem.x_start
        out = solvers.sample(self.sde, self.score, z=z, solver="multistep", steps=budget, eps=self.eps,
                             sigma_data=self.sigma_data, **options)
        return out.samples / self.alpha(self.eps), out.nfe


def pose(name: str, sde: SDE, score, eps: float, n: int, event: tuple[int, ...], seed: int = 0,
         dtype: torch.dtype = F64, **options) -> Posed:
    """The σ-space problem of (sde, score) over [eps, T]: x̃_start = σ_max z, D from the score (run in ``dtype``;
    the solvers' state stays float64, ours as the peers')."""

    def cast(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return score(x.to(dtype), t.to(dtype)).to(F64)

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = sde.t_from_half_log_snr(-sigma.log())
        shape = (-1,) + (1,) * (x.dim() - 1)
        alpha = sde.log_mean_coeff(t).exp().view(shape)
        std = sde.marginal_std(t).view(shape)
        xt = alpha * x
        return (xt + std**2 * cast(xt, t)) / alpha

    sigma_max, sigma_min = (math.exp(-half_log_snr_at(sde, t)) for t in (sde.T, eps))   # σ = e^(−λ)
    z = torch.randn(n, *event, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return Posed(SigmaProblem(name, sigma_max, sigma_min, sigma_max * z, denoiser), sde,
                 score if dtype == F64 else cast, eps, sigma_data=resolve_sigma_data(score, None), **options)


def problems() -> list[Posed]:
    out = []
    # EDM's span on a VE SDE: σ(t) = 0.001·80000^t reaches 0.002 at t = log 2/log 80000
    edm = VESDE(sigma_min=0.001, sigma_max=80.0)
    edm_eps = math.log(2) / math.log(80_000)
    for label, mixture in (("ring", ring_mixture()), ("16-D", random_mixture())):
        out.append(pose(f"{label}, σ 80 → 0.002", edm, MixtureScore(edm, mixture), edm_eps, N_EXACT,
                        (mixture.dim,)))
        vp = VPSDE()
        out.append(pose(f"{label}, VP span", vp, MixtureScore(vp, mixture), 1e-3, N_EXACT, (mixture.dim,)))
    for name in ("vp", "subvp", "ve"):
        model = load_checkpoint(pretrained_path("ring", name))
        score = model.score_fn.double()
        out.append(pose(f"ring_{name}.pt", model.sde, score, model.sde.default_eps, N_NETWORK, (2,)))
    # The digits U-Net costs ~0.6 s per float64 evaluation of 128 samples on one core: it runs in float32
    # (its flow to rtol 1e-6, far below the errors measured) on fewer samples, against the winning peers.
    model = load_checkpoint(pretrained_path("digits", "vp"))
    out.append(pose("digits_vp.pt (U-Net, float32)", model.sde, model.score_fn, model.sde.default_eps, N_DIGITS,
                    model.event_shape, dtype=torch.float32, reference_rtol=1e-6, winners_only=True))
    return out


def best_peer_screened(problem: SigmaProblem, sub: SigmaProblem, budget: int, reference: torch.Tensor,
                       settings: list[PeerSetting]):
    """``best_peer`` over ``settings``, ranked first on ``sub``, the first SCREEN samples (a network in
    float64 costs ~50 ms per evaluation of 1000 points, and the sweep has ~220 settings), then the best
    SHORTLIST of them run on all samples. (error, setting, NFE) on all samples. ``sub`` is made once per
    problem, so that dpm_adaptive's tolerance sweep, cached per problem object, runs once."""
    ranked = []
    for setting in settings:
        try:
            ranked.append((scored_run(setting, sub, budget, reference[:SCREEN])[0], setting))
        except Exception:  # too small a budget for it, or a failure: best_peer below skips it the same way
            continue
    shortlist = [s for _, s in sorted(ranked, key=lambda r: r[0])[:SHORTLIST]]
    return best_peer(problem, budget, reference, settings=shortlist)


def winning_settings(results: dict) -> list[PeerSetting]:
    """The peer settings that were best in some cell of ``results`` (this run's, else the stored peers.json)."""
    if not results and (RESULTS / "peers.json").is_file():
        results = json.loads((RESULTS / "peers.json").read_text())["cells"]
    labels = {row[2] for rows in results.values() for row in rows.values()}
    chosen = [s for s in peer_settings() if s.label in labels]
    return chosen or peer_settings()


def run(posed: Posed, results: dict) -> dict:
    """Per budget: our error, the best peer's error, its setting, and the ratio."""
    start = time.perf_counter()
    reference = reference_flow(posed.problem, rtol=posed.reference_rtol)
    sub = dataclasses.replace(posed.problem, x_start=posed.problem.x_start[:SCREEN])
    settings = winning_settings(results) if posed.winners_only else peer_settings()
    rows = {}
    for budget in BUDGETS:
        ours, nfe = posed.ours(budget)
        assert nfe == budget, (nfe, budget)
        err = rms_distance(ours, reference)
        peer_err, setting, peer_nfe = best_peer_screened(posed.problem, sub, budget, reference, settings)
        rows[budget] = (err, peer_err, setting.label, peer_nfe)
        print(f"  {posed.problem.name} {budget:3d} NFE: ours {err:.2e}  best peer {peer_err:.2e} "
              f"({setting.label}, {peer_nfe} NFE)  ratio {err / peer_err:.2f}", flush=True)
    print(f"  {posed.problem.name}: {time.perf_counter() - start:.0f} s ({len(settings)} peer settings)", flush=True)
    return rows


def convergence_slope(posed: Posed, steps=(100, 200, 400, 800)) -> tuple[list[float], float]:
    """Our default's error at growing steps on the problem's flow, and the log-log slope over the last two."""
    reference = reference_flow(posed.problem, rtol=posed.reference_rtol)
    errs = [rms_distance(posed.ours(n)[0], reference) for n in steps]
    return errs, -math.log(errs[-1] / errs[-2]) / math.log(steps[-1] / steps[-2])


def main() -> None:
    chosen = [p for p in problems() if not sys.argv[1:] or any(p.problem.name.startswith(a) for a in sys.argv[1:])]
    results = {}
    for posed in chosen:
        results[posed.problem.name] = run(posed, results)
        write(results, [], chosen)       # after every problem, so that a stopped run keeps what it measured
    slopes = []
    for p in chosen:
        if p.problem.name.endswith(".pt"):
            errs, slope = convergence_slope(p)
            slopes.append(f"| {p.problem.name} | " + " | ".join(f"{e:.2e}" for e in errs) + f" | {slope:.2f} |")
            print(slopes[-1], flush=True)
    write(results, slopes, chosen)
    print(f"written to {RESULTS / 'peers.md'}")


def write(results: dict, slope_rows: list[str], posed: list[Posed]) -> None:
    """peers.md (ratios, every cell, the networks' convergence slopes; the spans of ``posed``), peers.png, peers.json."""
    head = "| problem | " + " | ".join(str(b) for b in BUDGETS) + " |\n|---|" + "---|" * len(BUDGETS)
    ratio = [head] + [f"| {name} | " + " | ".join(f"{rows[b][0] / rows[b][1]:.2f}" for b in BUDGETS) + " |"
                      for name, rows in results.items()]
    detail = ["| problem | NFE | ours | best peer | its setting (NFE used) | ratio |", "|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for b in BUDGETS:
            err, peer_err, label, peer_nfe = rows[b]
            detail.append(f"| {name} | {b} | {err:.2e} | {peer_err:.2e} | {label} ({peer_nfe}) | {err / peer_err:.2f} |")
    slopes = ["| problem | " + " | ".join(f"{n} steps" for n in (100, 200, 400, 800)) + " | slope |",
              "|---|---|---|---|---|---|"] + (slope_rows or ["| (not measured in this run) |"])
    worst = max(rows[b][0] / rows[b][1] for rows in results.values() for b in BUDGETS)
    spans = "; ".join(f"{p.problem.name}: σ {p.problem.sigma_max:.3g} → {p.problem.sigma_min:.3g}"
                      for p in posed if p.problem.name in results)
    text = (f"# Our default sampler against the peers, side by side\n\n`python benchmarks/peers.py`; torch "
            f"{torch.__version__}. Problems posed in σ-space (docs/math.md §9); errors are RMS distances to each "
            f"problem's exact flow (dopri8 in log σ at 1e-10, float64); exact problems {N_EXACT} samples, ring "
            f"networks {N_NETWORK}; the digits U-Net {N_DIGITS} samples in float32, its flow at rtol 1e-6, against "
            f"the peer settings that won a cell of the other problems. Peers at their best setting per cell "
            f"(`benchmarks/peer_samplers.py`). Spans: {spans}.\n\n"
            f"## Ratio: our default `multistep` ÷ the best peer (goal ≤ {GOAL}; worst cell {worst:.2f})\n\n"
            + "\n".join(ratio) + "\n\n## Every cell\n\n" + "\n".join(detail)
            + "\n\n## Convergence of the default on the shipped networks (their own flow)\n\n" + "\n".join(slopes) + "\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "peers.md").write_text(text)
    # the cells as data: (ours, best peer, its setting, its NFE) per problem and budget
    cells = {name: {str(b): list(row) for b, row in rows.items()} for name, rows in results.items()}
    (RESULTS / "peers.json").write_text(json.dumps({"torch": torch.__version__, "cells": cells}, indent=1))
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results.items()):
        ax.loglog(BUDGETS, [rows[b][0] for b in BUDGETS], "o-", label="ours (multistep, defaults)")
        ax.loglog(BUDGETS, [rows[b][1] for b in BUDGETS], "s--", label="best peer per budget")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("NFE")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].set_ylabel("RMS distance to the exact flow")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "peers.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
