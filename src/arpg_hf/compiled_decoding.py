"""Opt-in `torch.compile` of the decoding step, at bucketed static shapes.

A decoding step's shapes change from step to step: the token schedule feeds n_(k-1) inputs and asks n_k queries,
and the cache grows. Compiled as they are, every new combination is a new graph (or a dynamic-shape graph that
CUDA graphs cannot capture). [`CompiledDecoder`] instead

- pads the inputs and the queries of a step up to a bucket size (powers of two by default; padding repeats the
  first real entry, so every index stays in range), and drops the padded queries' logits;
- writes the inputs into the preallocated cache at a slot offset given as a 0-dim tensor, and lets attention read
  the whole cache under a mask of the filled slots (see `slot_start` in [`ARPGModel.forward`]); padded inputs land
  beyond the filled slots, so nothing attends to them, and the next step overwrites them;
- optionally (`key_block`), lets attention read only the cache slots up to the filled ones rounded up to a multiple
  of `key_block`, instead of the whole cache: a few more shapes, and on average about half the keys and values read.

Every step of a run therefore has one of a handful of shapes (a few pairs of buckets, times the key blocks in use),
each compiled once per batch size, grid and position mode and then reused by every later call. The results are those
of the eager step up to floating-point reassociation: the same tokens in practice (the tests check this on a tiny
model).

Steps that feed known tokens causally (the prefill of the editing pipelines) run eagerly, once per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cache_arpg import ARPGStaticCache

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
RECOMPILE_LIMIT = 64


def bucket_size(count: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `count` (buckets sorted ascending); `count` itself beyond the largest."""
    for bucket in buckets:
        if bucket >= count:
            return bucket
    return count


def _pad_columns(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """(B, n) -> (B, width), repeating column 0 (a valid id / position) in the new columns."""
    missing = width - tensor.shape[1]
    return tensor if missing == 0 else torch.cat([tensor, tensor[:, :1].expand(-1, missing)], dim=1)


class CompiledDecoder:
    """Runs [`~ARPGForImageGeneration.decode_step`] through `torch.compile` at bucketed static shapes.

    Usually created by [`ARPGPipeline.enable_compiled_decoding`]. Calls take and return what `decode_step` does.

    Args:
        transformer ([`ARPGForImageGeneration`]): the model; compiled decoding uses the default (unfused) weight
            layout, the compiler picks its own.
        buckets (`Sequence[int]`, *optional*): allowed padded sizes for the inputs and queries of a step; defaults to
            powers of two up to 4096.
        key_block (`int`, *optional*): attention reads the cache slots up to the filled ones rounded up to a multiple
            of this (e.g. 64) instead of the whole cache; None (default): the whole cache, one key length.
        **compile_kwargs: passed to `torch.compile` (defaults: `fullgraph=True`, `dynamic=False`); e.g.
            `mode="reduce-overhead"` for CUDA graphs, or `backend=...`.
    """

    def __init__(self, transformer, buckets: Sequence[int] | None = None, key_block: int | None = None,
                 **compile_kwargs):  # fmt: skip
        buckets = sorted(set(DEFAULT_BUCKETS if buckets is None else buckets))
        if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
            raise ValueError(f"buckets must be positive integers, got {buckets!r}.")
        if key_block is not None and (not isinstance(key_block, int) or key_block < 1):
            raise ValueError(f"key_block must be a positive integer or None, got {key_block!r}.")
        self.transformer = transformer
        self.buckets = tuple(buckets)
        self.key_block = key_block
        self.compile_kwargs = {"fullgraph": True, "dynamic": False, **compile_kwargs}
        # One graph per (input bucket, query bucket, batch size, grid, position mode) in use: more than Dynamo's
        # default of 8 per function once several batch sizes or canvases are served.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self._step = torch.compile(self._padded_step, **self.compile_kwargs)

    def _padded_step(self, input_ids, input_positions, query_positions, cache, slot_start, num_valid, grid_size,
                     position_mode):  # fmt: skip
        return self.transformer.decode_step(
            input_ids, input_positions, query_positions, cache, grid_size=grid_size, position_mode=position_mode,
            slot_start=slot_start, num_valid_inputs=num_valid,
        )  # fmt: skip

    def allocate_cache(self, batch_size: int, max_length: int, device=None) -> ARPGStaticCache:
        """A cache with room for `max_length` inputs plus the padding of a step (the largest bucket that can occur)."""
        headroom = bucket_size(max_length, self.buckets) - 1
        cache = self.transformer.allocate_cache(batch_size, max_length=max_length + headroom, device=device)
        if cache.cross_key.device.type == "cuda":  # CUDA graphs: the buffers keep their addresses across calls
            for buffer in cache.self_keys + cache.self_values + [cache.cross_key, cache.cross_value]:
                torch._dynamo.mark_static_address(buffer)
        return cache

    def __call__(self, input_ids, input_position_ids, query_position_ids, cache: ARPGStaticCache, grid_size=None,
                 position_mode: str = "extrapolate", causal_inputs: bool = False) -> torch.FloatTensor:  # fmt: skip
        if causal_inputs and input_ids.shape[1] > 1:  # a prefill of known tokens: once per call, eager
            return self.transformer.decode_step(
                input_ids, input_position_ids, query_position_ids, cache, grid_size=grid_size,
                position_mode=position_mode, causal_inputs=True,
            )  # fmt: skip
        num_inputs, num_queries = input_ids.shape[1], query_position_ids.shape[1]
        input_width, query_width = bucket_size(num_inputs, self.buckets), bucket_size(num_queries, self.buckets)
        cache.check_capacity(input_ids.shape[0], input_width)
        device = input_ids.device
        rotary = self.transformer.model.rotary_emb
        rotary.table(tuple(grid_size or rotary.grid_size), position_mode, device)  # built eagerly: graphs only read it
        if self.key_block is not None:  # a Python int on the cache: each value is its own (guarded) graph
            filled = cache.seq_length + num_inputs
            cache.attended_slots = min(cache.max_length, -(-filled // self.key_block) * self.key_block)
        logits = self._step(
            _pad_columns(input_ids, input_width),
            _pad_columns(input_position_ids, input_width),
            _pad_columns(query_position_ids, query_width),
            cache,
            torch.tensor(cache.seq_length, device=device),
            torch.tensor(num_inputs, device=device),
            None if grid_size is None else tuple(grid_size),
            position_mode,
        )  # (B, query_width, V)
        cache.seq_length += num_inputs
        cache.attended_slots = None
        return logits[:, :num_queries]
