"""The lean install: generation needs none of the extras' packages, and a feature whose extra is missing says which
package and which extra to install (`arpg_hf.optional_dependencies.require`)."""

import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from arpg_hf.optional_dependencies import MissingOptionalDependencyError, require

# What the extras (training, metrics, demo, digits) bring, and what only they pull in.
EXTRAS_PACKAGES = (
    "datasets",
    "evaluate",
    "gradio",
    "gradio_client",
    "sklearn",
    "scipy",
    "tensorboard",
    "pyarrow",
    "pandas",
)


def block(monkeypatch, *modules):
    """Makes `import module` fail as for a package that is not installed (a None entry in sys.modules)."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def message(feature, package, extra):
    return f'{feature} needs the {package} package: pip install {package} (or pip install "arpg-hf[{extra}]")'


def test_load_token_dataset_without_datasets_names_the_training_extra(monkeypatch, tmp_path):
    import arpg_hf

    block(monkeypatch, "datasets")
    with pytest.raises(ImportError) as caught:
        arpg_hf.load_token_dataset(tmp_path)
    assert str(caught.value) == message("arpg_hf.load_token_dataset", "datasets", "training")
    assert isinstance(caught.value, MissingOptionalDependencyError) and caught.value.name == "datasets"


def test_load_metric_without_evaluate_names_the_metrics_extra(monkeypatch):
    import arpg_hf

    block(monkeypatch, "evaluate")
    with pytest.raises(ImportError) as caught:
        arpg_hf.load_metric("fid")
    assert str(caught.value) == message("arpg_hf.load_metric", "evaluate", "metrics")


def test_digits_without_scikit_learn_names_the_digits_extra(monkeypatch):
    from arpg_hf.digits import load_digits_split

    block(monkeypatch, "sklearn", "sklearn.datasets")
    with pytest.raises(ImportError) as caught:
        load_digits_split()
    assert str(caught.value) == message("arpg_hf.digits.load_digits_split", "scikit-learn", "digits")


def test_demo_without_gradio_names_the_demo_extra(monkeypatch):
    block(monkeypatch, "gradio")
    monkeypatch.delitem(sys.modules, "space.demo.app", raising=False)  # imported afresh (the import fails)
    with pytest.raises(ImportError) as caught:
        importlib.import_module("space.demo.app")
    assert str(caught.value) == message("space.demo", "gradio", "demo")


def test_an_installed_package_that_fails_to_import_is_reported_as_such(monkeypatch, tmp_path):
    (tmp_path / "arpg_broken_extra").mkdir()
    (tmp_path / "arpg_broken_extra" / "__init__.py").write_text("raise ImportError('libfoo.so: cannot open')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingOptionalDependencyError) as caught:
        require("arpg_broken_extra", None, "feature x")
    assert str(caught.value) == (
        "feature x needs the arpg_broken_extra package: pip install arpg_broken_extra. "
        "It is installed but failed to import: libfoo.so: cannot open"
    )
    assert require("json", "training", "feature y") is json


# Runs in a fresh interpreter in which the extras' packages cannot be imported, as after `pip install arpg-hf`.
LEAN_SCRIPT = textwrap.dedent(
    """
    import sys

    BLOCKED = sys.argv[2].split(",")
    for name in BLOCKED:
        sys.modules[name] = None  # `import name` raises ModuleNotFoundError; importlib.util.find_spec(name) is None

    import numpy as np
    import torch
    from PIL import Image

    import arpg_hf
    from arpg_hf import ARPGPipeline, load_bundled_pipeline
    from arpg_hf.cli import main

    pipe = load_bundled_pipeline()
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, ARPGPipeline)
    images = pipe([3], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3)

    out = sys.argv[1]
    assert main(["generate", "--class-labels", "3", "--num-inference-steps", "2", "--output-dir", out, "--quiet"]) == 0
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[16:] = 255
    Image.fromarray(mask).save(out + "/mask.png")
    assert main(["inpaint", "--image", out + "/000_3_3.png", "--mask", out + "/mask.png", "--class-labels", "8",
                 "--num-inference-steps", "2", "--output-dir", out + "/inpainted", "--quiet"]) == 0
    try:
        arpg_hf.load_token_dataset(out)
    except ImportError as error:
        print("ERROR:", error)
    print("LOADED:", ",".join(sorted(name for name in BLOCKED if sys.modules.get(name) is not None)))
    """
)


def test_generation_and_the_cli_work_without_the_extras(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", LEAN_SCRIPT, str(tmp_path), ",".join(EXTRAS_PACKAGES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert "ERROR: " + message("arpg_hf.load_token_dataset", "datasets", "training") in lines
    assert "LOADED: " in lines
    assert sorted(os.listdir(tmp_path / "inpainted")) == ["000_8_8.png"]
