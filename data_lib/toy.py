"""Generated 2-D toy sets: the Gaussian ring (exact density known), swiss roll, two moons, checkerboard.

Train and test come from two independent generator streams of the seed (``seeded_generator``),
so the test set of a seed does not depend on ``n_train``.

Labels (``Dataset.train_labels``, ``test_labels``, ``classes``) are the component a point was drawn
from wherever the set is a mixture of named parts: the Gaussian of ring and mix16d (classes "0".."K−1"),
the half of moons (scikit-learn's label: 0 the upper moon, 1 the lower), the filled square of
checkerboard (8 classes). The swiss roll is one continuous curve with no parts, so it is unlabelled.
Drawing the labels changes no sample: they are read off draws the generators made anyway.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from data_lib.dataset import register_dataset, Dataset, check_nonnegative, check_positive, seeded_generator
from models import GaussianMixture, random_mixture, ring_mixture

Tensor = torch.Tensor


@dataclasses.dataclass
class _RingOptions:
    n_modes: int = 8        # equal-weight isotropic Gaussians, evenly spaced on the circle
    radius: float = 4.0     # distance of every mode's mean from the origin
    std: float = 0.3        # standard deviation of each mode, per coordinate

    def validate(self):
        check_positive("n_modes", self.n_modes)
        check_positive("radius", self.radius)
        check_positive("std", self.std)


def _mixture_dataset(name: str, mixture: GaussianMixture, n_train: int, n_test: int, seed: int) -> Dataset:
    """Exact draws of ``mixture``, labelled by their component (classes "0".."K−1", index = component)."""
    train, train_labels = mixture.sample(n_train, generator=seeded_generator(seed, 0))
    test, test_labels = mixture.sample(n_test, generator=seeded_generator(seed, 1))
    classes = tuple(str(k) for k in range(len(mixture.weights)))
    return Dataset(name, train, test, mixture=mixture, train_labels=train_labels, test_labels=test_labels,
                   classes=classes)


@register_dataset("ring", _RingOptions)
def _load_ring(opts: _RingOptions, n_train: int, n_test: int, seed: int) -> Dataset:
    """Exact draws of ``models.ring_mixture``; ``Dataset.mixture`` is that mixture."""
    return _mixture_dataset("ring", ring_mixture(opts.n_modes, opts.radius, opts.std), n_train, n_test, seed)


@dataclasses.dataclass
class _Mix16dOptions:
    dim: int = 16           # dimension of the data
    n_modes: int = 5        # Gaussians with random full covariances
    mixture_seed: int = 0   # fixes the mixture itself (the data draws follow the run's seed)

    def validate(self):
        check_positive("dim", self.dim)
        check_positive("n_modes", self.n_modes)
        check_nonnegative("mixture_seed", self.mixture_seed)


@register_dataset("mix16d", _Mix16dOptions)
def _load_mix16d(opts: _Mix16dOptions, n_train: int, n_test: int, seed: int) -> Dataset:
    """Exact draws of ``models.random_mixture``; ``Dataset.mixture`` is that mixture."""
    return _mixture_dataset("mix16d", random_mixture(opts.dim, opts.n_modes, seed=opts.mixture_seed),
                            n_train, n_test, seed)


@dataclasses.dataclass
class _SwissRollOptions:
    noise: float = 0.2      # std of the isotropic Gaussian noise, in output units (after the /5)

    def validate(self):
        check_nonnegative("noise", self.noise)


@dataclasses.dataclass
class _MoonsOptions:
    noise: float = 0.1      # std of the isotropic Gaussian noise, in output units (after the ×2)

    def validate(self):
        check_nonnegative("noise", self.noise)


@dataclasses.dataclass
class _CheckerboardOptions:
    def validate(self):
        pass


def _swiss_roll(n: int, noise: float, g: torch.Generator) -> Tensor:
    """x = t·(cos t, sin t)/5 + noise·ε with t ~ U[1.5π, 4.5π]: a spiral of 1.5 turns.

    Dividing by 5 gives a per-coordinate std of about 1.3–1.4 (mean ≈ (0.4, 0.04)); noise 0.2 is
    the customary noise 1.0 before that scaling.
    """
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    x = torch.stack([t * t.cos(), t * t.sin()], dim=1) / 5
    return (x + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()


def _moons(n: int, noise: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two interleaved half circles, each drawn with probability ½, centred and doubled; (x, label).

    Upper moon (cos θ, sin θ), lower moon (1 − cos θ, ½ − sin θ), θ ~ U[0, π]; then
    x = 2·(p − (½, ¼)) + noise·ε, so the moons have radius 2, centres (−1, −½) and (1, ½), and a
    per-coordinate std of about 1.7 and 1.0. The label is scikit-learn's: 0 upper, 1 lower.
    """
    theta = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    upper = torch.rand(n, generator=g, dtype=torch.float64) < 0.5
    p = torch.where(upper[:, None], torch.stack([theta.cos(), theta.sin()], dim=1),
                    torch.stack([1 - theta.cos(), 0.5 - theta.sin()], dim=1))
    x = 2 * (p - torch.tensor([0.5, 0.25], dtype=torch.float64))
    return (x + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)).float(), (~upper).long()


