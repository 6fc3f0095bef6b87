"""ARPGInpaintPipeline: zero-shot inpainting, outpainting, class-conditional editing and larger canvases with ARPG.

Random-order decoding needs no training for editing: the image is VQ-encoded, the tokens the mask leaves alone are fed
once at their true positions (after the class token), and the [MASK] queries of the remaining positions are decoded in
a random order, several per step, exactly as in generation.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.utils import logging

from .editing_utils import check_coverage_threshold, mask_processor, preprocess_mask, token_mask_from_pixel_mask
from .modeling_arpg import ARPGForImageGeneration
from .pipeline_arpg import ARPGPipelineMixin, canvas_grid_size
from .scheduling_arpg import ARPGScheduler
from .validation import is_int
from .vq_model import ARPGVQModel

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from arpg_hf import ARPGInpaintPipeline, make_outpaint_canvas

        >>> pipe = ARPGInpaintPipeline.from_pretrained("path/to/arpg-l")
        >>> image = Image.open("dog.png")                       # 256x256
        >>> mask = Image.open("mask.png")                       # white = regenerate
        >>> edited = pipe(image, mask, class_labels=[207], generator=torch.Generator().manual_seed(0)).images[0]

        >>> canvas = make_outpaint_canvas(image, left=384, right=384)   # 256x1024, the new area masked
        >>> wide = pipe(canvas.image, canvas.mask_image, class_labels=[207], paste_back=True).images[0]
        ```
"""


