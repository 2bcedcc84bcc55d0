"""Forward SDEs with Gaussian transition kernels (docs/math.md §1–§3).

Every SDE here is linear, ``dx = f(t) x dt + g(t) dw``, so the perturbation kernel is
``x_t | x_0 ~ N(α(t) x_0, s(t)² I)``. The base class derives everything a sampler needs
(drift, marginals, prior, half log-SNR, reverse process) from four scalar schedules that each
SDE defines: ``log_mean_coeff`` (log α), ``marginal_var`` (s²), ``drift_coeff`` (f) and
``diffusion_sq`` (g²). Every time argument is a tensor of shape (B,) broadcast against data
of shape (B, ...).
"""
from __future__ import annotations

import abc
import dataclasses
import math
from typing import Callable

import torch

from core_lib import UserError

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor, Tensor], Tensor]

__all__ = ["SDE", "VPSDE", "subVPSDE", "VESDE", "VPCosineSDE", "TabulatedVPSDE", "ReverseSDE", "batch_broadcast",
           "SDEError", "SDES", "get_sde", "sde_name"]


class SDEError(UserError):
    """Bad SDE settings: hyperparameters out of range, or a step count with no valid chain."""


def batch_broadcast(c: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient of shape (B,) so that it broadcasts against x (B, ...)."""
    return c.reshape(c.shape + (1,) * (x.dim() - c.dim()))


class SDE(abc.ABC):
    """A linear forward SDE on t ∈ [0, T] with its N-step discretisation.

    Subclasses set the schedules below; the rest is shared. Times outside [0, T] (adaptive
    ODE solvers probe there) are clamped to the interval for the quantities that are only
    defined inside it (variances), so every method stays finite there.
    """

    T: float = 1.0
    #: Default t at which samplers stop (docs/math.md §4): the score blows up at t = 0.
    default_eps: float = 1e-3

    def __init__(self, N: int = 1000):
        if int(N) != N or N < 2:
            raise SDEError(f"sde.N: N must be an integer >= 2, got {N!r}.")
        self.N = int(N)

    # ---- schedules every SDE defines -------------------------------------------------------
    @abc.abstractmethod
    def log_mean_coeff(self, t: Tensor) -> Tensor:
        """log α(t): the mean of x_t given x_0 is α(t) x_0."""

    @abc.abstractmethod
    def marginal_var(self, t: Tensor) -> Tensor:
        """s(t)²: the variance of x_t given x_0 (per dimension), strictly positive for t > 0."""

    @abc.abstractmethod
    def drift_coeff(self, t: Tensor) -> Tensor:
        """f(t), with the forward drift f(t) x."""

    @abc.abstractmethod
    def diffusion_sq(self, t: Tensor) -> Tensor:
        """g(t)², the squared diffusion coefficient."""

    @property
    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the Gaussian prior N(0, prior_std² I) at t = T."""

    @abc.abstractmethod
    def discrete_chain(self) -> tuple[Tensor, Tensor]:
        """The N-step forward chain x_i = a_i x_{i−1} + √v_i z, i = 0..N−1, as (a, v) in float64.

        Index i corresponds to t_i = i/(N−1)·T. ``discretize`` and the ancestral and Langevin
        steps read their coefficients from this one chain.
        """

    # ---- the reference interface ---------------------------------------------------------
    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Drift f(x, t) (shape of x) and diffusion g(t) (shape (B,)) of the forward SDE."""
        return batch_broadcast(self.drift_coeff(t).to(x.dtype), x) * x, self.diffusion_sq(t).sqrt().to(x.dtype)

    def marginal_prob(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean α(t) x (shape of x) and std s(t) (shape (B,)) of x_t given x_0 = x."""
        alpha = self.log_mean_coeff(t).exp().to(x.dtype)
        return batch_broadcast(alpha, x) * x, self.marginal_std(t).to(x.dtype)

    def marginal_std(self, t: Tensor) -> Tensor:
        """s(t), the standard deviation of the perturbation kernel."""
        return self.marginal_var(t).sqrt()

    def half_log_snr(self, t: Tensor) -> Tensor:
        """λ(t) = log(α(t)/s(t)), decreasing in t (+inf at t = 0 where s = 0); t is clamped to [0, T]."""
        t = _as_tensor(t).clamp(0.0, self.T)
        return self.log_mean_coeff(t) - 0.5 * self.marginal_var(t).log()

    @abc.abstractmethod
    def t_from_half_log_snr(self, lam: Tensor) -> Tensor:
        """The inverse of ``half_log_snr``: the t at which λ(t) = lam."""

    def prior_sampling(self, shape, generator: torch.Generator | None = None,
                       device=None, dtype=None) -> Tensor:
        """Draw x_T ~ N(0, prior_std² I) of the given shape."""
        return self.prior_std * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std² I) per sample, in nats: shape (B,)."""
        d = z[0].numel()
        sq = z.flatten(1).pow(2).sum(1)
        return -0.5 * d * math.log(2 * math.pi * self.prior_std**2) - 0.5 * sq / self.prior_std**2

    def chain_index(self, t: Tensor) -> Tensor:
        """The index i of the discrete chain for time t, floor(t (N−1)/T), as in the reference code.

        The floor is computed in float64 with a 1e-4 guard, so that t = i/(N−1)·T stored in
        float32 maps to i rather than i − 1.
        """
        i = torch.floor(t.double() * (self.N - 1) / self.T + 1e-4).long()
        return i.clamp(0, self.N - 1)

    def chain_coeffs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The chain step whose index is ``chain_index(t)``, as (a_i, v_i, m_i) tensors (B,) like ``like``.

        x_i = a_i x_{i−1} + √v_i z and m_i is the chain's own marginal variance, m_i = a_i² m_{i−1} + v_i,
        m_{−1} = 0 (1 − ᾱ_i for DDPM, σ_i² for NCSN). This is the reference code's lookup by time;
        samplers that walk the chain use ``chain_step`` with the index itself.
        """
        table = self.chain_table(like)
        return tuple(table[:3, self.chain_index(t).to(like.device)])

    def chain_step(self, i: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(a_i, v_i, m_i) of chain index i, each of shape (B,) in the dtype and on the device of ``like``."""
        table = self.chain_table(like)
        return tuple(table[:3, i, None].expand(3, like.shape[0]))

    def chain_position(self, t: Tensor) -> Tensor:
        """The fractional chain index u(t) ∈ [0, N−1]: linear between the knots ``chain_times()[i] ↦ i``.

        The inverse of ``chain_times`` with interpolation between indices, so that a model conditioned
        on the chain index (trained only at integers) can be evaluated at any t. Clamped to [0, N−1]
        outside the chain's times: below the chain's first noise level the model knows nothing finer.
        """
        t = _as_tensor(t)
        knots = self.chain_table(t)[3]
        hi = torch.searchsorted(knots, t.contiguous().clamp(knots[0], knots[-1]), right=True).clamp(1, self.N - 1)
        t0, t1 = knots[hi - 1], knots[hi]
        frac = ((t - t0) / (t1 - t0).clamp_min(torch.finfo(t.dtype).tiny)).clamp(0.0, 1.0)
        return (hi - 1).to(t.dtype) + frac

    def chain_table(self, like: Tensor) -> Tensor:
        """(a, v, m, chain_times) stacked, (4, N), cached per device and dtype; checks the chain is valid."""
        key = (like.device, like.dtype)
        cache = self.__dict__.setdefault("_chain_cache", {})
        if key not in cache:
            a, v = self.discrete_chain()
            if not bool((a > 0).all() and (v >= 0).all()):
                raise SDEError(f"{self!r} has no valid {self.N}-step chain (a mean coefficient a_i <= 0, as when "
                                 f"β_max/N >= 1 for VP): use more steps, or a continuous-time solver "
                                 f"(euler_maruyama, pf_ode).")
            A, m = self.chain_marginals()
            cache[key] = torch.stack([a, v, m, self._times_of(A, m)]).to(device=like.device, dtype=like.dtype)
        return cache[key]

    def chain_marginals(self) -> tuple[Tensor, Tensor]:
        """(A_i, m_i), i = 0..N−1, in float64: x_i | x_{−1} ~ N(A_i x_{−1}, m_i I) along the chain.

        A_i = a_0 ⋯ a_i and m_i = a_i² m_{i−1} + v_i (m_{−1} = 0); for DDPM √ᾱ_i and 1 − ᾱ_i.
        """
        a, v = self.discrete_chain()
        m = torch.empty_like(v)
        prev = 0.0
        for i in range(len(v)):
            prev = a[i] ** 2 * prev + v[i]
            m[i] = prev
        return torch.cumprod(a, 0), m

    def chain_times(self) -> Tensor:
        """The time of each chain index, matched by noise level: λ(t_i) = log(A_i/√m_i) (float64, (N,)).

        This is the explicit map between a discrete model's index i and continuous time: at t_i
        the SDE's marginal has the chain's signal-to-noise ratio. For VE it is NCSN's t_i = i/(N−1);
        for VP it is close to (i + 1)/N (DDPM's x_1 has the noise of t ≈ 1/N, not of t = 0).
        A chain step without noise (m_i = 0, sub-VP's first) maps to t = 0. The last few VP indices
        lie just beyond T (DDPM's ᾱ_N is a little below α(T)²: log(1 − β) < −β); the SDE's schedules
        read any t > T as T.
        """
        return self._times_of(*self.chain_marginals())

    def _times_of(self, A: Tensor, m: Tensor) -> Tensor:
        """``chain_times`` from the chain's marginals (A_i, m_i)."""
        with torch.no_grad():
            lam = torch.log(A) - 0.5 * torch.log(m)
            t = self.t_from_half_log_snr(lam.clamp(max=1e6))
        return torch.where(m > 0, t, torch.zeros_like(t)).clamp_min(0.0)

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """One step of the forward chain at time t: x_{i+1} = x_i + f + G z, returns (f, G (B,))."""
        a, v, _ = self.chain_coeffs(t, x)
        return batch_broadcast(a - 1, x) * x, v.sqrt()

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        """The reverse-time SDE (or, with probability_flow=True, the PF-ODE) driven by score_fn."""
        return ReverseSDE(self, score_fn, probability_flow)

    def with_steps(self, N: int) -> "SDE":
        """A copy of this SDE with a different number of discretisation steps."""
        return type(self)(**{**self.hparams(), "N": N})

    def hparams(self) -> dict:
        """The constructor arguments, enough to rebuild the SDE (checkpoints store these)."""
        return {k: getattr(self, k) for k in self._hparam_names}

    _hparam_names: tuple[str, ...] = ("N",)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.hparams() == other.hparams()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self.hparams().items())))


@dataclasses.dataclass
class ReverseSDE:
    """The reverse-time process of ``forward`` (docs/math.md §1), with the same ``sde``/``discretize`` interface.

    With ``probability_flow=True`` the diffusion is zero and the drift is the PF-ODE's
    f − ½ g² ∇log p. Drifts are in forward time: a sampler going from T to 0 steps by −Δt.
    """

    forward: SDE
    score_fn: ScoreFn
    probability_flow: bool = False

    @property
    def T(self) -> float:
        return self.forward.T

    @property
    def N(self) -> int:
        return self.forward.N

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Drift f − (1 or ½) g² s_θ and diffusion (g, or 0 for the PF-ODE)."""
        f, g = self.forward.sde(x, t)
        score = self.score_fn(x, t)
        g2 = batch_broadcast(g.pow(2), x)
        weight = 0.5 if self.probability_flow else 1.0
        drift = f - weight * g2 * score
        return drift, torch.zeros_like(g) if self.probability_flow else g

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """One chain step of the reverse process: (rev_f, rev_G) = (f − G² s_θ (× ½ for the PF-ODE), G or 0).

        A reverse step from x_{i+1} to x_i is x_i = x_{i+1} − rev_f + rev_G z.
        """
        f, G = self.forward.discretize(x, t)
        score = self.score_fn(x, t)
        weight = 0.5 if self.probability_flow else 1.0
        rev_f = f - weight * batch_broadcast(G.pow(2), x) * score
        return rev_f, torch.zeros_like(G) if self.probability_flow else G


def _as_tensor(t) -> Tensor:
    return t if torch.is_tensor(t) else torch.as_tensor(t, dtype=torch.float64)


class _VPFamily(SDE):
    """Shared mean schedule of VP and sub-VP: log α(t) = −¼ t² (β_max − β_min) − ½ t β_min."""

    _hparam_names = ("beta_min", "beta_max", "N")

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(N)
        if not (math.isfinite(beta_min) and math.isfinite(beta_max) and 0 < beta_min <= beta_max):
            raise SDEError(f"sde.beta_min, sde.beta_max: need finite 0 < beta_min <= beta_max, got beta_min={beta_min}, beta_max={beta_max}.")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        """β(t) = β_min + t (β_max − β_min)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _clamp(self, t: Tensor) -> Tensor:
        return _as_tensor(t).clamp(0.0, self.T)

    def log_mean_coeff(self, t: Tensor) -> Tensor:
        t = self._clamp(t)  # with s² on the same clamped t, α² + s² = 1 (VP) holds for any t
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def drift_coeff(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(_as_tensor(t))

    def _one_minus_alpha_sq(self, t: Tensor) -> Tensor:
        # 1 − α², accurate near t = 0 and clamped to t ≥ 0 where it would turn negative.
        return -torch.expm1(2 * self.log_mean_coeff(t))

    def t_from_half_log_snr(self, lam: Tensor) -> Tensor:
        # Solve for u = −2 log α ≥ 0 from λ, then the quadratic ½Δβ t² + β_min t − u = 0.
        u = self._log_alpha_sq_from_lambda(_as_tensor(lam))
        d = self.beta_max - self.beta_min
        return 2 * u / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * u))

    @property
    def prior_std(self) -> float:
        return 1.0

    def _discrete_times(self) -> Tensor:
        return torch.arange(self.N, dtype=torch.float64) / (self.N - 1) * self.T


