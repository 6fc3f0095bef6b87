"""Pipeline folders committed by earlier versions still load: module paths and weight names are a saved format.

tiny-arpg-pipeline is today's format; tiny-arpg-pipeline-v0.1 was written by arpg-hf 0.1 (its tokenizer config named
the sizes base_channels, channel_multipliers, ..., its codebook was `codebook.weight`, rows as trained)."""

import json

import pytest
import torch

from arpg_hf import ARPGForImageGeneration, ARPGPipeline, ARPGScheduler, ARPGVQModel

from .fixtures.build_tiny_pipeline import FIXTURE_DIR, LEGACY_FIXTURE_DIR, LEGACY_NAMES, build_pipeline

FOLDERS = [(FIXTURE_DIR, None), (LEGACY_FIXTURE_DIR, LEGACY_NAMES)]
VERSIONS = ("_diffusers_version", "transformers_version")  # of the libraries that wrote a file


@pytest.fixture(scope="module")
def pipes():
    loaded = {folder.name: ARPGPipeline.from_pretrained(folder) for folder, _ in FOLDERS}
    for pipe in loaded.values():
        pipe.set_progress_bar_config(disable=True)
    return loaded


@pytest.mark.parametrize("folder, names", FOLDERS, ids=lambda value: getattr(value, "name", "names"))
def test_committed_pipeline_folder_loads_with_every_weight(pipes, folder, names):
    loaded = pipes[folder.name]
    assert isinstance(loaded.transformer, ARPGForImageGeneration)
    assert isinstance(loaded.vqvae, ARPGVQModel)
    assert isinstance(loaded.scheduler, ARPGScheduler) and loaded.scheduler.config.token_schedule == "cosine"
    expected = build_pipeline(names)  # the same weights, drawn from their names with today's module tree
    for name in ("transformer", "vqvae"):
        saved, current = getattr(loaded, name).state_dict(), getattr(expected, name).state_dict()
        assert saved.keys() == current.keys()
        for key in current:
            assert torch.equal(saved[key], current[key]), key


def test_the_v0_1_folder_is_the_old_format():
    index = json.loads((LEGACY_FIXTURE_DIR / "model_index.json").read_text())
    vq_config = json.loads((LEGACY_FIXTURE_DIR / "vqvae" / "config.json").read_text())
    assert index["_class_name"] == "ARPGPipeline" and index["vqvae"] == ["arpg_hf.vq_model", "ARPGVQModel"]
    assert vq_config["base_channels"] == 8 and "block_out_channels" not in vq_config
    assert not list(LEGACY_FIXTURE_DIR.rglob("*.py"))


@pytest.mark.parametrize("folder", [FIXTURE_DIR, LEGACY_FIXTURE_DIR], ids=lambda folder: folder.name)
def test_committed_pipeline_generates_images(pipes, folder):
    pipe = pipes[folder.name]
    images = pipe([0, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 4, 6)  # a 2x3 token grid, downsample factor 2
    generator = torch.Generator().manual_seed(0)
    tokens = pipe([0, 2], num_inference_steps=3, generator=generator, output_type="latent").images
    assert tokens.shape == (2, 6) and tokens.max() < 16


def test_saving_a_v0_1_folder_writes_todays_format(pipes, tmp_path):
    pipes[LEGACY_FIXTURE_DIR.name].save_pretrained(tmp_path)
    for name in ("model_index.json", "vqvae/config.json", "transformer/config.json"):
        saved, current = (
            {k: v for k, v in json.loads((folder / name).read_text()).items() if k not in VERSIONS}
            for folder in (tmp_path, FIXTURE_DIR)
        )
        assert saved == current, name  # `_name_or_path` (where it was loaded from) included: not saved
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py")) == sorted(
        p.relative_to(FIXTURE_DIR) for p in FIXTURE_DIR.rglob("*.py")
    )