def _checkerboard(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Uniform on the 8 squares (i, j) with i + j even of a 4×4 board of 2×2 squares over [−4, 4]²; (x, label).

    The density is 1/32 on those squares (entropy log 32 nats); each marginal is U[−4, 4] (std ≈ 2.3).
    The label is the square, 2·col + row // 2 (col, row ∈ 0..3 from the left and the bottom), named
    "col,row" in ``CHECKERBOARD_CLASSES``.
    """
    col = torch.randint(0, 4, (n,), generator=g)
    # Every column holds two filled squares, rows of the column's parity.
    row = 2 * torch.randint(0, 2, (n,), generator=g) + col % 2
    corner = torch.stack([col, row], dim=1).double() * 2 - 4
    return (corner + 2 * torch.rand(n, 2, generator=g, dtype=torch.float64)).float(), 2 * col + row // 2


#: The checkerboard's classes: its filled squares "col,row", index = 2·col + row // 2.
CHECKERBOARD_CLASSES = tuple(f"{k // 2},{2 * (k % 2) + (k // 2) % 2}" for k in range(8))
#: The moons' classes, index = scikit-learn's label.
MOONS_CLASSES = ("upper", "lower")


def _labelled(name: str, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], classes: tuple[str, ...]) -> Dataset:
    return Dataset(name, train[0], test[0], train_labels=train[1], test_labels=test[1], classes=classes)


@register_dataset("swiss_roll", _SwissRollOptions)
def _load_swiss_roll(opts: _SwissRollOptions, n_train: int, n_test: int, seed: int) -> Dataset:
    return Dataset("swiss_roll", _swiss_roll(n_train, opts.noise, seeded_generator(seed, 0)),
                   _swiss_roll(n_test, opts.noise, seeded_generator(seed, 1)))


@register_dataset("moons", _MoonsOptions)
def _load_moons(opts: _MoonsOptions, n_train: int, n_test: int, seed: int) -> Dataset:
    return _labelled("moons", _moons(n_train, opts.noise, seeded_generator(seed, 0)),
                     _moons(n_test, opts.noise, seeded_generator(seed, 1)), MOONS_CLASSES)


@register_dataset("checkerboard", _CheckerboardOptions)
def _load_checkerboard(opts: _CheckerboardOptions, n_train: int, n_test: int, seed: int) -> Dataset:
    return _labelled("checkerboard", _checkerboard(n_train, seeded_generator(seed, 0)),
                     _checkerboard(n_test, seeded_generator(seed, 1)), CHECKERBOARD_CLASSES)
