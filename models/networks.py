"""Score networks and the wrapper that turns any network output into ``score_fn(x, t, **cond)``.

Networks (``MLPScoreNet`` for flat low-dimensional data, ``UNet`` for small images) map
``(x, t)`` with t ∈ [0, 1] of shape (B,) to a tensor of the shape of x. What that output *means*
(ε, the score, or x̂₀; docs/math.md §5) is decided in exactly one place, ``ScoreModel``, which also
preconditions the network input. Both networks zero-initialise their last layer, so an untrained
network outputs 0 (an "eps" ``ScoreModel`` then returns the zero score).
"""
from __future__ import annotations

import math
import operator
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ModelError
from sde_lib import SDE, batch_broadcast

Tensor = torch.Tensor

__all__ = ["GaussianFourierEmbedding", "SinusoidalEmbedding", "MLPScoreNet", "UNet", "ScoreModel",
           "build_network", "build_score_model", "given_cond", "PARAMETERIZATIONS", "EMBEDDINGS", "NETWORKS",
           "DERIVED_ARGS", "TIME_INPUTS", "NULL_LABEL"]

#: The label of a row that takes the unconditional branch: ``y[b] = NULL_LABEL`` (classifier-free guidance's
#: "no label"); ``y=None`` makes the whole batch unconditional.
NULL_LABEL = -1


# ---- time embeddings ----------------------------------------------------------------------------

def _check_time(t: Tensor) -> Tensor:
    if t.dim() != 1:
        raise ModelError(f"t must have shape (B,), got {tuple(t.shape)}.")
    return t


def _check_embed_dim(dim: int) -> None:
    if int(dim) != dim or dim < 2 or dim % 2:
        raise ModelError(f"embedding dim must be an even integer >= 2, got {dim!r}.")


