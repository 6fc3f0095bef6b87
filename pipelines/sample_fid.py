#!/usr/bin/env python
"""Samples images for FID evaluation (the ADM protocol): PNGs, an ADM-compatible .npz and the sampling settings.

    accelerate launch pipelines/sample_fid.py --model arpg-l --output_dir samples/arpg-l-cfg4.5 \
        --num_samples_per_class 50 --num_inference_steps 64 --guidance_scale 4.5

Defaults: 50 images per class for every class of the model (50,000 for ImageNet), the scheduler config's recommended
steps and guidance. Sample i has class `classes[i // num_samples_per_class]` and its own generator seeded from
(--seed, i), with its own decoding order, so every image depends only on its index and the settings, not on the number
of processes (with --batch_size 1 bit for bit; batched kernels may move a pixel by one level through float
round-off, which no metric sees). Processes take every world_size-th index (the class list spreads evenly);
finished PNGs are skipped, so rerunning the same command resumes an interrupted job. Every file is written under a
hidden temporary name and renamed into place (a PNG or .npz that exists is complete), and the hidden leftovers of a
killed run are removed by the next one. Labels and seeds are computed batch by batch and the .npz is written image by
image, so memory does not grow with the number of samples; a run whose PNGs and .npz would not fit on the output
disk is refused before anything is drawn or created. Output:

    OUTPUT_DIR/samples/000000.png ...   one PNG per sample
    OUTPUT_DIR/samples.npz              arr_0: uint8 (N, H, W, 3), arr_1: class labels (N,)   (ADM sample batch)
    OUTPUT_DIR/sampling_settings.json   every setting that determines the images (a rerun must match it)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
from typing import Iterator

import numpy as np
import torch

from arpg_hf.atomic_io import PARTIAL, remove_stale_staging, write_atomically, write_text_atomically

SETTINGS_FILE = "sampling_settings.json"
SEED_RULE = "image i: torch.Generator().manual_seed(SeedSequence([seed, i]).generate_state(1, uint64)[0] >> 1)"
NPZ_FILE = "samples.npz"
SAMPLES_SUBDIR = "samples"
# Settings that change the images; a resumed run must repeat them exactly.
IMAGE_SETTINGS = (
    "model",
    "classes",
    "num_samples_per_class",
    "num_samples",
    "seed",
    "seed_rule",
    "num_inference_steps",
    "guidance_scale",
    "scheduler",
    "temperature",
    "top_k",
    "top_p",
    "dtype",
    "image_size",
)
# Temporary names of earlier versions of this script (visible names): removed like our hidden leftovers.
LEGACY_TEMPORARY = re.compile(r"^(\d{6,}\.png\.tmp\.png|samples\.npz\.tmp-\d+\.npz|sampling_settings\.json\.tmp-\d+)$")
LABEL_CHUNK = 1 << 16  # labels written to the .npz per chunk


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


def sample_class(classes: list[int], num_samples_per_class: int, index: int) -> int:
    """The class of sample `index`, class-major: indices [0, n) are classes[0], [n, 2n) classes[1], ..."""
    return classes[index // num_samples_per_class]


def pending_batches(output_dir: str, indices: range, batch_size: int, progress) -> Iterator[list[int]]:
    """Batches of at most `batch_size` of `indices` whose PNG is missing, computed lazily (a finished PNG counts
    towards `progress` as it is passed)."""
    batch = []
    for index in indices:
        if os.path.isfile(sample_path(output_dir, index)):
            progress.update(1)
            continue
        batch.append(index)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def sample_path(output_dir: str, index: int) -> str:
    return os.path.join(output_dir, SAMPLES_SUBDIR, f"{index:06d}.png")


def load_sampling_pipeline(args, device):
    from arpg_hf import ARPGScheduler
    from arpg_hf.pipeline_loading import load_pipeline

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
    steps, guidance = pipe.default_sampling_settings(
        args.num_inference_steps, args.guidance_scale, pipe.transformer.config.num_image_tokens
    )
    factor = pipe.vqvae.downsample_factor
    config = pipe.transformer.config
    return {
        "model": args.model or "bundled:digits-pipeline",
        "classes": classes,
        "num_samples_per_class": args.num_samples_per_class,
        "num_samples": len(classes) * args.num_samples_per_class,
        "seed": args.seed,
        "seed_rule": SEED_RULE,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "scheduler": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "dtype": args.dtype,
        "image_size": [config.grid_height * factor, config.grid_width * factor],
        "class_names": [pipe.id2label[c] for c in classes],
        "batch_size": args.batch_size,
        "num_processes": world_size,
        "arpg_hf_version": arpg_hf.__version__,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


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
    write_text_atomically(path, json.dumps(content, indent=2))


def npz_arrays(settings: dict) -> dict:
    """`name -> (shape, dtype)` of the ADM sample batch: arr_0 uint8 images (N, H, W, 3), arr_1 int64 labels (N,)."""
    height, width = settings["image_size"]
    num_samples = settings["num_samples"]
    return {"arr_0": ((num_samples, height, width, 3), np.uint8), "arr_1": ((num_samples,), np.int64)}


def nearest_existing_folder(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_disk_space(output_dir: str, settings: dict) -> None:
    """ValueError, before anything is drawn or created, when the PNGs still to draw and the .npz would not fit in the
    free space of the output folder's disk. The .npz size is exact (uncompressed); a PNG is counted at its uncompressed
    size, an upper bound (PNG compression only makes it smaller, up to a few header bytes). The .npz is written image by
    image from the PNGs, so memory does not grow with the number of samples and needs no check here (the pipeline
    checks the memory of each batch itself)."""
    from arpg_hf.memory import format_bytes
    from arpg_hf.metrics.sample_batch import npz_size

    height, width = settings["image_size"]
    num_samples = settings["num_samples"]
    samples_dir = os.path.join(output_dir, SAMPLES_SUBDIR)
    done = 0
    if os.path.isdir(samples_dir):  # a resumed run: the PNGs already drawn take no new space
        with os.scandir(samples_dir) as entries:
            done = sum(1 for entry in entries if not entry.name.startswith(".") and entry.name.endswith(".png"))
    raw = height * width * 3
    # A PNG's worst case: the raw pixels, a filter byte per row, zlib's and the chunks' headers (~1 in 1000), ~128 B.
    pngs = max(num_samples - done, 0) * (raw + height + raw // 1000 + 128)
    npz = npz_size(npz_arrays(settings))
    folder = nearest_existing_folder(output_dir)
    free = shutil.disk_usage(folder).free
    if npz + pngs > free:
        raise ValueError(
            f"{num_samples:,} samples ({settings['num_samples_per_class']:,} per class x {len(settings['classes'])} "
            f"classes) of {height}x{width} px need about {format_bytes(npz + pngs)} on disk ({format_bytes(npz)} for "
            f"{NPZ_FILE}, up to {format_bytes(pngs)} for the PNGs still to draw), but {folder} has "
            f"{format_bytes(free)} free. Lower --num_samples_per_class (or pass fewer --class_ids), or choose an "
            "--output_dir on a disk with more space."
        )


def remove_leftovers(output_dir: str) -> None:
    """Removes what killed runs left: our hidden temporary files (`.NAME.partial-*`, see arpg_hf.atomic_io) and the
    visible temporary names of earlier versions. Only the main process calls this, before any process writes."""
    for folder in (output_dir, os.path.join(output_dir, SAMPLES_SUBDIR)):
        if not os.path.isdir(folder):
            continue
        with os.scandir(folder) as entries:
            names = [entry.name for entry in entries if entry.name.startswith(".") or ".tmp" in entry.name]
        for name in names:
            if name.startswith(".") and PARTIAL in name:
                remove_stale_staging(os.path.join(folder, name[1 : name.index(PARTIAL)]))
            elif LEGACY_TEMPORARY.match(name):
                os.remove(os.path.join(folder, name))


@torch.no_grad()
def sample_indices(pipe, batches, settings: dict, progress) -> int:
    """Draws and saves the samples of every batch of indices; returns how many it drew."""
    output_dir, classes, per_class = settings["output_dir"], settings["classes"], settings["num_samples_per_class"]
    drawn = 0
    for batch in batches:
        # CPU generators: the same draws whatever device the model runs on.
        generators = [torch.Generator().manual_seed(sample_seed(settings["seed"], i)) for i in batch]
        images = pipe(
            [sample_class(classes, per_class, i) for i in batch],
            num_inference_steps=settings["num_inference_steps"],
            guidance_scale=settings["guidance_scale"],
            generator=generators,
            temperature=settings["temperature"],
            top_k=settings["top_k"],
            top_p=settings["top_p"],
        ).images
        for index, image in zip(batch, images):
            # A PNG that exists is complete: written to a hidden temporary sibling, then renamed.
            write_atomically(sample_path(output_dir, index), lambda temporary: image.save(temporary, format="PNG"))
        progress.update(len(batch))
        drawn += len(batch)
    return drawn


def write_npz(output_dir: str, settings: dict) -> str:
    """Collects every PNG into the ADM sample batch (arr_0 images, arr_1 labels), one image at a time."""
    from PIL import Image

    from arpg_hf.metrics.sample_batch import save_npz_streaming
    from arpg_hf.token_dataset import error_reason

    (shape, _), (label_shape, _) = npz_arrays(settings).values()
    classes, per_class = settings["classes"], settings["num_samples_per_class"]

    def images():
        for index in range(settings["num_samples"]):
            path = sample_path(output_dir, index)
            try:
                with Image.open(path) as image:
                    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
            except FileNotFoundError:
                raise ValueError(f"{path} is missing; rerun the same command to draw it.") from None
            except Exception as error:  # noqa: BLE001 - PIL raises many types on a damaged file
                raise ValueError(
                    f"{path} cannot be read ({error_reason(error)}); delete it and rerun the same command "
                    "to draw it again."
                ) from None
            if array.shape != shape[1:]:
                raise ValueError(
                    f"{path} is {array.shape[1]}x{array.shape[0]} px, but the samples are {shape[2]}x"
                    f"{shape[1]}; delete it and rerun the same command to draw it again."
                )
            yield array[None]

    def labels():
        for start in range(0, settings["num_samples"], LABEL_CHUNK):
            indices = np.arange(start, min(start + LABEL_CHUNK, settings["num_samples"]))
            yield np.asarray(classes, dtype=np.int64)[indices // per_class]

    path = os.path.join(output_dir, NPZ_FILE)
    save_npz_streaming(path, {"arr_0": (shape, np.uint8, images()), "arr_1": (label_shape, np.int64, labels())})
    return path


def main(args) -> dict:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = Accelerator()
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output_dir {args.output_dir} is a file; pass a folder (new or of an earlier run).")
    pipe = load_sampling_pipeline(args, accelerator.device)
    settings = sampling_settings(args, pipe, accelerator.num_processes)
    check_resume(args.output_dir, settings)
    check_disk_space(args.output_dir, settings)
    # The memory of one batch (the pipeline checks it on every call too): a --batch_size that does not fit is refused
    # before anything is created, with one line naming the estimate and the budget.
    config = pipe.transformer.config
    pipe.check_memory(
        min(args.batch_size, settings["num_samples"]),
        (config.grid_height, config.grid_width),
        settings["num_inference_steps"],
    )
    # Everything is validated: only now is anything written.
    if accelerator.is_main_process:
        os.makedirs(os.path.join(args.output_dir, SAMPLES_SUBDIR), exist_ok=True)
        remove_leftovers(args.output_dir)
        write_json(os.path.join(args.output_dir, SETTINGS_FILE), settings)
    accelerator.wait_for_everyone()
    mine = range(accelerator.process_index, settings["num_samples"], accelerator.num_processes)
    progress = tqdm(
        total=len(mine),
        desc=f"sampling (process {accelerator.process_index})",
        unit="img",
        disable=not accelerator.is_local_main_process,
    )
    try:
        batches = pending_batches(args.output_dir, mine, args.batch_size, progress)
        drawn = sample_indices(pipe, batches, {**settings, "output_dir": args.output_dir}, progress)
    finally:
        progress.close()  # before any error message, which then has a line of its own
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path = write_npz(args.output_dir, settings)
        print(f"{settings['num_samples']} samples ({drawn} new on process 0) -> {path}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return settings


if __name__ == "__main__":
    from arpg_hf.user_errors import run_guarded

    arguments = parse_args()
    sys.exit(run_guarded(lambda: main(arguments), prog="pipelines/sample_fid.py"))
