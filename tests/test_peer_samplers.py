"""The peer-sampler wrappers of benchmarks/peer_samplers.py (posing, NFE counting, convergence) and the runner
of benchmarks/peers.py (worker processes, screening, the command line).

diffusers is skipped with ``pytest.importorskip``. k-diffusion cannot be: its package ``__init__``
imports torchvision, clip and wandb, so it is probed through ``k_diffusion_sampling()``, the loader
the module itself uses, and skipped when that raises ImportError.
"""
import functools
import json
import math
import sys

import pytest
import torch

from benchmarks import peers
from benchmarks.peer_samplers import (BudgetTooSmall, PeerSetting, SigmaProblem, best_peer,
                                      k_diffusion_sampling, peer_settings, reference_flow, ring_problem,
                                      rms_distance)
from models.checkpoint import load_checkpoint
from tasks_lib.model_source import pretrained_path

F64 = torch.float64
SIGMA_MAX, SIGMA_MIN = 80.0, 0.002
UNIPC = ("diffusers UniPC", "bh2, order 2, UniC, linspace")
EDM_2M = ("diffusers EDM DPM-Solver", "dpmsolver++, order 2, karras ρ=7")
K_2M = ("k-diffusion dpmpp_2m", "karras ρ=7")
K_HEUN = ("k-diffusion heun", "karras ρ=7")
#: How close a peer's first σ and its end σ come to σ_max and σ_min: float32 tables in diffusers
#: (module docstring), float64 grids in k-diffusion.
START_RTOL = {"diffusers": 1e-6, "k-diffusion": 1e-12}
END_RTOL = {"diffusers": 2e-3, "k-diffusion": 1e-9}


def _setting(peer: str, setting: str) -> PeerSetting:
    if peer.startswith("diffusers"):
        pytest.importorskip("diffusers")
    else:
        try:
            k_diffusion_sampling()
        except ImportError as exc:
            pytest.skip(f"k-diffusion is not importable: {exc}")
    (match,) = [s for s in peer_settings() if (s.peer, s.setting) == (peer, setting)]
    return match


def _recording(problem: SigmaProblem) -> tuple[SigmaProblem, list[float]]:
    """The problem with a denoiser that records the σ of each call."""
    sigmas = []

    def denoiser(x, sigma):
        sigmas.append(sigma[0].item())
        return problem.denoiser(x, sigma)

    return SigmaProblem(problem.name, problem.sigma_max, problem.sigma_min, problem.x_start, denoiser), sigmas


@pytest.fixture(scope="module")
def ring():
    return ring_problem(64, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN)


@pytest.fixture(scope="module")
def ring_reference(ring):
    return reference_flow(ring, rtol=1e-8)


def _constant_problem(n: int = 8) -> tuple[SigmaProblem, torch.Tensor]:
    """D ≡ μ (all data at μ): the flow is x̃(σ) = μ + (x̃_start − μ) σ/σ_max, which every peer here
    integrates exactly, so its output tells where it started and stopped."""
    mu = torch.tensor([1.0, -2.0], dtype=F64)
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    return SigmaProblem("constant", SIGMA_MAX, SIGMA_MIN, SIGMA_MAX * z, lambda x, sigma: mu.expand_as(x)), mu


def test_rms_distance_is_the_rms_of_per_sample_euclidean_distances():
    a = torch.tensor([[3.0, 4.0], [1.0, 1.0]], dtype=F64)
    b = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)
    assert rms_distance(a, b) == pytest.approx(math.sqrt(25 / 2))


def test_reference_flow_matches_the_closed_form_for_a_gaussian():
    # p₀ = N(μ, s² I): D = μ + s²/(s² + σ²)(x̃ − μ), and x̃(σ) − μ scales as √(s² + σ²).
    mu, s = torch.tensor([1.0, -2.0], dtype=F64), 0.5
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    problem = SigmaProblem("gaussian", SIGMA_MAX, SIGMA_MIN, SIGMA_MAX * z,
                           lambda x, sigma: mu + (s**2 / (s**2 + sigma**2))[:, None] * (x - mu))
    exact = mu + (problem.x_start - mu) * math.sqrt(s**2 + SIGMA_MIN**2) / math.sqrt(s**2 + SIGMA_MAX**2)
    assert rms_distance(reference_flow(problem, rtol=1e-9), exact) < 1e-7


