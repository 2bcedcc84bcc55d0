"""Models trained with HuggingFace diffusers, as an SDE and a ``ScoreModel`` (docs/diffusers.md).

A pipeline directory written by ``pipeline.save_pretrained(DIR)`` (``model_index.json``, ``unet/``,
``scheduler/``) becomes what every sampler, the ODE likelihood and the bound take:

- a discrete VP scheduler (DDPM, DDIM, PNDM, Euler, DPM-Solver, ...; any ``beta_schedule`` or
  ``trained_betas``) becomes ``TabulatedVPSDE`` of its β table: diffusers' timestep i sits at
  t_i = (i + 1)/N, and the UNet's ε, x₀ or v output becomes ε;
- ``ScoreSdeVeScheduler`` (NCSN++, ``ScoreSdeVePipeline``) becomes ``VESDE(σ_min, σ_max, N)``; its UNet
  takes σ and returns the score.

:func:`inspect_pipeline` reads only the JSON files, so a directory that is not a supported pipeline is
refused in a moment, before diffusers is imported or a weight is read; :func:`load_pipeline` builds the
model. diffusers is an optional dependency (``pip install -e ".[diffusers]"``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from pathlib import Path
import torch
from torch import nn

from models.errors import ModelError
from models.networks import ScoreModel
from sde_lib import SDE, VESDE, TabulatedVPSDE, batch_broadcast

Tensor = torch.Tensor

__all__ = ["DiffusersError", "PipelineInfo", "DiffusersUNet", "inspect_pipeline", "load_pipeline",
           "diffusers_score_model", "VP_SCHEDULERS", "VE_SCHEDULERS", "PREDICTION_TYPES", "BETA_SCHEDULES",
           "SIGMA_DATA", "diffusers_installed"]

#: Schedulers whose β table defines the model's noise levels (their sampling options do not matter here).
VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                 "LMSDiscreteScheduler", "HeunDiscreteScheduler")
VE_SCHEDULERS = ("ScoreSdeVeScheduler",)
#: What a VP UNet's output can be (the scheduler's ``prediction_type``).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
#: The data scale the models are given (``ScoreModel.sigma_data``, used by the solvers' focus grid and angle
#: variable): EDM's value for images in [−1, 1]. The input scaling it implies is undone for the UNet.
SIGMA_DATA = 0.5
_INSTALL = 'pip install -e ".[diffusers]"'
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DiffusersError(ModelError):
    """A diffusers pipeline that cannot be used: missing, not a pipeline, an unsupported scheduler or output."""


def diffusers_installed() -> bool:
    """Whether the diffusers package can be imported (checked without importing it)."""
    return importlib.util.find_spec("diffusers") is not None


@dataclasses.dataclass
class PipelineInfo:
    """What a pipeline directory's JSON files say: enough to refuse it, or to build its model.

    Attributes:
        path: the pipeline directory.
        scheduler_class: the scheduler's class name (one of ``VP_SCHEDULERS`` or ``VE_SCHEDULERS``).
        scheduler_config: the scheduler's config (``scheduler/scheduler_config.json``).
        prediction_type: "epsilon", "v_prediction" or "sample" for VP; "score" for VE.
        event_shape: (C, H, W) of one sample.
    """

    path: Path
    scheduler_class: str
    scheduler_config: dict
    prediction_type: str
    event_shape: tuple[int, int, int]

    @property
    def is_ve(self) -> bool:
        return self.scheduler_class in VE_SCHEDULERS

    def describe(self) -> str:
        """One phrase naming the scheduler and its schedule, for messages."""
        c = self.scheduler_config
        if self.is_ve:
            return f"{self.scheduler_class}(sigma_min={c.get('sigma_min')}, sigma_max={c.get('sigma_max')})"
        schedule = "trained_betas" if c.get("trained_betas") is not None else c.get("beta_schedule", "linear")
        steps = c.get("num_train_timesteps", 1000)
        return f"{self.scheduler_class} ({schedule}, {steps} steps, {self.prediction_type})"


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DiffusersError(f"{path.parent} has no {path.name}: {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DiffusersError(f"{path} is not readable JSON ({type(err).__name__}); save the pipeline again with "
                             "pipeline.save_pretrained(DIR).") from None
    if not isinstance(data, dict):
        raise DiffusersError(f"{path} holds a {type(data).__name__}, not a diffusers config.")
    return data


def _pipeline_dir(source: str) -> Path:
    """The local directory of ``source``: itself, or for a Hub id (owner/name) its snapshot, fetched or cached."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise DiffusersError(f"{source} is a file; ckpt=diffusers:DIR takes the directory of a pipeline saved with "
                             "pipeline.save_pretrained(DIR).")
    if not _HUB_ID.match(source):
        raise DiffusersError(f"no diffusers pipeline at {source}: no such directory; give the directory of a pipeline "
                             "saved with pipeline.save_pretrained(DIR).")
    try:
        from huggingface_hub import snapshot_download
        # etag_timeout bounds each request: offline (HF_HUB_OFFLINE=1, or no connection) this fails, never hangs
        return Path(snapshot_download(source, allow_patterns=["model_index.json", "scheduler/*", "unet/*"],
                                      etag_timeout=10))
    except Exception as err:   # huggingface_hub raises many types (offline, unknown repo, network)
        reason = (str(err).splitlines() or [type(err).__name__])[0].split(". ")[0][:200]
        raise DiffusersError(f"no diffusers pipeline at {source}: no such directory, and as a Hugging Face Hub id it "
                             f"could not be fetched ({reason}); download it where there is a connection and give its "
                             "local directory.") from None


