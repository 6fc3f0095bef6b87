"""`load_metric`: the package's `evaluate` modules, loaded from the scripts shipped inside the package (offline)."""

from __future__ import annotations

import os

from ..optional_dependencies import require

METRIC_NAMES = ("fid", "inception_score", "precision_recall")
EVALUATE_MODULES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaluate_modules")


def metric_module_path(name: str) -> str:
    """The folder of the `evaluate` module script of metric `name` (pass it to `evaluate.load`)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; arpg_hf ships {METRIC_NAMES}.")
    path = os.path.join(EVALUATE_MODULES_DIR, name)
    if not os.path.isfile(os.path.join(path, f"{name}.py")):
        raise FileNotFoundError(
            f"The {name} module script is missing from {path}: the package was installed without its data files. "
            "Reinstall arpg-hf (pip install --force-reinstall arpg-hf)."
        )
    return path


def load_metric(name: str, config_name: str | None = None, **kwargs):
    """Loads one of the package's metrics as an `evaluate.EvaluationModule`, from the shipped script (no Hub access).

    Args:
        name (`str`): "fid", "inception_score" or "precision_recall".
        config_name (`str`, *optional*): "default" (inputs are images), "features" (precomputed features or logits),
            or, for FID, "statistics" (images against an ADM reference batch's mu/sigma).
        **kwargs: passed to `evaluate.load` (e.g. `experiment_id`, `num_process`, `process_id` for distributed use).

    Example:
        ```py
        >>> import arpg_hf
        >>> fid = arpg_hf.load_metric("fid")
        >>> fid.compute(predictions=generated_images, references=reference_images)["fid"]
        ```
    """
    evaluate = require("evaluate", "metrics", "arpg_hf.load_metric")

    return evaluate.load(metric_module_path(name), config_name=config_name, **kwargs)
