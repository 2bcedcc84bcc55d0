"""Our default sampler against the samplers users run, side by side on one σ-space problem (issue 14).

Every problem is posed once in σ-space (docs/math.md §9): a span σ_max → σ_min, a starting point
x̃ at σ_max and a denoiser D(x̃, σ) = x̂₀. The peers (``benchmarks/peer_samplers.py``: diffusers'
UniPC, SA-Solver, DEIS, DPM-Solver and EDM DPM-Solver; k-diffusion's lms, dpmpp_2m, dpmpp_3m_sde,
dpm_fast, dpm_adaptive, heun, dpm_2, euler) run from their installed packages, each at its best
setting per budget (every grid and option they offer is swept, the smallest error kept). Ours runs
``solvers.sample(..., solver="multistep", steps=budget)`` with its defaults, on an SDE whose
σ(T) = σ_max and σ(eps) = σ_min, from x = α(T) x̃_start; its samples are compared as x̃ = x/α(eps).
The error is the RMS over samples of the distance to the problem's own exact flow (dopri8 in log σ,
rtol = atol = 1e-10, float64); for a network that is the flow of the network's own denoiser.

Problems: the 2-D ring of 8 Gaussians and the 16-D mixture (exact scores), each over EDM's span
σ 80 → 0.002 and over the VP SDE's span σ(1) ≈ 152 → σ(1e-3) ≈ 0.0105; the shipped networks
``models/pretrained/ring_{vp,subvp,ve}.pt`` over their SDE's span (float64); and the shipped digits U-Net
``digits_vp.pt`` (float32, 64 samples, its flow to rtol 1e-6, against the peer settings that won a cell of
the problems before it: a float64 sweep of every setting would take hours on 2 cores). Every sampler here
calls a network with one time for the whole batch, so the ring networks evaluate their time embedding once
per call and broadcast it (``_SharedTimeEmbedding``: equal to the per-sample evaluation to float64 rounding,
a fifth to a third of a float64 evaluation saved on one core).

The peers' sweep (~220 settings per cell) is ranked on the first 128 samples and its best 8 settings
are run on all samples (``best_peer_screened``; a problem with no more than 128 samples is ranked on all of
them, and that ranking is the answer). A ring network's sweep is ranked with a float32 copy of the network
(``Posed.screen_denoiser``); its shortlist runs in float64 as everything else. Against a float64 ranking of the
whole sweep the top 8 were the same settings in the same order, every error within 3e-4 relative, on
``ring_vp.pt`` at 20 and 50 NFE and ``ring_subvp.pt`` at 10 (and over diffusers' settings alone at 8, 30 and 100,
and 5 and 50: within 1e-3); the screening cost 25–60 % less CPU. peers.md gives each winner's place in its
screening: the evidence for SCREEN and SHORTLIST. Each problem's exact flow is computed once and shared by its
cells and its convergence slopes.

The work is split into jobs (a problem's exact flow; one cell, i.e. one problem at one budget; a network's
convergence slopes) and run by ``--workers`` processes at one thread each: the exact flows first, then
problem by problem, the longest jobs first within each. A job's
result depends only on its problem, budget, exact flow and peer settings, so the tables do not depend on
the number of workers (tests/test_peer_samplers.py). The digits row waits for every other cell, whose
winning settings it sweeps. peers.md ends with each problem's run time (the seconds of its jobs, summed
over the workers) and the wall time of the whole run.

Writes ``peers.md``, ``peers.png``, ``peers.json`` (every cell as data) and ``peers_screens.json`` (every
setting's error in each cell's screening, and ours on the same samples) to ``benchmarks/results/``,
or to ``--out``; the tables are rewritten as each problem completes. From the repository root, with the
peers installed (README, "Benchmarks")::

    python benchmarks/peers.py                                   # every problem, 2 workers
    python benchmarks/peers.py ring_ve.pt --out /tmp/peers       # problems whose name starts with the argument
    python benchmarks/peers.py --workers 1                       # one process
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import copy
import dataclasses
import json
import math
import multiprocessing
import pathlib
import sys
import time
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import solvers  # noqa: E402
from benchmarks.peer_samplers import (PeerSetting, SigmaProblem, best_peer, peer_settings,  # noqa: E402
                                      reference_flow, rms_distance, scored_run)
from models import MixtureScore, random_mixture, ring_mixture  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.networks import MLPScoreNet  # noqa: E402
from sde_lib import SDE, VESDE, VPSDE  # noqa: E402
from solvers.base import resolve_sigma_data  # noqa: E402
from solvers.grids import half_log_snr_at  # noqa: E402
from tasks_lib.model_source import pretrained_path  # noqa: E402

F64 = torch.float64
RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"
BUDGETS = (5, 6, 8, 10, 12, 15, 20, 25, 30, 50, 100)
N_EXACT = 2000
N_NETWORK = 1000
N_DIGITS = 64
#: the peers' sweep is screened on this many samples; the best SHORTLIST settings are then run on all
SCREEN = 128
SHORTLIST = 8
#: the goal: our error at most half the best peer's in every cell
GOAL = 0.5
#: the steps at which the default's convergence on each shipped network is measured
SLOPE_STEPS = (100, 200, 400, 800)


@dataclasses.dataclass
class Posed:
    """One problem for the peers (``problem``) and for us: the SDE, score and eps whose span is the problem's."""

    problem: SigmaProblem
    sde: SDE
    score: object
    eps: float
    #: the exact flow's tolerance (dopri8); looser for a float32 network, whose rounding a tighter one would chase
    reference_rtol: float = 1e-10
    #: the peers' sweep: False screens every setting; True, for a network too slow for that (the digits U-Net),
    #: screens only the settings that were best in some cell of the problems before it
    winners_only: bool = False
    #: the data scale the solve assumes, the model's own (``score`` may be a float32 network behind a cast)
    sigma_data: float = 1.0
    #: the denoiser the peers' sweep is ranked with (None: the problem's own); a float32 copy of a ring network,
    #: whose rounding (~1e-7) is far below the errors ranked, at half a float64 evaluation's cost
    screen_denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def alpha(self, t: float) -> float:
        return float(self.sde.log_mean_coeff(torch.tensor(t, dtype=F64)).exp())

    def resampled(self, seed: int) -> "Posed":
        """The same problem from another draw of starting noise (``pose`` draws the table's with seed 0)."""
        start = starting_points(self.problem.sigma_max, self.problem.x_start.shape, seed)
        return dataclasses.replace(self, problem=dataclasses.replace(self.problem, x_start=start))

    def ours(self, budget: int, **options) -> tuple[torch.Tensor, int]:
        """x̃ at σ_min from our ``multistep`` at ``budget`` steps, and its NFE."""
        z = self.alpha(self.sde.T) * self.problem.x_start
        out = solvers.sample(self.sde, self.score, z=z, solver="multistep", steps=budget, eps=self.eps,
                             sigma_data=self.sigma_data, **options)
        return out.samples / self.alpha(self.eps), out.nfe


