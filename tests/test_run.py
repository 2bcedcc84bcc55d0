"""The application: config groups compose and are typed, the CLI runs every task end to end, bad input fails clearly."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

import solvers
from core_lib import UserError
from sde_lib import SDE
from tasks_lib import compose, resolve_model
from tasks_lib.model_source import PRETRAINED_DIR

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
# A small budget everywhere: these tests check plumbing; the numerics are tested in the packages.
SMALL = ["task.n_samples=300", "likelihood.n_eval=30", "likelihood.rtol=1e-4", "likelihood.atol=1e-4"]


def run_cli(*args, cwd, multirun=False):
    where = f"hydra.sweep.dir={cwd}" if multirun else f"hydra.run.dir={cwd}"
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *(["-m"] if multirun else []), *args, where],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)


# ---- composition ----------------------------------------------------------------------------------

def test_solver_configs_are_the_registry():
    """conf/solver/<name>.yaml exists for every registered solver, with its options' defaults."""
    assert sorted(p.stem for p in (CONF / "solver").glob("*.yaml")) == solvers.available()
    for name in solvers.available():
        cfg = compose(f"solver={name}").solver
        assert cfg.name == name
        defaults = {f.name: f.default for f in dataclasses.fields(solvers.get_solver(name).Options)}
        assert OmegaConf.to_container(cfg.options) == defaults


def test_task_group_has_every_task():
    names = ["calibrate", "compare", "export", "inpaint", "likelihood", "sample", "train", "train_classifier"]
    assert sorted(p.stem for p in (CONF / "task").glob("*.yaml")) == names
    for name in names:
        assert compose(f"task={name}").task.name == name


@pytest.mark.parametrize("sde", ["vp", "subvp", "ve"])
def test_every_sde_solver_pair_composes_and_instantiates(sde):
    for solver in solvers.available():
        cfg = compose(f"sde={sde}", f"solver={solver}")
        instance = instantiate(cfg.sde)
        assert isinstance(instance, SDE)
        cls = solvers.get_solver(cfg.solver.name)
        cls(**OmegaConf.to_container(cfg.solver.options))
        cls.check_sde(instance)


@pytest.mark.parametrize("override,message", [
    ("solver.options.snr=abc", "Error merging override solver.options.snr=abc"),
    ("task.n_sampels=3", "Could not override 'task.n_sampels'"),
    ("sde.sigma_max=1", "Could not override 'sde.sigma_max'"),  # a VE key on the VP SDE
    ("model.net.hidden=1.5", "Error merging override model.net.hidden=1.5"),
    ("seed=x", "Error merging override seed=x"),
    ("likelihood.probes=true", "Error merging override likelihood.probes=true"),
])
def test_misspelt_keys_and_wrong_types_fail_at_composition(override, message):
    with pytest.raises(ConfigCompositionException, match=message.replace("(", r"\(")):
        compose("solver=pc", override)


def test_experiment_preset_composes():
    cfg = compose("experiment=digits")
    assert (cfg.task.name, cfg.data.name, cfg.model.kind, cfg.likelihood.divergence) == (
        "train", "digits", "unet", "hutchinson")


# ---- the model a task runs on ---------------------------------------------------------------------

def test_pretrained_models_ship_for_every_sde_on_the_ring():
    for sde in ("vp", "subvp", "ve"):
        model = resolve_model(compose(f"sde={sde}"), set(), torch.device("cpu"))
        assert model.source == "pretrained" and model.data.name == "ring"
        assert type(model.sde).__name__ == {"vp": "VPSDE", "subvp": "subVPSDE", "ve": "VESDE"}[sde]
    assert sorted(p.name for p in PRETRAINED_DIR.glob("*.pt")) == ["digits_classifier.pt", "digits_vp.pt",
                                                                   "ring_subvp.pt", "ring_ve.pt", "ring_vp.pt"]


def test_a_pretrained_unet_ships_for_digits():
    model = resolve_model(compose("data=digits"), {"data"}, torch.device("cpu"))
    assert model.source == "pretrained" and model.data.name == "digits"
    assert type(model.sde).__name__ == "VPSDE" and model.data.event_shape == (1, 8, 8)
    with pytest.raises(UserError, match="no pretrained model for data=digits with sde=ve"):
        resolve_model(compose("data=digits", "sde=ve"), {"data", "sde"}, torch.device("cpu"))


