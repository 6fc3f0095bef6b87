"""ARPGInpaintPipeline: kept tokens, masked tokens decoded once, reduction to ARPGPipeline, larger canvases, errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from arpg_hf import (
    ARPGForImageGeneration,
    ARPGInpaintPipeline,
    ARPGPipeline,
    ARPGScheduler,
    expand_resolution,
    make_outpaint_canvas,
)
from arpg_hf.rotary_2d import CLASS_POSITION

from .conftest import get_dummy_pipeline, get_dummy_transformer, read_json
from .fixtures.build_tiny_pipeline import FIXTURE_DIR


@pytest.fixture(scope="module")
def pipe():
    """Tiny transformer (trained grid 4 x 4, 32 codes, 5 classes) + a VQ with downsample factor 2."""
    return get_dummy_pipeline(ARPGInpaintPipeline, seed=1)


@pytest.fixture(scope="module")
def images():
    """Two 8x8 RGB images in [0, 1] (a 4x4 token grid)."""
    return torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def encode(pipe, images):
    return pipe.encode_image(images * 2 - 1)  # (B, L)


def box_mask(height, width, top, left, bottom, right):
    mask = torch.zeros(height, width)
    mask[top:bottom, left:right] = 1
    return mask


class DecodeStepSpy:
    """Records the inputs / queries / keyword arguments of every step the transformer's forward runs."""

    def __init__(self, transformer):
        self.transformer, self.calls = transformer, []

    def __enter__(self):
        original = self.transformer.forward

        def recording(input_ids, input_position_ids, query_position_ids, **kwargs):
            self.calls.append((input_ids.clone(), input_position_ids.clone(), query_position_ids.clone(), kwargs))
            return original(
                input_ids, input_position_ids=input_position_ids, query_position_ids=query_position_ids, **kwargs
            )

        self.transformer.forward = recording
        return self

    def __exit__(self, *exc):
        del self.transformer.forward


def test_known_tokens_are_kept_and_every_masked_token_is_decoded_once(pipe, images):
    # Factor 2: pixel rows 1..4 x cols 2..5 touch token rows 0..2 x cols 1..2 (6 tokens), partially at the edges.
    mask = box_mask(8, 8, 1, 2, 5, 6)
    masked = torch.zeros(4, 4, dtype=torch.bool)
    masked[0:3, 1:3] = True
    masked = masked.flatten()
    encoded = encode(pipe, images)
    seen = []

    def callback(p, step_index, timestep, callback_kwargs):
        seen.append(callback_kwargs["tokens"].clone())
        return {}

    with DecodeStepSpy(pipe.transformer) as spy:
        tokens = pipe(
            images,
            mask,
            [1, 3],
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=callback,
            output_type="latent",
        ).images
    assert tokens.shape == (2, 16)
    assert torch.equal(tokens[:, ~masked], encoded[:, ~masked])  # kept exactly as encoded
    # The queries of all steps cover each masked position exactly once, and nothing else.
    queried = torch.cat([call[2] for call in spy.calls], dim=1)  # (2B, U)
    assert queried.shape == (4, 6)
    assert torch.equal(queried.sort(dim=1).values, masked.nonzero().flatten().expand(4, 6))
    # The first call feeds the class then the kept tokens at their positions (raster order), causally.
    inputs, positions, _, kwargs = spy.calls[0]
    known_positions = (~masked).nonzero().flatten()
    assert torch.equal(positions[:, 0], torch.full((4,), CLASS_POSITION))
    assert torch.equal(positions[:, 1:], known_positions.expand(4, 10))
    assert torch.equal(inputs[:2, 1:], encoded[:, known_positions]) and torch.equal(inputs[2:, 1:], inputs[:2, 1:])
    input_ends, query_ends = kwargs["attention_ends"]  # each kept token sees the class and those before it
    assert torch.equal(input_ends, torch.arange(1, 12)) and torch.equal(query_ends, torch.full((2,), 11))
    assert not any(call[3]["attention_ends"] is not None for call in spy.calls[1:])
    # Progress: -1 only at masked positions not generated yet; the kept ones are visible from the start.
    assert [int((t[0] < 0).sum()) for t in seen] == [6 - n for n in np.cumsum(pipe.scheduler.tokens_per_step)]
    assert all(torch.equal(t[:, ~masked], encoded[:, ~masked]) for t in seen)


