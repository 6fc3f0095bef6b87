"""Evaluation metrics of the ADM protocol: FID, Inception score, improved precision/recall.

`frechet_distance(features_a, features_b)` is the core the `evaluate` modules share; `load_metric(name)` loads those
modules from the scripts shipped inside the package; `evaluate_images` computes the whole set from image batches.
Submodules import torch only when used, so `import arpg_hf.metrics` stays light.
"""

import importlib

_EXPORTS = {
    "frechet": ["feature_statistics", "frechet_distance", "frechet_distance_from_statistics", "trace_sqrt_product"],
    "inception_scoring": ["inception_score"],
    "manifold": ["manifold_membership", "manifold_radii", "precision_recall"],
    "features": ["TinyRandomFeatureExtractor", "build_feature_extractor", "extract_features"],
    "inception": ["InceptionV3FeatureExtractor", "inception_weights_file", "load_inception_v3"],
    "sample_batch": ["load_reference_statistics", "read_images", "read_npz_batch", "save_npz_batch"],
    "harness": ["evaluate_images"],
    "loading": ["METRIC_NAMES", "load_metric", "metric_module_path"],
}
_NAME_TO_MODULE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_NAME_TO_MODULE)


def __getattr__(name):
    if name not in _NAME_TO_MODULE:
        raise AttributeError(f"module 'arpg_hf.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_NAME_TO_MODULE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