def test_best_peer_takes_the_smallest_error_and_skips_failures(ring):
    reference = torch.zeros_like(ring.x_start)

    def offset(delta, nfe=10):
        return lambda problem, budget: (reference + delta, nfe)

    def raises(problem, budget):
        raise RuntimeError("peer broke")

    def too_small(problem, budget):
        raise BudgetTooSmall("needs more")

    settings = [PeerSetting("p", "far", 1, offset(0.1)), PeerSetting("p", "raises", 1, raises),
                PeerSetting("p", "nan", 1, offset(float("nan"))), PeerSetting("p", "small", 2, too_small),
                PeerSetting("p", "over budget", 1, offset(0.0, nfe=11)), PeerSetting("p", "near", 1, offset(0.01))]
    failures = []
    error, setting, nfe = best_peer(ring, 10, reference, settings=settings, failures=failures)
    assert setting.setting == "near" and nfe == 10
    assert error == pytest.approx(0.01 * math.sqrt(2))
    assert sorted(s.setting for s, _ in failures) == ["nan", "over budget", "raises"]
    with pytest.raises(RuntimeError, match="no peer setting"):
        best_peer(ring, 10, reference, settings=settings[1:3])


@pytest.mark.parametrize("peer, setting, order", [(*UNIPC, 3), (*K_2M, 2), (*EDM_2M, 2)])
def test_peer_converges_at_its_order_on_the_ring(ring, ring_reference, peer, setting, order):
    run = _setting(peer, setting).run
    coarse, fine = (rms_distance(run(ring, budget)[0], ring_reference) for budget in (80, 160))
    assert math.log2(coarse / fine) == pytest.approx(order, abs=0.5)


def test_edm_dpm_solver_and_k_diffusion_dpmpp_2m_agree(ring):
    # The same method (DPM-Solver++(2M)) on the same grid in two packages: they differ by float32.
    edm, _ = _setting(*EDM_2M).run(ring, 20)
    k_2m, _ = _setting(*K_2M).run(ring, 20)
    assert rms_distance(edm, k_2m) < 1e-5


@pytest.mark.parametrize("peer, setting", [UNIPC, K_2M, EDM_2M, K_HEUN])
def test_run_counts_nfe_and_spans_sigma_max_to_sigma_min(ring, peer, setting):
    chosen = _setting(peer, setting)
    problem, sigmas = _recording(ring)
    budget = 9
    _, nfe = chosen.run(problem, budget)
    assert nfe == len(sigmas) == budget // chosen.nfe_per_step * chosen.nfe_per_step
    package = peer.split()[0]
    assert sigmas[0] == pytest.approx(SIGMA_MAX, rel=START_RTOL[package])
    assert all(b <= a for a, b in zip(sigmas, sigmas[1:])) and sigmas[-1] > SIGMA_MIN

    constant, mu = _constant_problem()
    x, _ = chosen.run(constant, budget)
    ratio = (x - mu) / (constant.x_start - mu)
    assert torch.allclose(ratio, torch.full_like(ratio, SIGMA_MIN / SIGMA_MAX), rtol=END_RTOL[package], atol=0)


def test_k_diffusion_loader_leaves_no_torchvision_placeholder():
    try:
        k_diffusion_sampling()
    except ImportError as exc:
        pytest.skip(f"k-diffusion is not importable: {exc}")
    torchvision = sys.modules.get("torchvision")
    assert torchvision is None or getattr(torchvision, "__file__", None) is not None


@pytest.mark.slow
def test_every_setting_runs_within_budget_from_sigma_max():
    settings = peer_settings()
    if not settings:
        pytest.skip("neither diffusers nor k-diffusion is importable")
    problem, sigmas = _recording(ring_problem(16))
    for setting in settings:
        for budget in (5, 10):
            sigmas.clear()
            try:
                x, nfe = setting.run(problem, budget)
            except BudgetTooSmall:
                assert setting.nfe_per_step is None or setting.nfe_per_step > budget, setting.label
                continue
            assert torch.isfinite(x).all() and nfe == len(sigmas), setting.label
            if setting.nfe_per_step is None:
                assert nfe <= budget, setting.label
            else:
                assert nfe == budget // setting.nfe_per_step * setting.nfe_per_step, setting.label
            assert sigmas[0] == pytest.approx(SIGMA_MAX, rel=START_RTOL[setting.peer.split()[0]]), setting.label


# ---- benchmarks/peers.py: the runner ---------------------------------------------------------------

def _peers_installed() -> None:
    pytest.importorskip("diffusers")
    try:
        k_diffusion_sampling()
    except ImportError as exc:
        pytest.skip(f"k-diffusion is not importable: {exc}")


