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
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch

from arpg_hf.optional_dependencies import require
from arpg_hf.token_dataset import (
    DATA_SUBDIR,
    DEFAULT_CROP_RANGE,
    TokenDatasetInfo,
    augment_image,
    augmentation_name,
    images_to_tensor,
    load_token_dataset,
    load_vq_model,
    num_views,
    shard_path,
    token_features,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    source = parser.add_argument_group("source")
    source.add_argument("--image_dir", type=str, default=None, help="Image folder, one sub-folder per class.")
    source.add_argument("--dataset_name", type=str, default=None, help="Hub dataset id or local dataset folder.")
    source.add_argument("--dataset_config_name", type=str, default=None)
    source.add_argument("--data_files", type=str, nargs="+", default=None,
                        help="Parquet/arrow files (with --dataset_name parquet or arrow).")  # fmt: skip
    source.add_argument("--split", type=str, default="train")
    source.add_argument("--image_column", type=str, default="image")
    source.add_argument("--label_column", type=str, default="label")
    source.add_argument("--max_samples", type=int, default=None, help="Tokenize only the first N images (debugging).")
    source.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument("--vqvae", type=str, default=None,
                        help="Pipeline folder/id (its vqvae/ subfolder) or ARPGVQModel folder/id.")  # fmt: skip
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--ten_crop", action="store_true", help="LlamaGen ten crop (5 crops, x2 with flips).")
    parser.add_argument("--no_flip", action="store_true", help="Do not add horizontally flipped views (evaluation).")
    parser.add_argument("--crop_range", type=float, default=DEFAULT_CROP_RANGE,
                        help="Ten crop: resize the short side to resolution x this.")  # fmt: skip
    parser.add_argument("--batch_size", type=int, default=32, help="Images per encoder batch (x n_crops views).")
    parser.add_argument("--shard_size", type=int, default=10000, help="Images per output shard (unit of resumption).")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no", help="Encoder dtype.")
    parser.add_argument("--verify", action="store_true", help="Decode stored codes of --output_dir to verify.png.")
    parser.add_argument("--num_verify", type=int, default=8, help="Rows decoded by --verify.")
    args = parser.parse_args(argv)
    if not args.verify and (args.image_dir is None) == (args.dataset_name is None):
        parser.error("Pass exactly one of --image_dir or --dataset_name (or --verify to check an existing output).")
    if args.resolution < 1 or args.batch_size < 1 or args.shard_size < 1:
        parser.error("--resolution, --batch_size and --shard_size must be positive.")
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
            args.dataset_name, args.dataset_config_name, data_files=args.data_files, split=args.split,
            cache_dir=args.cache_dir,
        )  # fmt: skip
    if args.image_column not in dataset.column_names:
        raise ValueError(
            f"No image column {args.image_column!r} in the source; columns: {dataset.column_names}. Set --image_column."
        )
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
    """Rows `[start, stop)` of the source as (views `(n_crops, 3, R, R)` in [-1, 1], label)."""

    def __init__(self, dataset, image_column, start, stop, resolution, ten_crop, flip, crop_range):
        self.dataset, self.image_column, self.start, self.stop = dataset, image_column, start, stop
        self.augment = dict(resolution=resolution, ten_crop=ten_crop, flip=flip, crop_range=crop_range)

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, index):
        row = self.dataset[self.start + index]
        image = row[self.image_column]
        if not hasattr(image, "convert"):
            kind = type(image).__name__
            raise ValueError(f"Row {self.start + index}: column {self.image_column!r} is not an image ({kind}).")
        return images_to_tensor(augment_image(image, **self.augment)), int(row["__label"])


# ------------------------------------------------------------------------------------------------ encoding


