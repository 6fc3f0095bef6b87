"""The scikit-learn handwritten digits as an image dataset for the bundled ARPG model.

`sklearn.datasets.load_digits` holds 1,797 greyscale 8x8 images with 17 grey levels (0 = paper, 16 = ink) of the
digits 0-9. This module fixes a stratified, seeded train / test split, renders images as RGB PIL images (dark ink on
white paper, every digit pixel a `scale` x `scale` block: 32x32 for scale 4) and maps rendered or generated images
back to the dataset's 8x8 grid of grey levels (the features of the quality benchmark); rendering and reading back
agrees to within 8/255 of a grey level (the rounding to 8-bit grey values).

scikit-learn is needed only here (not by the pipeline): ``pip install scikit-learn``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from .optional_dependencies import require

# The split is part of the bundled model's contract: the benchmark's "real test" images were never trained on.
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0
NUM_CLASSES = 10
GRID_SIZE = 8  # the dataset's images are 8x8
MAX_LEVEL = 16  # grey levels 0..16
DEFAULT_SCALE = 4  # 8x8 -> 32x32 pixels
CLASS_NAMES = tuple(str(digit) for digit in range(NUM_CLASSES))


@dataclass(frozen=True)
class DigitsSplit:
    """One part of the split.

    Args:
        pixels (`np.ndarray` of shape `(n, 8, 8)`, float64): grey levels in [0, 16], 16 = ink.
        labels (`np.ndarray` of shape `(n,)`, int64): the digit of every image.
        indices (`np.ndarray` of shape `(n,)`, int64): row of every image in `load_digits()`, increasing.
    """

    pixels: np.ndarray
    labels: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def flat_pixels(self) -> np.ndarray:
        """`(n, 64)` float64 grey levels, the classifier / Frechet features."""
        return self.pixels.reshape(len(self), -1)


def stratified_split_indices(
    labels: np.ndarray, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices (both sorted): `round(n_c * test_fraction)` random rows of every class `c` go to test.

    Deterministic for a given `seed` (numpy's PCG64 `default_rng`, one permutation per class in class order), and
    independent of the scikit-learn version.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        count = int(round(len(rows) * test_fraction))
        test.append(rows[rng.permutation(len(rows))[:count]])
    test_indices = np.sort(np.concatenate(test))
    train_indices = np.setdiff1d(np.arange(len(labels)), test_indices)
    return train_indices, test_indices


def load_digits_split(
    test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SPLIT_SEED
) -> tuple[DigitsSplit, DigitsSplit]:
    """The fixed split of the bundled model: (train, test) with 1,437 and 360 images for the defaults."""
    sklearn_datasets = require("sklearn.datasets", "digits", "arpg_hf.digits.load_digits_split", package="scikit-learn")
    data = sklearn_datasets.load_digits()
    pixels, labels = data.images.astype(np.float64), data.target.astype(np.int64)
    train_indices, test_indices = stratified_split_indices(labels, test_fraction, seed)
    return tuple(DigitsSplit(pixels[rows], labels[rows], rows) for rows in (train_indices, test_indices))


# ------------------------------------------------------------------------------------------------ rendering


def render_digits(pixels: np.ndarray, scale: int = DEFAULT_SCALE) -> list[Image.Image]:
    """Grey levels `(n, 8, 8)` in [0, 16] -> RGB PIL images `(8 * scale) x (8 * scale)`, dark ink on white.

    Level `v` becomes the grey value `round(255 * (1 - v / 16))`; each digit pixel becomes a `scale` x `scale` block.
    """
    pixels = np.asarray(pixels, dtype=np.float64)
    if pixels.ndim != 3 or pixels.shape[1:] != (GRID_SIZE, GRID_SIZE):
        raise ValueError(f"Expected grey levels of shape (n, 8, 8), got {pixels.shape}.")
    if pixels.size and (pixels.min() < 0 or pixels.max() > MAX_LEVEL):
        raise ValueError(f"Grey levels must lie in [0, {MAX_LEVEL}], got [{pixels.min()}, {pixels.max()}].")
    grey = np.rint(255.0 * (1.0 - pixels / MAX_LEVEL)).astype(np.uint8)  # (n, 8, 8)
    blocks = grey.repeat(scale, axis=1).repeat(scale, axis=2)  # (n, 8s, 8s)
    return [Image.fromarray(np.stack([block] * 3, axis=-1)) for block in blocks]


def pixels_from_images(images: Sequence[Image.Image] | np.ndarray) -> np.ndarray:
    """Rendered or generated images -> grey levels `(n, 8, 8)` float64 in [0, 16] (the inverse of `render_digits`).

    Args:
        images: PIL images (any mode) or an array `(n, H, W, 3)` / `(n, H, W)` with values in [0, 1] (the pipeline's
            `output_type="np"`); `H` and `W` must be multiples of 8. Each 8x8 cell is the mean of its block.
    """
    if isinstance(images, np.ndarray):
        array = images.astype(np.float64)
        if array.ndim == 4:
            array = array.mean(axis=-1)  # (n, H, W)
        array = array * 255.0
    else:
        array = np.stack([np.asarray(image.convert("L"), dtype=np.float64) for image in images])  # (n, H, W)
    if array.ndim != 3 or array.shape[1] % GRID_SIZE or array.shape[2] % GRID_SIZE:
        raise ValueError(f"Expected images whose sides are multiples of {GRID_SIZE}, got shape {array.shape}.")
    n, height, width = array.shape
    cells = array.reshape(n, GRID_SIZE, height // GRID_SIZE, GRID_SIZE, width // GRID_SIZE).mean(
        axis=(2, 4)
    )  # (n, 8, 8)
    return np.clip(MAX_LEVEL * (1.0 - cells / 255.0), 0.0, MAX_LEVEL)


def export_image_folder(split: DigitsSplit, directory: str | os.PathLike, scale: int = DEFAULT_SCALE) -> int:
    """Writes `directory/<digit>/<row>.png` (one sub-folder per class, as `pipelines/tokenize_dataset.py` reads).

    Returns the number of images written.
    """
    images = render_digits(split.pixels, scale)
    for label in range(NUM_CLASSES):
        os.makedirs(os.path.join(directory, CLASS_NAMES[label]), exist_ok=True)
    for image, label, row in zip(images, split.labels, split.indices):
        image.save(os.path.join(directory, CLASS_NAMES[int(label)], f"{int(row):04d}.png"))
    return len(images)
