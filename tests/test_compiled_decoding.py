"""Opt-in compiled decoding: bucketed static shapes, the same results as the eager step, graphs reused across calls.

The tests trace with a counting backend that runs the captured graph as is (Dynamo's full-graph capture is what is
under test; inductor's code generation would take minutes on the CI CPU).
"""

import pytest
import torch

from arpg_hf import ARPGForImageGeneration, ARPGInpaintPipeline, ARPGPipeline, ARPGScheduler, CompiledDecoder
from arpg_hf.compiled_decoding import bucket_size
from arpg_hf.rotary_2d import CLASS_POSITION

from .conftest import get_dummy_pipeline, get_dummy_transformer, tiny_config

pytestmark = pytest.mark.slow  # not in the fast run (-m 'not slow'): torch.compile builds, ~35 s


class CountingBackend:
    """A torch.compile backend that records every captured graph and runs it unchanged."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward


@pytest.fixture(scope="module")
def pipelines():
    """(eager pipeline, compiled pipeline, its backend) over the same weights (with absolute positions: every code
    path of the step)."""
    torch._dynamo.reset()
    eager = get_dummy_pipeline(seed=2, absolute_position_embeddings=True)
    compiled_transformer = ARPGForImageGeneration(eager.transformer.config).eval()
    compiled_transformer.load_state_dict(eager.transformer.state_dict())
    compiled = ARPGPipeline(transformer=compiled_transformer, vqvae=eager.vqvae, scheduler=ARPGScheduler())
    backend = CountingBackend()
    compiled.enable_compiled_decoding(backend=backend)
    compiled.set_progress_bar_config(disable=True)
    return eager, compiled, backend


def test_bucket_sizes():
    assert [bucket_size(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]


def test_bad_buckets_raise():
    model = ARPGForImageGeneration(tiny_config())
    with pytest.raises(ValueError, match="buckets must be positive integers"):
        CompiledDecoder(model, buckets=[0, 4])


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("key_block", [None, 4])
def test_padded_step_equals_the_eager_step(attn_implementation, key_block):
    """The static-shape step (inputs and queries padded, explicit cache slots and mask ends, the whole cache or the
    filled slots rounded up to a block) gives the eager logits, with either attention."""
    model = get_dummy_transformer(seed=4)
    model.set_attn_implementation(attn_implementation)
    eager_cache = model.allocate_cache(2)
    padded_cache = model.allocate_cache(2, max_length=17 + 7, key_block=key_block or 17 + 7)
    class_ids = model.class_token_ids(torch.tensor([1, -1]))[:, None]
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(16, generator=generator).expand(2, 16)
    tokens = torch.randint(0, 32, (2, 16), generator=generator)
    inputs, positions, start = class_ids, torch.full((2, 1), CLASS_POSITION), 0
    with torch.no_grad():
        for count in (1, 3, 5, 7):
            queries = order[:, start : start + count]
            expected = model(
                inputs, input_position_ids=positions, query_position_ids=queries, past_key_values=eager_cache
            ).logits
            pad, slot = 8 - inputs.shape[1], padded_cache.advance(inputs.shape[1])
            end = padded_cache.seq_length
            assert padded_cache.read_length == (-(-end // key_block) * key_block if key_block else 24)
            padded_logits = model(
                torch.cat([inputs, inputs[:, :1].expand(-1, pad)], 1),
                input_position_ids=torch.cat([positions, positions[:, :1].expand(-1, pad)], 1),
                query_position_ids=torch.cat([queries, queries[:, :1].expand(-1, 8 - count)], 1),
                past_key_values=padded_cache,
                cache_position=torch.arange(slot, slot + 8),
                attention_ends=(torch.full((8,), end), torch.full((8,), end)),
            ).logits
            torch.testing.assert_close(padded_logits[:, :count], expected, atol=1e-5, rtol=0)
            inputs, positions, start = tokens.gather(1, queries), queries, start + count
    assert padded_cache.seq_length == eager_cache.seq_length == 1 + 1 + 3 + 5


def test_compiled_pipeline_gives_the_eager_tokens_and_reuses_its_graphs(pipelines):
    eager, compiled, backend = pipelines
    kwargs = dict(class_labels=[0, 3, 4], num_inference_steps=6, guidance_scale=3.0, output_type="latent")
    expected = eager(**kwargs, generator=torch.Generator().manual_seed(7)).images
    got = compiled(**kwargs, generator=torch.Generator().manual_seed(7)).images
    assert torch.equal(got, expected)
    # 6 steps over 16 tokens: every step is one of a few (input bucket, query bucket) shapes, each traced once.
    first_graphs = len(backend.graphs)
    assert 1 <= first_graphs <= 5
    again = compiled(**kwargs, generator=torch.Generator().manual_seed(8)).images
    assert len(backend.graphs) == first_graphs  # a second call compiles nothing
    assert torch.equal(again, eager(**kwargs, generator=torch.Generator().manual_seed(8)).images)


def test_key_blocks_give_the_eager_tokens_with_a_few_more_graphs(pipelines):
    eager, compiled, _ = pipelines
    blocked = ARPGPipeline(**compiled.components)
    blocked.set_progress_bar_config(disable=True)
    backend = CountingBackend()
    blocked.enable_compiled_decoding(key_block=4, backend=backend)
    decoder, read_lengths = blocked._compiled_decoder, []
    step = decoder.step

    def recording_step(*args, **kwargs):
        cache = kwargs["past_key_values"]
        read_lengths.append((cache.seq_length, cache.read_length, cache.max_length))
        return step(*args, **kwargs)

    decoder.step = recording_step
    kwargs = dict(class_labels=[0, 3, 4], num_inference_steps=6, guidance_scale=3.0, output_type="latent")
    expected = eager(**kwargs, generator=torch.Generator().manual_seed(7)).images
    assert torch.equal(blocked(**kwargs, generator=torch.Generator().manual_seed(7)).images, expected)
    # every step reads the filled slots rounded up to a multiple of 4 (capped at the cache), not the whole cache
    assert len(read_lengths) == 6 and read_lengths[0][1] == 4 and read_lengths[0][2] > 16
    assert all(length % 4 == 0 or length == total for _, length, total in read_lengths)
    assert [length for _, length, _ in read_lengths] == sorted(length for _, length, _ in read_lengths)
    first_graphs = len(backend.graphs)
    assert 2 <= first_graphs <= 8  # one per (input bucket, query bucket, key block) in use
    blocked(**kwargs, generator=torch.Generator().manual_seed(7))
    assert len(backend.graphs) == first_graphs  # a second call compiles nothing
    # inpainting: the known tokens are prefilled eagerly, then the blocked steps read past them
    image, mask = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(4)), torch.zeros(1, 1, 8, 8)
    mask[..., :, 4:] = 1
    inpaint_eager, inpaint_blocked = ARPGInpaintPipeline(**eager.components), ARPGInpaintPipeline(**blocked.components)
    inpaint_blocked.enable_compiled_decoding(key_block=4, backend=CountingBackend())
    call = dict(image=image, mask_image=mask, class_labels=[2], num_inference_steps=3, output_type="latent")
    assert torch.equal(
        inpaint_blocked(**call, generator=torch.Generator().manual_seed(3)).images,
        inpaint_eager(**call, generator=torch.Generator().manual_seed(3)).images,
    )
    with pytest.raises(ValueError, match="key_block must be a positive integer"):
        CompiledDecoder(eager.transformer, key_block=0)


def test_compiled_decoding_serves_larger_canvases_and_inpainting(pipelines):
    eager, compiled, _ = pipelines
    kwargs = dict(class_labels=[1], num_inference_steps=5, height=8, width=16, output_type="latent")
    assert torch.equal(
        compiled(**kwargs, generator=torch.Generator().manual_seed(1)).images,
        eager(**kwargs, generator=torch.Generator().manual_seed(1)).images,
    )
    image = torch.rand(1, 3, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:, :] = 1  # bottom half: a causal prefill of the known top half, then compiled steps
    inpaint_eager, inpaint_compiled = (
        ARPGInpaintPipeline(**eager.components),
        ARPGInpaintPipeline(**compiled.components),
    )
    inpaint_compiled.enable_compiled_decoding(backend=CountingBackend())
    for pipe in (inpaint_eager, inpaint_compiled):
        pipe.set_progress_bar_config(disable=True)
    call = dict(image=image, mask_image=mask, class_labels=[2], num_inference_steps=3, output_type="latent")
    assert torch.equal(
        inpaint_compiled(**call, generator=torch.Generator().manual_seed(3)).images,
        inpaint_eager(**call, generator=torch.Generator().manual_seed(3)).images,
    )


def test_disable_returns_to_eager_steps(pipelines):
    eager, compiled, backend = pipelines
    decoder, graphs = compiled._compiled_decoder, len(backend.graphs)
    assert compiled.compiled_decoding
    compiled.disable_compiled_decoding()
    try:
        assert not compiled.compiled_decoding
        kwargs = dict(class_labels=[0], num_inference_steps=2, output_type="latent")
        got = compiled(**kwargs, generator=torch.Generator().manual_seed(0)).images
        assert len(backend.graphs) == graphs  # nothing compiled, nothing run through the compiled step
        assert torch.equal(got, eager(**kwargs, generator=torch.Generator().manual_seed(0)).images)
    finally:
        compiled._compiled_decoder = decoder