def inspect_pipeline(source: str | os.PathLike) -> PipelineInfo:
    """Check a pipeline directory (or Hub id) from its JSON files alone; a DiffusersError says what does not fit.

    Refused: diffusers not installed, a missing directory, one without ``model_index.json``, a pipeline other
    than a UNet2DModel with its scheduler (latent, text-conditioned or class-conditional ones), a scheduler
    not in ``VP_SCHEDULERS``/``VE_SCHEDULERS``, a ``prediction_type`` not in ``PREDICTION_TYPES``, a schedule
    whose last ᾱ is 0 (``rescale_betas_zero_snr``), and a UNet whose output does not have the input's shape.
    """
    if not diffusers_installed():
        raise DiffusersError(f"ckpt=diffusers:... needs the diffusers package, which is not installed: {_INSTALL}")
    path = _pipeline_dir(str(source))
    index = _read_json(path / "model_index.json", "it is not a diffusers pipeline directory; give the directory "
                                                  "written by pipeline.save_pretrained(DIR) (model_index.json, "
                                                  "unet/, scheduler/).")
    components = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    if not {"unet", "scheduler"} <= components or components - {"unet", "scheduler"}:
        raise DiffusersError(f"{path} is a {index.get('_class_name', 'diffusers')} pipeline with components "
                             f"{', '.join(sorted(components)) or 'none'}; only unconditional pixel-space pipelines (a "
                             "unet and its scheduler: DDPMPipeline, DDIMPipeline, ScoreSdeVePipeline) are supported.")
    unet = _read_json(path / "unet" / "config.json", "the pipeline has no UNet config; save it again.")
    if unet.get("_class_name", index["unet"][-1]) != "UNet2DModel":
        raise DiffusersError(f"{path}: the unet is a {unet.get('_class_name')}; only UNet2DModel is supported.")
    if unet.get("num_class_embeds") is not None or unet.get("class_embed_type") is not None:
        raise DiffusersError(f"{path}: the UNet is class-conditional; only unconditional UNet2DModels are supported.")
    if not any(p.name.startswith("diffusion_pytorch_model") for p in (path / "unet").iterdir()):
        raise DiffusersError(f"{path / 'unet'} holds no weights (diffusion_pytorch_model.safetensors); save the "
                             "pipeline again.")
    scheduler = _read_json(path / "scheduler" / "scheduler_config.json", "the pipeline has no scheduler config; "
                                                                         "save it again.")
    name = scheduler.get("_class_name", index["scheduler"][-1])
    if name not in VP_SCHEDULERS + VE_SCHEDULERS:
        raise DiffusersError(f"{path}: scheduler {name} is not supported; supported: "
                             f"{', '.join(VP_SCHEDULERS + VE_SCHEDULERS)}.")
    prediction = "score" if name in VE_SCHEDULERS else scheduler.get("prediction_type", "epsilon")
    if name in VP_SCHEDULERS:
        if prediction not in PREDICTION_TYPES:
            raise DiffusersError(f"{path}: prediction_type {prediction!r} is not supported; supported: "
                                 f"{', '.join(PREDICTION_TYPES)}.")
        schedule = scheduler.get("beta_schedule", "linear")
        if scheduler.get("trained_betas") is None and schedule not in BETA_SCHEDULES:
            raise DiffusersError(f"{path}: beta_schedule {schedule!r} is not supported; supported: "
                                 f"{', '.join(BETA_SCHEDULES)}, or trained_betas.")
        if scheduler.get("rescale_betas_zero_snr"):
            raise DiffusersError(f"{path}: rescale_betas_zero_snr makes the last ᾱ zero, a noise level no VP SDE "
                                 "with a Gaussian prior reaches; such models are not supported.")
        if scheduler.get("timestep_type", "discrete") != "discrete":
            raise DiffusersError(f"{path}: timestep_type {scheduler['timestep_type']!r} conditions the UNet on σ, "
                                 "not on the step index; only timestep_type 'discrete' is supported.")
    channels, size = unet.get("in_channels", 3), unet.get("sample_size")
    height, width = (size, size) if isinstance(size, int) else tuple(size or (None, None))
    if not all(isinstance(n, int) and n > 0 for n in (channels, height, width)):
        raise DiffusersError(f"{path}: the UNet config gives no sample shape (in_channels, sample_size).")
    out = unet.get("out_channels", channels)
    if out not in (channels, 2 * channels) or (out != channels and not _learned_variance(scheduler)):
        raise DiffusersError(f"{path}: the UNet maps {channels} channels to {out}; only outputs of the input's shape "
                             "(or with a learned variance, twice its channels) are supported.")
    return PipelineInfo(path, name, scheduler, prediction, (channels, height, width))


