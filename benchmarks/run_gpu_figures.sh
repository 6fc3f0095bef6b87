#!/usr/bin/env bash
# The GPU figures of the fast-sampling issue on one H100/H200:
#   1. check_device_tokens.py: float32 CUDA tokens == CPU tokens; compiled (CUDA graphs) == eager, inpainting too;
#      again with the matmul attention and key blocks (check_matmul_key_block);
#   2. ARPG-L, batch 64, bf16, 64 and 32 steps, raster order beside it, VQ decoding;
#   3. ARPG-XL and ARPG-XXL, batch 64, bf16, 64 steps;
#   4. ARPG-L with compiled decoding (torch.compile, mode reduce-overhead: CUDA graphs), 64 steps;
#   5. the same with the matmul + softmax attention (--attn-implementation eager) instead of SDPA under a slot mask,
#      64 and 32 steps; with attention reading only the filled part of the cache in blocks of 64 slots
#      (--compile-key-block 64), with either attention; and with a CUDA generator (no host round trips);
#   6. ARPG-L quantized with torchao (quantize("int8"), quantize("int8-weight-only")) beside bf16, 64 steps.
# Each part writes OUT_DIR/<part>.json and runs under its own time limit, so a slow part cannot hide the others.
# Parts 1-4 took about 6 minutes on an H200; all of them together need about 15, more than one device call allows, so
# name parts after OUT_DIR to run only those:
#
#     bash benchmarks/run_gpu_figures.sh OUT_DIR [check check_matmul_key_block L XL XXL L_compiled L_compiled_matmul
#         L_compiled_key_block L_compiled_matmul_key_block L_compiled_cuda_generator L_quantized]
set -u
out=${1:-gpu-figures}
shift $(( $# > 0 ? 1 : 0 ))
selected=" $* "
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

part() {  # part NAME SECONDS SCRIPT ARGS...
    local name=$1 limit=$2
    shift 2
    if [ "$selected" != "  " ] && [[ "$selected" != *" $name "* ]]; then return; fi
    echo "== $name ($(date +%T)): python $*"
    timeout "$limit" python "$@" --json "$out/$name.json" 2>&1 | grep -vE "Warning|warnings.warn|^\s*$"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"

common=(--batch-size 64 --guidance-scale 4 --device cuda --warmup 2 --repeats 5)
part check 120 benchmarks/check_device_tokens.py --device cuda --compile-mode reduce-overhead
part check_matmul_key_block 120 benchmarks/check_device_tokens.py --device cuda --compile-mode reduce-overhead \
    --compile-key-block 16 --attn-implementation eager
part L 100 benchmarks/bench_sampling.py --preset ARPG-L "${common[@]}" --num-inference-steps 64 32 --dtype bfloat16 --raster
part XL 70 benchmarks/bench_sampling.py --preset ARPG-XL "${common[@]}" --num-inference-steps 64 --dtype bfloat16
part XXL 80 benchmarks/bench_sampling.py --preset ARPG-XXL "${common[@]}" --num-inference-steps 64 --dtype bfloat16
part L_compiled 200 benchmarks/bench_sampling.py --preset ARPG-L "${common[@]}" --num-inference-steps 64 \
    --dtype bfloat16 --no-vq --compile --compile-mode reduce-overhead --compile-buckets 8 32
part L_compiled_matmul 240 benchmarks/bench_sampling.py --preset ARPG-L "${common[@]}" --num-inference-steps 64 32 \
    --dtype bfloat16 --no-vq --compile --compile-mode reduce-overhead --compile-buckets 8 32 --attn-implementation eager
part L_compiled_key_block 240 benchmarks/bench_sampling.py --preset ARPG-L "${common[@]}" --num-inference-steps 64 32 \
    --dtype bfloat16 --no-vq --compile --compile-mode reduce-overhead --compile-buckets 8 32 --compile-key-block 64
part L_compiled_matmul_key_block 240 benchmarks/bench_sampling.py --preset ARPG-L "${common[@]}" --num-inference-steps 64 \
    32 --dtype bfloat16 --no-vq --compile --compile-mode reduce-overhead --compile-buckets 8 32 --compile-key-block 64 \
    --attn-implementation eager
part L_quantized 200 benchmarks/bench_sampling.py --preset ARPG-L "${common[@]}" --num-inference-steps 64 \
    --dtype bfloat16 --no-vq --quantization none int8 int8-weight-only
part L_compiled_cuda_generator 200 benchmarks/bench_sampling.py --preset ARPG-L "${common[@]}" --num-inference-steps 64 \
    --dtype bfloat16 --no-vq --compile --compile-mode reduce-overhead --compile-buckets 8 32 --generator-device cuda
