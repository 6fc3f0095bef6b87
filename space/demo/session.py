"""What the demo does with the model, without Gradio: generation (whole or streamed step by step), inpainting, and
controlled generation (a drawn stroke's edges as the condition, when a control adapter is loaded).

One `DemoModel` serves every request; the app runs its calls one at a time (one Gradio concurrency group), because
the pipelines' schedulers keep per-call state.
"""

from __future__ import annotations

import numbers
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from arpg_hf.control_conditions import canny_edges
from arpg_hf.editing_utils import token_mask_from_pixel_mask
from arpg_hf.pipeline_arpg import check_guidance_scale
from arpg_hf.pipeline_arpg_inpaint import ARPGInpaintPipeline
from arpg_hf.scheduling_arpg import ARPGScheduler

from .rendering import display_scale, order_map, render_partial_tokens, stream_decoding

TOKEN_SCHEDULES = ("arccos", "cosine")
MASK_PRESETS = ("brush strokes", "left half", "right half", "top half", "bottom half", "centre square")
MAX_IMAGES = 8


def preset_mask(preset: str, height: int, width: int) -> np.ndarray:
    """A (H, W) bool mask (True = regenerate) for one of the non-brush `MASK_PRESETS`."""
    mask = np.zeros((height, width), dtype=bool)
    regions = {
        "left half": (slice(None), slice(0, width // 2)),
        "right half": (slice(None), slice(width // 2, None)),
        "top half": (slice(0, height // 2), slice(None)),
        "bottom half": (slice(height // 2, None), slice(None)),
        "centre square": (slice(height // 4, height - height // 4), slice(width // 4, width - width // 4)),
    }
    if preset not in regions:
        raise ValueError(f"Unknown mask preset {preset!r}; choose one of {MASK_PRESETS}.")
    mask[regions[preset]] = True
    return mask


def _check_integer(value, low: int, high: int, name: str) -> None:
    """A UI/API value must be an integral number in [low, high]."""
    if not isinstance(value, numbers.Real) or value != int(value) or not low <= value <= high:
        raise ValueError(f"The {name} must be an integer in [{low}, {high}], got {value!r}.")


class DemoModel:
    """The demo's model calls. `pipe` is an [`ARPGPipeline`]; the inpainting pipeline shares its components.
    `control_pipe`, an [`ARPGControlPipeline`] for the same images and classes (e.g. the bundled digits-edges model),
    serves the Control tab."""

    def __init__(self, pipe, control_pipe=None):
        self.pipe = pipe
        self.inpaint_pipe = ARPGInpaintPipeline(**pipe.components)
        self.inpaint_pipe.set_progress_bar_config(disable=True)
        self.control_pipe = control_pipe
        if control_pipe is not None:
            control_pipe.set_progress_bar_config(disable=True)
        self.pipe.set_progress_bar_config(disable=True)
        self.schedulers = {
            name: ARPGScheduler.from_config(pipe.scheduler.config, token_schedule=name) for name in TOKEN_SCHEDULES
        }
        self.default_token_schedule = pipe.scheduler.config.token_schedule
        config = pipe.transformer.config
        self.grid_size = (config.grid_height, config.grid_width)
        self.image_size = tuple(side * pipe.vqvae.downsample_factor for side in self.grid_size)  # (H, W)
        self.scale = display_scale(self.image_size[0])

    # -------------------------------------------------------------------------------------------- settings
    @property
    def class_choices(self) -> list[tuple[str, int]]:
        """(label, class index) pairs; the label is "index: name" unless the name is the index itself (digits)."""
        return [
            (name if name == str(index) else f"{index}: {name}", index)
            for index, name in sorted(self.pipe.id2label.items())
        ]

    @property
    def recommended(self) -> tuple[int, float]:
        """The scheduler config's recommended (steps, guidance scale)."""
        return self.pipe.default_sampling_settings(None, None, self.grid_size[0] * self.grid_size[1])

    def check(self, class_index, steps, guidance_scale, seed, token_schedule="arccos", num_images=1) -> tuple:
        """Validates the UI/API values; returns them as (int, int, float, int, str, int)."""
        num_classes, num_tokens = self.pipe.transformer.config.num_classes, self.grid_size[0] * self.grid_size[1]
        checks = [
            (class_index, 0, num_classes - 1, "class label index"),
            (steps, 1, num_tokens, "steps"),
            (seed, 0, 2**63 - 1, "seed"),
            (num_images, 1, MAX_IMAGES, "number of images"),
        ]
        for value, low, high, name in checks:
            _check_integer(value, low, high, name)
        check_guidance_scale(guidance_scale, name="The guidance scale")  # finite, >= 0, within float32
        if token_schedule not in TOKEN_SCHEDULES:
            raise ValueError(f"The token schedule must be one of {TOKEN_SCHEDULES}, got {token_schedule!r}.")
        return int(class_index), int(steps), float(guidance_scale), int(seed), token_schedule, int(num_images)

    def _negative_labels(self, negative_class_index, count: int) -> list[int] | None:
        """`negative_class_labels` for `count` images from the "guide away from" choice: -1 (the null class, plain
        guidance: None) or a class label index."""
        num_classes = self.pipe.transformer.config.num_classes
        _check_integer(negative_class_index, -1, num_classes - 1, "class to guide away from (-1: none)")
        return None if negative_class_index < 0 else [int(negative_class_index)] * count

    def _generators(self, seed: int, count: int) -> list[torch.Generator]:
        """Image i draws from its own generator seeded with seed + i (so image 0 matches `generate`)."""
        return [torch.Generator().manual_seed(seed + i) for i in range(count)]  # CPU draws: the same on any device

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, class_index, steps, guidance_scale, seed) -> Image.Image:
        """One image of the class at the model's resolution (the `/generate` API)."""
        class_index, steps, guidance_scale, seed, _, _ = self.check(class_index, steps, guidance_scale, seed)
        self.pipe.scheduler = self.schedulers[self.default_token_schedule]
        return self.pipe([class_index], steps, guidance_scale, generator=self._generators(seed, 1)).images[0]

    def stream_generation(
        self, class_index, steps, guidance_scale, seed, token_schedule, num_images, negative_class_index=-1
    ) -> Iterator:
        """Yields `(live picture, order map or None, images or None)` after every step, then the final images.

        The live picture shows image 0's token grid: grey where not decoded yet, tinted where decoded this step.
        `negative_class_index` >= 0 guides away from that class instead of the null class (`negative_class_labels`).
        """
        class_index, steps, guidance_scale, seed, token_schedule, num_images = self.check(
            class_index, steps, guidance_scale, seed, token_schedule, num_images
        )
        negative = self._negative_labels(negative_class_index, num_images)
        self.pipe.scheduler = self.schedulers[token_schedule]
        call = dict(
            class_labels=[class_index] * num_images,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=self._generators(seed, num_images),
            negative_class_labels=negative,
        )
        yield from self._stream(self.pipe, call, steps)

    def _stream(self, pipe, call: dict, steps: int, kept: torch.Tensor | None = None) -> Iterator:
        """Streams `pipe(**call)`; `kept` (L,) bool marks the tokens that are given rather than decoded."""
        previous, live = None, None
        step_of_position = torch.full((self.grid_size[0] * self.grid_size[1],), -1, dtype=torch.long)  # (L,)
        for kind, payload in stream_decoding(pipe, **call):
            if kind == "done":  # the live view ends on the finished image
                width, height = payload[0].size
                final = payload[0].resize((width * self.scale, height * self.scale), Image.NEAREST)
                yield final, order_map(step_of_position, steps, self.grid_size, cell=4 * self.scale), payload
                return
            step_index, tokens = payload
            current = tokens[0]  # (L,) image 0
            if previous is None:  # the grid before the first step: only the kept tokens
                previous = torch.full_like(current, -1) if kept is None else torch.where(kept, current, -1)
            step_of_position[(current >= 0) & (previous < 0)] = step_index
            live = render_partial_tokens(pipe, current, previous, self.grid_size, scale=self.scale)
            previous = current
            yield live, None, None

    # ------------------------------------------------------------------------------------------ inpainting
    def inpaint_mask(self, layers: list, preset: str) -> Image.Image:
        """The white-is-regenerate mask at the model's resolution, from brush layers or a preset."""
        height, width = self.image_size
        if preset == "brush strokes":
            alphas = [
                np.asarray(layer.convert("RGBA").resize((width, height), Image.NEAREST))[..., 3] > 0
                for layer in layers or []
            ]
            mask = np.logical_or.reduce(alphas) if alphas else np.zeros((height, width), dtype=bool)
            if not mask.any():
                raise ValueError("Paint over the part to regenerate (or pick a mask preset), then press Inpaint.")
        else:
            mask = preset_mask(preset, height, width)
        return Image.fromarray(mask.astype(np.uint8) * 255)

    def stream_inpainting(
        self,
        background,
        layers,
        preset,
        class_index,
        steps,
        guidance_scale,
        seed,
        token_schedule,
        negative_class_index=-1,
    ) -> Iterator:
        """Like `stream_generation`, for regenerating the masked part of `background` (resized to the model's size);
        the mask picture comes first. `negative_class_index` >= 0 guides away from that class instead of the null
        class (`negative_class_labels`), e.g. the class the image shows when editing it into another."""
        if background is None:
            raise ValueError("Load an image into the editor first (or press 'Use the generated image').")
        class_index, steps, guidance_scale, seed, token_schedule, _ = self.check(
            class_index, steps, guidance_scale, seed, token_schedule
        )
        negative = self._negative_labels(negative_class_index, 1)
        height, width = self.image_size
        image = background.convert("RGB").resize((width, height), Image.BICUBIC)
        mask = self.inpaint_mask(layers, preset)
        pixel_mask = torch.from_numpy(np.asarray(mask) > 0)[None]  # (1, H, W)
        kept = ~token_mask_from_pixel_mask(pixel_mask, self.pipe.vqvae.downsample_factor).flatten()  # (L,)
        self.inpaint_pipe.scheduler = self.schedulers[token_schedule]
        call = dict(
            image=image,
            mask_image=mask,
            class_labels=[class_index],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=self._generators(seed, 1),
            negative_class_labels=negative,
        )
        yield mask, None, None, None
        for live, order, images in self._stream(self.inpaint_pipe, call, steps, kept):
            yield mask, live, order, images

    # ------------------------------------------------------------------------------------------ control
    def control_condition(self, drawing) -> Image.Image:
        """The condition of a drawing (dark strokes on a light or transparent background, any size): the Canny edges
        of it at the model's resolution, white on black."""
        if drawing is None:
            raise ValueError("Draw a stroke first (dark on white), then press Generate.")
        picture = drawing
        if picture.mode in ("RGBA", "LA", "P"):  # transparent background: the strokes over white paper
            paper = Image.new("RGBA", picture.size, (255, 255, 255, 255))
            picture = Image.alpha_composite(paper, picture.convert("RGBA"))
        height, width = self.image_size
        grey = picture.convert("L").resize((width, height), Image.BILINEAR)
        if np.asarray(grey).min() > 200:
            raise ValueError("The drawing is empty: draw a stroke (dark on white), then press Generate.")
        return canny_edges(grey)

    def stream_control(self, drawing, class_index, steps, guidance_scale, seed, token_schedule) -> Iterator:
        """Like `stream_generation`, for one image that follows the edges of `drawing`; the condition comes first."""
        if self.control_pipe is None:
            raise ValueError("This demo has no control model; start it with --control-model (or the bundled model).")
        class_index, steps, guidance_scale, seed, token_schedule, _ = self.check(
            class_index, steps, guidance_scale, seed, token_schedule
        )
        condition = self.control_condition(drawing)
        self.control_pipe.scheduler = ARPGScheduler.from_config(
            self.control_pipe.scheduler.config, token_schedule=token_schedule
        )
        call = dict(
            class_labels=[class_index],
            control_image=condition,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=self._generators(seed, 1),
        )
        yield condition, None, None, None
        for live, order, images in self._stream(self.control_pipe, call, steps):
            yield condition, live, order, images
