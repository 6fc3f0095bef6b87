#!/usr/bin/env python
"""Training-step throughput of ARPG: forward + backward + clipping + AdamW step, random weights and tokens.

    python benchmarks/bench_train_step.py --preset ARPG-L --batch-size 4 --steps 5            # CPU, fp32
    python benchmarks/bench_train_step.py --preset ARPG-L --batch-size 32 --device cuda --dtype bf16 --json

Reports the median step time, image tokens per second (batch x grid tokens / step time) and samples per second.
The step is the one train.py runs (arpg_loss, class dropout and random orders from a generator, AdamW with decay on
>= 2-D weights); `--dtype bf16/fp16` runs it under autocast with float32 master weights, as accelerate does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from arpg_hf import ARPG_PRESETS, ARPGConfig, ARPGForImageGeneration
from arpg_hf.training_utils import arpg_loss, weight_decay_param_groups

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--preset", choices=sorted(ARPG_PRESETS), default="ARPG-L")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="Timed steps (after --warmup untimed ones).")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="Autocast dtype (fp32: none).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n-crops", type=int, default=10, help="Stored views per image (one is picked per step).")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = ARPGConfig.from_preset(args.preset)
    model = ARPGForImageGeneration(config).to(device).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(
        weight_decay_param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, config.vocab_size, (args.batch_size, args.n_crops, config.num_image_tokens), device=device)
    labels = torch.randint(0, config.num_classes, (args.batch_size,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32"):
            loss = arpg_loss(model, codes, labels, generator=generator)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    result = dict(
        preset=args.preset,
        parameters=model.num_parameters(),
        device=str(device),
        dtype=args.dtype,
        batch_size=args.batch_size,
        tokens_per_image=config.num_image_tokens,
        steps=args.steps,
        step_seconds_median=step_time,
        step_seconds=times,
        tokens_per_second=args.batch_size * config.num_image_tokens / step_time,
        samples_per_second=args.batch_size / step_time,
        threads=torch.get_num_threads(),
        gradient_checkpointing=args.gradient_checkpointing,
        final_loss=float(loss.detach()),
    )
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(device)
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{result['preset']} ({result['parameters'] / 1e6:.0f}M), {result['device']} {result['dtype']}, batch "
        f"{result['batch_size']}: {result['step_seconds_median']:.3f} s/step, "
        f"{result['tokens_per_second']:.0f} tokens/s, {result['samples_per_second']:.2f} samples/s"
    )


if __name__ == "__main__":
    main()