class ARPGEditingMixin:
    """What the editing pipelines share (inpainting, and control with a mask): reading the canvas and the mask, VQ
    encoding, and decoding the masked tokens. Call `_set_up_editing(vqvae)` in `__init__`."""

    def _set_up_editing(self, vqvae: ARPGVQModel) -> None:
        self.input_processor = VaeImageProcessor(
            vae_scale_factor=vqvae.downsample_factor, do_resize=False, do_normalize=True, do_convert_rgb=True
        )
        self.mask_processor = mask_processor(vqvae.downsample_factor)  # grayscale, binarised at 0.5

    def preprocess_image(self, image: PipelineImageInput) -> torch.FloatTensor:
        """Images as diffusers takes them (PIL; numpy `(H, W[, C])` / `(B, H, W, C)` and torch `(C, H, W)` /
        `(B, C, H, W)` floats in [0, 1], or uint8) -> `(B, 3, H, W)` float32 in [-1, 1], sides checked against the VQ
        downsample factor."""
        images = image if isinstance(image, list) else [image]
        if len(images) == 0:
            raise ValueError("image is an empty list; pass a PIL image, a numpy array or a tensor.")
        images = [_as_float_image(item) for item in images]
        pixels = self.input_processor.preprocess(images if isinstance(image, list) else images[0])  # (B, C, H, W)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)  # grayscale -> RGB
        if pixels.ndim != 4 or pixels.shape[1] != self.vqvae.config.in_channels:
            raise ValueError(
                f"Expected RGB images, got a batch of shape {tuple(pixels.shape)} (B, C, H, W) after conversion."
            )
        canvas_grid_size(pixels.shape[-2], pixels.shape[-1], self.vqvae.downsample_factor)
        return pixels.float()

    def prepare_canvas(self, image, mask_image, labels, generator):
        """Preprocesses the image and mask and broadcasts the batch: one image or mask serves every class label.

        Returns `(pixels (1 or B, 3, H, W) in [-1, 1], pixel_mask (B, H, W) bool, labels (B,))`: a single image is
        left unexpanded so that it is encoded once.
        """
        pixels = self.preprocess_image(image)
        pixel_mask = preprocess_mask(mask_image, self.mask_processor)
        if tuple(pixel_mask.shape[-2:]) != tuple(pixels.shape[-2:]):
            (mask_h, mask_w), (height, width) = pixel_mask.shape[-2:], pixels.shape[-2:]
            raise ValueError(
                f"mask_image is {mask_h}x{mask_w} pixels (height x width) but image is {height}x{width}; pass a mask "
                "of the image's size (white = regenerate)."
            )
        sizes = {"image": pixels.shape[0], "mask_image": pixel_mask.shape[0], "class_labels": labels.shape[0]}
        if isinstance(generator, list):
            sizes["generator"] = len(generator)
        batch_size = max(sizes.values())
        if any(size not in (1, batch_size) for name, size in sizes.items() if name != "generator") or (
            isinstance(generator, list) and len(generator) != batch_size
        ):
            raise ValueError(
                f"Batch sizes do not match: {sizes}. Pass one image / mask / class label for all, or one per image "
                "(and one generator per image when passing a list)."
            )
        return pixels, pixel_mask.expand(batch_size, -1, -1), labels.expand(batch_size)

    @torch.no_grad()
    def encode_image(self, pixels: torch.FloatTensor) -> torch.LongTensor:
        """VQ token ids of `(B, 3, H, W)` images in [-1, 1]: `(B, (H / f) * (W / f))`, raster order."""
        return self.vqvae.encode(pixels.to(self._execution_device)).indices.flatten(1)  # (B, L)

    # ------------------------------------------------------------------------------------------- decoding
    def prepare_inpaint_orders(self, orders, unknown_positions, generator, device) -> torch.LongTensor:
        """The decoding order of images whose tokens to generate are `unknown_positions` (B, U), sorted raster.

        Given `orders` rows must each be a permutation of that image's unknown positions. Otherwise the order is
        drawn as [`~ARPGPipeline.prepare_orders`] draws it, as a permutation of the unknown positions (so a mask that
        covers everything draws exactly the order of [`ARPGPipeline`]).
        """
        batch_size, num_unknown = unknown_positions.shape
        if orders is not None:
            check_inpaint_orders(orders, unknown_positions)
            return orders.to(device).expand(batch_size, num_unknown)
        permutation = self.prepare_orders(None, batch_size, generator, device, num_tokens=num_unknown)  # (B, U)
        return unknown_positions.to(device).gather(1, permutation)

    def edit_canvas(
        self,
        labels,
        pixels,
        pixel_mask,
        orders,
        num_inference_steps,
        generator,
        grid_size,
        sampling: dict,
        mask_coverage_threshold: float = 0.0,
        negative_labels=None,
        **decode_kwargs,
    ) -> tuple[torch.LongTensor, torch.FloatTensor]:
        """Regenerates the masked part of a canvas from [`prepare_canvas`]: checks memory, VQ-encodes the canvas once
        and decodes the tokens under the mask ([`inpaint_tokens`], which takes `decode_kwargs`). Returns the tokens
        (B, L), raster order, and the canvas pixels expanded to the batch (B, 3, H, W)."""
        device, batch_size = self._execution_device, labels.shape[0]
        factor = self.vqvae.downsample_factor
        token_mask = token_mask_from_pixel_mask(pixel_mask, factor, mask_coverage_threshold).flatten(1).to(device)
        most_unknown = int(token_mask.sum(dim=1).max())  # the largest group decoded together
        self.check_memory(
            batch_size, grid_size, num_inference_steps, num_known=token_mask.shape[1] - most_unknown, encode=True
        )
        encoded = self.encode_image(pixels).to(device).expand(batch_size, -1)  # (B, L)
        tokens = self.inpaint_tokens(
            labels.to(device),
            encoded,
            token_mask,
            orders,
            num_inference_steps,
            generator,
            grid_size,
            sampling,
            negative_labels=negative_labels,
            **decode_kwargs,
        )
        return tokens, pixels.expand(batch_size, -1, -1, -1)

    def inpaint_tokens(
        self,
        labels,
        encoded,
        token_mask,
        orders,
        num_inference_steps,
        generator,
        grid_size,
        sampling: dict,
        negative_labels=None,
        position_conditions=None,
        guidance_position_conditions=None,
        **decode_kwargs,
    ) -> torch.LongTensor:
        """Regenerates the masked tokens of `encoded` (B, L); returns all tokens (B, L), raster order.

        Images whose masks leave the same number of tokens to generate are decoded together; the others one group
        after another, each with the schedule computed over its own count (steps capped at that count). Images with
        nothing to generate return their encoded tokens without a model call. `position_conditions` and
        `guidance_position_conditions` (B, L, D) are those of [`~ARPGPipelineMixin.generate_tokens`], per image.
        """
        tokens, counts = encoded.clone(), token_mask.sum(dim=1).tolist()
        capped = False
        for count in dict.fromkeys(counts):  # distinct counts, in order of first appearance
            rows = [i for i, c in enumerate(counts) if c == count]
            if count == 0:
                continue
            group_orders = _select_orders(orders, rows, len(counts))
            group_generator = [generator[i] for i in rows] if isinstance(generator, list) else generator
            unknown = torch.argsort((~token_mask[rows]).to(torch.int8), dim=1, stable=True)[:, :count]  # (b, U)
            group_orders = self.prepare_inpaint_orders(group_orders, unknown, group_generator, encoded.device)
            steps = min(num_inference_steps, count)
            capped |= steps < num_inference_steps
            self.scheduler.set_timesteps(steps, count, device=encoded.device)
            known = encoded[rows].masked_fill(token_mask[rows], -1)  # (b, L), -1 = to generate
            tokens[rows] = self.generate_tokens(
                labels[rows],
                group_orders,
                generator=group_generator,
                known_tokens=known,
                grid_size=grid_size,
                negative_class_labels=None if negative_labels is None else negative_labels[rows],
                position_conditions=None if position_conditions is None else position_conditions[rows],
                guidance_position_conditions=(
                    None if guidance_position_conditions is None else guidance_position_conditions[rows]
                ),
                **sampling,
                **decode_kwargs,
            )
        if capped:
            logger.warning(
                f"num_inference_steps={num_inference_steps} exceeds the number of tokens to generate ({counts}); "
                "used one token per step where fewer tokens remain."
            )
        return tokens


