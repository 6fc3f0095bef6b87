"""Optional dependencies: `pip install arpg-hf` brings what generation needs; the rest lives in extras.

    training   datasets, tensorboard      token datasets (`load_token_dataset`, pipelines/tokenize_dataset.py), train.py
    metrics    datasets, evaluate         `load_metric` and the `evaluate` module scripts
    demo       gradio                     the Gradio demo (space/demo, app.py)
    digits     scikit-learn               the digits data set of the bundled model (`arpg_hf.digits`)
    quantization torchao                  `quantization_config=TorchAoConfig(...)`, `quantize()` off the CPU
    all        everything above

Code that needs one of them imports it through [`require`], which names the package and the extra when it is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


class MissingOptionalDependencyError(ImportError):
    """An optional package that a feature needs is not installed (or fails to import)."""


def missing_dependency_message(package: str, extra: str | None, feature: str) -> str:
    """`"{feature} needs the {package} package: pip install {package} (or pip install "arpg-hf[{extra}]")"`."""
    extra_hint = f' (or pip install "arpg-hf[{extra}]")' if extra else ""
    return f"{feature} needs the {package} package: pip install {package}{extra_hint}"


def _is_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):  # a None entry in sys.modules, a broken parent package
        return False


def require(module: str, extra: str | None, feature: str, package: str | None = None) -> ModuleType:
    """Imports and returns `module`, or raises [`MissingOptionalDependencyError`] naming the package and the extra.

    Args:
        module (`str`): the module to import, e.g. `"datasets"` or `"sklearn.datasets"`.
        extra (`str`, *optional*): the arpg-hf extra that installs it ("training", "metrics", "demo", "digits").
        feature (`str`): what needs it, for the message, e.g. `"arpg_hf.load_token_dataset"`.
        package (`str`, *optional*): the name pip installs it under, when it differs from the module's
            (`"scikit-learn"` for `sklearn`).

    Example:
        ```py
        >>> datasets = require("datasets", "training", "arpg_hf.load_token_dataset")
        ```
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        message = missing_dependency_message(package or module.split(".")[0], extra, feature)
        if _is_installed(module):  # installed, but its import failed: say so, the cause is chained below
            message += f". It is installed but failed to import: {error}"
        raise MissingOptionalDependencyError(message, name=module) from error
