"""``python run.py task=inpaint``: end to end on the ring (exact score) and digits (shipped UNet); bad masks fail clearly."""
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from core_lib import UserError
from tasks_lib import check_config, compose
from tasks_lib.inpaint import build_masks

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={cwd}"],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)


def test_ring_with_the_exact_score_reports_the_exact_conditional_error(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("task=inpaint", "ckpt=exact", "task.n_samples=200", "inpaint.particles=8", "task.steps=50", cwd=out)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "inpaint" and metrics["method"] == "smc" and metrics["nfe"] == 50
    # 200 different held-out inputs: the pooled mode-rank TV is near its noise floor (measured 0.019 vs 0.004;
    # the floor of 200 draws is ~0.03), and the spread ratio within 10% (its noise ~5% at n = 200).
    assert metrics["exact_tv"] < 0.06 and abs(metrics["exact_spread"] - 1) < 0.1
    arrays = np.load(out / "inpaint.npz")
    assert arrays["completions"].shape == arrays["inputs"].shape == arrays["masks"].shape == (200, 2)
    known = arrays["masks"] == 1
    assert np.array_equal(arrays["completions"][known], arrays["inputs"][known])
    assert (arrays["masks"][:, 0] == 1).all() and (arrays["masks"][:, 1] == 0).all()   # left_half in 2-D
    assert (out / "inpaint.png").stat().st_size > 0
    assert "smc: 200 completions of left_half, 50 NFE (8 particles)" in proc.stdout
    assert f"mode weights off by {metrics['exact_tv']:.3f} in total variation" in proc.stdout


@pytest.mark.slow
def test_digits_center_with_the_shipped_model(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("task=inpaint", "data=digits", "inpaint.mask=center", "task.n_samples=4", "inpaint.particles=2",
                   "task.steps=10", cwd=out)
    assert proc.returncode == 0, proc.stderr
    arrays = np.load(out / "inpaint.npz")
    assert arrays["completions"].shape == (4, 1, 8, 8)
    assert arrays["masks"][0, 0, 2:6, 2:6].sum() == 0 and arrays["masks"].sum() == 4 * 48
    known = arrays["masks"] == 1
    assert np.array_equal(arrays["completions"][known], arrays["inputs"][known])
    assert (out / "inpaint.png").stat().st_size > 0


def test_named_masks():
    assert build_masks("left_half", (1, 4, 4), 1, 0)[0, 0].tolist() == [[1, 1, 0, 0]] * 4
    assert build_masks("center", (6,), 1, 0)[0].tolist() == [1, 0, 0, 0, 1, 1]
    random = build_masks("random:0.5", (1, 8, 8), 200, 0)
    assert abs(random.mean().item() - 0.5) < 0.02 and torch_equal(random, build_masks("random:0.5", (1, 8, 8), 200, 0))


def torch_equal(a, b):
    return bool((a == b).all())


@pytest.mark.parametrize("mask,message", [
    ("middle", "inpaint.mask: 'middle' is not a mask"),
    ("random:1.5", "inpaint.mask: random:p needs a fraction p in (0, 1)"),
    ("FILE3", "inpaint.mask: FILE3 has shape (3,), but one sample of this data has shape (2,)"),
    ("/nonexistent/mask.npy", "inpaint.mask: the file /nonexistent/mask.npy does not exist"),
])
def test_bad_mask_is_refused_by_the_config_check(tmp_path, mask, message):
    if mask == "FILE3":
        np.save(tmp_path / "m.npy", np.array([1.0, 0.0, 1.0]))
        mask, message = str(tmp_path / "m.npy"), message.replace("FILE3", str(tmp_path / "m.npy"))
    cfg = compose("task=inpaint", "ckpt=exact", f"inpaint.mask={mask}")
    with pytest.raises(UserError, match=re.escape(message)):
        check_config(cfg, {"inpaint.mask", "ckpt"})


def test_replace_refuses_a_solver_that_cannot_replace():
    cfg = compose("task=inpaint", "ckpt=exact", "inpaint.method=replace", "solver=pf_ode")
    with pytest.raises(UserError, match="inpaint.method=replace replaces the known entries"):
        check_config(cfg, {"inpaint.method", "solver"})


def test_bad_mask_on_the_command_line_is_one_error_line_and_no_run(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("task=inpaint", "ckpt=exact", "inpaint.mask=random:0", cwd=out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "inpaint.mask: random:p needs a fraction p in (0, 1)" in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_inpaint_settings_without_the_task_are_refused():
    with pytest.raises(UserError, match="inpaint.mask applies to task=inpaint only"):
        check_config(compose("inpaint.mask=center"), {"inpaint.mask"})
