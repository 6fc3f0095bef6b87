"""Folders written by arpg-hf load with the generic Hugging Face loaders: `DiffusionPipeline.from_pretrained(...,
trust_remote_code=True)`, transformers' Auto classes (registered on `import arpg_hf`, and through `auto_map`), a stock
diffusers `VQModel`; from a folder and from the Hub cache; with variants, sharded weights and pickles."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, VQModel
from safetensors import safe_open

from arpg_hf import ARPGConfig, ARPGForImageGeneration, ARPGInpaintPipeline, ARPGPipeline
from arpg_hf.conversion import main as convert
from arpg_hf.saved_folders import pipeline_files

from .fixtures.build_tiny_pipeline import FIXTURE_DIR

SHIMS = [
    "pipeline_arpg.py",
    "scheduler/scheduling_arpg.py",
    "transformer/configuration_arpg.py",
    "transformer/modeling_arpg.py",
    "vqvae/vq_model.py",
]


@pytest.fixture(scope="module")
def converted(parity_dir, tmp_path_factory) -> Path:
    """`arpg-hf convert` of the upstream-format parity checkpoints."""
    output = tmp_path_factory.mktemp("generic") / "arpg-tiny"
    assert (
        convert(
            [
                "--arpg-checkpoint",
                str(parity_dir / "arpg_ref.pt"),
                "--vq-checkpoint",
                str(parity_dir / "vq_ref.pt"),
                "--reference-config",
                str(parity_dir / "config.json"),
                "--vq-config",
                str(parity_dir / "vq_config.json"),
                "--output-dir",
                str(output),
            ]
        )
        == 0
    )
    return output


@pytest.fixture(scope="module")
def pipe(converted):
    return quiet(ARPGPipeline.from_pretrained(converted))


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tokens(pipe, labels=(1, 2, 3), steps=8):
    generator = torch.Generator().manual_seed(0)
    return pipe(list(labels), num_inference_steps=steps, generator=generator, output_type="latent").images


def test_diffusion_pipeline_loads_a_converted_folder(converted, pipe):
    generic = quiet(DiffusionPipeline.from_pretrained(converted, trust_remote_code=True))
    assert type(generic) is ARPGPipeline
    assert torch.equal(tokens(generic), tokens(pipe))
    index = json.loads((converted / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_arpg", "ARPGPipeline"]
    assert index["transformer"] == ["modeling_arpg", "ARPGForImageGeneration"] and "_name_or_path" not in index
    for shim in SHIMS:  # a docstring and one import from the installed package: nothing else runs
        docstring, statement = ast.parse((converted / shim).read_text()).body
        assert isinstance(docstring, ast.Expr) and isinstance(statement, ast.ImportFrom), shim
        assert statement.module.startswith("arpg_hf."), shim


def test_diffusion_pipeline_asks_for_trust_remote_code(converted):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(converted)


def test_our_loader_runs_no_code_from_the_folder(converted, pipe, tmp_path):
    folder = shutil.copytree(converted, tmp_path / "copy")
    for shim in SHIMS:
        (folder / shim).write_text('raise RuntimeError("code from the folder ran")\n')
    assert torch.equal(tokens(quiet(ARPGPipeline.from_pretrained(folder))), tokens(pipe))
    with pytest.raises(RuntimeError, match="code from the folder ran"):  # the generic loader does run the shims
        DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)


def test_an_inpainting_folder_loads_as_an_inpainting_pipeline(tmp_path):
    ARPGInpaintPipeline(**ARPGPipeline.from_pretrained(FIXTURE_DIR).components).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == [
        "pipeline_arpg_inpaint",
        "ARPGInpaintPipeline",
    ]
    assert type(DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)) is ARPGInpaintPipeline
    assert type(ARPGPipeline.from_pretrained(tmp_path)) is ARPGPipeline  # our classes load what they are asked
    assert type(ARPGInpaintPipeline.from_pretrained(FIXTURE_DIR)) is ARPGInpaintPipeline


def test_auto_classes_load_the_transformer_with_trust_remote_code(converted, pipe):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(converted, subfolder="transformer", trust_remote_code=True)
    assert type(config) is ARPGConfig
    assert {k: v for k, v in config.to_dict().items() if k != "_name_or_path"} == {
        k: v for k, v in pipe.transformer.config.to_dict().items() if k != "_name_or_path"
    }
    expected = pipe.transformer.state_dict()
    for auto_class in (AutoModel, AutoModelForCausalLM):
        model = auto_class.from_pretrained(converted, subfolder="transformer", trust_remote_code=True)
        assert type(model) is ARPGForImageGeneration
        assert all(torch.equal(value, expected[name]) for name, value in model.state_dict().items())
    assert json.loads((converted / "transformer" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_arpg.ARPGConfig",
        "AutoModel": "modeling_arpg.ARPGForImageGeneration",
        "AutoModelForCausalLM": "modeling_arpg.ARPGForImageGeneration",
    }


REGISTRATION_CHECK = """
import sys
folder = sys.argv[1]
{first}
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
{then}
config = AutoConfig.from_pretrained(folder, subfolder="transformer")
models = [auto.from_pretrained(folder, subfolder="transformer") for auto in (AutoModel, AutoModelForCausalLM)]
print(type(config).__name__, *(type(model).__name__ for model in models), "torch" in sys.modules)
"""
WITHOUT_ARPG = """
try:
    AutoConfig.from_pretrained(folder, subfolder="transformer")
