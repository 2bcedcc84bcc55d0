"""Tests for ``data_lib.images``: a PNG/JPEG folder, CIFAR-10's python batches and MNIST's idx files,
written in their real formats into tmp_path; pixel values, labels and classes round-trip exactly,
resizing keeps the centre, every bad input is one DataError naming the file or setting, and the
opt-in download works from a local copy and fails cleanly offline. Nothing here touches the network."""
from __future__ import annotations

import gzip
import io
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data_lib import DataError, load_dataset
from data_lib import images
from data_lib.stored import _split

ROOT = pathlib.Path(__file__).resolve().parents[2]
OFFLINE = "http://127.0.0.1:9/"   # the discard port: nothing listens, the connection is refused at once


def _load(name: str, **options):
    return load_dataset(name, **options)


# --- CIFAR-10 files ------------------------------------------------------------------------------

CIFAR_COUNTS = {"data_batch_1": 3, "data_batch_2": 2, "data_batch_3": 3, "data_batch_4": 1, "data_batch_5": 2,
                "test_batch": 4}
CIFAR_NAMES = [f"kind{k}" for k in range(10)]


def _write_cifar(root: pathlib.Path, meta: bool = True) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A cifar-10-batches-py folder of a few images per batch, pickled as the official files are."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in CIFAR_COUNTS.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = (data, labels)
    if meta:
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_cases_per_batch": 10000,
                         b"num_vis": 3072}, f, protocol=2)
    return written


@pytest.fixture
def cifar(tmp_path):
    root = tmp_path / "cifar"
    return root, _write_cifar(root)


def test_cifar10_round_trips_pixels_labels_and_classes(cifar):
    root, written = cifar
    data = _load("cifar10", root=str(root))
    train_batches = [written[f"data_batch_{i}"] for i in range(1, 6)]
    expected = np.concatenate([x for x, _ in train_batches]).reshape(-1, 3, 32, 32)
    assert data.train.dtype == torch.uint8 and data.event_shape == (3, 32, 32) and len(data.train) == 11
    assert np.array_equal(data.train.numpy(), expected)
    # Rows are R, G, B planes of 32×32, row-major: pixel (c, y, x) is column c·1024 + y·32 + x.
    assert data.train[0, 2, 5, 7] == train_batches[0][0][0, 2 * 1024 + 5 * 32 + 7]
    assert data.train_labels.tolist() == sum((y for _, y in train_batches), [])
    assert np.array_equal(data.test.numpy(), written["test_batch"][0].reshape(-1, 3, 32, 32))
    assert data.test_labels.tolist() == written["test_batch"][1]
    assert data.classes == tuple(CIFAR_NAMES) and data.levels == 256 and data.data_range == (-1.0, 1.0)


def test_cifar10_split_train_evaluates_on_the_training_images(cifar):
    data = _load("cifar10", root=str(cifar[0]), split="train")
    assert torch.equal(data.test, data.train) and torch.equal(data.test_labels, data.train_labels)


def test_cifar10_without_meta_uses_the_standard_class_names(tmp_path):
    _write_cifar(tmp_path, meta=False)
    assert _load("cifar10", root=str(tmp_path)).classes[:3] == ("airplane", "automobile", "bird")


def test_decode_maps_level_k_onto_data_range(cifar):
    data = _load("cifar10", root=str(cifar[0]), data_range=(0.0, 2.0))
    k = torch.tensor([[0, 1, 128, 255]], dtype=torch.uint8)
    assert torch.allclose(data.decode(k), torch.tensor([[0.0, 2 / 255, 256 / 255, 2.0]]))
    default = _load("cifar10", root=str(cifar[0]))
    assert default.decode(k)[0, [0, -1]].tolist() == [-1.0, 1.0]


