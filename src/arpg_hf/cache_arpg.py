"""Preallocated (static) key/value cache for ARPG decoding, gpt-fast style: written at slots, never concatenated."""

from __future__ import annotations

import torch


class ARPGStaticCache:
    """Keys and values of every input fed so far: one pair per Pass-1 layer, then the pair shared by Pass 2.

    Slots are filled in feeding order (the class token first, then the tokens of each decoding step). Each input's
    keys already carry the RoPE of its own position, so the slot order does not matter to attention.

    Args:
        batch_size (`int`): rows of the decoding batch (with classifier-free guidance: twice the number of images).
        max_length (`int`): slots to allocate; at most this many inputs can be fed.
        num_self_attention_layers (`int`): Pass-1 layer count; layer index `num_self_attention_layers` is the shared
            Pass-2 pair.
        num_heads (`int`), head_dim (`int`): attention geometry.
        dtype (`torch.dtype`), device (`torch.device`): storage of the cache.
        key_block (`int`, *optional*): attention reads the filled slots rounded up to a multiple of this instead of
            exactly the filled ones, so that the read length takes few values (static shapes for `torch.compile`).
    """

    def __init__(
        self,
        batch_size: int,
        max_length: int,
        num_self_attention_layers: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        key_block: int | None = None,
    ):
        shape = (batch_size, num_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_self_attention_layers + 1)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_self_attention_layers + 1)]
        self.batch_size = batch_size
        self.max_length = max_length
        self.key_block = key_block
        self.seq_length = 0  # slots filled so far
        self.read_length = 0  # slots attention reads: see `advance`

    def advance(self, num_inputs: int, batch_size: int | None = None) -> int:
        """Reserves the next `num_inputs` slots and returns the first; attention then reads the filled slots (rounded
        up to `key_block`). Raises ValueError when they do not fit or the batch size differs."""
        if batch_size is not None and batch_size != self.batch_size:
            raise ValueError(
                f"The cache was allocated for batch size {self.batch_size}, got inputs of batch size {batch_size}."
            )
        start = self.seq_length
        if start + num_inputs > self.max_length:
            raise ValueError(
                f"The cache holds {self.max_length} slots and {start} are used; {num_inputs} more do not fit. "
                "Allocate a longer cache (max_length)."
            )
        self.seq_length = start + num_inputs
        block = self.key_block or 1
        self.read_length = min(self.max_length, -(-self.seq_length // block) * block)
        return start

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, cache_position: torch.LongTensor):
        """Writes keys/values `(batch, heads, n, head_dim)` at slots `cache_position` `(n,)` and returns the first
        `read_length` slots of the layer's buffers, filled or not: `(batch, heads, read_length, head_dim)` each."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, cache_position, key)
        values.index_copy_(2, cache_position, value)
        return keys[:, :, : self.read_length], values[:, :, : self.read_length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Slots filled so far (transformers' cache API)."""
        return self.seq_length

    def reset(self) -> None:
        """Marks every slot free, so that the same buffers serve another batch of the same size."""
        self.seq_length = self.read_length = 0
