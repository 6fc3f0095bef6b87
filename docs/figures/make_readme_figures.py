"""Makes the two pictures at the top of the README with the bundled digits model (offline, a few seconds on a CPU).

    python docs/figures/make_readme_figures.py --output-dir docs/images

Writes, at the model's recommended settings (16 steps, linear guidance 2):

* digits_by_class.png: one row per digit 0-9, `--columns` samples each. Image i (i = class * columns + j) uses a
  generator seeded `--seed + i`, as `arpg-hf generate --class-labels 0 1 ... 9 --num-images-per-class COLUMNS` seeds
  it, so each cell is that command's image i, here scaled up and padded so that neighbours do not touch.
* decoding_steps.png: the canvas of three samples (`--decoding-classes`) after several decoding steps, read from the
  pipeline's `callback_on_step_end`: grey where no token is decoded yet, orange tint on the tokens of that step; the
  last row is the finished image. Every sample has its own random order, and each step decodes several tokens.

Both pictures use only the public API: `load_bundled_pipeline`, the pipeline call and `pipe.decode_tokens`, laid out
by the CLI's `image_grid`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from arpg_hf import load_bundled_pipeline
from arpg_hf.cli import image_grid  # the grid of `arpg-hf generate --grid`

BACKGROUND = (214, 214, 214)  # the padding between images
NOT_DECODED = np.array([150, 150, 150], dtype=np.float32)
NEW_TOKENS = np.array([255, 120, 0], dtype=np.float32)
TEXT = (40, 40, 40)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="docs/images", help="where the two PNGs go")
    parser.add_argument("--columns", type=int, default=8, help="samples per digit in digits_by_class.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decoding-classes", type=int, nargs="+", default=[2, 5, 8], metavar="DIGIT")
    parser.add_argument(
        "--decoding-steps",
        type=int,
        nargs="+",
        default=[1, 2, 3, 4, 6, 8, 10, 12, 14, 16],
        metavar="STEP",
        help="1-based steps after which the canvas is shown (the last one should be the last step)",
    )
    parser.add_argument("--scale", type=int, default=2, help="integer upscale of every 32x32 image")
    parser.add_argument("--gap", type=int, default=6, help="pixels between images")
    return parser.parse_args(argv)


def upscale(pixels: np.ndarray, scale: int) -> Image.Image:
    """(H, W, 3) floats in [0, 255] -> a PIL image `scale` times larger, nearest neighbour (crisp pixels)."""
    image = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)


def digits_by_class(pipe, args) -> Image.Image:
    labels = [digit for digit in range(10) for _ in range(args.columns)]
    generators = [torch.Generator().manual_seed(args.seed + index) for index in range(len(labels))]
    images = pipe(labels, generator=generators).images  # the recommended steps and guidance
    images = [image.resize((image.width * args.scale, image.height * args.scale), Image.NEAREST) for image in images]
    return image_grid(images, args.columns, args.gap, BACKGROUND)  # one row per digit


@torch.no_grad()
def canvas_after_step(pipe, tokens: torch.LongTensor, previous: torch.LongTensor, scale: int, tint: bool):
    """One sample's canvas: decoded tokens as pixels, the others grey, this step's new tokens tinted orange."""
    config, factor = pipe.transformer.config, pipe.vqvae.downsample_factor
    decoded = pipe.decode_tokens(tokens.clamp_min(0)[None])[0]  # (3, H, W) in [-1, 1]; unknown cells drawn as code 0
    pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()  # (H, W, 3)
    cells = (tokens >= 0).view(config.grid_height, config.grid_width).numpy()
    new = cells & (previous < 0).view(config.grid_height, config.grid_width).numpy()
    to_pixels = lambda grid: grid.repeat(factor, axis=0).repeat(factor, axis=1)  # noqa: E731 (token -> pixel mask)
    pixels[~to_pixels(cells)] = NOT_DECODED
    if tint:
        pixels[to_pixels(new)] = 0.55 * pixels[to_pixels(new)] + 0.45 * NEW_TOKENS
    return upscale(pixels, scale)


def decoding_steps(pipe, args) -> Image.Image:
    snapshots = []  # the (B, L) token ids after every step, -1 where not decoded yet

    def keep_tokens(pipeline, step_index, timestep, callback_kwargs):
        snapshots.append(callback_kwargs["tokens"].clone())
        return {}

    labels = args.decoding_classes
    generators = [torch.Generator().manual_seed(args.seed + index) for index in range(len(labels))]
    pipe(labels, generator=generators, callback_on_step_end=keep_tokens)  # one random order per sample
    last = len(snapshots)
    if max(args.decoding_steps) > last or min(args.decoding_steps) < 1:
        raise ValueError(f"--decoding-steps must lie in 1..{last}, the number of decoding steps.")
    rows, captions, num_tokens = [], [], snapshots[0].shape[1]
    for step in args.decoding_steps:
        tokens = snapshots[step - 1]
        previous = snapshots[step - 2] if step > 1 else torch.full_like(tokens, -1)
        row = [
            canvas_after_step(pipe, tokens[b], previous[b], args.scale, tint=step < last) for b in range(len(labels))
        ]
        rows.append(row)
        new = int((previous[0] < 0).sum() - (tokens[0] < 0).sum())
        done = int((tokens[0] >= 0).sum())
        captions.append(f"step {step}: +{new}, {done}/{num_tokens}" if step < last else f"step {step}: done")
    font = ImageFont.load_default(size=14)
    left = 8 + max(int(font.getlength(caption)) for caption in captions)
    sheet = image_grid([image for row in rows for image in row], len(labels), args.gap, BACKGROUND, left=left)
    draw = ImageDraw.Draw(sheet)
    size = rows[0][0].height
    for r, caption in enumerate(captions):
        draw.text((6, args.gap + r * (size + args.gap) + size // 2), caption, fill=TEXT, font=font, anchor="lm")
    return sheet


def main(args) -> list[Path]:
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    pipe = load_bundled_pipeline("digits")
    pipe.set_progress_bar_config(disable=True)
    paths = [output / "digits_by_class.png", output / "decoding_steps.png"]
    digits_by_class(pipe, args).save(paths[0])
    decoding_steps(pipe, args).save(paths[1])
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main(parse_args())
