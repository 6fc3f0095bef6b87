"""ARPGPipeline: class-conditional image generation with randomized parallel decoding."""

from __future__ import annotations

import json
import numbers
import os
from typing import Any, Callable, Mapping

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import logging

from .configuration_arpg import ARPGConfig
from .labels import build_label2id, get_label_ids, imagenet_id2label
from .modeling_arpg import ARPGForImageGeneration, check_class_labels, check_orders
from .random_utils import draw_uniform
from .reference_arpg import load_reference_arpg
from .rotary_2d import CLASS_POSITION
from .scheduling_arpg import ARPGScheduler
from .vq_model import ARPGVQModel

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from arpg_hf import ARPGPipeline, ARPGScheduler

        >>> pipe = ARPGPipeline.from_pretrained("path/to/arpg-l")
        >>> pipe.scheduler = ARPGScheduler.from_config(pipe.scheduler.config, token_schedule="cosine")
        >>> class_ids = pipe.get_label_ids(["tabby cat", "golden retriever"])
        >>> images = pipe(class_ids, num_inference_steps=64, guidance_scale=4.0,
        ...               generator=torch.Generator().manual_seed(0)).images
        ```
"""


def _read_json_if_path(config):
    """Configs may be given as dicts or as paths of JSON files holding them."""
    if isinstance(config, (str, os.PathLike)):
        with open(config, encoding="utf-8") as file:
            return json.load(file)
    return config


class ARPGPipeline(DiffusionPipeline):
    r"""
    Class-conditional image generation with ARPG: image tokens are predicted in a random order, several per step, by a
    two-pass causal decoder, then decoded to pixels by a VQ tokenizer.

    Args:
        transformer ([`ARPGForImageGeneration`]): the token generator.
        vqvae ([`ARPGVQModel`]): the tokenizer that turns token ids into images.
        scheduler ([`ARPGScheduler`]): decoding order, tokens per step, guidance per step and sampling.
    """

    model_cpu_offload_seq = "transformer->vqvae"
    _callback_tensor_inputs = ["tokens"]

    def __init__(self, transformer: ARPGForImageGeneration, vqvae: ARPGVQModel, scheduler: ARPGScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, vqvae=vqvae, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=vqvae.downsample_factor, do_normalize=True)

    # ------------------------------------------------------------------------------------------ class names
    @property
    def id2label(self) -> dict[int, str]:
        """Class names: the transformer config's `id2label` when it names every class, ImageNet-1k names for a
        1000-class model, the class indices as strings otherwise."""
        config = self.transformer.config
        names = {int(k): v for k, v in (config.id2label or {}).items()}
        is_default = all(name == f"LABEL_{k}" for k, name in names.items())  # transformers' placeholder names
        if len(names) == config.num_classes and not is_default:
            return names
        if config.num_classes == 1000:
            return imagenet_id2label()
        return {i: str(i) for i in range(config.num_classes)}

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Maps class names (any comma-separated synonym, e.g. "tabby cat") to class ids."""
        return get_label_ids(label, build_label2id(self.id2label))

    # -------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_reference_checkpoints(
        cls,
        arpg_checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
        vq_checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
        reference_config: Mapping[str, Any] | ARPGConfig | str | os.PathLike | None = None,
        vq_config: Mapping[str, Any] | str | os.PathLike | None = None,
        scheduler: ARPGScheduler | None = None,
    ) -> "ARPGPipeline":
        """Builds a pipeline from the upstream checkpoint formats (e.g. arpg_300m.pt and vq_ds16_c2i.pt).

        Args:
            arpg_checkpoint: path or state dict of the decoder (raw, or wrapped under "model" / "module" /
                "state_dict"; `module.` and `_orig_mod.` prefixes are stripped).
            vq_checkpoint: path or state dict of the LlamaGen VQ tokenizer.
            reference_config (`dict` or path, *optional*): upstream `ModelArgs` fields of the decoder (dim, n_layer,
                n_head, vocab_size, num_classes, block_size, ...), or a JSON file of them, or an [`ARPGConfig`];
                defaults to the published ARPG-L.
            vq_config (`dict` or path, *optional*): upstream VQ fields (codebook_size, codebook_embed_dim, z_channels,
                ch, encoder_ch_mult, ...), or a JSON file of them; defaults to the published VQ-16.
            scheduler ([`ARPGScheduler`], *optional*): defaults to arccos tokens per step with linear guidance.
        """
        transformer = load_reference_arpg(arpg_checkpoint, _read_json_if_path(reference_config))
        vqvae = ARPGVQModel.from_reference_checkpoint(vq_checkpoint, _read_json_if_path(vq_config))
        if vqvae.config.codebook_size != transformer.config.vocab_size:
            raise ValueError(
                f"The VQ codebook has {vqvae.config.codebook_size} codes but the decoder predicts "
                f"{transformer.config.vocab_size}; pass the tokenizer the decoder was trained with."
            )
        return cls(transformer=transformer, vqvae=vqvae, scheduler=scheduler or ARPGScheduler())

    # -------------------------------------------------------------------------------------------- inputs
    def check_inputs(self, class_labels, num_inference_steps, guidance_scale, output_type, temperature, top_k, top_p,
                     callback_on_step_end_tensor_inputs):  # fmt: skip
        check_class_labels(class_labels, self.transformer.config.num_classes)
        num_tokens = self.transformer.config.num_image_tokens
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral):
            raise ValueError(f"num_inference_steps must be an int in [1, {num_tokens}], got {num_inference_steps!r}.")
        if not 1 <= num_inference_steps <= num_tokens:
            raise ValueError(
                f"num_inference_steps must lie in [1, {num_tokens}] (at least one token per step), "
                f"got {num_inference_steps}."
            )
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        self.scheduler.check_sampling_args(temperature, top_k, top_p)
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may only name {self._callback_tensor_inputs}, got {sorted(unknown)}."
            )

    def _as_class_tensor(self, class_labels) -> torch.LongTensor:
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        labels = torch.as_tensor(class_labels)
        if labels.ndim != 1 or labels.dtype not in (torch.int32, torch.int64) or labels.numel() == 0:
            raise ValueError(f"class_labels must be an int or a non-empty 1-D list of ints, got {class_labels!r}.")
        return labels.long()

    def prepare_orders(self, orders, batch_size: int, generator, device) -> torch.LongTensor:
        """Returns the decoding order of every image, (batch_size, num_tokens).

        Given `orders` ((num_tokens,) shared, or one row per image) are checked and used. With a list of generators
        each image draws its own order. Otherwise one order is shared by the batch and drawn as the published sampler
        draws it: `batch_size` uniforms first (its class-dropout mask, unused when sampling), then the order; so the
        same random state gives the published sampler's order.
        """
        num_tokens = self.transformer.config.num_image_tokens
        if orders is not None:
            orders = torch.as_tensor(orders)
            check_orders(orders, batch_size, num_tokens)
        elif isinstance(generator, list):
            orders = torch.stack([self.scheduler.random_order(num_tokens, generator=g) for g in generator])
        else:
            # The published sampler's class-dropout draw (drop probability 0): consumed only to stay in step with it.
            draw_uniform((batch_size,), generator, device)
            orders = self.scheduler.random_order(num_tokens, generator=generator, device=device)
        return orders.to(device).long().expand(batch_size, num_tokens)

    def _sample(self, logits, step_index, generator, temperature, top_k, top_p) -> torch.LongTensor:
        """Draws the step's tokens (B, n) from guided logits, per image when given one generator per image."""
        if not isinstance(generator, list):
            return self.scheduler.step(logits, step_index, temperature, top_k, top_p, generator).sampled_tokens
        rows = [
            self.scheduler.step(row[None], step_index, temperature, top_k, top_p, g).sampled_tokens
            for row, g in zip(logits, generator)
        ]
        return torch.cat(rows)

    # ------------------------------------------------------------------------------------------- decoding
    def generate_tokens(
        self, class_labels, orders, guidance_scale, generator, temperature, top_k, top_p,
        callback_on_step_end=None, callback_on_step_end_tensor_inputs=("tokens",),
    ) -> torch.LongTensor:  # fmt: skip
        """The decoding loop: returns token ids (B, num_tokens) in raster order. `set_timesteps` must have run."""
        transformer, scheduler = self.transformer, self.scheduler
        batch_size = class_labels.shape[0]
        device = orders.device
        cache = transformer.allocate_cache(2 * batch_size, device=device)
        class_ids = torch.cat([class_labels, torch.full_like(class_labels, -1)])  # conditional rows, then null class
        inputs = transformer.class_token_ids(class_ids.to(device))[:, None]  # (2B, 1)
        input_positions = torch.full_like(inputs, CLASS_POSITION)
        tokens = torch.full_like(orders, -1)  # (B, L), -1 = not generated yet
        with self.progress_bar(total=scheduler.num_inference_steps) as progress_bar:
            for step_index, (start, end) in enumerate(scheduler.step_boundaries):
                positions = orders[:, start:end]  # (B, n)
                query_positions = positions.repeat(2, 1)  # (2B, n): the same targets in both halves
                logits = transformer.decode_step(inputs, input_positions, query_positions, cache)  # (2B, n, V)
                conditional, unconditional = logits.chunk(2)
                scale = scheduler.guidance_scale_for_step(step_index, guidance_scale)
                guided = unconditional + (conditional - unconditional) * scale
                sampled = self._sample(guided, step_index, generator, temperature, top_k, top_p)  # (B, n)
                tokens.scatter_(1, positions, sampled)
                if callback_on_step_end is not None:
                    available = {"tokens": tokens}
                    callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, step_index, scheduler.timesteps[step_index], callback_kwargs)
                    tokens = outputs.pop("tokens", tokens)
                    sampled = tokens.gather(1, positions)
                inputs, input_positions = sampled.repeat(2, 1), query_positions
                progress_bar.update()
        return tokens

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.LongTensor,
        num_inference_steps: int = 64,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        orders: torch.LongTensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["tokens"],
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generates one image per class label.

        Args:
            class_labels (`int`, `list[int]` or `torch.LongTensor`):
                Class of each image, in `[0, num_classes)`; see [`~ARPGPipeline.get_label_ids`] for names.
            num_inference_steps (`int`, *optional*, defaults to 64):
                Decoding steps, in `[1, number of image tokens]`. How many tokens each step predicts follows the
                scheduler's `token_schedule`.
            guidance_scale (`float`, *optional*, defaults to 4.0):
                Classifier-free guidance scale (>= 0), applied per step according to the scheduler's
                `guidance_schedule`.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Source of the random order and of the sampled tokens. One generator: one order shared by the batch.
                One per image: each image gets its own order and draws, so it does not depend on the rest of the batch.
            orders (`torch.LongTensor`, *optional*):
                Decoding order: a permutation of the raster positions, `(num_tokens,)` for the whole batch or
                `(batch, num_tokens)`. Drawn from `generator` when omitted.
            temperature (`float`, *optional*, defaults to 1.0):
                Softmax temperature; 0 means greedy (argmax).
            top_k (`int`, *optional*):
                Keep only the `top_k` most likely tokens; 1 means greedy. None or 0 disables the filter.
            top_p (`float`, *optional*):
                Nucleus sampling threshold in (0, 1]. None or 1 disables the filter.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"` (float images in [0, 1], NHWC), `"pt"` (float images in [0, 1], NCHW) or `"latent"`
                (token ids, `torch.LongTensor` of shape `(batch, num_tokens)` in raster order).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`~diffusers.ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*):
                Called after every step as `callback_on_step_end(pipe, step_index, timestep, callback_kwargs)`, with
                `callback_kwargs["tokens"]` the (batch, num_tokens) ids so far (-1 where not generated yet). A
                returned `"tokens"` replaces them; changed tokens at this step's positions are what gets fed next.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["tokens"]`):
                Tensors passed to the callback.

        Returns:
            [`~diffusers.ImagePipelineOutput`] or `tuple`: the images (or token ids for `"latent"`).
        """
        labels = self._as_class_tensor(class_labels)
        self.check_inputs(labels, num_inference_steps, guidance_scale, output_type, temperature, top_k, top_p,
                          callback_on_step_end_tensor_inputs)  # fmt: skip
        if isinstance(generator, list) and len(generator) != labels.shape[0]:
            raise ValueError(f"Got {len(generator)} generators for {labels.shape[0]} images; pass one per image.")
        device = self._execution_device
        self.scheduler.set_timesteps(num_inference_steps, self.transformer.config.num_image_tokens, device=device)
        orders = self.prepare_orders(orders, labels.shape[0], generator, device)
        tokens = self.generate_tokens(
            labels.to(device), orders, guidance_scale, generator, temperature, top_k, top_p,
            callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        if output_type == "latent":
            images = tokens
        else:
            config = self.transformer.config
            token_grid = tokens.view(-1, config.grid_height, config.grid_width)  # (B, h, w)
            decoded = self.vqvae.decode(token_grid).sample  # (B, 3, H, W), nominal range [-1, 1]
            images = self.image_processor.postprocess(decoded.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
