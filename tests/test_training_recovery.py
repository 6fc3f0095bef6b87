"""Recoverable training: verified checkpoints and the fallback to the newest intact one, the stop on diverged steps,
the atomic final folder (also under random SIGKILLs) and the memory guard that refuses a step before allocating it."""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from arpg_hf import ARPGConfig, ARPGPipeline
from arpg_hf.memory import training_memory
from arpg_hf.training_checkpoints import (
    MANIFEST_NAME,
    CheckpointError,
    checkpoint_problem,
    choose_resume_checkpoint,
    list_checkpoints,
    publish_staged_folder,
    remove_stale_staging,
    save_checkpoint,
    staging_folder,
    write_checkpoint_manifest,
)
from arpg_hf.training_utils import BadStepGuard, TrainingStopped

from .conftest import tiny_config
from .fault_injection import half_written_files, kill_runs, random_kills
from .test_training import TINY_PIPELINE, train_script, write_tokens
from .test_training import train_argv as argv

ROOT = Path(__file__).resolve().parents[1]
# 6 steps, a checkpoint every 2 (kept: all), EMA and dropout: every state file a resume reads.
COMMON = (
    "--max_train_steps",
    6,
    "--checkpointing_steps",
    2,
    "--gradient_accumulation_steps",
    2,
    "--dropout",
    0.1,
    "--use_ema",
    "--ema_decay",
    0.9,
)


def truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def flip_bytes(path: Path) -> None:
    """Flips 16 bytes in the middle of the file (for safetensors: inside the tensor data, the header stays valid)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated model.safetensors": ("model.safetensors", truncate, "model.safetensors is truncated"),
    "truncated optimizer.bin": ("optimizer.bin", truncate, "optimizer.bin is truncated"),
    "truncated ema.pt": ("ema.pt", truncate, "ema.pt is truncated"),
    "truncated lr_scheduler.pt": ("lr_scheduler.pt", truncate, "lr_scheduler.pt is truncated"),
    "truncated training_state.json": ("training_state.json", truncate, "training_state.json is truncated"),
    "flipped bytes in model.safetensors": (
        "model.safetensors",
        flip_bytes,
        "model.safetensors does not match its recorded sha256",
    ),
}


def max_difference(a: Path, b: Path) -> float:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    return max((first[k] - second[k]).abs().max().item() for k in first)


def warnings_of_train_py(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "arpg_train" and r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------------- checkpoint sums


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_checkpoints_record_the_sums_of_every_file_sharded_ones_included(tmp_path, accelerator):
    model = torch.nn.Linear(2, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))

    def write_local(directory):  # the layout of an FSDP checkpoint: sharded model, one EMA shard per process
        os.makedirs(os.path.join(directory, "pytorch_model_fsdp_0"), exist_ok=True)
        Path(directory, "pytorch_model_fsdp_0", "__0_0.distcp").write_bytes(os.urandom(4096))
        Path(directory, "pytorch_model_fsdp_0", ".metadata").write_bytes(b"metadata")
        torch.save({"shadow_params": [torch.ones(3)]}, os.path.join(directory, "ema_rank0.pt"))

    path = Path(save_checkpoint(accelerator, str(tmp_path), 2, {"global_step": 2}, write_local=write_local))
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    expected = {
        "model.safetensors",
        "optimizer.bin",
        "training_state.json",
        "ema_rank0.pt",
        "pytorch_model_fsdp_0/__0_0.distcp",
        "pytorch_model_fsdp_0/.metadata",
    }
    assert expected <= set(manifest["files"]) and MANIFEST_NAME not in manifest["files"]
    assert checkpoint_problem(path) is None
    assert not [name for name in os.listdir(path) if name.startswith(".")]  # no temporary file left behind

    truncate(path / "pytorch_model_fsdp_0" / "__0_0.distcp")
    assert checkpoint_problem(path) == "pytorch_model_fsdp_0/__0_0.distcp is truncated (2,048 of 4,096 bytes)"
    write_checkpoint_manifest(path)  # accepted as it is now
    flip_bytes(path / "ema_rank0.pt")
    assert checkpoint_problem(path) == "ema_rank0.pt does not match its recorded sha256 (its bytes changed on disk)"
    os.remove(path / "ema_rank0.pt")
    assert checkpoint_problem(path) == "ema_rank0.pt is missing"
    (path / MANIFEST_NAME).write_text('{"files": ')
    assert checkpoint_problem(path).startswith(f"{MANIFEST_NAME} is unreadable (JSONDecodeError")
    del model, optimizer


def test_latest_passes_over_damaged_checkpoints_and_an_explicit_one_is_refused(tmp_path, accelerator):
    model = torch.nn.Linear(2, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    for step in (2, 4, 6):
        save_checkpoint(accelerator, str(tmp_path), step, {"global_step": step})
    truncate(tmp_path / "checkpoint-6" / "optimizer.bin")
    flip_bytes(tmp_path / "checkpoint-4" / "model.safetensors")
    choice = choose_resume_checkpoint("latest", tmp_path)
    assert choice.checkpoint == str(tmp_path / "checkpoint-2") and choice.verified
    assert [(Path(p).name, problem.split(" ")[0]) for p, problem in choice.skipped] == [
        ("checkpoint-6", "optimizer.bin"),
        ("checkpoint-4", "model.safetensors"),
    ]
    with pytest.raises(CheckpointError, match=r"checkpoint-6 is damaged: optimizer.bin is truncated \(\d"):
        choose_resume_checkpoint(str(tmp_path / "checkpoint-6"), tmp_path)
    os.remove(tmp_path / "checkpoint-2" / "random_states_0.pkl")
    choice = choose_resume_checkpoint("latest", tmp_path)
    assert choice.checkpoint is None and len(choice.skipped) == 3  # nothing intact: a new run

    os.remove(tmp_path / "checkpoint-2" / MANIFEST_NAME)  # written before checkpoints recorded sums
    choice = choose_resume_checkpoint("latest", tmp_path)
    assert choice.checkpoint == str(tmp_path / "checkpoint-2") and not choice.verified
    (tmp_path / "checkpoint-2" / "training_state.json").write_text("{")
    assert "training_state.json is unreadable" in checkpoint_problem(tmp_path / "checkpoint-2")
    del model, optimizer


# ------------------------------------------------------------------------------------------- train.py resumes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and one that stopped right after writing checkpoint-4 (checkpoints 2 and 4 kept)."""
    root = tmp_path_factory.mktemp("recovery")
    tokens = write_tokens(root / "tokens")
    tiny_config(vocab_size=16, num_classes=3).save_pretrained(root / "config")
    config = root / "config" / "config.json"
    train_script.main(train_script.parse_args(argv(tokens, config, root / "full", *COMMON)))

    original = train_script.write_checkpoint

    def write_then_crash(args, accelerator, global_step, *rest):
        original(args, accelerator, global_step, *rest)
        if global_step == 4:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_script, "write_checkpoint", write_then_crash)
        with pytest.raises(KeyboardInterrupt):
            train_script.main(train_script.parse_args(argv(tokens, config, root / "stopped", *COMMON)))
    assert [step for step, _ in list_checkpoints(root / "stopped")] == [2, 4]
    return SimpleNamespace(tokens=tokens, config=config, full=root / "full", stopped=root / "stopped")


def resume_copy(runs, tmp_path, *extra):
    """A copy of the stopped run, and the command line (a list) that continues it."""
    out = tmp_path / "out"
    shutil.copytree(runs.stopped, out)
    return out, argv(runs.tokens, runs.config, out, *COMMON, *extra)


