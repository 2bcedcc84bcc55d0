"""The score-matching losses against closed forms (docs/math.md §5 and §8).

The exact Gaussian-mixture score is the minimiser of the DSM loss, and for it the loss and the
cost of any perturbation are known in closed form: with x_t = α x0 + s z, E[z | x_t] = −s s*(x_t),
so E‖s s* + z‖² = D − E s²‖s*‖² and E‖s (s* + δ) + z‖² − E‖s s* + z‖² = E s²‖δ‖². DDPM's and
NCSN's discrete losses vanish for the exact noise/score of a point mass and equal E‖z‖²/D = 1
(per dimension) for a zero prediction.
"""
import functools
import math

import pytest
import torch

from models import MixtureScore, MLPScoreNet, ScoreModel, random_mixture, ring_mixture
from sde_lib import SDES, subVPSDE, VESDE, VPSDE
from training import LOSSES, ddpm_loss, dsm_loss, get_loss, ncsn_loss



def _mean_se(values) -> tuple[float, float]:
    v = torch.as_tensor(values, dtype=torch.float64)
    return v.mean().item(), (v.std() / math.sqrt(len(v))).item()


class _Recorder(torch.nn.Module):
    """A score model that remembers the (x_t, t) it was called with, to recompute closed forms on them."""

    def __init__(self, score_fn):
        super().__init__()
        self.score_fn = score_fn
        self.calls = []

    def forward(self, x, t):
        self.calls.append((x, t))
        return self.score_fn(x, t)


def _paired_batches(n_batches: int = 40, batch: int = 1000):
    """(x0, seed) pairs: ring samples in float64 and the generator seed of the loss's t and z."""
    mix = ring_mixture()
    for b in range(n_batches):
        x0, _ = mix.sample(batch, generator=torch.Generator().manual_seed(1000 + b), dtype=torch.float64)
        yield x0, b


@pytest.mark.parametrize("name", list(SDES))
def test_dsm_exact_score_beats_perturbed_scores_by_the_closed_form_margin(name):
    """L(s* + δ) − L(s*) = E s²‖δ‖²/D > 0, for δ = 0.1 s* and δ = 0.1 (paired: same x0, t, z)."""
    sde = SDES[name]()
    exact = MixtureScore(sde, ring_mixture())
    perturbations = {"1.1 x exact": lambda x, t: 0.1 * exact(x, t),
                     "exact + 0.1": lambda x, t: torch.full_like(x, 0.1)}
    for label, delta in perturbations.items():
        perturbed = _Recorder(lambda x, t: exact(x, t) + delta(x, t))
        gaps, residuals = [], []
        for x0, seed in _paired_batches():
            base = dsm_loss(exact, sde, x0, generator=torch.Generator().manual_seed(seed), weighting="s2")
            perturbed.calls.clear()
            worse = dsm_loss(perturbed, sde, x0, generator=torch.Generator().manual_seed(seed), weighting="s2")
            x, t = perturbed.calls[0]
            s = sde.marginal_std(t)[:, None]
            predicted = (s**2 * delta(x, t).pow(2)).mean(1).mean()     # E s²‖δ‖²/D on these very x_t, t
            gaps.append((worse - base).item())
            residuals.append((worse - base - predicted).item())
        gap, gap_se = _mean_se(gaps)
        res, res_se = _mean_se(residuals)
        print(f"{name} {label}: L(perturbed) - L(exact) = {gap:.5f} +- {gap_se:.5f}; "
              f"minus closed form {res:+.5f} +- {res_se:.5f}")
        assert gap > 8 * gap_se > 0, (label, gap, gap_se)
        assert abs(res) < 4 * res_se + 1e-12, (label, res, res_se)


