"""A user's own folder of class subfolders (`imagefolder:PATH`), read with torchvision's ImageFolder and resized
to the canonical grid; unreadable files stop the load or, asked, are skipped and listed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xfer.data import (COLOUR_GRID, EMBEDDED_SPLIT_SEED, GRID, IMAGEFOLDER, Dataset, Split, _split_pool,
                       _to_grid, _tv)
from xfer.errors import XferError

IMAGEFOLDER_TRAIN_FRACTION = 0.8  # an image folder without train/ and test/ is split 80 / 20, stratified
IMAGEFOLDER_COLOUR_SPREAD = 2.0   # mean per-pixel channel spread (gray levels) above which an image is colour;
                                  # JPEG noise on a gray image stays below it


# ---------------------------------------------------------------------------------------------- image folders

def folder_of(name: str, root: Path) -> Path:
    """The folder of ``imagefolder:PATH``: PATH itself if absolute, else PATH under the data root.

    Relative to the root (not the working directory) so the same spec names the same folder on every machine.
    """
    path = Path(name[len(IMAGEFOLDER):]).expanduser()
    return path if path.is_absolute() else root / path


def image_folder(name: str, root: Path, skip_bad_images: bool) -> Dataset:
    """A user's folder of class subfolders, using its train/ and test/ when both exist, else an 80/20 split.

    Gray folders become 1×28×28 (the digit grid); a folder with any colour image becomes 3×32×32 (the
    CIFAR grid). Images are resized to the grid, not cropped. With `skip_bad_images`, unreadable files are
    left out and named in `skipped`; otherwise the first one stops the load.
    """
    folder = folder_of(name, root)
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
