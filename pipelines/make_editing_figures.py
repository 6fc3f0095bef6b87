"""Makes the pictures of docs/editing.md from a pipeline folder (the bundled model, or any other).

    python pipelines/make_editing_figures.py --model path/to/pipeline --class-a 3 --class-b 8 --output-dir figures

Writes source.png (a generated image), mask.png, inpaint.png (the masked box regenerated with the same class),
edit.png (the same box with another class), outpaint.png (the canvas widened to four times its width),
expand.png (resolution expansion x2), wide_extrapolate.png / wide_interpolate.png (generation on a canvas twice the
trained width, both position modes), editing.png (source, mask, inpaint, edit, expand side by side) and
larger_canvas.png (the two wide images), as captioned in docs/editing.md.
"""

import argparse
from pathlib import Path

import torch
from PIL import Image

from arpg_hf import ARPGInpaintPipeline, ARPGPipeline, expand_resolution, make_outpaint_canvas


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="pipeline folder or Hub id")
    parser.add_argument("--class-a", type=int, default=0, help="class of the source image")
    parser.add_argument("--class-b", type=int, default=1, help="class for the class-conditional edit")
    parser.add_argument("--num-inference-steps", type=int, default=32)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="figures")
    return parser.parse_args(argv)


def center_box_mask(rows: int, cols: int, factor: int) -> Image.Image:
    """White over the central half of a rows x cols token canvas (token-aligned), black elsewhere."""
    top, left = rows // 4 * factor, cols // 4 * factor
    bottom, right = (rows - rows // 4) * factor, (cols - cols // 4) * factor
    mask = Image.new("L", (cols * factor, rows * factor), 0)
    mask.paste(255, (left, top, right, bottom))
    return mask


def side_by_side(images: list[Image.Image], gap: int = 4) -> Image.Image:
    height = max(image.height for image in images)
    strip = Image.new("RGB", (sum(image.width for image in images) + gap * (len(images) - 1), height), "white")
    x = 0
    for image in images:
        strip.paste(image.convert("RGB"), (x, 0))
        x += image.width + gap
    return strip


def main(args):
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    pipe = ARPGInpaintPipeline.from_pretrained(args.model)
    generate = ARPGPipeline(**pipe.components)
    factor = pipe.vqvae.downsample_factor
    rows, cols = pipe.transformer.config.grid_height, pipe.transformer.config.grid_width  # the trained grid
    common = dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)

    def seeded():
        return torch.Generator().manual_seed(args.seed)

    source = generate([args.class_a], generator=seeded(), **common).images[0]
    mask = center_box_mask(rows, cols, factor)
    inpaint = pipe(source, mask, [args.class_a], generator=seeded(), paste_back=True, **common).images[0]
    edit = pipe(source, mask, [args.class_b], generator=seeded(), paste_back=True, **common).images[0]
    side = 3 * cols // 2 * factor  # 1.5 times the width on each side: four times as wide in all
    canvas = make_outpaint_canvas(source, left=side, right=side)
    outpaint = pipe(
        canvas.image, canvas.mask_image, [args.class_a], generator=seeded(), paste_back=True, **common
    ).images[0]
    expand = expand_resolution(pipe, source, [args.class_a], scale=2, generator=seeded(), **common).images[0]
    wide = {
        mode: generate(
            [args.class_a], width=2 * cols * factor, position_mode=mode, generator=seeded(), **common
        ).images[0]
        for mode in ("extrapolate", "interpolate")
    }
    named = dict(
        source=source,
        mask=mask,
        inpaint=inpaint,
        edit=edit,
        outpaint=outpaint,
        expand=expand,
        wide_extrapolate=wide["extrapolate"],
        wide_interpolate=wide["interpolate"],
    )
    for name, image in named.items():
        image.save(output / f"{name}.png")
    side_by_side([source, mask, inpaint, edit, expand]).save(output / "editing.png")
    side_by_side([wide["extrapolate"], wide["interpolate"]]).save(output / "larger_canvas.png")
    print(f"wrote {', '.join(sorted(named))}, editing and larger_canvas to {output}/")


if __name__ == "__main__":
    main(parse_args())