def test_full_mask_with_same_orders_and_greedy_reproduces_arpg_pipeline(pipe, images):
    generator_pipe = ARPGPipeline(**pipe.components)
    orders = torch.randperm(16, generator=torch.Generator().manual_seed(4))
    for kwargs in (dict(top_k=1, orders=orders), dict(generator=torch.Generator().manual_seed(9))):
        inpainted = pipe(images, torch.ones(8, 8), [0, 4], num_inference_steps=5, output_type="latent", **kwargs).images
        if "generator" in kwargs:
            kwargs["generator"] = torch.Generator().manual_seed(9)  # same seed: same order and same draws
        generated = generator_pipe([0, 4], num_inference_steps=5, output_type="latent", **kwargs).images
        assert torch.equal(inpainted, generated)


def test_full_mask_reproduces_the_upstream_reference_tokens(reference_pipeline, parity_dir):
    """Full-mask inpainting is generation: the parity fixture's greedy cases come back token for token."""
    fixture = load_file(parity_dir / "generate.safetensors")
    inpaint = ARPGInpaintPipeline(**reference_pipeline.components)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    cases = read_json("cases.json")["generate"]["cases"]
    for case in (cases[0], cases[3]):  # arccos + linear guidance, cosine + linear guidance
        key = case["key"]
        inpaint.scheduler = ARPGScheduler.from_config(
            inpaint.scheduler.config, token_schedule=case["sample_schedule"], guidance_schedule=case["cfg_schedule"]
        )
        tokens = inpaint(
            image,
            np.ones((128, 128), dtype=bool),
            fixture[f"{key}.class_labels"],
            num_inference_steps=case["num_iter"],
            guidance_scale=case["guidance_scale"],
            top_k=1,
            orders=fixture[f"{key}.orders"],
            output_type="latent",
        ).images
        assert torch.equal(tokens, fixture[f"{key}.tokens"])


