"""Checkpoints: one file format, written atomically, read strictly.

A checkpoint is a dict saved with ``torch.save`` and read with ``weights_only=True`` (tensors,
numbers, strings, lists and dicts only; nothing is unpickled that could run code):

- ``format``: the format tag below;
- ``model_spec``: what rebuilds the model without any config system: the SDE class and
  hyperparameters, the network kind, event shape and arguments (``num_classes`` for a class-conditional
  one), the parameterisation, σ_data, and for a conditional model ``labels``: its class names and the
  label dropout it was trained with;
- ``model``, ``ema``: state dicts of the training and the averaged weights;
- ``optimizer``, ``step``, ``rng``: what resuming needs;
- ``config``: the resolved run config, for the record;
- ``checksums``: a SHA-256 per tensor, verified on every read: a flipped byte is refused.

A sampling-only **export** (:func:`export_checkpoint` with ``format="safetensors"``) is a directory
in the layout of diffusers' ``save_pretrained``: ``model.safetensors`` holds the EMA weights under
their ``state_dict`` names, ``config.json`` the format tag :data:`EXPORT_FORMAT`, ``model_spec``,
``step``, ``config`` and a SHA-256 per weight. :func:`read_checkpoint` (so :func:`load_checkpoint`
and every ``ckpt=``) reads the directory, its ``model.safetensors`` or a ``.pt`` alike.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

import sde_lib
from core_lib import OutputError, atomic_write
from models.errors import ModelError

__all__ = ["FORMAT", "EXPORT_FORMAT", "EXPORT_FORMATS", "CheckpointError", "save_checkpoint", "read_checkpoint",
           "export_checkpoint", "build_from_spec", "model_spec", "load_checkpoint", "LoadedModel", "TRAINING_KEYS",
           "checksums"]

FORMAT = "scoreflow-checkpoint-v1"
EXPORT_FORMAT = "scoreflow-export-v1"    # the tag in an export directory's config.json
EXPORT_FORMATS = ("safetensors", "pt")   # what export_checkpoint writes: a directory, or one .pt file
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
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
    """Read and validate a checkpoint; a CheckpointError says what is wrong and what to do.

    ``path`` is a .pt file, or an export directory (``export_checkpoint(..., format="safetensors")``) or
    its ``model.safetensors``, read as the state of a .pt export: format, model_spec, ema, step, config.
    """
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return _read_export(path, map_location)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; give the path of a .pt file written by "
                              "`python run.py task=train` (its run directory holds checkpoints/last.pt), or "
                              "a directory written by `python run.py task=export`.")
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


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, format: str = "pt") -> Path:
    """Write a sampling-only copy of checkpoint ``src`` to ``dst``: the spec, EMA weights, step and config.

    ``format="pt"``: one checkpoint file ``dst``. ``format="safetensors"``: a directory ``dst`` holding
    ``model.safetensors`` (the EMA weights, under their ``state_dict`` names) and ``config.json`` (the tag
    :data:`EXPORT_FORMAT`, ``model_spec``, ``step``, ``config`` and a SHA-256 per weight), never half-written
    (:func:`_write_export`). Either is a quarter of the size of a training checkpoint (no raw weights,
    optimizer moments or RNG states), loads with :func:`load_checkpoint` into the same model bit for bit,
    and cannot be resumed from. Returns ``dst``.
    """
    if format not in EXPORT_FORMATS:
        raise CheckpointError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}.")
    state, dst = read_checkpoint(src), Path(dst)
    if format == "pt":
        save_checkpoint(dst, {k: v for k, v in state.items() if k not in (*TRAINING_KEYS, "format", "checksums")})
        return dst
    # own storage per tensor: safetensors refuses tensors that share memory
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in state["ema"].items()}
    config = {"format": EXPORT_FORMAT, "model_spec": state["model_spec"], "step": int(state["step"]),
              "config": state["config"], "checksums": {k: _digest(v) for k, v in weights.items()}}
    _write_export(dst, weights, config)
    return dst


def _write_export(dst: Path, weights: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """model.safetensors, then config.json, into the directory ``dst``, so that no reader meets half a pair.

    A new directory is filled under a temporary name beside it and renamed into place. An existing export
    is replaced file by file (each atomic), config.json last: a crash between the two leaves weights that
    do not match config.json's checksums, which :func:`read_checkpoint` refuses.
    """
    def fill(folder: Path) -> None:
        # save() into bytes, not save_file(): that one recreates the file 0600, losing atomic_write's mode
        blob = save(weights, metadata={"format": "pt"})   # "pt": the tag transformers and diffusers check
        atomic_write(folder / WEIGHTS_FILE, lambda tmp: Path(tmp).write_bytes(blob))
        atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))

    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} is a file, and a safetensors export is a directory; choose another path.")
    if dst.is_dir() and any(dst.iterdir()):
        if _export_tag(dst / CONFIG_FILE) != EXPORT_FORMAT:
            raise CheckpointError(f"{dst} is a directory that holds something other than an export; choose a new "
                                  "(or empty) directory for it.")
        fill(dst)
        return
    staging = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    try:
        shutil.rmtree(staging, ignore_errors=True)   # left by an attempt of a process with the same id
        staging.mkdir(parents=True)
    except OSError as err:
        raise OutputError(f"cannot write into {dst.parent} ({err.strerror}); choose a writable directory.") from None
    try:
        fill(staging)
        os.replace(staging, dst)   # dst absent or empty: the rename takes its place
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _export_tag(config_path: Path) -> Any:
    """The ``format`` of an export's config.json, or None if it is missing or not a JSON object."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config.get("format") if isinstance(config, dict) else None


