"""Class-conditional sampling, classifier-free and classifier guidance against the exact mixture (docs/guidance.md).

With class = component, the mixture's conditional score, its classifier p_t(y | x) and the tilted
density p(x | y)^w p(x)^(1−w) are closed forms. Sample statistics use 2000–4000 samples; a mode
fraction of 1 has no binomial noise, and the spread (RMS distance to the requested mean, over the
exact value √tr Σ_y) has a relative standard error of about 1/(2√n) ≈ 1.1 % in 2-D at n = 2000
(‖e‖²/σ² is χ²₂), so 3 % is ~2.7 standard errors.
"""
import warnings

import pytest
import torch

import sde_lib
import solvers
from models import MixtureScore, random_mixture, ring_mixture
from solvers.guidance import GuidanceWarning

N = 2000
SDES = {"vp": sde_lib.VPSDE, "subvp": sde_lib.subVPSDE, "ve": sde_lib.VESDE}
#: a budget at which each sampler is accurate on the unconditional problems (tests/solvers/test_samplers.py)
ACCURATE = {"ald": {"steps": 4000, "snr": 0.5}, "ancestral": {"steps": 500}, "ddim": {"steps": 500}, "edm_sde": {"steps": 200},
            "euler_maruyama": {"steps": 500}, "heun": {"steps": 50}, "multistep": {}, "multistep_adaptive": {},
            "pc": {"steps": 500}, "pf_ode": {}, "reverse_diffusion": {"steps": 500},
            "sde_adaptive": {"rtol": 0.01, "atol": 0.002}}
PROBLEMS = {"ring": (ring_mixture, 3), "mix16d": (lambda: random_mixture(16), 1)}


def component_stats(mix, x, k):
    """(fraction of samples whose most likely component at t = 0 is k, RMS distance to μ_k over √tr Σ_k)."""
    flat = x.double().flatten(1)
    logits = MixtureScore(sde_lib.VPSDE(), mix).classifier(flat, torch.zeros(len(flat), dtype=torch.float64))
    frac = (logits.argmax(1) == k).double().mean().item()
    rms = (flat - mix.means[k]).pow(2).sum(1).mean().sqrt().item()
    return frac, rms / mix.covariances()[k].trace().sqrt().item()


def test_every_sampler_has_a_budget_here():
    assert set(ACCURATE) == set(solvers.available())


#: what the default suite runs (VP; the 16-D mixture with the samplers that need few evaluations); `-m slow` runs all
FAST = {"ring": set(ACCURATE) - {"ald"}, "mix16d": {"heun", "multistep", "multistep_adaptive", "pf_ode", "sde_adaptive"}}


@pytest.mark.parametrize("solver, sde_name, problem", [
    pytest.param(solver, sde_name, problem,
                 marks=() if sde_name == "vp" and solver in FAST[problem] else pytest.mark.slow)
    for problem in PROBLEMS for sde_name in SDES for solver in sorted(ACCURATE)])
def test_exact_conditional_with_every_sampler(solver, sde_name, problem):
    """guidance_scale = 1 on the exact conditional score: ≥ 99 % in the requested component, spread within 3 %."""
    make, k = PROBLEMS[problem]
    mix, sde = make(), SDES[sde_name]()
    options = dict(ACCURATE[solver])
    result = solvers.sample(sde, MixtureScore(sde, mix), (N, mix.dim), solver=solver, seed=1, cond={"y": k},
                            guidance_scale=1.0, **options)
    frac, spread = component_stats(mix, result.samples, k)
    assert frac >= 0.99
    # Annealed Langevin has no predictor: at a finite number of levels it lags (its spread is 3–5 % too wide on the
    # ring's conditional at 1000–8000 levels, snr 0.3–0.55, as on the unconditional ring in test_samplers.py), so
    # its bound is that test's; every other sampler is held to 3 %.
    assert spread == pytest.approx(1.0, abs=0.05 if solver == "ald" else 0.03)


