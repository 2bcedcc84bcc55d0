"""The likelihood budget table: NFE → |error| of the fixed-budget multistep likelihood and of dopri5 (issue 14).

1. **Exact divergence.** On the exact ring and 16-D mixture (VP, sub-VP, VE; 1000 points) and on the three
   shipped ring networks (200 points) (float64, eps = 1e-5 as in ``task=likelihood``), every method's
   per-point log p is compared with a tight reference: dopri8 at rtol = atol = 1e-9 with the exact
   divergence (on the exact problems it matches the closed form to 1e-10). Rows: ``method=multistep`` at
   10–120 NFE, dopri5 at rtol = atol 1e-3, 1e-4, 1e-5 (the default); columns: mean, median, 90th
   percentile and max of |error| in nats per point.
2. **Hutchinson.** The standard error of log p against the probe count K and its cost: the K probes share
   one forward pass per evaluation (one VJP each, vectorised), so K = 16 costs far less than 16 solves. On
   the 16-D mixture (where the exact divergence is the reference, so the estimate's bias is measured too)
   and on the shipped digits U-Net (``models/pretrained/digits_vp.pt``, or ``--digits PATH``; 64 dimensions,
   float32, the first DIGITS_POINTS test points).

Writes benchmarks/results/likelihood.md (``--only hutchinson``: likelihood_hutchinson.md; ``--problems P``:
likelihood_P.md). From the repository root::

    python benchmarks/likelihood.py [--digits outputs/.../checkpoints/last.pt]

On 2 shared cores the exact problems took about 25 minutes and the networks 13. The digits rows run the U-Net in
float32 (in float64 they did not finish in 30 minutes).
"""
from __future__ import annotations

import argparse
import datetime
import math
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import solvers  # noqa: E402
from data_lib import load_dataset  # noqa: E402
from evaluation.likelihood import scored_points  # noqa: E402
from models import MixtureScore, random_mixture, ring_mixture  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from sde_lib import SDES  # noqa: E402
from tasks_lib.model_source import pretrained_path  # noqa: E402

N_POINTS = 1000
N_NETWORK = 200       # the networks' float64 reference (dopri8, ~2500 NFE of exact divergences) is the slow part
EPS = 1e-5
MULTISTEP_STEPS = (9, 19, 29, 39, 59, 79, 119)      # NFE = steps + 1
DOPRI5_TOLERANCES = (1e-3, 1e-4, 1e-5)
PROBES = (1, 4, 16)
DIGITS_POINTS = 100
OUT = ROOT / "benchmarks" / "results" / "likelihood.md"


