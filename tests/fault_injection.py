"""Fault injection: kill a job at random points of its run and check that nothing half-written is ever visible.

`random_kills(command, folder, ...)` runs `command` in a subprocess (a new process group), SIGKILLs the whole group
after a random delay, and after each kill lists the files under `folder` that are visible (names not starting with
".", where our staging files and folders live) but incomplete: an image PIL cannot fully decode, JSON that does not
parse, safetensors / npz / torch files whose tensors cannot all be read. Used by the tests of every job that writes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
RUNS_ENV = "ARPG_HF_FAULT_INJECTION_RUNS"


def kill_runs(default: int) -> int:
    """How many killed runs a test tries: `default` (a few, to keep the suite short), or ARPG_HF_FAULT_INJECTION_RUNS
    to measure with more (the figures of a closing note)."""
    return int(os.environ.get(RUNS_ENV, default))


@dataclass
class KillReport:
    """What `random_kills` saw: how many runs were killed, how many finished first, every incomplete file, and, when
    it counted outputs, how many each run added (`written`, one entry per run, with whether it was killed)."""

    kills: int = 0
    finished: int = 0
    half_written: list[str] = field(default_factory=list)
    written: list[tuple[bool, int]] = field(default_factory=list)

    @property
    def kills_during_writes(self) -> int:
        """Killed runs that had written some output: the kills that landed among the writes."""
        return sum(1 for killed, count in self.written if killed and count > 0)


def incomplete(path: Path) -> str | None:
    """Why the file at `path` is not a complete file of its kind (None when it is, or is of a kind not checked)."""
    name = path.name
    try:
        if path.stat().st_size == 0:
            return "empty"
        if name.endswith(IMAGE_SUFFIXES):
            from PIL import Image

            with Image.open(path) as image:
                image.load()
        elif name.endswith(".json"):
            json.loads(path.read_text(encoding="utf-8"))
        elif name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as file:
                for key in file.keys():
                    file.get_tensor(key)
        elif name.endswith(".npz"):
            import numpy as np

            with np.load(path) as arrays:
                for key in arrays.files:
                    arrays[key]
        elif name.endswith((".pt", ".bin")):
            import torch

            torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, EOFError, KeyError, RuntimeError, zipfile.BadZipFile, json.JSONDecodeError) as error:
        return f"{type(error).__name__}: {str(error)[:120]}"
    except Exception as error:  # noqa: BLE001 - any failure to read a file means it is not complete
        return f"{type(error).__name__}: {str(error)[:120]}"
    return None


def half_written_files(folder: Path) -> list[str]:
    """The visible files under `folder` that are incomplete, as "path: reason"."""
    problems = []
    for root, directories, files in os.walk(folder):
        directories[:] = [name for name in directories if not name.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            reason = incomplete(Path(root) / name)
            if reason is not None:
                problems.append(f"{Path(root, name).relative_to(folder)}: {reason}")
    return problems


def kill_after(command: list[str], delay: float, env=None, cwd=None, timeout: float = 600) -> bool:
    """Runs `command` and SIGKILLs its process group after `delay` seconds; returns whether it was still running."""
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
        return True


def random_kills(
    command: list[str],
    folder: Path,
    runs: int,
    max_delay: float,
    seed: int = 0,
    env=None,
    cwd=None,
    count_outputs=None,
    check=None,
) -> KillReport:
    """Kills `runs` runs of `command` at uniformly random times in [0, `max_delay`] s (the same folder every time, as
    a user rerunning a job would), checking `folder` after each.

    Args:
        count_outputs (`Callable[[], int]`, *optional*): counts the visible outputs (for `KillReport.written`).
        check (`Callable[[], list[str]]`, *optional*): more checks of the folder after each run (files of kinds
            `incomplete` does not read, e.g. parquet); what it returns is added to `half_written`.
    """
    rng, report = random.Random(seed), KillReport()
    for _ in range(runs):
        before = count_outputs() if count_outputs else 0
        killed = kill_after(command, rng.uniform(0.0, max_delay), env=env, cwd=cwd)
        report.kills += killed
        report.finished += not killed
        if count_outputs:
            report.written.append((killed, count_outputs() - before))
        if Path(folder).exists():
            report.half_written += half_written_files(Path(folder)) + (check() if check else [])
        time.sleep(0.05)
    return report
