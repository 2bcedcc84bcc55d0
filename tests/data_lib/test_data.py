"""Tests for ``data_lib``: every data set's shape, reproducibility and distribution, the array
loader's errors, and dequantisation against the bits/dim of a uniform K-ary variable."""
from __future__ import annotations

import io
import math

import numpy as np
import pathlib

import pytest
import torch
from torch.testing import assert_close

import solvers
from core_lib import UserError
from data_lib import AVAILABLE, DataError, Dataset, dequantize, load_dataset

GENERATED = ("ring", "swiss_roll", "moons", "checkerboard")
SMALL = dict(n_train=2_000, n_test=500)


def _load(name: str, seed: int = 0, **options) -> Dataset:
    """A small instance of ``name`` (the array set reads a fixed file written by the fixture)."""
    return load_dataset(name, seed=seed, **SMALL, **options)


@pytest.fixture
def array_file(tmp_path):
    """A (40, 3, 2) float64 array of distinct rows saved as .npy."""
    path = tmp_path / "data.npy"
    np.save(path, np.random.default_rng(0).normal(size=(40, 3, 2)))
    return path


def _options(name: str, array_file) -> dict:
    return {"path": array_file} if name == "array" else {}


# --- Every data set -----------------------------------------------------------------------------


def test_available_matches_the_registry():
    assert {"ring", "mix16d", "swiss_roll", "moons", "checkerboard", "digits", "array"} <= set(AVAILABLE)
    # Every registered data set has its config file, and every config file names a registered data set.
    conf = pathlib.Path(__file__).resolve().parents[2] / "conf" / "data"
    assert {p.stem for p in conf.glob("*.yaml")} == set(AVAILABLE)


@pytest.mark.parametrize("name,event_shape,sizes", [
    ("ring", (2,), (2_000, 500)), ("swiss_roll", (2,), (2_000, 500)), ("moons", (2,), (2_000, 500)),
    ("checkerboard", (2,), (2_000, 500)),
    ("digits", (1, 8, 8), (1797 - 359, 359)),            # round(0.2·1797) = 359 held out
    ("array", (3, 2), (36, 4)),                          # round(0.1·40) = 4 held out
])
def test_shapes_and_dtypes(name, event_shape, sizes, array_file):
    data = _load(name, **_options(name, array_file))
    assert data.name == name
    assert data.event_shape == event_shape
    assert (len(data.train), len(data.test)) == sizes
    assert data.train.shape[1:] == data.test.shape[1:] == event_shape
    assert data.train.dtype == data.test.dtype == torch.float32
    assert torch.isfinite(data.train).all() and torch.isfinite(data.test).all()


#: Image sets read files the tests write (tests/data_lib/test_images.py); CIFAR-10's and MNIST's splits are fixed.
FILE_FREE = [name for name in AVAILABLE if name not in ("image_folder", "cifar10", "mnist")]


@pytest.mark.parametrize("name", FILE_FREE)
def test_same_seed_same_tensors_other_seed_other_tensors(name, array_file):
    opts = _options(name, array_file)
    a, b, c = _load(name, seed=3, **opts), _load(name, seed=3, **opts), _load(name, seed=4, **opts)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert not torch.equal(a.train, c.train) and not torch.equal(a.test, c.test)


@pytest.mark.parametrize("name", GENERATED)
def test_generated_train_and_test_are_disjoint_draws(name):
    data = _load(name)
    both = torch.cat([data.train, data.test])
    assert len(torch.unique(both, dim=0)) == len(both)
    # Independent streams: the test set does not depend on n_train, and seed s's test set is not
    # the train set of any nearby seed.
    more = load_dataset(name, n_train=3_000, n_test=500)
    assert torch.equal(more.test, data.test)
    for seed in range(1, 4):
        assert not torch.equal(_load(name, seed=seed).train[:500], data.test)


