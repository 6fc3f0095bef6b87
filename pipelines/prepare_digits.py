#!/usr/bin/env python
"""Exports the fixed train / test split of the scikit-learn digits as image folders (one sub-folder per class).

    python pipelines/prepare_digits.py --output_dir /tmp/digits-work/images

writes OUTPUT/train/<digit>/<row>.png and OUTPUT/test/<digit>/<row>.png (32x32 RGB, dark ink on white, every digit
pixel a 4x4 block; <row> is the image's row in `sklearn.datasets.load_digits()`) and OUTPUT/split.json with the rows
of both parts. The split is stratified and seeded (`arpg_hf.digits.stratified_split_indices`): 20 % of every class,
359 images, are held out for the quality benchmark; the other 1,438 train the tokenizer and the model.
"""

import argparse
import json
import os

from arpg_hf.digits import (
    DEFAULT_SCALE,
    DEFAULT_SPLIT_SEED,
    DEFAULT_TEST_FRACTION,
    export_image_folder,
    load_digits_split,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--test_fraction", type=float, default=DEFAULT_TEST_FRACTION)
    parser.add_argument("--seed", type=int, default=DEFAULT_SPLIT_SEED)
    parser.add_argument("--scale", type=int, default=DEFAULT_SCALE, help="Pixels per digit pixel (4: 32x32 images).")
    return parser.parse_args(argv)


def main(args):
    train, test = load_digits_split(args.test_fraction, args.seed)
    counts = {}
    for name, split in (("train", train), ("test", test)):
        directory = os.path.join(args.output_dir, name)
        if os.path.isdir(directory) and os.listdir(directory):
            raise SystemExit(f"{directory} is not empty; remove it or choose another --output_dir.")
        counts[name] = export_image_folder(split, directory, args.scale)
    split_info = {
        "test_fraction": args.test_fraction,
        "seed": args.seed,
        "scale": args.scale,
        "train_rows": train.indices.tolist(),
        "test_rows": test.indices.tolist(),
    }
    with open(os.path.join(args.output_dir, "split.json"), "w") as file:
        json.dump(split_info, file)
    print(json.dumps({"output_dir": args.output_dir, **counts}))


if __name__ == "__main__":
    main(parse_args())
