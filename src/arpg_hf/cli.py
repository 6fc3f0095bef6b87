"""The `arpg-hf` command line: `generate` images, `inpaint` / outpaint them, `convert` upstream checkpoints, show `info`
on a pipeline folder.

Errors a user can fix (bad paths, corrupt or unsafe checkpoints, wrong configurations, bad arguments) are printed as
one message and exit with status 1, without a traceback; set ARPG_HF_TRACEBACK=1 to see it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time
from typing import Callable, Sequence

from .pipeline_loading import DTYPE_NAMES, default_device, load_pipeline, read_pipeline  # noqa: F401
from .user_errors import USER_ERRORS, run_guarded  # noqa: F401

CPU_GEMMS = ("auto", "default", "blas", "onednn", "onednn-packed")  # cpu_gemm.CPU_GEMMS (kept import-free for --help)
QUANTIZATIONS = ("none", "int8", "int8-weight-only", "int4-weight-only")  # quantization.QUANTIZATIONS (the same)


# ------------------------------------------------------------------------------------------------ generate
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.split(",")[0].strip().lower()).strip("_")[:40] or "class"


def resolve_class_labels(pipeline, class_labels: Sequence[int], class_names: Sequence[str]) -> list[int]:
    """The class ids of `--class-labels` then `--class-names`; errors name the flag and the model's classes."""
    from .labels import MAX_LISTED_NAMES, build_label2id, valid_names_hint

    labels = list(class_labels or [])
    label2id = build_label2id(pipeline.id2label)
    for name in class_names or []:
        if name not in label2id:
            hint = valid_names_hint(name, label2id)
            if len(label2id) > MAX_LISTED_NAMES:  # too many to list: say where to read them all
                hint += " `arpg-hf info MODEL --classes` lists them."
            raise ValueError(f"--class-names {name!r} is not a class of this model. {hint}")
        labels.append(label2id[name])
    if not labels:
        raise ValueError(f"Pass at least one class with --class-labels or --class-names. {class_examples(pipeline)}")
    _check_class_range(pipeline, labels, "--class-labels")
    return labels


def class_examples(pipeline) -> str:
    """A line on the classes of the model in use, for messages: all of them when few, else two examples."""
    from .labels import MAX_LISTED_NAMES

    id2label = pipeline.id2label
    if len(id2label) <= MAX_LISTED_NAMES:
        return "This model's classes (id: name): " + ", ".join(f"{i}: {id2label[i]}" for i in sorted(id2label)) + "."
    first, second = sorted(id2label)[len(id2label) // 4], sorted(id2label)[len(id2label) // 2]
    name = id2label[second].split(",")[0].strip()
    return (
        f"This model has {len(id2label)} classes, e.g. --class-labels {first} {second} or --class-names {name!r}; "
        "`arpg-hf info MODEL --classes` lists them."
    )


def _check_class_range(pipeline, labels: Sequence[int], what: str) -> None:
    num_classes = pipeline.transformer.config.num_classes
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise ValueError(f"{what} must lie in [0, {num_classes}) for this model, got {bad}.")


def resolve_negative_class_labels(pipeline, args: argparse.Namespace, num_labels: int) -> list[int] | None:
    """`--negative-class-labels`: none, one for every class, or one per class given (before the repeats)."""
    negatives = list(args.negative_class_labels or [])
    if not negatives:
        return None
    if len(negatives) not in (1, num_labels):
        raise ValueError(
            f"Got {len(negatives)} --negative-class-labels for {num_labels} classes; pass one for all or one per class."
        )
    _check_class_range(pipeline, negatives, "--negative-class-labels")
    return negatives * num_labels if len(negatives) == 1 else negatives


def prepare_pipeline(args: argparse.Namespace, pipeline_class=None):
    """The pipeline of `--model` (as `pipeline_class` when given) on `--device` / `--dtype`, with the schedule
    overrides and progress bar settings."""
    device = args.device or default_device()
    controlnet = getattr(args, "controlnet", None)
    with quiet_loading():
        pipeline = load_pipeline(args.model, device, args.dtype, args.model_cpu_offload, pipeline_class, controlnet)
    pipeline.set_progress_bar_config(disable=args.quiet)
    if args.token_schedule or args.guidance_schedule:
        from .scheduling_arpg import ARPGScheduler

        overrides = {
            k: v
            for k, v in (("token_schedule", args.token_schedule), ("guidance_schedule", args.guidance_schedule))
            if v
        }
        pipeline.scheduler = ARPGScheduler.from_config(pipeline.scheduler.config, **overrides)
    if args.quantization != "none":
        pipeline.transformer.quantize(args.quantization)
    if args.cpu_gemm:
        from .cpu_gemm import use_cpu_gemm

        use_cpu_gemm(pipeline.transformer, args.cpu_gemm)
    return pipeline


@contextlib.contextmanager
def quiet_loading():
    """Loads without diffusers' and transformers' progress bars and warnings: a command prints its own messages (and,
    on an error, nothing but the message). Sampling keeps its progress bar unless --quiet. torchao's import-time
    warnings (a CPU machine lacks its CUDA kernels), which transformers triggers where torchao is installed, are
    silenced too."""
    import logging

    noisy = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in noisy]
    for logger in noisy:
        logger.setLevel(logging.ERROR)
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    saved = [
        (module, module.get_verbosity(), module.is_progress_bar_enabled())
        for module in (diffusers_logging, transformers_logging)
    ]
    for module, _, _ in saved:
        module.set_verbosity_error()
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, verbosity, progress_bar in saved:
            module.set_verbosity(verbosity)
            if progress_bar:
                module.enable_progress_bar()
        for logger, level in zip(noisy, levels):
            logger.setLevel(level)


