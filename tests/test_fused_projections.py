"""Projection fusion (real fused modules, checkpoint-layout state dicts) and the opt-in CPU GEMM layouts."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from arpg_hf.cpu_gemm import (
    CPU_GEMMS,
    OneDNNLinear,
    PackedOneDNNLinear,
    auto_cpu_gemm,
    onednn_available,
    use_cpu_gemm,
)
from arpg_hf.rotary_2d import CLASS_POSITION, ARPGRotaryEmbedding2D

from .conftest import get_dummy_transformer


@pytest.fixture
def model():
    return get_dummy_transformer(seed=3, absolute_position_embeddings=True)


def decoding_logits(model):
    """Two decoding steps through the cache (the path the pipelines take), float32 logits."""
    cache = model.allocate_cache(2)
    inputs, positions = model.class_token_ids(torch.tensor([1, -1]))[:, None], torch.full((2, 1), CLASS_POSITION)
    queries = torch.tensor([[3, 7, 1], [3, 7, 1]])
    with torch.no_grad():
        first = model(inputs, input_position_ids=positions, query_position_ids=queries, past_key_values=cache).logits
        second = model(
            torch.tensor([[4, 5, 6]] * 2),
            input_position_ids=queries,
            query_position_ids=torch.tensor([[0, 2]] * 2),
            past_key_values=cache,
        ).logits
    return torch.cat([first, second], dim=1)


def test_fusion_swaps_in_real_modules_and_keeps_the_checkpoint_layout(model, tmp_path):
    expected = decoding_logits(model)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.fuse_projections()
    attention = model.model.self_layers[0].self_attn
    assert (
        isinstance(attention.qkv_proj, nn.Linear) and attention.q_proj is None and attention.qkv_proj.out_features == 96
    )
    assert isinstance(model.model.kv_proj, nn.Linear) and model.model.k_proj is None
    assert isinstance(model.model.cross_layers[0].mlp.gate_up_proj, nn.Linear)
    torch.testing.assert_close(decoding_logits(model), expected, atol=1e-5, rtol=0)
    fused_state = model.state_dict()
    assert sorted(fused_state) == sorted(state)
    assert all(torch.equal(fused_state[name], state[name]) for name in state)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == sorted(state) and all(torch.equal(saved[name], state[name]) for name in state)
    # a fused model loads checkpoint-layout state dicts; unfusing brings the separate modules back
    model.load_state_dict({name: torch.zeros_like(tensor) for name, tensor in state.items()})
    assert not model.model.kv_proj.weight.any()
    model.load_state_dict(state)
    model.unfuse_projections()
    assert attention.qkv_proj is None and isinstance(attention.q_proj, nn.Linear)
    torch.testing.assert_close(decoding_logits(model), expected, atol=1e-5, rtol=0)
    assert all(torch.equal(model.state_dict()[name], state[name]) for name in state)


def test_fused_training_forward_has_the_same_loss_and_gradients(model):
    tokens, labels = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0)), torch.tensor([0, 3])
    orders = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    loss = model(tokens, labels, orders=orders).loss
    loss.backward()
    grads = torch.cat([p.grad[:1] for p in (model.model.k_proj.weight, model.model.v_proj.weight)])
    model.zero_grad()
    model.fuse_projections()
    fused_loss = model(tokens, labels, orders=orders).loss
    fused_loss.backward()
    torch.testing.assert_close(fused_loss, loss, atol=1e-6, rtol=0)
    fused_grad = model.model.kv_proj.weight.grad
    torch.testing.assert_close(torch.cat([fused_grad[:1], fused_grad[32:33]]), grads, atol=1e-6, rtol=0)


@pytest.mark.parametrize("gemm", CPU_GEMMS)
def test_cpu_gemm_layouts_decode_alike_and_keep_the_parameters(model, gemm):
    expected = decoding_logits(model)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    chosen = gemm
    if gemm == "auto":  # packed on a CPU-only machine with oneDNN (the model is float32, on the CPU, in eval mode)
        chosen = auto_cpu_gemm(model) or "unchanged"
    use_cpu_gemm(model, gemm)
    gemm = chosen
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    kind = {"onednn": OneDNNLinear, "onednn-packed": PackedOneDNNLinear}.get(gemm, nn.Linear)
    assert all(type(m) is (kind if onednn_available() else nn.Linear) for m in linears)
    assert all(m.weight.is_contiguous() != (gemm == "blas") for m in linears)
    assert (model.model.self_layers[0].self_attn.qkv_proj is not None) == (gemm != "unchanged")  # fused first
    torch.testing.assert_close(decoding_logits(model), expected, atol=1e-5, rtol=0)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in state.items())
    use_cpu_gemm(model, "default")
    assert all(type(m) is nn.Linear and m.weight.is_contiguous() for m in model.modules() if isinstance(m, nn.Linear))
    with pytest.raises(ValueError, match="gemm must be one of"):
        use_cpu_gemm(model, "mkl")


@pytest.mark.parametrize("position_mode", ["extrapolate", "interpolate"])
def test_rope_table_equals_the_formula(position_mode):
    rotary = ARPGRotaryEmbedding2D(head_dim=16, grid_size=(4, 4))
    height, width = 6, 10
    positions = torch.tensor([[-1, 0, 5, 59, 37]])
    cos, sin = rotary(positions, (height, width), position_mode)
    rows, cols = (positions.clamp(min=0) // width).float(), (positions.clamp(min=0) % width).float()
    if position_mode == "interpolate":
        rows, cols = rows * (4 / height), cols * (4 / width)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    angles = torch.cat([rows[..., None] * inv_freq, cols[..., None] * inv_freq], dim=-1)
    assert torch.equal(cos[:, 1:], torch.cos(angles)[:, 1:]) and torch.equal(sin[:, 1:], torch.sin(angles)[:, 1:])
    assert not cos[:, 0].any() and not sin[:, 0].any()  # the class slot does not rotate: its q and k vanish
    assert len(rotary._tables) == 1
    rotary(positions, (height, width), position_mode)
    assert len(rotary._tables) == 1  # computed once per canvas
