"""negative_class_labels: guidance contrasts the class with a chosen class instead of the null class."""

import pytest
import torch

from arpg_hf import ARPGInpaintPipeline

from .conftest import get_dummy_pipeline, recording_calls


@pytest.fixture(scope="module")
def pipe():
    """A tiny pipeline with a constant guidance schedule (the scale is the same at every step)."""
    return get_dummy_pipeline(seed=3, scheduler_config=dict(guidance_schedule="constant"))


def greedy(pipe, labels, guidance_scale, **kwargs):
    order = torch.randperm(16, generator=torch.Generator().manual_seed(5))
    return pipe(
        labels,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        top_k=1,
        orders=order,
        output_type="latent",
        **kwargs,
    ).images


def test_guidance_zero_samples_the_negative_class(pipe):
    """At scale 0 the guided logits are the second half's: with negative classes, those of the negative classes."""
    negative = greedy(pipe, [0, 1, 2], 0.0, negative_class_labels=[3, 4, 0])
    assert torch.equal(negative, greedy(pipe, [3, 4, 0], 1.0))
    assert not torch.equal(negative, greedy(pipe, [0, 1, 2], 0.0))  # the null class differs


def test_scale_one_ignores_the_negative_class_and_scale_four_uses_it(pipe):
    assert torch.equal(greedy(pipe, [0, 1], 1.0, negative_class_labels=3), greedy(pipe, [0, 1], 1.0))
    assert not torch.equal(greedy(pipe, [0, 1], 4.0, negative_class_labels=[3, 4]), greedy(pipe, [0, 1], 4.0))


def test_negative_guided_logits(pipe):
    """The step's logits are negative + scale * (conditional - negative), computed from the two halves."""
    with recording_calls(pipe, "decode_step") as steps, recording_calls(pipe.scheduler, "step") as draws:
        greedy(pipe, [2], 3.0, negative_class_labels=[1])
    conditional, negative = steps[0][2].chunk(2)  # the first step's logits
    guided = draws[0][0][0]  # the logits the scheduler sampled from
    torch.testing.assert_close(guided, negative + 3.0 * (conditional - negative))


def test_inpainting_with_a_negative_class(pipe):
    inpaint = ARPGInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 8, 8)
    mask[:, 4:] = 1  # the bottom two token rows

    def call(labels, scale, **kwargs):
        return inpaint(
            image,
            mask,
            labels,
            num_inference_steps=3,
            guidance_scale=scale,
            top_k=1,
            generator=torch.Generator().manual_seed(1),
            output_type="latent",
            **kwargs,
        ).images

    edited = call([0, 1], 0.0, negative_class_labels=[2, 3])
    assert torch.equal(edited, call([2, 3], 1.0))
    assert torch.equal(edited[:, :8], inpaint.encode_image(image * 2 - 1)[:, :8])  # kept tokens untouched


@pytest.mark.parametrize(
    "negative, message",
    [
        ([1, 2, 3], "Got 3 negative_class_labels for 2 images"),
        ([0, 5], r"Class labels must lie in \[0, 5\)"),
        (-1, r"Class labels must lie in \[0, 5\)"),
        ("cat", "negative_class_labels must be an int or a non-empty 1-D list of ints"),
        ([], "negative_class_labels must be an int or a non-empty 1-D list of ints"),
    ],
)
def test_bad_negative_class_labels_raise(pipe, negative, message):
    with pytest.raises(ValueError, match=message):
        greedy(pipe, [0, 1], 2.0, negative_class_labels=negative)


def test_class_labels_of_the_wrong_type_raise_a_value_error(pipe):
    with pytest.raises(ValueError, match="class_labels must be an int or a non-empty 1-D list of ints, got 'cat'"):
        greedy(pipe, "cat", 2.0)
