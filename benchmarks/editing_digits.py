#!/usr/bin/env python
"""Zero-shot editing quality on the bundled digits model: inpainting real held-out digits.

    python benchmarks/editing_digits.py --output_dir digits-editing

Every real test digit (never trained on) is rendered to pixels, its bottom half is masked (white = regenerate) and
regenerated with ARPGInpaintPipeline twice:
* with its TRUE class: the independent classifier of benchmarks/quality_digits.py (an SVC trained on the real train
  split only) should still recognise the true digit (target >= 90 %);
* with ANOTHER class (drawn per image, seeded): the classifier should follow the new class (target >= 60 %).
The kept top half is checked to come back token for token. Writes OUTPUT/editing_digits.json and a PNG strip
(source, masked, true-class, other-class) and prints a Markdown table.

Three references put the other-class rate in perspective; all paste REAL bottom halves (train split, new class) under
each kept top half and ask the same classifier:
* real continuation: the bottom half of the new-class training digit whose top half is nearest to the kept one
  (what a faithful model of real digits would tend to draw); averaged over the 10 nearest as well (a faithful
  model's draws vary as these do);
* best real bottom: whether ANY new-class training digit's bottom half makes the classifier follow (an upper bound
  for edits that keep the top half).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from PIL import Image

# A script's own folder is first on the import path, so its sibling benchmark imports as a top-level module.
from quality_digits import classifier_accuracy, load_pipeline, train_classifier

from arpg_hf import ARPGInpaintPipeline
from arpg_hf.digits import GRID_SIZE, NUM_CLASSES, load_digits_split, pixels_from_images, render_digits

TARGETS = {"true_class_accuracy": 0.90, "other_class_follow_rate": 0.60}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the bundled digits pipeline)")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="default: the recommended steps")
    parser.add_argument("--guidance_scale", type=float, default=None, help="default: the recommended scale")
    parser.add_argument(
        "--other_guidance_scale",
        type=float,
        default=None,
        help="guidance of the other-class edit (default: --guidance_scale)",
    )
    parser.add_argument(
        "--negative_original_class",
        action="store_true",
        help="other-class edit: guide away from the digit's own class (negative_class_labels) instead "
        "of the null class",
    )
    parser.add_argument(
        "--guidance_schedule",
        choices=("constant", "linear"),
        default=None,
        help="override the scheduler's guidance schedule",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of both edits")
    parser.add_argument("--top_k", type=int, default=None, help="top-k filter of both edits")
    parser.add_argument("--masked_rows", type=float, default=0.5, help="fraction of the image height masked (bottom)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=120)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N test digits")
    parser.add_argument("--output_dir", default="digits-editing")
    parser.add_argument("--strip_count", type=int, default=10, help="digits shown in the PNG strip")
    return parser.parse_args(argv)


def bottom_mask(height: int, width: int, fraction: float) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[int(round(height * (1 - fraction))) :] = 255
    return Image.fromarray(mask, mode="L")


def inpaint(pipe, images, mask, labels, grid_size, args, guidance_scale, negative_labels=None):
    """Token ids (n, L) and images (n, H, W, 3) in [0, 1]; image i uses a generator seeded seed + i."""
    tokens = []
    for start in range(0, len(images), args.batch_size):
        batch = images[start : start + args.batch_size]
        generators = [torch.Generator().manual_seed(args.seed + start + i) for i in range(len(batch))]
        tokens.append(
            pipe(
                batch,
                mask,
                labels[start : start + len(batch)].tolist(),
                num_inference_steps=args.num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                temperature=args.temperature,
                top_k=args.top_k,
                output_type="latent",
                negative_class_labels=None
                if negative_labels is None
                else negative_labels[start : start + len(batch)].tolist(),
            ).images
        )
    tokens = torch.cat(tokens)
    with torch.no_grad():
        decoded = pipe.decode_tokens(tokens, grid_size).float()  # (n, 3, H, W) in [-1, 1]
    return tokens, pipe.image_processor.postprocess(decoded, output_type="np")


def real_bottom_references(classifier, train, test_pixels, other_labels, kept_rows: int, k: int = 10) -> dict:
    """Follow rates of the new class when real new-class bottom halves are pasted under the kept top halves."""
    nearest_hits = k_nearest_hits = any_hits = 0
    for pixels, label in zip(test_pixels, other_labels):  # (8, 8) grey levels each
        candidates = train.pixels[train.labels == label]  # (n_c, 8, 8)
        composites = np.repeat(pixels[None], len(candidates), axis=0)
        composites[:, kept_rows:] = candidates[:, kept_rows:]
        follows = classifier.predict(composites.reshape(len(candidates), -1) / 16.0) == label
        distances = ((candidates[:, :kept_rows] - pixels[:kept_rows]) ** 2).sum(axis=(1, 2))
        by_distance = np.argsort(distances, kind="stable")
        nearest_hits += bool(follows[by_distance[0]])
        k_nearest_hits += follows[by_distance[:k]].mean()
        any_hits += bool(follows.any())
    count = len(other_labels)
    return {
        "real_continuation_follow_rate": nearest_hits / count,
        f"real_continuation_{k}_nearest_follow_rate": float(k_nearest_hits / count),
        "best_real_bottom_follow_rate": any_hits / count,
    }


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train, test = load_digits_split()
    classifier = train_classifier(train.flat_pixels(), train.labels)
    pipe = ARPGInpaintPipeline(**load_pipeline(args.model).components)
    pipe.set_progress_bar_config(disable=True)
    if args.guidance_schedule:
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, guidance_schedule=args.guidance_schedule
        )
    count = len(test) if args.limit is None else min(args.limit, len(test))
    images = render_digits(test.pixels[:count])
    true_labels = test.labels[:count]
    rng = np.random.default_rng(args.seed)
    other_labels = (true_labels + rng.integers(1, NUM_CLASSES, size=count)) % NUM_CLASSES
    height, width = images[0].size[1], images[0].size[0]
    mask = bottom_mask(height, width, args.masked_rows)

    factor = pipe.vqvae.downsample_factor
    with torch.no_grad():
        encoded = pipe.encode_image(pipe.preprocess_image(images)).cpu()  # (n, L)
    rows_kept = int(round(height * (1 - args.masked_rows))) // factor  # token rows fully above the mask
    kept = slice(0, rows_kept * (width // factor))

    results = {}
    strips = {}
    guidance = args.guidance_scale or pipe.scheduler.config.get("recommended_guidance_scale")
    other_guidance = args.other_guidance_scale or guidance
    other_negative = true_labels if args.negative_original_class else None
    for name, labels, scale, negative in (
        ("true", true_labels, guidance, None),
        ("other", other_labels, other_guidance, other_negative),
    ):
        start = time.perf_counter()
        tokens, generated = inpaint(
            pipe, images, mask, labels, (height // factor, width // factor), args, scale, negative
        )
        seconds = time.perf_counter() - start
        predictions = classifier.predict(pixels_from_images(generated).reshape(count, -1) / 16.0)
        results[name] = dict(
            accuracy=float((predictions == labels).mean()),
            still_original_share=float((predictions == true_labels).mean()),
            kept_tokens_identical=bool(torch.equal(tokens[:, kept].cpu(), encoded[:, kept])),
            images_per_second=count / seconds,
        )
        strips[name] = generated[: args.strip_count]
    real_accuracy = classifier_accuracy(classifier, test.flat_pixels()[:count], true_labels)
    references = real_bottom_references(
        classifier, train, test.pixels[:count], other_labels, int(round(GRID_SIZE * (1 - args.masked_rows)))
    )
    report = dict(
        num_test_digits=count,
        masked_fraction=args.masked_rows,
        num_inference_steps=args.num_inference_steps or pipe.scheduler.config.get("recommended_num_inference_steps"),
        guidance_scale=guidance,
        other_class_guidance_scale=other_guidance,
        other_class_negative=("original class" if args.negative_original_class else "null class"),
        guidance_schedule=pipe.scheduler.config.guidance_schedule,
        classifier_accuracy_real_test=real_accuracy,
        true_class_accuracy=results["true"]["accuracy"],
        other_class_follow_rate=results["other"]["accuracy"],
        other_class_still_original=results["other"]["still_original_share"],
        **references,
        temperature=args.temperature,
        top_k=args.top_k,
        kept_tokens_identical=results["true"]["kept_tokens_identical"] and results["other"]["kept_tokens_identical"],
        images_per_second=results["true"]["images_per_second"],
        targets=TARGETS,
        wall_time_s=time.perf_counter() - started,
        threads=args.threads,
    )
    report["targets_met"] = {key: report[key] >= value for key, value in TARGETS.items()}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "editing_digits.json"), "w", encoding="utf-8") as file:
        json.dump(report, file, indent=2)
    save_strip(images[: args.strip_count], mask, strips, os.path.join(args.output_dir, "editing_digits.png"))
    print(
        "| test digits | masked | steps | guidance (true / other class) | true class kept | other class followed "
        "| kept tokens exact |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {count} | bottom {args.masked_rows:.0%} | {report['num_inference_steps']} "
        f"| {report['guidance_scale']} / {other_guidance} {report['guidance_schedule']} "
        f"| {report['true_class_accuracy']:.1%} | {report['other_class_follow_rate']:.1%} "
        f"| {report['kept_tokens_identical']} |"
    )
    print(
        f"classifier on real test digits: {real_accuracy:.1%}; new class followed with real bottom halves: "
        f"{references['real_continuation_follow_rate']:.1%} (nearest top half), "
        f"{references['real_continuation_10_nearest_follow_rate']:.1%} (10 nearest), "
        f"{references['best_real_bottom_follow_rate']:.1%} (best of all); wall time {report['wall_time_s']:.0f} s"
    )
    return report


def save_strip(sources, mask, strips, path):
    """Rows: source, masked source, regenerated with the true class, regenerated with another class."""
    masked = [Image.composite(Image.new("RGB", image.size, (255, 128, 128)), image, mask) for image in sources]
    rows = [sources, masked] + [
        [Image.fromarray((a * 255).round().astype(np.uint8)) for a in strips[k]] for k in ("true", "other")
    ]
    width, height = sources[0].size
    canvas = Image.new("RGB", (width * len(sources), height * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas.paste(image, (c * width, r * height))
    canvas.save(path)


if __name__ == "__main__":
    main()
