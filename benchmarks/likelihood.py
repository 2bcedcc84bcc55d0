"""The likelihood budget table: NFE → |error| of the fixed-budget multistep likelihood, its refinement, and dopri5 (issue 14).

1. **Budget, exact divergence** (``--only budget``). On the exact ring (VP, sub-VP, VE; 1000 points) and 16-D mixture
   (VP, VE; EXACT_16D points) the reference is the closed form log p_eps(x) − log p_T(z) + prior_logp(z) at each
   method's own latent z (it differs from dopri8 at 1e-9 by ~1e-10); on the three shipped ring networks
   (``--only networks``, N_NETWORK points) it is dopri8 at rtol = atol = 1e-9. Rows: ``method=multistep`` at 20–120 NFE;
   the same with ``refine`` (the points whose error estimate exceeds the threshold solved again at 4× the steps; the
   NFE column is then the mean per point, the batched total in brackets); dopri5 at rtol = atol 1e-3, 1e-4, 1e-5.
   Columns: mean, median, 90th percentile and max of |error| in nats per point.
2. **Hutchinson** (``--only hutchinson``): the standard error of log p against its cost — probes K (VJPs per
   evaluation), NFE, seconds — for plain Hutchinson (Rademacher), the Gaussian control variate
   (``control_covariance``: the data's covariance) and Hutch++ (``sketch``), with the bias against the exact divergence
   on the same path. On the 16-D mixture (VP) and the shipped digits U-Net (``models/pretrained/digits_vp.pt``, 64
   dimensions, float32: in float64 the exact reference did not finish in 30 minutes).
3. **A network that predicts the noise** (``--only noise``): the fixed-budget likelihood of the digits U-Net (an ε
   network, float64, NOISE_POINTS dequantised test points, exact divergence) with its default end step (from
   35 steps: ``solvers/likelihood.py`` END_STEP_FROM) and without it (``end_step=0``), against the multistep
   likelihood at NOISE_REFERENCE_STEPS steps (its distance to the solve at half those steps is printed beside it).

From the repository root::

    python benchmarks/likelihood.py                 # everything, into benchmarks/results/likelihood.md
    python benchmarks/likelihood.py --only networks # one part, into benchmarks/results/likelihood_networks.md
    python benchmarks/likelihood.py --merge         # the part files, concatenated into likelihood.md
    python benchmarks/likelihood.py --only noise --threads 2   # the ε U-Net alone, ~26 minutes on 2 cores

One thread per part. Measured: 13–14 minutes per part with the three parts side by side on 2 cores shared with
other jobs (load average ≈ 6), so each part had well under one core.
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

N_RING = 1000
EXACT_16D = 500       # 16 VJPs per evaluation: the slow exact problem
N_NETWORK = 100       # the networks' float64 reference (dopri8, 2000–3000 NFE of exact divergences) is the slow part
EPS = 1e-5
MULTISTEP_STEPS = (19, 29, 39, 59, 79, 119)      # NFE = steps + 1
REFINED = ((35, 0.3), (71, 0.03))                # (steps, refine): per-point NFE at or below 40 and 80
DOPRI5_TOLERANCES = (1e-3, 1e-4, 1e-5)
HUTCH_16D_POINTS, HUTCH_STEPS = 300, 39
DIGITS_POINTS, DIGITS_STEPS = 20, 19
NOISE_POINTS, NOISE_REFERENCE_STEPS, NOISE_STEPS = 8, 319, (19, 39, 79)
PARTS = ("budget", "networks", "hutchinson", "noise")
OUT = ROOT / "benchmarks" / "results" / "likelihood.md"
PART_HEADING = "## Budget → |error| (nats per point), exact divergence: exact problems\n"   # the first part's


def exact_problems():
    """(label, sde, score, points, reference(result) -> (B,) log p) for the exact mixtures."""
    for label, mixture, n, sde_names in (("ring", ring_mixture(), N_RING, ("vp", "subvp", "ve")),
                                         ("16-D", random_mixture(), EXACT_16D, ("vp", "ve"))):
        x, _ = mixture.sample(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for name in sde_names:
            sde = SDES[name]()
            score = MixtureScore(sde, mixture)

            def reference(r, sde=sde, score=score, x=x):
                eps, T = torch.full((len(x),), EPS, dtype=x.dtype), torch.full((len(x),), sde.T, dtype=x.dtype)
                return score.log_prob(x, eps) - score.log_prob(r.z, T) + sde.prior_logp(r.z)
            yield f"{label}, exact, {name}: {n} points (reference: the closed form)", sde, score, x, reference


def networks():
    x, _ = ring_mixture().sample(N_NETWORK, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name in ("vp", "subvp", "ve"):
        model = load_checkpoint(pretrained_path("ring", name))
        score = model.score_fn.double()
        ref = solvers.log_likelihood(model.sde, score, x, eps=EPS, method="dopri8", rtol=1e-9, atol=1e-9)
        yield (f"ring_{name}.pt: {N_NETWORK} points (reference: dopri8 1e-9, {ref.nfe} NFE)", model.sde, score, x,
               lambda r, logp=ref.logp: logp)


def error_row(label: str, nfe: str, seconds: float, error: torch.Tensor) -> str:
    q = torch.quantile(error, torch.tensor([0.5, 0.9], dtype=error.dtype))
    return f"| {label} | {nfe} | {seconds:.2f} | {error.mean():.1e} | {q[0]:.1e} | {q[1]:.1e} | {error.max():.1e} |"


def budget_table(lines: list[str], items, only: str | None) -> None:
    for label, sde, score, x, reference in items:
        if only is not None and not label.startswith(only):
            continue
        lines += [f"### {label}", "", "| method | NFE | seconds | mean | median | 90 % | max |",
                  "|---|---|---|---|---|---|---|"]
        start = len(lines)
        for steps in MULTISTEP_STEPS:
            r = solvers.log_likelihood(sde, score, x, eps=EPS, method="multistep", steps=steps)
            lines.append(error_row("multistep", str(r.nfe), r.seconds, (r.logp - reference(r)).abs()))
        for steps, refine in REFINED:
            r = solvers.log_likelihood(sde, score, x, eps=EPS, method="multistep", steps=steps, refine=refine)
            flagged = int((r.nfe_per_point > steps + 1).sum())
            nfe = f"{r.nfe_per_point.double().mean():.1f} ({r.nfe})"
            lines.append(error_row(f"multistep {steps + 1}, refine {refine:g} ({flagged} re-solved)", nfe, r.seconds,
                                   (r.logp - reference(r)).abs()))
        for tol in DOPRI5_TOLERANCES:
            r = solvers.log_likelihood(sde, score, x, eps=EPS, rtol=tol, atol=tol)
            lines.append(error_row(f"dopri5 {tol:g}", str(r.nfe), r.seconds, (r.logp - reference(r)).abs()))
        lines.append("")
        print("\n".join(lines[start - 3:]), flush=True)


def hutchinson_rows(lines: list[str], label: str, sde, score, x, steps: int, covariance: torch.Tensor) -> None:
    """Standard error, its cost and the bias against the exact divergence on the same path, per estimator."""
    exact = solvers.log_likelihood(sde, score, x, eps=EPS, method="multistep", steps=steps)
    lines += [f"### {label}: {len(x)} points, multistep {steps + 1} NFE, {x.dtype}", "",
              f"Exact divergence on the same path: {exact.seconds:.1f} s ({x[0].numel()} VJPs per evaluation).", "",
              "| estimator | VJPs per evaluation | seconds | mean s.e. (nats) | RMS (estimate − exact) | "
              "s.e.·√seconds | mean (estimate − exact) ± its s.e. |", "|---|---|---|---|---|---|---|"]
    start = len(lines)
    for name, options in (("Hutchinson K = 4", {"probes": 4}),
                          ("Hutchinson K = 16", {"probes": 16}),
                          ("control variate K = 4", {"probes": 4, "control_covariance": covariance}),
                          ("control variate K = 16", {"probes": 16, "control_covariance": covariance}),
                          ("Hutch++ m = 5, K = 6", {"probes": 6, "sketch": 5})):
        r = solvers.log_likelihood(sde, score, x, eps=EPS, method="multistep", steps=steps, divergence="hutchinson",
                                   seed=1, **options)
        d = (r.logp - exact.logp).double()
        stderr = r.logp_stderr.double().mean().item()
        vjps = options["probes"] + 2 * options.get("sketch", 0)
        lines.append(f"| {name} | {vjps} | {r.seconds:.1f} | {stderr:.3g} | {d.pow(2).mean().sqrt():.3g} | "
                     f"{stderr * math.sqrt(r.seconds):.3g} | {d.mean():+.2e} ± {d.std() / math.sqrt(len(d)):.1e} |")
    lines.append("")
    print("\n".join(lines[start - 4:]), flush=True)


def hutchinson_table(lines: list[str]) -> None:
    mixture = random_mixture()
    x, _ = mixture.sample(HUTCH_16D_POINTS, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    big, _ = mixture.sample(20_000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sde = SDES["vp"]()
    hutchinson_rows(lines, "16-D, exact, vp", sde, MixtureScore(sde, mixture), x, HUTCH_STEPS, torch.cov(big.T))
    model = load_checkpoint(pretrained_path("digits", "vp"))
    data = load_dataset("digits")
    points = scored_points(data, data.test[:DIGITS_POINTS].float(), seed=0)
    covariance = torch.cov(data.train.float().flatten(1).T)       # the training images' covariance
    hutchinson_rows(lines, "digits_vp.pt (64-D U-Net, dequantised test points)", model.sde, model.score_fn, points,
                    DIGITS_STEPS, covariance)


def noise_table(lines: list[str]) -> None:
    """NFE → |error| of the multistep likelihood of the digits U-Net (it predicts ε), with and without the end step."""
    model = load_checkpoint(pretrained_path("digits", "vp"))
    data = load_dataset("digits")
    x = scored_points(data, data.test[:NOISE_POINTS].float(), seed=0).double()
    sde, score = model.sde, model.score_fn.double()
    ref = solvers.log_likelihood(sde, score, x, eps=EPS, method="multistep", steps=NOISE_REFERENCE_STEPS)
    half = solvers.log_likelihood(sde, score, x, eps=EPS, method="multistep", steps=(NOISE_REFERENCE_STEPS - 1) // 2)
    gap = (half.logp - ref.logp).abs()
    lines += [f"### digits_vp.pt (64-D U-Net, ε-parameterized, float64): {NOISE_POINTS} dequantised test points", "",
              f"Reference: multistep at {ref.nfe} NFE ({ref.seconds:.0f} s); at {half.nfe} NFE it differs from it by "
              f"{gap.mean():.1e} on average, {gap.max():.1e} at most.", "",
              "| method | NFE | seconds | mean | median | 90 % | max |", "|---|---|---|---|---|---|---|"]
    start = len(lines)
    for steps in NOISE_STEPS:
        variants = [("multistep (default)", {}), ("multistep, end_step=0", {"end_step": 0.0})]
        if steps < solvers.likelihood.END_STEP_FROM:
            variants = [("multistep (default: no end step)", {}), ("multistep, end_step=0.25", {"end_step": 0.25})]
        for label, options in variants:
            r = solvers.log_likelihood(sde, score, x, eps=EPS, method="multistep", steps=steps, **options)
            lines.append(error_row(label, str(r.nfe), r.seconds, (r.logp - ref.logp).abs()))
    lines.append("")
    print("\n".join(lines[start - 5:]), flush=True)


def part_file(part: str) -> pathlib.Path:
    return OUT.with_name(f"likelihood_{part}.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=PARTS, help="run one part, into likelihood_<part>.md")
    parser.add_argument("--problems", help="budget: only the problems whose label starts with this (e.g. ring)")
    parser.add_argument("--merge", action="store_true", help="concatenate the part files into likelihood.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: parts run side by side)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.merge:
        text = [part_file(p).read_text() for p in PARTS]
        # the hand-written reading above the tables (everything before the first part's heading) is kept
        old = OUT.read_text() if OUT.exists() else ""
        head = (old.split(PART_HEADING)[0] if PART_HEADING in old else
                "# Likelihood: fixed budget against accuracy\n\n"
                "`python benchmarks/likelihood.py --only <part>` for each part, then `--merge`.\n\n")
        OUT.write_text(head + "\n".join(text))
        print(f"wrote {OUT.relative_to(ROOT)}")
        return
    start = time.perf_counter()
    lines = []
    for part in PARTS if args.only is None else (args.only,):
        title = {"budget": PART_HEADING[3:].rstrip(),
                 "networks": "Budget → |error| (nats per point), exact divergence: the shipped ring networks",
                 "hutchinson": "Hutchinson: standard error against cost",
                 "noise": "Budget → |error| (nats per point), exact divergence: a network that predicts the noise"}[part]
        threads = "one thread" if args.threads == 1 else f"{args.threads} threads"
        lines += [f"## {title}", "", f"{datetime.date.today()}, {threads}, float64 unless said, eps = {EPS:g}.", ""]
        if part == "budget":
            budget_table(lines, exact_problems(), args.problems)
        elif part == "networks":
            budget_table(lines, networks(), args.problems)
        elif part == "hutchinson":
            hutchinson_table(lines)
        else:
            noise_table(lines)
    lines.append(f"Total {time.perf_counter() - start:.0f} s.\n")
    out = OUT if args.only is None else part_file(args.only)
    out.write_text("\n".join(lines))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
