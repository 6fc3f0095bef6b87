"""Improved precision and recall (Kynkäänniemi et al. 2019) with the k-NN manifold estimate of the ADM suite.

Each feature set spans a manifold: the union of balls around its samples, each ball's radius the distance to the
sample's k-th nearest neighbour within its own set (k = 3). Precision is the share of generated samples inside the
real manifold, recall the share of real samples inside the generated manifold. As in ADM, distances are squared
Euclidean distances and "inside" means distance <= radius (ties count as inside).
"""

from __future__ import annotations

import numpy as np
import torch

from ..validation import check_positive_int
from .inputs import as_feature_matrix

DEFAULT_NEAREST_K = 3
DEFAULT_BLOCK_SIZE = 10000  # rows per distance block (ADM's batch size); bounds memory at block x N distances


def _squared_distances(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(n, D), (m, D) -> (n, m) squared Euclidean distances, clamped at 0 against round-off."""
    norms_rows = rows.pow(2).sum(dim=1, keepdim=True)  # (n, 1)
    norms_columns = columns.pow(2).sum(dim=1)[None]  # (1, m)
    return (norms_rows - 2 * rows @ columns.T + norms_columns).clamp_min(0)


def _as_tensor(features, name: str, min_rows: int = 1) -> torch.Tensor:
    if isinstance(features, torch.Tensor) and features.is_floating_point() and features.ndim == 2:
        if features.shape[0] < min_rows:
            raise ValueError(f"{name} needs at least {min_rows} rows (samples), got {features.shape[0]}.")
        return features.detach()
    dtype = np.float32 if getattr(features, "dtype", None) == np.float32 else np.float64
    return torch.from_numpy(as_feature_matrix(features, name, min_rows=min_rows, dtype=dtype))


def manifold_radii(features, nearest_k: int = DEFAULT_NEAREST_K, block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """The squared distance of every sample to its `nearest_k`-th nearest neighbour in the same set, (N,).

    The sample itself (distance 0) is not counted as a neighbour; N must exceed `nearest_k`.
    """
    check_positive_int(nearest_k, "nearest_k", exact=True)
    features = _as_tensor(features, "features", min_rows=nearest_k + 1)
    radii = [
        _squared_distances(features[start : start + block_size], features).kthvalue(nearest_k + 1, dim=1).values
        for start in range(0, features.shape[0], block_size)
    ]
    return torch.cat(radii)  # (N,)


def manifold_membership(samples, manifold_features, manifold_radii_, block_size: int = DEFAULT_BLOCK_SIZE):
    """Whether each sample lies in the union of balls (centre `manifold_features` (M, D), squared radius
    `manifold_radii_` (M,)): a bool tensor (N,)."""
    samples = _as_tensor(samples, "samples")
    manifold_features = _as_tensor(manifold_features, "manifold_features").to(samples.dtype)
    radii = torch.as_tensor(manifold_radii_, dtype=samples.dtype)
    inside = [
        (_squared_distances(samples[start : start + block_size], manifold_features) <= radii[None]).any(dim=1)
        for start in range(0, samples.shape[0], block_size)
    ]
    return torch.cat(inside)  # (N,)


def precision_recall(
    real_features, generated_features, nearest_k: int = DEFAULT_NEAREST_K, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[float, float]:
    """Improved precision and recall of generated samples against real ones.

    Args:
        real_features (`np.ndarray` or `torch.Tensor` of shape `(N, D)`): features of the real (reference) images.
        generated_features (`np.ndarray` or `torch.Tensor` of shape `(M, D)`): features of the generated images.
        nearest_k (`int`, *optional*, defaults to 3): the neighbour whose distance sets each ball's radius.
        block_size (`int`, *optional*, defaults to 10000): rows per block of the distance computation.

    Returns:
        `tuple[float, float]`: (precision, recall), each in [0, 1].
    """
    real = _as_tensor(real_features, "real_features", min_rows=nearest_k + 1)
    generated = _as_tensor(generated_features, "generated_features", min_rows=nearest_k + 1).to(real.dtype)
    if real.shape[1] != generated.shape[1]:
        raise ValueError(
            f"real_features has {real.shape[1]} dimensions per row but generated_features has {generated.shape[1]}; "
            "both must come from the same feature extractor."
        )
    real_radii = manifold_radii(real, nearest_k, block_size)
    generated_radii = manifold_radii(generated, nearest_k, block_size)
    precision = manifold_membership(generated, real, real_radii, block_size).double().mean()
    recall = manifold_membership(real, generated, generated_radii, block_size).double().mean()
    return float(precision), float(recall)