def tilted_log_density(ms, x, t, k, w):
    """log of p_t(x | k)^w p_t(x)^(1−w), unnormalised."""
    label = torch.full((len(x),), k)
    return w * ms.log_prob(x, t, y=label) + (1 - w) * ms.log_prob(x, t)


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("w", [0.0, 1.0, 2.0, 4.0])
def test_guided_score_is_the_tilted_density_score(sde_name, w):
    """s + w (s(·, y) − s) = ∇ₓ log p_t(x|y)^w p_t(x)^(1−w) at every t (autograd of the closed form)."""
    sde = SDES[sde_name]()
    ms = MixtureScore(sde, ring_mixture())
    g = torch.Generator().manual_seed(0)
    x = 5 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.99 + 0.01
    guided = solvers.guidance.GuidedScore(ms, sde, {"y": 3}, 64, guidance_scale=w)
    xg = x.clone().requires_grad_(True)
    expected, = torch.autograd.grad(tilted_log_density(ms, xg, t, 3, w).sum(), xg)
    torch.testing.assert_close(guided(x, t), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_classifier_guidance_with_the_exact_classifier(gamma):
    """s + γ ∇ log p_t(y | x) with the exact classifier = s + γ (s(·, y) − s); at γ = 1 the exact conditional score."""
    sde = sde_lib.VPSDE()
    ms = MixtureScore(sde, random_mixture(16))
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(32, 16, generator=g, dtype=torch.float64)
    t = torch.rand(32, generator=g, dtype=torch.float64) * 0.99 + 0.01
    y = torch.randint(0, 5, (32,), generator=g)
    by_classifier = solvers.guidance.GuidedScore(ms, sde, {"y": y}, 32, classifier=ms.classifier,
                                                 classifier_scale=gamma)
    free = solvers.guidance.GuidedScore(ms, sde, {"y": y}, 32, guidance_scale=gamma)
    torch.testing.assert_close(by_classifier(x, t), free(x, t), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("solver, problem", [("euler_maruyama", "ring"), ("multistep", "ring"), ("multistep", "mix16d"),
                                             pytest.param("euler_maruyama", "mix16d", marks=pytest.mark.slow)])
def test_classifier_guidance_samples_the_exact_conditional(solver, problem):
    """The unconditional score plus the exact classifier at γ = 1 samples the class: the sampler test above."""
    make, k = PROBLEMS[problem]
    mix, sde = make(), sde_lib.VPSDE()
    ms = MixtureScore(sde, mix)
    result = solvers.sample(sde, lambda x, t, y=None: ms(x, t), (N, mix.dim), solver=solver, seed=2,
                            cond={"y": k}, classifier=ms.classifier, **ACCURATE[solver])
    frac, spread = component_stats(mix, result.samples, k)
    assert frac >= 0.99
    assert spread == pytest.approx(1.0, abs=0.03)


def tilted_statistics(mix, k, w, n=801, half_width=8.0):
    """By quadrature on a 2-D grid: the tilted density's mass nearest μ_k and its RMS distance to μ_k."""
    axis = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    ms = MixtureScore(sde_lib.VPSDE(), mix)
    density = torch.softmax(tilted_log_density(ms, grid, torch.zeros(len(grid), dtype=torch.float64), k, w), 0)
    nearest = torch.cdist(grid, mix.means).argmin(1) == k
    return density[nearest].sum().item(), (density * (grid - mix.means[k]).pow(2).sum(1)).sum().sqrt().item()


def sample_statistics(mix, k, x):
    nearest = torch.cdist(x.double(), mix.means).argmin(1) == k
    return nearest.double().mean().item(), (x.double() - mix.means[k]).pow(2).sum(1).mean().sqrt().item()


@pytest.mark.parametrize("w", [2.0, pytest.param(4.0, marks=pytest.mark.slow)])
def test_guidance_with_langevin_correctors_samples_the_tilted_density(w):
    """On a ring whose modes overlap (std 1), a sampler that mixes at every noise level (predictor + Langevin
    corrector) lands on p(x|y)^w p(x)^(1−w): the fraction nearest the requested mode within 0.015 (binomial
    s.e. ≤ 0.004 at 4000) and the spread within 3 % of the quadrature's, both having moved from w = 1's."""
    mix, sde = ring_mixture(std=1.0), sde_lib.VPSDE()
    frac_1, rms_1 = tilted_statistics(mix, 3, 1.0)
    frac_w, rms_w = tilted_statistics(mix, 3, w)
    assert frac_w > frac_1 + 0.05 and rms_w < 0.95 * rms_1     # what guidance is meant to do
    result = solvers.sample(sde, MixtureScore(sde, mix), (4000, 2), solver="pc", steps=100, n_steps=5, seed=2,
                            cond={"y": 3}, guidance_scale=w)
    frac, rms = sample_statistics(mix, 3, result.samples)
    assert frac == pytest.approx(frac_w, abs=0.015)
    assert rms == pytest.approx(rms_w, rel=0.03)


def test_the_probability_flow_with_guidance_is_not_the_tilted_density():
    """The guided PF-ODE transports p_T along a field that is no flow of the tilted marginals: at w = 4 on the
    std-0.3 ring, where the tilted density is the component itself, its spread is far larger (docs/guidance.md)."""
    mix, sde = ring_mixture(), sde_lib.VPSDE()
    _, rms_w = tilted_statistics(mix, 3, 4.0)
    result = solvers.sample(sde, MixtureScore(sde, mix), (1000, 2), solver="pf_ode", seed=2, cond={"y": 3},
                            guidance_scale=4.0)
    _, rms = sample_statistics(mix, 3, result.samples)
    assert rms > 1.3 * rms_w


def test_conditional_likelihood_is_exact_up_to_the_prior():
    """log p(x | y) through the ODE: exact once the prior N(0, s_T² I) is swapped for p_T(z | y) at the latent z."""
    sde, mix = sde_lib.VPSDE(), ring_mixture()
    ms = MixtureScore(sde, mix)
    x, k = mix.sample(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = solvers.log_likelihood(sde, ms, x, cond={"y": k}, rtol=1e-8, atol=1e-8)
    at = lambda t: torch.full((len(x),), t, dtype=torch.float64)   # noqa: E731
    prior_swap = ms.log_prob(result.z, at(sde.T), y=k) - sde.prior_logp(result.z)
    torch.testing.assert_close(result.logp + prior_swap, ms.log_prob(x, at(1e-5), y=k), rtol=0, atol=1e-6)
    # without the swap the conditional's mean at T (α_T μ_y, |α_T μ_y| ≈ 0.03) shows: the prior's own error
    assert (result.logp - ms.log_prob(x, at(1e-5), y=k)).abs().mean() > 1e-3


class CountingConditional(torch.nn.Module):
    """A conditional model (declares it) that records the batch sizes it is called with."""

    conditional, num_classes = True, 8

    def __init__(self, ms):
        super().__init__()
        self.ms, self.calls = ms, []

    def forward(self, x, t, y=None):
        self.calls.append((len(x), None if y is None else y.clone()))
        return self.ms(x, t, y=y)


def test_both_branches_run_in_one_batched_forward():
    sde = sde_lib.VPSDE()
    model = CountingConditional(MixtureScore(sde, ring_mixture()))
    result = solvers.sample(sde, model, (10, 2), solver="multistep", steps=5, seed=0, cond={"y": 2},
                            guidance_scale=3.0)
    assert result.nfe == len(model.calls) == 5
    size, y = model.calls[0]
    assert size == 20 and y[:10].eq(2).all() and y[10:].eq(-1).all()


def test_a_plain_function_is_called_once_per_branch():
    sde = sde_lib.VPSDE()
    ms = MixtureScore(sde, ring_mixture())
    labels = []

    def score(x, t, y=None):
        labels.append(y)
        return ms(x, t, y=y)

    solvers.sample(sde, score, (10, 2), solver="ddim", steps=4, seed=0, cond={"y": 1}, guidance_scale=2.0)
    assert len(labels) == 8 and sum(y is None for y in labels) == 4


def test_dynamic_thresholding_keeps_the_denoised_estimate_in_range():
    """Per sample, x̂₀ of the thresholded score lies in [−1, 1] (Saharia et al. 2022), and is unchanged where it already did."""
    sde = sde_lib.VPSDE()
    ms = MixtureScore(sde, ring_mixture(radius=0.5, std=0.1))
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(256, 2, generator=g, dtype=torch.float64)
    t = torch.rand(256, generator=g, dtype=torch.float64) * 0.9 + 0.05
    plain = solvers.guidance.GuidedScore(ms, sde, {"y": 0}, 256, guidance_scale=6.0)
    clipped = solvers.guidance.GuidedScore(ms, sde, {"y": 0}, 256, guidance_scale=6.0, dynamic_threshold=0.9)
    alpha, var = sde.log_mean_coeff(t).exp()[:, None], sde.marginal_var(t)[:, None]
    x0_plain, x0 = (x + var * plain(x, t)) / alpha, (x + var * clipped(x, t)) / alpha
    assert x0.abs().max() <= 1 + 1e-9
    inside = x0_plain.abs().amax(1) <= 1
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(x0[inside], x0_plain[inside])


def test_guided_sampling_is_reproducible():
    sde = sde_lib.VESDE()
    ms = MixtureScore(sde, ring_mixture())
    labels = torch.arange(50) % 8
    runs = [solvers.sample(sde, ms, (50, 2), solver="euler_maruyama", steps=50, seed=7, cond={"y": labels},
                           guidance_scale=2.5).samples for _ in range(2)]
    assert torch.equal(*runs)


@pytest.mark.parametrize("kwargs, match", [
    ({"cond": {"y": 8}}, r"outside 0\.\.7"),
    ({"cond": {"y": torch.full((10,), -2)}}, r"outside 0\.\.7"),
    ({"cond": {"y": torch.zeros(3, dtype=torch.long)}}, r"shape \(10,\)"),
    ({"cond": {"y": torch.zeros(10)}}, "integer class labels"),
    ({"guidance_scale": 2.0}, "guidance needs labels"),
    ({"cond": {"y": 1}, "classifier_scale": 2.0}, "needs a classifier"),
    ({"cond": {"y": 1}, "guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ({"cond": {"y": 1}, "dynamic_threshold": 1.5}, r"quantile in \(0, 1\)"),
    ({"cond": {"y": 1}, "classifier": "clf"}, "classifier must be callable"),
])
def test_bad_guidance_input_is_one_clear_error(kwargs, match):
    sde = sde_lib.VPSDE()
    with pytest.raises(solvers.SolverError, match=match):
        solvers.sample(sde, MixtureScore(sde, ring_mixture()), (10, 2), solver="ddim", steps=3, seed=0, **kwargs)


def test_labels_for_an_unconditional_model_are_refused_before_any_call():
    calls = []

    def score(x, t):
        calls.append(1)
        return -x

    score.conditional = False
    sde = sde_lib.VPSDE()
    with pytest.raises(solvers.SolverError, match="unconditional and takes no labels"):
        solvers.sample(sde, score, (4, 2), solver="ddim", steps=3, seed=0, cond={"y": 0})
    with pytest.raises(solvers.SolverError, match="needs a class-conditional model"):
        solvers.sample(sde, score, (4, 2), solver="ddim", steps=3, seed=0, cond={"y": 0}, guidance_scale=2.0,
                       classifier=lambda x, t: torch.zeros(len(x), 3))
    assert not calls


def test_a_classifier_of_the_wrong_shape_is_named():
    sde = sde_lib.VPSDE()
    ms = MixtureScore(sde, ring_mixture())
    with pytest.raises(solvers.SolverError, match=r"logits of shape \(4, K\)"):
        solvers.sample(sde, ms, (4, 2), solver="ddim", steps=3, seed=0, cond={"y": 0},
                       classifier=lambda x, t: x.sum(1))


def test_guidance_on_a_model_without_label_dropout_warns_once_and_runs():
    sde = sde_lib.VPSDE()
    model = CountingConditional(MixtureScore(sde, ring_mixture()))
    model.label_dropout = 0.0
    with pytest.warns(GuidanceWarning, match="never trained"):
        solvers.sample(sde, model, (4, 2), solver="ddim", steps=3, seed=0, cond={"y": 0}, guidance_scale=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # w = 1 uses the conditional branch alone: nothing to warn about
        solvers.sample(sde, model, (4, 2), solver="ddim", steps=3, seed=0, cond={"y": 0}, guidance_scale=1.0)
