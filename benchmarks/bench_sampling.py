#!/usr/bin/env python
"""Sampling speed and memory of ARPGPipeline: token generation and, separately, VQ decoding.

Builds a preset with random weights (no download), then for every (batch size, step count, dtype) measures the
seconds per batch (median of --repeats runs after --warmup runs), images per second and peak memory (process RSS
high-water mark on CPU, max allocated on GPU). `--raster` adds the same model decoding in raster order, one token
per step, through the very same code path (orders = 0..L-1, L steps). `--gemm-bound` also times the decoding's
matrix products alone (the model's own fused weights, the same rows per step), the practical bound of the BLAS on this
machine, and reports the share of the time they take; `--arithmetic-bound` measures the device's peak GEMM rate and
memory bandwidth and reports the run's arithmetic bound (FLOPs counted from the model / peak, or bytes moved /
bandwidth, whichever is larger) and the share of it reached. `--compile` runs the decoding steps through torch.compile at
bucketed static shapes (`pipe.enable_compiled_decoding()`, `--compile-mode reduce-overhead` for CUDA graphs); the
warm-up runs compile every shape the timed runs use. Prints a markdown table and writes JSON.

    python benchmarks/bench_sampling.py --preset ARPG-L --batch-size 4 --num-inference-steps 64 \
        --guidance-scale 4 --dtype float32 --device cpu --json OUT.json [--raster] [--compile] [--gemm-bound] [--arithmetic-bound]

Lists are allowed: `--batch-size 1 4 16 --num-inference-steps 32 64 --dtype float32 bfloat16`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from arpg_hf import (
    ARPGConfig,
    ARPGControlAdapter,
    ARPGControlPipeline,
    ARPGForImageGeneration,
    ARPGPipeline,
    ARPGScheduler,
    ARPGVQModel,
)
from arpg_hf.cpu_gemm import CPU_GEMMS, use_cpu_gemm
from arpg_hf.modeling_arpg import ARPGCrossAttentionLayer, ARPGSelfAttentionLayer
from arpg_hf.quantization import QUANTIZATIONS, quantize_linears

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="ARPG-L", choices=["ARPG-L", "ARPG-XL", "ARPG-XXL"])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[4])
    parser.add_argument("--num-inference-steps", type=int, nargs="+", default=[64])
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--token-schedule", default="arccos", choices=["arccos", "cosine"])
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--raster", action="store_true", help="also decode in raster order, one token per step")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoding step at bucketed static shapes (pipe.enable_compiled_decoding)",
    )
    parser.add_argument(
        "--cpu-gemm",
        default="auto",
        choices=CPU_GEMMS,
        help="arpg_hf.use_cpu_gemm(...): auto (what ARPGPipeline.from_pretrained applies: oneDNN pre-packed weights "
        "for float32 on a CPU-only machine), plain nn.Linear (default), BLAS on fused transposed weights, oneDNN on "
        "the weights as stored, or oneDNN on pre-packed weights",
    )
    parser.add_argument(
        "--quantization",
        nargs="+",
        default=["none"],
        choices=QUANTIZATIONS,
        help="pipe.transformer.quantize(...): on the CPU of the float32 decoder, built layer by layer, each layer "
        "quantized as it is built, so that the float32 weights are never all in memory; elsewhere torchao's, in --dtype",
    )
    parser.add_argument(
        "--cpu-packed-weights",
        dest="cpu_gemm",
        action="store_const",
        const="onednn-packed",
        help="the same as --cpu-gemm onednn-packed",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode with --compile, e.g. reduce-overhead (CUDA graphs) or max-autotune",
    )
    parser.add_argument(
        "--compile-buckets",
        type=int,
        nargs="+",
        default=None,
        help="padded step sizes with --compile (default: powers of two); fewer buckets, fewer graphs",
    )
    parser.add_argument(
        "--compile-key-block",
        type=int,
        default=None,
        help="with --compile: attention reads the cache up to the filled slots rounded up to a "
        "multiple of this (e.g. 64) instead of the whole cache",
    )
    parser.add_argument(
        "--attn-implementation",
        default="sdpa",
        choices=["sdpa", "eager"],
        help="the decoder's attention: F.scaled_dot_product_attention (default) or plain matmul + "
        "softmax (which torch.compile fuses on its own)",
    )
    parser.add_argument(
        "--no-vq", action="store_true", help="skip the VQ decoding measurement (the tokenizer is not even built)"
    )
    parser.add_argument(
        "--gemm-bound",
        action="store_true",
        help="also time the step's matrix products alone (same weights, same rows per step): the "
        "practical bound of this BLAS on this machine",
    )
    parser.add_argument(
        "--arithmetic-bound",
        action="store_true",
        help="also measure this device's peak GEMM rate and memory bandwidth and report the run's "
        "arithmetic bound (FLOPs / peak or bytes moved / bandwidth, whichever is larger) and the "
        "share of it reached",
    )
    parser.add_argument(
        "--generator-device",
        default="cpu",
        help="device of the torch.Generator that draws the order and the tokens (cpu: the same draws "
        "on every device; cuda: no host-to-device copy of the uniforms per step)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="ROWS",
        help="after timing, profile one call and print the ROWS most expensive operators/kernels",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="sample through ARPGControlPipeline with a random-weight edges adapter (default size) and a random "
        "edge map: the cost of control (records gain control=True)",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None, help="write the records here")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------- memory
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets the RSS high-water mark (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ building
def build_pipeline(preset: str, dtype: torch.dtype, device: torch.device, seed: int, vq: bool = True) -> ARPGPipeline:
    """The preset's decoder and the VQ-16 tokenizer with random weights (the head redrawn: it is zero at init). Without
    `vq` the tokenizer is built on the meta device (no weights: token generation never touches it), so that the
    peak memory of token generation is the decoder's own."""
    torch.manual_seed(seed)
    config = ARPGConfig.from_preset(preset)
    with torch.device(device):
        transformer = ARPGForImageGeneration(config).to(dtype).eval()
        torch.nn.init.normal_(transformer.lm_head.weight, std=config.initializer_range)
    with torch.device(device if vq else "meta"):
        vqvae = ARPGVQModel(in_channels=3, out_channels=3).eval()
    pipe = ARPGPipeline(transformer=transformer, vqvae=vqvae, scheduler=ARPGScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_quantized_pipeline(preset: str, method: str, device: torch.device, seed: int) -> ARPGPipeline:
    """The preset's decoder with random weights, quantized with `method` as `transformer.quantize(method)` would: a
    shell (embeddings, head, norms, the shared key/value projection; its one layer per pass dropped) gets the preset's layers one at a
    time, each quantized as soon as it is built, so that the float32 weights are never all in memory. The tokenizer
    is on the meta device (token generation only)."""
    torch.manual_seed(seed)
    with torch.device(device):
        transformer = ARPGForImageGeneration(
            ARPGConfig.from_preset(preset, num_self_attention_layers=1, num_cross_attention_layers=1)
        ).eval()
        torch.nn.init.normal_(transformer.lm_head.weight, std=transformer.config.initializer_range)
        config, preset_config = transformer.config, ARPGConfig.from_preset(preset)
        # the config object the model and its layers share, to the preset's layer counts
        config.num_self_attention_layers = preset_config.num_self_attention_layers
        config.num_cross_attention_layers = preset_config.num_cross_attention_layers
        transformer.model.self_layers, transformer.model.cross_layers = torch.nn.ModuleList(), torch.nn.ModuleList()
        for index in range(config.num_self_attention_layers):
            transformer.model.self_layers.append(quantize_linears(ARPGSelfAttentionLayer(config, index), method))
        for _ in range(config.num_cross_attention_layers):
            transformer.model.cross_layers.append(quantize_linears(ARPGCrossAttentionLayer(config), method))
        quantize_linears(transformer, method)  # the shared key/value projection
    use_cpu_gemm(transformer, "auto")  # the float32 head
    with torch.device("meta"):
        vqvae = ARPGVQModel(in_channels=3, out_channels=3).eval()
    pipe = ARPGPipeline(transformer=transformer.eval(), vqvae=vqvae, scheduler=ARPGScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def time_call(function, device, warmup, repeats):
    for _ in range(warmup):
        function()
    synchronize(device)
    reset_peak_memory(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_memory_mb(device)


def measure(pipe, args, batch_size, steps, dtype_name, order, device, quantization="none"):
    config = pipe.transformer.config
    num_tokens = config.num_image_tokens
    labels = torch.arange(batch_size) % config.num_classes
    orders = torch.arange(num_tokens) if order == "raster" else None
    steps = num_tokens if order == "raster" else steps
    pipe.scheduler = ARPGScheduler.from_config(pipe.scheduler.config, token_schedule=args.token_schedule)

    control = {}
    if isinstance(pipe, ARPGControlPipeline):  # a random edge map of the canvas
        side = config.grid_height * pipe.vqvae.downsample_factor
        edges = torch.rand(1, 1, side, side, generator=torch.Generator().manual_seed(args.seed)) < 0.1
        control = dict(control_image=edges.float())

    def generate():
        generator = torch.Generator(device=args.generator_device).manual_seed(args.seed)
        return pipe(
            labels,
            **control,
            num_inference_steps=steps,
            guidance_scale=args.guidance_scale,
            generator=generator,
            orders=orders,
            output_type="latent",
        ).images

    with torch.inference_mode():
        seconds, memory = time_call(generate, device, args.warmup, args.repeats)
        if args.profile:
            print_profile(generate, device, args.profile)
    return dict(
        preset=args.preset,
        batch_size=batch_size,
        num_inference_steps=steps,
        order=order,
        dtype=dtype_name,
        device=str(device),
        compiled=bool(args.compile),
        images_per_second=batch_size / seconds,
        seconds_per_batch=seconds,
        peak_memory_mb=memory,
        guidance_scale=args.guidance_scale,
        token_schedule=args.token_schedule,
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        attn_implementation=pipe.transformer.config._attn_implementation,
        cpu_gemm=args.cpu_gemm,
        cpu_layout=layout_name(pipe.transformer),
        quantization=quantization,
        control=bool(control),
        compile_mode=args.compile_mode if args.compile else None,
        compile_buckets=args.compile_buckets if args.compile else None,
        compile_key_block=args.compile_key_block if args.compile else None,
        generator_device=args.generator_device,
    )


def with_random_control(pipe, seed: int) -> ARPGControlPipeline:
    """`pipe` as a control pipeline with an edges adapter of the default size and random weights."""
    torch.manual_seed(seed)
    transformer = pipe.transformer
    adapter = ARPGControlAdapter(output_size=transformer.config.hidden_size, patch_size=pipe.vqvae.downsample_factor)
    torch.nn.init.normal_(adapter.proj_out.weight, std=0.02)
    adapter = adapter.to(device=transformer.device, dtype=transformer.dtype).eval()
    return ARPGControlPipeline(transformer=transformer, vqvae=pipe.vqvae, scheduler=pipe.scheduler, controlnet=adapter)


def weights_name(record: dict) -> str:
    """The quantization, or else the CPU layout asked for, e.g. "int8" or "auto"."""
    quantization = record.get("quantization", "none")
    name = quantization if quantization != "none" else f"{record.get('cpu_gemm')}"
    return name + (" + control" if record.get("control") else "")


def layout_name(transformer) -> str:
    """The kinds of the decoder's linear layers, e.g. "PackedOneDNNLinear" or "Int8DynamicLinear+PackedOneDNNLinear"."""
    kinds = {type(module).__name__ for module in transformer.modules() if hasattr(module, "in_features")}
    return "+".join(sorted(kinds))


def print_profile(function, device, rows: int) -> None:
    """One call under torch.profiler: the `rows` operators / kernels with the largest total time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        function()
        synchronize(device)
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=rows), flush=True)


def gemm_only_work(pipe, batch_size: int, steps: int, order: str, device) -> list[tuple[int, int]]:
    """(input rows, query rows) of every decoding step, classifier-free guidance rows included."""
    num_tokens = pipe.transformer.config.num_image_tokens
    if order == "raster":
        counts = [1] * num_tokens
    else:
        pipe.scheduler.set_timesteps(steps, num_tokens, device=device)
        counts = [end - start for start, end in pipe.scheduler.step_boundaries]
    inputs = [1] + counts[:-1]  # the class token first, then the previous step's tokens
    return [(2 * batch_size * n_in, 2 * batch_size * n_query) for n_in, n_query in zip(inputs, counts)]


def projections_by_pass(model) -> tuple[list, list]:
    """The linears of a decoding step, fused when the model's projections are: those that read the step's inputs
    (Pass 1 and the shared key/value projection) and those that read its queries (Pass 2 and the head)."""

    def linears(*modules):
        return [m for module in modules for m in module.modules() if isinstance(m, torch.nn.Linear)]

    trunk = model.model
    pass_one = linears(*trunk.self_layers) + linears(*(m for m in (trunk.k_proj, trunk.v_proj, trunk.kv_proj) if m))
    return pass_one, linears(*trunk.cross_layers, model.lm_head)


def gemm_only_seconds(pipe, args, batch_size, steps, order, device) -> float:
    """Seconds per batch of the decoding's matrix products alone, with the model's own modules (fused, with the
    `--cpu-gemm` kernels): the time no implementation with these kernels can beat (attention, norms, RoPE, sampling
    and Python are left out)."""
    groups = projections_by_pass(pipe.transformer)  # (Pass 1 linears, Pass 2 linears)
    work = gemm_only_work(pipe, batch_size, steps, order, device)
    widths = {linear.in_features for linears in groups for linear in linears}
    inputs = {
        (rows, width): torch.randn(rows, width, device=device, dtype=pipe.transformer.dtype)
        for pair in work
        for rows in pair
        for width in widths
    }

    def run():
        for rows_per_pass in work:  # (input rows, query rows)
            for rows, linears in zip(rows_per_pass, groups):
                for linear in linears:
                    linear(inputs[rows, linear.in_features])

    with torch.inference_mode():
        seconds, _ = time_call(run, device, args.warmup, args.repeats)
    return seconds


def arithmetic_work(pipe, batch_size: int, steps: int, order: str, device) -> tuple[float, float]:
    """(FLOPs, bytes) of one batch's decoding, counted from the model: every projection (the head included) on the
    rows that go through it, attention over the keys each row sees, and per step one read of every projection weight
    plus one read of the key/value cache per layer (the weights dominate)."""
    model, config = pipe.transformer, pipe.transformer.config
    element = torch.finfo(model.dtype).bits // 8
    pass_one, pass_two = projections_by_pass(model)
    weights_one = sum(linear.weight.numel() for linear in pass_one)
    weights_two = sum(linear.weight.numel() for linear in pass_two)
    width, rows_per_image = config.hidden_size, 2 * batch_size  # classifier-free guidance doubles the rows
    flops = weight_bytes = cache_bytes = 0.0
    filled = 0  # cache slots per row (the class token included)
    for input_rows, query_rows in gemm_only_work(pipe, batch_size, steps, order, device):
        new = input_rows // rows_per_image
        keys_one = filled + (new + 1) / 2  # on average over the new inputs (each sees the cache and those before it)
        filled += new
        flops += 2 * (input_rows * weights_one + query_rows * weights_two)
        flops += (
            4
            * width
            * (
                input_rows * keys_one * config.num_self_attention_layers
                + query_rows * filled * config.num_cross_attention_layers
            )
        )
        weight_bytes += (weights_one + weights_two) * element
        layers = config.num_self_attention_layers + config.num_cross_attention_layers
        cache_bytes += 2 * rows_per_image * filled * width * element * layers
    return flops, weight_bytes + cache_bytes


def device_peaks(device, dtype: torch.dtype, repeats: int = 10) -> tuple[float, float]:
    """(FLOP/s, bytes/s) this device reaches at best (fastest of `repeats` runs after a warm-up): a large square GEMM
    in `dtype`, and a large copy (read + write)."""
    size = 2048 if device.type == "cpu" else 8192
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    source = torch.empty(64 * 2**20, device=device, dtype=torch.float32).normal_()  # 256 MB
    target = torch.empty_like(source)

    def fastest(function) -> float:
        function()
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        gemm, copy = fastest(lambda: torch.matmul(a, b)), fastest(lambda: target.copy_(source))
    return 2 * size**3 / gemm, 2 * source.numel() * 4 / copy


def arithmetic_bound(pipe, record: dict, device, peaks) -> dict:
    """The bound of a measured `record` and the share of it the run reached, as record fields."""
    flops, moved = arithmetic_work(pipe, record["batch_size"], record["num_inference_steps"], record["order"], device)
    peak_flops, bandwidth = peaks
    bound = max(flops / peak_flops, moved / bandwidth)
    return dict(
        tflop_per_batch=flops / 1e12,
        gb_moved_per_batch=moved / 1e9,
        peak_gemm_gflops=peak_flops / 1e9,
        memory_gb_per_second=bandwidth / 1e9,
        arithmetic_bound_seconds_per_batch=bound,
        share_of_arithmetic_bound=bound / record["seconds_per_batch"],
    )


def measure_vq(pipe, args, batch_size, device):
    """VQ decoding of a batch of token grids: (seconds per batch, images per second, peak memory MB)."""
    config = pipe.transformer.config
    tokens = torch.randint(0, config.vocab_size, (batch_size, config.grid_height, config.grid_width), device=device)
    with torch.inference_mode():
        seconds, memory = time_call(lambda: pipe.vqvae.decode(tokens).sample, device, args.warmup, args.repeats)
    return dict(
        vq_decode_seconds_per_batch=seconds,
        vq_decode_images_per_second=batch_size / seconds,
        vq_decode_peak_memory_mb=memory,
    )


def markdown_table(records):
    header = (
        "| preset | order | batch | steps | dtype | weights | device | compiled | tokens: s / batch | tokens: img / s "
        "| peak MB | VQ decode: s / batch | VQ decode: img / s | GEMMs alone: s / batch (share) "
        "| arithmetic bound: s / batch (share) |"
    )
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for r in records:
        vq_seconds, vq_rate = r.get("vq_decode_seconds_per_batch"), r.get("vq_decode_images_per_second")
        vq = f"{vq_seconds:.3f} | {vq_rate:.3f}" if vq_seconds else "- | -"
        bound = r.get("gemm_only_seconds_per_batch")
        bound = f"{bound:.3f} ({100 * r['share_of_gemm_bound']:.0f} %)" if bound else "-"
        limit = r.get("arithmetic_bound_seconds_per_batch")
        limit = f"{limit:.3f} ({100 * r['share_of_arithmetic_bound']:.0f} %)" if limit else "-"
        lines.append(
            f"| {r['preset']} | {r['order']} | {r['batch_size']} | {r['num_inference_steps']} | {r['dtype']} "
            f"| {weights_name(r)} | {r['device']} | {r['compiled']} | {r['seconds_per_batch']:.3f} | {r['images_per_second']:.3f} "
            f"| {r['peak_memory_mb']:.0f} | {vq} | {bound} | {limit} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    records = []
    quantized_dtypes = ["float32"] if device.type == "cpu" else args.dtype  # (on the CPU quantize() takes float32)
    runs = [(dtype_name, "none") for dtype_name in args.dtype if "none" in args.quantization]
    runs += [
        (dtype_name, method) for method in args.quantization if method != "none" for dtype_name in quantized_dtypes
    ]
    for dtype_name, quantization in runs:
        if quantization == "none":
            pipe = build_pipeline(args.preset, DTYPES[dtype_name], device, args.seed, vq=not args.no_vq)
            use_cpu_gemm(pipe.transformer, args.cpu_gemm)
        elif device.type == "cpu":
            pipe = build_quantized_pipeline(args.preset, quantization, device, args.seed)
        else:  # torchao's configurations, through the same method
            pipe = build_pipeline(args.preset, DTYPES[dtype_name], device, args.seed, vq=False)
            pipe.transformer.quantize(quantization)
        pipe.transformer.set_attn_implementation(args.attn_implementation)
        if args.control:
            pipe = with_random_control(pipe, args.seed)
        if args.compile:  # bucketed static shapes; warm-up calls compile every shape the timed calls use
            pipe.enable_compiled_decoding(
                buckets=args.compile_buckets,
                key_block=args.compile_key_block,
                **({"mode": args.compile_mode} if args.compile_mode else {}),
            )
        peaks = device_peaks(device, DTYPES[dtype_name]) if args.arithmetic_bound else None
        for batch_size in args.batch_size:
            first = len(records)
            orders = ["random"] * len(args.num_inference_steps) + (["raster"] if args.raster else [])
            for order, steps in zip(orders, [*args.num_inference_steps, None]):
                record = measure(pipe, args, batch_size, steps, dtype_name, order, device, quantization)
                if args.gemm_bound:
                    bound = gemm_only_seconds(pipe, args, batch_size, record["num_inference_steps"], order, device)
                    record.update(
                        gemm_only_seconds_per_batch=bound, share_of_gemm_bound=bound / record["seconds_per_batch"]
                    )
                if peaks:
                    record.update(arithmetic_bound(pipe, record, device, peaks))
                records.append(record)
            # VQ decoding last: its large activations would stay in the process and inflate the RSS of token generation.
            vq = {} if args.no_vq or quantization != "none" else measure_vq(pipe, args, batch_size, device)
            for record in records[first:]:
                record.update(vq)
                print(markdown_table([record]).splitlines()[-1], flush=True)
        del pipe
    print()
    print(markdown_table(records))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as file:
            json.dump(records, file, indent=2)
    return records


if __name__ == "__main__":
    main()
