"""What the `evaluate` module scripts of `arpg_hf/metrics/evaluate_modules` share: input features per configuration
and the computations behind `_compute`.

Configurations (`evaluate.load(path, config_name=...)`):
    "default" (= "images"): `predictions` / `references` are images (PIL, or uint8 (H, W, 3) arrays); features are
        extracted with `feature_extractor` (the FID Inception-v3 unless told otherwise).
    "features": `predictions` / `references` are precomputed feature vectors (Inception pool features for FID and
        precision/recall, logits for the Inception score).
    "statistics" (FID only): `predictions` are images; the reference is `reference_statistics=`, an ADM reference
        batch `.npz` (mu, sigma) or a `(mu, sigma)` pair.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..optional_dependencies import require
from .features import DEFAULT_BATCH_SIZE, build_feature_extractor, extract_features
from .inputs import as_feature_matrix

# The module scripts run inside `evaluate`, which brings `datasets`; the check covers a direct import.
datasets = require("datasets", "metrics", "arpg_hf.metrics.evaluate_support")

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

IMAGE_CONFIGS = ("default", "images")
CONFIGS_BY_METRIC = {
    "fid": (*IMAGE_CONFIGS, "features", "statistics"),
    "inception_score": (*IMAGE_CONFIGS, "features"),
    "precision_recall": (*IMAGE_CONFIGS, "features"),
}

EXTRACTOR_ARGS_DOC = """
    feature_extractor (`str` or callable, *optional*): "inception-v3" (default: the FID Inception-v3, weights from
        `inception_weights`, $ARPG_HF_INCEPTION_WEIGHTS or torch's hub cache), "tiny-random" (tests), or a callable
        mapping (B, 3, H, W) uint8 images to {"pool": (B, D), "logits": (B, C)}. Image configurations only.
    inception_weights (`str`, *optional*): local file of the FID Inception weights (pt_inception-2015-12-05).
    batch_size (`int`, *optional*, defaults to 50): images per forward pass.
    device (`str`, *optional*): where the feature extractor runs (default CPU).
"""


def metric_features(metric: str, config_name: str) -> datasets.Features:
    """The input features of `metric` in configuration `config_name`; ValueError for an unknown configuration."""
    if config_name not in CONFIGS_BY_METRIC[metric]:
        raise ValueError(
            f"The {metric} metric has configurations {CONFIGS_BY_METRIC[metric]}, got config_name={config_name!r}."
        )
    value = datasets.Sequence(datasets.Value("float64")) if config_name == "features" else datasets.Image()
    predictions_only = metric == "inception_score" or config_name == "statistics"
    names = ("predictions",) if predictions_only else ("predictions", "references")
    return datasets.Features({name: value for name in names})


def pad_to_same_length(predictions, references):
    """Arrow stores predictions and references as rows of one table, so two columns of different lengths (50k
    samples against a 10k reference batch) are padded with None to the longer one; [`drop_padding`] undoes it."""
    if predictions is None or references is None:
        return predictions, references
    predictions, references = list(predictions), list(references)
    length = max(len(predictions), len(references))
    return predictions + [None] * (length - len(predictions)), references + [None] * (length - len(references))


class UnequalLengthsMixin:
    """Put before `evaluate.Metric` in the bases of a metric whose predictions and references may differ in number."""

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """As `evaluate`'s, except that predictions and references may differ in number (the shorter column is padded
        with None here, and `features_of` drops the padding again)."""
        # `evaluate` appends the inputs description to this docstring, so the method must have one.
        predictions, references = pad_to_same_length(predictions, references)
        return super().add_batch(predictions=predictions, references=references, **kwargs)


def drop_padding(column) -> list:
    """The column without the None padding of [`pad_to_same_length`]."""
    return [value for value in column if value is not None]


def features_of(
    inputs, config_name: str, key: str, extractor=None, batch_size: int = DEFAULT_BATCH_SIZE, name: str = "predictions"
) -> np.ndarray:
    """`(N, D)` float64 features of the module inputs: as given ("features") or extracted from images (`key` is
    "pool" or "logits")."""
    inputs = drop_padding(inputs)
    if config_name == "features":
        return as_feature_matrix(inputs, name)
    return extract_features(inputs, extractor, batch_size)[key]


def extractor_for(config_name: str, feature_extractor=None, inception_weights=None, device=None):
    """The feature extractor of an image configuration; None for "features" (where passing one is an error)."""
    if config_name == "features":
        if feature_extractor is not None or inception_weights is not None:
            raise ValueError(
                "config_name='features' takes precomputed features: feature_extractor / inception_weights do not "
                "apply. Load the default configuration to compute features from images."
            )
        return None
    return build_feature_extractor(feature_extractor, inception_weights, device)