def assert_matches_the_uninterrupted_run(runs, out):
    for relative in ("transformer/model.safetensors", "checkpoint-6/model.safetensors"):  # EMA and raw weights
        assert max_difference(runs.full / relative, out / relative) <= 1e-6
    assert checkpoint_problem(out / "checkpoint-4") is None  # the damaged one was written again


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_latest_falls_back_to_the_previous_intact_checkpoint(runs, tmp_path, caplog, damage):
    name, harm, problem = DAMAGES[damage]
    out, args = resume_copy(runs, tmp_path, "--resume_from_checkpoint", "latest")
    harm(out / "checkpoint-4" / name)
    caplog.set_level(logging.INFO)
    train_script.main(train_script.parse_args(args))
    warnings = warnings_of_train_py(caplog)
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "checkpoint-4" in warnings[0] and problem in warnings[0] and "resuming from" in warnings[0]
    assert any("Resumed from" in r.getMessage() and r.getMessage().endswith("at step 2.") for r in caplog.records)
    assert_matches_the_uninterrupted_run(runs, out)


def test_checkpoints_written_before_the_sums_still_resume(runs, tmp_path, caplog):
    out, args = resume_copy(runs, tmp_path, "--resume_from_checkpoint", "latest")
    for step in (2, 4):
        os.remove(out / f"checkpoint-{step}" / MANIFEST_NAME)
    caplog.set_level(logging.INFO)
    train_script.main(train_script.parse_args(args))
    warnings = warnings_of_train_py(caplog)
    assert len(warnings) == 1 and "checkpoint-4 records no checksums" in warnings[0], warnings
    assert_matches_the_uninterrupted_run(runs, out)


def test_no_intact_checkpoint_starts_a_new_run(runs, tmp_path, caplog):
    out, args = resume_copy(runs, tmp_path, "--resume_from_checkpoint", "latest")
    truncate(out / "checkpoint-4" / "ema.pt")
    flip_bytes(out / "checkpoint-2" / "optimizer.bin")
    caplog.set_level(logging.INFO)
    train_script.main(train_script.parse_args(args))
    warnings = warnings_of_train_py(caplog)
    assert len(warnings) == 1 and "starting a new run" in warnings[0], warnings
    assert "checkpoint-4: ema.pt is truncated" in warnings[0] and "checkpoint-2: optimizer.bin" in warnings[0]
    assert_matches_the_uninterrupted_run(runs, out)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and "Traceback" not in err, err
    return lines[0]