def test_shared_time_embedding_equals_the_per_sample_evaluation():
    full = load_checkpoint(pretrained_path("ring", "ve")).score_fn.double()
    shared = load_checkpoint(pretrained_path("ring", "ve")).score_fn.double()
    peers.share_time_embedding(shared)
    assert isinstance(shared.net.time_embed, peers._SharedTimeEmbedding)
    x = 3 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    one_t = torch.full((64,), 0.3, dtype=F64)
    # one (1, hidden) embedding broadcast instead of 64 equal rows: only the matmul's rounding may differ
    assert torch.allclose(shared(x, one_t), full(x, one_t), rtol=1e-12, atol=1e-12)
    several_t = torch.linspace(0.05, 0.9, 64, dtype=F64)
    assert torch.equal(shared(x, several_t), full(x, several_t))


def test_float32_screening_copy_leaves_the_float64_problem_alone():
    model = load_checkpoint(pretrained_path("ring", "vp"))
    score = model.score_fn.double()
    posed = peers.pose("ring_vp.pt", model.sde, score, model.sde.default_eps, 32, (2,), screen_dtype=torch.float32)
    # the screening runs a float32 copy; the problem itself, ours and the shortlist keep the float64 network
    assert next(score.parameters()).dtype == F64
    x, sigma = posed.problem.x_start, torch.full((32,), 0.5, dtype=F64)
    exact, screened = posed.problem.denoiser(x, sigma), posed.screen_denoiser(x, sigma)
    assert screened.dtype == F64 and not torch.equal(screened, exact)
    assert torch.allclose(screened, exact, rtol=1e-5, atol=1e-5)
    worker = peers._WORKER
    try:
        peers._start_worker(functools.partial(lambda p: [p], posed), ("ring_vp.pt",))
        assert worker["subs"]["ring_vp.pt"].denoiser is posed.screen_denoiser
        assert worker["subs"]["ring_vp.pt"].x_start.shape[0] == 32
    finally:
        worker.clear()


def test_screening_on_every_sample_runs_each_setting_once():
    problem = ring_problem(8)
    reference = torch.zeros_like(problem.x_start)
    calls = []

    def offset(delta):
        def run(p, budget):
            calls.append(delta)
            return reference + delta, budget
        return run

    settings = [PeerSetting("p", f"{d}", 1, offset(d)) for d in (0.3, 0.01, 0.2)]
    # the first SCREEN samples are all 8: the ranking is the answer, and no setting runs twice
    places = []
    error, setting, nfe = peers.best_peer_screened(problem, problem, 10, reference, settings, places)
    assert (setting.setting, nfe, len(calls), places) == ("0.01", 10, 3, [1])
    assert error == pytest.approx(0.01 * math.sqrt(2))


def test_worker_pool_gives_the_cells_of_one_process():
    _peers_installed()
    labels = tuple(f"{peer} ({setting})" for peer, setting in [UNIPC, K_2M, EDM_2M, K_HEUN])
    labels += ("k-diffusion dpm_adaptive (order 3, rtol swept)",)   # batch-coupled steps, cached per problem
    factory = functools.partial(peers.small_problems, 16)
    posed = factory()
    names = [p.problem.name for p in posed]
    budgets = (5, 8)
    alone = peers.measure(names, 1, budgets, factory=factory, settings=labels)
    pooled = peers.measure(names, 2, budgets, factory=factory, settings=labels)
    assert pooled.cells == alone.cells and pooled.cells.keys() == set(names)
    assert pooled.screen_ranks == alone.screen_ranks and pooled.screens == alone.screens
    # each cell is our error and the best of the chosen settings against the problem's own flow
    first, second = posed
    reference = reference_flow(first.problem, rtol=first.reference_rtol)
    for budget in budgets:
        ours, peer_err, label, nfe = alone.cells[first.problem.name][budget]
        assert ours == rms_distance(first.ours(budget)[0], reference)
        assert label in labels and nfe <= budget
        # 16 samples: the screening holds them all, and its best setting is the cell's
        screen = alone.screens[first.problem.name, budget]
        assert screen["ours"] == ours and min(screen["peers"].values()) == peer_err
        assert screen["peers"][label] == peer_err and set(screen["peers"]) <= set(labels)
    # the winners_only problem swept only the settings that won a cell of the first
    winners = {row[2] for row in alone.cells[first.problem.name].values()}
    assert {row[2] for row in alone.cells[second.problem.name].values()} <= winners


def test_fixed_setting_is_the_one_whose_worst_budget_is_best():
    # ours 1.0 at both budgets. A is 2× better than ours at 5 and 2× worse at 8 (its worst: 2); B 1.25× better
    # at 5 and 1.25× worse at 8 (its worst: 1.25, the best); D is worse at both; C did not run at 8 (too small a
    # budget, or a failure) and is left out however good
    screens = {("p", 5): {"ours": 1.0, "peers": {"A": 0.5, "B": 0.8, "C": 0.01, "D": 3.0}},
               ("p", 8): {"ours": 1.0, "peers": {"A": 2.0, "B": 1.25, "D": 4.0}}}
    f = peers.fixed_settings(screens, "p", (5, 8))
    assert (f["setting"], f["ahead"], f["settings"], f["at"]) == ("B", [5], 3, 5)
    assert f["its_worst"] == pytest.approx(1.25) and f["worst"] == pytest.approx(1.25)
    # against the best per budget (C at 5, B at 8) our worst ratio is ours ÷ C's
    assert f["per_budget_worst"] == pytest.approx(100.0)
    assert peers.fixed_settings(screens, "p", (5, 8, 10)) is None


