"""Writes that appear complete under their final name or not at all.

Files are written to a hidden temporary sibling (`.NAME.partial-XXXX`) and moved into place with `os.replace`.
Folders are built in a hidden staging sibling (`.NAME.partial-XXXX/`) and published by renaming: an existing folder is
first renamed aside (`.NAME.replaced-XXXX/`), the staging folder takes its name, the old one is removed. A job killed
at any moment leaves the old or the new version under the final name (or, killed between the two renames of a
replacement, none: the old one is then restored by the next write to that name), plus hidden leftovers that the next
write to the same name removes ([`remove_stale_staging`]).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterator

PARTIAL = ".partial-"
REPLACED = ".replaced-"


def _prefix(path: str, kind: str) -> str:
    return f".{os.path.basename(os.path.normpath(path))}{kind}"


def remove_stale_staging(path: str | os.PathLike) -> None:
    """Removes the hidden leftovers of interrupted writes to `path` (a file or folder); when `path` itself is missing
    because a replacement was interrupted between its two renames, restores the previous version first."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        return
    partial, replaced = _prefix(path, PARTIAL), _prefix(path, REPLACED)
    for name in sorted(os.listdir(parent)):
        leftover = os.path.join(parent, name)
        if name.startswith(replaced) and not os.path.exists(path) and os.path.isdir(os.path.join(leftover, "old")):
            os.rename(os.path.join(leftover, "old"), path)
        if name.startswith((partial, replaced)) and os.path.isdir(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
        elif name.startswith((partial, replaced)):
            os.remove(leftover)


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls `write(temporary_path)` and moves the result to `path`; on any failure `path` is untouched."""
    path = os.path.abspath(path)
    handle, temporary = tempfile.mkstemp(
        prefix=_prefix(path, PARTIAL), suffix=os.path.splitext(path)[1], dir=os.path.dirname(path)
    )
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)

    write_atomically(path, write)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike, overwrite: bool = True) -> Iterator[str]:
    """Yields an empty hidden staging folder beside `path`; when the block completes, publishes it as `path`
    (replacing an existing folder only with `overwrite`); when it fails, removes it and leaves `path` as it was."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path!r} is an existing file; choose a folder path.")
    staging = tempfile.mkdtemp(prefix=_prefix(path, PARTIAL), dir=parent)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the finished folder gets the usual permissions
    try:
        yield staging
        publish_folder(staging, path, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_folder(staging: str, path: str, overwrite: bool = True) -> None:
    """Renames the complete folder `staging` to `path`; an existing `path` is replaced only with `overwrite`."""
    if not os.path.isdir(path):
        os.rename(staging, path)
        return
    if not overwrite:
        raise FileExistsError(f"{path!r} exists; pass overwrite=True (--overwrite) to replace it.")
    retired = tempfile.mkdtemp(prefix=_prefix(path, REPLACED), dir=os.path.dirname(path))
    os.rename(path, os.path.join(retired, "old"))
    os.rename(staging, path)
    shutil.rmtree(retired, ignore_errors=True)


def carry_over(old: str, new: str, skip: Callable[[str], bool]) -> None:
    """Hard-links (or copies, across file systems) into `new` every file of `old` that `new` lacks, except those
    `skip(relative_path)` names: what a save into an existing folder keeps of it."""
    if not os.path.isdir(old):
        return
    for root, directories, files in os.walk(old):
        directories[:] = [name for name in directories if not name.startswith(".")]
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), old)
            target = os.path.join(new, relative)
            if name.startswith(".") or os.path.exists(target) or skip(relative):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                os.link(os.path.join(root, name), target)
            except OSError:
                shutil.copy2(os.path.join(root, name), target)