def check_output_dir(output_dir: str) -> None:
    """`--output-dir` must be a folder path (existing or not), not a file."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output-dir {output_dir!r} is an existing file; pass a folder path (it is created).")


def check_job_size(
    pipeline, args: argparse.Namespace, num_images: int, image_size: tuple[int, int], editing: bool = False
) -> None:
    """Refuses, before any work, a job whose batches of `--batch-size` images cannot fit in memory (the pipeline's
    estimate), whose PNGs cannot fit on the disk of `--output-dir` (counted uncompressed, the most a PNG takes) or
    whose `--grid` cannot fit in memory."""
    from .memory import check_memory, format_bytes

    height, width = image_size
    factor = pipeline.vqvae.downsample_factor
    grid_size = (height // factor, width // factor)
    steps, _ = pipeline.default_sampling_settings(args.num_inference_steps, None, grid_size[0] * grid_size[1])
    pipeline.check_memory(args.batch_size, grid_size, steps, encode=editing, advice="Lower --batch-size")
    image_bytes = height * width * 3
    existing = os.path.abspath(args.output_dir)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if num_images * image_bytes > free:
        raise ValueError(
            f"{num_images} images of {height}x{width} px can take up to {format_bytes(num_images * image_bytes)}, "
            f"more than the {format_bytes(free)} free on the disk of --output-dir; ask for fewer images "
            "(--num-images-per-class, classes) or write elsewhere."
        )
    if args.grid:
        check_memory(
            2 * num_images * image_bytes,
            f"A --grid of {num_images} images",
            "Drop --grid or ask for fewer images",
            device="cpu",
        )


def write_images(
    pipeline, args: argparse.Namespace, make_images: Callable, image_size: tuple[int, int], editing: bool = False
) -> list[str]:
    """Runs `make_images(labels, generators, negative_labels)` over the requested classes in batches and writes one
    PNG per (class, repeat), plus grid.png with `--grid`; returns the written paths.

    Nothing is created before the first batch has been generated (the pipeline checks its arguments and memory
    first); every PNG appears complete under its name or not at all (`arpg_hf.atomic_io`); labels and seeds are
    computed per batch, so the job size costs no memory."""
    import torch

    from .atomic_io import remove_stale_staging, write_atomically

    classes = resolve_class_labels(pipeline, args.class_labels, args.class_names)
    negatives = resolve_negative_class_labels(pipeline, args, len(classes))
    repeats = args.num_images_per_class
    num_images = len(classes) * repeats
    check_job_size(pipeline, args, num_images, image_size, editing)
    names = pipeline.id2label
    num_batches = -(-num_images // args.batch_size)
    if num_batches > 1:
        print(f"arpg-hf: {num_images} images in {num_batches} batches of up to {args.batch_size}.", file=sys.stderr)
    grid_images, paths = [], []
    started = time.perf_counter()
    for start in range(0, num_images, args.batch_size):
        indices = range(start, min(start + args.batch_size, num_images))
        batch = [classes[index // repeats] for index in indices]
        # One CPU generator per image, seeded seed + image index: an image does not depend on the batch it is in,
        # and `pipe(labels, generator=[torch.Generator().manual_seed(seed + i) ...])` reproduces it in Python.
        generators = [torch.Generator().manual_seed(args.seed + index) for index in indices]
        batch_negatives = None if negatives is None else [negatives[index // repeats] for index in indices]
        images = make_images(batch, generators, batch_negatives)
        if start == 0:
            os.makedirs(args.output_dir, exist_ok=True)
        for index, label, image in zip(indices, batch, images):
            path = os.path.join(args.output_dir, f"{index:03d}_{label}_{_slug(names.get(label, str(label)))}.png")
            remove_stale_staging(path)
            write_atomically(path, lambda temporary: image.save(temporary, format="PNG"))
            grid_images += [image] if args.grid else []
            paths.append(path)
            print(path)
        if start == 0 and num_batches > 1:
            first = time.perf_counter() - started
            print(
                f"arpg-hf: the first batch took {format_duration(first)}; about {format_duration(first * (num_batches - 1))}"
                " for the rest.",
                file=sys.stderr,
            )
    if args.grid:
        grid = image_grid(grid_images, args.grid_columns or repeats)
        path = os.path.join(args.output_dir, "grid.png")
        write_atomically(path, lambda temporary: grid.save(temporary, format="PNG"))
        paths.append(path)
        print(path)
    return paths


def image_grid(images: list, columns: int, gap: int | None = None, background="white", left: int = 0):
    """The images in rows of `columns` (the last row padded with blanks), `gap` pixels apart and around (default: 1/32
    of an image's width, at least 4) on `background`, with `left` more pixels on the left (for captions). With
    `columns` = images per class, each row holds one class."""
    from PIL import Image

    width, height = images[0].size
    gap = max(4, width // 32) if gap is None else gap
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    size = (left + columns * width + (columns + 1) * gap, rows * height + (rows + 1) * gap)
    grid = Image.new("RGB", size, background)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid.paste(image.convert("RGB"), (left + gap + column * (width + gap), gap + row * (height + gap)))
    return grid


def format_duration(seconds: float) -> str:
    """A rough duration for people: 0.4 s, 12 s, 3 min 20 s, 2 h 5 min."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if minutes < 10 and seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The pipeline-call arguments that `generate` and `inpaint` share (None: the folder's recommended settings)."""
    return dict(
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )


def run_generate(args: argparse.Namespace) -> list[str]:
    """Generates one PNG per (class, repeat) and optionally a grid; returns the written paths. With
    `--control-image`, every image follows that condition map (an ARPGControlPipeline)."""
    control = {}
    if args.control_image is not None:
        from .pipeline_arpg_control import ARPGControlPipeline

        control = dict(
            control_image=_open_image(args.control_image, "--control-image"),  # before loading the model
            controlnet_conditioning_scale=args.controlnet_conditioning_scale,
        )
        pipeline = prepare_pipeline(args, ARPGControlPipeline)
    else:
        if args.controlnet is not None:
            raise ValueError("--controlnet needs --control-image (the condition map to follow).")
        pipeline = prepare_pipeline(args)

    def make_images(labels, generators, negatives):
        return pipeline(
            labels, generator=generators, negative_class_labels=negatives, **control, **sampling_kwargs(args)
        ).images

    config, factor = pipeline.transformer.config, pipeline.vqvae.downsample_factor
    return write_images(pipeline, args, make_images, (config.grid_height * factor, config.grid_width * factor))


# ------------------------------------------------------------------------------------------------- inpaint
def _open_image(path: str, option: str):
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{option} {path!r} is not a file; pass a PNG or JPEG image.")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except UnidentifiedImageError:
        raise ValueError(f"{option} {path!r} is not an image PIL can read; pass a PNG or JPEG image.") from None


def run_inpaint(args: argparse.Namespace) -> list[str]:
    """Regenerates the masked part of `--image` (or the area `--outpaint` adds) for every class; returns the paths."""
    from .editing_utils import make_outpaint_canvas
    from .pipeline_arpg_inpaint import ARPGInpaintPipeline

    image = _open_image(args.image, "--image")  # before loading the model: bad paths fail at once
    if args.outpaint is not None:
        left, top, right, bottom = args.outpaint
        image, mask = make_outpaint_canvas(
            image.convert("RGB"), left=left, right=right, top=top, bottom=bottom, fill=args.outpaint_fill
        )
    else:
        mask = _open_image(args.mask, "--mask")
    pipeline = prepare_pipeline(args, ARPGInpaintPipeline)

    def make_images(labels, generators, negatives):
        return pipeline(
            image,
            mask,
            labels,
            generator=generators,
            negative_class_labels=negatives,
            mask_coverage_threshold=args.mask_coverage_threshold,
            paste_back=args.paste_back,
            position_mode=args.position_mode,
            **sampling_kwargs(args),
        ).images

    return write_images(pipeline, args, make_images, (image.height, image.width), editing=True)


def add_inpaint_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--image",
        required=True,
        help="the image to edit (PNG, JPEG, ...); sides multiples of the VQ downsample factor (16 for VQ-16)",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--mask", help="mask image of the same size: white = regenerate, black = keep")
    where.add_argument(
        "--outpaint",
        type=int,
        nargs=4,
        metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"),
        help="extend the image by these pixels on each side and generate the new area",
    )
    parser.add_argument(
        "--outpaint-fill",
        choices=("edge", "reflect"),
        default="edge",
        help="what the new area holds before it is regenerated (seen by the VQ encoder at the border)",
    )
    parser.add_argument(
        "--mask-coverage-threshold",
        type=float,
        default=0.0,
        metavar="T",
        help="regenerate a token when the mask covers more than this fraction of its pixels",
    )
    parser.add_argument("--paste-back", action="store_true", help="paste the kept pixels of the input back")
    parser.add_argument(
        "--position-mode",
        choices=("extrapolate", "interpolate"),
        default="extrapolate",
        help="positions on canvases larger than the trained grid",
    )
    add_generate_arguments(parser, default_output_dir="edits")
    return parser


def add_generate_arguments(
    parser: argparse.ArgumentParser, default_output_dir: str = "samples"
) -> argparse.ArgumentParser:
    parser.add_argument("--model", help="pipeline folder or Hub id (default: the bundled model, when installed)")
    parser.add_argument("--class-labels", type=int, nargs="*", default=[], metavar="ID", help="class ids, e.g. 207 360")
    parser.add_argument("--class-names", nargs="*", default=[], metavar="NAME", help='class names, e.g. "tabby cat"')
    parser.add_argument(
        "--negative-class-labels",
        type=int,
        nargs="*",
        default=[],
        metavar="ID",
        help="guide away from these classes instead of the null class: one for all or one per class",
    )
    parser.add_argument("--num-images-per-class", type=int, default=1, metavar="N")
    parser.add_argument(
        "--num-inference-steps", type=int, metavar="N", help="decoding steps (default: the model's recommended value)"
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        metavar="G",
        help="classifier-free guidance scale (default: the model's recommended value)",
    )
    parser.add_argument("--token-schedule", choices=("arccos", "cosine"), help="override the scheduler's")
    parser.add_argument("--guidance-schedule", choices=("constant", "linear"), help="override the scheduler's")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="image i uses a generator seeded seed + i")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward batch")
    parser.add_argument("--output-dir", default=default_output_dir, metavar="DIR")
    parser.add_argument(
        "--grid", action="store_true", help="also write grid.png: one row per class, its images side by side"
    )
    parser.add_argument(
        "--grid-columns", type=int, default=None, metavar="N", help="images per grid row instead of one class per row"
    )
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default=None,
        help="weights dtype (default: bfloat16 on CUDA, float32 otherwise)",
    )
    parser.add_argument(
        "--cpu-gemm",
        choices=CPU_GEMMS,
        default=None,
        help="float32 on CPU: how decoding multiplies by the weights (see arpg_hf.cpu_gemm); the default is "
        "what loading chose (auto: oneDNN pre-packed weights on a CPU-only machine)",
    )
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default="none",
        help="quantize the decoder for inference (pipe.transformer.quantize): int8 weights and activations (about "
        "2x faster on CPUs, a quarter of the memory), or int8 / int4 weights only; the head stays float32",
    )
    parser.add_argument(
        "--model-cpu-offload",
        action="store_true",
        help="keep each model on the CPU until it runs on --device (diffusers' "
        "enable_model_cpu_offload): for GPUs short of memory; the images are the same",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def add_control_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    control = parser.add_argument_group("control (ControlARPG)")
    control.add_argument(
        "--control-image",
        metavar="PNG",
        help="condition map every image follows: white edges on black (arpg_hf.canny_edges of a picture, or a "
        "drawing's outline); without --model, the bundled digits-edges model",
    )
    control.add_argument(
        "--controlnet",
        metavar="DIR",
        help="control adapter folder for --model (default: the model folder's own controlnet/)",
    )
    control.add_argument(
        "--controlnet-conditioning-scale",
        type=float,
        default=1.0,
        metavar="S",
        help="strength of the control: 1 as trained, 0 none",
    )
    return parser


def _check_generate_args(args: argparse.Namespace) -> None:
    check_output_dir(args.output_dir)
    for name in ("num_images_per_class", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.grid_columns is not None and args.grid_columns < 1:
        raise ValueError(f"--grid-columns must be >= 1, got {args.grid_columns}.")
    if args.num_inference_steps is not None and args.num_inference_steps < 1:
        raise ValueError(f"--num-inference-steps must be >= 1, got {args.num_inference_steps}.")


# ---------------------------------------------------------------------------------------------------- info
def folder_info(folder: str) -> dict:
    """A summary of a pipeline folder from its configs and safetensors headers (no weights are loaded)."""
    from safetensors import safe_open

    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(f"{folder!r} is not a pipeline folder (no model_index.json).")

    def read(*parts):
        path = os.path.join(folder, *parts)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as file:
            return json.load(file)

    info = {"folder": os.path.abspath(folder), "model_index": read("model_index.json"), "components": {}}
    for component, config_name in (
        ("transformer", "config.json"),
        ("vqvae", "config.json"),
        ("scheduler", "scheduler_config.json"),
    ):
        config = read(component, config_name)
        entry = {"config": config}
        component_dir = os.path.join(folder, component)
        weights = (
            sorted(name for name in os.listdir(component_dir) if name.endswith(".safetensors"))
            if os.path.isdir(component_dir)
            else []
        )
        if weights:
            count, dtypes = 0, {}
            for name in weights:
                with safe_open(os.path.join(component_dir, name), framework="pt") as file:
                    for key in file.keys():
                        tensor = file.get_slice(key)
                        numel = 1
                        for size in tensor.get_shape():
                            numel *= size
                        count += numel
                        dtypes[tensor.get_dtype()] = dtypes.get(tensor.get_dtype(), 0) + numel
            entry.update(num_parameters=count, dtypes=dtypes, weight_files=weights)
        info["components"][component] = entry
    return info


def _format_info(info: dict) -> str:
    lines = [f"pipeline folder: {info['folder']}"]
    index = info["model_index"] or {}
    class_name = index.get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, list) else class_name  # [shim module, class]
    lines.append(f"pipeline class: {class_name} (diffusers {index.get('_diffusers_version')})")
    components = info["components"]
    transformer = components["transformer"]
    config = transformer.get("config") or {}
    if config:
        lines.append(
            "transformer: ARPGForImageGeneration, {s} + {c} layers, width {h}, {n} heads, grid {gh}x{gw}, vocab {v}, "
            "{k} classes".format(
                s=config.get("num_self_attention_layers"),
                c=config.get("num_cross_attention_layers"),
                h=config.get("hidden_size"),
                n=config.get("num_attention_heads"),
                gh=config.get("grid_height"),
                gw=config.get("grid_width"),
                v=config.get("vocab_size"),
                k=config.get("num_classes"),
            )
        )
    vq = (components["vqvae"].get("config")) or {}
    if vq:
        levels = vq.get("block_out_channels") or vq.get("channel_multipliers", [])  # or a 0.1 config
        factor = 2 ** (len(levels) - 1)
        size = f"{config.get('grid_height', 0) * factor}x{config.get('grid_width', 0) * factor}" if config else "?"
        lines.append(
            f"vqvae: ARPGVQModel, codebook {vq.get('num_vq_embeddings', vq.get('codebook_size'))} x "
            f"{vq.get('vq_embed_dim', vq.get('codebook_embed_dim'))}, "
            f"downsample {factor}, images {size} px"
        )
    scheduler = components["scheduler"].get("config") or {}
    if scheduler:
        lines.append(
            f"scheduler: token schedule {scheduler.get('token_schedule')}, guidance {scheduler.get('guidance_schedule')} "
            f"{scheduler.get('recommended_guidance_scale')}, steps {scheduler.get('recommended_num_inference_steps')}"
        )
    for name in ("transformer", "vqvae"):
        entry = components[name]
        if "num_parameters" in entry:
            dtypes = ", ".join(f"{dtype}" for dtype in sorted(entry["dtypes"]))
            lines.append(f"{name} parameters: {entry['num_parameters']:,} ({dtypes})")
    if os.path.isfile(os.path.join(info["folder"], "README.md")):
        lines.append("model card: README.md")
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> dict:
    folder = args.folder
    if folder is None:
        from .bundled import bundled_pipeline_path

        folder = bundled_pipeline_path("digits")
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"{folder!r} is not a folder; `arpg-hf info` reads a local pipeline folder (download a Hub one with "
            "`hf download OWNER/NAME --local-dir DIR`)."
        )
    info = folder_info(folder)
    if args.classes:
        from .labels import model_id2label

        config = info["components"]["transformer"].get("config") or {}
        if "num_classes" not in config:
            raise ValueError(f"{folder!r} has no transformer/config.json with num_classes; is it an ARPG folder?")
        classes = model_id2label(config.get("id2label"), config["num_classes"])
        info["classes"] = classes
        if not args.json:
            print("\n".join(f"{class_id}: {name}" for class_id, name in sorted(classes.items())))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    elif not args.classes:
        print(_format_info(info))
    return info


