"""The training loop: outputs, checkpoints that load, reproducibility, exact resume (also after SIGKILL), bad input.

Runs are tiny (a 1-block MLP of width 32 on 512 ring points); every relevant config value is
given explicitly so that edits of the defaults in conf/ do not change what is tested.
"""
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import models
import solvers
from data_lib import load_dataset
from models.checkpoint import CheckpointError, export_checkpoint, read_checkpoint, save_checkpoint
from sde_lib import VPSDE
from evaluation import LikelihoodConfig
from training import TrainConfig, TrainingError, train
import training.loop as loop_module
from tasks_lib import TASKS, compose
from training.ema import EMA
from training.loop import check_train_config, learning_rate

ROOT = Path(__file__).resolve().parents[2]

# Everything but the data: pinned so that the tests do not depend on conf/ defaults.
COMMON = [
    "task=train", "seed=0", "device=cpu", "sde=vp", "model=mlp", "model.parameterization=eps",
    "model.net.hidden=32", "model.net.depth=1",
    "task.batch_size=64", "task.lr=2e-3", "task.warmup=20", "task.lr_schedule=constant",
    "task.betas=[0.9,0.999]",
    "task.weight_decay=0.0", "task.grad_clip=1.0", "task.ema_decay=0.99", "task.loss=dsm",
    "task.weighting=s2", "task.importance_sampling=false", "task.reduction=mean", "task.eps=1e-5",
    "task.log_every=10", "task.ckpt_every=10", "task.resume=null",
    "task.eval_every=0", "task.eval_samples=64", "likelihood.n_eval=32",
    "likelihood.rtol=1e-3", "likelihood.atol=1e-3", "likelihood.divergence=exact",
]
RING = ["data=ring", "data.n_train=512", "data.n_test=128"]
TINY = COMMON + RING

# One intra-op thread in subprocesses too, as tests/conftest.py sets in-process: bitwise
# comparisons between a CLI run and an in-process run then compare like with like.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def make_cfg(*overrides, base=TINY):
    return compose(*base, *overrides)


def run_train(run_dir: Path, *overrides, base=TINY) -> dict:
    """What ``python run.py <TINY> <overrides>`` does, in process."""
    return TASKS["train"](make_cfg(*overrides, base=base), run_dir, set())


def cli_args(run_dir: Path, *overrides, base=TINY) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), *base, *overrides, f"hydra.run.dir={run_dir}"]


def run_cli(run_dir: Path, *overrides, base=TINY) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(run_dir, *overrides, base=base), capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=120)


