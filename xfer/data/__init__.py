"""Datasets as uint8 tensors in one canonical shape: the registry, loading, planning facts, splits.

Digit and character sets share the 1×28×28 grid (MNIST's); CIFAR keeps 3×32×32. Every loader returns whole
splits as tensors, so training slices them on the device and never sees a DataLoader or PIL. The sets register
themselves from their modules: torchvision's files (`torchvision_sets`), the sets shipped with the install or
rendered from its fonts (`embedded`), and a user's image folders (`folders`).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from xfer import jsonfile
from xfer.errors import XferError
from xfer.registry import Registry


DATA_ENV = "XFER_DATA"          # environment variable naming the data root when none is passed
IMAGEFOLDER = "imagefolder:"    # prefix of a user's own folder of class subfolders: "imagefolder:PATH"

GRID = 28                       # the digit/character grid is 1×GRID×GRID
BOX = 20                        # offline characters fill a BOX×BOX square centred in the grid, as MNIST's digits do
COLOUR_GRID = 32                # colour sets (CIFAR-10, colour image folders) are 3×32×32
LUMA = (0.299, 0.587, 0.114)    # ITU-R BT.601 weights for R, G, B -> gray
EMBEDDED_SPLIT_SEED = 0         # seed of the fixed train/test split of mnist5k, uci_digits and image folders
_CHUNK = 4096                   # images converted per batch: bounds the float copy of a big split to ~50 MB



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


# ---------------------------------------------------------------------------------------------- label sets

_NAMED_DIGIT = re.compile(r"^(\d+) - \w+$")   # torchvision's MNIST and QMNIST: "0 - zero", "1 - one", ...


def label_set(class_names: Sequence[str]) -> tuple[str, ...]:
    """The classes a head predicts, in label order, under one spelling per class: torchvision names MNIST's and
    QMNIST's digits "0 - zero"…, USPS's, SVHN's and EMNIST's "0"…, and a digit is a digit. Two models classify
    the same labels when their label sets are equal (`same_labels`)."""
    return tuple(m.group(1) if (m := _NAMED_DIGIT.match(name)) else name for name in class_names)


def same_labels(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether heads over class names `a` and `b` predict the same labels in the same order."""
    return label_set(a) == label_set(b)


# ---------------------------------------------------------------------------------------------- registry

Loader = Callable[[Path, bool], Dataset]
"""``loader(root, download) -> Dataset``: `root` is the absolute data root; `download` may fetch files there."""


class Published(NamedTuple):
    """A torchvision set's published facts in xfer's canonical shape: what planning (`info`) and its synthetic
    stand-in (`stand_in`) use while its files are absent. A tuple, so ``train, *_ = PUBLISHED[name]`` reads it."""

    train: int
    test: int
    in_shape: tuple[int, int, int]
    num_classes: int
    # The class names its loader returns. A function: most come from torchvision, whose import takes seconds that
    # planning never needs; only a stand-in calls it. num_classes is stated apart for the same reason.
    classes: Callable[[], Sequence[str]]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.classes())


@dataclass(frozen=True)
class _Entry:
    load: Loader
    files: tuple[str, ...]      # paths under the data root an offline load needs (what `missing` checks)
    embedded: bool              # needs no files at all; built once per process whatever the root
    gzipped: bool               # each file may lie there as torchvision downloads it, FILE.gz, instead
    zip_name: str | None        # ... or inside this zip (in the files' folder) as gzip/NAME.gz: EMNIST's gzip.zip


_REGISTRY: Registry[_Entry] = Registry("dataset", "datasets", "the loader")

PUBLISHED: dict[str, Published] = {}
"""The published facts of the sets registered with them (torchvision's), by name: a grid is planned and costed
(`info(..., published=True)`), or run on stand-ins (`stand_in`), before its data arrives."""


def dataset(
    name: str, files: tuple[str, ...] = (), embedded: bool = False, gzipped: bool = False, zip_name: str | None = None,
    published: Published | None = None,
) -> Callable[[Loader], Loader]:
    """Register ``loader(root, download) -> Dataset`` under `name`.

    `files` lists the paths (relative to the data root) that an offline load needs; `missing` checks
    them and the not-found message names them. With `gzipped`, a file may instead be present as the
    ``.gz`` archive torchvision downloads (or as a ``gzip/NAME.gz`` member of the zip `zip_name`); it is
    decompressed next to it before the loader runs. `embedded` sets read nothing from the root.
    `published` states what the loader would return (sizes, shape, classes) without its files.
    """
    def register(loader: Loader) -> Loader:
        if name.startswith(IMAGEFOLDER):   # taken by the user's own folders
            _REGISTRY.refuse_taken(name)
        _REGISTRY.add(name, _Entry(loader, files, embedded, gzipped, zip_name))
        if published is not None:
            PUBLISHED[name] = published
        return loader
    return register


