"""Opt-in CPU kernels for float32 decoding: one function, [`use_cpu_gemm`], outside the model.

On some CPUs the BLAS torch ships (MKL) is slow for the few rows of a decoding step, and oneDNN's linear kernel is
faster (see docs/performance.md for measurements). `use_cpu_gemm(model, gemm)` fuses the model's projections
([`~ARPGForImageGeneration.fuse_projections`]) and swaps every `nn.Linear` of the decoder for a subclass with the same
parameter whose forward calls that kernel:

- "blas": plain `nn.Linear`, each weight stored transposed (`x @ W` then multiplies by a contiguous matrix).
- "onednn": oneDNN's linear kernel on the weights as stored; no extra memory.
- "onednn-packed": oneDNN on a copy of each weight in its pre-packed blocked layout (a second copy in memory).
- "default": back to plain `nn.Linear` modules with contiguous weights (fused projections stay fused).

Parameters, their names and values never change, so state dicts and saving are unaffected. The swapped modules fall
back to `F.linear` off CPU, for other dtypes, with autograd, under `torch.compile`, and without oneDNN in the torch
build.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CPU_GEMMS = ("default", "blas", "onednn", "onednn-packed")


def onednn_available() -> bool:
    """Whether this torch build has oneDNN and the linear operators used here."""
    operators = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available()) and all(
        hasattr(operators, name) for name in ("_linear_pointwise", "_reorder_linear_weight")
    )


def _onednn_applies(linear: nn.Linear, hidden_states: torch.Tensor) -> bool:
    weight = linear.weight
    return (
        hidden_states.dtype == torch.float32 == weight.dtype
        and hidden_states.device.type == "cpu" == weight.device.type
        and not (torch.is_grad_enabled() and weight.requires_grad)
        and not torch.compiler.is_compiling()
    )


class OneDNNLinear(nn.Linear):
    """`nn.Linear` (bias-free) whose float32 CPU inference runs oneDNN's linear kernel on the weight as stored."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not _onednn_applies(self, hidden_states):
            return F.linear(hidden_states, self.weight)
        return torch.ops.mkldnn._linear_pointwise(hidden_states.contiguous(), self.weight, None, "none", [], "")


class PackedOneDNNLinear(nn.Linear):
    """`nn.Linear` (bias-free) that keeps its weight also in oneDNN's pre-packed layout, for float32 CPU inference;
    the packed copy is used only while the weight is unchanged (same storage, no in-place update)."""

    def pack(self) -> None:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.contiguous(), None)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.packed_for = (self.weight.data_ptr(), self.weight._version)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        current = (self.weight.data_ptr(), self.weight._version)
        if not _onednn_applies(self, hidden_states) or current != self.packed_for:
            return F.linear(hidden_states, self.weight)
        return torch.ops.mkldnn._linear_pointwise(hidden_states.contiguous(), self.packed_weight, None, "none", [], "")


def use_cpu_gemm(model: nn.Module, gemm: str = "onednn") -> None:
    """Lays out the decoder's projections for float32 decoding on CPU with `gemm` (see the module docstring).

    Args:
        model ([`ARPGForImageGeneration`]): changed in place; its projections are fused first.
        gemm (`str`, *optional*, defaults to `"onednn"`): one of "default", "blas", "onednn", "onednn-packed". Without
            oneDNN in the torch build, the oneDNN choices behave as "default".
    """
    if gemm not in CPU_GEMMS:
        raise ValueError(f"gemm must be one of {CPU_GEMMS}, got {gemm!r}.")
    if any(parameter.device.type == "meta" for parameter in model.parameters()):
        return  # offloaded weights (accelerate hooks) are materialised per call: leave their layout alone
    model.fuse_projections()
    kind = {"onednn": OneDNNLinear, "onednn-packed": PackedOneDNNLinear}.get(gemm, nn.Linear)
    if not onednn_available():
        kind = nn.Linear
    for parent in list(model.modules()):
        for name, linear in list(parent.named_children()):
            if isinstance(linear, nn.Linear) and linear.bias is None:
                setattr(parent, name, _relaid(linear, kind, transposed=gemm == "blas"))


def _relaid(linear: nn.Linear, kind: type, transposed: bool) -> nn.Linear:
    """A `kind` module holding `linear`'s parameter (stored transposed or contiguous)."""
    weight = linear.weight
    if weight.is_contiguous() == transposed:  # re-store: (out, in) values over (in, out) storage, or back
        with torch.no_grad():
            stored = weight.t().contiguous().t() if transposed else weight.contiguous()
        weight = nn.Parameter(stored, requires_grad=weight.requires_grad)
    module = (
        linear if type(linear) is kind else kind(linear.in_features, linear.out_features, bias=False, device="meta")
    )
    module.weight = weight
    if kind is PackedOneDNNLinear:
        module.pack()
    return module
