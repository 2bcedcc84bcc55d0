"""Sampling-only exports (model.safetensors + config.json, task=export) and logger=tensorboard.

One tiny training run (a 1-block MLP of width 32 on 512 ring points) serves every test: it logs to
TensorBoard, is interrupted after step 13 (its last checkpoint at step 10), and is resumed with
task.resume=auto to step 20, so its event files hold an earlier attempt's rows past the checkpoint.
"""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import models
import models.checkpoint as checkpoint_module
import solvers
import training.loop as loop_module
from core_lib import OutputError, RunInterrupted, UserError
from evaluation import RunOutput
from models.checkpoint import EXPORT_FORMAT, CheckpointError, export_checkpoint, read_checkpoint
from tasks_lib import TASKS, check_config, compose, overridden_keys, run_task

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
# Every value pinned, so that edits of conf/ defaults do not change what is tested.
TINY = ["task=train", "seed=0", "device=cpu", "sde=vp", "model=mlp", "model.parameterization=eps",
        "model.net.hidden=32", "model.net.depth=1", "data=ring", "data.n_train=512", "data.n_test=128",
        "task.steps=20", "task.batch_size=64", "task.lr=2e-3", "task.warmup=5", "task.lr_schedule=constant",
        "task.ema_decay=0.99", "task.log_every=2", "task.ckpt_every=10", "task.eval_every=10",
        "task.eval_samples=64", "likelihood.n_eval=32", "likelihood.rtol=1e-3", "likelihood.atol=1e-3",
        "likelihood.divergence=exact"]
SAMPLE = ["solver=euler_maruyama", "solver.steps=20", "task.n_samples=64", "task.likelihood=false",
          "task.trajectories=0"]


def run_train(run_dir: Path, *overrides) -> dict:
    return TASKS["train"](compose(*TINY, *overrides), run_dir, set())


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=300)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def events(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})   # 0: keep every event
    accumulator.Reload()
    return accumulator


def assert_one_error_line(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert pattern in lines[0], proc.stderr


@pytest.fixture(scope="module")
def board_run(tmp_path_factory):
    """logger=tensorboard: interrupted while computing step 14 (last.pt at step 10), resumed to step 20."""
    run_dir = tmp_path_factory.mktemp("board") / "run"
    real_get_loss = loop_module.get_loss
    calls = {"n": 0}

    def get_loss(name):
        fn = real_get_loss(name)

        def interrupted_at_step_14(*args, **kwargs):
            calls["n"] += torch.is_grad_enabled()   # training steps only, not the evaluation's test loss
            if calls["n"] == 14:
                raise KeyboardInterrupt
            return fn(*args, **kwargs)
        return interrupted_at_step_14

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop_module, "get_loss", get_loss)
        with pytest.raises(RunInterrupted, match="interrupted at step 13 of 20"):
            run_train(run_dir, "logger=tensorboard", "task.resume=auto")
    first_attempt = sorted((run_dir / "tensorboard").iterdir())
    assert len(first_attempt) == 1
    metrics = run_train(run_dir, "logger=tensorboard", "task.resume=auto")
    return run_dir, metrics, first_attempt[0]


@pytest.fixture(scope="module")
def exported(board_run, tmp_path_factory):
    """The run's last.pt exported as a safetensors directory."""
    dst = tmp_path_factory.mktemp("exported") / "export"
    assert export_checkpoint(board_run[0] / "checkpoints" / "last.pt", dst, format="safetensors") == dst
    return dst


# ---- export: safetensors + config.json ---------------------------------------------------------------

