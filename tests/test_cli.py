"""The `arpg-hf` command line: generate (files, sizes, seeds), info, convert, and clear errors."""

import hashlib
import json
import os
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
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (3 * 128, 128)


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
        (["generate", "--model", "{model}", "--class-labels", "10"], "Class labels must lie in [0, 10)"),
        (["generate", "--model", "{model}"], "Pass at least one class"),
        (["generate", "--model", "{model}", "--class-names", "no such class"], "no such class"),
        (["generate", "--model", "{model}", "--class-labels", "1", "--num-inference-steps", "65"], "[1, 64]"),
        (["info", "MISSING"], "is not a folder"),
    ],
)
def test_user_errors_are_one_line_without_traceback(model_dir, tmp_path, capsys, argv, message):
    argv = [arg.replace("{model}", str(model_dir)) for arg in argv] + (
        ["--output-dir", str(tmp_path / "o")] if argv[0] == "generate" else []
    )
    assert main(argv) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading progress bars
    assert message in last_line and last_line.startswith("arpg-hf: error:")


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
