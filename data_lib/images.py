"""8-bit image data sets: a folder of PNG/JPEG files, CIFAR-10 and MNIST in their official formats.

Images stay uint8 level indices k ∈ {0..255} in memory (``Dataset.train`` of shape (N, C, H, W));
``Dataset.decode`` maps k to lo + k·(hi − lo)/255 over ``data_range``, (−1, 1) by default (DDPM's
convention). Labels are kept for class-conditional work (``train_labels``, ``test_labels``, ``classes``).

Nothing is downloaded unless asked: with ``data.download=true`` the CIFAR-10 and MNIST loaders fetch
the official archives (the URLs and MD5 sums torchvision uses) into ``data.root``, checked before use.
Like the other finite sets, these ignore ``n_train`` and ``n_test``.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import os
import pickle
import shutil
import struct
import tempfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import torch

from core_lib import atomic_write
from data_lib.dataset import DataError, Dataset, check_data_range, check_fraction, register_dataset, split_rows

__all__ = ["IMAGE_EXTENSIONS", "CIFAR10_URL", "CIFAR10_MD5", "MNIST_MIRROR", "MNIST_MD5", "DOWNLOAD_TIMEOUT"]

log = logging.getLogger(__name__)

LEVELS = 256                                   # 8-bit images: level indices 0..255
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")   # what image_folder reads (any case)

#: The official archives and their MD5 sums (torchvision's); module constants so that tests can point elsewhere.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_MD5 = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}
DOWNLOAD_TIMEOUT = 30.0                        # seconds a connection or a read may stall before giving up

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801   # idx magic: 0x08 = unsigned bytes, then the number of dims


# --- Options --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _ImageFolderOptions:
    path: str | os.PathLike | None = None            # required: the folder; PNG/JPEG files, class sub-folders optional
    resolution: int | None = None                    # null: one size for all; N: shorter side to N, centre N×N
    channels: int = 3                                # 3: RGB, 1: greyscale (every image is converted)
    test_fraction: float = 0.1                       # share of the images held out for test (seeded)
    data_range: tuple[float, float] = (-1.0, 1.0)    # the interval the levels 0..255 are scaled onto

    def validate(self):
        if self.path is None:
            raise DataError("dataset 'image_folder' needs data.path= naming a folder of PNG or JPEG images.")
        if self.channels not in (1, 3):
            raise DataError(f"data.channels must be 3 (RGB) or 1 (greyscale), got {self.channels!r}.")
        if self.resolution is not None and self.resolution < 1:
            raise DataError(f"data.resolution must be null (keep the images' own size) or a positive number of "
                            f"pixels, got {self.resolution!r}.")
        self.test_fraction = check_fraction("data.test_fraction", self.test_fraction)
        self.data_range = check_data_range(self.data_range)


@dataclasses.dataclass
class _Cifar10Options:
    root: str | os.PathLike | None = None            # required: the folder that holds cifar-10-batches-py/
    split: Literal["train", "test"] = "test"         # the official split held out as Dataset.test
    download: bool = False                           # fetch the official archive into root if it is missing
    data_range: tuple[float, float] = (-1.0, 1.0)    # the interval the levels 0..255 are scaled onto

    def validate(self):
        _check_root("cifar10", self.root, f"{_CIFAR_DIR}/")
        self.data_range = check_data_range(self.data_range)


@dataclasses.dataclass
class _MnistOptions:
    root: str | os.PathLike | None = None            # required: the folder that holds MNIST/raw/
    split: Literal["train", "test"] = "test"         # the official split held out as Dataset.test
    download: bool = False                           # fetch the official files into root/MNIST/raw if missing
    resolution: int | None = None                    # null: 28×28; N >= 28: zero-padded to N×N, centred (32 is usual)
    data_range: tuple[float, float] = (-1.0, 1.0)    # the interval the levels 0..255 are scaled onto

    def validate(self):
        _check_root("mnist", self.root, "MNIST/raw/")
        if self.resolution is not None and self.resolution < 28:
            raise DataError(f"data.resolution for mnist pads the 28×28 digits with zeros, so it must be null or "
                            f">= 28 (32 is the usual choice), got {self.resolution!r}.")
        self.data_range = check_data_range(self.data_range)


def _check_root(name: str, root, holds: str) -> None:
    if root is None:
        raise DataError(f"dataset '{name}' needs data.root= naming the folder that holds {holds} (with "
                        f"data.download=true it is fetched into it).")


# --- image_folder ---------------------------------------------------------------------------------


@register_dataset("image_folder", _ImageFolderOptions)
def _load_image_folder(opts: _ImageFolderOptions, n_train: int, n_test: int, seed: int) -> Dataset:
    """Every PNG/JPEG file under ``opts.path`` as uint8 (N, C, H, W), split by a seeded permutation.

    Files are read recursively in sorted path order, so one folder gives the same tensors
    everywhere. Images in first-level sub-folders are labelled by that sub-folder (classes sorted by
    name, label = index); a folder without sub-folders holding images is unlabelled.
    """
    root = Path(opts.path)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "not found"
        raise DataError(f"data.path: '{root}' {what} (relative paths start from {os.getcwd()}); point data.path "
                        f"at a folder of PNG or JPEG images.")
    files = _image_files(root)
    if len(files) < 2:
        raise DataError(f"data.path: '{root}' holds {len(files)} image file(s) (read: "
                        f"{', '.join(IMAGE_EXTENSIONS)}, any case, in sub-folders too); at least 2 are needed to "
                        f"split into train and test.")
    labels, classes = _folder_labels(root, files)
    train_rows, test_rows = split_rows(len(files), opts.test_fraction, seed)
    # Where each image goes: row r of the split (test rows first), so that no copy of the set is ever made.
    slot = torch.empty(len(files), dtype=torch.int64)
    slot[torch.cat([test_rows, train_rows])] = torch.arange(len(files))
    n_held = len(test_rows)
    train = test = None
    first = None
    for i, file in enumerate(files):
        image = _read_image(file, opts.channels, opts.resolution)
        if first is None:
            first = (file, image.shape)
            train = np.empty((len(files) - n_held, *image.shape), dtype=np.uint8)
            test = np.empty((n_held, *image.shape), dtype=np.uint8)
        elif image.shape != first[1]:
            (h0, w0), (h1, w1) = first[1][1:], image.shape[1:]
            raise DataError(f"'{first[0]}' is {w0}×{h0} pixels but '{file}' is {w1}×{h1} (width×height); for images "
                            f"of several sizes set data.resolution=N (shorter side resized to N, then centre-cropped "
                            f"to N×N).")
        k = int(slot[i])
        if k < n_held:
            test[k] = image
        else:
            train[k - n_held] = image
    train_labels = test_labels = None
    if labels is not None:
        train_labels, test_labels = labels[train_rows], labels[test_rows]
    return Dataset("image_folder", torch.from_numpy(train), torch.from_numpy(test), levels=LEVELS,
                   data_range=opts.data_range, train_labels=train_labels, test_labels=test_labels, classes=classes)


def _image_files(root: Path) -> list[Path]:
    """The PNG/JPEG files under ``root`` (symlinks followed once; hidden files and folders skipped), sorted."""
    found, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:   # a symlink cycle, or one folder reached twice
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found += [Path(folder, n) for n in names
                  if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _folder_labels(root: Path, files: list[Path]) -> tuple[torch.Tensor | None, tuple[str, ...] | None]:
    """(labels, classes) from the first-level sub-folders, or (None, None) when every image sits in ``root``."""
    parts = [f.relative_to(root).parts for f in files]
    loose = [p[0] for p in parts if len(p) == 1]
    if len(loose) == len(files):
        return None, None
    if loose:
        folder = next(p[0] for p in parts if len(p) > 1)
        raise DataError(f"'{root}' holds images both directly (e.g. '{loose[0]}') and in sub-folders (e.g. "
                        f"'{folder}/'), which name the classes; move the loose images into a class sub-folder, or "
                        f"point data.path at a folder of unlabelled images only.")
    classes = tuple(sorted({p[0] for p in parts}))
    index = {name: k for k, name in enumerate(classes)}
    return torch.tensor([index[p[0]] for p in parts], dtype=torch.int64), classes


def _read_image(file: Path, channels: int, resolution: int | None) -> np.ndarray:
    """One PNG or JPEG file as uint8 (C, H, W): converted to RGB or L, resized and centre-cropped if asked."""
    from PIL import Image   # imported here: only this loader needs Pillow

    try:
        with Image.open(file, formats=("PNG", "JPEG")) as opened:
            opened.load()   # decodes every byte: a truncated or corrupt file fails here
            image = _convert(opened, channels)
        if resolution is not None:
            image = _resize_centre_crop(image, resolution)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as error:
        raise DataError(f"could not read image '{file}' ({_reason(error)}); it is corrupt, truncated or not a "
                        f"PNG/JPEG file: replace or delete it.") from None
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _convert(image, channels: int):
    """``image`` in mode RGB (channels=3) or L (channels=1), whatever its mode.

    16-bit greyscale (modes I;16*, I) is rounded to 8 bits (v·255/65535), where PIL's convert would
    clip at 255; palette images go through their colours; an alpha channel is dropped (the stored
    colours are kept, not blended onto a background).
    """
    from PIL import Image

    if image.mode.startswith("I"):
        wide = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(wide * (255 / 65535)), 0, 255).astype(np.uint8), "L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    target = "RGB" if channels == 3 else "L"
    return image if image.mode == target else image.convert(target)


def _resize_centre_crop(image, resolution: int):
    """The shorter side resized to ``resolution`` (bicubic, antialiased when shrinking), then the centre N×N."""
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    size = (resolution if width <= height else max(resolution, round(width * scale)),
            resolution if height <= width else max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


# --- CIFAR-10 -------------------------------------------------------------------------------------


@register_dataset("cifar10", _Cifar10Options)
def _load_cifar10(opts: _Cifar10Options, n_train: int, n_test: int, seed: int) -> Dataset:
    """CIFAR-10's python batches: train = the 50 000 training images; test = the official ``opts.split``.

    Images (N, 3, 32, 32) uint8; labels in 0..9, class names from ``batches.meta``.
    """
    root = Path(opts.root)
    folder = root / _CIFAR_DIR
    if opts.download and not folder.is_dir():
        _fetch_cifar10(root)
    if not root.is_dir():
        raise DataError(f"data.root: folder '{root}' not found (relative paths start from {os.getcwd()}); point it "
                        f"at the folder that holds {_CIFAR_DIR}/, or set data.download=true to fetch CIFAR-10 "
                        f"into it.")
    if not folder.is_dir():
        raise DataError(f"no {_CIFAR_DIR} folder in '{root}'; download {CIFAR10_URL} and unpack it there, or set "
                        f"data.download=true.")
    for name in (*_CIFAR_TRAIN, _CIFAR_TEST):
        if not (folder / name).is_file():
            raise DataError(f"'{folder / name}' is missing; CIFAR-10 needs data_batch_1..5 and test_batch: delete "
                            f"'{folder}' and set data.download=true, or unpack {CIFAR10_URL} again.")
    classes = _cifar_classes(folder / "batches.meta")
    # Two passes, so that the peak is the set plus one batch (184 MB), not the batches plus their concatenation:
    # the first counts the rows, the second fills the set batch by batch (a batch reads in about 0.1 s).
    sizes = [len(_read_cifar_batch(folder / name, len(classes))[1]) for name in _CIFAR_TRAIN]
    train = torch.empty((sum(sizes), 3, 32, 32), dtype=torch.uint8)
    train_labels = torch.empty(sum(sizes), dtype=torch.int64)
    start = 0
    for name, size in zip(_CIFAR_TRAIN, sizes):
        x, y = _read_cifar_batch(folder / name, len(classes))
        if len(y) != size:
            raise DataError(f"'{folder / name}' changed while it was read; load the data set again.")
        train[start:start + size] = torch.from_numpy(x)
        train_labels[start:start + size] = torch.from_numpy(y)
        start += size
    if opts.split == "train":   # evaluate on the training images themselves: the same tensors, no copy
        test, test_labels = train, train_labels
    else:
        x, y = _read_cifar_batch(folder / _CIFAR_TEST, len(classes))
        test, test_labels = torch.from_numpy(x), torch.from_numpy(y)
    return Dataset("cifar10", train, test, levels=LEVELS, data_range=opts.data_range, train_labels=train_labels,
                   test_labels=test_labels, classes=classes)


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds only what CIFAR-10's batches hold: dicts, lists, numbers, bytes, numpy arrays.

    Any other global (``os.system``, ``builtins.eval``, …) is refused, so a malicious file cannot run code.
    """

    _RECONSTRUCT = np.zeros(0).__reduce__()[0]     # numpy's array (de)serialisation functions, whatever
    _SCALAR = np.int64(0).__reduce__()[0]          # the module they are pickled under (numpy.core / numpy._core)
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
               ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
               ("numpy.core.multiarray", "scalar"): _SCALAR,
               ("numpy._core.multiarray", "scalar"): _SCALAR,
               ("numpy", "ndarray"): np.ndarray,
               ("numpy", "dtype"): np.dtype}

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):   # how Python 3 pickles bytes under protocol 2
            return _latin1_encode
        try:
            return self.ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}, which a CIFAR-10 batch never holds") \
                from None


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _unpickle(file: Path) -> dict:
    """The dict pickled in ``file``, through :class:`_BatchUnpickler` (byte strings stay bytes)."""
    try:
        with open(file, "rb") as f:
            content = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, struct.error, MemoryError) as error:
        raise DataError(f"'{file}' is not a CIFAR-10 python batch ({_reason(error)}); delete '{file.parent}' and set "
                        f"data.download=true, or unpack {CIFAR10_URL} again.") from None
    if not isinstance(content, dict):
        raise DataError(f"'{file}' holds a {type(content).__name__}, not the dict of a CIFAR-10 python batch; delete "
                        f"'{file.parent}' and set data.download=true, or unpack {CIFAR10_URL} again.")
    # The official files are Python 2 pickles whose keys load as bytes; accept str keys of a re-pickled copy too.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in content.items()}