def assert_same(a, b, where="state"):
    """Recursive exact equality of checkpoint entries (tensors bitwise, with dtype and shape)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_training_state(a: dict, b: dict):
    for key in ("model", "ema", "ema_updates", "optimizer", "step", "rng"):
        assert_same(a[key], b[key], key)


def last(run_dir: Path) -> dict:
    return read_checkpoint(run_dir / "checkpoints" / "last.pt")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- a trained run shared by the output and loading tests -----------------------------------

STEPS = 200


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained")
    overrides = (f"task.steps={STEPS}", "task.ckpt_every=100")
    metrics = run_train(run_dir, *overrides)
    return run_dir, metrics, overrides


def test_a_run_writes_its_outputs_and_learns(trained_run):
    run_dir, metrics, _ = trained_run
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["last.pt", "prev.pt", f"step_{STEPS:07d}.pt"]
    assert last(run_dir)["step"] == STEPS
    assert_same(last(run_dir)["model"], read_checkpoint(ckpts / f"step_{STEPS:07d}.pt")["model"])

    rows = read_csv(run_dir / "train_log.csv")
    assert list(rows[0]) == ["step", "loss", "lr", "grad_norm", "steps_per_second"]
    assert [int(r["step"]) for r in rows] == list(range(10, STEPS + 1, 10))
    assert float(rows[-1]["lr"]) == 2e-3 and float(rows[0]["lr"]) == pytest.approx(2e-3 * 10 / 20)
    losses = [float(r["loss"]) for r in rows]
    early, late = np.mean(losses[:2]), np.mean(losses[-5:])
    print(f"logged loss: first {early:.3f}, last {late:.3f}")
    assert early > late + 0.2

    evals = read_csv(run_dir / "eval_log.csv")
    assert len(evals) == 1 and int(evals[0]["step"]) == STEPS

    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("test_loss", "test_nll_nats", "test_bpd", "kl_nats", "data_nll_nats"):
        assert math.isfinite(on_disk[key]), key
    assert on_disk["steps"] == STEPS and on_disk["sde"] == "VPSDE" and on_disk["data"] == "ring"
    # An untrained eps-network is the zero score, whose s²-weighted loss is E‖z‖²/D = 1.
    assert on_disk["test_loss"] < 0.7
    assert on_disk["test_bpd"] == pytest.approx(on_disk["test_nll_nats"] / (2 * math.log(2)), rel=1e-5)
    assert on_disk["kl_nats"] == pytest.approx(on_disk["test_nll_nats"] - on_disk["data_nll_nats"])
    assert (run_dir / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_files_get_the_usual_permissions(trained_run):
    run_dir, _, _ = trained_run
    mask = os.umask(0o022)
    os.umask(mask)
    for path in (run_dir / "checkpoints").glob("*.pt"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


def test_load_checkpoint_gives_the_ema_model_ready_for_the_solvers(trained_run):
    run_dir, metrics, overrides = trained_run
    state = last(run_dir)
    loaded = models.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    cfg = make_cfg(*overrides)

    assert type(loaded.sde) is VPSDE and loaded.sde == instantiate(cfg.sde)
    assert loaded.sde.hparams() == {"beta_min": cfg.sde.beta_min, "beta_max": cfg.sde.beta_max, "N": cfg.sde.N}
    assert loaded.step == STEPS and loaded.event_shape == (2,)
    assert loaded.data["name"] == "ring" and loaded.data["levels"] is None
    assert loaded.config["task"]["steps"] == STEPS
    net = loaded.score_fn
    assert not net.training and not any(m.training for m in net.modules())
    assert not any(p.requires_grad for p in net.parameters())
    assert_same(net.state_dict(), state["ema"], "ema")
    # EMA and raw weights differ, so the comparison above tells them apart.
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])

    result = solvers.sample(loaded.sde, net, (64, 2), solver="pf_ode", seed=0)
    assert result.samples.shape == (64, 2) and torch.isfinite(result.samples).all()
    # The same test points and tolerances as the run's own evaluation: the same NLL.
    data = load_dataset("ring", n_train=512, n_test=128, seed=0)
    lik = solvers.log_likelihood(loaded.sde, net, data.test[:32], rtol=1e-3, atol=1e-3)
    assert torch.isfinite(lik.logp).all()
    assert -lik.logp.mean().item() == pytest.approx(metrics["test_nll_nats"], abs=1e-4)


def test_resuming_a_finished_run_evaluates_it(trained_run, tmp_path):
    """Resuming at task.steps trains nothing and reports the checkpoint's metrics (same seeds: same numbers)."""
    run_dir, metrics, overrides = trained_run
    again = run_train(tmp_path, *overrides, f"task.resume={run_dir / 'checkpoints' / 'last.pt'}")
    for key in ("test_loss", "test_nll_nats", "kl_nats"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key
    assert not (tmp_path / "train_log.csv").exists()


def test_an_exported_checkpoint_samples_alike_but_cannot_be_resumed(trained_run, tmp_path):
    """export_checkpoint keeps spec, EMA, step and config (what models/pretrained/ ships); resuming needs the rest."""
    run_dir, _, overrides = trained_run
    exported = tmp_path / "exported.pt"
    export_checkpoint(run_dir / "checkpoints" / "last.pt", exported)
    full, slim = models.load_checkpoint(run_dir / "checkpoints" / "last.pt"), models.load_checkpoint(exported)
    assert_same(slim.score_fn.state_dict(), full.score_fn.state_dict(), "ema")
    assert (slim.step, slim.config, slim.sde) == (full.step, full.config, full.sde)
    assert sorted(read_checkpoint(exported)) == ["checksums", "config", "ema", "format", "model_spec", "step"]
    assert exported.stat().st_size < 0.4 * (run_dir / "checkpoints" / "last.pt").stat().st_size
    with pytest.raises(CheckpointError, match="holds the EMA weights only .* resuming needs a training checkpoint"):
        run_train(tmp_path / "resumed", *overrides[:-1], f"task.steps={2 * STEPS}", f"task.resume={exported}")


def test_loading_inconsistent_ema_weights_fails_clearly(trained_run, tmp_path):
    state = last(trained_run[0])
    state["ema"].pop(next(iter(state["ema"])))
    broken = tmp_path / "broken.pt"
    save_checkpoint(broken, state)
    with pytest.raises(CheckpointError, match="EMA weights in .*broken.pt do not fit"):
        models.load_checkpoint(broken)


# ---- reproducibility and exact resume -------------------------------------------------------

def test_same_seed_same_weights(tmp_path):
    run_train(tmp_path / "a", "task.steps=30")
    run_train(tmp_path / "b", "task.steps=30")
    run_train(tmp_path / "c", "task.steps=30", "seed=1")
    a, b, c = last(tmp_path / "a"), last(tmp_path / "b"), last(tmp_path / "c")
    assert_same_training_state(a, b)
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def test_exact_resume(tmp_path):
    """k steps, then resume to 2k in another run dir == 2k steps straight, bit for bit."""
    k = 20
    run_train(tmp_path / "straight", f"task.steps={2 * k}", "task.ckpt_every=10", "task.log_every=5")
    run_train(tmp_path / "first", f"task.steps={k}", "task.ckpt_every=10", "task.log_every=5")
    assert last(tmp_path / "first")["step"] == k
    run_train(tmp_path / "second", f"task.steps={2 * k}", "task.ckpt_every=10", "task.log_every=5",
              f"task.resume={tmp_path / 'first' / 'checkpoints' / 'last.pt'}")
    straight, resumed = last(tmp_path / "straight"), last(tmp_path / "second")
    assert resumed["step"] == 2 * k
    assert_same_training_state(straight, resumed)
    # The resumed run's log continues the straight run's rows exactly.
    tail = [r for r in read_csv(tmp_path / "straight" / "train_log.csv") if int(r["step"]) > k]
    rows = read_csv(tmp_path / "second" / "train_log.csv")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in rows] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in tail]