# ---------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .conversion.command import add_convert_arguments

    parser = argparse.ArgumentParser(prog="arpg-hf", description="ARPG image generation on the Hugging Face stack.")
    parser.add_argument("--version", action="version", version=f"arpg-hf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_control_arguments(
        add_generate_arguments(commands.add_parser("generate", help="generate class-conditional images (PNG files)"))
    )
    add_inpaint_arguments(
        commands.add_parser("inpaint", help="regenerate the masked part of an image, or outpaint it, for given classes")
    )
    add_convert_arguments(
        commands.add_parser("convert", help="convert upstream ARPG + VQ checkpoints into a pipeline folder")
    )
    info = commands.add_parser("info", help="summarize a pipeline folder (configs, parameter counts, dtypes)")
    info.add_argument("folder", metavar="DIR", nargs="?", help="pipeline folder (default: the bundled digits model)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--classes", action="store_true", help="list the model's classes (id and names), one per line")
    for command_parser in commands.choices.values():  # errors are worded with the flags of the command that ran
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def run():
        try:
            if args.command in ("generate", "inpaint"):
                _check_generate_args(args)
                return run_generate(args) if args.command == "generate" else run_inpaint(args)
            if args.command == "convert":
                from .conversion.command import run_convert

                return run_convert(args)
            return run_info(args)
        except USER_ERRORS as error:
            if os.environ.get("ARPG_HF_TRACEBACK") or not error.args or not isinstance(error.args[0], str):
                raise
            raise type(error)(with_flag_names(error.args[0], args.command_parser)) from error

    return run_guarded(run)


def with_flag_names(message: str, parser: argparse.ArgumentParser) -> str:
    """`message` with the Python parameter names of the library (`top_p`, num_inference_steps=) replaced by the flags
    of `parser` that set them (--top-p), so that an error names what the user typed. Names with an underscore are
    replaced wherever they stand as words; one-word names (`temperature`) only in backticks."""
    for action in parser._actions:
        flags = [option for option in action.option_strings if option.startswith("--")]
        if not flags:
            continue
        name = re.escape(action.dest)
        pattern = rf"`{name}`|(?<![\w-]){name}(?![\w-])" if "_" in action.dest else rf"`{name}`"
        message = re.sub(pattern, flags[0], message)
    return message


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
