#!/usr/bin/env python
"""Evaluates generated samples against an ADM reference batch: FID, Inception score, precision and recall.

    python pipelines/evaluate_samples.py --samples samples/arpg-l-cfg4.5 --reference VIRTUAL_imagenet256_labeled.npz \
        --output samples/arpg-l-cfg4.5/metrics.json --device cuda

--samples is a folder of images, a `pipelines/sample_fid.py` output folder (its samples.npz, else its samples/ PNGs)
or an ADM .npz (arr_0). --reference is an ADM reference batch .npz: its mu/sigma are the FID statistics when present
(else they are computed from its images), its images (arr_0) give precision/recall. Features come from the FID
Inception-v3 (--inception_weights or $ARPG_HF_INCEPTION_WEIGHTS offline); --feature_extractor tiny-random runs the
chain without weights (smoke tests; its numbers mean nothing). Writes the metrics JSON (with the sampling settings
found next to the samples) and prints a markdown table row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

MARKDOWN_HEADER = "| Samples | N | FID | IS | Precision | Recall |\n|---|---|---|---|---|---|"
SETTINGS_FILE = "sampling_settings.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--samples", type=str, required=True, help="Image folder, sample_fid.py folder or ADM .npz.")
    parser.add_argument("--reference", type=str, required=True, help="ADM reference batch .npz (arr_0, mu, sigma).")
    parser.add_argument("--output", type=str, default=None, help="Metrics JSON (default: SAMPLES/metrics.json).")
    parser.add_argument("--name", type=str, default=None, help="Row label of the markdown row.")
    parser.add_argument("--feature_extractor", choices=("inception-v3", "tiny-random"), default="inception-v3")
    parser.add_argument("--inception_weights", type=str, default=None, help="Local pt_inception-2015-12-05 file.")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--nearest_k", type=int, default=3)
    parser.add_argument("--split_size", type=int, default=5000, help="Inception score: samples per split (ADM).")
    parser.add_argument("--device", type=str, default=None, help="Default: cuda when available, else cpu.")
    return parser.parse_args(argv)


def samples_source(path: str) -> str:
    """The file or folder that holds the images of --samples."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "samples.npz")):
        return os.path.join(path, "samples.npz")
    if os.path.isdir(path) and os.path.isdir(os.path.join(path, "samples")):
        return os.path.join(path, "samples")
    return path


def read_settings(samples: str) -> dict | None:
    folder = samples if os.path.isdir(samples) else os.path.dirname(os.path.abspath(samples))
    path = os.path.join(folder, SETTINGS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def markdown_row(name: str, metrics: dict) -> str:
    def cell(key, digits):
        return f"{metrics[key]:.{digits}f}" if key in metrics else "-"

    return (
        f"| {name} | {metrics['num_samples']} | {cell('fid', 2)} | {cell('inception_score', 1)} | "
        f"{cell('precision', 3)} | {cell('recall', 3)} |"
    )


def main(args) -> dict:
    import torch

    from arpg_hf.metrics import evaluate_images, read_images, read_npz_batch

    samples = read_images(samples_source(args.samples))
    reference = read_npz_batch(args.reference)
    statistics = (reference["mu"], reference["sigma"]) if "mu" in reference and "sigma" in reference else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate_images(
        samples,
        reference.get("images"),
        statistics,
        feature_extractor=args.feature_extractor,
        inception_weights=args.inception_weights,
        batch_size=args.batch_size,
        nearest_k=args.nearest_k,
        split_size=args.split_size,
        device=device,
        progress=True,
    )
    name = args.name or os.path.basename(os.path.normpath(args.samples))
    report = {
        "metrics": metrics,
        "samples": os.path.abspath(args.samples),
        "reference": os.path.abspath(args.reference),
        "feature_extractor": args.feature_extractor,
        "nearest_k": args.nearest_k,
        "split_size": args.split_size,
        "fid_reference": "reference mu/sigma" if statistics is not None else "reference images",
        "sampling_settings": read_settings(args.samples),
        "markdown_row": markdown_row(name, metrics),
    }
    output = args.output or os.path.join(
        args.samples if os.path.isdir(args.samples) else os.path.dirname(os.path.abspath(args.samples)), "metrics.json"
    )
    with open(output, "w", encoding="utf-8") as file:
        json.dump(report, file, indent=2)
    print(f"{MARKDOWN_HEADER}\n{report['markdown_row']}\n\nmetrics: {output}")
    return report


if __name__ == "__main__":
    from arpg_hf.user_errors import run_guarded

    arguments = parse_args()
    sys.exit(run_guarded(lambda: main(arguments), prog="pipelines/evaluate_samples.py"))