def test_evaluation_during_training_does_not_perturb_it(tmp_path):
    run_train(tmp_path / "quiet", "task.steps=30")
    run_train(tmp_path / "evaluated", "task.steps=30", "task.eval_every=10")
    assert [int(r["step"]) for r in read_csv(tmp_path / "evaluated" / "eval_log.csv")] == [10, 20, 30]
    assert_same_training_state(last(tmp_path / "quiet"), last(tmp_path / "evaluated"))


def _start_and_kill(run_dir: Path, steps: int, ckpt_every: int) -> int:
    """Start a CLI training run, SIGKILL it once last.pt holds step >= ckpt_every; the step of last.pt after."""
    run_dir.mkdir(parents=True)
    stderr = open(run_dir.parent / f"{run_dir.name}.stderr", "w+")      # a file: a full pipe would block the run
    proc = subprocess.Popen(cli_args(run_dir, f"task.steps={steps}", f"task.ckpt_every={ckpt_every}"),
                            stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT, env=ENV)
    path = run_dir / "checkpoints" / "last.pt"
    try:
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            # Writes are atomic (temporary file + rename): a checkpoint that exists is complete.
            if path.exists() and read_checkpoint(path)["step"] >= ckpt_every:
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        stderr.seek(0)
        err = stderr.read()
        stderr.close()
    assert proc.returncode in (0, -signal.SIGKILL), err
    return read_checkpoint(path)["step"]


def test_resume_after_sigkill_is_exact(tmp_path):
    ckpt_every = 20
    for steps in (400, 4000):                        # a longer run if the first one finished before the kill
        killed = tmp_path / f"killed_{steps}"
        step = _start_and_kill(killed, steps, ckpt_every)
        if step < steps:
            break
    else:
        pytest.fail("training finished before it could be killed, twice")
    print(f"killed with last.pt at step {step} of {steps}")
    assert step >= ckpt_every and step % ckpt_every == 0
    run_train(tmp_path / "resumed", f"task.steps={steps}", f"task.ckpt_every={ckpt_every}",
              f"task.resume={killed / 'checkpoints' / 'last.pt'}")
    run_train(tmp_path / "straight", f"task.steps={steps}", f"task.ckpt_every={ckpt_every}")
    assert_same_training_state(last(tmp_path / "straight"), last(tmp_path / "resumed"))


