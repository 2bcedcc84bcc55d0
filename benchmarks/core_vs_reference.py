"""Our solvers against a reference-style baseline, side by side in one run, on an exact problem.

The problem is the 2-D ring of 8 Gaussians (``models.ring_mixture()``: σ = 0.3, radius 4)
under ``VPSDE()`` (β from 0.1 to 20), driven by its exact score ``models.MixtureScore``, so
the probability-flow ODE, its flow and log p_t are all known (docs/math.md §8).

The baseline re-implements, in this file, the algorithms of the code released with Song et al.
2021 ("Score-Based Generative Modeling through SDEs"), in float64:

* ODE sampler: ``scipy.integrate.solve_ivp(method="RK45")`` on the whole batch flattened into
  one numpy vector, integrating the PF-ODE drift f − ½ g² s_θ from T = 1 to eps = 1e-3; every
  drift evaluation converts numpy → torch → numpy (the host round-trip). NFE = ``sol.nfev``.
* Likelihood: the same integrator (rtol = atol = 1e-5) on the augmented state
  [x flattened, Δlog p] from eps = 1e-5 to T, with the Hutchinson divergence estimate from ONE
  Rademacher probe drawn once per solve; as in the reference, the drift and the divergence are
  separate calls (two score forwards per evaluation). log p = prior_logp(z) + Δlog p.

What is measured (all printed, and written to ``benchmarks/results/core_vs_reference.md``):

1. PF-ODE sampling of 1000 points from one fixed prior draw z, at rtol = atol ∈ {1e-3, 1e-4,
   1e-5}: NFE, wall time and the RMS error (over all samples and coordinates) against the exact
   flow, itself computed by our dopri8 at rtol = atol = 1e-10 in float64 and checked against
   rtol = atol = 1e-12; also the largest error of a single sample, since a few samples near the
   boundaries between modes, where the flow is most sensitive, dominate the RMS. Ours:
   ``solvers.sample(solver="pf_ode")`` (dopri5) in float32 and float64.
2. Log-likelihood of 1000 points drawn from the mixture: mean and max |error| in nats against
   the exact log p_eps(x) (what a user gets), and against the prior-corrected expectation
   log p_eps(x) − log p_T(z) + prior_logp(z) (what the integrator is responsible for, since
   every method puts the prior N(0, I) in place of the true p_T), with z each method's own
   latent; plus NFE and seconds. Ours: ``solvers.log_likelihood`` with the exact divergence
   (float32, float64) and with Hutchinson, one Rademacher probe (float64), like for like.
3. The predictor × corrector matrix of ``solvers.sample(solver="pc")`` over VP, sub-VP and VE:
   whether each pair runs, and the fraction of 500 samples within 3σ = 0.9 of a mode centre.

Ours also runs with the non-default ``error_norm`` (adaptive error measured as the batch RMS,
like scipy, or as the worst sample's RMS), so that the cost and the benefit of each are visible.

Torch runs on one thread (see TORCH_THREADS). Run from the repository root (about a minute)::

    python benchmarks/core_vs_reference.py
"""
from __future__ import annotations

import math
import pathlib
import time
from typing import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp

import solvers
from models import GaussianMixture, MixtureScore, ring_mixture
from sde_lib import SDE, SDES, VPSDE

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor, Tensor], Tensor]

SEED = 0
N_POINTS = 1000                     # batch size of the sampling and likelihood comparisons
SAMPLE_EPS = 1e-3                   # where PF-ODE sampling stops (docs/math.md §4)
LIKELIHOOD_EPS = 1e-5               # where the likelihood ODE starts
LIKELIHOOD_TOL = 1e-5               # rtol = atol of every likelihood solve
SAMPLE_TOLS = (1e-3, 1e-4, 1e-5)    # rtol = atol of the sampling comparison
EXACT_FLOW_TOLS = (1e-10, 1e-12)    # dopri8 tolerances of the exact flow and of its convergence check
PC_POINTS = 500
MODE_RADIUS = 0.9                   # 3σ of the ring's components
# Our variants: (row label, dtype, options). A missing error_norm means the solver's default.
OURS_SAMPLING = [
    ("ours dopri5 (float32)", torch.float32, {}),
    ("ours dopri5 (float64)", torch.float64, {}),
    ("ours dopri5, error_norm=sample (float64)", torch.float64, {"error_norm": "sample"}),
]
OURS_LIKELIHOOD = [
    ("ours dopri5, exact divergence (float32)", torch.float32, {"divergence": "exact"}),
    ("ours dopri5, exact divergence (float64)", torch.float64, {"divergence": "exact"}),
    ("ours dopri5, exact divergence, error_norm=batch (float64)", torch.float64,
     {"divergence": "exact", "error_norm": "batch"}),
    ("ours dopri5 + Hutchinson, 1 probe (float64)", torch.float64,
     {"divergence": "hutchinson", "probes": 1, "seed": SEED}),
    ("ours dopri5 + Hutchinson, 1 probe, error_norm=batch (float64)", torch.float64,
     {"divergence": "hutchinson", "probes": 1, "seed": SEED, "error_norm": "batch"}),
]
# The batches here are tiny (1000 × 2): torch's intra-op threads buy nothing on them, and on a
# loaded machine every parallel region waits for a descheduled thread, which made single ops
# 30–50× slower in trials. One thread keeps the timings about the solvers; it applies to the
# baseline and to ours alike.
TORCH_THREADS = 1
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "core_vs_reference.md"


