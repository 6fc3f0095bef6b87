"""Opt-in `torch.compile` of decoding steps: the model's own forward, at bucketed static shapes.

A decoding step feeds the n tokens sampled at the previous step and asks m queries, and both change from step to
step. [`CompiledDecoder`] pads them up to a bucket size (padding repeats the first real entry, so every index stays in
range) and passes explicit `cache_position` and `attention_ends`, so that no traced shape depends on the step: the
padded inputs land beyond the filled slots, the mask rule hides them from every real row, and the next step
overwrites them. The cache is read whole, or up to the filled slots rounded up to `key_block`. Each (bucket pair,
batch size, grid, position mode) is compiled once and then reused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cache_arpg import ARPGStaticCache

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
RECOMPILE_LIMIT = 64  # graphs per decoder: bucket pairs x key blocks x batch sizes x canvases in use


def bucket_size(count: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `count` (buckets sorted ascending); `count` itself beyond the largest."""
    return next((bucket for bucket in buckets if bucket >= count), count)


def _pad_columns(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """(B, n) -> (B, width), repeating column 0 (a valid id / position) in the new columns."""
    missing = width - tensor.shape[1]
    return tensor if missing == 0 else torch.cat([tensor, tensor[:, :1].expand(-1, missing)], dim=1)


class CompiledDecoder:
    """Runs decoding steps of an [`ARPGForImageGeneration`] through `torch.compile` at bucketed static shapes.

    Usually created by [`ARPGPipeline.enable_compiled_decoding`]. Calls take the step arguments of the model's
    forward and return its logits `(batch, num_queries, vocab_size)`; steps with `attention_ends` (the causal prefill
    of the editing pipelines, once per call) run eagerly.

    Args:
        transformer ([`ARPGForImageGeneration`]): the model.
        buckets (`Sequence[int]`, *optional*): padded sizes for the inputs and queries of a step; defaults to powers
            of two up to 4096.
        key_block (`int`, *optional*): attention reads the cache up to the filled slots rounded up to a multiple of
            this instead of the whole cache: a few more graphs, fewer keys read.
        **compile_kwargs: for `torch.compile` (default: `dynamic=False`); e.g. `mode="reduce-overhead"` for CUDA
            graphs, or `fullgraph=True` to refuse graph breaks (offload hooks run between graphs, so they need it
            False). The decoder's own calls may compile up to `RECOMPILE_LIMIT`
            graphs (Dynamo's global limit is raised only while they run).
    """

    def __init__(
        self, transformer, buckets: Sequence[int] | None = None, key_block: int | None = None, **compile_kwargs
    ):
        buckets = sorted(set(DEFAULT_BUCKETS if buckets is None else buckets))
        if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
            raise ValueError(f"buckets must be positive integers, got {buckets!r}.")
        if key_block is not None and (not isinstance(key_block, int) or key_block < 1):
            raise ValueError(f"key_block must be a positive integer or None, got {key_block!r}.")
        self.transformer, self.buckets, self.key_block = transformer, tuple(buckets), key_block
        self.step = torch.compile(transformer, **{"dynamic": False, **compile_kwargs})

    def allocate_cache(self, batch_size: int, max_length: int, device=None) -> ARPGStaticCache:
        """A cache with room for `max_length` inputs plus the padding of a step (the largest bucket that can occur)."""
        length = max_length + bucket_size(max_length, self.buckets) - 1
        cache = self.transformer.allocate_cache(batch_size, length, device=device, key_block=self.key_block or length)
        if cache.keys[0].device.type == "cuda":  # CUDA graphs: the buffers keep their addresses across calls
            for buffer in cache.keys + cache.values:
                torch._dynamo.mark_static_address(buffer)
        return cache

    def __call__(
        self,
        input_ids,
        input_position_ids,
        query_position_ids,
        past_key_values: ARPGStaticCache,
        attention_ends=None,
        grid_size=None,
        position_mode: str = "extrapolate",
        position_conditions=None,
    ) -> torch.FloatTensor:
        kwargs = dict(
            past_key_values=past_key_values,
            grid_size=None if grid_size is None else tuple(grid_size),
            position_mode=position_mode,
        )
        if position_conditions is not None:  # per canvas position: the padded queries repeat a real position
            kwargs["position_conditions"] = position_conditions
        if attention_ends is not None:  # the causal prefill: once per call, eager
            return self.transformer(
                input_ids,
                input_position_ids=input_position_ids,
                query_position_ids=query_position_ids,
                attention_ends=attention_ends,
                **kwargs,
            ).logits
        num_inputs, num_queries = input_ids.shape[1], query_position_ids.shape[1]
        input_width, query_width = bucket_size(num_inputs, self.buckets), bucket_size(num_queries, self.buckets)
        start = past_key_values.advance(num_inputs, input_ids.shape[0])
        if start + input_width > past_key_values.max_length:
            raise ValueError("The cache has no room for the padding of this step; allocate it with allocate_cache.")
        rotary = self.transformer.model.rotary_emb
        rotary.table(kwargs["grid_size"] or rotary.grid_size, position_mode, input_ids.device)  # built eagerly
        device = input_ids.device
        ends = torch.full((1,), start + num_inputs, device=device)
        with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)):
            logits = self.step(
                _pad_columns(input_ids, input_width),
                input_position_ids=_pad_columns(input_position_ids, input_width),
                query_position_ids=_pad_columns(query_position_ids, query_width),
                cache_position=torch.arange(start, start + input_width, device=device),
                attention_ends=(ends, ends),  # one end for every row: a mask broadcast over the rows
                **kwargs,
            ).logits  # (B, query_width, V)
        return logits[:, :num_queries]
