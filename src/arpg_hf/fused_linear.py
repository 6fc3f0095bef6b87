"""Decoding layout of linear weights: fused projections with unchanged parameters.

`fuse_linears(q_proj, k_proj, v_proj)` copies the weights of bias-free linears that read the same input into ONE
matrix and turns every `(out, in)` weight into a view of its block. Names, shapes and values of the parameters stay
what the checkpoint has (state dicts, saving and loading are unaffected); only the memory layout changes, so that the
projections run as one GEMM (`fused_linear_outputs`) instead of several small ones. Two layouts:

- "columns" (the default): one `(in_features, sum of out_features)` matrix, every weight a transposed view of its
  column block. `x @ W` then multiplies by a contiguous matrix, the non-transposed BLAS path, which is the faster one
  for the few rows of a decoding step.
- "rows": one `(sum of out_features, in_features)` matrix, every weight a contiguous row block (its checkpoint
  layout). Float32 inputs on CPU then run through oneDNN's linear kernel on the weights as stored: on CPUs where MKL is
  slow for decoding row counts (an AVX2 EPYC) it is about 1.5x faster, with no extra memory.

`pack_linears` adds a third option on top of "columns": a copy in oneDNN's pre-packed layout (faster still, at the
price of the memory of a second copy). Nothing else is copied twice: the old storage is released. The layout is
checked on use (`fused_weight`, `fused_rows`), so a weight re-materialised by `.to()`, by assignment or by loading
simply falls back to the plain per-linear path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


LAYOUTS = ("columns", "rows")


def fuse_linears(*linears: nn.Linear, layout: str = "columns") -> None:
    """Stores the weights of `linears` side by side in one matrix laid out as `layout` (see the module docstring).

    Every linear keeps its `(out_features, in_features)` parameter, now a view into that matrix ("columns": one linear
    alone gets transposed storage). A group already in `layout` is left alone; one in the other layout is re-laid.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    if (fused_weight if layout == "columns" else fused_rows)(*linears) is not None:
        return
    in_features = {linear.in_features for linear in linears}
    if len(in_features) != 1 or any(linear.bias is not None for linear in linears):
        raise ValueError("Only bias-free linears that read the same input can be fused.")
    with torch.inference_mode(False), torch.no_grad():  # parameters must not become inference tensors
        if layout == "columns":
            fused = torch.cat([linear.weight.t() for linear in linears], dim=1)  # (K, sum N), contiguous
        else:
            fused = torch.cat([linear.weight for linear in linears], dim=0)  # (sum N, K), contiguous
        start = 0
        for linear in linears:
            block = slice(start, start + linear.out_features)
            # "columns": an (N, K) view with strides (1, sum N); "rows": a contiguous (N, K) view
            linear.weight.data = fused[:, block].t() if layout == "columns" else fused[block]
            start += linear.out_features
    linears[0].__dict__["_fused_rows"] = layout == "rows"


def unfuse_linears(*linears: nn.Linear) -> None:
    """Gives every weight its own contiguous `(out_features, in_features)` storage again (the default layout)."""
    rows = fused_rows(*linears) is not None
    with torch.inference_mode(False), torch.no_grad():
        for linear in linears:
            if rows or not linear.weight.is_contiguous():
                linear.weight.data = linear.weight.clone(memory_format=torch.contiguous_format)
    linears[0].__dict__.pop("_fused_rows", None)


def fused_weight(*linears: nn.Linear) -> torch.Tensor | None:
    """The `(in_features, sum out_features)` matrix that `fuse_linears(layout="columns")` made of `linears`, or None
    when their weights are not (or no longer) laid out that way."""
    return _fused_matrix(linears, rows=False)


def fused_rows(*linears: nn.Linear) -> torch.Tensor | None:
    """The `(sum out_features, in_features)` matrix that `fuse_linears(layout="rows")` made of `linears`, or None when
    they were not fused that way or their weights no longer lie consecutively in one storage."""
    if not linears[0].__dict__.get("_fused_rows"):
        return None
    return _fused_matrix(linears, rows=True)


def _fused_matrix(linears, rows: bool) -> torch.Tensor | None:
    """The matrix whose consecutive row blocks (`rows`) or column blocks are the weights of `linears`, or None."""
    first = linears[0].weight
    in_features, total = first.shape[1], sum(linear.out_features for linear in linears)
    strides = (in_features, 1) if rows else (1, total)  # of every (N, K) weight inside that matrix
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for linear in linears:
        weight = linear.weight
        if (
            weight.stride() != strides
            or weight.dtype != first.dtype
            or weight.untyped_storage().data_ptr() != storage
            or weight.storage_offset() != offset
        ):
            return None
        offset += linear.out_features * strides[0]
    shape = (total, in_features) if rows else (in_features, total)
    return first.as_strided(shape, (shape[1], 1), first.storage_offset())


def is_fused(*linears: nn.Linear) -> bool:
    """Whether `linears` are laid out by `fuse_linears`, in either layout."""
    return fused_weight(*linears) is not None or fused_rows(*linears) is not None


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
    if packed_weight(weight, *linears) is not None:
        return True  # already packed, and the copy still matches the weights
    with torch.inference_mode(False), torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous(), None)  # from (sum N, K)
    linears[0]._onednn_packed_weight = (packed, weight.data_ptr(), tuple(linear.weight._version for linear in linears))
    return True


def onednn_packing_available() -> bool:
    """Whether this torch build has oneDNN with the operators `pack_linears` and the "rows" layout use."""
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
    """`tuple(linear(hidden_states) for linear in linears)`, as one GEMM when the weights are fused: `x @ W` on the
    "columns" layout (on the packed copy of `pack_linears` when there is one and the input is float32 on CPU), oneDNN
    on the "rows" layout for float32 on CPU (`F.linear` elsewhere).

    The fused path is taken only without autograd (decoding) and outside `torch.compile`: a view over the whole
    matrix would route gradients of every block to the first weight.
    """
    needs_grad = torch.is_grad_enabled() and any(linear.weight.requires_grad for linear in linears)
    # Under torch.compile the layout check (storage pointers) cannot be traced; the compiler picks its own layouts.
    if needs_grad or torch.compiler.is_compiling():
        return tuple(F.linear(hidden_states, linear.weight) for linear in linears)
    onednn_input = hidden_states.dtype == torch.float32 and hidden_states.device.type == "cpu"
    weight = fused_weight(*linears)
    if weight is not None:
        packed = packed_weight(weight, *linears) if onednn_input else None
        if packed is not None:
            outputs = torch.ops.mkldnn._linear_pointwise(hidden_states.contiguous(), packed, None, "none", [], "")
        else:
            outputs = torch.matmul(hidden_states, weight)  # (..., sum N)
    else:
        rows = fused_rows(*linears)
        if rows is None:
            return tuple(F.linear(hidden_states, linear.weight) for linear in linears)
        if onednn_input and rows.dtype == torch.float32 and onednn_packing_available():
            outputs = torch.ops.mkldnn._linear_pointwise(hidden_states.contiguous(), rows, None, "none", [], "")
        else:
            outputs = F.linear(hidden_states, rows)  # (..., sum N)
    return outputs.split([linear.out_features for linear in linears], dim=-1)


def linear_output(hidden_states: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """`linear(hidden_states)` for a bias-free linear, through the decoding layout when it has one."""
    return fused_linear_outputs(hidden_states, linear)[0]
