"""Zero-shot editing helpers for ARPG: masks, the pixel-to-token rule, outpainting canvases, lattice masks
(`arpg_hf.editing_recipes` builds resolution expansion on them).

The token rule: the VQ tokenizer maps each `f x f` pixel patch (f = `vqvae.downsample_factor`) to one token, and a token
is regenerated when the fraction of its patch's pixels that the mask covers exceeds `coverage_threshold` (default 0:
any covered pixel regenerates the token). Every other token is kept exactly as the encoder produced it.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor

from .validation import is_int, is_real

MASK_THRESHOLD = 0.5  # mask values >= 0.5 (after scaling to [0, 1]) mean "regenerate", as diffusers binarizes masks
_RANGE_TOLERANCE = 1e-4
_MASK_FORMATS = (
    "PIL images (mode '1', 'L', 'P', 'LA', 'RGB' or 'RGBA'; converted to grayscale), numpy arrays (H, W), (H, W, 1) or "
    "(B, H, W, 1), torch tensors (H, W), (1, H, W), (B, H, W) or (B, 1, H, W), or a list of single masks; values bool, "
    "uint8 in [0, 255], or other numbers in [0, 1] (white / 1 = regenerate)"
)
PAD_FILLS = ("edge", "reflect")


# ------------------------------------------------------------------------------------------------------ masks
def _mask_array_to_unit(values: np.ndarray | torch.Tensor, source: str) -> torch.Tensor:
    """Scales a mask array to float32 values in [0, 1]: bool as is, uint8 / 255, other numbers must lie in [0, 1]."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "biuf":
            raise ValueError(f"Cannot interpret a {values.dtype} mask ({source}); expected {_MASK_FORMATS}.")
        tensor = torch.from_numpy(np.ascontiguousarray(values).astype(values.dtype.newbyteorder("=")))
    else:
        tensor = values.detach()
    if tensor.dtype == torch.bool:
        return tensor.float()
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    if tensor.is_complex():
        raise ValueError(f"Cannot interpret a {tensor.dtype} mask ({source}); expected {_MASK_FORMATS}.")
    tensor = tensor.float()
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"mask_image contains NaN or infinite values ({source}); expected {_MASK_FORMATS}.")
    if tensor.numel():
        low, high = float(tensor.min()), float(tensor.max())
        if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"mask_image values must lie in [0, 1] for dtype {values.dtype} ({source}), got [{low:g}, {high:g}]. "
                "Pass a uint8 mask for values in [0, 255], or divide by the maximum (white / 1 = regenerate)."
            )
    return tensor


def _mask_values(mask: Any) -> PIL.Image.Image | torch.Tensor:
    """One mask (or a batch as one array), checked, for the mask processor: PIL images as they are (the processor
    converts them to grayscale in [0, 1]); arrays as float32 `(B, 1, H, W)` in [0, 1]."""
    if isinstance(mask, PIL.Image.Image):
        if mask.mode in ("1", "L", "P", "LA", "RGB", "RGBA"):
            return mask
        values = np.array(mask)  # "I", "I;16", "F": numbers that must lie in [0, 1]
        if values.ndim != 2:
            raise ValueError(f"Cannot interpret a PIL mask of shape {values.shape}; expected {_MASK_FORMATS}.")
        return _mask_array_to_unit(values, "PIL image")[None, None]
    if isinstance(mask, (np.ndarray, torch.Tensor)):
        shape = tuple(mask.shape)
        if isinstance(mask, np.ndarray):  # channels last: (H, W), (H, W, 1), (B, H, W, 1)
            layouts = {2: lambda m: m[None], 3: lambda m: m[None, ..., 0], 4: lambda m: m[..., 0]}
            one_channel = mask.ndim == 2 or (mask.ndim in (3, 4) and shape[-1] == 1)
        else:  # channels first: (H, W), (1, H, W), (B, H, W), (B, 1, H, W)
            layouts = {2: lambda m: m[None], 3: lambda m: m, 4: lambda m: m[:, 0]}
            one_channel = mask.ndim in (2, 3) or (mask.ndim == 4 and shape[1] == 1)
        if not one_channel:
            raise ValueError(
                f"Cannot interpret a mask of shape {shape}: it must have one channel. Expected {_MASK_FORMATS}. "
                "Convert colour masks to grayscale first."
            )
        values = layouts[mask.ndim](mask)  # (B, H, W)
        values = values.cpu() if isinstance(values, torch.Tensor) else values
        return _mask_array_to_unit(values, f"{type(mask).__name__} of shape {shape}")[:, None]  # (B, 1, H, W)
    raise ValueError(f"Cannot interpret a mask of type {type(mask).__name__}; expected {_MASK_FORMATS}.")


