#!/usr/bin/env python
"""Samples images for FID evaluation (the ADM protocol): PNGs, an ADM-compatible .npz and the sampling settings.

    accelerate launch pipelines/sample_fid.py --model arpg-l --output_dir samples/arpg-l-cfg4.5 \
        --num_samples_per_class 50 --num_inference_steps 64 --guidance_scale 4.5

Defaults: 50 images per class for every class of the model (50,000 for ImageNet), the scheduler config's recommended
steps and guidance. Sample i has class `classes[i // num_samples_per_class]` and its own generator seeded from
(--seed, i), with its own decoding order, so every image depends only on its index and the settings, not on the number
of processes (with --batch_size 1 bit for bit; batched kernels may move a pixel by one level through float
round-off, which no metric sees). Processes take every world_size-th index (the class list spreads evenly);
finished PNGs are skipped, so rerunning the same command resumes an interrupted job. Output:

    OUTPUT_DIR/samples/000000.png ...   one PNG per sample
    OUTPUT_DIR/samples.npz              arr_0: uint8 (N, H, W, 3), arr_1: class labels (N,)   (ADM sample batch)
    OUTPUT_DIR/sampling_settings.json   every setting that determines the images (a rerun must match it)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import numpy as np
import torch

SETTINGS_FILE = "sampling_settings.json"
SEED_RULE = "image i: torch.Generator().manual_seed(SeedSequence([seed, i]).generate_state(1, uint64)[0] >> 1)"
NPZ_FILE = "samples.npz"
SAMPLES_SUBDIR = "samples"
# Settings that change the images; a resumed run must repeat them exactly.
IMAGE_SETTINGS = ("model", "classes", "num_samples_per_class", "num_samples", "seed", "seed_rule",
                  "num_inference_steps", "guidance_scale", "scheduler", "temperature", "top_k", "top_p", "dtype",
                  "image_size")  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", type=str, default=None, help="Pipeline folder or Hub id (default: bundled digits).")
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--num_samples_per_class", type=int, default=50)
    parser.add_argument("--class_ids", type=int, nargs="+", default=None, help="Classes to sample (default: all).")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Default: the scheduler's recommended.")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the scheduler's recommended.")
    parser.add_argument("--token_schedule", choices=("arccos", "cosine"), default=None, help="Default: the model's.")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="Sample i uses a generator seeded from (seed, i).")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per forward pass (does not change them).")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = parser.parse_args(argv)
    if args.num_samples_per_class < 1 or args.batch_size < 1:
        parser.error("--num_samples_per_class and --batch_size must be positive.")
    return args


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample `index`: distinct for every (seed, index) pair, independent of the process count."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def sample_classes(classes: list[int], num_samples_per_class: int) -> list[int]:
    """The class of every sample index, class-major: [c0] * n + [c1] * n + ..."""
    return [label for label in classes for _ in range(num_samples_per_class)]


def sample_path(output_dir: str, index: int) -> str:
    return os.path.join(output_dir, SAMPLES_SUBDIR, f"{index:06d}.png")


def load_sampling_pipeline(args, device):
    from arpg_hf import ARPGScheduler
    from arpg_hf.cli import load_pipeline

    pipe = load_pipeline(args.model, str(device), args.dtype)
    if args.token_schedule is not None:
        pipe.scheduler = ARPGScheduler.from_config(pipe.scheduler.config, token_schedule=args.token_schedule)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampling_settings(args, pipe, world_size: int) -> dict:
    """Every setting that determines the images, plus provenance (versions, date, processes)."""
    import arpg_hf

    num_classes = pipe.transformer.config.num_classes
    classes = list(range(num_classes)) if args.class_ids is None else list(args.class_ids)
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--class_ids {bad} are outside [0, {num_classes}) for this model.")
    steps, guidance = pipe.default_sampling_settings(args.num_inference_steps, args.guidance_scale,
                                                     pipe.transformer.config.num_image_tokens)  # fmt: skip
    factor = pipe.vqvae.downsample_factor
    config = pipe.transformer.config
    return {
        "model": args.model or "bundled:digits-pipeline", "classes": classes,
        "num_samples_per_class": args.num_samples_per_class, "num_samples": len(classes) * args.num_samples_per_class,
        "seed": args.seed, "seed_rule": SEED_RULE,
        "num_inference_steps": steps, "guidance_scale": guidance,
        "scheduler": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "dtype": args.dtype,
        "image_size": [config.grid_height * factor, config.grid_width * factor],
        "class_names": [pipe.id2label[c] for c in classes], "batch_size": args.batch_size,
        "num_processes": world_size, "arpg_hf_version": arpg_hf.__version__, "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def check_resume(output_dir: str, settings: dict) -> None:
    """ValueError when OUTPUT_DIR holds samples drawn with other settings (mixing them would corrupt the set)."""
    path = os.path.join(output_dir, SETTINGS_FILE)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as file:
        previous = json.load(file)
    changed = [key for key in IMAGE_SETTINGS if previous.get(key) != json.loads(json.dumps(settings[key]))]
    if changed:
        details = ", ".join(f"{key}: {previous.get(key)!r} -> {settings[key]!r}" for key in changed)
        raise ValueError(
            f"{output_dir} holds samples drawn with other settings ({details}). Use another --output_dir or repeat "
            "the original settings to resume."
        )


def write_json(path: str, content: dict) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(content, file, indent=2)
    os.replace(temporary, path)


@torch.no_grad()
def sample_indices(pipe, indices: list[int], labels: list[int], settings: dict, batch_size: int, progress) -> None:
    """Draws and saves the samples `indices` (their classes in `labels`), `batch_size` images per call."""
    output_dir = settings["output_dir"]
    for start in range(0, len(indices), batch_size):
        batch = indices[start : start + batch_size]
        # CPU generators: the same draws whatever device the model runs on.
        generators = [torch.Generator().manual_seed(sample_seed(settings["seed"], i)) for i in batch]
        images = pipe(
            [labels[i] for i in batch], num_inference_steps=settings["num_inference_steps"],
            guidance_scale=settings["guidance_scale"], generator=generators, temperature=settings["temperature"],
            top_k=settings["top_k"], top_p=settings["top_p"],
        ).images  # fmt: skip
        for index, image in zip(batch, images):
            path = sample_path(output_dir, index)
            image.save(path + ".tmp.png")
            os.replace(path + ".tmp.png", path)  # a PNG that exists is complete
        progress.update(len(batch))


def write_npz(output_dir: str, labels: list[int]) -> str:
    """Collects every PNG into the ADM sample batch (arr_0 images, arr_1 labels)."""
    from PIL import Image

    from arpg_hf.metrics.sample_batch import check_image_array

    images = []
    for index in range(len(labels)):
        with Image.open(sample_path(output_dir, index)) as image:
            images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    path = os.path.join(output_dir, NPZ_FILE)
    temporary = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(temporary, arr_0=check_image_array(np.stack(images)), arr_1=np.asarray(labels, dtype=np.int64))
    os.replace(temporary, path)
    return path


def main(args) -> dict:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = Accelerator()
    pipe = load_sampling_pipeline(args, accelerator.device)
    settings = sampling_settings(args, pipe, accelerator.num_processes)
    check_resume(args.output_dir, settings)
    os.makedirs(os.path.join(args.output_dir, SAMPLES_SUBDIR), exist_ok=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(os.path.join(args.output_dir, SETTINGS_FILE), settings)
    labels = sample_classes(settings["classes"], args.num_samples_per_class)
    mine = range(accelerator.process_index, len(labels), accelerator.num_processes)
    todo = [i for i in mine if not os.path.isfile(sample_path(args.output_dir, i))]
    progress = tqdm(total=len(todo), desc=f"sampling (process {accelerator.process_index})", unit="img",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    sample_indices(pipe, todo, labels, {**settings, "output_dir": args.output_dir}, args.batch_size, progress)
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path = write_npz(args.output_dir, labels)
        print(f"{len(labels)} samples ({len(todo)} new on process 0) -> {path}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return settings


if __name__ == "__main__":
    main(parse_args())