def test_screens_json_keeps_every_setting_per_budget_with_null_where_it_did_not_run():
    screens = {("p", b): {"ours": 1 / b, "peers": {"B": 2 / b, **({} if b == 5 else {"A": 0.123456789})}}
               for b in peers.BUDGETS}
    back = json.loads(peers.screens_json(screens, ["p", "not screened"]))
    assert list(back) == ["p"] and back["p"]["settings"] == ["A", "B"]
    assert back["p"]["5"] == {"ours": 0.2, "peers": [None, 0.4]}
    assert back["p"]["100"] == {"ours": 0.01, "peers": [0.1235, 0.02]}


def test_outlier_summary_is_rms_median_and_the_worst_samples_share():
    from benchmarks import peers_outliers
    # 399 samples at distance 1 and one at 20: the worst 0.5 % (two samples) carry (400 + 1)/(399 + 400)
    x = torch.zeros(400, 2, dtype=F64)
    x[:, 0] = 1.0
    x[7] = torch.tensor([12.0, 16.0], dtype=F64)
    d = peers_outliers.distances(x, torch.zeros_like(x))
    rms, median, share = peers_outliers.summary(d)
    assert rms == pytest.approx(math.sqrt(799 / 400)) and median == 1.0
    assert share == pytest.approx(401 / 799)


def test_bootstrap_interval_of_the_ratio_is_exact_for_proportional_errors_and_wide_when_one_sample_decides():
    from benchmarks import peers_outliers
    generator = torch.Generator().manual_seed(3)
    peer = torch.rand(500, generator=generator, dtype=F64) + 0.5
    assert peers_outliers.ratio_interval(2 * peer, peer) == pytest.approx((2.0, 2.0))
    # ours equal to the peer but for one sample 30× off: the point ratio is ~1.9, and a redraw without that
    # sample (probability ~37 %) gives 1, so the interval reaches 1 while its top stays above the point
    ours = peer.clone()
    ours[11] *= 30
    point = ours.pow(2).mean().sqrt() / peer.pow(2).mean().sqrt()
    low, high = peers_outliers.ratio_interval(ours, peer)
    assert low == pytest.approx(1.0) and high > point > 1.5
    assert peers_outliers.ratio_interval(ours, peer) == (low, high)        # seeded: the same interval again


def test_held_out_samples_are_a_second_draw_of_the_same_problem():
    posed = peers.small_problems(16)[0]
    assert torch.equal(posed.resampled(0).problem.x_start, posed.problem.x_start)   # seed 0 is the table's draw
    held = posed.resampled(1)
    assert held.problem.x_start.shape == posed.problem.x_start.shape
    assert not torch.allclose(held.problem.x_start, posed.problem.x_start)
    assert torch.equal(held.problem.x_start, posed.resampled(1).problem.x_start)
    assert (held.problem.sigma_max, held.problem.sigma_min, held.eps) == \
           (posed.problem.sigma_max, posed.problem.sigma_min, posed.eps)


@pytest.mark.parametrize("module", ["peers", "peers_outliers"])
def test_a_benchmark_without_the_peers_installed_says_how_to_install_them(module, monkeypatch, capsys, tmp_path):
    from benchmarks import peers_outliers
    bench = {"peers": peers, "peers_outliers": peers_outliers}[module]
    # as if only diffusers could be imported, whatever is installed here
    monkeypatch.setattr(bench, "peer_settings", lambda: [PeerSetting("diffusers UniPC", "any", 1, None)])
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["ring_ve.pt", "--out", str(tmp_path)] if module == "peers" else ["ring_ve.pt"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: the peers' package(s) k-diffusion cannot be imported") and "pip install" in err
    assert not list(tmp_path.iterdir())


def test_outliers_command_line_refuses_an_unknown_problem(capsys):
    from benchmarks import peers_outliers
    with pytest.raises(SystemExit) as exit_info:
        peers_outliers.main(["nothing"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and "the problems are" in err


@pytest.mark.parametrize("argv, message", [(["ring_ve.pt"], "--out"), (["--workers", "0"], "--workers"),
                                           (["nothing", "--out", "unused"], "the problems are")])
def test_peers_command_line_refuses_bad_input(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        peers.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
