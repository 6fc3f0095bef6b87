"""train.py under FSDP2 (`configs/accelerate/fsdp_cpu.yaml`) on 2 CPU processes (gloo): it shards for real, trains the
same weights as DDP, a SIGKILL-and-resume run ends where an uninterrupted one does, and a damaged shard of the newest
checkpoint sends both processes back to the previous one (about 2 minutes on 2 cores). Plus the launch checks, without
processes."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from arpg_hf import ARPGPipeline
from arpg_hf.training_checkpoints import MANIFEST_NAME, list_checkpoints
from arpg_hf.training_utils import check_world_size, enable_fsdp_on_cpu

from .conftest import tiny_config
from .test_training import train_script, write_tokens
from .test_training_distributed import LAUNCH, kill_once_checkpointed, launch_command, launch_env

ROOT = Path(__file__).resolve().parents[1]
FSDP_CPU_CONFIG = ROOT / "configs" / "accelerate" / "fsdp_cpu.yaml"
FSDP_LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--config_file",
    str(FSDP_CPU_CONFIG),
    "--main_process_port",
    "0",
]
# Identical for every run: the EMA (sharded under FSDP), validation mid-run (the EMA is swapped in and back out).
ARGS = (
    "--max_train_steps",
    12,
    "--checkpointing_steps",
    4,
    "--checkpoints_total_limit",
    2,
    "--use_ema",
    "--ema_decay",
    0.9,
    "--validation_steps",
    6,
    "--validation_inference_steps",
    4,
)


def train_command(launch, tokens, config, output_dir, *extra):
    """test_training_distributed's launch of train.py with `launch` and the shared ARGS of this module."""
    return launch_command(tokens, config, output_dir, *ARGS, *extra, launch=launch)


