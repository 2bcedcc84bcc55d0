"""Faults and bad input: refusal before work, atomic outputs under a full disk, checksummed checkpoints,
the divergence guard, unavailable devices, interrupts. Every user mistake is one line, never a traceback."""
import dataclasses
import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

import training.loop as loop_module
from core_lib import OutputError, UserError
from evaluation import LikelihoodConfig, RunDirError
from models.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from tasks_lib import check_config, compose, run_task
from tasks_lib.schema import CompareTask, SampleTask
from training import TrainConfig, TrainingError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ["ckpt=exact", "task.n_samples=64", "task.trajectories=2", "task.likelihood=false", "solver=multistep"]
TRAIN = ["task=train", "model.net.hidden=16", "model.net.depth=1", "data.n_train=256", "data.n_test=64",
         "task.steps=40", "task.batch_size=32", "task.warmup=5", "task.log_every=10", "task.ckpt_every=10",
         "task.eval_samples=32", "likelihood.n_eval=16", "likelihood.rtol=1e-3", "likelihood.atol=1e-3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


# ---- every numeric setting has a range, checked before any work -----------------------------------

def _numeric_fields(cls) -> list[tuple[str, typing.Any]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        members = typing.get_args(hints[f.name]) or (hints[f.name],)
        if any(m in (int, float) for m in members):
            out.append((f.name, hints[f.name]))
    return out


SETTINGS = ([("task", "sample", n) for n, _ in _numeric_fields(SampleTask)]
            + [("task", "compare", n) for n, _ in _numeric_fields(CompareTask)]
            + [("task", "train", n) for n, _ in _numeric_fields(TrainConfig)]
            + [("likelihood", "sample", n) for n, _ in _numeric_fields(LikelihoodConfig)])
BAD_VALUES = [-1, 0, float("nan"), float("inf"), -float("inf"), 1e300]


@pytest.mark.parametrize("group, task, key", SETTINGS, ids=lambda v: str(v))
def test_every_numeric_setting_is_checked_before_any_work(group, task, key):
    """Generated from the schemas: each value is accepted, or refused with a UserError naming the key.

    Whatever passes this check must be a sensible value; NaN and inf never pass. (A value the typed
    schema cannot hold at all, such as NaN for an int, is refused earlier, when hydra composes.)
    """
    for value in BAD_VALUES:
        cfg = compose(f"task={task}", *([] if task == "train" else ["ckpt=exact"]))
        try:
            OmegaConf.update(cfg, f"{group}.{key}", value)
        except ValidationError:
            continue
        try:
            check_config(cfg)
        except UserError as err:
            assert f"{group}.{key}" in str(err) or key in str(err), str(err)
            continue
        assert math.isfinite(value), f"{group}.{key}={value} passed the check"


def test_bad_settings_of_the_issue_are_refused_with_their_key():
    cases = {
        ("task=train", "task.grad_clip=0"): "task.grad_clip",
        ("task=train", "task.grad_clip=-1"): "task.grad_clip",
        ("task=train", "task.steps=0"): "task.steps",
        ("task=train", "task.batch_size=0"): "task.batch_size",
        ("task=train", "task.log_every=0"): "task.log_every",
        ("task=train", "task.eval_every=-1"): "task.eval_every",
        ("task=train", "task.warmup=-5"): "task.warmup",
        ("task=train", "task.eval_samples=0"): "task.eval_samples",
        ("likelihood.n_eval=-3",): "likelihood.n_eval",
        ("likelihood.n_eval=0",): "likelihood.n_eval",
        ("sde.beta_max=nan",): "sde.beta_min, sde.beta_max",
        ("sde=ve", "sde.sigma_min=60"): "sde.sigma_min",
        ("device=cuda:7",): "device",
        ("device=notadevice",): "device",
    }
    for overrides, key in cases.items():
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            check_config(compose(*overrides))


def test_an_unavailable_device_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="device: cuda is not available"):
        check_config(compose("device=cuda"))


# ---- one run per directory ---------------------------------------------------------------------------

def test_a_finished_run_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run_task(compose(*SAMPLE), run_dir, set())
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    for overrides in (SAMPLE, TRAIN):
        with pytest.raises(RunDirError, match=r"already holds a finished run \(metrics.json\)"):
            run_task(compose(*overrides), run_dir, set())
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


# ---- atomic outputs ----------------------------------------------------------------------------------

def _full_disk_after(limit: int):
    """A stand-in for np.savez that writes ``limit`` bytes and then fails as a full disk does."""
    def savez(file, **arrays):
        file.write(b"\0" * limit)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return savez


def test_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    import evaluation.outputs as outputs
    monkeypatch.setattr(outputs.np, "savez", _full_disk_after(100))
    run_dir = tmp_path / "run"
    with pytest.raises(OutputError, match=r"could not write .*samples\.npz \(No space left on device\); nothing was "
                                          r"written"):
        run_task(compose(*SAMPLE), run_dir, set())
    names = sorted(p.name for p in run_dir.iterdir())
    assert "samples.npz" not in names and "metrics.json" not in names
    assert not [n for n in names if ".tmp" in n]


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model_spec": {}, "ema": {"w": torch.ones(3)}, "step": 1, "config": {}})
    before = path.read_bytes()

    def full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputError, match="the previous version is kept"):
        save_checkpoint(path, {"model_spec": {}, "ema": {"w": torch.zeros(3)}, "step": 2, "config": {}})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ---- checkpoint integrity ----------------------------------------------------------------------------