def mask_processor(downsample_factor: int = 1) -> VaeImageProcessor:
    """diffusers' mask processor, as its inpainting pipelines configure it: grayscale, binarised at 0.5 (>= 0.5 is
    white = regenerate), not resized, not normalised."""
    return VaeImageProcessor(
        vae_scale_factor=downsample_factor,
        do_resize=False,
        do_normalize=False,
        do_binarize=True,
        do_convert_grayscale=True,
    )


def preprocess_mask(mask_image: Any, processor: VaeImageProcessor | None = None) -> torch.BoolTensor:
    """Turns a mask in any supported format into a boolean pixel mask, True = regenerate.

    Values are checked and scaled to [0, 1] (uint8 / 255, PIL images via grayscale), then binarised at 0.5 (>= 0.5 is
    white) by the mask processor (`processor`, default [`mask_processor`]).

    Args:
        mask_image: a PIL image (mode "1", "L", "P", "LA", "RGB" or "RGBA"), a numpy array `(H, W)`, `(H, W, 1)` or
            `(B, H, W, 1)`, a torch tensor `(H, W)`, `(1, H, W)`, `(B, H, W)` or `(B, 1, H, W)`, or a list of single
            masks of one size. bool, uint8 in [0, 255], or other numbers in [0, 1].
        processor ([`~diffusers.image_processor.VaeImageProcessor`], *optional*): the pipeline's mask processor.

    Returns:
        `torch.BoolTensor` of shape `(B, H, W)` on the CPU.

    Raises:
        ValueError: for shapes with several channels, NaN / infinite values, numbers outside the allowed range, an
            empty list or masks of different sizes.
    """
    processor = processor or mask_processor()
    items = list(mask_image) if isinstance(mask_image, (list, tuple)) else [mask_image]
    if len(items) == 0:
        raise ValueError(f"mask_image is an empty list; expected {_MASK_FORMATS}.")
    masks = [processor.preprocess(_mask_values(item)) for item in items]  # (b, 1, H, W) each, binarised
    sizes = {tuple(mask.shape[-2:]) for mask in masks}
    if len(sizes) > 1:
        raise ValueError(f"The masks of a list must share one size, got (height, width) {sorted(sizes)}.")
    unit = torch.cat(masks)[:, 0]  # (B, H, W)
    if unit.shape[-1] == 0 or unit.shape[-2] == 0 or unit.shape[0] == 0:
        raise ValueError(f"mask_image is empty (shape {tuple(unit.shape)}).")
    return unit >= MASK_THRESHOLD


