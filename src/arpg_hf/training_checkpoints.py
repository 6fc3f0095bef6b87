"""Checkpoints of `train.py` that can be trusted: written atomically (every process into a hidden folder, renamed
when complete), listed and rotated, with the size and sha256 of every file so that a resume skips a damaged one, and
the atomic publication of the final pipeline folder beside them.

Everything here works without an `Accelerator` except `save_checkpoint`, which takes one so that every process writes
its share (sharded FSDP / DeepSpeed states, per-process RNG states) while only the main process finalises.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import atomic_io

CHECKPOINT_PREFIX = "checkpoint-"
TEMP_CHECKPOINT_PREFIX = ".tmp-checkpoint-"
TRASH_PREFIX = ".trash-checkpoint-"
TRAINING_STATE_NAME = "training_state.json"
# Size and sha256 of every file of a checkpoint, written last inside the unfinished folder (before the rename).
MANIFEST_NAME = "checksums.json"
MANIFEST_FORMAT = 1
# The final pipeline is written into `output_dir/.final-staging` and moved into place; leftovers start with ".final-".
STAGING_PREFIX = ".final-"
STAGING_NAME = STAGING_PREFIX + "staging"
PIPELINE_INDEX_NAME = "model_index.json"
_HASH_CHUNK_BYTES = 8 * 2**20
_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


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
    """`"latest"` -> the newest intact checkpoint in `output_dir` (None when there is none); a path -> itself,
    checked to be a complete, intact checkpoint ([`CheckpointError`] otherwise). See [`choose_resume_checkpoint`]."""
    return choose_resume_checkpoint(resume_from_checkpoint, output_dir).checkpoint


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
    e.g. its shard of a sharded EMA); the main process then adds `write_extra(tmp_dir)` (EMA, lr schedule, ...),
    `training_state.json` and, last, `checksums.json` (size and sha256 of every file, see
    [`write_checkpoint_manifest`]), and renames the folder.
    A run killed at any moment leaves either the complete checkpoint or no `checkpoint-{step}` at all, and a
    checkpoint damaged later on disk is told from an intact one ([`checkpoint_problem`]).
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
        _write_json_durably(os.path.join(temp_dir, TRAINING_STATE_NAME), training_state)
        write_checkpoint_manifest(temp_dir)  # last: the sums of every file above, each flushed to disk
        if os.path.isdir(final_dir):  # the same step saved again (e.g. after a resume): replace it
            _remove_tree(final_dir)
        os.rename(temp_dir, final_dir)
        _fsync_directory(output_dir)
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


# ---------------------------------------------------------------------------------------------- durable files


def _write_json_durably(path: str, data) -> None:
    """Writes `data` as JSON through a hidden temporary sibling, flushed to disk, then `os.replace`."""
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.partial")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _fsync_directory(path: str) -> None:
    """Flushes a folder's entries (renames) to disk, where the system allows it."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _files_under(folder: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Every file under `folder` as a "/"-separated relative path, sorted, without those in `exclude`."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if relative not in exclude:
                found.append(relative)
    return sorted(found)


def _digest(path: str, sync: bool = False) -> tuple[int, str]:
    """`(size, sha256 hex digest)` of the file at `path`; `sync` flushes it to disk first."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        if sync:
            os.fsync(handle.fileno())
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _digests(folder: str, files: list[str], sync: bool = False) -> dict[str, tuple[int, str]]:
    """`_digest` of several files of `folder` at once (hashlib releases the GIL: threads read the shards in
    parallel)."""
    paths = [os.path.join(folder, *name.split("/")) for name in files]
    workers = max(1, min(8, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(files, pool.map(lambda path: _digest(path, sync), paths)))


# ---------------------------------------------------------------------------------------------- checkpoint sums


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: missing, incomplete or damaged. The message is one line that names the
    checkpoint, the file and what is wrong with it."""


