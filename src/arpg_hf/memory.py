"""Memory guards: what a call will need, estimated before anything is allocated, against what it may use.

The estimates count the large tensors a call allocates, from the configurations alone:

* decoding: the static key/value cache (`2 * batch` rows for classifier-free guidance, one key and one value per
  Pass-1 layer plus the shared Pass-2 pair, `1 + tokens` slots of `hidden_size`), and the activations of the largest
  step (its inputs and queries through the widest layer, the float32 logits and their sampling copies);
* decoding to pixels: the VQ decoder's activations at full resolution (about `6 * block_out_channels[0]` float32
  values per pixel, measured: 20-25 bytes per pixel and channel on CPU), and the output images;
* training: parameters, gradients and AdamW's two moments, plus the activations of a batch (see `training_memory`).

The budget ([`memory_budget`]) is the memory the device has free, and on the CPU at most half of the machine's (these
machines have no swap: a call that takes the rest leaves the kernel's OOM killer to choose a victim). The environment
variable `ARPG_HF_MAX_MEMORY` (e.g. `20GB`) sets the budget instead. A call whose estimate exceeds it is refused with
[`InsufficientMemoryError`], one line that names the estimate, the budget and the setting to change.
"""

from __future__ import annotations

import os
import re

MAX_MEMORY_ENV = "ARPG_HF_MAX_MEMORY"
CPU_SHARE = 0.5  # of the machine's memory, the most one call plans to use on the CPU
DEVICE_SHARE = 0.9  # of an accelerator's free memory (allocator fragmentation, the CUDA context)
VQ_VALUES_PER_PIXEL_AND_CHANNEL = 6  # live float32 tensors at full resolution while the VQ decoder runs
STEP_WIDTH_FACTOR = 4  # live (rows, width) tensors of one decoding step: residual, normed input, gate / up, output
LOGIT_COPIES = 4  # conditional / unconditional logits, the guided ones, the sampling probabilities
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


class InsufficientMemoryError(MemoryError, ValueError):
    """A call would need more memory than its budget; raised before anything large is allocated."""


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def parse_bytes(text: str) -> int:
    """`"20GB"`, `"512 MiB"` or a plain number of bytes -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match and match.group(2).upper()
    if match is None or unit not in _UNITS:
        raise ValueError(f"{MAX_MEMORY_ENV}={text!r} is not a size; write e.g. 20GB, 512MiB or a number of bytes.")
    return int(float(match.group(1)) * _UNITS[unit])


def _meminfo() -> dict[str, int]:
    values = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                name, _, rest = line.partition(":")
                values[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), when one is set."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as file:
                text = file.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def memory_budget(device=None) -> tuple[int, str]:
    """The bytes a call on `device` may plan to use, and how that was decided (for messages)."""
    override = os.environ.get(MAX_MEMORY_ENV)
    if override:
        return parse_bytes(override), f"{MAX_MEMORY_ENV}={override}"
    device = str(device or "cpu")
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        return int(free * DEVICE_SHARE), f"{format_bytes(free)} free on {device} (of {format_bytes(total)})"
    info = _meminfo()
    total = min(filter(None, (info.get("MemTotal"), _cgroup_limit())), default=None)
    available = info.get("MemAvailable")
    if total is None or available is None:  # not Linux: physical memory from sysconf, no notion of "available"
        try:
            total = available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return 2**62, "unknown (no memory information on this system)"
    budget = int(min(available, total * CPU_SHARE))
    return budget, f"{format_bytes(available)} available, at most half of {format_bytes(total)}"


def check_memory(required: int, what: str, advice: str, device=None) -> None:
    """Raises [`InsufficientMemoryError`] when `required` bytes exceed the budget of `device`."""
    budget, source = memory_budget(device)
    if required > budget:
        raise InsufficientMemoryError(
            f"{what} needs about {format_bytes(required)} of memory, more than this call may use ({format_bytes(budget)}: "
            f"{source}). {advice}, or set {MAX_MEMORY_ENV} (e.g. {MAX_MEMORY_ENV}=64GB) if the machine has more."
        )


# ------------------------------------------------------------------------------------------------- estimates


def decoding_memory(
    config, batch_size: int, num_tokens: int, max_step_tokens: int, num_known: int = 0, dtype_bytes: int = 4
) -> int:
    """Bytes the decoding loop allocates: the cache and the largest step.

    Args:
        config ([`ARPGConfig`]): the transformer's configuration.
        batch_size (`int`): images decoded together (the loop runs `2 * batch_size` rows for guidance).
        num_tokens (`int`): tokens to generate per image; `num_known` more are known (editing) and fill the cache too.
        max_step_tokens (`int`): the most tokens one step predicts (and the next step feeds back).
        dtype_bytes (`int`, *optional*, defaults to 4): bytes per element of the model's dtype.
    """
    rows = 2 * batch_size
    slots = 1 + num_tokens + num_known
    cache = (2 * config.num_self_attention_layers + 2) * rows * slots * config.hidden_size * dtype_bytes
    width = max(config.hidden_size, config.intermediate_size)
    step_rows = rows * max(max_step_tokens, 1 + num_known)  # the prefill feeds the class and the known tokens
    activations = STEP_WIDTH_FACTOR * step_rows * width * dtype_bytes
    logits = LOGIT_COPIES * rows * max_step_tokens * config.vocab_size * 4  # float32
    return cache + activations + logits


def vq_decoding_memory(vqvae, batch_size: int, height: int, width: int) -> int:
    """Bytes of decoding `batch_size` images of `height` x `width` pixels (float32) and the output images."""
    pixels = batch_size * height * width
    channels = vqvae.config.block_out_channels[0]
    return pixels * (VQ_VALUES_PER_PIXEL_AND_CHANNEL * channels + 2 * vqvae.config.out_channels) * 4


def generation_memory(
    pipeline, batch_size: int, grid_size: tuple[int, int], max_step_tokens: int, num_known: int = 0
) -> int:
    """The peak of one pipeline call: decoding tokens, then decoding them to pixels (the cache is freed between)."""
    rows, cols = grid_size
    transformer, vqvae = pipeline.transformer, pipeline.vqvae
    dtype_bytes = next(transformer.parameters()).element_size()
    decoding = decoding_memory(
        transformer.config, batch_size, rows * cols - num_known, max_step_tokens, num_known, dtype_bytes
    )
    factor = vqvae.downsample_factor
    return max(decoding, vq_decoding_memory(vqvae, batch_size, rows * factor, cols * factor))


# ------------------------------------------------------------------------------------------------- training

ADAMW_STATE_BYTES = 8  # AdamW's two moments, float32, per parameter
LAYER_HIDDEN_VALUES = 14  # values per token one layer keeps for the backward pass, per unit of hidden_size ...
LAYER_INTERMEDIATE_VALUES = 3  # ... plus these per unit of intermediate_size (SwiGLU: gate, up, their product)
OUTSIDE_LAYER_VALUES = 8  # per token and unit of hidden_size outside the layers: embeddings, norms, shared key/value
TRAINING_LOGIT_COPIES = 3  # float32 logits (and their cast from bf16 / fp16), their log-softmax, their gradients


def _num_parameters(config) -> int:
    """The transformer's parameter count, from a copy built on the meta device (nothing allocated)."""
    import torch

    from .modeling_arpg import ARPGForImageGeneration

    with torch.device("meta"):
        model = ARPGForImageGeneration(config)
    return sum(parameter.numel() for parameter in model.parameters())


