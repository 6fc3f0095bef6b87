"""The opt-in absolute position embeddings (`ARPGConfig.absolute_position_embeddings`)."""

import pytest
import torch

from arpg_hf import ARPGConfig, ARPGForImageGeneration
from arpg_hf.rotary_2d import CLASS_POSITION, absolute_position_embedding

from .conftest import get_dummy_transformer, tiny_config


def first_query_logits(model, position_ids, grid_size=None):
    """Logits of first-step queries (the class token is the only input) at the given raster positions."""
    cache = model.allocate_cache(1, max_length=2)
    class_id = model.class_token_ids(torch.tensor([2]))[:, None]
    with torch.no_grad():
        return model(
            class_id,
            input_position_ids=torch.full((1, 1), CLASS_POSITION),
            query_position_ids=torch.tensor([position_ids]),
            past_key_values=cache,
            grid_size=grid_size,
        ).logits[0]  # (M, V)


def embed(model, positions, grid_size=None, position_mode="extrapolate"):
    """The model's absolute embedding of raster positions (trained grid 4x4)."""
    return absolute_position_embedding(model.model.position_embeddings, positions, (4, 4), grid_size, position_mode)


@pytest.fixture(scope="module")
def positional_model():
    return get_dummy_transformer(seed=5, absolute_position_embeddings=True)


def test_off_by_default_and_in_every_published_preset():
    assert ARPGConfig().absolute_position_embeddings is False
    for name in ("ARPG-L", "ARPG-XL", "ARPG-XXL"):
        assert ARPGConfig.from_preset(name).absolute_position_embeddings is False
    model = ARPGForImageGeneration(tiny_config())
    assert model.model.position_embeddings is None
    assert not any("position_embeddings" in name for name in model.state_dict())


def test_non_boolean_flag_raises():
    with pytest.raises(ValueError, match="absolute_position_embeddings must be True or False"):
        tiny_config(absolute_position_embeddings="yes")


def test_rope_only_first_prediction_ignores_position_and_the_table_fixes_that(positional_model):
    """Relative RoPE alone: the first query attends to the class token only, so every position gets the same logits.
    With the table, the first prediction depends on where the token lands."""
    rope_only = get_dummy_transformer(seed=5)
    plain = first_query_logits(rope_only, [0, 5, 15])
    torch.testing.assert_close(plain[0], plain[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(plain[0], plain[2], atol=1e-6, rtol=0)
    positional = first_query_logits(positional_model, [0, 5, 15])
    assert (positional[0] - positional[1]).abs().max() > 1e-2
    assert (positional[0] - positional[2]).abs().max() > 1e-2


def test_table_is_saved_and_restored(positional_model, tmp_path):
    weight = positional_model.model.position_embeddings.weight
    assert weight.shape == (16, 32)  # one row per cell of the trained 4x4 grid
    positional_model.save_pretrained(tmp_path)
    reloaded = ARPGForImageGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.config.absolute_position_embeddings is True
    torch.testing.assert_close(reloaded.model.position_embeddings.weight, weight, atol=0, rtol=0)
    torch.testing.assert_close(first_query_logits(reloaded, [3, 9]), first_query_logits(positional_model, [3, 9]))


def test_embedding_on_the_trained_grid_and_the_class_slot(positional_model):
    table = positional_model.model.position_embeddings.weight
    positions = torch.tensor([[CLASS_POSITION, 0, 7, 15]])
    embedding = embed(positional_model, positions)
    assert embedding.shape == (1, 4, 32)
    assert torch.equal(embedding[0, 0], torch.zeros(32))
    torch.testing.assert_close(embedding[0, 1:], table[[0, 7, 15]], atol=0, rtol=0)
    # Passing the trained grid explicitly is the same lookup, in either mode.
    for mode in ("extrapolate", "interpolate"):
        explicit = embed(positional_model, positions, (4, 4), mode)
        torch.testing.assert_close(explicit, embedding, atol=0, rtol=0)


def test_extrapolate_clamps_to_the_nearest_trained_cell(positional_model):
    table = positional_model.model.position_embeddings.weight.reshape(4, 4, 32)
    # On an 8x8 canvas: (1, 2) is inside the trained range; (6, 3) and (2, 7) and (7, 7) lie beyond it.
    rows_cols = [(1, 2), (6, 3), (2, 7), (7, 7)]
    positions = torch.tensor([[r * 8 + c for r, c in rows_cols]])
    embedding = embed(positional_model, positions, (8, 8), "extrapolate")[0]
    expected = torch.stack([table[1, 2], table[3, 3], table[2, 3], table[3, 3]])
    torch.testing.assert_close(embedding, expected, atol=1e-6, rtol=0)


def test_interpolate_samples_the_table_bilinearly(positional_model):
    table = positional_model.model.position_embeddings.weight.reshape(4, 4, 32)
    # A 8x8 canvas scales (row, col) by 1/2: even cells land on trained cells, odd ones halfway between them.
    positions = torch.tensor([[2 * 8 + 4, 3 * 8 + 4, 3 * 8 + 5, 7 * 8 + 7]])
    embedding = embed(positional_model, positions, (8, 8), "interpolate")[0]
    expected = torch.stack(
        [
            table[1, 2],
            (table[1, 2] + table[2, 2]) / 2,  # (1.5, 2)
            (table[1, 2] + table[1, 3] + table[2, 2] + table[2, 3]) / 4,  # (1.5, 2.5)
            table[3, 3],  # (3.5, 3.5) lies beyond the last trained cell: clamped to it
        ]
    )
    torch.testing.assert_close(embedding, expected, atol=1e-6, rtol=0)


def test_training_gradient_reaches_the_table():
    model = get_dummy_transformer(seed=1, absolute_position_embeddings=True).train()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (3, 16), generator=generator)
    model(tokens, torch.tensor([0, 1, 2]), generator=generator).loss.backward()
    gradient = model.model.position_embeddings.weight.grad
    assert gradient is not None and (gradient.abs().sum(dim=1) > 0).all()  # every cell is an input or a query
