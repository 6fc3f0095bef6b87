"""Quantized inference of the decoder: [`quantize_decoder`] (`ARPGForImageGeneration.quantize`), outside the model.

The standard route, `ARPGPipeline.from_pretrained(..., quantization_config=...)` with torchao through diffusers'
`PipelineQuantizationConfig` or transformers' `TorchAoConfig`, works on every device. On CPUs torchao's int8 layers
run the few rows of a decoding step slower than float32 (its kernels pay off from about 64 rows per matrix product;
docs/performance.md has the measurements), so `quantize_decoder` uses torch's own CPU kernels there, on the same
modules, and torchao's configurations elsewhere:

- "int8": int8 weights (symmetric, per output channel) and int8 activations quantized at each call (per tensor, 7-bit
  range so that AVX2 CPUs without VNNI cannot saturate); int32 accumulation, float32 output. CPU: fbgemm's dynamic
  quantized linear kernel. Elsewhere: torchao's `Int8DynamicActivationInt8WeightConfig`.
- "int8-weight-only": int8 weights per output channel; the matrix product dequantizes them (CPU: bfloat16
  activations in, float32 accumulation; elsewhere torchao's `Int8WeightOnlyConfig`).
- "int4-weight-only": 4-bit weights, asymmetric, in groups of 128 inputs (CPU: bfloat16 activations in, float32
  accumulation; elsewhere torchao's `Int4WeightOnlyConfig`).

Every linear layer of the decoder blocks is quantized; the output head (whose logits feed the softmax), the
embeddings, the norms and RoPE stay in float32. The projections are fused first. A quantized model is for inference:
it cannot be trained or saved (save the float model, quantize after loading).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .cpu_gemm import use_cpu_gemm
from .fused_projections import FusedProjections
from .optional_dependencies import require

QUANTIZATIONS = ("none", "int8", "int8-weight-only", "int4-weight-only")
INT4_GROUP_SIZE = 128
NOT_QUANTIZED = ("lm_head",)  # the output head: its logits feed the softmax


class QuantizedLinear(nn.Module):
    """A bias-free linear layer for CPU inference whose weight lives only in a quantized, kernel-specific form."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.device.type != "cpu":
            raise RuntimeError(
                f"{type(self).__name__} runs on the CPU only; quantize after moving the model to {hidden_states.device}"
                " (quantize() then uses torchao there)."
            )
        if torch.is_grad_enabled() and self.training:
            raise RuntimeError("A quantized model cannot be trained; train the float model and quantize afterwards.")
        rows = hidden_states.reshape(-1, self.in_features)
        return self.matmul(rows).reshape(*hidden_states.shape[:-1], self.out_features).to(hidden_states.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        raise RuntimeError(
            "A quantized ARPG decoder cannot be saved or give a state dict: save the float model, and quantize it "
            "after loading (pipe.transformer.quantize(...) or quantization_config=...)."
        )


def int8_scales(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 scales, one per output channel (row) of `weight`: its largest magnitude / 127."""
    return (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)


class Int8DynamicLinear(QuantizedLinear):
    """int8 weights per output channel, activations quantized at each call; fbgemm's dynamic quantized linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach().float()
        scales = int8_scales(weight).double()
        with warnings.catch_warnings():  # torch marks its quantized tensor types as deprecated (see module docstring)
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(
                weight, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8
            )
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(rows.float().contiguous(), self.packed, True)


class Int8WeightOnlyLinear(QuantizedLinear):
    """int8 weights per output channel, dequantized inside torch's int8 weight-only CPU kernel."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach().float()
        scales = int8_scales(weight)
        self.register_buffer("qweight", (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8), False)
        self.register_buffer("scales", scales.to(torch.bfloat16), persistent=False)

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16), self.qweight, self.scales).float()


class Int4WeightOnlyLinear(QuantizedLinear):
    """4-bit weights in groups of `INT4_GROUP_SIZE` inputs (64 or 32 where that does not divide the inputs; asymmetric:
    a scale and an offset per group), dequantized inside torch's int4 CPU kernel."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        sizes = [size for size in (INT4_GROUP_SIZE, 64, 32) if self.in_features % size == 0]
        if not sizes:
            raise ValueError(f"int4 needs in_features divisible by 32, got {self.in_features}.")
        self.group_size = sizes[0]
        groups = linear.weight.detach().float().reshape(self.out_features, -1, self.group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        levels = ((groups - low[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.int32)
        # the kernel computes (level - 8) * scale + zero: zero = low + 8 * scale; layout (groups, out, 2)
        scales_and_zeros = torch.stack([scales.t(), (low + 8 * scales).t()], dim=-1).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.reshape(self.out_features, -1), 2)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16), persistent=False)

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows.to(torch.bfloat16), self.packed_weight, self.group_size, self.scales_and_zeros
        ).float()


CPU_KERNELS = {
    "int8": Int8DynamicLinear,
    "int8-weight-only": Int8WeightOnlyLinear,
    "int4-weight-only": Int4WeightOnlyLinear,
}


def torchao_config(method: str):
    """torchao's configuration for `method` (for `quantize_`, or transformers' `TorchAoConfig(...)`)."""
    quantization = require("torchao.quantization", "quantization", f"quantize({method!r}) off the CPU", "torchao")
    if method == "int4-weight-only":
        return quantization.Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE)
    names = {"int8": "Int8DynamicActivationInt8WeightConfig", "int8-weight-only": "Int8WeightOnlyConfig"}
    return getattr(quantization, names[method])()