@pytest.mark.parametrize("name", ["digits", "array"])
def test_finite_sets_split_the_whole_set_once(name, array_file):
    data = _load(name, **_options(name, array_file))
    if name == "array":
        full = torch.from_numpy(np.load(array_file)).float()
    else:
        from sklearn.datasets import load_digits
        full = torch.from_numpy(load_digits().images / 16).float()[:, None]
    # train ∪ test holds the same rows as the source, each as often: equal as multisets.
    rows, counts = torch.unique(torch.cat([data.train, data.test]).flatten(1), dim=0, return_counts=True)
    full_rows, full_counts = torch.unique(full.flatten(1), dim=0, return_counts=True)
    assert torch.equal(rows, full_rows) and torch.equal(counts, full_counts)


# --- Distributions ------------------------------------------------------------------------------


def test_ring_samples_have_the_mixture_moments_and_entropy():
    data = load_dataset("ring", n_train=50_000, n_test=5_000)
    mix = data.mixture
    assert mix is not None and mix.means.shape == (8, 2)
    assert_close(mix.means.norm(dim=1), torch.full((8,), 4.0, dtype=torch.float64))
    # Mean 0 and covariance (σ² + r²/2) I for ≥ 3 equal modes on a circle; tolerances ≈ 5 SE.
    x = data.train.double()
    assert_close(x.mean(0), torch.zeros(2, dtype=torch.float64), rtol=0, atol=0.07)
    assert_close(torch.cov(x.T), (0.3**2 + 4.0**2 / 2) * torch.eye(2, dtype=torch.float64), rtol=0, atol=0.15)
    # Modes 10σ apart barely overlap: H ≈ log 8 + H(N(0, σ² I₂)) = log 8 + 1 + log(2π σ²).
    assert data.entropy() == pytest.approx(math.log(8) + 1 + math.log(2 * math.pi * 0.09), abs=0.01)


def test_mix16d_draws_from_its_mixture():
    """mix16d is models.random_mixture: the data's mean and covariance are the mixture's."""
    data = load_dataset("mix16d", n_train=40_000, n_test=100, seed=2)
    mix = data.mixture
    assert data.event_shape == (16,) and mix.dim == 16
    mean = (mix.weights[:, None] * mix.means).sum(0)
    second = (mix.weights[:, None, None] * (mix.covariances() + mix.means[:, :, None] * mix.means[:, None, :])).sum(0)
    cov = second - mean[:, None] * mean[None, :]
    x = data.train.double()
    assert torch.allclose(x.mean(0), mean, atol=5 * cov.diagonal().sqrt().max().item() / 200)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.05 * cov.diagonal().max().item())
    other = load_dataset("mix16d", n_train=10, n_test=10, seed=2, mixture_seed=1)
    assert not torch.equal(other.mixture.means, mix.means)


def test_ring_options_reach_the_mixture():
    data = _load("ring", n_modes=3, radius=2, std=0.5)
    assert data.mixture.means.shape == (3, 2)
    assert_close(data.mixture.means.norm(dim=1), torch.full((3,), 2.0, dtype=torch.float64))
    assert_close(data.mixture.eigvals, torch.full((3, 2), 0.25, dtype=torch.float64))


def test_continuous_sets_without_a_known_density_have_no_entropy():
    for name in ("swiss_roll", "moons", "checkerboard"):
        data = _load(name)
        assert data.mixture is None and data.entropy() is None and data.levels is None


def test_noiseless_swiss_roll_lies_on_its_spiral():
    x = _load("swiss_roll", noise=0).train.double() * 5
    t = x.norm(dim=1)                                    # |t (cos t, sin t)| = t
    assert t.min() >= 1.5 * math.pi - 1e-4 and t.max() <= 4.5 * math.pi + 1e-4
    assert_close(x, torch.stack([t * t.cos(), t * t.sin()], dim=1), rtol=0, atol=1e-4)


