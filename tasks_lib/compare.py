"""``task=compare``: samplers side by side at several NFE budgets, from the same prior noise.

Every sampler starts from the same z (and the stochastic ones share the seed of their noise).
Rows report NFE as counted, wall time, the RMS distance to a tight adaptive PF-ODE solution
from the same z (deterministic samplers only: that is the flow they approximate), the sliced
Wasserstein distance to held-out data, for the ODE samplers the test NLL computed with the same
integrator and budget, and for ancestral sampling the variational bound of the same N-step chain:
the discrete model's likelihood beside the continuous one.

With ``guidance.*`` every row samples guided (``tasks_lib.model_source.resolve_guidance``), and
``task.guidance_scales`` adds a row per scale w (each measured against its own tight PF-ODE solution:
guidance changes the flow). Class-conditional rows are scored against held-out points of their classes
(``tasks_lib.sample.labelled_quality``); the likelihood columns, which score the model's own density of
unlabelled points, are left out of guided runs. On ``data=digits`` the shipped digits classifier scores every row
(``tasks_lib.sample.classifier_quality``): ``frechet_distance`` in its features to the held-out digits, and for
rows drawn for labels ``class_accuracy``, the share it assigns to them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from tqdm import tqdm

import solvers
from core_lib import UserError, distributed
from evaluation import RunOutput, data_log_likelihood, exact_nll, sample_on_ranks, scored_points, sliced_wasserstein
from tasks_lib.model_source import resolve_guidance, resolve_model
from tasks_lib.sample import (classifier_quality, digits_classifier, dtype_of, frechet_floor, header, labelled_quality,
                              quiet_guidance, write_config)

__all__ = ["PRESETS", "compare_task", "sampler_names"]

#: Compare entries beyond the registered solvers: a solver with fixed options.
PRESETS: dict[str, tuple[str, dict]] = {
    "pf_ode_euler": ("pf_ode", {"method": "euler"}),
    "pf_ode_midpoint": ("pf_ode", {"method": "midpoint"}),
    "pf_ode_rk4": ("pf_ode", {"method": "rk4"}),
}

ADAPTIVE_TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5)


def sampler_names() -> list[str]:
    """What ``task.samplers`` accepts: every registered solver and the presets."""
    return [*solvers.available(), *PRESETS]


def _entry(name: str) -> tuple[str, dict]:
    return PRESETS.get(name, (name, {}))


def _runs(name: str, budgets: list[int]) -> list[tuple[Optional[int], dict]]:
    """(steps, extra options) per run of sampler ``name``: one per budget, or one per tolerance if the solver is adaptive."""
    solver, options = _entry(name)
    per_step = solvers.get_solver(solver)(**options).nfe_per_step()
    if per_step is None:
        return [(None, {"rtol": tol, "atol": tol}) for tol in ADAPTIVE_TOLERANCES]
    return [(max(budget // per_step, 1), {}) for budget in budgets]


def compare_task(cfg: DictConfig, run_dir: Path, overridden: set[str]) -> dict[str, Any]:
    """Run every sampler of ``task.samplers`` at every budget of ``task.budgets``; write the table and the plot."""
    tc = cfg.task
    unknown = [s for s in tc.samplers if s not in sampler_names()]
    if unknown:
        raise UserError(f"task.samplers: unknown sampler(s) {', '.join(unknown)}; available: "
                        f"{', '.join(sampler_names())}.")
    out = RunOutput(run_dir)
    device, dtype = torch.device(cfg.device), dtype_of(cfg)
    model = resolve_model(cfg, overridden, device)
    sde, data = model.sde, model.data
    shape = (tc.n_samples, *data.event_shape)
    eps = solvers.resolve_eps(sde, tc.eps)
    scales = list(tc.guidance_scales) or [None]
    guidance = resolve_guidance(cfg, model, tc.n_samples, device, scales=scales)
    if guidance.warning:
        out.say(guidance.warning)
    guided = bool(guidance.describe())
    labelled = guidance.labels is not None and data.num_classes > 0 and data.num_classes == len(guidance.classes or ())
    with quiet_guidance():   # resolve_guidance's one line said it
        references = {w: sample_on_ranks(sde, model.score_fn, shape, solver="pf_ode", eps=eps, seed=cfg.seed,
                                         device=device, dtype=dtype, rtol=tc.reference_rtol, atol=tc.reference_rtol,
                                         **guidance.options(scale=w, device=device)) for w in scales}
    reference = references[scales[0]]
    z = reference.z
    test = data.test_points()
    lc = cfg.likelihood
    x_eval = test[:lc.n_eval].to(device=device, dtype=dtype)
    x_scored = scored_points(data, x_eval, cfg.seed)      # what data_log_likelihood scores, for the bound

    def quality(samples: torch.Tensor, floor: bool = False) -> dict[str, float]:
        """swd, against the held-out points of the samples' classes when labelled (then with label_accuracy)."""
        if labelled:
            return labelled_quality(samples.cpu(), guidance.labels, data, cfg.seed, floor=floor)
        return {"swd": sliced_wasserstein(samples, test, seed=cfg.seed)}

    # the floor, once: the rows' labels are all the same
    floor = (quality(reference.samples, floor=True)["swd_floor"] if labelled
             else sliced_wasserstein(data.decode(data.train[:tc.n_samples]), test, seed=cfg.seed))
    exact = exact_nll(data, x_scored)
    clf = digits_classifier(data, device)   # digits: the shipped classifier scores each row too
    fd_floor = frechet_floor(clf, data, tc.n_samples) if clf is not None else None

    rows = []
    runs = [(name, steps, extra, w) for name in tc.samplers for steps, extra in _runs(name, list(tc.budgets))
            for w in scales]
    for name, steps, extra, w in tqdm(runs, desc="compare", unit="run", dynamic_ncols=True, leave=False,
                                      disable=not distributed.is_main()):
        solver, options = _entry(name)
        options = {**options, **extra}
        instance = solvers.get_solver(solver)(**options)
        row: dict[str, Any] = {"sampler": name, "steps": steps if steps is not None else "",
                               "tolerance": extra.get("rtol", ""),
                               "guidance_scale": w if w is not None else guidance.scale if guidance.scale is not None
                               else ""}
        try:
            with quiet_guidance():
                result = sample_on_ranks(sde, model.score_fn, None, solver=solver, steps=steps, eps=eps, z=z,
                                         seed=cfg.seed, **options, **guidance.options(scale=w, device=device))
        except solvers.SolverError as err:  # e.g. a DDPM chain too short for VP's β_max
            rows.append({**row, "note": str(err)})
            continue
        samples = result.samples
        scored = quality(samples)
        row.update(nfe=result.nfe, seconds=result.seconds, swd=scored["swd"])
        if "label_accuracy" in scored:
            row["label_accuracy"] = scored["label_accuracy"]
        if clf is not None:
            row.update(classifier_quality(clf, samples, data, guidance.labels if labelled else None))
        if instance.deterministic:   # the PF-ODE's solvers: their target is the flow
            row["ode_error_rms"] = (samples - references[w].samples).flatten(1).pow(2).sum(1).mean().sqrt().item()
        lik_options = None if guided else instance.likelihood_options(steps)
        if lik_options is not None:   # the same integrator and budget on the likelihood's ODE
            lik, _ = data_log_likelihood(sde, model.score_fn, data, x_eval, cfg.seed, eps=lc.eps,
                                         divergence=lc.divergence, probes=lc.probes, **lik_options)
            row["nll_nats"] = -lik.logp.double().mean().item()
            row["bpd"] = lik.bpd.double().mean().item()
        bound_options = None if guided else instance.bound_options()
        if bound_options is not None:
            # The model as a discrete chain of the row's N steps: DDPM's variational bound (docs/math.md §7),
            # computed whole on every rank of a torchrun job (it is a small share of the row's cost).
            try:
                bound = solvers.variational_bound(sde.with_steps(steps), model.score_fn, x_scored, seed=cfg.seed,
                                                  levels=data.levels, data_range=data.data_range, **bound_options)
                row["bound_nats"] = bound.nll.double().mean().item()
                row["bound_bpd"] = bound.bpd.double().mean().item()
            except solvers.SolverError as err:  # sub-VP's chain has a noiseless first step
                row["note"] = f"no bound: {err}"
        if data.mixture is not None and guidance.labels is None:   # labelled rows report label_accuracy instead
            row["mode_weight_error"] = data.mixture.mode_report(samples)[0]
        rows.append(row)

    write_config(out, cfg, model)
    columns = ["sampler", "steps", "tolerance", "guidance_scale", "nfe", "seconds", "ode_error_rms", "swd",
               "mode_weight_error", "label_accuracy", "class_accuracy", "frechet_distance", "nll_nats", "bpd", "bound_nats", "bound_bpd", "note"]
    out.write_csv("compare.csv", rows, columns)
    out.write_text("compare.md", _markdown(rows, columns, cfg, model, floor, reference.nfe, exact,
                                           guidance.describe(scales[0] if len(scales) == 1 else None), fd_floor))
    title = f"{type(sde).__name__} on {data.name} ({model.source} model)"
    out.write_figure("compare.png", _plot, rows, floor, title + (f", {guidance.describe()}" if guided else ""))
    metrics = {**header(cfg, model), "n_samples": tc.n_samples, "n_rows": len(rows), "swd_floor": floor,
               "reference_nfe": reference.nfe, **({"nll_exact_nats": exact} if exact is not None else {}),
               **({"guidance": guidance.describe()} if guided else {}),
               **({"frechet_floor": fd_floor} if fd_floor is not None else {})}
    return out.metrics(metrics)