def test_an_explicit_damaged_checkpoint_is_a_one_line_error(runs, tmp_path, capsys):
    out, args = resume_copy(runs, tmp_path)
    truncate(out / "checkpoint-4" / "ema.pt")
    assert train_script.cli([*args, "--resume_from_checkpoint", str(out / "checkpoint-4")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{out / 'checkpoint-4'} is damaged: ema.pt is truncated" in line
    assert [step for step, _ in list_checkpoints(out)] == [2, 4] and not (out / "model_index.json").exists()


# ------------------------------------------------------------------------------------------- diverged runs


def fake_accelerator(num_processes=1):
    return SimpleNamespace(device=torch.device("cpu"), num_processes=num_processes)


def test_the_guard_skips_non_finite_steps_and_stops_after_n_in_a_row():
    guard, accelerator = BadStepGuard(3), fake_accelerator()
    guard.add_loss(torch.tensor(float("nan")))
    assert guard.end_step(accelerator, torch.tensor(1.0), 1) == ("the loss is not finite", True)
    guard.add_loss(torch.tensor(2.0))
    assert guard.end_step(accelerator, torch.tensor(1.0), 2) == (None, False) and guard.streak == 0  # it recovered
    for step in (3, 4):
        guard.add_loss(torch.tensor(2.0))
        assert guard.end_step(accelerator, torch.tensor(0.0), step) == ("the gradient norm is 0", False)
    guard.add_loss(torch.tensor(2.0))
    with pytest.raises(
        TrainingStopped,
        match=r"step 5: the gradient norm is 0 on 3 optimizer step\(s\) in a row "
        r"\(steps 3-5, --max_bad_steps 3\)",
    ):
        guard.end_step(accelerator, torch.tensor(0.0), 5)

    scaled = BadStepGuard(2, can_skip=False, uses_scaler=True)  # fp16: the scaler's calibration is no bad step
    scaled.add_loss(torch.tensor(2.0))
    assert scaled.end_step(accelerator, torch.tensor(float("inf")), 1) == (None, False)
    off = BadStepGuard(0)
    off.add_loss(torch.tensor(float("nan")))
    assert off.end_step(accelerator, torch.tensor(float("nan")), 1) == (None, False)


def test_a_diverged_run_stops_with_one_line_and_no_final_folder(runs, tmp_path, capsys):
    out = tmp_path / "out"
    command = argv(
        runs.tokens, runs.config, out, "--max_train_steps", 8, "--checkpointing_steps", 1, "--learning_rate", 1e30
    )
    assert train_script.cli(command) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "Training stopped at step" in line and "in a row" in line and "--max_bad_steps 3" in line
    assert not (out / "model_index.json").exists() and not (out / "transformer").exists()
    for _, checkpoint in list_checkpoints(out):  # only the steps before the streak: finite weights
        weights = load_file(Path(checkpoint) / "model.safetensors")
        assert all(torch.isfinite(tensor).all() for tensor in weights.values())


# ------------------------------------------------------------------------------------------- the final folder


def staged_pipeline(out: Path, shift: float) -> str:
    """The tiny pipeline with its head weights shifted by `shift`, written into `out`'s staging folder."""
    pipe = ARPGPipeline.from_pretrained(TINY_PIPELINE)
    with torch.no_grad():
        pipe.transformer.lm_head.weight += shift
    staging = staging_folder(out)
    pipe.save_pretrained(staging)
    Path(staging, "README.md").write_text(f"shift {shift}\n")
    return staging


def crashing_after(calls: int, monkeypatch):
    """Makes the `calls`-th rename / replace / remove raise KeyboardInterrupt; returns the call counter."""
    count = [0]
    for name in ("replace", "rename", "remove"):
        real = getattr(os, name)

        def wrapper(*args, _real=real, **kwargs):
            count[0] += 1
            if count[0] == calls:
                raise KeyboardInterrupt
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, wrapper)
    return count


def test_the_final_folder_appears_complete_or_not_at_all(tmp_path, monkeypatch):
    def previous_run(out):  # a published pipeline beside checkpoints and logs
        shutil.copytree(TINY_PIPELINE, out)
        publish_staged_folder(staged_pipeline(out, 0.0), str(out))
        (out / "checkpoint-2").mkdir()
        (out / "logs").mkdir()

    with monkeypatch.context() as patch:  # how many file-system steps a publication takes
        previous_run(tmp_path / "count")
        staging = staged_pipeline(tmp_path / "count", 1.0)
        count = crashing_after(0, patch)
        publish_staged_folder(staging, str(tmp_path / "count"))
        total = count[0]
    assert total >= 8  # the old index, 3 folders (2 renames each), 2 files, the new index
    base = ARPGPipeline.from_pretrained(TINY_PIPELINE).transformer.lm_head.weight
    for crash in range(1, total + 1):
        out = tmp_path / f"crash-{crash}"
        previous_run(out)
        staging = staged_pipeline(out, 1.0)
        with monkeypatch.context() as patch:
            crashing_after(crash, patch)
            with pytest.raises(KeyboardInterrupt):
                publish_staged_folder(staging, str(out))
        assert half_written_files(out) == []
        if (out / "model_index.json").exists():  # the index is the last to come: all of one version is in place
            shift = 0.0 if crash == 1 else 1.0
            loaded = ARPGPipeline.from_pretrained(out).transformer.lm_head.weight
            assert torch.equal(loaded, base + shift) and (out / "README.md").read_text() == f"shift {shift}\n"
        else:
            assert crash > 1
        assert remove_stale_staging(out) and not [n for n in os.listdir(out) if n.startswith(".")]
        assert (out / "checkpoint-2").is_dir() and (out / "logs").is_dir()


def test_nothing_is_created_before_the_run_is_checked(runs, tmp_path):
    bad = write_tokens(tmp_path / "bad", num_classes=5, labels=[0, 1, 4, 2])
    os.remove(bad / "tokenizer_info.json")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"labels outside \[0, 3\)"):
        train_script.main(train_script.parse_args(argv(bad, runs.config, out, "--max_train_steps", 2)))
    assert not out.exists()