def test_noiseless_moons_lie_on_two_half_circles():
    x = _load("moons", noise=0).train.double()
    on_upper = ((x - torch.tensor([-1.0, -0.5], dtype=torch.float64)).norm(dim=1) - 2).abs() < 1e-5
    on_lower = ((x - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1) - 2).abs() < 1e-5
    assert (on_upper | on_lower).all()
    assert (x[on_upper, 1] >= -0.5 - 1e-5).all() and (x[on_lower, 1] <= 0.5 + 1e-5).all()
    # Each moon is chosen with probability ½ (binomial SE 0.011 for 2000 draws).
    assert abs(on_upper.double().mean().item() - 0.5) < 0.05


def test_checkerboard_is_uniform_on_the_alternating_squares():
    x = load_dataset("checkerboard", n_train=40_000, n_test=10).train
    assert x.min() >= -4 and x.max() <= 4
    col, row = ((x + 4) // 2).long().clamp(max=3).unbind(1)
    assert ((col + row) % 2 == 0).all()
    freq = torch.bincount(col * 4 + row, minlength=16).double() / len(x)
    filled = ((torch.arange(16) // 4 + torch.arange(16) % 4) % 2 == 0)
    # Each of the 8 squares has probability 1/8; the binomial SE is 0.0017.
    assert_close(freq[filled], torch.full((8,), 1 / 8, dtype=torch.float64), rtol=0, atol=0.008)


def test_digits_levels_and_range():
    data = _load("digits")
    assert data.levels == 17 and data.data_range == (0.0, 1.0)
    values = torch.unique(torch.cat([data.train, data.test]))
    assert_close(values, torch.arange(17, dtype=torch.float32) / 16)
    scaled = _load("digits", data_range=(-1, 1), test_fraction=0.5)
    assert scaled.data_range == (-1.0, 1.0) and len(scaled.test) == round(0.5 * 1797)
    assert_close(torch.unique(torch.cat([scaled.train, scaled.test])), torch.arange(17) / 8 - 1.0)


# --- The array loader ---------------------------------------------------------------------------


def test_array_from_npz_with_one_array_and_with_a_key(tmp_path):
    a = np.arange(30, dtype=np.int16).reshape(10, 3)
    np.savez(tmp_path / "one.npz", a)
    np.savez(tmp_path / "two.npz", x=a, y=-a)
    one = _load("array", path=tmp_path / "one.npz")
    two = load_dataset("array", path=str(tmp_path / "two.npz"), key="y", test_fraction=0.3)
    assert (len(one.train), len(one.test)) == (9, 1) and (len(two.train), len(two.test)) == (7, 3)
    assert one.train.dtype == torch.float32
    assert_close(torch.cat([two.train, two.test]).sum(0), -torch.from_numpy(a).float().sum(0))


def test_array_levels_and_range_pass_through(tmp_path):
    np.save(tmp_path / "q.npy", np.random.default_rng(0).integers(0, 4, size=(10, 2)) / 3)
    data = _load("array", path=tmp_path / "q.npy", levels=4)
    assert data.levels == 4 and data.data_range == (0.0, 1.0)
    plain = _load("array", path=tmp_path / "q.npy")
    assert plain.levels is None and plain.data_range is None
    dequantize(data.train, data.levels, data.data_range)          # on the grid: no error


def _nonfinite() -> np.ndarray:
    x = np.zeros((4, 3))
    x[1, 2], x[3, 0] = np.nan, -np.inf
    return x


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _write(path, content) -> None:
    """Save ``content`` at ``path``: an array with numpy.save, a dict with numpy.savez, raw bytes as
    they are; None writes nothing."""
    if isinstance(content, np.ndarray):
        np.save(path, content, allow_pickle=content.dtype == object)
    elif isinstance(content, dict):
        np.savez(path, **content)
    elif isinstance(content, bytes):
        path.write_bytes(content)


OK = np.ones((4, 2))
TWO = {"x": OK, "y": OK}


@pytest.mark.parametrize("filename,content,options,match", [
    ("absent.npy", None, {}, r"file not found: '.*absent\.npy'"),
    ("junk.npy", b"not an array", {}, r"is not a NumPy \.npy file or \.npz archive"),
    ("cut.npy", _npy_bytes(np.ones((10, 3)))[:-16], {}, r"could not read .*cut\.npy.* truncated or corrupt"),
    ("bad.npz", b"PK\x03\x04 broken zip", {}, r"could not read .*bad\.npz.*BadZipFile"),
    ("data.csv", b"1,2\n3,4\n", {}, r"extension '\.csv'; the 'array' dataset reads a \.npy file"),
    ("two.npz", TWO, {"key": "z"}, r"no array 'z' in .*; available keys: 'x', 'y'"),
    ("two.npz", TWO, {}, r"holds 2 arrays \('x', 'y'\); choose one with the key option"),
    ("flat.npy", np.ones(5), {}, r"shape \(5,\); expected an array of shape \(N, ...\) with N samples"),
    ("text.npy", np.array([["a", "b"], ["c", "d"]]), {}, r"non-numeric dtype <U1"),
    ("complex.npy", np.ones((3, 2), dtype=complex), {}, r"non-numeric dtype complex128"),
    ("objects.npy", np.array([[1, "a"], [None, 2]], dtype=object), {}, r"Python objects \(dtype object\)"),
    ("nan.npy", _nonfinite(), {}, r"holds 2 NaN or inf value\(s\), the first at index \(1, 2\)"),
    ("huge.npy", np.full((3, 2), 1e300), {}, r"beyond the float32 range"),
    ("single.npy", np.ones((1, 4)), {}, r"holds 1 sample\(s\); at least 2 are needed"),
    ("ok.npy", OK, {"key": "x"}, r"key='x' applies to \.npz archives"),
    ("ok.npy", OK, {"levels": 4, "data_range": (-1, 0)},
     r"outside data_range \(-1, 0\) that levels=4 refers to"),
    ("ok.npy", OK, {"levels": 1}, r"levels must be an integer >= 2"),
    ("ok.npy", OK, {"data_range": (1, 0)}, r"data_range must be \(low, high\)"),
    ("ok.npy", OK, {"test_fraction": 1.0}, r"test_fraction must be strictly between 0 and 1"),
    ("ok.npy", OK, {"kee": "x"},
     r"unknown option 'kee' for dataset 'array'; valid options: path, key, levels, data_range, test_fraction"),
])
def test_array_errors(tmp_path, filename, content, options, match):
    _write(tmp_path / filename, content)
    with pytest.raises(DataError, match=match):
        load_dataset("array", path=tmp_path / filename, **options)


def test_array_needs_a_path():
    with pytest.raises(DataError, match=r"dataset 'array' needs the option path="):
        load_dataset("array")


# --- load_dataset's arguments -------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "rings"},
     r"unknown dataset 'rings'; available: ring, mix16d, swiss_roll, moons, checkerboard, digits, array"),
    ({"name": "ring", "n_train": 0}, r"n_train must be a positive integer, got 0"),
    ({"name": "ring", "n_test": -5}, r"n_test must be a positive integer, got -5"),
    ({"name": "ring", "n_train": 10.0}, r"n_train must be a positive integer, got 10.0"),
    ({"name": "ring", "n_test": True}, r"n_test must be a positive integer, got True"),
    ({"name": "ring", "seed": -1}, r"seed must be a non-negative integer"),
    ({"name": "ring", "sigma": 0.1},
     r"unknown option 'sigma' for dataset 'ring'; valid options: n_modes, radius, std"),
    ({"name": "checkerboard", "noise": 0.1},
     r"unknown option 'noise' for dataset 'checkerboard'; valid options: none"),
    ({"name": "moons", "noise": -0.1}, r"noise must be a finite number >= 0"),
    ({"name": "swiss_roll", "noise": "low"},
     r"option 'noise' of dataset 'swiss_roll' must be a number, got 'low'"),
    ({"name": "ring", "n_modes": 2.5}, r"option 'n_modes' of dataset 'ring' must be int"),
    ({"name": "ring", "std": 0}, r"std must be a finite positive number"),
    ({"name": "ring", "radius": math.inf}, r"radius must be a finite positive number"),
    ({"name": "digits", "data_range": (0, 1, 2)},
     r"option 'data_range' of dataset 'digits' must be \(a number, a number\)"),
    ({"name": "digits", "test_fraction": 0}, r"test_fraction must be strictly between 0 and 1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(DataError, match=match):
        load_dataset(**kwargs)


def test_dataset_checks_what_it_is_given():
    x = torch.zeros(4, 2)
    with pytest.raises(DataError, match="train must be a float32 tensor"):
        Dataset("mine", x.double(), x)
    with pytest.raises(DataError, match="differ in shape"):
        Dataset("mine", x, torch.zeros(4, 3))
    with pytest.raises(DataError, match="NaN or inf"):
        Dataset("mine", x, torch.full((4, 2), float("nan")))
    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)


# --- Dequantisation -----------------------------------------------------------------------------


@pytest.mark.parametrize("levels,data_range", [(17, (0.0, 1.0)), (256, (-1.0, 1.0)), (5, (2.0, 5.0))])
def test_dequantized_uniform_data_give_log2_levels_bits_per_dim(levels, data_range):
    lo, hi = data_range
    w, D, n = hi - lo, 3, 40_000
    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, levels, (n, D), generator=g)
    x = (lo + k * w / (levels - 1)).float()
    y = dequantize(x, levels, data_range, generator=g)
    assert y.shape == x.shape and y.dtype == torch.float32
    # Level k lands in bin k, [lo + k w/K, lo + (k + 1) w/K]; the bins tile [lo, hi].
    assert torch.equal(((y.double() - lo) / w * levels).floor().long().clamp(max=levels - 1), k)
    assert y.min() >= lo and y.max() <= hi
    assert y.min() < lo + 0.001 * w and y.max() > hi - 0.001 * w
    # So y is uniform on [lo, hi]: ten equal-width bins each hold a tenth (binomial SE 0.0009).
    hist = torch.histc(y.double(), bins=10, min=lo, max=hi) / y.numel()
    assert_close(hist, torch.full((10,), 0.1, dtype=torch.float64), rtol=0, atol=0.005)
    # Its exact log-density is −D log w; the bits/dim offset turns that into log₂ K, the entropy
    # of a uniform K-ary variable in bits.
    logp = torch.full((n,), -D * math.log(w), dtype=torch.float64)
    bpd = solvers.bits_per_dim(logp, D, levels=levels, data_range=data_range)
    assert_close(bpd, torch.full((n,), math.log2(levels), dtype=torch.float64), rtol=1e-14, atol=0)


def test_dequantized_density_gives_the_discrete_probability():
    # For p(y) = P(k)·K/w on bin k (flat within bins, where Jensen's bound is tight) the bits/dim
    # of one dimension must equal −log₂ P(k) of the level y came from.
    levels, (lo, hi) = 4, (0.0, 2.0)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    k = torch.multinomial(probs, 1000, replacement=True, generator=g)
    y = dequantize((lo + k * (hi - lo) / (levels - 1)).double()[:, None], levels, (lo, hi), generator=g)
    bin_of_y = ((y[:, 0] - lo) / (hi - lo) * levels).floor().long()
    logp = (probs[bin_of_y] * levels / (hi - lo)).log()
    bpd = solvers.bits_per_dim(logp, 1, levels=levels, data_range=(lo, hi))
    assert_close(bpd, -probs[k].log2(), rtol=1e-12, atol=1e-12)


def test_dequantize_is_reproducible_and_refuses_off_grid_data():
    x = _load("digits").train[:64]
    a = dequantize(x, 17, (0.0, 1.0), generator=torch.Generator().manual_seed(5))
    b = dequantize(x, 17, (0.0, 1.0), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, x)
    with pytest.raises(DataError, match=r"not on the 17-level grid .* already dequantised"):
        dequantize(a, 17, (0.0, 1.0))
    with pytest.raises(DataError, match=r"not on the 17-level grid"):
        dequantize(x, 17, (0.5, 1.0))
    with pytest.raises(DataError, match=r"levels must be an integer >= 2"):
        dequantize(x, 1, (0.0, 1.0))