def test_a_safetensors_export_loads_to_the_same_weights_and_samples_bit_for_bit(board_run, exported):
    last = board_run[0] / "checkpoints" / "last.pt"
    state = read_checkpoint(last)
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((exported / "config.json").read_text())
    assert config["format"] == EXPORT_FORMAT and config["step"] == state["step"] == 20
    assert config["model_spec"] == state["model_spec"] and config["config"] == state["config"]
    # A plain safetensors reader sees the EMA weights under their state_dict names, and the tag diffusers checks.
    with safe_open(exported / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == sorted(state["ema"])
        assert all(torch.equal(f.get_tensor(k), state["ema"][k]) for k in f.keys())

    full = models.load_checkpoint(last)
    for path in (exported, exported / "model.safetensors"):
        slim = models.load_checkpoint(path)
        assert (slim.sde, slim.step, slim.config, slim.event_shape, slim.data) == \
            (full.sde, full.step, full.config, full.event_shape, full.data)
        a, b = full.score_fn.state_dict(), slim.score_fn.state_dict()
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        assert not slim.score_fn.training and not any(p.requires_grad for p in slim.score_fn.parameters())
        for solver, steps in (("euler_maruyama", 30), ("multistep", 10)):
            x_full = solvers.sample(full.sde, full.score_fn, (64, 2), solver=solver, steps=steps, seed=3).samples
            x_slim = solvers.sample(slim.sde, slim.score_fn, (64, 2), solver=solver, steps=steps, seed=3).samples
            assert torch.equal(x_full, x_slim), (path, solver)
    assert (exported / "model.safetensors").stat().st_size < 0.4 * last.stat().st_size


def test_an_export_cannot_be_resumed_from(exported, tmp_path):
    with pytest.raises(CheckpointError, match="holds the EMA weights only .* resuming needs a training checkpoint"):
        run_train(tmp_path / "resumed", "task.steps=40", f"task.resume={exported}")


def test_an_export_is_written_whole_or_not_at_all(board_run, tmp_path, monkeypatch):
    last = board_run[0] / "checkpoints" / "last.pt"
    real = checkpoint_module.atomic_write

    def disk_full_at_config_json(path, write):
        if Path(path).name == "config.json":
            raise OutputError(f"could not write {path} (No space left on device); nothing was written.")
        real(path, write)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module, "atomic_write", disk_full_at_config_json)
        with pytest.raises(OutputError):
            export_checkpoint(last, tmp_path / "export", format="safetensors")
    assert list(tmp_path.iterdir()) == []   # neither the directory nor its staging copy
    # An existing export is replaced in place; a directory holding anything else, or a file, is refused.
    export_checkpoint(last, tmp_path / "export", format="safetensors")
    export_checkpoint(last, tmp_path / "export", format="safetensors")
    assert models.load_checkpoint(tmp_path / "export").step == 20
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me\n")
    with pytest.raises(CheckpointError, match="holds something other than an export"):
        export_checkpoint(last, tmp_path / "notes", format="safetensors")
    with pytest.raises(CheckpointError, match="is a file, and a safetensors export is a directory"):
        export_checkpoint(last, tmp_path / "notes" / "todo.txt", format="safetensors")
    with pytest.raises(CheckpointError, match="export format must be one of safetensors, pt, got 'onnx'"):
        export_checkpoint(last, tmp_path / "x", format="onnx")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me\n"


def _break(export: Path, how: str) -> Path:
    """A copy of ``export`` spoiled as ``how`` says; the path to load."""
    weights, config_path = export / "model.safetensors", export / "config.json"
    if how == "no config.json":
        config_path.unlink()
    elif how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:200])
    elif how == "not safetensors":
        weights.write_bytes(np.random.default_rng(0).bytes(4096))
    elif how == "flipped byte":   # the header still parses; the last tensor's last byte differs
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        config = json.loads(config_path.read_text())
        if how == "unknown format tag":
            config["format"] = "scoreflow-export-v9"
        elif how == "weights unfit for the spec":   # wider than the weights, checksums intact
            config["model_spec"]["net"]["hidden"] = 64
        elif how == "spec of no model":
            config["model_spec"]["net"]["kind"] = "transformer"
        config_path.write_text(json.dumps(config))
    return export


BROKEN = {
    "no config.json": "has no config.json beside model.safetensors",
    "truncated weights": "model.safetensors is not a readable safetensors file",
    "not safetensors": "model.safetensors is not a readable safetensors file",
    "flipped byte": "differ from their checksums",
    "unknown format tag": "is not a scoreflow-export-v1 export (found format 'scoreflow-export-v9')",
    "weights unfit for the spec": "do not fit the model its spec describes (Error(s) in loading state_dict for "
                                  "ScoreModel: size mismatch for",
    "spec of no model": "describes no model this version builds",
}


@pytest.mark.parametrize("how", BROKEN)
def test_a_bad_export_is_one_clear_error(exported, tmp_path, how):
    path = _break(Path(shutil.copytree(exported, tmp_path / "export")), how)
    with pytest.raises(CheckpointError) as err:
        models.load_checkpoint(path)
    assert BROKEN[how] in str(err.value) and "\n" not in str(err.value)


# ---- task=export and ckpt=<export> on the command line -------------------------------------------------

def test_cli_exports_then_samples_from_the_export_as_from_the_checkpoint(board_run, tmp_path):
    last = board_run[0] / "checkpoints" / "last.pt"
    proc = run_cli("task=export", f"ckpt={last}", f"hydra.run.dir={tmp_path / 'exp'}")
    assert proc.returncode == 0, proc.stderr
    assert f"exported {last} (VPSDE on ring, step 20" in proc.stdout
    metrics = json.loads((tmp_path / "exp" / "metrics.json").read_text())
    assert (metrics["task"], metrics["format"], metrics["train_steps"]) == ("export", "safetensors", 20)
    export = tmp_path / "exp" / "export"
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors"]
    assert metrics["export"] == str(export) and metrics["bytes"] == sum(p.stat().st_size for p in export.iterdir())

    args = [*SAMPLE, f"ckpt={export}"]
    proc = run_cli(*args, f"hydra.run.dir={tmp_path / 'from_export'}")
    assert proc.returncode == 0, proc.stderr
    args_pt = [*SAMPLE, f"ckpt={last}"]
    run_task(compose(*args_pt), tmp_path / "from_pt", overridden_keys(args_pt))
    a, b = (np.load(tmp_path / d / "samples.npz") for d in ("from_export", "from_pt"))
    assert np.array_equal(a["samples"], b["samples"]) and np.array_equal(a["z"], b["z"])
    assert json.loads((tmp_path / "from_export" / "metrics.json").read_text())["model"] == "checkpoint"


