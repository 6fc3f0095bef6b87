"""Training: the loss, optimizer groups, reproducible randomness, atomic checkpoints, and train.py end to end
(exact resume, rotation, bad data, the final pipeline folder)."""

import importlib.util
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from arpg_hf import ARPGForImageGeneration, ARPGPipeline
from arpg_hf.token_dataset import TokenDatasetInfo, token_features
from arpg_hf.training_checkpoints import (
    TEMP_CHECKPOINT_PREFIX,
    latest_checkpoint,
    list_checkpoints,
    remove_incomplete_checkpoints,
    resolve_resume_checkpoint,
    save_checkpoint,
)
from arpg_hf.training_utils import (
    arpg_loss,
    derive_seed,
    scale_learning_rate,
    seed_step,
    select_crops,
    weight_decay_param_groups,
)

from .conftest import get_dummy_transformer, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY_PIPELINE = str(ROOT / "tests" / "fixtures" / "tiny-arpg-pipeline")  # its VQ has 16 codes


def load_train_module():
    spec = importlib.util.spec_from_file_location("arpg_train", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_script = load_train_module()


# ----------------------------------------------------------------------------------------------- library pieces


def test_arpg_loss_is_the_model_loss_on_the_chosen_views():
    model = get_dummy_transformer(class_dropout_prob=0.5).train()
    codes = torch.randint(0, 32, (3, 4, 16), generator=torch.Generator().manual_seed(0))  # (B, n_crops, L)
    labels = torch.tensor([0, 4, 2])
    loss = arpg_loss(model, codes, labels, generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    views = select_crops(codes, generator)
    expected = model(views, labels, generator=generator).loss
    assert torch.equal(loss, expected)
    assert torch.equal(loss, arpg_loss(model, codes, labels, generator=torch.Generator().manual_seed(7)))
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_select_crops_takes_one_stored_view_per_image():
    codes = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    views = select_crops(codes, torch.Generator().manual_seed(0))
    for row in range(2):
        assert any(torch.equal(views[row], codes[row, c]) for c in range(3))
    assert torch.equal(select_crops(codes[:, 0]), codes[:, 0])


def test_weight_decay_only_on_matrices():
    model = ARPGForImageGeneration(tiny_config())
    decay, no_decay = weight_decay_param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_learning_rate_scaling_of_the_paper_recipe():
    assert scale_learning_rate(1e-4, 1024) == pytest.approx(4e-4)


def test_step_seeds_are_reproducible_and_distinct():
    draws = lambda step, process: torch.rand(4, generator=seed_step(3, step, process))  # noqa: E731
    assert torch.equal(draws(5, 0), draws(5, 0))
    assert not torch.equal(draws(5, 0), draws(5, 1)) and not torch.equal(draws(5, 0), draws(6, 0))
    seed_step(3, 5, 0)
    first = torch.rand(3)
    seed_step(3, 5, 0)
    assert torch.equal(first, torch.rand(3))  # the global RNG (dropout) is seeded too
    assert derive_seed(0, "a") != derive_seed(1, "a") and 0 <= derive_seed(0, "a") < 2**63


# ----------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_checkpoints_are_atomic_and_rotated(tmp_path, accelerator):
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    for step in (1, 2, 3):
        save_checkpoint(accelerator, str(tmp_path), step, {"global_step": step}, total_limit=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]

    def crash(directory):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(accelerator, str(tmp_path), 4, {"global_step": 4}, write_extra=crash, total_limit=2)
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")  # the half-written one has no final name
    assert remove_incomplete_checkpoints(tmp_path) == [f"{TEMP_CHECKPOINT_PREFIX}4"]
    assert resolve_resume_checkpoint("latest", tmp_path) == str(tmp_path / "checkpoint-3")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-9"), tmp_path)
    del model


# ----------------------------------------------------------------------------------------------- train.py


def write_tokens(directory, num_rows=12, num_tokens=16, n_crops=2, vocab_size=16, num_classes=3, labels=None, seed=0):
    """A token folder as tokenize_dataset.py writes it, with a learnable pattern: codes depend on the class."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels if labels is not None else np.arange(num_rows) % num_classes, dtype=np.int64)
    num_rows = len(labels)
    base = (5 * labels[:, None] + np.arange(num_tokens)[None, :] % 2) % vocab_size  # (N, L): two codes per class
    noise = rng.random((num_rows, n_crops, num_tokens)) < 0.1
    codes = np.where(noise, rng.integers(0, vocab_size, noise.shape), base[:, None, :]).astype(np.int16)
    names = [f"class {i}" for i in range(num_classes)]
    os.makedirs(directory / "data", exist_ok=True)
    rows = datasets.Dataset.from_dict(
        {"codes": codes, "label": labels}, features=token_features(n_crops, num_tokens, names, vocab_size)
    )
    rows.to_parquet(str(directory / "data" / "train-00000-of-00001.parquet"))
    side = int(num_tokens**0.5)
    TokenDatasetInfo(
        grid_height=side,
        grid_width=side,
        codebook_size=vocab_size,
        n_crops=n_crops,
        class_names=names,
        num_samples=num_rows,
    ).save(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_inputs")
    tokens = write_tokens(root / "tokens")
    config_dir = root / "config"
    tiny_config(vocab_size=16, num_classes=3).save_pretrained(config_dir)
    return tokens, config_dir / "config.json"


def tiny_setup_argv(tokens, config, output_dir) -> list[str]:
    """train.py's arguments that every tiny run shares: its tokens, model config, tokenizer, output and batch size."""
    return [
        "--train_data_dir",
        str(tokens),
        "--model_config",
        str(config),
        "--vqvae",
        TINY_PIPELINE,
        "--output_dir",
        str(output_dir),
        "--train_batch_size",
        "2",
    ]


def train_argv(tokens, config, output_dir, *extra) -> list[str]:
    """The command line of a tiny training run (train.py's arguments)."""
    return [
        *tiny_setup_argv(tokens, config, output_dir),
        "--seed",
        "3",
        "--mixed_precision",
        "no",
        "--learning_rate",
        "3e-3",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "2",
        "--logging_steps",
        "1",
        *map(str, extra),
    ]


def train_args(tokens, config, output_dir, *extra):
    return train_script.parse_args(train_argv(tokens, config, output_dir, *extra))


class Interrupt(Exception):
    pass


def test_resumed_run_ends_with_the_same_weights(tiny_run_inputs, tmp_path, monkeypatch):
    tokens, config = tiny_run_inputs
    common = (
        "--max_train_steps",
        6,
        "--checkpointing_steps",
        2,
        "--checkpoints_total_limit",
        2,
        "--gradient_accumulation_steps",
        2,
        "--dropout",
        0.1,
        "--class_dropout_prob",
        0.2,
        "--use_ema",
        "--ema_decay",
        0.9,
    )
    train_script.main(train_args(tokens, config, tmp_path / "full", *common))

    original = train_script.write_checkpoint

    def write_then_crash(args, accelerator, global_step, *rest):
        original(args, accelerator, global_step, *rest)
        if global_step == 4:
            raise Interrupt

    monkeypatch.setattr(train_script, "write_checkpoint", write_then_crash)
    with pytest.raises(Interrupt):
        train_script.main(train_args(tokens, config, tmp_path / "resumed", *common))
    monkeypatch.setattr(train_script, "write_checkpoint", original)
    assert not (tmp_path / "resumed" / "model_index.json").exists()
    train_script.main(train_args(tokens, config, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest"))

    for relative in ("transformer/model.safetensors", "checkpoint-6/model.safetensors"):  # EMA and raw weights
        full, resumed = load_file(tmp_path / "full" / relative), load_file(tmp_path / "resumed" / relative)
        assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6
    checkpoints = sorted(n for n in os.listdir(tmp_path / "resumed") if n.startswith("checkpoint"))
    assert checkpoints == ["checkpoint-4", "checkpoint-6"]
    state = json.loads((tmp_path / "resumed" / "checkpoint-6" / "training_state.json").read_text())
    assert state["global_step"] == 6 and state["micro_step"] == 12 and state["global_batch_size"] == 4


def test_final_folder_is_a_pipeline_and_the_loss_falls(tiny_run_inputs, tmp_path):
    tokens, config = tiny_run_inputs
    out = tmp_path / "run"
    extra = (
        "--max_train_steps",
        12,
        "--checkpointing_steps",
        100,
        "--learning_rate",
        1e-2,
        "--validation_steps",
        5,
        "--validation_inference_steps",
        4,
    )
    train_script.main(train_args(tokens, config, out, *extra))
    metrics = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.2
    assert all(m["tokens_per_second"] > 0 and m["grad_norm"] > 0 and m["lr"] >= 0 for m in metrics)
    assert metrics[1]["lr"] == pytest.approx(1e-2)  # peak after 2 warmup steps
    assert sorted(os.listdir(out / "validation")) == ["step-00000005.png", "step-00000010.png", "step-00000012.png"]
    pipe = ARPGPipeline.from_pretrained(out)
    assert pipe.transformer.config.id2label[2] == "class 2"
    assert pipe.vqvae.config.num_vq_embeddings == 16
    generator = torch.Generator().manual_seed(0)
    tokens_out = pipe([0, 2], num_inference_steps=4, generator=generator, output_type="latent").images
    assert tokens_out.shape == (2, 16)
    generic = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)  # the final folder, generically
    generator = torch.Generator().manual_seed(0)
    assert type(generic) is ARPGPipeline
    generic_tokens = generic([0, 2], num_inference_steps=4, generator=generator, output_type="latent").images
    assert torch.equal(generic_tokens, tokens_out)
    card = (out / "README.md").read_text()
    assert "## Training" in card and "| steps | 12 |" in card


@pytest.mark.parametrize(
    "case, message",
    [
        ("wrong_length", r"codes of shape \(2, 9\).*expects \(n_crops, 16\)"),
        ("wrong_grid", r"tokenized to a 3x3 grid but the model expects 4x4"),
        ("labels_out_of_range", r"labels outside \[0, 3\)"),
        ("empty", "is empty"),
        ("raw_images", "holds images, not tokens"),
    ],
)
def test_bad_data_stops_before_training(tiny_run_inputs, tmp_path, case, message):
    _, config = tiny_run_inputs
    data = tmp_path / "data"
    if case in ("wrong_length", "wrong_grid"):
        write_tokens(data, num_tokens=9)
        if case == "wrong_length":
            os.remove(data / "tokenizer_info.json")  # only the rows tell
    elif case == "labels_out_of_range":
        write_tokens(data, num_classes=5, labels=[0, 1, 4, 2])
        os.remove(data / "tokenizer_info.json")
    elif case == "empty":
        write_tokens(data, num_rows=0, labels=[])
    else:
        from PIL import Image

        os.makedirs(data / "cat")
        Image.new("RGB", (8, 8)).save(data / "cat" / "0.png")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        train_script.main(train_args(data, config, out, "--max_train_steps", 2))
    assert not (out / "logs" / "metrics.jsonl").exists() and not list_checkpoints(out)


def test_missing_tokenizer_is_a_clear_error(tiny_run_inputs, tmp_path):
    tokens, config = tiny_run_inputs
    with pytest.raises(SystemExit):
        train_script.parse_args(
            ["--train_data_dir", str(tokens), "--model_config", str(config), "--output_dir", str(tmp_path)]
        )


def test_training_plan_scales_the_default_learning_rate(tiny_run_inputs, tmp_path):
    tokens, config = tiny_run_inputs
    args = train_script.parse_args(
        [
            "--train_data_dir",
            str(tokens),
            "--model_config",
            "ARPG-L",
            "--vqvae",
            TINY_PIPELINE,
            "--output_dir",
            str(tmp_path),
            "--train_batch_size",
            "128",
            "--lr_warmup_ratio",
            "0.25",
            "--max_train_steps",
            "500000",
        ]
    )
    plan = train_script.training_plan(args, num_samples=1281167, num_processes=8)
    assert plan["global_batch_size"] == 1024 and plan["learning_rate"] == pytest.approx(4e-4)
    assert plan["warmup_steps"] == 125000 and plan["steps_per_epoch"] == 1252


def test_fine_tuning_a_pipeline_keeps_its_tokenizer_and_names_the_classes(tmp_path):
    tokens = write_tokens(tmp_path / "tokens", num_rows=4, num_tokens=6, num_classes=2)  # the fixture's 2x3 grid
    info = TokenDatasetInfo.load(tokens)
    info.grid_height, info.grid_width = 2, 3
    info.save(tokens)
    out = tmp_path / "out"
    train_script.main(
        train_script.parse_args(
            [
                "--train_data_dir",
                str(tokens),
                "--pretrained_model_name_or_path",
                TINY_PIPELINE,
                "--output_dir",
                str(out),
                "--train_batch_size",
                "2",
                "--max_train_steps",
                "2",
                "--learning_rate",
                "1e-2",
                "--mixed_precision",
                "no",
            ]
        )
    )
    base, tuned = ARPGPipeline.from_pretrained(TINY_PIPELINE), ARPGPipeline.from_pretrained(out)
    assert tuned.transformer.config.num_classes == 3
    assert tuned.id2label == {0: "class 0", 1: "class 1", 2: "2"} and tuned.get_label_ids(["class 1"]) == [1]
    assert torch.equal(tuned.vqvae.quantize.embedding.weight, base.vqvae.quantize.embedding.weight)
    assert tuned.scheduler.config.token_schedule == base.scheduler.config.token_schedule == "cosine"
    assert not torch.equal(tuned.transformer.lm_head.weight, base.transformer.lm_head.weight)


def test_a_missing_tracker_is_reported_before_training(tiny_run_inputs, tmp_path, capsys):
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    tokens, config = tiny_run_inputs
    with pytest.raises(SystemExit):
        train_args(tokens, config, tmp_path, "--report_to", "tensorboard")
    assert "needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err
