"""torchvision's sets in xfer's canonical shapes, read by torchvision's own loaders from its on-disk layout, and the
archives its download leaves there (FILE.gz, EMNIST's gzip.zip), decompressed so that those loaders read them offline."""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import string
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from xfer.data import (COLOUR_GRID, GRID, Dataset, Published, Split, _Entry, _labels, _to_grid, _tv, _uint8, dataset)
from xfer.errors import XferError

_DIGIT_SHAPE = (1, GRID, GRID)
_COPY_CHUNK = 1 << 20   # bytes per read when decompressing torchvision's archives: bounded memory
# torchvision learns CIFAR-10's names from batches.meta; these are that file's label_names.
_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ---------------------------------------------------------------------------------------------- torchvision sets

def _classes_of(torchvision_class: str) -> Callable[[], Sequence[str]]:
    """The class names a torchvision dataset class states (its `classes` attribute), read when asked."""
    return lambda: getattr(_tv().datasets, torchvision_class).classes


def _idx_files(
    folder: str, prefix: str = "", labels: str = "labels-idx1-ubyte", names: tuple[str, str] = ("train", "t10k"),
) -> tuple[str, ...]:
    return tuple(f"{folder}/raw/{prefix}{part}-{kind}" for part in names for kind in ("images-idx3-ubyte", labels))


def _mnist_like(name: str, cls: type, root: Path, download: bool) -> Dataset:
    train, test = (cls(root, train=flag, download=download) for flag in (True, False))
    return Dataset(
        name, Split(train.data.unsqueeze(1), train.targets), Split(test.data.unsqueeze(1), test.targets), tuple(train.classes),
    )


@dataset("mnist", files=_idx_files("MNIST"), gzipped=True,
         published=Published(60000, 10000, _DIGIT_SHAPE, 10, _classes_of("MNIST")))
def _mnist(root: Path, download: bool) -> Dataset:
    return _mnist_like("mnist", _tv().datasets.MNIST, root, download)


@dataset("kmnist", files=_idx_files("KMNIST"), gzipped=True,
         published=Published(60000, 10000, _DIGIT_SHAPE, 10, _classes_of("KMNIST")))
def _kmnist(root: Path, download: bool) -> Dataset:
    return _mnist_like("kmnist", _tv().datasets.KMNIST, root, download)


@dataset("fashion_mnist", files=_idx_files("FashionMNIST"), gzipped=True,
         published=Published(60000, 10000, _DIGIT_SHAPE, 10, _classes_of("FashionMNIST")))
def _fashion_mnist(root: Path, download: bool) -> Dataset:
    return _mnist_like("fashion_mnist", _tv().datasets.FashionMNIST, root, download)


def _emnist(split_name: str, root: Path, download: bool) -> Dataset:
    train, test = (_tv().datasets.EMNIST(root, split=split_name, train=flag, download=download) for flag in (True, False))
    offset = _emnist_offset(split_name)
    # EMNIST's files hold each image transposed; swapping H and W makes the characters upright.
    splits = [Split(part.data.transpose(1, 2).unsqueeze(1), part.targets - offset) for part in (train, test)]
    return Dataset(f"emnist_{split_name}", *splits, _emnist_classes(split_name))


def _emnist_offset(split_name: str) -> int:
    # EMNIST letters are labelled 1..26 (0 is an unused "N/A" class): shift to 0..25 and drop the name.
    return 1 if split_name == "letters" else 0


def _emnist_classes(split_name: str) -> tuple[str, ...]:
    return tuple(_tv().datasets.EMNIST.classes_split_dict[split_name][_emnist_offset(split_name):])


def _emnist_files(split_name: str) -> tuple[str, ...]:
    return _idx_files("EMNIST", prefix=f"emnist-{split_name}-", names=("train", "test"))


def _emnist_published(train: int, test: int, num_classes: int, split_name: str) -> Published:
    return Published(train, test, _DIGIT_SHAPE, num_classes, lambda: _emnist_classes(split_name))