def test_empty_mask_returns_the_encoded_tokens_without_a_model_call(pipe, images):
    def fail(*args, **kwargs):
        raise AssertionError("the transformer must not run for an empty mask")

    pipe.transformer.forward = fail
    try:
        empty = np.zeros((8, 8), dtype=np.float32)
        tokens = pipe(images, empty, [1, 2], output_type="latent").images
        decoded = pipe(images, empty, [1, 2], output_type="pt").images
        pasted = pipe(images, empty, [1, 2], output_type="pt", paste_back=True).images
    finally:
        del pipe.transformer.forward
    encoded = encode(pipe, images)
    assert torch.equal(tokens, encoded)
    expected = (pipe.vqvae.decode(encoded.view(2, 4, 4)).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(decoded, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(pasted, images, atol=1e-6, rtol=0)


def test_paste_back_keeps_unmasked_pixels(pipe, images):
    mask = box_mask(8, 8, 2, 2, 6, 6)
    kwargs = dict(num_inference_steps=2, output_type="pt")
    plain = pipe(images, mask, [1, 1], generator=torch.Generator().manual_seed(1), **kwargs).images
    pasted = pipe(images, mask, [1, 1], generator=torch.Generator().manual_seed(1), paste_back=True, **kwargs).images
    keep = mask == 0
    torch.testing.assert_close(pasted[..., keep], images[..., keep], atol=1e-6, rtol=0)
    assert torch.equal(pasted[..., ~keep], plain[..., ~keep])
    assert (plain[..., keep] - images[..., keep]).abs().max() > 1e-3  # without it, the VQ round trip shows


def test_class_conditional_editing_changes_only_the_masked_tokens(pipe, images):
    mask = box_mask(8, 8, 0, 0, 8, 4)  # the left half: token columns 0..1
    masked = torch.zeros(4, 4, dtype=torch.bool)
    masked[:, :2] = True
    masked = masked.flatten()
    orders = masked.nonzero().flatten().flip(0)
    generators = [torch.Generator().manual_seed(0) for _ in range(3)]  # the same draws: only the label differs
    edits = pipe(
        images[:1], mask, [0, 2, 4], num_inference_steps=4, orders=orders, generator=generators, output_type="latent"
    ).images  # one image, three class labels
    encoded = encode(pipe, images[:1])
    assert torch.equal(edits[:, ~masked], encoded[:, ~masked].expand(3, -1))
    assert len({tuple(row.tolist()) for row in edits[:, masked]}) > 1
    same_label = pipe(
        images[:1],
        mask,
        [0, 0],
        num_inference_steps=4,
        orders=orders,
        output_type="latent",
        generator=[torch.Generator().manual_seed(0) for _ in range(2)],
    ).images
    assert torch.equal(same_label, edits[:1].expand(2, -1))


def test_orders_fix_the_decoding_order(pipe, images):
    mask = box_mask(8, 8, 0, 0, 4, 8)  # the top half: tokens 0..7
    orders = torch.tensor([[7, 0, 5, 2, 1, 6, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]])
    with DecodeStepSpy(pipe.transformer) as spy:
        pipe(
            images,
            mask,
            [1, 2],
            num_inference_steps=8,
            orders=orders,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
    queried = torch.cat([call[2] for call in spy.calls], dim=1)  # (2B, 8), one token per step
    assert torch.equal(queried, orders.repeat(2, 1))


def test_masks_with_different_counts_decode_each_image_on_its_own_schedule(pipe, images):
    masks = torch.stack([box_mask(8, 8, 0, 0, 4, 4), box_mask(8, 8, 0, 0, 8, 8)])[:, None]  # 4 and 16 tokens
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    batch = pipe(images, masks, [1, 2], num_inference_steps=4, generator=generators, output_type="latent").images
    for i, seed in enumerate((3, 4)):
        alone = pipe(
            images[i : i + 1],
            masks[i],
            [1 + i],
            num_inference_steps=4,
            generator=[torch.Generator().manual_seed(seed)],
            output_type="latent",
        ).images
        assert torch.equal(batch[i : i + 1], alone)
    orders = [torch.tensor([5, 4, 1, 0]), torch.arange(16).flip(0)]  # one sequence per image
    greedy = pipe(images, masks, [1, 2], num_inference_steps=4, orders=orders, top_k=1, output_type="latent").images
    assert torch.equal(greedy[0, 2:4], encode(pipe, images)[0, 2:4])


def test_coverage_threshold_keeps_partly_covered_tokens(pipe, images):
    mask = box_mask(8, 8, 0, 0, 2, 3)  # token (0, 0) fully covered, token (0, 1) half covered
    with DecodeStepSpy(pipe.transformer) as spy:
        pipe(images, mask, [1, 1], num_inference_steps=1, top_k=1, output_type="latent")
        pipe(images, mask, [1, 1], num_inference_steps=1, top_k=1, output_type="latent", mask_coverage_threshold=0.5)
    assert spy.calls[0][2][0].tolist() in ([0, 1], [1, 0]) and spy.calls[1][2][0].tolist() == [0]


@pytest.mark.parametrize("position_mode", ["extrapolate", "interpolate"])
def test_twice_the_trained_width_inpaints_and_outpaints(position_mode):
    """A 16x32-token canvas on a model trained on 16x16 tokens."""
    pipe = get_dummy_pipeline(ARPGInpaintPipeline, seed=2, grid_height=16, grid_width=16)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # 16x16 tokens
    canvas = make_outpaint_canvas(image, right=32)  # 32x64 pixels, 16x32 tokens, the right half masked
    kwargs = dict(num_inference_steps=8, generator=torch.Generator().manual_seed(0), position_mode=position_mode)
    with DecodeStepSpy(pipe.transformer) as spy:
        tokens = pipe(canvas.image, canvas.mask_image, [3], output_type="latent", **kwargs).images
    assert tokens.shape == (1, 512)
    assert all(call[3]["grid_size"] == (16, 32) and call[3]["position_mode"] == position_mode for call in spy.calls)
    grid = tokens.view(16, 32)
    assert torch.equal(grid[:, :16], encode(pipe, canvas.image).view(16, 32)[:, :16])
    outpainted = pipe(
        canvas.image,
        canvas.mask_image,
        [3],
        output_type="pt",
        paste_back=True,
        **{**kwargs, "generator": torch.Generator().manual_seed(0)},
    ).images
    assert outpainted.shape == (1, 3, 32, 64)
    torch.testing.assert_close(outpainted[..., :32], image, atol=1e-6, rtol=0)
    pil = pipe(canvas.image, canvas.mask_image, [3], **{**kwargs, "generator": torch.Generator().manual_seed(0)})
    assert pil.images[0].size == (64, 32)
    inpainted = pipe(canvas.image, box_mask(32, 64, 8, 16, 24, 48), [3], output_type="pt", **kwargs).images
    assert inpainted.shape == (1, 3, 32, 64)


def test_position_modes_differ_beyond_the_trained_grid_only(pipe, images):
    def run(image, mask, mode):
        return pipe(
            image,
            mask,
            [2],
            num_inference_steps=3,
            top_k=1,
            orders=None,
            position_mode=mode,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images

    mask = box_mask(8, 8, 2, 2, 6, 6)
    assert torch.equal(run(images[:1], mask, "extrapolate"), run(images[:1], mask, "interpolate"))
    wide = torch.rand(1, 3, 8, 32, generator=torch.Generator().manual_seed(2))  # 4x16 tokens
    wide_mask = box_mask(8, 32, 0, 16, 8, 32)
    assert not torch.equal(run(wide, wide_mask, "extrapolate"), run(wide, wide_mask, "interpolate"))


def test_resolution_expansion_keeps_a_lattice_of_the_upscaled_image(pipe, images):
    with DecodeStepSpy(pipe.transformer) as spy:
        tokens = expand_resolution(
            pipe,
            images[:1],
            [1],
            scale=2,
            num_inference_steps=6,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images
    assert tokens.shape == (1, 64)  # 8x8 tokens = 16x16 pixels
    upscaled = torch.nn.functional.interpolate(images[:1] * 2 - 1, scale_factor=2, mode="bicubic").clamp(-1, 1)
    lattice = torch.zeros(8, 8, dtype=torch.bool)
    lattice[::2, ::2] = True
    lattice = lattice.flatten()
    assert torch.equal(tokens[0, lattice], pipe.encode_image(upscaled)[0, lattice])
    queried = torch.cat([call[2] for call in spy.calls], dim=1)[0]
    assert sorted(queried.tolist()) == (~lattice).nonzero().flatten().tolist()
    assert all(call[3]["position_mode"] == "interpolate" and call[3]["grid_size"] == (8, 8) for call in spy.calls)
    images_out = expand_resolution(
        ARPGPipeline(**pipe.components), images[:1], [1], scale=2, num_inference_steps=6, output_type="pt"
    ).images
    assert images_out.shape == (1, 3, 16, 16)


def test_input_formats_give_the_same_result(pipe, images):
    pil_image = Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    array = np.array(pil_image)  # (H, W, 3) uint8
    pixels = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W) in [0, 1]
    mask = box_mask(8, 8, 0, 0, 4, 6).numpy()

    def run(image, mask_image):  # the same order every time: greedy tokens depend on it
        generator = torch.Generator().manual_seed(0)
        return pipe(
            image, mask_image, [2], num_inference_steps=3, top_k=1, output_type="latent", generator=generator
        ).images

    expected = run(pixels, torch.from_numpy(mask))
    image_formats = (pil_image, array, array.astype(np.float32) / 255, [pil_image], pixels[0])
    mask_formats = (Image.fromarray((mask * 255).astype(np.uint8)).convert("1"), mask[..., None].astype(bool))
    for image, mask_image in zip(image_formats, mask_formats * 3):
        assert torch.equal(run(image, mask_image), expected)


@pytest.mark.parametrize(
    "image_size, mask, kwargs, message",
    [
        ((8, 8), np.zeros((8, 6)), {}, r"mask_image is 8x6 .* image is 8x8"),
        ((8, 7), np.zeros((8, 7)), {}, r"multiples of the VQ downsample factor 2.*8x7.*multiple of 2"),
        ((8, 8), np.full((8, 8), np.nan), {}, "NaN"),
        ((8, 8), np.zeros((8, 8, 3)), {}, "one channel"),
        ((8, 8), torch.zeros(1, 1, 1, 8, 8), {}, "one channel"),
        ((8, 8), np.full((8, 8), 255.0), {}, r"\[0, 1\]"),
        ((8, 8), np.full((8, 8), -0.5), {}, r"\[0, 1\]"),
        ((8, 8), "mask.png", {}, "Cannot interpret"),
        ((8, 8), np.zeros((8, 8), dtype=complex), {}, "Cannot interpret"),
        ((8, 8), np.ones((8, 8)), dict(orders=torch.arange(15)), r"shape \(16,\)"),
        ((8, 8), np.ones((8, 8)), dict(orders=torch.zeros(16, dtype=torch.long)), "permutation"),
        ((8, 8), box_mask(8, 8, 0, 0, 2, 2).numpy(), dict(orders=torch.tensor([1])), "permutation"),
        ((8, 8), np.ones((8, 8)), dict(mask_coverage_threshold=1.0), r"\[0, 1\)"),
        ((8, 8), np.ones((8, 8)), dict(position_mode="stretch"), "extrapolate"),
        ((8, 8), np.ones((8, 8)), dict(num_inference_steps=0), ">= 1"),
        ((8, 8), np.ones((8, 8)), dict(class_labels=[1, 2, 3]), "Batch sizes"),
        ((8, 8), np.ones((8, 8)), dict(generator=[torch.Generator()] * 3), "Batch sizes"),
        ((8, 8), np.ones((8, 8)), dict(output_type="jpeg"), "latent"),
        ((8, 8), np.ones((8, 8)), dict(class_labels=[7, 1]), r"\[0, 5\)"),
    ],
)
def test_bad_inputs_raise_value_errors(pipe, image_size, mask, kwargs, message):
    image = torch.rand(2, 3, *image_size, generator=torch.Generator().manual_seed(0))
    arguments = dict(class_labels=[1, 2], num_inference_steps=2, output_type="latent")
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        pipe(image, mask, **arguments)


def test_bad_image_formats_raise_value_errors(pipe):
    with pytest.raises(ValueError, match="C = 1 or 3"):
        pipe(torch.rand(1, 4, 8, 8), np.ones((8, 8)), [1])
    with pytest.raises(ValueError, match="C = 1 or 3"):
        pipe(np.zeros((8, 8, 5), dtype=np.float32), np.ones((8, 8)), [1])
    with pytest.raises(ValueError, match="float"):
        pipe(torch.zeros(1, 3, 8, 8, dtype=torch.int64), np.ones((8, 8)), [1])


def test_loads_from_a_saved_arpg_pipeline_and_from_components(tmp_path):
    loaded = ARPGInpaintPipeline.from_pretrained(FIXTURE_DIR)  # an ARPGPipeline folder
    assert isinstance(loaded, ARPGInpaintPipeline)
    loaded.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 4, 6, generator=torch.Generator().manual_seed(0))  # the fixture's 2x3 token grid
    images = loaded(image, box_mask(4, 6, 0, 0, 2, 2), [2], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 4, 6)
    rebuilt = ARPGInpaintPipeline(**ARPGPipeline.from_pretrained(FIXTURE_DIR).components)
    assert rebuilt.vqvae.downsample_factor == 2
    loaded.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == [
        "pipeline_arpg_inpaint",
        "ARPGInpaintPipeline",
    ]
    again = ARPGInpaintPipeline.from_pretrained(tmp_path)
    assert isinstance(again.transformer, ARPGForImageGeneration)


def test_causal_prefill_matches_the_teacher_forced_forward():
    """Prefilled known tokens are a causal prefix of a training order: the first query's logits are those of the
    training forward at the same index."""
    model = get_dummy_transformer(seed=5)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (2, 16), generator=generator)
    known = torch.tensor([0, 3, 4, 9, 10, 15])  # raster order, as the pipeline feeds them
    unknown = torch.tensor([p for p in range(16) if p not in known.tolist()])
    labels = torch.tensor([1, 4])
    with torch.no_grad():
        cache = model.allocate_cache(2)
        inputs = torch.cat([model.class_token_ids(labels)[:, None], tokens[:, known]], dim=1)
        positions = torch.cat([torch.full((2, 1), CLASS_POSITION), known.expand(2, -1)], dim=1)
        ends = (torch.arange(1, 2 + len(known)), torch.full((len(unknown),), 1 + len(known)))  # causal prefix
        logits = model(
            inputs,
            input_position_ids=positions,
            query_position_ids=unknown.expand(2, -1),
            past_key_values=cache,
            attention_ends=ends,
        ).logits
        for i, position in enumerate(unknown.tolist()):
            rest = [p for p in unknown.tolist() if p != position]
            orders = torch.tensor(known.tolist() + [position] + rest)
            forward = model(tokens, labels, orders=orders).logits[:, len(known)]
            torch.testing.assert_close(logits[:, i], forward, atol=2e-5, rtol=0)
        assert cache.seq_length == 1 + len(known)


def test_generate_tokens_checks_known_tokens_against_orders(pipe):
    pipe.scheduler.set_timesteps(2, 2)
    labels, orders = torch.tensor([1]), torch.tensor([[0, 1]])
    known = torch.arange(16)[None].clone()
    known[0, :2] = -1
    tokens = pipe.generate_tokens(labels, orders, 1.0, None, 1.0, 1, None, known_tokens=known)
    assert torch.equal(tokens[0, 2:], known[0, 2:]) and (tokens[0, :2] >= 0).all()
    for bad_orders in (torch.tensor([[0, 2]]), torch.tensor([[0]])):
        with pytest.raises(ValueError, match="exactly at the positions"):
            pipe.generate_tokens(labels, bad_orders, 1.0, None, 1.0, 1, None, known_tokens=known)
