"""Training helpers for ARPG: the loss, reproducible per-step randomness, optimizer groups, the distributed set-up,
and the guard against diverged steps (checkpoints: `arpg_hf.training_checkpoints`).

Everything here works without an `Accelerator` except `BadStepGuard.end_step`, which takes one so that every process
takes part in the decision.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys

import torch
from torch import nn

# Learning rates are quoted per 256 images of global batch (the ARPG recipe: 1e-4 x 1024 / 256 = 4e-4).
REFERENCE_BATCH_SIZE = 256


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


def exit_process(status: int) -> None:
    """Ends a training process with `status`. A worker of a multi-process launch leaves with `os._exit` once its
    output is flushed, skipping the interpreter's teardown.

    By then every file is written, and `accelerator.end_training()` has destroyed the process group. The groups are
    still referenced by the FSDP2 device mesh, and when Python finalization frees them, gloo's worker threads can end
    with "terminate called without an active exception" and SIGABRT. The launcher then reports a finished run as a
    failure. Seen in CI (torch 2.13, accelerate 1.13, FSDP2 on CPU): rank 1 aborted after "Saved the pipeline".
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(status)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


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
    return codes[torch.arange(codes.shape[0], device=codes.device), crop_choice(codes, generator)]  # (B, L)


def crop_choice(codes: torch.Tensor, generator: torch.Generator | None = None) -> torch.LongTensor:
    """The view [`select_crops`] picks for every image of `codes` (batch, n_crops, num_tokens): `(batch,)` on the
    codes' device (use it to pick the same view of data stored beside the codes, e.g. condition maps)."""
    batch_size, n_crops, _ = codes.shape
    choice = torch.randint(n_crops, (batch_size,), generator=generator, device=generator.device if generator else None)
    return choice.to(codes.device)


def arpg_loss(
    model: nn.Module, codes: torch.Tensor, class_labels: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------------- diverged steps


class TrainingStopped(RuntimeError):
    """Training cannot usefully go on (e.g. its loss stayed non-finite); raised on every process at the same step."""


_ADVICE = {
    "non-finite": "Lower the learning rate, check the data, prefer bf16 to fp16 mixed precision, then resume from the "
    "last checkpoint (--resume_from_checkpoint latest)",
    "zero": "The loss no longer depends on the weights (saturated or damaged weights, e.g. from a damaged "
    "checkpoint, or frozen parameters): check the model and the checkpoint it started from",
}


class BadStepGuard:
    """Stops a run that has stopped learning: a non-finite loss (on any process) or gradient norm, or a zero gradient
    norm, on `max_bad_steps` optimizer steps in a row.

    A step with a non-finite loss or gradient norm is skipped (no update, so the weights stay finite) when
    `can_skip`; with fp16 the gradient scaler skips such steps itself and a non-finite gradient norm alone (its
    calibration) is not counted. Checking costs one all-reduce of three numbers and one synchronisation per step.

    Args:
        max_bad_steps (`int`): bad steps in a row that stop the run; 0 turns the guard off.
        can_skip (`bool`, *optional*, defaults to `True`): whether the caller may skip the update of a non-finite step
            (False under DeepSpeed, whose engine steps inside `backward`, and with a gradient scaler).
        uses_scaler (`bool`, *optional*, defaults to `False`): whether an fp16 gradient scaler runs.
        setting (`str`, *optional*, defaults to `"--max_bad_steps"`): the option named in the message.
    """

    def __init__(
        self, max_bad_steps: int, can_skip: bool = True, uses_scaler: bool = False, setting: str = "--max_bad_steps"
    ):
        if max_bad_steps < 0:
            raise ValueError(f"max_bad_steps must be >= 0 (0 turns the check off), got {max_bad_steps}.")
        self.max_bad_steps, self.can_skip, self.uses_scaler = max_bad_steps, can_skip, uses_scaler
        self.setting = setting
        self.streak = 0
        self._non_finite_losses = None  # over the micro-steps of the current optimizer step, on the device (no sync)

    def add_loss(self, loss: torch.Tensor) -> None:
        """Notes one micro-step's loss (no synchronisation)."""
        if self.max_bad_steps:
            flag = (~torch.isfinite(loss.detach().float())).float()
            self._non_finite_losses = flag if self._non_finite_losses is None else self._non_finite_losses + flag

    def _flags(self, accelerator, grad_norm) -> tuple[bool, bool, bool]:
        """(a loss was not finite on some process, the gradient norm is not finite, the gradient norm is 0)."""
        device = accelerator.device
        losses = self._non_finite_losses if self._non_finite_losses is not None else torch.zeros((), device=device)
        if grad_norm is None:  # DeepSpeed without a reported norm
            grad_norm = 1.0
        if hasattr(grad_norm, "full_tensor"):  # a DTensor (FSDP2)
            grad_norm = grad_norm.full_tensor()
        norm = torch.as_tensor(grad_norm, dtype=torch.float32, device=device).detach().reshape(())
        flags = torch.stack([losses.to(device).reshape(()), (~torch.isfinite(norm)).float(), (norm == 0).float()])
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, reduction="sum")
        self._non_finite_losses = None
        return tuple(value > 0 for value in flags.tolist())

    def end_step(self, accelerator, grad_norm, step: int) -> tuple[str | None, bool]:
        """Checks one optimizer step, after clipping and before `optimizer.step()`; call on every process.

        Args:
            accelerator (`Accelerator`): for the device and the all-reduce.
            grad_norm (`torch.Tensor` or `float`, *optional*): the clipped step's total gradient norm.
            step (`int`): the optimizer step being checked (1-based), for the messages.

        Returns:
            `tuple[str | None, bool]`: what is wrong with the step (None when nothing is) and whether to skip its
            update.

        Raises:
            [`TrainingStopped`]: on the `max_bad_steps`-th bad step in a row, the same on every process.
        """
        if not self.max_bad_steps:
            return None, False
        loss_bad, norm_bad, norm_zero = self._flags(accelerator, grad_norm)
        norm_bad = norm_bad and not self.uses_scaler  # the scaler's business
        if loss_bad or norm_bad:
            problem, kind = ("the loss is not finite" if loss_bad else "the gradient norm is not finite"), "non-finite"
        elif norm_zero:
            problem, kind = "the gradient norm is 0", "zero"
        else:
            self.streak = 0
            return None, False
        self.streak += 1
        if self.streak >= self.max_bad_steps:
            first = step - self.streak + 1
            steps = f"step {step}" if first == step else f"steps {first}-{step}"
            raise TrainingStopped(
                f"Training stopped at step {step}: {problem} on {self.streak} optimizer step(s) in a row ({steps}, "
                f"{self.setting} {self.max_bad_steps}); nothing was saved from them. {_ADVICE[kind]}."
            )
        return problem, kind == "non-finite" and self.can_skip
