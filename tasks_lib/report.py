"""The lines a run prints at its end."""
from __future__ import annotations

from typing import Any

__all__ = ["summary"]


def summary(metrics: dict[str, Any]) -> str:
    """A few lines a person reads: what was drawn or trained, at what cost, and how good it is."""
    task = metrics["task"]
    if task == "export":
        return (f"exported {metrics['source']} ({metrics['sde']} on {metrics['data']}, step {metrics['train_steps']}, "
                f"{metrics['n_params']} parameters) as {metrics['format']}: {metrics['export']}")
    if task == "train":
        lines = [f"trained {metrics['model']} on {metrics['data']} with {metrics['sde']} for {metrics['steps']} steps: "
                 f"test loss {metrics['test_loss']:.4f}, test NLL {metrics['test_nll_nats']:.4f} nats, "
                 f"{metrics['test_bpd']:.4f} bits/dim"]
        if "kl_nats" in metrics:
            lines.append(f"exact NLL of the same points {metrics['data_nll_nats']:.4f} nats: "
                         f"KL(data || model) ~ {metrics['kl_nats']:.4f} nats")
        return "\n".join(lines)
    if task == "compare":
        return f"compared {metrics['n_rows']} sampler x budget runs on {metrics['data']} ({metrics['model']} model)"
    lines = [f"{metrics['sde']} on {metrics['data'] or 'no data'}, {metrics['model']} model"]
    if task == "sample":
        lines.append(f"{metrics['solver']}: {metrics['n_samples']} samples, {metrics['nfe']} NFE, "
                     f"{metrics['sample_seconds']:.2f} s")
        if "swd" in metrics:
            lines[-1] += (f"; sliced W1 to held-out data {metrics['swd']:.4f} (two held-out sets: "
                          f"{metrics['swd_floor']:.4f})")
        if "mode_weight_error" in metrics:
            lines[-1] += (f"; mode weights off by at most {metrics['mode_weight_error']:.3f}, "
                          f"spread {metrics['mode_spread_ratio']:.3f}x the data's")
        if "guidance" in metrics:
            lines[-1] += f"; guidance: {metrics['guidance']}"
        for key, what in (("label_accuracy", "share in the class asked for"), ("class_accuracy", "class accuracy"),
                          ("frechet_distance", "Frechet distance")):
            if key in metrics:
                lines[-1] += f"; {what} {metrics[key]:.3f}"
    if task == "inpaint":
        cost = f" ({metrics['particles']} particles)" if "particles" in metrics else ""
        how = metrics["method"] + (f" ({metrics['solver']})" if metrics["solver"] != metrics["method"] else "")
        lines.append(f"{how}: {metrics['n_samples']} completions of "
                     f"{metrics['mask']}, {metrics['nfe']} NFE{cost}, {metrics['inpaint_seconds']:.2f} s; "
                     f"RMSE to the hidden truth {metrics['rmse_unknown']:.4f}")
        if "exact_tv" in metrics:
            lines.append(f"against the exact conditional: mode weights off by {metrics['exact_tv']:.3f} in total "
                         f"variation (Monte-Carlo floor {metrics['exact_tv_floor']:.3f}), spread "
                         f"{metrics['exact_spread']:.3f}x")
    if "nll_nats" in metrics:
        line = (f"test NLL {metrics['nll_nats']:.4f} +- {metrics['nll_stderr_nats']:.4f} nats, "
                f"{metrics['bpd']:.4f} bits/dim ({metrics['n_eval']} points, {metrics['likelihood_nfe']} NFE, "
                f"{metrics['likelihood_seconds']:.2f} s)")
        if "nll_exact_nats" in metrics:
            line += f"; exact NLL {metrics['nll_exact_nats']:.4f}: KL(data || model) ~ {metrics['kl_nats']:.4f} nats"
        lines.append(line)
    if "note" in metrics:
        lines.append(metrics["note"])
    return "\n".join(lines)
