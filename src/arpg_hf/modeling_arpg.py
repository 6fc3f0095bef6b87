"""ARPG: the two-pass decoder of "Autoregressive Image Generation with Randomized Parallel Decoding" (arXiv 2503.10568).

Pass 1 runs causal self-attention over [class, known image tokens] and projects the result, once, to the keys and
values shared by every Pass-2 layer. Pass 2 starts each query from the [MASK] embedding, rotated by the 2-D RoPE of
the position it predicts, and cross-attends to those keys and values. Because a query only names its target position,
any set of positions can be predicted at once, in any order.

One mask rule serves training and decoding: every input and query has an *end*, and sees the key slots below it. In
training each input is its own decoding step (input j and query j see inputs 0..j: causal); in a decoding step the
inputs fed together see each other and everything cached, and the queries see all of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm as ARPGRMSNorm
from transformers.utils import ModelOutput

try:  # transformers >= 5: initialisers that skip weights loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init

from .cache_arpg import ARPGStaticCache
from .configuration_arpg import ARPGConfig
from .fused_projections import FusedProjections
from .random_utils import draw_uniform
from .rotary_2d import CLASS_POSITION, ARPGRotaryEmbedding2D, absolute_position_embedding, apply_rotary_2d
from .saved_folders import SavedWithImportShims
from .validation import check_class_labels, check_orders, check_training_inputs


@dataclass
class ARPGModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, num_queries, hidden_size)`): normed query states.
        past_key_values (`ARPGStaticCache`, *optional*): the cache that was updated, when one was passed.
    """

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: ARPGStaticCache | None = None