class ARPGInpaintPipeline(ARPGEditingMixin, ARPGPipelineMixin, DiffusionPipeline):
    r"""
    Zero-shot editing with ARPG: inpainting, outpainting (inpainting of a larger canvas, see
    [`~arpg_hf.make_outpaint_canvas`]), class-conditional editing (a class label other than the image's) and canvases
    of any size whose sides are multiples of the VQ downsample factor.

    The image is VQ-encoded. A token is regenerated when the mask covers more than `mask_coverage_threshold` of its
    pixel patch (by default: any of its pixels); every other token is kept exactly as the encoder produced it. The
    first decoding step feeds the class token, then the kept tokens at their positions in raster order, causally (each
    sees the class and the kept tokens before it: a prefix of a training order); the regenerated positions are then
    decoded in a random order with the scheduler's token schedule computed over their count.

    Same components and decoding as [`ARPGPipeline`] (both are [`ARPGPipelineMixin`] plus `DiffusionPipeline`):
    `ARPGInpaintPipeline(**pipe.components)` and `from_pretrained` on an [`ARPGPipeline`] folder both work.

    Args:
        transformer ([`ARPGForImageGeneration`]): the token generator.
        vqvae ([`ARPGVQModel`]): the tokenizer that encodes the image and decodes the result.
        scheduler ([`ARPGScheduler`]): decoding order, tokens per step, guidance per step and sampling.
    """

    def __init__(self, transformer: ARPGForImageGeneration, vqvae: ARPGVQModel, scheduler: ARPGScheduler):
        super().__init__(transformer=transformer, vqvae=vqvae, scheduler=scheduler)
        self._set_up_editing(vqvae)

    # -------------------------------------------------------------------------------------------- inputs
    def check_inputs(
        self,
        class_labels,
        num_inference_steps,
        guidance_scale,
        output_type,
        temperature,
        top_k,
        top_p,
        callback_on_step_end_tensor_inputs,
        position_mode="extrapolate",
        mask_coverage_threshold=0.0,
    ):
        if not is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}.")
        check_coverage_threshold(mask_coverage_threshold)
        self.check_sampling_inputs(
            class_labels,
            guidance_scale,
            output_type,
            temperature,
            top_k,
            top_p,
            callback_on_step_end_tensor_inputs,
            position_mode,
        )

    @torch.no_grad()
    def __call__(
        self,
        image: PipelineImageInput,
        mask_image: PipelineImageInput,
        class_labels: int | list[int] | torch.LongTensor,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        orders: torch.LongTensor | list | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["tokens"],
        position_mode: str = "extrapolate",
        mask_coverage_threshold: float = 0.0,
        paste_back: bool = False,
        negative_class_labels: int | list[int] | torch.LongTensor | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Regenerates the masked part of each image, conditioned on the rest and on a class label.

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The canvas, as diffusers takes images: PIL, numpy `(H, W, C)` / `(B, H, W, C)` or torch `(C, H, W)` /
                `(B, C, H, W)` floats in [0, 1] (uint8 also accepted). Height and width must be multiples of the VQ
                downsample factor (16 for VQ-16) and may exceed the trained grid (see `position_mode`).
            mask_image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                White (>= 0.5 after scaling to [0, 1]) = regenerate, black = keep; the image's size. See
                [`~arpg_hf.editing_utils.preprocess_mask`] for the accepted formats.
            class_labels (`int`, `list[int]` or `torch.LongTensor`):
                Class of each output, in `[0, num_classes)`; a class other than the image's edits it towards that
                class. One image and mask may serve several labels.
            num_inference_steps (`int`, *optional*):
                Decoding steps (>= 1) over the tokens to regenerate; capped at their number. Defaults to the
                scheduler config's `recommended_num_inference_steps` (64 when it has none).
            guidance_scale (`float`, *optional*):
                Classifier-free guidance scale (>= 0), per step as the scheduler's `guidance_schedule` says (the
                linear schedule ramps over the tokens to regenerate). Defaults to the scheduler config's
                `recommended_guidance_scale` (4.0 when it has none).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Source of the random order and of the sampled tokens; one per image makes images independent.
            orders (`torch.LongTensor` or `list`, *optional*):
                The 0-based raster positions of the tokens to regenerate, in decoding order: a permutation of those
                positions, `(U,)` for the whole batch or `(batch, U)`, or a list with one sequence per image. Drawn
                from `generator` when omitted.
            temperature (`float`, *optional*, defaults to 1.0), top_k (`int`, *optional*), top_p (`float`, *optional*):
                Sampling, as in [`ARPGPipeline`]; top_k=1 or temperature=0 is greedy.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` (images in [0, 1]) or `"latent"` (token ids `(batch, rows * cols)`, raster).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`~diffusers.ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*), callback_on_step_end_tensor_inputs (`list[str]`):
                As in [`ARPGPipeline`]; `tokens` holds the kept tokens and -1 where not generated yet, for the images
                decoded together (all of them unless their masks leave different numbers of tokens to regenerate).
                After `pipe._interrupt = True`, every image still to decode gets its remaining tokens in one step.
            position_mode (`str`, *optional*, defaults to `"extrapolate"`):
                For canvases other than the trained grid: `"extrapolate"` uses integer rows/cols beyond the trained
                range, `"interpolate"` scales them into it.
            mask_coverage_threshold (`float`, *optional*, defaults to 0.0):
                A token is regenerated when the fraction of its pixels that the mask covers exceeds this, in [0, 1);
                0 regenerates every token the mask touches.
            paste_back (`bool`, *optional*, defaults to `False`):
                Paste the unmasked pixels of the input over the decoded image (the VQ round trip otherwise alters
                them slightly). Ignored for `"latent"`.
            negative_class_labels (`int`, `list[int]` or `torch.LongTensor`, *optional*):
                Classes to steer away from, as in [`ARPGPipeline`]: guidance contrasts `class_labels` with them
                instead of with the null class. For class-conditional editing, the image's own class pushes the
                regenerated part away from it. One for the batch or one per image.

        Returns:
            [`~diffusers.ImagePipelineOutput`] or `tuple`: the images of the whole canvas (or token ids).
        """
        labels = self._as_class_tensor(class_labels)
        # Steps are capped per image at its number of tokens to regenerate (inpaint_tokens), not here.
        num_inference_steps, guidance_scale = self.default_sampling_settings(num_inference_steps, guidance_scale)
        callback_on_step_end_tensor_inputs = self._start_call(
            guidance_scale, num_inference_steps, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        self.check_inputs(
            labels,
            num_inference_steps,
            guidance_scale,
            output_type,
            temperature,
            top_k,
            top_p,
            callback_on_step_end_tensor_inputs,
            position_mode,
            mask_coverage_threshold,
        )
        pixels, pixel_mask, labels = self.prepare_canvas(image, mask_image, labels, generator)
        factor = self.vqvae.downsample_factor
        grid_size = canvas_grid_size(pixels.shape[-2], pixels.shape[-1], factor)
        device = self._execution_device
        negative_labels = self.prepare_negative_class_labels(negative_class_labels, labels.shape[0], device)
        sampling = dict(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p)
        tokens, pixels = self.edit_canvas(
            labels,
            pixels,
            pixel_mask,
            orders,
            num_inference_steps,
            generator,
            grid_size,
            sampling,
            mask_coverage_threshold,
            negative_labels=negative_labels,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            position_mode=position_mode,
        )
        paste = (pixels, pixel_mask) if paste_back else None
        return self.finish_call(tokens, grid_size, output_type, return_dict, paste_back_onto=paste)


def _as_float_image(image):
    """uint8 numpy / torch images -> float in [0, 1]; other inputs are checked and passed through to diffusers."""
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3, 4) or (image.ndim >= 3 and image.shape[-1] not in (1, 3)):
            raise ValueError(
                f"Expected a numpy image (H, W), (H, W, C) or (B, H, W, C) with C = 1 or 3, got shape {image.shape}."
            )
        if image.dtype == np.uint8:
            return image.astype(np.float32) / 255.0
        if image.dtype.kind != "f":
            raise ValueError(f"Expected a float numpy image in [0, 1] or uint8, got dtype {image.dtype}.")
        _check_image_range(torch.from_numpy(np.asarray(image, dtype=np.float32)), 0.0, "numpy images")
        return image
    if isinstance(image, torch.Tensor):
        if image.ndim == 2:
            image = image[None]  # (H, W) -> (1, H, W)
        if image.ndim not in (3, 4) or image.shape[-3] not in (1, 3):
            raise ValueError(
                f"Expected a torch image (C, H, W) or (B, C, H, W) with C = 1 or 3, got shape {tuple(image.shape)}."
            )
        if image.dtype == torch.uint8:
            return image.float() / 255.0
        if not image.is_floating_point():
            raise ValueError(f"Expected a float image tensor in [0, 1] or uint8, got dtype {image.dtype}.")
        _check_image_range(image, -1.0, "image tensors")  # diffusers also takes tensors already in [-1, 1]
        return image.float()
    return image


def _check_image_range(image: torch.Tensor, low: float, kind: str) -> None:
    if image.numel() == 0:
        raise ValueError(f"The image is empty (shape {tuple(image.shape)}).")
    if not bool(torch.isfinite(image).all()):
        raise ValueError("The image contains NaN or infinite values.")
    smallest, largest = float(image.min()), float(image.max())
    if smallest < low - 1e-4 or largest > 1 + 1e-4:
        raise ValueError(
            f"Float {kind} must lie in [{low:g}, 1], got values in [{smallest:g}, {largest:g}]; pass uint8 for "
            "[0, 255] or divide by 255."
        )


def _select_orders(orders, rows: list[int], batch_size: int):
    """The rows of user `orders` that belong to a group of images: a shared 1-D order stays shared."""
    if orders is None:
        return None
    if (
        isinstance(orders, (list, tuple))
        and len(orders) == batch_size
        and all(isinstance(row, (list, tuple, np.ndarray, torch.Tensor)) for row in orders)
    ):
        selected = [torch.as_tensor(orders[i]) for i in rows]  # one sequence per image
        if any(row.ndim != 1 or row.shape != selected[0].shape for row in selected):
            raise ValueError(
                "orders given as a list must hold one 1-D sequence per image, as long as that image's number of "
                f"tokens to regenerate; got shapes {[tuple(row.shape) for row in selected]} for images {rows}."
            )
        return torch.stack(selected)
    orders = torch.as_tensor(orders)
    if orders.ndim == 2 and orders.shape[0] == batch_size:
        return orders[rows]
    return orders


def check_inpaint_orders(orders: torch.Tensor, unknown_positions: torch.LongTensor) -> None:
    """ValueError unless each row of `orders` ((U,) or (B, U)) permutes that image's unknown positions (B, U)."""
    batch_size, num_unknown = unknown_positions.shape
    if orders.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"orders must hold integer raster positions, got dtype {orders.dtype}.")
    wrong_rows = orders.ndim == 2 and orders.shape[0] != batch_size
    if orders.ndim not in (1, 2) or orders.shape[-1] != num_unknown or wrong_rows:
        raise ValueError(
            f"orders must have shape ({num_unknown},) or ({batch_size}, {num_unknown}): one entry per token to "
            f"regenerate (the mask leaves {num_unknown} per image), got {tuple(orders.shape)}."
        )
    rows = orders.to(unknown_positions.device).long().expand(batch_size, num_unknown).sort(dim=1).values
    if not torch.equal(rows, unknown_positions):
        raise ValueError(
            "Each row of orders must be a permutation of the 0-based raster positions of the tokens the mask "
            f"regenerates (each exactly once); the first image's are {unknown_positions[0].tolist()[:16]}"
            f"{' ...' if num_unknown > 16 else ''}."
        )
