"""`load_dataset`, the one way to get a :class:`Dataset` from the registry ``DATASETS``."""
from __future__ import annotations

import dataclasses

from core_lib import build_options
from data_lib.dataset import DATASETS, DataError, Dataset, _is_int

__all__ = ["load_dataset"]


def load_dataset(name: str, n_train: int = 50_000, n_test: int = 5_000, seed: int = 0, hflip: bool = False,
                 num_workers: int = 0, **options) -> Dataset:
    """Load data set ``name`` with its train/test split; the same seed gives the same tensors.

    Data sets and their options (defaults in brackets):

    - ``"ring"``: ``models.ring_mixture``, 2-D, ``mixture`` set (exact density).
      n_modes [8], radius [4.0], std [0.3].
    - ``"mix16d"``: ``models.random_mixture`` (16-D, 5 full-covariance Gaussians), ``mixture`` set.
      dim [16], n_modes [5], mixture_seed [0].
    - ``"swiss_roll"``: t·(cos t, sin t)/5 + noise, t ~ U[1.5π, 4.5π]; std ≈ 1.3 per coordinate.
      noise [0.2].
    - ``"moons"``: two half circles of radius 2 (sklearn's moons, centred, ×2); std ≈ (1.7, 1.0).
      noise [0.1].
    - ``"checkerboard"``: uniform on the alternating 2×2 squares of a 4×4 board over [−4, 4]². No options.
    - ``"digits"``: scikit-learn's 1797 8×8 digits as (N, 1, 8, 8), grey level v ∈ {0..16} scaled
      to lo + v/16·(hi − lo); levels = 17. data_range [(0.0, 1.0)], test_fraction [0.2].
    - ``"array"``: the user's .npy file or .npz archive of shape (N, ...).
      path [required], key [None: the only array of a .npz], levels [None],
      data_range [None; (0.0, 1.0) when levels is given], test_fraction [0.1].

    Generated sets (ring, swiss_roll, moons, checkerboard) draw ``n_train`` and ``n_test`` samples
    from two independent streams of the seed, so the test set does not depend on n_train. Finite
    sets (digits, array) ignore ``n_train``/``n_test``: the whole set is split by a seeded
    permutation, round(test_fraction·N) rows to test.

    Args:
        name: one of ``data_lib.AVAILABLE`` (the keys of ``DATASETS``).
        n_train, n_test: positive sample counts for the generated sets.
        seed: non-negative int.
        hflip: flip training batches left-right at random (images (C, H, W) only).
        num_workers: DataLoader worker processes that prepare training batches (0: in the training process).
        **options: the data set's options above.

    Returns:
        :class:`Dataset` with float32 ``train`` (N_train, *event_shape) and ``test`` (N_test, *event_shape).

    Raises:
        DataError: unknown name or option, bad counts or seed, bad file or array.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}.")
    for arg, value in (("n_train", n_train), ("n_test", n_test)):
        if not _is_int(value) or value < 1:
            raise DataError(f"{arg} must be a positive integer, got {value!r}.")
    if not _is_int(seed) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}.")
    if not isinstance(hflip, bool):
        raise DataError(f"data.hflip must be true or false, got {hflip!r}.")
    if not _is_int(num_workers) or num_workers < 0:
        raise DataError(f"data.num_workers must be an integer >= 0, got {num_workers!r}.")
    options_cls, load = DATASETS[name]
    data = load(build_options(options_cls, options, f"dataset '{name}'", DataError), int(n_train), int(n_test), int(seed))
    if hflip or num_workers:
        data = dataclasses.replace(data, hflip=hflip, num_workers=int(num_workers))
    return data
