"""The static-cache decoding path against an uncached, block-causal recompute of the same steps."""

import pytest
import torch

from arpg_hf.rotary_2d import CLASS_POSITION

from .conftest import get_dummy_transformer


@pytest.fixture(scope="module", params=[False, True], ids=["rope-only", "absolute-positions"])
def model(request):
    return get_dummy_transformer(seed=11, absolute_position_embeddings=request.param)


def step(model, inputs, positions, queries, cache):
    """One decoding step through the model's forward."""
    return model(inputs, input_position_ids=positions, query_position_ids=queries, past_key_values=cache).logits


def cached_logits(model, class_ids, orders, tokens, tokens_per_step):
    """Runs decoding steps through the cache, feeding the given tokens; returns the logits of every step, concatenated."""
    cache = model.allocate_cache(class_ids.shape[0])
    inputs, positions = class_ids[:, None], torch.full((class_ids.shape[0], 1), CLASS_POSITION)
    logits, start = [], 0
    for count in tokens_per_step:
        queries = orders[:, start : start + count]
        logits.append(step(model, inputs, positions, queries, cache))
        inputs, positions = tokens.gather(1, queries), queries
        start += count
    assert cache.seq_length == 1 + sum(tokens_per_step[:-1])
    return torch.cat(logits, dim=1)


def block_causal_logits(model, class_ids, orders, tokens, tokens_per_step):
    """One pass without cache: block-causal self-attention by step group, queries see every input fed before them,
    given to the model's mask rule as the number of inputs each row sees."""
    step_of = torch.repeat_interleave(torch.arange(len(tokens_per_step)), torch.tensor(tokens_per_step))  # (L,)
    fed = sum(tokens_per_step[:-1])  # the last step's tokens are never fed
    input_groups = torch.cat([torch.zeros(1, dtype=torch.long), step_of[:fed] + 1])  # class = group 0
    inputs = torch.cat([class_ids[:, None], tokens.gather(1, orders[:, :fed])], dim=1)
    positions = torch.cat([torch.full((class_ids.shape[0], 1), CLASS_POSITION), orders[:, :fed]], dim=1)
    input_ends = (input_groups[None, :] <= input_groups[:, None]).sum(1)  # (N,): key group <= query group
    query_ends = (input_groups[None, :] <= step_of[:, None]).sum(1)  # (L,): inputs fed up to the query's step
    hidden = model.model(inputs, positions, orders, attention_ends=(input_ends, query_ends)).last_hidden_state
    return model.lm_head(hidden)


@pytest.mark.parametrize("tokens_per_step", [[1] * 16, [3, 5, 8], [16], [2, 1, 4, 1, 8]])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_cached_decoding_equals_block_causal_recompute(model, tokens_per_step, implementation):
    generator = torch.Generator().manual_seed(len(tokens_per_step))
    class_ids = model.class_token_ids(torch.tensor([0, 4, -1]))
    orders = torch.stack([torch.randperm(16, generator=generator) for _ in range(3)])  # one order per row
    tokens = torch.randint(0, 32, (3, 16), generator=generator)
    model.config._attn_implementation = implementation
    try:
        with torch.no_grad():
            cached = cached_logits(model, class_ids, orders, tokens, tokens_per_step)
            full = block_causal_logits(model, class_ids, orders, tokens, tokens_per_step)
    finally:
        model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=0)
    assert cached.abs().max() > 0.1  # the comparison is not between zeros


def test_one_token_per_step_equals_teacher_forced_forward(model):
    """With one token per step, block-causal is causal: decoding reproduces the training forward."""
    generator = torch.Generator().manual_seed(3)
    orders = torch.randperm(16, generator=generator).expand(2, 16)
    tokens = torch.randint(0, 32, (2, 16), generator=generator)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        cached = cached_logits(model, model.class_token_ids(labels), orders, tokens, [1] * 16)
        forward = model(tokens, labels, orders=orders).logits
    torch.testing.assert_close(cached, forward, atol=2e-5, rtol=0)


def test_cache_is_preallocated_and_written_in_place(model):
    cache = model.allocate_cache(2)
    buffers = [t.data_ptr() for t in cache.keys + cache.values]
    assert len(cache.keys) == 3 and cache.keys[-1].shape == (2, 2, 17, 16)
    class_ids = model.class_token_ids(torch.tensor([0, 1]))[:, None]
    with torch.no_grad():
        step(model, class_ids, torch.full((2, 1), CLASS_POSITION), torch.tensor([[0, 5], [3, 4]]), cache)
        step(model, torch.tensor([[1, 2], [3, 4]]), torch.tensor([[0, 5], [3, 4]]), torch.tensor([[1], [2]]), cache)
    assert [t.data_ptr() for t in cache.keys + cache.values] == buffers
    assert cache.seq_length == 3
    with pytest.raises(ValueError, match="do not fit"):
        step(
            model,
            torch.zeros(2, 15, dtype=torch.long),
            torch.arange(15).expand(2, 15),
            torch.zeros(2, 1, dtype=torch.long),
            cache,
        )
    with pytest.raises(ValueError, match="batch size 2"):
        step(model, class_ids[:1], torch.full((1, 1), CLASS_POSITION), torch.tensor([[0]]), cache)