class VPSDE(_VPFamily):
    """Variance-preserving SDE, the continuous limit of DDPM (docs/math.md §2).

    f = −½ β(t) x, g = √β(t), s(t)² = 1 − α(t)². Its N-step chain is DDPM's with
    β_i = β(t_i)/N, t_i = i/(N−1)·T: for the defaults, linspace(1e-4, 0.02, 1000).
    """

    def marginal_var(self, t: Tensor) -> Tensor:
        return self._one_minus_alpha_sq(t)

    def diffusion_sq(self, t: Tensor) -> Tensor:
        return self.beta(_as_tensor(t)).clamp_min(0.0)

    def _log_alpha_sq_from_lambda(self, lam: Tensor) -> Tensor:
        # λ = log α − ½ log(1 − α²) ⇒ α² = sigmoid(2λ) ⇒ −log α² = softplus(−2λ).
        return torch.nn.functional.softplus(-2 * lam)

    def discrete_betas(self) -> Tensor:
        """DDPM's β_1..β_N (float64): β(t_i)/N at t_i = i/(N−1)·T."""
        return self.beta(self._discrete_times()) / self.N

    def discrete_chain(self) -> tuple[Tensor, Tensor]:
        betas = self.discrete_betas()
        return torch.sqrt(1 - betas), betas


