"""CPU kernels for float32 decoding: one function, [`use_cpu_gemm`], outside the model.

On CPUs the BLAS torch ships (MKL) is slow for the few rows of a decoding step, and oneDNN's linear kernel on weights
in its pre-packed blocked layout is much faster (see docs/performance.md for measurements). `use_cpu_gemm(model, gemm)`
fuses the model's projections ([`~ARPGForImageGeneration.fuse_projections`]) and swaps every `nn.Linear` of the
decoder for one that calls the chosen kernel:

- "auto" (what `ARPGPipeline.from_pretrained` applies): "onednn-packed" for a float32 model in eval mode on the CPU
  of a machine without an accelerator and with oneDNN in the torch build; otherwise nothing changes. Layers quantized
  by `arpg_hf.quantization` are left as they are (the float32 head is laid out).
- "onednn-packed": oneDNN on each weight in its pre-packed layout, which replaces the weight (no second copy).
  State dicts, saving and `.to()` see the dense weight; such a model is for inference (see [`PackedOneDNNLinear`]).
- "onednn": oneDNN's linear kernel on the weights as stored.
- "blas": plain `nn.Linear`, each weight stored transposed (`x @ W` then multiplies by a contiguous matrix).
- "default": back to plain `nn.Linear` modules with contiguous weights (fused projections stay fused); packed weights
  become parameters again, for training.

Parameter values never change, so state dicts and saving are unaffected. The swapped modules fall back to `F.linear`
off CPU, for other dtypes, under `torch.compile`, and without oneDNN in the torch build.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

CPU_GEMMS = ("auto", "default", "blas", "onednn", "onednn-packed")


def onednn_available() -> bool:
    """Whether this torch build has oneDNN and the linear operators used here."""
    operators = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available()) and all(
        hasattr(operators, name) for name in ("_linear_pointwise", "_reorder_linear_weight")
    )


def _onednn_applies(hidden_states: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether oneDNN's float32 CPU kernel can run on `hidden_states` (and `weight`; None: a packed weight, which is
    float32 on the CPU)."""
    tensors = (hidden_states,) if weight is None else (hidden_states, weight)
    return (
        all(tensor.dtype == torch.float32 and tensor.device.type == "cpu" for tensor in tensors)
        and not torch.compiler.is_compiling()
    )


class OneDNNLinear(nn.Linear):
    """`nn.Linear` (bias-free) whose float32 CPU inference runs oneDNN's linear kernel on the weight as stored."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not _onednn_applies(hidden_states, self.weight) or (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(hidden_states, self.weight)
        return torch.ops.mkldnn._linear_pointwise(hidden_states.contiguous(), self.weight, None, "none", [], "")


class PackedOneDNNLinear(nn.Linear):
    """`nn.Linear` (bias-free) for float32 CPU inference whose weight is held only in oneDNN's pre-packed layout (the
    buffer `packed_weight`; the `weight` parameter is removed, so the model's parameters no longer list it).

    Reading `weight` gives a dense copy; state dicts carry the dense weight under `weight`, and loading one re-packs
    it. Moving the module to another device or dtype turns the weight back into a parameter (then it is a plain
    linear layer). It cannot be trained: call `use_cpu_gemm(model, "default")` first.
    """

    @classmethod
    def packing(cls, linear: nn.Linear) -> PackedOneDNNLinear:
        """A packed module with `linear`'s weight (which it does not keep)."""
        module = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        del module.weight
        module.register_buffer("packed_weight", _packed(linear.weight), persistent=False)
        return module

    @property
    def is_packed(self) -> bool:
        return "packed_weight" in self._buffers

    def __getattr__(self, name: str):
        if name == "weight" and "packed_weight" in self._buffers:
            return self._buffers["packed_weight"].to_dense()
        return super().__getattr__(name)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.is_packed:
            return F.linear(hidden_states, self.weight)
        if torch.is_grad_enabled() and self.training:
            raise RuntimeError(
                "This layer's weight is packed for CPU inference (the default layout of ARPGPipeline.from_pretrained) "
                "and cannot be trained. Call arpg_hf.use_cpu_gemm(model, 'default') before training."
            )
        if not _onednn_applies(hidden_states):
            return F.linear(hidden_states, self.weight.to(hidden_states))
        return torch.ops.mkldnn._linear_pointwise(hidden_states.contiguous(), self.packed_weight, None, "none", [], "")

    def __deepcopy__(self, memo):
        if self.is_packed:  # (an opaque oneDNN tensor has no storage to copy): pack a dense copy
            clone = PackedOneDNNLinear.packing(self).train(self.training)
        else:
            clone = object.__new__(type(self))
            clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        memo[id(self)] = clone
        return clone

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_packed:
            destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        key = prefix + "weight"
        if not self.is_packed:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        elif key not in state_dict:
            missing.append(key)
        elif tuple(state_dict[key].shape) != (self.out_features, self.in_features):
            errors.append(
                f"size mismatch for {key}: copying a param with shape {tuple(state_dict[key].shape)} from checkpoint, "
                f"the shape in current model is {(self.out_features, self.in_features)}."
            )
        else:
            self._buffers["packed_weight"] = _packed(state_dict[key].to(torch.float32))

    def _apply(self, fn, recurse=True):
        if self.is_packed:
            probe = fn(torch.empty(0))
            if probe.device.type == "cpu" and probe.dtype == torch.float32:
                return self  # nothing to convert
            self.unpack()
        return super()._apply(fn, recurse)

    def unpack(self) -> None:
        """Turns the packed weight back into a dense `weight` parameter (then this is a plain linear layer)."""
        self.weight = nn.Parameter(self._buffers.pop("packed_weight").to_dense())


