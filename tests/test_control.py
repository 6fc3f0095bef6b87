"""ControlARPG: the per-position query conditions in the core, the adapter, the control pipeline (generation,
guidance, inpainting, saving and loading), the edge detector, and the bundled digits-edges model."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from arpg_hf import (
    ARPGControlAdapter,
    ARPGControlPipeline,
    ARPGInpaintPipeline,
    canny_edges,
    compute_control_image,
    depth_to_control_image,
    load_bundled_pipeline,
)
from arpg_hf.bundled import bundled_pipeline_path
from arpg_hf.digits import load_digits_split, render_digits
from arpg_hf.training_utils import crop_choice, select_crops

from .conftest import randomize_


@pytest.fixture(scope="module")
def base():
    return load_bundled_pipeline()


def random_adapter(base, seed=0, scale=0.3):
    adapter = ARPGControlAdapter(output_size=base.transformer.config.hidden_size, patch_size=4, block_channels=16)
    randomize_(adapter, seed)
    torch.nn.init.normal_(adapter.proj_out.weight, std=scale, generator=torch.Generator().manual_seed(seed))
    return adapter.eval()


@pytest.fixture(scope="module")
def control(base):
    components = {name: base.components[name] for name in ("transformer", "vqvae", "scheduler")}
    pipe = ARPGControlPipeline(**components, controlnet=random_adapter(base))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def edges():
    _, test = load_digits_split()
    return [canny_edges(image) for image in render_digits(test.pixels[:4])]


def latents(pipe, labels=(3, 5), seed=0, **kwargs):
    generator = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
    return pipe(list(labels), num_inference_steps=8, generator=generator, output_type="latent", **kwargs).images


# ------------------------------------------------------------------------------------------------ the core


def test_a_position_condition_changes_only_the_query_of_its_position(base):
    model = base.transformer
    assert not any(module.training for module in model.modules())  # the packed layout keeps eval mode
    hidden = model.config.hidden_size
    inputs, input_positions = torch.tensor([[model.config.class_token_offset + 2]]), torch.tensor([[-1]])
    queries = torch.tensor([[5, 17, 40]])
    step = dict(input_position_ids=input_positions, query_position_ids=queries)
    plain = model(inputs, **step).logits
    conditions = torch.zeros(1, 64, hidden)
    assert torch.equal(model(inputs, position_conditions=conditions, **step).logits, plain)  # zeros: no change
    conditions[0, 17] = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    conditioned = model(inputs, position_conditions=conditions, **step).logits
    assert torch.equal(conditioned[0, [0, 2]], plain[0, [0, 2]])  # queries at other positions are untouched
    assert (conditioned[0, 1] - plain[0, 1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"position_conditions must be \(batch, num_positions, hidden_size\)"):
        model(inputs, position_conditions=torch.zeros(1, 63, hidden), **step)


def test_teacher_forcing_takes_conditions_in_raster_order(base):
    model = base.transformer
    codes, labels = torch.randint(0, 32, (2, 64), generator=torch.Generator().manual_seed(1)), torch.tensor([1, 7])
    conditions = torch.randn(2, 64, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    orders = torch.arange(64).flip(0)
    out = model(codes, class_labels=labels, orders=orders, position_conditions=conditions)
    # query i predicts position orders[i]: the same as giving each step its conditions by hand
    step = model.teacher_forcing_inputs(codes, labels, orders)
    by_hand = model(
        step[0], input_position_ids=step[1], query_position_ids=step[2], position_conditions=conditions
    ).logits
    assert torch.allclose(out.logits, by_hand, atol=1e-5)
    assert not torch.allclose(out.logits, model(codes, class_labels=labels, orders=orders).logits, atol=1e-3)


# ------------------------------------------------------------------------------------------------ adapter


def test_adapter_gives_one_embedding_per_token_and_checks_its_input(base):
    adapter = random_adapter(base)
    out = adapter(torch.rand(3, 1, 32, 48))
    assert out.shape == (3, 8 * 12, base.transformer.config.hidden_size)
    assert torch.allclose(adapter(torch.rand(1, 1, 32, 32), conditioning_scale=0.0), torch.zeros(1, 64, 128))
    with pytest.raises(ValueError, match=r"control_image must be \(batch, 1, height, width\)"):
        adapter(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        adapter(torch.rand(1, 1, 30, 32))
    with pytest.raises(ValueError, match="control_type must be one of"):
        ARPGControlAdapter(output_size=8, patch_size=4, control_type="pose")
    fresh = ARPGControlAdapter(output_size=128, patch_size=4)  # zero projection: starts as "no control"
    assert torch.equal(fresh(torch.rand(1, 1, 32, 32)), torch.zeros(1, 64, 128))


# ------------------------------------------------------------------------------------------------ pipeline


def test_no_control_is_exactly_the_base_pipeline(base, control, edges):
    expected = latents(base)
    assert torch.equal(latents(control, control_image=edges[0], controlnet_conditioning_scale=0.0), expected)
    components = {name: base.components[name] for name in ("transformer", "vqvae", "scheduler")}
    fresh = ARPGControlPipeline(**components, controlnet=ARPGControlAdapter(output_size=128, patch_size=4))
    fresh.set_progress_bar_config(disable=True)
    assert torch.equal(latents(fresh, control_image=edges[0]), expected)  # an untrained (zero) adapter
    controlled = latents(control, control_image=edges[0])
    assert not torch.equal(controlled, expected)
    per_image = latents(control, control_image=[edges[0], edges[1]])
    assert torch.equal(per_image[0], controlled[0]) and not torch.equal(per_image[1], controlled[1])


def test_guidance_drops_the_control_unless_asked(control, edges):
    # guidance 1 uses the conditional half alone, whatever the second half sees
    plain, kept = (
        latents(control, control_image=edges[0], guidance_scale=1.0, unconditional_control=u) for u in (0, 1)
    )
    assert torch.equal(plain, kept)
    plain, kept = (
        latents(control, control_image=edges[0], guidance_scale=4.0, unconditional_control=u) for u in (0, 1)
    )
    assert not torch.equal(plain, kept)


def test_control_image_formats_and_errors(control, edges):
    array = np.array(edges[0])  # uint8 (H, W)
    tensor = torch.from_numpy(array).float()[None, None] / 255
    big = edges[0].resize((96, 96), Image.NEAREST).convert("RGB")  # any size and mode: resized to the canvas
    reference = latents(control, control_image=edges[0])
    assert torch.equal(latents(control, control_image=array), reference)
    assert torch.equal(latents(control, control_image=tensor), reference)
    assert latents(control, control_image=big).shape == (2, 64)
    with pytest.raises(ValueError, match="Got 3 control images for 2 images"):
        latents(control, control_image=edges[:3])
    with pytest.raises(ValueError, match="controlnet_conditioning_scale must be a finite number"):
        latents(control, control_image=edges[0], controlnet_conditioning_scale=float("nan"))
    with pytest.raises(ValueError, match="Pass image and mask_image together"):
        latents(control, control_image=edges[0], image=edges[0])
    bare = ARPGControlPipeline(**dict(control.components, controlnet=None))
    with pytest.raises(ValueError, match="has no controlnet: pass one"):
        latents(bare, control_image=edges[0])


def test_inpainting_under_control_keeps_the_unmasked_tokens(control, base, edges):
    image = base([2], num_inference_steps=8, generator=torch.Generator().manual_seed(0)).images[0]
    mask = np.zeros((32, 32), np.float32)
    mask[:, 16:] = 1  # regenerate the right half
    generator = [torch.Generator().manual_seed(4)]
    tokens = control(
        [2], control_image=edges[0], image=image, mask_image=mask, generator=generator, output_type="latent"
    ).images
    encoded = ARPGInpaintPipeline(**base.components).encode_image(
        ARPGInpaintPipeline(**base.components).preprocess_image(image)
    )
    left = torch.arange(64).reshape(8, 8)[:, :4].flatten()
    assert torch.equal(tokens[0, left], encoded[0, left])
    no_control = control(
        [2],
        control_image=edges[0],
        image=image,
        mask_image=mask,
        controlnet_conditioning_scale=0.0,
        generator=[torch.Generator().manual_seed(4)],
        output_type="latent",
    ).images
    inpainted = ARPGInpaintPipeline(**base.components)(
        image, mask, [2], generator=[torch.Generator().manual_seed(4)], output_type="latent"
    ).images
    assert torch.equal(no_control, inpainted)


def test_saved_control_pipeline_loads_every_way(control, base, edges, tmp_path):
    control.save_pretrained(tmp_path / "control")
    assert (tmp_path / "control" / "controlnet" / "control_adapter.py").is_file()  # the generic loaders' shim
    expected = latents(control, control_image=edges[1])
    loaded = ARPGControlPipeline.from_pretrained(tmp_path / "control")
    assert torch.equal(latents(loaded, control_image=edges[1]), expected)
    generic = DiffusionPipeline.from_pretrained(tmp_path / "control", trust_remote_code=True)
    assert type(generic).__name__ == "ARPGControlPipeline"
    from arpg_hf.model_card import card_for_pipeline

    card = card_for_pipeline(control, repo_id="me/digits-edges").content
    assert 'ARPGControlPipeline.from_pretrained("me/digits-edges")' in card and "`edges` condition" in card
    # a base folder plus an adapter folder
    base.save_pretrained(tmp_path / "base")
    control.controlnet.save_pretrained(tmp_path / "adapter")
    adapter = ARPGControlAdapter.from_pretrained(tmp_path / "adapter")
    adapter.save_pretrained(tmp_path / "adapter-again")  # no record of where it was loaded from
    assert "_name_or_path" not in (tmp_path / "adapter-again" / "config.json").read_text()
    paired = ARPGControlPipeline.from_pretrained(tmp_path / "base", controlnet=adapter)
    assert torch.equal(latents(paired, control_image=edges[1]), expected)


# ------------------------------------------------------------------------------------------------ conditions


def test_canny_edges_trace_the_outline_of_a_shape():
    picture = np.full((32, 32), 255, np.uint8)
    picture[8:24, 8:24] = 0  # a black square on white
    edges = np.asarray(canny_edges(picture)) > 0
    assert edges.shape == (32, 32) and edges.dtype == bool
    ring = np.zeros((32, 32), bool)
    ring[6:26, 6:26] = True
    ring[10:22, 10:22] = False  # within 2 px of the square's border
    assert edges.any() and not edges[~ring].any()
    assert edges[:, 7:9].any() and edges[:, 23:25].any() and edges[7:9].any() and edges[23:25].any()
    assert not (np.asarray(canny_edges(np.full((16, 16), 128, np.uint8))) > 0).any()  # flat: no edges
    assert np.array_equal(np.asarray(compute_control_image(Image.fromarray(picture))), np.asarray(canny_edges(picture)))
    with pytest.raises(ValueError, match="low_threshold <= high_threshold"):
        canny_edges(picture, low_threshold=0.5, high_threshold=0.2)
    with pytest.raises(ValueError, match="ships no depth estimator"):
        compute_control_image(picture, "depth")


def test_depth_maps_become_near_is_white_control_images():
    depth = np.array([[1.0, 2.0], [3.0, 5.0]])
    image = depth_to_control_image(depth, size=(4, 4))
    assert image.mode == "L" and image.size == (4, 4)
    assert np.asarray(depth_to_control_image(depth)).tolist() == [[255, 191], [128, 0]]


# ------------------------------------------------------------------------------------------------ data


def test_crop_choice_picks_the_view_select_crops_takes():
    codes = torch.arange(4 * 3 * 5).reshape(4, 3, 5)
    chosen = select_crops(codes, torch.Generator().manual_seed(7))
    index = crop_choice(codes, torch.Generator().manual_seed(7))
    assert torch.equal(chosen, codes[torch.arange(4), index])


# ------------------------------------------------------------------------------------------------ bundled


def test_bundled_digits_edges_model_follows_its_condition(edges):
    pipe = load_bundled_pipeline("digits-edges")
    assert isinstance(pipe, ARPGControlPipeline) and pipe.controlnet.config.control_type == "edges"
    assert pipe.transformer.dtype == torch.float32 and pipe.controlnet.dtype == torch.float32  # stored in float16
    size = sum(path.stat().st_size for path in Path(bundled_pipeline_path("digits-edges")).rglob("*"))
    assert size <= 5 * 1024 * 1024  # the budget for the bundled control model
    pipe.set_progress_bar_config(disable=True)
    _, test = load_digits_split()
    images = pipe(
        [int(test.labels[i]) for i in range(4)],
        control_image=edges,
        generator=[torch.Generator().manual_seed(i) for i in range(4)],
        output_type="np",
    ).images
    generated = np.stack(
        [np.asarray(canny_edges(Image.fromarray((x * 255).round().astype(np.uint8)))) > 0 for x in images]
    )
    target = np.stack([np.asarray(e) > 0 for e in edges])
    # most condition edges have a generated edge within 2 px (benchmarks/quality_control_digits.py measures this)
    near = np.zeros_like(generated)
    padded = np.pad(generated, ((0, 0), (2, 2), (2, 2)))
    for dy in range(5):
        for dx in range(5):
            near |= padded[:, dy : dy + 32, dx : dx + 32]
    assert (near & target).sum() / target.sum() > 0.6
    with pytest.raises(ValueError, match="the bundled models are digits, digits-edges"):
        load_bundled_pipeline("faces")


# ------------------------------------------------------------------------------------------------ CLI and demo


def test_cli_generates_images_that_follow_a_control_image(control, edges, tmp_path):
    from arpg_hf.cli import main

    control.save_pretrained(tmp_path / "control")
    edges[2].save(tmp_path / "edges.png")
    argv = ["generate", "--class-labels", "4", "--num-inference-steps", "8", "--quiet", "--seed", "5"]
    assert main([*argv, "--model", str(tmp_path / "control"), "--control-image", str(tmp_path / "edges.png"),
                 "--output-dir", str(tmp_path / "out")]) == 0  # fmt: skip
    written = sorted((tmp_path / "out").glob("*.png"))
    assert len(written) == 1
    expected = control([4], control_image=edges[2], num_inference_steps=8, generator=[torch.Generator().manual_seed(5)])
    assert np.array_equal(np.asarray(Image.open(written[0])), np.asarray(expected.images[0]))
    # a base folder and an adapter folder give the same images
    control.controlnet.save_pretrained(tmp_path / "adapter")
    load_bundled_pipeline().save_pretrained(tmp_path / "base")
    assert main([*argv, "--model", str(tmp_path / "base"), "--controlnet", str(tmp_path / "adapter"),
                 "--control-image", str(tmp_path / "edges.png"), "--output-dir", str(tmp_path / "paired")]) == 0  # fmt: skip
    paired = sorted((tmp_path / "paired").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(paired[0])), np.asarray(Image.open(written[0])))


def test_cli_control_errors_are_one_line(tmp_path, capsys):
    from arpg_hf.cli import main

    assert main(["generate", "--class-labels", "1", "--control-image", str(tmp_path / "none.png")]) != 0
    assert "--control-image" in capsys.readouterr().err
    load_bundled_pipeline().save_pretrained(tmp_path / "base")
    Image.new("L", (32, 32)).save(tmp_path / "edges.png")
    code = main(["generate", "--class-labels", "1", "--model", str(tmp_path / "base"), "--control-image",
                 str(tmp_path / "edges.png"), "--output-dir", str(tmp_path / "out")])  # fmt: skip
    assert code != 0 and "has no controlnet/" in capsys.readouterr().err
    assert (
        main(["generate", "--class-labels", "1", "--controlnet", str(tmp_path), "--output-dir", str(tmp_path / "o")])
        != 0
    )
    assert "--controlnet needs --control-image" in capsys.readouterr().err


def test_demo_turns_a_drawn_stroke_into_a_condition(base):
    from space.demo.session import DemoModel

    model = DemoModel(base, control_pipe=ARPGControlPipeline(**dict(base.components, controlnet=random_adapter(base))))
    drawing = Image.new("RGBA", (256, 256), (0, 0, 0, 0))  # a transparent sketchpad with one black bar
    drawing.paste((0, 0, 0, 255), (100, 40, 140, 220))
    events = list(model.stream_control(drawing, 1, 6, 2.0, 3, "arccos"))
    condition, *_ = events[0]
    edges = np.asarray(condition) > 0
    assert condition.size == (32, 32) and edges[:, 11:14].any() and not edges[:, :8].any()
    final = events[-1][3]
    expected = model.control_pipe([1], control_image=condition, num_inference_steps=6, guidance_scale=2.0,
                                  generator=[torch.Generator().manual_seed(3)]).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(final[0]), np.asarray(expected))
    with pytest.raises(ValueError, match="The drawing is empty"):
        list(model.stream_control(Image.new("RGB", (64, 64), "white"), 1, 6, 2.0, 3, "arccos"))
    with pytest.raises(ValueError, match="has no control model"):
        list(DemoModel(base).stream_control(drawing, 1, 6, 2.0, 3, "arccos"))
