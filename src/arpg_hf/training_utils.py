"""Training helpers for ARPG: the loss, reproducible per-step randomness, optimizer groups and atomic checkpoints.

Everything here works without an `Accelerator` except `save_checkpoint`, which takes one so that every process
writes its share (sharded FSDP / DeepSpeed states, per-process RNG states) while only the main process finalises.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Callable

import torch
from torch import nn

CHECKPOINT_PREFIX = "checkpoint-"
TEMP_CHECKPOINT_PREFIX = ".tmp-checkpoint-"
TRASH_PREFIX = ".trash-checkpoint-"
TRAINING_STATE_NAME = "training_state.json"
# Learning rates are quoted per 256 images of global batch (the ARPG recipe: 1e-4 x 1024 / 256 = 4e-4).
REFERENCE_BATCH_SIZE = 256

_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


# ---------------------------------------------------------------------------------------------- randomness


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed that depends only on `seed` and `keys` (e.g. `("step", 12, "process", 3)`).

    Seeding from `(seed, step, process)` instead of drawing from one long random stream makes every step's draws
    reproducible on its own, so a resumed run repeats exactly what the uninterrupted run would have drawn.
    """
    text = ":".join(str(part) for part in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def seed_step(seed: int, micro_step: int, process_index: int) -> torch.Generator:
    """Seeds torch's global RNGs (dropout) for one micro-step of one process and returns a CPU generator for the
    step's explicit draws (crop choice, class dropout, orders), seeded from the same triple."""
    step_seed = derive_seed(seed, "step", micro_step, "process", process_index)
    torch.manual_seed(step_seed)  # every device: dropout masks
    return torch.Generator().manual_seed(step_seed)


def exit_with_launcher() -> bool:
    """Makes this process die with its parent when it runs as a worker of `accelerate launch` / `torchrun` (Linux).

    torchrun starts every worker in its own session, so killing the launcher (SIGKILL cannot be forwarded) would
    leave the workers training, and writing checkpoints, beside a resumed run. Returns whether the guard was set.
    A process started from a shell (`python train.py`, `nohup ...`) is left alone.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ and not _parent_is_accelerate_launch():
        return False
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        parent = os.getppid()
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the launcher died before the guard was set
        os._exit(1)
    return True


def enable_fsdp_on_cpu(accelerator) -> bool:
    """Makes a CPU launch with an FSDP config really use FSDP. Call right after creating the `Accelerator`, before
    `prepare`; returns whether it switched.

    accelerate (1.16 at least) turns `ACCELERATE_USE_FSDP=true` into `DistributedType.FSDP` only on accelerators: a
    multi-process CPU run (`ACCELERATE_USE_CPU=1`, gloo) stays `MULTI_CPU` and `prepare` wraps the model in DDP
    without a word. torch's FSDP2 (`fully_shard`) trains on CPU over gloo, so when the launcher asked for FSDP and
    accelerate set up `MULTI_CPU`, this installs the FSDP plugin (built from the launcher's `FSDP_*` settings) in its
    place. FSDP1 is refused on CPU (see the error).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not requested or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    state = accelerator.state
    plugin = getattr(state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise RuntimeError(
            "FSDP1 does not run on CPU here: with torch 2.13 its full state dict gather with offload_to_cpu=True "
            "(what accelerate's get_state_dict and FULL_STATE_DICT checkpoints use) kills rank 0 with SIGSEGV, and "
            "accelerate's device_id 'cpu:0' fails FSDP1's device check. Use fsdp_version: 2 on CPU "
            "(configs/accelerate/fsdp_cpu.yaml)."
        )
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def check_world_size(accelerator) -> None:
    """Stops a run whose processes do not form one group: `accelerate launch --multi_gpu` / `--use_fsdp` without a GPU
    and without `ACCELERATE_USE_CPU=1` starts N processes that each set up a single-process run, and every one of
    them would train alone and write the same output folder."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise RuntimeError(
            f"The launcher started {launched} processes but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}, device {accelerator.device}). Without a GPU, launch with "
            "ACCELERATE_USE_CPU=1 (gloo) or run a single process."
        )


def describe_distributed(accelerator) -> str:
    """A short description of the parallelism in use, e.g. `FSDP2 (SHARDED_STATE_DICT), 2 processes`."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        state_dict_type = getattr(plugin.state_dict_type, "name", plugin.state_dict_type)
        name = f"FSDP{getattr(plugin, 'fsdp_version', 1)} ({state_dict_type})"
    elif kind == DistributedType.DEEPSPEED:
        name = f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    elif kind == DistributedType.NO:
        name = "single process"
    elif kind.value.startswith("MULTI_"):
        name = f"DDP ({kind.value})"
    else:
        name = kind.value
    return f"{name}, {accelerator.num_processes} process(es) on {accelerator.device.type}"


def local_parameters(model: nn.Module) -> list[torch.Tensor]:
    """This process's share of every parameter of a prepared model, as plain tensors that share storage with the
    parameters: the local shard of each FSDP2 `DTensor`, FSDP1's (flat or original, sharded) parameters as they are,
    and the whole parameters under DDP. Elementwise state kept on them (an EMA) follows the sharding."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4: no FSDP2
        return list(model.parameters())
    # to_local() with autograd on keeps `requires_grad`, which diffusers' EMAModel reads to decide between lerp and copy
    with torch.enable_grad():
        return [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]


def _parent_is_accelerate_launch() -> bool:
    """Whether the parent process is `accelerate launch` (its single-process launcher starts a plain child)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            arguments = handle.read().split(b"\0")
    except OSError:
        return False
    if b"accelerate.commands.launch" in arguments:  # python -m accelerate.commands.launch
        return True
    return any(os.path.basename(a) == b"accelerate" for a in arguments[:2]) and b"launch" in arguments[1:3]


# ---------------------------------------------------------------------------------------------- loss


def select_crops(codes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Picks one stored view per image, uniformly at random.

    Args:
        codes (`torch.LongTensor` of shape `(batch, n_crops, num_tokens)` or `(batch, num_tokens)`): VQ indices.
        generator (`torch.Generator`, *optional*): source of the choice (a CPU generator works for any device).

    Returns:
        `torch.LongTensor` of shape `(batch, num_tokens)`.
    """
    if codes.ndim == 2:
        return codes
    if codes.ndim != 3:
        raise ValueError(
            f"codes must be (batch, n_crops, num_tokens) or (batch, num_tokens), got {tuple(codes.shape)}."
        )
    batch_size, n_crops, _ = codes.shape
    choice = torch.randint(n_crops, (batch_size,), generator=generator, device=generator.device if generator else None)
    return codes[torch.arange(batch_size, device=codes.device), choice.to(codes.device)]  # (B, L)


def arpg_loss(model: nn.Module, codes: torch.Tensor, class_labels: torch.Tensor,
              generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """The ARPG training objective on a batch: one random view per image, a random order per image, class dropout
    (in train mode), teacher-forced cross-entropy over every token.

    Args:
        model: an [`ARPGForImageGeneration`] (or a DDP / FSDP wrapper of one).
        codes (`torch.LongTensor` of shape `(batch, n_crops, num_tokens)` or `(batch, num_tokens)`): VQ indices in
            raster order.
        class_labels (`torch.LongTensor` of shape `(batch,)`): class ids in `[0, num_classes)`.
        generator (`torch.Generator`, *optional*): every random draw of the step (view, class dropout, orders).

    Returns:
        `torch.FloatTensor` of shape `()`: the mean cross-entropy.
    """
    input_ids = select_crops(codes, generator)  # (B, L)
    return model(input_ids=input_ids, class_labels=class_labels, generator=generator).loss


# ---------------------------------------------------------------------------------------------- optimizer


def weight_decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on parameters with >= 2 dimensions (matrices, embeddings), none on the rest
    (norm weights, biases)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def scale_learning_rate(
    base_learning_rate: float, global_batch_size: int, reference_batch_size: int = REFERENCE_BATCH_SIZE
) -> float:
    """Linear scaling: `base_learning_rate` is the rate for `reference_batch_size` images per optimizer step."""
    return base_learning_rate * global_batch_size / reference_batch_size


# ---------------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """Complete checkpoints in `output_dir` as `(step, path)`, oldest first. Unfinished ones never carry the
    `checkpoint-N` name: they are written under a temporary name and renamed when complete."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, TRAINING_STATE_NAME)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> str | None:
    """`"latest"` -> the newest complete checkpoint in `output_dir` (None when there is none); a path -> itself,
    checked to be a complete checkpoint."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir)
    if not os.path.isfile(os.path.join(resume_from_checkpoint, TRAINING_STATE_NAME)):
        raise ValueError(
            f"{resume_from_checkpoint} is not a complete checkpoint (no {TRAINING_STATE_NAME}). Pass a "
            f"'{CHECKPOINT_PREFIX}N' folder written by train.py, or 'latest'."
        )
    return resume_from_checkpoint


def _remove_tree(path: str) -> None:
    """Renames `path` out of the checkpoint namespace, then deletes it: a crash mid-delete leaves only trash."""
    parent, name = os.path.split(path.rstrip(os.sep))
    trash = os.path.join(parent, TRASH_PREFIX + name + f"-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Deletes the leftovers of interrupted saves and rotations (temporary and trash folders); returns their names."""
    if not os.path.isdir(output_dir):
        return []
    removed = [n for n in os.listdir(output_dir) if n.startswith((TEMP_CHECKPOINT_PREFIX, TRASH_PREFIX))]
    for name in removed:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return removed


def rotate_checkpoints(output_dir: str | os.PathLike, total_limit: int | None) -> list[str]:
    """Deletes the oldest complete checkpoints until at most `total_limit` remain; returns the deleted paths."""
    if total_limit is None:
        return []
    if total_limit < 1:
        raise ValueError(f"checkpoints_total_limit must be >= 1, got {total_limit}.")
    checkpoints = list_checkpoints(output_dir)
    stale = [path for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]]
    for path in stale:
        _remove_tree(path)
    return stale


def save_checkpoint(
    accelerator,
    output_dir: str,
    step: int,
    training_state: dict,
    write_extra: Callable[[str], None] | None = None,
    total_limit: int | None = None,
    write_local: Callable[[str], None] | None = None,
) -> str:
    """Writes `output_dir/checkpoint-{step}` atomically and rotates old checkpoints. Call on every process.

    Every process writes its part of `accelerator.save_state` into `.tmp-checkpoint-{step}` (and `write_local(tmp_dir)`,
    e.g. its shard of a sharded EMA); the main process then adds `write_extra(tmp_dir)` (EMA, lr schedule, ...) and
    `training_state.json` last, and renames the folder.
    A run killed at any moment leaves either the complete checkpoint or no `checkpoint-{step}` at all.
    """
    final_dir = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    temp_dir = os.path.join(output_dir, f"{TEMP_CHECKPOINT_PREFIX}{step}")
    if accelerator.is_main_process and os.path.isdir(temp_dir):
        shutil.rmtree(temp_dir)
    accelerator.wait_for_everyone()
    accelerator.save_state(temp_dir)
    if write_local is not None:
        write_local(temp_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if write_extra is not None:
            write_extra(temp_dir)
        with open(os.path.join(temp_dir, TRAINING_STATE_NAME), "w") as handle:
            json.dump(training_state, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        if os.path.isdir(final_dir):  # the same step saved again (e.g. after a resume): replace it
            _remove_tree(final_dir)
        os.rename(temp_dir, final_dir)
        rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final_dir


def read_training_state(checkpoint_dir: str | os.PathLike) -> dict:
    with open(os.path.join(checkpoint_dir, TRAINING_STATE_NAME)) as handle:
        return json.load(handle)


def save_torch_state(state: dict, path: str) -> None:
    """Saves a state dict of tensors and plain values, loadable with `torch.load(weights_only=True)`."""
    torch.save(state, path)


def load_torch_state(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
