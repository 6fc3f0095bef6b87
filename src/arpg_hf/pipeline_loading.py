"""Loading a pipeline for a job: a folder, a Hub id or the bundled model, in a dtype and onto a device, with errors a
user can act on. The `arpg-hf` CLI, the demo and the pipelines/ jobs share it; it imports torch only when called."""

from __future__ import annotations

import os

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def default_device() -> str:
    """The device a job runs on unless told: "cuda" when a GPU is available, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(
    model: str | None,
    device: str,
    dtype_name: str | None,
    model_cpu_offload: bool = False,
    pipeline_class=None,
    controlnet: str | None = None,
):
    """Loads an ARPGPipeline from a folder or Hub id (the bundled model when `model` is None), as `pipeline_class`
    (e.g. ARPGInpaintPipeline) when given, onto `device`, or, with `model_cpu_offload`, onto the CPU with diffusers'
    offload hooks that move each model to `device` while it runs.

    For an `ARPGControlPipeline`, the adapter is `controlnet` (an adapter folder) when given, else the folder's own
    `controlnet/` (the bundled digits-edges adapter when `model` is None)."""
    import torch

    dtype = (
        getattr(torch, dtype_name) if dtype_name else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    )
    control = pipeline_class is not None and pipeline_class.__name__ == "ARPGControlPipeline"
    own_adapter = control and controlnet is None
    if model is None:
        from .bundled import load_bundled_pipeline

        pipeline = load_bundled_pipeline("digits-edges" if own_adapter else "digits", dtype=dtype)
    else:
        if os.path.isdir(model):
            if not os.path.isfile(os.path.join(model, "model_index.json")):
                raise FileNotFoundError(
                    f"--model {model!r} has no model_index.json: pass a folder written by save_pretrained or "
                    "`arpg-hf convert`."
                )
            if own_adapter and not os.path.isdir(os.path.join(model, "controlnet")):
                raise FileNotFoundError(
                    f"--model {model!r} has no controlnet/ (control adapter); pass --controlnet with an adapter folder "
                    "trained for it (train_control.py writes one)."
                )
        elif os.path.exists(model) or model.count("/") != 1 or model.startswith((".", "/", "~")):
            raise FileNotFoundError(f"--model {model!r} is neither a pipeline folder nor a Hub id 'owner/name'.")
        pipeline = read_pipeline(model, dtype, pipeline_class if own_adapter else None)
    if control and controlnet is not None:
        components = {name: pipeline.components[name] for name in ("transformer", "vqvae", "scheduler")}
        pipeline = pipeline_class(**components, controlnet=read_control_adapter(controlnet, dtype))
    elif pipeline_class is not None and not isinstance(pipeline, pipeline_class):
        pipeline = pipeline_class(**pipeline.components)
    if model_cpu_offload:  # on the pipeline that runs, so that it offloads again after every call
        pipeline.enable_model_cpu_offload(device=device)
        return pipeline
    return pipeline.to(device)


def read_control_adapter(folder: str, dtype):
    """An `ARPGControlAdapter` from an adapter folder (or a control pipeline folder, whose controlnet/ is used)."""
    from .control_adapter import ARPGControlAdapter

    if os.path.isdir(os.path.join(folder, "controlnet")):
        folder = os.path.join(folder, "controlnet")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"--controlnet {folder!r} is not a control adapter folder (no config.json); pass the controlnet/ folder "
            "that train_control.py writes, or the control pipeline folder holding it."
        )
    return ARPGControlAdapter.from_pretrained(folder).to(dtype)


def read_pipeline(model: str, dtype, pipeline_class=None):
    """`ARPGPipeline.from_pretrained(model, dtype=dtype, use_safetensors=True)` (or `pipeline_class`'s); a folder that
    cannot be read (truncated or corrupt weights, pickles only, foreign classes) is one OSError naming it and what to
    do."""
    from .pipeline_arpg import ARPGPipeline

    try:
        return (pipeline_class or ARPGPipeline).from_pretrained(model, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as error:
        if isinstance(error, FileNotFoundError) or "HF_HUB_OFFLINE" in str(error):
            raise
        reason = " ".join(str(error).split())[:300]
        raise OSError(
            f"Cannot load the pipeline {model!r}: {type(error).__name__}: {reason}. Its weights must be complete "
            "safetensors files written by save_pretrained or `arpg-hf convert`; re-download or re-convert it."
        ) from error
    except Exception as error:  # safetensors' and torch's own errors for corrupt files
        raise OSError(
            f"Cannot load the pipeline {model!r}: {type(error).__name__}: {' '.join(str(error).split())[:300]}. "
            "Its weight files look damaged (truncated or corrupt); re-download or re-convert it."
        ) from error