class _SharedTimeEmbedding(torch.nn.Module):
    """An ``MLPScoreNet``'s time embedding, evaluated once when the whole batch is at one time.

    The network adds the embedding (and each block's projection of it) to every row, so a (1, hidden)
    embedding broadcasts to the (B, hidden) one it stands for. Every sampler in this benchmark, ours and
    the peers', and the exact flow call the network with one t for the batch; a batch with several times
    is embedded row by row as before.
    """

    def __init__(self, embedding: torch.nn.Module):
        super().__init__()
        self.embedding = embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 1 and t.shape[0] > 1 and torch.equal(t, t[:1].expand_as(t)):
            return self.embedding(t[:1])
        return self.embedding(t)


def share_time_embedding(score) -> None:
    """Give ``score``'s network (an unconditional ``MLPScoreNet``) a ``_SharedTimeEmbedding``, in place."""
    net = getattr(score, "net", None)
    if isinstance(net, MLPScoreNet) and not net.conditional \
            and not isinstance(net.time_embed, _SharedTimeEmbedding):
        net.time_embed = _SharedTimeEmbedding(net.time_embed)


def _cast(score, dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``score`` run in ``dtype`` on float64 states, its output float64; it declares what the model declares to our
    solvers (``ScoreModel.predicts_noise``, read by ``CountedScore``)."""
    if dtype == F64:
        return score

    def cast(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return score(x.to(dtype), t.to(dtype)).to(F64)

    cast.predicts_noise = getattr(score, "predicts_noise", False)
    return cast


def _denoiser(sde: SDE, score) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """D(x̃, σ) = x̂₀ from (sde, score): x = α x̃ at the t where σ = s/α, x̂₀ = (x + s² ∇log p_t(x))/α."""

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = sde.t_from_half_log_snr(-sigma.log())
        shape = (-1,) + (1,) * (x.dim() - 1)
        alpha = sde.log_mean_coeff(t).exp().view(shape)
        std = sde.marginal_std(t).view(shape)
        xt = alpha * x
        return (xt + std**2 * score(xt, t)) / alpha

    return denoiser


def starting_points(sigma_max: float, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """x̃_start = σ_max z, z standard normal drawn from ``seed`` (float64)."""
    return sigma_max * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def pose(name: str, sde: SDE, score, eps: float, n: int, event: tuple[int, ...], seed: int = 0,
         dtype: torch.dtype = F64, screen_dtype: torch.dtype | None = None, **options) -> Posed:
    """The σ-space problem of (sde, score) over [eps, T]: x̃_start = σ_max z, D from the score (run in ``dtype``;
    the solvers' state stays float64, ours as the peers'). ``screen_dtype``: the peers' sweep is ranked with a
    copy of the network (an ``nn.Module``) in that precision."""
    cast = _cast(score, dtype)
    screen = None
    if screen_dtype is not None and screen_dtype != dtype:
        screen = _denoiser(sde, _cast(copy.deepcopy(score).to(screen_dtype), screen_dtype))
    sigma_max, sigma_min = (math.exp(-half_log_snr_at(sde, t)) for t in (sde.T, eps))   # σ = e^(−λ)
    start = starting_points(sigma_max, (n, *event), seed)
    return Posed(SigmaProblem(name, sigma_max, sigma_min, start, _denoiser(sde, cast)), sde, cast, eps,
                 sigma_data=resolve_sigma_data(score, None), screen_denoiser=screen, **options)


def problems() -> list[Posed]:
    out = []
    # EDM's span on a VE SDE: σ(t) = 0.001·80000^t reaches 0.002 at t = log 2/log 80000
    edm = VESDE(sigma_min=0.001, sigma_max=80.0)
    edm_eps = math.log(2) / math.log(80_000)
    for label, mixture in (("ring", ring_mixture()), ("16-D", random_mixture())):
        out.append(pose(f"{label}, σ 80 → 0.002", edm, MixtureScore(edm, mixture), edm_eps, N_EXACT,
                        (mixture.dim,)))
        vp = VPSDE()
        out.append(pose(f"{label}, VP span", vp, MixtureScore(vp, mixture), 1e-3, N_EXACT, (mixture.dim,)))
    for name in ("vp", "subvp", "ve"):
        model = load_checkpoint(pretrained_path("ring", name))
        score = model.score_fn.double()
        share_time_embedding(score)
        out.append(pose(f"ring_{name}.pt", model.sde, score, model.sde.default_eps, N_NETWORK, (2,),
                        screen_dtype=torch.float32))
    # The digits U-Net costs ~0.6 s per float64 evaluation of 128 samples on one core: it runs in float32
    # (its flow to rtol 1e-6, far below the errors measured) on fewer samples, against the winning peers.
    model = load_checkpoint(pretrained_path("digits", "vp"))
    out.append(pose("digits_vp.pt (U-Net, float32)", model.sde, model.score_fn, model.sde.default_eps, N_DIGITS,
                    model.event_shape, dtype=torch.float32, reference_rtol=1e-6, winners_only=True))
    return out


def small_problems(n_samples: int = 16) -> list[Posed]:
    """The runner's test problems: the exact ring on ``n_samples`` samples over EDM's span, and over the VP span
    against the settings that won the first (``winners_only``, as the digits U-Net); flows at rtol 1e-8."""
    edm, vp = VESDE(sigma_min=0.001, sigma_max=80.0), VPSDE()
    return [pose("ring, σ 80 → 0.002", edm, MixtureScore(edm, ring_mixture()), math.log(2) / math.log(80_000),
                 n_samples, (2,), reference_rtol=1e-8),
            pose("ring, VP span, winners only", vp, MixtureScore(vp, ring_mixture()), 1e-3, n_samples, (2,),
                 reference_rtol=1e-8, winners_only=True)]


def best_peer_screened(problem: SigmaProblem, sub: SigmaProblem, budget: int, reference: torch.Tensor,
                       settings: list[PeerSetting], screen_rank: list[int] | None = None,
                       screen_errors: dict[str, float] | None = None):
    """``best_peer`` over ``settings``, ranked first on ``sub``, the first SCREEN samples (a network in
    float64 costs ~0.05 s per evaluation of 1000 points, and the sweep has ~220 settings), then the best
    SHORTLIST of them run on all samples. (error, setting, NFE) on all samples. ``sub`` is made once per
    problem, so that dpm_adaptive's tolerance sweep, cached per problem object, runs once. When ``sub``
    holds every sample the ranking already is the answer, and nothing is run twice. ``screen_rank``, if a
    list, receives the winner's place in the screening (1: first), the evidence for SCREEN and SHORTLIST;
    ``screen_errors``, if a dict, every setting's error in the screening by label (the settings that ran)."""
    ranked = []
    for setting in settings:
        try:
            error, nfe = scored_run(setting, sub, budget, reference[:SCREEN])
        except Exception:  # too small a budget for it, or a failure: best_peer below skips it the same way
            continue
        ranked.append((error, nfe, setting))
    ranked.sort(key=lambda r: r[0])
    if screen_errors is not None:
        screen_errors.update((setting.label, error) for error, _, setting in ranked)
    if sub.x_start.shape[0] >= problem.x_start.shape[0]:
        if not ranked:
            raise RuntimeError(f"no peer setting ran within {budget} NFE")
        error, nfe, setting = ranked[0]
        best = error, setting, nfe
    else:
        best = best_peer(problem, budget, reference, settings=[s for _, _, s in ranked[:SHORTLIST]])
    if screen_rank is not None:
        screen_rank.append(1 + [s for _, _, s in ranked].index(best[1]))
    return best


def winning_settings(results: dict) -> list[PeerSetting]:
    """The peer settings that were best in some cell of ``results`` (this run's, else the stored peers.json)."""
    if not results and (RESULTS / "peers.json").is_file():
        results = json.loads((RESULTS / "peers.json").read_text())["cells"]
    labels = {row[2] for rows in results.values() for row in rows.values()}
    chosen = [s for s in peer_settings() if s.label in labels]
    return chosen or peer_settings()


def cell(posed: Posed, sub: SigmaProblem, budget: int, reference: torch.Tensor, settings: list[PeerSetting],
         screen_rank: list[int] | None = None, screen: dict | None = None) -> tuple[float, float, str, int]:
    """One cell: (our error, the best peer's error, its setting's label, its NFE) at ``budget``; ``screen_rank``
    as in ``best_peer_screened``. ``screen``, if a dict, receives the errors on the screening's samples: ours
    ("ours") and every setting's ("peers", by label)."""
    ours, nfe = posed.ours(budget)
    assert nfe == budget, (nfe, budget)
    peer_errors = {}
    peer_err, setting, peer_nfe = best_peer_screened(posed.problem, sub, budget, reference, settings, screen_rank,
                                                     peer_errors)
    if screen is not None:
        # each sample's solve is independent of the others', so our first samples are the screening's
        n = sub.x_start.shape[0]
        screen.update(ours=rms_distance(ours[:n], reference[:n]), peers=peer_errors)
    return rms_distance(ours, reference), peer_err, setting.label, peer_nfe


def convergence_slope(posed: Posed, steps=SLOPE_STEPS,
                      reference: torch.Tensor | None = None) -> tuple[list[float], float]:
    """Our default's error at growing steps on the problem's flow (``reference``, computed if not given), and
    the log-log slope over the last two."""
    if reference is None:
        reference = reference_flow(posed.problem, rtol=posed.reference_rtol)
    errs = [rms_distance(posed.ours(n)[0], reference) for n in steps]
    return errs, -math.log(errs[-1] / errs[-2]) / math.log(steps[-1] / steps[-2])


# ----------------------------------------------------------------------------------------------------
# Jobs and the processes that run them

@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work: a problem's exact flow ("reference"), one cell ("cell", at ``budget``), or a
    network's convergence slopes ("slopes")."""

    kind: str
    problem: str
    budget: int = 0


#: this process's problems by name and their screening subsets (``_start_worker``)
_WORKER: dict = {}


def _start_worker(factory: Callable[[], list[Posed]], names: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    posed = {p.problem.name: p for p in factory() if p.problem.name in names}
    subs = {name: dataclasses.replace(p.problem, x_start=p.problem.x_start[:SCREEN],
                                      denoiser=p.screen_denoiser or p.problem.denoiser) for name, p in posed.items()}
    _WORKER.clear()
    _WORKER.update(posed=posed, subs=subs)


def _run_job(job: Job, reference: torch.Tensor | None, labels: tuple[str, ...] | None):
    """``job`` in this process: (its result, its wall seconds, its CPU seconds); a cell's result is (its row,
    the winner's place in the screening). ``labels`` restricts a cell's sweep (None: every setting)."""
    start, cpu = time.perf_counter(), time.process_time()
    posed = _WORKER["posed"][job.problem]
    if job.kind == "reference":
        out = reference_flow(posed.problem, rtol=posed.reference_rtol)
    elif job.kind == "slopes":
        out = convergence_slope(posed, reference=reference)
    else:
        settings = peer_settings() if labels is None else [s for s in peer_settings() if s.label in labels]
        rank, screen = [], {}
        out = cell(posed, _WORKER["subs"][job.problem], job.budget, reference, settings, rank, screen), rank[0], screen
    return out, time.perf_counter() - start, time.process_time() - cpu


class _InProcess:
    """``submit`` of concurrent.futures, run at once in this process: ``--workers 1`` takes the same path."""

    def __init__(self, factory: Callable[[], list[Posed]], names: tuple[str, ...]):
        _start_worker(factory, names)

    def submit(self, fn, *args) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to the caller through the future, as a process pool does
            future.set_exception(exc)
        return future

    def shutdown(self) -> None:
        _WORKER.clear()


def _cost(job: Job, posed: Posed) -> float:
    """A rough cost in seconds, to start the longest jobs first (measured on the networks: ~0.1 s per
    float64 evaluation of 1000 points, and the sweep's ~220 settings on 128 points per NFE of the budget)."""
    network = posed.problem.name.endswith(".pt") or posed.winners_only
    if job.kind == "reference":
        return 250.0 if network else 10.0
    if job.kind == "slopes":
        return 150.0
    return (3.0 if network else 0.6) * job.budget


def _priority(job: Job, names: list[str], posed: dict) -> tuple:
    """The exact flows first (every other job needs one), then problem by problem, so that the tables grow as
    problems complete; within each, the longest jobs first."""
    stage = (0, 0) if job.kind == "reference" else (1, names.index(job.problem))
    return (*stage, -_cost(job, posed[job.problem]))


@dataclasses.dataclass
class Measured:
    """What a run measured: cells by problem and budget, slopes by network, and by problem the wall and CPU
    seconds of its jobs; the run's wall time; the place of each cell's winner in its screening."""

    cells: dict
    slopes: dict
    seconds: dict
    cpu: dict
    wall: float
    screen_ranks: dict = dataclasses.field(default_factory=dict)
    #: by (problem, budget): the errors on the screening's samples, ours ("ours") and every peer setting's ("peers")
    screens: dict = dataclasses.field(default_factory=dict)


def measure(names: list[str], workers: int = 2, budgets: tuple[int, ...] = BUDGETS,
            factory: Callable[[], list[Posed]] = problems, settings: tuple[str, ...] | None = None,
            on_problem: Callable[[Measured], None] | None = None) -> Measured:
    """Every cell of the problems ``names`` (of ``factory()``, a picklable function) at ``budgets``, and the
    networks' convergence slopes, on ``workers`` processes of one thread each. ``settings``: the labels of
    the peer settings to sweep (None: all). ``on_problem`` is called whenever a problem's cells are complete
    (to write the tables so far)."""
    start = time.perf_counter()
    posed = {p.problem.name: p for p in factory() if p.problem.name in names}
    names = [n for n in names if n in posed]
    if workers == 1:
        pool = _InProcess(factory, tuple(names))
    else:
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=_start_worker, initargs=(factory, tuple(names)))
    references, cells, slopes = {}, {name: {} for name in names}, {}
    seconds, cpu = collections.defaultdict(float), collections.defaultdict(float)
    ready = [Job("reference", name) for name in names]
    # a winners_only problem sweeps the settings that won the other problems' cells: it waits for them
    deferred = [name for name in names if posed[name].winners_only]
    labels = {name: settings for name in names}
    running = {}
    measured = Measured(cells, slopes, seconds, cpu, 0.0)
    try:
        while ready or running or deferred:
            if deferred and all(len(cells[n]) == len(budgets) for n in names if n not in deferred) \
                    and all(n in references for n in deferred):
                others = {n: rows for n, rows in cells.items() if n not in deferred}
                chosen = tuple(s.label for s in winning_settings(others)
                               if settings is None or s.label in settings)
                for name in deferred:
                    labels[name] = chosen
                    ready += [Job("cell", name, b) for b in budgets]
                deferred = []
            ready.sort(key=lambda job: _priority(job, names, posed))
            while ready and len(running) < workers:
                job = ready.pop(0)
                running[pool.submit(_run_job, job, references.get(job.problem), labels.get(job.problem))] = job
            if not running:
                continue
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                result, spent, spent_cpu = future.result()
                seconds[job.problem] += spent
                cpu[job.problem] += spent_cpu
                if job.kind == "reference":
                    references[job.problem] = result
                    print(f"  {job.problem}: exact flow [{spent:.0f} s, {spent_cpu:.0f} s CPU]", flush=True)
                    if not posed[job.problem].winners_only:
                        ready += [Job("cell", job.problem, b) for b in budgets]
                    if job.problem.endswith(".pt"):
                        ready.append(Job("slopes", job.problem))
                elif job.kind == "slopes":
                    slopes[job.problem] = result
                    print(_slope_row(job.problem, *result) + f"  [{spent:.0f} s, {spent_cpu:.0f} s CPU]", flush=True)
                else:
                    result, measured.screen_ranks[job.problem, job.budget], measured.screens[job.problem, job.budget] \
                        = result
                    cells[job.problem][job.budget] = result
                    err, peer_err, label, peer_nfe = result
                    print(f"  {job.problem} {job.budget:3d} NFE: ours {err:.2e}  best peer {peer_err:.2e} "
                          f"({label}, {peer_nfe} NFE, screened #{measured.screen_ranks[job.problem, job.budget]})  "
                          f"ratio {err / peer_err:.2f}  [{spent:.0f} s, {spent_cpu:.0f} s CPU]", flush=True)
                    if len(cells[job.problem]) == len(budgets):
                        cells[job.problem] = {b: cells[job.problem][b] for b in budgets}
                        print(f"  {job.problem}: cells complete, {seconds[job.problem]:.0f} s of work so far "
                              f"({cpu[job.problem]:.0f} s CPU)", flush=True)
                        if on_problem is not None:
                            measured.wall = time.perf_counter() - start
                            on_problem(measured)
    finally:
        pool.shutdown()
    measured.wall = time.perf_counter() - start
    return measured


# ----------------------------------------------------------------------------------------------------
# The command line and the tables

#: the packages the peers come from, and how to install them (README, "Benchmarks")
PEER_PACKAGES = ("diffusers", "k-diffusion")
INSTALL = 'pip install -e ".[bench]" && pip install --no-deps k-diffusion==0.1.1.post1'


def fail(message: str) -> None:
    """One ``error:`` line on stderr and exit 2 (bad input, found before any work)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def require_peers(settings: list[PeerSetting]) -> None:
    """``fail`` unless every package of PEER_PACKAGES has samplers among ``settings`` (is importable here)."""
    missing = [package for package in PEER_PACKAGES if not any(s.peer.startswith(package + " ") for s in settings)]
    if missing:
        fail(f"the peers' package(s) {', '.join(missing)} cannot be imported; install them: {INSTALL}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Our default sampler against the peers (issue 14).")
    parser.add_argument("prefixes", nargs="*", help="run only the problems whose name starts with one of these")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each (default 2)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="directory for peers.md, peers.json and peers.png (default benchmarks/results; "
                             "required when only some problems run)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        fail(f"--workers must be at least 1, got {args.workers}.")
    posed = problems()
    every = [p.problem.name for p in posed]
    names = [n for n in every if not args.prefixes or any(n.startswith(a) for a in args.prefixes)]
    if not names:
        fail(f"no problem's name starts with {', '.join(map(repr, args.prefixes))}; the problems are: "
              + "; ".join(every) + ".")
    if len(names) < len(every) and args.out is None:
        fail("a run of some problems would overwrite benchmarks/results/peers.*: pass --out DIR for its tables.")
    require_peers(peer_settings())
    out = RESULTS if args.out is None else args.out
    torch.set_num_threads(1)
    chosen = [p for p in posed if p.problem.name in names]
    measured = measure(names, args.workers, on_problem=lambda m: write(m, chosen, out, args.workers, len(every)))
    write(measured, chosen, out, args.workers, len(every), finished=True)
    print(f"total wall time {measured.wall / 60:.1f} min on {args.workers} worker(s); written to {out / 'peers.md'}")


def fixed_settings(screens: dict, name: str, budgets: tuple[int, ...] = BUDGETS) -> dict | None:
    """One peer setting held at every budget, as a user runs a sampler, judged as our default is: on ``name``'s
    screening samples, the setting (among those that ran at every budget) whose worst budget against ours is the
    best, i.e. the smallest largest ratio it ÷ ours. A dict: its label; that ratio ("its_worst"); our largest
    ratio to it ("worst") and at which budget; the budgets it is ahead of us at; how many settings ran at every
    budget; and for comparison our largest ratio to the best setting per budget on the same samples. None when
    a budget's screening is missing."""
    if any((name, b) not in screens for b in budgets):
        return None
    cells = [screens[name, b] for b in budgets]
    common = set.intersection(*(set(c["peers"]) for c in cells))
    if not common:
        return None
    ratios = {label: [c["ours"] / c["peers"][label] for c in cells] for label in common}   # ours ÷ it
    its_worst = {label: max(1 / r for r in rs) for label, rs in ratios.items()}           # its largest it ÷ ours
    label = min(sorted(ratios), key=its_worst.get)
    worst = max(ratios[label])
    per_budget = [c["ours"] / min(c["peers"].values()) for c in cells]
    return {"setting": label, "its_worst": its_worst[label], "worst": worst,
            "at": budgets[ratios[label].index(worst)], "ahead": [b for b, r in zip(budgets, ratios[label]) if r > 1],
            "settings": len(common), "per_budget_worst": max(per_budget)}


def screens_json(screens: dict, names: list[str]) -> str:
    """The screenings of ``names`` as JSON text, one line per problem and budget: the setting labels once per
    problem, then per budget our error and every setting's in that order (null: it did not run), to 4 digits."""

    def dumps(value) -> str:
        return json.dumps(value, ensure_ascii=False)

    def digits(error: float | None) -> float | None:
        return None if error is None else float(f"{error:.4g}")

    blocks = []
    for name in names:
        if not all((name, b) in screens for b in BUDGETS):
            continue
        labels = sorted(set().union(*(screens[name, b]["peers"] for b in BUDGETS)))
        rows = [f'   "{b}": ' + dumps({"ours": digits(screens[name, b]["ours"]),
                                       "peers": [digits(screens[name, b]["peers"].get(k)) for k in labels]})
                for b in BUDGETS]
        blocks.append(f'  {dumps(name)}: {{\n   "settings": {dumps(labels)},\n' + ",\n".join(rows) + "\n  }")
    return "{\n" + ",\n".join(blocks) + "\n}\n"


def _slope_row(name: str, errs: list[float], slope: float) -> str:
    return f"| {name} | " + " | ".join(f"{e:.2e}" for e in errs) + f" | {slope:.2f} |"


def write(measured: Measured, posed: list[Posed], out: pathlib.Path = RESULTS, workers: int = 2,
          of: int | None = None, finished: bool = False) -> None:
    """peers.md (ratios, every cell, the networks' convergence slopes, the run time), peers.png and peers.json
    in ``out``, for the problems of ``posed`` whose cells are complete (``of``: how many problems there are)."""
    names = [p.problem.name for p in posed]
    results = {n: measured.cells[n] for n in names if len(measured.cells[n]) == len(BUDGETS)}
    if not results:
        return
    spans = "; ".join(f"{p.problem.name}: σ {p.problem.sigma_max:.3g} → {p.problem.sigma_min:.3g}"
                      for p in posed if p.problem.name in results)
    head = "| problem | " + " | ".join(str(b) for b in BUDGETS) + " |\n|---|" + "---|" * len(BUDGETS)
    ratio = [head] + [f"| {name} | " + " | ".join(f"{rows[b][0] / rows[b][1]:.2f}" for b in BUDGETS) + " |"
                      for name, rows in results.items()]
    detail = ["| problem | NFE | ours | best peer | its setting (NFE used) | its place in the screening | ratio |",
              "|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for b in BUDGETS:
            err, peer_err, label, peer_nfe = rows[b]
            detail.append(f"| {name} | {b} | {err:.2e} | {peer_err:.2e} | {label} ({peer_nfe}) | "
                          f"{measured.screen_ranks.get((name, b), '–')} | {err / peer_err:.2f} |")
    # where the screening decided something (more samples than it uses): how deep the winners sat in it
    screened = {p.problem.name for p in posed if p.problem.x_start.shape[0] > SCREEN}
    places = sorted(rank for (name, _), rank in measured.screen_ranks.items() if name in screened and name in results)
    screening = (f"The winner's place in the {SCREEN}-sample screening of its cell (problems with more samples): "
                 f"first in {places.count(1)} of {len(places)} cells, within the first 3 in "
                 f"{sum(r <= 3 for r in places)}, at worst {places[-1]} (the best {SHORTLIST} are run on all "
                 f"samples).\n\n" if places else "")
    fixed = ["| problem | the best single peer setting | it ÷ ours, its worst budget | ours ÷ it, our worst (at NFE) "
             "| budgets it is ahead | settings compared | ours ÷ the best per budget, worst |",
             "|---|---|---|---|---|---|---|"]
    for name in results:
        f = fixed_settings(measured.screens, name)
        if f is not None:
            ahead = ", ".join(map(str, f["ahead"])) or "none"
            fixed.append(f"| {name} | {f['setting']} | {f['its_worst']:.2f} | {f['worst']:.2f} ({f['at']}) | "
                         f"{ahead} | {f['settings']} | {f['per_budget_worst']:.2f} |")
    slope_rows = [_slope_row(n, *measured.slopes[n]) for n in names if n in measured.slopes]
    slopes = ["| problem | " + " | ".join(f"{n} steps" for n in SLOPE_STEPS) + " | slope |",
              "|---|---|---|---|---|---|"] + (slope_rows or ["| (not measured in this run) |"])
    worst = max(rows[b][0] / rows[b][1] for rows in results.values() for b in BUDGETS)
    subset = of is not None and len(names) < of
    command = "python benchmarks/peers.py" + (" " + " ".join(repr(n) for n in names) if subset else "")
    timing = [f"- {name}: {measured.seconds[name]:.0f} s wall, {measured.cpu[name]:.0f} s CPU (exact flow, "
              f"{len(BUDGETS)} cells" + (", convergence slopes" if name in measured.slopes else "") + ")"
              for name in results]
    state = "the whole run" if finished else "so far (the run was still going when this was written)"
    timing.append(f"- {state}: **{measured.wall / 60:.1f} min wall time** on {workers} worker process(es) at one "
                  f"thread each; the jobs took {sum(measured.seconds.values()) / 60:.1f} min wall and "
                  f"{sum(measured.cpu.values()) / 60:.1f} min CPU in all"
                  + (" (wall above CPU: the cores were shared with other work)"
                     if sum(measured.seconds.values()) > 1.2 * sum(measured.cpu.values()) else "")
                  + (f"; problems run: {len(names)} of {of}" if subset else ""))
    text = (f"# Our default sampler against the peers, side by side\n\n`{command}`; torch "
            f"{torch.__version__}. Problems posed in σ-space (docs/math.md §9); errors are RMS distances to each "
            f"problem's exact flow (dopri8 in log σ at 1e-10, float64); exact problems {N_EXACT} samples, ring "
            f"networks {N_NETWORK}; the digits U-Net {N_DIGITS} samples in float32, its flow at rtol 1e-6, against "
            f"the peer settings that won a cell of the other problems. Peers at their best setting per cell "
            f"(`benchmarks/peer_samplers.py`: every setting ranked on {SCREEN} samples, the best {SHORTLIST} "
            f"run on all). Spans: {spans}.\n\n"
            f"## Ratio: our default `multistep` ÷ the best peer (goal ≤ {GOAL}; worst cell {worst:.2f})\n\n"
            + "\n".join(ratio) + "\n\n## Every cell\n\n" + "\n".join(detail)
            + f"\n\n## One peer setting at every budget\n\nA user runs one sampler setting at whatever budget; the "
              f"table above takes the best of ~220 per cell. Here, on each problem's {SCREEN}-sample screening (all "
              f"samples for the digits U-Net, over the settings that won elsewhere; the ring networks' peers with the "
              f"float32 copy), the single peer setting judged as "
              f"our default is, by its worst budget: the one whose largest ratio to ours over the eleven budgets is "
              f"smallest:\n\n" + "\n".join(fixed)
            + "\n\n## Convergence of the default on the shipped networks (their own flow)\n\n" + "\n".join(slopes)
            + "\n\n## Run time\n\n" + screening + "Seconds of work per problem (its jobs, summed over the workers):\n\n"
            + "\n".join(timing)
            + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.md").write_text(text)
    # the cells as data: (ours, best peer, its setting, its NFE) per problem and budget
    cells = {name: {str(b): list(row) for b, row in rows.items()} for name, rows in results.items()}
    (out / "peers.json").write_text(json.dumps({"torch": torch.__version__, "cells": cells}, indent=1))
    (out / "peers_screens.json").write_text(screens_json(measured.screens, list(results)))
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results.items()):
        ax.loglog(BUDGETS, [rows[b][0] for b in BUDGETS], "o-", label="ours (multistep, defaults)")
        ax.loglog(BUDGETS, [rows[b][1] for b in BUDGETS], "s--", label="best peer per budget")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("NFE")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].set_ylabel("RMS distance to the exact flow")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "peers.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
