"""ARPGPipeline: exact reproduction of the reference generations, outputs, inputs, saving and loading."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from arpg_hf import ARPGPipeline, ARPGScheduler
from arpg_hf.cpu_gemm import CPU_GEMMS, use_cpu_gemm

from .conftest import get_dummy_pipeline, read_json, recording_calls

CASES = read_json("cases.json")["generate"]["cases"]


def with_schedule(pipe, case):
    pipe.scheduler = ARPGScheduler.from_config(
        pipe.scheduler.config, token_schedule=case["sample_schedule"], guidance_schedule=case["cfg_schedule"]
    )
    return pipe


@pytest.fixture(scope="module")
def generate_fixture(parity_dir):
    return load_file(parity_dir / "generate.safetensors")


@pytest.fixture(scope="module")
def reference(reference_pipeline):
    """A private copy of the session pipeline whose scheduler the tests of this module may swap."""
    return ARPGPipeline(**reference_pipeline.components)


@pytest.mark.parametrize("cpu_gemm", CPU_GEMMS)
@pytest.mark.parametrize("case", CASES, ids=[case["key"] for case in CASES])
def test_greedy_generation_reproduces_reference_tokens(reference, generate_fixture, case, cpu_gemm):
    """Exact tokens with every CPU weight layout of use_cpu_gemm."""
    key = case["key"]
    use_cpu_gemm(reference.transformer, cpu_gemm)
    try:
        tokens = with_schedule(reference, case)(
            generate_fixture[f"{key}.class_labels"],
            num_inference_steps=case["num_iter"],
            guidance_scale=case["guidance_scale"],
            top_k=1,
            orders=generate_fixture[f"{key}.orders"],
            output_type="latent",
        ).images
    finally:  # the session's pipeline shares this transformer
        use_cpu_gemm(reference.transformer, "default")
        reference.transformer.unfuse_projections()
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, generate_fixture[f"{key}.tokens"])
    assert reference.scheduler.tokens_per_step == generate_fixture[f"{key}.num_pred_per_step"].tolist()


def test_first_step_logits_match_reference(reference, generate_fixture):
    for case in CASES:
        key = case["key"]
        with recording_calls(reference, "decode_step") as steps:
            with_schedule(reference, case)(
                generate_fixture[f"{key}.class_labels"],
                num_inference_steps=case["num_iter"],
                guidance_scale=case["guidance_scale"],
                top_k=1,
                orders=generate_fixture[f"{key}.orders"],
                output_type="latent",
            )
        conditional, unconditional = steps[0][2].chunk(2)
        guided = unconditional + (conditional - unconditional) * case["cfg_scale_per_step"][0]
        torch.testing.assert_close(guided, generate_fixture[f"{key}.first_step_logits"], atol=1e-4, rtol=0)


def test_end_to_end_images_match_reference(reference, generate_fixture, parity_dir):
    e2e = load_file(parity_dir / "e2e.safetensors")
    case = CASES[0]
    images = with_schedule(reference, case)(
        generate_fixture["case0.class_labels"],
        num_inference_steps=case["num_iter"],
        guidance_scale=case["guidance_scale"],
        top_k=1,
        orders=generate_fixture["case0.orders"],
        output_type="pt",
    ).images
    torch.testing.assert_close(images, (e2e["images"] / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=0)
    pil = with_schedule(reference, case)(
        generate_fixture["case0.class_labels"],
        num_inference_steps=case["num_iter"],
        guidance_scale=case["guidance_scale"],
        top_k=1,
        orders=generate_fixture["case0.orders"],
    ).images
    assert all(isinstance(image, Image.Image) and image.size == (128, 128) for image in pil)
    difference = np.stack([np.asarray(image, dtype=np.int16) for image in pil]) - e2e["images_uint8"].numpy()
    assert np.abs(difference).max() <= 1  # PIL rounds, the reference truncates: values differ by at most 1


# ------------------------------------------------------------------------------------------- tiny pipeline
@pytest.fixture(scope="module")
def tiny_pipeline():
    return get_dummy_pipeline(seed=1)


def test_output_types(tiny_pipeline):
    kwargs = dict(class_labels=[0, 4], num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    latent = tiny_pipeline(**kwargs, output_type="latent").images
    assert latent.shape == (2, 16) and latent.dtype == torch.int64 and 0 <= latent.min() and latent.max() < 32
    tensor = tiny_pipeline(**{**kwargs, "generator": torch.Generator().manual_seed(0)}, output_type="pt").images
    assert tensor.shape == (2, 3, 8, 8) and 0 <= tensor.min() and tensor.max() <= 1
    array = tiny_pipeline(**{**kwargs, "generator": torch.Generator().manual_seed(0)}, output_type="np").images
    assert array.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(array, tensor.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    (images,) = tiny_pipeline(**{**kwargs, "generator": torch.Generator().manual_seed(0)}, return_dict=False)
    assert [image.size for image in images] == [(8, 8), (8, 8)]


def test_same_seed_same_tokens_and_per_image_generators(tiny_pipeline):
    def run(generator, labels=(1, 2, 3)):
        return tiny_pipeline(list(labels), num_inference_steps=5, generator=generator, output_type="latent").images

    first = run(torch.Generator().manual_seed(7))
    assert torch.equal(first, run(torch.Generator().manual_seed(7)))
    assert not torch.equal(first, run(torch.Generator().manual_seed(8)))
    # One generator per image: an image does not depend on the rest of the batch.
    batch = run([torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    alone = run([torch.Generator().manual_seed(11)], labels=(2,))
    assert torch.equal(batch[1:2], alone)


def test_sampling_changes_with_temperature_and_greedy_ignores_the_seed(tiny_pipeline):
    greedy = [
        tiny_pipeline(
            [1, 2],
            num_inference_steps=4,
            top_k=1,
            orders=torch.arange(16),
            output_type="latent",
            generator=torch.Generator().manual_seed(seed),
        ).images
        for seed in (0, 1)
    ]
    assert torch.equal(*greedy)
    zero_temperature = tiny_pipeline(
        [1, 2], num_inference_steps=4, temperature=0.0, orders=torch.arange(16), output_type="latent"
    ).images
    assert torch.equal(zero_temperature, greedy[0])


def test_callback_sees_progress_and_can_edit_tokens(tiny_pipeline):
    seen = []

    def callback(pipe, step_index, timestep, callback_kwargs):
        tokens = callback_kwargs["tokens"]
        seen.append(int((tokens >= 0).sum()))
        return {"tokens": tokens.clamp(max=3).where(tokens >= 0, tokens)}

    tokens = tiny_pipeline(
        [0],
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=callback,
        output_type="latent",
    ).images
    assert seen == np.cumsum(tiny_pipeline.scheduler.tokens_per_step).tolist()
    assert tokens.max() <= 3


def test_label_names(reference):
    assert reference.id2label == {i: str(i) for i in range(10)}
    assert reference.get_label_ids(["3", "7"]) == [3, 7]
    imagenet = get_dummy_pipeline(num_classes=1000)
    assert imagenet.get_label_ids(["tabby cat", "golden retriever"]) == [281, 207]
    with pytest.raises(ValueError, match="tabby cat"):
        imagenet.get_label_ids("taby cat")
    names = {0: "zero", 1: "one, uno", 2: "two", 3: "three", 4: "four"}
    named = get_dummy_pipeline(id2label=names)
    assert named.id2label == names
    assert named.get_label_ids(["uno", "four"]) == [1, 4]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(class_labels=[5]), r"\[0, 5\)"),
        (dict(class_labels=[-1]), r"\[0, 5\)"),
        (dict(num_inference_steps=0), r"\[1, 16\]"),
        (dict(num_inference_steps=17), r"\[1, 16\]"),
        (dict(guidance_scale=-1.0), ">= 0"),
        (dict(top_p=0.0), r"\(0, 1\]"),
        (dict(top_p=1.5), r"\(0, 1\]"),
        (dict(top_k=-1), "top_k"),
        (dict(temperature=-0.5), "temperature"),
        (dict(orders=torch.zeros(16, dtype=torch.long)), "permutation"),
        (dict(orders=torch.arange(15)), "shape"),
        (dict(output_type="jpeg"), "'pil', 'np', 'pt', 'latent'"),
        (dict(generator=[torch.Generator()] * 2), "one per image"),
        (dict(callback_on_step_end_tensor_inputs=["logits"]), "tokens"),
    ],
)
def test_bad_inputs_raise_value_errors(tiny_pipeline, kwargs, message):
    arguments = dict(class_labels=[1], num_inference_steps=4)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        tiny_pipeline(**arguments)


def test_unknown_schedule_names_raise():
    with pytest.raises(ValueError, match="arccos"):
        ARPGScheduler(token_schedule="linear")
    with pytest.raises(ValueError, match="constant"):
        ARPGScheduler.from_config(ARPGScheduler().config, guidance_schedule="cosine")


def test_save_and_load_round_trip(reference, generate_fixture, tmp_path):
    reference.save_pretrained(tmp_path)
    assert (tmp_path / "transformer" / "model.safetensors").is_file()
    assert (tmp_path / "vqvae" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ARPGPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    case = CASES[1]
    with_schedule(loaded, case)
    tokens = loaded(
        generate_fixture["case1.class_labels"],
        num_inference_steps=case["num_iter"],
        guidance_scale=case["guidance_scale"],
        top_k=1,
        orders=generate_fixture["case1.orders"],
        output_type="latent",
    ).images
    assert torch.equal(tokens, generate_fixture["case1.tokens"])
    half = ARPGPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16 and half.vqvae.dtype == torch.bfloat16
    half.set_progress_bar_config(disable=True)
    images = half([1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.dtype == torch.float32 and images.shape == (2, 3, 128, 128)


def test_reference_loader_rejects_mismatched_checkpoints(parity_dir):
    state = torch.load(parity_dir / "arpg_ref.pt", weights_only=True)["model"]
    vq = parity_dir / "vq_ref.pt"
    config = read_json("config.json")
    wrapped = {"module": {f"module._orig_mod.{k}": v for k, v in state.items()}}
    pipe = ARPGPipeline.from_reference_checkpoints(wrapped, vq, config, read_json("vq_config.json"))
    assert torch.equal(pipe.transformer.lm_head.weight, state["head.weight"])
    extra = {**state, "layers.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="layers.extra.weight"):
        ARPGPipeline.from_reference_checkpoints(extra, vq, config, read_json("vq_config.json"))
    missing = {k: v for k, v in state.items() if k != "layers.to_v.weight"}
    with pytest.raises(ValueError, match="model.v_proj.weight"):
        ARPGPipeline.from_reference_checkpoints(missing, vq, config, read_json("vq_config.json"))
    with pytest.raises(ValueError, match="embed_tokens.weight"):
        ARPGPipeline.from_reference_checkpoints(state, vq, {**config, "num_classes": 11}, read_json("vq_config.json"))
    odd = ARPGPipeline.from_reference_checkpoints(state, vq, {**config, "n_layer": 5}, read_json("vq_config.json"))
    assert odd.transformer.config.num_self_attention_layers == odd.transformer.config.num_cross_attention_layers == 2
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight: checkpoint \(512, 8\) vs model \(1024, 8\)"):
        ARPGPipeline.from_reference_checkpoints(
            state, vq, config, {**read_json("vq_config.json"), "codebook_size": 1024}
        )


def test_shared_order_is_drawn_as_the_published_sampler_draws_it(tiny_pipeline):
    """One generator: B uniforms (the published sampler's class-dropout draw), then rand(L).argsort()."""
    generator = torch.Generator().manual_seed(3)
    torch.rand(2, generator=generator)
    expected = torch.rand(16, generator=generator).argsort()
    orders = tiny_pipeline.prepare_orders(None, 2, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(orders, expected.expand(2, 16))


# ------------------------------------------------------------------------------------------- larger canvases
def test_larger_canvas_generation(tiny_pipeline):
    """height / width in pixels: a 4x8-token canvas (twice the trained width) on the 4x4-token model."""
    with recording_calls(tiny_pipeline, "decode_step") as calls:
        kwargs = dict(class_labels=[0, 3], num_inference_steps=6, height=8, width=16)
        tokens = tiny_pipeline(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent").images
        images = tiny_pipeline(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert tokens.shape == (2, 32) and images.shape == (2, 3, 8, 16)
    assert tiny_pipeline.scheduler.num_tokens == 32 and sum(tiny_pipeline.scheduler.tokens_per_step) == 32
    assert all(kw["grid_size"] == (4, 8) and kw["position_mode"] == "extrapolate" for _, kw, _ in calls)
    expected = (tiny_pipeline.vqvae.decode(tokens.view(2, 4, 8)).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)
    pil = tiny_pipeline([1], num_inference_steps=4, height=12, width=6, generator=torch.Generator().manual_seed(0))
    assert pil.images[0].size == (6, 12)


def test_position_modes_matter_only_off_the_trained_grid(tiny_pipeline):
    def run(mode, **size):
        with recording_calls(tiny_pipeline, "decode_step") as steps:
            tokens = tiny_pipeline(
                [2],
                num_inference_steps=4,
                generator=torch.Generator().manual_seed(0),
                position_mode=mode,
                output_type="latent",
                **size,
            ).images
        return tokens, torch.cat([logits for _, _, logits in steps], dim=1)

    trained = run("extrapolate")
    for other in (run("interpolate"), run("extrapolate", height=8, width=8)):
        assert torch.equal(trained[0], other[0]) and torch.equal(trained[1], other[1])
    extrapolated, interpolated = run("extrapolate", height=16, width=16), run("interpolate", height=16, width=16)
    assert (extrapolated[1] - interpolated[1]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=7), r"multiples of the VQ downsample factor 2, got 7x8.*e\.g\. 6x8"),
        (dict(width=0), "positive int"),
        (dict(height=8.0), "positive int"),
        (dict(height=8, width=16, num_inference_steps=33), r"\[1, 32\]"),
        (dict(position_mode="stretch"), "extrapolate"),
        (dict(orders=torch.arange(16), height=8, width=16), r"shape \(32,\)"),
    ],
)
def test_bad_canvas_arguments_raise(tiny_pipeline, kwargs, message):
    arguments = dict(class_labels=[1], num_inference_steps=4)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        tiny_pipeline(**arguments)
