"""Bad input gets one clear error before any work, never a silent NaN sample."""

import pytest
import torch

import solvers
from models import MixtureScore, ring_mixture
from sde_lib import VPSDE


@pytest.fixture
def vp():
    sde = VPSDE()
    return sde, MixtureScore(sde, ring_mixture())


def test_unknown_solver_lists_available(vp):
    with pytest.raises(solvers.SolverError, match="unknown solver 'pf_odee'; available: ald, ancestral"):
        solvers.sample(*vp, (4, 2), solver="pf_odee")


def test_unknown_option_lists_valid_ones(vp):
    with pytest.raises(solvers.SolverError, match=r"unknown option 'snrr' for solver 'pc'; valid options: .*snr"):
        solvers.sample(*vp, (4, 2), solver="pc", snrr=0.1)
    with pytest.raises(solvers.SolverError, match="unknown option 'probs' for log_likelihood"):
        solvers.log_likelihood(*vp, torch.zeros(4, 2), probs=3)


@pytest.mark.parametrize("options,match", [
    ({"snr": "high"}, "option 'snr' of solver 'pc' must be a number"),
    ({"n_steps": 1.5}, "option 'n_steps' of solver 'pc' must be int"),
    ({"predictor": "heun"}, "option 'predictor' of solver 'pc' must be one of 'euler_maruyama'"),
    ({"n_steps": 0}, "n_steps >= 1"),
])
def test_wrong_option_type_or_value(vp, options, match):
    with pytest.raises(solvers.SolverError, match=match):
        solvers.sample(*vp, (4, 2), solver="pc", **options)


def test_unknown_ode_method_and_steps_with_adaptive_method(vp):
    with pytest.raises(solvers.SolverError, match="unknown ODE method 'rk45'; adaptive: .*dopri5"):
        solvers.sample(*vp, (4, 2), solver="pf_ode", method="rk45")
    with pytest.raises(solvers.SolverError, match="is adaptive .* choose a fixed-grid method"):
        solvers.sample(*vp, (4, 2), solver="pf_ode", steps=10)


@pytest.mark.parametrize("kwargs,match", [
    ({"shape": (4,)}, r"shape must be \(B, ...\)"),
    ({"shape": None}, "give the batch shape"),
    ({"shape": (4, 2), "z": torch.zeros(3, 2)}, "z has shape"),
    ({"shape": (4, 2), "steps": 0}, "steps must be a positive integer"),
    ({"shape": (4, 2), "eps": 1.5}, "eps must be a number in"),
])
def test_bad_shapes_and_arguments(vp, kwargs, match):
    with pytest.raises(solvers.SolverError, match=match):
        solvers.sample(*vp, solver="euler_maruyama", **kwargs)


def test_score_of_wrong_shape(vp):
    sde, _ = vp
    with pytest.raises(solvers.SolverError, match=r"score_fn returned \(4, 1\) for input of shape \(4, 2\)"):
        solvers.sample(sde, lambda x, t: x[:, :1], (4, 2), solver="pf_ode")
    with pytest.raises(solvers.SolverError, match="score_fn returned float"):
        solvers.sample(sde, lambda x, t: 1.0, (4, 2), solver="euler_maruyama")


def test_score_returning_nan_at_first_call(vp):
    sde, _ = vp
    with pytest.raises(solvers.NonFiniteError, match="first call"):
        solvers.sample(sde, lambda x, t: x * float("nan"), (4, 2), solver="euler_maruyama")


@pytest.mark.parametrize("solver", solvers.available())
def test_score_turning_nan_midway_never_gives_silent_nan(vp, solver):
    sde, exact = vp

    def score(x, t):
        s = exact(x, t)
        return torch.where(t[:, None] < 0.5, torch.full_like(s, float("nan")), s)

    steps = None if solver in ("pf_ode", "multistep_adaptive") else 30
    with pytest.raises(solvers.NonFiniteError, match="NaN or inf"):
        solvers.sample(sde, score, (4, 2), solver=solver, steps=steps)


def test_likelihood_bad_input(vp):
    with pytest.raises(solvers.SolverError, match="divergence must be"):
        solvers.log_likelihood(*vp, torch.zeros(4, 2), divergence="trace")
    with pytest.raises(solvers.SolverError, match="shape"):
        solvers.log_likelihood(*vp, torch.zeros(4))
    with pytest.raises(solvers.NonFiniteError, match="data passed to log_likelihood"):
        solvers.log_likelihood(*vp, torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(solvers.SolverError, match="levels must be"):
        solvers.log_likelihood(*vp, torch.zeros(4, 2), levels=1)


@pytest.mark.parametrize("solver", solvers.available())
def test_a_non_sde_is_refused_before_first_evaluation(solver):
    calls = []
    with pytest.raises(solvers.SolverError, match="sde must be an sde_lib.SDE"):
        solvers.sample("vp", lambda x, t: calls.append(1) or x, (4, 2), solver=solver)
    assert calls == []


@pytest.mark.parametrize("solver", ["ancestral", "reverse_diffusion", "pc"])
def test_ddpm_chain_with_too_few_steps_is_refused(vp, solver):
    """β_i = β(t_i)/N reaches 1 for N <= β_max = 20: refused before any score evaluation."""
    sde, _ = vp
    calls = []
    with pytest.raises(solvers.SolverError, match="steps=20: .*no valid 20-step chain.*use more steps"):
        solvers.sample(sde, lambda x, t: calls.append(1) or x, (4, 2), solver=solver, steps=20)
    assert calls == []
