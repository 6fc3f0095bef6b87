"""The `arpg-hf` command line: generate (files, sizes, seeds), info, convert, and clear errors."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from arpg_hf.cli import main

from .test_conversion import convert_args


@pytest.fixture(scope="module")
def model_dir(parity_dir, tmp_path_factory):
    """A pipeline folder converted with `arpg-hf convert` (8x8 tokens, 128 px images, 10 classes)."""
    output = tmp_path_factory.mktemp("cli") / "model"
    assert main(["convert", *convert_args(parity_dir, output)]) == 0
    return output


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def generate(model_dir, output_dir, *extra):
    return main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--class-labels",
            "1",
            "2",
            "--num-inference-steps",
            "8",
            "--seed",
            "0",
            "--output-dir",
            str(output_dir),
            "--quiet",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def first_run(model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("first")
    assert generate(model_dir, output) == 0
    return output


def test_generate_writes_one_png_per_label_reproducibly(first_run, model_dir, tmp_path, capsys):
    files = sorted(os.listdir(first_run))
    assert files == ["000_1_1.png", "001_2_2.png"]
    for name in files:
        with Image.open(first_run / name) as image:
            assert image.size == (128, 128) and image.mode == "RGB"
    assert generate(model_dir, tmp_path) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / name) for name in files]
    assert [digest(first_run / f) for f in files] == [digest(tmp_path / f) for f in files]


def test_generate_images_do_not_depend_on_batching_and_grid(first_run, model_dir, tmp_path):
    assert generate(model_dir, tmp_path, "--batch-size", "1", "--grid", "--class-names", "3") == 0
    a, b = sorted(os.listdir(first_run)), sorted(os.listdir(tmp_path))
    assert b == [*a, "002_3_3.png", "grid.png"]
    for name in a:  # same tokens; batched VQ decoding may move a pixel by one level after rounding
        with Image.open(first_run / name) as x, Image.open(tmp_path / name) as y:
            assert np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 1
    with Image.open(tmp_path / "grid.png") as grid:  # one class per row, 4 px apart
        assert grid.size == (128 + 2 * 4, 3 * 128 + 4 * 4)
        pixels = np.asarray(grid)
        assert (pixels[:4] == 255).all() and (pixels[132:136] == 255).all()  # the gaps are white


def test_grid_puts_one_class_per_row_unless_told_the_columns(model_dir, tmp_path):
    args = ["--class-labels", "1", "2", "3", "--num-images-per-class", "2", "--num-inference-steps", "2", "--grid"]
    assert main(["generate", "--model", str(model_dir), *args, "--output-dir", str(tmp_path / "a"), "--quiet"]) == 0
    with Image.open(tmp_path / "a" / "grid.png") as grid:
        assert grid.size == (2 * 128 + 3 * 4, 3 * 128 + 4 * 4)
        row_of_class_2 = np.asarray(grid)[4 + 132 : 4 + 132 + 128, 4 : 4 + 128]
    with Image.open(tmp_path / "a" / "002_2_2.png") as image:  # image 2 = the first of class 2
        assert np.array_equal(row_of_class_2, np.asarray(image))
    columns = ["--grid-columns", "6", "--output-dir", str(tmp_path / "b"), "--quiet"]
    assert main(["generate", "--model", str(model_dir), *args, *columns]) == 0
    with Image.open(tmp_path / "b" / "grid.png") as grid:
        assert grid.size == (6 * 128 + 7 * 4, 128 + 2 * 4)


def test_a_job_of_several_batches_says_how_long_it_will_take(model_dir, tmp_path, capsys):
    assert generate(model_dir, tmp_path, "--batch-size", "1") == 0
    err = capsys.readouterr().err
    assert "2 images in 2 batches of up to 1." in err
    assert re.search(r"the first batch took [0-9.]+ s; about [0-9.]+ s for the rest", err)


def test_durations_read_as_people_say_them():
    from arpg_hf.cli import format_duration

    assert [format_duration(s) for s in (0.42, 12.3, 200, 3600 * 2 + 300, 7200, 1800)] == [
        "0.4 s",
        "12 s",
        "3 min 20 s",
        "2 h 5 min",
        "2 h",
        "30 min",
    ]


def test_info_summarizes_a_folder(model_dir, parity_dir, capsys):
    assert main(["info", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "pipeline class: ARPGPipeline (diffusers" in out
    assert "2 + 2 layers, width 64, 4 heads, grid 8x8" in out
    assert "codebook 512 x 8, downsample 16, images 128x128 px" in out
    assert "F32" in out and "model card: README.md" in out
    assert main(["info", str(model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    import torch

    state = torch.load(parity_dir / "arpg_ref.pt", weights_only=True)["model"]
    assert info["components"]["transformer"]["num_parameters"] == sum(t.numel() for t in state.values())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "MISSING", "--class-labels", "1"], "neither a pipeline folder nor a Hub id"),
        (["generate", "--model", "{model}", "--class-labels", "10"], "--class-labels must lie in [0, 10)"),
        (["generate", "--model", "{model}"], "Pass at least one class with --class-labels or --class-names. This"),
        (["generate", "--model", "{model}"], "classes (id: name): 0: 0, 1: 1, 2: 2,"),
        (
            ["generate", "--model", "{model}", "--class-names", "seven"],
            "--class-names 'seven' is not a class of this model. Valid names: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9.",
        ),
        (["generate", "--model", "{model}", "--class-labels", "1", "--num-inference-steps", "65"], "[1, 64]"),
        (["generate", "--model", "{model}", "--class-labels", "1", "--num-inference-steps", "65"], "--num-inference"),
        (["generate", "--model", "{model}", "--class-labels", "1", "--top-p", "2"], "--top-p must be in (0, 1]"),
        (["generate", "--model", "{model}", "--class-labels", "1", "--temperature", "-1"], "--temperature must be"),
        (["generate", "--model", "{model}", "--class-labels", "1", "--grid-columns", "0"], "--grid-columns must be"),
        (["info", "MISSING"], "is not a folder"),
    ],
)
def test_user_errors_are_one_line_without_traceback(model_dir, tmp_path, capsys, argv, message):
    argv = [arg.replace("{model}", str(model_dir)) for arg in argv] + (
        ["--output-dir", str(tmp_path / "o")] if argv[0] == "generate" else []
    )
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # no loading progress bars or warnings before it
    assert message in err and err.startswith("arpg-hf: error:")
    assert "_" not in err.replace(str(tmp_path), "").replace(str(model_dir), "")  # flags, not Python names


def test_errors_name_the_flags_the_user_typed():
    from arpg_hf.cli import build_parser, with_flag_names

    generate_parser = build_parser().parse_args(["generate"]).command_parser
    message = "`top_p` must be in (0, 1]; num_inference_steps=70 and negative_class_labels; `temperature` (temperature)"
    assert with_flag_names(message, generate_parser) == (
        "--top-p must be in (0, 1]; --num-inference-steps=70 and --negative-class-labels; --temperature (temperature)"
    )


def test_help_and_version_import_neither_torch_nor_the_hugging_face_libraries():
    code = (
        "import sys, contextlib, io\n"
        "from arpg_hf.cli import main\n"
        "for argv in (['--help'], ['--version'], ['generate', '--help'], ['inpaint', '--help'], ['convert', '--help'],"
        " ['info', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'numpy', 'PIL') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_convert_choices_agree_with_the_library():
    from arpg_hf.configuration_arpg import ARPG_PRESETS
    from arpg_hf.conversion.command import DTYPE_CHOICES, PRESETS
    from arpg_hf.conversion.convert import DTYPES

    assert PRESETS == tuple(sorted(ARPG_PRESETS)) and DTYPE_CHOICES == tuple(sorted(DTYPES))


def test_info_lists_the_classes_of_the_bundled_model_by_default(capsys):
    assert main(["info", "--classes"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{i}: {i}" for i in range(10)]


def test_console_script_runs_and_seed_matters(first_run, model_dir, tmp_path):
    executable = shutil.which("arpg-hf")
    command = [executable] if executable else [sys.executable, "-m", "arpg_hf"]
    result = subprocess.run(
        [
            *command,
            "generate",
            "--model",
            str(model_dir),
            "--class-labels",
            "1",
            "--num-inference-steps",
            "8",
            "--seed",
            "1",
            "--output-dir",
            str(tmp_path),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "000_1_1.png")]
    assert digest(tmp_path / "000_1_1.png") != digest(first_run / "000_1_1.png")  # seed 1 vs seed 0


@pytest.mark.parametrize("cpu_gemm", ["onednn", "onednn-packed"])
def test_cpu_gemm_lays_out_the_weights_and_gives_the_same_images(first_run, model_dir, tmp_path, cpu_gemm):
    from arpg_hf.cli import CPU_GEMMS, build_parser, prepare_pipeline
    from arpg_hf.cpu_gemm import CPU_GEMMS as LIBRARY_CPU_GEMMS
    from arpg_hf.cpu_gemm import OneDNNLinear, onednn_available

    assert CPU_GEMMS == LIBRARY_CPU_GEMMS
    args = build_parser().parse_args(
        [
            "generate",
            "--model",
            str(model_dir),
            "--class-labels",
            "1",
            "--device",
            "cpu",
            "--cpu-gemm",
            cpu_gemm,
            "--quiet",
        ]
    )
    head = prepare_pipeline(args).transformer.lm_head
    assert isinstance(head, OneDNNLinear) == (onednn_available() and cpu_gemm == "onednn")
    assert generate(model_dir, tmp_path, "--cpu-gemm", cpu_gemm) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(first_run))


def test_quantization_flag_quantizes_the_decoder_and_writes_the_images(first_run, model_dir, tmp_path):
    from arpg_hf.cli import QUANTIZATIONS, build_parser, prepare_pipeline
    from arpg_hf.quantization import QUANTIZATIONS as LIBRARY_QUANTIZATIONS
    from arpg_hf.quantization import Int8DynamicLinear

    assert QUANTIZATIONS == LIBRARY_QUANTIZATIONS
    args = build_parser().parse_args(
        ["generate", "--model", str(model_dir), "--class-labels", "1", "--device", "cpu", "--quantization", "int8"]
    )
    qkv = prepare_pipeline(args).transformer.model.self_layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Int8DynamicLinear)
    assert generate(model_dir, tmp_path, "--quantization", "int8") == 0
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(first_run))


def test_model_cpu_offload_gives_the_same_images_with_hooks_on_the_models(first_run, model_dir, tmp_path):
    from arpg_hf.cli import build_parser, prepare_pipeline

    args = build_parser().parse_args(
        [
            "generate",
            "--model",
            str(model_dir),
            "--class-labels",
            "1",
            "--device",
            "cpu",
            "--model-cpu-offload",
            "--quiet",
        ]
    )
    pipeline = prepare_pipeline(args)
    assert all(hasattr(model, "_hf_hook") for model in (pipeline.transformer, pipeline.vqvae))
    assert pipeline._execution_device == torch.device("cpu", 0)
    assert generate(model_dir, tmp_path, "--device", "cpu", "--model-cpu-offload") == 0
    files = sorted(os.listdir(first_run))
    assert sorted(os.listdir(tmp_path)) == files
    assert [digest(first_run / f) for f in files] == [digest(tmp_path / f) for f in files]
