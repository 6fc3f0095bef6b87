"""ARPGVQModel against the upstream LlamaGen VQ fixtures (float32, CPU) plus input checks and loading paths."""

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file

from arpg_hf.conversion.vq import VQ_REFERENCE_KEY_MAP, vq_config_from_reference
from arpg_hf.vq_model import ARPGVQModel, llamagen_vq_config

from .conftest import PARITY_DIR, get_dummy_vq


@pytest.fixture(scope="module")
def reference_config():
    return json.loads((PARITY_DIR / "vq_config.json").read_text())


@pytest.fixture(scope="module")
def reference_state_dict():
    return torch.load(PARITY_DIR / "vq_ref.pt", map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def model(reference_config):
    return ARPGVQModel.from_reference_checkpoint(PARITY_DIR / "vq_ref.pt", reference_config)


@pytest.fixture(scope="module")
def vq_fixture():
    return load_file(PARITY_DIR / "vq.safetensors")


@pytest.fixture(scope="module")
def e2e_fixture():
    return load_file(PARITY_DIR / "e2e.safetensors")


@pytest.fixture(scope="module")
def encoded(model, vq_fixture):
    with torch.no_grad():
        return model.encode(vq_fixture["x"])


# A tokenizer with downsample factor 4 and 16 codes of 4 dimensions (get_dummy_vq's sizes otherwise).
TINY_SIZES = dict(base_channels=32, channel_multipliers=(1, 2), z_channels=8, codebook_size=16, codebook_embed_dim=4)


# ------------------------------------------------------------------------------------------------- parity


def test_config_matches_fixture(model):
    assert list(model.config.block_out_channels) == [32, 32, 64, 64, 128]  # ch 32 x (1, 1, 2, 2, 4)
    assert model.config.latent_channels == 64 and model.config.num_vq_embeddings == 512
    assert model.config.vq_embed_dim == 8 and model.config.layers_per_block == 2
    assert model.downsample_factor == 16
    assert not model.training


def test_encode_matches_reference(encoded, vq_fixture):
    assert encoded.indices.dtype == torch.int64
    assert torch.equal(encoded.indices, vq_fixture["indices"])
    # The fixture tensors are stored (B, C, h, w) like ours (the reference's channels-last view, made contiguous).
    assert encoded.latents.shape == vq_fixture["quant"].shape == (2, 8, 8, 8)
    torch.testing.assert_close(encoded.pre_quant_latents, vq_fixture["pre_quant"], atol=1e-5, rtol=0)
    torch.testing.assert_close(encoded.latents, vq_fixture["quant"], atol=1e-5, rtol=0)


def test_codebook_holds_the_reference_rows_normalised(model, reference_state_dict):
    raw = reference_state_dict["quantize.embedding.weight"]
    expected = torch.nn.functional.normalize(raw, p=2, dim=-1, eps=1e-12)  # what the reference uses
    assert torch.equal(model.quantize.embedding.weight.detach(), expected)


def test_latents_are_normalized_codebook_rows(model, encoded):
    rows = model.quantize.embedding.weight.detach()
    expected = rows[encoded.indices].permute(0, 3, 1, 2)  # (B, D, h, w)
    assert torch.equal(encoded.latents, expected)


def test_decode_latents_matches_reference(model, vq_fixture):
    with torch.no_grad():
        sample = model.decode(vq_fixture["quant"]).sample
    torch.testing.assert_close(sample, vq_fixture["decode_quant"], atol=1e-4, rtol=0)


def test_decode_indices_matches_reference(model, vq_fixture):
    with torch.no_grad():
        sample = model.decode(vq_fixture["indices"]).sample
        flat = model.decode(vq_fixture["indices"].reshape(2, 64), shape=(8, 8)).sample
    torch.testing.assert_close(sample, vq_fixture["decode_code"], atol=1e-4, rtol=0)
    assert torch.equal(flat, sample)


def test_decode_generated_tokens_matches_reference(model, e2e_fixture):
    tokens = e2e_fixture["tokens"].reshape(4, 8, 8)  # (B, h, w), raster order
    with torch.no_grad():
        images = model.decode(tokens).sample
    torch.testing.assert_close(images, e2e_fixture["images"], atol=1e-4, rtol=0)
    images_uint8 = (127.5 * images + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert (images_uint8.int() - e2e_fixture["images_uint8"].int()).abs().max() <= 1


def test_forward_is_decode_of_encode(model, vq_fixture, encoded):
    with torch.no_grad():
        reconstruction = model(vq_fixture["x"][:1]).sample
        expected = model.decode(encoded.indices[:1]).sample
    assert reconstruction.shape == (1, 3, 128, 128)
    assert torch.equal(reconstruction, expected)


def test_a_saved_folder_is_a_stock_diffusers_vq_model(model, vq_fixture, e2e_fixture, tmp_path):
    """`diffusers.VQModel` loads the folder and decodes indices to the same images, bit for bit; its own quantizer
    (nearest stored row, no normalisation) picks the same indices."""
    from diffusers import VQModel

    model.save_pretrained(tmp_path)
    stock = VQModel.from_pretrained(tmp_path).eval()
    assert type(stock) is VQModel
    tokens = e2e_fixture["tokens"].reshape(4, 8, 8)
    with torch.no_grad():
        ours = model.decode(tokens).sample
        theirs = stock.decode(tokens, force_not_quantize=True, shape=(4, 8, 8, 8)).sample
        stock_indices = stock.quantize(stock.encode(vq_fixture["x"]).latents)[2][2].reshape(2, 8, 8)
    assert torch.equal(ours, theirs)
    assert torch.equal(stock_indices, vq_fixture["indices"])


# ------------------------------------------------------------------------------------------------ quantizer


def test_quantizer_first_index_wins_ties():
    model = get_dummy_vq(seed=0, **TINY_SIZES)
    rows = model.quantize.embedding.weight
    with torch.no_grad():
        rows[3] = rows[7]  # two equal codes
        latents = 2.0 * rows[7].reshape(1, 4, 1, 1).repeat(2, 1, 3, 5)  # (B, D, h, w), normalised by the search
        codes, indices = model.quantize_latents(latents)
    assert torch.equal(indices, torch.full((2, 3, 5), 3))
    assert torch.equal(codes[0, :, 0, 0], rows[3].detach())


def test_half_precision_model_decodes_in_float32():
    model_bf16 = get_dummy_vq(seed=0, **TINY_SIZES).to(torch.bfloat16)
    model_rounded = get_dummy_vq(seed=0, **TINY_SIZES).to(torch.bfloat16).to(torch.float32)  # same weights, in float32
    indices = torch.randint(0, 16, (2, 3, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sample = model_bf16.decode(indices).sample
        expected = model_rounded.decode(indices).sample
    assert sample.dtype == torch.float32
    assert model_bf16.dtype == torch.bfloat16  # weights untouched
    torch.testing.assert_close(sample, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------- errors


def test_image_size_not_divisible_raises(model):
    with pytest.raises(ValueError, match="multiples of the downsample factor 16.*120x128"):
        model.encode(torch.zeros(1, 3, 120, 128))


def test_bad_image_shape_raises(model):
    with pytest.raises(ValueError, match=r"\(batch_size, 3, height, width\)"):
        model.encode(torch.zeros(1, 1, 128, 128))
    with pytest.raises(ValueError, match=r"\(batch_size, 3, height, width\)"):
        model.encode(torch.zeros(3, 128, 128))


def test_index_out_of_range_raises(model):
    with pytest.raises(ValueError, match=r"\[0, 512\).*\[512, 512\]"):
        model.decode(torch.full((1, 2, 2), 512))
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        model.decode(torch.full((1, 2, 2), -1))


def test_bad_decode_input_raises(model):
    with pytest.raises(ValueError, match="float latents"):
        model.decode(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="square grid"):
        model.decode(torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="h\\*w = 6"):
        model.decode(torch.zeros(1, 6, dtype=torch.long), shape=(2, 2))


def test_bad_config_raises(reference_config):
    with pytest.raises(ValueError, match="divisible by norm_num_groups=32"):
        ARPGVQModel(**llamagen_vq_config(base_channels=24, channel_multipliers=(1,)))
    with pytest.raises(ValueError, match="block_out_channels"):
        ARPGVQModel(block_out_channels=())
    with pytest.raises(ValueError, match="down_block_types must name one block per level"):
        ARPGVQModel(block_out_channels=(128, 256))
    with pytest.raises(ValueError, match="num_vq_embeddings"):
        ARPGVQModel(num_vq_embeddings=0)
    with pytest.raises(ValueError, match="codebook_l2_norm"):
        vq_config_from_reference({**reference_config, "codebook_l2_norm": False})
    with pytest.raises(ValueError, match="decoder_ch_mult"):
        vq_config_from_reference({**reference_config, "decoder_ch_mult": [1, 2, 2, 4]})
    with pytest.raises(ValueError, match="norm_type"):
        vq_config_from_reference({**reference_config, "norm_type": "batch"})
    with pytest.raises(ValueError, match="start with 1"):
        vq_config_from_reference({**reference_config, "encoder_ch_mult": [2, 2, 4], "decoder_ch_mult": [2, 2, 4]})


def test_config_from_reference():
    published = vq_config_from_reference(None)
    assert published == dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 128, 256, 256, 512),
        layers_per_block=2,
        latent_channels=256,
        num_vq_embeddings=16384,
        vq_embed_dim=8,
        norm_num_groups=32,
        mid_block_add_attention=True,
    )
    parameters = inspect.signature(ARPGVQModel.__init__).parameters
    defaults = {name: p.default for name, p in parameters.items() if name != "self"}
    assert published == {name: defaults[name] for name in published}  # the defaults are VQ-16
    # num_res_blocks is never used upstream; training-only fields are ignored.
    assert vq_config_from_reference({"num_res_blocks": 4, "commit_loss_beta": 0.5}) == published


# ---------------------------------------------------------------------------------------- loading / saving


def test_unknown_or_missing_key_is_named(reference_state_dict):
    extra = {**reference_state_dict, "encoder.extra_layer.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="encoder.extra_layer.weight"):
        ARPGVQModel.from_reference_checkpoint(extra, {"ch": 32, "z_channels": 64, "codebook_size": 512})
    missing = {k: v for k, v in reference_state_dict.items() if k != "decoder.conv_blocks.1.res.0.nin_shortcut.bias"}
    with pytest.raises(ValueError, match=r"decoder\.up_blocks\.1\.resnets\.0\.conv_shortcut\.bias"):
        ARPGVQModel.from_reference_checkpoint(missing, {"ch": 32, "z_channels": 64, "codebook_size": 512})


def test_wrong_config_shapes_are_named(reference_state_dict):
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        ARPGVQModel.from_reference_checkpoint(reference_state_dict, {"ch": 32, "z_channels": 64})


def test_wrapped_and_prefixed_checkpoints_load(model, reference_state_dict, reference_config):
    expected = model.state_dict()
    for checkpoint in (
        reference_state_dict,
        {"module": {f"module.{k}": v for k, v in reference_state_dict.items()}},
        {"state_dict": {f"_orig_mod.{k}": v for k, v in reference_state_dict.items()}},
    ):
        loaded = ARPGVQModel.from_reference_checkpoint(checkpoint, reference_config).state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_key_map_consumes_every_reference_key(reference_state_dict):
    unmatched = [
        key
        for key in reference_state_dict
        if key != "quantize.codebook_used" and not any(rule.rename(key) for rule in VQ_REFERENCE_KEY_MAP)
    ]
    assert unmatched == []


def test_save_pretrained_round_trip(model, vq_fixture, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    reloaded = ARPGVQModel.from_pretrained(tmp_path).eval()

    def plain(config):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}

    assert plain(model.config) == plain(reloaded.config)
    with torch.no_grad():
        indices = vq_fixture["indices"][:1, :4, :4]
        assert torch.equal(reloaded.decode(indices).sample, model.decode(indices).sample)
        assert torch.equal(reloaded.encode(vq_fixture["x"][:1]).indices, vq_fixture["indices"][:1])


def test_attention_free_tokenizer():
    """`attention=False` builds a purely convolutional tokenizer (no attention module) that encodes and decodes."""
    from diffusers.models.attention_processor import Attention

    config = dict(
        base_channels=8,
        channel_multipliers=(1, 1, 2),
        layers_per_block=1,
        z_channels=8,
        codebook_size=16,
        norm_num_groups=4,
    )
    local = get_dummy_vq(**config, attention=False)
    assert not any(isinstance(module, Attention) for module in local.modules())
    assert any(isinstance(module, Attention) for module in get_dummy_vq(**config).modules())
    assert local.config.mid_block_add_attention is False
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        indices = local.encode(images).indices  # (2, 8, 8)
        assert indices.shape == (2, 8, 8)
        assert local.decode(indices).sample.shape == (2, 3, 32, 32)
