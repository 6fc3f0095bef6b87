"""Upstream LlamaGen VQ tokenizer checkpoints (vq_ds16_c2i.pt and the like): their key map, the translation of their
`ModelArgs` fields into an [`~arpg_hf.ARPGVQModel`] configuration, and loading them."""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from diffusers.utils import logging

from ..llamagen_vq import REFERENCE_GROUP_NORM_EPS, l2_normalize_rows, llamagen_vq_config
from .checkpoints import KeyRule, check_shapes, convert_state_dict, load_reference_state_dict

logger = logging.get_logger(__name__)


def _conv1x1_to_linear(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], weight.shape[1])  # [C, C, 1, 1] -> [C, C]


def _param_rules(source: str, target: str, transform_weight=None) -> list[KeyRule]:
    """A weight and a bias rule for one module."""
    return [
        KeyRule(f"{source}.weight", f"{target}.weight", transform_weight),
        KeyRule(f"{source}.bias", f"{target}.bias"),
    ]


def _resnet_rules(source: str, target: str) -> list[KeyRule]:
    names = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2")]
    names.append(("nin_shortcut", "conv_shortcut"))  # 1x1 conv where the input and output widths differ
    return [rule for src, dst in names for rule in _param_rules(f"{source}.{src}", f"{target}.{dst}")]


