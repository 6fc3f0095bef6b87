"""VQ tokenizer training: codebook / commitment losses by hand, straight-through gradients, learning on a tiny batch."""

import math

import pytest
import torch
import torch.nn.functional as F

from arpg_hf import ARPGVQModel
from arpg_hf.vq_training import (
    codebook_perplexity,
    codebook_rows,
    codebook_usage,
    init_codebook_from_latents,
    psnr,
    quantize_with_losses,
    register_codebook_normalization,
    remove_codebook_normalization,
    restart_dead_codes,
    vq_training_loss,
)

from .conftest import get_dummy_vq


def tiny_vq(**overrides) -> ARPGVQModel:
    """A tokenizer set up for training: free codebook rows that the model sees l2-normalised."""
    fields = dict(
        base_channels=8,
        channel_multipliers=(1, 2),
        layers_per_block=1,
        z_channels=8,
        codebook_size=16,
        codebook_embed_dim=4,
        norm_num_groups=4,
    )
    fields.update(overrides)
    vq = get_dummy_vq(seed=0, **fields).train()
    register_codebook_normalization(vq)
    return vq


def two_code_vq() -> ARPGVQModel:
    vq = tiny_vq(codebook_size=2, codebook_embed_dim=2)
    with torch.no_grad():
        codebook_rows(vq).copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))  # seen normalised: e0 = (1, 0), e1 = (0, 1)
    return vq


def test_the_model_sees_the_free_rows_normalised_and_keeps_them_so():
    vq = two_code_vq()
    assert vq.quantize.embedding.weight.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert codebook_rows(vq).tolist() == [[2.0, 0.0], [0.0, 1.0]]
    assert "quantize.embedding.parametrizations.weight.original" in vq.state_dict()
    remove_codebook_normalization(vq)
    assert list(vq.state_dict()).count("quantize.embedding.weight") == 1
    assert vq.quantize.embedding.weight.tolist() == [[1.0, 0.0], [0.0, 1.0]] == codebook_rows(vq).tolist()


def test_losses_match_a_hand_computation():
    vq = two_code_vq()
    pre_quant = torch.tensor([3.0, 1.0]).reshape(1, 2, 1, 1)  # z = (3, 1) / sqrt(10): nearest code e0
    out = quantize_with_losses(vq, pre_quant, beta=0.25)
    assert out.indices.tolist() == [[[0]]]
    squared_distance = 2 - 6 / math.sqrt(10)  # |e0 - z|^2 = (1 - 3/sqrt10)^2 + (1/sqrt10)^2
    assert out.codebook_loss.item() == pytest.approx(squared_distance / 2, rel=1e-6)  # mean over D = 2 elements
    assert out.commitment_loss.item() == pytest.approx(0.25 * squared_distance / 2, rel=1e-6)
    torch.testing.assert_close(out.quantized.flatten(), torch.tensor([1.0, 0.0]))  # forward value: the code


def test_codebook_loss_moves_only_the_codebook_and_commitment_only_the_encoder():
    vq = two_code_vq()
    pre_quant = torch.tensor([3.0, 1.0]).reshape(1, 2, 1, 1).requires_grad_()
    out = quantize_with_losses(vq, pre_quant)
    out.codebook_loss.backward()
    assert pre_quant.grad is None or pre_quant.grad.abs().max() == 0
    rows = codebook_rows(vq)
    assert rows.grad[0].abs().max() > 0 and rows.grad[1].abs().max() == 0  # the chosen row
    rows.grad = None
    out = quantize_with_losses(vq, pre_quant)
    out.commitment_loss.backward()
    assert pre_quant.grad.abs().max() > 0
    assert rows.grad is None or rows.grad.abs().max() == 0


def test_straight_through_gradient_is_the_normalisation_gradient():
    vq = tiny_vq()
    pre_quant = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    upstream = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    out = quantize_with_losses(vq, pre_quant)
    torch.testing.assert_close(out.quantized, vq.quantize_latents(pre_quant.detach())[0])
    (out.quantized * upstream).sum().backward()
    expected = torch.autograd.grad((F.normalize(pre_quant, dim=1) * upstream).sum(), pre_quant)[0]
    torch.testing.assert_close(pre_quant.grad, expected)


def test_reconstruction_gradient_reaches_the_encoder():
    vq = tiny_vq()
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = vq_training_loss(vq, images)
    out.reconstruction_loss.backward()
    assert vq.encoder.conv_in.weight.grad.abs().max() > 0  # through the straight-through estimator
    assert vq.decoder.conv_out.weight.grad.abs().max() > 0
    assert out.loss.item() == pytest.approx((out.reconstruction_loss + out.codebook_loss + out.commitment_loss).item())
    assert out.reconstruction.shape == images.shape and out.indices.shape == (2, 4, 4)


