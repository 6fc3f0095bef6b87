#!/usr/bin/env python
"""Tokenizes an image dataset with an ARPG VQ tokenizer into a token dataset for `train.py`.

    accelerate launch pipelines/tokenize_dataset.py --image_dir imagenet/train --vqvae arpg-l \
        --output_dir imagenet-256-tokens --resolution 256 --ten_crop

Sources: an image folder with one sub-folder per class (`--image_dir`), or anything `datasets.load_dataset` reads
(`--dataset_name`: a Hub id, or a local folder of parquet/arrow files; `--data_files` for explicit files). Each image
becomes one row `{"codes": (n_crops, tokens), "label": class}`: a centre crop and its horizontal flip by default,
LlamaGen's ten crops with `--ten_crop`, no flip with `--no_flip` (evaluation). Work is cut into shards of
`--shard_size` images spread over the processes; a finished shard is never redone, so rerunning the same command
resumes an interrupted job. `--verify` decodes a few stored codes back to images (TOKENS/verify.png).
With `--control_type edges` every view also gets its condition map (Canny edges, `arpg_hf.canny_edges`) in a
`control` column `(n_crops, resolution, resolution)` uint8, for ControlARPG fine-tuning (`train_control.py`).

An image that cannot be read (truncated, empty, not an image) stops the job with one line naming its path and row;
with `--skip_bad_images` it is left out instead, and TOKENS/skipped_images.json lists every skipped image with the
reason. Every file is written under a hidden temporary name and renamed into place (a file that exists is complete);
the hidden leftovers of a killed run are removed by the next run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

from arpg_hf.atomic_io import remove_stale_staging, write_atomically, write_text_atomically
from arpg_hf.control_conditions import compute_control_image
from arpg_hf.optional_dependencies import require
from arpg_hf.token_dataset import (
    DATA_SUBDIR,
    DEFAULT_CROP_RANGE,
    SHARD_NAME,
    SKIPPED_FILE,
    SKIPPED_SUBDIR,
    TokenDatasetInfo,
    UnreadableImageError,
    augment_image,
    augmentation_name,
    check_shard_count,
    images_to_tensor,
    load_token_dataset,
    load_vq_model,
    num_views,
    read_image,
    remove_staging_leftovers,
    shard_path,
    token_features,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    source = parser.add_argument_group("source")
    source.add_argument("--image_dir", type=str, default=None, help="Image folder, one sub-folder per class.")
    source.add_argument("--dataset_name", type=str, default=None, help="Hub dataset id or local dataset folder.")
    source.add_argument("--dataset_config_name", type=str, default=None)
    source.add_argument(
        "--data_files",
        type=str,
        nargs="+",
        default=None,
        help="Parquet/arrow files (with --dataset_name parquet or arrow).",
    )
    source.add_argument("--split", type=str, default="train")
    source.add_argument("--image_column", type=str, default="image")
    source.add_argument("--label_column", type=str, default="label")
    source.add_argument("--max_samples", type=int, default=None, help="Tokenize only the first N images (debugging).")
    source.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument(
        "--vqvae", type=str, default=None, help="Pipeline folder/id (its vqvae/ subfolder) or ARPGVQModel folder/id."
    )
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--ten_crop", action="store_true", help="LlamaGen ten crop (5 crops, x2 with flips).")
    parser.add_argument("--no_flip", action="store_true", help="Do not add horizontally flipped views (evaluation).")
    parser.add_argument(
        "--crop_range",
        type=float,
        default=DEFAULT_CROP_RANGE,
        help="Ten crop: resize the short side to resolution x this.",
    )
    parser.add_argument("--batch_size", type=int, default=32, help="Images per encoder batch (x n_crops views).")
    parser.add_argument("--shard_size", type=int, default=10000, help="Images per output shard (unit of resumption).")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no", help="Encoder dtype.")
    parser.add_argument(
        "--control_type",
        choices=("edges",),
        default=None,
        help="Also store each view's condition map (edges: Canny) for ControlARPG fine-tuning.",
    )
    parser.add_argument("--verify", action="store_true", help="Decode stored codes of --output_dir to verify.png.")
    parser.add_argument("--num_verify", type=int, default=8, help="Rows decoded by --verify.")
    parser.add_argument(
        "--skip_bad_images",
        action="store_true",
        help=f"Leave out images that cannot be read (listed in OUTPUT_DIR/{SKIPPED_FILE}) instead of stopping.",
    )
    args = parser.parse_args(argv)
    if not args.verify and (args.image_dir is None) == (args.dataset_name is None):
        parser.error("Pass exactly one of --image_dir or --dataset_name (or --verify to check an existing output).")
    if args.resolution < 1 or args.batch_size < 1 or args.shard_size < 1:
        parser.error("--resolution, --batch_size and --shard_size must be positive.")
    if args.num_verify < 1 or args.dataloader_num_workers < 0:
        parser.error("--num_verify must be positive and --dataloader_num_workers >= 0.")
    return args


# ------------------------------------------------------------------------------------------------ source


def load_image_dataset(args):
    """The source rows with an image column and integer labels, and the class names."""
    datasets = require("datasets", "training", "pipelines/tokenize_dataset.py")

    if args.image_dir is not None:
        if not os.path.isdir(args.image_dir):
            raise ValueError(f"--image_dir {args.image_dir} is not a folder.")
        dataset = datasets.load_dataset("imagefolder", data_dir=args.image_dir, split="train", cache_dir=args.cache_dir)
    elif os.path.isdir(args.dataset_name) and os.path.isfile(os.path.join(args.dataset_name, "state.json")):
        dataset = datasets.load_from_disk(args.dataset_name)
    else:
        dataset = datasets.load_dataset(
            args.dataset_name,
            args.dataset_config_name,
            data_files=args.data_files,
            split=args.split,
            cache_dir=args.cache_dir,
        )
    if args.image_column not in dataset.column_names:
        raise ValueError(
            f"No image column {args.image_column!r} in the source; columns: {dataset.column_names}. Set --image_column."
        )
    feature = dataset.features[args.image_column]
    if not isinstance(feature, datasets.Image):
        raise ValueError(
            f"The column {args.image_column!r} holds {type(feature).__name__} values, not images; set --image_column "
            f"to the image column (columns: {dataset.column_names})."
        )
    # Rows hold the image files ({"path", "bytes"}); AugmentedImages decodes them, so that it can name a bad one.
    dataset = dataset.cast_column(args.image_column, datasets.Image(mode=feature.mode, decode=False))
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError("The source dataset is empty: nothing to tokenize.")
    return class_labels(dataset, args.label_column)


def class_labels(dataset, label_column: str):
    """Returns (dataset with an integer `label` column, class names), whatever the source's label type."""
    datasets = require("datasets", "training", "pipelines/tokenize_dataset.py")

    if label_column not in dataset.column_names:
        print(f"No label column {label_column!r}: every image gets class 0 ('image').", file=sys.stderr)
        return dataset.add_column("__label", [0] * len(dataset)), ["image"]
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return dataset.rename_column(label_column, "__label"), list(feature.names)
    values = dataset[label_column]
    if all(isinstance(v, (int, np.integer)) for v in values):
        if min(values) < 0:
            raise ValueError(f"Labels must be >= 0, got {min(values)}.")
        return dataset.rename_column(label_column, "__label"), [str(i) for i in range(max(values) + 1)]
    names = sorted({str(v) for v in values})
    index = {name: i for i, name in enumerate(names)}
    return dataset.add_column("__label", [index[str(v)] for v in values]), names


