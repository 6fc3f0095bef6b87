"""The digits dataset of the bundled model: the fixed stratified split, rendering and reading back, image folders."""

import numpy as np
import pytest
from PIL import Image

from arpg_hf.digits import (
    CLASS_NAMES,
    export_image_folder,
    load_digits_split,
    pixels_from_images,
    render_digits,
    stratified_split_indices,
)

# ---------------------------------------------------------------------------------------------------- split


def test_stratified_split_takes_the_rounded_fraction_of_every_class():
    labels = np.array([0] * 10 + [1] * 25 + [2] * 7)
    train, test = stratified_split_indices(labels, test_fraction=0.2, seed=3)
    assert np.bincount(labels[test]).tolist() == [2, 5, 1]  # round(10 * .2), round(25 * .2), round(7 * .2)
    assert np.intersect1d(train, test).size == 0
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    assert (np.diff(train) > 0).all() and (np.diff(test) > 0).all()


def test_stratified_split_is_deterministic_per_seed():
    labels = np.repeat(np.arange(5), 20)
    first, second = stratified_split_indices(labels, seed=0), stratified_split_indices(labels, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    other = stratified_split_indices(labels, seed=1)
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_stratified_split_rejects_bad_fractions(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split_indices(np.zeros(10), test_fraction=fraction)


def test_the_fixed_split_of_the_bundled_model():
    pytest.importorskip("sklearn")
    train, test = load_digits_split()
    assert (len(train), len(test)) == (1438, 359)
    assert np.bincount(test.labels).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    # Pinned: the held-out images of the published benchmark must never change silently.
    assert test.indices[:10].tolist() == [5, 9, 12, 14, 16, 17, 19, 23, 24, 34]
    assert (int(test.indices.sum()), int(train.indices.sum())) == (324981, 1288725)
    assert train.pixels.shape == (1438, 8, 8) and train.flat_pixels().shape == (1438, 64)
    assert train.pixels.min() == 0 and train.pixels.max() == 16


# ------------------------------------------------------------------------------------------------ rendering


def test_render_maps_levels_to_grey_blocks():
    pixels = np.zeros((1, 8, 8))
    pixels[0, 2, 3] = 16.0
    pixels[0, 0, 0] = 8.0
    (image,) = render_digits(pixels, scale=4)
    assert image.mode == "RGB" and image.size == (32, 32)
    array = np.asarray(image)
    assert (array[8:12, 12:16] == 0).all()  # full ink: black 4x4 block
    assert (array[0:4, 0:4] == 128).all()  # half ink: round(255 * 0.5)
    assert array[16, 16].tolist() == [255, 255, 255]  # paper


def test_reading_back_inverts_rendering():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 17, (5, 8, 8)).astype(float)
    images = render_digits(pixels)
    assert np.abs(pixels_from_images(images) - pixels).max() <= 8 / 255 + 1e-12
    as_array = np.stack([np.asarray(image, dtype=float) / 255 for image in images])  # pipeline output_type="np"
    np.testing.assert_allclose(pixels_from_images(as_array), pixels_from_images(images), atol=1e-12)


def test_render_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(n, 8, 8\)"):
        render_digits(np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="Grey levels"):
        render_digits(np.full((1, 8, 8), 17.0))
    with pytest.raises(ValueError, match="multiples of 8"):
        pixels_from_images(np.zeros((1, 30, 30, 3)))


def test_export_image_folder_has_one_sub_folder_per_class(tmp_path):
    pytest.importorskip("sklearn")
    _, test = load_digits_split()
    assert export_image_folder(test, tmp_path) == 359
    assert sorted(p.name for p in tmp_path.iterdir()) == list(CLASS_NAMES)
    assert len(list((tmp_path / "3").iterdir())) == 37
    first = tmp_path / CLASS_NAMES[test.labels[0]] / f"{test.indices[0]:04d}.png"
    with Image.open(first) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
        assert np.abs(pixels_from_images([image])[0] - test.pixels[0]).max() <= 8 / 255 + 1e-12
