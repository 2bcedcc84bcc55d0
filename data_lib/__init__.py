"""The data side of training: generated toy sets, bundled digits, the user's arrays; dequantisation.

Public API::

    data_lib.load_dataset(name, n_train=50_000, n_test=5_000, seed=0, **options) -> Dataset
    data_lib.AVAILABLE            # ("ring", "mix16d", "swiss_roll", "moons", "checkerboard", "digits", "array")
    data_lib.dequantize(x, levels, data_range, generator=None)
    data_lib.Dataset, data_lib.DataError

Nothing is downloaded: data are generated, or read from scikit-learn's bundled files or the user's.
"""
from data_lib.dataset import DataError, Dataset
from data_lib.load import AVAILABLE, DATASETS, load_dataset
from data_lib.quantization import dequantize

__all__ = ["load_dataset", "AVAILABLE", "DATASETS", "Dataset", "DataError", "dequantize"]
