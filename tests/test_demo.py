"""The demo's model calls and pictures (space/demo: session, rendering) on the bundled digits model, and its
gradio_client API (the app served on a local port, and the examples of space/README.md run against it); no browser."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arpg_hf import load_bundled_pipeline
from space.demo.rendering import ORDER_MAP_COLOURS, UNKNOWN_GREY, order_map, render_partial_tokens, stream_decoding
from space.demo.session import DemoModel, preset_mask

from .conftest import free_port


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


# ---------------------------------------------------------------------------------------------- the gradio_client API
README = Path(__file__).resolve().parents[1] / "space" / "README.md"
IMAGE_SIZE = 32  # the bundled digits model
# The API a user sees: every endpoint's parameters, named as a user would type them, with the types view_api lists.
CLASSES = "Literal['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']"
NEGATIVE_CLASSES = "Literal['-1', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9']"
SAMPLING = {"class_label": CLASSES, "steps": "int", "guidance_scale": "float", "seed": "int"}
SCHEDULE = {"token_schedule": "Literal['arccos', 'cosine']"}
EDITOR = "dict(background: filepath | None, layers: list[filepath], composite: filepath | None, id: str | None)"
PRESETS = "Literal['brush strokes', 'left half', 'right half', 'top half', 'bottom half', 'centre square']"
EXPECTED_API = {
    "/generate": SAMPLING,
    "/generate_live": {**SAMPLING, **SCHEDULE, "num_images": "int", "negative_class_label": NEGATIVE_CLASSES},
    "/inpaint": {
        "image": EDITOR,
        "mask_preset": PRESETS,
        **SAMPLING,
        **SCHEDULE,
        "negative_class_label": NEGATIVE_CLASSES,
    },
    "/control": {"drawing": EDITOR, **SAMPLING, **SCHEDULE},
}


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The demo (bundled digits model and its digits-edges control model) served on a free local port."""
    from space.demo.app import build_demo

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))  # the files it serves
        demo = build_demo(load_bundled_pipeline(), load_bundled_pipeline("digits-edges"))
        demo.launch(
            server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True, ssr_mode=False
        )
        yield demo.local_url
        demo.close()


