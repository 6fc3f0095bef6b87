"""ControlARPG data and training: tokenize_dataset.py --control_type edges, train_control.py (frozen decoder,
checkpoints, resume), and the folder it writes."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from arpg_hf import ARPGControlPipeline, canny_edges
from arpg_hf.bundled import bundled_pipeline_path
from arpg_hf.digits import export_image_folder, load_digits_split, render_digits
from arpg_hf.token_dataset import collate_token_batch, load_token_dataset
from arpg_hf.training_checkpoints import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]


def load_script(path):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tokenize_dataset = load_script("pipelines/tokenize_dataset.py")
train_control = load_script("train_control.py")


@pytest.fixture(scope="module")
def digits_tokens(tmp_path_factory):
    train, _ = load_digits_split()
    subset = type(train)(train.pixels[:24], train.labels[:24], train.indices[:24])
    images = tmp_path_factory.mktemp("digits")
    export_image_folder(subset, images)
    out = tmp_path_factory.mktemp("tokens")
    argv = ["--image_dir", images, "--vqvae", bundled_pipeline_path(), "--output_dir", out, "--resolution", "32"]
    tokenize_dataset.main(
        tokenize_dataset.parse_args([str(a) for a in argv + ["--no_flip", "--control_type", "edges"]])
    )
    return out, subset


def test_tokenization_stores_each_views_edge_map(digits_tokens):
    tokens, subset = digits_tokens
    dataset, info = load_token_dataset(tokens)
    assert info.extra["control_type"] == "edges" and dataset.features["control"].shape == (1, 32, 32)
    # rows follow the sorted file names, class folder by class folder; the first is the first "0" of the subset
    first = int(np.flatnonzero(subset.labels == 0)[0])
    expected = np.asarray(canny_edges(render_digits(subset.pixels[first : first + 1])[0]))
    batch = collate_token_batch([dataset.with_format("numpy")[0]])
    assert batch["controls"].shape == (1, 1, 32, 32) and batch["controls"].dtype == torch.uint8
    assert np.array_equal(batch["controls"][0, 0].numpy(), expected)


def run_training(tokens, output, steps, *extra, base_model=None):
    argv = [
        "--base_model",
        str(base_model or bundled_pipeline_path()),
        "--train_data_dir",
        str(tokens),
        "--output_dir",
        str(output),
        "--train_batch_size",
        "4",
        "--max_train_steps",
        str(steps),
        "--checkpointing_steps",
        "3",
        "--logging_steps",
        "2",
        "--lr_warmup_steps",
        "1",
        "--block_channels",
        "16",
        *extra,
    ]
    train_control.main(train_control.parse_args(argv))


def test_training_writes_a_control_pipeline_and_resumes(digits_tokens, tmp_path):
    tokens, _ = digits_tokens
    run_training(tokens, tmp_path / "full", 6)
    pipe = ARPGControlPipeline.from_pretrained(tmp_path / "full")
    assert pipe.controlnet.config.block_channels == 16 and pipe.controlnet.config.control_type == "edges"
    assert pipe.controlnet.proj_out.weight.abs().max() > 0  # trained away from the zero start
    base = load_file(Path(bundled_pipeline_path()) / "transformer" / "model.safetensors")
    saved = load_file(tmp_path / "full" / "transformer" / "model.safetensors")
    assert all(torch.equal(base[name], saved[name]) for name in base)  # the decoder stayed frozen
    summary = json.loads((tmp_path / "full" / "training_summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_loss"] > 0
    assert "train_control.py" in (tmp_path / "full" / "README.md").read_text()

    # three steps, then the rest from checkpoint-3: the same adapter as the uninterrupted run
    run_training(tokens, tmp_path / "split", 3)
    assert [step for step, _ in list_checkpoints(tmp_path / "full")] == [3]
    run_training(tokens, tmp_path / "split", 6, "--resume_from_checkpoint", "latest")
    full = load_file(tmp_path / "full" / "controlnet" / "diffusion_pytorch_model.safetensors")
    split = load_file(tmp_path / "split" / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert max((full[name] - split[name]).abs().max().item() for name in full) <= 1e-6

    # a control pipeline as the base: its adapter (here with the decoder) is trained further
    run_training(tokens, tmp_path / "more", 2, "--train_base", "--block_channels", "32", base_model=tmp_path / "full")
    more = ARPGControlPipeline.from_pretrained(tmp_path / "more")
    assert more.controlnet.config.block_channels == 16  # the adapter it started from, not a new one
    further = load_file(tmp_path / "more" / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert max((further[name] - full[name]).abs().max().item() for name in full) > 0
    tuned = load_file(tmp_path / "more" / "transformer" / "model.safetensors")
    assert any(not torch.equal(tuned[name], saved[name]) for name in saved)  # --train_base moved the decoder


def test_training_data_without_condition_maps_is_refused(tmp_path):
    train, _ = load_digits_split()
    export_image_folder(type(train)(train.pixels[:10], train.labels[:10], train.indices[:10]), tmp_path / "images")
    argv = ["--image_dir", tmp_path / "images", "--vqvae", bundled_pipeline_path(), "--output_dir", tmp_path / "tok"]
    tokenize_dataset.main(tokenize_dataset.parse_args([str(a) for a in argv + ["--resolution", "32", "--no_flip"]]))
    with pytest.raises(ValueError, match="no 'control' column.*--control_type edges"):
        run_training(tmp_path / "tok", tmp_path / "out", 2)
