"""task=calibrate writes a grid calibration; task=sample task.calibration=PATH samples on its warp, and refuses a
calibration that does not fit the solve, before any work."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core_lib import UserError
from tasks_lib import TASKS, check_config, compose

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
EXACT = ["seed=0", "device=cpu", "ckpt=exact", "data=ring", "sde=vp", "dtype=float64", "solver=multistep"]
CALIBRATE = ["task=calibrate", "task.budgets=[6]", "task.pilot=16", "task.evaluations=12", "task.reference_rtol=1e-6"]
SAMPLE = ["task=sample", "solver.steps=6", "task.n_samples=32", "task.likelihood=false", "task.trajectories=0"]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("calibrate")
    metrics = TASKS["calibrate"](compose(*EXACT, *CALIBRATE), run_dir, set())
    assert metrics["pilot_error_calibrated_6"] <= metrics["pilot_error_6"]
    assert metrics["fit_nfe_6"] > metrics["reference_nfe"]
    return run_dir / "grid_calibration.json"


def test_calibrate_writes_the_warp_and_sample_uses_it(calibration, tmp_path):
    saved = json.loads(calibration.read_text())
    assert saved["solver"] == "multistep" and saved["options"] == {} and saved["eps"] == 1e-3
    assert len(saved["warps"]["6"]) == 6
    plain = TASKS["sample"](compose(*EXACT, *SAMPLE), tmp_path / "plain", set())
    warped = TASKS["sample"](compose(*EXACT, *SAMPLE, f"task.calibration={calibration}"), tmp_path / "warped", set())
    assert warped["calibration"] == str(calibration) and plain["nfe"] == warped["nfe"] == 6
    a, b = (np.load(tmp_path / name / "samples.npz")["samples"] for name in ("plain", "warped"))
    assert not np.array_equal(a, b) or not any(saved["warps"]["6"])


@pytest.mark.parametrize("extra,match", [
    (["solver.steps=8"], r"has warps for solver.steps in \[6\], not 8"),
    (["solver.options.order=3"], r"fitted with other solver.options \(order\)"),
    (["task.eps=1e-4"], "was fitted for eps=0.001, not task.eps=0.0001"),
    (["solver=ddim", "solver.steps=6"], "was fitted for solver=multistep, not solver=ddim"),
    (["solver.options.warp=[0.1]"], "solver.options.warp and task.calibration both set the grid's warp"),
])
def test_a_calibration_that_does_not_fit_the_solve_is_refused(calibration, extra, match):
    with pytest.raises(UserError, match=match):
        check_config(compose(*EXACT, *SAMPLE, f"task.calibration={calibration}", *extra))


def test_not_a_calibration_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"solver": "multistep"}')
    with pytest.raises(UserError, match="is not a grid calibration"):
        check_config(compose(*EXACT, *SAMPLE, f"task.calibration={bad}"))


@pytest.mark.parametrize("args,match", [
    (["solver=pf_ode"], "warp needs a fixed-grid method"),
    (["solver=euler_maruyama"], "has no fixed grid to warp"),
    (["solver.steps=6"], "solver.steps does not apply to task=calibrate"),
    (["task.budgets=[1]"], r"task.budgets: must be step counts ≥ 2"),
    (["task.pilot=1"], "task.pilot: must be an integer ≥ 2"),
    (["solver.options.warp=[0.2]"], "options must not set warp"),
])
def test_bad_calibration_settings_exit_2_with_one_line(tmp_path, args, match):
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *EXACT, *CALIBRATE, *args,
                           f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True, cwd=ROOT, env=ENV,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0].replace("\\", ""), proc.stderr
    assert not (tmp_path / "run").exists()
