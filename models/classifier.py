"""Noise-conditional classifiers p(y | x_t, t): the networks, the wrapper that preconditions them like a score
model, and their one file format (docs/guidance.md).

A classifier network maps ``(x, t)`` to logits (B, K) and, through ``features``, to the penultimate
activations (B, F) that the logits are a linear read-out of. ``MLPClassifier`` is for flat data,
``ConvClassifier`` for small images; both are built from the score networks' pieces (the time embedding
and its MLP, the residual blocks of ``models.networks``). ``NoiseClassifier`` wraps one for use on x_t:
it scales x as ``ScoreModel`` does and feeds the network the same time input, so a classifier guiding a
score model sees every noise level as that model does. ``save_classifier`` / ``load_classifier`` write and
read it with its spec, weights and class names, checked on every read.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import sde_lib
from core_lib import atomic_write
from models.checkpoint import CheckpointError, checksums
from models.errors import ModelError
from models.networks import (_Downsample, _group_norm, _MLPBlock, _positive_int, _ResBlock, _time_mlp, ScoreModel,
                             checked_event_shape)
from sde_lib import SDE

Tensor = torch.Tensor

__all__ = ["MLPClassifier", "ConvClassifier", "NoiseClassifier", "build_classifier", "save_classifier",
           "load_classifier", "CLASSIFIERS", "CLASSIFIER_FORMAT"]

#: The format tag of a classifier file (``save_classifier``); a score checkpoint carries another.
CLASSIFIER_FORMAT = "scoreflow-classifier-v1"


def _time_embedding(embedding: str | None, embed_dim: int, out_dim: int) -> nn.Module | None:
    """The score networks' time embedding + MLP, or None for a classifier of clean data (no time input)."""
    return None if embedding is None else _time_mlp(embedding, embed_dim, out_dim)


def _conditioning(time_embed: nn.Module | None, t: Tensor | None, batch: int, width: int, like: Tensor) -> Tensor:
    """The blocks' conditioning vector (B, width): the time embedding, or zeros without one (each block's time
    projection then reduces to a learned bias)."""
    if time_embed is None:
        return like.new_zeros(batch, width)
    return time_embed(t)


