"""Checkpoints: one file format, written atomically, read strictly.

A checkpoint is a dict saved with ``torch.save`` and read with ``weights_only=True`` (tensors,
numbers, strings, lists and dicts only; nothing is unpickled that could run code):

- ``format``: the format tag below;
- ``model_spec``: what rebuilds the model without any config system: the SDE class and
  hyperparameters, the network kind, event shape and arguments, the parameterisation, σ_data;
- ``model``, ``ema``: state dicts of the training and the averaged weights;
- ``optimizer``, ``step``, ``rng``: what resuming needs;
- ``config``: the resolved run config, for the record;
- ``checksums``: a SHA-256 per tensor, verified on every read: a flipped byte is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import torch

import sde_lib
from core_lib import atomic_write
from models.errors import ModelError

__all__ = ["FORMAT", "CheckpointError", "save_checkpoint", "read_checkpoint", "export_checkpoint", "build_from_spec",
           "model_spec", "load_checkpoint", "LoadedModel", "TRAINING_KEYS", "checksums"]

FORMAT = "scoreflow-checkpoint-v1"
_REQUIRED = ("format", "model_spec", "ema", "step", "config")  # enough to sample; resuming needs TRAINING_KEYS too
TRAINING_KEYS = ("model", "ema_updates", "optimizer", "rng")


class CheckpointError(ModelError):
    """A checkpoint that is missing, unreadable, of another format or that does not fit its model."""


def _tensors(tree: Any, prefix: str = ""):
    """(dotted key, tensor) for every tensor in a nested dict/list, in a fixed order."""
    if torch.is_tensor(tree):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key in sorted(tree, key=str):
            yield from _tensors(tree[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, item in enumerate(tree):
            yield from _tensors(item, f"{prefix}.{i}")


def _digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    h = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    h.update(data.tobytes())
    return h.hexdigest()


def checksums(state: dict[str, Any]) -> dict[str, str]:
    """A SHA-256 per tensor of a checkpoint's state (everything but the checksums themselves)."""
    return {key: _digest(t) for key, t in _tensors({k: v for k, v in state.items() if k != "checksums"})}


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename), with a checksum per tensor.

    A crash at any moment leaves either the previous file or the new one, never a torn one; a full
    disk leaves the previous one and raises ``core_lib.OutputError``.
    """
    state = {"format": FORMAT, **{k: v for k, v in state.items() if k != "checksums"}}
    state["checksums"] = checksums(state)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint; a CheckpointError says what is wrong and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; give the path of a .pt file written by "
                              "`python run.py task=train` (its run directory holds checkpoints/last.pt).")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt, truncated or not written by "
                              f"this project: {type(err).__name__}); use another checkpoint or retrain.") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (found {found!r}); "
                              "use a checkpoint written by `python run.py task=train`.")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is incomplete: use another checkpoint.")
    stored = state.get("checksums")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path} carries no checksums, so its contents cannot be verified; use a checkpoint "
                              "written by this version (re-save an old one with models.checkpoint.save_checkpoint "
                              "after checking it).")
    actual = checksums(state)
    bad = sorted(k for k in set(stored) | set(actual) if stored.get(k) != actual.get(k))
    if bad:
        raise CheckpointError(f"{path} is corrupt: the contents of {', '.join(bad[:3])}"
                              f"{' and others' if len(bad) > 3 else ''} do not match their checksums; use the "
                              "previous checkpoint of the run (checkpoints/step_*.pt) or retrain.")
    return state


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Write a sampling-only copy of training checkpoint ``src`` to ``dst``: the spec, EMA weights, step and config.

    It is a quarter of the size (no raw weights, optimizer moments or RNG states), loads with
    :func:`load_checkpoint` like any checkpoint, and cannot be resumed from.
    """
    state = read_checkpoint(src)
    save_checkpoint(dst, {k: v for k, v in state.items() if k not in (*TRAINING_KEYS, "format", "checksums")})


def model_spec(model, data_info: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``model_spec`` for a ``ScoreModel`` built by ``build_score_model``: everything that rebuilds it.

    ``data_info`` is what the likelihood needs about the data: ``{"name", "levels", "data_range"}``.
    """
    net_spec = getattr(model.net, "spec", None)
    if net_spec is None:
        raise ModelError("the model's network was not built by models.build_network (it has no .spec), so a "
                         "checkpoint could not rebuild it; build it with models.build_score_model.")
    sde = model.sde
    return {
        "sde": {"class": type(sde).__name__, **sde.hparams()},
        "net": dict(net_spec),
        "parameterization": model.parameterization,
        "time_input": model.time_input,
        "sigma_data": model.sigma_data,
        "data": dict(data_info),
    }


def build_from_spec(spec: dict[str, Any]):
    """(sde, score model) rebuilt from a checkpoint's ``model_spec``, with freshly initialised weights."""
    from models.networks import build_score_model

    sde_spec = dict(spec["sde"])
    cls_name = sde_spec.pop("class")
    by_class = {cls.__name__: name for name, cls in sde_lib.SDES.items()}
    if cls_name not in by_class:
        raise CheckpointError(f"checkpoint names an unknown SDE class {cls_name!r} (known: {', '.join(by_class)}).")
    sde = sde_lib.get_sde(by_class[cls_name], **sde_spec)
    net_spec = dict(spec["net"])
    model = build_score_model(sde, net_spec.pop("kind"), tuple(net_spec.pop("event_shape")),
                              parameterization=spec["parameterization"], time_input=spec["time_input"],
                              sigma_data=spec["sigma_data"], **net_spec)
    return sde, model


@dataclasses.dataclass
class LoadedModel:
    """A trained model ready for ``solvers.sample`` and ``solvers.log_likelihood``.

    Attributes:
        sde: the forward SDE it was trained with.
        score_fn: the score model with the EMA weights, in eval mode: ``score_fn(x, t, **cond)``.
        config: the resolved config of the training run (a plain dict).
        step: the training step the checkpoint was written at.
        event_shape: the shape of one sample.
        data: what the likelihood needs about the data (levels, data_range), from training.
    """

    sde: sde_lib.SDE
    score_fn: torch.nn.Module
    config: dict
    step: int
    event_shape: tuple
    data: dict


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a training checkpoint: its SDE and its EMA score model (eval mode, no grad needed).

    Raises CheckpointError for a missing, corrupt or foreign file, or weights that do not fit the
    model the checkpoint describes (strict loading).
    """
    state = read_checkpoint(path, map_location=device)
    sde, model = build_from_spec(state["model_spec"])
    try:
        model.load_state_dict(state["ema"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"the EMA weights in {path} do not fit the model its spec describes "
                              f"({str(err).splitlines()[0]}); the file is inconsistent: use another checkpoint.") from None
    model.to(device).eval().requires_grad_(False)
    spec = state["model_spec"]
    return LoadedModel(sde=sde, score_fn=model, config=state["config"], step=int(state["step"]),
                       event_shape=tuple(spec["net"]["event_shape"]), data=dict(spec.get("data", {})))
