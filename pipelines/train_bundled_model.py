#!/usr/bin/env python
"""The recipe of the bundled digits model, end to end, with the exact commands (printed before they run).

    python pipelines/train_bundled_model.py --work_dir /tmp/digits-work            # every stage
    python pipelines/train_bundled_model.py --work_dir /tmp/digits-work --stages package benchmark package

Stages (each reads the previous one's output under --work_dir; the trained artefacts stay there):
  prepare    the fixed stratified split as image folders (pipelines/prepare_digits.py)
  tokenizer  a small ARPGVQModel, 32x32 images -> 8x8 tokens of 32 codes (pipelines/train_tokenizer.py)
  tokenize   the train images -> token dataset (pipelines/tokenize_dataset.py, no flips: digits are not symmetric)
  train      a small class-conditional ARPG with absolute position embeddings (accelerate launch train.py), 4,000
             steps at peak lr 1e-3
  package    the trained pipeline folder -> src/arpg_hf/bundled/digits-pipeline, with the recommended sampling
             settings in its scheduler config and a model card (with the benchmark's figures once they exist)
  benchmark  benchmarks/quality_digits.py on the packaged folder (JSON in WORK/benchmark, grid in docs/images)
  control_tokenize   the train images -> token dataset with Canny edge maps (tokenize_dataset.py --control_type edges)
  control_train      an edge-map control adapter and the packaged model fine-tuned with it (train_control.py
                     --train_base), 6,000 steps
  control_decoder    the tokenizer's decoder trained further (train_tokenizer.py --finetune_decoder: encoder and
                     codebook frozen, so the tokens do not change), 4,000 steps: sharper edges for the control model
  control_package    WORK/control, with WORK/control_vq as its tokenizer, -> src/arpg_hf/bundled/digits-edges-pipeline
                     (float16), with a model card
  control_benchmark  benchmarks/quality_control_digits.py on the bundled digits-edges model (figure in docs/images)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(REPO, "src", "arpg_hf", "bundled", "digits-pipeline")
GRID_PATH = os.path.join(REPO, "docs", "images", "digits_grid.png")
CONTROL_PACKAGE_DIR = os.path.join(REPO, "src", "arpg_hf", "bundled", "digits-edges-pipeline")
CONTROL_FIGURE_PATH = os.path.join(REPO, "docs", "images", "control_digits.png")
STAGES = (
    "prepare",
    "tokenizer",
    "tokenize",
    "train",
    "package",
    "benchmark",
    "control_tokenize",
    "control_train",
    "control_decoder",
    "control_package",
    "control_benchmark",
)

# The decoder: 4 + 4 layers, width 128, 4 heads of 32, SwiGLU 352, no dropout (the model underfits 1,438 images: train
# and held-out NLL agree); vocabulary, grid and classes follow the tokenizer. Absolute position embeddings: with RoPE
# alone the model cannot tell where on the 8x8 canvas a token lies (see ARPGConfig.absolute_position_embeddings).
ARPG_CONFIG = dict(
    vocab_size=32,
    num_classes=10,
    grid_height=8,
    grid_width=8,
    hidden_size=128,
    num_attention_heads=4,
    num_self_attention_layers=4,
    num_cross_attention_layers=4,
    multiple_of=32,
    token_dropout=0.0,
    residual_dropout=0.0,
    ffn_dropout=0.0,
    absolute_position_embeddings=True,
)
# Sampling settings of the digits-edges pipeline (chosen with quality_control_digits.py's --guidance_scale runs).
CONTROL_RECOMMENDED = dict(recommended_guidance_scale=1.0, recommended_num_inference_steps=16)
# Sampling settings written into the packaged scheduler config (chosen with the benchmark's guidance sweep).
RECOMMENDED = dict(
    token_schedule="arccos",
    guidance_schedule="linear",
    recommended_guidance_scale=2.0,
    recommended_num_inference_steps=16,
)
ACCELERATE = [
    "accelerate",
    "launch",
    "--num_processes",
    "1",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work_dir", default="/tmp/digits-work")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES) + ["package", "control_package"])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of every stage (1 is the robust choice on a busy shared CPU)",
    )
    parser.add_argument("--tokenizer_steps", type=int, default=600)
    parser.add_argument("--train_steps", type=int, default=4000)
    parser.add_argument("--control_steps", type=int, default=6000)
    parser.add_argument("--control_decoder_steps", type=int, default=4000)
    return parser.parse_args(argv)


def run(command: list[str], threads: int, **env) -> None:
    print("+ " + " ".join(shlex.quote(part) for part in command), flush=True)
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "ACCELERATE_USE_CPU": "1",
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    subprocess.run(command, check=True, cwd=REPO, env=environment)


def run_flags(checkpointing_steps: int, logging_steps: int) -> list[str]:
    """The run options that the training stages share: checkpoints, logs, seed 0, resuming an interrupted stage."""
    return [
        "--checkpointing_steps",
        str(checkpointing_steps),
        "--logging_steps",
        str(logging_steps),
        "--seed",
        "0",
        "--resume_from_checkpoint",
        "latest",
    ]


def stage_commands(args) -> dict[str, list[list[str]]]:
    work = args.work_dir
    return {
        "prepare": [[sys.executable, "pipelines/prepare_digits.py", "--output_dir", f"{work}/images"]],
        "tokenizer": [
            ACCELERATE
            + [
                "pipelines/train_tokenizer.py",
                "--image_dir",
                f"{work}/images/train",
                "--eval_image_dir",
                f"{work}/images/test",
                "--output_dir",
                f"{work}/vq",
                "--resolution",
                "32",
                "--base_channels",
                "16",
                "--channel_multipliers",
                "1",
                "1",
                "2",
                "--layers_per_block",
                "1",
                "--z_channels",
                "32",
                "--codebook_size",
                "32",
                "--codebook_embed_dim",
                "8",
                "--norm_num_groups",
                "8",
                "--no_attention",
                "--train_batch_size",
                "32",
                "--max_train_steps",
                str(args.tokenizer_steps),
                "--learning_rate",
                "1.5e-3",
                "--checkpointing_steps",
                "250",
                "--logging_steps",
                "50",
                "--dead_code_window",
                "100",
                "--seed",
                "0",
                "--resume_from_checkpoint",
                "latest",
            ]
        ],
        "tokenize": [
            [
                sys.executable,
                "pipelines/tokenize_dataset.py",
                "--image_dir",
                f"{work}/images/train",
                "--vqvae",
                f"{work}/vq",
                "--output_dir",
                f"{work}/tokens",
                "--resolution",
                "32",
                "--no_flip",
            ]
        ],
        "train": [
            ACCELERATE
            + [
                "train.py",
                "--train_data_dir",
                f"{work}/tokens",
                "--model_config",
                f"{work}/arpg_config.json",
                "--vqvae",
                f"{work}/vq",
                "--output_dir",
                f"{work}/arpg",
                "--train_batch_size",
                "32",
                "--max_train_steps",
                str(args.train_steps),
                "--learning_rate",
                "1e-3",
                "--lr_scheduler",
                "cosine",
                "--lr_warmup_steps",
                "200",
                "--adam_weight_decay",
                "0.05",
                "--use_ema",
                "--ema_decay",
                "0.998",
                "--checkpointing_steps",
                "500",
                "--checkpoints_total_limit",
                "2",
                "--logging_steps",
                "50",
                "--seed",
                "0",
                "--mixed_precision",
                "no",
                "--resume_from_checkpoint",
                "latest",
            ]
        ],
        "control_tokenize": [
            [
                sys.executable,
                "pipelines/tokenize_dataset.py",
                "--image_dir",
                f"{work}/images/train",
                "--vqvae",
                PACKAGE_DIR,
                "--output_dir",
                f"{work}/control_tokens",
                "--resolution",
                "32",
                "--no_flip",
                "--control_type",
                "edges",
            ]
        ],
        "control_train": [
            ACCELERATE
            + [
                "train_control.py",
                "--base_model",
                PACKAGE_DIR,
                "--train_data_dir",
                f"{work}/control_tokens",
                "--control_type",
                "edges",
                "--output_dir",
                f"{work}/control",
                "--train_base",
                "--block_channels",
                "96",
                "--num_blocks",
                "3",
                "--max_train_steps",
                str(args.control_steps),
                "--learning_rate",
                "2e-3",
                "--base_learning_rate",
                "2e-4",
            ]
            + run_flags(checkpointing_steps=1000, logging_steps=500)
        ],
        "control_decoder": [
            ACCELERATE
            + [
                "pipelines/train_tokenizer.py",
                "--finetune_decoder",
                os.path.join(PACKAGE_DIR, "vqvae"),
                "--image_dir",
                f"{work}/images/train",
                "--eval_image_dir",
                f"{work}/images/test",
                "--output_dir",
                f"{work}/control_vq",
                "--resolution",
                "32",
                "--train_batch_size",
                "64",
                "--max_train_steps",
                str(args.control_decoder_steps),
                "--learning_rate",
                "1e-3",
            ]
            + run_flags(checkpointing_steps=1000, logging_steps=500)
        ],
        "control_benchmark": [
            [
                sys.executable,
                "benchmarks/quality_control_digits.py",
                "--output_dir",
                f"{work}/control_benchmark",
                "--figure",
                CONTROL_FIGURE_PATH,
            ]
        ],
        "benchmark": [
            [
                sys.executable,
                "benchmarks/quality_digits.py",
                "--model",
                PACKAGE_DIR,
                "--output_dir",
                f"{work}/benchmark",
                "--grid",
                GRID_PATH,
                "--guidance_scales",
                "1.0",
                "1.5",
                "3.0",
                "4.0",
                "6.0",
            ]
        ],
    }


def package(args) -> None:
    """Copies WORK/arpg into the package with the recommended sampling settings and a model card."""
    import torch

    from arpg_hf import ARPGPipeline, ARPGScheduler
    from arpg_hf.model_card import create_model_card

    source = os.path.join(args.work_dir, "arpg")
    print(f"packaging {source}")
    pipeline = ARPGPipeline.from_pretrained(source, dtype=torch.float32, cpu_gemm="default")
    pipeline.scheduler = ARPGScheduler.from_config(pipeline.scheduler.config, **RECOMMENDED)
    staging = PACKAGE_DIR + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging)
    card = create_model_card(
        pipeline.transformer.config,
        dict(pipeline.scheduler.config),
        model_name="ARPG digits (bundled with arpg-hf)",
        datasets=["sklearn digits"],
        training=training_summary(args.work_dir),
        results=[],
        num_parameters=pipeline.transformer.num_parameters(),
        tags=["digits"],
    )
    card.content = card.content.replace("## Usage", benchmark_section(args.work_dir) + "## Usage", 1)
    card.save(os.path.join(staging, "README.md"))
    replace_package_folder(staging, PACKAGE_DIR)


def replace_package_folder(staging: str, target: str) -> None:
    """Puts the finished `staging` folder in place of the packaged `target` and prints its size."""
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(target) for name in names)
    print(f"packaged {target} ({size / 1e6:.2f} MB)")


def package_control(args) -> None:
    """Copies WORK/control (an ARPGControlPipeline) into the package, weights in float16 (to fit the package's 5 MB
    budget for it; loaded as float32), with the recommended sampling settings and a model card."""
    import torch

    from arpg_hf import ARPGControlPipeline, ARPGScheduler, ARPGVQModel

    source = os.path.join(args.work_dir, "control")
    print(f"packaging {source}")
    components = {}
    decoder = os.path.join(args.work_dir, "control_vq")
    if os.path.isfile(os.path.join(decoder, "config.json")):  # the control_decoder stage ran
        components["vqvae"] = ARPGVQModel.from_pretrained(decoder, torch_dtype=torch.float32)
        print(f"with the tokenizer of {decoder}")
    pipeline = ARPGControlPipeline.from_pretrained(source, dtype=torch.float32, cpu_gemm="default", **components)
    pipeline.scheduler = ARPGScheduler.from_config(pipeline.scheduler.config, **CONTROL_RECOMMENDED)
    pipeline.to(torch.float16)
    staging = CONTROL_PACKAGE_DIR + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging)
    with open(os.path.join(source, "training_summary.json")) as file:
        summary = json.load(file)
    card = CONTROL_CARD.format(
        steps=summary["steps"],
        batch=summary["global_batch_size"],
        loss=summary["final_loss"],
        parameters=sum(p.numel() for p in pipeline.controlnet.parameters()),
        guidance=CONTROL_RECOMMENDED["recommended_guidance_scale"],
        results=control_results(args.work_dir),
    )
    with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as file:
        file.write(card)
    replace_package_folder(staging, CONTROL_PACKAGE_DIR)


CONTROL_CARD = """---
library_name: diffusers
license: mit
tags:
- arpg
- arpg-hf
- controlnet
- digits
---

