"""Tests for ``models.networks``: time embeddings, the MLP and U-Net score networks, the
``ScoreModel`` parameterisation wrapper (docs/math.md §5) and the ``build_network`` factory.

Parameter counts of the defaults (reported, not asserted): ``MLPScoreNet(2)`` has 677,890
parameters; ``UNet()`` for 1×8×8 images has 701,345.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from models import (GaussianFourierEmbedding, MixtureScore, MLPScoreNet, ScoreModel, SinusoidalEmbedding, UNet,
                    build_network, ring_mixture)
from sde_lib import VESDE, VPSDE, subVPSDE

F64 = torch.float64
SDES = [VPSDE(), subVPSDE(), VESDE()]
parametrize_sdes = pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
parametrize_param = pytest.mark.parametrize("parameterization", ["eps", "score", "x0"])


def _small_unet(**kwargs) -> UNet:
    return UNet(**{"base_channels": 16, **kwargs})


def _randomise_last_layer(net: nn.Module) -> nn.Module:
    """Give the zero-initialised output layer random weights, so the network's output depends on x and t."""
    last = net.output if isinstance(net, MLPScoreNet) else net.conv_out
    with torch.no_grad():
        last.weight.normal_(0.0, 0.1)
        last.bias.normal_(0.0, 0.1)
    return net


