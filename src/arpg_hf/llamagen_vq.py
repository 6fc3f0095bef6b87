"""LlamaGen's VQ tokenizer in diffusers' terms: the `VQModel` configuration of a tokenizer given by its sizes, and
the l2-normalised codebook rows its quantizer uses.

Both [`~arpg_hf.ARPGVQModel`] and the conversion of upstream checkpoints (`arpg_hf.conversion.vq`) need them, so they
live below both.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

# Group-norm epsilon of the reference; diffusers' Encoder/Decoder hard-code the same value (checked in ARPGVQModel).
REFERENCE_GROUP_NORM_EPS = 1e-6
# F.normalize's default epsilon, used by the reference quantizer.
L2_NORM_EPS = 1e-12


def l2_normalize_rows(rows: torch.Tensor) -> torch.Tensor:
    """Codebook rows `(num_codes, dim)` l2-normalised as LlamaGen does (F.normalize, eps 1e-12), computed in float32
    at least and returned in the rows' dtype."""
    compute_dtype = torch.promote_types(rows.dtype, torch.float32)
    return F.normalize(rows.to(compute_dtype), p=2, dim=-1, eps=L2_NORM_EPS).to(rows.dtype)


def llamagen_vq_config(
    base_channels: int = 128,
    channel_multipliers: Sequence[int] = (1, 1, 2, 2, 4),
    layers_per_block: int = 2,
    z_channels: int = 256,
    codebook_size: int = 16384,
    codebook_embed_dim: int = 8,
    norm_num_groups: int = 32,
    attention: bool = True,
    in_channels: int = 3,
    out_channels: int = 3,
) -> dict[str, Any]:
    """The [`ARPGVQModel`] (diffusers `VQModel`) configuration of a LlamaGen-style tokenizer given by its sizes:
    `ARPGVQModel(**llamagen_vq_config(base_channels=32, channel_multipliers=(1, 2), codebook_size=512))`.

    Args:
        base_channels (`int`, *optional*, defaults to 128): width of the first level (upstream `ch`).
        channel_multipliers (`Sequence[int]`, *optional*, defaults to `(1, 1, 2, 2, 4)`): width multiplier of every
            level, highest resolution first (upstream `encoder_ch_mult`); the image is downsampled by
            `2 ** (len(channel_multipliers) - 1)`.
        layers_per_block (`int`, *optional*, defaults to 2): resnets per encoder level (the decoder has one more).
        z_channels (`int`, *optional*, defaults to 256): channels between encoder/decoder and the quant convolutions.
        codebook_size (`int`, *optional*, defaults to 16384), codebook_embed_dim (`int`, *optional*, defaults to 8):
            number and dimension of the codes.
        norm_num_groups (`int`, *optional*, defaults to 32): groups of every group norm.
        attention (`bool`, *optional*, defaults to `True`): self-attention at the lowest resolution and in the middle
            blocks, as in VQ-16. `False` gives a purely convolutional tokenizer (the bundled digits one).
        in_channels (`int`, *optional*, defaults to 3), out_channels (`int`, *optional*, defaults to 3): image channels.
    """
    num_levels = len(channel_multipliers)
    lowest_down, lowest_up = (
        ("AttnDownEncoderBlock2D", "AttnUpDecoderBlock2D") if attention else ("DownEncoderBlock2D", "UpDecoderBlock2D")
    )
    return dict(
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=("DownEncoderBlock2D",) * (num_levels - 1) + (lowest_down,),
        up_block_types=(lowest_up,) + ("UpDecoderBlock2D",) * (num_levels - 1),
        block_out_channels=tuple(base_channels * multiplier for multiplier in channel_multipliers),
        layers_per_block=layers_per_block,
        latent_channels=z_channels,
        num_vq_embeddings=codebook_size,
        vq_embed_dim=codebook_embed_dim,
        norm_num_groups=norm_num_groups,
        mid_block_add_attention=attention,
    )
