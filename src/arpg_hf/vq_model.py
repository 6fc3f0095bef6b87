"""ARPGVQModel: the LlamaGen VQ-16 image tokenizer as a diffusers ``VQModel``.

diffusers' ``VQModel`` in the right configuration computes the same function as LlamaGen's ``VQModel``; only the
quantizer (l2-normalised nearest-code search) is written here. The module also holds the declarative key map and the
loader for upstream LlamaGen / ARPG VQ checkpoints.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, VQModel  # noqa: F401  (diffusers' pipeline loader looks ModelMixin up in this module)
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.utils import BaseOutput, logging
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn
from torch.func import functional_call

from .llamagen_vq import (  # noqa: F401  (llamagen_vq_config is public here too)
    L2_NORM_EPS,
    REFERENCE_GROUP_NORM_EPS,
    l2_normalize_rows,
    llamagen_vq_config,
)
from .saved_folders import config_json, variant_state_dict, without_load_path
from .validation import is_int

logger = logging.get_logger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class ARPGVQEncoderOutput(BaseOutput):
    """Output of [`ARPGVQModel.encode`].

    Args:
        latents (`torch.FloatTensor` of shape `(batch_size, codebook_embed_dim, height // f, width // f)`):
            The quantized latents: the (l2-normalised) codebook row chosen at every position. Float32 when the model
            is fp16/bf16 (the quantizer runs in float32), the model dtype otherwise.
        indices (`torch.LongTensor` of shape `(batch_size, height // f, width // f)`):
            The chosen code at every position, in raster order when flattened.
        pre_quant_latents (`torch.FloatTensor` of shape `(batch_size, codebook_embed_dim, height // f, width // f)`):
            ``quant_conv(encoder(images))`` before normalisation and quantization, in the model dtype.
    """

    latents: torch.Tensor
    indices: torch.Tensor
    pre_quant_latents: torch.Tensor


def _call_in_dtype(module: nn.Module, dtype: torch.dtype, *args: torch.Tensor) -> torch.Tensor:
    """Runs ``module(*args)`` with its floating-point weights cast to ``dtype`` (without modifying the module)."""
    tensors = dict(chain(module.named_parameters(), module.named_buffers()))
    if all(t.dtype == dtype for t in tensors.values() if t.is_floating_point()):
        return module(*args)
    tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
    return functional_call(module, tensors, args)


class ARPGVQModel(VQModel):
    r"""
    The LlamaGen VQ tokenizer used by ARPG (images in [-1, 1] <-> grids of codebook indices), as a diffusers
    [`~diffusers.VQModel`]: same configuration, same modules and parameter names, so a saved folder also loads as a
    stock `VQModel`. What this class adds is LlamaGen's quantizer: latents and codebook rows are l2-normalised before
    the nearest-code search (`encode` returns the indices too).

    The codebook holds the rows l2-normalised, as LlamaGen uses them (it normalises stored rows at every use; here they
    are normalised once, when converted or initialised, which gives the same values). A stock `VQModel` therefore looks
    up the same codes and decodes indices to the same images, bit for bit; and as `||e|| = 1` makes the nearest code by
    distance the nearest by angle, its own quantizer picks the same indices. Training a tokenizer keeps the rows
    normalised at every step through [`~arpg_hf.vq_training.register_codebook_normalization`].
    [`llamagen_vq_config`] gives the configuration of a tokenizer described by its sizes (VQ-16 is the default here).

    Args: those of [`~diffusers.VQModel`], with VQ-16's values as defaults (`block_out_channels` 128 x (1, 1, 2, 2,
    4), attention at the lowest resolution, `latent_channels` 256, 16384 codes of dimension 8, codebook lookup for
    decoding). Group norms use eps 1e-6 (diffusers' Encoder/Decoder hard-code it, as LlamaGen does).
    """

    _supports_gradient_checkpointing = True  # diffusers' Encoder / Decoder checkpoint their blocks

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
        up_block_types: Sequence[str] = ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4,
        block_out_channels: Sequence[int] = (128, 128, 256, 256, 512),
        layers_per_block: int = 2,
        act_fn: str = "silu",
        latent_channels: int = 256,
        sample_size: int = 256,
        num_vq_embeddings: int = 16384,
        norm_num_groups: int = 32,
        vq_embed_dim: int = 8,
        scaling_factor: float = 1.0,
        norm_type: str = "group",
        mid_block_add_attention: bool = True,
        lookup_from_codebook: bool = True,
        force_upcast: bool = False,
    ):
        _validate_config(
            dict(
                in_channels=in_channels,
                out_channels=out_channels,
                layers_per_block=layers_per_block,
                latent_channels=latent_channels,
                num_vq_embeddings=num_vq_embeddings,
                vq_embed_dim=vq_embed_dim,
                norm_num_groups=norm_num_groups,
            ),
            block_out_channels,
            down_block_types,
            up_block_types,
        )
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            latent_channels=latent_channels,
            sample_size=sample_size,
            num_vq_embeddings=num_vq_embeddings,
            norm_num_groups=norm_num_groups,
            vq_embed_dim=vq_embed_dim,
            scaling_factor=scaling_factor,
            norm_type=norm_type,
            mid_block_add_attention=mid_block_add_attention,
            lookup_from_codebook=lookup_from_codebook,
            force_upcast=force_upcast,
        )
        for module in chain(self.encoder.modules(), self.decoder.modules()):
            if isinstance(module, nn.GroupNorm) and module.eps != REFERENCE_GROUP_NORM_EPS:
                # diffusers' Encoder/Decoder hard-code 1e-6 today; should that change, keep the reference value.
                module.eps = REFERENCE_GROUP_NORM_EPS
        with torch.no_grad():  # unit rows from the start (diffusers draws them uniformly in +-1/num_vq_embeddings)
            self.quantize.embedding.weight.copy_(l2_normalize_rows(self.quantize.embedding.weight))

    # ------------------------------------------------------------------------------------- saved folders

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """`ConfigMixin.extract_init_dict`, reading configurations saved before this class was a `VQModel` (they
        named the sizes `base_channels`, `channel_multipliers`, `z_channels`, `codebook_size`, ...)."""
        if LEGACY_CONFIG_KEYS & config_dict.keys():
            config_dict = _upgrade_legacy_config(config_dict)
        return super().extract_init_dict(config_dict, **kwargs)

    def _fix_state_dict_keys_on_load(self, state_dict) -> None:
        """Reads the codebook of folders saved before this class was a `VQModel`: the parameter `codebook.weight`,
        rows as trained (normalised here, once, as that model did at every use)."""
        super()._fix_state_dict_keys_on_load(state_dict)
        if LEGACY_CODEBOOK_KEY in state_dict:
            state_dict["quantize.embedding.weight"] = l2_normalize_rows(state_dict.pop(LEGACY_CODEBOOK_KEY))

    @property
    def downsample_factor(self) -> int:
        """Ratio of image size to latent grid size (16 for VQ-16)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype decoding (and the quantizer) compute in: float32 when the weights are fp16/bf16."""
        return torch.float32 if self.dtype in HALF_DTYPES else self.dtype

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        **kwargs,
    ):
        """`ModelMixin.save_pretrained`; a variant named "fp16" or "bf16" is written in that dtype (the model itself
        is left as it is)."""

        def cast_to_variant(module, state_dict, prefix, local_metadata):
            state_dict.update(variant_state_dict(dict(state_dict), variant))

        hook = self.register_state_dict_post_hook(cast_to_variant)  # diffusers saves `self.state_dict()`
        try:
            return super().save_pretrained(
                save_directory,
                is_main_process=is_main_process,
                save_function=save_function,
                safe_serialization=safe_serialization,
                variant=variant,
                max_shard_size=max_shard_size,
                push_to_hub=push_to_hub,
                **kwargs,
            )
        finally:
            hook.remove()

    def to_json_string(self) -> str:
        """config.json as saved: without `_name_or_path` (where this model was loaded from)."""
        return config_json(without_load_path(json.loads(super().to_json_string())))

    # ----------------------------------------------------------------------------------------------- quantizer

    def normalized_codebook(self) -> torch.Tensor:
        """The (l2-normalised) codebook rows, `(num_vq_embeddings, vq_embed_dim)` in `compute_dtype`."""
        return self.quantize.embedding.weight.to(self.compute_dtype)

    def quantize_latents(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest-code search between the l2-normalised latents and codebook rows.

        Args:
            latents (`torch.FloatTensor` of shape `(batch_size, vq_embed_dim, h, w)`): pre-quant latents.

        Returns:
            `tuple(torch.FloatTensor, torch.LongTensor)`: the chosen (normalised) codes `(batch_size, vq_embed_dim, h,
            w)` in `compute_dtype` and their indices `(batch_size, h, w)`.
        """
        if latents.ndim != 4 or latents.shape[1] != self.config.vq_embed_dim:
            expected = f"(batch_size, {self.config.vq_embed_dim}, h, w)"
            raise ValueError(f"Expected latents of shape {expected}, got {tuple(latents.shape)}.")
        batch_size, embed_dim, height, width = latents.shape
        flat = latents.to(self.compute_dtype).permute(0, 2, 3, 1).reshape(-1, embed_dim)  # (B*h*w, D)
        flat = F.normalize(flat, p=2, dim=-1, eps=L2_NORM_EPS)
        codebook = self.normalized_codebook()  # (V, D)
        distances = (
            flat.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1) - 2 * flat @ codebook.t()
        )  # (B*h*w, V)
        indices = distances.argmin(dim=1)  # (B*h*w,), the first index wins a tie
        codes = codebook[indices].reshape(batch_size, height, width, embed_dim)  # (B, h, w, D)
        return codes.permute(0, 3, 1, 2).contiguous(), indices.reshape(batch_size, height, width)

    def indices_to_latents(self, indices: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """Looks indices up in the (normalised) codebook.

        Args:
            indices (`torch.LongTensor` of shape `(batch_size, h, w)` or `(batch_size, h * w)`):
                Code indices in raster order, each in `[0, num_vq_embeddings)`.
            shape (`tuple[int, int]`, *optional*):
                The grid `(h, w)` of 2-D `indices`; when omitted, a square grid is assumed.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, vq_embed_dim, h, w)` in `compute_dtype`.
        """
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"Expected integer code indices, got dtype {indices.dtype}.")
        if indices.ndim == 2:
            height, width = _grid_shape(indices.shape[1], shape)
            indices = indices.reshape(indices.shape[0], height, width)  # (B, h, w)
        elif indices.ndim != 3:
            raise ValueError(
                f"Expected code indices of shape (batch_size, h, w) or (batch_size, h*w), got {tuple(indices.shape)}."
            )
        if indices.numel() > 0:
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.config.num_vq_embeddings:
                raise ValueError(
                    f"Code indices must lie in [0, {self.config.num_vq_embeddings}) (the codebook size), got values in "
                    f"[{low}, {high}]. Pass image-token ids only (no mask, class or padding ids)."
                )
        codes = self.normalized_codebook()[indices.to(self.quantize.embedding.weight.device)]  # (B, h, w, D)
        return codes.permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)

    # ------------------------------------------------------------------------------------------ encode / decode

    @apply_forward_hook
    def encode(self, images: torch.Tensor, return_dict: bool = True) -> ARPGVQEncoderOutput | tuple:
        """Encodes images into quantized latents and code indices.

        Args:
            images (`torch.FloatTensor` of shape `(batch_size, in_channels, height, width)`):
                Images in [-1, 1]; `height` and `width` must be multiples of `downsample_factor`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an [`ARPGVQEncoderOutput`] instead of a tuple `(latents, indices, pre_quant)`.
        """
        self._check_images(images)
        hidden = self.encoder(images.to(self.dtype))  # (B, z, h, w)
        pre_quant = self.quant_conv(hidden)  # (B, D, h, w)
        latents, indices = self.quantize_latents(pre_quant)
        if not return_dict:
            return latents, indices, pre_quant
        return ARPGVQEncoderOutput(latents=latents, indices=indices, pre_quant_latents=pre_quant)

    @apply_forward_hook
    def decode(
        self, x: torch.Tensor, return_dict: bool = True, shape: tuple[int, int] | None = None
    ) -> DecoderOutput | tuple:
        """Decodes code indices or quantized latents into images (not clamped). Unlike `VQModel.decode`, float latents
        are decoded as given (they are codes already, e.g. `encode(...).latents`) and `shape` is the grid `(h, w)`.

        Decoding always runs in `compute_dtype`: a fp16/bf16 model casts float32 copies of its decoder weights for
        the call (the module itself is left as it is) and returns float32 images; other models return their dtype.

        Args:
            x (`torch.Tensor`):
                Either integer code indices of shape `(batch_size, h, w)` (or `(batch_size, h * w)`, see `shape`), or
                float latents of shape `(batch_size, vq_embed_dim, h, w)` such as `encode(...).latents`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a `DecoderOutput` instead of a tuple `(sample,)`.
            shape (`tuple[int, int]`, *optional*):
                The grid `(h, w)` of 2-D indices; a square grid is assumed when omitted.

        Returns:
            `DecoderOutput` whose `sample` is `(batch_size, out_channels, h * f, w * f)`, f = `downsample_factor`.
        """
        if x.is_floating_point():
            if x.ndim != 4 or x.shape[1] != self.config.vq_embed_dim:
                raise ValueError(
                    f"Expected float latents of shape (batch_size, {self.config.vq_embed_dim}, h, w), got "
                    f"{tuple(x.shape)}. Pass integer code indices of shape (batch_size, h, w) to decode codes."
                )
            latents = x.to(self.compute_dtype)
        else:
            latents = self.indices_to_latents(x, shape)
        hidden = _call_in_dtype(self.post_quant_conv, self.compute_dtype, latents)  # (B, z, h, w)
        sample = _call_in_dtype(self.decoder, self.compute_dtype, hidden)  # (B, C, H, W)
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Reconstructs images: `decode(encode(sample).latents)`.

        Args:
            sample (`torch.FloatTensor` of shape `(batch_size, in_channels, height, width)`): images in [-1, 1].
            return_dict (`bool`, *optional*, defaults to `True`): whether to return a `DecoderOutput`.
        """
        latents = self.encode(sample).latents
        return self.decode(latents, return_dict=return_dict)

    def _check_images(self, images: torch.Tensor) -> None:
        expected_channels = self.config.in_channels
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            found = f"dtype {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"Expected a float image tensor in [-1, 1], got {found}.")
        if images.ndim != 4 or images.shape[1] != expected_channels:
            raise ValueError(
                f"Expected images of shape (batch_size, {expected_channels}, height, width), got "
                f"{tuple(images.shape)}. Add a batch dimension or convert the images to {expected_channels} channels."
            )
        factor = self.downsample_factor
        height, width = images.shape[-2:]
        if height % factor or width % factor:
            raise ValueError(
                f"Image height and width must be multiples of the downsample factor {factor}, got {height}x{width}. "
                f"Resize or crop the images, e.g. to {max(factor, height // factor * factor)}x"
                f"{max(factor, width // factor * factor)}."
            )

    # ------------------------------------------------------------------------------------ reference checkpoints

    @classmethod
    def from_reference_checkpoint(
        cls,
        checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
        reference_config: Mapping[str, Any] | None = None,
    ) -> "ARPGVQModel":
        """Builds the model from an upstream LlamaGen / ARPG VQ checkpoint.

        Args:
            checkpoint (`str`, `os.PathLike` or `dict[str, torch.Tensor]`):
                A `.pt` file or an in-memory state dict, raw or wrapped under `"model"` / `"module"` /
                `"state_dict"`, with or without `module.` prefixes.
            reference_config (`dict`, *optional*):
                The upstream VQ `ModelArgs` fields (see [`~arpg_hf.conversion.vq_config_from_reference`]); `None`
                means the published VQ-16.

        Returns:
            [`ARPGVQModel`] in eval mode, with the checkpoint's dtype cast to the model's (float32).
        """
        from .conversion.vq import load_reference_vq  # the integration layer, imported when converting

        return load_reference_vq(checkpoint, reference_config, model_class=cls)


def _grid_shape(num_positions: int, shape: tuple[int, int] | None) -> tuple[int, int]:
    if shape is None:
        side = math.isqrt(num_positions)
        if side * side != num_positions:
            raise ValueError(
                f"Cannot infer a square grid from {num_positions} code indices per image; pass shape=(h, w) or "
                f"indices of shape (batch_size, h, w)."
            )
        return side, side
    if len(shape) != 2 or shape[0] * shape[1] != num_positions:
        raise ValueError(f"shape={tuple(shape)} must be (h, w) with h*w = {num_positions}, the indices per image.")
    return int(shape[0]), int(shape[1])


def _validate_config(
    positive: dict[str, int],
    block_out_channels: Sequence[int],
    down_block_types: Sequence[str],
    up_block_types: Sequence[str],
) -> None:
    """Raises a ValueError for a non-positive size, block lists that disagree, or level widths that the group norms
    cannot split."""
    for name, value in positive.items():
        if not (is_int(value, exact=True) and value >= 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    widths = list(block_out_channels) if isinstance(block_out_channels, (list, tuple)) else None
    if not widths or not all(is_int(width, exact=True) and width >= 1 for width in widths):
        raise ValueError(
            f"block_out_channels must be a non-empty list of positive integers (e.g. [128, 128, 256, 256, 512]), got "
            f"{block_out_channels!r}."
        )
    for name, types in (("down_block_types", down_block_types), ("up_block_types", up_block_types)):
        if len(types) != len(widths):
            raise ValueError(
                f"{name} must name one block per level of block_out_channels ({len(widths)}), got {len(types)}: "
                f"{list(types)}."
            )
    norm_num_groups = positive["norm_num_groups"]
    bad = [width for width in widths if width % norm_num_groups]
    if bad:
        raise ValueError(
            f"Every level width must be divisible by norm_num_groups={norm_num_groups}; block_out_channels {widths} "
            f"has {bad}. Choose widths that are multiples of {norm_num_groups} or change norm_num_groups."
        )


# ------------------------------------------------------------------------------- folders saved before 0.2
# Until ARPGVQModel became a diffusers VQModel, its config named the sizes as llamagen_vq_config's arguments (plus
# `codebook_l2_norm`, always true) and its codebook was the parameter `codebook.weight`.
LEGACY_CONFIG_KEYS = {
    "base_channels",
    "channel_multipliers",
    "z_channels",
    "codebook_size",
    "codebook_embed_dim",
    "codebook_l2_norm",
    "attention",
}
LEGACY_CODEBOOK_KEY = "codebook.weight"


def _upgrade_legacy_config(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    if not config_dict.get("codebook_l2_norm", True):
        raise ValueError(
            "This tokenizer folder was saved with codebook_l2_norm=false, which ARPGVQModel no longer supports (it is "
            "LlamaGen's l2-normalised quantizer)."
        )
    size_names = set(inspect.signature(llamagen_vq_config).parameters)
    sizes = {name: value for name, value in config_dict.items() if name in size_names}
    kept = {name: value for name, value in config_dict.items() if name not in size_names | LEGACY_CONFIG_KEYS}
    return {**kept, **llamagen_vq_config(**sizes)}
