"""Upstream ARPG decoder checkpoints (arpg_300m.pt / arpg_700m.pt / arpg_1b.pt and their training outputs): their key
map, the translation of their `ModelArgs` fields into an [`~arpg_hf.ARPGConfig`], and loading them."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch
from transformers.utils import logging

from ..configuration_arpg import ARPG_PRESETS, ARPGConfig
from ..modeling_arpg import ARPGForImageGeneration
from .checkpoints import KeyRule, check_shapes, convert_state_dict, load_reference_state_dict

logger = logging.get_logger(__name__)

# Upstream name -> ours. `{}` is a layer index.
ARPG_REFERENCE_KEY_MAP = [
    KeyRule("embeddings.weight", "model.embed_tokens.weight"),
    *[
        KeyRule(f"layers.self_dec.{{}}.{src}.weight", f"model.self_layers.{{}}.{dst}.weight")
        for src, dst in [
            ("attn.to_q", "self_attn.q_proj"),
            ("attn.to_k", "self_attn.k_proj"),
            ("attn.to_v", "self_attn.v_proj"),
            ("attn.proj", "self_attn.o_proj"),
            ("ffn.w1", "mlp.gate_proj"),
            ("ffn.w3", "mlp.up_proj"),
            ("ffn.w2", "mlp.down_proj"),
            ("attn_norm", "attn_norm"),
            ("ffn_norm", "ffn_norm"),
        ]
    ],
    *[
        KeyRule(f"layers.cross_dec.{{}}.{src}.weight", f"model.cross_layers.{{}}.{dst}.weight")
        for src, dst in [
            ("attn.to_q", "cross_attn.q_proj"),
            ("attn.proj", "cross_attn.o_proj"),
            ("ffn.w1", "mlp.gate_proj"),
            ("ffn.w3", "mlp.up_proj"),
            ("ffn.w2", "mlp.down_proj"),
            ("attn_norm", "attn_norm"),
            ("ffn_norm", "ffn_norm"),
        ]
    ],
    KeyRule("layers.norm.weight", "model.kv_norm.weight"),
    KeyRule("layers.to_k.weight", "model.k_proj.weight"),
    KeyRule("layers.to_v.weight", "model.v_proj.weight"),
    KeyRule("norm.weight", "model.norm.weight"),
    KeyRule("head.weight", "lm_head.weight"),
]

# The published ARPG-L (arpg_300m.pt) settings, in upstream ModelArgs names.
PUBLISHED_ARPG_L = dict(
    dim=1024,
    n_layer=24,
    n_head=16,
    vocab_size=16384,
    num_classes=1000,
    block_size=256,
    multiple_of=256,
    ffn_dim_multiplier=None,
    rope_base=10000,
    norm_eps=1e-5,
)

# Upstream ModelArgs of each published decoder size (everything else as in PUBLISHED_ARPG_L).
PRESET_REFERENCE_FIELDS = {
    name: {
        **PUBLISHED_ARPG_L,
        "dim": fields["hidden_size"],
        "n_head": fields["num_attention_heads"],
        "n_layer": fields["num_self_attention_layers"] + fields["num_cross_attention_layers"],
    }
    for name, fields in ARPG_PRESETS.items()
}

# Upstream ModelArgs field -> ARPGConfig field (copied as is).
_RENAMED_FIELDS = {
    "vocab_size": "vocab_size",
    "num_classes": "num_classes",
    "dim": "hidden_size",
    "n_head": "num_attention_heads",
    "multiple_of": "multiple_of",
    "ffn_dim_multiplier": "ffn_dim_multiplier",
    "rope_base": "rope_theta",
    "norm_eps": "rms_norm_eps",
    "initializer_range": "initializer_range",
    "token_dropout_p": "token_dropout",
    "attn_dropout_p": "attention_dropout",
    "resid_dropout_p": "residual_dropout",
    "ffn_dropout_p": "ffn_dropout",
    "class_dropout_prob": "class_dropout_prob",
}
# Fields that the architecture does not depend on (training-only or informational).
_IGNORED_FIELDS = {"drop_path_rate", "model_type", "cls_token_num", "n_kv_head", "caption_dim"}


def arpg_config_from_reference(reference_config: Mapping[str, Any] | None = None) -> ARPGConfig:
    """Translates upstream `ModelArgs` fields (as in the parity `config.json`) into an [`ARPGConfig`].

    Without a config, the published ARPG-L settings apply. Keys starting with "_" are notes and are skipped.
    """
    fields = dict(PUBLISHED_ARPG_L)
    fields.update({k: v for k, v in (reference_config or {}).items() if not k.startswith("_")})
    unknown = sorted(set(fields) - set(_RENAMED_FIELDS) - _IGNORED_FIELDS - {"n_layer", "block_size"})
    if unknown:
        logger.warning(f"Ignoring upstream config fields that ARPG does not use: {unknown}")
    if fields.get("model_type", "c2i") != "c2i":
        raise ValueError(
            f"Only class-conditional ('c2i') ARPG checkpoints exist; got model_type {fields['model_type']!r}."
        )
    if fields.get("cls_token_num", 1) != 1:
        raise ValueError(f"ARPG uses one class token; got cls_token_num={fields['cls_token_num']}.")
    n_kv_head = fields.get("n_kv_head")
    if n_kv_head is not None and n_kv_head != fields["n_head"]:
        raise ValueError(
            f"Grouped-query attention is not part of ARPG: n_kv_head={n_kv_head} != n_head={fields['n_head']}."
        )
    if fields["n_layer"] % 2 != 0:
        logger.warning(f"Odd n_layer={fields['n_layer']}: like upstream, each pass gets n_layer // 2 layers.")
    grid = math.isqrt(fields["block_size"])
    if grid * grid != fields["block_size"]:
        raise ValueError(f"block_size must be a square number of tokens (grid x grid), got {fields['block_size']}.")
    kwargs = {ours: fields[theirs] for theirs, ours in _RENAMED_FIELDS.items() if theirs in fields}
    kwargs["rope_theta"] = float(kwargs["rope_theta"])
    return ARPGConfig(
        grid_height=grid,
        grid_width=grid,
        num_self_attention_layers=fields["n_layer"] // 2,
        num_cross_attention_layers=fields["n_layer"] // 2,
        **kwargs,
    )


def load_reference_arpg(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    reference_config: Mapping[str, Any] | ARPGConfig | None = None,
) -> ARPGForImageGeneration:
    """Builds an [`ARPGForImageGeneration`] from an upstream checkpoint (path or state dict), in eval mode.

    `reference_config` is a dict of upstream `ModelArgs` fields or an [`ARPGConfig`]; None means the published ARPG-L.
    """
    config = (
        reference_config if isinstance(reference_config, ARPGConfig) else arpg_config_from_reference(reference_config)
    )
    state_dict = load_reference_state_dict(checkpoint)
    model = ARPGForImageGeneration(config)
    expected = model.state_dict()
    converted = convert_state_dict(state_dict, ARPG_REFERENCE_KEY_MAP, expected.keys(), name="the ARPG checkpoint")
    check_shapes(converted, expected, "the ARPG checkpoint")
    model.load_state_dict(converted, strict=True)
    return model.eval()
