"""Fréchet distance between Gaussians fitted to feature sets (FID when the features are Inception-v3 pool features).

The textbook formula, as the ADM evaluation suite computes it from (mu, sigma) with sigma the unbiased covariance:

    d^2 = |mu_a - mu_b|^2 + tr(sigma_a) + tr(sigma_b) - 2 tr((sigma_a sigma_b)^(1/2))

The trace of the matrix square root is computed in float64 from symmetric eigendecompositions,
tr((sigma_a sigma_b)^(1/2)) = sum sqrt(eig(sigma_a^(1/2) sigma_b sigma_a^(1/2))), which equals scipy's `sqrtm`
route for well-conditioned covariances and stays real and finite for singular ones (fewer samples than dimensions).
"""

from __future__ import annotations

import numpy as np

from .inputs import as_feature_matrix


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), float64, of an (N, D) feature array or tensor (N >= 2)."""
    features = as_feature_matrix(features, "features", min_rows=2)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _check_statistics(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64).reshape(-1)
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{name}: sigma must be a ({mu.shape[0]}, {mu.shape[0]}) covariance matching mu of shape "
            f"({mu.shape[0]},), got sigma of shape {sigma.shape}."
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mu and sigma must be finite; the features contain NaN or inf.")
    return mu, sigma


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """tr((sigma_a sigma_b)^(1/2)) for symmetric PSD sigma_a, sigma_b (float64)."""
    root_a = _psd_sqrt(sigma_a)
    product = root_a @ sigma_b @ root_a  # symmetric PSD, same eigenvalues as sigma_a sigma_b
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def frechet_distance_from_statistics(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """The Fréchet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b); mu (D,), sigma (D, D)."""
    mu_a, sigma_a = _check_statistics(mu_a, sigma_a, "first statistics")
    mu_b, sigma_b = _check_statistics(mu_b, sigma_b, "second statistics")
    if mu_a.shape != mu_b.shape:
        raise ValueError(
            f"The two statistics have different feature sizes, {mu_a.shape[0]} and {mu_b.shape[0]}; compute both "
            "with the same feature extractor (2048 Inception-v3 pool features for FID)."
        )
    diff = mu_a - mu_b
    distance = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_sqrt_product(sigma_a, sigma_b)
    return float(max(distance, 0.0))  # round-off can take identical sets a hair below zero


def frechet_distance(features_a, features_b) -> float:
    """The Fréchet distance between two feature sets.

    Args:
        features_a, features_b (`np.ndarray` or `torch.Tensor` of shape `(N, D)` and `(M, D)`): one feature vector per
            image (N, M >= 2), any float dtype; computed in float64.

    Returns:
        `float`: FID when the features are Inception-v3 pool features (0 for identical sets, up to round-off).
    """
    a = as_feature_matrix(features_a, "features_a", min_rows=2)
    b = as_feature_matrix(features_b, "features_b", min_rows=2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"features_a has {a.shape[1]} dimensions per row but features_b has {b.shape[1]}; both must come from "
            "the same feature extractor."
        )
    return frechet_distance_from_statistics(*feature_statistics(a), *feature_statistics(b))
