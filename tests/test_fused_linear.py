"""The decoding layouts of the weights (fused by columns or rows, packed copies) and the RoPE table: values, saving and
training are unaffected, decoding agrees with the default layout, and the layout falls back cleanly when undone."""

import pytest
import torch

from arpg_hf import ARPGForImageGeneration
from arpg_hf.fused_linear import (
    fuse_linears, fused_linear_outputs, fused_rows, fused_weight, onednn_packing_available, pack_linears,
    packed_weight, unfuse_linears,
)  # fmt: skip
from arpg_hf.rotary_2d import ARPGRotaryEmbedding2D

from .conftest import randomize_, tiny_config


@pytest.fixture()
def model():
    return randomize_(ARPGForImageGeneration(tiny_config()).eval(), seed=3)


def decode_two_steps(model, class_ids, orders, tokens):
    cache = model.allocate_cache(class_ids.shape[0])
    first = model.decode_step(class_ids[:, None], torch.full_like(class_ids[:, None], -1), orders[:, :3], cache)
    second = model.decode_step(tokens.gather(1, orders[:, :3]), orders[:, :3], orders[:, 3:9], cache)
    return torch.cat([first, second], dim=1)  # (B, 9, V)


def owns_storage(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def called_operators(function) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        function()
    return {event.name for event in profiler.events()}


@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_fused_linear_outputs_match_separate_linears(layout):
    """Both layouts keep the values; "columns" stores W^T for BLAS, "rows" keeps every weight in its checkpoint
    layout (contiguous) and runs oneDNN's linear."""
    torch.manual_seed(0)
    linears = [torch.nn.Linear(16, n, bias=False) for n in (16, 24, 8)]
    x = torch.randn(2, 5, 16)
    expected = [linear(x) for linear in linears]
    values = [linear.weight.detach().clone() for linear in linears]
    fuse_linears(*linears, layout=layout)
    matrix, other = (fused_weight, fused_rows) if layout == "columns" else (fused_rows, fused_weight)
    matrix, other = matrix(*linears), other(*linears)
    assert matrix is not None and other is None and matrix.is_contiguous()
    assert matrix.shape == ((16, 48) if layout == "columns" else (48, 16))
    assert all(not owns_storage(linear.weight) for linear in linears)
    assert all(linear.weight.is_contiguous() == (layout == "rows") for linear in linears)
    assert all(torch.equal(linear.weight, value) for linear, value in zip(linears, values))
    with torch.no_grad():
        outputs = fused_linear_outputs(x, *linears)
        operators = called_operators(lambda: fused_linear_outputs(x, *linears))
    for output, reference in zip(outputs, expected):
        torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-6)
    if onednn_packing_available():
        assert ("mkldnn::_linear_pointwise" in operators) == (layout == "rows")
    fuse_linears(*linears, layout="rows" if layout == "columns" else "columns")  # re-laid, values kept
    assert all(torch.equal(linear.weight, value) for linear, value in zip(linears, values))
    unfuse_linears(*linears)
    assert fused_weight(*linears) is None and fused_rows(*linears) is None
    assert all(owns_storage(linear.weight) for linear in linears)
    assert all(torch.equal(linear.weight, value) for linear, value in zip(linears, values))


def test_plain_contiguous_weights_are_not_mistaken_for_the_row_layout():
    linear = torch.nn.Linear(8, 4, bias=False)
    assert fused_rows(linear) is None  # contiguous, but never fused
    with pytest.raises(ValueError, match="layout must be one of"):
        fuse_linears(linear, layout="diagonal")


def test_fused_linear_rejects_biases():
    with pytest.raises(ValueError, match="bias-free"):
        fuse_linears(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))


def test_gradients_are_exact_with_fused_weights():
    """Training through fused views takes the per-linear path: every weight gets its own gradient."""
    torch.manual_seed(0)
    plain = [torch.nn.Linear(8, 8, bias=False) for _ in range(3)]
    fused = [torch.nn.Linear(8, 8, bias=False) for _ in range(3)]
    for a, b in zip(plain, fused):
        b.weight.data.copy_(a.weight.data)
    fuse_linears(*fused)
    x = torch.randn(4, 8)
    for group in (plain, fused):
        sum(output.square().sum() for output in fused_linear_outputs(x, *group)).backward()
    for a, b in zip(plain, fused):
        torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-6, atol=1e-6)  # only BLAS rounding differs


