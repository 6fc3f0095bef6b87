"""The demo's model calls and pictures (space/demo: session, rendering) on the bundled digits model, no browser."""

import numpy as np
import pytest
import torch
from PIL import Image

from arpg_hf import load_bundled_pipeline
from space.demo.rendering import ORDER_MAP_COLOURS, UNKNOWN_GREY, order_map, render_partial_tokens, stream_decoding
from space.demo.session import DemoModel, preset_mask


@pytest.fixture(scope="module")
def model():
    return DemoModel(load_bundled_pipeline())


def test_stream_decoding_reports_every_step_and_the_same_result(model):
    pipe = model.pipe
    events = list(
        stream_decoding(
            pipe,
            class_labels=[4],
            num_inference_steps=5,
            guidance_scale=2.0,
            generator=[torch.Generator().manual_seed(3)],
            output_type="latent",
        )
    )
    kinds = [kind for kind, _ in events]
    assert kinds == ["step"] * 5 + ["done"]
    known = [int((tokens >= 0).sum()) for _, (_, tokens) in events[:-1]]
    assert known == sorted(known) and known[-1] == 64 and known[0] >= 1  # the grid fills up, step by step
    expected = pipe([4], 5, 2.0, generator=[torch.Generator().manual_seed(3)], output_type="latent").images
    assert torch.equal(events[-1][1], expected) and torch.equal(events[-2][1][1], expected)
    with pytest.raises(ValueError, match="num_inference_steps must lie in"):
        list(stream_decoding(pipe, class_labels=[4], num_inference_steps=65))


def test_partial_grid_is_grey_where_unknown_and_tinted_where_new(model):
    tokens = torch.full((64,), -1)
    assert np.all(np.asarray(render_partial_tokens(model.pipe, tokens)) == UNKNOWN_GREY)
    tokens[0] = 5  # token (0, 0): pixels [0, 4) x [0, 4)
    plain = np.asarray(render_partial_tokens(model.pipe, tokens, scale=2))
    assert plain.shape == (64, 64, 3)
    assert np.all(plain[8:, :] == UNKNOWN_GREY) and not np.all(plain[:8, :8] == UNKNOWN_GREY)
    tinted = np.asarray(render_partial_tokens(model.pipe, tokens, torch.full((64,), -1), scale=2))
    assert np.array_equal(tinted[8:], plain[8:]) and not np.array_equal(tinted[:8, :8], plain[:8, :8])


def test_order_map_colours_cells_by_step():
    steps = torch.tensor([0, 3, -1, 3])
    picture = np.asarray(order_map(steps, num_steps=4, grid_size=(2, 2), cell=2)).astype(float)
    start, end = ORDER_MAP_COLOURS
    assert picture.shape == (4, 4, 3)
    assert np.allclose(picture[0, 0], start) and np.allclose(picture[0, 2], end, atol=0.5)
    assert np.allclose(picture[2, 0], UNKNOWN_GREY) and np.allclose(picture[3, 3], end, atol=0.5)


def test_generate_and_stream_agree(model):
    image = model.generate(7, 4, 2.0, 5)
    assert image.size == (32, 32)
    frames = list(model.stream_generation(7, 4, 2.0, 5, model.default_token_schedule, 2))
    assert len(frames) == 5 and all(images is None for _, _, images in frames[:-1])
    live, order, images = frames[-1]
    assert np.array_equal(np.asarray(images[0]), np.asarray(image))  # image 0 uses the seed itself
    assert live.size == (256, 256) and order.size == (256, 256) and len(images) == 2


def test_inputs_are_checked_with_clear_messages(model):
    with pytest.raises(ValueError, match=r"class label index must be an integer in \[0, 9\], got 10"):
        model.generate(10, 4, 2.0, 0)
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 64\], got 0"):
        model.generate(1, 0, 2.0, 0)
    with pytest.raises(ValueError, match="guidance scale must be a number >= 0"):
        model.generate(1, 4, -1.0, 0)
    with pytest.raises(ValueError, match="token schedule must be one of"):
        next(model.stream_generation(1, 4, 2.0, 0, "linear", 1))
    with pytest.raises(ValueError, match=r"class label index must be an integer in \[0, 9\], got 3.5"):
        model.generate(3.5, 4, 2.0, 0)  # an error, not class 4
    for guidance in (float("nan"), float("inf"), 1e308):
        with pytest.raises(ValueError, match="guidance scale must be a number >= 0, finite"):
            model.generate(1, 4, guidance, 0)