# ---- the reference-style baseline ------------------------------------------------------------------

def reference_drift(sde: SDE, score_fn: ScoreFn, x: Tensor, t: Tensor) -> Tensor:
    """The PF-ODE drift f(x, t) − ½ g(t)² s_θ(x, t), built from the SDE's ``sde`` method as the reference does."""
    f, g = sde.sde(x, t)
    return f - 0.5 * (g**2)[:, None] * score_fn(x, t)


def reference_ode_sample(sde: SDE, score_fn: ScoreFn, z: Tensor, rtol: float, atol: float,
                         eps: float = SAMPLE_EPS) -> tuple[Tensor, int, float]:
    """Solve the PF-ODE from T to eps with scipy's RK45 over the flattened batch.

    Returns (samples (B, D) float64, scipy's nfev, seconds).
    """
    shape = z.shape

    def ode_func(t: float, y: np.ndarray) -> np.ndarray:
        # The host round-trip of the reference: numpy -> torch -> numpy on every evaluation.
        x = torch.tensor(y.reshape(shape), dtype=torch.float64)
        vec_t = torch.full((shape[0],), t, dtype=torch.float64)
        return reference_drift(sde, score_fn, x, vec_t).detach().numpy().reshape(-1)

    start = time.perf_counter()
    sol = solve_ivp(ode_func, (sde.T, eps), z.numpy().reshape(-1), method="RK45", rtol=rtol, atol=atol)
    seconds = time.perf_counter() - start
    if not sol.success:
        raise RuntimeError(f"reference RK45 failed: {sol.message}")
    return torch.tensor(sol.y[:, -1].reshape(shape)), sol.nfev, seconds


def reference_log_likelihood(sde: SDE, score_fn: ScoreFn, x: Tensor, eps: float = LIKELIHOOD_EPS,
                             rtol: float = LIKELIHOOD_TOL, atol: float = LIKELIHOOD_TOL,
                             seed: int = SEED) -> tuple[Tensor, Tensor, int, float]:
    """log p_eps(x) by RK45 on [x, Δlog p] from eps to T with a one-probe Hutchinson divergence.

    The Rademacher probe is drawn once per solve and held along the path, as in the reference.
    Returns (logp (B,) in nats, latent z (B, D), scipy's nfev, seconds).
    """
    shape, batch = x.shape, x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1

    def divergence(sample: Tensor, vec_t: Tensor) -> Tensor:
        with torch.enable_grad():
            sample = sample.clone().requires_grad_(True)
            out = reference_drift(sde, score_fn, sample, vec_t)
            grad = torch.autograd.grad((out * probe).sum(), sample)[0]
        return (grad * probe).flatten(1).sum(1)

    def ode_func(t: float, y: np.ndarray) -> np.ndarray:
        sample = torch.tensor(y[:-batch].reshape(shape), dtype=torch.float64)
        vec_t = torch.full((batch,), t, dtype=torch.float64)
        drift = reference_drift(sde, score_fn, sample, vec_t).detach().numpy().reshape(-1)
        div = divergence(sample, vec_t).detach().numpy()
        return np.concatenate([drift, div])

    start = time.perf_counter()
    init = np.concatenate([x.numpy().reshape(-1), np.zeros(batch)])
    sol = solve_ivp(ode_func, (eps, sde.T), init, method="RK45", rtol=rtol, atol=atol)
    seconds = time.perf_counter() - start
    if not sol.success:
        raise RuntimeError(f"reference RK45 failed: {sol.message}")
    end = sol.y[:, -1]
    z = torch.tensor(end[:-batch].reshape(shape))
    logp = sde.prior_logp(z) + torch.tensor(end[-batch:])
    return logp, z, sol.nfev, seconds


# ---- helpers -------------------------------------------------------------------------------------

def rms(a: Tensor, b: Tensor) -> float:
    """sqrt of the mean over all samples and coordinates of (a − b)², computed in float64."""
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def max_point_error(a: Tensor, b: Tensor) -> float:
    """The largest Euclidean distance between corresponding samples of a and b (B, D)."""
    return (a.double() - b.double()).flatten(1).norm(dim=1).max().item()


