"""The bundled digits model: a small class-conditional ARPG trained by us on the scikit-learn handwritten digits.

It ships inside the package (`arpg_hf/bundled/digits-pipeline`, a regular pipeline folder with a model card), so
`arpg-hf generate` and `load_bundled_pipeline()` work offline on a fresh install. Images are 32x32 RGB (dark ink on
white), 8x8 tokens of a 32-code tokenizer, classes "0".."9". How it was trained, and how good it is:
the folder's README.md, `pipelines/train_bundled_model.sh` and `benchmarks/quality_digits.py`.
"""

from __future__ import annotations

import os

BUNDLED_PIPELINE_NAME = "digits-pipeline"


def bundled_pipeline_path() -> str:
    """The folder of the bundled pipeline inside the installed package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled", BUNDLED_PIPELINE_NAME)


def load_bundled_pipeline(**kwargs):
    """Loads the bundled digits pipeline (no network access).

    Args:
        **kwargs: passed to [`ARPGPipeline.from_pretrained`], e.g. `dtype=torch.float16`.

    Returns:
        [`ARPGPipeline`]: classes 0-9 (`pipe.id2label`), 32x32 images, the recommended sampling settings in its
        scheduler config (used when `num_inference_steps` / `guidance_scale` are left out).

    Example:
        ```py
        >>> import torch
        >>> from arpg_hf import load_bundled_pipeline

        >>> pipe = load_bundled_pipeline()
        >>> images = pipe(list(range(10)), generator=torch.Generator().manual_seed(0)).images
        ```
    """
    from .pipeline_arpg import ARPGPipeline

    path = bundled_pipeline_path()
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"The bundled pipeline is missing from {path}: the package was installed without its data files. "
            "Reinstall arpg-hf (pip install --force-reinstall arpg-hf) or pass a pipeline folder explicitly."
        )
    kwargs.setdefault("local_files_only", True)
    return ARPGPipeline.from_pretrained(path, **kwargs)