def write_checkpoint_manifest(folder: str | os.PathLike) -> dict:
    """Records the size and sha256 of every file under `folder` (sharded states in sub-folders included) in
    `folder/checksums.json`, flushing each file to disk on the way. Call once every file is written, before the rename
    that publishes the checkpoint; returns the manifest.

    The manifest reads `{"format": 1, "algorithm": "sha256", "files": {"model.safetensors": {"size": ..., "sha256":
    ...}, "pytorch_model_fsdp_0/__0_0.distcp": {...}, ...}}`.
    """
    folder = os.fspath(folder)
    sums = _digests(folder, _files_under(folder, exclude=(MANIFEST_NAME,)), sync=True)
    files = {name: {"size": size, "sha256": digest} for name, (size, digest) in sums.items()}
    manifest = {"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}
    _write_json_durably(os.path.join(folder, MANIFEST_NAME), manifest)
    return manifest


def has_checksums(checkpoint: str | os.PathLike) -> bool:
    """Whether a checkpoint records its files' sums (those written before the sums were recorded do not)."""
    return os.path.isfile(os.path.join(checkpoint, MANIFEST_NAME))


def _read_manifest(checkpoint: str) -> dict:
    """The `files` table of a checkpoint's manifest; ValueError / OSError when it cannot be read."""
    with open(os.path.join(checkpoint, MANIFEST_NAME), encoding="utf-8") as handle:
        manifest = json.load(handle)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    valid = isinstance(files, dict) and all(
        isinstance(r, dict) and isinstance(r.get("size"), int) and isinstance(r.get("sha256"), str)
        for r in files.values()
    )
    if not valid or manifest.get("algorithm") != "sha256":
        raise ValueError("expected {'algorithm': 'sha256', 'files': {name: {'size': int, 'sha256': str}}}")
    return files


def _size_problem(name: str, path: str, expected: int) -> str | None:
    if not os.path.isfile(path):
        return f"{name} is missing"
    size = os.path.getsize(path)
    if size < expected:
        return f"{name} is truncated ({size:,} of {expected:,} bytes)"
    if size > expected:
        return f"{name} has {size:,} bytes where {expected:,} were written"
    return None


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint folder, in a few words that name the file (e.g. `"optimizer.bin is truncated
    (1,024 of 52,311 bytes)"`), or None when every file its `checksums.json` lists is there with its recorded size and
    sha256.

    Sizes are compared first (a truncated file shows at once), then every file is hashed. A checkpoint without
    `checksums.json` (written before the sums were recorded, see [`has_checksums`]) cannot be verified: only its
    `training_state.json` is checked to be readable.
    """
    checkpoint = os.fspath(checkpoint)
    if not has_checksums(checkpoint):
        try:
            read_training_state(checkpoint)
        except (OSError, ValueError) as error:
            return f"{TRAINING_STATE_NAME} is unreadable ({type(error).__name__}: {error})"
        return None
    try:
        files = _read_manifest(checkpoint)
    except (OSError, ValueError) as error:
        return f"{MANIFEST_NAME} is unreadable ({type(error).__name__}: {error})"
    for name, record in sorted(files.items()):
        problem = _size_problem(name, os.path.join(checkpoint, *name.split("/")), record["size"])
        if problem:
            return problem
    try:
        digests = _digests(checkpoint, sorted(files))
    except OSError as error:
        return f"a file is unreadable ({error})"
    for name, (_, digest) in digests.items():
        if digest != files[name]["sha256"]:
            return f"{name} does not match its recorded sha256 (its bytes changed on disk)"
    return None


@dataclass
class ResumeChoice:
    """Where `--resume_from_checkpoint` leads.

    Args:
        checkpoint (`str`, *optional*): the folder to resume from; None starts a new run.
        skipped (`list[tuple[str, str]]`, *optional*, defaults to `[]`): damaged checkpoints passed over, newest
            first, as `(folder, problem)`.
        verified (`bool`, *optional*, defaults to `True`): False for a checkpoint written before checkpoints
            recorded their sums, which could not be verified.
    """

    checkpoint: str | None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    verified: bool = True


def choose_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> ResumeChoice:
    """Picks the checkpoint to resume from and verifies it ([`checkpoint_problem`]).

    Args:
        resume_from_checkpoint (`str`, *optional*): `"latest"` takes the newest intact checkpoint of `output_dir`,
            passing over damaged ones (none intact: a new run); a path must be an intact checkpoint.
        output_dir (`str` or `os.PathLike`): the run's folder.

    Raises:
        [`CheckpointError`]: when an explicit path is not a complete checkpoint or is damaged.
    """
    if resume_from_checkpoint is None:
        return ResumeChoice(None)
    if resume_from_checkpoint != "latest":
        path = resume_from_checkpoint
        if not os.path.isfile(os.path.join(path, TRAINING_STATE_NAME)):
            raise CheckpointError(
                f"{path} is not a complete checkpoint (no {TRAINING_STATE_NAME}). Pass a '{CHECKPOINT_PREFIX}N' "
                "folder written by train.py, or 'latest'."
            )
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(
                f"{path} is damaged: {problem}. Pass an earlier '{CHECKPOINT_PREFIX}N' folder, or "
                "--resume_from_checkpoint latest to take the newest intact one."
            )
        return ResumeChoice(path, verified=has_checksums(path))
    skipped = []
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return ResumeChoice(path, skipped, verified=has_checksums(path))
        skipped.append((path, problem))
    return ResumeChoice(None, skipped)


# ---------------------------------------------------------------------------------------------- final folder


def staging_folder(output_dir: str | os.PathLike) -> str:
    """An empty `output_dir/.final-staging` to write the final folder into (a leftover of a killed run is deleted)."""
    path = os.path.join(output_dir, STAGING_NAME)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
    os.makedirs(path)
    return path


def remove_stale_staging(output_dir: str | os.PathLike) -> list[str]:
    """Deletes what an interrupted final save left: `.final-*` entries (the staging folder, the trash of
    [`publish_staged_folder`]) and the hidden siblings of the staging folder that `save_pretrained` writes through
    (`arpg_hf.atomic_io`). Returns the names of the `.final-*` entries."""
    if not os.path.isdir(output_dir):
        return []
    atomic_io.remove_stale_staging(os.path.join(output_dir, STAGING_NAME))
    stale = sorted(name for name in os.listdir(output_dir) if name.startswith(STAGING_PREFIX))
    for name in stale:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    return stale


def _sync_tree(folder: str) -> None:
    """Flushes every file under `folder` to disk, so that what gets renamed into view is on disk too."""
    for name in _files_under(folder):
        with open(os.path.join(folder, *name.split("/")), "rb") as handle:
            os.fsync(handle.fileno())


def _move_into_place(source: str, target: str, trash: str) -> None:
    """Replaces `target` with `source` by renames: a folder in the way goes to `trash` first, then is deleted."""
    if os.path.isdir(target) and not os.path.islink(target):
        os.rename(target, trash)
        os.replace(source, target)
        shutil.rmtree(trash, ignore_errors=True)
        return
    if os.path.isdir(source) and os.path.lexists(target):  # a file where the folder goes
        os.remove(target)
    os.replace(source, target)


def publish_staged_folder(staging: str, output_dir: str, index_name: str = PIPELINE_INDEX_NAME) -> list[str]:
    """Moves the folder written in `staging` into `output_dir`, beside what else `output_dir` holds (checkpoints,
    logs), so that it appears complete or not at all: loaders look for `index_name`, which goes away first and comes
    back last.

    Every file is flushed to disk; the stale `index_name` is removed; each top-level entry of `staging` then replaces
    its namesake by renames (a folder goes to a `.final-old-*` trash folder and is deleted); `index_name` is renamed
    into place last and `staging` removed. A run killed at any moment leaves either the previous folder, a folder
    without `index_name` (no pipeline), or the new one; [`remove_stale_staging`] cleans up after it.

    Args:
        staging (`str`): a folder inside `output_dir` (the same file system) holding the complete new folder.
        output_dir (`str`): where it goes.
        index_name (`str`, *optional*, defaults to `"model_index.json"`): the file that makes the folder loadable.

    Returns:
        `list[str]`: the names moved into place, `index_name` last.
    """
    if not os.path.isfile(os.path.join(staging, index_name)):
        raise ValueError(f"{staging} holds no {index_name}: write the complete folder there before publishing it.")
    _sync_tree(staging)
    index = os.path.join(output_dir, index_name)
    if os.path.lexists(index):
        os.remove(index)
        _fsync_directory(output_dir)
    names = sorted(name for name in os.listdir(staging) if name != index_name)
    for name in names:
        trash = os.path.join(output_dir, f"{STAGING_PREFIX}old-{name}-{os.getpid()}")
        _move_into_place(os.path.join(staging, name), os.path.join(output_dir, name), trash)
    _fsync_directory(output_dir)
    os.replace(os.path.join(staging, index_name), index)
    _fsync_directory(output_dir)
    shutil.rmtree(staging, ignore_errors=True)
    return [*names, index_name]