def test_training_on_a_tiny_batch_reduces_the_loss():
    vq = tiny_vq()
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)).round() * 2 - 1
    with torch.no_grad():
        init_codebook_from_latents(vq, vq_training_loss(vq, images).latents, torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(vq.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = vq_training_loss(vq, images)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert vq_training_loss(vq, images, reconstruction="l1").reconstruction_loss.item() < 0.5


def test_decoder_only_loss_trains_the_decoder_side_on_the_tokens_of_inference():
    vq = get_dummy_vq(seed=0)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = vq_training_loss(vq, images, reconstruction="l1", decoder_only=True)
    assert torch.equal(out.indices, vq.encode(images).indices)
    assert out.codebook_loss.item() == out.commitment_loss.item() == 0.0
    assert torch.allclose(out.loss, F.l1_loss(vq.decode(vq.encode(images).latents).sample, images))
    out.loss.backward()
    with_gradient = {name for name, parameter in vq.named_parameters() if parameter.grad is not None}
    assert with_gradient and all(name.startswith(("decoder.", "post_quant_conv.")) for name in with_gradient)


def test_bad_arguments_are_value_errors():
    vq = tiny_vq()
    with pytest.raises(ValueError, match="reconstruction"):
        vq_training_loss(vq, torch.zeros(1, 3, 8, 8), reconstruction="l3")
    with pytest.raises(ValueError, match="beta"):
        quantize_with_losses(vq, torch.zeros(1, 4, 2, 2), beta=-1.0)


def test_codebook_upkeep():
    vq = tiny_vq(codebook_size=4, codebook_embed_dim=2)
    latents = torch.tensor([[[[1.0], [0.0]], [[0.0], [1.0]]]])  # (1, D=2, h=2, w=1): latents (1, 0) and (0, 1)
    rows = {tuple(r) for r in latents.permute(0, 2, 3, 1).reshape(-1, 2).tolist()}
    init_codebook_from_latents(vq, latents, torch.Generator().manual_seed(0))
    codebook = codebook_rows(vq)
    assert all(tuple(r) in rows for r in codebook.tolist())
    with torch.no_grad():
        codebook.fill_(5.0)
    usage = codebook_usage(torch.tensor([[0, 0, 2]]), 4)
    assert usage.tolist() == [2, 0, 1, 0]
    assert restart_dead_codes(vq, usage, latents, torch.Generator().manual_seed(0)) == 2
    assert codebook[0].tolist() == [5.0, 5.0] and codebook[2].tolist() == [5.0, 5.0]
    assert all(tuple(codebook[i].tolist()) in rows for i in (1, 3))
    assert codebook_perplexity(torch.tensor([5, 5, 0, 0])) == pytest.approx(2.0)


def test_psnr():
    images = torch.zeros(2, 3, 4, 4)
    error = torch.full_like(images, 0.1)  # 0.05 on the [0, 1] scale: MSE 0.0025
    torch.testing.assert_close(psnr(images + error, images), torch.full((2,), 10 * math.log10(400)))


def test_finetune_decoder_trains_the_decoder_alone_and_keeps_every_token(tmp_path):
    """`pipelines/train_tokenizer.py --finetune_decoder`: encoder and codebook frozen (the same tokens for every image),
    the decoder moves and reconstructs its training images better."""
    import os
    import subprocess
    import sys

    import numpy as np

    from arpg_hf import bundled_pipeline_path
    from arpg_hf.digits import render_digits
    from arpg_hf.token_dataset import images_to_tensor

    levels = np.random.default_rng(0).integers(0, 17, size=(24, 8, 8)) * (
        np.random.default_rng(1).random((24, 8, 8)) < 0.4
    )
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    images = render_digits(levels)
    for index, image in enumerate(images):
        image.save(image_dir / f"{index:02d}.png")
    source = os.path.join(bundled_pipeline_path("digits"), "vqvae")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, os.path.join(root, "pipelines", "train_tokenizer.py"), "--finetune_decoder", source]
    command += ["--image_dir", str(image_dir), "--output_dir", str(tmp_path / "out"), "--resolution", "32"]
    command += [
        "--train_batch_size",
        "24",
        "--max_train_steps",
        "25",
        "--learning_rate",
        "3e-3",
        "--lr_warmup_steps",
        "1",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"}
    )
    assert result.returncode == 0, result.stderr[-3000:]

    before = ARPGVQModel.from_pretrained(source, torch_dtype=torch.float32).eval()
    after = ARPGVQModel.from_pretrained(tmp_path / "out", torch_dtype=torch.float32).eval()
    pixels = images_to_tensor(images)
    with torch.no_grad():
        tokens = before.encode(pixels).indices
        assert torch.equal(after.encode(pixels).indices, tokens)
        errors = [F.mse_loss(vq.decode(tokens, shape=(8, 8)).sample, pixels).item() for vq in (before, after)]
    assert errors[1] < 0.8 * errors[0], errors
    old, new = before.state_dict(), after.state_dict()
    for name in old:
        moved = not torch.equal(old[name], new[name])
        assert moved == name.startswith(("decoder.", "post_quant_conv.")) or "num_batches" in name, name