def _attention_rules(source: str, target: str) -> list[KeyRule]:
    rules = _param_rules(f"{source}.norm", f"{target}.group_norm")
    for src, dst in [("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]:
        rules += _param_rules(f"{source}.{src}", f"{target}.{dst}", _conv1x1_to_linear)
    return rules


def _autoencoder_half_rules(part: str, blocks: str, resampler: str, resamplers: str) -> list[KeyRule]:
    """Rules of the encoder (``blocks`` = "down_blocks") or the decoder ("up_blocks"); block indices coincide."""
    return [
        *_param_rules(f"{part}.conv_in", f"{part}.conv_in"),
        *_resnet_rules(f"{part}.conv_blocks.{{}}.res.{{}}", f"{part}.{blocks}.{{}}.resnets.{{}}"),
        *_attention_rules(f"{part}.conv_blocks.{{}}.attn.{{}}", f"{part}.{blocks}.{{}}.attentions.{{}}"),
        *_param_rules(f"{part}.conv_blocks.{{}}.{resampler}.conv", f"{part}.{blocks}.{{}}.{resamplers}.0.conv"),
        *_resnet_rules(f"{part}.mid.0", f"{part}.mid_block.resnets.0"),
        *_attention_rules(f"{part}.mid.1", f"{part}.mid_block.attentions.0"),
        *_resnet_rules(f"{part}.mid.2", f"{part}.mid_block.resnets.1"),
        *_param_rules(f"{part}.norm_out", f"{part}.conv_norm_out"),
        *_param_rules(f"{part}.conv_out", f"{part}.conv_out"),
    ]


# Upstream (LlamaGen `VQModel`) key -> ARPGVQModel key. `{}` is a block / layer index.
VQ_REFERENCE_KEY_MAP: list[KeyRule] = [
    *_autoencoder_half_rules("encoder", "down_blocks", "downsample", "downsamplers"),
    *_autoencoder_half_rules("decoder", "up_blocks", "upsample", "upsamplers"),
    *_param_rules("quant_conv", "quant_conv"),
    *_param_rules("post_quant_conv", "post_quant_conv"),
    KeyRule("quantize.embedding.weight", "quantize.embedding.weight", l2_normalize_rows),  # normalised once, as used
]
# Training-only buffer (recently used codes) present in every upstream checkpoint.
VQ_REFERENCE_IGNORED_KEYS = ("quantize.codebook_used",)

# Upstream VQ fields that do not change the inference architecture (training losses, bookkeeping, derived sizes).
_IGNORED_REFERENCE_FIELDS = {
    "codebook_show_usage",
    "commit_loss_beta",
    "entropy_loss_ratio",
    "dropout_p",
    "num_res_blocks",
    "image_size",
    "latent_size",
    "_notes",
}
PUBLISHED_VQ16 = dict(
    codebook_size=16384,
    codebook_embed_dim=8,
    codebook_l2_norm=True,
    encoder_ch_mult=[1, 1, 2, 2, 4],
    decoder_ch_mult=[1, 1, 2, 2, 4],
    z_channels=256,
    ch=128,
    in_channels=3,
    out_channels=3,
    group_norm_groups=32,
)


def vq_config_from_reference(reference_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Maps upstream VQ `ModelArgs` fields to [`ARPGVQModel`] init kwargs.

    Args:
        reference_config (`dict`, *optional*):
            Upstream fields (`codebook_size`, `codebook_embed_dim`, `codebook_l2_norm`, `encoder_ch_mult`,
            `decoder_ch_mult`, `z_channels`, `ch`, `in_channels`, `out_channels`, `group_norm_groups`, ...). Missing
            fields take the published VQ-16 values. Training-only fields are ignored, and so is `num_res_blocks`: the
            upstream `VQModel` never passes it on, so the effective value is 2 (or `effective_num_res_blocks`).
            `None` gives the published VQ-16.

    Returns:
        `dict`: keyword arguments for `ARPGVQModel(**kwargs)`.
    """
    given = {k: v for k, v in dict(reference_config or {}).items() if not k.startswith("_")}  # "_notes" etc.
    fields = {**PUBLISHED_VQ16, **given}
    if list(fields["encoder_ch_mult"])[:1] != [1]:
        raise ValueError(
            f"encoder_ch_mult must start with 1, got {list(fields['encoder_ch_mult'])}: upstream's first level then "
            "widens inside its first resnet, a layout diffusers' encoder blocks cannot express (no published "
            "tokenizer uses it)."
        )
    if list(fields["encoder_ch_mult"]) != list(fields["decoder_ch_mult"]):
        raise ValueError(
            f"encoder_ch_mult {list(fields['encoder_ch_mult'])} differs from decoder_ch_mult "
            f"{list(fields['decoder_ch_mult'])}; ARPGVQModel supports mirrored encoder/decoder widths only."
        )
    required = {"norm_type": "group", "resamp_with_conv": True, "group_norm_eps": REFERENCE_GROUP_NORM_EPS}
    for name, value in required.items():
        if name in fields and fields[name] != value:
            raise ValueError(f"Reference field {name}={fields[name]!r} is not supported; only {value!r} is.")
    factor = 2 ** (len(fields["encoder_ch_mult"]) - 1)
    if "downsample" in fields and fields["downsample"] != factor:
        raise ValueError(
            f"Reference field downsample={fields['downsample']} contradicts encoder_ch_mult "
            f"{list(fields['encoder_ch_mult'])}, which downsamples by {factor}."
        )
    if not fields["codebook_l2_norm"]:
        raise ValueError(
            "Reference field codebook_l2_norm=False is not supported: ARPGVQModel is LlamaGen's l2-normalised "
            "quantizer (every published ARPG / LlamaGen tokenizer uses it)."
        )
    known = set(PUBLISHED_VQ16) | set(required) | _IGNORED_REFERENCE_FIELDS
    known |= {"downsample", "effective_num_res_blocks"}
    unknown = sorted(set(fields) - known)
    if unknown:
        logger.warning(f"Ignoring unknown VQ reference config fields: {unknown}.")
    return llamagen_vq_config(
        in_channels=fields["in_channels"],
        out_channels=fields["out_channels"],
        base_channels=fields["ch"],
        channel_multipliers=tuple(fields["encoder_ch_mult"]),
        layers_per_block=fields.get("effective_num_res_blocks", 2),
        z_channels=fields["z_channels"],
        codebook_size=fields["codebook_size"],
        codebook_embed_dim=fields["codebook_embed_dim"],
        norm_num_groups=fields["group_norm_groups"],
        attention=True,  # upstream VQ models always have attention at the lowest resolution
    )


def load_reference_vq(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    reference_config: Mapping[str, Any] | None,
    model_class: type,
):
    """Builds a `model_class` tokenizer from an upstream LlamaGen / ARPG VQ checkpoint, in eval mode. Call it as
    [`~arpg_hf.ARPGVQModel.from_reference_checkpoint`], which documents the arguments: the class comes from the caller
    so that this module never imports the model (which imports it when converting)."""
    state_dict = load_reference_state_dict(checkpoint)
    model = model_class(**vq_config_from_reference(reference_config))
    expected = model.state_dict()
    converted = convert_state_dict(
        state_dict,
        VQ_REFERENCE_KEY_MAP,
        expected.keys(),
        ignored_source_keys=VQ_REFERENCE_IGNORED_KEYS,
        name="VQ reference checkpoint",
    )
    check_shapes(converted, expected, name="VQ reference checkpoint")
    model.load_state_dict(converted, strict=True)
    return model.eval()