@pytest.mark.parametrize("name", list(SDES))
def test_dsm_minimum_is_one_minus_s2_score_norm(name):
    """At the exact score, the s²-weighted loss per dimension is E[1 − s²‖s*(x_t)‖²/D], not zero."""
    sde = SDES[name]()
    model = _Recorder(MixtureScore(sde, ring_mixture()))
    diffs, losses = [], []
    for x0, seed in _paired_batches(20):
        model.calls.clear()
        loss = dsm_loss(model, sde, x0, generator=torch.Generator().manual_seed(seed))
        x, t = model.calls[0]
        s = sde.marginal_std(t)[:, None]
        minimum = (1 - (s * model.score_fn(x, t)).pow(2)).mean(1).mean()
        diffs.append((loss - minimum).item())
        losses.append(loss.item())
    diff, se = _mean_se(diffs)
    print(f"{name}: DSM at the exact score {sum(losses) / len(losses):.4f}, minus closed form {diff:+.5f} +- {se:.5f}")
    assert abs(diff) < 4 * se
    assert 0.1 < sum(losses) / len(losses) < 0.9        # well above zero, below the zero-score loss of 1


@functools.lru_cache
def _exact_likelihood_weighted_batches(name: str, importance_sampling: bool) -> torch.Tensor:
    """Batch means of the likelihood-weighted DSM loss at the exact ring score (shared by two tests)."""
    sde = SDES[name]()
    return _likelihood_weighted_batches(sde, MixtureScore(sde, ring_mixture()), importance_sampling)


def _likelihood_weighted_batches(sde, model, importance_sampling: bool, n_batches=100, batch=4000, eps=1e-3):
    mix = ring_mixture()
    gen = torch.Generator().manual_seed(1)
    values = []
    for _ in range(n_batches):
        x0, _ = mix.sample(batch, generator=gen, dtype=torch.float64)
        values.append(dsm_loss(model, sde, x0, generator=gen, eps=eps, weighting="likelihood",
                               importance_sampling=importance_sampling).item())
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("name", list(SDES))
def test_importance_sampling_is_unbiased(name):
    """t ∝ g²/s² with weight Z/(T − eps) has the expectation of uniform t with weight g²/s²."""
    uniform = _exact_likelihood_weighted_batches(name, importance_sampling=False)
    weighted = _exact_likelihood_weighted_batches(name, importance_sampling=True)
    (mu_u, se_u), (mu_is, se_is) = _mean_se(uniform), _mean_se(weighted)
    z = (mu_u - mu_is) / math.hypot(se_u, se_is)
    print(f"{name}: uniform {mu_u:.4f} +- {se_u:.4f}, importance sampled {mu_is:.4f} +- {se_is:.4f} (z = {z:+.2f})")
    assert abs(z) < 4
    assert se_u < 0.02 * mu_u and se_is < 0.02 * mu_is       # the comparison has power at the 1e-2 level


@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_importance_sampling_reduces_variance(name):
    """For VP and sub-VP g²/s² ~ 1/t near 0: sampling t ∝ g²/s² removes the heavy tail of uniform t."""
    var_uniform = _exact_likelihood_weighted_batches(name, False).var().item()
    var_is = _exact_likelihood_weighted_batches(name, True).var().item()
    print(f"{name}: variance ratio uniform / importance sampled = {var_uniform / var_is:.1f}")
    assert var_is < 0.5 * var_uniform


def test_importance_sampling_with_a_network_is_unbiased():
    """The same with a fixed random network behind ScoreModel (the parameterisation training uses)."""
    torch.manual_seed(0)
    sde = VPSDE()
    net = MLPScoreNet(2, hidden=16, depth=1).double()
    torch.nn.init.normal_(net.output.weight, std=0.5)
    model = ScoreModel(net, sde, sigma_data=3.0).double()
    with torch.no_grad():
        uniform = _likelihood_weighted_batches(sde, model, False, n_batches=40, batch=2000)
        weighted = _likelihood_weighted_batches(sde, model, True, n_batches=40, batch=2000)
    (mu_u, se_u), (mu_is, se_is) = _mean_se(uniform), _mean_se(weighted)
    print(f"network: uniform {mu_u:.4f} +- {se_u:.4f}, importance sampled {mu_is:.4f} +- {se_is:.4f}")
    assert abs(mu_u - mu_is) < 4 * math.hypot(se_u, se_is)
    assert uniform.var() > weighted.var()


