"""Finite data sets held in arrays: scikit-learn's bundled digits and the user's own .npy/.npz file.

The whole set is split into train and test by a permutation drawn from the seed
(``dataset.split_rows``), so ``n_train`` and ``n_test`` do not apply. Digits are labelled by their
digit (classes "0".."9"); an array by the integer array ``labels_key`` names in its .npz archive, if given.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from data_lib.dataset import (DataError, Dataset, register_dataset, check_data_range, check_fraction, check_levels,
                              split_rows)

Tensor = torch.Tensor

_DIGIT_LEVELS = 17          # sklearn's digits: 4×4 blocks of a 32×32 bitmap counted, values 0..16


@dataclasses.dataclass
class _DigitsOptions:
    data_range: tuple[float, float] = (0.0, 1.0)   # interval the grey levels 0..16 are scaled onto
    test_fraction: float = 0.2                     # share of the 1797 images held out for test

    def validate(self):
        self.data_range = check_data_range(self.data_range)
        self.test_fraction = check_fraction("test_fraction", self.test_fraction)


@dataclasses.dataclass
class _ArrayOptions:
    path: str | os.PathLike | None = None          # required: a .npy file, or a .npz archive
    key: str | None = None                         # the array's name in a .npz (optional if it holds one)
    levels: int | None = None                      # K values per dimension, if the data are discrete
    data_range: tuple[float, float] | None = None  # (low, high) the levels span; default (0, 1) with levels
    test_fraction: float = 0.1                     # share of the rows held out for test
    labels_key: str | None = None                  # the (N,) integer class labels' name in the .npz (null: unlabelled)

    def validate(self):
        if self.path is None:
            raise DataError("dataset 'array' needs the option path= naming a .npy file or .npz archive.")
        if self.levels is not None:
            self.levels = check_levels(self.levels)
            if self.data_range is None:
                # The default of solvers.bits_per_dim, stored so that dequantize sees it too.
                self.data_range = (0.0, 1.0)
        if self.data_range is not None:
            self.data_range = check_data_range(self.data_range)
        self.test_fraction = check_fraction("test_fraction", self.test_fraction)
        if self.labels_key is not None and self.labels_key == self.key:
            raise DataError(f"data.labels_key={self.labels_key!r} names the samples' own array (data.key); name the "
                            "array of class labels.")


def _split(x: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, test): a seeded permutation of the rows of x, the first round(f·N) held out (1 to N−1).

    The same (f, seed, N) split any other array of N rows alike, so labels follow their samples."""
    train_rows, test_rows = split_rows(len(x), test_fraction, seed)
    return x[train_rows].contiguous(), x[test_rows].contiguous()


@register_dataset("digits", _DigitsOptions)
def _load_digits(opts: _DigitsOptions, n_train: int, n_test: int, seed: int) -> Dataset:
    """The 1797 8×8 digit images as (N, 1, 8, 8), grey level v ∈ {0..16} mapped to lo + v/16·(hi − lo)."""
    # Imported here: scikit-learn takes a second to import and only this loader needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images                                                  # (1797, 8, 8), float64
    lo, hi = opts.data_range
    x = torch.from_numpy(images / (_DIGIT_LEVELS - 1) * (hi - lo) + lo).float()[:, None]
    train, test = _split(x, opts.test_fraction, seed)
    train_labels, test_labels = _split(torch.from_numpy(bunch.target).long(), opts.test_fraction, seed)
    return Dataset("digits", train, test, levels=_DIGIT_LEVELS, data_range=(lo, hi), train_labels=train_labels,
                   test_labels=test_labels, classes=tuple(str(d) for d in range(10)))


@register_dataset("array", _ArrayOptions)
def _load_array(opts: _ArrayOptions, n_train: int, n_test: int, seed: int) -> Dataset:
    """The array in ``opts.path``, checked, as float32, split by a seeded permutation."""
    path = Path(opts.path)
    array = _check_array(_read_array(path, opts.key, opts.labels_key), path)
    if opts.levels is not None:
        lo, hi = opts.data_range
        if array.min() < lo or array.max() > hi:
            raise DataError(f"'{path}' holds values in [{array.min():g}, {array.max():g}], outside "
                            f"data_range ({lo:g}, {hi:g}) that levels={opts.levels} refers to; "
                            f"pass the data_range the levels are scaled to.")
    train, test = _split(torch.from_numpy(array), opts.test_fraction, seed)
    if opts.labels_key is None:
        return Dataset("array", train, test, levels=opts.levels, data_range=opts.data_range)
    labels = _check_labels(_read_array(path, opts.labels_key, opts.labels_key), len(array), path, opts.labels_key)
    train_labels, test_labels = _split(torch.from_numpy(labels), opts.test_fraction, seed)
    return Dataset("array", train, test, levels=opts.levels, data_range=opts.data_range, train_labels=train_labels,
                   test_labels=test_labels, classes=tuple(str(k) for k in range(int(labels.max()) + 1)))