class subVPSDE(_VPFamily):
    """Sub-VP SDE (docs/math.md §2): VP's drift, g² = β(t)(1 − α(t)⁴), s(t) = 1 − α(t)².

    Its variance s² lies below VP's at every t. Its chain is the Euler–Maruyama
    discretisation x_{i+1} = x_i + f(t_i) x_i/N + √(g(t_i)²/N) z, as in the reference code.
    """

    def marginal_var(self, t: Tensor) -> Tensor:
        return self._one_minus_alpha_sq(t) ** 2

    def diffusion_sq(self, t: Tensor) -> Tensor:
        # g² = β (1 − α⁴) = β (1 − exp(−2 β_min t − Δβ t²)), from d(s²)/dt = 2 f s² + g².
        t = _as_tensor(t)
        return self.beta(t).clamp_min(0.0) * -torch.expm1(4 * self.log_mean_coeff(t))

    def _log_alpha_sq_from_lambda(self, lam: Tensor) -> Tensor:
        # λ = log α − log(1 − α²); with y = α > 0: e^λ (1 − y²) = y ⇒ y = 2/(e^−λ + √(e^−2λ + 4)).
        alpha = 2 / (torch.exp(-lam) + torch.sqrt(torch.exp(-2 * lam) + 4))
        return -2 * torch.log(alpha)

    def discrete_chain(self) -> tuple[Tensor, Tensor]:
        t = self._discrete_times()
        return 1 + self.drift_coeff(t) / self.N, self.diffusion_sq(t) / self.N

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Euler–Maruyama at the continuous t: f = f(t) x/N, G = g(t)/√N (the chain's step off the grid)."""
        drift, g = self.sde(x, t)
        return drift / self.N, g / math.sqrt(self.N)


class VESDE(SDE):
    """Variance-exploding SDE, the continuous limit of NCSN/SMLD (docs/math.md §2).

    σ(t) = σ_min (σ_max/σ_min)^t, f = 0, g = σ(t) √(2 ln(σ_max/σ_min)), α = 1, s = σ(t)
    (data at t = 0 carry σ_min noise, the reference convention). Prior N(0, σ_max² I).
    Its chain is NCSN's: σ_i = σ(t_i) geometric, x_i = x_{i−1} + √(σ_i² − σ_{i−1}²) z, σ_{−1} = 0.
    """

    default_eps = 1e-5
    _hparam_names = ("sigma_min", "sigma_max", "N")

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
            raise SDEError(f"sde.sigma_min, sde.sigma_max: need finite 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: Tensor) -> Tensor:
        """σ(t) = σ_min (σ_max/σ_min)^t."""
        return self.sigma_min * torch.exp(_as_tensor(t) * self._log_ratio)

    def log_mean_coeff(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_as_tensor(t))

    def marginal_var(self, t: Tensor) -> Tensor:
        return self.sigma(t) ** 2

    def drift_coeff(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_as_tensor(t))

    def diffusion_sq(self, t: Tensor) -> Tensor:
        return self.sigma(t) ** 2 * (2 * self._log_ratio)

    def t_from_half_log_snr(self, lam: Tensor) -> Tensor:
        return (-_as_tensor(lam) - math.log(self.sigma_min)) / self._log_ratio

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def discrete_sigmas(self) -> Tensor:
        """NCSN's σ_1..σ_N (float64): geometric from σ_min to σ_max."""
        return torch.exp(torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.N,
                                        dtype=torch.float64))

    def discrete_chain(self) -> tuple[Tensor, Tensor]:
        var = self.discrete_sigmas() ** 2
        v = torch.cat([var[:1], var[1:] - var[:-1]])
        return torch.ones_like(v), v


class _AlphaBarVP(SDE):
    """A VP SDE given by its signal fraction ᾱ(t) = α(t)² (docs/diffusers.md §1).

    With L(t) = log ᾱ(t), decreasing from L(0) = 0: log α = L/2, s² = 1 − ᾱ, β(t) = −L′(t) ≥ 0,
    f = −½β and g² = β (so that d s²/dt = 2 f s² + g²), and λ = ½(L − log(1 − e^L)), inverted through
    L = −softplus(−2λ) as for VP. Subclasses give L, β and the inverse of L, in float64 on [0, T];
    the schedules clamp t to [0, T] (as VP's do) and return the dtype of t.
    """

    @abc.abstractmethod
    def log_alpha_bar(self, t: Tensor) -> Tensor:
        """L(t) = log ᾱ(t) for float64 t in [0, T]."""

    @abc.abstractmethod
    def beta(self, t: Tensor) -> Tensor:
        """β(t) = −dL/dt ≥ 0 for float64 t in [0, T]."""

    @abc.abstractmethod
    def t_from_log_alpha_bar(self, L: Tensor) -> Tensor:
        """The t with L(t) = L (float64 in and out); an L below L(T) continues beyond T with slope −β(T)."""

    def _at(self, schedule: Callable[[Tensor], Tensor], t) -> Tensor:
        t = _as_tensor(t)
        out = schedule(t.double().clamp(0.0, self.T))
        return out.to(t.dtype) if t.is_floating_point() else out

    def log_mean_coeff(self, t: Tensor) -> Tensor:
        return 0.5 * self._at(self.log_alpha_bar, t)

    def marginal_var(self, t: Tensor) -> Tensor:
        return self._at(lambda u: -torch.expm1(self.log_alpha_bar(u)), t)

    def drift_coeff(self, t: Tensor) -> Tensor:
        return -0.5 * self._at(self.beta, t)

    def diffusion_sq(self, t: Tensor) -> Tensor:
        return self._at(self.beta, t)

    @property
    def prior_std(self) -> float:
        return 1.0

    def t_from_half_log_snr(self, lam: Tensor) -> Tensor:
        lam = _as_tensor(lam)
        t = self.t_from_log_alpha_bar(-torch.nn.functional.softplus(-2 * lam.double()))
        return t.to(lam.dtype) if lam.is_floating_point() else t


class VPCosineSDE(_AlphaBarVP):
    """Nichol & Dhariwal's cosine schedule as a VP SDE, with β capped at β_max (docs/diffusers.md §2).

    ᾱ(t) = f(t)/f(0) with f(t) = cos²θ(t), θ(t) = (t + s)/(1 + s)·π/2, hence β(t) = π tan θ(t)/(1 + s).
    At t = 1 the cosine reaches ᾱ = 0 with β = ∞, a noise level no Gaussian prior has. The cap:
    β(t) = min(π tan θ(t)/(1 + s), β_max), so log ᾱ follows the cosine up to t_c, where β(t_c) = β_max,
    and falls on linearly with slope −β_max; β stays continuous, every schedule and its inverse stay
    closed forms, and T = 1 is kept. β_max = 999 is diffusers' ``squaredcos_cap_v2`` in continuous form:
    its betas are clipped at 0.999, and a VP chain has β_i ≈ β(t_i)/N, i.e. β ≤ 999 at N = 1000 (it is
    also DPM-Solver's ``cosine_beta_max``). Then t_c ≈ 0.998, ᾱ(t_c) ≈ 9.7e-6, ᾱ(1) ≈ 1.3e-6:
    λ(1) ≈ −6.8, against VP's −5.0.

    Its N-step chain is diffusers' ``squaredcos_cap_v2`` exactly (``betas_for_alpha_bar``, computed the
    same way): β_i = min(1 − f((i+1)/N)/f(i/N), 0.999). Only clipped steps (the last one at N = 1000)
    leave the cosine; the clipped last index is noisier than ᾱ(1) and its time lies beyond T.

    Args:
        cosine_s: the offset s, which keeps β(0) = π tan(πs/(2(1 + s)))/(1 + s) ≈ 0.039 away from 0.
        beta_max: the cap of β(t).
        N: steps of the discrete chain.
    """

    _hparam_names = ("cosine_s", "beta_max", "N")
    #: diffusers' ``betas_for_alpha_bar(max_beta=0.999)``: the clip of the chain's β_i
    MAX_CHAIN_BETA = 0.999

    def __init__(self, cosine_s: float = 0.008, beta_max: float = 999.0, N: int = 1000):
        super().__init__(N)
        if not (math.isfinite(cosine_s) and 0 < cosine_s < 1):
            raise SDEError(f"sde.cosine_s: need 0 < cosine_s < 1, got {cosine_s}.")
        self.cosine_s, self.beta_max = float(cosine_s), float(beta_max)
        self._dtheta = math.pi / (2 * (1 + self.cosine_s))             # dθ/dt; β = 2 (dθ/dt) tan θ
        self._theta0 = self.cosine_s * self._dtheta
        beta0 = 2 * self._dtheta * math.tan(self._theta0)
        if not (math.isfinite(beta_max) and beta_max > beta0):
            raise SDEError(f"sde.beta_max: need a finite cap above β(0) = {beta0:.4g}, got {beta_max}.")
        theta_c = math.atan(self.beta_max / (2 * self._dtheta))
        self.t_cap = theta_c / self._dtheta - self.cosine_s
        self._L_cap = self._cosine(torch.tensor(self.t_cap, dtype=torch.float64)).item()

    def _cosine(self, t: Tensor) -> Tensor:
        """2 log(cos θ/cos θ₀) = 2 log1p(cos δ − 1 − tan θ₀ sin δ), δ = θ − θ₀: no cancellation as t → 0."""
        delta = t * self._dtheta
        return 2 * torch.log1p(-2 * torch.sin(delta / 2) ** 2 - math.tan(self._theta0) * torch.sin(delta))

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        return torch.where(t <= self.t_cap, self._cosine(t), self._L_cap - self.beta_max * (t - self.t_cap))

    def beta(self, t: Tensor) -> Tensor:
        tan = torch.tan((t + self.cosine_s) * self._dtheta)
        return torch.where(t <= self.t_cap, 2 * self._dtheta * tan, torch.full_like(t, self.beta_max))

    def t_from_log_alpha_bar(self, L: Tensor) -> Tensor:
        # cos θ = cos θ₀ e^{L/2}, and sin²θ = sin²θ₀ − cos²θ₀ expm1(L) without cancellation near θ₀
        cos0, sin0 = math.cos(self._theta0), math.sin(self._theta0)
        theta = torch.atan2(torch.sqrt(sin0**2 - cos0**2 * torch.expm1(L)), cos0 * torch.exp(0.5 * L))
        cosine = theta / self._dtheta - self.cosine_s
        return torch.where(L >= self._L_cap, cosine, self.t_cap + (self._L_cap - L) / self.beta_max).clamp_min(0.0)

    def discrete_betas(self) -> Tensor:
        """diffusers' ``squaredcos_cap_v2`` β_0..β_{N−1} for N steps (float64, before diffusers' float32)."""
        s = self.cosine_s

        def f(t: float) -> float:
            return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

        n = self.N
        return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), self.MAX_CHAIN_BETA) for i in range(n)],
                            dtype=torch.float64)

    def discrete_chain(self) -> tuple[Tensor, Tensor]:
        betas = self.discrete_betas()
        return torch.sqrt(1 - betas), betas


