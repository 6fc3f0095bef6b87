"""Shared fixtures. The parity fixtures (upstream-format checkpoints and the reference outputs, see
tests/fixtures/parity/README.md) live in the repository, so that a fresh clone tests itself."""

import contextlib
import json
import os
import socket
import sys
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
# `accelerate launch` of two CPU processes (gloo): prepend to a script and its arguments.
TWO_PROCESS_LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--main_process_port",
    "0",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a server a test starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
        vocab_size=32,
        num_classes=5,
        grid_height=4,
        grid_width=4,
        hidden_size=32,
        num_attention_heads=2,
        num_self_attention_layers=2,
        num_cross_attention_layers=2,
        multiple_of=16,
        token_dropout=0.0,
        residual_dropout=0.0,
        ffn_dropout=0.0,
        class_dropout_prob=0.0,
    )
    fields.update(overrides)
    return ARPGConfig(**fields)


# The tiny tokenizer of the tiny pipelines: downsample factor 2 (8x8 images <-> the 4x4 grid of tiny_config), 32 codes.
TINY_VQ_SIZES = dict(base_channels=32, channel_multipliers=(1, 1), z_channels=32, codebook_size=32)


def get_dummy_transformer(seed: int = 0, **config_overrides):
    """A tiny ARPGForImageGeneration (`tiny_config(**config_overrides)`), every parameter redrawn from `seed`, in eval
    mode."""
    from arpg_hf import ARPGForImageGeneration

    return randomize_(ARPGForImageGeneration(tiny_config(**config_overrides)), seed=seed).eval()


def get_dummy_vq(seed: int | None = None, **sizes):
    """A tiny ARPGVQModel in eval mode, `llamagen_vq_config(**{**TINY_VQ_SIZES, **sizes})`. Its weights are the default
    initialisation, drawn from torch's global generator: seeded with `seed` first, or as it stands if `seed` is None."""
    from arpg_hf import ARPGVQModel, llamagen_vq_config

    if seed is not None:
        torch.manual_seed(seed)
    return ARPGVQModel(**llamagen_vq_config(**{**TINY_VQ_SIZES, **sizes})).eval()


def get_dummy_components(
    seed: int = 0, vq_sizes: dict | None = None, scheduler_config: dict | None = None, **config_overrides
) -> dict:
    """The components of a tiny pipeline, as diffusers' pipeline tests build them: `get_dummy_transformer(seed,
    **config_overrides)`, `get_dummy_vq(**vq_sizes)` and `ARPGScheduler(**scheduler_config)`. The global generator is
    seeded with 0 before the transformer is built (which draws from it too), so the VQ model's default initialisation
    is the same on every call."""
    from arpg_hf import ARPGScheduler

    torch.manual_seed(0)
    transformer = get_dummy_transformer(seed, **config_overrides)
    vqvae = get_dummy_vq(**(vq_sizes or {}))
    return {"transformer": transformer, "vqvae": vqvae, "scheduler": ARPGScheduler(**(scheduler_config or {}))}


def get_dummy_pipeline(pipeline_class=None, **kwargs):
    """`pipeline_class(**get_dummy_components(**kwargs))` (ARPGPipeline by default), its progress bar disabled."""
    from arpg_hf import ARPGPipeline

    pipe = (pipeline_class or ARPGPipeline)(**get_dummy_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
