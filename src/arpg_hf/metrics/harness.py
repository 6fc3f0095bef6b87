"""One call from images to the ADM metric set (FID, IS, precision, recall): what `pipelines/evaluate_samples.py` runs."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from .features import DEFAULT_BATCH_SIZE, build_feature_extractor, extract_features
from .frechet import feature_statistics, frechet_distance_from_statistics
from .inception_scoring import DEFAULT_SPLIT_SIZE, inception_score
from .manifold import DEFAULT_NEAREST_K, precision_recall


def evaluate_images(
    samples: np.ndarray,
    reference_images: np.ndarray | None = None,
    reference_statistics: tuple[np.ndarray, np.ndarray] | None = None,
    feature_extractor: str | Callable | None = None,
    inception_weights: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    nearest_k: int = DEFAULT_NEAREST_K,
    split_size: int = DEFAULT_SPLIT_SIZE,
    device=None,
    progress: bool = False,
) -> dict[str, float | int]:
    """FID, Inception score, precision and recall of `samples` against a reference, as the ADM suite computes them.

    Args:
        samples (`np.ndarray` of shape `(N, H, W, 3)`, uint8): the generated images.
        reference_images (`np.ndarray` of shape `(M, H', W', 3)`, uint8, *optional*): the reference batch (needed
            for precision/recall; FID uses it when `reference_statistics` is not given).
        reference_statistics (`(mu, sigma)`, *optional*): FID statistics of the reference (an ADM batch's mu/sigma).
        feature_extractor: `"inception-v3"` (default), `"tiny-random"` or a callable, see [`build_feature_extractor`].

    Returns:
        `dict`: `fid`, `inception_score`, `inception_score_std`, `precision`, `recall` (the last two only with
        reference images), `num_samples`, `num_reference_images`.
    """
    if reference_images is None and reference_statistics is None:
        raise ValueError("Pass reference_images, reference_statistics or both: FID needs a reference.")
    extractor = build_feature_extractor(feature_extractor, inception_weights, device)
    sample_features = extract_features(samples, extractor, batch_size, progress=progress)
    is_mean, is_std = inception_score(sample_features["logits"], split_size=split_size)
    results = {"inception_score": is_mean, "inception_score_std": is_std, "num_samples": int(len(samples))}
    reference_features = None
    if reference_images is not None:
        reference_features = extract_features(reference_images, extractor, batch_size, progress=progress)["pool"]
        precision, recall = precision_recall(reference_features, sample_features["pool"], nearest_k=nearest_k)
        results.update(precision=precision, recall=recall, num_reference_images=int(len(reference_images)))
    if reference_statistics is None:
        reference_statistics = feature_statistics(reference_features)
    sample_statistics = feature_statistics(sample_features["pool"])
    results["fid"] = frechet_distance_from_statistics(*sample_statistics, *reference_statistics)
    return results
