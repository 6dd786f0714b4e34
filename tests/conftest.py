"""Shared fixtures: small real datasets written in torchvision's own on-disk layouts."""

from __future__ import annotations

import bz2
import hashlib
import pickle
import shutil
import string
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision

TINY_TRAIN_PER_CLASS = 3   # each torchvision-backed set in `tiny_root` has this many train images per class ...
TINY_TEST_PER_CLASS = 1    # ... and this many test images per class

# SVHN's tiny images cycle through these solid colours (RGB), so the gray conversion has known answers.
SVHN_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0))
# USPS's tiny images cycle through these: solid -1, 0, 1 (its pixel range) and a left -1 / right +1 split.
USPS_PATTERNS = ("black", "mid", "white", "split")


@dataclass(frozen=True)
class TinyRoot:
    """A data root with every torchvision-backed set, and what was written, in each set's natural form.

    ``written[name][part]`` is ``(images, labels)`` for part "train" / "test": upright N×H×W uint8 for the
    IDX sets (EMNIST's file holds the transpose), N×32×32×3 for SVHN and CIFAR-10, N×16×16 floats in
    [-1, 1] for USPS; labels 0-based, as xfer should return them.
    """

    path: Path
    written: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyRoot]:
    """Every torchvision-backed set, a few images per class, in torchvision's real file layout.

    Written once per session and read-only from then on (about 40 tests read it): a test that needs more files
    beside these makes its own root (test_targets' hot-dog folder links the CIFAR-10 files into one).
    SVHN and CIFAR-10 check MD5 sums of their files; the fixture sets torchvision's expected sums to those of the
    files it wrote, for the session, so the rest of torchvision's loading code runs unchanged.
    """
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _write_tiny_root(TinyRoot(tmp_path_factory.mktemp("tiny") / "data"), monkeypatch)


def _write_tiny_root(root: TinyRoot, monkeypatch: pytest.MonkeyPatch) -> TinyRoot:
    rng = np.random.default_rng(0)
    for name, folder in (("mnist", "MNIST"), ("kmnist", "KMNIST"), ("fashion_mnist", "FashionMNIST")):
        root.written[name] = _write_mnist_like(root.path / folder / "raw", "", ("train", "t10k"), 10, rng)
    for split, classes in (("balanced", 47), ("letters", 26), ("digits", 10)):
        root.written[f"emnist_{split}"] = _write_mnist_like(
            root.path / "EMNIST" / "raw", f"emnist-{split}-", ("train", "test"), classes, rng,
            transpose=True, label_offset=1 if split == "letters" else 0,
        )
    root.written["qmnist"] = _write_mnist_like(root.path / "QMNIST" / "raw", "qmnist-", ("train", "test"), 10, rng, qmnist=True)
    root.written["svhn"] = _write_svhn(root.path / "SVHN", monkeypatch)
    root.written["usps"] = _write_usps(root.path / "USPS")
    root.written["cifar10"] = _write_cifar10(root.path / "cifar-10-batches-py", rng, monkeypatch)
    root.written["cifar10_gray"] = root.written["cifar10"]
    return root