def token_mask_from_pixel_mask(
    pixel_mask: torch.BoolTensor, downsample_factor: int, coverage_threshold: float = 0.0
) -> torch.BoolTensor:
    """The pixel-to-token rule: which tokens to regenerate.

    A token covers an `f x f` pixel patch (f = `downsample_factor`); it is regenerated when the fraction of the
    patch's pixels that the mask covers is greater than `coverage_threshold`. With the default 0, any covered pixel
    regenerates the token, so no masked pixel keeps its old content.

    Args:
        pixel_mask (`torch.BoolTensor` of shape `(B, H, W)`): True = regenerate; H and W multiples of f.
        downsample_factor (`int`): pixels per token side.
        coverage_threshold (`float`, *optional*, defaults to 0.0): in [0, 1).

    Returns:
        `torch.BoolTensor` of shape `(B, H / f, W / f)`: True where the token is regenerated.
    """
    check_coverage_threshold(coverage_threshold)
    batch, height, width = pixel_mask.shape
    factor = downsample_factor
    if height % factor or width % factor:
        raise ValueError(f"The mask ({height}x{width}) must have sides that are multiples of {factor}.")
    patches = pixel_mask.reshape(batch, height // factor, factor, width // factor, factor)  # (B, h, f, w, f)
    covered = patches.sum(dim=(2, 4), dtype=torch.int64)  # (B, h, w): masked pixels per token
    return covered > coverage_threshold * factor * factor


def check_coverage_threshold(coverage_threshold) -> None:
    if not is_real(coverage_threshold):
        raise ValueError(f"mask_coverage_threshold must be a number in [0, 1), got {coverage_threshold!r}.")
    if not 0 <= coverage_threshold < 1:
        raise ValueError(
            f"mask_coverage_threshold must lie in [0, 1) (0: a token is regenerated when any of its pixels is "
            f"masked), got {coverage_threshold}."
        )


# ------------------------------------------------------------------------------------------------- outpainting
class OutpaintCanvas(NamedTuple):
    """A canvas holding the image and a mask over the new area (white / 1 = generate), in the image's format."""

    image: Any
    mask_image: Any


def _check_padding(padding: dict[str, int]) -> None:
    for side, value in padding.items():
        if not is_int(value) or value < 0:
            raise ValueError(f"Padding `{side}` must be an int >= 0 (pixels), got {value!r}.")


def make_outpaint_canvas(
    image: PIL.Image.Image | np.ndarray | torch.Tensor,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    fill: str | float | tuple[int, ...] = "edge",
) -> OutpaintCanvas:
    """Builds the canvas and mask for outpainting: the image padded by the given pixels on each side, and a mask that
    is white (1) on the new area and black (0) on the image. Outpainting is then inpainting of that canvas:

        canvas = make_outpaint_canvas(image, left=128, right=128)
        pipe(canvas.image, canvas.mask_image, class_labels=[207])

    Pad by multiples of the VQ downsample factor (16 for VQ-16) to keep every token of the image; the canvas must
    have sides that are multiples of it.

    Args:
        image: a PIL image, a numpy array `(H, W, C)` / `(B, H, W, C)` or a torch tensor `(C, H, W)` / `(B, C, H, W)`.
        left, right, top, bottom (`int`): pixels to add on each side, >= 0.
        fill (`str`, number or tuple, *optional*, defaults to `"edge"`): what the new area holds before it is
            regenerated: `"edge"` repeats the border pixels, `"reflect"` mirrors the image, a number (or a colour
            tuple for PIL images) fills it. It only matters through the VQ encoder's receptive field at the border.

    Returns:
        [`OutpaintCanvas`] `(image, mask_image)`: PIL image + PIL "L" mask; numpy array + float32 array `(H, W)` /
        `(B, H, W, 1)`; or tensor + float32 tensor `(1, H, W)` / `(B, 1, H, W)`.
    """
    padding = dict(left=left, right=right, top=top, bottom=bottom)
    _check_padding(padding)
    if not (isinstance(fill, str) and fill in PAD_FILLS) and isinstance(fill, str):
        raise ValueError(f"fill must be one of {PAD_FILLS}, a number or a colour tuple, got {fill!r}.")
    if isinstance(image, PIL.Image.Image):
        if image.mode not in ("RGB", "RGBA", "L"):
            image = image.convert("RGB")
        array = np.asarray(image)  # (H, W) or (H, W, C) uint8
        canvas = _pad_numpy(array, left, right, top, bottom, fill, channels_last=True, batched=False)
        mask = _outpaint_mask(array.shape[0], array.shape[1], left, right, top, bottom)  # (H', W')
        return OutpaintCanvas(PIL.Image.fromarray(canvas), PIL.Image.fromarray(mask * 255))
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3, 4):
            raise ValueError(f"Expected a numpy image (H, W), (H, W, C) or (B, H, W, C), got shape {image.shape}.")
        batched = image.ndim == 4
        height, width = image.shape[1:3] if batched else image.shape[:2]
        canvas = _pad_numpy(image, left, right, top, bottom, fill, channels_last=image.ndim > 2, batched=batched)
        mask = _outpaint_mask(height, width, left, right, top, bottom).astype(np.float32)  # (H', W')
        if batched:
            mask = np.broadcast_to(mask[None, ..., None], (image.shape[0], *mask.shape, 1)).copy()  # (B, H', W', 1)
        return OutpaintCanvas(canvas, mask)
    if isinstance(image, torch.Tensor):
        if image.ndim not in (3, 4):
            raise ValueError(f"Expected a torch image (C, H, W) or (B, C, H, W), got shape {tuple(image.shape)}.")
        batched = image.ndim == 4
        canvas = _pad_tensor(image if batched else image[None], left, right, top, bottom, fill)  # (B, C, H', W')
        height, width = image.shape[-2:]
        mask = torch.from_numpy(_outpaint_mask(height, width, left, right, top, bottom)).float()  # (H', W')
        mask = mask.to(image.device).expand(canvas.shape[0], 1, *mask.shape).clone()  # (B, 1, H', W')
        return OutpaintCanvas(canvas if batched else canvas[0], mask if batched else mask[0])
    raise ValueError(f"Expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}.")