def _alpha_std(sde, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (-1,) + (1,) * (x.dim() - 1)
    return sde.log_mean_coeff(t).exp().reshape(shape), sde.marginal_std(t).reshape(shape)


# ---- time embeddings ----------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [GaussianFourierEmbedding, SinusoidalEmbedding])
def test_embedding_shape_and_unit_circle(cls):
    emb = cls(64)
    t = torch.rand(7)
    e = emb(t)
    assert e.shape == (7, 64)
    # Features come in (sin, cos) pairs of the same argument.
    assert_close(e[:, :32] ** 2 + e[:, 32:] ** 2, torch.ones(7, 32))


def test_sinusoidal_embedding_closed_form():
    emb = SinusoidalEmbedding(8)
    t = torch.tensor([0.0, 0.25])
    freqs = torch.tensor([10_000 ** (-k / 4) for k in range(4)])
    arg = 1000 * t[:, None] * freqs
    assert_close(emb(t), torch.cat([arg.sin(), arg.cos()], 1))


def test_fourier_embedding_is_fixed_seeded_and_saved():
    torch.manual_seed(3)
    a = GaussianFourierEmbedding(32, scale=16.0)
    torch.manual_seed(3)
    b = GaussianFourierEmbedding(32, scale=16.0)
    assert_close(a.W, b.W)
    assert "W" in a.state_dict() and not list(a.parameters())
    t = torch.tensor([0.3])
    arg = 2 * math.pi * 0.3 * a.W
    assert_close(a(t)[0], torch.cat([arg.sin(), arg.cos()]))


@pytest.mark.parametrize("cls", [GaussianFourierEmbedding, SinusoidalEmbedding])
def test_embedding_bad_dim(cls):
    with pytest.raises(ValueError, match="even integer"):
        cls(7)
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        cls(8)(torch.zeros(3, 1))


# ---- shapes and zero initialisation ---------------------------------------------------------------

@pytest.mark.parametrize("net,shape", [
    (MLPScoreNet(2), (5, 2)),
    (MLPScoreNet(16, hidden=64, embedding="sinusoidal"), (5, 16)),
    (MLPScoreNet(16, hidden=32, depth=1), (5, 1, 4, 4)),
    (UNet(), (3, 1, 8, 8)),
    (UNet(in_channels=3, image_size=16, embedding="sinusoidal"), (3, 3, 16, 16)),
    (_small_unet(in_channels=3, image_size=32, channel_mults=(1, 2, 2), attn_resolutions=(8,), num_res_blocks=2),
     (2, 3, 32, 32)),
], ids=["mlp2", "mlp16", "mlp-image", "unet1x8x8", "unet3x16x16", "unet3x32x32"])
def test_output_shape_and_zero_at_init(net, shape):
    x, t = torch.randn(shape), torch.rand(shape[0])
    out = net(x, t)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(x))  # the last layer is zero-initialised
    _randomise_last_layer(net)
    out = net(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().sum() > 0


@parametrize_sdes
def test_untrained_score_model_closed_forms(sde):
    """Zero network output: "eps" and "score" give the zero score, "x0" (x̂₀ = c_skip x) gives −x/(s² + α²)."""
    x, t = torch.randn(6, 1, 8, 8, dtype=F64), torch.rand(6, dtype=F64) * 0.9 + 0.05
    net = UNet().double()
    alpha, std = _alpha_std(sde, t, x)
    assert torch.equal(ScoreModel(net, sde, "eps")(x, t), torch.zeros_like(x))
    assert torch.equal(ScoreModel(net, sde, "score")(x, t), torch.zeros_like(x))
    # The score of x_t when x₀ ~ N(0, σ_data² I) (σ_data = 1): the preconditioning's prior guess.
    assert_close(ScoreModel(net, sde, "x0")(x, t), -x / (std**2 + alpha**2))


# ---- ScoreModel conversions ---------------------------------------------------------------------

class _ProbeNet(nn.Module):
    """A fixed, non-trivial function of (x, t) that records the input the wrapper passed in."""

    def forward(self, x, t):
        self.seen = x
        return torch.tanh(x) + 0.5 * x + t.reshape(-1, *[1] * (x.dim() - 1))


@parametrize_sdes
@parametrize_param
def test_score_model_matches_closed_form(sde, parameterization):
    """score from the network output and the input preconditioning c_in = 1/√(α² σ_data² + s²)."""
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(8, 3, dtype=F64, generator=gen)
    t = torch.rand(8, dtype=F64, generator=gen) * 0.99 + 0.01
    sigma_data = 0.7
    net = _ProbeNet()
    model = ScoreModel(net, sde, parameterization, sigma_data=sigma_data)
    score = model(x, t)
    alpha, std = _alpha_std(sde, t, x)
    x_in = x / torch.sqrt(alpha**2 * sigma_data**2 + std**2)
    assert_close(net.seen, x_in)
    out = net(x_in, model.network_time(t))
    # "x0": EDM's denoiser with σ = s/α: x̂₀ = c_skip x/α + c_out out (Karras et al. 2022, Table 1).
    sigma = std / alpha
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    x0_hat = c_skip * x / alpha + c_out * out
    expected = {"eps": -out / std, "score": out, "x0": (alpha * x0_hat - x) / std**2}[parameterization]
    assert_close(score, expected)


@parametrize_sdes
@parametrize_param
def test_eps_and_x0_consistent_with_score(sde, parameterization):
    """eps = −s·score and x̂₀ = (x + s² score)/α (Tweedie), for any network."""
    torch.manual_seed(0)
    net = _randomise_last_layer(MLPScoreNet(4, hidden=32, depth=2)).double()
    model = ScoreModel(net, sde, parameterization)
    x = torch.randn(10, 4, dtype=F64) * 2
    t = torch.linspace(0.05, 1.0, 10, dtype=F64)
    alpha, std = _alpha_std(sde, t, x)
    score = model(x, t)
    assert_close(model.eps(x, t), -std * score)
    assert_close(model.x0(x, t), (x + std**2 * score) / alpha)
    # The native quantity is the network output itself ("x0": after EDM's skip connection, σ_data = 1).
    x_in = x / torch.sqrt(alpha**2 + std**2)
    out = net(x_in, model.network_time(t))
    if parameterization == "x0":
        out = alpha * x / (alpha**2 + std**2) + std / torch.sqrt(alpha**2 + std**2) * out
    native = {"eps": model.eps, "score": model.forward, "x0": model.x0}[parameterization]
    assert_close(native(x, t), out, rtol=1e-14, atol=1e-14)


@parametrize_param
def test_native_prediction_is_finite_where_the_score_is_not(parameterization):
    """At t = 0 under VP, s = 0: the score is infinite, but the native ε̂ / x̂₀ must not pass through it."""
    net = _randomise_last_layer(MLPScoreNet(2, hidden=16, depth=1))
    model = ScoreModel(net, VPSDE(), parameterization)
    x, t = torch.randn(4, 2), torch.zeros(4)
    native = {"eps": model.eps, "x0": model.x0, "score": model.forward}[parameterization]
    # c_in = 1 at t = 0 for VP with σ_data = 1, and EDM's x̂₀ = x there (c_skip = 1, c_out = 0).
    assert_close(native(x, t), x if parameterization == "x0" else net(x, model.network_time(t)))


@parametrize_sdes
def test_network_time_is_normalised_log_snr(sde):
    """τ = 0 at t = T_MIN, 1 at T, increasing, and affine in λ(t); time_input="t" passes t through."""
    net = _ProbeNet()
    model = ScoreModel(net, sde)
    t = torch.tensor([ScoreModel.T_MIN, 1e-3, 0.1, 0.5, 1.0], dtype=F64)
    tau = model.network_time(t)
    assert tau[0].item() == pytest.approx(0.0, abs=1e-12) and tau[-1].item() == pytest.approx(1.0, abs=1e-12)
    assert torch.all(tau[1:] > tau[:-1])
    lam = sde.half_log_snr(t)
    assert_close(tau, (lam[0] - lam) / (lam[0] - lam[-1]))
    assert model.network_time(torch.zeros(1, dtype=F64)).item() == pytest.approx(0.0, abs=1e-12)
    assert torch.equal(ScoreModel(net, sde, time_input="t").network_time(t), t)
    with pytest.raises(ValueError, match="unknown time_input 'sigma'; valid: log_snr, t, index"):
        ScoreModel(net, sde, time_input="sigma")


@parametrize_sdes
def test_network_time_index_is_the_chain_position(sde):
    """time_input="index": i/(N−1) at the chain's times, linear between them, clamped outside."""
    model = ScoreModel(_ProbeNet(), sde, time_input="index")
    knots = sde.chain_times()
    n = sde.N - 1
    first = int((knots == 0).sum().clamp_max(n))          # sub-VP's noiseless index 0 shares t = 0 with none
    assert_close(model.network_time(knots[first:]), torch.arange(first, sde.N, dtype=F64) / n, rtol=0, atol=1e-12)
    mid = 0.5 * (knots[1:] + knots[:-1])
    assert_close(model.network_time(mid[first:]), (torch.arange(first, n, dtype=F64) + 0.5) / n, rtol=0, atol=1e-9)
    ends = model.network_time(torch.tensor([0.0, 2.0 * sde.T], dtype=F64))
    assert ends.tolist() == [0.0, 1.0]
    t = torch.linspace(0, sde.T, 5001, dtype=F64)
    assert torch.all(model.network_time(t).diff() >= 0)
    if isinstance(sde, VESDE):  # NCSN's σ_i = σ(i/(N−1)): the index is t itself
        assert_close(model.network_time(t), t, rtol=0, atol=1e-12)


def test_score_model_scalar_time_and_score_fn_alias():
    sde = VPSDE()
    model = ScoreModel(_randomise_last_layer(MLPScoreNet(2, hidden=16, depth=1)), sde)
    x = torch.randn(4, 2)
    assert_close(model(x, 0.3), model(x, torch.full((4,), 0.3)))
    assert_close(model.score_fn(x, torch.full((4,), 0.3)), model(x, 0.3))


# ---- training behaviour ---------------------------------------------------------------------------

@pytest.mark.parametrize("make_net,shape", [
    (lambda: MLPScoreNet(2, hidden=32, depth=2), (16, 2)),
    (lambda: _small_unet(), (4, 1, 8, 8)),
], ids=["mlp", "unet"])
def test_gradients_reach_every_parameter(make_net, shape):
    """At step 0 only the zero-initialised last layer gets a gradient; after one step, every parameter does."""
    torch.manual_seed(0)
    net = make_net()
    last = net.output if isinstance(net, MLPScoreNet) else net.conv_out
    model = ScoreModel(net, VPSDE(), "eps")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, t, z = torch.randn(shape), torch.rand(shape[0]) * 0.9 + 0.1, torch.randn(shape)

    def step():
        opt.zero_grad()
        (model.eps(x, t) - z).pow(2).mean().backward()

    step()
    assert last.weight.grad.abs().sum() > 0
    opt.step()
    step()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("net,shape", [
    (MLPScoreNet(2, hidden=32), (4, 2)),
    (MLPScoreNet(2, hidden=32, embedding="sinusoidal"), (4, 2)),
    (_small_unet(), (2, 1, 8, 8)),
    (_small_unet(embedding="sinusoidal"), (2, 1, 8, 8)),
], ids=["mlp-fourier", "mlp-sinusoidal", "unet-fourier", "unet-sinusoidal"])
def test_time_conditioning_changes_output(net, shape):
    _randomise_last_layer(net)
    x = torch.randn(shape)
    a, b = net(x, torch.full((shape[0],), 0.2)), net(x, torch.full((shape[0],), 0.7))
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


@pytest.mark.parametrize("make_net", [lambda: MLPScoreNet(2), lambda: _small_unet()], ids=["mlp", "unet"])
def test_initialisation_is_reproducible(make_net):
    torch.manual_seed(7)
    a = make_net().state_dict()
    torch.manual_seed(7)
    b = make_net().state_dict()
    torch.manual_seed(8)
    c = make_net().state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_mlp_learns_ring_score():
    """300 Adam steps of denoising score matching (‖ε_θ − z‖², docs/math.md §5) on the 8-mode ring under VP.

    The learned score at t = 0.5 must be closer to the exact mixture score than the zero score is
    by a factor 2: relative L2 error < 0.5 over points of p_t (about 0.15 is typical).
    """
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    sde, mixture = VPSDE(), ring_mixture()
    model = ScoreModel(MLPScoreNet(2), sde, "eps")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    B = 256
    for _ in range(300):
        x0, _ = mixture.sample(B, generator=gen)
        t = 1e-3 + (1 - 1e-3) * torch.rand(B, generator=gen)
        z = torch.randn(B, 2, generator=gen)
        mean, std = sde.marginal_prob(x0, t)
        loss = (model.eps(mean + std[:, None] * z, t) - z).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    x0, _ = mixture.sample(2000, generator=gen)
    t = torch.full((2000,), 0.5)
    mean, std = sde.marginal_prob(x0, t)
    xt = mean + std[:, None] * torch.randn(2000, 2, generator=gen)
    with torch.no_grad():
        learned, exact = model(xt, t), MixtureScore(sde, mixture)(xt, t)
    rel = ((learned - exact).pow(2).sum(1).mean() / exact.pow(2).sum(1).mean()).sqrt()
    assert rel < 0.5, rel


# ---- factory and bad input ------------------------------------------------------------------------

def test_build_network():
    mlp = build_network("mlp", (1, 4, 4), hidden=16, depth=1)
    assert isinstance(mlp, MLPScoreNet) and mlp.dim == 16
    unet = build_network("unet", (3, 16, 16), base_channels=16)
    assert isinstance(unet, UNet) and (unet.in_channels, unet.image_size) == (3, 16)
    assert unet(torch.randn(2, 3, 16, 16), torch.rand(2)).shape == (2, 3, 16, 16)


@pytest.mark.parametrize("call,match", [
    (lambda: build_network("resnet", (2,)), "unknown network kind 'resnet'; available: mlp, unet"),
    (lambda: build_network("unet", (1, 8, 4)), r"unet needs square images, event_shape \(C, H, W\) with H == W"),
    (lambda: build_network("unet", (1, 12, 12), channel_mults=(1, 2, 2, 2)), r"divisible by 2\^\(levels - 1\) = 8"),
    (lambda: build_network("unet", (64,)), r"\(C, H, W\)"),
    (lambda: build_network("mlp", ()), "non-empty tuple of positive integers"),
    (lambda: build_network("mlp", (2.5,)), r"positive integers, got \(2.5,\)"),
    (lambda: build_network("unet", (1, 8, 8), in_channels=3), "come from event_shape"),
    (lambda: ScoreModel(MLPScoreNet(2), VPSDE(), "v"), "unknown parameterization 'v'; valid: eps, score, x0"),
    (lambda: ScoreModel(MLPScoreNet(2), VPSDE(), sigma_data=0.0), "sigma_data must be positive"),
    (lambda: MLPScoreNet(2, embedding="rope"), "unknown embedding 'rope'; available: fourier, sinusoidal"),
    (lambda: MLPScoreNet(0), "dim must be an integer >= 1"),
    (lambda: UNet(image_size=4, channel_mults=(1, 2, 2, 2)), r"divisible by 2\^\(levels - 1\) = 8 .*data.resolution"),
    (lambda: UNet(channel_mults=()), "at least one level"),
    (lambda: UNet(dropout=1.0), "dropout"),
])
def test_bad_construction_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_call_shapes_raise():
    with pytest.raises(ValueError, match=r"UNet expects x of shape \(B, 1, 8, 8\), got \(2, 1, 16, 16\)"):
        UNet()(torch.zeros(2, 1, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match="MLPScoreNet\\(dim=2\\) takes x of shape"):
        MLPScoreNet(2)(torch.zeros(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(4,\)"):
        ScoreModel(MLPScoreNet(2), VPSDE())(torch.zeros(4, 2), torch.rand(3))