@pytest.fixture(scope="module")
def client(app_url, tmp_path_factory):
    from gradio_client import Client

    return Client(app_url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def image_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def image_pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def check_result(api_name: str, result) -> None:
    """What each endpoint returns, for the bundled digits model (as space/README.md describes it)."""
    if api_name == "/generate":
        assert image_size(result) == (IMAGE_SIZE, IMAGE_SIZE)
    elif api_name == "/generate_live":
        live, order, gallery = result
        assert image_size(live) == (256, 256) and image_size(order) == (256, 256)
        assert gallery and all(image_size(item["image"]) == (IMAGE_SIZE, IMAGE_SIZE) for item in gallery)
        assert all(" · seed " in item["caption"] for item in gallery)
    elif api_name == "/inpaint":
        mask, live, order, inpainted = result
        assert image_size(mask) == (256, 256) and image_size(inpainted) == (IMAGE_SIZE, IMAGE_SIZE)
    else:
        condition, live, image = result
        assert api_name == "/control" and image_size(condition) == (256, 256)
        assert image_size(image) == (IMAGE_SIZE, IMAGE_SIZE)


def test_api_lists_clean_parameter_names_and_types(client):
    info = client.view_api(return_format="dict", print_info=False)
    assert not info["unnamed_endpoints"]  # every endpoint has an api_name; the UI-only events are not listed
    listed = {
        api_name: {p["parameter_name"]: p["python_type"]["type"] for p in endpoint["parameters"]}
        for api_name, endpoint in info["named_endpoints"].items()
    }
    assert listed == EXPECTED_API  # names and their order, and types
    for api_name, endpoint in info["named_endpoints"].items():
        assert endpoint["description"], api_name
        for name in listed[api_name]:
            assert name.isidentifier() and not name.startswith("_") and not name.endswith("_") and "__" not in name
        for returned in endpoint["returns"]:
            name = returned["label"].lower()
            assert "=" not in name and "  " not in name, (api_name, name)  # readable return names too
        for parameter in endpoint["parameters"]:  # a listed choice is of the listed JSON type, and so is the default
            if "enum" in parameter["type"]:
                assert parameter["type"]["type"] == "string", parameter
                assert all(isinstance(value, str) for value in parameter["type"]["enum"]), parameter
                assert parameter["parameter_default"] in parameter["type"]["enum"], parameter


def test_every_endpoint_takes_its_listed_choices_and_defaults(client, tmp_path):
    """Each endpoint called with the last listed value of every choice parameter and the listed default of the rest."""
    from gradio_client import handle_file

    stroke = Image.new("RGB", (64, 64), "white")
    stroke.paste((0, 0, 0), (8, 28, 56, 36))
    stroke.save(tmp_path / "stroke.png")
    required = {"drawing": {"background": None, "layers": [], "composite": handle_file(str(tmp_path / "stroke.png"))}}
    info = client.view_api(return_format="dict", print_info=False)
    for api_name, endpoint in info["named_endpoints"].items():
        arguments = {}
        for parameter in endpoint["parameters"]:
            name = parameter["parameter_name"]
            if "enum" in parameter["type"]:
                arguments[name] = parameter["type"]["enum"][-1]  # e.g. class_label '9', mask_preset 'centre square'
            elif not parameter["parameter_has_default"]:
                arguments[name] = required[name]
        check_result(api_name, client.predict(**arguments, api_name=api_name))


def readme_examples() -> list[str]:
    """The ```python blocks of space/README.md that call the API."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [block for block in blocks if "api_name=" in block]


def test_readme_has_one_example_per_endpoint_and_each_runs(client, app_url, tmp_path, monkeypatch):
    examples = readme_examples()
    documented = [re.findall(r'api_name="(/\w+)"', example)[-1] for example in examples]
    assert sorted(documented) == sorted(EXPECTED_API)  # one example per endpoint, each ending in its own call
    monkeypatch.chdir(tmp_path)  # files the examples write (the stroke of /control)
    for api_name, example in zip(documented, examples):
        assert re.search(r'^client = Client\("[\w-]+/[\w-]+"\)$', example, flags=re.M), example  # a Space id
        code = re.sub(r'Client\("[\w-]+/[\w-]+"\)', "Client(APP_URL, verbose=False, download_files=DOWNLOADS)", example)
        namespace = {"APP_URL": app_url, "DOWNLOADS": str(tmp_path)}
        exec(compile(code, f"space/README.md example of {api_name}", "exec"), namespace)  # noqa: S102
        check_result(api_name, namespace["result"])


def test_every_endpoint_takes_the_types_it_lists(client, tmp_path):
    from gradio_client import handle_file

    # /generate: the class as listed ('8'), or the int; the same seed gives the same image
    as_string = client.predict(class_label="8", steps=4, guidance_scale=2.0, seed=3, api_name="/generate")
    as_int = client.predict(class_label=8, steps=4, guidance_scale=2, seed=3, api_name="/generate")
    positional = client.predict("8", 4, 2.0, 3, api_name="/generate")
    assert image_size(as_string) == (IMAGE_SIZE, IMAGE_SIZE)
    assert np.array_equal(image_pixels(as_string), image_pixels(as_int))
    assert np.array_equal(image_pixels(as_string), image_pixels(positional))

    # /generate_live: every listed choice kind, image 1 is /generate's image of the same settings
    live, order, gallery = client.predict(
        class_label="8",
        steps=4,
        guidance_scale=2.0,
        seed=3,
        token_schedule="arccos",
        num_images=2,
        negative_class_label="-1",
        api_name="/generate_live",
    )
    check_result("/generate_live", (live, order, gallery))
    assert [item["caption"] for item in gallery] == ["8 · seed 3", "8 · seed 4"]
    assert np.array_equal(image_pixels(gallery[0]["image"]), image_pixels(as_string))
    _, _, away = client.predict("8", 4, 2.0, 3, "cosine", 1, "1", api_name="/generate_live")
    assert len(away) == 1 and image_size(away[0]["image"]) == (IMAGE_SIZE, IMAGE_SIZE)

    # /inpaint: the mask painted (a layer with mask_preset 'brush strokes') or a preset
    layer = np.zeros((256, 256, 4), dtype=np.uint8)
    layer[:, 128:, 3] = 255  # the right half, painted on an 8x enlarged canvas
    Image.fromarray(layer).save(tmp_path / "mask.png")
    for preset, layers in (("brush strokes", [handle_file(str(tmp_path / "mask.png"))]), ("right half", [])):
        mask, live, order, inpainted = client.predict(
            image={"background": handle_file(as_string), "layers": layers, "composite": None},
            mask_preset=preset,
            class_label="5",
            steps=4,
            guidance_scale=2.0,
            seed=0,
            token_schedule="cosine",
            negative_class_label="8",
            api_name="/inpaint",
        )
        check_result("/inpaint", (mask, live, order, inpainted))
        white = image_pixels(mask)[..., 0] > 127
        assert white[:, 128:].all() and not white[:, :128].any(), preset

    # /control: the drawing as the composite (as the page sends it) or as the background
    stroke = Image.new("RGB", (64, 64), "white")
    stroke.paste((0, 0, 0), (28, 8, 36, 56))
    stroke.save(tmp_path / "stroke.png")
    for drawing in (
        {"composite": handle_file(str(tmp_path / "stroke.png"))},
        {"background": handle_file(str(tmp_path / "stroke.png"))},
    ):
        result = client.predict({"layers": [], **drawing}, "1", 4, 1.0, 0, "arccos", api_name="/control")
        check_result("/control", result)


def test_api_errors_name_the_accepted_values(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(
        AppError, match=r"The class label must be one of '0', '1', \.\.\., '9' \(a string, or the int\), got '10'"
    ):
        client.predict(class_label="10", api_name="/generate")
    with pytest.raises(AppError, match=r"The class label must be one of .*got 'eight'"):
        client.predict(class_label="eight", api_name="/generate")
    with pytest.raises(AppError, match=r"The class label must be one of .*got 3\.0"):
        client.predict(class_label=3.0, api_name="/generate")  # not an int: an error, not class 3
    # The tabs' dropdowns take exactly the listed strings, and say so.
    with pytest.raises(AppError, match=r"Value: 8 is not in the list of choices: \['0', '1', '2'"):
        client.predict(class_label=8, num_images=1, steps=2, api_name="/generate_live")
    with pytest.raises(AppError, match=r"Value: 10 is not in the list of choices: \['-1', '0'"):
        client.predict(negative_class_label="10", num_images=1, steps=2, api_name="/generate_live")
    with pytest.raises(AppError, match="Draw a stroke first"):
        client.predict(drawing={"layers": []}, api_name="/control")
