"""The command line: config groups compose for every SDE × solver, the CLI runs end to end, bad input fails clearly."""
import dataclasses
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import solvers
from sde_lib import SDE

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def test_solver_configs_are_the_registry():
    """conf/solver/<name>.yaml exists for every registered solver, with its options' defaults."""
    assert sorted(p.stem for p in (CONF / "solver").glob("*.yaml")) == solvers.available()
    for name in solvers.available():
        cfg = OmegaConf.load(CONF / "solver" / f"{name}.yaml")
        assert cfg.name == name
        defaults = {f.name: f.default for f in dataclasses.fields(solvers.get_solver(name).Options)}
        assert OmegaConf.to_container(cfg.options) == defaults


@pytest.mark.parametrize("sde", ["vp", "subvp", "ve"])
def test_every_sde_solver_pair_composes_and_instantiates(sde):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for solver in solvers.available():
            cfg = compose("config", overrides=[f"sde={sde}", f"solver={solver}"])
            instance = instantiate(cfg.sde)
            assert isinstance(instance, SDE)
            cls = solvers.get_solver(cfg.solver.name)
            cls(**OmegaConf.to_container(cfg.solver.options))
            cls.check_sde(instance)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={cwd}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("sde=ve", "solver=euler_maruyama", "solver.steps=100", "n_samples=300", "n_eval=30", cwd=out)
    assert proc.returncode == 0, proc.stderr
    assert "VESDE + euler_maruyama on ring (exact score): 300 samples, 100 NFE" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["nfe"] == 100 and metrics["solver"] == "euler_maruyama"
    assert abs(metrics["nll_error_nats"]) < 1e-2 and metrics["mode_weight_error"] < 0.1
    assert np.load(out / "samples.npz")["samples"].shape == (300, 2)
    assert (out / "samples.png").stat().st_size > 0
    assert (out / ".hydra" / "config.yaml").exists()


@pytest.mark.parametrize("args,message", [
    (["solver=pf_odee"], "Could not find 'solver/pf_odee'"),
    (["solver.options.snr=0.1"], "Could not override 'solver.options.snr'"),
    (["solver=pc", "solver.options.snr=abc"], "error: option 'snr' of pc must be float, got 'abc'."),
    (["solver=ancestral", "solver.steps=10"], "error: solver 'ancestral' with steps=10"),
    (["task=fit"], "error: unknown task 'fit'; available: sample, train."),
    (["data=moons"], "error: data=moons has no exact score: train a model (task=train) and pass ckpt=PATH."),
    (["ckpt=/nonexistent/last.pt"], "error: no checkpoint at /nonexistent/last.pt"),
    (["task=train", "train.steps=abc"], "error: train.steps: Value 'abc' of type 'str' could not be converted to Integer"),
    (["task=train", "+train.stepz=3"], "error: train.stepz: Key 'stepz' not in"),
])
def test_cli_bad_input_fails_clearly_and_writes_no_result(tmp_path, args, message):
    out = tmp_path / "run"
    proc = run_cli(*args, "n_samples=10", "n_eval=5", cwd=out)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (out / "metrics.json").exists()


def test_cli_trains_then_samples_from_the_checkpoint(tmp_path):
    """task=train writes checkpoints/last.pt; ckpt=PATH samples with that model, its SDE and its data."""
    train_dir = tmp_path / "train"
    proc = run_cli("task=train", "sde=ve", "train.steps=30", "train.batch_size=64", "model.net.hidden=32",
                   "model.net.depth=1", "data.n_train=256", "data.n_test=64", "train.eval.n_nll=16",
                   "train.eval.n_samples=32", "train.eval.rtol=1e-3", "train.eval.atol=1e-3", cwd=train_dir)
    assert proc.returncode == 0, proc.stderr
    assert "trained mlp on ring with VESDE for 30 steps" in proc.stdout
    sample_dir = tmp_path / "sample"
    proc = run_cli(f"ckpt={train_dir / 'checkpoints' / 'last.pt'}", "solver=pf_ode", "n_samples=50", "n_eval=10",
                   "likelihood.rtol=1e-3", "likelihood.atol=1e-3", cwd=sample_dir)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((sample_dir / "metrics.json").read_text())
    assert metrics["model"] == "checkpoint" and metrics["sde"] == "VESDE" and metrics["n_samples"] == 50
    assert np.isfinite(metrics["nll_nats"])
