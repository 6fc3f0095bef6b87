"""Argument checks shared by the library: integers and real numbers that are not bools.

`bool` is a subclass of `int`, so `isinstance(True, int)` holds and `True` would pass as the number 1; every check of
a count, a size or a scale goes through these predicates instead, so that the rule is written once.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


def is_int(value: object, exact: bool = False) -> bool:
    """Whether `value` is an integer and not a bool: any `numbers.Integral` (NumPy and torch integers too), or only a
    Python `int` with `exact` (for values saved into JSON configs)."""
    return isinstance(value, int if exact else numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether `value` is a real number (an integer or a float, NumPy ones too) and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(value: object, name: str, exact: bool = False) -> None:
    """Raises a ValueError naming `name` unless `value` is an integer >= 1 (see [`is_int`] for `exact`)."""
    if not is_int(value, exact=exact) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


# Tensors (torch is imported on use: this module serves light modules too).
def check_class_labels(class_labels: torch.Tensor, num_classes: int, allow_null: bool = False) -> None:
    """Raises ValueError unless every label lies in [0, num_classes) (or is -1, the null class, when allowed)."""
    import torch

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
    import torch

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


def check_training_inputs(input_ids, class_labels, labels, config) -> tuple[int, int]:
    """Raises ValueError unless raster image tokens `(batch, grid tokens)`, class labels `(batch,)` and optional
    targets fit `config` (an [`ARPGConfig`]); returns `(batch, seq)`."""
    import torch

    if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"input_ids must be an integer tensor of shape (batch, {config.num_image_tokens}), got "
            f"{input_ids.dtype} of shape {tuple(input_ids.shape)}."
        )
    batch_size, seq_len = input_ids.shape
    if seq_len != config.num_image_tokens:
        raise ValueError(
            f"input_ids has {seq_len} tokens per image; this model's grid is {config.grid_height}x"
            f"{config.grid_width} = {config.num_image_tokens} tokens."
        )
    if input_ids.min() < 0 or input_ids.max() >= config.vocab_size:
        raise ValueError(
            f"input_ids must lie in [0, {config.vocab_size}), got values in "
            f"[{int(input_ids.min())}, {int(input_ids.max())}]. Tokenize images with the matching VQ model."
        )
    if class_labels.shape != (batch_size,):
        raise ValueError(f"class_labels must have shape ({batch_size},), got {tuple(class_labels.shape)}.")
    check_class_labels(class_labels, config.num_classes)
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(
            f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}."
        )
    return batch_size, seq_len