class AugmentedImages(torch.utils.data.Dataset):
    """Rows `[start, stop)` of the source as `{"views": (n_crops, 3, R, R) in [-1, 1], "label", "row"}`, or, for an
    image that cannot be read, `{"views": None, "row", "path", "reason"}` (never an exception, so that the error is
    reported once, in the main process, whatever the number of data loader workers)."""

    def __init__(self, dataset, image_column, start, stop, resolution, ten_crop, flip, crop_range):
        self.dataset, self.image_column, self.start, self.stop = dataset, image_column, start, stop
        self.feature = dataset.features[image_column]
        self.augment = dict(resolution=resolution, ten_crop=ten_crop, flip=flip, crop_range=crop_range)

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, index):
        row_index = self.start + index
        row = self.dataset[row_index]
        value = row[self.image_column]
        try:
            image = read_image(value, self.feature)
        except UnreadableImageError as error:
            path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
            return {"views": None, "row": row_index, "path": path, "reason": str(error)}
        views = images_to_tensor(augment_image(image, **self.augment))
        return {"views": views, "label": int(row["__label"]), "row": row_index}


def collate_views(items: list[dict]) -> tuple[torch.Tensor | None, torch.Tensor, list[dict]]:
    """Readable items -> (views `(b, n_crops, 3, R, R)` or None, labels `(b,)`); unreadable ones -> records."""
    good = [item for item in items if item["views"] is not None]
    bad = [{key: item[key] for key in ("row", "path", "reason")} for item in items if item["views"] is None]
    views = torch.stack([item["views"] for item in good]) if good else None
    labels = torch.tensor([item["label"] for item in good], dtype=torch.long)
    return views, labels, bad