class MLPClassifier(nn.Module):
    """A time-conditioned residual MLP classifier for flat data: (x (B, ...), t (B,)) → logits (B, num_classes).

    x is flattened and lifted to ``hidden`` units, passed through ``depth`` pre-norm residual blocks
    that each add their projection of the time embedding (``MLPScoreNet``'s blocks), then LayerNorm–SiLU
    (the features, (B, hidden)) and a linear read-out to the logits.

    Args:
        dim: values per sample.
        num_classes: K.
        hidden: width of the residual stream (and of the features).
        depth: residual blocks.
        embed_dim: size of the time embedding before its MLP (even).
        embedding: "fourier" or "sinusoidal"; None for a classifier of clean data that ignores t.
    """

    def __init__(self, dim: int, num_classes: int, hidden: int = 128, depth: int = 2, embed_dim: int = 64,
                 embedding: str | None = "fourier"):
        super().__init__()
        self.dim = _positive_int("dim", dim)
        self.num_classes = _positive_int("num_classes", num_classes, minimum=2)
        self.hidden = _positive_int("hidden", hidden)
        depth = _positive_int("depth", depth, minimum=0)
        self.time_embed = _time_embedding(embedding, embed_dim, self.hidden)
        self.input = nn.Linear(self.dim, self.hidden)
        self.blocks = nn.ModuleList(_MLPBlock(self.hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(self.hidden)
        self.head = nn.Linear(self.hidden, self.num_classes)

    def features(self, x: Tensor, t: Tensor | None) -> Tensor:
        """The penultimate activations (B, hidden)."""
        if x.dim() < 2 or x[0].numel() != self.dim:
            raise ModelError(f"MLPClassifier(dim={self.dim}) takes x of shape (B, ...) with {self.dim} values per "
                             f"sample, got {tuple(x.shape)}.")
        temb = _conditioning(self.time_embed, t, x.shape[0], self.hidden, x)
        h = self.input(x.flatten(1))
        for block in self.blocks:
            h = block(h, temb)
        return F.silu(self.out_norm(h))

    def forward(self, x: Tensor, t: Tensor | None) -> Tensor:
        return self.head(self.features(x, t))


class ConvClassifier(nn.Module):
    """A time-conditioned convolutional classifier for small images: (x (B, C, H, W), t (B,)) → logits (B, K).

    The U-Net's encoder half: a conv3×3, then per level one residual block (GroupNorm–SiLU–conv3×3 with the
    time embedding added, ``UNet``'s blocks) at base_channels·channel_mults[i] channels, a stride-2 conv
    between levels; then GroupNorm–SiLU and the mean over positions (the features, (B, channels of the last
    level)) and a linear read-out to the logits.

    Args:
        in_channels: C.
        image_size: H = W, divisible by 2^(levels − 1).
        num_classes: K.
        base_channels: channels of the first level (even: also the time-embedding size).
        channel_mults: one channel multiplier per level.
        embedding: "fourier" or "sinusoidal"; None for a classifier of clean data that ignores t.
        groups: GroupNorm groups (reduced to a divisor of the channel count where needed).
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, base_channels: int = 16,
                 channel_mults: tuple[int, ...] = (1, 2), embedding: str | None = "fourier", groups: int = 8):
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.image_size = _positive_int("image_size", image_size)
        self.num_classes = _positive_int("num_classes", num_classes, minimum=2)
        base_channels = _positive_int("base_channels", base_channels)
        groups = _positive_int("groups", groups)
        channel_mults = tuple(_positive_int("each channel multiplier", m) for m in channel_mults)
        if not channel_mults:
            raise ModelError("channel_mults must list at least one level.")
        if self.image_size % 2 ** (len(channel_mults) - 1):
            raise ModelError(f"image_size must be divisible by 2^(levels - 1) = {2 ** (len(channel_mults) - 1)} for "
                             f"{len(channel_mults)} levels (channel_mults), got {image_size}: use fewer levels.")
        # Without a time input the blocks' conditioning is a constant: one unit is enough.
        self.temb_dim = 4 * base_channels if embedding is not None else 1
        self.time_embed = _time_embedding(embedding, base_channels, self.temb_dim)
        self.conv_in = nn.Conv2d(self.in_channels, base_channels, 3, padding=1)
        self.blocks, self.downs = nn.ModuleList(), nn.ModuleList()
        ch = base_channels
        for i, mult in enumerate(channel_mults):
            self.blocks.append(_ResBlock(ch, base_channels * mult, self.temb_dim, 0.0, groups))
            ch = base_channels * mult
            self.downs.append(_Downsample(ch) if i < len(channel_mults) - 1 else nn.Identity())
        self.norm_out = _group_norm(ch, groups)
        self.head = nn.Linear(ch, self.num_classes)

    def features(self, x: Tensor, t: Tensor | None) -> Tensor:
        """The penultimate activations (B, base_channels·channel_mults[-1]), averaged over positions."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ModelError(f"ConvClassifier expects x of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}.")
        temb = _conditioning(self.time_embed, t, x.shape[0], self.temb_dim, x)
        h = self.conv_in(x)
        for block, down in zip(self.blocks, self.downs):
            h = down(block(h, temb))
        return F.silu(self.norm_out(h)).mean(dim=(2, 3))

    def forward(self, x: Tensor, t: Tensor | None) -> Tensor:
        return self.head(self.features(x, t))


#: Classifier network kind → class, for ``build_classifier``.
CLASSIFIERS: dict[str, type[nn.Module]] = {"mlp": MLPClassifier, "conv": ConvClassifier}
#: The constructor arguments of each kind that ``build_classifier`` derives from the event shape.
_DERIVED = {"mlp": ("dim",), "conv": ("in_channels", "image_size")}


def build_classifier(kind: str, event_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """A classifier network for samples of shape ``event_shape``, like ``models.build_network``.

    "mlp": ``MLPClassifier(dim=prod(event_shape), ...)`` (any event shape; flattened inside). "conv":
    ``ConvClassifier(in_channels=C, image_size=H, ...)`` for event_shape (C, H, W) with H == W. The network
    keeps what rebuilds it as ``net.spec`` (kind, event shape, num_classes, kwargs), which files store.
    """
    if kind not in CLASSIFIERS:
        raise ModelError(f"unknown classifier kind {kind!r}; available: {', '.join(CLASSIFIERS)}.")
    shape = checked_event_shape(event_shape, _DERIVED[kind], kwargs, f"a {kind} classifier")
    if kind == "mlp":
        net = MLPClassifier(math.prod(shape), num_classes, **kwargs)
    else:
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ModelError(f"a conv classifier needs square images, event_shape (C, H, W) with H == W; got {shape}: "
                             "use the mlp classifier for flat data.")
        net = ConvClassifier(shape[0], shape[1], num_classes, **kwargs)
    net.spec = {"kind": kind, "event_shape": list(shape), "num_classes": int(num_classes),
                **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}
    return net


class NoiseClassifier(nn.Module):
    """A classifier of noised data x_t = α(t) x₀ + s(t) ε: ``clf(x, t)`` → logits (B, K) of p(y | x_t, t).

    The network sees c_in·x with c_in = 1/√(α² σ_data² + s²), the inverse std of x_t for data of
    per-dimension std σ_data (EDM's input scaling, as in ``ScoreModel``), and the time input of a
    ``ScoreModel`` with the same SDE and ``time_input`` (by default the normalised log-SNR τ ∈ [0, 1],
    docs/math.md §5.4): its ``network_time``, called, not copied. Classifier guidance uses
    ∇ₓ log softmax(clf(x, t))[y] (docs/math.md §10), which flows through c_in·x.

    Args:
        net: a classifier network (``build_classifier``): ``net(x, τ) -> (B, K)``, ``net.features(x, τ)``,
            ``net.num_classes``.
        sde: the forward SDE the classifier's x_t come from (the score model's).
        sigma_data: the data's per-dimension standard deviation.
        time_input: "log_snr" (default), "t" or "index", as for ``ScoreModel``.
        classes: the class names (index = label); default "0".."K−1".
        info: anything to keep with the classifier (data name and range, measured accuracies); saved with it.

    Attributes: ``num_classes`` (K), ``classes``, ``sde``, ``sigma_data``, ``time_input``, ``info``.
    """

    def __init__(self, net: nn.Module, sde: SDE, sigma_data: float = 1.0, time_input: str = "log_snr",
                 classes: tuple[str, ...] | list[str] | None = None, info: dict[str, Any] | None = None):
        super().__init__()
        self.net = net
        self.num_classes = int(net.num_classes)
        names = classes if classes is not None else range(self.num_classes)
        self.classes = tuple(str(c) for c in names)
        if len(self.classes) != self.num_classes:
            raise ModelError(f"{len(self.classes)} class names for a classifier of {self.num_classes} classes; give "
                             "one name per class.")
        # A score model around no network: its checks of sigma_data and time_input, and its network_time.
        self._score_time = ScoreModel(nn.Identity(), sde, sigma_data=sigma_data, time_input=time_input)
        self.sde, self.sigma_data, self.time_input = sde, float(sigma_data), time_input
        self.info = dict(info or {})

    def extra_repr(self) -> str:
        return (f"sde={self.sde!r}, sigma_data={self.sigma_data}, time_input={self.time_input!r}, "
                f"classes={self.classes}")

    def network_time(self, t: Tensor) -> Tensor:
        """The network's time input for t (B,): ``ScoreModel.network_time`` of the same SDE and time_input."""
        return self._score_time.network_time(t)

    def _inputs(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        """(c_in·x, the network's time input (B,)); t a scalar or of shape (B,): ScoreModel's preconditioning."""
        if x.dim() < 2:
            raise ModelError(f"x must have shape (B, ...), got {tuple(x.shape)}.")
        t, _, _, c_in = self._score_time.preconditioning(x, t)
        return c_in * x, self.network_time(t)

    def forward(self, x: Tensor, t) -> Tensor:
        """Logits (B, K) of p(y | x_t = x, t); t a scalar or of shape (B,)."""
        return self.net(*self._inputs(x, t))

    def features(self, x: Tensor, t) -> Tensor:
        """The network's penultimate activations (B, F) at (x, t), what the logits are a linear read-out of."""
        return self.net.features(*self._inputs(x, t))

    def spec(self) -> dict[str, Any]:
        """What rebuilds this classifier without any config system (stored by ``save_classifier``)."""
        net_spec = getattr(self.net, "spec", None)
        if net_spec is None:
            raise ModelError("the classifier's network was not built by models.build_classifier (it has no .spec), "
                             "so a file could not rebuild it; build it with build_classifier.")
        return {"sde": {"class": type(self.sde).__name__, **self.sde.hparams()}, "net": dict(net_spec),
                "sigma_data": self.sigma_data, "time_input": self.time_input}


def save_classifier(path: str | os.PathLike, classifier: NoiseClassifier) -> Path:
    """Write ``classifier`` to ``path`` (.pt) atomically: format tag, spec, weights, class names, info, checksums.

    Read it back with :func:`load_classifier`. ``classifier.info`` must hold only numbers, strings, lists and
    dicts (the file is read with ``weights_only=True``). Returns ``path``.
    """
    weights = {k: v.detach().to("cpu").clone() for k, v in classifier.state_dict().items()}
    state = {"format": CLASSIFIER_FORMAT, "spec": classifier.spec(), "weights": weights,
             "classes": list(classifier.classes), "info": dict(classifier.info)}
    state["checksums"] = checksums(state)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return Path(path)


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> NoiseClassifier:
    """The classifier saved in ``path`` (:func:`save_classifier`), in eval mode with gradients off for its weights.

    Raises CheckpointError for a missing, unreadable, corrupt or foreign file (a score checkpoint
    included), or one whose weights do not fit the network its spec describes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no classifier at {path}; give a .pt file written by `python run.py "
                              "task=train_classifier` (its run directory holds checkpoints/classifier.pt).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable classifier (corrupt, truncated or not written by this "
                              f"project: {type(err).__name__}); use another file or train one again.") from None
    found = state.get("format") if isinstance(state, dict) else type(state).__name__
    if found != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path} is not a classifier file (format {found!r}, expected {CLASSIFIER_FORMAT!r}); "
                              "give a file written by `python run.py task=train_classifier`.")
    missing = [k for k in ("spec", "weights", "classes", "info", "checksums") if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is incomplete: use another file.")
    stored, actual = state["checksums"], checksums(state)
    bad = sorted(k for k in set(stored) | set(actual) if stored.get(k) != actual.get(k)) \
        if isinstance(stored, dict) else ["checksums"]
    if bad:
        raise CheckpointError(f"{path} is corrupt: {', '.join(bad[:3])}{' and others' if len(bad) > 3 else ''} do not "
                              "match their checksums; use another file or train one again.")
    try:
        spec = state["spec"]
        sde_spec = dict(spec["sde"])
        by_class = {cls.__name__: name for name, cls in sde_lib.SDES.items()}
        sde = sde_lib.get_sde(by_class[sde_spec.pop("class")], **sde_spec)
        net_spec = dict(spec["net"])
        net = build_classifier(net_spec.pop("kind"), tuple(net_spec.pop("event_shape")), net_spec.pop("num_classes"),
                               **{k: tuple(v) if isinstance(v, list) else v for k, v in net_spec.items()})
        classifier = NoiseClassifier(net, sde, spec["sigma_data"], spec["time_input"], state["classes"], state["info"])
        classifier.load_state_dict(state["weights"], strict=True)
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as err:   # ModelError included
        first = " ".join(line.strip() for line in str(err).splitlines()[:2]) or repr(err)
        raise CheckpointError(f"the classifier in {path} does not rebuild ({type(err).__name__}: {first}); the file is "
                              "inconsistent or from another version: use another file.") from None
    return classifier.to(device).eval().requires_grad_(False)