def test_the_cifar_unpickler_refuses_anything_but_arrays(tmp_path):
    """A pickle that would call open() (any callable: os.system the same) is refused before it runs."""
    _write_cifar(tmp_path)
    marker = tmp_path / "created_by_the_pickle"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(pickle.dumps({b"data": Payload(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="data_batch_2.*refused to load (io|builtins).open"):
        _load("cifar10", root=str(tmp_path))
    assert not marker.exists()


def _cifar_break(folder: pathlib.Path, how: str) -> str:
    """Spoil a CIFAR folder one way; the text the DataError must contain."""
    if how == "no_batch":
        (folder / "data_batch_3").unlink()
        return "data_batch_3' is missing"
    if how == "garbage":
        (folder / "data_batch_4").write_bytes(b"\x80\x02not a pickle at all")
        return "data_batch_4' is not a CIFAR-10 python batch"
    if how == "truncated":
        content = (folder / "test_batch").read_bytes()
        (folder / "test_batch").write_bytes(content[: len(content) // 2])
        return "test_batch' is not a CIFAR-10 python batch"
    if how == "shape":
        with open(folder / "data_batch_1", "wb") as f:
            pickle.dump({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, f, protocol=2)
        return "data_batch_1' is not a CIFAR-10 batch: its 'data' should be a uint8 array of shape (n, 3072)"
    if how == "labels":
        with open(folder / "data_batch_5", "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, f, protocol=2)
        return "data_batch_5' is not a CIFAR-10 batch: it holds 2 images and 1 labels"
    if how == "no_keys":
        with open(folder / "data_batch_1", "wb") as f:
            pickle.dump([1, 2, 3], f, protocol=2)
        return "data_batch_1' holds a list, not the dict"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["no_batch", "garbage", "truncated", "shape", "labels", "no_keys"])
def test_cifar10_bad_batches_are_named(cifar, how):
    expected = _cifar_break(cifar[0] / "cifar-10-batches-py", how)
    with pytest.raises(DataError) as caught:
        _load("cifar10", root=str(cifar[0]))
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_cifar10_missing_root_or_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"data.root: folder '.*nowhere' not found.*data.download=true"):
        _load("cifar10", root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"no cifar-10-batches-py folder in .*set data.download=true"):
        _load("cifar10", root=str(tmp_path))
    with pytest.raises(DataError, match=r"needs data.root="):
        _load("cifar10")
    with pytest.raises(DataError, match=r"option 'split' of dataset 'cifar10' must be one of 'train', 'test'"):
        _load("cifar10", root=str(tmp_path), split="val")


# --- MNIST files ---------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_mnist(root: pathlib.Path, n_train: int = 5, n_test: int = 3) -> dict[str, np.ndarray]:
    """MNIST/raw with the training files gzipped and the test files plain (both forms are read)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8)}
    for name, array in arrays.items():
        content = _idx_bytes(array, 0x803 if array.ndim == 3 else 0x801)
        if name.startswith("train"):
            with gzip.open(raw / f"{name}.gz", "wb") as f:
                f.write(content)
        else:
            (raw / name).write_bytes(content)
    return arrays


@pytest.fixture
def mnist(tmp_path):
    root = tmp_path / "mnist"
    return root, _write_mnist(root)


def test_mnist_round_trips_gzipped_and_plain_idx_files(mnist):
    root, arrays = mnist
    data = _load("mnist", root=str(root))
    assert data.train.dtype == torch.uint8 and data.event_shape == (1, 28, 28)
    assert np.array_equal(data.train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(data.test[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert data.train_labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert data.test_labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert data.classes == tuple("0123456789") and data.levels == 256
    train_only = _load("mnist", root=str(root), split="train")
    assert torch.equal(train_only.test, train_only.train)


def test_mnist_resolution_32_pads_two_zero_pixels_each_side(mnist):
    root, arrays = mnist
    data = _load("mnist", root=str(root), resolution=32)
    assert data.event_shape == (1, 32, 32)
    assert np.array_equal(data.train[:, 0, 2:30, 2:30].numpy(), arrays["train-images-idx3-ubyte"])
    border = data.train.clone()
    border[:, :, 2:30, 2:30] = 0
    assert int(border.max()) == 0
    with pytest.raises(DataError, match=r"data.resolution for mnist .* must be null or >= 28"):
        _load("mnist", root=str(root), resolution=16)


def _mnist_break(raw: pathlib.Path, how: str) -> str:
    if how == "missing":
        (raw / "t10k-labels-idx1-ubyte").unlink()
        return "lacks t10k-labels-idx1-ubyte(.gz)"
    if how == "magic":   # a labels file where the images should be
        (raw / "t10k-images-idx3-ubyte").write_bytes((raw / "t10k-labels-idx1-ubyte").read_bytes())
        return ("t10k-images-idx3-ubyte' is not an idx file of MNIST images: magic number 0x00000801, "
                "expected 0x00000803")
    if how == "truncated":
        content = (raw / "t10k-images-idx3-ubyte").read_bytes()
        (raw / "t10k-images-idx3-ubyte").write_bytes(content[:-100])
        return "t10k-images-idx3-ubyte' is truncated: its header announces 3 × 28 × 28 bytes"
    if how == "truncated_gzip":
        content = (raw / "train-images-idx3-ubyte.gz").read_bytes()
        (raw / "train-images-idx3-ubyte.gz").write_bytes(content[: len(content) // 2])
        return "could not read '" + str(raw / "train-images-idx3-ubyte.gz") + "'"
    if how == "count":
        (raw / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(2, np.uint8), 0x801))
        return "t10k-labels-idx1-ubyte' holds 2 labels but"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing", "magic", "truncated", "truncated_gzip", "count"])
def test_mnist_bad_files_are_named(mnist, how):
    expected = _mnist_break(mnist[0] / "MNIST" / "raw", how)
    with pytest.raises(DataError) as caught:
        _load("mnist", root=str(mnist[0]))
    assert expected in str(caught.value) and "\n" not in str(caught.value)


# --- Image folders -------------------------------------------------------------------------------


def _pixels(seed: int, shape=(6, 5, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    """Two classes, images in four PIL modes, one in a nested folder; the expected RGB arrays by file."""
    root = tmp_path / "images"
    (root / "cat" / "nested").mkdir(parents=True)
    (root / "dog").mkdir()
    expected = {}
    rgb = _pixels(0)
    Image.fromarray(rgb, "RGB").save(root / "cat" / "a.png")
    expected["cat/a.png"] = rgb
    grey = _pixels(1, (6, 5))
    Image.fromarray(grey, "L").save(root / "cat" / "nested" / "b.PNG")
    expected["cat/nested/b.PNG"] = np.repeat(grey[..., None], 3, axis=2)
    rgba = np.concatenate([_pixels(2), _pixels(3, (6, 5, 1))], axis=2)
    Image.fromarray(rgba, "RGBA").save(root / "dog" / "c.png")
    expected["dog/c.png"] = rgba[..., :3]           # alpha dropped, stored colours kept
    palette = Image.fromarray(_pixels(4), "RGB").quantize(colors=7)
    palette.save(root / "dog" / "d.png")
    expected["dog/d.png"] = np.asarray(palette.convert("RGB"))
    (root / "dog" / "notes.txt").write_text("not an image")
    return root, expected


def _row_of(data, image: np.ndarray) -> tuple[str, int]:
    """(split, row) of the image ``image`` (H, W, C) in a Dataset."""
    for split in ("train", "test"):
        x = getattr(data, split).permute(0, 2, 3, 1).numpy()
        hits = [i for i in range(len(x)) if np.array_equal(x[i], image)]
        if hits:
            return split, hits[0]
    raise AssertionError("image not found")


def test_image_folder_round_trips_pixels_labels_and_classes(folder):
    root, expected = folder
    data = _load("image_folder", path=str(root), test_fraction=0.25)
    assert data.classes == ("cat", "dog") and data.event_shape == (3, 6, 5) and data.train.dtype == torch.uint8
    assert (len(data.train), len(data.test)) == (3, 1)
    for name, image in expected.items():
        split, row = _row_of(data, image)
        assert getattr(data, f"{split}_labels")[row] == data.classes.index(name.split("/")[0]), name


def test_image_folder_greyscale_and_16_bit(folder, tmp_path):
    root, expected = folder
    data = _load("image_folder", path=str(root), channels=1)
    assert data.event_shape == (1, 6, 5)
    grey = np.asarray(Image.fromarray(expected["cat/a.png"]).convert("L"))
    assert any(np.array_equal(x[0], grey) for x in torch.cat([data.train, data.test]).numpy())
    # 16-bit greyscale: v = 257·k stores 8-bit level k exactly; PIL's own convert would clip at 255.
    wide = tmp_path / "wide"
    wide.mkdir()
    levels = _pixels(5, (4, 4))
    for i in range(2):
        Image.fromarray(levels.astype(np.uint16) * 257).save(wide / f"{i}.png")
    assert Image.open(wide / "0.png").mode.startswith("I")
    data = _load("image_folder", path=str(wide), channels=1)
    assert data.train_labels is None and data.classes is None
    assert np.array_equal(data.train[0, 0].numpy(), levels)


def test_image_folder_reads_jpeg_approximately(tmp_path):
    y, x = np.mgrid[0:16, 0:16]
    smooth = np.stack([x * 15, y * 15, (x + y) * 7], axis=2).astype(np.uint8)
    for name in ("a.jpg", "b.JPEG"):
        Image.fromarray(smooth).save(tmp_path / name, quality=95)
    data = _load("image_folder", path=str(tmp_path))
    decoded = torch.cat([data.train, data.test])[0].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(decoded - smooth).mean() < 3


def test_resize_then_centre_crop_keeps_the_centre(tmp_path):
    """A 40×32 (width×height) image: columns 0–3 and 36–39 are cut off, column 4 becomes column 0."""
    image = np.zeros((32, 40, 3), np.uint8)
    image[:, :4] = image[:, 36:] = (255, 0, 0)       # cropped away
    image[:, 4] = image[:, 35] = (0, 255, 0)          # the crop's first and last columns
    image[12:20, 16:24] = 255                         # a white 8×8 square at the centre
    for i in range(2):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    same = _load("image_folder", path=str(tmp_path), resolution=32).train[0].permute(1, 2, 0).numpy()
    assert np.array_equal(same, image[:, 4:36])      # no resampling at scale 1: an exact crop
    half = _load("image_folder", path=str(tmp_path), resolution=16).train[0].permute(1, 2, 0).numpy()
    assert half.shape == (16, 16, 3)
    white = half.astype(float).min(axis=2)            # the square: bright in all three channels
    assert white[6:10, 6:10].min() > 200 and white[:4].max() < 60 and white[12:].max() < 60
    rows, cols = np.nonzero(white > 128)
    assert rows.mean() == pytest.approx(7.5, abs=0.3) and cols.mean() == pytest.approx(7.5, abs=0.3)
    edges = half[:, [0, -1]].astype(int)              # green, with a little red bleeding in from beyond the crop
    assert (edges[..., 1] > 80).all() and edges[..., 0].max() < 60


def test_image_folder_split_is_seeded_and_labels_follow_images(tmp_path):
    for k in range(12):
        cls = tmp_path / f"class{k % 3}"
        cls.mkdir(exist_ok=True)
        Image.fromarray(np.full((2, 2), 10 * k + k % 3, np.uint8)).save(cls / f"{k:02d}.png")
    load = lambda seed: _load("image_folder", path=str(tmp_path), channels=1, seed=seed, test_fraction=0.25)
    a, b, c = load(0), load(0), load(1)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.test, c.test)
    assert len(a.test) == 3 and len(a.train) == 9
    # The permutation of the finite sets (stored._split) over the images in sorted path order.
    ordered = sorted(range(12), key=lambda k: (k % 3, k))
    stacked = torch.tensor([10 * k + k % 3 for k in ordered], dtype=torch.uint8).view(12, 1, 1, 1).expand(12, 1, 2, 2)
    train, test = _split(stacked.contiguous(), 0.25, 0)
    assert torch.equal(a.train, train) and torch.equal(a.test, test)
    for data in (a, c):
        for split in ("train", "test"):
            values = getattr(data, split)[:, 0, 0, 0].long()
            assert torch.equal(getattr(data, f"{split}_labels"), values % 10), split   # label = value mod 10


def test_resolution_brings_images_of_several_sizes_to_one(tmp_path):
    _write_two(tmp_path, sizes=((5, 6), (9, 4)))
    data = _load("image_folder", path=str(tmp_path), resolution=4)
    assert data.event_shape == (3, 4, 4)


def _write_two(folder: pathlib.Path, sizes=((5, 6), (5, 6))) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size).save(folder / f"{i}.png")


def _folder_break(root: pathlib.Path, how: str) -> tuple[dict, str]:
    """(options, expected message part) for one bad image folder."""
    if how == "missing":
        return {"path": str(root / "nowhere")}, "data.path: '" + str(root / "nowhere") + "' not found"
    if how == "not_dir":
        (root / "file.png").write_bytes(b"")
        return {"path": str(root / "file.png")}, "file.png' is not a folder"
    if how == "empty":
        (root / "a.gif").write_bytes(b"GIF89a")
        return {"path": str(root)}, "holds 0 image file(s) (read: .png, .jpg, .jpeg"
    if how == "corrupt":
        _write_two(root)
        (root / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        return {"path": str(root)}, "could not read image '" + str(root / "2.png") + "'"
    if how == "truncated":
        _write_two(root)
        buffer = io.BytesIO()
        Image.fromarray(_pixels(6, (64, 64, 3))).save(buffer, "PNG")
        (root / "2.png").write_bytes(buffer.getvalue()[:-200])
        return {"path": str(root)}, "could not read image '" + str(root / "2.png") + "'"
    if how == "mixed":
        _write_two(root, sizes=((5, 6), (7, 6)))
        return {"path": str(root)}, (f"'{root / '0.png'}' is 5×6 pixels but '{root / '1.png'}' is 7×6 "
                                     "(width×height); for images of several sizes set data.resolution=N")
    if how == "loose":
        _write_two(root / "cls")
        _write_two(root)
        return {"path": str(root)}, "holds images both directly (e.g. '0.png') and in sub-folders (e.g. 'cls/')"
    if how == "channels":
        return {"path": str(root), "channels": 4}, "data.channels must be 3 (RGB) or 1 (greyscale), got 4"
    if how == "resolution":
        return {"path": str(root), "resolution": 0}, "data.resolution must be null"
    if how == "no_path":
        return {}, "needs data.path="
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing", "not_dir", "empty", "corrupt", "truncated", "mixed", "loose", "channels",
                                 "resolution", "no_path"])
def test_image_folder_bad_input_is_named(tmp_path, how):
    options, expected = _folder_break(tmp_path, how)
    with pytest.raises(DataError) as caught:
        _load("image_folder", **options)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


# --- Downloads (from local files: nothing touches the network) ----------------------------------


def _cifar_archive(tmp_path: pathlib.Path, evil: bool = False) -> pathlib.Path:
    source = tmp_path / "source"
    _write_cifar(source)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        if evil:
            info = tarfile.TarInfo("cifar-10-batches-py/../../escaped")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    return archive


def test_cifar10_download_checks_md5_and_unpacks(tmp_path, monkeypatch):
    archive = _cifar_archive(tmp_path)
    monkeypatch.setattr(images, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(images, "CIFAR10_MD5", images._md5(archive))
    root = tmp_path / "data" / "deep"
    data = _load("cifar10", root=str(root), download=True)
    assert len(data.train) == 11 and data.classes == tuple(CIFAR_NAMES)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    archive.unlink()                                  # present files are not fetched again
    assert torch.equal(_load("cifar10", root=str(root), download=True).train, data.train)


def test_cifar10_download_with_a_wrong_md5_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "CIFAR10_URL", _cifar_archive(tmp_path).as_uri())
    root = tmp_path / "data"
    with pytest.raises(DataError, match=r"has MD5 [0-9a-f]{32}, not the official c58f30108f718f92721af3b95e74349a"):
        _load("cifar10", root=str(root), download=True)
    assert not root.exists()


def test_cifar10_archive_members_cannot_escape_root(tmp_path, monkeypatch):
    archive = _cifar_archive(tmp_path, evil=True)
    monkeypatch.setattr(images, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(images, "CIFAR10_MD5", images._md5(archive))
    root = tmp_path / "data"
    with pytest.raises(DataError, match=r"holds 'cifar-10-batches-py/../../escaped', which is not a file of"):
        _load("cifar10", root=str(root), download=True)
    assert not (tmp_path / "escaped").exists() and not (root / "cifar-10-batches-py").exists()
    assert [p.name for p in root.iterdir()] == ["cifar-10-python.tar.gz"]   # verified, kept for a retry


def test_mnist_download_fetches_only_missing_files(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    arrays = _write_mnist(mirror)
    raw = mirror / "MNIST" / "raw"
    md5 = {}
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):   # the mirror serves gzipped files only
        with gzip.open(raw / f"{name}.gz", "wb") as f:
            f.write((raw / name).read_bytes())
    for path in raw.glob("*.gz"):
        md5[path.name] = images._md5(path)
    monkeypatch.setattr(images, "MNIST_MIRROR", raw.as_uri() + "/")
    monkeypatch.setattr(images, "MNIST_MD5", md5)
    root = tmp_path / "data"
    (root / "MNIST" / "raw").mkdir(parents=True)
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes((raw / "t10k-labels-idx1-ubyte").read_bytes())
    data = _load("mnist", root=str(root), download=True)
    assert np.array_equal(data.test[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz"]


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_offline_download_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch, name):
    monkeypatch.setattr(images, "CIFAR10_URL", OFFLINE + "cifar-10-python.tar.gz")
    monkeypatch.setattr(images, "MNIST_MIRROR", OFFLINE)
    root = tmp_path / "data"
    with pytest.raises(DataError) as caught:
        _load(name, root=str(root), download=True)
    message = str(caught.value)
    assert message.startswith(f"could not download {OFFLINE}") and "the machine may be offline" in message
    assert "\n" not in message and not root.exists()
    root.mkdir()                                      # an existing root stays, empty
    with pytest.raises(DataError, match="could not download"):
        _load(name, root=str(root), download=True)
    assert list(root.iterdir()) == []


# --- The command line ----------------------------------------------------------------------------


def test_cli_bad_image_data_is_one_error_line(tmp_path):
    """One bad input per format through ``python run.py``: exit code 2, one ``error:`` line, nothing written.

    The runs start together to share the start-up time. The image folder's run goes into a directory the
    user made beforehand, which keeps what it held; the others' directories, made by the run, are removed."""
    cifar_root = tmp_path / "cifar"
    _write_cifar(cifar_root)
    (cifar_root / "cifar-10-batches-py" / "data_batch_2").unlink()
    mnist_root = tmp_path / "mnist"
    _write_mnist(mnist_root)
    raw = mnist_root / "MNIST" / "raw"
    (raw / "t10k-images-idx3-ubyte").write_bytes((raw / "t10k-images-idx3-ubyte").read_bytes()[:-10])
    mixed = tmp_path / "mixed"
    _write_two(mixed, sizes=((5, 6), (7, 6)))
    cases = {"cifar10": ([f"data.root={cifar_root}"], "data_batch_2' is missing"),
             "mnist": ([f"data.root={mnist_root}"], "t10k-images-idx3-ubyte' is truncated"),
             "image_folder": ([f"data.path={mixed}"], "set data.resolution=N")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    (tmp_path / "image_folder" / "run").mkdir(parents=True)
    (tmp_path / "image_folder" / "run" / "notes.txt").write_text("mine")
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "run.py"), f"data={name}", *args, "task=train",
                                     f"hydra.run.dir={tmp_path / name / 'run'}"],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and "Traceback" not in stderr, (name, stderr)
        assert len(errors) == 1 and cases[name][1] in errors[0], (name, stderr)
        run = tmp_path / name / "run"
        if name == "image_folder":   # the user's directory stays, with the user's file, and no result in it
            assert (run / "notes.txt").read_text() == "mine" and not (run / "checkpoints").exists()
        else:
            assert not run.exists(), name   # the run directory it created is gone again


# --- Training and sampling on each format --------------------------------------------------------

#: A few cheap steps, and evaluations of known small cost (the NLL with a fixed multistep budget).
TINY_RUN = ["task.steps=2", "task.batch_size=2", "task.eval_samples=2", "task.log_every=1", "likelihood.n_eval=2",
            "likelihood.method=multistep", "likelihood.steps=3", "likelihood.divergence=hutchinson"]
SMALL_UNET = ["model=unet", "model.net.base_channels=8", "model.net.channel_mults=[1,2]", "model.net.attn_resolutions=[]"]


def _class_folder(root: pathlib.Path, size: int = 8) -> pathlib.Path:
    """Two classes of three RGB PNGs each, of size×size."""
    for k, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(_pixels(10 * k + i, (size, size, 3)), "RGB").save(root / name / f"{i}.png")
    return root


def _data_args(fmt: str, tmp_path: pathlib.Path) -> list[str]:
    if fmt == "cifar10":
        _write_cifar(tmp_path / "cifar")
        return ["data=cifar10", f"data.root={tmp_path / 'cifar'}"]
    if fmt == "mnist":
        _write_mnist(tmp_path / "mnist")
        return ["data=mnist", f"data.root={tmp_path / 'mnist'}"]
    return ["data=image_folder", f"data.path={_class_folder(tmp_path / 'images')}"]


def _run(task_args: list[str], run_dir: pathlib.Path) -> dict:
    """What ``python run.py <task_args>`` does, in process (the config checked as the CLI checks it)."""
    from tasks_lib import TASKS, compose, overridden_keys, run_task

    assert TASKS   # the task registry is what run_task dispatches into
    return run_task(compose(*task_args), run_dir, overridden_keys(task_args))


@pytest.mark.parametrize("fmt", ["cifar10", "mnist", "image_folder"])
def test_train_sample_and_likelihood_on_each_format(tmp_path, fmt):
    """``task=train`` a few steps of a small U-Net on files of each real format, then ``task=sample`` and
    ``task=likelihood`` on the checkpoint: the data set travels with it (bits/dim with 256 levels)."""
    data = _data_args(fmt, tmp_path)
    trained = _run(["task=train", *data, *SMALL_UNET, *TINY_RUN], tmp_path / "train")
    assert trained["steps"] == 2 and trained["data"] == fmt and np.isfinite(trained["test_bpd"])
    ckpt = f"ckpt={tmp_path / 'train' / 'checkpoints' / 'last.pt'}"
    sampled = _run(["task=sample", ckpt, "task.n_samples=3", "task.trajectories=0", "solver=ddim", "solver.steps=3",
                    "likelihood.n_eval=2", "likelihood.method=multistep", "likelihood.steps=3"], tmp_path / "sample")
    samples = np.load(tmp_path / "sample" / "samples.npz")["samples"]
    shape = {"cifar10": (3, 32, 32), "mnist": (1, 28, 28), "image_folder": (3, 8, 8)}[fmt]
    assert samples.shape == (3, *shape) and np.isfinite(samples).all()
    scored = _run(["task=likelihood", ckpt, "likelihood.n_eval=2", "likelihood.method=multistep",
                   "likelihood.steps=3"], tmp_path / "likelihood")
    # 3-step solves of a 2-step network are far from the data's density, but the offset for 256 levels
    # over (-1, 1) is in: bpd = nll/(D ln 2) + log2(256/2)
    D = int(np.prod(shape))
    assert scored["bpd"] == pytest.approx(scored["nll_nats"] / (D * np.log(2)) + 7.0, rel=1e-4)


def test_unet_ddpm_is_the_published_network_and_trains_on_images(tmp_path, capsys):
    """``model=unet_ddpm`` has DDPM's 35.7 M parameters on 32×32×3 (counted in metrics.json as n_params), and trains
    at batch 2 on an image folder; 8×8 images keep this test cheap (the 32×32 run is the slow test below)."""
    from models import build_network
    from tasks_lib import compose

    net = compose("model=unet_ddpm").model.net
    count = sum(p.numel() for p in build_network("unet", (3, 32, 32), **net).parameters())
    assert abs(count - 35.7e6) / 35.7e6 < 0.01, count
    data = _data_args("image_folder", tmp_path)
    trained = _run(["task=train", *data, "model=unet_ddpm", "task.loss=ddpm", *TINY_RUN], tmp_path / "train")
    assert trained["n_params"] == sum(p.numel() for p in build_network("unet", (3, 8, 8), **net).parameters())
    assert np.isfinite(trained["test_loss"])
    assert f"network of {trained['n_params']:,} parameters (n_params)" in capsys.readouterr().out   # the train log


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["cifar10", "mnist"])
def test_unet_ddpm_trains_and_samples_on_cifar_and_mnist(tmp_path, fmt):
    """The published network at its resolution (MNIST zero-padded to 32): a few steps at batch 2, then sampling."""
    data = _data_args(fmt, tmp_path) + (["data.resolution=32"] if fmt == "mnist" else [])
    trained = _run(["task=train", *data, "model=unet_ddpm", "task.loss=ddpm", *TINY_RUN], tmp_path / "train")
    # one input channel less: conv_in and conv_out lose 2·128·9 weights and 2 biases, 4610 of the 35 746 307
    assert trained["n_params"] == (35_746_307 if fmt == "cifar10" else 35_746_307 - 4610)
    assert np.isfinite(trained["test_loss"])
    ckpt = f"ckpt={tmp_path / 'train' / 'checkpoints' / 'last.pt'}"
    _run(["task=sample", ckpt, "task.n_samples=2", "task.trajectories=0", "solver=ddim", "solver.steps=2",
          "task.likelihood=false"], tmp_path / "sample")
    assert np.load(tmp_path / "sample" / "samples.npz")["samples"].shape == (2, 3 if fmt == "cifar10" else 1, 32, 32)