def quantize_decoder(model: nn.Module, method: str = "int8") -> None:
    """Quantizes the linear layers of `model`'s decoder blocks in place with `method` (see the module docstring);
    the head, embeddings, norms and RoPE stay float32. On the CPU the head keeps the fast float32 layout of
    [`~arpg_hf.use_cpu_gemm`] ("auto").

    Args:
        model ([`ARPGForImageGeneration`]): weights on one device; float32 on the CPU.
        method (`str`, *optional*, defaults to `"int8"`): one of "none", "int8", "int8-weight-only", "int4-weight-only".
    """
    if method not in QUANTIZATIONS:
        raise ValueError(f"method must be one of {QUANTIZATIONS}, got {method!r}.")
    if method == "none":
        return
    parameters = list(model.parameters())
    devices = {parameter.device.type for parameter in parameters}
    dtypes = {parameter.dtype for parameter in parameters}
    if len(devices) != 1 or "meta" in devices or (devices == {"cpu"} and dtypes != {torch.float32}):
        raise ValueError(
            f"quantize({method!r}) needs the model's weights on one device (float32 on the CPU), got "
            f"{sorted(str(dtype) for dtype in dtypes)} on {sorted(devices)}; load it with dtype=torch.float32 and "
            "without offloading."
        )
    if is_quantized(model):
        raise ValueError("The model is already quantized; load the float model again to quantize it differently.")
    del parameters
    use_cpu_gemm(model, "default")  # fused projections, plain dense weights (packed ones unpacked)
    if devices == {"cpu"}:
        quantize_linears(model, method)
        use_cpu_gemm(model, "auto")  # the head
        return
    config = torchao_config(method)
    from torchao.quantization import quantize_

    quantize_(model, config, filter_fn=_is_decoder_linear)


def quantize_linears(module: nn.Module, method: str) -> nn.Module:
    """Replaces the float32 CPU linear layers inside `module` (but the head) by `method`'s CPU kernel, one at a time
    (each float weight is freed once replaced), after fusing its projections; returns `module`. It is the step
    [`quantize_decoder`] takes on the CPU, and works on one decoder layer too (to build a quantized model layer by
    layer without ever holding all its float weights)."""
    kernel = CPU_KERNELS[method]
    for part in module.modules():
        if isinstance(part, FusedProjections):
            part.fuse_projections()
    parents = [part for part in module.modules() if not isinstance(part, nn.Linear)]
    for parent in parents:
        for name in [name for name, child in parent.named_children() if isinstance(child, nn.Linear)]:
            if name not in NOT_QUANTIZED:
                setattr(parent, name, kernel(getattr(parent, name)))
    return module


def _is_decoder_linear(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in NOT_QUANTIZED


def is_quantized(model: nn.Module) -> bool:
    """Whether [`quantize_decoder`] or torchao quantized some of `model`'s linear layers."""
    return any(
        isinstance(module, QuantizedLinear)
        or (isinstance(module, nn.Linear) and type(getattr(module, "weight", None)).__module__.startswith("torchao"))
        for module in model.modules()
    )
