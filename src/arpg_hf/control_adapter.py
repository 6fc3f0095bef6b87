"""The control adapter of ControlARPG: a condition map (edges, depth) -> one embedding per token position.

ARPG's Pass-2 queries name only the position they predict, so a condition can enter there: the adapter turns a
condition image into one vector per token of the canvas, and the query that predicts position p starts from the
[MASK] embedding plus that vector (`position_conditions` of [`ARPGModel.forward`]). Pass 1, the cache, the random
order and guidance are untouched, and without a condition the base model runs exactly as before.

The adapter is a patch embedding (a convolution with kernel and stride equal to the tokenizer's downsample factor,
so that patch p covers the pixels of token p) followed by residual 3x3 convolution blocks over the token grid and a
1x1 projection to the decoder width. Convolutions make it work on any canvas size; the projection starts at zero (as
ControlNet's zero convolutions do), so fine-tuning starts from the base model's behaviour.
"""

from __future__ import annotations

import json

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .saved_folders import config_json, without_load_path

CONTROL_TYPES = ("edges", "depth")


class ARPGControlResidualBlock(nn.Module):
    """x + conv3x3(silu(norm(conv3x3(silu(norm(x))))))."""

    def __init__(self, channels: int, norm_num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_num_groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.conv1(nn.functional.silu(self.norm1(hidden_states)))
        hidden_states = self.conv2(nn.functional.silu(self.norm2(hidden_states)))
        return residual + hidden_states


class ARPGControlAdapter(ModelMixin, ConfigMixin):
    r"""
    Turns condition maps into per-position query embeddings for [`ARPGForImageGeneration`] (ControlARPG).

    Saved as the `controlnet/` component of an [`ARPGControlPipeline`] folder; a base ARPG folder plus an adapter folder
    make a control pipeline: `ARPGControlPipeline.from_pretrained(base, controlnet=ARPGControlAdapter.from_pretrained(
    adapter))`.

    Args:
        output_size (`int`): the decoder's `hidden_size`.
        patch_size (`int`): the tokenizer's downsample factor (pixels per token side).
        conditioning_channels (`int`, *optional*, defaults to 1): channels of the condition map (1 for edges / depth).
        block_channels (`int`, *optional*, defaults to 64): width of the convolution blocks.
        num_blocks (`int`, *optional*, defaults to 2): residual blocks over the token grid.
        norm_num_groups (`int`, *optional*, defaults to 8): groups of the blocks' GroupNorm.
        control_type (`str`, *optional*, defaults to `"edges"`): what the maps show, one of `CONTROL_TYPES` (see
            `arpg_hf.control_conditions` for how to compute them).
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        output_size: int,
        patch_size: int,
        conditioning_channels: int = 1,
        block_channels: int = 64,
        num_blocks: int = 2,
        norm_num_groups: int = 8,
        control_type: str = "edges",
    ):
        super().__init__()
        if control_type not in CONTROL_TYPES:
            raise ValueError(f"control_type must be one of {CONTROL_TYPES}, got {control_type!r}.")
        if block_channels % norm_num_groups:
            raise ValueError(
                f"block_channels ({block_channels}) must be a multiple of norm_num_groups ({norm_num_groups})."
            )
        self.patch_embed = nn.Conv2d(conditioning_channels, block_channels, patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(
            [ARPGControlResidualBlock(block_channels, norm_num_groups) for _ in range(num_blocks)]
        )
        self.norm_out = nn.GroupNorm(norm_num_groups, block_channels)
        self.proj_out = nn.Conv2d(block_channels, output_size, 1)
        nn.init.zeros_(self.proj_out.weight)  # starts as "no control": the base model's queries
        nn.init.zeros_(self.proj_out.bias)

    def to_json_string(self) -> str:
        """config.json as saved: without `_name_or_path` (where this adapter was loaded from)."""
        return config_json(without_load_path(json.loads(super().to_json_string())))

    def forward(self, control_image: torch.Tensor, conditioning_scale: float = 1.0) -> torch.Tensor:
        r"""
        Args:
            control_image (`torch.FloatTensor` of shape `(batch, conditioning_channels, height, width)`): condition
                maps in [0, 1] (edges: 1 on an edge); sides multiples of `patch_size`.
            conditioning_scale (`float`, *optional*, defaults to 1.0): multiplies the output (0: no control).

        Returns:
            `torch.FloatTensor` of shape `(batch, (height / patch_size) * (width / patch_size), output_size)`: one
            embedding per token position, raster order.
        """
        channels, patch = self.config.conditioning_channels, self.config.patch_size
        if control_image.ndim != 4 or control_image.shape[1] != channels:
            raise ValueError(
                f"control_image must be (batch, {channels}, height, width), got {tuple(control_image.shape)}."
            )
        if control_image.shape[-2] % patch or control_image.shape[-1] % patch:
            raise ValueError(
                f"The control image is {control_image.shape[-2]}x{control_image.shape[-1]} px; its sides must be "
                f"multiples of the patch size {patch} (the tokenizer's downsample factor)."
            )
        hidden_states = self.patch_embed(control_image.to(self.dtype))  # (B, C, rows, cols)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        hidden_states = self.proj_out(nn.functional.silu(self.norm_out(hidden_states)))  # (B, D, rows, cols)
        return hidden_states.flatten(2).transpose(1, 2) * conditioning_scale  # (B, rows * cols, D)
