"""diffusers models as SDE + score (``ckpt=diffusers:DIR``, docs/diffusers.md): against diffusers' own schedulers.

Every test builds a tiny randomly initialised ``UNet2DModel`` (8×8, channels (4, 8), its output layer
randomised so that it is not zero) and saves its pipeline with ``save_pretrained``; nothing is downloaded.
Exactness tests run diffusers' scheduler loop by hand (its pipelines clip and rescale their outputs), in
float64 where the comparison is to machine precision: there ᾱ is the float64 product of the scheduler's
betas, which is what its float32 table rounds.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

import solvers  # noqa: E402
from models import ScoreModel  # noqa: E402
from models.from_diffusers import (VP_SCHEDULERS, DiffusersError, diffusers_score_model, inspect_pipeline,  # noqa: E402
                                   load_pipeline)
from sde_lib import VESDE, TabulatedVPSDE  # noqa: E402
from solvers.base import CountedScore  # noqa: E402
from solvers.pc import Step, ancestral_predictor, langevin_corrector, reverse_diffusion_predictor  # noqa: E402
from tasks_lib import compose, resolve_model  # noqa: E402

F32, F64 = torch.float32, torch.float64
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "HF_HUB_OFFLINE": "1"}
CPU = torch.device("cpu")
PC_OPTIONS = solvers.get_solver("pc").Options      # the predictors' and correctors' options


def tiny_unet(channels: int = 1, fourier: bool = False, smooth_in_time: bool = False, seed: int = 0):
    """A random UNet2DModel on 8×8 images; ``fourier``: NCSN++'s σ embedding (score SDE VE).

    ``smooth_in_time`` drops the embedding's fastest frequency (1 radian per timestep): a trained DDPM
    varies smoothly between timesteps, a random one with that phase does not, and no 1000-step chain resolves it.
    """
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(4, 8),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=2,
                                 time_embedding_type="fourier" if fourier else "positional")
    with torch.no_grad():
        unet.conv_out.weight.normal_(0.0, 0.1)
        if smooth_in_time:   # embedding [cos(f t), cos(f' t), sin(f t), sin(f' t)], f = 1, f' = 0.01
            unet.time_embedding.linear_1.weight[:, [0, 2]] = 0.0
    return unet.eval()


def save_ddim(path: Path, unet, beta_schedule: str = "linear", prediction_type: str = "epsilon", **config):
    """A DDIMPipeline in ``path``: no clipping, ``trailing`` timesteps (the first is N − 1, i.e. t = T), and the last
    step ending at ᾱ_0 (``set_alpha_to_one=False``), i.e. at t = 1/N."""
    scheduler = diffusers.DDIMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type,
                                        clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing",
                                        **config)
    diffusers.DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return scheduler


def in_float64(scheduler):
    """The scheduler's ᾱ table as the float64 product of its betas (its float32 table is that, rounded)."""
    scheduler.alphas_cumprod = torch.cumprod(1 - scheduler.betas.double(), 0)
    scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]
    return scheduler


