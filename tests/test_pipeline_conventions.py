"""diffusers pipeline conventions on the bundled digits model (8x8 tokens): `interrupt`, the `guidance_scale` /
`num_timesteps` properties, `PipelineCallback` objects, and masks through a `VaeImageProcessor` mask processor."""

import numpy as np
import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from arpg_hf import ARPGInpaintPipeline, ARPGPipeline, load_bundled_pipeline

from .conftest import recording_calls


@pytest.fixture(scope="module")
def pipe():
    pipe = load_bundled_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


class InterruptAt(PipelineCallback):
    """Stops the call at `cutoff_step_index`, recording what the pipeline reports at every step."""

    tensor_inputs = ["tokens"]

    def __init__(self, cutoff_step_index):
        super().__init__(cutoff_step_ratio=None, cutoff_step_index=cutoff_step_index)
        self.seen = []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        tokens = callback_kwargs["tokens"]
        self.seen.append(
            (step_index, int(timestep), int((tokens >= 0).sum()), pipeline.guidance_scale, pipeline.num_timesteps)
        )
        if step_index == self.config.cutoff_step_index:
            pipeline._interrupt = True
        return callback_kwargs


def run(pipe, callback=None, steps=16, **kwargs):
    with recording_calls(pipe, "decode_step") as calls:
        tokens = pipe(
            [3, 7],
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            callback_on_step_end=callback,
            **kwargs,
        ).images
    return tokens, len(calls)


def test_interrupt_at_step_2_of_16_runs_one_more_step_that_finishes_the_image(pipe):
    full, full_steps = run(pipe)
    callback = InterruptAt(cutoff_step_index=2)
    tokens, steps = run(pipe, callback)
    assert full_steps == 16 and steps == 4  # steps 0, 1, 2, then one that decodes every remaining token
    assert pipe.interrupt and tokens.shape == (2, 64) and bool((tokens >= 0).all())
    assert [entry[0] for entry in callback.seen] == [0, 1, 2, 3]
    assert callback.seen[-1][2] == 2 * 64  # every token decided at the last step
    known_before = callback.seen[2][2] // 2
    order = pipe.prepare_orders(None, 2, torch.Generator().manual_seed(0), "cpu", num_tokens=64)[0]
    decided = order[:known_before]  # the tokens of steps 0-2 equal those of the uninterrupted call
    assert torch.equal(tokens[:, decided], full[:, decided])
    assert run(pipe)[1] == 16  # the next call starts afresh (interrupt is reset)


def test_properties_report_the_call(pipe):
    callback = InterruptAt(cutoff_step_index=99)
    run(pipe, callback, steps=5, guidance_scale=3.0)
    assert {(entry[3], entry[4]) for entry in callback.seen} == {(3.0, 5)}
    assert [entry[1] for entry in callback.seen] == [0, 1, 2, 3, 4]  # timesteps are the step indices
    run(pipe, callback := InterruptAt(cutoff_step_index=99))  # defaults: the bundled scheduler's settings
    config = pipe.scheduler.config
    assert {(entry[3], entry[4]) for entry in callback.seen} == {
        (config.recommended_guidance_scale, config.recommended_num_inference_steps)
    }


def test_multi_pipeline_callbacks_and_their_tensor_inputs(pipe):
    first, second = InterruptAt(cutoff_step_index=99), InterruptAt(cutoff_step_index=1)
    tokens, steps = run(pipe, MultiPipelineCallbacks([first, second]))
    assert steps == 3 and [entry[0] for entry in first.seen] == [0, 1, 2]

    class WantsLatents(InterruptAt):
        tensor_inputs = ["latents"]

    with pytest.raises(ValueError, match="may only name"):
        run(pipe, WantsLatents(cutoff_step_index=0))


def test_interrupting_an_inpainting_call(pipe):
    inpaint = ARPGInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    image = ARPGPipeline(**pipe.components)([5], generator=torch.Generator().manual_seed(0)).images[0]
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[16:] = 255  # the bottom half: 32 of the 64 tokens
    encoded = inpaint.encode_image(inpaint.preprocess_image(image))
    callback = InterruptAt(cutoff_step_index=1)
    with recording_calls(inpaint, "decode_step") as calls:
        tokens = inpaint(
            image,
            mask,
            [5],
            num_inference_steps=8,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            callback_on_step_end=callback,
        ).images
    assert len(calls) == 3 and bool((tokens >= 0).all())
    assert torch.equal(tokens[0, :32], encoded[0, :32])  # the kept half


def test_masks_go_through_a_diffusers_mask_processor(pipe):
    inpaint = ARPGInpaintPipeline(**pipe.components)
    processor = inpaint.mask_processor
    assert isinstance(processor, VaeImageProcessor)
    assert processor.config.do_binarize and processor.config.do_convert_grayscale and not processor.config.do_normalize
    grey = Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8))  # RGB, 128/255 >= 0.5: white after binarising
    dark = Image.fromarray(np.full((32, 32), 127, dtype=np.uint8))
    calls = []
    original = processor.preprocess
    processor.preprocess = lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs)
    try:
        canvas = inpaint.prepare_canvas(grey, grey, torch.tensor([1]), None)
        assert bool(canvas[1].all()) and len(calls) == 1
        assert not bool(inpaint.prepare_canvas(grey, dark, torch.tensor([1]), None)[1].any())
    finally:
        del processor.preprocess
