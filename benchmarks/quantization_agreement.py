#!/usr/bin/env python
"""How far quantized decoding moves the decoder's predictions: teacher-forced logits of the quantized decoder next to
float32's on the same tokens.

    python benchmarks/quantization_agreement.py --preset ARPG-L                 # random weights, no download
    python benchmarks/quantization_agreement.py --model FOLDER_OR_HUB_ID        # e.g. a converted arpg_300m.pt

The float32 pipeline first samples `--batch-size` images (`--num-inference-steps`, guidance `--guidance-scale`); then
float32 and every `--quantization` read those tokens teacher-forced in random orders (class-conditional, one forward
pass each). Per quantization it reports the largest absolute logit difference, the mean KL divergence
KL(p_float32 || p_quantized) of the next-token distributions, and the share of positions whose most likely token
(greedy) is the same: the agreement that decides whether sampling, and so FID, can change. With `--model`, a folder
or Hub id that cannot be found (e.g. offline) is reported and skipped (exit 0). Writes JSON with `--json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys

import torch

from arpg_hf import ARPGConfig, ARPGForImageGeneration, ARPGPipeline, ARPGScheduler, ARPGVQModel
from arpg_hf.quantization import QUANTIZATIONS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default="ARPG-L", choices=["ARPG-L", "ARPG-XL", "ARPG-XXL"])
    source.add_argument("--model", default=None, help="a pipeline folder or Hub id (published weights)")
    parser.add_argument("--quantization", nargs="+", default=["int8", "int8-weight-only", "int4-weight-only"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-inference-steps", type=int, default=64)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.quantization) - set(QUANTIZATIONS[1:]))
    if unknown:
        parser.error(f"--quantization takes {QUANTIZATIONS[1:]}, got {unknown}")
    return args


def random_pipeline(preset: str, seed: int) -> ARPGPipeline:
    """The preset with random weights (the head redrawn: it is zero at init); the tokenizer on the meta device."""
    torch.manual_seed(seed)
    config = ARPGConfig.from_preset(preset)
    transformer = ARPGForImageGeneration(config).eval()
    torch.nn.init.normal_(transformer.lm_head.weight, std=config.initializer_range)
    with torch.device("meta"):
        vqvae = ARPGVQModel(in_channels=3, out_channels=3)
    return ARPGPipeline(transformer=transformer, vqvae=vqvae, scheduler=ARPGScheduler())


def load_published(model: str) -> ARPGPipeline | None:
    """The pipeline of `model` in float32 with plain weights, or None (with a message) when it cannot be found."""
    try:
        return ARPGPipeline.from_pretrained(model, dtype=torch.float32, cpu_gemm="default")
    except (OSError, ValueError) as error:
        if os.path.isdir(model) and os.path.isfile(os.path.join(model, "model_index.json")):
            raise
        print(f"skipped: {model!r} is not available here ({type(error).__name__}: {str(error).splitlines()[0]})")
        return None


def teacher_forced_logits(transformer, tokens, labels, orders) -> torch.Tensor:
    with torch.inference_mode():
        return transformer(tokens, class_labels=labels, orders=orders).logits.float()


def agreement(reference: torch.Tensor, logits: torch.Tensor) -> dict:
    log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {
        "max_abs_logit_difference": (logits - reference).abs().max().item(),
        "mean_kl": kl.mean().item(),
        "max_kl": kl.max().item(),
        "greedy_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
    }


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = random_pipeline(args.preset, args.seed) if args.model is None else load_published(args.model)
    if pipe is None:
        return []
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer.eval()
    config = transformer.config
    generator = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(0, config.num_classes, (args.batch_size,), generator=generator)
    with torch.inference_mode():
        tokens = pipe(
            labels,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            generator=generator,
            output_type="latent",
        ).images.reshape(args.batch_size, -1)
    orders = torch.stack([torch.randperm(tokens.shape[1], generator=generator) for _ in range(args.batch_size)])
    reference = teacher_forced_logits(transformer, tokens, labels, orders)
    records = []
    for method in args.quantization:
        quantized = copy.deepcopy(transformer)
        quantized.quantize(method)
        record = {
            "model": args.model or f"{args.preset} (random weights, seed {args.seed})",
            "quantization": method,
            "positions": reference.shape[0] * reference.shape[1],
            **agreement(reference, teacher_forced_logits(quantized, tokens, labels, orders)),
        }
        del quantized
        records.append(record)
        print(json.dumps(record), flush=True)
    print()
    print("| model | quantization | max abs logit diff | mean KL | max KL | greedy agreement |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in records:
        print(
            f"| {r['model']} | {r['quantization']} | {r['max_abs_logit_difference']:.4f} | {r['mean_kl']:.2e} | "
            f"{r['max_kl']:.2e} | {100 * r['greedy_agreement']:.2f} % |"
        )
    if args.json_path:
        machine = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
        with open(args.json_path, "w", encoding="utf-8") as file:
            json.dump({"machine": machine, "records": records}, file, indent=2)
    return records


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