def _learned_variance(scheduler_config: dict) -> bool:
    """Whether the UNet also outputs a variance (improved DDPM): its second C channels, which are dropped."""
    return scheduler_config.get("variance_type") in ("learned", "learned_range")


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` as the ``net(x_in, t)`` of a ``ScoreModel`` with ``time_input="t"``.

    ``ScoreModel`` hands the network c_in·x with c_in = 1/√(α² σ_data² + s²); the UNet was trained on x
    itself, so the scaling is undone first. The UNet's timestep is, for a VP model, the fractional
    training index u(t) = ``sde.chain_position(t)`` (t_i = (i + 1)/N ↦ i, linear between, a float off
    the integers: diffusers' sinusoidal embedding takes any real); for a VE model σ(t). The output goes
    back as ε for VP (``ScoreModel(parameterization="eps")``): ε itself, ε = (x − α x̂₀)/s from
    ``sample``, ε = α v + s x from ``v_prediction`` (v = α ε − s x₀); and as the score for VE
    (``parameterization="score"``; NCSN++ divides by σ inside). The UNet runs in its own dtype; the
    solver's state stays in its own.

    Args:
        unet: the UNet2DModel (or any module called as ``unet(sample, timestep, return_dict=False)``).
        sde: the model's SDE (TabulatedVPSDE or VESDE), the ``ScoreModel``'s own.
        prediction_type: "epsilon", "v_prediction", "sample" (VP) or "score" (VE).
        sigma_data: the ``ScoreModel``'s σ_data, whose input scaling is undone.
        channels: C of the data; a learned-variance UNet's extra channels are dropped.
    """

    def __init__(self, unet: nn.Module, sde: SDE, prediction_type: str, sigma_data: float = SIGMA_DATA,
                 channels: int | None = None):
        super().__init__()
        if prediction_type not in (*PREDICTION_TYPES, "score"):
            raise DiffusersError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)} or score, got "
                                 f"{prediction_type!r}.")
        if (prediction_type == "score") != isinstance(sde, VESDE):
            raise DiffusersError(f"prediction_type {prediction_type!r} does not go with {type(sde).__name__}: "
                                 "score needs a VESDE, the others a VP SDE.")
        self.unet, self.sde, self.prediction_type = unet, sde, prediction_type
        #: ε and the score reach x̂₀ multiplied by σ; v (x̂₀ = α x − s v) and the sample itself do not
        self.predicts_noise = prediction_type in ("epsilon", "score")
        self.sigma_data, self.channels = float(sigma_data), channels

    def timestep(self, t: Tensor) -> Tensor:
        """What diffusers' UNet is called with at time t (B,): the training index u(t) (VP) or σ(t) (VE)."""
        return self.sde.sigma(t) if isinstance(self.sde, VESDE) else self.sde.chain_position(t)

    def forward(self, x_in: Tensor, t: Tensor) -> Tensor:
        alpha = batch_broadcast(self.sde.log_mean_coeff(t).exp().to(x_in.dtype), x_in)
        std = batch_broadcast(self.sde.marginal_std(t).to(x_in.dtype), x_in)
        x = x_in / torch.rsqrt(alpha**2 * self.sigma_data**2 + std**2)     # ScoreModel's c_in, undone
        dtype = next(self.unet.parameters()).dtype
        out = self.unet(x.to(dtype), self.timestep(t).to(dtype), return_dict=False)[0].to(x.dtype)
        if self.channels is not None:
            out = out[:, :self.channels]
        if self.prediction_type == "v_prediction":
            return alpha * out + std * x
        if self.prediction_type == "sample":
            return (x - alpha * out) / std
        return out


def load_pipeline(source: str | os.PathLike | PipelineInfo,
                  device: str | torch.device = "cpu") -> tuple[SDE, ScoreModel, PipelineInfo]:
    """(sde, score model, info) of a diffusers pipeline directory (or Hub id), in eval mode on ``device``.

    The SDE is built from the scheduler diffusers itself instantiates (its float32 β table, read exactly);
    the model is a ``ScoreModel`` around :class:`DiffusersUNet`, so every solver gets the same object type
    as for this project's checkpoints. Raises DiffusersError for anything :func:`inspect_pipeline` refuses,
    or weights diffusers cannot read.
    """
    info = source if isinstance(source, PipelineInfo) else inspect_pipeline(source)
    import diffusers

    try:
        scheduler = getattr(diffusers, info.scheduler_class).from_config(info.scheduler_config)
        unet = diffusers.UNet2DModel.from_pretrained(info.path, subfolder="unet", low_cpu_mem_usage=False)
    except Exception as err:   # diffusers raises OSError, ValueError, safetensors' errors, ...
        reason = str(err).splitlines()[0][:160] if str(err) else ""
        raise DiffusersError(f"diffusers could not load {info.path} ({type(err).__name__}: {reason}); save the "
                             "pipeline again.") from None
    c = info.scheduler_config
    if info.is_ve:
        sde: SDE = VESDE(sigma_min=scheduler.config.sigma_min, sigma_max=scheduler.config.sigma_max,
                         N=scheduler.config.num_train_timesteps)
    else:
        sde = TabulatedVPSDE(betas=scheduler.betas.double())
    channels = info.event_shape[0] if _learned_variance(c) else None   # a learned variance's channels dropped
    model = diffusers_score_model(unet, sde, info.prediction_type, channels)
    return sde, model.to(device).eval().requires_grad_(False), info


def diffusers_score_model(unet: nn.Module, sde: SDE, prediction_type: str, channels: int | None = None) -> ScoreModel:
    """A diffusers UNet as ``score_fn(x, t)``: ``ScoreModel(DiffusersUNet(...), sde, "eps"/"score", time_input="t")``.

    ``prediction_type``: "epsilon", "v_prediction" or "sample" with a VP ``sde``, "score" with a VESDE; ``channels``:
    the data's C when the UNet also outputs a learned variance. σ_data is :data:`SIGMA_DATA`.
    """
    net = DiffusersUNet(unet, sde, prediction_type, SIGMA_DATA, channels)
    return ScoreModel(net, sde, parameterization="score" if prediction_type == "score" else "eps",
                      sigma_data=SIGMA_DATA, time_input="t")