def _checkpoint(path: Path) -> None:
    weights = torch.arange(4096, dtype=torch.float32) * 1.2345   # a pattern to find in the file
    save_checkpoint(path, {"model_spec": {}, "ema": {"net.weight": weights}, "step": 7, "config": {}})


def test_a_flipped_byte_inside_a_tensor_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    _checkpoint(path)
    assert read_checkpoint(path)["step"] == 7
    raw = bytearray(path.read_bytes())
    at = raw.find((torch.arange(4096, dtype=torch.float32) * 1.2345)[100:104].numpy().tobytes())
    assert at > 0
    raw[at + 2] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"ckpt\.pt is corrupt: the contents of ema\.net\.weight do not match"):
        read_checkpoint(path)


def test_an_edited_tensor_or_a_missing_checksum_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    _checkpoint(path)
    state = torch.load(path, weights_only=True)
    state["ema"]["net.weight"][0] += 1
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="is corrupt"):
        read_checkpoint(path)
    del state["checksums"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="carries no checksums"):
        read_checkpoint(path)


def test_the_shipped_models_carry_valid_checksums():
    from models import load_classifier
    for path in (ROOT / "models" / "pretrained").glob("*.pt"):
        if path.name.endswith("_classifier.pt"):   # a classifier's own format, its checksums verified on load
            assert load_classifier(path).num_classes == 10
            assert len(torch.load(path, weights_only=True)["checksums"]) > 10
        else:
            assert len(read_checkpoint(path)["checksums"]) > 10


# ---- the divergence guard ----------------------------------------------------------------------------

def _exploding_from(step: int, factor: float):
    real = loop_module.get_loss
    calls = {"n": 0}

    def get_loss(name):
        fn = real(name)

        def exploding(*args, **kwargs):
            calls["n"] += 1
            loss = fn(*args, **kwargs)
            return loss * factor if calls["n"] >= step else loss
        return exploding
    return get_loss


def test_a_loss_far_above_its_running_scale_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(loop_module, "get_loss", _exploding_from(31, 1e4))
    with pytest.raises(TrainingError, match=r"exceeded 100x its running mean .* at step 31: training diverges; "
                                            r"the last good checkpoint is .*last\.pt"):
        run_task(compose(*TRAIN), tmp_path / "run", set())


def test_the_divergence_guard_can_warn_instead(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop_module, "get_loss", _exploding_from(31, 1e4))
    metrics = run_task(compose(*TRAIN, "task.on_divergence=warn"), tmp_path / "run", set())
    assert metrics["steps"] == 40
    assert "warning: the loss" in capsys.readouterr().out


# ---- interrupts --------------------------------------------------------------------------------------

def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig,start", [(signal.SIGINT, None), (signal.SIGTERM, None), (signal.SIGINT, _ignore_sigint)],
                         ids=["SIGINT", "SIGTERM", "SIGINT-inherited-ignored"])