def test_a_checkpoint_yields_only_to_agreeing_overrides():
    cpu = torch.device("cpu")
    # sde.N only sets the discretisation: allowed, and applied.
    model = resolve_model(compose("sde.N=500"), {"sde.N"}, cpu)
    assert model.sde.N == 500 and model.sde.beta_max == 20.0
    with pytest.raises(ValueError, match=r"trained with VPSDE\(beta_min=0.1, beta_max=20.0\) but the command asks "
                                         r"for VPSDE\(beta_min=0.1, beta_max=10.0\)"):
        resolve_model(compose("sde.beta_max=10"), {"sde.beta_max"}, cpu)
    with pytest.raises(ValueError, match=r"holds a different network \(model.net.hidden differ"):
        resolve_model(compose("model.net.hidden=64"), {"model.net.hidden"}, cpu)
    # Overrides that agree with the checkpoint's network are fine, defaults included.
    resolve_model(compose("model=mlp", "model.net.hidden=256", "model.net.embedding=fourier"),
                  {"model", "model.net.hidden", "model.net.embedding"}, cpu)
    with pytest.raises(ValueError, match=r"data=mix16d has samples of shape \(16,\), but ckpt=.*ring_vp.pt models "
                                         r"shape \(2,\); drop the data override"):
        resolve_model(compose("ckpt=" + str(PRETRAINED_DIR / "ring_vp.pt"), "data=mix16d"), {"ckpt", "data"}, cpu)
    # Without an override, the checkpoint's own SDE applies whatever the composed default says.
    model = resolve_model(compose("ckpt=" + str(PRETRAINED_DIR / "ring_ve.pt")), {"ckpt"}, cpu)
    assert type(model.sde).__name__ == "VESDE" and model.source == "checkpoint"


# ---- the command line -----------------------------------------------------------------------------

