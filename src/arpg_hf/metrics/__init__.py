"""Evaluation metrics of the ADM protocol: FID, Inception score, improved precision/recall.

`frechet_distance(features_a, features_b)` is the core the `evaluate` modules share; `load_metric(name)` loads those
modules from the scripts shipped inside the package; `evaluate_images` computes the whole set from image batches.
Submodules import torch only when used, so `import arpg_hf.metrics` stays light.
"""

from ..lazy_exports import lazy_exports

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
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