@pytest.mark.parametrize("cpu_gemm", ["blas", "onednn", "onednn-packed"])
def test_fuse_projections_keeps_state_dict_and_training_forward(model, tmp_path, cpu_gemm):
    tokens = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(1))
    labels, orders = torch.tensor([0, 2, 4]), torch.stack([torch.randperm(16) for _ in range(3)])
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    loss = model(tokens, labels, orders=orders).loss
    with torch.inference_mode():  # fusing under inference mode must leave ordinary (trainable) parameters
        model.fuse_projections(cpu_gemm=cpu_gemm)
    assert model.projections_fused
    assert not any(parameter.is_inference() for parameter in model.parameters())
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    assert torch.equal(model(tokens, labels, orders=orders).loss, loss)

    model.save_pretrained(tmp_path)  # tensors of their own in the checkpoint layout
    reloaded = ARPGForImageGeneration.from_pretrained(tmp_path)
    assert reloaded.state_dict().keys() == state.keys()
    assert all(torch.equal(state[name], tensor) for name, tensor in reloaded.state_dict().items())

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(tokens, labels, orders=orders).loss.backward()
    optimizer.step()  # in-place updates keep the layout
    assert model.projections_fused
    model.unfuse_projections()
    assert not model.projections_fused and all(owns_storage(p) for p in model.parameters())


@pytest.mark.parametrize("cpu_gemm", ["blas", "onednn"])
def test_fused_decoding_agrees_with_default_layout_and_falls_back(model, cpu_gemm):
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 32, (2, 16), generator=generator)
    class_ids = model.class_token_ids(torch.tensor([1, -1]))
    orders = torch.stack([torch.randperm(16, generator=generator) for _ in range(2)])
    with torch.no_grad():
        reference = decode_two_steps(model, class_ids, orders, tokens)
        model.fuse_projections(cpu_gemm=cpu_gemm)
        fused = decode_two_steps(model, class_ids, orders, tokens)
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
        model.to(torch.float64)  # re-materialises every weight: the plain path is used again
        assert not model.projections_fused
        torch.testing.assert_close(decode_two_steps(model, class_ids, orders, tokens).float(), reference,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.skipif(not onednn_packing_available(), reason="the packed layout needs oneDNN")
def test_cpu_packed_weights_decode_the_same_and_go_stale_when_weights_change(model):
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 32, (2, 16), generator=generator)
    class_ids = model.class_token_ids(torch.tensor([3, -1]))
    orders = torch.stack([torch.randperm(16, generator=generator) for _ in range(2)])
    groups = model._projection_groups()
    with torch.no_grad():
        reference = decode_two_steps(model, class_ids, orders, tokens)
        model.fuse_projections(cpu_gemm="onednn-packed")
        assert all(packed_weight(fused_weight(*group), *group) is not None for group in groups)
        torch.testing.assert_close(decode_two_steps(model, class_ids, orders, tokens), reference, rtol=1e-5, atol=1e-5)
        # An in-place update (an optimizer step) makes the copy stale: it is dropped and the new values are used.
        model.lm_head.weight.mul_(2.0)
        assert packed_weight(fused_weight(model.lm_head), model.lm_head) is None
        doubled = decode_two_steps(model, class_ids, orders, tokens)
        torch.testing.assert_close(doubled, 2 * reference, rtol=1e-5, atol=1e-5)
        model.fuse_projections(cpu_gemm="blas")  # another choice drops the copies
        assert all("_onednn_packed_weight" not in group[0].__dict__ for group in groups)
        model.fuse_projections(cpu_gemm="onednn-packed")
        model.unfuse_projections()
        assert all("_onednn_packed_weight" not in group[0].__dict__ for group in groups)


def test_fuse_projections_remembers_the_cpu_gemm_and_checks_it(model):
    with pytest.raises(ValueError, match="cpu_gemm must be one of"):
        model.fuse_projections(cpu_gemm="mkl")
    groups = model._projection_groups()
    model.fuse_projections(cpu_gemm="onednn")
    model.fuse_projections()  # what the pipelines call before decoding: keeps the choice
    assert all(fused_rows(*group) is not None for group in groups)
    model.unfuse_projections()
    model.fuse_projections()  # the choice survives unfusing (compiled decoding unfuses)
    assert model._cpu_gemm == "onednn" and all(fused_rows(*group) is not None for group in groups)
    assert ARPGForImageGeneration(model.config)._cpu_gemm == "blas"  # a new model starts at the default


def test_packing_needs_fused_float32_cpu_weights():
    linear = torch.nn.Linear(8, 4, bias=False)
    with pytest.raises(ValueError, match="Fuse the linears"):
        pack_linears(linear)
    fuse_linears(linear.double())
    assert pack_linears(linear) is False  # float64: nothing packed, the plain fused GEMM stays


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
