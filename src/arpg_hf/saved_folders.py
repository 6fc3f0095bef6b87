"""How arpg-hf folders name their classes, so that generic Hugging Face loaders find them.

diffusers' `DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)` and transformers'
`AutoConfig` / `AutoModel.from_pretrained(..., trust_remote_code=True)` take classes they do not ship from Python
files inside the folder. arpg-hf writes those files as import shims (`from arpg_hf.modeling_arpg import
ARPGForImageGeneration`): what runs is the installed package, never code of the folder, and the folder needs
`pip install arpg-hf` like any other use of it.

In model_index.json, `_class_name` is `["pipeline_arpg", "ARPGPipeline"]` (the shim `pipeline_arpg.py` beside it) and
every component of ours names its shim module, e.g. `"transformer": ["modeling_arpg", "ARPGForImageGeneration"]` with
`transformer/modeling_arpg.py`. Our own loaders read those names back as the arpg_hf modules they stand for
([`package_module_names`]) and fetch Hub repositories without importing anything from them
([`download_pipeline_folder`]), so `ARPGPipeline.from_pretrained` never needs `trust_remote_code`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from typing import Any, Iterable

from .atomic_io import write_text_atomically

PACKAGE = "arpg_hf"

SHIM_TEMPLATE = '''"""Written by arpg-hf so that generic Hugging Face loaders (`trust_remote_code=True`) find {name}.

It only imports the class from the installed package (`pip install arpg-hf`); nothing else runs.
"""

from {module} import {name}  # noqa: F401
'''

# Weight files of diffusers and transformers: STEM[.VARIANT][-00001-of-00002].safetensors|bin, and shard indexes
# STEM.safetensors|bin.index[.VARIANT].json.
_WEIGHTS = re.compile(r"^(?P<stem>[^.]+)(?:\.(?P<variant>[^.-]+))?(?:-\d{5}-of-\d{5})?\.(?P<format>safetensors|bin)$")
_INDEX = re.compile(r"^(?P<stem>[^.]+)\.(?P<format>safetensors|bin)\.index(?:\.(?P<variant>[^.]+))?\.json$")
# Weights of other frameworks, which our classes never read.
_FOREIGN_WEIGHTS = (".onnx", ".msgpack", ".h5", ".ckpt", ".pt", ".pth", ".gguf", ".pb")


# Variants named after a dtype are written in it (the model itself is left as it is); other names only name files.
VARIANT_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def variant_state_dict(state_dict: dict, variant: str | None) -> dict:
    """`state_dict` with its floating-point tensors in the dtype a variant is named after (`"fp16"`, `"bf16"`); as
    it is for other variants."""
    if variant not in VARIANT_DTYPES:
        return state_dict
    import torch

    dtype = getattr(torch, VARIANT_DTYPES[variant])
    return {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in state_dict.items()}


def shim_name(cls: type) -> str:
    """The shim module of one of our classes: the basename of the module that defines it (`modeling_arpg`)."""
    return cls.__module__.rsplit(".", 1)[-1]


def is_package_class(cls: type) -> bool:
    return cls.__module__.split(".")[0] == PACKAGE


def write_import_shims(folder: str | os.PathLike, classes: Iterable[type]) -> None:
    """Writes `<shim_name(cls)>.py` into `folder` for each of our classes; one file imports all that share a module."""
    by_module: dict[str, list[type]] = {}
    for cls in classes:
        if is_package_class(cls):
            by_module.setdefault(cls.__module__, []).append(cls)
    for module, members in by_module.items():
        names = ", ".join(sorted({cls.__name__ for cls in members}))
        text = SHIM_TEMPLATE.format(module=module, name=names)
        write_text_atomically(os.path.join(folder, f"{shim_name(members[0])}.py"), text)


class SavedWithImportShims:
    """Mixin of the transformers classes (config and model): `save_pretrained` also writes the import shims that
    `Auto*.from_pretrained(folder, trust_remote_code=True)` loads, writes a variant named "fp16" or "bf16" in that
    dtype, and with `push_to_hub` uploads the folder (`repo_id` defaults to its name)."""

    _save_options = ("is_main_process", "state_dict", "max_shard_size", "variant")  # what the base class takes

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict=None,
        push_to_hub: bool = False,
        max_shard_size=None,
        variant: str | None = None,
        **kwargs,
    ):
        # Named parameters: diffusers' pipeline saving passes `variant` and `max_shard_size` only when they are named.
        if variant in VARIANT_DTYPES:
            state_dict = variant_state_dict(self.state_dict() if state_dict is None else state_dict, variant)
        given = dict(
            is_main_process=is_main_process, state_dict=state_dict, max_shard_size=max_shard_size, variant=variant
        )
        kwargs.update(
            {name: value for name, value in given.items() if value is not None and name in self._save_options}
        )
        repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
        hub = {name: kwargs.pop(name) for name in ("commit_message", "private", "token", "create_pr") if name in kwargs}
        super().save_pretrained(save_directory, **kwargs)
        if is_main_process:
            write_import_shims(save_directory, [type(self)])
            if push_to_hub:
                return self.push_to_hub(
                    repo_id, **hub, **({"max_shard_size": max_shard_size} if max_shard_size else {})
                )

    @classmethod
    def register_for_auto_class(cls, auto_class=None):
        """Does nothing: transformers calls it after a `trust_remote_code` load so that later saves copy the class's
        source files into the folder; ARPG folders always carry their `auto_map` and import shims instead."""


def without_load_path(config: dict[str, Any]) -> dict[str, Any]:
    """A config as saved: without `_name_or_path`, where the model was loaded from (no part of the new folder)."""
    return {key: value for key, value in config.items() if key != "_name_or_path"}


def config_json(config: dict[str, Any]) -> str:
    """JSON text of a config, formatted as diffusers writes it."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def shim_module_names(model_index: dict[str, Any], pipeline_class: type) -> dict[str, Any]:
    """model_index.json as saved: `_class_name` names the pipeline's shim, our components name their shim modules;
    `_name_or_path` is left out."""
    saved = without_load_path(model_index)
    saved["_class_name"] = [shim_name(pipeline_class), pipeline_class.__name__]
    for key, value in model_index.items():
        if _is_component_entry(value) and value[0].split(".")[0] == PACKAGE:
            saved[key] = [value[0].rsplit(".", 1)[-1], value[1]]
    return saved


