"""The :class:`Dataset` bundle, the :class:`DataError` every bad input raises, and the checks and
seeded generators the loaders share."""
from __future__ import annotations

import dataclasses
import math
import numbers
import typing

import numpy as np
import torch

from core_lib import UserError, value_matches
from models import GaussianMixture

Tensor = torch.Tensor

__all__ = ["Dataset", "DataError", "DATASETS", "register_dataset"]


class DataError(UserError):
    """Bad data: wrong shape, NaN/inf, unreadable file, unknown dataset name or option."""


@dataclasses.dataclass
class Dataset:
    """Train and test samples of one data set, with what is known about its distribution.

    Attributes:
        name: the registry name it was loaded under (``data_lib.AVAILABLE``).
        train: (N_train, *event_shape) samples: float32 values, or uint8 level indices k (8-bit images,
            kept as bytes in memory: CIFAR-10's 50 000 images take 154 MB instead of 614 MB). Read
            values through :meth:`decode` (``decode(train[idx])``), which maps k to lo + k·w/(K−1).
        test: (N_test, *event_shape) samples like ``train``, drawn independently of it (generated
            sets), the held-out rows of a seeded permutation (finite sets) or the official test split.
        levels: K, the number of discrete values per dimension when the data are discrete (digits:
            17); None for continuous data. With ``data_range`` it fixes the bits/dim offset
            log₂(K/w) (``solvers.bits_per_dim``) and the bins of :func:`data_lib.dequantize`.
        data_range: (low, high), the interval of width w = high − low the K levels are scaled to:
            level k sits at low + k·w/(K−1).
        mixture: the exact distribution when it is a Gaussian mixture (ring), for exact scores and
            log-densities (``models.MixtureScore``); None otherwise.
        train_labels, test_labels: (N,) int64 class labels in [0, len(classes)), or None (unlabelled).
        classes: the class names, index = label (digits: "0".."9"; ring, mix16d: the component "0".."K−1";
            moons: "upper", "lower"; an image folder: its sub-folders); None for unlabelled data.
        hflip: training batches are flipped left-right at random (images only; ``data.hflip``).
        num_workers: DataLoader worker processes preparing training batches (``data.num_workers``).
    """

    name: str
    train: Tensor
    test: Tensor
    levels: int | None = None
    data_range: tuple[float, float] | None = None
    mixture: GaussianMixture | None = None
    train_labels: Tensor | None = None
    test_labels: Tensor | None = None
    classes: tuple[str, ...] | None = None
    hflip: bool = False
    num_workers: int = 0

    def __post_init__(self):
        for split in ("train", "test"):
            x = getattr(self, split)
            if (not torch.is_tensor(x) or x.dtype not in (torch.float32, torch.uint8) or x.dim() < 2
                    or len(x) < 1):
                described = (f"{x.dtype} tensor of shape {tuple(x.shape)}" if torch.is_tensor(x)
                             else type(x).__name__)
                raise DataError(f"{split} must be a float32 tensor (or uint8 levels) of shape (N, ...) with N >= 1, "
                                f"got a {described}; convert it with torch.as_tensor(x, dtype=torch.float32).")
            if x.dtype == torch.float32 and not torch.isfinite(x).all():
                raise DataError(f"{split} holds NaN or inf values; remove or replace them.")
        if self.train.dtype != self.test.dtype:
            raise DataError(f"train and test differ in dtype ({self.train.dtype} vs {self.test.dtype}).")
        if self.train.shape[1:] != self.test.shape[1:]:
            raise DataError(f"train and test samples differ in shape: {tuple(self.train.shape[1:])} "
                            f"vs {tuple(self.test.shape[1:])}.")
        if self.levels is not None:
            self.levels = check_levels(self.levels)
        if self.data_range is not None:
            self.data_range = check_data_range(self.data_range)
        if self.mixture is not None and tuple(self.mixture.event_shape) != self.event_shape:
            raise DataError(f"the mixture's event shape {self.mixture.event_shape} differs from the "
                            f"data's {self.event_shape}.")
        if self.encoded:
            if self.levels is None or self.data_range is None or self.levels > 256:
                raise DataError("uint8 samples are level indices: give levels (<= 256) and the data_range they "
                                "are scaled to.")
            top = max(int(self.train.max()), int(self.test.max()))
            if top >= self.levels:
                raise DataError(f"uint8 samples hold level {top}, beyond levels={self.levels}.")
        self._check_labels()
        if self.hflip and len(self.event_shape) != 3:
            raise DataError(f"data.hflip flips images of shape (C, H, W); these samples have shape {self.event_shape}: "
                            "set data.hflip=false.")
        if not _is_int(self.num_workers) or self.num_workers < 0:
            raise DataError(f"data.num_workers must be an integer >= 0, got {self.num_workers!r}.")

    def _check_labels(self) -> None:
        given = [self.train_labels is not None, self.test_labels is not None]
        if any(given) and not all(given):
            raise DataError("give labels for both splits (train_labels and test_labels) or for neither.")
        if not all(given):
            return
        if self.classes is None:
            raise DataError("labelled data need their class names: give classes, one name per label value.")
        for split in ("train", "test"):
            y, x = getattr(self, f"{split}_labels"), getattr(self, split)
            if not torch.is_tensor(y) or y.dtype != torch.int64 or y.shape != (len(x),):
                raise DataError(f"{split}_labels must be an int64 tensor of shape ({len(x)},), one label per sample.")
            bound = len(self.classes) if self.classes is not None else None
            if len(y) and (int(y.min()) < 0 or (bound is not None and int(y.max()) >= bound)):
                raise DataError(f"{split}_labels must lie in [0, {bound or 'K'}), got [{int(y.min())}, {int(y.max())}].")

    @property
    def num_classes(self) -> int:
        """K, the number of classes of labelled data; 0 for unlabelled data (as ``model.num_classes=0``)."""
        return len(self.classes) if self.classes is not None and self.train_labels is not None else 0

    @property
    def encoded(self) -> bool:
        """Whether the samples are stored as uint8 level indices (read them through :meth:`decode`)."""
        return self.train.dtype == torch.uint8

    def decode(self, x: Tensor) -> Tensor:
        """Samples as float32 values: uint8 level k becomes lo + k·w/(K−1) (the levels' grid over
        ``data_range``, what :func:`data_lib.dequantize` expects); float samples pass through."""
        if x.dtype != torch.uint8:
            return x
        lo, hi = self.data_range
        return x.to(torch.float32) * ((hi - lo) / (self.levels - 1)) + lo

    def test_points(self, n: int | None = None) -> Tensor:
        """The first ``n`` (all: None) test samples as float32 values."""
        return self.decode(self.test[:n])

    def train_std(self, chunk: int = 256) -> float:
        """The standard deviation of all training values (float64 sums over chunks: no float copy of the set)."""
        total = total_sq = 0.0
        for start in range(0, len(self.train), chunk):
            x = self.decode(self.train[start:start + chunk]).double()
            total += x.sum().item()
            total_sq += x.pow(2).sum().item()
        n = self.train.numel()
        mean = total / n
        return math.sqrt(max(total_sq / n - mean * mean, 0.0) * n / max(n - 1, 1))

    def train_covariance(self, chunk: int = 256) -> Tensor:
        """The (D, D) covariance of the training samples, flattened (float64 sums over chunks), D = prod(event_shape);
        computed once per data set (training's evaluations ask for it again)."""
        cached = self.__dict__.get("_train_covariance")
        if cached is not None:
            return cached
        d = math.prod(self.event_shape)
        total, outer = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
        for start in range(0, len(self.train), chunk):
            x = self.decode(self.train[start:start + chunk]).double().flatten(1)
            total += x.sum(0)
            outer += x.T @ x
        n = len(self.train)
        mean = total / n
        self.__dict__["_train_covariance"] = (outer - n * torch.outer(mean, mean)) / max(n - 1, 1)
        return self.__dict__["_train_covariance"]

    @property
    def event_shape(self) -> tuple[int, ...]:
        """The shape of one sample, e.g. (2,) for the toy sets, (1, 8, 8) for digits."""
        return tuple(self.train.shape[1:])

    def entropy(self) -> float | None:
        """Differential entropy −E log p(x) in nats of the exact distribution, None if unknown.

        A Monte-Carlo estimate over 200 000 exact draws (``GaussianMixture.entropy_mc``; its
        standard error is about 0.002 nats for the 2-D ring).
        """
        return None if self.mixture is None else self.mixture.entropy_mc()