# ---- bad input: a clear message and a non-zero exit -----------------------------------------

def _assert_clean_failure(proc: subprocess.CompletedProcess, pattern: str):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert re.search(pattern, proc.stderr), proc.stderr


def test_cli_resume_from_a_missing_checkpoint(tmp_path):
    proc = run_cli(tmp_path / "run", "task.steps=20", f"task.resume={tmp_path / 'nowhere.pt'}")
    _assert_clean_failure(proc, r"no checkpoint at .*nowhere\.pt")


def test_cli_resume_from_a_corrupt_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    proc = run_cli(tmp_path / "run", "task.steps=20", f"task.resume={junk}")
    _assert_clean_failure(proc, r"junk\.pt is not a readable checkpoint")


def test_cli_resume_with_another_sde(trained_run, tmp_path):
    ckpt = trained_run[0] / "checkpoints" / "last.pt"
    proc = run_cli(tmp_path / "run", f"task.steps={2 * STEPS}", f"task.resume={ckpt}", "sde=ve")
    _assert_clean_failure(proc, r"model_spec .*'class': 'VPSDE'.*but this run asks for .*'class': 'VESDE'")


def test_cli_array_data_missing_file(tmp_path):
    base = COMMON + ["data=array", f"data.path={tmp_path / 'absent.npy'}"]
    proc = run_cli(tmp_path / "run", "task.steps=20", base=base)
    _assert_clean_failure(proc, r"file not found: .*absent\.npy")


def test_cli_array_data_with_nans(tmp_path):
    x = np.random.default_rng(0).normal(size=(100, 2)).astype(np.float32)
    x[17, 1] = np.nan
    np.save(tmp_path / "points.npy", x)
    base = COMMON + ["data=array", f"data.path={tmp_path / 'points.npy'}"]
    proc = run_cli(tmp_path / "run", "task.steps=20", base=base)
    _assert_clean_failure(proc, r"points\.npy' holds 1 NaN or inf value\(s\), the first at index \(17, 1\)")


def test_cli_nan_loss_keeps_the_last_good_checkpoint(tmp_path):
    """Continue a good run with a learning rate that blows the weights up: TrainingError, last.pt untouched."""
    run_dir = tmp_path / "run"
    run_train(run_dir, "task.steps=20", "task.ckpt_every=10")
    path = run_dir / "checkpoints" / "last.pt"
    before, stamp = path.read_bytes(), path.stat().st_mtime_ns
    proc = run_cli(tmp_path / "more", "task.steps=40", "task.ckpt_every=10", "task.lr=1e30", "task.warmup=1",
                   f"task.resume={path}")
    _assert_clean_failure(proc, rf"became non-finite at step 2[1-9]; the last good checkpoint is {path}")
    assert path.read_bytes() == before and path.stat().st_mtime_ns == stamp
    loaded = models.load_checkpoint(path)
    assert loaded.step == 20
    assert all(torch.isfinite(p).all() for p in loaded.score_fn.parameters())


def test_nan_gradient_stops_before_a_checkpoint_gets_nan_weights(tmp_path, monkeypatch):
    """A finite loss with NaN gradients (from step 12 on) must not step: last.pt keeps finite weights."""
    real_get_loss = loop_module.get_loss
    calls = {"n": 0}

    def get_loss(name):
        fn = real_get_loss(name)

        def poisoned(model, sde, x0, **options):
            loss = fn(model, sde, x0, **options)
            calls["n"] += 1
            if calls["n"] >= 12 and torch.is_grad_enabled():
                # sqrt(0) = 0 forward, so the loss is unchanged; its derivative 0·inf = NaN reaches every weight.
                u = sum(p.sum() for p in model.parameters())
                loss = loss + 0.0 * torch.sqrt(u - u.detach())
            return loss
        return poisoned

    monkeypatch.setattr(loop_module, "get_loss", get_loss)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError, match=rf"\(nan\) became non-finite at step 12; the last good checkpoint is "
                                            rf"{run_dir / 'checkpoints' / 'last.pt'}"):
        run_train(run_dir, "task.steps=40", "task.ckpt_every=1")
    state = last(run_dir)
    assert state["step"] == 11
    for key in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in state[key].values()), key


