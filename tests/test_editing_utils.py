"""Editing helpers: mask formats, the pixel-to-token rule, outpainting canvases and lattice masks."""

import numpy as np
import pytest
import torch
from PIL import Image

from arpg_hf import make_lattice_mask, make_outpaint_canvas, preprocess_mask, token_mask_from_pixel_mask


def reference_mask():
    mask = np.zeros((4, 6), dtype=np.float32)
    mask[1:3, 2:5] = 1
    return mask


@pytest.mark.parametrize(
    "convert",
    [
        lambda m: m,
        lambda m: m.astype(bool),
        lambda m: (m * 255).astype(np.uint8),
        lambda m: m[..., None],
        lambda m: m[None, ..., None],
        lambda m: m * 0.5 + 0.25,  # 0.25 / 0.75: thresholded at 0.5
        lambda m: torch.from_numpy(m),
        lambda m: torch.from_numpy(m)[None],
        lambda m: torch.from_numpy(m)[None, None],
        lambda m: torch.from_numpy(m).bool(),
        lambda m: torch.from_numpy(m).long(),
        lambda m: torch.from_numpy(m).double(),
        lambda m: Image.fromarray((m * 255).astype(np.uint8)),
        lambda m: Image.fromarray((m * 255).astype(np.uint8)).convert("1"),
        lambda m: Image.fromarray((m * 255).astype(np.uint8)).convert("RGB"),
        lambda m: Image.fromarray((m * 255).astype(np.uint8)).convert("RGBA"),
        lambda m: Image.fromarray(m),  # mode "F": floats in [0, 1]
        lambda m: [Image.fromarray((m * 255).astype(np.uint8))],
    ],
)
def test_mask_formats_agree(convert):
    mask = preprocess_mask(convert(reference_mask()))
    assert mask.dtype == torch.bool and mask.shape == (1, 4, 6)
    assert torch.equal(mask[0], torch.from_numpy(reference_mask()).bool())


def test_mask_batches():
    masks = torch.stack([torch.from_numpy(reference_mask()), torch.ones(4, 6)])
    assert preprocess_mask(masks).shape == (2, 4, 6)
    assert preprocess_mask(masks[:, None]).shape == (2, 4, 6)
    assert preprocess_mask([reference_mask(), np.ones((4, 6))]).shape == (2, 4, 6)
    assert preprocess_mask(np.stack([reference_mask()] * 3)[..., None]).shape == (3, 4, 6)


def test_threshold_is_one_half():
    assert preprocess_mask(np.array([[0.49, 0.5, 0.51, 1.0]])).tolist() == [[[False, True, True, True]]]
    assert preprocess_mask(np.array([[127, 128]], dtype=np.uint8)).tolist() == [[[False, True]]]


@pytest.mark.parametrize(
    "mask, message",
    [
        (np.full((4, 6), np.nan), "NaN"),
        (np.full((4, 6), np.inf), "NaN or infinite"),
        (np.zeros((4, 6, 3)), "one channel"),
        (np.zeros((4,)), "one channel"),
        (torch.zeros(2, 3, 4, 6), "one channel"),
        (torch.zeros(4, 6, 1, 1, 1), "one channel"),
        (np.full((4, 6), 255.0), r"\[0, 1\].*uint8"),
        (torch.full((4, 6), 2), r"\[0, 1\]"),
        (np.zeros((4, 6), dtype=object), "Cannot interpret"),
        (torch.zeros(4, 6, dtype=torch.complex64), "Cannot interpret"),
        ("mask.png", "Cannot interpret"),
        ([], "empty list"),
        ([np.zeros((4, 6)), np.zeros((4, 4))], "one size"),
        (np.zeros((0, 6)), "empty"),
    ],
)
def test_uninterpretable_masks_raise(mask, message):
    with pytest.raises(ValueError, match=message):
        preprocess_mask(mask)


def test_token_rule_any_pixel_or_coverage_threshold():
    pixels = torch.zeros(1, 4, 6, dtype=torch.bool)
    pixels[0, 0, 0] = True  # 1 of 4 pixels of token (0, 0)
    pixels[0, 0:2, 2:4] = True  # all of token (0, 1)
    pixels[0, 2:4, 4] = True  # 2 of 4 pixels of token (1, 2)
    any_pixel = token_mask_from_pixel_mask(pixels, 2)
    assert any_pixel.tolist() == [[[True, True, False], [False, False, True]]]
    assert token_mask_from_pixel_mask(pixels, 2, 0.25).tolist() == [[[False, True, False], [False, False, True]]]
    assert token_mask_from_pixel_mask(pixels, 2, 0.5).tolist() == [[[False, True, False], [False, False, False]]]
    assert token_mask_from_pixel_mask(pixels, 2, 0.99).sum() == 1
    for bad in (1.0, -0.1, "any", True):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            token_mask_from_pixel_mask(pixels, 2, bad)
    with pytest.raises(ValueError, match="multiples of 4"):
        token_mask_from_pixel_mask(pixels, 4)


