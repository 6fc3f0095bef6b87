"""diffusers' enable_model_cpu_offload: the accelerate hooks run before decoding and VQ coding use the weights.

Decoding calls `decode_step` (and the tokenizer `encode` / `decode`), not `forward`, so the offload hooks, which wrap
`forward`, must be run explicitly: once per decoding loop (a hook moves the whole model, milliseconds each time), and
by the tokenizer's `encode` / `decode`. On this CPU-only machine the execution device is the CPU: the hooks
move nothing, but the order in which they run against the models' use is what a GPU needs.
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
    assert events.count("hook:transformer") == 1  # once for the decoding loop, not per step
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
    assert first_use_follows_its_hook(events, "transformer") and events.count("hook:transformer") == 1


@pytest.mark.parametrize(
    "method, kwargs",
    [("enable_sequential_cpu_offload", dict(device="cpu")), ("enable_group_offload", dict(onload_device="cpu"))],
)
def test_per_module_offloading_is_refused_with_the_alternative(method, kwargs):
    """Per-module hooks would leave the weights read outside module calls unloaded: refused before any hook is set
    (group offloading from disk gave NaN images before)."""
    pipe = load_bundled_pipeline()
    with pytest.raises(NotImplementedError, match=rf"{method}\(\).*enable_model_cpu_offload\(\)"):
        getattr(pipe, method)(**kwargs)
    with pytest.raises(ValueError, match="does not support group offloading"):
        pipe.vqvae.enable_group_offload(onload_device="cpu")
    assert not any(hasattr(module, "_hf_hook") or hasattr(module, "_diffusers_hook")
                   for component in (pipe.transformer, pipe.vqvae) for module in component.modules())  # fmt: skip
