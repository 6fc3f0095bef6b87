#!/usr/bin/env python
"""Imports pre-tokenized images stored as one .npy file per image into a token dataset for `train.py`.

    python pipelines/import_npy_tokens.py --npy_dir imagenet256_codes --output_dir imagenet-256-tokens \
        --codebook_size 16384 --class_names imagenet

The widely shared layout of pre-tokenized ImageNet: NPY_DIR/<class>/<image>.npy, one folder per class (named by the
class index, 0 .. 999, or by any name, then sorted), each array of shape (1, n_crops, tokens) (ten crops: n_crops = 10),
(n_crops, tokens) or (tokens,). The output is the format `pipelines/tokenize_dataset.py` writes: parquet shards
`data/train-*.parquet` of rows {"codes": (n_crops, tokens), "label": ClassLabel} and `tokenizer_info.json`. Every file
is written under a hidden temporary name and renamed into place; a finished shard is kept, so rerunning the same
command resumes an interrupted import.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
from tqdm.auto import tqdm

from arpg_hf.atomic_io import write_atomically
from arpg_hf.optional_dependencies import require
from arpg_hf.token_dataset import (
    DATA_SUBDIR,
    TokenDatasetInfo,
    check_shard_count,
    remove_staging_leftovers,
    shard_path,
    token_features,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--npy_dir", type=str, required=True, help="Folder of class folders of .npy code arrays.")
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--vqvae", type=str, default=None, help="The tokenizer of the codes (sets the codebook size).")
    parser.add_argument("--codebook_size", type=int, default=None, help="Default: the --vqvae codebook, else 16384.")
    parser.add_argument("--grid_height", type=int, default=None, help="Defaults to a square grid.")
    parser.add_argument("--grid_width", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=None, help="Recorded in tokenizer_info.json.")
    parser.add_argument(
        "--class_names",
        type=str,
        default=None,
        help='"imagenet" (ImageNet-1k names) or a text file with one name per line; default: the folder names.',
    )
    parser.add_argument("--shard_size", type=int, default=50000)
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard_size must be positive.")
    return args


def list_classes(npy_dir: str) -> list[tuple[int, str, list[str]]]:
    """(label, folder, sorted .npy files) per class folder; numeric folder names are the labels themselves."""
    if not os.path.isdir(npy_dir):
        raise ValueError(f"--npy_dir {npy_dir} is not a folder.")
    folders = sorted(d for d in os.listdir(npy_dir) if os.path.isdir(os.path.join(npy_dir, d)))
    if not folders:
        raise ValueError(f"{npy_dir} has no class folders; expected {npy_dir}/<class>/<image>.npy.")
    numeric = all(name.isdigit() for name in folders)
    ordered = sorted(folders, key=int) if numeric else folders
    classes = []
    for index, folder in enumerate(ordered):
        files = sorted(f for f in os.listdir(os.path.join(npy_dir, folder)) if f.endswith(".npy"))
        classes.append((int(folder) if numeric else index, folder, [os.path.join(npy_dir, folder, f) for f in files]))
    if not any(files for _, _, files in classes):
        raise ValueError(f"No .npy files under {npy_dir}/<class>/: nothing to import.")
    return classes


def read_codes(path: str) -> np.ndarray:
    """One image's codes as (n_crops, tokens)."""
    array = np.load(path, allow_pickle=False)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    elif array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise ValueError(
            f"{path}: expected integer codes of shape (1, n_crops, tokens), (n_crops, tokens) or (tokens,), got "
            f"{array.dtype} {array.shape}."
        )
    return array


def resolve_class_names(option: str | None, classes) -> list[str]:
    num_classes = max(label for label, _, _ in classes) + 1
    if option == "imagenet":
        from arpg_hf.labels import imagenet_id2label

        names = [imagenet_id2label()[i] for i in range(1000)]
    elif option is not None:
        with open(option) as handle:
            names = [line.strip() for line in handle if line.strip()]
    else:
        by_label = {label: folder for label, folder, _ in classes}
        names = [by_label.get(i, str(i)) for i in range(num_classes)]
    if len(names) < num_classes:
        raise ValueError(f"{len(names)} class names for labels up to {num_classes - 1}: give a name to every class.")
    return names


