"""Preallocated (static) key/value cache for ARPG decoding, gpt-fast style: written at slots, never concatenated."""

from __future__ import annotations

import torch


class ARPGStaticCache:
    """Keys and values of every input fed so far: one pair per Pass-1 layer and the one pair shared by Pass 2.

    Slots are filled in feeding order (class token first, then the tokens of each decoding step); the RoPE of each
    input's own position is already applied to its keys, so the slot order does not matter to attention.

    Args:
        batch_size (`int`): rows of the decoding batch (with classifier-free guidance: twice the number of images).
        max_length (`int`): slots to allocate; at most this many inputs can be fed.
        num_self_attention_layers (`int`): Pass-1 layer count.
        num_heads (`int`), head_dim (`int`): attention geometry.
        dtype (`torch.dtype`), device (`torch.device`): storage of the cache.
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
    ):
        shape = (batch_size, num_heads, max_length, head_dim)

        def empty():
            return torch.zeros(shape, dtype=dtype, device=device)

        self.self_keys = [empty() for _ in range(num_self_attention_layers)]
        self.self_values = [empty() for _ in range(num_self_attention_layers)]
        self.cross_key = empty()
        self.cross_value = empty()
        self.batch_size = batch_size
        self.max_length = max_length
        self.seq_length = 0  # slots filled so far
        # Static-shape steps read the first `attended_slots` slots (None: all `max_length`); see CompiledDecoder.
        self.attended_slots: int | None = None

    def check_capacity(self, batch_size: int, num_new: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(f"The cache was allocated for batch size {self.batch_size}, got inputs of batch size {batch_size}.")
        if self.seq_length + num_new > self.max_length:
            raise ValueError(
                f"The cache holds {self.max_length} slots and {self.seq_length} are used; {num_new} more do not fit. "
                "Allocate a longer cache (max_length)."
            )

    @staticmethod
    def _write(keys: torch.Tensor, values: torch.Tensor, key, value, start: int):
        end = start + key.shape[2]
        keys[:, :, start:end] = key
        values[:, :, start:end] = value
        return keys[:, :, :end], values[:, :, :end]  # (B, H, end, Dh) views

    def update_self(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        """Writes a Pass-1 layer's new keys/values (B, H, n, Dh) after the filled slots; returns all keys/values so far."""
        return self._write(self.self_keys[layer_idx], self.self_values[layer_idx], key, value, self.seq_length)

    def update_cross(self, key: torch.Tensor, value: torch.Tensor):
        """Writes the shared Pass-2 keys/values of the new inputs and advances the fill position."""
        keys, values = self._write(self.cross_key, self.cross_value, key, value, self.seq_length)
        self.seq_length += key.shape[2]
        return keys, values

    # Static shapes (compiled decoding): writes at a tensor offset, reads of the first `read_length` slots under a
    # slot mask.
    @property
    def read_length(self) -> int:
        """How many slots (filled or not) a static-shape step reads: `attended_slots`, or all of them."""
        return self.max_length if self.attended_slots is None else self.attended_slots

    def _write_at(self, keys: torch.Tensor, values: torch.Tensor, key, value, start: torch.Tensor):
        slots = start + torch.arange(key.shape[2], device=key.device)  # (n,)
        keys.index_copy_(2, slots, key)
        values.index_copy_(2, slots, value)
        length = self.read_length
        return keys[:, :, :length], values[:, :, :length]  # (B, H, read_length, Dh): valid or not

    def update_self_at(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, start: torch.Tensor):
        """Writes a Pass-1 layer's keys/values (B, H, n, Dh) at slots `start .. start + n - 1` (`start` a 0-dim
        tensor, so that the traced shapes never depend on the fill) and returns the first `read_length` slots of the
        buffers. Does not advance `seq_length`: with padded inputs only the caller knows how many of the n are real."""
        return self._write_at(self.self_keys[layer_idx], self.self_values[layer_idx], key, value, start)

    def update_cross_at(self, key: torch.Tensor, value: torch.Tensor, start: torch.Tensor):
        """`update_self_at` for the shared Pass-2 keys/values."""
        return self._write_at(self.cross_key, self.cross_value, key, value, start)

    def reset(self) -> None:
        """Marks every slot free, so the same buffers serve another batch of the same size."""
        self.seq_length = 0
        self.attended_slots = None
