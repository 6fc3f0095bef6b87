#!/usr/bin/env python
"""One decoder projection, `[rows, 1024] x [1024, 4096]`, through every CPU kernel the package can use: float32
(`nn.Linear`, oneDNN on packed weights), this package's quantized layers (`arpg_hf.quantization`) and, when torchao
is installed, torchao's int8 configurations. Decoding steps multiply 4-64 rows per weight; this is why `quantize()`
uses torch's own kernels on the CPU.

    python benchmarks/bench_linear_kernels.py --rows 4 16 64 256 --threads 2

Prints milliseconds per call (median of `--repeats` timings of `--calls` calls each) and the relative error of each
output against float32.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from arpg_hf.cpu_gemm import use_cpu_gemm
from arpg_hf.quantization import CPU_KERNELS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args(argv)


class Wrapper(nn.Module):
    """A module holding one linear layer (as `use_cpu_gemm` and torchao's `quantize_` expect a parent)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def fuse_projections(self) -> None:  # (use_cpu_gemm fuses first; nothing to fuse here)
        pass

    def forward(self, hidden_states):
        return self.proj(hidden_states)


def kernels(linear: nn.Linear) -> dict[str, nn.Module]:
    found = {"float32 nn.Linear": Wrapper(copy.deepcopy(linear)).eval()}
    packed = Wrapper(copy.deepcopy(linear)).eval()
    use_cpu_gemm(packed, "onednn-packed")
    found["float32 oneDNN packed"] = packed
    for method, kernel in CPU_KERNELS.items():
        found[f"arpg_hf {method} ({kernel.__name__})"] = Wrapper(kernel(linear)).eval()
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return found
    for name, config in (
        ("int8", Int8DynamicActivationInt8WeightConfig()),
        ("int8-weight-only", Int8WeightOnlyConfig()),
    ):
        module = Wrapper(copy.deepcopy(linear)).eval()
        quantize_(module, config)
        found[f"torchao {name}"] = module
    return found


def milliseconds(module, hidden_states, calls: int, repeats: int) -> float:
    for _ in range(3):
        module(hidden_states)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            module(hidden_states)
        timings.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(timings)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    linear = nn.Linear(args.in_features, args.out_features, bias=False)
    nn.init.normal_(linear.weight, std=0.02)
    modules = kernels(linear)
    records = []
    with torch.inference_mode():
        for rows in args.rows:
            hidden_states = torch.randn(rows, args.in_features)
            reference = linear(hidden_states)
            for name, module in modules.items():
                output = module(hidden_states)
                records.append(
                    {
                        "rows": rows,
                        "kernel": name,
                        "ms": milliseconds(module, hidden_states, args.calls, args.repeats),
                        "relative_error": ((output - reference).norm() / reference.norm()).item(),
                    }
                )
    print(f"| kernel | {' | '.join(f'{rows} rows: ms' for rows in args.rows)} | relative error |")
    print("| --- |" + " ---: |" * (len(args.rows) + 1))
    for name in modules:
        row = [r for r in records if r["kernel"] == name]
        times = " | ".join(f"{r['ms']:.3f}" for r in row)
        print(f"| {name} | {times} | {max(r['relative_error'] for r in row):.1e} |")
    return records


if __name__ == "__main__":
    main()
