"""Everything that reads the upstream ARPG / LlamaGen releases: key maps, config translations, checkpoint reading and
the conversion into pipeline folders (the integration layer, see docs/architecture.md).

    checkpoints  reading upstream checkpoint files safely; declarative key maps (`KeyRule`, `convert_state_dict`)
    arpg         the decoder: key map, `ModelArgs` -> `ARPGConfig`, `load_reference_arpg`
    vq           the VQ tokenizer: key map, upstream fields -> `ARPGVQModel` configuration, `load_reference_vq`
    convert      checked conversion of both checkpoints into a verified, atomically written pipeline folder
    command      the command line (`arpg-hf convert`, `conversion/convert_arpg_to_hf.py`)

Names are imported on first use, so that the model classes can import a submodule inside their convenience methods
(`ARPGPipeline.from_reference_checkpoints`) without this package importing them back.
"""

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

_EXPORTS = {
    "checkpoints": [
        "STRIPPED_PREFIXES",
        "WRAPPER_KEYS",
        "KeyRule",
        "abbreviate",
        "check_shapes",
        "convert_state_dict",
        "load_reference_state_dict",
        "read_checkpoint_file",
    ],
    "arpg": [
        "ARPG_REFERENCE_KEY_MAP",
        "PRESET_REFERENCE_FIELDS",
        "PUBLISHED_ARPG_L",
        "arpg_config_from_reference",
        "load_reference_arpg",
    ],
    "vq": [
        "PUBLISHED_VQ16",
        "VQ_REFERENCE_IGNORED_KEYS",
        "VQ_REFERENCE_KEY_MAP",
        "load_reference_vq",
        "vq_config_from_reference",
    ],
    "convert": [
        "DTYPES",
        "ConversionError",
        "ShapeCheck",
        "check_arpg_shapes",
        "check_model_family",
        "check_output_dir",
        "check_vq_shapes",
        "convert_reference_checkpoints",
        "file_sha256",
        "infer_arpg_fields",
        "infer_vq_fields",
        "preset_for_width",
        "read_json_config",
        "reference_fields_for",
        "resolve_checkpoint",
        "save_pipeline_folder",
        "upload_pipeline_folder",
    ],
    "command": ["add_convert_arguments", "main", "run_convert"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:  # pragma: no cover
    from .arpg import (
        ARPG_REFERENCE_KEY_MAP,
        PRESET_REFERENCE_FIELDS,
        PUBLISHED_ARPG_L,
        arpg_config_from_reference,
        load_reference_arpg,
    )
    from .checkpoints import (
        STRIPPED_PREFIXES,
        WRAPPER_KEYS,
        KeyRule,
        abbreviate,
        check_shapes,
        convert_state_dict,
        load_reference_state_dict,
        read_checkpoint_file,
    )
    from .command import add_convert_arguments, main, run_convert
    from .convert import (
        DTYPES,
        ConversionError,
        ShapeCheck,
        check_arpg_shapes,
        check_model_family,
        check_output_dir,
        check_vq_shapes,
        convert_reference_checkpoints,
        file_sha256,
        infer_arpg_fields,
        infer_vq_fields,
        preset_for_width,
        read_json_config,
        reference_fields_for,
        resolve_checkpoint,
        save_pipeline_folder,
        upload_pipeline_folder,
    )
    from .vq import (
        PUBLISHED_VQ16,
        VQ_REFERENCE_IGNORED_KEYS,
        VQ_REFERENCE_KEY_MAP,
        load_reference_vq,
        vq_config_from_reference,
    )
