"""``python run.py task=train_classifier``: short runs on the ring and on digits, and bad input failing clearly."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from models import load_classifier
from core_lib import UserError
from tasks_lib import TASKS, check_config, compose

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={cwd}"],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)


def test_the_task_composes_with_its_defaults():
    cfg = compose("task=train_classifier")
    assert cfg.task.name == "train_classifier" and cfg.task.net is None
    assert list(cfg.task.eval_times) == [1e-5, 0.1, 0.3, 0.5, 0.9]


def test_ring_run_writes_a_classifier_near_the_exact_one(tmp_path):
    """200 steps on the ring: at t ≈ 0 the 8 modes (σ = 0.3, 3 apart) are separated, so the held-out accuracy is
    ≥ 0.97 (exact: 1.000 on these points) and the classifier is within 0.5 nats of the exact one at every t;
    near T every class is equally likely (accuracy ≈ 1/8 for both)."""
    run = run_cli("task=train_classifier", "data=ring", "data.n_train=2000", "data.n_test=1000", "task.steps=200",
                  "task.batch_size=256", "task.hidden=64", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["task"] == "train_classifier" and metrics["num_classes"] == 8 and metrics["model"] == "mlp classifier"
    assert metrics["accuracy_t1e-05"] >= 0.97 and metrics["exact_accuracy_t1e-05"] >= 0.99
    assert all(metrics[f"kl_nats_t{t}"] < 0.5 for t in ("1e-05", "0.1", "0.3", "0.5", "0.9"))
    assert metrics["exact_accuracy_t0.9"] < 0.2
    clf = load_classifier(tmp_path / "checkpoints" / "classifier.pt")
    assert clf.num_classes == 8 and clf.info["data"] == "ring" and clf.time_input == "log_snr"
    assert (tmp_path / "train_log.csv").is_file() and (tmp_path / "classifier_eval.csv").is_file()
    assert "held-out accuracy" in run.stdout
    # classifier guidance from the command line: the shipped unconditional ring model, guided toward class 2
    guided = run_cli("guidance.y=2", f"guidance.classifier={tmp_path / 'checkpoints' / 'classifier.pt'}",
                     "task.n_samples=400", "task.likelihood=false", "task.trajectories=0", "solver=ddim",
                     "solver.steps=50", cwd=tmp_path / "guided")
    assert guided.returncode == 0, guided.stderr
    sampled = json.loads((tmp_path / "guided" / "metrics.json").read_text())
    assert sampled["label_accuracy"] >= 0.9     # unguided: 1/8 of the samples in class 2


def test_digits_run_trains_a_conv_classifier(tmp_path):
    """100 steps of 64 noised images: a conv classifier, far above chance (0.1) on clean held-out digits.

    Measured 0.56 after 150 steps; the bound 0.3 is ~10 binomial s.e. (√(0.25/359) ≈ 0.026) below that and
    8 s.e. above chance."""
    run = run_cli("task=train_classifier", "data=digits", "task.steps=100", "task.batch_size=64", "task.hidden=16",
                  "task.eval_times=[1e-5,0.5]", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"] == "conv classifier" and metrics["num_classes"] == 10
    assert metrics["accuracy_t1e-05"] > 0.3
    assert "exact_accuracy_t1e-05" not in metrics   # digits have no exact classifier
    clf = load_classifier(tmp_path / "checkpoints" / "classifier.pt")
    assert clf.classes == tuple("0123456789") and clf.info["data_range"] == [0.0, 1.0]


def test_unlabelled_data_is_one_error_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    run = run_cli("task=train_classifier", "data=swiss_roll", "task.steps=5", cwd=out)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [run.stderr.strip()], run.stderr
    assert run.stderr.startswith("error: data=swiss_roll has no class labels, and task=train_classifier learns them")
    assert not out.exists() or not any(p.name in ("metrics.json", "checkpoints") for p in out.iterdir())


@pytest.mark.parametrize("args,message", [
    (["task.net=resnet"], "task.net: must be null or one of mlp, conv, got 'resnet'."),
    (["task.eval_times=[0.5,2]"], "task.eval_times: must be times in [0, T = 1]"),
    (["task.batch_size=0"], "task.batch_size: must be a positive integer"),
    (["ckpt=exact"], "ckpt=exact does not apply to task=train_classifier"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, args, message):
    """In-process, as run.py checks them (check_config, then the task) before anything is written."""
    cfg = compose("task=train_classifier", *args)
    with pytest.raises(UserError) as err:
        check_config(cfg)
        TASKS["train_classifier"](cfg, tmp_path / "run", set())
    assert str(err.value).startswith(message)
    assert not (tmp_path / "run").exists()
