"""ARPGPipeline: class-conditional image generation with randomized parallel decoding."""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Callable, Mapping

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, PipelineQuantizationConfig
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import logging

from .atomic_io import carry_over, staged_folder
from .configuration_arpg import ARPGConfig
from .cpu_gemm import packed_weights, use_cpu_gemm
from .labels import build_label2id, get_label_ids, model_id2label
from .memory import check_memory, generation_memory, vq_decoding_memory
from .modeling_arpg import ARPGForImageGeneration
from .random_utils import draw_uniform
from .rotary_2d import CLASS_POSITION, POSITION_MODES
from .saved_folders import (
    config_json,
    download_pipeline_folder,
    is_package_class,
    is_weights_of_variant,
    package_module_names,
    shim_module_names,
    write_import_shims,
)
from .scheduling_arpg import ARPGScheduler
from .validation import check_class_labels, check_orders, is_int, is_real
from .vq_model import ARPGVQModel

logger = logging.get_logger(__name__)

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
DEFAULT_NUM_INFERENCE_STEPS = 64
DEFAULT_GUIDANCE_SCALE = 4.0
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


def canvas_grid_size(height, width, downsample_factor: int) -> tuple[int, int]:
    """The (rows, cols) token grid of a `height` x `width` pixel canvas; ValueError unless both are positive
    multiples of `downsample_factor`."""
    for name, value in (("height", height), ("width", width)):
        if not is_int(value) or value <= 0:
            raise ValueError(f"{name} must be a positive int (pixels), got {value!r}.")
    if height % downsample_factor or width % downsample_factor:
        suggestion = (
            f"{max(1, height // downsample_factor) * downsample_factor}x"
            f"{max(1, width // downsample_factor) * downsample_factor}"
        )
        raise ValueError(
            f"The canvas must have sides that are multiples of the VQ downsample factor {downsample_factor}, got "
            f"{height}x{width} (height x width). Crop or resize to a multiple of {downsample_factor}, e.g. "
            f"{suggestion}."
        )
    return int(height) // downsample_factor, int(width) // downsample_factor


def check_guidance_scale(guidance_scale, name: str = "guidance_scale") -> None:
    """ValueError unless `guidance_scale` is a finite number >= 0 that float32 (the logits' dtype) can hold."""
    in_range = is_real(guidance_scale) and (math.isfinite(guidance_scale) and 0 <= guidance_scale <= FLOAT32_MAX)
    if not in_range:
        raise ValueError(
            f"{name} must be a number >= 0, finite and at most {FLOAT32_MAX:.3g} (it scales float32 logits), got "
            f"{guidance_scale!r}; the published models use 4 to 7.5."
        )


def check_num_inference_steps(num_inference_steps, num_tokens: int) -> None:
    """ValueError unless `num_inference_steps` is an int in [1, num_tokens] (at least one token per step)."""
    if not is_int(num_inference_steps):
        raise ValueError(f"num_inference_steps must be an int in [1, {num_tokens}], got {num_inference_steps!r}.")
    if not 1 <= num_inference_steps <= num_tokens:
        raise ValueError(
            f"num_inference_steps must lie in [1, {num_tokens}] (at least one token per step), "
            f"got {num_inference_steps}."
        )


def prefill_ends(cache, num_inputs: int, num_queries: int) -> tuple[torch.LongTensor, torch.LongTensor] | None:
    """The mask rule of a first step that feeds known tokens after the class token (editing): each input sees the
    inputs before it and itself, as a prefix of a training order does, and the queries see all of them. None for a
    first step that feeds the class token alone."""
    if num_inputs == 1:
        return None
    device = cache.keys[0].device
    ends = torch.arange(cache.seq_length + 1, cache.seq_length + num_inputs + 1, device=device)  # (1 + K,)
    return ends, torch.full((num_queries,), cache.seq_length + num_inputs, device=device)


