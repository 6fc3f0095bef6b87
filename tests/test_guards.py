"""Guards before work: the memory estimate refuses a call before anything is allocated, bad values are errors, and a
damaged folder is one line in the CLI."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arpg_hf import ARPGPipeline, load_bundled_pipeline
from arpg_hf.memory import (
    MAX_MEMORY_ENV,
    InsufficientMemoryError,
    decoding_memory,
    format_bytes,
    memory_budget,
    parse_bytes,
)

from .fixtures.build_tiny_pipeline import FIXTURE_DIR

CLI_RUNNER = """
import contextlib, io, json, resource, sys
from arpg_hf.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        status = main(argv)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    results.append([status, [line for line in captured.getvalue().splitlines() if line.strip()], peak])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def pipe():
    pipe = load_bundled_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_cli(argvs, cwd):
    """`arpg-hf ARGV` for each of `argvs`, one after the other in one subprocess (imports once); returns a
    (status, stderr lines, peak RSS of the process so far in GB) per call."""
    import json

    result = subprocess.run(
        [sys.executable, "-c", CLI_RUNNER, json.dumps(argvs)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_memory_units_and_budget(monkeypatch):
    assert parse_bytes("20GB") == 20 * 10**9 and parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")
    assert format_bytes(13.7e9) == "13.7 GB"
    monkeypatch.setenv(MAX_MEMORY_ENV, "3GB")
    assert memory_budget() == (3 * 10**9, f"{MAX_MEMORY_ENV}=3GB")
    monkeypatch.delenv(MAX_MEMORY_ENV)
    budget, source = memory_budget()
    assert 0 < budget and "available" in source
    assert issubclass(InsufficientMemoryError, MemoryError) and issubclass(InsufficientMemoryError, ValueError)


def test_the_decoding_estimate_counts_the_cache(pipe):
    config = pipe.transformer.config  # 4 + 4 layers, width 128
    small, large = (decoding_memory(config, batch, 64, 16) for batch in (1, 100))
    cache = (2 * config.num_self_attention_layers + 2) * 2 * 65 * config.hidden_size * 4
    assert cache < small and large > 99 * small  # linear in the batch
    assert decoding_memory(config, 1, 64, 64) > small  # a larger step needs more


@pytest.mark.parametrize("size", [4096, 65536])
def test_huge_canvases_are_refused_before_any_allocation(pipe, monkeypatch, size):
    monkeypatch.setenv(MAX_MEMORY_ENV, "4GB")
    with pytest.raises(
        InsufficientMemoryError, match=rf"{size}x{size} px .* needs about .*\(4\.0 GB: {MAX_MEMORY_ENV}"
    ):
        pipe([3], height=size, width=size)
    images = pipe([3] * 4, num_inference_steps=4, output_type="np").images  # an ordinary call fits
    assert images.shape == (4, 32, 32, 3)


def test_an_inpainting_canvas_is_refused_before_encoding(pipe, monkeypatch):
    from arpg_hf import ARPGInpaintPipeline

    inpaint = ARPGInpaintPipeline(**pipe.components)
    monkeypatch.setenv(MAX_MEMORY_ENV, "1GB")
    canvas, mask = torch.zeros(1, 3, 2048, 2048), torch.ones(2048, 2048)
    calls = []
    monkeypatch.setattr(inpaint, "encode_image", lambda *args: calls.append(args))
    with pytest.raises(InsufficientMemoryError, match="2048x2048 px"):
        inpaint(canvas, mask, [1])
    assert calls == []


@pytest.mark.parametrize("guidance", [float("nan"), float("inf"), -1.0, 1e308])
def test_non_finite_or_absurd_guidance_is_a_value_error(pipe, guidance):
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 0, finite"):
        pipe([1], guidance_scale=guidance, num_inference_steps=2)


def test_guidance_that_overflows_the_logits_is_a_value_error(pipe):
    # Which step overflows first depends on the positions drawn and on the last bits of the logits (the GEMM kernel):
    # the message names it, whichever it is.
    with pytest.raises(ValueError, match=r"overflows the float32 logits at step [01] \(scale"):
        pipe([1], guidance_scale=3e38, num_inference_steps=2, generator=torch.Generator().manual_seed(0))


def test_cli_refuses_absurd_jobs_in_one_line_without_creating_anything(tmp_path):
    """The acceptance cases: a batch that cannot fit, a job that cannot fit on the disk; guidance NaN."""
    cases = [
        (["--batch-size", "100000", "--class-labels", "1"], "needs about .* Lower --batch-size"),
        (["--num-images-per-class", "10000000000", "--class-labels", "1"], "can take up to .* free on the disk"),
        (["--guidance-scale", "nan", "--class-labels", "1"], "--guidance-scale must be a number >= 0"),
        (["--num-inference-steps", "1000", "--class-labels", "1"], r"\[1, 64\]"),
        (["--top-p", "2", "--class-labels", "1"], r"\(0, 1\]"),
    ]
    (tmp_path / "a-file").write_text("x")
    argvs = [["generate", *argv, "--output-dir", "out", "--quiet"] for argv, _ in cases]
    argvs.append(["generate", "--class-labels", "1", "--output-dir", "a-file"])
    results = run_cli(argvs, cwd=tmp_path)
    for (argv, message), (status, lines, peak) in zip(cases, results):
        assert status == 1 and len(lines) == 1 and lines[0].startswith("arpg-hf: error: "), (argv, lines)
        assert re.search(message, lines[0]), (argv, lines[0])
        assert peak < 2.0, (argv, peak)
    assert not (tmp_path / "out").exists()
    assert results[-1][:2] == [
        1,
        ["arpg-hf: error: --output-dir 'a-file' is an existing file; pass a folder path (it is created)."],
    ]


def damaged_copies(root: Path) -> dict[str, Path]:
    """Copies of the tiny fixture folder with truncated, corrupted and pickle-only transformer weights."""
    weights = "transformer/model.safetensors"
    copies = {name: Path(shutil.copytree(FIXTURE_DIR, root / name)) for name in ("truncated", "corrupt", "pickle")}
    data = (FIXTURE_DIR / weights).read_bytes()
    (copies["truncated"] / weights).write_bytes(data[: len(data) // 2])
    (copies["corrupt"] / weights).write_bytes(data[:8] + b"\xff" * 64 + data[72:])
    from safetensors.torch import load_file

    torch.save(load_file(FIXTURE_DIR / weights), copies["pickle"] / "transformer" / "pytorch_model.bin")
    (copies["pickle"] / weights).unlink()
    return copies


def test_a_damaged_folder_is_one_line_in_the_cli(tmp_path):
    copies = damaged_copies(tmp_path)
    argvs = [
        ["generate", "--model", str(folder), "--class-labels", "1", "--output-dir", "out", "--quiet"]
        for folder in copies.values()
    ]
    for (name, folder), (status, lines, _) in zip(copies.items(), run_cli(argvs, cwd=tmp_path)):
        assert status == 1 and len(lines) == 1, (name, lines)
        assert lines[0].startswith(f"arpg-hf: error: Cannot load the pipeline '{folder}'"), (name, lines[0])
        assert "re-download or re-convert" in lines[0] and not (tmp_path / "out").exists()
    assert ARPGPipeline.from_pretrained(FIXTURE_DIR) is not None  # the original is untouched