def _check_labels(labels: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    """``labels`` as int64 of shape (n,) with values in [0, K), K = max + 1 (classes "0".."K−1"), or DataError."""
    where = f"data.labels_key={key}: '{path}'[{key!r}]"
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where} has dtype {labels.dtype}; class labels must be integers 0..K-1 (save "
                        f"labels.astype(numpy.int64)).")
    if labels.shape != (n,):
        raise DataError(f"{where} has shape {labels.shape}; it must hold one label per sample, shape ({n},).")
    if labels.min() < 0 or labels.max() >= 2**31:
        raise DataError(f"{where} holds labels in [{labels.min()}, {labels.max()}]; class labels must be integers "
                        f"0..K-1 (K the number of classes).")
    return labels.astype(np.int64)


def _read_array(path: Path, key: str | None, labels_key: str | None = None) -> np.ndarray:
    """The array stored in a .npy file, or under ``key`` in a .npz archive; never unpickles.

    Without ``key``, a .npz must hold one array, or two when one of them is ``labels_key``: the other is the data.
    """
    if path.suffix.lower() not in (".npy", ".npz"):
        raise DataError(f"'{path}' has extension '{path.suffix}'; the 'array' dataset reads a .npy file "
                        f"(numpy.save) or a .npz archive (numpy.savez).")
    if not path.is_file():
        raise DataError(f"file not found: '{path}' (relative paths start from {os.getcwd()}); check "
                        f"the path option.")
    with open(path, "rb") as f:
        magic = f.read(6)
    # Without this check numpy would take any other file for a pickle and blame "object data".
    if magic != np.lib.format.MAGIC_PREFIX and not magic.startswith(b"PK"):
        raise DataError(f"'{path}' is not a NumPy .npy file or .npz archive (no NumPy or zip header); "
                        f"save the array with numpy.save or numpy.savez.")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            if key is not None:
                option = "labels_key" if key == labels_key else "key"
                raise DataError(f"option {option}={key!r} applies to .npz archives, but '{path}' holds a single "
                                f"array; drop the {option} option, or save the samples and their labels together "
                                f"with numpy.savez(FILE, x=..., y=...).")
            return loaded
        with loaded:
            names = list(loaded.files)
            if key is None:
                if labels_key in names and len(names) == 2:
                    names.remove(labels_key)
                if len(names) != 1:
                    listed = ", ".join(map(repr, names)) or "none"
                    raise DataError(f"'{path}' holds {len(names)} arrays ({listed}); choose one with the "
                                    f"key option.")
                key = names[0]
            elif key not in names:
                raise DataError(f"no array {key!r} in '{path}'; available keys: "
                                f"{', '.join(map(repr, names)) or 'none'}.")
            return loaded[key]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        if str(error).startswith("Object arrays cannot be loaded"):
            raise DataError(f"'{path}' holds an array of Python objects (dtype object), not numbers; "
                            f"save a numeric array.") from error
        raise DataError(f"could not read '{path}' ({type(error).__name__}: {error}); the file may be "
                        f"truncated or corrupt, so save it again with numpy.save or numpy.savez.") from error


def _check_array(array: np.ndarray, path: Path) -> np.ndarray:
    """``array`` as float32 of shape (N, ...) with N >= 2 finite rows, or DataError saying what is wrong."""
    if array.dtype.kind not in "biuf":
        raise DataError(f"'{path}' holds an array of non-numeric dtype {array.dtype}; save a real-valued "
                        f"(float, integer or bool) array.")
    if array.ndim < 2:
        raise DataError(f"'{path}' holds an array of shape {array.shape}; expected an array of shape "
                        f"(N, ...) with N samples (for N scalars, save x[:, None]).")
    if len(array) < 2:
        raise DataError(f"'{path}' holds {len(array)} sample(s); at least 2 are needed to split into "
                        f"train and test.")
    values = array.astype(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(f"'{path}' holds {int(bad.sum())} NaN or inf value(s), the first at index "
                        f"{tuple(int(i) for i in np.argwhere(bad)[0])}; remove or replace them.")
    with np.errstate(over="ignore"):
        values = values.astype(np.float32)
    if not np.isfinite(values).all():
        raise DataError(f"'{path}' holds values beyond the float32 range (|x| > 3.4e38); rescale them.")
    return values