def known_token_prefix(tokens: torch.LongTensor) -> tuple[torch.LongTensor, torch.LongTensor]:
    """The known tokens of each row (ids >= 0) and their raster positions, both (B, K) in raster order.

    Args:
        tokens (`torch.LongTensor` of shape `(B, L)`): raster-order ids, -1 where unknown; every row must have the
            same number K of known tokens (decoding a batch shares one step schedule).
    """
    known = tokens >= 0  # (B, L)
    counts = known.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(
            f"Every image of a batch must have the same number of known tokens, got {counts.tolist()}; decode images "
            "with different masks one by one."
        )
    num_known = int(counts[0])
    positions = torch.argsort((~known).to(torch.int8), dim=1, stable=True)[:, :num_known]  # (B, K), raster order
    return tokens.gather(1, positions), positions


class ARPGPipelineMixin:
    r"""
    What the ARPG pipelines share: components, decoding loop, sampling settings, loading and saving. Each pipeline
    is `ARPGPipelineMixin` plus `DiffusionPipeline`, with its own `check_inputs` and `__call__`.

    Args:
        transformer ([`ARPGForImageGeneration`]): the token generator.
        vqvae ([`ARPGVQModel`]): the tokenizer that turns token ids into images.
        scheduler ([`ARPGScheduler`]): decoding order, tokens per step, guidance per step and sampling.
    """

    model_cpu_offload_seq = "transformer->vqvae"
    _callback_tensor_inputs = ["tokens"]
    _compiled_decoder = None  # set by enable_compiled_decoding
    _guidance_scale = None  # the running call's settings (the guidance_scale / num_timesteps / interrupt properties)
    _num_timesteps = None
    _interrupt = False

    def __init__(self, transformer: ARPGForImageGeneration, vqvae: ARPGVQModel, scheduler: ARPGScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, vqvae=vqvae, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=vqvae.downsample_factor, do_normalize=True)

    # ------------------------------------------------------------------------------------ the running call
    @property
    def guidance_scale(self) -> float | None:
        """The guidance scale of the running (or last) call, as given or defaulted."""
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int | None:
        """The number of decoding steps of the running (or last) call, as planned."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in a step-end callback to stop early: the next step then decodes every token
        not decoded yet, at once, and is the last (the call returns complete images or tokens)."""
        return self._interrupt

    def _start_call(
        self, guidance_scale: float, num_inference_steps: int, callback_on_step_end, callback_on_step_end_tensor_inputs
    ) -> list[str]:
        """Records the call's settings for the properties above; returns the tensors to pass to the callback (those a
        diffusers `PipelineCallback` asks for)."""
        self._guidance_scale, self._num_timesteps, self._interrupt = guidance_scale, num_inference_steps, False
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            return list(callback_on_step_end.tensor_inputs)
        return list(callback_on_step_end_tensor_inputs)

    def check_memory(
        self,
        batch_size: int,
        grid_size: tuple[int, int],
        num_inference_steps: int,
        num_known: int = 0,
        encode: bool = False,
        advice: str = "Use a smaller batch or canvas",
    ) -> None:
        """Raises [`~arpg_hf.memory.InsufficientMemoryError`] (a `MemoryError` and a `ValueError`), before anything is
        allocated, when a call on `batch_size` images of `grid_size` tokens would need more memory than it may use
        (see `arpg_hf.memory`: the estimate, the budget and `ARPG_HF_MAX_MEMORY`).

        Args:
            num_known (`int`, *optional*): tokens of each canvas that are given (editing); the others are generated.
            encode (`bool`, *optional*): the call also encodes one canvas image with the VQ tokenizer (editing).
            advice (`str`, *optional*): what to change, for the message.
        """
        rows, cols = grid_size
        num_tokens = rows * cols - num_known
        steps = min(num_inference_steps, num_tokens)
        largest_step = max(self.scheduler.tokens_per_step_for(steps, num_tokens)) if num_tokens > 0 else 0
        required = generation_memory(self, batch_size, grid_size, largest_step, num_known)
        if encode:  # the encoder's activations at full resolution are about the decoder's
            factor = self.vqvae.downsample_factor
            required = max(required, vq_decoding_memory(self.vqvae, 1, rows * factor, cols * factor))
        height, width = rows * self.vqvae.downsample_factor, cols * self.vqvae.downsample_factor
        check_memory(
            required,
            f"Generating {batch_size} image(s) of {height}x{width} px ({rows}x{cols} tokens)",
            advice,
            device=self._execution_device,
        )

    # ------------------------------------------------------------------------------------------ class names
    @property
    def id2label(self) -> dict[int, str]:
        """Class names: the transformer config's `id2label` when it names every class, ImageNet-1k names for a
        1000-class model, the class indices as strings otherwise."""
        return model_id2label(self.transformer.config.id2label, self.transformer.config.num_classes)

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
        from .conversion.arpg import load_reference_arpg  # the integration layer, imported when converting

        transformer = load_reference_arpg(arpg_checkpoint, _read_json_if_path(reference_config))
        vqvae = ARPGVQModel.from_reference_checkpoint(vq_checkpoint, _read_json_if_path(vq_config))
        if vqvae.config.num_vq_embeddings != transformer.config.vocab_size:
            raise ValueError(
                f"The VQ codebook has {vqvae.config.num_vq_embeddings} codes but the decoder predicts "
                f"{transformer.config.vocab_size}; pass the tokenizer the decoder was trained with."
            )
        return cls(transformer=transformer, vqvae=vqvae, scheduler=scheduler or ARPGScheduler())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, cpu_gemm: str | None = "auto", **kwargs):
        """`DiffusionPipeline.from_pretrained`, then the transformer's fastest exact layout where it was loaded:
        [`~arpg_hf.use_cpu_gemm`] with `cpu_gemm` ("auto": float32 on the CPU of a machine without an accelerator gets
        oneDNN's pre-packed weights in place of the dense ones; otherwise nothing changes). `cpu_gemm="default"` gives
        plain, trainable `nn.Linear` weights (projections fused); `None` leaves the model exactly as loaded.

        `quantization_config` may be diffusers' `PipelineQuantizationConfig` or one model's quantization config (e.g.
        transformers' `TorchAoConfig`), which then quantizes the transformer. On CPUs
        `pipe.transformer.quantize("int8")` is faster (see `arpg_hf.quantization`).
        """
        config = kwargs.get("quantization_config")
        if config is not None and not isinstance(config, PipelineQuantizationConfig):
            kwargs["quantization_config"] = PipelineQuantizationConfig(quant_mapping={"transformer": config})
        pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if cpu_gemm is not None:
            use_cpu_gemm(pipeline.transformer, cpu_gemm)
        return pipeline

    # ----------------------------------------------------------------------------------------- saved folders
    @classmethod
    def load_config(cls, *args, **kwargs):
        """`ConfigMixin.load_config`, reading model_index.json's shim names (see `arpg_hf.saved_folders`) as the
        arpg_hf modules they import from, so that `from_pretrained` of our classes runs no code from the folder and
        needs no `trust_remote_code`."""
        loaded = super().load_config(*args, **kwargs)
        if isinstance(loaded, tuple):
            return (package_module_names(loaded[0]), *loaded[1:])
        return package_module_names(loaded)

    @classmethod
    def download(cls, pretrained_model_name, **kwargs) -> str:
        """Fetches a pipeline repository from the Hub, or finds it in the local cache, and returns its folder: the
        configs, model card and weights (those of `variant` in the components that have them), without importing
        any of its files. Takes the keyword arguments of `DiffusionPipeline.download` that concern which files to
        get (`cache_dir`, `revision`, `token`, `local_files_only`, `force_download`, `variant`, `use_safetensors`)."""
        names = ("cache_dir", "revision", "token", "local_files_only", "force_download", "variant", "use_safetensors")
        options = {name: kwargs[name] for name in names if name in kwargs}
        return download_pipeline_folder(pretrained_model_name, **options)

    def to_json_string(self) -> str:
        """model_index.json as saved: classes named by the import shims written beside them (see
        `arpg_hf.saved_folders`), so that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` finds
        them."""
        return config_json(shim_module_names(json.loads(super().to_json_string()), type(self)))

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ):
        """`DiffusionPipeline.save_pretrained` (every component honours `variant`, `safe_serialization` and
        `max_shard_size`), plus the import shims that generic loaders need. With `push_to_hub=True` the folder is
        uploaded with an ARPG model card, as [`~ARPGPipeline.push_to_hub`] does; `repo_id` (default: the folder's
        name), `commit_message`, `private`, `token` and `create_pr` go with it.

        The folder appears complete or not at all: it is written into a hidden staging folder beside
        `save_directory` and renamed into place (see `arpg_hf.atomic_io`). Saving into an existing folder keeps what
        a save in place would keep (the weights of other variants, the model card, other files)."""
        with staged_folder(save_directory) as staging:
            super().save_pretrained(
                staging, safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size
            )
            write_import_shims(staging, [type(self)])
            for name, component in self.components.items():
                if is_package_class(type(component)):  # our models and scheduler (each in the folder of its name)
                    write_import_shims(os.path.join(staging, name), [type(component)])
            carry_over(save_directory, staging, skip=lambda path: is_weights_of_variant(path, variant))
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            return self._upload_with_card(save_directory, repo_id, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
    ) -> str:
        """Uploads the pipeline folder (one Hub repository per model) with an ARPG model card as README.md.

        The card is the README.md of the folder the pipeline was loaded from when it has one (keeping its
        conversion provenance or training summary), a new one built from the configs otherwise. The upload goes
        through diffusers' `PushToHubMixin`; arguments are those of `DiffusionPipeline.push_to_hub`.
        """
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(
                folder, safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size
            )
            return self._upload_with_card(
                folder, repo_id, commit_message=commit_message, private=private, token=token, create_pr=create_pr
            )

    def _upload_with_card(self, folder, repo_id: str, commit_message=None, private=None, token=None, create_pr=False):
        from huggingface_hub import create_repo

        from .model_card import card_for_pipeline

        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        card_for_pipeline(self, repo_id=repo_id).save(os.path.join(folder, "README.md"))
        return self._upload_folder(folder, repo_id, token=token, commit_message=commit_message, create_pr=create_pr)

    # ------------------------------------------------------------------------------------- compiled decoding
    def enable_compiled_decoding(self, buckets=None, key_block=None, **compile_kwargs) -> None:
        """Opt-in: decoding steps run through `torch.compile` at bucketed static shapes ([`CompiledDecoder`]).

        The first calls compile a handful of shapes (per batch size, grid and position mode); later calls reuse them.
        Results equal the eager path's up to floating-point reassociation.

        Args:
            buckets (`Sequence[int]`, *optional*): padded sizes for the inputs and queries of a step (default: powers
                of two).
            key_block (`int`, *optional*): attention reads the cache up to the filled slots rounded up to a multiple
                of this (e.g. 64) instead of the whole cache (default): more shapes, fewer keys read per step.
            **compile_kwargs: for `torch.compile`, e.g. `mode="reduce-overhead"` (CUDA graphs) or `backend=...`.
        """
        from .compiled_decoding import CompiledDecoder

        if packed_weights(self.transformer):  # torch.compile lays out dense weights itself
            use_cpu_gemm(self.transformer, "default")

        self._compiled_decoder = CompiledDecoder(
            self.transformer, buckets=buckets, key_block=key_block, **compile_kwargs
        )

    def disable_compiled_decoding(self) -> None:
        """Back to eager decoding steps."""
        self._compiled_decoder = None

    @property
    def compiled_decoding(self) -> bool:
        """Whether decoding steps run compiled ([`~ARPGPipeline.enable_compiled_decoding`])."""
        return self._compiled_decoder is not None

    # -------------------------------------------------------------------------------------------- inputs
    def check_sampling_inputs(
        self,
        class_labels,
        guidance_scale,
        output_type,
        temperature,
        top_k,
        top_p,
        callback_on_step_end_tensor_inputs,
        position_mode,
    ) -> None:
        """The checks every ARPG pipeline's `check_inputs` shares (ValueError with what was expected)."""
        check_class_labels(class_labels, self.transformer.config.num_classes)
        check_guidance_scale(guidance_scale)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {position_mode!r}.")
        self.scheduler.check_sampling_args(temperature, top_k, top_p)
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may only name {self._callback_tensor_inputs}, got {sorted(unknown)}."
            )

    def default_sampling_settings(self, num_inference_steps, guidance_scale, num_tokens: int | None = None) -> tuple:
        """Fills in `None` arguments from the scheduler config's recommended settings (a converted or trained
        folder stores the ones its model was tuned for), else 64 steps (at most `num_tokens`) and guidance 4.0."""
        config = self.scheduler.config
        if num_inference_steps is None:
            recommended = config.get("recommended_num_inference_steps")
            num_inference_steps = DEFAULT_NUM_INFERENCE_STEPS if recommended is None else recommended
            if num_tokens is not None:
                num_inference_steps = min(num_inference_steps, num_tokens)
        if guidance_scale is None:
            recommended = config.get("recommended_guidance_scale")
            guidance_scale = DEFAULT_GUIDANCE_SCALE if recommended is None else recommended
        return num_inference_steps, guidance_scale

    def token_grid_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The (rows, cols) token grid of a `height` x `width` pixel canvas; the trained grid when both are None.

        Raises ValueError unless both sides are positive multiples of the VQ downsample factor.
        """
        config, factor = self.transformer.config, self.vqvae.downsample_factor
        height = config.grid_height * factor if height is None else height
        width = config.grid_width * factor if width is None else width
        return canvas_grid_size(height, width, factor)

    def _as_class_tensor(self, class_labels, name: str = "class_labels") -> torch.LongTensor:
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        try:
            labels = torch.as_tensor(class_labels)
        except (TypeError, ValueError, RuntimeError):
            labels = None
        if labels is None or labels.ndim != 1 or labels.dtype not in (torch.int32, torch.int64) or labels.numel() == 0:
            raise ValueError(f"{name} must be an int or a non-empty 1-D list of ints, got {class_labels!r}.")
        return labels.long()

    def prepare_negative_class_labels(
        self, negative_class_labels, batch_size: int, device=None
    ) -> torch.LongTensor | None:
        """`negative_class_labels` as a (batch_size,) tensor of classes in [0, num_classes) on `device`, or None."""
        if negative_class_labels is None:
            return None
        labels = self._as_class_tensor(negative_class_labels, name="negative_class_labels")
        if labels.shape[0] not in (1, batch_size):
            raise ValueError(
                f"Got {labels.shape[0]} negative_class_labels for {batch_size} images; pass one for all or one per image."
            )
        check_class_labels(labels, self.transformer.config.num_classes)
        return labels.expand(batch_size).to(device)

    def prepare_orders(
        self, orders, batch_size: int, generator, device, num_tokens: int | None = None
    ) -> torch.LongTensor:
        """Returns the decoding order of every image, (batch_size, num_tokens); `num_tokens` defaults to the trained
        grid's token count.

        Given `orders` ((num_tokens,) shared, or one row per image) are checked and used. With a list of generators
        each image draws its own order. Otherwise one order is shared by the batch and drawn as the published sampler
        draws it: `batch_size` uniforms first (its class-dropout mask, unused when sampling), then the order; so the
        same random state gives the published sampler's order.
        """
        num_tokens = self.transformer.config.num_image_tokens if num_tokens is None else num_tokens
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
        self,
        class_labels,
        orders,
        guidance_scale,
        generator,
        temperature,
        top_k,
        top_p,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("tokens",),
        known_tokens=None,
        grid_size=None,
        position_mode="extrapolate",
        negative_class_labels=None,
        position_conditions=None,
        guidance_position_conditions=None,
    ) -> torch.LongTensor:
        """The decoding loop: returns token ids (B, num_tokens) in raster order. `set_timesteps` must have run over
        the number of tokens to generate, `orders.shape[1]`.

        Args:
            class_labels (`torch.LongTensor` of shape `(B,)`): classes in `[0, num_classes)`.
            orders (`torch.LongTensor` of shape `(B, U)`): the raster positions to generate, in decoding order.
            known_tokens (`torch.LongTensor` of shape `(B, L)`, *optional*): raster-order token ids of the canvas,
                -1 where a token is to be generated (exactly the positions in `orders`; the same count in every row).
                The first step feeds the class token and then the known tokens at their positions, in raster order,
                causally (a known token sees the class and the known tokens before it, as a prefix of the training
                order does). None: nothing is known, `L = U`.
            grid_size (`tuple[int, int]`, *optional*): the (rows, cols) of the canvas; defaults to the trained grid.
            position_mode (`str`, *optional*, defaults to `"extrapolate"`): see [`ARPGRotaryEmbedding2D`].
            negative_class_labels (`torch.LongTensor` of shape `(B,)`, *optional*): the class of the guidance's second
                half; None: the null class (plain classifier-free guidance).
            position_conditions (`torch.FloatTensor` of shape `(B, L, D)`, *optional*): per-position query
                embeddings of the conditional half (a control adapter's output, see [`ARPGModel.forward`]).
            guidance_position_conditions (`torch.FloatTensor` of shape `(B, L, D)`, *optional*): those of the
                guidance's second half; None: none (its queries are the plain [MASK] embedding).
        """
        tokens = torch.full_like(orders, -1) if known_tokens is None else known_tokens.clone()  # (B, L), -1 = to do
        scheduler, compiled = self.scheduler, self._compiled_decoder
        cache = (compiled or self.transformer).allocate_cache(
            2 * orders.shape[0], 1 + tokens.shape[1], device=orders.device
        )
        inputs, input_positions = self.prefill_inputs(
            class_labels, orders, known_tokens, negative_class_labels
        )  # (2B, 1 + K) each
        step_kwargs = dict(grid_size=grid_size, position_mode=position_mode)
        if position_conditions is not None:
            second_half = guidance_position_conditions
            second_half = torch.zeros_like(position_conditions) if second_half is None else second_half
            step_kwargs["position_conditions"] = torch.cat([position_conditions, second_half])  # (2B, L, D)
        step_index = 0
        with self.progress_bar(total=scheduler.num_inference_steps) as progress_bar:
            while step_index < scheduler.num_inference_steps:
                if self.interrupt:  # a callback stopped the call: this step decodes every remaining token
                    scheduler.finish_at(step_index)
                start, end = scheduler.step_boundaries[step_index]
                positions = orders[:, start:end]  # (B, n)
                query_positions = positions.repeat(2, 1)  # (2B, n): the same targets in both halves
                ends = prefill_ends(cache, inputs.shape[1], end - start) if step_index == 0 else None
                logits = self.decode_step(inputs, input_positions, query_positions, cache, ends, **step_kwargs)
                conditional, unconditional = logits.chunk(2)
                scale = scheduler.guidance_scale_for_step(step_index, guidance_scale)
                guided = unconditional + (conditional - unconditional) * scale
                if not bool(torch.isfinite(guided).all()):
                    raise ValueError(
                        f"guidance_scale={guidance_scale!r} overflows the float32 logits at step {step_index} (scale "
                        f"{scale:.3g}); use a smaller guidance scale (the published models use 4 to 7.5)."
                    )
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
                step_index += 1
        return tokens

    def decode_step(
        self,
        input_ids,
        input_position_ids,
        query_position_ids,
        cache,
        attention_ends=None,
        grid_size=None,
        position_mode="extrapolate",
        position_conditions=None,
    ) -> torch.FloatTensor:
        """One decoding step through the transformer's forward (compiled when enabled): float32 logits (2B, n, V)."""
        step = self._compiled_decoder or (lambda *args, **kwargs: self.transformer(*args, **kwargs).logits)
        conditions = {} if position_conditions is None else {"position_conditions": position_conditions}
        return step(
            input_ids,
            input_position_ids=input_position_ids,
            query_position_ids=query_position_ids,
            past_key_values=cache,
            attention_ends=attention_ends,
            grid_size=grid_size,
            position_mode=position_mode,
            **conditions,
        ).float()

    def prefill_inputs(
        self, class_labels, orders, known_tokens=None, negative_class_labels=None
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """The first step's inputs, ids and positions of shape (2B, 1 + K): the class token (conditional rows, then
        the null class, or `negative_class_labels` (B,) when given) and, when `known_tokens` (B, L) is given, its K
        known tokens (ids >= 0) in raster order."""
        batch_size, device = class_labels.shape[0], orders.device
        second_half = torch.full_like(class_labels, -1) if negative_class_labels is None else negative_class_labels
        class_ids = torch.cat([class_labels, second_half])  # conditional rows, then the guidance's second half
        inputs = self.transformer.class_token_ids(class_ids.to(device))[:, None]  # (2B, 1)
        input_positions = torch.full_like(inputs, CLASS_POSITION)
        if known_tokens is None:
            return inputs, input_positions
        if (
            known_tokens.shape[0] != batch_size
            or bool((known_tokens.gather(1, orders) >= 0).any())
            or (known_tokens.shape[1] - orders.shape[1] != int((known_tokens[0] >= 0).sum()))
        ):
            raise ValueError(
                "known_tokens (B, L) must hold -1 exactly at the positions listed in orders (B, U), one row per image."
            )
        known_ids, known_positions = known_token_prefix(known_tokens)  # (B, K) each, raster order
        inputs = torch.cat([inputs, known_ids.repeat(2, 1)], dim=1)  # (2B, 1 + K)
        input_positions = torch.cat([input_positions, known_positions.repeat(2, 1)], dim=1)  # (2B, 1 + K)
        return inputs, input_positions

    def finish_call(self, tokens, grid_size, output_type: str, return_dict: bool, paste_back_onto=None):
        """The end of a call: the token ids (B, L) for `"latent"`, else the decoded images in `output_type`; offload
        hooks freed; an `ImagePipelineOutput` or a tuple. `paste_back_onto` = (pixels (B, 3, H, W) in [-1, 1],
        pixel_mask (B, H, W)) puts the unmasked pixels of the input over the decoded images (editing)."""
        if output_type == "latent":
            images = tokens
        else:
            decoded = self.decode_tokens(tokens, grid_size).float()  # (B, 3, H, W), nominal range [-1, 1]
            if paste_back_onto is not None:
                pixels, pixel_mask = paste_back_onto
                keep = ~pixel_mask[:, None].to(decoded.device)  # (B, 1, H, W)
                decoded = torch.where(keep, pixels.to(decoded.device), decoded)
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def decode_tokens(self, tokens: torch.LongTensor, grid_size: tuple[int, int] | None = None) -> torch.FloatTensor:
        """Decodes raster-order token ids (B, rows * cols) on the grid `grid_size` (default: the trained grid) to
        images (B, 3, rows * f, cols * f), nominal range [-1, 1], float32 for half-precision models."""
        rows, cols = grid_size or (self.transformer.config.grid_height, self.transformer.config.grid_width)
        return self.vqvae.decode(tokens.view(-1, rows, cols)).sample  # (B, 3, H, W)


class ARPGPipeline(ARPGPipelineMixin, DiffusionPipeline):
    r"""
    Class-conditional image generation with ARPG: image tokens are predicted in a random order, several per step, by a
    two-pass causal decoder, then decoded to pixels by a VQ tokenizer.

    Args:
        transformer ([`ARPGForImageGeneration`]): the token generator.
        vqvae ([`ARPGVQModel`]): the tokenizer that turns token ids into images.
        scheduler ([`ARPGScheduler`]): decoding order, tokens per step, guidance per step and sampling.
    """

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
        height=None,
        width=None,
        position_mode="extrapolate",
    ):
        grid_height, grid_width = self.token_grid_size(height, width)
        check_num_inference_steps(num_inference_steps, grid_height * grid_width)
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
        class_labels: int | list[int] | torch.LongTensor,
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
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generates one image per class label.

        Args:
            class_labels (`int`, `list[int]` or `torch.LongTensor`):
                Class of each image, in `[0, num_classes)`; see [`~ARPGPipeline.get_label_ids`] for names.
            num_inference_steps (`int`, *optional*):
                Decoding steps, in `[1, number of image tokens]`. How many tokens each step predicts follows the
                scheduler's `token_schedule`. Defaults to the scheduler config's `recommended_num_inference_steps`
                (64 when it has none), at most the number of tokens.
            guidance_scale (`float`, *optional*):
                Classifier-free guidance scale (>= 0), applied per step according to the scheduler's
                `guidance_schedule`. Defaults to the scheduler config's `recommended_guidance_scale` (4.0 when it
                has none).
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
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after every step as `callback_on_step_end(pipe, step_index, timestep, callback_kwargs)`, with
                `callback_kwargs["tokens"]` the (batch, num_tokens) ids so far (-1 where not generated yet). A
                returned `"tokens"` replaces them; changed tokens at this step's positions are what gets fed next.
                Setting `pipe._interrupt = True` stops the call early: the next step decodes every token not decoded
                yet, at once, and is the last, so the call still returns complete images (or tokens).
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["tokens"]`):
                Tensors passed to the callback (a diffusers `PipelineCallback` names its own `tensor_inputs`).
            height (`int`, *optional*), width (`int`, *optional*):
                Canvas size in pixels, multiples of the VQ downsample factor; default to the trained grid (256 for
                the published models). Larger canvases work without retraining: the rotary positions are computed
                from (row, col) on the canvas grid, see `position_mode`. `num_tokens` is then `(height / f) *
                (width / f)` and `"latent"` returns that many tokens per image, in raster order.
            position_mode (`str`, *optional*, defaults to `"extrapolate"`):
                For canvases other than the trained grid: `"extrapolate"` keeps integer rows/cols beyond the trained
                range; `"interpolate"` scales them into the trained range.
            negative_class_labels (`int`, `list[int]` or `torch.LongTensor`, *optional*):
                Classes to steer away from, the counterpart of diffusers' `negative_prompt`: the second half of
                classifier-free guidance is conditioned on them instead of the null class, so the guided logits are
                `negative + guidance_scale * (conditional - negative)`. One for the batch or one per image.

        Returns:
            [`~diffusers.ImagePipelineOutput`] or `tuple`: the images (or token ids for `"latent"`).
        """
        labels = self._as_class_tensor(class_labels)
        device = self._execution_device
        negative_labels = self.prepare_negative_class_labels(negative_class_labels, labels.shape[0], device)
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
            height,
            width,
            position_mode,
        )
        if isinstance(generator, list) and len(generator) != labels.shape[0]:
            raise ValueError(f"Got {len(generator)} generators for {labels.shape[0]} images; pass one per image.")
        self.check_memory(labels.shape[0], grid_size, num_inference_steps)
        self.scheduler.set_timesteps(num_inference_steps, num_tokens, device=device)
        orders = self.prepare_orders(orders, labels.shape[0], generator, device, num_tokens=num_tokens)
        tokens = self.generate_tokens(
            labels.to(device),
            orders,
            guidance_scale,
            generator,
            temperature,
            top_k,
            top_p,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            grid_size=grid_size,
            position_mode=position_mode,
            negative_class_labels=negative_labels,
        )
        return self.finish_call(tokens, grid_size, output_type, return_dict)