# ARPG digits edges (bundled with arpg-hf)

ControlARPG on the bundled digits model: a Canny edge map (white on black, 32x32; `arpg_hf.canny_edges`) and a class
give a digit that follows the edges. An `ARPGControlAdapter` ({parameters:,} parameters) turns the map into one query
embedding per token; the decoder is the bundled digits model fine-tuned with it, and the tokenizer is the digits
tokenizer with its decoder trained further (`train_tokenizer.py --finetune_decoder`: the same encoder and codebook,
so the same tokens, drawn with sharper edges). Weights are stored in float16 (to fit the package) and load as
float32: `arpg_hf.load_bundled_pipeline("digits-edges")`. The recommended guidance scale is {guidance:g}: the control
already pins the digit down, and stronger guidance (which drops the control and the class in its second half) makes
samples follow the edges less.

Trained with `train_control.py --train_base` ({steps} steps, global batch {batch}, final loss {loss:.4f}) on the edge
maps of the digits' fixed train split; recipe: `python pipelines/train_bundled_model.py --stages control_tokenize
control_train control_decoder control_package control_benchmark control_package`.

{results}
"""


def read_report(work: str, folder: str, name: str) -> dict | None:
    """The JSON a benchmark stage wrote to WORK/folder/name, or None before it ran."""
    path = os.path.join(work, folder, name)
    if not os.path.isfile(path):
        return None
    with open(path) as file:
        return json.load(file)


def control_results(work: str) -> str:
    report = read_report(work, "control_benchmark", "quality_control_digits.json")
    if report is None:
        return ""
    tolerances = report["tolerances_px"]
    lines = [
        f"Measured with `python benchmarks/quality_control_digits.py` on {report['num_samples']} samples (the edge maps "
        f"of the held-out digits), {report['steps']} steps, guidance {report['guidance_scale']:g}. Edge F1 / IoU of "
        "the sample's Canny edges against the condition, with 0, 1 or 2 px of slack; pixel correlation with the "
        "source digit; class consistency by an independent classifier; FD ratio against the held-out digits.",
        "",
        "| images | " + " | ".join(f"edge F1 / IoU, {t} px" for t in tolerances) + " | pixel correlation | "
        "class consistency | FD ratio |",
        "| --- |" + " ---: |" * (len(tolerances) + 3),
    ]
    for name, row in report["rows"].items():
        edges = " | ".join(
            f"{row['edges_by_tolerance'][str(t)]['edge_f1']:.3f} / {row['edges_by_tolerance'][str(t)]['edge_iou']:.3f}"
            for t in tolerances
        )
        lines.append(
            f"| {name} | {edges} | {row['pixel_correlation']:.3f} | {100 * row['class_consistency']:.1f} % | "
            f"{row['fd_ratio']:.2f} |"
        )
    return "\n".join(lines)


def training_summary(work: str) -> dict:
    summary = {
        "data": "sklearn digits, fixed stratified split (seed 0): 1,438 train images (test images unseen)",
        "recipe": "`python pipelines/train_bundled_model.py` (arpg-hf)",
    }
    vq_summary = os.path.join(work, "vq", "training_summary.json")
    if os.path.isfile(vq_summary):
        with open(vq_summary) as file:
            vq = json.load(file)
        held_out = vq.get("eval", vq["train"])
        summary["tokenizer"] = (
            f"ARPGVQModel 32x32 -> 8x8 tokens, 32 codes; test PSNR {held_out['psnr']:.1f} dB, "
            f"{held_out['codes_used']} codes used"
        )
    card_path = os.path.join(work, "arpg", "README.md")
    if os.path.isfile(card_path):
        for line in open(card_path, encoding="utf-8"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if len(cells) == 2 and cells[0] in ("steps", "global batch size", "learning rate", "EMA", "final loss"):
                summary[f"decoder: {cells[0]}"] = cells[1]
    return summary


def benchmark_section(work: str) -> str:
    """The measured quality table of WORK/benchmark/quality_digits.json as a model-card section ("" before it runs)."""
    report = read_report(work, "benchmark", "quality_digits.json")
    if report is None:
        return ""
    reference, tokenizer = report["reference"], report["tokenizer"]
    lines = [
        "| steps | guidance | class consistency | FD ratio | near-copies | images/s (CPU) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['steps']} | {r['guidance_scale']:g} | {100 * r['class_consistency']:.1f} % | "
            f"{r['fd_ratio']:.2f} | {100 * r['near_copy_share']:.1f} % | {r['images_per_second']:.0f} |"
        )
    return (
        "## Quality\n\n"
        f"Measured with `python benchmarks/quality_digits.py` ({report['num_per_class']} samples per digit, seeds fixed) "
        f"against the {reference['num_test']} held-out test images. Judge: an SVC trained on the real train split "
        f"only, {100 * reference['classifier_accuracy_real_test']:.1f} % accurate on the real test split. "
        "Class consistency: the judge's accuracy on samples; FD ratio: Frechet distance (8x8 grey-level features) "
        "between samples and the test split, divided by that between the train and test splits; near-copies: "
        "samples closer to a training image than any two distinct real images are to each other. Tokenizer: test "
        f"PSNR {tokenizer['psnr_db']:.1f} dB, judge accuracy on reconstructions "
        f"{100 * tokenizer['classifier_accuracy_on_reconstructions']:.1f} %.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + (
            ""
            if all(report["targets_met"].values())
            else "Not all quality targets of the project are met yet ("
            + ", ".join(name for name, met in report["targets_met"].items() if not met)
            + "): a small model trained for "
            "minutes on a shared CPU; most samples are recognisable, but their pixel statistics are still far from "
            "real digits.\n\n"
        )
    )


def main(args):
    commands = stage_commands(args)
    os.makedirs(args.work_dir, exist_ok=True)
    for stage in args.stages:
        print(f"=== {stage}", flush=True)
        if stage == "train":
            with open(os.path.join(args.work_dir, "arpg_config.json"), "w") as file:
                json.dump(ARPG_CONFIG, file, indent=2)
        if stage == "package":
            package(args)
            continue
        if stage == "control_package":
            package_control(args)
            continue
        for command in commands[stage]:
            run(command, args.threads)


if __name__ == "__main__":
    main(parse_args())