class GaussianFourierEmbedding(nn.Module):
    """Random Fourier features of t: [sin(2π W t), cos(2π W t)] with fixed W ~ N(0, scale²).

    Song et al. (2021) embed the noise level this way (Tancik et al. 2020 features). W has dim/2
    entries drawn once from torch's global RNG at construction and stored as a buffer (so it is
    saved in checkpoints and is never trained). The input is t itself (B,) in [0, 1]; with the
    default scale 16 the fastest features turn over several times per 0.1 of t.

    Args:
        dim: output size, even.
        scale: standard deviation of the frequencies W.
    Shapes: t (B,) → (B, dim).
    """

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        _check_embed_dim(dim)
        if not scale > 0:
            raise ModelError(f"scale must be positive, got {scale!r}.")
        self.dim = int(dim)
        self.register_buffer("W", torch.randn(self.dim // 2) * scale)

    def forward(self, t: Tensor) -> Tensor:
        proj = 2 * math.pi * _check_time(t)[:, None].to(self.W.dtype) * self.W
        return torch.cat([proj.sin(), proj.cos()], dim=1)


class SinusoidalEmbedding(nn.Module):
    """Transformer positional encoding of ``time_scale``·t (DDPM's embedding of the step index).

    Frequencies are max_period^(−k/(dim/2)), k = 0..dim/2−1; the output is [sin, cos] of
    time_scale·t times each frequency. time_scale = 1000 makes t ∈ [0, 1] play the role of
    DDPM's index i ∈ [0, 1000).

    Shapes: t (B,) → (B, dim).
    """

    def __init__(self, dim: int, time_scale: float = 1000.0, max_period: float = 10_000.0):
        super().__init__()
        _check_embed_dim(dim)
        self.dim = int(dim)
        half = self.dim // 2
        self.time_scale = float(time_scale)
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half),
                             persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        arg = self.time_scale * _check_time(t)[:, None].to(self.freqs.dtype) * self.freqs
        return torch.cat([arg.sin(), arg.cos()], dim=1)


#: Time-embedding name → class (the ``embedding=`` argument of the networks).
EMBEDDINGS: dict[str, type[nn.Module]] = {"fourier": GaussianFourierEmbedding,
                                          "sinusoidal": SinusoidalEmbedding}


def _make_embedding(name: str, dim: int) -> nn.Module:
    if name not in EMBEDDINGS:
        raise ModelError(f"unknown embedding {name!r}; available: {', '.join(EMBEDDINGS)}.")
    return EMBEDDINGS[name](dim)


def _time_mlp(embedding: str, embed_dim: int, out_dim: int) -> nn.Sequential:
    """Embedding of t followed by Linear–SiLU–Linear: the shared conditioning vector (B, out_dim)."""
    return nn.Sequential(_make_embedding(embedding, embed_dim), nn.Linear(embed_dim, out_dim), nn.SiLU(),
                         nn.Linear(out_dim, out_dim))


def _zero_(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ModelError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


# ---- class labels ------------------------------------------------------------------------------

def _num_classes(value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ModelError(f"num_classes must be an integer >= 0 (0: unconditional), got {value!r}.")
    return int(value)


class _LabelEmbedding(nn.Module):
    """A learned vector per class and one for "no label": nn.Embedding(K + 1, dim), the last row the null label.

    ``forward(y, batch)`` maps y (B,) with values in [−1, K) to (B, dim); ``NULL_LABEL`` (−1) and ``y=None``
    (the whole batch) take the last row, the unconditional branch that label dropout trains. The vectors
    start at zero, so an untrained conditional network computes what its unconditional twin does, and each
    row moves only with the gradients of its own label's samples.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes + 1, dim)
        nn.init.zeros_(self.embed.weight)

    def forward(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor:
        K = self.num_classes
        if y is None:
            return self.embed.weight[K].expand(batch, -1)
        if not torch.is_tensor(y) or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ModelError(f"y must be an integer tensor of class labels of shape ({batch},), got "
                             f"{y.dtype if torch.is_tensor(y) else type(y).__name__}.")
        if y.shape != (batch,):
            raise ModelError(f"y must have shape ({batch},), one label per sample, got {tuple(y.shape)}.")
        y = y.to(device=device, dtype=torch.long)
        inside = ((y >= NULL_LABEL) & (y < K)).all()
        message = f"y holds labels outside [-1, {K}): the model has K={K} classes 0..{K - 1} (-1: no label)."
        if y.device.type == "cpu":
            if not inside:
                raise ModelError(message)
        else:   # no host sync inside a solver's loop: the check fails at the device's next synchronisation
            torch._assert_async(inside, message)
        return self.embed(torch.where(y == NULL_LABEL, K, y))


# ---- MLP for low-dimensional data -------------------------------------------------------------

class _MLPBlock(nn.Module):
    """Pre-norm residual block h + W₂ SiLU(W₁ LN(h) + E SiLU(temb))."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.temb_proj = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        return h + self.fc2(F.silu(self.fc1(self.norm(h)) + self.temb_proj(F.silu(temb))))


class MLPScoreNet(nn.Module):
    """A time-conditioned residual MLP for flat data: (x (B, dim), t (B,)) → (B, dim).

    x is lifted to ``hidden`` units, passed through ``depth`` pre-norm residual blocks, each of
    which adds its own projection of the time embedding inside the block, and read out by a
    LayerNorm–SiLU–Linear head whose Linear is zero-initialised (untrained output: 0).
    Any x of shape (B, ...) with ``dim`` values per sample is accepted and the output has the
    shape of x.

    Args:
        dim: number of values per sample.
        hidden: width of the residual stream.
        depth: number of residual blocks.
        embed_dim: size of the time embedding before its MLP (even).
        embedding: "fourier" (``GaussianFourierEmbedding``) or "sinusoidal".
        num_classes: K > 0 makes the network class-conditional, ``forward(x, t, y)``: a learned vector per
            class (and one for the null label −1) is added to the time embedding. 0: unconditional, and
            exactly the parameters of a network built without it.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, embed_dim: int = 64,
                 embedding: str = "fourier", num_classes: int = 0):
        super().__init__()
        self.dim = _positive_int("dim", dim)
        hidden = _positive_int("hidden", hidden)
        depth = _positive_int("depth", depth, minimum=0)
        self.num_classes = _num_classes(num_classes)
        self.conditional = self.num_classes > 0
        self.time_embed = _time_mlp(embedding, embed_dim, hidden)
        if self.conditional:
            self.label_embed = _LabelEmbedding(self.num_classes, hidden)
        self.input = nn.Linear(self.dim, hidden)
        self.blocks = nn.ModuleList(_MLPBlock(hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.output = _zero_(nn.Linear(hidden, self.dim))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The output (shape of x) at x (B, ...), t (B,) and, for a conditional net, labels y (B,) in [−1, K)
        (None: all null)."""
        if x.dim() < 2 or x[0].numel() != self.dim:
            raise ModelError(f"MLPScoreNet(dim={self.dim}) takes x of shape (B, ...) with {self.dim} values "
                             f"per sample, got {tuple(x.shape)}.")
        temb = self.time_embed(t)
        if self.conditional:
            temb = temb + self.label_embed(y, x.shape[0], x.device).to(temb.dtype)
        elif y is not None:
            raise ModelError("this network is unconditional (num_classes=0) and takes no labels y.")
        h = self.input(x.flatten(1))
        for block in self.blocks:
            h = block(h, temb)
        return self.output(F.silu(self.out_norm(h))).reshape(x.shape)


# ---- U-Net for small images ---------------------------------------------------------------------

def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count ≤ ``groups`` that divides ``channels``."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=1e-6)


class _ResBlock(nn.Module):
    """GN–SiLU–conv3×3, + time projection, GN–SiLU–dropout–conv3×3; skip added (and rescaled by 1/√2)."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, groups: int, skip_rescale: bool = True):
        super().__init__()
        self.scale = 1 / math.sqrt(2.0) if skip_rescale else 1.0
        self.norm1 = _group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = _group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        # DDPM++'s skip_rescale keeps the residual stream's variance from growing block by block; DDPM adds.
        return (self.skip(x) + h) * self.scale


class _AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions: GN, qkv 1×1 conv, softmax, 1×1 out conv."""

    def __init__(self, channels: int, groups: int, skip_rescale: bool = True):
        super().__init__()
        self.scale = 1 / math.sqrt(2.0) if skip_rescale else 1.0
        self.norm = _group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)                     # (B, 1, HW, C), softmax over keys
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return (x + self.proj(h)) * self.scale


class _Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """DDPM's U-Net for square images, with DDPM++'s skip rescaling by default: (x (B, C, H, W), t (B,)) → shape of x.

    Level i works at resolution image_size/2^i with base_channels·channel_mults[i] channels and
    ``num_res_blocks`` residual blocks (GroupNorm–SiLU–conv3×3, time embedding added per block,
    skip rescaled by 1/√2); a single-head self-attention block follows each residual block at
    the resolutions listed in ``attn_resolutions``. Levels are joined by stride-2 convolutions
    going down and nearest-neighbour upsampling + conv3×3 going up; every activation of the down
    path is concatenated into the up path (num_res_blocks + 1 blocks per level). The middle is
    ResBlock–Attention–ResBlock. The output conv is zero-initialised (untrained output: 0).

    With ``base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
    dropout=0.1, embedding="sinusoidal", groups=32, skip_rescale=False`` on 32×32×3 images this is Ho et
    al. (2020)'s CIFAR-10 network, 35 746 307 parameters (their 35.7 M): ``model=unet_ddpm``.

    Args:
        in_channels: C of the data (output has the same).
        base_channels: channels at the first level; also the time-embedding size (even).
        channel_mults: one channel multiplier per level.
        num_res_blocks: residual blocks per level on the way down.
        attn_resolutions: resolutions (H) at which attention blocks are inserted.
        image_size: H = W, divisible by 2^(levels − 1) (28 works with two levels, 32 with up to six).
        dropout: dropout probability inside residual blocks.
        embedding: "fourier" or "sinusoidal" time embedding.
        groups: GroupNorm groups (reduced to a divisor of the channel count where needed).
        skip_rescale: divide each residual sum by √2 (DDPM++; the default), or add plainly (DDPM).
        num_classes: K > 0 makes the network class-conditional, ``forward(x, t, y)``: a learned vector per
            class (and one for the null label −1) of the time embedding's size is added to it, so every
            residual block sees the label. 0: unconditional, exactly the parameters without it.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 32, channel_mults: tuple[int, ...] = (1, 2),
                 num_res_blocks: int = 1, attn_resolutions: tuple[int, ...] = (4,), image_size: int = 8,
                 dropout: float = 0.0, embedding: str = "fourier", groups: int = 8, skip_rescale: bool = True,
                 num_classes: int = 0):
        super().__init__()
        self.num_classes = _num_classes(num_classes)
        self.conditional = self.num_classes > 0
        self.in_channels = _positive_int("in_channels", in_channels)
        self.image_size = _positive_int("image_size", image_size)
        base_channels = _positive_int("base_channels", base_channels)
        num_res_blocks = _positive_int("num_res_blocks", num_res_blocks)
        groups = _positive_int("groups", groups)
        channel_mults = tuple(_positive_int("each channel multiplier", m) for m in channel_mults)
        if not channel_mults:
            raise ModelError("channel_mults must list at least one level.")
        levels = len(channel_mults)
        if self.image_size % 2 ** (levels - 1):
            raise ModelError(f"image_size must be divisible by 2^(levels - 1) = {2 ** (levels - 1)} for {levels} "
                             f"levels (channel_mults), got {image_size}: resize the images (data.resolution) or use "
                             f"fewer levels.")
        if not 0.0 <= dropout < 1.0:
            raise ModelError(f"dropout must be in [0, 1), got {dropout!r}.")
        attn_resolutions = set(attn_resolutions)

        temb_dim = 4 * base_channels
        self.time_embed = _time_mlp(embedding, base_channels, temb_dim)
        if self.conditional:
            self.label_embed = _LabelEmbedding(self.num_classes, temb_dim)
        self.conv_in = nn.Conv2d(self.in_channels, base_channels, 3, padding=1)

        def res(cin: int, cout: int) -> _ResBlock:
            return _ResBlock(cin, cout, temb_dim, dropout, groups, skip_rescale)

        def attn(ch: int, resolution: int) -> nn.Module:
            return _AttnBlock(ch, groups, skip_rescale) if resolution in attn_resolutions else nn.Identity()

        # Down path; skip_channels records the channel count of every activation pushed for the up path.
        self.down = nn.ModuleList()
        ch, resolution, skip_channels = base_channels, self.image_size, [base_channels]
        for i, mult in enumerate(channel_mults):
            level = nn.Module()
            level.res, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.res.append(res(ch, base_channels * mult))
                ch = base_channels * mult
                level.attn.append(attn(ch, resolution))
                skip_channels.append(ch)
            if i < levels - 1:
                level.resample = _Downsample(ch)
                resolution //= 2
                skip_channels.append(ch)
            else:
                level.resample = nn.Identity()
            self.down.append(level)

        self.mid_res1, self.mid_attn, self.mid_res2 = res(ch, ch), _AttnBlock(ch, groups, skip_rescale), res(ch, ch)

        # Up path, deepest level first, consuming the skips in reverse order.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mults))):
            level = nn.Module()
            level.res, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.res.append(res(ch + skip_channels.pop(), base_channels * mult))
                ch = base_channels * mult
                level.attn.append(attn(ch, resolution))
            if i > 0:
                level.resample = _Upsample(ch)
                resolution *= 2
            else:
                level.resample = nn.Identity()
            self.up.append(level)
        assert not skip_channels

        self.norm_out = _group_norm(ch, groups)
        self.conv_out = _zero_(nn.Conv2d(ch, self.in_channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The output (shape of x) at x (B, C, H, W), t (B,) and, for a conditional net, labels y (B,) in [−1, K)
        (None: all null)."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ModelError(f"UNet expects x of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}.")
        temb = self.time_embed(t)
        if self.conditional:
            temb = temb + self.label_embed(y, x.shape[0], x.device).to(temb.dtype)
        elif y is not None:
            raise ModelError("this network is unconditional (num_classes=0) and takes no labels y.")
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for res, attn in zip(level.res, level.attn):
                h = attn(res(h, temb))
                skips.append(h)
            if not isinstance(level.resample, nn.Identity):
                h = level.resample(h)
                skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, temb)), temb)
        for level in self.up:
            for res, attn in zip(level.res, level.attn):
                h = attn(res(torch.cat([h, skips.pop()], dim=1), temb))
            h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---- the one place where a network output becomes a score ------------------------------------

#: What a network's output is taken to be, for ``ScoreModel(parameterization=...)``.
PARAMETERIZATIONS = ("eps", "score", "x0")
TIME_INPUTS = ("log_snr", "t", "index")
#: ``precision`` → the autocast dtype of the network's forward (None: the input's own dtype)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
def _transformed() -> bool:
    """Whether a torch.func transform (vjp, vmap, jacrev, ...) is running."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


#: network → its torch.compile'd forward; weak, and outside the module, so that copies (the EMA's) compile their own
_COMPILED: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def given_cond(cond: dict, model: nn.Module) -> dict:
    """The conditioning inputs that are set (a None value is the unconditional branch), checked against ``model``.

    A model takes conditioning when it declares ``conditional = True``; an unconditional one is
    refused any set input with a clear error rather than a TypeError deep in its forward.
    """
    given = {k: v for k, v in cond.items() if v is not None}
    if given and not getattr(model, "conditional", False):
        raise ModelError(f"this model is unconditional and takes no conditioning inputs (got {', '.join(given)}); "
                         "drop cond, or use a model trained with them.")
    return given


class ScoreModel(nn.Module):
    """Wraps a network ``net(x, t)`` as a score model ``score_fn(x, t, **cond)`` ≈ ∇ₓ log p_t(x) (docs/math.md §5).

    With α = α(t) = exp(sde.log_mean_coeff(t)) and s = s(t) = sde.marginal_std(t), so that
    x_t = α x₀ + s ε, the network output ``out`` is read as

    - "eps":   ε̂ (the noise);  score = −ε̂/s.  The default; well conditioned at every t.
    - "score": the score itself; score = out.  Its target grows like 1/s, so this is poorly
      conditioned at small t (kept for comparison with the reference NCSN setups).
    - "x0":    EDM's preconditioned denoiser (Karras et al. 2022, Table 1): x̂₀ = c_skip x + c_out·out
      with σ = s/α, c_skip = α σ_data²/(s² + α² σ_data²) and c_out = s σ_data/√(s² + α² σ_data²);
      score = (α x̂₀ − x)/s² = −c_in² x + α σ_data c_in out/s. At small s it behaves like "eps",
      at large s like a plain x₀-prediction, so the network's target has unit scale at every t.
      (A bare x̂₀ = out makes the score's error grow like 1/s²: on the ring it trained to a KL of
      5 nats instead of 0.05.)

    Input preconditioning: the network sees c_in·x with c_in = 1/√(α² σ_data² + s²), the
    inverse of the std of x_t when the data have per-dimension std σ_data (Karras et al. 2022,
    EDM). This keeps the network's inputs of unit scale for VE, whose x_t reaches std σ_max = 50,
    and is ≈ 1 for VP with σ_data = 1. The network's time input (B,) is ``network_time(t)``: the
    normalised log-SNR by default (``time_input="log_snr"``), t itself (``time_input="t"``), or the
    discrete chain's index (``time_input="index"``): a DDPM/NCSN-style model conditioned on i/(N−1),
    trained at the integers and evaluated between them through ``sde.chain_position``.

    Class labels: a network built with ``num_classes=K`` (``conditional``) takes ``score_fn(x, t, y=y)``, y (B,)
    int64 in [−1, K), −1 (``NULL_LABEL``) or ``y=None`` the unconditional branch; ``label_dropout`` and
    ``classes`` record how it was trained (None: unknown).

    ``set_precision`` runs the network in bf16/fp16 autocast and/or compiled (``precision=`` and
    ``compile=`` on the command line); the rest of the wrapper stays in the input's dtype.

    Methods return tensors of the shape of x: ``forward``/``score_fn`` the score, ``eps`` the
    ε-prediction −s·score and ``x0`` Tweedie's estimate (x + s² score)/α, the last two computed
    directly from the network output where the parameterisation allows, without dividing by s.

    Args:
        net: any module with ``net(x, t) -> tensor shaped like x``.
        sde: the forward SDE (supplies α(t) and s(t)).
        parameterization: one of ``PARAMETERIZATIONS``.
        sigma_data: the data's per-dimension standard deviation assumed by the preconditioning.
        time_input: "log_snr" (default), "t" or "index", see ``network_time``.
    """

    #: smallest t the log-SNR time input resolves (the likelihood's eps); below it τ stays 0
    T_MIN = 1e-5

    def __init__(self, net: nn.Module, sde: SDE, parameterization: str = "eps", sigma_data: float = 1.0,
                 time_input: str = "log_snr"):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ModelError(f"unknown parameterization {parameterization!r}; valid: {', '.join(PARAMETERIZATIONS)}.")
        if not sigma_data > 0:
            raise ModelError(f"sigma_data must be positive, got {sigma_data!r}.")
        if time_input not in TIME_INPUTS:
            raise ModelError(f"unknown time_input {time_input!r}; valid: {', '.join(TIME_INPUTS)}.")
        self.net = net
        self.sde = sde
        self.parameterization = parameterization
        self.sigma_data = float(sigma_data)
        self.time_input = time_input
        self.precision, self.compiled = "fp32", False   # set_precision
        #: the share of training rows whose label was replaced by NULL_LABEL (None: unknown), and the class names
        #: (None: unknown); both set by training and by checkpoints (``models.checkpoint.build_from_spec``)
        self.label_dropout: float | None = None
        self.classes: tuple[str, ...] | None = None
        self._lam_hi = sde.half_log_snr(torch.tensor(self.T_MIN, dtype=torch.float64)).item()
        self._lam_lo = sde.half_log_snr(torch.tensor(sde.T, dtype=torch.float64)).item()

    @property
    def conditional(self) -> bool:
        """Whether the network takes class labels, ``score_fn(x, t, y=...)`` (its ``num_classes`` > 0)."""
        return bool(getattr(self.net, "conditional", False))

    @property
    def predicts_noise(self) -> bool:
        """Whether x̂₀ comes from a prediction of the noise or of the score, which multiplies the network's error by σ
        at high noise (the sampler's start step, docs/math.md §4.3). A network that converts its own output
        (``DiffusersUNet``) declares it; otherwise the parameterization decides: eps and score do, x0 does not."""
        return bool(getattr(self.net, "predicts_noise", self.parameterization in ("eps", "score")))

    @property
    def num_classes(self) -> int:
        """K, the classes of a conditional network (labels 0..K−1, and −1 for none); 0 when unconditional."""
        return int(getattr(self.net, "num_classes", 0)) if self.conditional else 0

    def extra_repr(self) -> str:
        return (f"sde={self.sde!r}, parameterization={self.parameterization!r}, sigma_data={self.sigma_data}, "
                f"time_input={self.time_input!r}")

    def network_time(self, t: Tensor) -> Tensor:
        """What the network is conditioned on: the normalised log-SNR τ ∈ [0, 1] (0 at t = T_MIN, 1 at T),
        t, or the chain index u(t)/(N−1) ∈ [0, 1], fractional between the chain's times.

        τ = (λ(T_MIN) − λ(t))/(λ(T_MIN) − λ(T)) resolves every noise level equally: with t itself,
        t = 1e-5 and t = 1e-3 (noise levels 100× apart for VP) look nearly alike to the embedding.
        """
        if self.time_input == "t":
            return t
        if self.time_input == "index":
            return (self.sde.chain_position(t) / (self.sde.N - 1)).to(t.dtype)
        lam = self.sde.half_log_snr(t.clamp_min(self.T_MIN))
        return ((self._lam_hi - lam) / (self._lam_hi - self._lam_lo)).to(t.dtype)

    def preconditioning(self, x: Tensor, t) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """t as (B,) (a scalar is expanded, checked against x), and α, s and c_in broadcast against x."""
        if x.dim() < 1:
            raise ModelError(f"x must have shape (B, ...), got {tuple(x.shape)}.")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ModelError(f"t must be a scalar or have shape ({x.shape[0]},) for x of shape "
                             f"{tuple(x.shape)}, got {tuple(t.shape)}.")
        alpha = batch_broadcast(self.sde.log_mean_coeff(t).exp().to(x.dtype), x)
        std = batch_broadcast(self.sde.marginal_std(t).to(x.dtype), x)
        return t, alpha, std, torch.rsqrt(alpha**2 * self.sigma_data**2 + std**2)

    def _evaluate(self, x: Tensor, t, cond: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The network output, and α, s and c_in broadcast against x."""
        t, alpha, std, c_in = self.preconditioning(x, t)
        net = self.net
        if self.compiled:
            if self.net not in _COMPILED:
                _COMPILED[self.net] = torch.compile(self.net)
            net = _COMPILED[self.net]
        # Under torch.func transforms (the likelihood's divergence: vjp, vmap) the network runs in x's dtype:
        # autocast does not compose with them, and a divergence is a derivative, which bf16 would blur.
        dtype = None if _transformed() else PRECISIONS[self.precision]
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            out = net(c_in * x, self.network_time(t), **given_cond(cond, self.net))
        return out.to(x.dtype), alpha, std, c_in   # everything past the network in the input's precision

    def set_precision(self, precision: str = "fp32", compile: bool = False) -> "ScoreModel":
        """Run the network's forward under autocast (``"bf16"``, ``"fp16"``; ``"fp32"``: as is) and, with
        ``compile``, through ``torch.compile``; the inputs' scaling, the output's conversion to a score and
        everything the caller does with it stay in the input's dtype. Inside torch.func transforms (the
        likelihood's divergence) autocast is off. Not part of the weights or checkpoints."""
        if precision not in PRECISIONS:
            raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
        self.precision, self.compiled = precision, bool(compile)
        return self

    def forward(self, x: Tensor, t, output: str = "score", **cond) -> Tensor:
        """The score s_θ(x, t), shape of x; t of shape (B,) (or a scalar for the whole batch).

        ``output="eps"`` or ``"x0"`` returns :meth:`eps` or :meth:`x0` instead, so that a wrapper that
        calls only ``forward`` (``DistributedDataParallel``) reaches every parameterisation."""
        if output != "score":
            if output not in ("eps", "x0"):
                raise ModelError(f"output must be score, eps or x0, got {output!r}.")
            return (self.eps if output == "eps" else self.x0)(x, t, **cond)
        out, alpha, std, c_in = self._evaluate(x, t, cond)
        if self.parameterization == "eps":
            return -out / std
        if self.parameterization == "score":
            return out
        return -c_in**2 * x + (alpha * self.sigma_data * c_in / std) * out

    score_fn = forward

    def eps(self, x: Tensor, t, **cond) -> Tensor:
        """The ε-prediction −s(t)·s_θ(x, t) (the target of DDPM's L_simple), shape of x."""
        out, alpha, std, c_in = self._evaluate(x, t, cond)
        if self.parameterization == "eps":
            return out
        if self.parameterization == "score":
            return -std * out
        return std * c_in**2 * x - alpha * self.sigma_data * c_in * out

    def x0(self, x: Tensor, t, **cond) -> Tensor:
        """Tweedie's denoised estimate x̂₀ = (x + s(t)² s_θ(x, t))/α(t), shape of x."""
        out, alpha, std, c_in = self._evaluate(x, t, cond)
        if self.parameterization == "eps":
            return (x - std * out) / alpha
        if self.parameterization == "score":
            return (x + std**2 * out) / alpha
        return alpha * self.sigma_data**2 * c_in**2 * x + std * self.sigma_data * c_in * out


# ---- factory ---------------------------------------------------------------------------------

#: Network kind → class, for ``build_network`` (and a ``conf/model/<kind>.yaml``).
NETWORKS: dict[str, type[nn.Module]] = {"mlp": MLPScoreNet, "unet": UNet}
#: The constructor arguments of each kind that ``build_network`` derives from the event shape.
DERIVED_ARGS: dict[str, tuple[str, ...]] = {"mlp": ("dim",), "unet": ("in_channels", "image_size")}


def checked_event_shape(event_shape, derived: tuple[str, ...], kwargs: dict, what: str) -> tuple[int, ...]:
    """``event_shape`` as a tuple of positive ints, checked, and none of the ``derived`` arguments (which come
    from it) among ``kwargs``: the checks ``build_network`` and ``models.classifier.build_classifier`` share."""
    try:
        shape = tuple(operator.index(n) for n in event_shape)
    except TypeError:
        shape = ()
    if not shape or min(shape) < 1:
        raise ModelError(f"event_shape must be a non-empty tuple of positive integers, got {event_shape!r}.")
    clash = sorted(set(derived) & set(kwargs))
    if clash:
        raise ModelError(f"{', '.join(clash)} for {what} come from event_shape; do not pass them.")
    return shape


def build_network(kind: str, event_shape: tuple[int, ...], **kwargs) -> nn.Module:
    """Build a network for samples of shape ``event_shape``.

    "mlp": ``MLPScoreNet(dim=prod(event_shape), **kwargs)`` (any event shape; flattened inside).
    "unet": ``UNet(in_channels=C, image_size=H, **kwargs)`` for event_shape (C, H, W), H == W
    divisible by 2^(levels − 1). The network keeps what rebuilds it as ``net.spec`` (kind, event shape, kwargs),
    which checkpoints store.
    """
    if kind not in NETWORKS:
        raise ModelError(f"unknown network kind {kind!r}; available: {', '.join(NETWORKS)}.")
    event_shape = checked_event_shape(event_shape, DERIVED_ARGS[kind], kwargs, f"a {kind} network")
    if kind == "mlp":
        net = MLPScoreNet(math.prod(event_shape), **kwargs)
    else:
        if len(event_shape) != 3 or event_shape[1] != event_shape[2]:
            raise ModelError(f"a unet needs square images, event_shape (C, H, W) with H == W, e.g. (1, 8, 8) or "
                             f"(3, 32, 32); got {event_shape}: crop them square (data.resolution).")
        net = UNet(in_channels=event_shape[0], image_size=event_shape[1], **kwargs)
    # num_classes=0 is the unconditional network of before: its spec stays the same, so old runs resume
    net.spec = {"kind": kind, "event_shape": list(event_shape),
                **{k: v for k, v in kwargs.items() if not (k == "num_classes" and v == 0)}}
    return net


def build_score_model(sde: SDE, kind: str, event_shape: tuple[int, ...], parameterization: str = "x0",
                      time_input: str = "log_snr", sigma_data: float = 1.0, **net_kwargs) -> ScoreModel:
    """A ``ScoreModel`` around a fresh ``build_network(kind, event_shape, **net_kwargs)``: what ``task=train`` trains."""
    return ScoreModel(build_network(kind, event_shape, **net_kwargs), sde, parameterization=parameterization,
                      sigma_data=sigma_data, time_input=time_input)