def list_datasets() -> list[str]:
    """Registered dataset names (``imagefolder:PATH`` is accepted on top of these)."""
    return _REGISTRY.names()


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
            from xfer.data.folders import image_folder

            _loaded[key] = image_folder(name, root, skip_bad_images)
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
    # "loaded" | "cache" (files unchanged since) | "published" (files absent) | "synthetic" (files absent: its
    # stand-in, with the published facts, takes its place)
    source: str = "loaded"
    # What its models classify: the plan counts the attack stage's cells with them (a surrogate of another label set
    # runs one feature attack for several logit attacks). () = not known (a cache written before they were kept).
    class_names: tuple[str, ...] = ()


def info(name: str, root: str | Path | None = None, cache: Path | None = None, skip_bad_images: bool = False,
         published: bool = False, download: bool = False, stand_in: bool = False) -> Info:
    """A dataset's `Info`, read from `cache` (a JSON file) when the set's files are unchanged since it was
    recorded there, else by loading the set (and recording it). A finished grid's rerun plans from the cache
    and loads no images. With `published`, a torchvision set whose files are absent is described by its
    published facts (`PUBLISHED`) instead of being refused; with `stand_in`, likewise, as the synthetic set that
    will take its place (`stand_in()`: the same facts, source "synthetic"). A set whose files are here is
    described as it is, either way.
    """
    root = data_root(root)
    if (published or stand_in) and name in PUBLISHED and _absent_files(_entry(name), root):
        facts = PUBLISHED[name]
        return Info(name, facts.train, facts.test, facts.in_shape, facts.num_classes,
                    "synthetic" if stand_in else "published", facts.class_names)
    key, signature = f"{name}|{root}|skip_bad_images={skip_bad_images}", _signature(name, root)
    known = _read_cache(cache)
    if signature and key in known and known[key].get("signature") == signature:
        kept = known[key]["info"]   # an older file's entries have no class_names: read as not known
        return Info(**{**kept, "in_shape": tuple(kept["in_shape"]), "class_names": tuple(kept.get("class_names", ())),
                       "source": "cache"})
    ds = load(name, root, download, skip_bad_images)
    found = Info(name, len(ds.train), len(ds.test), ds.in_shape, ds.num_classes, class_names=tuple(ds.class_names))
    if cache is not None and signature:
        jsonfile.update(cache, key, {"signature": signature, "info": {k: v for k, v in vars(found).items() if k != "source"}},
                        indent=1)
    return found


_stand_ins: dict[str, Dataset] = {}  # in-process cache, as `load`'s: each stand-in is built once


def stand_in(name: str) -> Dataset:
    """A synthetic `Dataset` in place of the torchvision set `name`: its published sizes, canonical shape and
    class names (`PUBLISHED`), with made-up images.

    It stands in for the real files, never for results: it lets a grid run its whole path (training, checkpoints,
    attacks, the report) where the files are absent, as a fast dev run does. Each class is a fixed random template
    plus noise, so a step learns a little rather than nothing; labels are balanced over the classes. Deterministic:
    seeded from the name, the same in every process and run. Built once per process.
    """
    if name not in PUBLISHED:
        raise XferError(
            f"there is no synthetic stand-in for dataset {name!r}: stand-ins copy a torchvision set's published sizes "
            f"and classes, and exist for {', '.join(sorted(PUBLISHED))}. Embedded sets need no files, and an image "
            "folder has no published facts, so those are always loaded as they are."
        )
    if name not in _stand_ins:
        _stand_ins[name] = _synthesise(name, PUBLISHED[name])
    return _stand_ins[name]


def _synthesise(name: str, facts: Published) -> Dataset:
    # sha256, not hash(): Python salts str hashes per process, and every trial must build the same set.
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "little")
    generator = torch.Generator().manual_seed(seed)
    templates = torch.randint(0, 128, (facts.num_classes, *facts.in_shape), dtype=torch.uint8, generator=generator)
    splits = [_synthetic_split(templates, n, generator) for n in (facts.train, facts.test)]
    return Dataset(name, *splits, facts.class_names)


