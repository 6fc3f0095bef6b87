"""arpg-hf: ARPG (autoregressive image generation with randomized parallel decoding) on the Hugging Face stack.

Public names are imported on first use, as transformers and diffusers do, so that `import arpg_hf` (and light modules
such as `arpg_hf.labels`) do not pay for importing torch, transformers and diffusers up front.
"""

from typing import TYPE_CHECKING

from .auto_classes import register_when_transformers_loads
from .lazy_exports import lazy_exports

__version__ = "0.2.0"

_EXPORTS = {
    "configuration_arpg": ["ARPG_PRESETS", "ARPGConfig"],
    "modeling_arpg": ["ARPGForImageGeneration", "ARPGImageGenerationOutput", "ARPGModel", "ARPGPreTrainedModel"],
    "cache_arpg": ["ARPGStaticCache"],
    "compiled_decoding": ["CompiledDecoder"],
    "cpu_gemm": ["use_cpu_gemm"],
    "scheduling_arpg": ["ARPGScheduler", "ARPGSchedulerOutput"],
    "vq_model": ["ARPGVQModel", "ARPGVQEncoderOutput", "llamagen_vq_config"],
    "pipeline_arpg": ["ARPGPipeline"],
    "pipeline_arpg_inpaint": ["ARPGInpaintPipeline"],
    "pipeline_arpg_control": ["ARPGControlPipeline"],
    "control_adapter": ["ARPGControlAdapter"],
    "control_conditions": ["canny_edges", "compute_control_image", "depth_to_control_image"],
    "editing_utils": [
        "OutpaintCanvas",
        "make_lattice_mask",
        "make_outpaint_canvas",
        "preprocess_mask",
        "token_mask_from_pixel_mask",
    ],
    "editing_recipes": ["expand_resolution"],
    "conversion.arpg": ["arpg_config_from_reference", "load_reference_arpg"],
    "labels": ["imagenet_id2label"],
    "token_dataset": [
        "ShuffledBatchSampler",
        "TokenDatasetInfo",
        "check_token_dataset",
        "load_token_dataset",
        "load_vq_model",
    ],
    "training_utils": ["arpg_loss", "weight_decay_param_groups"],
    "training_checkpoints": ["save_checkpoint"],
    "bundled": ["bundled_pipeline_path", "load_bundled_pipeline"],
    "auto_classes": ["register_auto_classes"],
    "metrics.loading": ["load_metric"],
}
# `arpg_hf.metrics` is reachable as an attribute: `arpg_hf.metrics.frechet_distance(...)` after `import arpg_hf`.
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals(), subpackages=("metrics",))

# transformers' AutoConfig / AutoModel / AutoModelForCausalLM know the ARPG classes once transformers' auto module
# loads (at once if it already has), without importing torch or transformers here.
register_when_transformers_loads()

if TYPE_CHECKING:  # pragma: no cover
    from .auto_classes import register_auto_classes
    from .bundled import bundled_pipeline_path, load_bundled_pipeline
    from .cache_arpg import ARPGStaticCache
    from .configuration_arpg import ARPG_PRESETS, ARPGConfig
    from .control_adapter import ARPGControlAdapter
    from .control_conditions import canny_edges, compute_control_image, depth_to_control_image
    from .conversion.arpg import arpg_config_from_reference, load_reference_arpg
    from .cpu_gemm import use_cpu_gemm
    from .editing_recipes import expand_resolution
    from .editing_utils import (
        OutpaintCanvas,
        make_lattice_mask,
        make_outpaint_canvas,
        preprocess_mask,
        token_mask_from_pixel_mask,
    )
    from .labels import imagenet_id2label
    from .metrics.loading import load_metric
    from .modeling_arpg import ARPGForImageGeneration, ARPGImageGenerationOutput, ARPGModel, ARPGPreTrainedModel
    from .pipeline_arpg import ARPGPipeline
    from .pipeline_arpg_control import ARPGControlPipeline
    from .pipeline_arpg_inpaint import ARPGInpaintPipeline
    from .scheduling_arpg import ARPGScheduler, ARPGSchedulerOutput
    from .token_dataset import (
        ShuffledBatchSampler,
        TokenDatasetInfo,
        check_token_dataset,
        load_token_dataset,
        load_vq_model,
    )
    from .training_checkpoints import save_checkpoint
    from .training_utils import arpg_loss, weight_decay_param_groups
    from .vq_model import ARPGVQEncoderOutput, ARPGVQModel, llamagen_vq_config
