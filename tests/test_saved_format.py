"""A pipeline folder committed in an earlier version still loads: module paths and weight names are a saved format."""

import torch

from arpg_hf import ARPGForImageGeneration, ARPGPipeline, ARPGScheduler, ARPGVQModel

from .fixtures.build_tiny_pipeline import FIXTURE_DIR, build_pipeline


def test_committed_pipeline_folder_loads_with_every_weight():
    loaded = ARPGPipeline.from_pretrained(FIXTURE_DIR)
    assert isinstance(loaded.transformer, ARPGForImageGeneration)
    assert isinstance(loaded.vqvae, ARPGVQModel)
    assert isinstance(loaded.scheduler, ARPGScheduler) and loaded.scheduler.config.token_schedule == "cosine"
    expected = build_pipeline()  # the same weights, drawn from their names with today's module tree
    for name in ("transformer", "vqvae"):
        saved, current = getattr(loaded, name).state_dict(), getattr(expected, name).state_dict()
        assert saved.keys() == current.keys()
        for key in current:
            assert torch.equal(saved[key], current[key]), key


def test_committed_pipeline_generates_images():
    pipe = ARPGPipeline.from_pretrained(FIXTURE_DIR)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([0, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 4, 6)  # a 2x3 token grid, downsample factor 2
    tokens = pipe([0, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert tokens.shape == (2, 6) and tokens.max() < 16
