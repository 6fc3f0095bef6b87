#!/usr/bin/env python
"""Quality of controlled generation (ControlARPG) on held-out digits: does a sample follow its edge map?

    python benchmarks/quality_control_digits.py --output_dir control-benchmark --figure docs/images/control_digits.png

For every held-out digit of the fixed split (359 images, never trained on by the base model nor by the adapter),
its Canny edge map (`arpg_hf.canny_edges` of the rendered 32x32 image) is the condition, and `--samples_per_image`
images of its class are generated (sample j of test image i uses a generator seeded `seed + 1000 * j + i`). The
same seeds give the floor: the same pipeline without control (`controlnet_conditioning_scale=0`; for an adapter on
a frozen decoder that is exactly the base pipeline), and, with `--base_model` (default: the bundled digits model for
the bundled digits-edges), the base model at its own recommended settings. The ceiling is the source images
themselves, and, as the best a sample can be through the tokenizer, their VQ reconstructions. Measured on each:

* edge F1: the Canny edges of the sample against the condition, with a tolerance of t pixels (an edge pixel counts
  as matched when the other map has an edge pixel within that Chebyshev distance); precision over the sample's edge
  pixels, recall over the condition's, F1 per image, averaged. For every t of `--tolerances` (0, 1, 2); the targets
  use the first, 0 by default: with slack, digits of the same class already share most edges (see the floor);
* edge IoU: |A and B| / |A or B| of the two edge maps, each dilated by the tolerance;
* pixel correlation: Pearson correlation of the 8x8 grey levels of the sample and of its source digit, averaged;
* class consistency: the independent SVC of `quality_digits.py` (trained on the real train split) against the class;
* FD ratio: Frechet distance of the samples to the held-out digits over that of the real train split to them;
* time: seconds for the whole set with and without control, at the same steps and batch.

Writes OUTPUT/quality_control_digits.json, a figure (conditions beside controlled samples and sources), and prints a
Markdown table with the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from PIL import Image
from quality_digits import classifier_accuracy, load_pipeline, train_classifier

from arpg_hf.control_conditions import canny_edges
from arpg_hf.digits import load_digits_split, pixels_from_images, render_digits
from arpg_hf.metrics import frechet_distance

TARGETS = {
    "edge_f1_vs_ceiling": 0.8,
    "edge_f1_vs_floor": 2.0,
    "class_consistency": 0.95,
    "fd_ratio": 2.0,
    "time_overhead": 0.15,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--model", default=None, help="ARPGControlPipeline folder (default: the bundled digits-edges).")
    parser.add_argument(
        "--base_model",
        default=None,
        help="ARPGPipeline folder for the base-model row (default: bundled, if --model is).",
    )
    parser.add_argument("--samples_per_image", type=int, default=2, help="Samples per held-out digit (359 digits).")
    parser.add_argument("--steps", type=int, default=None, help="Decoding steps (default: the model's recommended).")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the model's recommended.")
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (1: the model's own).")
    parser.add_argument(
        "--tolerances",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="Pixels of slack when matching edges (32x32 images); the targets use the first.",
    )
    parser.add_argument(
        "--unconditional_control", action="store_true", help="Keep the control in guidance's second half."
    )
    parser.add_argument(
        "--max_images", type=int, default=None, help="Use only the first N held-out digits (a quick look)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--output_dir", default="control-benchmark")
    parser.add_argument("--figure", default=None, help="Figure path (default: OUTPUT/control_digits.png).")
    args = parser.parse_args(argv)
    if args.samples_per_image < 1 or min(args.tolerances) < 0 or args.batch_size < 1:
        parser.error("--samples_per_image and --batch_size must be positive and --tolerances >= 0.")
    return args


# ------------------------------------------------------------------------------------------------ metrics


def dilate(edges: np.ndarray, radius: int) -> np.ndarray:
    """Boolean maps (n, H, W) grown by `radius` pixels (Chebyshev distance)."""
    if radius == 0:
        return edges.copy()
    padded = np.pad(edges, ((0, 0), (radius, radius), (radius, radius)))
    height, width = edges.shape[1:]
    grown = np.zeros_like(edges)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            grown |= padded[:, dy : dy + height, dx : dx + width]
    return grown


def edge_agreement(predicted: np.ndarray, target: np.ndarray, tolerance: int) -> dict:
    """Mean per-image precision, recall, F1 and IoU of edge maps (n, H, W) bool, with `tolerance` pixels of slack.
    An image whose maps are both empty counts as a perfect match; one empty map against a non-empty one as 0."""
    near_target, near_predicted = dilate(target, tolerance), dilate(predicted, tolerance)
    matched_predicted = (predicted & near_target).sum(axis=(1, 2))
    matched_target = (target & near_predicted).sum(axis=(1, 2))
    n_predicted, n_target = predicted.sum(axis=(1, 2)), target.sum(axis=(1, 2))
    precision = np.where(n_predicted > 0, matched_predicted / np.maximum(n_predicted, 1), n_target == 0)
    recall = np.where(n_target > 0, matched_target / np.maximum(n_target, 1), n_predicted == 0)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    union = (near_predicted | near_target).sum(axis=(1, 2))
    iou = np.where(union > 0, (near_predicted & near_target).sum(axis=(1, 2)) / np.maximum(union, 1), 1.0)
    return {
        "edge_precision": float(precision.mean()),
        "edge_recall": float(recall.mean()),
        "edge_f1": float(f1.mean()),
        "edge_iou": float(iou.mean()),
    }


def pixel_correlation(pixels: np.ndarray, sources: np.ndarray) -> float:
    """Mean Pearson correlation between the 8x8 grey levels of each sample and its source digit."""
    a = pixels.reshape(len(pixels), -1) - pixels.reshape(len(pixels), -1).mean(axis=1, keepdims=True)
    b = sources.reshape(len(sources), -1) - sources.reshape(len(sources), -1).mean(axis=1, keepdims=True)
    denominator = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.where(denominator > 0, (a * b).sum(axis=1) / np.maximum(denominator, 1e-12), 0.0)))


def edge_maps(images) -> np.ndarray:
    """(n, H, W) bool Canny edges of PIL images or an (n, H, W, 3) array in [0, 1]."""
    if isinstance(images, np.ndarray):
        images = [Image.fromarray(np.rint(image * 255).astype(np.uint8)) for image in images]
    return np.stack([np.asarray(canny_edges(image)) > 0 for image in images])


def measure(images, conditions, source_pixels, labels, classifier, test, fd_train_test, tolerances, seconds) -> dict:
    """The row of one set of images: edge agreement at the first tolerance (and `edges_by_tolerance`), pixel
    correlation with the sources, class consistency, FD ratio, seconds."""
    pixels = pixels_from_images(images)
    features = pixels.reshape(len(pixels), -1)
    fd = frechet_distance(features, test.flat_pixels())
    edges = edge_maps(images)
    by_tolerance = {str(t): edge_agreement(edges, conditions, t) for t in tolerances}
    return {
        **by_tolerance[str(tolerances[0])],
        "edges_by_tolerance": by_tolerance,
        "pixel_correlation": pixel_correlation(pixels, source_pixels),
        "class_consistency": classifier_accuracy(classifier, features, labels),
        "fd": fd,
        "fd_ratio": fd / fd_train_test,
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------------------------ generation


def load_control_pipeline(model: str | None):
    if model is None:
        from arpg_hf import load_bundled_pipeline

        pipeline = load_bundled_pipeline("digits-edges", dtype=torch.float32)
    else:
        from arpg_hf import ARPGControlPipeline

        pipeline = ARPGControlPipeline.from_pretrained(model, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline, labels, seeds, batch_size: int, controls=None, **call) -> tuple[np.ndarray, float]:
    """Images (n, H, W, 3) in [0, 1] and the wall time: `pipeline(labels, ...)` in batches, image i drawing from a
    generator seeded `seeds[i]`, with `controls[i]` as its `control_image` when given, and the arguments `call`."""
    images, start = [], time.perf_counter()
    for offset in range(0, len(labels), batch_size):
        rows = slice(offset, offset + batch_size)
        control = {} if controls is None else {"control_image": controls[rows]}
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[rows]]
        output = pipeline(labels[rows].tolist(), generator=generators, output_type="np", **control, **call)
        images.append(output.images)
    return np.concatenate(images), time.perf_counter() - start


@torch.no_grad()
def reconstructions(pipeline, sources: list[Image.Image]) -> np.ndarray:
    from arpg_hf.token_dataset import images_to_tensor

    vqvae = pipeline.vqvae
    decoded = vqvae.decode(vqvae.encode(images_to_tensor(sources).to(vqvae.dtype)).latents).sample.float()
    return pipeline.image_processor.postprocess(decoded.clamp(-1, 1), output_type="np")


def save_figure(conditions, controlled, unconditioned, sources, path: str, count: int = 10, gap: int = 6) -> None:
    """Four rows of `count` tiles (64x64, on a grey background with `gap` pixels between them): condition edges,
    controlled samples, the same pipeline's samples without control (same classes and seeds), the source digits."""
    rows = [conditions[:count].astype(np.float64), controlled[:count], unconditioned[:count], sources[:count]]
    tile = 64
    canvas = np.full((len(rows) * (tile + gap) + gap, count * (tile + gap) + gap, 3), 160, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            image = image if image.ndim == 3 else np.stack([image] * 3, axis=-1)
            pixels = np.asarray(
                Image.fromarray(np.rint(image * 255).astype(np.uint8)).resize((tile, tile), Image.NEAREST)
            )
            top, left = gap + r * (tile + gap), gap + c * (tile + gap)
            canvas[top : top + tile, left : left + tile] = pixels
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(canvas).save(path)


def main(args):
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    train, test = load_digits_split()
    classifier = train_classifier(train.flat_pixels(), train.labels)
    fd_train_test = frechet_distance(train.flat_pixels(), test.flat_pixels())
    held_out = test  # the FD reference: the whole held-out split
    if args.max_images is not None:
        test = type(test)(
            test.pixels[: args.max_images], test.labels[: args.max_images], test.indices[: args.max_images]
        )
    pipeline = load_control_pipeline(args.model)
    config = pipeline.scheduler.config
    steps = args.steps or config.get("recommended_num_inference_steps") or 16
    guidance = args.guidance_scale if args.guidance_scale is not None else config.get("recommended_guidance_scale", 4.0)

    source_images = render_digits(test.pixels)  # held-out digits, 32x32
    condition_images = [canny_edges(image) for image in source_images]
    repeat = args.samples_per_image
    labels = np.tile(test.labels, repeat)
    controls = condition_images * repeat
    conditions = np.tile(np.stack([np.asarray(c) > 0 for c in condition_images]), (repeat, 1, 1))
    source_pixels = np.tile(test.pixels, (repeat, 1, 1))
    seeds = np.array([args.seed + 1000 * j + i for j in range(repeat) for i in range(len(test))])
    common = dict(classifier=classifier, test=held_out, fd_train_test=fd_train_test, tolerances=args.tolerances)

    settings = dict(
        num_inference_steps=steps,
        guidance_scale=guidance,
        unconditional_control=args.unconditional_control,
        temperature=args.temperature,
    )
    generate(pipeline, labels[:8], seeds[:8], args.batch_size, controls[:8], **settings)  # warm-up
    controlled, controlled_seconds = generate(pipeline, labels, seeds, args.batch_size, controls, **settings)
    unconditioned, base_seconds = generate(
        pipeline, labels, seeds, args.batch_size, controls, controlnet_conditioning_scale=0.0, **settings
    )
    sources = np.stack([np.asarray(image, dtype=np.float64) / 255.0 for image in source_images])  # (n, 32, 32, 3)
    base_rows = {}
    if args.base_model is not None or args.model is None:
        base = load_pipeline(args.base_model)  # quality_digits' loader: the bundled digits model by default
        base_images, seconds = generate(base, labels, seeds, args.batch_size)  # its own recommended settings
        base_rows["base model, its own settings (floor)"] = measure(
            base_images, conditions, source_pixels, labels, seconds=seconds, **common
        )
    rows = {
        "controlled": measure(controlled, conditions, source_pixels, labels, seconds=controlled_seconds, **common),
        "unconditioned (floor)": measure(
            unconditioned, conditions, source_pixels, labels, seconds=base_seconds, **common
        ),
        **base_rows,
        "source images (ceiling)": measure(
            np.tile(sources, (repeat, 1, 1, 1)), conditions, source_pixels, labels, seconds=float("nan"), **common
        ),
        "VQ reconstructions of the sources": measure(
            np.tile(reconstructions(pipeline, source_images), (repeat, 1, 1, 1)),
            conditions,
            source_pixels,
            labels,
            seconds=float("nan"),
            **common,
        ),
    }
    controlled_row, floor, ceiling = rows["controlled"], rows["unconditioned (floor)"], rows["source images (ceiling)"]
    tokenizer_ceiling = rows["VQ reconstructions of the sources"]
    overhead = controlled_seconds / base_seconds - 1
    f1, ratio = controlled_row["edge_f1"], TARGETS["edge_f1_vs_ceiling"]
    targets = {
        "edge F1 >= 0.8 x ceiling (source images)": f1 >= ratio * ceiling["edge_f1"],
        "edge F1 >= 0.8 x ceiling (their VQ reconstructions)": f1 >= ratio * tokenizer_ceiling["edge_f1"],
        "edge F1 >= 2 x floor": f1 >= TARGETS["edge_f1_vs_floor"] * floor["edge_f1"],
        "edge IoU >= 0.8 x ceiling (source images)": controlled_row["edge_iou"] >= ratio * ceiling["edge_iou"],
        "edge IoU >= 0.8 x ceiling (their VQ reconstructions)": controlled_row["edge_iou"]
        >= ratio * tokenizer_ceiling["edge_iou"],
        "edge IoU >= 2 x floor": controlled_row["edge_iou"] >= TARGETS["edge_f1_vs_floor"] * floor["edge_iou"],
        **{
            f"edge {name} >= 2 x base-model floor": controlled_row[key] >= TARGETS["edge_f1_vs_floor"] * row[key]
            for row in base_rows.values()
            for name, key in (("F1", "edge_f1"), ("IoU", "edge_iou"))
        },
        "class consistency >= 95 %": controlled_row["class_consistency"] >= TARGETS["class_consistency"],
        "FD ratio <= 2": controlled_row["fd_ratio"] <= TARGETS["fd_ratio"],
        "control adds <= 15 % time": overhead <= TARGETS["time_overhead"],
    }
    figure = args.figure or os.path.join(args.output_dir, "control_digits.png")
    save_figure(conditions, controlled, unconditioned, sources, figure)
    result = {
        "model": args.model or "bundled digits-edges",
        "num_samples": int(len(labels)),
        "steps": steps,
        "guidance_scale": guidance,
        "unconditional_control": args.unconditional_control,
        "temperature": args.temperature,
        "tolerances_px": args.tolerances,
        "rows": rows,
        "time_overhead": overhead,
        "targets": targets,
        "figure": figure,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "wall_time_s": time.perf_counter() - start,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "quality_control_digits.json"), "w", encoding="utf-8") as file:
        json.dump(result, file, indent=2)
    print(f"{len(labels)} samples, {steps} steps, guidance {guidance:g}")
    slack = " | ".join(f"edge F1 / IoU, {t} px" for t in args.tolerances)
    print(f"| images | {slack} | pixel correlation | class consistency | FD ratio | seconds |")
    print("| --- |" + " ---: |" * (len(args.tolerances) + 4))
    for name, row in rows.items():
        edges = " | ".join(
            f"{row['edges_by_tolerance'][str(t)]['edge_f1']:.3f} / {row['edges_by_tolerance'][str(t)]['edge_iou']:.3f}"
            for t in args.tolerances
        )
        print(
            f"| {name} | {edges} | {row['pixel_correlation']:.3f} | "
            f"{100 * row['class_consistency']:.1f} % | {row['fd_ratio']:.2f} | {row['seconds']:.1f} |"
        )
    print(f"control adds {100 * overhead:.1f} % to sampling time")
    print(json.dumps(targets, indent=2))


if __name__ == "__main__":
    main(parse_args())
