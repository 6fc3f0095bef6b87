"""The bundled digits models: a small class-conditional ARPG trained by us on the scikit-learn handwritten digits,
and its ControlARPG fine-tune that follows edge maps (`bundled/digits-edges-pipeline`).

It ships inside the package (`arpg_hf/bundled/digits-pipeline`, a regular pipeline folder with a model card), so
`arpg-hf generate` and `load_bundled_pipeline()` work offline on a fresh install. Images are 32x32 RGB (dark ink on
white), 8x8 tokens of a 32-code tokenizer, classes "0".."9". How it was trained, and how good it is:
the folder's README.md, `pipelines/train_bundled_model.py`, docs/bundled_model.md and `benchmarks/quality_digits.py`.
"""

from __future__ import annotations

import os

BUNDLED_PIPELINE_NAME = "digits-pipeline"
# The names load_bundled_pipeline takes, and their folders: the class-conditional digits model, and its ControlARPG
# fine-tune that follows Canny edge maps (`train_control.py --train_base`, see pipelines/train_bundled_model.py; its
# weights are stored in float16 to fit the package and load as float32).
BUNDLED_MODELS = {"digits": BUNDLED_PIPELINE_NAME, "digits-edges": "digits-edges-pipeline"}


def bundled_pipeline_path(name: str = "digits") -> str:
    """The folder of a bundled pipeline (`"digits"` or `"digits-edges"`) inside the installed package."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"No bundled model {name!r}; the bundled models are {', '.join(BUNDLED_MODELS)}.")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled", BUNDLED_MODELS[name])


def load_bundled_pipeline(name: str = "digits", **kwargs):
    """Loads a bundled pipeline (no network access).

    Args:
        name (`str`, *optional*, defaults to `"digits"`): `"digits"` (an [`ARPGPipeline`]) or `"digits-edges"` (an
            [`ARPGControlPipeline`] whose `control_image` is a Canny edge map, white on black, e.g.
            `arpg_hf.canny_edges(drawing)`).
        **kwargs: passed to `from_pretrained`, e.g. `dtype=torch.float16` (default: float32).

    Returns:
        [`ARPGPipeline`] or [`ARPGControlPipeline`]: classes 0-9 (`pipe.id2label`), 32x32 images, the recommended
        sampling settings in its scheduler config (used when `num_inference_steps` / `guidance_scale` are left out).

    Example:
        ```py
        >>> import torch
        >>> from arpg_hf import load_bundled_pipeline

        >>> pipe = load_bundled_pipeline()
        >>> images = pipe(list(range(10)), generator=torch.Generator().manual_seed(0)).images
        ```
    """
    path = bundled_pipeline_path(name)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"The bundled pipeline is missing from {path}: the package was installed without its data files. "
            "Reinstall arpg-hf (pip install --force-reinstall arpg-hf) or pass a pipeline folder explicitly."
        )
    kwargs.setdefault("local_files_only", True)
    if name == "digits":
        from .pipeline_arpg import ARPGPipeline

        return ARPGPipeline.from_pretrained(path, **kwargs)
    import torch

    from .pipeline_arpg_control import ARPGControlPipeline

    if "dtype" not in kwargs and "torch_dtype" not in kwargs:
        kwargs["dtype"] = torch.float32  # stored in float16
    return ARPGControlPipeline.from_pretrained(path, **kwargs)
