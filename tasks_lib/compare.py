"""``task=compare``: samplers side by side at several NFE budgets, from the same prior noise.

Every sampler starts from the same z (and the stochastic ones share the seed of their noise).
Rows report NFE as counted, wall time, the RMS distance to a tight adaptive PF-ODE solution
from the same z (deterministic samplers only: that is the flow they approximate), the sliced
Wasserstein distance to held-out data, for the ODE samplers the test NLL computed with the same
integrator and budget, and for ancestral sampling the variational bound of the same N-step chain:
the discrete model's likelihood beside the continuous one.
"""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from tqdm import tqdm

import solvers
from solvers.base import resolve_eps
from tasks_lib.metrics import sliced_wasserstein
from tasks_lib.model_source import resolve_model
from tasks_lib.sample import RunFiles, dtype_of
from training.loop import data_log_likelihood, scored_points

__all__ = ["SAMPLERS", "Sampler", "compare_task"]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A compare entry: a registered solver with fixed options, and the score evaluations one of its steps makes."""

    solver: str
    options: dict = dataclasses.field(default_factory=dict)
    nfe_per_step: Optional[int] = 1   # None: adaptive (the budget is set by tolerances instead)
    label: str = ""


SAMPLERS: dict[str, Sampler] = {
    "ancestral": Sampler("ancestral", label="ancestral sampling (DDPM / SMLD)"),
    "reverse_diffusion": Sampler("reverse_diffusion", label="reverse diffusion"),
    "euler_maruyama": Sampler("euler_maruyama", label="reverse SDE, Euler-Maruyama"),
    "pc": Sampler("pc", nfe_per_step=2, label="predictor-corrector (reverse diffusion + Langevin)"),
    "ald": Sampler("ald", nfe_per_step=1, label="annealed Langevin dynamics"),
    "ddim": Sampler("ddim", label="DDIM (eta = 0): PF-ODE, first-order exponential integrator"),
    "multistep": Sampler("multistep", label="PF-ODE, multistep exponential integrator (order 4 + corrector)"),
    "heun": Sampler("heun", nfe_per_step=2, label="PF-ODE, Heun on EDM's grid"),
    "multistep_adaptive": Sampler("multistep_adaptive", nfe_per_step=None, label="PF-ODE, adaptive multistep"),
    "pf_ode_euler": Sampler("pf_ode", {"method": "euler"}, 1, "PF-ODE, Euler"),
    "pf_ode_midpoint": Sampler("pf_ode", {"method": "midpoint"}, 2, "PF-ODE, midpoint"),
    "pf_ode_rk4": Sampler("pf_ode", {"method": "rk4"}, 4, "PF-ODE, RK4"),
    "pf_ode": Sampler("pf_ode", {"method": "dopri5"}, None, "PF-ODE, adaptive dopri5"),
}

ADAPTIVE_TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5)


def _runs(name: str, budgets: list[int]) -> list[tuple[Optional[int], dict]]:
    """(steps, extra options) per run of sampler ``name``: one per budget, or one per tolerance if adaptive."""
    entry = SAMPLERS[name]
    if entry.nfe_per_step is None:
        return [(None, {"rtol": tol, "atol": tol}) for tol in ADAPTIVE_TOLERANCES]
    return [(max(budget // entry.nfe_per_step, 1), {}) for budget in budgets]


def compare_task(cfg: DictConfig, run_dir: Path, overridden: set[str]) -> dict[str, Any]:
    """Run every sampler of ``task.samplers`` at every budget of ``task.budgets``; write the table and the plot."""
    tc = cfg.task
    unknown = [s for s in tc.samplers if s not in SAMPLERS]
    if unknown:
        raise ValueError(f"unknown sampler(s) {', '.join(unknown)} in task.samplers; available: {', '.join(SAMPLERS)}.")
    if not tc.budgets or any(b < 1 for b in tc.budgets):
        raise ValueError(f"task.budgets must be positive NFE counts, got {list(tc.budgets)}.")
    files = RunFiles(run_dir)
    device, dtype = torch.device(cfg.device), dtype_of(cfg)
    model = resolve_model(cfg, overridden, device)
    sde, data = model.sde, model.data
    shape = (tc.n_samples, *data.event_shape)
    eps = resolve_eps(sde, tc.eps)
    reference = solvers.sample(sde, model.score_fn, shape, solver="pf_ode", eps=eps, seed=cfg.seed, device=device,
                               dtype=dtype, rtol=tc.reference_rtol, atol=tc.reference_rtol)
    z = reference.z
    test = data.test
    lc = cfg.likelihood
    x_eval = test[:lc.n_eval].to(device=device, dtype=dtype)
    x_scored = scored_points(data, x_eval, cfg.seed)      # what data_log_likelihood scores, for the bound
    floor = sliced_wasserstein(data.train[:tc.n_samples], test, seed=cfg.seed)
    exact_nll = None
    if data.mixture is not None and data.levels is None:
        exact_nll = -data.mixture.log_prob(x_eval.double()).mean().item()

    rows = []
    runs = [(name, steps, extra) for name in tc.samplers for steps, extra in _runs(name, list(tc.budgets))]
    for name, steps, extra in tqdm(runs, desc="compare", unit="run", dynamic_ncols=True, leave=False):
        entry = SAMPLERS[name]
        options = {**entry.options, **extra}
        row: dict[str, Any] = {"sampler": name, "steps": steps if steps is not None else "",
                               "tolerance": extra.get("rtol", "")}
        try:
            result = solvers.sample(sde, model.score_fn, solver=entry.solver, steps=steps, eps=eps, z=z,
                                    seed=cfg.seed, **options)
        except solvers.SolverError as err:  # e.g. a DDPM chain too short for VP's β_max
            rows.append({**row, "note": str(err)})
            continue
        samples = result.samples
        row.update(nfe=result.nfe, seconds=result.seconds, swd=sliced_wasserstein(samples, test, seed=cfg.seed))
        if not solvers.get_solver(entry.solver).stochastic:   # the PF-ODE's solvers: their target is the flow
            row["ode_error_rms"] = (samples - reference.samples).flatten(1).pow(2).sum(1).mean().sqrt().item()
        if entry.solver == "pf_ode":
            lik_options = {"method": options["method"], "steps": steps} if steps else {"rtol": extra["rtol"],
                                                                                        "atol": extra["atol"]}
            lik, _ = data_log_likelihood(sde, model.score_fn, data, x_eval, cfg.seed, eps=lc.eps,
                                         divergence=lc.divergence, probes=lc.probes, **lik_options)
            row["nll_nats"] = -lik.logp.double().mean().item()
            row["bpd"] = lik.bpd.double().mean().item()
        if entry.solver == "ancestral":
            # The model as a discrete chain of the row's N steps: DDPM's variational bound (MATH.md §7).
            try:
                bound = solvers.variational_bound(sde.with_steps(steps), model.score_fn, x_scored, seed=cfg.seed,
                                                  variance=options.get("variance"), levels=data.levels,
                                                  data_range=data.data_range)
                row["bound_nats"] = bound.nll.double().mean().item()
                row["bound_bpd"] = bound.bpd.double().mean().item()
            except solvers.SolverError as err:  # sub-VP's chain has a noiseless first step
                row["note"] = f"no bound: {err}"
        if data.mixture is not None:
            row["mode_weight_error"] = data.mixture.mode_report(samples)[0]
        rows.append(row)

    files.write_config(cfg, model)
    columns = ["sampler", "steps", "tolerance", "nfe", "seconds", "ode_error_rms", "swd", "mode_weight_error",
               "nll_nats", "bpd", "bound_nats", "bound_bpd", "note"]
    with open(files.path("compare.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    files.path("compare.md").write_text(_markdown(rows, columns, cfg, model, floor, reference.nfe, exact_nll))
    _plot(files.path("compare.png"), rows, floor, f"{type(sde).__name__} on {data.name} ({model.source} model)")
    metrics = {"task": "compare", "sde": type(sde).__name__, "data": data.name, "model": model.source,
               "seed": cfg.seed, "n_samples": tc.n_samples, "n_rows": len(rows), "swd_floor": floor,
               "reference_nfe": reference.nfe, **({"nll_exact_nats": exact_nll} if exact_nll is not None else {})}
    files.write_metrics(metrics)
    return metrics


def _fmt(value: Any) -> str:
    if value == "" or value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _markdown(rows, columns, cfg, model, floor: float, reference_nfe: int, exact_nll: Optional[float]) -> str:
    head = (f"# Samplers compared: {type(model.sde).__name__} on {model.data.name}, {model.source} model\n\n"
            f"{cfg.task.n_samples} samples per row, all from the same prior noise (seed {cfg.seed}). "
            f"ode_error_rms: RMS distance to the dopri5 PF-ODE solution at rtol = atol = {cfg.task.reference_rtol} "
            f"({reference_nfe} NFE) from the same noise. swd: sliced Wasserstein-1 distance to held-out data "
            f"(two held-out sets of this size: {floor:.3g}). nll_nats: test NLL through the ODE with the row's "
            f"integrator and budget, bound_nats: the variational bound of the row's N-step chain (DDPM's L, one draw per "
            f"step; {cfg.likelihood.n_eval} points"
            + (f"; their exact NLL: {exact_nll:.4f}" if exact_nll is not None else "") + ").\n\n")
    shown = [c for c in columns if any(r.get(c, "") != "" for r in rows)]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in shown) + " |" for r in rows]
    return head + "\n".join(lines) + "\n"


def _plot(path: Path, rows, floor: float, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (quality, error) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in dict.fromkeys(r["sampler"] for r in rows):
        done = sorted((r for r in rows if r["sampler"] == name and "nfe" in r), key=lambda r: r["nfe"])
        if not done:
            continue
        line = quality.plot([r["nfe"] for r in done], [r["swd"] for r in done], "o-", label=name)[0]
        if "ode_error_rms" in done[0]:
            error.plot([r["nfe"] for r in done], [r["ode_error_rms"] for r in done], "o-", label=name,
                       color=line.get_color())
    quality.axhline(floor, color="gray", ls="--", lw=1, label="two held-out sets")
    quality.set(xscale="log", yscale="log", xlabel="NFE", ylabel="sliced W1 to held-out data",
                title="sample quality")
    error.set(xscale="log", yscale="log", xlabel="NFE", ylabel="RMS distance to the exact flow",
              title="PF-ODE samplers: error against the tight solution")
    quality.legend(fontsize=7)
    error.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