@torch.no_grad()
def encode_shard(vqvae, images: AugmentedImages, args, progress) -> tuple[np.ndarray, np.ndarray]:
    """Codes `(n, n_crops, tokens)` and labels `(n,)` of one shard."""
    loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size, num_workers=args.dataloader_num_workers)
    all_codes, all_labels = [], []
    for views, labels in loader:  # views: (b, n_crops, 3, R, R)
        batch, n_crops = views.shape[:2]
        pixels = views.flatten(0, 1).to(vqvae.device, vqvae.dtype)  # (b * n_crops, 3, R, R)
        indices = vqvae.encode(pixels).indices  # (b * n_crops, h, w)
        all_codes.append(indices.reshape(batch, n_crops, -1).cpu().numpy())  # (b, n_crops, h * w)
        all_labels.append(labels.numpy())
        progress.update(batch)
    return np.concatenate(all_codes), np.concatenate(all_labels)


def write_shard(codes, labels, features, path: str) -> None:
    """Writes one parquet shard atomically (temporary name, then rename)."""
    datasets = require("datasets", "training", "pipelines/tokenize_dataset.py")

    columns = {"codes": codes.astype(features["codes"].dtype), "label": labels}
    rows = datasets.Dataset.from_dict(columns, features=features)
    temp = path + f".tmp-{os.getpid()}"
    rows.to_parquet(temp)
    os.replace(temp, path)


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
    with accelerator.main_process_first():
        dataset, names = load_image_dataset(args)
    flip = not args.no_flip
    n_crops, grid = num_views(args.ten_crop, flip), args.resolution // factor
    features = token_features(n_crops, grid * grid, names, vqvae.config.num_vq_embeddings)
    num_shards = math.ceil(len(dataset) / args.shard_size)
    os.makedirs(os.path.join(args.output_dir, DATA_SUBDIR), exist_ok=True)
    mine = range(accelerator.process_index, num_shards, accelerator.num_processes)
    todo = [s for s in mine if not os.path.isfile(shard_path(args.output_dir, s, num_shards))]
    total = sum(min(args.shard_size, len(dataset) - s * args.shard_size) for s in todo)
    progress = tqdm(total=total, desc=f"tokenizing (process {accelerator.process_index})", unit="img",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    for shard in todo:
        start, stop = shard * args.shard_size, min(len(dataset), (shard + 1) * args.shard_size)
        images = AugmentedImages(
            dataset, args.image_column, start, stop, args.resolution, args.ten_crop, flip, args.crop_range
        )
        codes, labels = encode_shard(vqvae, images, args, progress)
        write_shard(codes, labels, features, shard_path(args.output_dir, shard, num_shards))
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        missing = [s for s in range(num_shards) if not os.path.isfile(shard_path(args.output_dir, s, num_shards))]
        if missing:
            raise RuntimeError(f"Shards {missing} are missing after tokenization; rerun the command to finish them.")
        source = os.path.abspath(args.vqvae) if os.path.isdir(args.vqvae) else args.vqvae
        info = TokenDatasetInfo(
            grid_height=grid, grid_width=grid, codebook_size=vqvae.config.num_vq_embeddings, n_crops=n_crops,
            resolution=args.resolution, class_names=features["label"].names, vqvae=source,
            augmentation=augmentation_name(args.ten_crop, flip), num_samples=len(dataset),
        )  # fmt: skip
        info.save(args.output_dir)
        print(f"Wrote {len(dataset)} images x {n_crops} views ({grid}x{grid} tokens, {len(names)} classes) in "
              f"{num_shards} shard(s) to {args.output_dir}")  # fmt: skip


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
    grid_image.save(path)
    labels = np.asarray(rows["label"]).tolist()
    names = info.class_names if info and info.class_names else None
    print(f"Decoded {len(labels)} rows (labels {labels}{' = ' + str([names[i] for i in labels]) if names else ''}) "
          f"to {path}; codes in [{int(codes.min())}, {int(codes.max())}], {len(dataset)} rows in total.")  # fmt: skip
    return path


def main(args) -> None:
    if args.verify:
        verify(args)
    else:
        tokenize(args)


if __name__ == "__main__":
    main(parse_args())