def check_levels(levels: typing.Any) -> int:
    """``levels`` as an int >= 2, or DataError."""
    if not _is_int(levels) or levels < 2:
        raise DataError(f"levels must be an integer >= 2 (the number of values per dimension), got {levels!r}.")
    return int(levels)


def check_data_range(data_range: typing.Any) -> tuple[float, float]:
    """``data_range`` as (low, high) floats with high > low, or DataError."""
    if (not value_matches(data_range, tuple[float, float])
            or not np.isfinite(data_range).all() or not data_range[1] > data_range[0]):
        raise DataError(f"data_range must be (low, high) with finite low < high, got {data_range!r}.")
    return float(data_range[0]), float(data_range[1])


def check_fraction(name: str, value: float) -> float:
    if not 0.0 < value < 1.0:
        raise DataError(f"{name} must be strictly between 0 and 1, got {value!r}.")
    return float(value)


def check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise DataError(f"{name} must be a finite positive number, got {value!r}.")


def check_nonnegative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise DataError(f"{name} must be a finite number >= 0, got {value!r}.")


def seeded_generator(seed: int, stream: int) -> torch.Generator:
    """A torch generator for stream ``stream`` of ``seed``: 0 train draws, 1 test draws, 2 split.

    numpy's SeedSequence hashes (seed, stream), so every pair gets an unrelated stream; with
    plain offsets (seed for train, seed + 1 for test) seed s's test set would be seed s+1's train set.
    """
    state = np.random.SeedSequence(seed, spawn_key=(stream,)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def split_rows(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train rows, test rows) of a finite set of n samples: a permutation drawn from the seed
    (``seeded_generator(seed, 2)``), the first round(f·n) held out, at least 1 and at most n − 1."""
    n_test = min(max(round(test_fraction * n), 1), n - 1)
    perm = torch.randperm(n, generator=seeded_generator(seed, 2))
    return perm[n_test:], perm[:n_test]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


#: The data-set registry: name -> (options dataclass with the defaults, loader(options, n_train, n_test, seed)).
DATASETS: dict[str, tuple[type, typing.Callable[..., Dataset]]] = {}


def register_dataset(name: str, options_cls: type):
    """Decorator registering ``loader(options, n_train, n_test, seed) -> Dataset`` as data set ``name``.

    A new data set is one module of ``data_lib`` holding its options dataclass and its decorated
    loader, plus ``conf/data/<name>.yaml``.
    """
    def decorate(loader):
        DATASETS[name] = (options_cls, loader)
        return loader
    return decorate