# ---- DDPM and NCSN: a point mass at c has a known optimal prediction -------------------------

POINTS = {"zero": [0.0, 0.0, 0.0], "offset": [1.5, -2.0, 0.25]}
N_POINT = 20000


class _ChainEps:
    """ε-prediction for data x0 ≡ c on DDPM's chain: x_i = √ᾱ_i c + √(1 − ᾱ_i) ε ⇒ ε = (x − √ᾱ_i c)/√(1 − ᾱ_i)."""

    def __init__(self, sde, c):
        self.sde, self.c = sde, c

    def eps(self, x, t):
        i = self.sde.chain_position(t).round().long()               # the loss evaluates at chain_times()[i]
        m = self.sde.chain_table(x)[2, i][:, None]                  # 1 − ᾱ_i
        return (x - (1 - m).sqrt() * self.c) / m.sqrt()


class _Zero:
    def __call__(self, x, t):
        return torch.zeros_like(x)

    eps = __call__


@pytest.mark.parametrize("point", list(POINTS))
def test_ddpm_loss_vanishes_for_the_true_noise(point):
    sde = VPSDE()
    c = torch.tensor(POINTS[point], dtype=torch.float64)
    x0 = c.expand(N_POINT, 3).clone()
    loss = ddpm_loss(_ChainEps(sde, c), sde, x0, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("variance", ["chain", "continuous"])
def test_ncsn_loss_vanishes_for_the_exact_score(point, variance):
    """The score of N(c, σ_i²) is −(x − c)/σ_i²; NCSN's σ_i are σ(t_i), so either variance gives 0."""
    sde = VESDE()
    c = torch.tensor(POINTS[point], dtype=torch.float64)

    def score(x, t):
        var = sde.chain_coeffs(t, x)[2] if variance == "chain" else sde.marginal_var(t).to(x.dtype)
        return -(x - c) / var[:, None]

    x0 = c.expand(N_POINT, 3).clone()
    assert ncsn_loss(score, sde, x0, generator=torch.Generator().manual_seed(0)).item() < 1e-10


@pytest.mark.parametrize("loss_fn, sde", [(ddpm_loss, VPSDE()), (ncsn_loss, VESDE())], ids=["ddpm", "ncsn"])
@pytest.mark.parametrize("reduction, per_sample", [("mean", 1.0), ("sum", 3.0)])
def test_loss_of_a_zero_prediction_is_the_noise_power(loss_fn, sde, reduction, per_sample):
    """‖ε − 0‖² (DDPM) and ‖σ·0 + z‖² (NCSN) have mean D, per-sample variance 2D: 1 (mean) or D (sum)."""
    x0 = torch.randn(N_POINT, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss = loss_fn(_Zero(), sde, x0, generator=torch.Generator().manual_seed(0), reduction=reduction).item()
    se = math.sqrt(2 * 3 / N_POINT) * (1 if reduction == "sum" else 1 / 3)
    assert abs(loss - per_sample) < 5 * se, loss


def test_ddpm_loss_is_zero_for_the_continuous_time_prediction_too():
    """The loss conditions on chain_times()[i], where VP's continuous s(t)² equals the chain's 1 − ᾱ_i:
    the ε of the continuous-time kernel is then DDPM's exact target, so a DDPM-trained network is
    a continuous-time one at those times. (At t = i/(N−1) the two differ by up to 10 % in s.) The
    loss is 2e-10, not 0: DDPM's last three indices lie just beyond T, where s(t) stays at s(T),
    1e-5 below the chain's √(1 − ᾱ_i)."""
    sde = VPSDE()
    c = torch.tensor(POINTS["offset"], dtype=torch.float64)

    class ContinuousEps(_ChainEps):
        def eps(self, x, t):
            m = self.sde.marginal_var(t).to(x.dtype)[:, None]
            return (x - (1 - m).sqrt() * self.c) / m.sqrt()

    x0 = c.expand(N_POINT, 3).clone()
    assert ddpm_loss(ContinuousEps(sde, c), sde, x0, generator=torch.Generator().manual_seed(0)).item() < 1e-9
    grid = torch.arange(sde.N, dtype=torch.float64) / (sde.N - 1)
    off = (sde.marginal_std(grid) / sde.chain_table(grid)[2].sqrt() - 1).abs().max().item()
    assert off > 0.05, off


# ---- reductions, registry and errors -------------------------------------------------------

def _random_score_model(sde, dim=16):
    torch.manual_seed(0)
    net = MLPScoreNet(dim, hidden=16, depth=1).double()
    torch.nn.init.normal_(net.output.weight, std=0.3)
    return ScoreModel(net, sde, sigma_data=2.0).double()


@pytest.mark.parametrize("loss, sde_cls, options", [
    ("dsm", VPSDE, {}), ("dsm", VESDE, {"weighting": "likelihood"}),
    ("dsm", subVPSDE, {"weighting": "likelihood", "importance_sampling": True}),
    ("ddpm", VPSDE, {}), ("ncsn", VESDE, {}),
])
def test_sum_reduction_is_dimension_times_mean(loss, sde_cls, options):
    sde = sde_cls()
    model = _random_score_model(sde)
    x0, _ = random_mixture(16).sample(256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fn = get_loss(loss)
    with torch.no_grad():
        mean = fn(model, sde, x0, generator=torch.Generator().manual_seed(5), reduction="mean", **options)
        total = fn(model, sde, x0, generator=torch.Generator().manual_seed(5), reduction="sum", **options)
    assert mean.item() > 0
    torch.testing.assert_close(total, 16 * mean, rtol=1e-12, atol=0)


def test_losses_are_differentiable_scalars():
    sde = VPSDE()
    model = _random_score_model(sde, dim=2)
    x0, _ = ring_mixture().sample(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name in LOSSES:
        s = VESDE() if name == "ncsn" else sde
        model.sde = s
        loss = get_loss(name)(model, s, x0, generator=torch.Generator().manual_seed(0))
        assert loss.dim() == 0 and torch.isfinite(loss)
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_same_generator_seed_gives_the_same_loss():
    sde = VPSDE()
    model = _random_score_model(sde, dim=2)
    x0, _ = ring_mixture().sample(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        a = dsm_loss(model, sde, x0, generator=torch.Generator().manual_seed(9))
        b = dsm_loss(model, sde, x0, generator=torch.Generator().manual_seed(9))
        c = dsm_loss(model, sde, x0, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddpm_loss_needs_a_vp_sde():
    x0 = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="needs a VPSDE.*got VESDE.*use loss=dsm"):
        ddpm_loss(_Zero(), VESDE(), x0)
    with pytest.raises(ValueError, match="needs a VPSDE.*got subVPSDE.*use loss=dsm"):
        ddpm_loss(_Zero(), subVPSDE(), x0)


def test_ncsn_loss_needs_a_ve_sde():
    with pytest.raises(ValueError, match="needs a VESDE.*got VPSDE.*use loss=dsm"):
        ncsn_loss(_Zero(), VPSDE(), torch.zeros(4, 2))


def test_unknown_loss_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown loss 'foo'; available: dsm, ddpm, ncsn"):
        get_loss("foo")
    assert get_loss("ddpm") is ddpm_loss


def test_bad_options_raise():
    x0 = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="weighting must be 's2' or 'likelihood', got 'foo'"):
        dsm_loss(_Zero(), VPSDE(), x0, weighting="foo")
    with pytest.raises(ValueError, match="importance_sampling applies to weighting='likelihood' only"):
        dsm_loss(_Zero(), VPSDE(), x0, weighting="s2", importance_sampling=True)
    for fn, sde in ((dsm_loss, VPSDE()), (ddpm_loss, VPSDE()), (ncsn_loss, VESDE())):
        with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'avg'"):
            fn(_Zero(), sde, x0, reduction="avg")