@dataset("emnist_balanced", files=_emnist_files("balanced"), gzipped=True, zip_name="gzip.zip",
         published=_emnist_published(112800, 18800, 47, "balanced"))
def _emnist_balanced(root: Path, download: bool) -> Dataset:
    return _emnist("balanced", root, download)


@dataset("emnist_letters", files=_emnist_files("letters"), gzipped=True, zip_name="gzip.zip",
         published=_emnist_published(124800, 20800, 26, "letters"))
def _emnist_letters(root: Path, download: bool) -> Dataset:
    return _emnist("letters", root, download)


@dataset("emnist_digits", files=_emnist_files("digits"), gzipped=True, zip_name="gzip.zip",
         published=_emnist_published(240000, 40000, 10, "digits"))
def _emnist_digits(root: Path, download: bool) -> Dataset:
    return _emnist("digits", root, download)


@dataset("qmnist", files=_idx_files("QMNIST", prefix="qmnist-", labels="labels-idx2-int", names=("train", "test")),
         gzipped=True, published=Published(60000, 60000, _DIGIT_SHAPE, 10, _classes_of("QMNIST")))
def _qmnist(root: Path, download: bool) -> Dataset:
    train, test = (_tv().datasets.QMNIST(root, what=what, download=download) for what in ("train", "test"))
    # QMNIST's targets are N×8 (class, writer, NIST ids, ...); column 0 is the class, as MNIST's.
    splits = [Split(part.data.unsqueeze(1), part.targets[:, 0]) for part in (train, test)]
    return Dataset("qmnist", *splits, tuple(train.classes))


@dataset("svhn", files=("SVHN/train_32x32.mat", "SVHN/test_32x32.mat"),
         published=Published(73257, 26032, _DIGIT_SHAPE, 10, lambda: string.digits))
def _svhn(root: Path, download: bool) -> Dataset:
    # torchvision reads SVHN's files from the folder it is given; a subfolder keeps the data root tidy.
    parts = [_tv().datasets.SVHN(root / "SVHN", split=split, download=download) for split in ("train", "test")]
    # torchvision already maps SVHN's label 10 to digit 0; .data is N×3×32×32 uint8.
    splits = [Split(_to_grid(torch.from_numpy(part.data), gray=True, size=GRID), _labels(part.labels)) for part in parts]
    return Dataset("svhn", *splits, tuple(string.digits))


@dataset("usps", files=("USPS/usps.bz2", "USPS/usps.t.bz2"),
         published=Published(7291, 2007, _DIGIT_SHAPE, 10, lambda: string.digits))
def _usps(root: Path, download: bool) -> Dataset:
    parts = [_tv().datasets.USPS(root / "USPS", train=flag, download=download) for flag in (True, False)]
    # torchvision maps USPS's [-1, 1] pixels to uint8 0..255 (N×16×16) and its labels 1..10 to 0..9.
    splits = [Split(_to_grid(_uint8(part.data)[:, None], gray=True, size=GRID), _labels(part.targets)) for part in parts]
    return Dataset("usps", *splits, tuple(string.digits))


_CIFAR10_FILES = tuple(
    f"cifar-10-batches-py/{f}" for f in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
)


@dataset("cifar10", files=_CIFAR10_FILES,
         published=Published(50000, 10000, (3, COLOUR_GRID, COLOUR_GRID), 10, lambda: _CIFAR10_CLASSES))
def _cifar10(root: Path, download: bool) -> Dataset:
    train, test = (_tv().datasets.CIFAR10(root, train=flag, download=download) for flag in (True, False))
    # CIFAR10.data is N×H×W×C; the grid is channels-first.
    splits = [Split(_uint8(part.data).permute(0, 3, 1, 2), _labels(part.targets)) for part in (train, test)]
    return Dataset("cifar10", *splits, tuple(train.classes))


@dataset("cifar10_gray", files=_CIFAR10_FILES,
         published=Published(50000, 10000, (1, COLOUR_GRID, COLOUR_GRID), 10, lambda: _CIFAR10_CLASSES))