def _read_cifar_batch(file: Path, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as (uint8 (n, 3, 32, 32) images, int64 (n,) labels), its shapes and labels checked."""
    batch = _unpickle(file)
    data, labels = batch.get("data"), batch.get("labels")
    again = f"delete '{file.parent}' and set data.download=true, or unpack {CIFAR10_URL} again"
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        got = (f"a {data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
               else "no 'data' array" if data is None else f"a {type(data).__name__}")
        raise DataError(f"'{file}' is not a CIFAR-10 batch: its 'data' should be a uint8 array of shape (n, 3072) "
                        f"(3 planes of 32×32), got {got}; {again}.")
    if (not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data)
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels)):
        got = f"{len(labels)} labels" if isinstance(labels, (list, np.ndarray)) else "no list of labels"
        raise DataError(f"'{file}' is not a CIFAR-10 batch: it holds {len(data)} images and {got} (one integer "
                        f"label per image expected); {again}.")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(f"'{file}' holds labels in [{labels.min()}, {labels.max()}], outside the {n_classes} "
                        f"classes 0..{n_classes - 1}; {again}.")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_classes(meta: Path) -> tuple[str, ...]:
    """The class names in ``batches.meta`` (``label_names``), or the 10 standard ones if the file is absent."""
    if not meta.is_file():
        return _CIFAR_CLASSES
    names = _unpickle(meta).get("label_names")
    if (not isinstance(names, list) or not names
            or not all(isinstance(n, (bytes, str)) for n in names)):
        raise DataError(f"'{meta}' holds no list of class names ('label_names'); delete it (the 10 standard names "
                        f"are used then) or unpack {CIFAR10_URL} again.")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


def _fetch_cifar10(root: Path) -> None:
    """Download (unless a checked copy is there) and unpack the official archive into ``root``/cifar-10-batches-py."""
    archive = root / CIFAR10_URL.rsplit("/", 1)[-1]
    created = _make_dirs(root)
    try:
        if not (archive.is_file() and _md5(archive) == CIFAR10_MD5):
            _download(CIFAR10_URL, archive, CIFAR10_MD5, f"download it by hand and unpack it into '{root}' (giving "
                                                         f"'{root / _CIFAR_DIR}')")
        _extract_cifar10(archive, root)
    except BaseException:
        _remove_empty(created)
        raise


def _extract_cifar10(archive: Path, root: Path) -> None:
    """Unpack ``archive``'s cifar-10-batches-py/ into ``root``: through a staging folder, nothing outside it."""
    import tarfile   # imported here, as the download's modules are: only data.download=true needs them

    again = f"delete '{archive}' and set data.download=true to fetch it again"
    staging = Path(tempfile.mkdtemp(prefix=".cifar-10-unpack.", dir=root))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                parts = PurePosixPath(member.name).parts
                if (not (member.isfile() or member.isdir()) or PurePosixPath(member.name).is_absolute()
                        or ".." in parts or not parts or parts[0] != _CIFAR_DIR):
                    raise DataError(f"'{archive}' holds '{member.name}', which is not a file of {_CIFAR_DIR}/: it is "
                                    f"not the official CIFAR-10 archive; {again}.")
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(staging, members=members, **extra)
        if not (staging / _CIFAR_DIR).is_dir():
            raise DataError(f"'{archive}' holds no {_CIFAR_DIR}/ folder; {again}.")
        try:
            os.rename(staging / _CIFAR_DIR, root / _CIFAR_DIR)
        except OSError:
            if not (root / _CIFAR_DIR).is_dir():   # not a concurrent process that got there first
                raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise DataError(f"could not unpack '{archive}' into '{root}' ({_reason(error)}); if the disk is full, free "
                        f"space, otherwise {again}.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- MNIST ----------------------------------------------------------------------------------------


@register_dataset("mnist", _MnistOptions)
def _load_mnist(opts: _MnistOptions, n_train: int, n_test: int, seed: int) -> Dataset:
    """MNIST's idx files (gzipped or not) in ``root``/MNIST/raw: train = the 60 000 training digits,
    test = the official ``opts.split``; images (N, 1, 28, 28) uint8 (or zero-padded to resolution), classes "0".."9"."""
    root = Path(opts.root)
    raw = root / "MNIST" / "raw"
    if opts.download:
        _fetch_mnist(raw)
    if not root.is_dir():
        raise DataError(f"data.root: folder '{root}' not found (relative paths start from {os.getcwd()}); point it "
                        f"at the folder that holds MNIST/raw/, or set data.download=true to fetch MNIST into it.")
    names = [*_MNIST_FILES["train"], *(_MNIST_FILES["test"] if opts.split == "test" else ())]
    missing = [f"{n}(.gz)" for n in names if _idx_file(raw, n) is None]
    if missing:
        raise DataError(f"'{raw}' lacks {', '.join(missing)}; download them from {MNIST_MIRROR} into it, or set "
                        f"data.download=true.")
    classes = tuple(str(k) for k in range(10))
    train, train_labels = _read_mnist_split(raw, "train", opts.resolution)
    if opts.split == "train":
        test, test_labels = train, train_labels
    else:
        test, test_labels = _read_mnist_split(raw, "test", opts.resolution)
        if test.shape[1:] != train.shape[1:]:
            raise DataError(f"the MNIST training images are {tuple(train.shape[2:])} pixels but the test images "
                            f"{tuple(test.shape[2:])}; the files in '{raw}' do not belong together.")
    return Dataset("mnist", train, test, levels=LEVELS, data_range=opts.data_range, train_labels=train_labels,
                   test_labels=test_labels, classes=classes)


def _idx_file(raw: Path, name: str) -> Path | None:
    """``raw``/name, else ``raw``/name.gz, else None."""
    return next((p for p in (raw / name, raw / f"{name}.gz") if p.is_file()), None)


def _read_mnist_split(raw: Path, split: str, resolution: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (N, 1, R, R) images, int64 (N,) labels) of one split, padded to ``resolution`` if given."""
    image_name, label_name = _MNIST_FILES[split]
    image_file, label_file = _idx_file(raw, image_name), _idx_file(raw, label_name)
    images = _read_idx(image_file, _IDX_IMAGES)
    labels = _read_idx(label_file, _IDX_LABELS)
    if len(labels) != len(images):
        raise DataError(f"'{label_file}' holds {len(labels)} labels but '{image_file}' {len(images)} images; "
                        f"download both again (delete them and set data.download=true).")
    if len(labels) and labels.max() > 9:
        raise DataError(f"'{label_file}' holds label {labels.max()}, beyond the digits 0..9; download it again.")
    images = images[:, None]
    size = images.shape[2:]
    if resolution is not None and resolution < max(size):
        raise DataError(f"data.resolution={resolution} is smaller than the {size[1]}×{size[0]} images in "
                        f"'{image_file}'; it pads them with zeros, so set data.resolution >= {max(size)} or null.")
    if resolution is not None and (resolution, resolution) != size:
        # Zero padding, centred (the extra row/column, if any, at the bottom/right): MNIST's background is 0.
        padded = np.zeros((len(images), 1, resolution, resolution), dtype=np.uint8)
        top, left = (resolution - size[0]) // 2, (resolution - size[1]) // 2
        padded[:, :, top:top + size[0], left:left + size[1]] = images
        images = padded
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def _read_idx(file: Path, magic: int) -> np.ndarray:
    """The uint8 array of an idx file (``magic`` 0x803: (N, rows, cols) images; 0x801: (N,) labels), checked."""
    kind = "images" if magic == _IDX_IMAGES else "labels"
    again = "download it again (delete it and set data.download=true)"
    try:
        with (gzip.open(file, "rb") if file.suffix == ".gz" else open(file, "rb")) as f:
            content = bytearray(f.read())   # writable, so that torch shares it without a copy
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"could not read '{file}' ({_reason(error)}); it is truncated or corrupt: {again}.") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(content) < 4 or struct.unpack(">I", content[:4])[0] != magic:
        found = f"0x{struct.unpack('>I', content[:4])[0]:08X}" if len(content) >= 4 else "no header"
        raise DataError(f"'{file}' is not an idx file of MNIST {kind}: magic number {found}, expected 0x{magic:08X}; "
                        f"check the file name, or {again}.")
    if len(content) < header:
        raise DataError(f"'{file}' ends inside its header ({len(content)} bytes); {again}.")
    dims = struct.unpack(f">{ndim}I", content[4:header])
    expected = header + int(np.prod(dims))
    if len(content) != expected:
        what = "is truncated" if len(content) < expected else "is longer than its header says"
        raise DataError(f"'{file}' {what}: its header announces {' × '.join(map(str, dims))} bytes of {kind} "
                        f"({expected} bytes in all) but it has {len(content)}; {again}.")
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(dims)


def _fetch_mnist(raw: Path) -> None:
    """Download the gzipped idx files missing from ``raw`` (checked by MD5); files already there are kept."""
    missing = [n for split in _MNIST_FILES.values() for n in split if _idx_file(raw, n) is None]
    if not missing:
        return
    created = _make_dirs(raw)
    try:
        for name in missing:
            _download(f"{MNIST_MIRROR}{name}.gz", raw / f"{name}.gz", MNIST_MD5[f"{name}.gz"],
                      f"download the four files of {MNIST_MIRROR} by hand into '{raw}'")
    except BaseException:
        _remove_empty(created)
        raise


# --- Downloads ------------------------------------------------------------------------------------


def _download(url: str, dest: Path, md5: str, by_hand: str) -> None:
    """Fetch ``url`` into ``dest`` through a temporary file renamed once its MD5 is ``md5``; nothing left on failure."""
    import http.client
    import urllib.error
    import urllib.request

    def fetch(tmp: str) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        try:
            response = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
            raise DataError(f"could not download {url} ({_reason(error)}); the machine may be offline: {by_hand}, "
                            f"or check the connection.") from None
        with response, open(tmp, "wb") as out:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except (http.client.HTTPException, OSError) as error:
                    raise DataError(f"the download of {url} broke off ({_reason(error)}); try again, or {by_hand}.") \
                        from None
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise DataError(f"the file downloaded from {url} has MD5 {digest.hexdigest()}, not the official {md5}: "
                            f"it was corrupted on the way or changed; try again, or {by_hand}.")

    log.info("downloading %s into %s", url, dest)
    atomic_write(dest, fetch)


def _md5(file: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones created, deepest first (for :func:`_remove_empty`)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create '{folder}' to download into ({_reason(error)}); choose a writable data.root.") \
            from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this call created, deepest first, if nothing else was put in them."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def _reason(error: BaseException) -> str:
    """An exception in a few words, on one line (for a DataError that must stay one line)."""
    import urllib.error

    if isinstance(error, urllib.error.HTTPError):
        text = f"HTTP {error.code} {error.reason}"
    elif isinstance(error, urllib.error.URLError):
        text = str(error.reason.strerror if isinstance(error.reason, OSError) and error.reason.strerror
                   else error.reason)
    else:
        text = (error.strerror if isinstance(error, OSError) and error.strerror else str(error)) or type(error).__name__
    return " ".join(text.split())
