"""train.py under a real 2-process `accelerate launch` on CPU (gloo DDP), and a SIGKILL-and-resume run (about a
minute on 2 cores)."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from arpg_hf import ARPGPipeline
from arpg_hf.training_checkpoints import list_checkpoints

from .conftest import TWO_PROCESS_LAUNCH, tiny_config
from .test_training import tiny_setup_argv, write_tokens

pytestmark = pytest.mark.slow  # not in the fast run (-m 'not slow'): multi-process training launches

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = TWO_PROCESS_LAUNCH


def launch_command(tokens, config, output_dir, *extra, launch=LAUNCH):
    """`launch` (default: two DDP processes) of train.py on the tiny setup, plus `extra` arguments."""
    return [
        *launch,
        str(ROOT / "train.py"),
        *tiny_setup_argv(tokens, config, output_dir),
        "--learning_rate",
        "1e-2",
        "--seed",
        "0",
        "--mixed_precision",
        "no",
        "--logging_steps",
        "1",
        "--dropout",
        "0.1",
        *map(str, extra),
    ]


def launch_env():
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def kill_once_checkpointed(command, output_dir: Path, checkpoint: str = "checkpoint-4") -> None:
    """Starts `command` (a launch of train.py) and SIGKILLs the launcher as soon as `output_dir/checkpoint` exists."""
    process = subprocess.Popen(
        command, env=launch_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while not (output_dir / checkpoint).is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # the launcher; its workers follow it (exit_with_launcher)
    process.wait()
    time.sleep(2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    tiny_config(vocab_size=16, num_classes=3).save_pretrained(root / "config")
    return write_tokens(root / "tokens", num_rows=16), root / "config" / "config.json"


def test_two_processes_train_on_different_rows(inputs, tmp_path):
    tokens, config = inputs
    out = tmp_path / "out"
    extra = ("--max_train_steps", 8, "--checkpointing_steps", 2, "--checkpoints_total_limit", 2)
    command = launch_command(tokens, config, out, *extra)
    result = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = dict(re.findall(r"process (\d)/2: first micro-batch rows (\[[\d, ]+\])", result.stderr))
    assert set(rows) == {"0", "1"} and not set(json.loads(rows["0"])) & set(json.loads(rows["1"]))
    metrics = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 8 and metrics[-1]["loss"] < metrics[0]["loss"]
    assert [step for step, _ in list_checkpoints(out)] == [6, 8]
    pipe = ARPGPipeline.from_pretrained(out)
    assert pipe.transformer.config.num_classes == 3


def test_sigkill_and_resume_match_an_uninterrupted_run(inputs, tmp_path):
    tokens, config = inputs
    extra = ("--max_train_steps", 12, "--checkpointing_steps", 4, "--checkpoints_total_limit", 2)
    full = subprocess.run(
        launch_command(tokens, config, tmp_path / "full", *extra),
        env=launch_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert full.returncode == 0, full.stderr[-4000:]

    out = tmp_path / "killed"
    kill_once_checkpointed(launch_command(tokens, config, out, *extra), out)
    assert not (out / "model_index.json").exists()
    resumed = subprocess.run(
        launch_command(tokens, config, out, *extra, "--resume_from_checkpoint", "latest"),
        env=launch_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resumed from" in resumed.stderr
    a = load_file(tmp_path / "full" / "transformer" / "model.safetensors")
    b = load_file(out / "transformer" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert [step for step, _ in list_checkpoints(out)] == [8, 12]
    assert not [n for n in os.listdir(out) if n.startswith(".")]