except ValueError as error:
    print("refused:", "trust_remote_code=True" in str(error))
import arpg_hf
"""


@pytest.mark.parametrize("first, then", [("import arpg_hf", ""), ("", WITHOUT_ARPG)], ids=["arpg-first", "arpg-after"])
def test_import_arpg_hf_registers_the_auto_classes(converted, first, then):
    """No trust_remote_code: `import arpg_hf` before or after transformers registers the classes (a fresh process each,
    as registration is process-wide)."""
    code = REGISTRATION_CHECK.format(first=first, then=then)
    result = subprocess.run(
        [sys.executable, "-c", code, str(converted)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = "ARPGConfig ARPGForImageGeneration ARPGForImageGeneration True"
    assert result.stdout.splitlines()[-1] == expected
    if then:  # before `import arpg_hf`, transformers wants trust_remote_code for the folder's auto_map
        assert "refused: True" in result.stdout  # printed after transformers' [y/N] prompt


def test_import_arpg_hf_stays_light():
    code = "import sys, arpg_hf; print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr[-2000:]


def test_a_stock_vq_model_decodes_our_indices(converted, pipe):
    stock = VQModel.from_pretrained(converted, subfolder="vqvae").eval()
    assert type(stock) is VQModel
    indices = torch.randint(0, 512, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = pipe.vqvae.decode(indices).sample
        theirs = stock.decode(indices, force_not_quantize=True, shape=(2, 8, 8, 8)).sample
    assert torch.equal(ours, theirs)


# ------------------------------------------------------------------------------------------------------ the Hub


def hub_cache(folder: Path, cache: Path, repo_id: str) -> Path:
    """Puts `folder` into a Hugging Face cache as the snapshot of `repo_id` (what an earlier download leaves)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


def test_a_pushed_folder_loads_from_the_hub_cache(pipe, tmp_path, monkeypatch):
    """`push_to_hub` uploads the folder with its shims; a download of it loads with both loaders (offline: from the
    cache)."""
    import diffusers.utils.hub_utils
    import huggingface_hub

    uploaded = {}

    def fake_upload_folder(repo_id, folder_path, **kwargs):
        uploaded[repo_id] = shutil.copytree(folder_path, tmp_path / "uploaded")
        return "https://hf.co/commit"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: type("U", (), {"repo_id": repo_id})())
    monkeypatch.setattr(diffusers.utils.hub_utils, "upload_folder", fake_upload_folder)
    pipe.push_to_hub("arpg-hf/tiny")
    assert all((uploaded["arpg-hf/tiny"] / shim).is_file() for shim in SHIMS)
    cache = hub_cache(uploaded["arpg-hf/tiny"], tmp_path / "cache", "arpg-hf/tiny")
    ours = quiet(ARPGPipeline.from_pretrained("arpg-hf/tiny", cache_dir=cache))
    generic = quiet(DiffusionPipeline.from_pretrained("arpg-hf/tiny", cache_dir=cache, trust_remote_code=True))
    assert type(generic) is ARPGPipeline
    assert torch.equal(tokens(ours), tokens(pipe)) and torch.equal(tokens(generic), tokens(pipe))
    with pytest.raises(OSError, match="neither a local folder nor in the Hugging Face cache"):
        ARPGPipeline.from_pretrained("arpg-hf/missing", cache_dir=cache)


