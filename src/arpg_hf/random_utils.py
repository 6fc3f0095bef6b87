"""Random draws shared by the model, the scheduler and the pipeline."""

from __future__ import annotations

import torch


def draw_uniform(shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """U(0, 1) float32 draws made on the generator's device (so a CPU generator may drive a GPU model, and the same
    seed gives the same numbers on any device), then moved to `device` when one is given."""
    draw_device = generator.device if generator is not None else device
    uniforms = torch.rand(shape, generator=generator, device=draw_device)
    return uniforms.to(device) if device is not None else uniforms
