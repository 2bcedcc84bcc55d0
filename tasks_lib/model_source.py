"""Which score model a task uses: a shipped pretrained one, the data's exact score, a checkpoint, or a diffusers model.

``ckpt=pretrained`` (the default) picks the model this project trained and ships for the data and
SDE (``models/pretrained/<data>_<sde>.pt``; ``python benchmarks/train_quality.py --export`` recreates them).
``ckpt=exact`` uses the exact score of a Gaussian-mixture data set. ``ckpt=PATH`` loads a training
checkpoint. A checkpoint brings its own SDE, network and data; settings given on the command line
apply only where they agree with it (``sde.N``, the number of discretisation steps, is free; data
of the same shape may replace the training data), and a contradiction is refused.
``ckpt=diffusers:DIR`` converts a diffusers pipeline directory (``models.from_diffusers``): its scheduler
gives the SDE (only ``sde.N`` may change), its UNet the score; it has no data, so ``data=`` of its shape
gives the held-out points, which ``task=likelihood`` and ``task=compare`` need.

:func:`resolve_guidance` turns ``guidance.*`` into the labels and guidance options of a solve, checked
against the model once it is loaded (its classes, whether it is conditional, its label dropout).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from core_lib import UserError, build_options
from data_lib import Dataset
from evaluation import load_data
from models import MixtureScore, load_checkpoint
from models.from_diffusers import PipelineInfo, inspect_pipeline, load_pipeline
from sde_lib import SDE, sde_name
from tasks_lib.schema import GuidanceConfig, model_schema

__all__ = ["ResolvedModel", "resolve_model", "build_sde", "PRETRAINED_DIR", "pretrained_path", "shipped_checkpoint",
           "overridden_keys", "keys_in", "diffusers_request", "DIFFUSERS_PREFIX", "Guidance", "resolve_guidance"]

PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "models" / "pretrained"
#: ``ckpt=diffusers:DIR``: a pipeline directory written by diffusers' ``save_pretrained`` (or a Hub id).
DIFFUSERS_PREFIX = "diffusers:"


@dataclasses.dataclass
class ResolvedModel:
    """The score model a task runs on, with its SDE and data.

    Attributes:
        sde: the SDE to sample and score with (the checkpoint's, with ``sde.N`` if given).
        score_fn: ``score_fn(x, t, **cond)``.
        data: the data set whose held-out split is scored; None for a diffusers model given no ``data=``.
        source: "pretrained", "exact", "checkpoint" or "diffusers".
        path: the checkpoint file or pipeline directory (None for the exact score).
        train_steps: training steps of the checkpoint (None for the exact score and a diffusers model).
        event_shape: the shape of one sample (default: the data's).
    """

    sde: SDE
    score_fn: Callable
    data: Optional[Dataset]
    source: str
    path: Optional[str] = None
    train_steps: Optional[int] = None
    event_shape: Optional[tuple] = None

    def __post_init__(self):
        if self.event_shape is None:
            self.event_shape = self.data.event_shape


def pretrained_path(data_name: str, sde_choice: str) -> Path:
    return PRETRAINED_DIR / f"{data_name}_{sde_choice}.pt"


def shipped_checkpoint(data_name: str, sde_choice: str, fix: str) -> Path:
    """The shipped model of the data and SDE, or a UserError listing what is shipped and ending with ``fix``."""
    path = pretrained_path(data_name, sde_choice)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in PRETRAINED_DIR.glob("*.pt"))) or "none"
        raise UserError(f"no pretrained model for data={data_name} with sde={sde_choice} (shipped: {shipped}); {fix}")
    return path


def overridden_keys(overrides: Iterable[str]) -> set[str]:
    """The config keys set by command-line overrides ("sde=ve", "+data.key=x" → {"sde", "data.key"})."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}


def build_sde(sde_cfg: DictConfig) -> SDE:
    """The SDE a ``sde`` config section describes; bad hyperparameters are the SDE's own one-line error."""
    try:
        return instantiate(sde_cfg)
    except InstantiationException as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, UserError):
            raise cause from None
        raise


def keys_in(overridden: set[str], group: str) -> list[str]:
    """The command line's keys in ``group`` (the group's choice or one of its settings), sorted."""
    return sorted(k for k in overridden if k == group or k.startswith(group + "."))


def resolve_model(cfg: DictConfig, overridden: set[str], device: torch.device) -> ResolvedModel:
    """The model ``cfg.ckpt`` names, checked against what the command line asked for.

    Args:
        cfg: the composed config.
        overridden: keys the user set (:func:`overridden_keys`); only these can contradict a checkpoint.
        device: where the model and data go.

    Raises:
        UserError: no pretrained model for the data and SDE, data without an exact score, or a
            command-line setting that contradicts the checkpoint.
        models.CheckpointError: a missing, corrupt or mismatched checkpoint.
        models.from_diffusers.DiffusersError: a diffusers pipeline that is missing or not supported.
    """
    asked = build_sde(cfg.sde)
    choice = sde_name(asked)
    pipeline = diffusers_request(cfg, overridden)
    if pipeline is not None:
        return _resolve_diffusers(cfg, overridden, device, pipeline, asked)
    if cfg.ckpt == "exact":
        data = load_data(cfg.data, cfg.seed)
        if data.mixture is None:
            raise UserError(f"data={data.name} has no exact score (ring and mix16d have one); use ckpt=pretrained "
                             "or a checkpoint from task=train.")
        return ResolvedModel(asked, MixtureScore(asked, data.mixture), data, "exact")
    if cfg.ckpt == "pretrained":
        path = shipped_checkpoint(cfg.data.name, choice,
                                  f"train one with `python run.py task=train data={cfg.data.name} sde={choice}` and "
                                  "pass ckpt=<run dir>/checkpoints/last.pt, or use ckpt=exact on ring or mix16d.")
        source = "pretrained"
    else:
        path, source = Path(cfg.ckpt), "checkpoint"
    loaded = load_checkpoint(path, device=device)
    what = f"ckpt={cfg.ckpt}" if source == "checkpoint" else f"the pretrained model {path.name}"

    sde = loaded.sde
    if keys_in(overridden, "sde"):
        mine = {k: v for k, v in sde.hparams().items() if k != "N"}
        theirs = {k: v for k, v in asked.hparams().items() if k != "N"}
        if type(asked) is not type(sde) or mine != theirs:
            raise UserError(f"{what} was trained with {type(sde).__name__}({_fmt(mine)}) but the command asks for "
                             f"{type(asked).__name__}({_fmt(theirs)}); drop the sde override (sde.N may change) or "
                             "use a model trained with that SDE.")
        if asked.N != sde.N:
            sde = sde.with_steps(asked.N)
    if keys_in(overridden, "model"):
        _check_model(cfg.model, loaded.config.get("model", {}), overridden, what)

    if keys_in(overridden, "data"):
        data = load_data(cfg.data, cfg.seed)
        if data.event_shape != loaded.event_shape:
            raise UserError(f"data={data.name} has samples of shape {data.event_shape}, but {what} models shape "
                             f"{loaded.event_shape}; drop the data override or use a model trained on such data.")
    else:
        trained = OmegaConf.create(loaded.config)
        data = load_data(trained.data, trained.seed)
    # precision=, compile=: the network's forward only (an exact score has no network)
    loaded.score_fn.set_precision(cfg.precision, cfg.compile)
    return ResolvedModel(sde, loaded.score_fn, data, source, str(path), loaded.step)


def diffusers_request(cfg: DictConfig, overridden: set[str]) -> Optional[PipelineInfo]:
    """For ``ckpt=diffusers:DIR``, the pipeline's description, checked against the command line; None for other ckpts.

    It reads JSON files only, so ``check_config`` runs it before any work. Refused (a UserError, one line):
    whatever ``models.from_diffusers.inspect_pipeline`` refuses; ``sde`` settings other than ``sde.N`` (the
    scheduler defines the SDE); ``model`` settings (the pipeline's UNet is the network); ``task=likelihood``
    and ``task=compare`` without ``data=`` (a diffusers model has no held-out data).
    """
    ckpt = str(cfg.ckpt)
    if not ckpt.startswith(DIFFUSERS_PREFIX):
        return None
    source = ckpt[len(DIFFUSERS_PREFIX):]
    if not source:
        raise UserError("ckpt=diffusers: names no pipeline; give ckpt=diffusers:DIR, DIR written by "
                        "pipeline.save_pretrained(DIR).")
    info = inspect_pipeline(source)
    sde_keys = [k for k in keys_in(overridden, "sde") if k != "sde.N"]
    if sde_keys:
        raise UserError(f"ckpt={ckpt} brings its own SDE, from its {info.describe()}; drop {', '.join(sde_keys)} "
                        "(sde.N, the steps of the discrete chain, may change).")
    model_keys = keys_in(overridden, "model")
    if model_keys:
        raise UserError(f"ckpt={ckpt} brings its own network, the pipeline's UNet2DModel; drop "
                        f"{', '.join(model_keys)}.")
    if cfg.task.name in ("likelihood", "compare") and not keys_in(overridden, "data"):
        raise UserError(f"task={cfg.task.name} scores held-out data, and a diffusers model comes with none: give data= "
                        f"with samples of its shape {info.event_shape} (e.g. data=array data.path=FILE.npy).")
    return info


def _resolve_diffusers(cfg: DictConfig, overridden: set[str], device: torch.device, info: PipelineInfo,
                       asked: SDE) -> ResolvedModel:
    """The diffusers model of ``info`` with ``data=`` if given (of the model's shape), and ``sde.N`` if given."""
    data = None
    if keys_in(overridden, "data"):
        data = load_data(cfg.data, cfg.seed)
        if data.event_shape != info.event_shape:
            raise UserError(f"data={data.name} has samples of shape {data.event_shape}, but ckpt={cfg.ckpt} models "
                            f"shape {info.event_shape}; give data of that shape.")
    sde, model, _ = load_pipeline(info, device)
    if "sde.N" in overridden and asked.N != sde.N:
        sde = sde.with_steps(asked.N)   # the same SDE, its chain re-discretised; the model keeps its own
    model.set_precision(cfg.precision, cfg.compile)
    return ResolvedModel(sde, model, data, "diffusers", str(info.path), event_shape=info.event_shape)


def _fmt(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _check_model(asked: DictConfig, trained: dict, keys: set[str], what: str) -> None:
    """Refuse model settings of the command line (``keys``) that differ from the network the checkpoint holds.

    ``model=<kind>`` compares every field, ``model.<field>=...`` that field. A field the training
    config lacks was the constructor's default, which the schema holds.
    """
    trained_kind = trained.get("kind")
    if "model" in keys or asked.kind != trained_kind:
        fields = ["kind"] if asked.kind != trained_kind else _leaves(OmegaConf.to_container(asked, resolve=True))
    else:
        fields = [k[len("model."):] for k in keys if k.startswith("model.")]
    baseline = OmegaConf.merge(OmegaConf.structured(model_schema(trained_kind)), trained) if trained_kind else None
    differ = [f for f in fields
              if baseline is None or _plain(OmegaConf.select(asked, f)) != _plain(OmegaConf.select(baseline, f))]
    if differ:
        shown = ", ".join(f"model.{k}" for k in differ)
        raise UserError(f"{what} holds a different network ({shown} differ from the command line's); the "
                         "checkpoint's network applies: drop the model override.")


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _plain(value):
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return list(value) if isinstance(value, (list, tuple)) else value


# ---- guidance ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Guidance:
    """What ``guidance.*`` asks of a solve, checked against the model.

    Attributes:
        labels: (n,) int64 on the CPU, the class each sample is drawn for; None: unconditional sampling.
        scale: w (None: the solver's default, 1 without a classifier, 0 with one).
        classifier: the loaded classifier (``models.classifier.load_classifier``), or None.
        classifier_scale: γ (used with a classifier only).
        threshold: the dynamic-thresholding quantile, or None.
        classes: the class names, index = label (None: unknown).
        warning: one line on why the guidance may be poor (a model trained without label dropout), or None.
    """

    labels: Optional[torch.Tensor] = None
    scale: Optional[float] = None
    classifier: Optional[Callable] = None
    classifier_scale: float = 1.0
    threshold: Optional[float] = None
    classes: Optional[tuple] = None
    warning: Optional[str] = None

    def options(self, scale: Optional[float] = None, device: torch.device | str = "cpu") -> dict:
        """The keyword arguments of ``solvers.sample`` (via ``sample_on_ranks``) for guidance scale ``scale``
        (None: this guidance's own): ``cond`` with the labels (``sample_on_ranks`` gives each rank its rows), and only the guidance settings that are set."""
        w = self.scale if scale is None else scale
        options: dict = {}
        if self.labels is not None:
            options["cond"] = {"y": self.labels.to(device)}
        if w is not None:
            options["guidance_scale"] = w
        if self.classifier is not None:
            options.update(classifier=self.classifier, classifier_scale=self.classifier_scale)
        if self.threshold is not None:
            options["dynamic_threshold"] = self.threshold
        return options

    def describe(self, scale: Optional[float] = None) -> str:
        """A few words for titles: "class 3, w=2" and the like; "" for unconditional sampling."""
        parts = []
        if self.labels is not None:
            ks = self.labels.unique().tolist()
            parts.append(f"class {self.name(ks[0])}" if len(ks) == 1 else f"{len(ks)} classes")
        w = self.scale if scale is None else scale
        if w is not None:
            parts.append(f"w={w:g}")
        if self.classifier is not None:
            parts.append(f"classifier γ={self.classifier_scale:g}")
        if self.threshold is not None:
            parts.append(f"threshold {self.threshold:g}")
        return ", ".join(parts)

    def name(self, k: int) -> str:
        return str(self.classes[k]) if self.classes is not None and 0 <= k < len(self.classes) else str(k)


def resolve_guidance(cfg: DictConfig, model: ResolvedModel, n: int, device: torch.device | str,
                     scales: Iterable[Optional[float]] = (None,)) -> Guidance:
    """``cfg.guidance`` for ``n`` samples of ``model``, checked before any sampling; ``scales`` the guidance scales
    the task will use (``task.guidance_scales``; None: ``guidance.scale``).

    Labels: ``guidance.y`` for every sample; with ``guidance.y=null``, an even split of the n samples over the K
    classes in blocks (sample b gets class ⌊bK/n⌋) when a scale or a classifier asks for guidance, none otherwise.

    Raises:
        UserError: a label or a scale for an unconditional model (a label is fine with a classifier), a label out
            of range, ``guidance.y`` with data that have no classes, a classifier of another class count.
        models.CheckpointError: a classifier file that is missing or unreadable.
    """
    g = build_options(GuidanceConfig, OmegaConf.to_container(cfg.guidance, resolve=True), "guidance", UserError)
    scales = [g.scale if w is None else w for w in scales]
    fn = model.score_fn
    conditional = bool(getattr(fn, "conditional", False))
    K = int(getattr(fn, "num_classes", 0) or 0) if conditional else 0
    what = "the exact score" if model.source == "exact" else f"ckpt={cfg.ckpt}"
    classifier = None
    if g.classifier is not None:
        from models.classifier import load_classifier   # imported here: only classifier guidance needs it
        classifier = load_classifier(g.classifier, device=device)
    swept = any(w is not None for w in scales)
    if not conditional:
        if swept:
            raise UserError(f"guidance.scale (classifier-free guidance) needs a class-conditional model, and {what} is "
                            "unconditional; train one with model.num_classes=K, or guide this one with a classifier "
                            "(guidance.classifier=PATH, guidance.classifier_scale).")
        if g.y is not None and classifier is None:
            raise UserError(f"guidance.y={g.y}: {what} is unconditional and takes no class label; train a conditional "
                            "model (model.num_classes=K), or guide this one with a classifier (guidance.classifier=PATH).")
    if conditional and classifier is not None and classifier.num_classes != K:
        raise UserError(f"guidance.classifier={g.classifier} tells {classifier.num_classes} classes apart, but {what} "
                        f"has {K}; use a classifier trained on the model's classes.")
    data = model.data
    if g.y is not None and data is not None and data.num_classes == 0:
        raise UserError(f"guidance.y={g.y}: data={data.name} has no classes (no labels); use labelled data or drop "
                        "guidance.y.")
    bound = K if conditional else (classifier.num_classes if classifier is not None else 0)
    classes = getattr(fn, "classes", None) or getattr(classifier, "classes", None)
    if classes is None and data is not None and data.num_classes == bound:
        classes = data.classes
    if g.y is not None and g.y >= bound:
        names = f" ({', '.join(map(str, classes[:12]))}{', ...' if len(classes) > 12 else ''})" if classes else ""
        raise UserError(f"guidance.y={g.y} is out of range: {what} has {bound} classes, labels 0..{bound - 1}{names}.")

    labels = None
    if g.y is not None:
        labels = torch.full((n,), g.y, dtype=torch.int64)
    elif (conditional and swept) or classifier is not None:
        labels = torch.arange(n) * bound // n
    warning = None
    if conditional and getattr(fn, "label_dropout", None) == 0:
        # w = 1 is the conditional branch alone; anything else, or no label at all, uses the unconditional one
        effective = [w if w is not None else (0.0 if classifier is not None else 1.0) for w in scales]
        if labels is None or any(w != 1 for w in effective):
            use = ("unconditional samples" if labels is None
                   else f"guidance with w={', '.join(f'{w:g}' for w in effective if w != 1)}")
            warning = (f"warning: {what} was trained without label dropout (task.label_dropout=0), so its unconditional "
                       f"branch was never trained and {use} may be poor; for classifier-free guidance train with "
                       "task.label_dropout=0.1.")
    return Guidance(labels=labels, scale=g.scale, classifier=classifier, classifier_scale=g.classifier_scale,
                    threshold=g.threshold, classes=tuple(classes) if classes is not None else None, warning=warning)
