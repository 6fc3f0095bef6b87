"""ARPG: the two-pass decoder of "Autoregressive Image Generation with Randomized Parallel Decoding" (arXiv 2503.10568).

Pass 1 runs causal self-attention over [class, known image tokens] and projects the result, once, to the keys and
values shared by every Pass-2 layer. Pass 2 starts each query from the [MASK] embedding, rotated by the 2-D RoPE of
the position it predicts, and cross-attends to those keys and values. Because a query only names its target position,
any set of positions can be predicted at once, in any order.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, logging

try:  # transformers >= 5: initialisers that skip weights loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init

from .cache_arpg import ARPGStaticCache
from .configuration_arpg import ARPGConfig
from .fused_linear import (
    fuse_linears, fused_linear_outputs, is_fused, linear_output, pack_linears, unfuse_linears, unpack_linears,
)  # fmt: skip
from .random_utils import draw_uniform
from .rotary_2d import CLASS_POSITION, ARPGRotaryEmbedding2D, apply_rotary_2d
from .saved_folders import VARIANT_DTYPES, variant_state_dict, write_import_shims

logger = logging.get_logger(__name__)

CPU_GEMMS = ("blas", "onednn", "onednn-packed")  # fuse_projections(cpu_gemm=...)


def run_offload_hook(module: nn.Module) -> None:
    """Runs the `pre_forward` of an accelerate offload hook on `module`, if it has one (diffusers'
    `enable_model_cpu_offload`): it moves the model to its execution device, as calling the model would. Decoding
    calls [`~ARPGForImageGeneration.decode_step`], not `forward`, so the pipelines run it once per decoding."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)


@dataclass
class ARPGModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, num_queries, hidden_size)`): normed query states.
        cache (`ARPGStaticCache`, *optional*): the cache that was updated, when one was passed.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: ARPGStaticCache | None = None


@dataclass
class ARPGImageGenerationOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`): mean cross-entropy over all predicted tokens.
        logits (`torch.FloatTensor` of shape `(batch, seq, vocab_size)`): in decoding order, `logits[b, i]` predicts
            `input_ids[b, orders[b, i]]`.
        orders (`torch.LongTensor` of shape `(batch, seq)`): the raster positions in decoding order (a permutation per row).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    orders: torch.LongTensor | None = None


class ARPGRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, normalised in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.to(hidden_states.dtype) * self.weight


class ARPGMLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.dropout = nn.Dropout(config.ffn_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = fused_linear_outputs(hidden_states, self.gate_proj, self.up_proj)  # (..., F) each
        return self.dropout(linear_output(F.silu(gate) * up, self.down_proj))


def multi_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_causal: bool,
    dropout: float,
    implementation: str | None,
) -> torch.Tensor:
    """Scaled dot-product attention over (batch, heads, seq, head_dim) tensors; returns (batch, seq, heads * head_dim).

    `attention_mask` is boolean, True where a query may attend, broadcastable to (batch, heads, q_len, k_len).
    `implementation` "eager" is the plain reference path; anything else uses `F.scaled_dot_product_attention`.
    """
    if implementation == "eager":
        scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])  # (B, H, Nq, Nk)
        if is_causal:
            attention_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        probs = F.dropout(scores.softmax(-1), p=dropout)
        output = probs @ value  # (B, H, Nq, Dh)
    else:
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal
        )  # (B, H, Nq, Dh)
    return output.transpose(1, 2).flatten(2)  # (B, Nq, H * Dh)