def package_module_names(model_index: dict[str, Any]) -> dict[str, Any]:
    """The reverse of [`shim_module_names`], for our own loaders: a shim module of ours becomes the arpg_hf module it
    imports from, and `_class_name` the plain class name; entries of other libraries are left as they are."""
    loaded = dict(model_index)
    if isinstance(loaded.get("_class_name"), (list, tuple)) and len(loaded["_class_name"]) == 2:
        loaded["_class_name"] = loaded["_class_name"][1]
    for key, value in model_index.items():
        if key != "_class_name" and _is_component_entry(value) and "." not in value[0]:
            module = f"{PACKAGE}.{value[0]}"
            if importlib.util.find_spec(module) is not None:
                loaded[key] = [module, value[1]]
    return loaded


def _is_component_entry(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, str) for v in value)


# ------------------------------------------------------------------------------------------------ the Hub


def is_weights_of_variant(relative_path: str, variant: str | None) -> bool:
    """Whether a file of a pipeline folder holds weights (or their shard index) of `variant` (None: the default)."""
    base = os.path.basename(relative_path)
    match = _WEIGHTS.match(base) or _INDEX.match(base)
    return match is not None and match["variant"] == variant


def pipeline_files(
    filenames: Iterable[str], variant: str | None = None, use_safetensors: bool | None = None
) -> list[str]:
    """The files of a pipeline repository that our classes load: every file but weights, plus, in each folder, the
    weights of `variant` where the folder has them and the default weights otherwise (safetensors over pickles unless
    `use_safetensors` is False). Weights of other frameworks (.onnx, .msgpack, ...) are left out."""
    chosen, weights_by_folder = [], {}
    for name in filenames:
        folder, base = os.path.split(name)
        match = _WEIGHTS.match(base) or _INDEX.match(base)
        if match is not None:
            weights_by_folder.setdefault(folder, []).append((name, match["variant"], match["format"]))
        elif not base.endswith(_FOREIGN_WEIGHTS):
            chosen.append(name)
    for files in weights_by_folder.values():
        picked = [entry for entry in files if variant is not None and entry[1] == variant]
        picked = picked or [entry for entry in files if entry[1] is None]
        if use_safetensors is not False and any(fmt == "safetensors" for _, _, fmt in picked):
            picked = [entry for entry in picked if entry[2] == "safetensors"]
        chosen += [name for name, _, _ in picked]
    return sorted(chosen)


def download_pipeline_folder(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    variant: str | None = None,
    use_safetensors: bool | None = None,
) -> str:
    """Brings a pipeline repository into the Hugging Face cache (only the files of [`pipeline_files`]) and returns
    its local folder; offline (HF_HUB_OFFLINE=1 or `local_files_only`), the cached copy."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = local_files_only or constants.HF_HUB_OFFLINE
    allow_patterns = None
    if not offline:
        files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
        allow_patterns = pipeline_files(files, variant, use_safetensors)
    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=offline,
            force_download=force_download,
            allow_patterns=allow_patterns,
        )
    except LocalEntryNotFoundError as error:
        raise OSError(
            f"{repo_id!r} is neither a local folder nor in the Hugging Face cache, and the Hub is not reachable here "
            "(HF_HUB_OFFLINE=1 or local_files_only=True). Download it once with network access, or pass the path of "
            "a pipeline folder."
        ) from error
