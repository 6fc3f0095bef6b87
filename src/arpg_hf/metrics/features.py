"""Feature extraction for the metrics, with a pluggable extractor.

A feature extractor is any callable (usually an `nn.Module`) that maps `(B, 3, H, W)` uint8 images to a dict with
`"pool"` `(B, D)` features (FID, precision/recall) and `"logits"` `(B, C)` classifier logits (Inception score).
The standard one is the FID Inception-v3 ([`load_inception_v3`]); [`TinyRandomFeatureExtractor`] has the same
interface and no weights to download, so that the whole chain runs offline in tests and smoke runs (its numbers mean
nothing beyond that).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_positive_int
from .inputs import images_to_uint8_batch

FEATURE_KEYS = ("pool", "logits")
FEATURE_EXTRACTOR_NAMES = ("inception-v3", "tiny-random")
DEFAULT_BATCH_SIZE = 50


class TinyRandomFeatureExtractor(nn.Module):
    """A small random convolutional network with the feature-extractor interface (for tests and offline smoke runs).

    Args:
        feature_dim (`int`, *optional*, defaults to 16): size of the `"pool"` features.
        num_logits (`int`, *optional*, defaults to 10): size of the `"logits"`.
        resolution (`int`, *optional*, defaults to 16): images are resized to this square size first.
        generator (`torch.Generator`, *optional*): source of the random weights (seed 0 when omitted), so that two
            instances built the same way compute the same features.
    """

    def __init__(
        self,
        feature_dim: int = 16,
        num_logits: int = 10,
        resolution: int = 16,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.resolution = resolution
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, feature_dim, kernel_size=3, stride=2, padding=1)
        self.head = nn.Linear(feature_dim, num_logits)
        with torch.no_grad():
            for parameter in self.parameters():
                fan_in = parameter[0].numel() if parameter.ndim > 1 else 1
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected (B, 3, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}.")
        x = (images.float() - 128) / 128
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        x = F.relu(self.conv2(F.relu(self.conv1(x))))  # (B, D, r / 4, r / 4)
        pool = x.mean(dim=(2, 3))  # (B, D)
        return {"pool": pool, "logits": self.head(pool)}


def build_feature_extractor(
    feature_extractor: str | Callable | None = None, inception_weights: str | os.PathLike | None = None, device=None
) -> Callable:
    """A feature extractor from a name (`"inception-v3"`, the default, or `"tiny-random"`) or a callable (returned
    as is, moved to `device` when it is an `nn.Module`)."""
    if feature_extractor is None or feature_extractor == "inception-v3":
        from .inception import load_inception_v3

        return load_inception_v3(inception_weights, device=device)
    if feature_extractor == "tiny-random":
        return TinyRandomFeatureExtractor().to(device or "cpu")
    if isinstance(feature_extractor, str) or not callable(feature_extractor):
        raise ValueError(
            f"feature_extractor must be one of {FEATURE_EXTRACTOR_NAMES} or a callable mapping (B, 3, H, W) uint8 "
            f"images to {{'pool': (B, D), 'logits': (B, C)}}, got {feature_extractor!r}."
        )
    if isinstance(feature_extractor, nn.Module) and device is not None:
        feature_extractor = feature_extractor.to(device)
    return feature_extractor


def _module_device(feature_extractor) -> torch.device:
    if isinstance(feature_extractor, nn.Module):
        for tensor in list(feature_extractor.parameters()) + list(feature_extractor.buffers()):
            return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def extract_features(
    images: Sequence, feature_extractor: Callable, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False
) -> dict[str, np.ndarray]:
    """Runs `feature_extractor` over `images` in batches.

    Args:
        images: a sequence of images (PIL, (H, W, C) arrays, (C, H, W) tensors; uint8 or floats in [0, 1]) or a 4-D
            uint8 array `(N, H, W, 3)` such as an ADM `.npz` batch.
        feature_extractor: see the module docstring.
        batch_size (`int`, *optional*, defaults to 50): images per forward pass.

    Returns:
        `dict[str, np.ndarray]`: `"pool"` `(N, D)` and `"logits"` `(N, C)`, float64.
    """
    check_positive_int(batch_size, "batch_size", exact=True)
    if len(images) == 0:
        raise ValueError("Got no images to extract features from.")
    device = _module_device(feature_extractor)
    outputs = {key: [] for key in FEATURE_KEYS}
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="features", unit="batch")
    for start in starts:
        batch = images_to_uint8_batch(images[start : start + batch_size]).to(device)  # (B, 3, H, W) uint8
        features = feature_extractor(batch)
        missing = [key for key in FEATURE_KEYS if key not in features]
        if missing:
            raise ValueError(f"The feature extractor returned keys {sorted(features)}, missing {missing}.")
        for key in FEATURE_KEYS:
            outputs[key].append(features[key].detach().double().cpu().numpy())
    return {key: np.concatenate(values) for key, values in outputs.items()}