@pytest.mark.slow  # about 25 s: 3 launches of train.py killed at random (ARPG_HF_FAULT_INJECTION_RUNS), one finishes
def test_random_kills_leave_nothing_half_written(runs, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *argv(
            runs.tokens,
            runs.config,
            out,
            "--max_train_steps",
            240,  # runs of about 12 s here, so that every kill (at most 8.5 s in) finds the run still going
            "--checkpointing_steps",
            1,
            "--checkpoints_total_limit",
            2,
            "--use_ema",
            "--validation_steps",
            10,
            "--validation_inference_steps",
            4,
            "--resume_from_checkpoint",
            "latest",
        ),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    kills = finished = 0
    start = time.perf_counter()
    runs = kill_runs(3)
    for seed in range(runs):  # one kill per call, so that the folder is checked after each
        report = random_kills(command, out, runs=1, max_delay=8.5, seed=seed, env=env, cwd=ROOT)
        kills, finished = kills + report.kills, finished + report.finished
        assert report.half_written == [], report
        if (out / "model_index.json").exists():
            assert ARPGPipeline.from_pretrained(out).transformer.config.num_classes == 3
    print(f"\nrandom kills: {kills} killed, {finished} finished, 0 half-written ({time.perf_counter() - start:.0f} s)")
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # the leftovers were cleaned
    assert ARPGPipeline.from_pretrained(out).transformer.config.num_classes == 3
    assert kills >= (runs + 1) // 2


# ------------------------------------------------------------------------------------------- the memory guard


def test_the_training_estimate_counts_state_and_activations():
    config = ARPGConfig.from_preset("ARPG-L")
    state = training_memory(config, 0, 256, use_ema=False, gradient_checkpointing=False)
    num_parameters = state // 16  # weights, gradients, two float32 moments
    assert 250e6 < num_parameters < 400e6 and state % 16 == 0
    assert training_memory(config, 0, 256, use_ema=True, gradient_checkpointing=False) == num_parameters * 20
    assert training_memory(config, 0, 256, use_ema=False, gradient_checkpointing=False, num_shards=4) == state // 4
    full = training_memory(config, 32, 256, use_ema=False, gradient_checkpointing=False)
    checkpointed = training_memory(config, 32, 256, use_ema=False, gradient_checkpointing=True)
    assert state < checkpointed < full / 3
    assert training_memory(config, 64, 256, False, False) - state == 2 * (full - state)  # linear in the batch
    half = training_memory(config, 32, 256, False, False, activation_bytes=2)
    assert half < full and math.isclose(half - state, (full - state) / 2, rel_tol=0.2)


def test_an_impossible_batch_is_refused_in_one_line_before_anything_is_allocated(runs, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *argv(runs.tokens, runs.config, out, "--max_train_steps", 2, "--train_batch_size", 10**7),
    ]
    peak = (
        "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ARPG_HF_MAX_MEMORY", None)
    result = subprocess.run(
        [sys.executable, "-c", peak, *command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr[-4000:]
    line = one_error_line(result.stderr)
    assert "A training step with --train_batch_size 10000000" in line and "needs about" in line
    assert "Lower --train_batch_size" in line and "--gradient_checkpointing" in line
    peak_mib = int(result.stdout.split()[-1]) / 1024  # ru_maxrss: KiB
    assert peak_mib < 1500, peak_mib  # the interpreter, torch and the data: nothing of the batch's size
    assert not out.exists()