def run(command, timeout=240):
    result = subprocess.run(command, env=launch_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def raw_weights(checkpoint: Path) -> dict:
    """The model weights of a sharded (DCP) FSDP checkpoint, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = checkpoint.parent / f"{checkpoint.name}-model.pt"
    dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", target)
    return torch.load(target, weights_only=True)["model"]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    tiny_config(vocab_size=16, num_classes=3).save_pretrained(root / "config")
    return write_tokens(root / "tokens", num_rows=16), root / "config" / "config.json"


@pytest.mark.slow  # multi-process training launches
def test_fsdp_sigkill_and_resume_match_an_uninterrupted_run_and_ddp(inputs, tmp_path):
    tokens, config = inputs
    full = run(train_command(FSDP_LAUNCH, tokens, config, tmp_path / "full"))
    assert "Parallelism: FSDP2 (SHARDED_STATE_DICT), 2 process(es) on cpu" in full.stderr
    checkpoint = tmp_path / "full" / "checkpoint-12"
    layout = sorted(os.listdir(checkpoint))  # sharded model and optimizer, one EMA shard per process, no full copy
    assert {"pytorch_model_fsdp_0", "optimizer_0", "ema_rank0.pt", "ema_rank1.pt"} <= set(layout), layout
    assert "model.safetensors" not in layout and "ema.pt" not in layout
    assert sorted(os.listdir(checkpoint / "pytorch_model_fsdp_0")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    recorded = set(json.loads((checkpoint / MANIFEST_NAME).read_text())["files"])  # every shard has its sum
    assert {"pytorch_model_fsdp_0/__1_0.distcp", "pytorch_model_fsdp_0/.metadata", "ema_rank1.pt"} <= recorded
    samples = sorted(os.listdir(tmp_path / "full" / "validation"))  # sampled from the gathered weights
    assert samples == ["step-00000006.png", "step-00000012.png"]
    pipe = ARPGPipeline.from_pretrained(tmp_path / "full")
    assert pipe.transformer.config.num_classes == 3
    tokens_out = pipe([0, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert tokens_out.images.shape == (2, 16)

    out = tmp_path / "killed"
    kill_once_checkpointed(train_command(FSDP_LAUNCH, tokens, config, out), out)
    assert not (out / "model_index.json").exists()
    resumed = run(train_command(FSDP_LAUNCH, tokens, config, out, "--resume_from_checkpoint", "latest"))
    assert "Resumed from" in resumed.stderr and "Parallelism: FSDP2" in resumed.stderr
    final = load_file(tmp_path / "full" / "transformer" / "model.safetensors")  # the EMA weights
    assert max_difference(final, load_file(out / "transformer" / "model.safetensors")) <= 1e-6
    assert max_difference(raw_weights(checkpoint), raw_weights(out / "checkpoint-12")) <= 1e-6
    assert [step for step, _ in list_checkpoints(out)] == [8, 12]
    assert not [n for n in os.listdir(out) if n.startswith(".")]

    # A damaged shard of the newest checkpoint: both processes go back to checkpoint-8 and end at the same weights.
    shard = out / "checkpoint-12" / "pytorch_model_fsdp_0" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    fallback = run(train_command(FSDP_LAUNCH, tokens, config, out, "--resume_from_checkpoint", "latest"))
    warnings = [line for line in fallback.stderr.splitlines() if "Skipping damaged" in line]
    assert len(warnings) == 1 and "checkpoint-12: pytorch_model_fsdp_0/__1_0.distcp does not match" in warnings[0]
    assert f"resuming from {out / 'checkpoint-8'}" in warnings[0]
    assert max_difference(final, load_file(out / "transformer" / "model.safetensors")) <= 1e-6
    assert max_difference(raw_weights(checkpoint), raw_weights(out / "checkpoint-12")) <= 1e-6

    # The same run under DDP: FSDP's gradients (reduce-scatter of shards) and sharded EMA give the same weights.
    run(train_command(LAUNCH, tokens, config, tmp_path / "ddp"))
    ddp = load_file(tmp_path / "ddp" / "transformer" / "model.safetensors")
    assert max_difference(final, ddp) <= 1e-4
    assert max_difference(final, {k: torch.zeros_like(v) for k, v in final.items()}) > 0.1  # it did train


# ------------------------------------------------------------------------------------------------ launch checks


def fake_accelerator(distributed_type, num_processes=2, **fsdp):
    plugin = SimpleNamespace(**{"fsdp_version": 2, "use_orig_params": None, **fsdp})
    state = SimpleNamespace(fsdp_plugin=plugin, mixed_precision="no")
    return SimpleNamespace(
        distributed_type=distributed_type, num_processes=num_processes, state=state, device=torch.device("cpu")
    )


def test_fsdp_on_cpu_is_switched_on_only_when_the_launcher_asked(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not enable_fsdp_on_cpu(fake_accelerator(DistributedType.MULTI_CPU))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert not enable_fsdp_on_cpu(fake_accelerator(DistributedType.MULTI_GPU))  # accelerate did it already
    with pytest.raises(RuntimeError, match="FSDP1 does not run on CPU"):
        enable_fsdp_on_cpu(fake_accelerator(DistributedType.MULTI_CPU, fsdp_version=1))


def test_processes_that_did_not_form_a_group_are_stopped(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU=1"):
        check_world_size(fake_accelerator(DistributedType.NO, num_processes=1))
    check_world_size(fake_accelerator(DistributedType.MULTI_CPU, num_processes=2))


def test_fsdp1_without_original_parameters_is_refused():
    args = SimpleNamespace(use_ema=False, train_batch_size=2)
    accelerator = fake_accelerator(DistributedType.FSDP, fsdp_version=1, use_orig_params=False)
    with pytest.raises(ValueError, match="fsdp_use_orig_params: true"):
        train_script.check_distributed_support(args, accelerator)
    accelerator.state.fsdp_plugin.use_orig_params = True
    assert train_script.check_distributed_support(args, accelerator) is True  # sharded: gathered to validate / save
