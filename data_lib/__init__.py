"""The data side of training: generated toy sets, bundled digits, the user's arrays and images, CIFAR-10,
MNIST; dequantisation.

Public API::

    data_lib.load_dataset(name, n_train=50_000, n_test=5_000, seed=0, **options) -> Dataset
    data_lib.AVAILABLE            # ("ring", "mix16d", "swiss_roll", "moons", "checkerboard", "digits", "array",
                                  #  "image_folder", "cifar10", "mnist")
    data_lib.dequantize(x, levels, data_range, generator=None)
    data_lib.Dataset, data_lib.DataError

Nothing is downloaded unless asked: data are generated, or read from scikit-learn's bundled files or
the user's; CIFAR-10 and MNIST are fetched only with ``download=True`` (``data.download=true``).
"""
from core_lib import import_submodules
from data_lib import toy, stored  # noqa: F401  (register their data sets, in this order)
from data_lib.dataset import DATASETS, DataError, Dataset, register_dataset
from data_lib.load import load_dataset
from data_lib.quantization import dequantize

import_submodules("data_lib")   # any other module of this package registers its data sets too
AVAILABLE: tuple[str, ...] = tuple(DATASETS)

__all__ = ["load_dataset", "AVAILABLE", "DATASETS", "register_dataset", "Dataset", "DataError", "dequantize"]
