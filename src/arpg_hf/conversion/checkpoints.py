"""Reading upstream checkpoints and renaming their keys through declarative key maps.

A key map is a list of :class:`KeyRule`. A rule's ``source`` and ``target`` are patterns in which ``{}`` stands
for one integer (a layer or block index), as in gpt-fast's weight maps, e.g.
``KeyRule("layers.self_dec.{}.attn.proj.weight", "self_layers.{}.attn.o_proj.weight")``. Every source key must be
consumed by exactly one rule (or be listed as ignorable) and every key the target model expects must be produced;
otherwise :func:`convert_state_dict` raises one error listing all offenders.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from safetensors.torch import load_file

# Containers in which upstream training scripts wrap their state dicts.
WRAPPER_KEYS = ("model", "module", "state_dict")
# Prefixes added by DistributedDataParallel and torch.compile.
STRIPPED_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class KeyRule:
    """One entry of a declarative key map.

    Args:
        source (`str`): upstream key pattern; each ``{}`` matches one non-negative integer.
        target (`str`): our key pattern with the same number of ``{}`` (filled in the same order).
        transform (`Callable[[torch.Tensor], torch.Tensor]`, *optional*): applied to the tensor, e.g. a reshape.
    """

    source: str
    target: str
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        if self.source.count("{}") != self.target.count("{}"):
            raise ValueError(
                f"KeyRule {self.source!r} -> {self.target!r}: both patterns need the same number of '{{}}'."
            )
        pattern = "^" + re.escape(self.source).replace(re.escape("{}"), r"(\d+)") + "$"
        object.__setattr__(self, "_regex", re.compile(pattern))

    def rename(self, key: str) -> str | None:
        """Returns the target key for ``key``, or None when the rule does not match it."""
        match = self._regex.match(key)
        if match is None:
            return None
        return self.target.format(*match.groups())


def load_reference_state_dict(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reads an upstream checkpoint: a path (a torch pickle loaded with ``weights_only=True``, or a ``.safetensors``
    file) or an in-memory state dict.

    Accepts a raw state dict or one wrapped under ``"model"``, ``"module"`` or ``"state_dict"``, and strips the
    ``module.`` / ``_orig_mod.`` prefixes that DDP and torch.compile add.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint_file(os.fspath(checkpoint))
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"Expected a state dict (a mapping of names to tensors), got {type(checkpoint).__name__}.")
    for wrapper in WRAPPER_KEYS:
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
            checkpoint = checkpoint[wrapper]
            break
    state_dict = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"Checkpoint entry {key!r} is a {type(value).__name__}, expected a tensor. Pass the model's state dict "
                f"or a dict that holds it under one of {WRAPPER_KEYS}."
            )
        for prefix in STRIPPED_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        state_dict[key] = value
    return state_dict


def read_checkpoint_file(path: str) -> Mapping:
    """Reads a `.safetensors` file or a torch pickle restricted to tensors and containers (`weights_only=True`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file {path!r} does not exist.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"Checkpoint file {path!r} is empty; download it again.")
    try:
        if path.endswith(".safetensors"):
            return load_file(path, device="cpu")
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise for the user
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and safetensors raise several types for unreadable or unsafe files
        raise ValueError(f"Cannot read checkpoint {path!r}: {_explain_read_error(path, error)}") from error


def _explain_read_error(path: str, error: Exception) -> str:
    """One sentence on why a checkpoint could not be read and what to do, from torch's / safetensors' error."""
    text = str(error)
    blocked = re.search(r"GLOBAL ([\w.]+)", text)
    if blocked is not None:
        return (
            f"it contains a pickled Python object ({blocked.group(1)}) instead of tensors, and unpickling it could run "
            "code, so it was refused. A checkpoint must hold only tensors and plain containers "
            "(torch.save(model.state_dict())) or be a .safetensors file."
        )
    if path.endswith(".safetensors"):
        return f"not a valid .safetensors file ({type(error).__name__}: {text.splitlines()[0] if text else ''}); it is truncated or corrupt, download it again."
    if isinstance(error, EOFError) or "zip archive" in text or "central directory" in text:
        return "the file is truncated or corrupt (not a complete torch.save archive); download it again."
    return (
        "not a torch checkpoint of tensors (it cannot be unpickled with weights_only=True, which never runs code); "
        "the file is corrupt or of another format. Expected a state dict saved with torch.save or a .safetensors file."
    )


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    key_map: Iterable[KeyRule],
    expected_keys: Iterable[str],
    ignored_source_keys: Iterable[str] = (),
    name: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Renames ``state_dict`` through ``key_map``; fails listing every unconsumed, duplicate or missing key.

    Args:
        state_dict: upstream tensors by upstream name.
        key_map: the rules; the first rule that matches a key wins.
        expected_keys: every key the target model's ``state_dict()`` holds.
        ignored_source_keys: upstream keys that are dropped on purpose (e.g. training-only buffers).
        name: how the checkpoint is called in error messages.
    """
    rules = list(key_map)
    ignored = set(ignored_source_keys)
    converted: dict[str, torch.Tensor] = {}
    unconsumed, duplicates = [], []
    for key, tensor in state_dict.items():
        if key in ignored:
            continue
        for rule in rules:
            target = rule.rename(key)
            if target is not None:
                break
        else:
            unconsumed.append(key)
            continue
        if target in converted:
            duplicates.append(target)
        converted[target] = rule.transform(tensor) if rule.transform is not None else tensor
    expected = set(expected_keys)
    missing = sorted(expected - set(converted))
    unexpected = sorted(set(converted) - expected)
    problems = []
    if unconsumed:
        problems.append(f"{len(unconsumed)} key(s) matched no rule: {abbreviate(sorted(unconsumed))}")
    if duplicates:
        problems.append(f"{len(duplicates)} target key(s) produced twice: {abbreviate(sorted(duplicates))}")
    if missing:
        problems.append(f"{len(missing)} expected key(s) missing: {abbreviate(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} converted key(s) the model does not have: {abbreviate(unexpected)}")
    if problems:
        raise ValueError(
            f"Cannot convert {name}: " + "; ".join(problems) + ". Check that the checkpoint and the configuration "
            "describe the same architecture (layer counts, model family)."
        )
    return converted


def abbreviate(items: list, limit: int = 6) -> str:
    """`items` as a list literal, cut after `limit` entries with a count of the rest (keeps errors to a few lines)."""
    if len(items) <= limit:
        return str(list(items))
    shown = ", ".join(repr(item) for item in items[:limit])
    return f"[{shown}, ... and {len(items) - limit} more]"


def check_shapes(converted: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], name: str) -> None:
    """Raises one ValueError listing every tensor whose shape differs from the model's."""
    mismatched = [
        f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(reference[key].shape)}"
        for key, tensor in converted.items()
        if tuple(tensor.shape) != tuple(reference[key].shape)
    ]
    if mismatched:
        raise ValueError(
            f"Cannot load {name}: {len(mismatched)} tensor shape(s) differ from the configuration: "
            f"{abbreviate(mismatched)}. "
            "Pass the configuration the checkpoint was trained with."
        )
