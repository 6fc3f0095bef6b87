"""Decoding layout of linear weights: transposed storage and fused projections, with unchanged parameters.

`fuse_linears(q_proj, k_proj, v_proj)` copies the weights of bias-free linears that read the same input into ONE
`(in_features, sum of out_features)` matrix and turns every `(out, in)` weight into a view of its column block. Names,
shapes and values of the parameters stay what the checkpoint has (state dicts, saving and loading are unaffected);
only the memory layout changes, so that

- the projections run as one GEMM `x @ W` (`fused_linear_outputs`) instead of several small ones, and
- `F.linear(x, weight)` multiplies by a contiguous `W^T`, the non-transposed BLAS path, which is the faster one for
  the few rows of a decoding step.

Nothing is copied twice: the old storage is released. The layout is checked on use (`fused_weight`), so a weight
re-materialised by `.to()`, by assignment or by loading simply falls back to the plain per-linear path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fuse_linears(*linears: nn.Linear) -> None:
    """Stores the weights of `linears` side by side, transposed, in one `(in_features, sum out_features)` matrix.

    Every linear keeps its `(out_features, in_features)` parameter, now a view into that matrix. One linear alone
    gets transposed storage. Already fused groups are left alone.
    """
    if fused_weight(*linears) is not None:
        return
    in_features = {linear.in_features for linear in linears}
    if len(in_features) != 1 or any(linear.bias is not None for linear in linears):
        raise ValueError("Only bias-free linears that read the same input can be fused.")
    with torch.inference_mode(False), torch.no_grad():  # parameters must not become inference tensors
        fused = torch.cat([linear.weight.t() for linear in linears], dim=1)  # (K, sum N), contiguous
        start = 0
        for linear in linears:
            linear.weight.data = fused[:, start : start + linear.out_features].t()  # (N, K) view, strides (1, sum N)
            start += linear.out_features


def unfuse_linears(*linears: nn.Linear) -> None:
    """Gives every weight its own contiguous `(out_features, in_features)` storage again (the default layout)."""
    with torch.inference_mode(False), torch.no_grad():
        for linear in linears:
            if not linear.weight.is_contiguous():
                linear.weight.data = linear.weight.contiguous()


def fused_weight(*linears: nn.Linear) -> torch.Tensor | None:
    """The `(in_features, sum out_features)` matrix that `fuse_linears` made of `linears`, or None when their weights
    are not (or no longer) laid out that way."""
    first = linears[0].weight
    total = sum(linear.out_features for linear in linears)
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for linear in linears:
        weight = linear.weight
        if (
            weight.stride() != (1, total)
            or weight.dtype != first.dtype
            or weight.untyped_storage().data_ptr() != storage
            or weight.storage_offset() != offset
        ):
            return None
        offset += linear.out_features
    return first.as_strided((first.shape[1], total), (total, 1), first.storage_offset())  # (K, sum N)


def pack_linears(*linears: nn.Linear) -> bool:
    """Keeps a copy of a fused group's weight in oneDNN's blocked GEMM layout, for float32 decoding on CPU.

    On CPUs where MKL's GEMM is slow for the few rows of a decoding step (measured: 1.5x on an AVX2 EPYC at 32 rows),
    oneDNN's kernels on pre-packed weights are faster. The copy is extra memory (as much as the weights); it is used
    only while the group's weights keep their storage and have not been modified in place (it is dropped otherwise).
    Returns False, and packs nothing, off CPU, for other dtypes, or without oneDNN and its packed-linear operators
    (those that torch.compile's CPU backend uses).
    """
    weight = fused_weight(*linears)
    if weight is None:
        raise ValueError("Fuse the linears (fuse_linears) before packing them.")
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not onednn_packing_available():
        return False
    with torch.inference_mode(False), torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous(), None)  # from (sum N, K)
    linears[0]._onednn_packed_weight = (packed, weight.data_ptr(), tuple(linear.weight._version for linear in linears))
    return True


def onednn_packing_available() -> bool:
    """Whether this torch build has oneDNN with the operators `pack_linears` uses."""
    operators = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(operators, "_reorder_linear_weight")
            and hasattr(operators, "_linear_pointwise"))  # fmt: skip


def unpack_linears(*linears: nn.Linear) -> None:
    """Drops the packed copy of `pack_linears`."""
    linears[0].__dict__.pop("_onednn_packed_weight", None)


def packed_weight(weight: torch.Tensor, *linears: nn.Linear) -> torch.Tensor | None:
    """The packed copy of the fused `weight` of `linears`, or None when there is none or it is stale."""
    entry = linears[0].__dict__.get("_onednn_packed_weight")
    if entry is None:
        return None
    packed, pointer, versions = entry
    if pointer != weight.data_ptr() or versions != tuple(linear.weight._version for linear in linears):
        unpack_linears(*linears)  # the weights moved or changed: the copy no longer matches them
        return None
    return packed


def fused_linear_outputs(hidden_states: torch.Tensor, *linears: nn.Linear) -> tuple[torch.Tensor, ...]:
    """`tuple(linear(hidden_states) for linear in linears)`, as one GEMM when the weights are fused (on the packed
    copy of `pack_linears` when there is one and the input is float32 on CPU).

    The fused path is taken only without autograd (decoding) and outside `torch.compile`: a view over the whole
    matrix would route gradients of every block to the first weight.
    """
    needs_grad = torch.is_grad_enabled() and any(linear.weight.requires_grad for linear in linears)
    # Under torch.compile the layout check (storage pointers) cannot be traced; the compiler picks its own layouts.
    weight = None if needs_grad or torch.compiler.is_compiling() else fused_weight(*linears)
    if weight is None:
        return tuple(F.linear(hidden_states, linear.weight) for linear in linears)
    packed = packed_weight(weight, *linears) if hidden_states.dtype == torch.float32 and not hidden_states.is_cuda else None
    if packed is not None:
        outputs = torch.ops.mkldnn._linear_pointwise(hidden_states.contiguous(), packed, None, "none", [], "")
    else:
        outputs = torch.matmul(hidden_states, weight)  # (..., sum N)
    return outputs.split([linear.out_features for linear in linears], dim=-1)


def linear_output(hidden_states: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """`linear(hidden_states)` for a bias-free linear, through the decoding layout when it has one."""
    return fused_linear_outputs(hidden_states, linear)[0]