def test_resume_checks_the_checkpoint_against_the_run(trained_run, tmp_path):
    run_dir, _, overrides = trained_run
    state = last(run_dir)
    with pytest.raises(CheckpointError, match=f"at step {STEPS}, past task.steps=100"):
        run_train(tmp_path / "short", "task.steps=100",
                  f"task.resume={run_dir / 'checkpoints' / 'last.pt'}")
    del state["rng"]
    save_checkpoint(tmp_path / "no_rng.pt", state)
    with pytest.raises(CheckpointError, match="no_rng.pt lacks rng, which resuming needs"):
        run_train(tmp_path / "no_rng", f"task.steps={2 * STEPS}", f"task.resume={tmp_path / 'no_rng.pt'}")
    with pytest.raises(CheckpointError, match="model_spec"):
        run_train(tmp_path / "wider", f"task.steps={2 * STEPS}", "model.net.hidden=64",
                  f"task.resume={run_dir / 'checkpoints' / 'last.pt'}")


# ---- EMA ------------------------------------------------------------------------------------

def test_ema_follows_the_warmed_up_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    model.register_buffer("counter", torch.zeros(()))
    ema = EMA(model, decay=0.9)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    expected = model.weight.item()
    with torch.no_grad():
        for n in range(1, 31):
            model.weight.fill_(float(n))
            model.counter.fill_(float(n))
            ema.update(model)
            d = min(0.9, (1 + n) / (10 + n))
            expected = d * expected + (1 - d) * n
    assert ema.updates == 30
    assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert ema.module.counter.item() == 30.0                  # buffers are copied, not averaged
    restored = EMA(torch.nn.Linear(1, 1, bias=False), decay=0.9)
    restored.module.register_buffer("counter", torch.zeros(()))
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 30 and torch.equal(restored.module.weight, ema.module.weight)
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        EMA(model, decay=1.0)


# ---- learning-rate schedule -----------------------------------------------------------------

def test_learning_rate_warms_up_then_stays_or_follows_the_cosine():
    constant = make_cfg("task.steps=100", "task.warmup=10").task
    cosine = make_cfg("task.steps=100", "task.warmup=10", "task.lr_schedule=cosine").task
    for tc in (constant, cosine):
        assert [learning_rate(s, tc) for s in range(10)] == pytest.approx([2e-3 * (s + 1) / 10 for s in range(10)])
    assert all(learning_rate(s, constant) == 2e-3 for s in range(10, 100))
    # cosine: lr/2 (1 + cos(π (step − warmup)/(steps − warmup))): full at the end of warmup, half midway, → 0.
    assert learning_rate(10, cosine) == pytest.approx(2e-3)
    assert learning_rate(55, cosine) == pytest.approx(1e-3)
    assert learning_rate(99, cosine) == pytest.approx(1e-3 * (1 + math.cos(math.pi * 89 / 90)))
    lrs = [learning_rate(s, cosine) for s in range(10, 100)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    with pytest.raises(TrainingError, match="task.lr_schedule: must be cosine or constant, got 'step'"):
        check_train_config(OmegaConf.to_container(make_cfg("task.lr_schedule=step").task))


def test_training_from_python_without_hydra_matches_the_command_line(tmp_path):
    """``training.train`` on plain objects (no config system) trains the same weights as ``task=train``."""
    run_train(tmp_path / "cli", "task.steps=20")
    torch.manual_seed(0)
    data = load_dataset("ring", n_train=512, n_test=128, seed=0)
    model = models.build_score_model(VPSDE(), "mlp", data.event_shape, parameterization="eps",
                                     sigma_data=round(float(data.train.std()), 6), hidden=32, depth=1)
    config = TrainConfig(steps=20, batch_size=64, lr=2e-3, warmup=20, lr_schedule="constant", ema_decay=0.99,
                         log_every=10, ckpt_every=10, eval_samples=64)
    metrics = train(config, model, data, tmp_path / "python", seed=0,
                    likelihood=LikelihoodConfig(n_eval=32, rtol=1e-3, atol=1e-3, divergence="exact"))
    assert metrics["steps"] == 20 and math.isfinite(metrics["test_nll_nats"])
    assert_same(last(tmp_path / "python")["ema"], last(tmp_path / "cli")["ema"], "ema")