def test_hub_downloads_take_the_variant_where_a_component_has_it():
    files = [
        "model_index.json",
        "pipeline_arpg.py",
        "README.md",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/modeling_arpg.py",
        "transformer/model.safetensors",
        "transformer/model.fp16.safetensors",
        "vqvae/config.json",
        "vqvae/diffusion_pytorch_model.safetensors",
        "vqvae/diffusion_pytorch_model.bin",
        "vqvae/diffusion_pytorch_model.onnx",
        "xl/model.fp16-00001-of-00002.safetensors",
        "xl/model.fp16-00002-of-00002.safetensors",
        "xl/model.safetensors.index.fp16.json",
        "xl/model-00001-of-00002.safetensors",
        "xl/model-00002-of-00002.safetensors",
        "xl/model.safetensors.index.json",
    ]
    common = [
        "README.md",
        "model_index.json",
        "pipeline_arpg.py",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/modeling_arpg.py",
        "vqvae/config.json",
    ]
    assert pipeline_files(files) == sorted(
        common
        + [
            "transformer/model.safetensors",
            "vqvae/diffusion_pytorch_model.safetensors",
            "xl/model-00001-of-00002.safetensors",
            "xl/model-00002-of-00002.safetensors",
            "xl/model.safetensors.index.json",
        ]
    )
    assert pipeline_files(files, variant="fp16") == sorted(
        common
        + [
            "transformer/model.fp16.safetensors",
            "vqvae/diffusion_pytorch_model.safetensors",
            "xl/model.fp16-00001-of-00002.safetensors",
            "xl/model.fp16-00002-of-00002.safetensors",
            "xl/model.safetensors.index.fp16.json",
        ]
    )
    assert "vqvae/diffusion_pytorch_model.bin" in pipeline_files(files, use_safetensors=False)


# ------------------------------------------------------------------------------------- variants and formats


def dtypes(folder: Path) -> dict[str, torch.dtype]:
    found = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(path, "pt") as file:
            found[str(path.relative_to(folder))] = {file.get_tensor(key).dtype for key in file.keys()}.pop()
    return found


def test_a_variant_is_saved_beside_the_default_weights(tmp_path):
    pipe = ARPGPipeline.from_pretrained(FIXTURE_DIR)
    pipe.save_pretrained(tmp_path)
    pipe.save_pretrained(tmp_path, variant="fp16")  # the model stays float32; the fp16 variant is written in fp16
    assert dtypes(tmp_path) == {
        "transformer/model.safetensors": torch.float32,
        "transformer/model.fp16.safetensors": torch.float16,
        "vqvae/diffusion_pytorch_model.safetensors": torch.float32,
        "vqvae/diffusion_pytorch_model.fp16.safetensors": torch.float16,
    }
    assert pipe.transformer.dtype == pipe.vqvae.dtype == torch.float32
    default = ARPGPipeline.from_pretrained(tmp_path)
    half = ARPGPipeline.from_pretrained(tmp_path, variant="fp16", dtype=torch.float16)
    generic = DiffusionPipeline.from_pretrained(tmp_path, variant="fp16", dtype=torch.float16, trust_remote_code=True)
    for name in ("transformer", "vqvae"):
        original = getattr(pipe, name).state_dict()
        assert all(torch.equal(v, original[k]) for k, v in getattr(default, name).state_dict().items())
        for loaded in (half, generic):
            assert all(torch.equal(v, original[k].half()) for k, v in getattr(loaded, name).state_dict().items())


def test_sharded_and_pickled_weights_load(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    shards = {
        name: sorted(path.name for path in (tmp_path / "sharded" / name).glob("*.safetensors"))
        for name in ("transformer", "vqvae")
    }
    assert len(shards["transformer"]) > 1 and len(shards["vqvae"]) > 10, shards
    assert (tmp_path / "sharded" / "transformer" / "model.safetensors.index.json").is_file()
    pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled" / "vqvae" / "diffusion_pytorch_model.bin").is_file()
    for folder in ("sharded", "pickled"):
        loaded = ARPGPipeline.from_pretrained(tmp_path / folder)
        for name in ("transformer", "vqvae"):
            expected = getattr(pipe, name).state_dict()
            assert all(torch.equal(v, expected[k]) for k, v in getattr(loaded, name).state_dict().items()), folder