def training_memory(
    config,
    batch_size: int,
    seq_len: int,
    use_ema: bool,
    gradient_checkpointing: bool,
    dtype_bytes: int = 4,
    activation_bytes: int | None = None,
    num_shards: int = 1,
) -> int:
    """Bytes one training step of the transformer needs on one process: its weights and their training state, plus the
    activations of a micro-batch.

    With `P` parameters, `T = batch_size * seq_len` tokens, `N` layers (Pass-1 and Pass-2), hidden size `h`,
    intermediate size `i`, vocabulary `V`, `w = dtype_bytes` and `a = activation_bytes`:

    * state: `P * (w + w + 8 + (w if use_ema else 0)) / num_shards`: weights, gradients, AdamW's two float32 moments
      and the EMA copy (FSDP / ZeRO-3 split all of them over `num_shards` processes);
    * activations, without checkpointing: `T * (a * (N * (14 h + 3 i) + 8 h) + 3 * 4 * V)`: what each layer keeps
      for the backward pass (attention runs fused and keeps no `seq_len x seq_len` scores), what lies outside the
      layers, and three float32 copies of the logits (cast, log-softmax, gradient), all live when the backward pass
      starts;
    * activations, with `gradient_checkpointing`: `T * (a * (N + 8) * h + max(a * (14 h + 3 i), 3 * 4 * V))`: each
      layer keeps only its input; the logits are freed before the first layer is recomputed.

    The factors come from measurements on CPU (float32, `h = 512`, `i = 2.7 h`, 8 layers, 256 tokens, batches of 8 to
    128, with and without checkpointing and EMA): autograd keeps about 22 values of `h` per token and layer, and the
    estimate came out 3-13 % above the peak resident memory of a training step when freed tensors go back to the
    system (`MALLOC_MMAP_THRESHOLD_=65536`). glibc's default allocator keeps freed blocks: peaks measured up to 1.6x
    the estimate with checkpointing at small batches. So this counts the tensors, a floor for what a step takes: the
    guard refuses what cannot fit. The tokenizer, the data and framework overheads (CUDA context, allocator caches)
    are not counted.

    Args:
        config ([`ARPGConfig`]): the transformer's configuration.
        batch_size (`int`): images per process per micro-step (`--train_batch_size`).
        seq_len (`int`): tokens per image (`config.num_image_tokens`).
        use_ema (`bool`): whether an EMA copy of the weights is kept.
        gradient_checkpointing (`bool`): whether the layers recompute their activations in the backward pass.
        dtype_bytes (`int`, *optional*, defaults to 4): bytes per element of the weights, their gradients and the EMA
            (mixed precision keeps float32 weights).
        activation_bytes (`int`, *optional*): bytes per element of the activations (2 under bf16 / fp16 autocast);
            defaults to `dtype_bytes`.
        num_shards (`int`, *optional*, defaults to 1): processes the weights and their state are sharded over.
    """
    activation_bytes = activation_bytes or dtype_bytes
    parameters = _num_parameters(config)
    state = parameters * (2 * dtype_bytes + ADAMW_STATE_BYTES + (dtype_bytes if use_ema else 0)) // max(num_shards, 1)
    layers = config.num_self_attention_layers + config.num_cross_attention_layers
    hidden = config.hidden_size
    per_layer = (LAYER_HIDDEN_VALUES * hidden + LAYER_INTERMEDIATE_VALUES * config.intermediate_size) * activation_bytes
    logits = TRAINING_LOGIT_COPIES * 4 * config.vocab_size
    if gradient_checkpointing:
        per_token = (layers + OUTSIDE_LAYER_VALUES) * hidden * activation_bytes + max(per_layer, logits)
    else:
        per_token = layers * per_layer + OUTSIDE_LAYER_VALUES * hidden * activation_bytes + logits
    return state + batch_size * seq_len * per_token
