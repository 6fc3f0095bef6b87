"""Pictures of the decoding process for the demo: a partially decoded token grid, and the map of the decoding order.

No Gradio here: these functions take a pipeline and token ids, so tests can check them without a browser.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

UNKNOWN_GREY = np.array([150, 150, 150], dtype=np.float32)  # tokens not decoded yet
NEW_TOKEN_TINT = np.array([255, 120, 0], dtype=np.float32)  # tokens decoded at this step
NEW_TOKEN_TINT_WEIGHT = 0.45
# Start and end colours of the order map: early steps dark blue, late steps yellow.
ORDER_MAP_COLOURS = (np.array([40, 30, 110], dtype=np.float32), np.array([250, 220, 40], dtype=np.float32))


def display_scale(height: int, target: int = 256) -> int:
    """The integer upscale that brings a `height`-pixel image near `target` pixels (1 for large images)."""
    return max(1, target // height)


def _upscale(pixels: np.ndarray, scale: int) -> Image.Image:
    """(H, W, 3) floats in [0, 255] -> a PIL image `scale` times larger (nearest neighbour, crisp token cells)."""
    image = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(image.repeat(scale, axis=0).repeat(scale, axis=1))


def _token_to_pixel_mask(mask: torch.Tensor, grid_size: tuple[int, int], factor: int) -> np.ndarray:
    """(L,) bool over raster token positions -> (H, W) bool over pixels."""
    grid = mask.view(*grid_size).cpu().numpy()  # (rows, cols)
    return grid.repeat(factor, axis=0).repeat(factor, axis=1)  # (H, W)


@torch.no_grad()
def render_partial_tokens(
    pipe,
    tokens: torch.LongTensor,
    previous_tokens: torch.LongTensor | None = None,
    grid_size: tuple[int, int] | None = None,
    scale: int = 1,
) -> Image.Image:
    """Decodes a partially known token grid: unknown tokens (-1) grey, tokens new since `previous_tokens` tinted.

    Args:
        pipe ([`ARPGPipeline`]): provides the VQ decoder.
        tokens (`torch.LongTensor` of shape `(L,)`): raster-order ids, -1 where not decoded yet.
        previous_tokens (`torch.LongTensor` of shape `(L,)`, *optional*): the grid one step earlier.
        grid_size (`tuple[int, int]`, *optional*): (rows, cols); defaults to the trained grid.
        scale (`int`, *optional*, defaults to 1): integer upscale of the returned picture.
    """
    config = pipe.transformer.config
    grid_size = grid_size or (config.grid_height, config.grid_width)
    factor = pipe.vqvae.downsample_factor
    known = tokens >= 0  # (L,)
    decoded = pipe.decode_tokens(tokens.clamp_min(0)[None], grid_size)  # (1, 3, H, W); unknown cells filled with code 0
    pixels = ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()  # (H, W, 3) in [0, 255]
    pixels[~_token_to_pixel_mask(known, grid_size, factor)] = UNKNOWN_GREY
    if previous_tokens is not None:
        new = _token_to_pixel_mask(known & (previous_tokens < 0), grid_size, factor)
        pixels[new] = (1 - NEW_TOKEN_TINT_WEIGHT) * pixels[new] + NEW_TOKEN_TINT_WEIGHT * NEW_TOKEN_TINT
    return _upscale(pixels, scale)


def order_map(
    step_of_position: torch.LongTensor, num_steps: int, grid_size: tuple[int, int], cell: int = 32
) -> Image.Image:
    """The decoding order as a picture: each token cell coloured by the step that decoded it (dark = early, yellow =
    late, grey = kept / never decoded, marked -1).

    Args:
        step_of_position (`torch.LongTensor` of shape `(L,)`): step index of every raster position, -1 for none.
        num_steps (`int`): the number of decoding steps.
        grid_size (`tuple[int, int]`): (rows, cols).
        cell (`int`, *optional*, defaults to 32): pixels per token cell.
    """
    steps = step_of_position.view(*grid_size).cpu().numpy()  # (rows, cols)
    fraction = (np.clip(steps, 0, None) / max(num_steps - 1, 1))[..., None]  # (rows, cols, 1)
    start, end = ORDER_MAP_COLOURS
    colours = start + (end - start) * fraction  # (rows, cols, 3)
    colours[steps < 0] = UNKNOWN_GREY
    return _upscale(colours, cell)


def stream_decoding(pipe, **call_kwargs: Any) -> Iterator[tuple[str, Any]]:
    """Runs `pipe(**call_kwargs)` in a worker thread and yields its progress as it happens.

    Yields `("step", (step_index, tokens))` after every decoding step, `tokens` a copy of the (B, L) ids so far (-1
    where not decoded yet), then `("done", images)`. An exception in the pipeline is raised here.
    """
    events: queue.Queue = queue.Queue()

    def on_step_end(pipeline, step_index, timestep, callback_kwargs):
        events.put(("step", (step_index, callback_kwargs["tokens"].detach().cpu().clone())))
        return {}

    def work():
        try:
            events.put(("done", pipe(**call_kwargs, callback_on_step_end=on_step_end).images))
        except BaseException as error:  # handed to the consumer, which raises it
            events.put(("error", error))

    threading.Thread(target=work, name="arpg-demo-decoding", daemon=True).start()
    while True:
        kind, payload = events.get()
        if kind == "error":
            raise payload
        yield kind, payload
        if kind == "done":
            return
