"""Shared fixtures. The parity fixtures (upstream-format checkpoints and the reference outputs, see
tests/fixtures/parity/README.md) live in the repository, so that a fresh clone tests itself."""

import contextlib
import json
import os
import tempfile
from pathlib import Path

# Tiny models run fastest on one thread (and the CI machine has two cores); subprocesses inherit these settings.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Generic loaders (trust_remote_code) copy the folders' import shims into a modules cache: keep it out of ~/.cache.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="arpg-hf-test-modules-"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

PARITY_DIR = Path(__file__).resolve().parent / "fixtures" / "parity"


def read_json(name: str) -> dict:
    return json.loads((PARITY_DIR / name).read_text())


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return PARITY_DIR


@pytest.fixture(scope="session")
def reference_pipeline(parity_dir):
    """The parity decoder + VQ tokenizer loaded from the upstream checkpoint formats (read-only: do not mutate)."""
    from arpg_hf import ARPGPipeline

    pipe = ARPGPipeline.from_reference_checkpoints(
        parity_dir / "arpg_ref.pt",
        parity_dir / "vq_ref.pt",
        reference_config=read_json("config.json"),
        vq_config=read_json("vq_config.json"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_config(**overrides):
    from arpg_hf import ARPGConfig

    fields = dict(
        vocab_size=32, num_classes=5, grid_height=4, grid_width=4, hidden_size=32, num_attention_heads=2,
        num_self_attention_layers=2, num_cross_attention_layers=2, multiple_of=16, token_dropout=0.0,
        residual_dropout=0.0, ffn_dropout=0.0, class_dropout_prob=0.0,
    )  # fmt: skip
    fields.update(overrides)
    return ARPGConfig(**fields)


@contextlib.contextmanager
def recording_calls(owner, name: str):
    """Records every call of the method `owner.name` while the block runs: yields a list that receives one
    `(args, kwargs, result)` per call. The wrapper is an instance attribute, deleted afterwards (back to the class's
    method)."""
    original, calls = getattr(owner, name), []

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    setattr(owner, name, recording)
    try:
        yield calls
    finally:
        delattr(owner, name)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraws every parameter (the zero-initialised head included) so that outputs are informative."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim == 1:  # norm weights
                parameter.copy_(1 + 0.1 * noise)
            else:
                parameter.copy_(noise / parameter.shape[-1] ** 0.5)
    return module