@dataclass
class ARPGImageGenerationOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`): mean cross-entropy over the predicted tokens, when targets exist.
        logits (`torch.FloatTensor` of shape `(batch, num_queries, vocab_size)`): one row per query; in teacher
            forcing, in decoding order: `logits[b, i]` predicts `input_ids[b, orders[b, i]]`.
        orders (`torch.LongTensor` of shape `(batch, seq)`): teacher forcing only: the raster positions in decoding
            order (a permutation per row).
        past_key_values (`ARPGStaticCache`, *optional*): the cache that was updated, when one was passed.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    orders: torch.LongTensor | None = None
    past_key_values: ARPGStaticCache | None = None


def eager_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=False, **kwargs
):
    """Plain attention over `(batch, heads, seq, head_dim)` tensors, with transformers' attention-interface signature;
    `attention_mask` is boolean, True where a row may attend. Returns `((batch, seq, heads, head_dim), weights)`."""
    scores = query @ key.transpose(-1, -2)
    scores = scores / math.sqrt(query.shape[-1]) if scaling is None else scores * scaling  # (B, H, Nq, Nk)
    if is_causal:
        attention_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    weights = F.dropout(scores.softmax(-1), p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def split_heads(x: torch.Tensor, heads: tuple[int, int]) -> torch.Tensor:
    """(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)."""
    return x.unflatten(-1, heads).transpose(1, 2)


def attend(module: nn.Module, query, key, value, attention_mask, is_causal: bool) -> torch.Tensor:
    """Attention through the model's `config._attn_implementation` (transformers' `ALL_ATTENTION_FUNCTIONS`, or
    `eager_attention_forward`): `(batch, seq, heads * head_dim)`."""
    implementation = module.config._attn_implementation
    interface = eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
    dropout = module.config.attention_dropout if module.training else 0.0
    output, _ = interface(module, query, key, value, attention_mask, dropout=dropout, is_causal=is_causal)
    return output.flatten(2)


class ARPGMLP(FusedProjections, nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    fusions = {"gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.dropout = nn.Dropout(config.ffn_dropout)
        self.register_fusions()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.project(hidden_states, "gate_up_proj")  # (..., F) each
        return self.dropout(self.down_proj(F.silu(gate) * up))


class ARPGSelfAttention(FusedProjections, nn.Module):
    """Pass-1 multi-head self-attention with 2-D RoPE on queries and keys; writes its keys/values to the cache."""

    fusions = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
    is_causal = False  # the mask rule decides, see ARPGModel

    def __init__(self, config: ARPGConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.heads = (config.num_attention_heads, config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.resid_dropout = nn.Dropout(config.residual_dropout)
        self.register_fusions()

    def forward(self, hidden_states, rotary, attention_mask, is_causal, past_key_values=None, cache_position=None):
        query, key, value = (split_heads(x, self.heads) for x in self.project(hidden_states, "qkv_proj"))
        query, key = apply_rotary_2d(query, *rotary), apply_rotary_2d(key, *rotary)  # (B, H, N, Dh)
        if past_key_values is not None:
            key, value = past_key_values.update(self.layer_idx, key, value, cache_position)  # (B, H, S, Dh)
        output = attend(self, query, key, value, attention_mask, is_causal)
        return self.resid_dropout(self.o_proj(output))


class ARPGCrossAttention(nn.Module):
    """Pass-2 attention: queries, rotated to their target positions, over the shared, already rotated keys."""

    is_causal = False

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.config = config
        self.heads = (config.num_attention_heads, config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.resid_dropout = nn.Dropout(config.residual_dropout)

    def forward(self, hidden_states, rotary, key, value, attention_mask, is_causal):
        query = apply_rotary_2d(split_heads(self.q_proj(hidden_states), self.heads), *rotary)
        output = attend(self, query, key, value, attention_mask, is_causal)
        return self.resid_dropout(self.o_proj(output))


class ARPGSelfAttentionLayer(GradientCheckpointingLayer):
    def __init__(self, config: ARPGConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = ARPGRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = ARPGSelfAttention(config, layer_idx)
        self.ffn_norm = ARPGRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = ARPGMLP(config)

    def forward(self, hidden_states, rotary, attention_mask, is_causal, past_key_values=None, cache_position=None):
        hidden_states = hidden_states + self.self_attn(
            self.attn_norm(hidden_states), rotary, attention_mask, is_causal, past_key_values, cache_position
        )
        return hidden_states + self.mlp(self.ffn_norm(hidden_states))


class ARPGCrossAttentionLayer(GradientCheckpointingLayer):
    _can_checkpoint_with_cache = True  # Pass-2 layers only read the cache

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.attn_norm = ARPGRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross_attn = ARPGCrossAttention(config)
        self.ffn_norm = ARPGRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = ARPGMLP(config)

    def forward(self, hidden_states, rotary, key, value, attention_mask, is_causal):
        hidden_states = hidden_states + self.cross_attn(
            self.attn_norm(hidden_states), rotary, key, value, attention_mask, is_causal
        )
        return hidden_states + self.mlp(self.ffn_norm(hidden_states))


class ARPGPreTrainedModel(SavedWithImportShims, PreTrainedModel):
    config_class = ARPGConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ARPGSelfAttentionLayer", "ARPGCrossAttentionLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """`set_attn_implementation(...)` works on a built model: every attention call reads
        `config._attn_implementation` (transformers' source heuristic cannot see that)."""
        return True

    def _init_weights(self, module):
        if module is getattr(self, "lm_head", None):
            # The head starts at zero, as in the published training recipe (LlamaGen): uniform first predictions.
            init.zeros_(module.weight)
            return
        super()._init_weights(module)


class ARPGModel(ARPGPreTrainedModel, FusedProjections):
    """The two-pass trunk: token embedding, Pass-1 self-attention layers, the shared key/value projection, Pass-2
    cross-attention layers and the final norm. Returns the query states; [`ARPGForImageGeneration`] adds the head."""

    fusions = {"kv_proj": ("k_proj", "v_proj")}

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
        self.register_fusions()
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        input_position_ids: torch.LongTensor,
        query_position_ids: torch.LongTensor,
        past_key_values: ARPGStaticCache | None = None,
        cache_position: torch.LongTensor | None = None,
        attention_ends: tuple[torch.LongTensor, torch.LongTensor] | None = None,
        grid_size: tuple[int, int] | None = None,
        position_mode: str = "extrapolate",
        position_conditions: torch.FloatTensor | None = None,
    ) -> ARPGModelOutput:
        r"""
        Args:
            input_ids, input_position_ids (`torch.LongTensor` of shape `(batch, num_inputs)`): embedding ids (class
                and image tokens) and raster positions (-1 for a class token) of the inputs.
            query_position_ids (`torch.LongTensor` of shape `(batch, num_queries)`): raster positions to predict.
            past_key_values ([`ARPGStaticCache`], *optional*), cache_position (`(num_inputs,)`, *optional*): the
                decoding cache, updated in place, and the inputs' slots in it (default: the next free ones).
            attention_ends (`tuple` of two `torch.LongTensor`, *optional*): the mask rule: input j sees the key slots
                below `attention_ends[0][j]`, query i those below `attention_ends[1][i]` (a `(1,)` end serves all). Default: causal without a
                cache (input j and query j see inputs 0..j); with one, the inputs form one step and see every slot.
            grid_size (`tuple[int, int]`, *optional*), position_mode (`str`): see [`ARPGRotaryEmbedding2D`].
            position_conditions (`torch.FloatTensor` of shape `(batch, num_positions, hidden_size)`, *optional*): one
                embedding per raster position of the canvas (a control adapter's output, see
                [`ARPGControlAdapter`]): the query that predicts position p starts from the [MASK] embedding plus
                `position_conditions[:, p]`. None: every query starts from the [MASK] embedding alone.
        """
        cache = past_key_values
        if cache_position is None:
            start = 0 if cache is None else cache.advance(input_ids.shape[1], input_ids.shape[0])
            cache_position = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        is_causal = cache is None and attention_ends is None
        num_keys = input_ids.shape[1] if cache is None else cache.read_length
        input_mask, query_mask = attention_masks(attention_ends, num_keys, input_ids.device)
        input_rotary = self.rotary_emb(input_position_ids, grid_size, position_mode)
        query_rotary = self.rotary_emb(query_position_ids, grid_size, position_mode)

        hidden_states = self.embed_tokens(input_ids)  # (B, N, D)
        queries = self.embed_tokens(torch.full_like(query_position_ids, self.config.mask_token_id))  # (B, M, D)
        if position_conditions is not None:
            rows, cols = grid_size or (self.config.grid_height, self.config.grid_width)
            queries = queries + query_conditions(position_conditions, query_position_ids, rows * cols).to(queries.dtype)
        if self.position_embeddings is not None:
            trained = (self.config.grid_height, self.config.grid_width)
            for ids, states in ((input_position_ids, hidden_states), (query_position_ids, queries)):
                states += absolute_position_embedding(self.position_embeddings, ids, trained, grid_size, position_mode)
        hidden_states = self.token_dropout(hidden_states)
        for layer in self.self_layers:
            hidden_states = layer(hidden_states, input_rotary, input_mask, is_causal, cache, cache_position)
        heads = (self.config.num_attention_heads, self.config.head_dim)
        key, value = (split_heads(x, heads) for x in self.project(self.kv_norm(hidden_states), "kv_proj"))
        key = apply_rotary_2d(key, *input_rotary)  # (B, H, N, Dh)
        if cache is not None:
            key, value = cache.update(len(self.self_layers), key, value, cache_position)  # (B, H, S, Dh)
        for layer in self.cross_layers:
            queries = layer(queries, query_rotary, key, value, query_mask, is_causal)
        return ARPGModelOutput(last_hidden_state=self.norm(queries), past_key_values=cache)


def query_conditions(position_conditions: torch.Tensor, query_position_ids: torch.LongTensor, num_positions: int):
    """The rows of `position_conditions` (B, P, D) at the queries' positions (B, M): (B, M, D). ValueError unless
    they hold one row per position of the canvas (`num_positions`) for every image."""
    expected = (query_position_ids.shape[0], num_positions)
    if position_conditions.ndim != 3 or tuple(position_conditions.shape[:2]) != expected:
        raise ValueError(
            f"position_conditions must be (batch, num_positions, hidden_size) = ({expected[0]}, {expected[1]}, ...) for "
            f"this canvas, got {tuple(position_conditions.shape)}; compute them on the canvas being generated."
        )
    index = query_position_ids.to(position_conditions.device)[..., None].expand(-1, -1, position_conditions.shape[-1])
    return position_conditions.gather(1, index)


def attention_masks(attention_ends, num_keys: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The boolean masks `(1, 1, rows, num_keys)` of the inputs and the queries for `attention_ends` (row r sees the
    key slots below its end); None, None when no ends are given (the default rule needs no mask)."""
    if attention_ends is None:
        return None, None
    slots = torch.arange(num_keys, device=device)
    return tuple((slots < ends.to(device)[:, None])[None, None] for ends in attention_ends)


class ARPGForImageGeneration(ARPGPreTrainedModel):
    """ARPG class-conditional image-token generator: [`ARPGModel`] plus a linear head over the codebook.

    One `forward` serves training and decoding. With `class_labels` it runs the teacher-forced objective: raster
    tokens are fed in a random order, causally, and every token is predicted (in train and eval mode alike). Without
    them it runs a step on given inputs and queries, with a cache from [`~ARPGForImageGeneration.allocate_cache`].
    """

    def __init__(self, config: ARPGConfig):
        super().__init__(config)
        self.model = ARPGModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def class_token_ids(self, class_labels: torch.LongTensor) -> torch.LongTensor:
        """Embedding ids of class labels in [0, num_classes); -1 selects the null (unconditional) class."""
        check_class_labels(class_labels, self.config.num_classes, allow_null=True)
        return torch.where(
            class_labels < 0, self.config.null_class_token_id, class_labels + self.config.class_token_offset
        )

    def random_orders(self, batch_size: int, seq_len: int, generator=None, device=None) -> torch.LongTensor:
        """One uniformly random permutation of `0..seq_len-1` per row, `(batch_size, seq_len)`."""
        return draw_uniform((batch_size, seq_len), generator, device).argsort(dim=1)

    def forward(
        self,
        input_ids: torch.LongTensor,
        class_labels: torch.LongTensor | None = None,
        orders: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool | None = None,
        **step,
    ) -> ARPGImageGenerationOutput | tuple:
        r"""
        Teacher forcing (training), with `class_labels`:
            input_ids (`torch.LongTensor` of shape `(batch, grid_height * grid_width)`): image tokens in raster
                order, each in `[0, vocab_size)`.
            class_labels (`torch.LongTensor` of shape `(batch,)`): class of each image, in `[0, num_classes)`. In
                training mode each is replaced by the null class with probability `config.class_dropout_prob`.
            orders (`torch.LongTensor` of shape `(batch, seq)` or `(seq,)`, *optional*): decoding order per row (a
                permutation of raster positions), or one for the batch; drawn from `generator` when omitted.
            labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*): raster-order targets; -100 is ignored.
                Defaults to `input_ids`.
            generator (`torch.Generator`, *optional*): source of the class dropout and of the random orders.

        A decoding step, without `class_labels`: `input_ids` are embedding ids (see
        [`~ARPGForImageGeneration.class_token_ids`]), and `**step` holds the other arguments of
        [`ARPGModel.forward`] by name (`input_position_ids`, `query_position_ids`, `past_key_values`,
        `cache_position`, `attention_ends`, `grid_size`, `position_mode`, `position_conditions`); `labels`
        `(batch, num_queries)`, when given, are the queries' targets. Teacher forcing takes `position_conditions`
        `(batch, seq, hidden_size)` too (raster order: the queries are at every position).

        Returns:
            [`ARPGImageGenerationOutput`]: `loss` (when there are targets), `logits` `(batch, num_queries, vocab_size)`
            (teacher forcing: in decoding order), `orders` (teacher forcing) and `past_key_values`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if class_labels is not None:
            inputs = self.teacher_forcing_inputs(input_ids, class_labels, orders, labels, generator)
            input_ids, step["input_position_ids"], step["query_position_ids"], labels, orders = inputs
        elif "input_position_ids" not in step or "query_position_ids" not in step:
            raise ValueError("Pass class_labels (teacher forcing), or input_position_ids and query_position_ids.")
        hidden = self.model(input_ids, **step).last_hidden_state  # (B, M, D)
        logits = self.lm_head(hidden)  # (B, M, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        if not return_dict:
            return tuple(x for x in (loss, logits, orders) if x is not None)
        cache = step.get("past_key_values")
        return ARPGImageGenerationOutput(loss=loss, logits=logits, orders=orders, past_key_values=cache)

    def teacher_forcing_inputs(self, input_ids, class_labels, orders=None, labels=None, generator=None) -> tuple:
        """The step of teacher forcing: `(inputs, input_positions, query_positions, targets, orders)`, each
        `(batch, seq)`: the class token then the shuffled tokens but the last, at their positions (-1 for the class),
        queries at every position in decoding order, and their targets."""
        batch_size, seq_len = check_training_inputs(input_ids, class_labels, labels, self.config)
        input_ids, class_labels, device = input_ids.long(), class_labels.long(), input_ids.device
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
        input_positions = torch.cat([torch.full_like(class_ids, CLASS_POSITION), orders[:, :-1]], dim=1)  # (B, L)
        targets = shuffled if labels is None else labels.to(device=device, dtype=torch.long).gather(1, orders)
        return inputs, input_positions, orders, targets, orders

    # ------------------------------------------------------------------------------------------- decoding
    def fuse_projections(self) -> None:
        """Runs the projections that read one input as one GEMM each (q/k/v, gate/up, the shared Pass-2 key/value),
        as diffusers' `fuse_qkv_projections()`: real fused `nn.Linear` modules replace the parts. For inference; state
        dicts and saved folders keep the parts (the checkpoint layout)."""
        for module in self.modules():
            if isinstance(module, FusedProjections):
                module.fuse_projections()

    def unfuse_projections(self) -> None:
        """Undoes [`~ARPGForImageGeneration.fuse_projections`]: the separate projections come back."""
        for module in self.modules():
            if isinstance(module, FusedProjections):
                module.unfuse_projections()

    def quantize(self, method: str = "int8") -> None:
        """Quantizes the decoder blocks' linear layers in place for inference: "int8" (int8 weights and dynamic int8
        activations), "int8-weight-only" or "int4-weight-only"; the head, embeddings, norms and RoPE stay float32.
        On the CPU torch's own kernels, elsewhere torchao (see `arpg_hf.quantization`)."""
        from .quantization import quantize_decoder

        quantize_decoder(self, method)

    def allocate_cache(
        self, batch_size: int, max_length: int | None = None, dtype=None, device=None, key_block: int | None = None
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
            key_block=key_block,
        )


# Registering with transformers' Auto classes waits while this module is imported (see arpg_hf.auto_classes).
from .auto_classes import register_with_loaded_auto_classes  # noqa: E402

register_with_loaded_auto_classes()
