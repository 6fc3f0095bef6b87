"""Offloading: diffusers' model offload, accelerate's sequential offload and diffusers' group offload.

Every decoding step is a call of the transformer (its `forward`), and every weight is read through a call of the
module that owns it, so the hooks that these methods install see every use, with no special code. On this CPU-only
machine the execution device is the CPU: the hooks move nothing (or bring weights in from the meta device), but the
order in which they run against the models' use is what a GPU needs, and the tokens must not change.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from arpg_hf import ARPGInpaintPipeline, load_bundled_pipeline

from .test_compiled_decoding import CountingBackend


def recorded_use(pipe) -> list[str]:
    """Events in order: "hook:<component>" when a component's offload hook runs, "use:<component>" when one of its
    weight-bearing submodules computes. Hooks are re-created after each call (`maybe_free_model_hooks`): wrap again
    before every call."""
    events = []
    for name, submodules in (("transformer", ("model",)), ("vqvae", ("encoder", "decoder"))):
        component = getattr(pipe, name)
        hook, run = component._hf_hook, component._hf_hook.pre_forward

        def pre_forward(module, *args, _run=run, _name=name, **kwargs):
            events.append(f"hook:{_name}")
            return _run(module, *args, **kwargs)

        hook.pre_forward = pre_forward
        for submodule in submodules:
            getattr(component, submodule).register_forward_pre_hook(
                lambda *_, _name=name: events.append(f"use:{_name}") if events[-1:] != [f"use:{_name}"] else None
            )
    return events


def first_use_follows_its_hook(events, name) -> bool:
    return f"use:{name}" in events and f"hook:{name}" in events[: events.index(f"use:{name}")]


def fresh(pipeline_class=None, offload: bool = False):
    """A bundled pipeline of its own (offloading hooks its modules), optionally as another pipeline class."""
    pipe = load_bundled_pipeline()
    pipe = pipe if pipeline_class is None else pipeline_class(**pipe.components)
    pipe.set_progress_bar_config(disable=True)
    if offload:
        pipe.enable_model_cpu_offload(device="cpu")
    return pipe


@pytest.fixture(scope="module")
def reference():
    return fresh()


def test_generation_runs_the_hooks_before_the_models_and_keeps_the_tokens(reference):
    kwargs = dict(class_labels=[3, 8], num_inference_steps=8, output_type="np")
    expected = reference(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe = fresh(offload=True)
    events = recorded_use(pipe)
    got = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(got, expected)
    assert first_use_follows_its_hook(events, "transformer") and first_use_follows_its_hook(events, "vqvae")
    assert events.count("hook:transformer") == len(pipe.scheduler.tokens_per_step)  # before every step
    assert pipe._execution_device == torch.device("cpu", 0)


def test_inpainting_runs_the_hooks_before_encoding_decoding_and_vq_decoding(reference):
    source = reference(class_labels=[5], generator=torch.Generator().manual_seed(1), output_type="pil").images[0]
    mask = np.zeros((source.height, source.width), dtype=np.uint8)
    mask[source.height // 2 :] = 255
    kwargs = dict(image=source, mask_image=Image.fromarray(mask), class_labels=[5, 6], output_type="latent")
    expected = ARPGInpaintPipeline(**reference.components)(**kwargs, generator=torch.Generator().manual_seed(2))
    pipe = fresh(ARPGInpaintPipeline, offload=True)
    events = recorded_use(pipe)
    got = pipe(**kwargs, generator=torch.Generator().manual_seed(2))
    assert torch.equal(got.images, expected.images)
    assert events[:2] == ["hook:vqvae", "use:vqvae"]  # encoding the canvas comes first
    assert first_use_follows_its_hook(events, "transformer")


def test_compiled_decoding_runs_the_hook_outside_the_graph(reference):
    kwargs = dict(class_labels=[0, 7], num_inference_steps=3, output_type="latent")
    expected = reference(**kwargs, generator=torch.Generator().manual_seed(3)).images
    pipe = fresh(offload=True)
    backend = CountingBackend()
    pipe.enable_compiled_decoding(backend=backend)
    try:
        events = recorded_use(pipe)
        got = pipe(**kwargs, generator=torch.Generator().manual_seed(3)).images
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, expected)
    assert backend.graphs  # the steps did run compiled, with the hook traced out of them
    assert first_use_follows_its_hook(events, "transformer") and events.count("hook:transformer") == 3


def test_sequential_offload_keeps_the_tokens(reference):
    """accelerate's per-module offload: every weight stays on the meta device and is brought in for the call of the
    module that owns it. (diffusers' `enable_sequential_cpu_offload(device="cpu")` asks accelerate for the device
    "cpu:0", where accelerate 1.13 turns the loaded parameters into plain tensors and then fails to offload them
    again, for any model; the same hooks with the device "cpu" are what it would install.)"""
    from accelerate import cpu_offload

    kwargs = dict(class_labels=[3, 8], num_inference_steps=8, output_type="latent")
    expected = reference(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe = fresh()
    cpu_offload(pipe.transformer, execution_device=torch.device("cpu"))
    assert {p.device.type for p in pipe.transformer.parameters()} == {"meta"}
    assert torch.equal(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images, expected)


def _group_offload_runs_here() -> bool:
    """diffusers before 0.41 builds group offloading on `torch.accelerator.current_accelerator()`, None on a machine
    without an accelerator (its own limitation: the hook setup fails for any model there)."""
    import diffusers
    from packaging.version import Version

    has_accelerator = hasattr(torch, "accelerator") and torch.accelerator.current_accelerator() is not None
    return has_accelerator or Version(diffusers.__version__) >= Version("0.41.0")


@pytest.mark.skipif(not _group_offload_runs_here(), reason="diffusers < 0.41 needs an accelerator for group offloading")
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_keeps_the_tokens_and_images(reference, offload_type):
    """diffusers' group offload of the transformer; the VQ model is excluded because diffusers' `VQModel` declares
    no support for it (`_supports_group_offloading = False`)."""
    kwargs = dict(class_labels=[3, 8], num_inference_steps=8, output_type="np")
    expected = reference(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe = fresh()
    pipe.enable_group_offload(
        onload_device=torch.device("cpu"),
        offload_device=torch.device("cpu"),
        offload_type=offload_type,
        num_blocks_per_group=1,
        exclude_modules=["vqvae"],
    )
    assert any(hasattr(module, "_diffusers_hook") for module in pipe.transformer.modules())
    np.testing.assert_array_equal(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images, expected)