def _outpaint_mask(height: int, width: int, left: int, right: int, top: int, bottom: int) -> np.ndarray:
    mask = np.ones((top + height + bottom, left + width + right), dtype=np.uint8)  # 1 = generate
    mask[top : top + height, left : left + width] = 0
    return mask


def _pad_numpy(array, left, right, top, bottom, fill, channels_last: bool, batched: bool) -> np.ndarray:
    spatial = [(top, bottom), (left, right)]
    pad_width = ([(0, 0)] if batched else []) + spatial + ([(0, 0)] if channels_last and array.ndim > 2 else [])
    if isinstance(fill, str):
        if fill == "reflect":
            _check_reflect(array.shape[1:3] if batched else array.shape[:2], left, right, top, bottom)
        return np.pad(array, pad_width, mode=fill)
    padded = np.pad(array, pad_width, mode="constant")
    region = np.ones(padded.shape[1:3] if batched else padded.shape[:2], dtype=bool)
    region[top : region.shape[0] - bottom, left : region.shape[1] - right] = False
    if batched:
        padded[:, region] = np.asarray(fill, dtype=array.dtype)  # (B, N, C) pixels of the new area
    else:
        padded[region] = np.asarray(fill, dtype=array.dtype)  # (N, C) or (N,)
    return padded


def _pad_tensor(images: torch.Tensor, left, right, top, bottom, fill) -> torch.Tensor:
    if isinstance(fill, str):
        if fill == "reflect":
            _check_reflect(images.shape[-2:], left, right, top, bottom)
        mode = "replicate" if fill == "edge" else "reflect"
        return F.pad(images.float(), (left, right, top, bottom), mode=mode).to(images.dtype)
    if not isinstance(fill, numbers.Real):
        raise ValueError(f"For tensors, fill must be 'edge', 'reflect' or a number, got {fill!r}.")
    return F.pad(images, (left, right, top, bottom), mode="constant", value=float(fill))


def _check_reflect(size, left, right, top, bottom) -> None:
    height, width = int(size[0]), int(size[1])
    if max(top, bottom) >= height or max(left, right) >= width:
        raise ValueError(
            f"fill='reflect' needs padding smaller than the image ({height}x{width}); use fill='edge' or a colour."
        )


# -------------------------------------------------------------------------------------- resolution expansion
def make_lattice_mask(
    height: int, width: int, downsample_factor: int, stride: int, offset: tuple[int, int] = (0, 0)
) -> torch.FloatTensor:
    """A mask that regenerates every token except a lattice: tokens `(offset[0] + i * stride, offset[1] + j * stride)`
    are kept (black), all others are white.

    Args:
        height, width (`int`): canvas size in pixels, multiples of `downsample_factor`.
        downsample_factor (`int`): pixels per token side.
        stride (`int`): lattice spacing in tokens, >= 1 (1 keeps every token).
        offset (`tuple[int, int]`, *optional*): (row, col) of the first kept token, each in [0, stride).

    Returns:
        `torch.FloatTensor` of shape `(height, width)`: 1 = regenerate, 0 = keep.
    """
    if not is_int(stride) or stride < 1:
        raise ValueError(f"stride must be an int >= 1 (tokens), got {stride!r}.")
    if len(offset) != 2 or not all(isinstance(o, numbers.Integral) and 0 <= o < stride for o in offset):
        raise ValueError(f"offset must be two ints in [0, {stride}), got {offset!r}.")
    if height % downsample_factor or width % downsample_factor:
        raise ValueError(f"The canvas ({height}x{width}) must have sides that are multiples of {downsample_factor}.")
    rows, cols = height // downsample_factor, width // downsample_factor
    token_mask = torch.ones(rows, cols)
    token_mask[offset[0] :: stride, offset[1] :: stride] = 0
    return token_mask.repeat_interleave(downsample_factor, 0).repeat_interleave(downsample_factor, 1)  # (H, W)
