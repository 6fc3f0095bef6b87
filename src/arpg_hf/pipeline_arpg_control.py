"""ARPGControlPipeline: class-conditional images that follow a condition map (ControlARPG).

A control adapter ([`ARPGControlAdapter`]) turns the condition map (edges, depth) into one embedding per token
position; the Pass-2 query that predicts a position starts from the [MASK] embedding plus that embedding. The random
order, the parallel steps, the shared key/value cache and guidance are those of [`ARPGPipeline`]; with
`controlnet_conditioning_scale=0` the call is exactly [`ARPGPipeline`]'s.

Guidance: the conditional half sees the class and the control; the unconditional half drops the class and, by
default, the control too, as the ARPG paper's controllable generation does, so guidance pushes towards both.
`unconditional_control=True` keeps the control in both halves (guidance then strengthens only the class).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor

from .control_adapter import ARPGControlAdapter
from .editing_utils import check_coverage_threshold
from .modeling_arpg import ARPGForImageGeneration
from .pipeline_arpg import ARPGPipelineMixin, check_num_inference_steps
from .pipeline_arpg_inpaint import ARPGEditingMixin, _as_float_image
from .scheduling_arpg import ARPGScheduler
from .validation import is_real
from .vq_model import ARPGVQModel

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from arpg_hf import ARPGControlAdapter, ARPGControlPipeline, canny_edges, load_bundled_pipeline

        >>> pipe = load_bundled_pipeline("digits-edges")        # an ARPGControlPipeline
        >>> edges = canny_edges(Image.open("my_digit.png"))     # white edges on black
        >>> image = pipe([3], control_image=edges, generator=torch.Generator().manual_seed(0)).images[0]

        >>> # a base pipeline folder plus an adapter folder
        >>> adapter = ARPGControlAdapter.from_pretrained("path/to/adapter")
        >>> pipe = ARPGControlPipeline.from_pretrained("path/to/base", controlnet=adapter)
        ```
"""


