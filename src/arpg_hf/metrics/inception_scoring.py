"""Inception score from classifier logits, as the ADM evaluation suite (after OpenAI's improved-gan code) computes it:
softmax over the logits, then per split of `split_size` samples exp(mean_i KL(p(y|x_i) || p(y))) with p(y) the
split's mean prediction; the score is the mean over splits (ADM reports the mean only; the std is returned too).

For the ADM number the logits are Inception-v3's 1008 unbiased logits (pool features times the softmax weights,
without the bias), which is what the `"logits"` output of [`InceptionV3FeatureExtractor`] holds.
"""

from __future__ import annotations

import numpy as np

from ..validation import check_positive_int
from .inputs import as_feature_matrix

DEFAULT_SPLIT_SIZE = 5000  # ADM's evaluator


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def inception_score(logits, split_size: int = DEFAULT_SPLIT_SIZE) -> tuple[float, float]:
    """Inception score (mean, std over splits).

    Args:
        logits (`np.ndarray` or `torch.Tensor` of shape `(N, C)`): classifier logits, one row per image.
        split_size (`int`, *optional*, defaults to 5000): samples per split (the last split may be shorter).

    Returns:
        `tuple[float, float]`: the mean and the standard deviation of the per-split scores.
    """
    check_positive_int(split_size, "split_size", exact=True)
    probabilities = _softmax(as_feature_matrix(logits, "logits"))  # (N, C), float64
    scores = []
    for start in range(0, probabilities.shape[0], split_size):
        part = probabilities[start : start + split_size]  # (n, C)
        marginal = part.mean(axis=0, keepdims=True)  # (1, C)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)  # 0 log 0 = 0
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))