def _fmt(value: Any) -> str:
    if value == "" or value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _markdown(rows, columns, cfg, model, floor: float, reference_nfe: int, exact_nll: Optional[float],
              guidance: str = "", fd_floor: Optional[float] = None) -> str:
    guided = ("" if not guidance and not cfg.task.guidance_scales else
              f"Guided: {guidance or 'see guidance_scale'} (guidance_scale: classifier-free w). swd is measured against "
              "held-out points of the samples' classes; label_accuracy: the share of samples whose most probable "
              "component is their label. The likelihood columns are left out of guided runs.\n\n")
    head = (f"# Samplers compared: {type(model.sde).__name__} on {model.data.name}, {model.source} model\n\n"
            f"{cfg.task.n_samples} samples per row, all from the same prior noise (seed {cfg.seed}). "
            f"ode_error_rms: RMS distance to the dopri5 PF-ODE solution at rtol = atol = {cfg.task.reference_rtol} "
            f"({reference_nfe} NFE) from the same noise. swd: sliced Wasserstein-1 distance to held-out data "
            f"(two held-out sets of this size: {floor:.3g}). nll_nats: test NLL through the ODE with the row's "
            f"integrator and budget, bound_nats: the variational bound of the row's N-step chain (DDPM's L, one draw per "
            f"step; {cfg.likelihood.n_eval} points"
            + (f"; their exact NLL: {exact_nll:.4f}" if exact_nll is not None else "") + ").\n\n")
    head += guided
    if fd_floor is not None:
        head += ("frechet_distance: the Fréchet distance in the features of the shipped digits classifier to the "
                 f"{len(model.data.test)} held-out digits (as many training digits: {fd_floor:.3g}); class_accuracy: "
                 "the share of samples it assigns to the label they were drawn for.\n\n")
    legend = "".join(f"- `{name}`: {_label(name)}\n" for name in dict.fromkeys(r["sampler"] for r in rows))
    shown = [c for c in columns if any(r.get(c, "") != "" for r in rows)]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in shown) + " |" for r in rows]
    return head + legend + "\n" + "\n".join(lines) + "\n"


def _label(name: str) -> str:
    """What a compare entry is, from its solver's own label (and the preset's options)."""
    solver, options = _entry(name)
    label = solvers.get_solver(solver).label or solver
    return label + "".join(f", {k}={v}" for k, v in options.items())


def _plot(path: Path, rows, floor: float, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (quality, error) = plt.subplots(1, 2, figsize=(11, 4.5))
    swept = len({r.get("guidance_scale", "") for r in rows}) > 1
    for name, w in dict.fromkeys((r["sampler"], r.get("guidance_scale", "")) for r in rows):
        done = sorted((r for r in rows if r["sampler"] == name and r.get("guidance_scale", "") == w and "nfe" in r),
                      key=lambda r: r["nfe"])
        if not done:
            continue
        label = f"{name}, w={w:g}" if swept else name
        line = quality.plot([r["nfe"] for r in done], [r["swd"] for r in done], "o-", label=label)[0]
        if "ode_error_rms" in done[0]:
            error.plot([r["nfe"] for r in done], [r["ode_error_rms"] for r in done], "o-", label=label,
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
