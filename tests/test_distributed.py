"""torchrun: data-parallel training, exact resume, preemption, failures, sharded sampling; mixed precision.

The torchrun tests start real jobs (gloo, 2 processes on this 2-core machine) through ``python -m
torch.distributed.run``, as a user would, and compare their files with single-process runs.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from core_lib import Preempted, UserError, distributed
from models.checkpoint import read_checkpoint
from tasks_lib import compose, run_task
from training import loop as loop_module

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
# A short training run whose evaluation is cheap; a constant learning rate, so that a run of 20 steps is
# the first half of a run of 40 (cosine decay would depend on task.steps).
TRAIN = ["task=train", "task.batch_size=256", "task.lr_schedule=constant", "task.warmup=5", "task.eval_samples=64",
         "task.log_every=10", "likelihood.n_eval=16", "likelihood.rtol=1e-3", "likelihood.atol=1e-3"]


def _cli(*args, nproc=None, timeout=300):
    """``python run.py args`` (nproc None) or ``torchrun --standalone --nproc_per_node=nproc run.py args``."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([sys.executable, *launcher, str(ROOT / "run.py"), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _weights(run_dir: pathlib.Path, name: str = "last.pt") -> dict:
    state = read_checkpoint(run_dir / "checkpoints" / name)
    return {**{f"model.{k}": v for k, v in state["model"].items()}, **{f"ema.{k}": v for k, v in state["ema"].items()}}


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """40 steps in one process, in torchrun with one process, and in torchrun with two (shared by the tests)."""
    root = tmp_path_factory.mktemp("ddp")
    done = {}
    for name, nproc in (("plain", None), ("one", 1), ("two", 2)):
        proc = _cli(*TRAIN, "task.steps=40", f"hydra.run.dir={root / name}", nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        done[name] = root / name
    return done


# ---- data-parallel training -------------------------------------------------------------------------

@pytest.mark.xdist_group("ddp")   # one worker runs the shared fixture
def test_torchrun_with_one_process_is_the_plain_run_bit_for_bit(runs):
    _assert_bitwise(_weights(runs["plain"]), _weights(runs["one"]))
    plain, one = (json.loads((runs[k] / "metrics.json").read_text()) for k in ("plain", "one"))
    assert plain["test_loss"] == one["test_loss"] and plain["world_size"] == one["world_size"] == 1


@pytest.mark.xdist_group("ddp")   # one worker runs the shared fixture
def test_two_processes_train_what_one_does_up_to_the_order_of_sums(runs):
    """Each rank computes half of the same global batch (same indices, times, noise): the gradients agree to
    float32 rounding, so after 40 Adam steps the weights agree to ~1e-6, far below one step's change."""
    one, two = _weights(runs["plain"]), _weights(runs["two"])
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-5, worst
    first = read_checkpoint(runs["plain"] / "checkpoints" / "last.pt")
    moved = max((first["model"][k] - first["ema"][k]).abs().max().item() for k in first["model"])
    assert moved > 1e-3   # the comparison above is not trivially met
    rows = [np.genfromtxt(runs[k] / "train_log.csv", delimiter=",", names=True) for k in ("plain", "two")]
    np.testing.assert_allclose(rows[0]["loss"], rows[1]["loss"], rtol=1e-5)
    metrics = json.loads((runs["two"] / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and "world_size: 2" in (runs["two"] / "config.yaml").read_text()


@pytest.mark.xdist_group("ddp")   # one worker runs the shared fixture
def test_resuming_a_two_process_run_is_exact(runs, tmp_path):
    """Two ranks stopped at step 20 and resumed to 40 give the weights of the uninterrupted two-rank run."""
    first = _cli(*TRAIN, "task.steps=20", f"hydra.run.dir={tmp_path / 'a'}", nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(read_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["rng"]["torch_ranks"]) == 2
    second = _cli(*TRAIN, "task.steps=40", f"task.resume={tmp_path / 'a' / 'checkpoints' / 'last.pt'}",
                  f"hydra.run.dir={tmp_path / 'b'}", nproc=2)
    assert second.returncode == 0, second.stderr[-3000:]
    _assert_bitwise(_weights(runs["two"]), _weights(tmp_path / "b"))


def test_a_batch_that_does_not_split_over_the_ranks_is_one_error_line(tmp_path):
    proc = _cli(*TRAIN, "task.batch_size=255", f"hydra.run.dir={tmp_path / 'r'}", nproc=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "task.batch_size=255" in errors[0] and "multiple of 2" in errors[0], proc.stderr
    # torchrun then reports the failed worker in its own words; no traceback comes from this project's code
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith("File") and str(ROOT) in line]
    assert not (tmp_path / "r").exists()   # refused before the run directory was made


# ---- preemption and faults ----------------------------------------------------------------------------

def _sigterm_at(step: int):
    """A dsm loss that sends this process SIGTERM while computing step ``step`` (1-based)."""
    calls = {"n": 0}
    real = loop_module.get_loss("dsm")

    def loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    return lambda name: loss


def test_sigterm_checkpoints_the_step_and_resume_auto_finishes_the_run_exactly(tmp_path, monkeypatch):
    """SIGTERM mid-step: the step completes, is checkpointed, Preempted; ``task.resume=auto`` in the same
    directory continues to the weights of an uninterrupted run, and the logs hold each step once."""
    args = [*TRAIN, "task.steps=30", "task.ckpt_every=1000"]
    whole = run_task(compose(*args), tmp_path / "whole", set())
    monkeypatch.setattr(loop_module, "get_loss", _sigterm_at(17))
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(Preempted, match="stopped by SIGTERM at step 17 of 30"):
            run_task(compose(*args, "task.resume=auto"), tmp_path / "run", set())
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN   # the process is on its way out
    finally:
        signal.signal(signal.SIGTERM, before)
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 17
    monkeypatch.undo()
    resumed = run_task(compose(*args, "task.resume=auto"), tmp_path / "run", set())
    _assert_bitwise(_weights(tmp_path / "whole"), _weights(tmp_path / "run"))
    assert resumed["test_loss"] == whole["test_loss"]
    steps = np.genfromtxt(tmp_path / "run" / "train_log.csv", delimiter=",", names=True)["step"]
    assert list(steps) == [10, 20, 30]


def test_resume_auto_falls_back_to_the_previous_checkpoint_when_the_last_is_corrupt(tmp_path):
    args = [*TRAIN, "task.steps=20", "task.ckpt_every=5"]
    run_task(compose(*args), tmp_path / "a", set())
    ckpt = tmp_path / "a" / "checkpoints"
    assert loop_module.newest_checkpoint(ckpt) == ckpt / "last.pt"
    data = bytearray((ckpt / "last.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpt / "last.pt").write_bytes(bytes(data))
    assert loop_module.newest_checkpoint(ckpt) == ckpt / "prev.pt"
    (ckpt / "prev.pt").write_bytes(b"torn")
    assert loop_module.newest_checkpoint(ckpt) is None
    assert loop_module.newest_checkpoint(tmp_path / "nowhere") is None


def test_resume_auto_needs_a_named_run_directory(tmp_path):
    proc = _cli(*TRAIN, "task.resume=auto")
    assert proc.returncode == 2 and proc.stderr.startswith("error: task.resume=auto"), proc.stderr


def _worker_pids(parent: int) -> dict[int, int]:
    """LOCAL_RANK → pid of torchrun ``parent``'s worker processes (from Linux's /proc)."""
    found = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        rank = [e for e in env if e.startswith(b"LOCAL_RANK=")]
        if ppid == parent and rank:
            found[int(rank[0].split(b"=")[1])] = int(entry.name)
    return found


def _started_job(tmp_path: pathlib.Path, *args: str, restarts: int = 0):
    """A 2-process torchrun training job on the ring, once it has written its first checkpoint: (torchrun's
    process, the run directory, LOCAL_RANK → worker pid). Its output goes to tmp_path/torchrun.log, a file
    rather than a pipe that nobody reads while the test waits (a full pipe would block the workers)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             f"--max-restarts={restarts}", str(ROOT / "run.py"), *TRAIN, *args,
                             f"hydra.run.dir={run_dir}"], cwd=ROOT, env=ENV,
                            stdout=open(tmp_path / "torchrun.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.1)
    workers = _worker_pids(proc.pid)
    assert set(workers) == {0, 1}, workers
    return proc, run_dir, workers


def test_a_killed_rank_fails_the_whole_job_quickly_and_keeps_the_last_checkpoint(tmp_path):
    proc, run_dir, workers = _started_job(tmp_path, "task.steps=100000", "task.ckpt_every=10")
    os.kill(workers[1], signal.SIGKILL)
    killed = time.time()
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert time.time() - killed < 60
    read_checkpoint(run_dir / "checkpoints" / "last.pt")      # whole and verified


def test_sigterm_under_torchrun_checkpoints_the_same_step_on_every_rank(tmp_path):
    """SIGTERM to every worker (what torchrun and SLURM do): the ranks agree on the step to stop at, rank 0
    checkpoints it, and every worker exits with 143."""
    proc, run_dir, workers = _started_job(tmp_path, "task.steps=100000", "task.ckpt_every=10")
    os.kill(workers[1], signal.SIGTERM)   # one rank first: the other learns of it through the step's all-reduce
    time.sleep(0.05)
    os.kill(workers[0], signal.SIGTERM)
    proc.wait(timeout=120)
    text = (tmp_path / "torchrun.log").read_text()
    said = [line for line in text.splitlines() if line.startswith("error: stopped by SIGTERM at step")]
    assert len(said) == 1, text[-3000:]
    assert f"at step {read_checkpoint(run_dir / 'checkpoints' / 'last.pt')['step']} of" in said[0]
    assert "exitcode  : 143" in text


def test_torchrun_restarts_recover_a_killed_rank_exactly_with_resume_auto(tmp_path):
    """``--max-restarts=1`` and ``task.resume=auto``: a rank SIGKILLed mid-run, torchrun restarts the job, which
    continues from the last checkpoint and ends with the weights of an uninterrupted run."""
    args = ["task.steps=150", "task.ckpt_every=25", "task.resume=auto"]
    whole = _cli(*TRAIN, *args, f"hydra.run.dir={tmp_path / 'whole'}", nproc=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    proc, run_dir, workers = _started_job(tmp_path, *args, restarts=1)
    assert not (run_dir / "metrics.json").exists()
    os.kill(workers[1], signal.SIGKILL)
    proc.wait(timeout=300)
    assert proc.returncode == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
    assert "resumed from" in (run_dir / "run.log").read_text()
    _assert_bitwise(_weights(tmp_path / "whole"), _weights(run_dir))
    steps = np.genfromtxt(run_dir / "train_log.csv", delimiter=",", names=True)["step"]
    assert list(steps) == sorted(set(steps))   # each step logged once


# ---- sharded sampling and likelihood ----------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["multistep", "euler_maruyama"])
def test_sampling_on_two_processes_gives_the_single_process_samples_bit_for_bit(tmp_path, solver):
    args = ["task=sample", f"solver={solver}", "solver.steps=20", "task.n_samples=101", "task.likelihood=false"]
    plain = _cli(*args, f"hydra.run.dir={tmp_path / 'one'}")
    two = _cli(*args, f"hydra.run.dir={tmp_path / 'two'}", nproc=2)
    assert plain.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert np.array_equal(a["samples"], b["samples"]) and np.array_equal(a["z"], b["z"])
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"] == 2
    assert not (tmp_path / "two" / ".hydra").exists() or (tmp_path / "two" / ".hydra" / "config.yaml").exists()


def test_guided_sampling_on_two_processes_splits_the_labels_with_the_samples(tmp_path):
    """Classifier-free guidance over an even split of the classes: each rank samples its rows with its rows' labels,
    so the two-process samples are the single-process ones bit for bit."""
    args = ["ckpt=exact", "guidance.scale=2", "solver=ddim", "solver.steps=20", "task.n_samples=64",
            "task.likelihood=false", "task.trajectories=0"]
    plain = _cli(*args, f"hydra.run.dir={tmp_path / 'one'}")
    two = _cli(*args, f"hydra.run.dir={tmp_path / 'two'}", nproc=2)
    assert plain.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert np.array_equal(a["samples"], b["samples"])
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["label_accuracy"] == 1.0


def test_a_likelihood_on_two_processes_gives_the_single_process_values(tmp_path):
    """Fixed-budget (multistep, Hutchinson probes indexed by point): bit for bit; dopri5 with per-point error
    control, whose steps depend on the block each rank solves: to its tolerance."""
    base = ["task=likelihood", "likelihood.n_eval=21"]
    for name, extra, tol in (("fixed", ["likelihood.method=multistep", "likelihood.steps=30",
                                        "likelihood.divergence=hutchinson", "likelihood.probes=2"], 0.0),
                             ("adaptive", ["likelihood.rtol=1e-5", "likelihood.atol=1e-5"], 1e-3)):
        one = _cli(*base, *extra, f"hydra.run.dir={tmp_path / name / 'one'}")
        two = _cli(*base, *extra, f"hydra.run.dir={tmp_path / name / 'two'}", nproc=2)
        assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
        a, b = np.load(tmp_path / name / "one" / "likelihood.npz"), np.load(tmp_path / name / "two" / "likelihood.npz")
        np.testing.assert_allclose(a["logp"], b["logp"], rtol=0, atol=tol)


def test_shard_blocks_cover_every_row_once():
    for n in (1, 7, 8, 101):
        for parts in (1, 2, 3, 8):
            blocks = [distributed.shard(n, r, parts) for r in range(parts)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1


# ---- two nodes ------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")   # one worker runs the shared fixture
def test_two_nodes_of_one_process_each_train_what_one_process_does(tmp_path, runs):
    """The documented multi-node command, as two one-process 'nodes' on 127.0.0.1 (c10d rendezvous)."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={r}",
                               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               "--rdzv_id=test", str(ROOT / "run.py"), *TRAIN, "task.steps=40",
                               f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=ENV,
                              stdout=open(tmp_path / f"node{r}.log", "w"), stderr=subprocess.STDOUT) for r in range(2)]
    for r, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, (tmp_path / f"node{r}.log").read_text()[-3000:]
    _assert_bitwise(_weights(runs["two"]), _weights(tmp_path / "run"))


# ---- mixed precision and compilation ----------------------------------------------------------------------

def test_bf16_training_stays_within_a_stated_tolerance_of_fp32(tmp_path):
    """bf16 autocast of the network's forward (8 bits of mantissa): after 40 steps the test loss is within 5 %
    of fp32's; the weights, the optimizer and the loss reduction stay in float32."""
    fp32 = run_task(compose(*TRAIN, "task.steps=40"), tmp_path / "fp32", set())
    bf16 = run_task(compose(*TRAIN, "task.steps=40", "precision=bf16"), tmp_path / "bf16", set())
    assert abs(bf16["test_loss"] - fp32["test_loss"]) < 0.05 * fp32["test_loss"]
    assert bf16["test_loss"] != fp32["test_loss"]   # bf16 did run
    assert all(v.dtype == torch.float32 for v in _weights(tmp_path / "bf16").values())


def test_fp16_training_scales_the_loss_and_resumes_with_its_scaler(tmp_path):
    """fp16 (CUDA on the command line; the Python API runs it anywhere): GradScaler's state is checkpointed."""
    from models import build_score_model
    from sde_lib import VPSDE
    from evaluation import load_data

    data = load_data({"name": "ring", "n_train": 2000, "n_test": 200, "n_modes": 8, "radius": 4.0, "std": 0.3}, 0)
    config = loop_module.check_train_config({"steps": 10, "batch_size": 128, "eval_samples": 32, "warmup": 2})
    from evaluation import LikelihoodConfig
    torch.manual_seed(0)
    model = build_score_model(VPSDE(), "mlp", (2,))
    metrics = loop_module.train(config, model, data, tmp_path / "run", likelihood=LikelihoodConfig(n_eval=8),
                                precision="fp16")
    assert np.isfinite(metrics["test_loss"])
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["grad_scaler"]["scale"] > 1


def test_precision_applies_to_networks_only(tmp_path):
    """An exact score has no network: its samples are the same at every precision."""
    args = ["ckpt=exact", "task.n_samples=64", "task.likelihood=false", "solver=multistep"]
    a = run_task(compose(*args), tmp_path / "a", set())
    b = run_task(compose(*args, "precision=bf16"), tmp_path / "b", set())
    assert np.array_equal(np.load(tmp_path / "a" / "samples.npz")["samples"],
                          np.load(tmp_path / "b" / "samples.npz")["samples"])
    assert a["swd"] == b["swd"]


def test_bf16_sampling_of_a_network_is_close_to_fp32(tmp_path):
    args = ["task.n_samples=128", "task.likelihood=false", "solver=multistep"]
    run_task(compose(*args), tmp_path / "a", set())
    run_task(compose(*args, "precision=bf16"), tmp_path / "b", set())
    a, b = (np.load(tmp_path / k / "samples.npz")["samples"] for k in ("a", "b"))
    diff = np.sqrt(((a - b) ** 2).sum(1).mean())
    assert 0 < diff < 0.05, diff


@pytest.mark.parametrize("override,says", [("precision=fp16", "precision=fp16 needs a CUDA device"),
                                           ("precision=fp8", "precision: must be one of"),
                                           ("device=cuda", "device: cuda is not available")])
def test_precision_mistakes_are_one_error_line(tmp_path, override, says):
    proc = _cli(override, f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert says in proc.stderr


def test_compile_without_a_compiler_is_one_error_line(monkeypatch):
    from tasks_lib import checks
    monkeypatch.setattr(checks.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="compile=true on CPU needs a C\\+\\+ compiler"):
        checks.check_precision("fp32", True, torch.device("cpu"))


@pytest.mark.slow
def test_compiled_sampling_matches_eager(tmp_path):
    args = ["task.n_samples=64", "task.likelihood=false", "solver=multistep"]
    run_task(compose(*args), tmp_path / "a", set())
    run_task(compose(*args, "compile=true"), tmp_path / "b", set())
    a, b = (np.load(tmp_path / k / "samples.npz")["samples"] for k in ("a", "b"))
    np.testing.assert_allclose(a, b, atol=1e-4)


NAN_ON_RANK_1 = '''
import sys
import torch
from core_lib import distributed
from tasks_lib import compose, run_task
from training import TrainingError, loop

real = loop.get_loss("dsm")
def poisoned(model, sde, x0, **kwargs):
    loss = real(model, sde, x0, **kwargs)
    return loss * float("nan") if distributed.rank() == 1 and kwargs["generator"].initial_seed() == 0 else loss
loop.get_loss = lambda name: poisoned
try:
    run_task(compose(*sys.argv[2:]), sys.argv[1], set())
except TrainingError as err:
    open(f"{sys.argv[1]}.rank{distributed.rank()}", "w").write(str(err))
    sys.exit(2)
'''


def test_a_nan_on_one_rank_stops_every_rank_with_the_same_message(tmp_path):
    """The loss is summed over the ranks before the NaN check: rank 1's NaN stops both ranks at the same step."""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(run_dir), *TRAIN, "task.steps=20"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    said = [pathlib.Path(f"{run_dir}.rank{r}").read_text() for r in (0, 1)]
    assert said[0] == said[1] and "became non-finite at step 1" in said[0], said


def test_a_resumed_run_drops_the_log_rows_past_its_checkpoint(tmp_path):
    from evaluation import RunOutput, release_run_dir
    out = RunOutput(tmp_path / "run")
    for step in (10, 20, 30):
        out.log_row("train_log", {"step": step, "loss": 1.0 / step})
    out.close()
    (tmp_path / "run" / "eval_log.csv").write_text("")   # torn before its header
    out.truncate_log("train_log", 20)
    out.truncate_log("eval_log", 20)
    out.log_row("train_log", {"step": 30, "loss": 0.5})
    out.close()
    rows = np.genfromtxt(tmp_path / "run" / "train_log.csv", delimiter=",", names=True)
    assert list(rows["step"]) == [10, 20, 30] and rows["loss"][-1] == 0.5
    assert not (tmp_path / "run" / "eval_log.csv").exists()
    release_run_dir(tmp_path / "run")