def _labels(classes: int, per_class: int) -> np.ndarray:
    return np.tile(np.arange(classes), per_class)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX ("ubyte"/"int") file as LeCun's MNIST and QMNIST ship them: big-endian header and data."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def _write_mnist_like(raw: Path, prefix: str, parts: tuple[str, str], classes: int, rng: np.random.Generator,
                      transpose: bool = False, label_offset: int = 0, qmnist: bool = False) -> dict:
    written = {}
    for part, stored, per_class in zip(("train", "test"), parts, (TINY_TRAIN_PER_CLASS, TINY_TEST_PER_CLASS)):
        labels = _labels(classes, per_class)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        images[0] = 0
        images[0, 4:24, 6] = 255   # image 0 is an upright "L": a vertical bar at column 6 ...
        images[0, 23, 6:20] = 255  # ... and a foot along row 23
        write_idx(raw / f"{prefix}{stored}-images-idx3-ubyte", images.transpose(0, 2, 1).copy() if transpose else images)
        if qmnist:  # QMNIST's labels are N×8 int32: class, then writer and NIST ids
            extra = np.stack([labels, 1000 + np.arange(len(labels))] + [np.zeros_like(labels)] * 6, 1).astype(np.int32)
            write_idx(raw / f"{prefix}{stored}-labels-idx2-int", extra)
        else:
            write_idx(raw / f"{prefix}{stored}-labels-idx1-ubyte", (labels + label_offset).astype(np.uint8))
        written[part] = (images, labels)
    return written


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_svhn(folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    folder.mkdir(parents=True)
    written = {}
    for part, per_class in (("train", TINY_TRAIN_PER_CLASS), ("test", TINY_TEST_PER_CLASS)):
        labels = _labels(10, per_class)
        colours = np.array([SVHN_COLOURS[i % len(SVHN_COLOURS)] for i in range(len(labels))], dtype=np.uint8)
        images = np.broadcast_to(colours[:, None, None, :], (len(labels), 32, 32, 3)).copy()
        path = folder / f"{part}_32x32.mat"
        # SVHN's .mat: X is H×W×3×N, y is N×1 with 10 standing for the digit 0.
        stored_labels = np.where(labels == 0, 10, labels)[:, None].astype(np.uint8)
        scipy.io.savemat(path, {"X": images.transpose(1, 2, 3, 0), "y": stored_labels})
        url, filename, _ = torchvision.datasets.SVHN.split_list[part]
        monkeypatch.setitem(torchvision.datasets.SVHN.split_list, part, [url, filename, _md5(path)])
        written[part] = (images, labels)
    return written


def _write_usps(folder: Path) -> dict:
    folder.mkdir(parents=True)
    written = {}
    for part, filename, per_class in (("train", "usps.bz2", TINY_TRAIN_PER_CLASS), ("test", "usps.t.bz2", TINY_TEST_PER_CLASS)):
        labels = _labels(10, per_class)
        images = np.zeros((len(labels), 16, 16), dtype=np.float32)
        for i in range(len(labels)):
            pattern = USPS_PATTERNS[i % len(USPS_PATTERNS)]
            images[i] = {"black": -1.0, "mid": 0.0, "white": 1.0}.get(pattern, 0.0)
            if pattern == "split":
                images[i, :, :8], images[i, :, 8:] = -1.0, 1.0
        # libsvm lines: "label index:value ..." with labels 1..10 for the digits 0..9.
        lines = [
            f"{label + 1} " + " ".join(f"{j + 1}:{v:g}" for j, v in enumerate(image.ravel()))
            for image, label in zip(images, labels)
        ]
        (folder / filename).write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
        written[part] = (images, labels)
    return written


def _write_cifar10(folder: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> dict:
    folder.mkdir(parents=True)
    cls = torchvision.datasets.CIFAR10
    train_labels = _labels(10, TINY_TRAIN_PER_CLASS)
    test_labels = _labels(10, TINY_TEST_PER_CLASS)
    train_images = rng.integers(0, 256, (len(train_labels), 32, 32, 3), dtype=np.uint8)
    test_images = rng.integers(0, 256, (len(test_labels), 32, 32, 3), dtype=np.uint8)
    batches = np.array_split(np.arange(len(train_labels)), len(cls.train_list))

    def dump(name: str, entry: dict) -> list[str]:
        path = folder / name
        path.write_bytes(pickle.dumps(entry, protocol=2))
        return [name, _md5(path)]

    def batch(images: np.ndarray, labels: np.ndarray) -> dict:
        # CIFAR's pickles hold each image as 3072 bytes: the R, G and B planes, row-major.
        return {"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), "labels": labels.tolist()}

    train_list = [dump(name, batch(train_images[i], train_labels[i])) for (name, _), i in zip(cls.train_list, batches)]
    test_list = [dump(cls.test_list[0][0], batch(test_images, test_labels))]
    meta_name, meta_md5 = dump(cls.meta["filename"], {"label_names": [f"class_{c}" for c in string.ascii_lowercase[:10]]})
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", test_list)
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": meta_md5})
    return {"train": (train_images, train_labels), "test": (test_images, test_labels)}


# ---- shared service fixtures: a real MLflow server and a real local Ray, one of each per session ----
from tracking_fixtures import Server, experiment, mlflow_server  # noqa: E402,F401


@pytest.fixture
def own_tiny_root(tiny_root: TinyRoot, tmp_path: Path) -> TinyRoot:
    """A private copy of the session's tiny root, for a test that changes its files (gzips, deletes, damages or
    touches them): the session's stays read-only for the others."""
    copy = tmp_path / "data"
    shutil.copytree(tiny_root.path, copy, symlinks=True)
    return TinyRoot(copy, tiny_root.written)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread in the test process: its models are tiny, and two OpenMP threads on two cores mostly
    wait for each other at barriers, all the more while Ray workers or other jobs hold the cores. Measured back to
    back on a shared 2-core machine, test_packs + test_train + test_targets took 161 s and 134 CPU-s with two
    threads, 53 s and 64 CPU-s with one. Ray trials size their own (`tune_adapter.start_trial`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `own_ray` shut the session's Ray down to start a cluster of their own, so they run after all
    the others (stable order otherwise): the session's Ray then starts once, not again after them."""
    items.sort(key=lambda item: item.get_closest_marker("own_ray") is not None)


@pytest.fixture(scope="session")
def full_grid():
    """`sweeps/full_grid.py` as a module: the main job is a script, not part of the package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("full_grid", Path(__file__).resolve().parent.parent / "sweeps" / "full_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_RAY_ENV: dict[str, str] = {}   # the worker environment the running local Ray was started with


@pytest.fixture
def local_ray(mlflow_server: Server):
    """A 2-CPU local Ray whose workers log to the session's MLflow server, kept for the session.

    Started again if a test shut it down (the two-node test does, which is why it is marked `own_ray` and runs
    last), or if the tracking environment changed since Ray started: Ray workers keep the environment of
    `ray.init`, and would log to another server.
    """
    import ray

    from xfer import server

    env = server.worker_env()
    if ray.is_initialized() and env != _RAY_ENV:
        ray.shutdown()
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, runtime_env={"env_vars": env})
        _RAY_ENV.clear()
        _RAY_ENV.update(env)
    return ray


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_exit():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