def _pchip_slopes(y: Tensor, h: float) -> Tensor:
    """Fritsch–Carlson slopes at equally spaced knots y (spacing h): the monotone C¹ cubic's, as scipy's pchip.

    Inside, the harmonic mean of the neighbouring secants (0 where they differ in sign); at the ends the
    shape-preserving three-point formula.
    """
    delta = torch.diff(y) / h
    d = torch.zeros_like(y)
    left, right = delta[:-1], delta[1:]
    same = left * right > 0
    d[1:-1] = torch.where(same, 2 / torch.where(same, 1 / left + 1 / right, torch.ones_like(left)), 0.0)
    for end, (d0, d1) in ((0, (delta[0], delta[1])), (-1, (delta[-1], delta[-2]))):
        slope = (3 * d0 - d1) / 2
        if slope * d0 <= 0:
            slope = torch.zeros_like(slope)
        elif d0 * d1 <= 0 and abs(slope) > abs(3 * d0):
            slope = 3 * d0
        d[end] = slope
    return d


class TabulatedVPSDE(_AlphaBarVP):
    """The VP SDE of a discrete β table (DDPM's, any diffusers scheduler's), continuous in t (docs/diffusers.md §1).

    The table's ᾱ_i = Π_{j≤i}(1 − β_j), i = 0..M−1, sits at t_i = (i + 1)/M, where DDPM's x_{i+1} has
    its noise (diffusers' timestep i). log ᾱ is the monotone C¹ cubic (PCHIP, Fritsch & Carlson 1980)
    through (0, 0) and the (t_i, log ᾱ_i): β(t) = −d log ᾱ/dt is continuous and ≥ 0 (no kinks for an
    adaptive solver), and ᾱ(t_i) = ᾱ_i, so ``chain_times()[i] = t_i`` and ``chain_position(t) = Mt − 1``.
    With N = M (the default) the chain is the table itself, a_i = √(1 − β_i), v_i = β_i, and the chain
    samplers walk the scheduler's own steps; another N gives the N-step chain of the same SDE,
    ᾱ_j = ᾱ((j + 1)/N) (for N dividing M, the scheduler's ``trailing`` timesteps).
    For linear betas linspace(β_min/M, β_max/M, M) it is VPSDE(β_min, β_max) up to log(1 − β) ≈ −β.

    Args:
        betas: β_0..β_{M−1}, each in (0, 1).
        N: steps of the discrete chain; None: M.
    """

    _hparam_names = ("betas", "N")
    #: bisections then Newton steps of the inverse of L on one knot interval: a bracket of 1e-9 of the interval,
    #: then float64 precision (Newton converges quadratically there unless β(t) = 0 at the root)
    _BISECTIONS, _NEWTON_STEPS = 30, 3

    def __init__(self, betas, N: int | None = None):
        table = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if len(table) < 2 or not bool(((table > 0) & (table < 1)).all()):
            raise SDEError("betas: need a table of at least 2 values, each in (0, 1) (ᾱ = 0, as with zero "
                           "terminal SNR, has no Gaussian prior).")
        super().__init__(len(table) if N is None else N)
        self.betas = tuple(table.tolist())
        y = torch.cat([table.new_zeros(1), torch.cumsum(torch.log1p(-table), 0)])   # log ᾱ at k/M, k = 0..M
        self._spline_cache = {torch.device("cpu"): (y, _pchip_slopes(y, 1 / len(table)))}

    def __repr__(self) -> str:
        b = self.betas
        return f"TabulatedVPSDE(betas=[{b[0]:.4g}, ..., {b[-1]:.4g}] ({len(b)} values), N={self.N})"

    def _spline(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(log ᾱ, slope) at the knots k/M, k = 0..M, float64 on ``device``."""
        if device not in self._spline_cache:
            y, d = self._spline_cache[torch.device("cpu")]
            self._spline_cache[device] = (y.to(device), d.to(device))
        return self._spline_cache[device]

    @staticmethod
    def _hermite(y0, y1, m0, m1, u, derivative: bool = False) -> Tensor:
        """The cubic with values y0, y1 and slopes m0, m1 (per unit u) at u = 0, 1; or its derivative in u."""
        if derivative:
            return (6 * u**2 - 6 * u) * (y0 - y1) + (3 * u**2 - 4 * u + 1) * m0 + (3 * u**2 - 2 * u) * m1
        return (2 * u**3 - 3 * u**2 + 1) * y0 + (u**3 - 2 * u**2 + u) * m0 + (-2 * u**3 + 3 * u**2) * y1 \
            + (u**3 - u**2) * m1

    def _segment(self, k: Tensor, device) -> tuple[Tensor, ...]:
        y, d = self._spline(device)
        M = len(y) - 1
        return y[k], y[k + 1], d[k] / M, d[k + 1] / M, M

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        M = len(self.betas)
        k = torch.floor(t * M).long().clamp(0, M - 1)
        y0, y1, m0, m1, _ = self._segment(k, t.device)
        return self._hermite(y0, y1, m0, m1, t * M - k)

    def beta(self, t: Tensor) -> Tensor:
        M = len(self.betas)
        k = torch.floor(t * M).long().clamp(0, M - 1)
        y0, y1, m0, m1, _ = self._segment(k, t.device)
        return (-M * self._hermite(y0, y1, m0, m1, t * M - k, derivative=True)).clamp_min(0.0)

    def t_from_log_alpha_bar(self, L: Tensor) -> Tensor:
        # The knot interval by searchsorted on −log ᾱ (increasing), then the cubic's root in it: bisections, then
        # Newton steps kept inside the bracket; a fixed count, so no host sync.
        y, d = self._spline(L.device)
        M = len(y) - 1
        flat = L.reshape(-1)
        k = (torch.searchsorted(-y, (-flat).contiguous(), right=True) - 1).clamp(0, M - 1)
        y0, y1, m0, m1, _ = self._segment(k, L.device)
        lo, hi = torch.zeros_like(flat), torch.ones_like(flat)
        for _ in range(self._BISECTIONS):
            mid = (lo + hi) / 2
            above = self._hermite(y0, y1, m0, m1, mid) > flat      # L still above the target: the root is further
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        u = (lo + hi) / 2
        for _ in range(self._NEWTON_STEPS):
            slope = self._hermite(y0, y1, m0, m1, u, derivative=True)
            step = (self._hermite(y0, y1, m0, m1, u) - flat) / torch.where(slope < 0, slope, -torch.ones_like(slope))
            u = torch.minimum(torch.maximum(u - torch.where(slope < 0, step, 0.0), lo), hi)
        t = (k + u) / M
        beyond = 1 + (flat - y[M]) / d[M]              # below the last knot: on along the last slope
        return torch.where(flat < y[M], beyond, t).reshape(L.shape)

    def discrete_chain(self) -> tuple[Tensor, Tensor]:
        if self.N == len(self.betas):
            betas = torch.tensor(self.betas, dtype=torch.float64)
            return torch.sqrt(1 - betas), betas
        t = torch.arange(1, self.N + 1, dtype=torch.float64) / self.N
        step = torch.diff(self.log_alpha_bar(t), prepend=torch.zeros(1, dtype=torch.float64))   # log(ᾱ_j/ᾱ_{j−1})
        return torch.exp(0.5 * step), -torch.expm1(step)


#: The SDE registry: the name used by ``conf/sde/<name>.yaml``, ``sde=<name>`` and the pretrained
#: models' file names, to its class. Everything that lists the SDEs reads it from here.
SDES: dict[str, type[SDE]] = {"vp": VPSDE, "subvp": subVPSDE, "ve": VESDE, "vp_cosine": VPCosineSDE}


def get_sde(name: str, **hparams) -> SDE:
    """The SDE registered as ``name`` ("vp", "subvp", "ve", "vp_cosine") built with ``hparams``, or an SDEError listing
    the names."""
    if name not in SDES:
        raise SDEError(f"unknown SDE {name!r}; available: {', '.join(SDES)}.")
    return SDES[name](**hparams)


def sde_name(sde: SDE | type[SDE]) -> str:
    """The registry name of an SDE instance or class (the inverse of :data:`SDES`)."""
    cls = sde if isinstance(sde, type) else type(sde)
    for name, registered in SDES.items():
        if cls is registered:
            return name
    raise SDEError(f"{cls.__name__} is not a registered SDE; register it in sde_lib.SDES.")