def test_outpaint_canvas_for_pil_images():
    image = Image.fromarray(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3))
    canvas, mask = make_outpaint_canvas(image, left=2, right=4, top=0, bottom=2)
    assert canvas.size == (12, 6) and mask.size == (12, 6) and mask.mode == "L"
    array, mask_array = np.asarray(canvas), np.asarray(mask)
    assert np.array_equal(array[0:4, 2:8], np.asarray(image))
    assert np.array_equal(array[0:4, 0], np.asarray(image)[:, 0])  # "edge" repeats the border
    assert set(np.unique(mask_array)) == {0, 255}
    assert (mask_array[0:4, 2:8] == 0).all() and (mask_array[4:] == 255).all() and (mask_array[:, :2] == 255).all()
    filled = make_outpaint_canvas(image, right=2, fill=(10, 20, 30)).image
    assert np.asarray(filled)[:, 6:].reshape(-1, 3).tolist() == [[10, 20, 30]] * 8
    reflected = np.asarray(make_outpaint_canvas(image, left=2, fill="reflect").image)
    assert np.array_equal(reflected[:, 0], np.asarray(image)[:, 2])
    gray = make_outpaint_canvas(image.convert("L"), top=2, fill=128).image
    assert gray.mode == "L" and gray.size == (6, 6) and (np.asarray(gray)[:2] == 128).all()


def test_outpaint_canvas_for_arrays_and_tensors():
    tensor = torch.rand(2, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    canvas, mask = make_outpaint_canvas(tensor, left=2, right=2, fill=0.5)
    assert canvas.shape == (2, 3, 4, 10) and mask.shape == (2, 1, 4, 10)
    assert torch.equal(canvas[..., 2:8], tensor) and (canvas[..., :2] == 0.5).all()
    assert mask[..., 2:8].sum() == 0 and (mask[..., :2] == 1).all() and (mask[..., 8:] == 1).all()
    single, single_mask = make_outpaint_canvas(tensor[0], bottom=2)
    assert single.shape == (3, 6, 6) and single_mask.shape == (1, 6, 6)
    assert torch.equal(single[:, 4], tensor[0, :, 3])  # edge
    array = tensor[0].permute(1, 2, 0).numpy()  # (H, W, 3)
    padded, array_mask = make_outpaint_canvas(array, top=2, left=2)
    assert padded.shape == (6, 8, 3) and array_mask.shape == (6, 8)
    assert np.array_equal(padded[2:, 2:], array) and array_mask[2:, 2:].sum() == 0 and array_mask[:2].all()
    batch, batch_mask = make_outpaint_canvas(np.stack([array] * 2), right=2, fill=0.0)
    assert batch.shape == (2, 4, 8, 3) and batch_mask.shape == (2, 4, 8, 1) and (batch[:, :, 6:] == 0).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(left=-2), ">= 0"),
        (dict(right=1.5), "int"),
        (dict(left=2, fill="mirror"), "fill must be one of"),
        (dict(left=8, fill="reflect"), "smaller than the image"),
    ],
)
def test_outpaint_canvas_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_outpaint_canvas(torch.rand(3, 4, 6), **kwargs)


def test_outpaint_canvas_rejects_other_types():
    with pytest.raises(ValueError, match="PIL image"):
        make_outpaint_canvas("image.png", left=2)


def test_lattice_mask():
    mask = make_lattice_mask(8, 12, downsample_factor=2, stride=2)
    assert mask.shape == (8, 12)
    tokens = mask[::2, ::2]  # one pixel per token
    expected = torch.ones(4, 6)
    expected[::2, ::2] = 0
    assert torch.equal(tokens, expected)
    assert torch.equal(mask, expected.repeat_interleave(2, 0).repeat_interleave(2, 1))
    shifted = make_lattice_mask(8, 12, 2, 3, offset=(1, 2))[::2, ::2]
    assert shifted.eq(0).nonzero().tolist() == [[1, 2], [1, 5]]
    assert make_lattice_mask(4, 4, 2, 1).sum() == 0  # stride 1 keeps everything
    for kwargs, message in (
        (dict(stride=0), ">= 1"),
        (dict(stride=2, offset=(2, 0)), "offset"),
        (dict(stride=2, height=7), "multiples"),
    ):
        arguments = dict(height=8, width=12, downsample_factor=2)
        arguments.update(kwargs)
        with pytest.raises(ValueError, match=message):
            make_lattice_mask(**arguments)
