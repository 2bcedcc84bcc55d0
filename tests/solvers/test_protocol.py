"""What the solvers declare and the score-function protocol: NFE per step, determinism, grids, σ_data, cond.

``task=compare`` and the CLI ask a solver what it is instead of knowing its name, so each
declaration is checked here against what the solver actually does.
"""
import pytest
import torch

import solvers
from models import MLPScoreNet, ModelError, MixtureScore, ScoreModel, ring_mixture
from sde_lib import SDES, VPSDE


class Recorder:
    """An exact ring score that records the time and the conditioning of every call."""

    def __init__(self, sde):
        self.exact = MixtureScore(sde, ring_mixture())
        self.times: list[float] = []
        self.conds: list[dict] = []

    def __call__(self, x, t, **cond):
        self.times.append(t[0].item())
        self.conds.append(cond)
        return self.exact(x, t)


FIXED_STEP = [name for name in solvers.available() if solvers.get_solver(name)().nfe_per_step() is not None]


@pytest.mark.parametrize("name", FIXED_STEP)
def test_nfe_per_step_is_what_the_solver_spends(name, sde_name):
    """NFE counted over a 25-step solve = 25 × the solver's declared NFE per step (rk4 for pf_ode: 4)."""
    options = {"method": "rk4"} if name == "pf_ode" else {}
    declared = solvers.get_solver(name)(**options).nfe_per_step()
    sde = SDES[sde_name]()
    out = solvers.sample(sde, Recorder(sde), (8, 2), solver=name, steps=25, seed=0, **options)
    assert out.nfe == 25 * declared


def test_adaptive_solvers_declare_no_nfe_per_step():
    assert solvers.get_solver("pf_ode")().nfe_per_step() is None            # dopri5
    assert solvers.get_solver("multistep_adaptive")().nfe_per_step() is None
    assert solvers.get_solver("pf_ode")(method="midpoint").nfe_per_step() == 2


@pytest.mark.parametrize("name", solvers.available())
def test_deterministic_means_no_noise_after_the_prior(name):
    """From the same z, two seeds give the same samples exactly when the solver declares itself deterministic."""
    sde = VPSDE()
    score = MixtureScore(sde, ring_mixture())
    z = sde.prior_sampling((32, 2), torch.Generator().manual_seed(0))
    steps = None if solvers.get_solver(name)().nfe_per_step() is None else 30
    a = solvers.sample(sde, score, z=z, solver=name, steps=steps, seed=1, rtol=1e-3, atol=1e-3) \
        if name == "pf_ode" else solvers.sample(sde, score, z=z, solver=name, steps=steps, seed=1)
    b = solvers.sample(sde, score, z=z, solver=name, steps=steps, seed=2, rtol=1e-3, atol=1e-3) \
        if name == "pf_ode" else solvers.sample(sde, score, z=z, solver=name, steps=steps, seed=2)
    assert torch.equal(a.samples, b.samples) == solvers.get_solver(name).deterministic


GRID_SOLVERS = [("multistep", {}), ("ddim", {}), ("heun", {}), ("pf_ode", {"method": "euler"}),
                ("pf_ode", {"method": "rk4"}), ("euler_maruyama", {})]


@pytest.mark.parametrize("name, options", GRID_SOLVERS, ids=lambda v: v if isinstance(v, str) else "")
def test_any_fixed_step_solver_takes_any_grid(name, options):
    """grid="user": the solver steps through exactly the given times (every step starts at one of them)."""
    sde = VPSDE()
    times = [1.0, 0.6, 0.3, 0.12, 0.05, 0.02, 1e-3]
    score = Recorder(sde)
    solvers.sample(sde, score, (8, 2), solver=name, grid="user", times=times, seed=0, **options)
    starts = times[:-1] if name != "euler_maruyama" else times     # Euler–Maruyama's last step goes on to 0
    near = lambda t, pool: any(abs(t - s) < 1e-6 for s in pool)   # noqa: E731  (t passes through float32)
    assert all(near(t, score.times) for t in starts)
    if solvers.get_solver(name)(**options).nfe_per_step() == 1:  # no intermediate stages: nothing else
        assert all(near(t, starts) for t in score.times)
    # Another grid moves the evaluations.
    other = Recorder(sde)
    solvers.sample(sde, other, (8, 2), solver=name, steps=6, grid="log_snr", seed=0, **options)
    assert sorted(set(other.times)) != sorted(set(score.times))


def test_pf_ode_refuses_a_grid_for_an_adaptive_method():
    sde = VPSDE()
    with pytest.raises(solvers.SolverError, match="grid='log_snr' needs a fixed-grid method"):
        solvers.sample(sde, MixtureScore(sde, ring_mixture()), (4, 2), solver="pf_ode", grid="log_snr")


def test_sigma_data_from_the_caller_the_model_or_the_documented_default():
    sde = VPSDE()
    exact = MixtureScore(sde, ring_mixture())
    plain = lambda x, t: exact(x, t)   # noqa: E731  (declares no sigma_data)
    z = sde.prior_sampling((64, 2), torch.Generator().manual_seed(0))
    run = lambda fn, **kw: solvers.sample(sde, fn, z=z, solver="multistep", steps=10, seed=0, **kw).samples  # noqa: E731
    assert torch.equal(run(plain), run(plain, sigma_data=solvers.DEFAULT_SIGMA_DATA))
    assert torch.equal(run(exact), run(plain, sigma_data=exact.sigma_data))
    assert not torch.equal(run(exact), run(plain))          # the ring's σ_data is not 1, and it matters
    with pytest.raises(solvers.SolverError, match="sigma_data must be a finite positive number"):
        run(plain, sigma_data=0.0)


def test_cond_reaches_every_score_call():
    sde = VPSDE()
    y = torch.arange(8)
    score = Recorder(sde)
    out = solvers.sample(sde, score, (8, 2), solver="multistep", steps=10, seed=0, cond={"y": y})
    assert len(score.conds) == out.nfe and all(c["y"] is y for c in score.conds)
    score = Recorder(sde)
    lik = solvers.log_likelihood(sde, score, torch.zeros(8, 2), rtol=1e-3, atol=1e-3, cond={"y": y})
    assert len(score.conds) == lik.nfe and all(c["y"] is y for c in score.conds)
    score = Recorder(sde)
    solvers.sample(sde, score, (8, 2), solver="multistep", steps=10, seed=0)
    assert all(c == {} for c in score.conds)


def test_an_unconditional_model_refuses_conditioning_but_takes_the_null_branch():
    sde = VPSDE()
    model = ScoreModel(MLPScoreNet(2, hidden=16, depth=1), sde)
    x, t = torch.zeros(4, 2), torch.full((4,), 0.5)
    assert torch.equal(model(x, t, y=None), model(x, t))
    with pytest.raises(ModelError, match="unconditional and takes no conditioning inputs"):
        model(x, t, y=torch.zeros(4, dtype=torch.long))
    # the exact mixture is class-conditional (class = component) and takes only y
    exact = MixtureScore(sde, ring_mixture())
    assert exact.conditional and exact.num_classes == 8
    with pytest.raises(ModelError, match="takes only the class label y"):
        exact(x, t, text=torch.zeros(4))
