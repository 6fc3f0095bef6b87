"""Every write appears complete or not at all: PNGs of `arpg-hf generate`, pipeline folders of `save_pretrained`,
killed at random points (tests/fault_injection.py), and the cleanup of what interrupted writes leave."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from arpg_hf import ARPGPipeline
from arpg_hf.atomic_io import remove_stale_staging, staged_folder, write_text_atomically

from .fault_injection import kill_runs, random_kills
from .fixtures.build_tiny_pipeline import FIXTURE_DIR

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# Saves two different pipelines into one folder, one after the other, until killed. A folder mixing the transformer
# of one save with the tokenizer of the other would load with lm_head and conv_in from different pipelines.
SAVE_LOOP = """
import sys, torch
from arpg_hf import ARPGPipeline
first = ARPGPipeline.from_pretrained(sys.argv[1])
second = ARPGPipeline.from_pretrained(sys.argv[1], cpu_gemm="default")  # every weight a parameter, to change them
with torch.no_grad():
    for parameter in list(second.transformer.parameters()) + list(second.vqvae.parameters()):
        parameter.add_(1.0)
while True:
    for pipe in (first, second):
        pipe.save_pretrained(sys.argv[2])
"""


def test_files_and_folders_replace_atomically_and_leftovers_go(tmp_path):
    target = tmp_path / "folder"
    with staged_folder(target) as staging:
        (Path(staging) / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with staged_folder(target) as staging:
            (Path(staging) / "a.txt").write_text("two")
            raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "one" and sorted(os.listdir(tmp_path)) == ["folder"]
    # A replacement killed between its two renames: the name is missing, the old version waits aside.
    aside = tmp_path / ".folder.replaced-x1"
    aside.mkdir()
    os.rename(target, aside / "old")
    (tmp_path / ".folder.partial-x2").mkdir()
    remove_stale_staging(target)
    assert (target / "a.txt").read_text() == "one" and sorted(os.listdir(tmp_path)) == ["folder"]
    write_text_atomically(tmp_path / "note.txt", "complete")
    assert (tmp_path / "note.txt").read_text() == "complete" and not list(tmp_path.glob(".note*"))


def test_saving_over_a_folder_keeps_other_variants_and_drops_stale_shards(tmp_path):
    pipe = ARPGPipeline.from_pretrained(FIXTURE_DIR)
    pipe.save_pretrained(tmp_path, variant="fp16")
    pipe.save_pretrained(tmp_path, max_shard_size="2KB")  # the default weights, sharded
    pipe.save_pretrained(tmp_path)  # the default weights again, one file: the shards and their index go
    names = sorted(path.name for path in (tmp_path / "transformer").glob("model*.safetensors*"))
    assert names == ["model.fp16.safetensors", "model.safetensors"]
    assert not [name for name in os.listdir(tmp_path.parent) if name.startswith(f".{tmp_path.name}.")]


@pytest.mark.slow
def test_killed_saves_never_leave_a_mixed_or_half_written_folder(tmp_path):
    folder = tmp_path / "saved"
    command = [sys.executable, "-c", SAVE_LOOP, str(FIXTURE_DIR), str(folder)]
    runs = kill_runs(3)
    report = random_kills(command, folder, runs=runs, max_delay=9.0, seed=0, env=ENV)
    print(f"save_pretrained: {report}")  # the figures, with pytest -rP
    assert report.kills == runs and report.half_written == []  # the loop never ends: every run is killed
    first = ARPGPipeline.from_pretrained(FIXTURE_DIR)
    loaded = ARPGPipeline.from_pretrained(folder)  # the last complete save, of either pipeline
    offsets = {
        torch.round(loaded.transformer.lm_head.weight - first.transformer.lm_head.weight).unique().item(),
        torch.round(loaded.vqvae.encoder.conv_in.weight - first.vqvae.encoder.conv_in.weight).unique().item(),
    }
    assert offsets in ({0.0}, {1.0})  # both components from one save


@pytest.mark.slow
def test_killed_generate_runs_never_leave_a_half_written_png(tmp_path):
    out = tmp_path / "samples"
    command = [
        sys.executable,
        "-m",
        "arpg_hf.cli",
        "generate",
        "--class-labels",
        "0",
        "1",
        "2",
        "3",
        "4",
        "--num-images-per-class",
        "4",
        "--batch-size",
        "2",
        "--num-inference-steps",
        "4",
        "--output-dir",
        str(out),
        "--quiet",
    ]
    start = time.perf_counter()
    assert subprocess.run(command, env=ENV, capture_output=True, timeout=120).returncode == 0
    duration = time.perf_counter() - start  # of an uninterrupted run: the kills land before its end
    shutil.rmtree(out)
    report = random_kills(command, out, runs=kill_runs(3), max_delay=0.95 * duration, seed=1, env=ENV)
    print(f"arpg-hf generate: {report} (a run takes {duration:.1f} s)")  # the figures, with pytest -rP
    assert report.kills >= 1 and report.half_written == []
    assert subprocess.run(command, env=ENV, capture_output=True, timeout=120).returncode == 0  # the rerun completes
    assert len([name for name in os.listdir(out) if name.endswith(".png")]) == 20
    assert not [name for name in os.listdir(out) if name.startswith(".")]