def test_main_job_on_the_pretrained_model(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("sde=vp", "solver=pf_ode", *SMALL, cwd=out)
    assert proc.returncode == 0, proc.stderr
    assert "VPSDE on ring, pretrained model" in proc.stdout
    assert "pf_ode: 300 samples," in proc.stdout and "bits/dim" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "pretrained" and metrics["solver"] == "pf_ode" and metrics["n_eval"] == 30
    # The pretrained model is good: KL(data ‖ model) on 30 points is small (SE about 0.05 here).
    assert abs(metrics["kl_nats"]) < 0.2 and metrics["mode_weight_error"] < 0.1
    assert np.load(out / "samples.npz")["samples"].shape == (300, 2)
    for name in ("samples.png", "trajectories.png", "config.yaml", ".hydra/config.yaml"):
        assert (out / name).stat().st_size > 0
    used = OmegaConf.load(out / "config.yaml").used
    assert used.model == "pretrained" and used.sde["class"] == "VPSDE"


def test_exact_score_sampling_matches_the_known_likelihood(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("ckpt=exact", "sde=ve", "solver=euler_maruyama", "solver.steps=100", *SMALL, cwd=out)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["nfe"] == 100 and metrics["model"] == "exact"
    assert abs(metrics["kl_nats"]) < 1e-2 and metrics["mode_weight_error"] < 0.1


def test_likelihood_task_reports_nll_and_bpd(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("task=likelihood", "sde=subvp", *SMALL[1:], cwd=out)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "likelihood" and metrics["n_eval"] == 30
    assert metrics["bpd"] == pytest.approx(metrics["nll_nats"] / (2 * np.log(2)))
    per_point = np.load(out / "likelihood.npz")
    assert per_point["logp"].shape == (30,)
    assert -per_point["logp"].mean() == pytest.approx(metrics["nll_nats"], rel=1e-6)


def test_compare_task_writes_table_csv_and_plot(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("task=compare", "ckpt=exact", "task.samplers=[ancestral,multistep,pf_ode_rk4,pf_ode]",
                   "task.budgets=[8,40]", "task.n_samples=200", "likelihood.n_eval=20", cwd=out)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv_rows(out / "compare.csv"))
    by = {(r["sampler"], r["steps"], r["tolerance"]): r for r in rows}
    # VP's DDPM chain needs N > β_max = 20: the 8-step ancestral row says so instead of crashing.
    assert "has no valid 8-step chain" in by[("ancestral", "8", "")]["note"]
    assert by[("ancestral", "40", "")]["nfe"] == "40"
    # The 40-step chain's variational bound lies above the exact NLL of the same points (docs/math.md §7).
    exact = json.loads((out / "metrics.json").read_text())["nll_exact_nats"]
    assert exact < float(by[("ancestral", "40", "")]["bound_nats"]) < exact + 1.0
    assert by[("pf_ode_rk4", "2", "")]["nfe"] == "8" and by[("pf_ode_rk4", "10", "")]["nfe"] == "40"
    # RK4 error falls with the budget; the adaptive rows follow their tolerance.
    assert float(by[("pf_ode_rk4", "10", "")]["ode_error_rms"]) < float(by[("pf_ode_rk4", "2", "")]["ode_error_rms"])
    # every deterministic sampler is measured against the flow: the multistep one too
    assert float(by[("multistep", "40", "")]["ode_error_rms"]) < float(by[("multistep", "8", "")]["ode_error_rms"])
    assert float(by[("multistep", "40", "")]["ode_error_rms"]) < float(by[("pf_ode_rk4", "10", "")]["ode_error_rms"])
    tight = [float(r["ode_error_rms"]) for r in rows if r["sampler"] == "pf_ode"]
    assert tight == sorted(tight, reverse=True) and len(tight) == 4
    assert "| sampler |" in (out / "compare.md").read_text() and (out / "compare.png").stat().st_size > 0


def csv_rows(path):
    import csv
    with open(path) as f:
        yield from csv.DictReader(f)


def test_sweep_runs_one_job_per_choice_in_dirs_named_by_overrides(tmp_path):
    proc = run_cli("solver=euler_maruyama,pf_ode", "ckpt=exact", "solver.steps=null", "task.n_samples=100",
                   "task.likelihood=false", "task.trajectories=0", cwd=tmp_path, multirun=True)
    assert proc.returncode == 0, proc.stderr
    dirs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert dirs == ["solver.steps=null,solver=euler_maruyama,task.likelihood=False,task.n_samples=100,task.trajectories=0",
                    "solver.steps=null,solver=pf_ode,task.likelihood=False,task.n_samples=100,task.trajectories=0"]
    for d in dirs:
        assert json.loads((tmp_path / d / "metrics.json").read_text())["solver"] in ("euler_maruyama", "pf_ode")


@pytest.mark.parametrize("args,message", [
    (["task=likelihood", "solver=multistep", "solver.steps=39"],
     "error: solver applies to task=sample and to task=inpaint with inpaint.method=replace; task=likelihood "
     "integrates with likelihood.method (a fixed budget: likelihood.method=multistep likelihood.steps=N)"),
    (["task=train", "solver=ddim"], "task=train draws no samples with it: drop it."),
])
def test_a_solver_setting_the_task_would_ignore_is_refused(tmp_path, args, message):
    """A solver the command line sets for a task that never uses it is one error line, not silently dropped."""
    out = tmp_path / "run"
    proc = run_cli(*args, cwd=out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.mark.parametrize("args,message", [
    (["solver=pf_odee"], "error: solver=pf_odee: no such choice; available: ald, ancestral"),
    (["task.n_sampels=10"], "error: task.n_sampels: Key 'n_sampels' not in 'SampleTask'"),
    (["solver=pc", "solver.options.snr=abc"], "Value 'abc' of type 'str' could not be converted to Float"),
    (["solver=ancestral", "solver.steps=10"], "error: solver 'ancestral' with steps=10"),
    (["solver=multistep", "solver.options.uniform_share=1.5"],
     "error: solver.options (multistep): uniform_share must be in [0, 1] or None, got 1.5."),
    (["task=compare", "solver=ddim"], "error: solver applies to task=sample and to task=inpaint with "
                                      "inpaint.method=replace; task=compare runs each of task.samplers"),
    (["task=inpaint", "solver=ddim"], "inpaint.method=smc samples with its own sampler: set "
                                      "inpaint.method=replace to use the solver"),
    (["task=inpaint", "inpaint.method=replace", "solver=ddim", "solver.steps=10"],
     "error: solver.steps does not apply to task=inpaint, whose solver takes task.steps"),
    (["task=fit"], "error: task=fit: no such choice; available: calibrate, compare, export, inpaint, likelihood, sample, train, train_classifier."),
    (["data=moons"], "error: no pretrained model for data=moons with sde=vp"),
    (["data=moons", "ckpt=exact"], "error: data=moons has no exact score"),
    (["ckpt=/nonexistent/last.pt"], "error: no checkpoint at /nonexistent/last.pt"),
    (["sde.beta_max=10", "ckpt=" + str(ROOT / "models/pretrained/ring_vp.pt")],
     "error: ckpt=" + str(ROOT / "models/pretrained/ring_vp.pt") + " was trained with VPSDE"),
    (["model=unet"], "error: the pretrained model ring_vp.pt holds a different network (model.kind"),
    (["task=train", "task.steps=abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
    (["task=train", "ckpt=exact"], "error: ckpt=exact does not apply to task=train"),
    (["dtype=float16"], "error: dtype must be float32 or float64, got 'float16'"),
    (["likelihood.method=multistep"],
     "error: likelihood.steps: must be given for the fixed-budget method multistep"),
    (["data=array", "data.path=/nonexistent.npy", "ckpt=exact"], "/nonexistent.npy"),
    (["likelihood.refine=0.01"], "error: likelihood.refine: needs likelihood.method=multistep"),
    (["experiment=digits", "task=likelihood"],
     "error: task.steps: Key 'steps' not in 'LikelihoodTask' (set by experiment/digits"),
    (["task=compare", "likelihood.method=multistep", "likelihood.steps=10", "likelihood.refine=0.01"],
     "error: likelihood.refine=0.01 does not apply to task=compare"),
    (["ckpt=exact", "likelihood.method=multistep", "likelihood.steps=10", "likelihood.control_variate=true"],
     "error: likelihood.control_variate: needs Hutchinson's estimate, but likelihood.divergence=auto is exact"),
])
def test_cli_bad_input_fails_clearly_and_writes_no_result(tmp_path, args, message):
    out = tmp_path / "run"
    proc = run_cli(*args, *([] if "task=train" in args else SMALL), cwd=out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert not (out / "metrics.json").exists() and not (out / "samples.npz").exists()


def test_cli_never_overwrites_a_result(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"task": "train"}\n')
    proc = run_cli("ckpt=exact", *SMALL, cwd=out)
    assert proc.returncode == 2 and "already holds a finished run (metrics.json)" in proc.stderr
    assert (out / "metrics.json").read_text() == '{"task": "train"}\n'


def test_cli_trains_then_samples_from_the_checkpoint(tmp_path):
    """task=train writes checkpoints/last.pt; ckpt=PATH samples with that model, its SDE and its data."""
    train_dir = tmp_path / "train"
    proc = run_cli("task=train", "sde=ve", "task.steps=30", "task.batch_size=64", "model.net.hidden=32",
                   "model.net.depth=1", "data.n_train=256", "data.n_test=64", "likelihood.n_eval=16",
                   "task.eval_samples=32", "likelihood.rtol=1e-3", "likelihood.atol=1e-3", cwd=train_dir)
    assert proc.returncode == 0, proc.stderr
    assert "trained mlp on ring with VESDE for 30 steps" in proc.stdout
    sample_dir = tmp_path / "sample"
    proc = run_cli(f"ckpt={train_dir / 'checkpoints' / 'last.pt'}", "solver=pf_ode", *SMALL, cwd=sample_dir)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((sample_dir / "metrics.json").read_text())
    assert metrics["model"] == "checkpoint" and metrics["sde"] == "VESDE" and metrics["n_samples"] == 300
    assert np.isfinite(metrics["nll_nats"])