def problems():
    """(label, sde, score_fn, points): the exact mixtures under each SDE, then the shipped networks."""
    for label, mixture, sde_names in (("ring", ring_mixture(), ("vp", "subvp", "ve")),
                                      ("16-D", random_mixture(), ("vp", "ve"))):
        x, _ = mixture.sample(N_POINTS, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for name in sde_names:
            sde = SDES[name]()
            yield f"{label}, exact, {name}", sde, MixtureScore(sde, mixture), x
    x, _ = ring_mixture().sample(N_NETWORK, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name in ("vp", "subvp", "ve"):
        model = load_checkpoint(pretrained_path("ring", name))
        yield f"ring_{name}.pt", model.sde, model.score_fn.double(), x


def error_row(label: str, nfe: int, seconds: float, logp: torch.Tensor, reference: torch.Tensor) -> str:
    e = (logp - reference).abs()
    q = torch.quantile(e, torch.tensor([0.5, 0.9], dtype=e.dtype))
    return (f"| {label} | {nfe} | {seconds:.2f} | {e.mean():.1e} | {q[0]:.1e} | {q[1]:.1e} | {e.max():.1e} |")


def budget_table(lines: list[str], only: str | None = None) -> None:
    lines += ["## 1. Budget → |error| (nats per point), exact divergence", ""]
    for label, sde, score, x in problems():
        if only is not None and not label.startswith(only):
            continue
        reference = solvers.log_likelihood(sde, score, x, eps=EPS, method="dopri8", rtol=1e-9, atol=1e-9)
        lines += [f"### {label}: {len(x)} points (reference: dopri8 1e-9, {reference.nfe} NFE)", "",
                  "| method | NFE | seconds | mean | median | 90 % | max |", "|---|---|---|---|---|---|---|"]
        for steps in MULTISTEP_STEPS:
            r = solvers.log_likelihood(sde, score, x, eps=EPS, method="multistep", steps=steps)
            lines.append(error_row("multistep", r.nfe, r.seconds, r.logp, reference.logp))
        for tol in DOPRI5_TOLERANCES:
            r = solvers.log_likelihood(sde, score, x, eps=EPS, rtol=tol, atol=tol)
            lines.append(error_row(f"dopri5 {tol:g}", r.nfe, r.seconds, r.logp, reference.logp))
        lines.append("")
        print("\n".join(lines[-len(MULTISTEP_STEPS) - len(DOPRI5_TOLERANCES) - 5:]), flush=True)


def hutchinson_rows(lines: list[str], label: str, sde, score, x, exact: torch.Tensor | None, steps: int) -> None:
    """Standard error and cost against K at one multistep budget; bias against the exact divergence when known."""
    lines += [f"### {label}, multistep {steps + 1} NFE", "",
              "| probes K | seconds | mean standard error (nats) | × 1/√K scaling | mean (estimate − exact) ± its s.e. |",
              "|---|---|---|---|---|"]
    base = None
    for k in PROBES:
        r = solvers.log_likelihood(sde, score, x, eps=EPS, method="multistep", steps=steps, divergence="hutchinson",
                                   probes=k, seed=1)
        # K = 1 has no spread of its own: its standard error is the spread over points of (estimate − exact) when
        # the exact divergence is known, else the K = 4 run's per-probe spread
        per_probe = r.logp_probes.std(0) if k > 1 else None
        stderr = (per_probe / math.sqrt(k)).mean().item() if per_probe is not None else float("nan")
        if base is None and per_probe is not None:
            base = per_probe.mean().item()
        bias = ""
        if exact is not None:
            d = (r.logp - exact).double()
            bias = f"{d.mean():+.1e} ± {d.std() / math.sqrt(len(d)):.1e}"
            if k == 1:
                stderr = d.std().item()
        scaling = f"{stderr * math.sqrt(k):.3g}" if math.isfinite(stderr) else ""
        lines.append(f"| {k} | {r.seconds:.2f} | {stderr:.3g} | {scaling} | {bias} |")
    lines.append("")
    print("\n".join(lines[-len(PROBES) - 4:]), flush=True)


def hutchinson_table(lines: list[str], digits: str | None) -> None:
    lines += ["## 2. Hutchinson: standard error against probes and cost", "",
              "The K probes are held fixed along the path and share each evaluation's forward pass. The "
              "'× 1/√K' column is stderr·√K, the per-probe spread: constant when the probes are independent.", ""]
    mixture = random_mixture()
    x, _ = mixture.sample(N_POINTS, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sde = SDES["vp"]()
    score = MixtureScore(sde, mixture)
    exact = solvers.log_likelihood(sde, score, x, eps=EPS, method="multistep", steps=79)
    lines += [f"Exact divergence on the same path: {exact.seconds:.2f} s (16 VJPs per evaluation).", ""]
    hutchinson_rows(lines, "16-D, exact, vp", sde, score, x, exact.logp, 79)
    path = digits or pretrained_path("digits", "vp")
    model = load_checkpoint(path)
    data = load_dataset("digits")
    points = scored_points(data, data.test[:DIGITS_POINTS].float(), seed=0)
    levels = f"{data.levels} levels"
    shown = path if digits else pathlib.Path(path).relative_to(ROOT)
    lines += [f"Digits U-Net `{shown}` (the first {len(points)} test points, 64 dimensions, dequantised from "
              f"{levels}; float32).", ""]
    hutchinson_rows(lines, "digits", model.sde, model.score_fn, points, None, 79)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits",
                        help="a digits checkpoint for the Hutchinson rows (default: the shipped digits_vp.pt)")
    parser.add_argument("--only", choices=("budget", "hutchinson"), help="run one part")
    parser.add_argument("--problems", help="budget table: only the problems whose label starts with this (e.g. ring_)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    lines = ["# Likelihood: fixed budget against accuracy", "",
             f"`python benchmarks/likelihood.py{' --digits ' + args.digits if args.digits else ''}` "
             f"on {datetime.date.today()}, 2 CPU cores, float64, {N_POINTS} points, eps = {EPS:g}.", ""]
    if args.only != "hutchinson":
        budget_table(lines, args.problems)
    if args.only != "budget":
        hutchinson_table(lines, args.digits)
    lines.append(f"Total {time.perf_counter() - start:.0f} s.")
    out = OUT.with_name("likelihood_hutchinson.md") if args.only == "hutchinson" else OUT
    if args.problems:
        out = OUT.with_name(f"likelihood_{args.problems.strip('_ ,')}.md")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