def packed_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights of `model` held in oneDNN's packed layout (not among its parameters)."""
    return [m.packed_weight for m in model.modules() if isinstance(m, PackedOneDNNLinear) and m.is_packed]


def _packed(weight: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


def _is_plain_linear(module: nn.Module) -> bool:
    """A bias-free linear layer of this module's kinds with an ordinary float weight (not quantized)."""
    if type(module) not in (nn.Linear, OneDNNLinear, PackedOneDNNLinear) or module.bias is not None:
        return False
    return (isinstance(module, PackedOneDNNLinear) and module.is_packed) or type(module.weight.data) is torch.Tensor


def auto_cpu_gemm(model: nn.Module) -> str | None:
    """The layout "auto" stands for on `model` as it is now: "onednn-packed" for a float32 model on the CPU of a
    machine without an accelerator and with oneDNN, else None (leave it as it is)."""
    suitable = (
        onednn_available()
        and not accelerator_available()
        and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
        and all(_is_plain_linear(module) for module in model.modules() if isinstance(module, nn.Linear))
        and not model.training
    )
    return "onednn-packed" if suitable else None


def use_cpu_gemm(model: nn.Module, gemm: str = "auto") -> None:
    """Lays out the decoder's projections for float32 decoding on CPU with `gemm` (see the module docstring).

    Args:
        model ([`ARPGForImageGeneration`]): changed in place; its projections are fused first.
        gemm (`str`, *optional*, defaults to `"auto"`): one of "auto", "default", "blas", "onednn", "onednn-packed".
            Without oneDNN in the torch build, the oneDNN choices behave as "default".
    """
    if gemm not in CPU_GEMMS:
        raise ValueError(f"gemm must be one of {CPU_GEMMS}, got {gemm!r}.")
    if any(parameter.device.type == "meta" for parameter in model.parameters()):
        return  # offloaded weights (accelerate hooks) are materialised per call: leave their layout alone
    if gemm == "auto":
        gemm = auto_cpu_gemm(model)
        if gemm is None:
            return
    if not all(_is_plain_linear(module) for module in model.modules() if isinstance(module, nn.Linear)):
        raise ValueError(
            "use_cpu_gemm lays out float weights; this model has linear layers with quantized (torchao) or otherwise "
            "special weights. Load the float model to choose a CPU layout."
        )
    for module in model.modules():  # fusing reads the weights: unpack first, one module at a time
        if isinstance(module, PackedOneDNNLinear) and module.is_packed:
            module.unpack()
    model.fuse_projections()
    kind = {"onednn": OneDNNLinear, "onednn-packed": PackedOneDNNLinear}.get(gemm, nn.Linear)
    if not onednn_available():
        kind = nn.Linear
    parents = [module for module in model.modules() if not isinstance(module, nn.Linear)]
    for parent in parents:  # (no list of the linear layers: each old weight is freed once replaced)
        for name in [name for name, child in parent.named_children() if isinstance(child, nn.Linear)]:
            linear = getattr(parent, name)
            setattr(parent, name, _relaid(linear, kind, transposed=gemm == "blas").train(linear.training))


def _relaid(linear: nn.Linear, kind: type, transposed: bool) -> nn.Linear:
    """A `kind` module holding `linear`'s weight (stored transposed or contiguous, or packed)."""
    if kind is PackedOneDNNLinear:
        return PackedOneDNNLinear.packing(linear)
    weight = linear.weight
    if weight.is_contiguous() == transposed:  # re-store: (out, in) values over (in, out) storage, or back
        with torch.no_grad():
            stored = weight.t().contiguous().t() if transposed else weight.contiguous()
        weight = nn.Parameter(stored, requires_grad=weight.requires_grad)
    module = (
        linear if type(linear) is kind else kind(linear.in_features, linear.out_features, bias=False, device="meta")
    )
    module.weight = weight
    return module