def _cifar10_gray(root: Path, download: bool) -> Dataset:
    colour = _cifar10(root, download)  # not load(): a missing file should be reported under this set's name
    splits = [Split(_to_grid(part.images, gray=True, size=COLOUR_GRID), part.labels) for part in (colour.train, colour.test)]
    return Dataset("cifar10_gray", *splits, colour.class_names)


# ---------------------------------------------------------------------------------------------- torchvision's archives

def _archive_sources(entry: _Entry, file: str) -> list[tuple[str, str | None]]:
    """Where torchvision's download may hold `file`: (path under the root, member of that zip or None), best first.

    torchvision downloads FILE.gz next to FILE; for EMNIST it downloads gzip.zip, extracts it to a gzip/
    folder of NAME.gz files, decompresses those next to gzip.zip and deletes the folder.
    """
    if not entry.gzipped:
        return []
    folder, _, name = file.rpartition("/")
    sources: list[tuple[str, str | None]] = [(f"{file}.gz", None)]
    if entry.zip_name:
        sources += [(f"{folder}/gzip/{name}.gz", None), (f"{folder}/{entry.zip_name}", f"gzip/{name}.gz")]
    return sources


def _archive_of(entry: _Entry, root: Path, file: str) -> tuple[Path, str | None] | None:
    for path, member in _archive_sources(entry, file):
        if (root / path).is_file() and (member is None or _zip_holds(root / path, member)):
            return root / path, member
    return None


def _zip_holds(archive: Path, member: str) -> bool:
    """Whether `archive` lists `member`; a damaged zip counts as holding it, so that the load names the damage."""
    try:
        with zipfile.ZipFile(archive) as opened:
            return member in opened.namelist()
    except zipfile.BadZipFile:
        return True


def _unpack(entry: _Entry, root: Path) -> None:
    """Decompress torchvision's downloaded archives of `entry`'s absent files next to them, as its download does.

    torchvision's loaders read only decompressed files and decompress only inside download(); doing that step
    here lets a root of torchvision's downloads load offline through torchvision's own code, and leaves the
    root as torchvision's download would (archives kept). Decompressing once beats reading the archives on
    every load: a decompressed IDX file is read at disk speed, and every trial on a node loads the set.
    """
    for file in entry.files:
        source = None if (root / file).is_file() else _archive_of(entry, root, file)
        if source is not None:
            _decompress(*source, root / file)


def _decompress(archive: Path, member: str | None, target: Path) -> None:
    """gunzip `archive` (or its zip `member`) to `target`, via a temporary name so no reader sees half a file."""
    where = f"{member} inside {archive}" if member else str(archive)
    part: Path | None = None
    try:
        with contextlib.ExitStack() as stack:
            if member:
                packed = stack.enter_context(stack.enter_context(zipfile.ZipFile(archive)).open(member))
            else:
                packed = stack.enter_context(open(archive, "rb"))
            unpacked = stack.enter_context(gzip.GzipFile(fileobj=packed))
            out = stack.enter_context(
                tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".part", delete=False)
            )
            part = Path(out.name)
            shutil.copyfileobj(unpacked, out, _COPY_CHUNK)
        os.replace(part, target)  # atomic: trials on one node may decompress the same file at once
    except (EOFError, zlib.error, zipfile.BadZipFile, gzip.BadGzipFile) as exc:
        raise XferError(
            f"{where} is damaged ({exc}), perhaps a partial download; delete it and run once with network and "
            f"--download, or replace it with torchvision's original."
        ) from None
    except OSError as exc:
        raise XferError(
            f"cannot decompress {where} to {target} ({exc}); xfer decompresses torchvision's archives next to them, "
            f"as torchvision's download does. Make {target.parent} writable, or decompress the archive there "
            f"yourself (e.g. gunzip -k)."
        ) from None
    finally:
        if part is not None and part.exists():
            part.unlink()
