"""Noise is a pure function of (seed, sample index, draw, element); samples are reproducible."""
import pytest
import scipy.stats
import torch

import solvers
from models import MixtureScore, ring_mixture
from sde_lib import VESDE, VPSDE, subVPSDE
from solvers.noise import NoiseSource


def test_noise_is_standard_normal():
    z = NoiseSource(123).normal((20_000, 8), dtype=torch.float64).flatten()
    assert abs(z.mean().item()) < 5 / len(z) ** 0.5
    assert z.var().item() == pytest.approx(1.0, abs=5 * (2 / len(z)) ** 0.5)
    assert scipy.stats.kstest(z.numpy(), "norm").pvalue > 1e-3


def test_noise_float32_is_standard_normal():
    z = NoiseSource(5).normal((50_000, 4), dtype=torch.float32).double().flatten()
    assert scipy.stats.kstest(z.numpy(), "norm").pvalue > 1e-3


def test_noise_draws_rows_and_elements_are_uncorrelated():
    src = NoiseSource(9)
    a = src.normal((5000, 16), dtype=torch.float64)
    b = src.normal((5000, 16), dtype=torch.float64)
    bound = 5 / 5000**0.5
    # across successive draws, across neighbouring elements, across neighbouring rows
    assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < bound / 4
    assert torch.corrcoef(a.T).fill_diagonal_(0).abs().max() < bound
    assert abs(torch.corrcoef(torch.stack([a[:-1].flatten(), a[1:].flatten()]))[0, 1]) < bound / 4


def test_noise_depends_on_index_not_batch():
    big = NoiseSource(3).normal((64, 5))
    small = NoiseSource(3).normal((16, 5))
    shifted = NoiseSource(3, index_offset=16).normal((48, 5))
    torch.testing.assert_close(small, big[:16], rtol=0, atol=0)
    torch.testing.assert_close(shifted, big[16:], rtol=0, atol=0)
    assert not torch.equal(NoiseSource(4).normal((16, 5)), small)


STOCHASTIC = [("euler_maruyama", {}), ("reverse_diffusion", {}), ("ancestral", {}), ("ald", {}),
              ("pc", {"norm": "sample"}), ("pf_ode", {}), ("pf_ode", {"method": "rk4"})]


@pytest.mark.parametrize("sde_cls", [VPSDE, subVPSDE, VESDE])
@pytest.mark.parametrize("solver,options", STOCHASTIC)
def test_sample_prefix_and_split_equal_whole(solver, options, sde_cls):
    """sample(16, seed) equals the first 16 rows of sample(64, seed); a split run equals the whole."""
    sde = sde_cls()
    score = MixtureScore(sde, ring_mixture())
    steps = None if solver in ("pf_ode", "multistep_adaptive") and not options else 30
    kw = dict(solver=solver, steps=steps, seed=11, dtype=torch.float64, **options)
    whole = solvers.sample(sde, score, (64, 2), **kw).samples
    head = solvers.sample(sde, score, (16, 2), **kw).samples
    tail = solvers.sample(sde, score, (48, 2), index_offset=16, **kw).samples
    if solver == "pf_ode" and not options:
        # The adaptive step size is shared by the batch: rows agree to the solver's accuracy, not bit
        # for bit. With the per-sample error norm every row is within ~1e-4 of the exact flow.
        kw["error_norm"] = "sample"
        whole = solvers.sample(sde, score, (64, 2), **kw).samples
        head = solvers.sample(sde, score, (16, 2), **kw).samples
        torch.testing.assert_close(head, whole[:16], rtol=0, atol=1e-3)
    else:
        torch.testing.assert_close(head, whole[:16], rtol=0, atol=0)
        torch.testing.assert_close(tail, whole[16:], rtol=0, atol=0)


@pytest.mark.parametrize("solver", solvers.available())
def test_same_seed_same_samples_other_seed_other_samples(solver):
    sde = VPSDE()
    score = MixtureScore(sde, ring_mixture())
    steps = None if solver in ("pf_ode", "multistep_adaptive") else 30
    a = solvers.sample(sde, score, (32, 2), solver=solver, steps=steps, seed=1).samples
    b = solvers.sample(sde, score, (32, 2), solver=solver, steps=steps, seed=1).samples
    c = solvers.sample(sde, score, (32, 2), solver=solver, steps=steps, seed=2).samples
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_given_z_is_used_and_noise_sequence_unchanged():
    """Passing the prior draw as z gives exactly the run that drew it from the seed."""
    sde = VPSDE()
    score = MixtureScore(sde, ring_mixture())
    drawn = solvers.sample(sde, score, (32, 2), solver="euler_maruyama", steps=20, seed=4)
    given = solvers.sample(sde, score, solver="euler_maruyama", steps=20, seed=4, z=drawn.z)
    assert torch.equal(drawn.samples, given.samples)


def test_seed_none_follows_torch_manual_seed():
    sde = VPSDE()
    score = MixtureScore(sde, ring_mixture())
    torch.manual_seed(0)
    a = solvers.sample(sde, score, (8, 2), solver="euler_maruyama", steps=10)
    torch.manual_seed(0)
    b = solvers.sample(sde, score, (8, 2), solver="euler_maruyama", steps=10)
    assert a.seed == b.seed and torch.equal(a.samples, b.samples)


@pytest.mark.parametrize("solver,steps", [("euler_maruyama", 20), ("pf_ode", None)])
def test_trajectory_records_without_changing_the_samples(solver, steps, capsys):
    """trajectory=k: the first k samples at every score evaluation, then the result; progress only prints."""
    sde = VPSDE()
    score = MixtureScore(sde, ring_mixture())
    plain = solvers.sample(sde, score, (50, 2), solver=solver, steps=steps, seed=4)
    traced = solvers.sample(sde, score, (50, 2), solver=solver, steps=steps, seed=4, trajectory=3, progress=True)
    torch.testing.assert_close(traced.samples, plain.samples, rtol=0, atol=0)
    times, states = traced.trajectory
    assert states.shape == (traced.nfe + 1, 3, 2) and times.shape == (traced.nfe + 1,)
    torch.testing.assert_close(states[0], traced.z[:3], rtol=0, atol=0)        # the first call is at x(T) = z
    torch.testing.assert_close(states[-1], traced.samples[:3], rtol=0, atol=0)
    assert times[0] == pytest.approx(sde.T) and times[-1] == pytest.approx(1e-3)
    if solver == "euler_maruyama":
        assert torch.all(times[1:] <= times[:-1])                              # one evaluation per step, T → eps
    assert plain.trajectory is None
    assert "sampling" in capsys.readouterr().err


def test_trajectory_must_be_a_count():
    sde = VPSDE()
    with pytest.raises(solvers.SolverError, match="trajectory must be a non-negative integer, got -1"):
        solvers.sample(sde, MixtureScore(sde, ring_mixture()), (5, 2), trajectory=-1, seed=0)
