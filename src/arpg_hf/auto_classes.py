"""ARPG in transformers' Auto classes: `AutoConfig` (model type "arpg"), `AutoModel` and `AutoModelForCausalLM` (both
[`ARPGForImageGeneration`]: the decoder is trained as a next-token model over image tokens; images are sampled by
`ARPGPipeline`, it has no `generate()`).

`import arpg_hf` registers them without importing torch or transformers itself (the package stays quick to import): at
once when transformers' auto module is already loaded, otherwise as soon as it is. Importing `arpg_hf.modeling_arpg`
registers them too. Folders written by arpg-hf also name the classes in config.json's `auto_map`, for
`trust_remote_code=True` loads without `import arpg_hf` (see `arpg_hf.saved_folders`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"
MODELING_MODULE = __name__.rsplit(".", 1)[0] + ".modeling_arpg"

logger = logging.getLogger(__name__)


def register_auto_classes() -> None:
    """Registers [`ARPGConfig`] with `AutoConfig` and [`ARPGForImageGeneration`] with `AutoModel` and
    `AutoModelForCausalLM`, importing them (registering again is a no-op)."""
    import transformers.models.auto.configuration_auto  # noqa: F401
    import transformers.models.auto.modeling_auto  # noqa: F401

    register_with_loaded_auto_classes()


def register_with_loaded_auto_classes() -> None:
    """Registers the ARPG classes with those of transformers' auto modules that are loaded, importing none of them.
    The model classes wait while `arpg_hf.modeling_arpg` is being imported: it calls this when it is done."""
    config_auto = sys.modules.get(CONFIG_AUTO)
    if config_auto is not None and hasattr(config_auto, "AutoConfig"):
        from .configuration_arpg import ARPGConfig

        config_auto.AutoConfig.register(ARPGConfig.model_type, ARPGConfig, exist_ok=True)
    modeling_auto, modeling = sys.modules.get(MODELING_AUTO), sys.modules.get(MODELING_MODULE)
    importing_modeling = modeling is not None and not hasattr(modeling, "ARPGForImageGeneration")
    if modeling_auto is not None and hasattr(modeling_auto, "AutoModelForCausalLM") and not importing_modeling:
        from .configuration_arpg import ARPGConfig

        # Found by name, not imported: modeling_arpg imports this module to call back when it is loaded, and the
        # library's import graph stays acyclic (tests/test_layers.py).
        model_class = importlib.import_module(MODELING_MODULE).ARPGForImageGeneration
        for auto_class in (modeling_auto.AutoModel, modeling_auto.AutoModelForCausalLM):
            auto_class.register(ARPGConfig, model_class, exist_ok=True)


def _register_after_import() -> None:
    try:
        register_with_loaded_auto_classes()
    except Exception as error:  # never break the user's import of transformers
        logger.warning(f"Could not register the ARPG classes with transformers' Auto classes: {error!r}")


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback` right after the module `name` has been executed (once), by wrapping its loader."""

    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute, callback = spec.loader.exec_module, self.callback

        def exec_module(module):
            execute(module)
            callback()

        spec.loader.exec_module = exec_module
        return spec


def register_when_transformers_loads() -> None:
    """Registers the ARPG classes with transformers' auto modules that are loaded, and with the others right after
    they load."""
    _register_after_import()
    waiting = {finder.name for finder in sys.meta_path if isinstance(finder, _AfterImport)}
    for name in (CONFIG_AUTO, MODELING_AUTO):
        if name not in sys.modules and name not in waiting:
            sys.meta_path.insert(0, _AfterImport(name, _register_after_import))