class Draws:
    """A noise source handing out given draws in order (what solvers.noise.NoiseSource.normal returns)."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def normal(self, shape, dtype, device):
        return self.draws.pop(0).to(dtype)


# ---- the VP converter against diffusers' samplers -------------------------------------------------------

@pytest.mark.parametrize("dtype,beta_schedule,prediction_type", [
    (F64, "linear", "epsilon"), (F64, "linear", "v_prediction"), (F64, "squaredcos_cap_v2", "epsilon"),
    (F64, "squaredcos_cap_v2", "v_prediction"), (F32, "linear", "epsilon"), (F32, "linear", "v_prediction")])
def test_ddim_on_the_schedulers_timesteps_is_diffusers_ddim(tmp_path, dtype, beta_schedule, prediction_type):
    """Our ``ddim`` on the times of the scheduler's timesteps (index i ↔ ``chain_times()[i]`` = (i + 1)/N) from the
    same noise is DDIM(η = 0): to 1e-10 in float64, to 1e-5 (relative to the largest value) in float32.

    (In float32 the cosine schedule's first step, at ᾱ = 2.4e-9, loses its x̂₀ to the score's rounding, like
    any ε or score parameterisation there; diffusers' v-prediction path does not go through ε.)
    """
    unet = tiny_unet()
    scheduler = save_ddim(tmp_path, unet, beta_schedule, prediction_type)
    sde, model, info = load_pipeline(tmp_path)
    assert isinstance(sde, TabulatedVPSDE) and isinstance(model, ScoreModel) and info.prediction_type == prediction_type
    if dtype == F64:
        unet, model, scheduler = unet.double(), model.double(), in_float64(scheduler)
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.tolist() == [999, 799, 599, 399, 199]
    z = torch.randn(3, 1, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(1))
    x = z.clone()
    with torch.no_grad():
        for i in scheduler.timesteps:
            x = scheduler.step(unet(x, i).sample, i, x, eta=0.0).prev_sample
    times = sde.chain_times()
    grid = [times[i].item() for i in scheduler.timesteps] + [times[0].item()]
    ours = solvers.sample(sde, model, z=z, solver="ddim", grid="user", times=grid, eps=grid[-1])
    assert ours.nfe == 5
    tolerance = 1e-10 if dtype == F64 else 1e-5
    assert (ours.samples - x).abs().max() <= tolerance * x.abs().max()


def test_tight_pf_ode_agrees_with_1000_step_ddim(tmp_path):
    """The PF-ODE (dopri5, rtol 1e-5) from t = 1 to t = 1/N against diffusers' DDIM over all 1000 timesteps: the
    first-order chain is within O(1/N) of the flow (here 2e-3 of the samples' RMS)."""
    unet = tiny_unet(smooth_in_time=True)
    scheduler = save_ddim(tmp_path, unet, "linear", "v_prediction")   # v: samples of unit scale for a random net
    sde, model, _ = load_pipeline(tmp_path)
    scheduler.set_timesteps(1000)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    x = z.clone()
    with torch.no_grad():
        for i in scheduler.timesteps:
            x = scheduler.step(unet(x, i).sample, i, x, eta=0.0).prev_sample
    ode = solvers.sample(sde, model, z=z, solver="pf_ode", eps=sde.chain_times()[0].item(), rtol=1e-5, atol=1e-5)
    rms = (ode.samples - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt()
    assert 1e-4 < rms < 4e-3


def test_ancestral_step_is_ddpm_step(tmp_path):
    """One ``ancestral`` step (variance="posterior") at chain index i is DDPMScheduler.step at timestep i
    (``fixed_small``: β̃_i) from the same x and noise; at i = 0 neither adds noise."""
    unet = tiny_unet(seed=3).double()
    save_ddim(tmp_path, unet)
    sde, model, _ = load_pipeline(tmp_path)
    model.double()
    ddpm = in_float64(diffusers.DDPMScheduler(clip_sample=False, variance_type="fixed_small"))
    ddpm.set_timesteps(1000)
    x = torch.randn(2, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(4))
    times = sde.chain_times()
    for i in (999, 500, 0):
        noise = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            theirs = ddpm.step(unet(x, i).sample, i, x, generator=torch.Generator().manual_seed(i)).prev_sample
            step = Step(times[i] * torch.ones(2, dtype=F64), None, i)
            ours, _ = ancestral_predictor(sde, CountedScore(model), x, step, Draws(noise),
                                          PC_OPTIONS(variance="posterior"))
        assert (ours - theirs).abs().max() <= 1e-10 * theirs.abs().max()


class AsPrediction(nn.Module):
    """An ε-UNet re-expressed as a ``sample`` (x̂₀ = (x − s ε)/α) or ``v_prediction`` (v = α ε − s x̂₀) UNet, with
    α, s from the scheduler's own table at the (integer) timestep."""

    def __init__(self, unet, alphas_cumprod, prediction_type):
        super().__init__()
        self.unet, self.alphas_cumprod, self.prediction_type = unet, alphas_cumprod, prediction_type

    def forward(self, sample, timestep, return_dict=False):
        eps = self.unet(sample, timestep).sample
        alpha_bar = self.alphas_cumprod[timestep.round().long()].to(sample.dtype)[:, None, None, None]
        alpha, std = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x0 = (sample - std * eps) / alpha
        return (x0 if self.prediction_type == "sample" else alpha * eps - std * x0,)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_sample_and_v_predictions_give_the_epsilon_models_score(tmp_path, prediction_type):
    unet = tiny_unet(seed=5).double()
    scheduler = in_float64(save_ddim(tmp_path, unet))
    sde, eps_model, _ = load_pipeline(tmp_path)
    eps_model.double()
    other = diffusers_score_model(AsPrediction(unet, scheduler.alphas_cumprod, prediction_type), sde, prediction_type)
    x = torch.randn(4, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(6))
    t = sde.chain_times()[[0, 10, 500, 999]]
    with torch.no_grad():
        ours, theirs = other(x, t), eps_model(x, t)
    assert (ours - theirs).abs().max() <= 1e-9 * theirs.abs().max()
    # the same score, but only ε reaches x̂₀ multiplied by σ: no start step for the sampler (docs/math.md §4.3)
    assert eps_model.predicts_noise and not other.predicts_noise


def test_every_vp_scheduler_gives_the_same_beta_table(tmp_path):
    """The listed schedulers share DDPM's β tables; a pipeline saved with any of them converts to that table."""
    for schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        reference = diffusers.DDPMScheduler(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012).betas
        for name in VP_SCHEDULERS:
            betas = getattr(diffusers, name)(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012).betas
            assert torch.equal(betas, reference), (name, schedule)
    scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=scheduler).save_pretrained(tmp_path)
    sde, _, info = load_pipeline(tmp_path)
    assert info.scheduler_class == "EulerDiscreteScheduler" and info.prediction_type == "v_prediction"
    assert torch.equal(torch.tensor(sde.betas), scheduler.betas.double())


# ---- score SDE (VE) ---------------------------------------------------------------------------------------

@pytest.fixture
def ve_pipeline(tmp_path):
    unet = tiny_unet(channels=3, fourier=True, seed=7)
    scheduler = diffusers.ScoreSdeVeScheduler(num_train_timesteps=100, sigma_min=0.01, sigma_max=50.0, snr=0.16)
    diffusers.ScoreSdeVePipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    sde, model, info = load_pipeline(tmp_path)
    assert sde == VESDE(sigma_min=0.01, sigma_max=50.0, N=100) and info.prediction_type == "score"
    return unet.double(), scheduler, sde, model.double()


def test_ve_score_is_the_unets_output_at_the_schedulers_sigmas(ve_pipeline):
    unet, scheduler, sde, model = ve_pipeline
    scheduler.set_timesteps(10)
    scheduler.set_sigmas(10)
    x = 5 * torch.randn(2, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(8))
    for sigma in scheduler.sigmas.double():
        t = sde.t_from_half_log_snr(-sigma.log())                  # σ(t) = σ, VE's λ = −log σ
        with torch.no_grad():
            ours, theirs = model(x, t.expand(2)), unet(x, sigma.expand(2)).sample
        assert (ours - theirs).abs().max() <= 1e-10 * theirs.abs().max()


def test_one_pc_step_is_step_correct_then_step_pred(ve_pipeline):
    """Langevin corrector then reverse-diffusion predictor on the n-level chain, from the same x and noise, are
    diffusers' step_correct then step_pred (to its float32 σ table's rounding)."""
    unet, scheduler, sde, model = ve_pipeline
    n, k = 10, 3
    scheduler.set_timesteps(n)    # what ScoreSdeVePipeline does
    scheduler.set_sigmas(n)
    x = 5 * torch.randn(2, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(9))
    sigma = scheduler.sigmas[k].double().expand(2)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(10)
        theirs = scheduler.step_correct(unet(x, sigma).sample, x, generator=generator).prev_sample
        theirs = scheduler.step_pred(unet(theirs, sigma).sample, scheduler.timesteps[k], theirs, generator=generator)
        replay = torch.Generator().manual_seed(10)   # step_correct draws float32 noise, step_pred the sample's dtype
        noise = Draws(torch.randn(x.shape, generator=replay), torch.randn(x.shape, generator=replay, dtype=F64))
        step = Step(sde.t_from_half_log_snr(-sigma.log()), None, n - 1 - k)   # timesteps[k] ↔ level n − 1 − k
        chain, score, options = sde.with_steps(n), CountedScore(model), PC_OPTIONS(snr=0.16)
        ours, _ = langevin_corrector(chain, score, x, step, noise, options)
        ours, ours_mean = reverse_diffusion_predictor(chain, score, ours, step, noise, options)
    scale = theirs.prev_sample.abs().max()
    assert (ours - theirs.prev_sample).abs().max() <= 1e-6 * scale
    assert (ours_mean - theirs.prev_sample_mean).abs().max() <= 1e-6 * scale


# ---- what is refused, and how -----------------------------------------------------------------------------

def _edit_json(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A DDIM pipeline (linear, v_prediction) shared by the command-line tests."""
    path = tmp_path_factory.mktemp("ddim")
    save_ddim(path, tiny_unet(smooth_in_time=True), "linear", "v_prediction")
    return path


@pytest.fixture
def broken(tmp_path, pipeline_dir):
    """A copy of the pipeline directory to spoil."""
    copy = tmp_path / "pipe"
    shutil.copytree(pipeline_dir, copy)
    return copy


#: How a good pipeline directory is spoilt, and what the refusal says.
REFUSALS = {
    "missing": "no such directory",
    "not_a_pipeline": "not a diffusers pipeline directory",
    "scheduler": "scheduler LCMScheduler is not supported; supported: DDPMScheduler, DDIMScheduler",
    "prediction_type": "prediction_type 'flow' is not supported; supported: epsilon, v_prediction, sample",
    "zero_terminal_snr": "rescale_betas_zero_snr",
    "conditional": "class-conditional",
}


def spoil(directory: Path, case: str) -> Path:
    """The pipeline ``directory`` spoilt as ``case`` (a key of REFUSALS) says; the path to give as ckpt."""
    scheduler = directory / "scheduler" / "scheduler_config.json"
    if case == "missing":
        return directory / "nowhere"
    if case == "not_a_pipeline":
        (directory / "model_index.json").unlink()
    elif case == "scheduler":
        _edit_json(scheduler, _class_name="LCMScheduler")
    elif case == "prediction_type":
        _edit_json(scheduler, prediction_type="flow")
    elif case == "zero_terminal_snr":
        _edit_json(scheduler, rescale_betas_zero_snr=True)
    elif case == "conditional":
        _edit_json(directory / "unet" / "config.json", num_class_embeds=10)
    return directory


@pytest.mark.parametrize("case", REFUSALS)
def test_inspect_refuses_what_it_cannot_convert(broken, case):
    with pytest.raises(DiffusersError, match=REFUSALS[case]):
        inspect_pipeline(spoil(broken, case))


def test_a_missing_diffusers_package_is_one_clear_error(pipeline_dir, monkeypatch):
    import models.from_diffusers as module

    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DiffusersError, match=r'not installed: pip install -e "\.\[diffusers\]"'):
        inspect_pipeline(pipeline_dir)


def test_resolve_model_applies_sde_n_and_refuses_other_overrides(pipeline_dir, tmp_path):
    ckpt = f"ckpt=diffusers:{pipeline_dir}"
    model = resolve_model(compose(ckpt, "sde.N=50"), {"ckpt", "sde.N"}, CPU)
    assert model.source == "diffusers" and model.data is None and model.event_shape == (1, 8, 8)
    assert model.sde == TabulatedVPSDE(model.sde.betas, N=50) and model.score_fn.sde.N == 1000
    for overrides, message in [(("sde=vp",), r"brings its own SDE, from its DDIMScheduler \(linear, 1000 steps, "
                                             r"v_prediction\); drop sde"),
                               (("sde.beta_max=10",), "drop sde.beta_max"),
                               (("model.net.hidden=8",), "brings its own network"),
                               (("task=likelihood",), r"give data= with samples of its shape \(1, 8, 8\)"),
                               (("task=compare",), "task=compare scores held-out data")]:
        with pytest.raises(ValueError, match=message):
            resolve_model(compose(ckpt, *overrides), {"ckpt", *(o.split("=")[0] for o in overrides)}, CPU)
    np.save(tmp_path / "wrong.npy", np.zeros((10, 3, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape \(3, 8, 8\), but ckpt=diffusers:.* models shape \(1, 8, 8\)"):
        resolve_model(compose(ckpt, "data=array", f"data.path={tmp_path / 'wrong.npy'}"), {"ckpt", "data", "data.path"},
                      CPU)


# ---- the command line -------------------------------------------------------------------------------------

def run_cli(*args, cwd, env=ENV):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={cwd}"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def test_cli_samples_without_data_and_says_so(pipeline_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(f"ckpt=diffusers:{pipeline_dir}", "task=sample", "task.n_samples=4", "solver=ddim", "solver.steps=5",
                   cwd=out)
    assert proc.returncode == 0, proc.stderr
    assert "TabulatedVPSDE on no data, diffusers model" in proc.stdout and "no data= given" in proc.stdout
    assert np.load(out / "samples.npz")["samples"].shape == (4, 1, 8, 8)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "diffusers" and metrics["nfe"] == 5 and "nll_nats" not in metrics


def test_cli_likelihood_of_array_data(pipeline_dir, tmp_path):
    data = tmp_path / "images.npy"
    np.save(data, np.random.default_rng(0).uniform(-1, 1, (20, 1, 8, 8)).astype(np.float32))
    out = tmp_path / "run"
    proc = run_cli(f"ckpt=diffusers:{pipeline_dir}", "task=likelihood", "data=array", f"data.path={data}",
                   "likelihood.n_eval=2", "likelihood.rtol=1e-3", "likelihood.atol=1e-3", cwd=out)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == "array" and metrics["n_eval"] == 2 and np.isfinite(metrics["nll_nats"])


def _no_diffusers_env(tmp_path: Path) -> dict:
    """An environment in which ``import diffusers`` fails, as without the package."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['diffusers'] = None\n")
    return {**ENV, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}


@pytest.mark.parametrize("case", ["missing", "not_a_pipeline", "scheduler", "prediction_type", "not_installed",
                                  "hub_offline", "likelihood_without_data", "sde_override"])
def test_cli_bad_input_is_one_error_line_before_any_work(broken, tmp_path, case):
    source, env = spoil(broken, case), ENV
    expected = {**REFUSALS, "not_installed": 'pip install -e ".[diffusers]"', "hub_offline": "could not be fetched",
                "likelihood_without_data": "task=likelihood scores held-out data", "sde_override": "drop sde"}[case]
    if case == "not_installed":
        env = _no_diffusers_env(tmp_path)
    if case == "hub_offline":
        source, env = "nobody/no-such-model", {**ENV, "HF_HOME": str(tmp_path / "hf")}
    extra = {"likelihood_without_data": ["task=likelihood"], "sde_override": ["sde=ve"]}.get(case, [])
    out = tmp_path / "run"
    proc = run_cli(f"ckpt=diffusers:{source}", *extra, cwd=out, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert not out.exists() or not any(out.iterdir())