class ARPGSelfAttention(nn.Module):
    """Pass-1 multi-head self-attention with 2-D RoPE on queries and keys."""

    def __init__(self, config: ARPGConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.resid_dropout = nn.Dropout(config.residual_dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, N, Dh)

    def forward(self, hidden_states, rotary, attention_mask=None, is_causal=False, cache=None, slot_start=None):
        cos, sin = rotary
        query, key, value = fused_linear_outputs(hidden_states, self.q_proj, self.k_proj, self.v_proj)  # (B, N, D) each
        query = apply_rotary_2d(self._heads(query), cos, sin)
        key = apply_rotary_2d(self._heads(key), cos, sin)
        value = self._heads(value)
        if cache is not None and slot_start is not None:
            key, value = cache.update_self_at(self.layer_idx, key, value, slot_start)  # (B, H, read_length, Dh)
        elif cache is not None:
            key, value = cache.update_self(self.layer_idx, key, value)  # (B, H, cached + N, Dh)
        dropout = self.config.attention_dropout if self.training else 0.0
        output = multi_head_attention(
            query, key, value, attention_mask, is_causal, dropout, self.config._attn_implementation
        )
        return self.resid_dropout(linear_output(output, self.o_proj))


class ARPGCrossAttention(nn.Module):
    """Pass-2 attention: queries (rotated to their target positions) over the shared, already rotated keys."""

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.resid_dropout = nn.Dropout(config.residual_dropout)

    def forward(self, hidden_states, rotary, key, value, attention_mask=None, is_causal=False):
        cos, sin = rotary
        query = linear_output(hidden_states, self.q_proj).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        query = apply_rotary_2d(query, cos, sin)
        dropout = self.config.attention_dropout if self.training else 0.0
        output = multi_head_attention(
            query, key, value, attention_mask, is_causal, dropout, self.config._attn_implementation
        )
        return self.resid_dropout(linear_output(output, self.o_proj))


class ARPGSelfAttentionLayer(GradientCheckpointingLayer):
    def __init__(self, config: ARPGConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = ARPGRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = ARPGSelfAttention(config, layer_idx)
        self.ffn_norm = ARPGRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = ARPGMLP(config)

    def forward(self, hidden_states, rotary, attention_mask=None, is_causal=False, cache=None, slot_start=None):
        hidden_states = hidden_states + self.self_attn(
            self.attn_norm(hidden_states), rotary, attention_mask=attention_mask, is_causal=is_causal, cache=cache,
            slot_start=slot_start,
        )
        return hidden_states + self.mlp(self.ffn_norm(hidden_states))


class ARPGCrossAttentionLayer(GradientCheckpointingLayer):
    # Pass-2 layers only read the cache, so checkpointing may keep it.
    _can_checkpoint_with_cache = True

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.attn_norm = ARPGRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross_attn = ARPGCrossAttention(config)
        self.ffn_norm = ARPGRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = ARPGMLP(config)

    def forward(self, hidden_states, rotary, key, value, attention_mask=None, is_causal=False):
        hidden_states = hidden_states + self.cross_attn(
            self.attn_norm(hidden_states), rotary, key, value, attention_mask=attention_mask, is_causal=is_causal
        )
        return hidden_states + self.mlp(self.ffn_norm(hidden_states))


class ARPGPreTrainedModel(PreTrainedModel):
    config_class = ARPGConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ARPGSelfAttentionLayer", "ARPGCrossAttentionLayer"]
    _supports_sdpa = True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """`set_attn_implementation("eager" | "sdpa")` works on a built model: every attention call reads
        `config._attn_implementation` (transformers' source heuristic cannot see that)."""
        return True

    def _init_weights(self, module):
        if module is getattr(self, "lm_head", None):
            # The head starts at zero, as in the published training recipe (LlamaGen): uniform first predictions.
            init.zeros_(module.weight)
            return
        super()._init_weights(module)


class ARPGModel(ARPGPreTrainedModel):
    """The two-pass trunk: token embedding, Pass-1 self-attention layers, the shared key/value projection, Pass-2
    cross-attention layers and the final norm. Returns the query states; [`ARPGForImageGeneration`] adds the head."""

    def __init__(self, config: ARPGConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.num_embeddings, config.hidden_size)
        self.token_dropout = nn.Dropout(config.token_dropout)
        self.self_layers = nn.ModuleList(
            [ARPGSelfAttentionLayer(config, i) for i in range(config.num_self_attention_layers)]
        )
        self.kv_norm = ARPGRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.cross_layers = nn.ModuleList(
            [ARPGCrossAttentionLayer(config) for _ in range(config.num_cross_attention_layers)]
        )
        self.norm = ARPGRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = ARPGRotaryEmbedding2D(
            config.head_dim, (config.grid_height, config.grid_width), config.rope_theta
        )
        self.position_embeddings = (
            nn.Embedding(config.num_image_tokens, config.hidden_size) if config.absolute_position_embeddings else None
        )
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        input_position_ids: torch.LongTensor,
        query_position_ids: torch.LongTensor,
        self_attention_mask: torch.BoolTensor | None = None,
        cross_attention_mask: torch.BoolTensor | None = None,
        is_causal: bool = False,
        cache: ARPGStaticCache | None = None,
        grid_size: tuple[int, int] | None = None,
        position_mode: str = "extrapolate",
        causal_inputs: bool = False,
        slot_start: torch.Tensor | None = None,
        num_valid_inputs: torch.Tensor | None = None,
    ) -> ARPGModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, num_inputs)`):
                Embedding ids of the inputs: class tokens (`config.class_token_offset + c`, or the null class) and
                image tokens.
            input_position_ids (`torch.LongTensor` of shape `(batch, num_inputs)`):
                Raster position of each input on the grid, -1 for a class token.
            query_position_ids (`torch.LongTensor` of shape `(batch, num_queries)`):
                Raster positions whose tokens the queries predict.
            self_attention_mask (`torch.BoolTensor`, *optional*):
                True where input i may attend to input j, broadcastable to `(batch, heads, num_inputs, num_inputs)`.
            cross_attention_mask (`torch.BoolTensor`, *optional*):
                True where query i may attend to input j, broadcastable to `(batch, heads, num_queries, num_inputs)`.
            is_causal (`bool`, *optional*, defaults to `False`):
                Causal masks in both passes (training): input j sees inputs 0..j, query i sees inputs 0..i.
            cache (`ARPGStaticCache`, *optional*):
                Decoding cache. The inputs are written after the filled slots; they attend to every cached input and
                to each other, and the queries attend to everything cached. Masks must then be None.
            grid_size (`tuple[int, int]`, *optional*): the (height, width) the positions refer to.
            position_mode (`str`, *optional*, defaults to `"extrapolate"`): see [`ARPGRotaryEmbedding2D`].
            causal_inputs (`bool`, *optional*, defaults to `False`):
                With a cache: the new inputs attend to every cached input but causally among themselves (input j sees
                new inputs 0..j), as a prefix of the training order does. Used to prefill known tokens (editing).
            slot_start (`torch.Tensor`, *optional*), num_valid_inputs (`torch.Tensor`, *optional*):
                Static shapes for compiled decoding (see `arpg_hf.compiled_decoding`), both 0-dim integer tensors: the
                inputs are written at cache slots `slot_start ..` and only the first `num_valid_inputs` of them are
                real (the rest is padding). Attention then reads the first `cache.read_length` slots (the whole
                cache unless `cache.attended_slots` is set) under a mask of the slots below
                `slot_start + num_valid_inputs`, so no shape depends on the fill. The caller checks the capacity
                (padding included) and advances `cache.seq_length`.
        """
        padded = slot_start is not None
        if padded and (cache is None or num_valid_inputs is None or causal_inputs):
            raise ValueError("slot_start needs a cache and num_valid_inputs, and serves non-causal decoding steps only.")
        if cache is not None and (
            is_causal or self_attention_mask is not None or cross_attention_mask is not None
        ):
            raise ValueError("With a cache the attention pattern is fixed: pass no masks and is_causal=False.")
        if padded:
            slots = torch.arange(cache.read_length, device=input_ids.device)  # (S,)
            filled = (slots < slot_start + num_valid_inputs)[None, :]  # (1, S): the slots filled after this step
            self_attention_mask = cross_attention_mask = filled
        elif cache is not None:
            cache.check_capacity(input_ids.shape[0], input_ids.shape[1])
            if causal_inputs and input_ids.shape[1] > 1:
                num_new, num_cached = input_ids.shape[1], cache.seq_length
                self_attention_mask = torch.ones(
                    num_new, num_cached + num_new, dtype=torch.bool, device=input_ids.device
                ).tril(diagonal=num_cached)  # (N, cached + N): every cached input, new inputs 0..j
        input_rotary = self.rotary_emb(input_position_ids, grid_size, position_mode)
        query_rotary = self.rotary_emb(query_position_ids, grid_size, position_mode)

        hidden_states = self.embed_tokens(input_ids)  # (B, N, D)
        mask_embedding = self.embed_tokens.weight[self.config.mask_token_id]  # (D,)
        queries = mask_embedding.expand(*query_position_ids.shape, -1)  # (B, M, D)
        if self.position_embeddings is not None:
            hidden_states = hidden_states + self.absolute_position_embedding(input_position_ids, grid_size, position_mode)
            queries = queries + self.absolute_position_embedding(query_position_ids, grid_size, position_mode)
        hidden_states = self.token_dropout(hidden_states)
        for layer in self.self_layers:
            hidden_states = layer(
                hidden_states, input_rotary, attention_mask=self_attention_mask, is_causal=is_causal, cache=cache,
                slot_start=slot_start,
            )
        hidden_states = self.kv_norm(hidden_states)
        heads = (self.config.num_attention_heads, self.config.head_dim)
        key, value = fused_linear_outputs(hidden_states, self.k_proj, self.v_proj)  # (B, N, D) each
        key = apply_rotary_2d(key.unflatten(-1, heads).transpose(1, 2), *input_rotary)  # (B, H, N, Dh)
        value = value.unflatten(-1, heads).transpose(1, 2)  # (B, H, N, Dh)
        if padded:
            key, value = cache.update_cross_at(key, value, slot_start)  # (B, H, read_length, Dh)
        elif cache is not None:
            key, value = cache.update_cross(key, value)  # (B, H, cached + N, Dh)

        for layer in self.cross_layers:
            queries = layer(queries, query_rotary, key, value, attention_mask=cross_attention_mask, is_causal=is_causal)
        return ARPGModelOutput(last_hidden_state=self.norm(queries), cache=cache)

    def absolute_position_embedding(
        self, position_ids: torch.LongTensor, grid_size: tuple[int, int] | None = None, position_mode: str = "extrapolate"
    ) -> torch.Tensor:
        """The learned absolute embedding (`config.absolute_position_embeddings`) of raster positions on `grid_size`,
        zero for the class slot (-1): `(batch, seq, hidden_size)`.

        On the trained grid every position takes its own row of the table. On another canvas the table is read as an
        image over the trained (row, col) range: "interpolate" scales (row, col) into that range as the rotary
        embedding does and samples bilinearly; "extrapolate" keeps integer (row, col) and clamps them into it, so
        cells beyond the trained grid take the embedding of the nearest edge cell.
        """
        table = self.position_embeddings.weight  # (h * w, D)
        trained = (self.config.grid_height, self.config.grid_width)
        height, width = trained if grid_size is None else tuple(grid_size)
        positions = position_ids.clamp(min=0)  # the class slot is zeroed below
        if (height, width) == trained:
            embedding = table[positions]  # (B, N, D)
        else:
            coordinates = torch.stack([torch.div(positions, width, rounding_mode="floor"), positions % width]).float()
            if position_mode == "interpolate":
                scale = torch.tensor([trained[0] / height, trained[1] / width], device=table.device)
                coordinates = coordinates * scale[:, None, None]
            limits = torch.tensor([trained[0] - 1, trained[1] - 1], device=table.device)[:, None, None]
            coordinates = torch.minimum(coordinates, limits)  # (2, B, N): (row, col) in the trained range
            low = coordinates.floor().long()  # (2, B, N)
            high = torch.minimum(low + 1, limits)
            fraction = (coordinates - low).to(table.dtype)[..., None]  # (2, B, N, 1)
            row_low, row_high = low[0] * trained[1], high[0] * trained[1]
            top = table[row_low + low[1]] * (1 - fraction[1]) + table[row_low + high[1]] * fraction[1]
            bottom = table[row_high + low[1]] * (1 - fraction[1]) + table[row_high + high[1]] * fraction[1]
            embedding = top * (1 - fraction[0]) + bottom * fraction[0]  # (B, N, D)
        return embedding.masked_fill((position_ids == CLASS_POSITION)[..., None], 0.0)


class ARPGForImageGeneration(ARPGPreTrainedModel):
    """ARPG class-conditional image-token generator: [`ARPGModel`] plus a linear head over the codebook.

    Calling the model runs the teacher-forced training objective (always causal, in train and eval mode alike).
    Decoding goes through [`~ARPGForImageGeneration.allocate_cache`] and [`~ARPGForImageGeneration.decode_step`].
    """

    _cpu_gemm = "blas"  # the weight layout of fuse_projections (an instance attribute once chosen)

    def __init__(self, config: ARPGConfig):
        super().__init__(config)
        self.model = ARPGModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # ----------------------------------------------------------------------------------------------- helpers
    def class_token_ids(self, class_labels: torch.LongTensor) -> torch.LongTensor:
        """Embedding ids of class labels in [0, num_classes); -1 selects the null (unconditional) class."""
        check_class_labels(class_labels, self.config.num_classes, allow_null=True)
        return torch.where(
            class_labels < 0, self.config.null_class_token_id, class_labels + self.config.class_token_offset
        )

    def random_orders(self, batch_size: int, seq_len: int, generator=None, device=None) -> torch.LongTensor:
        """One uniformly random permutation of `0..seq_len-1` per row, `(batch_size, seq_len)`."""
        return draw_uniform((batch_size, seq_len), generator, device).argsort(dim=1)

    # ------------------------------------------------------------------------------------------- training
    def forward(
        self,
        input_ids: torch.LongTensor,
        class_labels: torch.LongTensor,
        orders: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool | None = None,
    ) -> ARPGImageGenerationOutput | tuple:
        r"""Teacher-forced forward: predicts every token of `input_ids` in a random order, causally in both passes.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, grid_height * grid_width)`):
                Image tokens in raster order, each in `[0, vocab_size)`.
            class_labels (`torch.LongTensor` of shape `(batch,)`):
                Class of each image, in `[0, num_classes)`. In training mode each is replaced by the null class with
                probability `config.class_dropout_prob`.
            orders (`torch.LongTensor` of shape `(batch, seq)` or `(seq,)`, *optional*):
                Decoding order per row (a permutation of raster positions), or one order for the whole batch. Drawn
                from `generator` when omitted.
            labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*):
                Raster-order targets; entries of -100 are ignored. Defaults to `input_ids`.
            generator (`torch.Generator`, *optional*):
                Source of the class dropout and of the random orders.

        Returns:
            [`ARPGImageGenerationOutput`] with `loss`, `logits` in decoding order and `orders`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        batch_size, seq_len = self._check_training_inputs(input_ids, class_labels, labels)
        input_ids, class_labels = input_ids.long(), class_labels.long()
        device = input_ids.device
        if self.training and self.config.class_dropout_prob > 0:
            drop = draw_uniform((batch_size,), generator, device) < self.config.class_dropout_prob
            class_labels = class_labels.masked_fill(drop, -1)  # -1 = null class
        if orders is None:
            orders = self.random_orders(batch_size, seq_len, generator=generator, device=device)
        else:
            check_orders(orders, batch_size, seq_len)
            orders = orders.to(device=device, dtype=torch.long).expand(batch_size, seq_len)  # (L,) = shared by all
        shuffled = input_ids.gather(1, orders)  # (B, L)
        class_ids = self.class_token_ids(class_labels)[:, None]  # (B, 1)
        inputs = torch.cat([class_ids, shuffled[:, :-1]], dim=1)  # (B, L)
        class_position = torch.full_like(class_ids, CLASS_POSITION)
        input_positions = torch.cat([class_position, orders[:, :-1]], dim=1)  # (B, L)
        hidden = self.model(inputs, input_positions, orders, is_causal=True).last_hidden_state  # (B, L, D)
        logits = self.lm_head(hidden)  # (B, L, V)

        targets = shuffled if labels is None else labels.to(device=device, dtype=torch.long).gather(1, orders)  # (B, L)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        if not return_dict:
            return loss, logits, orders
        return ARPGImageGenerationOutput(loss=loss, logits=logits, orders=orders)

    def _check_training_inputs(self, input_ids, class_labels, labels=None) -> tuple[int, int]:
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"input_ids must be an integer tensor of shape (batch, {self.config.num_image_tokens}), got "
                f"{input_ids.dtype} of shape {tuple(input_ids.shape)}."
            )
        batch_size, seq_len = input_ids.shape
        if seq_len != self.config.num_image_tokens:
            raise ValueError(
                f"input_ids has {seq_len} tokens per image; this model's grid is {self.config.grid_height}x"
                f"{self.config.grid_width} = {self.config.num_image_tokens} tokens."
            )
        if input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, {self.config.vocab_size}), got values in "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]. Tokenize images with the matching VQ model."
            )
        if class_labels.shape != (batch_size,):
            raise ValueError(f"class_labels must have shape ({batch_size},), got {tuple(class_labels.shape)}.")
        check_class_labels(class_labels, self.config.num_classes)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}.")
        return batch_size, seq_len

    # ------------------------------------------------------------------------------------------- decoding
    def projection_groups_by_pass(self) -> tuple[list[tuple[nn.Linear, ...]], list[tuple[nn.Linear, ...]]]:
        """The linears of a decoding step in execution order, as groups that run as one GEMM once fused: those that
        read the step's inputs (Pass 1: q/k/v, o, gate/up, down of each layer, then the shared Pass-2 key/value
        projection) and those that read its queries (Pass 2: q, o, gate/up, down of each layer, then the head)."""
        pass_one, pass_two = [], []
        for layer in self.model.self_layers:
            attention, mlp = layer.self_attn, layer.mlp
            pass_one += [(attention.q_proj, attention.k_proj, attention.v_proj), (attention.o_proj,),
                         (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)]  # fmt: skip
        for layer in self.model.cross_layers:
            attention, mlp = layer.cross_attn, layer.mlp
            pass_two += [(attention.q_proj,), (attention.o_proj,), (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)]
        return pass_one + [(self.model.k_proj, self.model.v_proj)], pass_two + [(self.lm_head,)]

    def _projection_groups(self) -> list[tuple[nn.Linear, ...]]:
        pass_one, pass_two = self.projection_groups_by_pass()
        return pass_one + pass_two

    def fuse_projections(self, cpu_gemm: str | None = None) -> None:
        """Lays the weights out for fast decoding: q/k/v, gate/up and the Pass-2 key/value projections fused into one
        GEMM each (see `arpg_hf.fused_linear`). Parameter names, shapes and values are unchanged, so state dicts,
        saving and training are unaffected. The pipelines call this before decoding (a no-op once done); `.to()` or
        loading new weights may undo it (decoding then takes the plain path until the next call).

        Args:
            cpu_gemm (`str`, *optional*):
                How float32 decoding on CPU multiplies by the weights; other devices and dtypes are unaffected. None
                keeps the choice of the previous call (at first "blas"). Results agree up to float rounding.

                - "blas" (default): every weight stored transposed, `x @ W` through torch's BLAS (MKL); no extra memory.
                - "onednn": every weight in its checkpoint layout, fused by rows, multiplied by oneDNN's linear
                  kernel; no extra memory. About 1.5x faster than "blas" on CPUs where MKL is slow at decoding row
                  counts (measured on an AVX2 EPYC).
                - "onednn-packed": "blas" plus a copy of every fused matrix in oneDNN's pre-packed layout, used for
                  the GEMMs: the fastest there (about 1.7x), at the price of a second copy of the projection weights
                  in memory. The copies are dropped as soon as the weights move or change, and by
                  [`~ARPGForImageGeneration.unfuse_projections`].

                Without oneDNN in the torch build, "onednn" falls back to `F.linear` and "onednn-packed" to "blas".
        """
        if cpu_gemm is None:
            cpu_gemm = self._cpu_gemm
        elif cpu_gemm not in CPU_GEMMS:
            raise ValueError(f"cpu_gemm must be one of {CPU_GEMMS}, got {cpu_gemm!r}.")
        self._cpu_gemm = cpu_gemm
        if any(parameter.device.type == "meta" for parameter in self.parameters()):
            return  # offloaded weights (accelerate hooks) are materialised per call: leave their layout alone
        for group in self._projection_groups():
            fuse_linears(*group, layout="rows" if cpu_gemm == "onednn" else "columns")
            if cpu_gemm == "onednn-packed":
                pack_linears(*group)
            else:
                unpack_linears(*group)

    def unfuse_projections(self) -> None:
        """Restores the default layout (one contiguous `(out, in)` matrix per linear), without packed copies. The
        `cpu_gemm` choice is kept for the next [`~ARPGForImageGeneration.fuse_projections`]."""
        for group in self._projection_groups():
            unpack_linears(*group)
            unfuse_linears(*group)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        push_to_hub: bool = False,
        max_shard_size: int | str = "50GB",
        variant: str | None = None,
        **kwargs,
    ):
        """`PreTrainedModel.save_pretrained` (`variant`, `max_shard_size` and the rest as there; a variant named "fp16"
        or "bf16" is written in that dtype), writing weights laid out by `fuse_projections` as plain tensors with
        storage of their own (the checkpoint layout), plus the import shims that `AutoModel.from_pretrained(folder,
        trust_remote_code=True)` loads (see `arpg_hf.saved_folders`). With `push_to_hub`, the folder is then uploaded
        through `push_to_hub` (`repo_id` defaults to its name)."""
        if state_dict is None and any(is_fused(*group) for group in self._projection_groups()):
            state_dict = {name: tensor.clone(memory_format=torch.contiguous_format)
                          if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() else tensor
                          for name, tensor in self.state_dict().items()}  # fmt: skip
        if variant in VARIANT_DTYPES:
            state_dict = variant_state_dict(self.state_dict() if state_dict is None else state_dict, variant)
        super().save_pretrained(save_directory, is_main_process=is_main_process, state_dict=state_dict,
                                max_shard_size=max_shard_size, variant=variant,
                                **({} if push_to_hub else kwargs))  # fmt: skip
        if is_main_process:
            write_import_shims(save_directory, [type(self)])
        if push_to_hub and is_main_process:
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            return self.push_to_hub(repo_id, max_shard_size=max_shard_size, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """Does nothing: transformers calls it after a `trust_remote_code` load so that later saves copy the class's
        source files into the folder; ARPG folders always carry their `auto_map` and import shims instead."""

    @property
    def projections_fused(self) -> bool:
        """Whether every projection has a layout of [`~ARPGForImageGeneration.fuse_projections`]."""
        return all(is_fused(*group) for group in self._projection_groups())

    def allocate_cache(
        self, batch_size: int, max_length: int | None = None, dtype=None, device=None
    ) -> ARPGStaticCache:
        """Preallocates the decoding cache; `max_length` defaults to the class slot plus every grid token."""
        return ARPGStaticCache(
            batch_size=batch_size,
            max_length=max_length if max_length is not None else 1 + self.config.num_image_tokens,
            num_self_attention_layers=self.config.num_self_attention_layers,
            num_heads=self.config.num_attention_heads,
            head_dim=self.config.head_dim,
            dtype=dtype if dtype is not None else self.dtype,
            device=device if device is not None else self.device,
        )

    def decode_step(
        self,
        input_ids: torch.LongTensor,
        input_position_ids: torch.LongTensor,
        query_position_ids: torch.LongTensor,
        cache: ARPGStaticCache,
        grid_size: tuple[int, int] | None = None,
        position_mode: str = "extrapolate",
        causal_inputs: bool = False,
        slot_start: torch.Tensor | None = None,
        num_valid_inputs: torch.Tensor | None = None,
    ) -> torch.FloatTensor:
        r"""One decoding step: feeds inputs into the cache and returns the logits of the queried positions.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, num_inputs)`): embedding ids to feed: class tokens at the
                first step (see [`~ARPGForImageGeneration.class_token_ids`]), then the image tokens sampled at the
                previous step.
            input_position_ids (`torch.LongTensor` of shape `(batch, num_inputs)`): their raster positions (-1 for
                class tokens).
            query_position_ids (`torch.LongTensor` of shape `(batch, num_queries)`): raster positions to predict.
            cache (`ARPGStaticCache`): from [`~ARPGForImageGeneration.allocate_cache`]; updated in place.
            grid_size (`tuple[int, int]`, *optional*): the (height, width) of the token grid the positions refer to;
                defaults to the trained grid. Any size works (see [`ARPGRotaryEmbedding2D`]).
            position_mode (`str`, *optional*, defaults to `"extrapolate"`): "extrapolate" or "interpolate", for grids
                other than the trained one.
            causal_inputs (`bool`, *optional*, defaults to `False`): feed the inputs causally among themselves
                (input j sees the cache and inputs 0..j) instead of bidirectionally; for prefilling known tokens.
            slot_start (`torch.Tensor`, *optional*), num_valid_inputs (`torch.Tensor`, *optional*): the static-shape
                step of compiled decoding, see [`ARPGModel.forward`]; [`~arpg_hf.CompiledDecoder`] sets them.

        Returns:
            `torch.FloatTensor` of shape `(batch, num_queries, vocab_size)`: float32 logits.
        """
        hidden = self.model(
            input_ids,
            input_position_ids,
            query_position_ids,
            cache=cache,
            grid_size=grid_size,
            position_mode=position_mode,
            causal_inputs=causal_inputs,
            slot_start=slot_start,
            num_valid_inputs=num_valid_inputs,
        ).last_hidden_state  # (B, M, D)
        return linear_output(hidden, self.lm_head).float()


def check_class_labels(class_labels: torch.Tensor, num_classes: int, allow_null: bool = False) -> None:
    """Raises ValueError unless every label lies in [0, num_classes) (or is -1, the null class, when allowed)."""
    if class_labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"class_labels must be an integer tensor, got {class_labels.dtype}.")
    if class_labels.numel() == 0:
        return
    low = -1 if allow_null else 0
    if class_labels.min() < low or class_labels.max() >= num_classes:
        raise ValueError(
            f"Class labels must lie in [0, {num_classes}), got values in [{int(class_labels.min())}, "
            f"{int(class_labels.max())}]."
        )


def check_orders(orders: torch.Tensor, batch_size: int | None, seq_len: int) -> None:
    """Raises ValueError unless each row of `orders` is a permutation of 0..seq_len-1."""
    if orders.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"orders must be an integer tensor, got {orders.dtype}.")
    expected = (seq_len,) if orders.ndim == 1 else (batch_size, seq_len)
    if orders.ndim not in (1, 2) or tuple(orders.shape) != tuple(expected):
        raise ValueError(
            f"orders must have shape ({seq_len},) or ({batch_size}, {seq_len}), got {tuple(orders.shape)}."
        )
    reference = torch.arange(seq_len, device=orders.device)
    if not torch.equal(orders.sort(dim=-1).values, reference.expand_as(orders)):
        raise ValueError(
            f"Each row of orders must be a permutation of 0..{seq_len - 1} (every raster position exactly once)."
        )


# Registering with transformers' Auto classes waits while this module is imported (see arpg_hf.auto_classes).
from .auto_classes import register_with_loaded_auto_classes  # noqa: E402

register_with_loaded_auto_classes()
