"""`arpg-hf inpaint` (masks and outpainting) and `--negative-class-labels`, on the bundled digits model."""

import numpy as np
import pytest
import torch
from PIL import Image

from arpg_hf import ARPGInpaintPipeline, ARPGPipeline, load_bundled_pipeline
from arpg_hf.cli import main


@pytest.fixture(scope="module")
def pipe():
    pipe = ARPGInpaintPipeline(**load_bundled_pipeline().components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    """A generated digit (32x32 PNG) and a mask over its bottom half."""
    folder = tmp_path_factory.mktemp("inputs")
    digit = ARPGPipeline(**pipe.components)([3], generator=torch.Generator().manual_seed(0)).images[0]
    digit.save(folder / "digit.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[16:] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_inpaint_matches_the_pipeline_and_keeps_the_unmasked_pixels(pipe, files, tmp_path, capsys):
    assert (
        main(
            [
                "inpaint",
                "--image",
                str(files / "digit.png"),
                "--mask",
                str(files / "mask.png"),
                "--class-labels",
                "3",
                "8",
                "--negative-class-labels",
                "3",
                "--num-inference-steps",
                "4",
                "--paste-back",
                "--output-dir",
                str(tmp_path),
                "--quiet",
            ]
        )
        == 0
    )
    written = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[-1] for p in written] == ["000_3_3.png", "001_8_8.png"]
    digit, mask = Image.open(files / "digit.png"), Image.open(files / "mask.png")
    # The CLI decodes both images as one batch, seeded seed + index; so does the expectation (the VQ decoder's float
    # rounding may depend on the batch size on some CPUs, which can move a pixel by one level).
    generators = [torch.Generator().manual_seed(index) for index in range(2)]
    expected = pipe(
        digit, mask, [3, 8], num_inference_steps=4, paste_back=True, negative_class_labels=[3], generator=generators
    ).images
    for index in range(2):
        assert np.array_equal(pixels(written[index]), np.asarray(expected[index]))
        assert np.array_equal(pixels(written[index])[:16], pixels(files / "digit.png")[:16])  # kept rows pasted back
    assert not np.array_equal(pixels(written[0]), pixels(written[1]))


def test_outpaint_extends_the_canvas(files, tmp_path, capsys):
    assert (
        main(
            [
                "inpaint",
                "--image",
                str(files / "digit.png"),
                "--outpaint",
                "16",
                "0",
                "16",
                "4",
                "--class-labels",
                "3",
                "--num-inference-steps",
                "4",
                "--paste-back",
                "--output-dir",
                str(tmp_path),
                "--quiet",
            ]
        )
        == 0
    )
    (path,) = capsys.readouterr().out.split()
    out = pixels(path)
    assert out.shape == (36, 64, 3)
    assert np.array_equal(out[:32, 16:48], pixels(files / "digit.png"))


def test_generate_with_negative_classes_matches_the_pipeline(tmp_path, capsys):
    assert (
        main(
            [
                "generate",
                "--class-labels",
                "1",
                "--negative-class-labels",
                "7",
                "--num-inference-steps",
                "4",
                "--guidance-scale",
                "3",
                "--output-dir",
                str(tmp_path),
                "--quiet",
            ]
        )
        == 0
    )
    (path,) = capsys.readouterr().out.split()
    expected = load_bundled_pipeline()(
        [1],
        num_inference_steps=4,
        guidance_scale=3.0,
        negative_class_labels=[7],
        generator=[torch.Generator().manual_seed(0)],
    ).images[0]
    assert np.array_equal(pixels(path), np.asarray(expected))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "missing.png", "--mask", "{mask}"], "--image 'missing.png' is not a file"),
        (
            ["--image", "{digit}", "--mask", "{mask}", "--negative-class-labels", "1", "2"],
            "Got 2 --negative-class-labels for 1 classes",
        ),
        (["--image", "{digit}", "--mask", "{small}"], "mask_image is 16x16 pixels"),
        (
            ["--image", "{digit}", "--mask", "{mask}", "--num-inference-steps", "0"],
            "--num-inference-steps must be >= 1",
        ),
    ],
)
def test_user_errors(files, tmp_path, capsys, extra, message):
    Image.new("L", (16, 16)).save(files / "small.png")
    paths = {"digit": files / "digit.png", "mask": files / "mask.png", "small": files / "small.png"}
    argv = [
        "inpaint",
        *[arg.format(**paths) for arg in extra],
        "--class-labels",
        "3",
        "--output-dir",
        str(tmp_path),
        "--quiet",
    ]
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_mask_or_outpaint_is_required(files, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inpaint", "--image", str(files / "digit.png"), "--class-labels", "3"])
    assert exit_info.value.code == 2
    assert "one of the arguments --mask --outpaint is required" in capsys.readouterr().err


def test_model_cpu_offload_hooks_the_inpainting_pipeline_itself(files):
    """The pipeline that runs holds the hooks, so diffusers offloads the models again after each of its calls."""
    from arpg_hf.cli import build_parser, prepare_pipeline

    args = build_parser().parse_args(
        [
            "inpaint",
            "--image",
            str(files / "digit.png"),
            "--mask",
            str(files / "mask.png"),
            "--class-labels",
            "3",
            "--device",
            "cpu",
            "--model-cpu-offload",
        ]
    )
    pipeline = prepare_pipeline(args, ARPGInpaintPipeline)
    assert isinstance(pipeline, ARPGInpaintPipeline) and len(pipeline._all_hooks) == 2
    assert all(hasattr(model, "_hf_hook") for model in (pipeline.transformer, pipeline.vqvae))