def test_an_interrupted_training_says_where_its_last_checkpoint_is(tmp_path, sig, start):
    """``start`` runs in the child before run.py: a shell starts background jobs with SIGINT ignored.

    SIGINT stops at once (exit 130); SIGTERM, a scheduler's preemption, lets the step finish and checkpoints
    that very step (exit 143)."""
    run_dir = tmp_path / "run"
    args = [sys.executable, str(ROOT / "run.py"), *TRAIN, "task.steps=100000", "task.ckpt_every=20",
            f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=start)
    deadline = time.time() + 90
    while not (run_dir / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    said = "stopped by SIGTERM at step" if sig == signal.SIGTERM else "interrupted at step"
    assert len(lines) == 1 and said in lines[0] and str(run_dir / "checkpoints" / "last.pt") in lines[0]
    state = read_checkpoint(run_dir / "checkpoints" / "last.pt")       # whole and verified
    if sig == signal.SIGTERM:   # the step it stopped at is the step checkpointed
        assert f"at step {state['step']} of" in lines[0]


# ---- the command line: one run per directory, refused before hydra writes anything ------------------

QUICK = [*SAMPLE, "task.n_samples=32"]


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120, **kwargs)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_cli_refuses_a_finished_run_before_hydra_writes(tmp_path):
    run_dir = tmp_path / "run"
    assert _cli(*QUICK, f"hydra.run.dir={run_dir}").returncode == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    line = _one_error_line(_cli(*QUICK, "seed=5", f"hydra.run.dir={run_dir}"))
    assert "already holds a finished run" in line
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before   # .hydra/ included


def test_cli_refuses_a_directory_another_run_holds(tmp_path):
    from evaluation import claim_run_dir, release_run_dir
    run_dir = tmp_path / "busy"
    claim_run_dir(run_dir)                   # this test process is "the other run"
    try:
        line = _one_error_line(_cli(*QUICK, f"hydra.run.dir={run_dir}"))
        assert re.search(r"another run \(pid \d+ on .*\) is writing into", line), line
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    finally:
        release_run_dir(run_dir)