def run_ours(fn: Callable, *args, **kwargs) -> tuple[object, float]:
    """(fn(*args, **kwargs), wall-clock seconds)."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table of already-formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def warm_up(sde: SDE, score: MixtureScore) -> None:
    """One small call through every code path timed below, so that no timing pays first-call costs."""
    z = sde.prior_sampling((8, 2), generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        solvers.sample(sde, score, solver="pf_ode", z=z.to(dtype), rtol=1e-3, atol=1e-3)
        solvers.log_likelihood(sde, score, z.to(dtype), rtol=1e-3, atol=1e-3)
    solvers.log_likelihood(sde, score, z, rtol=1e-3, atol=1e-3, divergence="hutchinson", seed=SEED)
    reference_ode_sample(sde, score, z, 1e-3, 1e-3)
    reference_log_likelihood(sde, score, z, rtol=1e-3, atol=1e-3)


# ---- 1. PF-ODE sampling ----------------------------------------------------------------------------

def exact_flow(sde: SDE, score: MixtureScore, z64: Tensor) -> tuple[Tensor, str]:
    """The PF-ODE flow of z64 by our dopri8 at the tightest tolerances, with a note on its convergence."""
    tight, tighter = (solvers.sample(sde, score, solver="pf_ode", z=z64, method="dopri8", rtol=tol, atol=tol)
                      for tol in EXACT_FLOW_TOLS)
    note = (f"Exact flow: our dopri8 in float64 at rtol = atol = {EXACT_FLOW_TOLS[0]:g} ({tight.nfe} NFE); "
            f"its RMS distance to the rtol = atol = {EXACT_FLOW_TOLS[1]:g} solution ({tighter.nfe} NFE) is "
            f"{rms(tight.samples, tighter.samples):.1e}.")
    return tight.samples, note


def sampling_comparison(sde: SDE, score: MixtureScore) -> str:
    """Section 1: NFE, errors against the exact flow and seconds, baseline vs ours, per tolerance."""
    z64 = sde.prior_sampling((N_POINTS, 2), generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    target, note = exact_flow(sde, score, z64)
    rows = []
    for tol in SAMPLE_TOLS:
        x, nfe, seconds = reference_ode_sample(sde, score, z64, tol, tol)
        rows.append([f"{tol:g}", "reference RK45 (scipy, float64)", nfe, f"{rms(x, target):.2e}",
                     f"{max_point_error(x, target):.2e}", f"{seconds:.2f}"])
        for name, dtype, options in OURS_SAMPLING:
            result, seconds = run_ours(solvers.sample, sde, score, solver="pf_ode", z=z64.to(dtype), rtol=tol,
                                       atol=tol, **options)
            rows.append([f"{tol:g}", name, result.nfe, f"{rms(result.samples, target):.2e}",
                         f"{max_point_error(result.samples, target):.2e}", f"{seconds:.2f}"])
    table = markdown_table(["rtol = atol", "method", "NFE", "RMS error", "max point error", "seconds"], rows)
    return (f"## 1. PF-ODE sampling, {N_POINTS} points from one prior draw, T → eps = {SAMPLE_EPS:g}\n\n"
            f"{table}\n\n{note}\n\nRMS error: over all samples and coordinates; max point error: the largest "
            "Euclidean distance of one sample to its exact image. scipy's RK45 controls the RMS of the error over "
            "the whole flattened batch, as does torchdiffeq with error_norm='batch'.\n")


# ---- 2. likelihood --------------------------------------------------------------------------------

def likelihood_errors(sde: SDE, score: MixtureScore, x: Tensor, logp: Tensor, z: Tensor) -> tuple[float, ...]:
    """(mean, max) |error| vs the exact log p_eps(x), then (mean, max) vs the prior-corrected expectation.

    The expectation log p_eps(x) − log p_T(z) + prior_logp(z) uses the method's own latent z.
    """
    x, logp, z = x.double(), logp.double(), z.double()
    exact = score.log_prob(x, torch.full((len(x),), LIKELIHOOD_EPS, dtype=torch.float64))
    corrected = exact - score.log_prob(z, torch.full((len(z),), sde.T, dtype=torch.float64)) + sde.prior_logp(z)
    plain, prior = (logp - exact).abs(), (logp - corrected).abs()
    return plain.mean().item(), plain.max().item(), prior.mean().item(), prior.max().item()


def likelihood_comparison(sde: SDE, score: MixtureScore, mixture: GaussianMixture) -> str:
    """Section 2: errors in nats, NFE and seconds of the baseline and of our likelihood solves."""
    x64, _ = mixture.sample(N_POINTS, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    tol = LIKELIHOOD_TOL
    logp, z, nfe, seconds = reference_log_likelihood(sde, score, x64)
    runs = [("reference RK45 + Hutchinson, 1 probe (float64)", logp, z, nfe, seconds)]
    for name, dtype, options in OURS_LIKELIHOOD:
        result, seconds = run_ours(solvers.log_likelihood, sde, score, x64.to(dtype), eps=LIKELIHOOD_EPS, rtol=tol,
                                   atol=tol, **options)
        runs.append((name, result.logp, result.z, result.nfe, seconds))
    rows = []
    for name, logp, z, nfe, seconds in runs:
        errors = likelihood_errors(sde, score, x64, logp, z)
        rows.append([name, nfe, *(f"{e:.2e}" for e in errors), f"{seconds:.2f}"])
    header = ["method", "NFE", "mean abs err vs exact", "max abs err vs exact", "mean abs err vs prior-corrected",
              "max abs err vs prior-corrected", "seconds"]
    return (f"## 2. Log-likelihood of {N_POINTS} mixture samples, eps = {LIKELIHOOD_EPS:g}, rtol = atol = {tol:g} "
            f"(nats)\n\n{markdown_table(header, rows)}\n\n"
            "'vs exact' compares with log p_eps(x); 'vs prior-corrected' with "
            "log p_eps(x) − log p_T(z) + prior_logp(z), z being each method's latent, which removes the error of "
            "replacing p_T by the prior N(0, I). Rows without an error_norm use the solver's default. The "
            "reference's NFE counts scipy's evaluations, each of which makes two score forwards (drift, then "
            "divergence), as the released code does.\n")


# ---- 3. predictor × corrector matrix ---------------------------------------------------------------

def mode_fraction(samples: Tensor, mixture: GaussianMixture) -> float:
    """Fraction of samples within MODE_RADIUS of their nearest mode centre."""
    dist = torch.cdist(samples.double(), mixture.means).min(dim=1).values
    return (dist < MODE_RADIUS).double().mean().item()


def pc_matrix(mixture: GaussianMixture) -> str:
    """Section 3: every predictor × corrector pair on VP, sub-VP and VE: does it run, and how good is it."""
    rows, crashes = [], 0
    for sde in (cls() for cls in SDES.values()):
        score = MixtureScore(sde, mixture)
        for predictor in ("euler_maruyama", "reverse_diffusion", "ancestral"):
            for corrector in ("none", "langevin"):
                try:
                    result = solvers.sample(sde, score, (PC_POINTS, 2), solver="pc", predictor=predictor,
                                            corrector=corrector, seed=SEED)
                except Exception as err:  # a crash is a result here, recorded and counted
                    crashes += 1
                    rows.append([type(sde).__name__, predictor, corrector, f"crashed: {type(err).__name__}: {err}",
                                 "", "", ""])
                    continue
                rows.append([type(sde).__name__, predictor, corrector, "ran",
                             f"{mode_fraction(result.samples, mixture):.3f}", result.nfe, f"{result.seconds:.2f}"])
    header = ["SDE", "predictor", "corrector", "status", f"fraction within {MODE_RADIUS:g} of a mode", "NFE",
              "seconds"]
    return (f"## 3. Predictor × corrector matrix, {PC_POINTS} samples, seed {SEED}, N = 1000 steps\n\n"
            f"{markdown_table(header, rows)}\n\n"
            f"Crashed pairs: {crashes} of {len(rows)}. Exact draws fall within 3σ of their mode with probability "
            f"1 − e^(−4.5) = {1 - math.exp(-4.5):.3f} (2-D); the standard error at {PC_POINTS} samples is about "
            f"{math.sqrt(math.exp(-4.5) * (1 - math.exp(-4.5)) / PC_POINTS):.3f}. For context: the reference code "
            "crashes on sub-VP with the Langevin corrector and has no ancestral step for sub-VP.\n")


def main() -> None:
    """Run the three comparisons, print them and write them to RESULTS."""
    torch.set_num_threads(TORCH_THREADS)
    mixture = ring_mixture()
    sde = VPSDE()
    score = MixtureScore(sde, mixture)
    warm_up(sde, score)
    header = (f"# Core solvers vs a reference-style baseline\n\n"
              f"Ring of 8 Gaussians (σ = 0.3, radius 4), exact score, {type(sde).__name__}"
              f"(β {sde.beta_min:g}..{sde.beta_max:g}); torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads. Generated by `python benchmarks/core_vs_reference.py`.\n")
    sections = [header]
    for build in (lambda: sampling_comparison(sde, score), lambda: likelihood_comparison(sde, score, mixture),
                  lambda: pc_matrix(mixture)):
        sections.append(build())
        print(sections[-1], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(sections))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
