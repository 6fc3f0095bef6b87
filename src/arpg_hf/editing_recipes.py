"""Editing recipes built on [`~arpg_hf.ARPGInpaintPipeline`]: resolution expansion.

They use both the pipeline and `arpg_hf.editing_utils` (whose mask helpers the pipeline itself imports), so they live
above both.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .editing_utils import make_lattice_mask
from .pipeline_arpg_inpaint import ARPGInpaintPipeline
from .validation import is_int


def expand_resolution(
    pipe,
    image: Any,
    class_labels: int | list[int] | torch.LongTensor,
    scale: int = 2,
    stride: int | None = None,
    position_mode: str = "interpolate",
    **call_kwargs,
):
    """Resolution expansion: turns an image (e.g. a generated 256px one) into one `scale` times larger.

    Recipe: upscale the image bicubically to the larger canvas, VQ-encode it, keep a lattice of its tokens (one every
    `stride` tokens in each direction) and regenerate all the others with [`ARPGInpaintPipeline`]. The kept lattice
    fixes the layout and colours; the regenerated tokens add the detail the blurry upscale lacks. With
    `position_mode="interpolate"` and `stride == scale`, the kept tokens sit exactly on the integer rotary positions of
    the trained grid, and the new tokens fall between them.

    Args:
        pipe ([`ARPGInpaintPipeline`] or [`ARPGPipeline`]): an ARPG pipeline; a plain [`ARPGPipeline`] is wrapped with
            the same components.
        image: a PIL image, numpy array or tensor as [`ARPGInpaintPipeline`] accepts it, or a batch of them.
        class_labels: class of each image.
        scale (`int`, *optional*, defaults to 2): integer upscaling factor (each side), >= 1.
        stride (`int`, *optional*): lattice spacing in tokens; defaults to `scale`.
        position_mode (`str`, *optional*, defaults to `"interpolate"`): see [`ARPGInpaintPipeline.__call__`].
        call_kwargs: passed on to the pipeline call (`num_inference_steps`, `guidance_scale`, `generator`,
            `output_type`, ...).

    Returns:
        The pipeline's output for the `scale`-times larger canvas.
    """
    if not is_int(scale) or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}.")
    if not isinstance(pipe, ARPGInpaintPipeline):
        pipe = ARPGInpaintPipeline(**pipe.components)
    pixels = pipe.preprocess_image(image)  # (B, 3, H, W) in [-1, 1]
    upscaled = F.interpolate(pixels.float(), scale_factor=scale, mode="bicubic", align_corners=False)
    upscaled = (upscaled / 2 + 0.5).clamp(0, 1)  # (B, 3, sH, sW) in [0, 1], as the pipeline takes tensors
    height, width = upscaled.shape[-2:]
    mask = make_lattice_mask(height, width, pipe.vqvae.downsample_factor, scale if stride is None else stride)
    return pipe(upscaled, mask, class_labels, position_mode=position_mode, **call_kwargs)