def test_two_concurrent_runs_into_one_directory(tmp_path):
    """One finishes with its own config and results; the other is refused without writing anything."""
    run_dir = tmp_path / "shared"
    cmd = lambda seed: [sys.executable, str(ROOT / "run.py"), *QUICK, "task.n_samples=2000",  # noqa: E731
                        f"seed={seed}", f"hydra.run.dir={run_dir}"]
    procs = [subprocess.Popen(cmd(seed), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = 1 + [code for code, _ in results].index(0)
    assert "seed: %d" % winner in (run_dir / ".hydra" / "config.yaml").read_text()
    assert '"seed": %d' % winner in (run_dir / "metrics.json").read_text()


@pytest.mark.parametrize("override, key", [("task.steps=abc", "task.steps"), ("solver=nope", "solver=nope"),
                                            ("likelihood.n_eval=nan", "likelihood.n_eval"),
                                            ("task=train task.stepz=1", "task.stepz")])
def test_cli_composition_mistakes_are_one_line(tmp_path, override, key):
    run_dir = tmp_path / "run"
    assert key in _one_error_line(_cli(*override.split(), f"hydra.run.dir={run_dir}"))
    assert not run_dir.exists()


def test_the_previous_checkpoint_is_kept_beside_the_last(tmp_path):
    run_task(compose(*TRAIN), tmp_path / "run", set())
    ckpts = tmp_path / "run" / "checkpoints"
    assert read_checkpoint(ckpts / "last.pt")["step"] == 40
    assert read_checkpoint(ckpts / "prev.pt")["step"] == 30
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "prev.pt", "step_0000040.pt"]


# ---- property: any value of any setting ends in a result or in one error line ------------------------

BASES = {
    "sample": [*SAMPLE, "task.n_samples=64", "task.likelihood=true", "likelihood.n_eval=16", "likelihood.rtol=1e-3",
               "likelihood.atol=1e-3"],
    "likelihood": ["task=likelihood", "ckpt=exact", "likelihood.n_eval=16", "likelihood.rtol=1e-3",
                   "likelihood.atol=1e-3"],
    "compare": ["task=compare", "ckpt=exact", "task.samplers=[ddim,multistep]", "task.budgets=[10]",
                "task.n_samples=64", "likelihood.n_eval=16", "task.reference_rtol=1e-4"],
    "train": [*TRAIN, "task.steps=20"],
}
#: Settings that size the work: no huge values for them (a run that asks for 1e12 samples is not a quick test).
SIZES = {"n_samples", "n_eval", "eval_samples", "steps", "batch_size", "probes", "trajectories", "N", "log_every",
         "ckpt_every", "eval_every", "n_train", "n_test", "chunk", "order", "warmup"}
VALUES = [-1, 0, 1, 3, 0.5, 1e12, float("nan"), float("inf"), "abc"]


def _settings(task: str) -> list[str]:
    cfg = compose(*BASES[task])
    keys = [f"task.{k}" for k in cfg.task if k != "name"] + [f"likelihood.{k}" for k in cfg.likelihood]
    keys += [f"sde.{k}" for k in cfg.sde if k != "_target_"]
    if task == "sample":
        keys += [f"solver.options.{k}" for k in cfg.solver.options] + ["solver.steps"]
    if task == "train":
        keys += ["data.n_train", "data.n_test"]
    return keys


def _cases(n: int, seed: int) -> list[tuple[str, str, object]]:
    rng = np.random.default_rng(seed)
    cases = []
    for task in BASES:
        keys = _settings(task)
        for _ in range(n):
            key = keys[rng.integers(len(keys))]
            values = [v for v in VALUES if not (key.rsplit(".", 1)[-1] in SIZES and v == 1e12)]
            cases.append((task, key, values[rng.integers(len(values))]))
    return cases


def _check_outcome(tmp_path: Path, task: str, key: str, value) -> None:
    run_dir = tmp_path / "run"
    proc = _cli(*BASES[task], f"{key}={value}", f"hydra.run.dir={run_dir}")
    written = sorted(p.name for p in run_dir.rglob("*") if p.is_file()) if run_dir.exists() else []
    assert "Traceback" not in proc.stderr, (key, value, proc.stderr)
    assert not [n for n in written if ".tmp" in n], written
    if proc.returncode == 0:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["task"] == task
        assert all(not isinstance(v, float) or math.isfinite(v) or k in ("kl_nats",) for k, v in metrics.items()), metrics
    else:
        assert proc.returncode == 2, (key, value, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("train:", "\r"))]
        assert [line for line in lines if line.startswith("error: ")] == lines[-1:] and len(lines) >= 1, proc.stderr
        assert "metrics.json" not in written


@pytest.mark.parametrize("task, key, value", _cases(2, seed=0), ids=lambda v: str(v))
def test_any_value_of_any_setting_gives_a_result_or_one_error_line(tmp_path, task, key, value):
    _check_outcome(tmp_path, task, key, value)


@pytest.mark.slow
@pytest.mark.parametrize("task, key, value", _cases(25, seed=1), ids=lambda v: str(v))
def test_any_value_of_any_setting_many(tmp_path, task, key, value):
    _check_outcome(tmp_path, task, key, value)


def test_an_exploding_score_is_caught_by_its_bound():
    """E‖s(x_t)‖² s²/D ≤ 1 for the true score (Jensen); the exact ring score sits near 1, a scaled one far above."""
    from models import MixtureScore, ring_mixture
    from sde_lib import VESDE, VPSDE
    x0 = ring_mixture().sample(256, generator=torch.Generator().manual_seed(0))[0].float()
    for sde in (VPSDE(), VESDE()):
        exact = MixtureScore(sde, ring_mixture())
        assert 0.8 < loop_module.score_scale(exact, sde, x0, seed=0) < 1.2
        assert loop_module.score_scale(lambda x, t: 30 * exact(x, t), sde, x0, seed=0) > 500


def test_a_model_with_an_exploding_score_stops_training(tmp_path, monkeypatch):
    monkeypatch.setattr(loop_module, "score_scale", lambda *args, **kwargs: 1e4)
    with pytest.raises(TrainingError, match=r"score exploded at step 40: .* = 1e\+04, where the true score's is at "
                                            r"most 1 .*prev\.pt"):
        run_task(compose(*TRAIN), tmp_path / "run", set())
