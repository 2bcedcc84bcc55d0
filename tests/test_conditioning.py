"""Class labels through the stack: data labels, conditional networks, label dropout, checkpoints, the CLI's guidance.

The default tests share one small conditional training run on the ring (about 10 s); the heavier checks
(exact resume of a conditional run, guidance quality after longer training) are marked slow.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data_lib
import models
from core_lib import UserError
from data_lib import DataError, load_dataset
from data_lib.dataset import split_rows
from evaluation.plots import _class_grid, save_samples
from models import NULL_LABEL, MixtureScore, ModelError, build_network, build_score_model, load_checkpoint
from models.checkpoint import export_checkpoint, model_spec, read_checkpoint, save_checkpoint
from sde_lib import VPSDE
from tasks_lib import TASKS, check_config, compose, resolve_model
from tasks_lib.model_source import resolve_guidance
from training import TrainConfig, TrainingError, dsm_loss, train
from training.batches import StepBatches, drop_labels, step_generator

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}

#: A small conditional model on the ring, every setting pinned (conf/ defaults may change).
TRAIN = ["task=train", "seed=0", "sde=vp", "model=mlp", "model.num_classes=8", "model.net.hidden=64",
         "model.net.depth=2", "data=ring", "data.n_train=2048", "data.n_test=256", "task.steps=200",
         "task.batch_size=256", "task.warmup=20", "task.lr_schedule=constant", "task.lr=2e-3", "task.ema_decay=0.99",
         "task.log_every=50", "task.ckpt_every=100", "task.eval_samples=64", "likelihood.n_eval=16",
         "likelihood.rtol=1e-3", "likelihood.atol=1e-3", "likelihood.divergence=exact"]
SMALL = ["task.n_samples=400", "task.likelihood=false", "task.trajectories=0", "solver=ddim", "solver.steps=50"]


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={cwd}"], capture_output=True,
                          text=True, cwd=ROOT, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cond")
    metrics = TASKS["train"](compose(*TRAIN), run_dir, set())
    return run_dir, metrics


# ---- labels from data ---------------------------------------------------------------------------

def test_ring_and_mix16d_are_labelled_by_their_component():
    ring = load_dataset("ring", n_train=3000, n_test=500, seed=1)
    assert ring.classes == tuple("01234567") and ring.num_classes == 8
    # The ring's modes are 3.06 apart, 10 standard deviations: a point nearer to another mode than its own has
    # probability ~1e-7, so every point's nearest mean is its component.
    nearest = torch.cdist(ring.train.double(), ring.mixture.means).argmin(1)
    assert torch.equal(nearest, ring.train_labels)
    # The labels are the components the unchanged draws came from: the same samples as the mixture's own draws.
    x, k = ring.mixture.sample(500, generator=data_lib.dataset.seeded_generator(1, 1))
    assert torch.equal(ring.test, x) and torch.equal(ring.test_labels, k)
    mix = load_dataset("mix16d", n_train=2000, n_test=100)
    assert mix.num_classes == 5
    means = mix.mixture.means.float()
    # Means 3·N(0, I) in 16-D lie ~17 apart, component stds ≤ 1: the nearest mean is the component.
    assert torch.equal(torch.cdist(mix.train, means).argmin(1), mix.train_labels)


def test_moons_are_labelled_by_their_half_and_checkerboard_by_its_square():
    moons = load_dataset("moons", n_train=2000, n_test=10, noise=0.0)
    assert moons.classes == ("upper", "lower")
    centres = torch.tensor([[-1.0, -0.5], [1.0, 0.5]])
    radius = (moons.train - centres[moons.train_labels]).norm(dim=1)
    assert torch.allclose(radius, torch.full_like(radius, 2.0), atol=1e-5)
    assert 0.45 < moons.train_labels.float().mean() < 0.55        # each half with probability 1/2: 2.2σ margins
    board = load_dataset("checkerboard", n_train=2000, n_test=10)
    assert board.num_classes == 8
    col, row = (board.train + 4).div(2).floor().long().unbind(1)
    assert torch.equal(2 * col + row // 2, board.train_labels)
    named = [tuple(map(int, board.classes[k].split(","))) for k in board.train_labels.tolist()]
    assert named == list(zip(col.tolist(), row.tolist()))


def test_swiss_roll_is_unlabelled_and_digits_carry_their_digit():
    roll = load_dataset("swiss_roll", n_train=100, n_test=10)
    assert roll.num_classes == 0 and roll.train_labels is None
    from sklearn.datasets import load_digits
    bunch = load_digits()
    digits = load_dataset("digits", seed=3)
    train_rows, test_rows = split_rows(len(bunch.target), 0.2, 3)
    assert digits.classes == tuple(str(d) for d in range(10))
    assert digits.test_labels.tolist() == bunch.target[test_rows.numpy()].tolist()
    assert torch.allclose(digits.test[:, 0], torch.from_numpy(bunch.images[test_rows.numpy()] / 16).float())
    assert digits.train_labels.tolist() == bunch.target[train_rows.numpy()].tolist()


def test_array_labels_key_reads_checked_labels(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    y = np.arange(50) % 4
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y)
    data = load_dataset("array", path=str(path), labels_key="y", seed=0)   # key may be omitted beside labels
    assert data.classes == ("0", "1", "2", "3")
    train_rows, test_rows = split_rows(50, 0.1, 0)
    assert data.train_labels.tolist() == y[train_rows.numpy()].tolist()
    assert torch.equal(data.train, torch.from_numpy(x[train_rows.numpy()]))
    for bad, message in [(y.astype(np.float32), "dtype float32; class labels must be integers"),
                         (y[:40], "shape (40,); it must hold one label per sample, shape (50,)"),
                         (y - 1, "holds labels in [-1, 2]")]:
        np.savez(path, x=x, y=bad)
        with pytest.raises(DataError, match=r"data.labels_key=y: .*" + message.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):
            load_dataset("array", path=str(path), labels_key="y")
    with pytest.raises(DataError, match="no array 'z'"):
        load_dataset("array", path=str(path), key="x", labels_key="z")


# ---- conditional networks -----------------------------------------------------------------------

@pytest.mark.parametrize("kind, shape, kwargs", [("mlp", (2,), {"hidden": 32, "depth": 1}),
                                                 ("unet", (1, 8, 8), {"base_channels": 16})])
def test_num_classes_zero_is_the_network_of_before(kind, shape, kwargs):
    torch.manual_seed(0)
    before = build_network(kind, shape, **kwargs)
    torch.manual_seed(0)
    now = build_network(kind, shape, num_classes=0, **kwargs)
    a, b = before.state_dict(), now.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert now.spec == before.spec and not now.conditional      # a checkpoint of it has the same spec as before
    with pytest.raises(ModelError, match="unconditional"):
        now(torch.zeros(3, *shape), torch.rand(3), y=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("kind, shape, kwargs", [("mlp", (2,), {"hidden": 32, "depth": 1}),
                                                 ("unet", (1, 8, 8), {"base_channels": 16})])
def test_conditional_network_takes_labels_and_the_null_label(kind, shape, kwargs):
    torch.manual_seed(0)
    net = build_network(kind, shape, num_classes=3, **kwargs)
    assert net.conditional and net.num_classes == 3 and net.spec["num_classes"] == 3
    assert net.label_embed.embed.weight.shape[0] == 4           # K classes + the null label (last row)
    torch.nn.init.normal_(net.label_embed.embed.weight)          # trained-looking label vectors
    for p in net.parameters():                                   # and a non-zero output layer
        if p.dim() > 1 and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(6, *shape), torch.rand(6)
    y = torch.tensor([0, 1, 2, NULL_LABEL, 0, 1])
    out = net(x, t, y=y)
    assert out.shape == x.shape
    # y=None is the null label on every row; a row's output depends on its own label only
    assert torch.equal(net(x, t), net(x, t, y=torch.full((6,), NULL_LABEL)))
    assert torch.allclose(out[3], net(x, t)[3], atol=1e-6)
    assert not torch.allclose(out[0], net(x, t, y=torch.full((6,), 1))[0])
    for bad in (torch.tensor([0, 1, 3, 0, 0, 0]), torch.tensor([0, -2, 0, 0, 0, 0])):
        with pytest.raises(ModelError, match=r"y holds labels outside \[-1, 3\): the model has K=3 classes"):
            net(x, t, y=bad)
    with pytest.raises(ModelError, match="integer tensor"):
        net(x, t, y=y.float())


def test_score_model_exposes_conditioning():
    model = build_score_model(VPSDE(), "mlp", (2,), num_classes=4, hidden=16, depth=1)
    assert model.conditional and model.num_classes == 4 and model.label_dropout is None
    plain = build_score_model(VPSDE(), "mlp", (2,), hidden=16, depth=1)
    assert not plain.conditional and plain.num_classes == 0
    x, t = torch.randn(5, 2), torch.rand(5)
    assert model(x, t, y=torch.arange(5) % 4).shape == (5, 2)
    assert "labels" not in model_spec(plain, {"name": "ring"})
    assert model_spec(model, {"name": "ring"})["labels"] == {"classes": None, "label_dropout": None}


# ---- label dropout ----------------------------------------------------------------------------

def test_label_dropout_rate_and_reproducibility():
    y = torch.arange(200_000) % 7
    dropped = drop_labels(y, 0.1, torch.Generator().manual_seed(5))
    share = (dropped == NULL_LABEL).double().mean().item()
    # Binomial share: standard error √(0.1·0.9/200000) = 6.7e-4; 5 standard errors allowed.
    assert abs(share - 0.1) < 5 * 6.7e-4
    kept = dropped != NULL_LABEL
    assert torch.equal(dropped[kept], y[kept])
    assert torch.equal(dropped, drop_labels(y, 0.1, torch.Generator().manual_seed(5)))
    assert not (drop_labels(y, 0.0, torch.Generator().manual_seed(5)) == NULL_LABEL).any()


def test_step_batches_carry_their_rows_labels_with_dropout_split_like_one_process():
    data = load_dataset("ring", n_train=500, n_test=10)
    whole = StepBatches(data, 64, slice(None), seed=3, label_dropout=0.5)
    x, y = whole[7]
    x2, y2 = whole[7]
    assert torch.equal(x, x2) and torch.equal(y, y2)                       # a function of (seed, step)
    idx = torch.randint(0, 500, (64,), generator=step_generator(3, 7))    # the step's first draw: its indices
    assert torch.equal(x, data.train[idx])
    kept = y != NULL_LABEL
    assert torch.equal(y[kept], data.train_labels[idx][kept]) and 0 < kept.sum() < 64
    halves = [StepBatches(data, 64, rows, seed=3, label_dropout=0.5)[7] for rows in (slice(0, 32), slice(32, 64))]
    assert torch.equal(torch.cat([h[0] for h in halves]), x) and torch.equal(torch.cat([h[1] for h in halves]), y)
    # unlabelled batches keep the numbers they had: x alone is what it was, and no labels come with it
    plain_x, plain_y = StepBatches(data, 64, slice(None), seed=3)[7]
    assert torch.equal(plain_x, x) and plain_y is None


def test_conditional_dsm_of_the_exact_scores():
    """The exact conditional score at the true labels beats the exact unconditional score in the DSM loss.

    Per sample the difference of the two losses has expectation s²‖∇log p_t(x|y) − ∇log p_t(x)‖²/D ≥ 0; it is
    estimated with paired noise over 128 batches of 64 and its mean must exceed 4 standard errors of the batch
    means. The rows of a split batch (two 'ranks') average to the whole batch's loss.
    """
    sde = VPSDE()
    data = load_dataset("ring", n_train=8192, n_test=10)
    exact = MixtureScore(sde, data.mixture)
    per_batch = []
    for labels in (None, data.train_labels):
        gen = torch.Generator().manual_seed(0)
        losses = [dsm_loss(exact, sde, data.train[i:i + 64], generator=gen, labels=None if labels is None
                           else labels[i:i + 64]) for i in range(0, 8192, 64)]
        per_batch.append(torch.stack(losses).double())
    diff = per_batch[0] - per_batch[1]
    assert diff.mean() > 4 * diff.std() / len(diff) ** 0.5
    x0, y = data.train[:64], data.train_labels[:64]
    whole = dsm_loss(exact, sde, x0, generator=torch.Generator().manual_seed(1), labels=y)
    parts = [dsm_loss(exact, sde, x0[rows], generator=torch.Generator().manual_seed(1), labels=y[rows], rows=rows,
                      batch_size=64) for rows in (slice(0, 32), slice(32, 64))]
    assert torch.allclose(whole, sum(parts) / 2, rtol=1e-6)


# ---- training, checkpoints, export ---------------------------------------------------------------

def test_conditional_run_records_its_labels_and_round_trips(conditional_run, tmp_path):
    run_dir, metrics = conditional_run
    assert metrics["num_classes"] == 8 and metrics["label_dropout"] == 0.1
    state = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    spec = state["model_spec"]
    assert spec["net"]["num_classes"] == 8
    assert spec["labels"] == {"classes": list("01234567"), "label_dropout": 0.1}
    loaded = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    model = loaded.score_fn
    assert model.conditional and model.num_classes == 8 and model.classes == tuple("01234567")
    assert model.label_dropout == 0.1
    x, t, y = torch.randn(16, 2), torch.rand(16), torch.arange(16) % 8
    for fmt in ("safetensors", "pt"):
        exported = load_checkpoint(export_checkpoint(run_dir / "checkpoints" / "last.pt", tmp_path / f"e_{fmt}", fmt))
        assert exported.score_fn.classes == model.classes and exported.score_fn.label_dropout == 0.1
        assert torch.equal(exported.score_fn(x, t, y=y), model(x, t, y=y))


def test_label_dropout_changes_the_spec_so_a_resume_with_another_is_refused(conditional_run, tmp_path):
    run_dir, _ = conditional_run
    cfg = compose(*TRAIN, "task.label_dropout=0.2", f"task.resume={run_dir / 'checkpoints' / 'last.pt'}")
    with pytest.raises(models.CheckpointError, match="'label_dropout': 0.1"):
        TASKS["train"](cfg, tmp_path / "again", set())


@pytest.mark.parametrize("overrides, message", [
    (["data=swiss_roll"], "model.num_classes=8 makes a class-conditional model, but data=swiss_roll has no class"),
    (["model.num_classes=5"], "model.num_classes=5 differs from the 8 classes of data=ring"),
])
def test_training_refuses_labels_that_do_not_fit_the_data(overrides, message, tmp_path):
    with pytest.raises(TrainingError, match=message):
        TASKS["train"](compose(*TRAIN, *overrides), tmp_path / "run", set())
    assert not (tmp_path / "run").exists()                      # refused before the run directory was made


def test_train_from_python_takes_label_dropout_and_checks_it(tmp_path):
    data = load_dataset("ring", n_train=256, n_test=64)
    model = build_score_model(VPSDE(), "mlp", (2,), hidden=16, depth=1)
    with pytest.raises(TrainingError, match="task.label_dropout=0.3 applies to class-conditional models"):
        train(TrainConfig(steps=2, label_dropout=0.3), model, data, tmp_path / "a")
    with pytest.raises(TrainingError, match=r"task.label_dropout: must be null \(0.1 for a conditional model\)"):
        train(TrainConfig(steps=2, label_dropout=1.0), model, data, tmp_path / "b")


# ---- the command line: guidance -------------------------------------------------------------------

def test_sampling_a_class_of_the_trained_model(conditional_run, tmp_path):
    """guidance.y=2 on the 200-step model: most samples land in mode 2 (chance: 1/8).

    The run measured 0.9; 0.5 is 20 binomial standard errors (√(0.125·0.875/400) = 0.017) above chance.
    """
    run_dir, _ = conditional_run
    ckpt = run_dir / "checkpoints" / "last.pt"
    cfg = compose(f"ckpt={ckpt}", "guidance.y=2", *SMALL)
    metrics = TASKS["sample"](cfg, tmp_path / "s", {"ckpt", "guidance.y"})
    assert metrics["guidance"] == "class 2" and metrics["label_accuracy"] > 0.5
    saved = np.load(tmp_path / "s" / "samples.npz")
    assert (saved["y"] == 2).all() and np.isfinite(saved["samples"]).all()


def test_a_model_trained_without_label_dropout_warns_once(conditional_run, tmp_path, capsys, recwarn):
    run_dir, _ = conditional_run
    state = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    state["model_spec"]["labels"]["label_dropout"] = 0.0
    save_checkpoint(tmp_path / "p0.pt", state)
    cfg = compose(f"ckpt={tmp_path / 'p0.pt'}", "guidance.scale=2", *SMALL)
    metrics = TASKS["sample"](cfg, tmp_path / "s", {"ckpt", "guidance.scale"})
    lines = [line for line in capsys.readouterr().out.splitlines() if "warning:" in line]
    assert len(lines) == 1 and "trained without label dropout" in lines[0] and "w=2" in lines[0]
    assert not [w for w in recwarn if "label dropout" in str(w.message)]   # the solver's own warning stays quiet
    assert metrics["guidance"] == "8 classes, w=2"
    y = np.load(tmp_path / "s" / "samples.npz")["y"]
    assert np.bincount(y).tolist() == [50] * 8                           # an even split over the classes


def test_exact_model_is_conditional_and_samples_its_classes(tmp_path):
    cfg = compose("ckpt=exact", "guidance.y=5", *SMALL)
    model = resolve_model(cfg, set(), torch.device("cpu"))
    assert model.score_fn.conditional and model.score_fn.num_classes == 8
    metrics = TASKS["sample"](cfg, tmp_path / "s", {"ckpt", "guidance.y"})
    # exact draws of component 5 sit 10 of its standard deviations from the other modes: all land in 5
    assert metrics["label_accuracy"] == 1.0


def test_likelihood_of_a_conditional_model_reports_log_p_x_given_y(tmp_path):
    """With the exact model, log p(x | y) through the ODE matches the exact component density.

    The exact divergence in 2-D leaves only the ODE solver's error (rtol = atol = 1e-4; measured 8e-4 nats),
    so 0.01 nats bounds it; the conditional NLL is below the unconditional one by about log 8 = 2.08.
    """
    cfg = compose("ckpt=exact", "task=likelihood", "likelihood.n_eval=40", "likelihood.rtol=1e-4",
                  "likelihood.atol=1e-4")
    metrics = TASKS["likelihood"](cfg, tmp_path / "l", {"ckpt"})
    assert abs(metrics["kl_cond_nats"]) < 0.01 and abs(metrics["kl_nats"]) < 0.01
    assert 1.5 < metrics["nll_nats"] - metrics["nll_cond_nats"] < 2.5
    saved = np.load(tmp_path / "l" / "likelihood.npz")
    assert saved["logp_cond"].shape == saved["logp"].shape == saved["y"].shape == (40,)


def test_compare_sweeps_the_guidance_scale(tmp_path):
    cfg = compose("ckpt=exact", "task=compare", "task.samplers=[ddim]", "task.budgets=[20]",
                  "task.guidance_scales=[1,3]", "task.n_samples=400", "task.reference_rtol=1e-4")
    TASKS["compare"](cfg, tmp_path / "c", {"ckpt"})
    import csv
    with open(tmp_path / "c" / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["sampler"], float(r["guidance_scale"])) for r in rows] == [("ddim", 1.0), ("ddim", 3.0)]
    # w = 1 is the exact class-conditional flow; w = 3 pulls the samples away from p(x | y): a larger distance
    assert float(rows[0]["swd"]) < float(rows[1]["swd"])
    assert all(float(r["label_accuracy"]) == 1.0 and r["nll_nats"] == "" for r in rows)


@pytest.mark.parametrize("overrides, message", [
    (["guidance.y=3"], "guidance.y=3: ckpt=pretrained is unconditional and takes no class label"),
    (["guidance.scale=2"], "guidance.scale (classifier-free guidance) needs a class-conditional model"),
    (["ckpt=exact", "guidance.y=8"], "guidance.y=8 is out of range: the exact score has 8 classes, labels 0..7"),
])
def test_guidance_that_does_not_fit_the_model_is_refused_before_sampling(overrides, message):
    cfg = compose(*overrides, *SMALL)
    model = resolve_model(cfg, set(), torch.device("cpu"))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_guidance(cfg, model, 10, "cpu")


def test_guidance_y_with_data_without_classes_is_refused(conditional_run):
    run_dir, _ = conditional_run
    cfg = compose(f"ckpt={run_dir / 'checkpoints' / 'last.pt'}", "data=swiss_roll", "guidance.y=1", *SMALL)
    model = resolve_model(cfg, {"data"}, torch.device("cpu"))
    with pytest.raises(UserError, match="guidance.y=1: data=swiss_roll has no classes"):
        resolve_guidance(cfg, model, 10, "cpu")


@pytest.mark.parametrize("overrides, message", [
    (["task=likelihood", "guidance.y=1"], "guidance.y applies to task=sample and task=compare"),
    (["guidance.threshold=99.5"], "guidance.threshold: must be a quantile in (0, 1)"),
    (["guidance.classifier_scale=2"], "guidance.classifier_scale: weighs a classifier's gradient"),
    (["guidance.classifier=/nonexistent/clf.pt"], "guidance.classifier: no classifier file at /nonexistent/clf.pt"),
    (["task=train", "task.label_dropout=0.1"], "task.label_dropout=0.1 applies to class-conditional models"),
    (["task=compare", "task.guidance_scales=[1,2]", "guidance.scale=2"], "guidance.scale=2.0 would be ignored"),
])
def test_check_config_refuses_bad_guidance_settings(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_config(compose(*overrides))


def test_cli_bad_conditioning_is_one_error_line(tmp_path):
    """On the command line a refused guidance is one ``error:`` line, exit code 2, and no result (the other
    refusals above raise the same UserErrors, which run.py prints alike)."""
    out = tmp_path / "run"
    proc = run_cli("guidance.y=3", *SMALL, cwd=out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: guidance.y=3: ckpt=pretrained is unconditional")
    assert not (out / "metrics.json").exists() and not (out / "samples.npz").exists()


def test_experiment_digits_cond_composes():
    cfg = compose("experiment=digits_cond")
    assert (cfg.data.name, cfg.model.kind, cfg.model.num_classes, cfg.task.label_dropout) == ("digits", "unet", 10, 0.1)


def test_image_grid_has_one_row_per_class(tmp_path):
    labels = torch.tensor([2, 0, 2, 1, 0, 2])
    samples = torch.arange(6.0)[:, None, None, None].expand(6, 1, 4, 4)
    grid, rows = _class_grid(samples, labels)
    assert rows == [0, 1, 2] and grid.shape == (3, 3, 1, 4, 4)
    assert grid[0, :2, 0, 0, 0].tolist() == [1.0, 4.0] and grid[2, :, 0, 0, 0].tolist() == [0.0, 2.0, 5.0]
    assert torch.isnan(grid[1, 1:]).all()                         # class 1 has one image: the rest of its row blank
    save_samples(tmp_path / "g.png", samples, "t", labels=labels, classes=["a", "b", "c"])
    assert (tmp_path / "g.png").stat().st_size > 0


# ---- slow: exactness over a resume, guidance quality after real training --------------------------

@pytest.mark.slow
def test_a_resumed_conditional_run_ends_with_the_same_weights(tmp_path):
    short = [*TRAIN, "task.steps=40", "task.ckpt_every=20", "task.eval_samples=16", "likelihood.n_eval=8"]
    TASKS["train"](compose(*short), tmp_path / "whole", set())
    TASKS["train"](compose(*short, "task.steps=20"), tmp_path / "first", set())
    TASKS["train"](compose(*short, f"task.resume={tmp_path / 'first' / 'checkpoints' / 'last.pt'}"),
                   tmp_path / "second", set())
    a = read_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = read_checkpoint(tmp_path / "second" / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_guidance_on_a_longer_trained_model_picks_its_class(tmp_path):
    """After 1500 steps every class is drawn where it belongs: accuracy ≥ 0.95 over 8 × 100 samples."""
    TASKS["train"](compose(*TRAIN, "task.steps=1500", "task.ckpt_every=1500"), tmp_path / "t", set())
    cfg = compose(f"ckpt={tmp_path / 't' / 'checkpoints' / 'last.pt'}", "guidance.scale=1", *SMALL,
                  "task.n_samples=800")
    metrics = TASKS["sample"](cfg, tmp_path / "s", {"ckpt", "guidance.scale"})
    assert metrics["label_accuracy"] >= 0.95


# ---- digits: class accuracy and Fréchet distance by the shipped classifier ------------------------

#: A tiny class-conditional digits U-Net trained for a few steps: enough to sample from, fast.
DIGITS_TINY = ["experiment=digits_cond", "seed=0", "model.net.base_channels=8", "model.net.channel_mults=[1]",
               "model.net.attn_resolutions=[]", "task.steps=20", "task.batch_size=32", "task.warmup=5",
               "task.log_every=10", "task.ckpt_every=20", "task.eval_samples=10", "likelihood.n_eval=4",
               "likelihood.rtol=1e-2", "likelihood.atol=1e-2"]


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("digits_cond")
    TASKS["train"](compose(*DIGITS_TINY), run_dir, set())
    return run_dir / "checkpoints" / "last.pt"


def test_digits_classifier_tells_held_out_digits_apart_in_either_data_range():
    """The shipped classifier on the 359 held-out digits (seed 0) with their true labels: it measured 0.989;
    0.95 is 7 binomial standard errors (√(0.05·0.95/359) = 0.0115 at the bound) below that. The same digits
    scaled to (−1, 1) score the same once classifier_quality maps them back through data.data_range."""
    from evaluation import class_accuracy, load_digits_classifier
    from tasks_lib.sample import classifier_quality

    clf = load_digits_classifier()
    data = load_dataset("digits")
    accuracy = class_accuracy(clf, data.test_points(), data.test_labels, data_range=data.data_range)
    assert accuracy >= 0.95
    wide = load_dataset("digits", data_range=(-1.0, 1.0))
    scored = classifier_quality(clf, wide.test_points(), wide, wide.test_labels)
    assert scored["class_accuracy"] == accuracy
    assert abs(scored["frechet_distance"]) < 1e-6                         # the held-out digits against themselves


def test_compare_on_digits_reports_class_accuracy_and_frechet_distance(digits_ckpt, tmp_path):
    cfg = compose(f"ckpt={digits_ckpt}", "task=compare", "task.samplers=[multistep]", "task.budgets=[10]",
                  "task.guidance_scales=[0,3]", "task.n_samples=100", "task.reference_rtol=1e-3",
                  "likelihood.n_eval=4")
    metrics = TASKS["compare"](cfg, tmp_path / "c", {"ckpt"})
    import csv
    with open(tmp_path / "c" / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["guidance_scale"]) for r in rows] == [0.0, 3.0]
    floor = metrics["frechet_floor"]
    for r in rows:
        assert 0.0 <= float(r["class_accuracy"]) <= 1.0
        # 20 training steps draw no digits yet: further from the held-out digits than training digits are
        assert float(r["frechet_distance"]) > floor > 0
    assert "class_accuracy" in (tmp_path / "c" / "compare.md").read_text()


def test_sample_on_digits_reports_the_classifier_scores(digits_ckpt, tmp_path):
    small = ["task.n_samples=100", "task.likelihood=false", "task.trajectories=0", "solver=multistep",
             "solver.steps=10"]
    plain = TASKS["sample"](compose(f"ckpt={digits_ckpt}", *small), tmp_path / "u", {"ckpt"})
    assert "class_accuracy" not in plain                                  # unconditional: no labels to check
    assert plain["frechet_distance"] > plain["frechet_floor"] > 0
    guided = TASKS["sample"](compose(f"ckpt={digits_ckpt}", "guidance.y=3", *small), tmp_path / "g",
                             {"ckpt", "guidance.y"})
    assert 0.0 <= guided["class_accuracy"] <= 1.0 and guided["frechet_distance"] > 0