class ARPGControlPipeline(ARPGEditingMixin, ARPGPipelineMixin, DiffusionPipeline):
    r"""
    Class-conditional generation that follows a condition map (edges or depth), with ARPG's randomized parallel
    decoding. Also inpaints under a control: pass `image` and `mask_image` and only the masked tokens are generated.

    Args:
        transformer ([`ARPGForImageGeneration`]): the token generator (fine-tuned with the adapter, or the base).
        vqvae ([`ARPGVQModel`]): the tokenizer that turns token ids into images.
        scheduler ([`ARPGScheduler`]): decoding order, tokens per step, guidance per step and sampling.
        controlnet ([`ARPGControlAdapter`]): condition map -> one query embedding per token position.
    """

    model_cpu_offload_seq = "controlnet->transformer->vqvae"

    def __init__(
        self,
        transformer: ARPGForImageGeneration,
        vqvae: ARPGVQModel,
        scheduler: ARPGScheduler,
        controlnet: ARPGControlAdapter,
    ):
        super().__init__(transformer=transformer, vqvae=vqvae, scheduler=scheduler)
        self.register_modules(controlnet=controlnet)
        self._set_up_editing(vqvae)
        channels = controlnet.config.conditioning_channels if controlnet is not None else 1
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=vqvae.downsample_factor,
            do_normalize=False,
            do_convert_grayscale=channels == 1,
            do_convert_rgb=channels == 3,
        )

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
        controlnet_conditioning_scale=1.0,
        num_tokens=None,
        mask_coverage_threshold=0.0,
    ):
        check_num_inference_steps(num_inference_steps, num_tokens)
        check_coverage_threshold(mask_coverage_threshold)
        if not (is_real(controlnet_conditioning_scale) and math.isfinite(controlnet_conditioning_scale)):
            raise ValueError(
                f"controlnet_conditioning_scale must be a finite number (1.0: as trained, 0.0: no control), got "
                f"{controlnet_conditioning_scale!r}."
            )
        adapter, config = self.controlnet, self.transformer.config
        if adapter is None:
            raise ValueError(
                "This ARPGControlPipeline has no controlnet: pass one, e.g. ARPGControlPipeline.from_pretrained(base, "
                "controlnet=ARPGControlAdapter.from_pretrained(adapter_folder))."
            )
        if (
            adapter.config.output_size != config.hidden_size
            or adapter.config.patch_size != self.vqvae.downsample_factor
        ):
            raise ValueError(
                f"The control adapter (output_size {adapter.config.output_size}, patch_size {adapter.config.patch_size})"
                f" does not fit this model (hidden_size {config.hidden_size}, VQ downsample factor "
                f"{self.vqvae.downsample_factor}); load the adapter trained for this base model."
            )
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

    def prepare_control_image(self, control_image, height: int, width: int, batch_size: int) -> torch.FloatTensor:
        """Condition maps as diffusers takes images (PIL, numpy, torch, or a list; one for the batch or one per
        image), resized to the canvas: `(batch_size, channels, height, width)` in [0, 1]."""
        images = control_image if isinstance(control_image, list) else [control_image]
        if len(images) == 0:
            raise ValueError("control_image is an empty list; pass a PIL image, a numpy array or a tensor.")
        images = [_as_float_image(item) for item in images]
        pixels = self.control_image_processor.preprocess(
            images if isinstance(control_image, list) else images[0], height=height, width=width
        )  # (n, C, H, W)
        channels = self.controlnet.config.conditioning_channels
        if pixels.shape[1] != channels:
            pixels = pixels.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1)
        if pixels.shape[0] not in (1, batch_size):
            raise ValueError(
                f"Got {pixels.shape[0]} control images for {batch_size} images; pass one for all or one per image."
            )
        return pixels.expand(batch_size, -1, -1, -1).float()

    def encode_control(self, control_pixels: torch.FloatTensor, conditioning_scale: float) -> torch.FloatTensor:
        """The adapter's per-position embeddings of `(B, C, H, W)` maps: `(B, (H / f) * (W / f), hidden_size)`."""
        device = self._execution_device
        distinct = control_pixels[:1] if bool((control_pixels == control_pixels[:1]).all()) else control_pixels
        conditions = self.controlnet(distinct.to(device), conditioning_scale=conditioning_scale)  # once when shared
        return conditions.to(self.transformer.dtype).expand(control_pixels.shape[0], -1, -1)

    # -------------------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.LongTensor,
        control_image: PipelineImageInput,
        controlnet_conditioning_scale: float = 1.0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        orders: torch.LongTensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["tokens"],
        height: int | None = None,
        width: int | None = None,
        position_mode: str = "extrapolate",
        negative_class_labels: int | list[int] | torch.LongTensor | None = None,
        unconditional_control: bool = False,
        image: PipelineImageInput | None = None,
        mask_image: PipelineImageInput | None = None,
        mask_coverage_threshold: float = 0.0,
        paste_back: bool = False,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generates one image per class label that follows the condition map.

        Args:
            class_labels (`int`, `list[int]` or `torch.LongTensor`):
                Class of each image, in `[0, num_classes)`.
            control_image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The condition map itself, one for the batch or one per image: for edges, white edges on black (as
                diffusers' ControlNet pipelines take a Canny image; [`~arpg_hf.canny_edges`] computes one from a
                photo); for depth, white = near. Any size: it is resized to the canvas.
            controlnet_conditioning_scale (`float`, *optional*, defaults to 1.0):
                Multiplies the adapter's output; 1.0 as trained, 0.0 means no control (exactly [`ARPGPipeline`]).
            num_inference_steps, guidance_scale, generator, orders, temperature, top_k, top_p, output_type,
            return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs, height, width, position_mode,
            negative_class_labels:
                As in [`ARPGPipeline`] (with `image`, as in [`ARPGInpaintPipeline`]).
            unconditional_control (`bool`, *optional*, defaults to `False`):
                Whether the unconditional half of classifier-free guidance also sees the control. False (the paper's
                choice): it drops the class and the control, so guidance strengthens both.
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*),
            mask_image (*optional*), mask_coverage_threshold (`float`, *optional*), paste_back (`bool`, *optional*):
                Inpainting under the control, as in [`ARPGInpaintPipeline`]: the canvas is `image`, only the tokens
                under the mask (white = regenerate) are generated. `height` / `width` are then the image's.

        Returns:
            [`~diffusers.ImagePipelineOutput`] or `tuple`: the images (or token ids for `"latent"`).
        """
        labels = self._as_class_tensor(class_labels)
        device = self._execution_device
        if (image is None) != (mask_image is None):
            raise ValueError("Pass image and mask_image together (inpainting under a control), or neither.")
        if image is not None:
            if height is not None or width is not None:
                raise ValueError("height and width are the image's when inpainting; leave them out.")
            pixels, pixel_mask, labels = self.prepare_canvas(image, mask_image, labels, generator)
            height, width = pixels.shape[-2:]
        grid_size = self.token_grid_size(height, width)
        num_tokens = grid_size[0] * grid_size[1]
        num_inference_steps, guidance_scale = self.default_sampling_settings(
            num_inference_steps, guidance_scale, num_tokens
        )
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
            controlnet_conditioning_scale,
            num_tokens,
            mask_coverage_threshold,
        )
        batch_size = labels.shape[0]
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for {batch_size} images; pass one per image.")
        negative_labels = self.prepare_negative_class_labels(negative_class_labels, batch_size, device)
        factor = self.vqvae.downsample_factor
        control = self.prepare_control_image(control_image, grid_size[0] * factor, grid_size[1] * factor, batch_size)
        conditions = None
        if controlnet_conditioning_scale != 0:
            conditions = self.encode_control(control, controlnet_conditioning_scale)  # (B, L, D)
        controls = dict(
            position_conditions=conditions,
            guidance_position_conditions=conditions if unconditional_control else None,
        )
        sampling = dict(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p)
        decoding = dict(
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            position_mode=position_mode,
        )
        if image is None:
            self.check_memory(batch_size, grid_size, num_inference_steps)
            self.scheduler.set_timesteps(num_inference_steps, num_tokens, device=device)
            orders = self.prepare_orders(orders, batch_size, generator, device, num_tokens=num_tokens)
            tokens = self.generate_tokens(
                labels.to(device),
                orders,
                generator=generator,
                grid_size=grid_size,
                negative_class_labels=negative_labels,
                **sampling,
                **decoding,
                **controls,
            )
        else:
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
                **decoding,
                **controls,
            )
        paste = (pixels, pixel_mask) if image is not None and paste_back else None
        return self.finish_call(tokens, grid_size, output_type, return_dict, paste_back_onto=paste)
