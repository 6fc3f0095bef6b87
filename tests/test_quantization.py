"""Quantized inference (arpg_hf.quantization) and the CPU layout `from_pretrained` chooses (arpg_hf.cpu_gemm "auto")."""

import copy
import os

import pytest
import torch
from torch import nn

from arpg_hf import ARPGPipeline
from arpg_hf.cpu_gemm import PackedOneDNNLinear, accelerator_available, onednn_available, packed_weights, use_cpu_gemm
from arpg_hf.quantization import (
    CPU_KERNELS,
    QUANTIZATIONS,
    QuantizedLinear,
    is_quantized,
    quantize_decoder,
    quantize_linears,
)

from .conftest import get_dummy_pipeline, get_dummy_transformer

PACKS_BY_DEFAULT = onednn_available() and not accelerator_available()
TOKENS = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 3, 4])
ORDERS = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(3)])


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(TOKENS, class_labels=LABELS, orders=ORDERS).logits


def sample(pipe, seed=0) -> torch.Tensor:
    return pipe(
        torch.tensor([0, 1, 2, 3]),
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    ).images


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    get_dummy_pipeline(seed=5).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def plain(saved_folder):
    pipe = ARPGPipeline.from_pretrained(saved_folder, cpu_gemm="default")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load(saved_folder, **kwargs):
    pipe = ARPGPipeline.from_pretrained(saved_folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------ the default layout at load time
def test_from_pretrained_packs_the_weights_in_place_on_a_cpu_only_machine(saved_folder, plain):
    pipe = load(saved_folder)
    linears = [m for m in pipe.transformer.modules() if isinstance(m, nn.Linear)]
    assert all(type(m) is (PackedOneDNNLinear if PACKS_BY_DEFAULT else nn.Linear) for m in linears)
    assert all(type(m) is nn.Linear for m in plain.transformer.modules() if isinstance(m, nn.Linear))
    if PACKS_BY_DEFAULT:  # the packed weights replace the parameters: no second copy
        assert not any(name.endswith("proj.weight") for name, _ in pipe.transformer.named_parameters())
        packed = sum(weight.numel() for weight in packed_weights(pipe.transformer))
        assert pipe.transformer.num_parameters() + packed == plain.transformer.num_parameters()
    torch.testing.assert_close(logits(pipe.transformer), logits(plain.transformer), atol=1e-5, rtol=0)
    assert torch.equal(sample(pipe), sample(plain))
    state, expected = pipe.transformer.state_dict(), plain.transformer.state_dict()
    assert sorted(state) == sorted(expected) and all(torch.equal(state[key], expected[key]) for key in expected)


@pytest.mark.skipif(not PACKS_BY_DEFAULT, reason="the default layout packs only on a CPU-only machine with oneDNN")
def test_packed_weights_save_load_move_and_refuse_training(saved_folder, plain, tmp_path):
    pipe = load(saved_folder)
    pipe.save_pretrained(tmp_path / "again")  # the dense weights, and the full parameter count in the card
    again = load(tmp_path / "again", cpu_gemm="default")
    assert all(
        torch.equal(a, b)
        for a, b in zip(again.transformer.state_dict().values(), plain.transformer.state_dict().values())
    )
    head = pipe.transformer.lm_head
    assert torch.equal(head.weight, plain.transformer.lm_head.weight)  # a dense copy of the packed weight
    # loading a state dict re-packs
    model = pipe.transformer
    model.load_state_dict({key: torch.zeros_like(value) for key, value in plain.transformer.state_dict().items()})
    assert not logits(model).any()
    model.load_state_dict(plain.transformer.state_dict())
    torch.testing.assert_close(logits(model), logits(plain.transformer), atol=1e-5, rtol=0)
    # another dtype or device turns the weights back into parameters; the CPU in float32 keeps them packed
    model.to("cpu", torch.float32)
    assert head.is_packed
    doubled = copy.deepcopy(model).to(torch.float64)
    assert all(
        type(m.weight) is nn.Parameter and m.weight.dtype == torch.float64
        for m in doubled.modules()
        if isinstance(m, nn.Linear)
    )
    # it cannot be trained as it is; use_cpu_gemm(model, "default") gives back trainable parameters
    model.train()
    with pytest.raises(RuntimeError, match="use_cpu_gemm"):
        model(TOKENS, class_labels=LABELS, orders=ORDERS)
    use_cpu_gemm(model, "default")
    model(TOKENS, class_labels=LABELS, orders=ORDERS).loss.backward()
    assert model.lm_head.weight.grad is not None and type(model.lm_head) is nn.Linear
    model.eval()


def test_cpu_gemm_none_leaves_the_model_as_loaded(saved_folder):
    model = load(saved_folder, cpu_gemm=None).transformer
    attention = model.model.self_layers[0].self_attn
    assert attention.qkv_proj is None and type(attention.q_proj) is nn.Linear and not packed_weights(model)


def test_compiled_decoding_unpacks_first(saved_folder):
    pipe = load(saved_folder)
    pipe.enable_compiled_decoding()
    assert not packed_weights(pipe.transformer)


# ------------------------------------------------------------------------------------------ quantize()
# Bounds on the teacher-forced logits against float32: relative error and share of equal argmax. The tiny random
# model amplifies the error of each layer (measured at seed 2: 0.061 / 0.022 / 0.29 and 92 / 100 / 77 %).
TOLERANCE = {"int8": (0.12, 0.85), "int8-weight-only": (0.05, 0.95), "int4-weight-only": (0.4, 0.7)}


@pytest.mark.parametrize("method", sorted(CPU_KERNELS))
def test_quantize_replaces_the_decoder_layers_and_stays_close_to_float32(method):
    model = get_dummy_transformer(seed=2)
    expected = logits(model)
    model.quantize(method)
    kinds = {type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))}
    assert CPU_KERNELS[method] in kinds and is_quantized(model)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.dtype == torch.float32  # the head stays
    assert not any(isinstance(m, nn.Linear) for name, m in model.model.named_modules())  # every decoder layer
    result = logits(model)
    error = ((result - expected).norm() / expected.norm()).item()
    largest_error, least_agreement = TOLERANCE[method]
    assert 0 < error < largest_error, error
    assert (result.argmax(-1) == expected.argmax(-1)).float().mean() >= least_agreement


