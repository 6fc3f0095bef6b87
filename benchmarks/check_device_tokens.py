#!/usr/bin/env python
"""Do the fast paths give the reference tokens on an accelerator? A check to run before timing one.

On a small random model (ARPGConfig scaled down, absolute positions on, the head redrawn) it decodes the same labels
with the same CPU generator, `top_k` sampling and guidance, and compares the token grids, per position, with a float32
CPU run of the eager step:

- float32 on `--device` (TF32 off), eager: expected identical (the same arithmetic, other kernels);
- bfloat16 on `--device`: agreement reported (a lower precision changes some draws, by design);
- compiled decoding on `--device` (float32; `--compile-mode`, e.g. reduce-overhead for CUDA graphs): expected
  identical to the eager run on the same device;
- inpainting on a twice-as-wide canvas, eager vs compiled on `--device`: identical.

Prints one JSON record and exits non-zero when an "identical" comparison is not.

    python benchmarks/check_device_tokens.py --device cuda [--compile-mode reduce-overhead] [--compile-key-block 16]
        [--attn-implementation eager] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from arpg_hf import (
    ARPGConfig,
    ARPGForImageGeneration,
    ARPGInpaintPipeline,
    ARPGPipeline,
    ARPGScheduler,
    ARPGVQModel,
    llamagen_vq_config,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode to check (e.g. reduce-overhead)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: a quick dry run)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled-decoding comparisons")
    parser.add_argument(
        "--compile-key-block",
        type=int,
        default=None,
        help="compiled attention reads the cache in blocks of this many slots (key_block)",
    )
    parser.add_argument(
        "--attn-implementation",
        default="sdpa",
        choices=["sdpa", "eager"],
        help="attention of every pipeline (set_attn_implementation)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-inference-steps", type=int, default=16)
    parser.add_argument("--json", dest="json_path", default=None)
    return parser.parse_args(argv)


def small_config() -> ARPGConfig:
    return ARPGConfig(
        vocab_size=512,
        num_classes=10,
        grid_height=8,
        grid_width=8,
        hidden_size=256,
        num_attention_heads=4,
        num_self_attention_layers=3,
        num_cross_attention_layers=3,
        multiple_of=64,
        absolute_position_embeddings=True,
    )


def build(config: ARPGConfig, device, dtype=torch.float32, seed: int = 0, attn_implementation="sdpa") -> ARPGPipeline:
    torch.manual_seed(seed)
    transformer = ARPGForImageGeneration(config)
    transformer.set_attn_implementation(attn_implementation)
    torch.nn.init.normal_(transformer.lm_head.weight, std=0.5)  # zero at init: a flat head samples uniformly
    for name, parameter in transformer.named_parameters():
        if "embed" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    vqvae = ARPGVQModel(
        **llamagen_vq_config(
            base_channels=32, channel_multipliers=(1, 1), z_channels=32, codebook_size=config.vocab_size
        )
    )
    pipe = ARPGPipeline(
        transformer=transformer.to(device, dtype).eval(), vqvae=vqvae.to(device).eval(), scheduler=ARPGScheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, args, labels) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        return pipe(
            labels,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=3.0,
            top_k=50,
            generator=generator,
            output_type="latent",
        ).images.cpu()


def inpaint(pipe, args, canvas: torch.Tensor, mask: torch.Tensor, labels, compile_kwargs=None) -> torch.Tensor:
    """Inpaints through an ARPGInpaintPipeline over `pipe`'s components (compiled decoding when `compile_kwargs`)."""
    inpainter = ARPGInpaintPipeline(**pipe.components)
    inpainter.set_progress_bar_config(disable=True)
    if compile_kwargs is not None:
        inpainter.enable_compiled_decoding(**compile_kwargs)
    generator = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        return inpainter(
            canvas,
            mask,
            labels,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=3.0,
            top_k=50,
            generator=generator,
            output_type="latent",
        ).images.cpu()


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean())


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    config = small_config()
    labels = torch.arange(args.batch_size) % config.num_classes
    record = {
        "device": str(device),
        "torch": torch.__version__,
        "attn_implementation": args.attn_implementation,
        "compile_key_block": args.compile_key_block,
    }
    failures = []

    def compare(name, a, b, must_match):
        record[name] = agreement(a, b)
        if must_match and record[name] != 1.0:
            failures.append(name)
        print(f"{name}: {record[name]:.4f}", flush=True)

    attention = args.attn_implementation
    reference = generate(build(config, "cpu", attn_implementation=attention), args, labels)
    eager = build(config, device, attn_implementation=attention)
    eager_tokens = generate(eager, args, labels)
    compare("float32_device_vs_cpu", eager_tokens, reference, must_match=True)
    compare(
        "bfloat16_device_vs_float32_cpu",
        generate(build(config, device, torch.bfloat16, attn_implementation=attention), args, labels),
        reference,
        must_match=False,
    )

    # Inpainting on a 16x32-token-pixel canvas (2x the trained width): right half regenerated.
    factor = eager.vqvae.downsample_factor
    height, width = config.grid_height * factor, 2 * config.grid_width * factor
    canvas = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(3))  # [0, 1]
    mask = torch.zeros(2, 1, height, width)
    mask[..., width // 2 :] = 1
    eager_inpaint = inpaint(eager, args, canvas.to(device), mask.to(device), labels[:2])

    modes = [] if args.no_compile else [args.compile_mode]
    for mode in modes:
        name = mode or "default"
        compiled = build(config, device, attn_implementation=attention)
        compile_kwargs = dict(
            backend=args.compile_backend, key_block=args.compile_key_block, **({"mode": mode} if mode else {})
        )
        compiled.enable_compiled_decoding(**compile_kwargs)
        start = time.perf_counter()
        first = generate(compiled, args, labels)
        record[f"compiled_{name}_first_call_seconds"] = time.perf_counter() - start
        compare(f"compiled_{name}_vs_eager_device", first, eager_tokens, must_match=True)
        compare(
            f"compiled_{name}_second_call_vs_eager_device",
            generate(compiled, args, labels),
            eager_tokens,
            must_match=True,
        )
        compare(
            f"compiled_{name}_inpaint_wide_vs_eager",
            inpaint(compiled, args, canvas.to(device), mask.to(device), labels[:2], compile_kwargs),
            eager_inpaint,
            must_match=True,
        )
        torch._dynamo.reset()

    record["failures"] = failures
    print(json.dumps(record, indent=2))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as file:
            json.dump(record, file, indent=2)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
