import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from arpg_hf.scheduling_arpg import ARPGScheduler, ARPGSchedulerOutput

from .conftest import PARITY_DIR, read_json


def _cases():
    return read_json("cases.json")["generate"]["cases"]


def _upstream_tokens_per_step(schedule, num_steps, num_tokens):
    """The upstream integer rule without any adjustment, written independently of the scheduler."""
    counts, done = [], 0
    for k in range(num_steps):
        if schedule == "arccos":
            ratio = np.arccos(1.0 * (k + 1) / num_steps) / (math.pi * 0.5)
        else:
            ratio = np.cos(math.pi / 2.0 * (k + 1) / num_steps)
        mask_len = max(1, min(num_tokens - done - 1, int(np.floor(num_tokens * ratio))))
        count = num_tokens - done if k == num_steps - 1 else num_tokens - done - mask_len
        counts.append(count)
        done += count
    return counts


@pytest.mark.parametrize("case_index", range(4))
def test_fixture_tokens_and_guidance_per_step(case_index):
    case = _cases()[case_index]
    scheduler = ARPGScheduler(token_schedule=case["sample_schedule"], guidance_schedule=case["cfg_schedule"])
    scheduler.set_timesteps(case["num_iter"], case["seq_len"])
    assert scheduler.tokens_per_step == case["num_pred_per_step"]
    fixture = load_file(str(PARITY_DIR / "generate.safetensors"))[f"{case['key']}.num_pred_per_step"]
    assert scheduler.tokens_per_step == fixture.tolist()
    scales = [scheduler.guidance_scale_for_step(k, case["guidance_scale"]) for k in range(case["num_iter"])]
    assert scales == case["cfg_scale_per_step"]
    assert scheduler.timesteps.tolist() == list(range(case["num_iter"]))
    assert scheduler.num_inference_steps == case["num_iter"] and scheduler.num_tokens == case["seq_len"]


@pytest.mark.parametrize("schedule", ["arccos", "cosine"])
def test_every_step_count_samples_each_position_once(schedule):
    scheduler = ARPGScheduler(token_schedule=schedule)
    for num_tokens in (1, 2, 5, 16, 64, 256):
        for num_steps in range(1, num_tokens + 1):
            scheduler.set_timesteps(num_steps, num_tokens)
            counts = scheduler.tokens_per_step
            assert len(counts) == num_steps and min(counts) >= 1 and sum(counts) == num_tokens
            assert counts == _upstream_tokens_per_step(schedule, num_steps, num_tokens)
            starts = [start for start, _ in scheduler.step_boundaries]
            ends = [end for _, end in scheduler.step_boundaries]
            assert starts[0] == 0 and ends[-1] == num_tokens and starts[1:] == ends[:-1]


def test_example_close_to_num_tokens():
    scheduler = ARPGScheduler(token_schedule="arccos")
    scheduler.set_timesteps(60, 64)
    assert scheduler.tokens_per_step == [1] * 59 + [5]


def test_cap_keeps_a_token_for_every_later_step():
    class GreedyRatioScheduler(ARPGScheduler):
        def _mask_ratio(self, step_index, num_inference_steps):
            return 0.0  # upstream rule alone would take all but one token at step 0

    scheduler = GreedyRatioScheduler()
    scheduler.set_timesteps(4, 10)
    assert scheduler.tokens_per_step == [7, 1, 1, 1]


@pytest.mark.parametrize("num_steps", [0, 17])
def test_step_count_out_of_range(num_steps):
    with pytest.raises(ValueError, match=r"\[1, num_tokens=16\].*got " + str(num_steps)):
        ARPGScheduler().set_timesteps(num_steps, 16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="arccos"):
        ARPGScheduler(token_schedule="linear")
    with pytest.raises(ValueError, match="constant"):
        ARPGScheduler(guidance_schedule="cosine")
    with pytest.raises(ValueError, match=">= 1"):
        ARPGScheduler().set_timesteps(1, 0)
    with pytest.raises(TypeError):
        ARPGScheduler().set_timesteps(2.0, 16)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        ARPGScheduler().guidance_scale_for_step(0, 4.0)


def test_guidance_linear_and_constant():
    linear = ARPGScheduler(token_schedule="arccos", guidance_schedule="linear")
    linear.set_timesteps(8, 64)
    assert linear.guidance_scale_for_step(0, 4.0) == 1.28125
    assert linear.guidance_scale_for_step(7, 4.0) == 4.0
    constant = ARPGScheduler.from_config(linear.config, guidance_schedule="constant")
    constant.set_timesteps(8, 64)
    assert constant.guidance_scale_for_step(3, 2.5) == 2.5
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        constant.guidance_scale_for_step(8, 2.5)