def bad_image_message(record: dict, args) -> str:
    """One line naming the unreadable image (path and row), the reason, and the two ways on."""
    source = "of the sorted file list" if args.image_dir is not None else "of the dataset"
    where = f"{record['path']} (row {record['row']} {source})" if record["path"] else f"row {record['row']} {source}"
    return (
        f"Cannot read image {where}: {record['reason']}. Replace or delete the file, or pass --skip_bad_images to "
        f"leave unreadable images out (they are then listed in {os.path.join(args.output_dir, SKIPPED_FILE)})."
    )


# ------------------------------------------------------------------------------------------------ encoding


@torch.no_grad()
def encode_shard(
    vqvae, images: AugmentedImages, args, progress, n_crops: int, num_tokens: int
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Codes `(n, n_crops, tokens)` and labels `(n,)` of the readable images of one shard, and the records of the
    unreadable ones (row, path, reason). An unreadable image raises UnreadableImageError unless --skip_bad_images."""
    loader = torch.utils.data.DataLoader(
        images, batch_size=args.batch_size, num_workers=args.dataloader_num_workers, collate_fn=collate_views
    )
    all_codes, all_labels, skipped = [np.zeros((0, n_crops, num_tokens), np.int64)], [np.zeros(0, np.int64)], []
    resolution = images.augment["resolution"]
    all_controls = [np.zeros((0, n_crops, resolution, resolution), np.uint8)]
    for views, labels, bad in loader:  # views: (b, n_crops, 3, R, R)
        if bad and not args.skip_bad_images:
            raise UnreadableImageError(bad_image_message(bad[0], args))
        skipped += bad
        if views is not None:
            batch = views.shape[0]
            pixels = views.flatten(0, 1).to(vqvae.device, vqvae.dtype)  # (b * n_crops, 3, R, R)
            indices = vqvae.encode(pixels).indices  # (b * n_crops, h, w)
            all_codes.append(indices.reshape(batch, n_crops, -1).cpu().numpy())  # (b, n_crops, h * w)
            all_labels.append(labels.numpy())
            if args.control_type is not None:
                all_controls.append(control_maps(views, args.control_type))
        progress.update(len(labels) + len(bad))
    controls = np.concatenate(all_controls) if args.control_type is not None else None
    return np.concatenate(all_codes), np.concatenate(all_labels), controls, skipped


def control_maps(views: torch.Tensor, control_type: str) -> np.ndarray:
    """Views `(b, n_crops, 3, R, R)` in [-1, 1] -> their condition maps `(b, n_crops, R, R)` uint8."""
    pixels = ((views.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 1, 3, 4, 2).numpy() * 255).round().astype(np.uint8)
    maps = [[np.asarray(compute_control_image(view, control_type)) for view in image] for image in pixels]
    return np.asarray(maps, dtype=np.uint8)


def write_shard(codes, labels, features, path: str, controls=None) -> None:
    """Writes one parquet shard atomically (a hidden temporary sibling, then rename)."""
    datasets = require("datasets", "training", "pipelines/tokenize_dataset.py")

    columns = {"codes": codes.astype(features["codes"].dtype), "label": labels}
    if controls is not None:
        columns["control"] = controls
    rows = datasets.Dataset.from_dict(columns, features=features)
    write_atomically(path, rows.to_parquet)


def skipped_record_path(output_dir: str, index: int, total: int) -> str:
    """OUTPUT_DIR/skipped/train-XXXXX-of-YYYYY.json: the images that shard XXXXX left out."""
    name = SHARD_NAME.format(index=index, total=total).replace(".parquet", ".json")
    return os.path.join(output_dir, SKIPPED_SUBDIR, name)


def merge_skipped(output_dir: str, num_shards: int) -> list[dict]:
    """The records of every shard's skipped images, in row order."""
    records = []
    for shard in range(num_shards):
        path = skipped_record_path(output_dir, shard, num_shards)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                records += json.load(file)["images"]
    return sorted(records, key=lambda record: record["row"])


def tokenize(args) -> None:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = Accelerator()
    if args.vqvae is None:
        raise ValueError(
            "Tokenizing raw images needs the VQ tokenizer: pass --vqvae with a pipeline folder or Hub id (its vqvae/ "
            "subfolder is used) or an ARPGVQModel folder."
        )
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    vqvae = load_vq_model(args.vqvae, dtype=dtype).to(accelerator.device).eval()
    factor = vqvae.downsample_factor
    if args.resolution % factor:
        raise ValueError(
            f"--resolution {args.resolution} must be a multiple of the tokenizer's downsample factor {factor}."
        )
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output_dir {args.output_dir} is a file; pass a folder (new or of an earlier run).")
    with accelerator.main_process_first():
        dataset, names = load_image_dataset(args)
    flip = not args.no_flip
    n_crops, grid = num_views(args.ten_crop, flip), args.resolution // factor
    control_size = args.resolution if args.control_type is not None else None
    features = token_features(n_crops, grid * grid, names, vqvae.config.num_vq_embeddings, control_size)
    num_shards = math.ceil(len(dataset) / args.shard_size)
    check_shard_count(
        args.output_dir,
        num_shards,
        f"--shard_size {args.shard_size}",
        "repeat the original source, --max_samples and --shard_size to resume that run",
    )
    # Everything is validated: only now is anything written.
    if accelerator.is_main_process:
        os.makedirs(os.path.join(args.output_dir, DATA_SUBDIR), exist_ok=True)
        remove_staging_leftovers(args.output_dir)
    accelerator.wait_for_everyone()
    mine = range(accelerator.process_index, num_shards, accelerator.num_processes)
    todo = [s for s in mine if not os.path.isfile(shard_path(args.output_dir, s, num_shards))]
    total = sum(min(args.shard_size, len(dataset) - s * args.shard_size) for s in todo)
    progress = tqdm(
        total=total,
        desc=f"tokenizing (process {accelerator.process_index})",
        unit="img",
        disable=not accelerator.is_local_main_process,
    )
    try:
        for shard in todo:
            start, stop = shard * args.shard_size, min(len(dataset), (shard + 1) * args.shard_size)
            images = AugmentedImages(
                dataset, args.image_column, start, stop, args.resolution, args.ten_crop, flip, args.crop_range
            )
            record = skipped_record_path(args.output_dir, shard, num_shards)
            if os.path.isfile(record):  # left by a run killed before it wrote this shard: the shard is redone
                os.remove(record)
            codes, labels, controls, skipped = encode_shard(vqvae, images, args, progress, n_crops, grid * grid)
            if skipped:  # the record first: a shard that exists always has its record
                os.makedirs(os.path.dirname(record), exist_ok=True)
                write_text_atomically(record, json.dumps({"shard": shard, "images": skipped}, indent=1))
            write_shard(codes, labels, features, shard_path(args.output_dir, shard, num_shards), controls)
    finally:
        progress.close()  # before any error message, which then has a line of its own
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        missing = [s for s in range(num_shards) if not os.path.isfile(shard_path(args.output_dir, s, num_shards))]
        if missing:
            raise RuntimeError(f"Shards {missing} are missing after tokenization; rerun the command to finish them.")
        skipped = merge_skipped(args.output_dir, num_shards)
        skipped_path = os.path.join(args.output_dir, SKIPPED_FILE)
        if skipped or args.skip_bad_images:
            summary = {"num_skipped": len(skipped), "num_source_images": len(dataset), "images": skipped}
            write_text_atomically(skipped_path, json.dumps(summary, indent=1))
        elif os.path.isfile(skipped_path):  # of an earlier run whose shards were all redone since
            os.remove(skipped_path)
        if len(skipped) == len(dataset):
            raise ValueError(
                f"None of the {len(dataset)} source images could be read (reasons in {skipped_path}, e.g. "
                f"{skipped[0]['path'] or 'row 0'}: {skipped[0]['reason']}). Check the source folder or dataset."
            )
        source = os.path.abspath(args.vqvae) if os.path.isdir(args.vqvae) else args.vqvae
        num_samples = len(dataset) - len(skipped)
        info = TokenDatasetInfo(
            grid_height=grid,
            grid_width=grid,
            codebook_size=vqvae.config.num_vq_embeddings,
            n_crops=n_crops,
            resolution=args.resolution,
            class_names=features["label"].names,
            vqvae=source,
            augmentation=augmentation_name(args.ten_crop, flip),
            num_samples=num_samples,
            extra={} if args.control_type is None else {"control_type": args.control_type},
        )
        info.save(args.output_dir)
        if skipped:
            print(
                f"Skipped {len(skipped)} unreadable image(s) of {len(dataset)}; they are listed in {skipped_path}.",
                file=sys.stderr,
            )
        print(
            f"Wrote {num_samples} images x {n_crops} views ({grid}x{grid} tokens, {len(names)} classes) in "
            f"{num_shards} shard(s) to {args.output_dir}"
        )


# ------------------------------------------------------------------------------------------------ verify


@torch.no_grad()
def verify(args) -> str:
    """Decodes the first views of the first rows and writes them as one grid image; returns its path."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    dataset, info = load_token_dataset(args.output_dir)
    vqvae_source = args.vqvae or (info.vqvae if info else None)
    if vqvae_source is None:
        raise ValueError("--verify needs the tokenizer: pass --vqvae (tokenizer_info.json records none).")
    vqvae = load_vq_model(vqvae_source).eval()
    rows = dataset.with_format("numpy")[: args.num_verify]
    codes = torch.as_tensor(np.asarray(rows["codes"]), dtype=torch.long)
    codes = codes.reshape(codes.shape[0], -1, codes.shape[-1])  # (n, n_crops, L)
    grid = (info.grid_height, info.grid_width) if info else None
    views = codes[:, : min(codes.shape[1], 2)].flatten(0, 1)  # (n * k, L): first view and its flip
    images = vqvae.decode(views, shape=grid).sample.clamp(-1, 1)  # (n * k, 3, H, W)
    pixels = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    columns = min(codes.shape[1], 2)
    grid_image = make_image_grid([Image.fromarray(p) for p in pixels], rows=len(pixels) // columns, cols=columns)
    path = os.path.join(args.output_dir, "verify.png")
    remove_stale_staging(path)
    write_atomically(path, lambda temporary: grid_image.save(temporary, format="PNG"))
    labels = np.asarray(rows["label"]).tolist()
    names = info.class_names if info and info.class_names else None
    print(
        f"Decoded {len(labels)} rows (labels {labels}{' = ' + str([names[i] for i in labels]) if names else ''}) "
        f"to {path}; codes in [{int(codes.min())}, {int(codes.max())}], {len(dataset)} rows in total."
    )
    return path


def main(args) -> None:
    if args.verify:
        verify(args)
    else:
        tokenize(args)


if __name__ == "__main__":
    from arpg_hf.user_errors import run_guarded

    arguments = parse_args()
    sys.exit(run_guarded(lambda: main(arguments), prog="pipelines/tokenize_dataset.py"))
