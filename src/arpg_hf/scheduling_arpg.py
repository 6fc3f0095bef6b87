"""Scheduler for ARPG: random decoding order, tokens per step, guidance per step and token sampling."""

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .random_utils import draw_uniform
from .validation import is_int, is_real

TOKEN_SCHEDULES = ("arccos", "cosine")
GUIDANCE_SCHEDULES = ("constant", "linear")
SAMPLING_METHODS = ("inverse_cdf", "multinomial")


@dataclass
class ARPGSchedulerOutput(BaseOutput):
    """
    Output of [`ARPGScheduler.step`].

    Args:
        sampled_tokens (`torch.LongTensor` of shape `(batch_size, tokens_per_step[step_index])`):
            The token ids drawn for the positions this step predicts, in decoding order.
    """

    sampled_tokens: torch.LongTensor


def _as_int(value, name: str) -> int:
    if not is_int(value):
        raise TypeError(f"`{name}` must be an int, got {value!r} of type {type(value).__name__}.")
    return int(value)


class ARPGScheduler(SchedulerMixin, ConfigMixin):
    """
    Scheduler for ARPG (autoregressive image generation with randomized parallel decoding).

    ARPG decodes the `num_tokens` image tokens in a random order, several tokens per step. This scheduler owns the
    random order, the number of tokens decoded at each step, the classifier-free guidance scale of each step and the
    sampling of token ids from logits. It inherits the loading and saving methods of [`SchedulerMixin`] and
    [`ConfigMixin`], so `ARPGScheduler.from_config(scheduler.config, token_schedule="cosine")` swaps a setting.

    Args:
        token_schedule (`str`, *optional*, defaults to `"arccos"`):
            How many tokens each step decodes: `"arccos"` (few early, many late) or `"cosine"`.
        guidance_schedule (`str`, *optional*, defaults to `"linear"`):
            `"constant"` uses `guidance_scale` at every step; `"linear"` uses
            `1 + (guidance_scale - 1) * tokens_done_after_step / num_tokens`.
        sampling_method (`str`, *optional*, defaults to `"inverse_cdf"`):
            How a token is drawn from its distribution. `"inverse_cdf"` (one uniform per token, cumsum + searchsorted)
            is the faster; `"multinomial"` calls `torch.multinomial` as the published sampler does, so that the same
            random state gives the published sampler's very draws. Both sample the same distribution.
        recommended_guidance_scale (`float`, *optional*):
            The guidance scale this model was tuned for; the pipeline uses it when called with `guidance_scale=None`.
            Converted and trained pipeline folders store the published / chosen value here.
        recommended_num_inference_steps (`int`, *optional*):
            The step count this model was tuned for; the pipeline uses it when called with
            `num_inference_steps=None`.
    """

    order = 1
    _compatibles = []

    @register_to_config
    def __init__(
        self,
        token_schedule: str = "arccos",
        guidance_schedule: str = "linear",
        sampling_method: str = "inverse_cdf",
        recommended_guidance_scale: float | None = None,
        recommended_num_inference_steps: int | None = None,
    ):
        if token_schedule not in TOKEN_SCHEDULES:
            raise ValueError(f"`token_schedule` must be one of {TOKEN_SCHEDULES}, got {token_schedule!r}.")
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"`guidance_schedule` must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}.")
        if sampling_method not in SAMPLING_METHODS:
            raise ValueError(f"`sampling_method` must be one of {SAMPLING_METHODS}, got {sampling_method!r}.")
        if recommended_guidance_scale is not None and (
            not is_real(recommended_guidance_scale) or recommended_guidance_scale < 0
        ):
            raise ValueError(f"`recommended_guidance_scale` must be a number >= 0, got {recommended_guidance_scale!r}.")
        if (
            recommended_num_inference_steps is not None
            and _as_int(recommended_num_inference_steps, "recommended_num_inference_steps") < 1
        ):
            raise ValueError(f"`recommended_num_inference_steps` must be >= 1, got {recommended_num_inference_steps}.")
        self.num_inference_steps = None
        self.num_tokens = None
        self.timesteps = None
        self.tokens_per_step = None
        self.step_boundaries = None

    def _mask_ratio(self, step_index: int, num_inference_steps: int) -> float:
        """Fraction of tokens still masked after `step_index`, in float64 as upstream computes it."""
        # Keep upstream's operation order: the float64 results must match bit for bit.
        if self.config.token_schedule == "arccos":
            return float(np.arccos(1.0 * (step_index + 1) / num_inference_steps) / (math.pi * 0.5))
        return float(np.cos(math.pi / 2.0 * (step_index + 1) / num_inference_steps))

    def set_timesteps(self, num_inference_steps: int, num_tokens: int, device: str | torch.device | None = None):
        """
        Compute how many tokens each step decodes.

        Upstream rule, with `done` the number of tokens generated before step `k` and `L = num_tokens`:
        `mask_len = max(1, min(L - done - 1, floor(L * ratio(k))))` and `n_k = L - done - mask_len`; the last step
        takes all `L - done` remaining tokens. Adjustment: step `k` takes at most `L - done - (steps - k - 1)`
        tokens, so every later step keeps at least one. This cap only binds where the upstream rule would leave a
        later step without tokens; for the arccos and cosine ratios with `1 <= steps <= L` it never binds (both
        ratios are >= `1 - (k + 1) / steps`), so the upstream numbers are reproduced unchanged.

        Args:
            num_inference_steps (`int`):
                Number of decoding steps, `1 <= num_inference_steps <= num_tokens`.
            num_tokens (`int`):
                Number of image tokens to generate (e.g. 256 for a 16x16 grid), at least 1.
            device (`str` or `torch.device`, *optional*):
                Device of `self.timesteps`.
        """
        num_inference_steps = _as_int(num_inference_steps, "num_inference_steps")
        num_tokens = _as_int(num_tokens, "num_tokens")
        tokens_per_step = self.tokens_per_step_for(num_inference_steps, num_tokens)
        self.num_inference_steps = num_inference_steps
        self.num_tokens = num_tokens
        self.tokens_per_step = tokens_per_step
        offsets = np.cumsum([0] + tokens_per_step).tolist()
        self.step_boundaries = list(zip(offsets[:-1], offsets[1:]))
        self.timesteps = torch.arange(num_inference_steps, dtype=torch.long, device=device)

    def tokens_per_step_for(self, num_inference_steps: int, num_tokens: int) -> list[int]:
        """How many tokens each of `num_inference_steps` steps decodes out of `num_tokens` (see `set_timesteps`),
        without changing the scheduler."""
        if num_tokens < 1:
            raise ValueError(f"`num_tokens` must be >= 1, got {num_tokens}.")
        if not 1 <= num_inference_steps <= num_tokens:
            raise ValueError(
                f"`num_inference_steps` must be in [1, num_tokens={num_tokens}] (each step decodes at least one "
                f"token), got {num_inference_steps}. Pass a value in that range."
            )
        tokens_per_step, done = [], 0
        for k in range(num_inference_steps):
            remaining = num_tokens - done
            if k == num_inference_steps - 1:
                count = remaining
            else:
                mask_len = max(1, min(remaining - 1, math.floor(num_tokens * self._mask_ratio(k, num_inference_steps))))
                count = min(remaining - mask_len, remaining - (num_inference_steps - k - 1))
            tokens_per_step.append(count)
            done += count
        return tokens_per_step

    def finish_at(self, step_index: int) -> None:
        """Makes `step_index` the last step: it decodes every token not decoded before it (what a pipeline does when a
        callback sets `pipe._interrupt = True`). The guidance of that step is the last step's."""
        step_index = self._check_step_index(step_index)
        start = self.step_boundaries[step_index][0]
        self.step_boundaries = self.step_boundaries[:step_index] + [(start, self.num_tokens)]
        self.tokens_per_step = [end - begin for begin, end in self.step_boundaries]
        self.num_inference_steps = step_index + 1
        self.timesteps = self.timesteps[: step_index + 1]

    def _check_step_index(self, step_index: int) -> int:
        if self.tokens_per_step is None:
            raise RuntimeError("Call `set_timesteps(num_inference_steps, num_tokens)` before using per-step values.")
        step_index = _as_int(step_index, "step_index")
        if not 0 <= step_index < self.num_inference_steps:
            raise ValueError(f"`step_index` must be in [0, {self.num_inference_steps - 1}], got {step_index}.")
        return step_index

    def guidance_scale_for_step(self, step_index: int, guidance_scale: float) -> float:
        """
        Classifier-free guidance scale of one step.

        Args:
            step_index (`int`):
                Index of the step, `0 <= step_index < num_inference_steps`.
            guidance_scale (`float`):
                The guidance scale `g` the user asked for.

        Returns:
            `float`: `g` for `"constant"`; `1 + (g - 1) * done_after / num_tokens` for `"linear"`, where `done_after`
            counts the tokens generated up to and including this step (so the last step uses `g`).
        """
        step_index = self._check_step_index(step_index)
        if self.config.guidance_schedule == "constant":
            return float(guidance_scale)
        done_after = self.step_boundaries[step_index][1]
        return 1.0 + (guidance_scale - 1.0) * done_after / self.num_tokens

    def random_order(
        self,
        num_tokens: int,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
    ) -> torch.LongTensor:
        """
        Draw a random decoding order, as upstream does with `torch.rand(num_tokens).argsort()`.

        Args:
            num_tokens (`int`):
                Number of token positions `L`.
            batch_size (`int`, *optional*):
                When given, draw one permutation per row with `torch.rand(batch_size, L).argsort(-1)`.
            generator (`torch.Generator`, *optional*):
                One generator (a list is not accepted); the uniforms are drawn on its device.
            device (`str` or `torch.device`, *optional*):
                Device of the returned order.

        Returns:
            `torch.LongTensor` of shape `(L,)` or `(batch_size, L)`: permutations of `0..L-1`.
        """
        num_tokens = _as_int(num_tokens, "num_tokens")
        if num_tokens < 1:
            raise ValueError(f"`num_tokens` must be >= 1, got {num_tokens}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be one torch.Generator or None, got {type(generator).__name__}.")
        shape = (num_tokens,)
        if batch_size is not None:
            batch_size = _as_int(batch_size, "batch_size")
            if batch_size < 1:
                raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
            shape = (batch_size, num_tokens)
        return draw_uniform(shape, generator, device).argsort(dim=-1)  # (L,) or (B, L)

    @staticmethod
    def check_sampling_args(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
        """Raise a ValueError / TypeError for sampling arguments out of range (callable before any model work)."""
        if not is_real(temperature):
            raise TypeError(f"`temperature` must be a float, got {type(temperature).__name__}.")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"`temperature` must be a finite value >= 0 (0 means greedy), got {temperature}.")
        if top_k is not None:
            top_k = _as_int(top_k, "top_k")
            if top_k < 0:
                raise ValueError(f"`top_k` must be >= 0 (0 or None disables it, 1 is greedy), got {top_k}.")
        if top_p is not None:
            if not is_real(top_p):
                raise TypeError(f"`top_p` must be a float, got {type(top_p).__name__}.")
            if not 0 < top_p <= 1:
                raise ValueError(f"`top_p` must be in (0, 1] (None or 1.0 disables it), got {top_p}.")

    def sample(
        self,
        logits: torch.FloatTensor,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        """
        Draw one token id per row of `logits`.

        `temperature == 0` or `top_k == 1` is greedy (`argmax`, first maximum wins). Otherwise the logits are divided
        by `max(temperature, 1e-5)`, filtered by top-k then top-p, turned into float32 probabilities and sampled by
        inverse CDF with one uniform per token from `generator` (the distribution of `torch.multinomial`), or with
        `torch.multinomial` itself when the scheduler's `sampling_method` is `"multinomial"`.

        Args:
            logits (`torch.FloatTensor` of shape `(..., vocab_size)`):
                Guidance-combined logits.
            temperature (`float`, *optional*, defaults to 1.0):
                Softmax temperature, >= 0.
            top_k (`int`, *optional*):
                Keep the logits >= the k-th largest. `None`, 0 or a value >= vocab_size disables it.
            top_p (`float`, *optional*):
                Keep the smallest set of most likely tokens whose probability reaches `top_p` (always the top one),
                in (0, 1]. `None` or 1.0 disables it.
            generator (`torch.Generator`, *optional*):
                Source of the uniforms; they are drawn on its device.

        Returns:
            `torch.LongTensor` of shape `(...)`: sampled token ids.
        """
        self.check_sampling_args(temperature, top_k, top_p)
        if not torch.is_tensor(logits) or not logits.is_floating_point() or logits.ndim < 1:
            raise ValueError("`logits` must be a floating point tensor of shape (..., vocab_size).")
        if temperature == 0 or top_k == 1:
            return logits.argmax(dim=-1)
        vocab_size = logits.shape[-1]
        logits = logits.float() / max(temperature, 1e-5)
        if top_k and top_k < vocab_size:
            kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
            logits = logits.masked_fill(logits < kth_largest, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # (..., V)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (..., V)
            # A token goes when the tokens before it already exceed top_p (so the top token always stays).
            drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
            drop_sorted[..., 1:] = cumulative[..., :-1] > top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_ids, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)  # (..., V) float32
        if self.config.sampling_method == "multinomial":
            draw_device = generator.device if generator is not None else probs.device
            flat = probs.reshape(-1, vocab_size).to(draw_device)  # (N, V)
            return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1]).to(probs.device)
        cdf = probs.cumsum(dim=-1)  # (..., V)
        uniforms = draw_uniform(probs.shape[:-1] + (1,), generator, logits.device) * cdf[..., -1:]  # (..., 1)
        token_ids = torch.searchsorted(cdf, uniforms, right=True)  # (..., 1)
        # Rounding can push the index past the last token with non-zero probability; clamp it back.
        positions = torch.arange(vocab_size, device=logits.device)
        last_allowed = torch.where(probs > 0, positions, 0).amax(dim=-1, keepdim=True)  # (..., 1)
        return torch.minimum(token_ids, last_allowed).squeeze(-1)

    def step(
        self,
        logits: torch.FloatTensor,
        step_index: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> ARPGSchedulerOutput | tuple:
        """
        Sample the tokens of one decoding step.

        Args:
            logits (`torch.FloatTensor` of shape `(batch_size, tokens_per_step[step_index], vocab_size)`):
                Guidance-combined logits of the positions this step predicts.
            step_index (`int`):
                Index of the step, `0 <= step_index < num_inference_steps`.
            temperature, top_k, top_p, generator:
                As in [`ARPGScheduler.sample`].
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`ARPGSchedulerOutput`] instead of a tuple.

        Returns:
            [`ARPGSchedulerOutput`] or `tuple`: `sampled_tokens` of shape `(batch_size, tokens_per_step[step_index])`.
        """
        step_index = self._check_step_index(step_index)
        expected = self.tokens_per_step[step_index]
        if not torch.is_tensor(logits) or logits.ndim != 3 or logits.shape[1] != expected:
            got = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise ValueError(
                f"`logits` for step {step_index} must have shape (batch_size, {expected}, vocab_size), got {got}. "
                "Pass the logits of the positions `step_boundaries[step_index]` of the order."
            )
        sampled_tokens = self.sample(logits, temperature, top_k, top_p, generator)  # (B, n_k)
        if not return_dict:
            return (sampled_tokens,)
        return ARPGSchedulerOutput(sampled_tokens=sampled_tokens)