def test_masks_from_presets_and_brush_layers(model):
    assert preset_mask("right half", 4, 4).tolist() == [[False, False, True, True]] * 4
    assert preset_mask("centre square", 4, 4).sum() == 4
    layer = np.zeros((256, 256, 4), dtype=np.uint8)
    layer[:64, :64, 3] = 255  # a stroke over the top-left quarter of an 8x-enlarged canvas
    mask = np.asarray(model.inpaint_mask([Image.fromarray(layer)], "brush strokes"))
    assert mask.shape == (32, 32) and mask[:8, :8].all() and mask.sum() == 64 * 255
    with pytest.raises(ValueError, match="Paint over the part to regenerate"):
        model.inpaint_mask([Image.fromarray(np.zeros((256, 256, 4), dtype=np.uint8))], "brush strokes")


def test_inpainting_keeps_the_unmasked_tokens(model):
    image = model.generate(2, 4, 2.0, 1)
    frames = list(model.stream_inpainting(image, [], "right half", 5, 4, 2.0, 0, "cosine"))
    mask, _, order, images = frames[-1]
    assert np.asarray(mask)[:, 16:].all() and not np.asarray(mask)[:, :16].any()
    order_pixels = np.asarray(order).reshape(8, 32, 8, 32, 3)[:, 0, :, 0]  # one pixel per token cell
    assert np.all(order_pixels[:, :4] == UNKNOWN_GREY) and not np.any(np.all(order_pixels[:, 4:] == UNKNOWN_GREY, -1))
    assert images[0].size == (32, 32)
    with pytest.raises(ValueError, match="Load an image into the editor first"):
        next(model.stream_inpainting(None, [], "right half", 5, 4, 2.0, 0, "cosine"))


def test_generation_and_inpainting_can_guide_away_from_a_class(model):
    images = list(model.stream_generation(7, 4, 2.0, 5, "cosine", 2, 1))[-1][-1]
    expected = model.pipe(
        [7, 7], 4, 2.0, generator=[torch.Generator().manual_seed(5 + i) for i in range(2)], negative_class_labels=[1, 1]
    ).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, expected))
    with pytest.raises(ValueError, match=r"The class to guide away from \(-1: none\) must be an integer in \[-1, 9\]"):
        next(model.stream_generation(7, 4, 2.0, 5, "cosine", 2, 10))

    image = model.generate(2, 4, 2.0, 1)
    plain = list(model.stream_inpainting(image, [], "right half", 5, 4, 2.0, 0, "cosine"))[-1][-1][0]
    away = list(model.stream_inpainting(image, [], "right half", 5, 4, 2.0, 0, "cosine", 2))[-1][-1][0]
    expected = model.inpaint_pipe(
        image,
        model.inpaint_mask([], "right half"),
        [5],
        num_inference_steps=4,
        guidance_scale=2.0,
        generator=[torch.Generator().manual_seed(0)],
        negative_class_labels=[2],
    ).images[0]
    assert np.array_equal(np.asarray(away), np.asarray(expected))
    assert not np.array_equal(np.asarray(away), np.asarray(plain))
    for bad in (10, -2, 1.5, "2"):
        with pytest.raises(
            ValueError, match=r"The class to guide away from \(-1: none\) must be an integer in \[-1, 9\]"
        ):
            next(model.stream_inpainting(image, [], "right half", 5, 4, 2.0, 0, "cosine", bad))


def test_space_folder_is_self_contained(tmp_path):
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("push_space", root / "space" / "push_space.py")
    push_space = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(push_space)
    folder = Path(push_space.build_space_folder(str(tmp_path / "space")))
    front_matter = (folder / "README.md").read_text().split("---")[1]
    settings = dict(line.split(": ", 1) for line in front_matter.strip().splitlines())
    assert settings["sdk"] == "gradio" and settings["app_file"] == "app.py" and (folder / "app.py").is_file()
    assert (folder / "arpg_hf" / "bundled" / "digits-pipeline" / "model_index.json").is_file()
    assert (folder / "arpg_hf" / "bundled" / "digits-edges-pipeline" / "model_index.json").is_file()  # Control tab
    assert (folder / "arpg_hf" / "metrics" / "evaluate_modules" / "fid" / "fid.py").is_file()
    found = subprocess.run(
        [sys.executable, "-c", "import arpg_hf; print(arpg_hf.__file__)"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )  # app.py's folder comes first on the import path
    assert found.returncode == 0, found.stderr[-2000:]
    assert Path(found.stdout.strip()).resolve() == (folder / "arpg_hf" / "__init__.py").resolve()
    with pytest.raises(ValueError, match="is not empty"):
        push_space.build_space_folder(str(folder))