@pytest.mark.parametrize("method", sorted(CPU_KERNELS))
def test_quantized_pipeline_samples_deterministically(saved_folder, plain, method):
    pipe = load(saved_folder)
    pipe.transformer.quantize(method)
    tokens = sample(pipe)
    assert tokens.shape == sample(plain).shape and torch.equal(tokens, sample(pipe))
    assert 0 <= tokens.min() and tokens.max() < pipe.transformer.config.vocab_size


def test_layer_by_layer_quantization_equals_quantizing_the_model():
    whole, layered = get_dummy_transformer(seed=4), get_dummy_transformer(seed=4)
    whole.quantize("int8")
    for layer in [*layered.model.self_layers, *layered.model.cross_layers]:
        quantize_linears(layer, "int8")
    quantize_linears(layered, "int8")
    assert torch.equal(logits(whole), logits(layered))


def test_quantize_errors_are_clear(tmp_path):
    model = get_dummy_transformer()
    with pytest.raises(ValueError, match="method must be one of"):
        model.quantize("int3")
    with pytest.raises(ValueError, match="float32 on the CPU"):
        get_dummy_transformer().to(torch.bfloat16).quantize("int8")
    quantize_decoder(model, "none")
    assert not is_quantized(model)
    model.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize("int8")
    with pytest.raises(RuntimeError, match="cannot be saved"):
        model.state_dict()
    with pytest.raises(RuntimeError, match="cannot be saved"):
        model.save_pretrained(tmp_path / "q")
    model.train()
    with pytest.raises(RuntimeError, match="cannot be trained"):
        model(TOKENS, class_labels=LABELS, orders=ORDERS)
    assert QUANTIZATIONS == ("none", *sorted(CPU_KERNELS, key=list(QUANTIZATIONS).index))


# ------------------------------------------------------------------------------ the standard APIs (torchao)
def require_torchao():
    try:
        import torchao  # noqa: F401
    except ImportError:
        if os.environ.get("ARPG_HF_REQUIRE_TORCHAO"):  # .ci/run installs torchao and sets it for this file
            raise
        pytest.skip("torchao is not installed (pip install torchao; CI runs this with it)")


@pytest.mark.parametrize("wrap", ["PipelineQuantizationConfig", "TorchAoConfig"])
def test_from_pretrained_takes_torchao_configs_for_the_transformer(saved_folder, plain, wrap):
    require_torchao()
    from diffusers import PipelineQuantizationConfig
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    config = TorchAoConfig(Int8WeightOnlyConfig())
    if wrap == "PipelineQuantizationConfig":
        config = PipelineQuantizationConfig(quant_mapping={"transformer": config})
    pipe = load(saved_folder, quantization_config=config)
    model = pipe.transformer
    assert is_quantized(model)
    weight = model.model.self_layers[0].self_attn.q_proj.weight
    assert type(weight).__module__.startswith("torchao")
    assert not type(model.lm_head.weight).__module__.startswith("torchao")  # the head stays float32
    error = ((logits(model) - logits(plain.transformer)).norm() / logits(plain.transformer).norm()).item()
    assert 0 < error < 0.05
    assert torch.equal(sample(pipe), sample(pipe))