def _synthetic_split(templates: torch.Tensor, n: int, generator: torch.Generator) -> Split:
    """`n` images of the templates' classes, each class n // k or n // k + 1 times, in a seeded order."""
    labels = (torch.arange(n) % len(templates))[torch.randperm(n, generator=generator)]
    # uint8 throughout: template (< 128) + noise (< 128) cannot overflow, and no float copy of the split is made.
    images = torch.randint(0, 128, (n, *templates.shape[1:]), dtype=torch.uint8, generator=generator)
    images += templates[labels]
    return Split(images, labels)


def _signature(name: str, root: Path) -> str:
    """What a dataset's content depends on: its files' names, sizes and times (a folder's too); for an
    embedded set, the source of the module that makes it (xfer.data.embedded). "" when it cannot be told."""
    if name.startswith(IMAGEFOLDER):
        from xfer.data.folders import folder_of

        folder = folder_of(name, root)
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    else:
        entry = _entry(name)
        if entry.embedded:
            return "embedded:" + hashlib.sha256(Path(_embedded_sets.__file__).read_bytes()).hexdigest()[:16]
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
    return jsonfile.read_dict(cache)


def missing(names: Iterable[str], root: str | Path | None = None) -> list[str]:
    """Which of `names` cannot be loaded offline from the data root (a cheap check for expected files).

    A file counts as present as torchvision downloads it too (``.gz``; EMNIST's ``gzip.zip``). Embedded
    sets are never missing; an image folder is missing when its folder is.
    """
    root = data_root(root)
    absent = []
    for name in names:
        if name.startswith(IMAGEFOLDER):
            if not folders.folder_of(name, root).is_dir():
                absent.append(name)
        elif _absent_files(_entry(name), root):
            absent.append(name)
    return absent


def describe_missing(name: str, root: str | Path | None = None) -> str:
    """For a message: what `name` lacks under the data root, e.g. "train-images-idx3-ubyte, ... in /data/KMNIST/raw
    (or train-images-idx3-ubyte.gz, ..., as torchvision downloads them)"; "" when nothing is missing."""
    root = data_root(root)
    if name.startswith(IMAGEFOLDER):
        folder = folders.folder_of(name, root)
        return "" if folder.is_dir() else f"the folder {folder}"
    entry = _entry(name)
    absent = _absent_files(entry, root)
    return _describe(entry, root, absent) if absent else ""


def _entry(name: str) -> _Entry:
    return _REGISTRY.get(name, also=f", or {IMAGEFOLDER}PATH for a folder with one subfolder of images per class")


def _absent_files(entry: _Entry, root: Path) -> list[str]:
    """`entry`'s files that are under the root neither as they are nor as torchvision's download of them."""
    return [f for f in entry.files if not (root / f).is_file() and torchvision_sets._archive_of(entry, root, f) is None]


def _call(name: str, entry: _Entry, root: Path, download: bool) -> Dataset:
    """Run a loader, turning torchvision's missing-file and download failures into one readable paragraph."""
    torchvision_sets._unpack(entry, root)
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
    offline = "with no network, use a set that needs no files: " + ", ".join(n for n in list_datasets() if _REGISTRY.get(n).embedded)
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



def _split_pool(pool: Split, n_train: int, seed: int) -> tuple[Split, Split]:
    """A stratified, seeded train/test split of one pool of examples."""
    train_index = stratified_indices(pool.labels, n_train, seed)
    return pool.subset(train_index), pool.subset(_complement(train_index, len(pool)))


def _complement(index: torch.Tensor, n: int) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[index] = False
    return keep.nonzero().squeeze(1)



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
    "Info", "info", "PUBLISHED", "Published", "stand_in", "Split", "Dataset", "Splits", "Loader", "dataset",
    "label_set", "same_labels",
    "list_datasets", "data_root", "load", "missing", "describe_missing",
    "make_splits", "stratified_indices", "channel_stats", "DATA_ENV", "IMAGEFOLDER",
]

# The sets register themselves on import (each module's @dataset loaders). Last, as they import the registry above:
# so the functions here reach their modules (torchvision_sets' archives too) through these names, at call time.
from xfer.data import embedded as _embedded_sets, folders, torchvision_sets  # noqa: E402