def grid_of(num_tokens: int, height: int | None, width: int | None) -> tuple[int, int]:
    if height is None and width is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"{num_tokens} tokens per crop is not a square grid: pass --grid_height and --grid_width.")
        return side, side
    height = height or num_tokens // width
    width = width or num_tokens // height
    if height * width != num_tokens:
        raise ValueError(f"--grid_height x --grid_width = {height}x{width} != {num_tokens} tokens per crop.")
    return height, width


def main(args) -> None:
    datasets = require("datasets", "training", "pipelines/import_npy_tokens.py")

    classes = list_classes(args.npy_dir)
    items = [(path, label) for label, _, files in classes for path in files]
    first = read_codes(items[0][0])
    n_crops, num_tokens = first.shape
    codebook_size = args.codebook_size
    if codebook_size is None and args.vqvae is not None:
        from arpg_hf.token_dataset import load_vq_model

        codebook_size = load_vq_model(args.vqvae).config.num_vq_embeddings
    codebook_size = codebook_size or 16384
    names = resolve_class_names(args.class_names, classes)
    height, width = grid_of(num_tokens, args.grid_height, args.grid_width)
    features = token_features(n_crops, num_tokens, names, codebook_size)
    num_shards = math.ceil(len(items) / args.shard_size)
    check_shard_count(
        args.output_dir,
        num_shards,
        f"--shard_size {args.shard_size}",
        "repeat the original --npy_dir and --shard_size to resume that import",
    )
    os.makedirs(os.path.join(args.output_dir, DATA_SUBDIR), exist_ok=True)
    remove_staging_leftovers(args.output_dir)
    progress = tqdm(total=len(items), desc="importing", unit="img")
    for shard in range(num_shards):
        chunk = items[shard * args.shard_size : (shard + 1) * args.shard_size]
        path = shard_path(args.output_dir, shard, num_shards)
        if os.path.isfile(path):  # finished by an earlier run
            progress.update(len(chunk))
            continue
        arrays = [read_codes(p) for p, _ in chunk]
        for (p, _), array in zip(chunk, arrays):
            if array.shape != (n_crops, num_tokens):
                raise ValueError(
                    f"{p}: codes of shape {array.shape}, but {items[0][0]} has {first.shape}; every file "
                    "needs the same number of crops and tokens."
                )
        codes = np.stack(arrays)  # (n, n_crops, L)
        if codes.min() < 0 or codes.max() >= codebook_size:
            raise ValueError(
                f"Codes in [{codes.min()}, {codes.max()}] do not fit a {codebook_size}-code tokenizer; "
                "pass the right --codebook_size or --vqvae."
            )
        rows = datasets.Dataset.from_dict(
            {"codes": codes.astype(features["codes"].dtype), "label": [label for _, label in chunk]}, features=features
        )
        write_atomically(path, rows.to_parquet)
        progress.update(len(chunk))
    progress.close()
    TokenDatasetInfo(
        grid_height=height,
        grid_width=width,
        codebook_size=codebook_size,
        n_crops=n_crops,
        resolution=args.resolution,
        class_names=features["label"].names,
        vqvae=args.vqvae,
        augmentation="imported",
        num_samples=len(items),
    ).save(args.output_dir)
    print(
        f"Imported {len(items)} images x {n_crops} crops ({height}x{width} tokens, {len(names)} classes) into "
        f"{num_shards} shard(s) in {args.output_dir}"
    )


if __name__ == "__main__":
    from arpg_hf.user_errors import run_guarded

    arguments = parse_args()
    sys.exit(run_guarded(lambda: main(arguments), prog="pipelines/import_npy_tokens.py"))