def _read_export(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """An export directory, or its weights file, as the state of a .pt export, checked against config.json."""
    folder, weights_path = (path, path / WEIGHTS_FILE) if path.is_dir() else (path.parent, path)
    config_path = folder / CONFIG_FILE
    again = "export it again (`python run.py task=export ckpt=<run dir>/checkpoints/last.pt`)"
    if not weights_path.is_file():
        raise CheckpointError(f"no checkpoint at {weights_path}; give an export directory written by "
                              "`python run.py task=export` (model.safetensors and config.json) or a .pt checkpoint.")
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE} beside {weights_path.name}, so no model can be built "
                              f"for its weights; {again}.")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_path} is not readable JSON ({type(err).__name__}); {again}.") from None
    found = config.get("format") if isinstance(config, dict) else type(config).__name__
    if found != EXPORT_FORMAT:
        raise CheckpointError(f"{config_path} is not a {EXPORT_FORMAT} export (found format {found!r}); {again}.")
    missing = [k for k in ("model_spec", "step", "config", "checksums") if k not in config]
    if missing:
        raise CheckpointError(f"{config_path} lacks {', '.join(missing)}; the export is incomplete: {again}.")
    try:
        ema = load_file(weights_path, device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file (corrupt, truncated or of another "
                              f"format: {str(err).splitlines()[0][:120]}); {again}.") from None
    stored = config["checksums"] if isinstance(config["checksums"], dict) else {}
    actual = {k: _digest(t) for k, t in ema.items()}
    bad = sorted(k for k in set(stored) | set(actual) if stored.get(k) != actual.get(k))
    if bad:
        raise CheckpointError(f"{weights_path} does not match {config_path}: {', '.join(bad[:3])}"
                              f"{' and others' if len(bad) > 3 else ''} differ from their checksums (a corrupt file, "
                              f"or the weights of another export); {again}.")
    return {"format": EXPORT_FORMAT, "model_spec": config["model_spec"], "ema": ema, "step": config["step"],
            "config": config["config"]}


def model_spec(model, data_info: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``model_spec`` for a ``ScoreModel`` built by ``build_score_model``: everything that rebuilds it.

    ``data_info`` is what the likelihood needs about the data: ``{"name", "levels", "data_range"}``.
    """
    net_spec = getattr(model.net, "spec", None)
    if net_spec is None:
        raise ModelError("the model's network was not built by models.build_network (it has no .spec), so a "
                         "checkpoint could not rebuild it; build it with models.build_score_model.")
    sde = model.sde
    spec = {
        "sde": {"class": type(sde).__name__, **sde.hparams()},
        "net": dict(net_spec),
        "parameterization": model.parameterization,
        "time_input": model.time_input,
        "sigma_data": model.sigma_data,
        "data": dict(data_info),
    }
    if getattr(model, "conditional", False):   # an unconditional model's spec is that of before labels existed
        classes = getattr(model, "classes", None)
        dropout = getattr(model, "label_dropout", None)
        spec["labels"] = {"classes": None if classes is None else [str(c) for c in classes],
                          "label_dropout": None if dropout is None else float(dropout)}
    return spec


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
    labels = spec.get("labels") or {}
    classes = labels.get("classes")
    if classes is not None and len(classes) != model.num_classes:
        raise CheckpointError(f"the model_spec names {len(classes)} classes for a network of num_classes="
                              f"{model.num_classes}; the checkpoint is inconsistent: use another one.")
    model.classes = None if classes is None else tuple(str(c) for c in classes)
    model.label_dropout = None if labels.get("label_dropout") is None else float(labels["label_dropout"])
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
    """Load a checkpoint: its SDE and its EMA score model (eval mode, no grad needed).

    ``path`` is a .pt checkpoint, or an export directory or its ``model.safetensors`` (:func:`export_checkpoint`).
    Raises CheckpointError for a missing, corrupt or foreign file, a spec that builds no model, or weights
    that do not fit the model the checkpoint describes (strict loading).
    """
    state = read_checkpoint(path, map_location=device)
    try:
        sde, model = build_from_spec(state["model_spec"])
    except CheckpointError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as err:   # ModelError and the SDEs' errors included
        raise CheckpointError(f"the model_spec in {path} describes no model this version builds ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else err!r}); use another checkpoint.") from None
    try:
        model.load_state_dict(state["ema"], strict=True)
    except RuntimeError as err:
        first = " ".join(line.strip() for line in str(err).splitlines()[:2])   # "Error(s) in ...:", the first one
        raise CheckpointError(f"the EMA weights in {path} do not fit the model its spec describes ({first}); the file "
                              "is inconsistent: use another checkpoint.") from None
    model.to(device).eval().requires_grad_(False)
    spec = state["model_spec"]
    return LoadedModel(sde=sde, score_fn=model, config=state["config"], step=int(state["step"]),
                       event_shape=tuple(spec["net"]["event_shape"]), data=dict(spec.get("data", {})))
