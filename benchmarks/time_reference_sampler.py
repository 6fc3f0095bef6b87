#!/usr/bin/env python
"""Times the original ARPG sampler (github.com/hp-l33/ARPG) with random weights, as `bench_sampling.py` times ours.

    git clone https://github.com/hp-l33/ARPG /tmp/ARPG && git -C /tmp/ARPG checkout 1a1758c
    pip install einops   # the original code needs it
    python benchmarks/time_reference_sampler.py --reference-repo /tmp/ARPG --threads 2

Runs `ARPG_models[PRESET]().generate(labels, guidance_scale, num_iter, cfg_schedule="constant",
sample_schedule="arccos")` under `torch.inference_mode()` (labels 0..batch-1), `--warmup` calls then `--repeats`
timed ones, and prints the median seconds per batch, images per second and the process's peak RSS. Nothing of the
original code is part of this repository: its `models/arpg.py` is loaded from `--reference-repo`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-repo", required=True, help="a checkout of hp-l33/ARPG (its models/arpg.py)")
    parser.add_argument("--preset", default="ARPG-L", choices=["ARPG-L", "ARPG-XL", "ARPG-XXL"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-inference-steps", type=int, default=64)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    source = os.path.join(args.reference_repo, "models", "arpg.py")
    if not os.path.isfile(source):
        raise SystemExit(
            f"--reference-repo {args.reference_repo!r} has no models/arpg.py: pass a checkout of hp-l33/ARPG."
        )
    spec = importlib.util.spec_from_file_location("reference_arpg", source)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)  # the original code (it imports torch, numpy, einops and transformers)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = reference.ARPG_models[args.preset]().eval()
    labels = torch.arange(args.batch_size)
    timings = []
    with torch.inference_mode():
        for _ in range(args.warmup + args.repeats):
            start = time.perf_counter()
            model.generate(
                labels,
                guidance_scale=args.guidance_scale,
                num_iter=args.num_inference_steps,
                cfg_schedule="constant",
                sample_schedule="arccos",
            )
            timings.append(time.perf_counter() - start)
    seconds = statistics.median(timings[args.warmup :])
    record = {
        "sampler": "hp-l33/ARPG generate",
        "preset": args.preset,
        "batch_size": args.batch_size,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "threads": torch.get_num_threads(),
        "timings": timings,
        "seconds_per_batch": seconds,
        "images_per_second": args.batch_size / seconds,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(
        f"original {args.preset}: runs {[round(t, 2) for t in timings]}, median {seconds:.2f} s / batch, "
        f"{record['images_per_second']:.3f} images / s, peak RSS {record['peak_memory_mb'] / 1024:.2f} GB"
    )
    if args.json_path:  # one record, as bench_sampling.py writes a list of them
        Path(args.json_path).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


if __name__ == "__main__":
    main()