def test_export_task_writes_a_pt_file_and_reads_any_checkpoint(board_run, exported, tmp_path):
    """task.format=pt writes export/model.pt; the source may itself be an export; ckpt=exact has no weights."""
    metrics = run_task(compose("task=export", "task.format=pt", f"ckpt={exported}"), tmp_path / "pt", set())
    assert metrics["export"] == str(tmp_path / "pt" / "export" / "model.pt")
    assert sorted(read_checkpoint(metrics["export"])) == ["checksums", "config", "ema", "format", "model_spec", "step"]
    a = models.load_checkpoint(board_run[0] / "checkpoints" / "last.pt").score_fn.state_dict()
    b = models.load_checkpoint(metrics["export"]).score_fn.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="task=export writes a trained network, and ckpt=exact"):
        check_config(compose("task=export", "ckpt=exact"))
    with pytest.raises(UserError, match="task.format: must be one of safetensors, pt, got 'onnx'"):
        check_config(compose("task=export", "task.format=onnx"))


@pytest.mark.parametrize("task, how", [("sample", "no config.json"), ("export", "flipped byte")])
def test_cli_a_bad_export_is_one_line_and_exit_2(exported, tmp_path, task, how):
    path = _break(Path(shutil.copytree(exported, tmp_path / "export")), how)
    run_dir = tmp_path / "run"
    proc = run_cli(*(SAMPLE if task == "sample" else ["task=export"]), f"ckpt={path}", f"hydra.run.dir={run_dir}")
    assert_one_error_line(proc, BROKEN[how])
    assert not (run_dir / "metrics.json").exists()


# ---- logger=tensorboard ---------------------------------------------------------------------------------

def test_tensorboard_holds_the_csv_rows_and_the_sample_figures(board_run):
    """Every numeric value of every CSV row is a scalar at the row's step, once: the interrupted attempt's rows
    past the checkpoint (step 12) are purged as the CSV's were; samples.png is an image at each evaluation."""
    run_dir, metrics, first_attempt = board_run
    assert [e.step for e in events(first_attempt).Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]
    board = events(run_dir / "tensorboard")
    tags = set()
    for log, prefix in (("train_log", "train"), ("eval_log", "eval")):
        rows = read_csv(run_dir / f"{log}.csv")
        assert [int(r["step"]) for r in rows] == (list(range(2, 21, 2)) if prefix == "train" else [10, 20])
        for column in rows[0]:
            if column == "step":
                continue
            tags.add(f"{prefix}/{column}")
            logged = [(e.step, e.value) for e in board.Scalars(f"{prefix}/{column}")]
            assert logged == [(int(r["step"]), float(np.float32(r[column]))) for r in rows], column
    assert set(board.Tags()["scalars"]) == tags and {"train/loss", "eval/test_bpd", "eval/kl_nats"} <= tags
    assert board.Scalars("eval/test_bpd")[-1].value == pytest.approx(metrics["test_bpd"], rel=1e-6)

    from matplotlib.image import imread
    height, width = imread(run_dir / "samples.png").shape[:2]
    images = board.Images("samples")
    assert [(i.step, i.width, i.height) for i in images] == [(10, width, height), (20, width, height)]
    assert all(i.encoded_image_string.startswith(b"\x89PNG") for i in images)


def test_logger_csv_writes_no_tensorboard_directory(tmp_path):
    run_train(tmp_path / "run", "task.steps=4", "task.eval_every=0", "logger=csv")
    assert [int(r["step"]) for r in read_csv(tmp_path / "run" / "train_log.csv")] == [2, 4]
    assert (tmp_path / "run" / "samples.png").exists() and not (tmp_path / "run" / "tensorboard").exists()


def test_an_unknown_logger_is_refused_before_any_work(tmp_path):
    with pytest.raises(UserError, match=r"^logger: must be one of csv, tensorboard, got 'wandb'\.$"):
        check_config(compose("logger=wandb"))
    with pytest.raises(UserError, match="logger: must be one of csv, tensorboard, got 'wandb'"):
        run_train(tmp_path / "run", "logger=wandb")
    with pytest.raises(UserError, match="logger: must be one of csv, tensorboard, got 'wandb'"):
        RunOutput(tmp_path / "out", logger="wandb")
    assert list(tmp_path.iterdir()) == []


def test_logger_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch):
    message = 'logger=tensorboard needs the tensorboard package: pip install -e ".[tensorboard]"'
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "tensorboard", None)   # what an environment without it looks like to imports
        with pytest.raises(UserError) as err:
            check_config(compose("task=train", "logger=tensorboard"))
    assert str(err.value) == message
    hide = ("import runpy, sys; sys.modules['tensorboard'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", hide, str(ROOT / "run.py"), *TINY, "logger=tensorboard",
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert_one_error_line(proc, message)
    assert proc.stderr.strip() == f"error: {message}" and not run_dir.exists()