def test_random_order():
    scheduler = ARPGScheduler()
    order = scheduler.random_order(64, generator=torch.Generator().manual_seed(3))
    assert order.shape == (64,) and order.dtype == torch.long
    assert sorted(order.tolist()) == list(range(64))
    assert torch.equal(order, scheduler.random_order(64, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(order, torch.rand(64, generator=torch.Generator().manual_seed(3)).argsort())
    assert not torch.equal(order, scheduler.random_order(64, generator=torch.Generator().manual_seed(4)))

    orders = scheduler.random_order(16, batch_size=5, generator=torch.Generator().manual_seed(0))
    assert orders.shape == (5, 16)
    assert torch.equal(orders.sort(dim=-1).values, torch.arange(16).expand(5, 16))
    assert torch.equal(orders, torch.rand(5, 16, generator=torch.Generator().manual_seed(0)).argsort(-1))
    assert len({tuple(row) for row in orders.tolist()}) == 5
    with pytest.raises(TypeError):
        scheduler.random_order(8, generator=[torch.Generator()])


def test_greedy_is_argmax():
    scheduler = ARPGScheduler()
    logits = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(0))
    logits[0, 0, 4] = logits[0, 0, 9] = logits[0, 0].max() + 1.0  # tie: first index wins
    expected = logits.argmax(-1)
    assert torch.equal(scheduler.sample(logits, temperature=0.0), expected)
    assert torch.equal(scheduler.sample(logits, temperature=2.0, top_k=1), expected)
    assert scheduler.sample(logits, temperature=0.0)[0, 0].item() == 4


def test_top_k_and_top_p_filters():
    scheduler = ARPGScheduler()
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 32, generator=generator)
    top3 = logits.topk(3, dim=-1).indices
    tokens = scheduler.sample(logits, top_k=3, generator=generator)
    assert (tokens[:, None] == top3).any(-1).all()
    tokens = scheduler.sample(logits, top_p=1e-4, generator=generator)
    assert torch.equal(tokens, logits.argmax(-1))
    # top_p = 0.5 over probabilities [0.4, 0.3, 0.2, 0.1] keeps exactly the first two tokens
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(2000, 4)
    tokens = scheduler.sample(probs, top_p=0.5, generator=generator)
    assert set(tokens.tolist()) == {0, 1}


def test_sampling_reproducible_with_generator():
    scheduler = ARPGScheduler()
    logits = torch.randn(4, 6, 100, generator=torch.Generator().manual_seed(2))
    first = scheduler.sample(logits, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    second = scheduler.sample(logits, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert first.shape == (4, 6) and torch.equal(first, second)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_inverse_cdf_matches_softmax(temperature):
    scheduler = ARPGScheduler()
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    num_draws = 20000
    tokens = scheduler.sample(
        base.expand(num_draws, 8), temperature=temperature, generator=torch.Generator().manual_seed(11)
    )
    frequencies = torch.bincount(tokens, minlength=8).float() / num_draws
    expected = (base / temperature).softmax(-1)
    assert (frequencies - expected).abs().max().item() < 0.02


def test_sampling_argument_errors():
    scheduler = ARPGScheduler()
    logits = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=">= 0.*-0.5"):
        scheduler.sample(logits, temperature=-0.5)
    with pytest.raises(ValueError, match=">= 0.*-1"):
        scheduler.sample(logits, top_k=-1)
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            ARPGScheduler.check_sampling_args(top_p=top_p)


def test_step_wraps_sample_and_checks_shape():
    scheduler = ARPGScheduler()
    scheduler.set_timesteps(8, 64)
    logits = torch.randn(2, 6, 30, generator=torch.Generator().manual_seed(5))
    output = scheduler.step(logits, 0, top_k=1)
    assert isinstance(output, ARPGSchedulerOutput)
    assert torch.equal(output.sampled_tokens, logits.argmax(-1))
    assert torch.equal(scheduler.step(logits, 0, top_k=1, return_dict=False)[0], logits.argmax(-1))
    with pytest.raises(ValueError, match=r"\(batch_size, 5, vocab_size\)"):
        scheduler.step(logits, 1)


def test_config_override_and_round_trip(tmp_path):
    scheduler = ARPGScheduler()
    swapped = ARPGScheduler.from_config(scheduler.config, token_schedule="cosine")
    assert swapped.config.token_schedule == "cosine" and swapped.config.guidance_schedule == "linear"
    swapped.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["token_schedule"] == "cosine"
    loaded = ARPGScheduler.from_pretrained(tmp_path)
    assert loaded.config.token_schedule == "cosine" and loaded.config.guidance_schedule == "linear"
    loaded.set_timesteps(16, 64)
    assert loaded.tokens_per_step == [1, 1, 1, 2, 3, 3, 4, 4, 5, 5, 5, 6, 6, 6, 6, 6]


def test_multinomial_method_makes_torch_multinomial_draws():
    """sampling_method="multinomial" draws exactly what torch.multinomial draws from the same generator state
    (the published sampler's draws), from the same filtered distribution."""
    scheduler = ARPGScheduler(sampling_method="multinomial")
    logits = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(0))
    drawn = scheduler.sample(logits, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(1))
    filtered = logits / 0.8
    filtered = filtered.masked_fill(filtered < filtered.topk(10, dim=-1).values[..., -1:], float("-inf"))
    expected = torch.multinomial(filtered.softmax(-1).flatten(0, 1), 1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(drawn, expected.view(3, 5))
    with pytest.raises(ValueError, match="inverse_cdf"):
        ARPGScheduler(sampling_method="gumbel")


def test_top_p_keeps_tokens_until_the_mass_before_them_exceeds_top_p():
    scheduler = ARPGScheduler()
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    for top_p, allowed in [(0.45, {0}), (0.55, {0, 1}), (0.75, {0, 1}), (0.85, {0, 1, 2})]:
        draws = scheduler.sample(probs.log().expand(4000, 4), top_p=top_p, generator=torch.Generator().manual_seed(0))
        assert set(draws.tolist()) == allowed, top_p
