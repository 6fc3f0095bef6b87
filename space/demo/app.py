"""The Gradio app: class-conditional generation with a live view of the random decoding order, inpainting, and
controlled generation (draw a stroke, get a digit that follows it: the Control tab, when a control adapter is loaded).

    python app.py --host 127.0.0.1 --port 7860              # the bundled digits model, offline
    python app.py --model path/to/arpg-l --device cuda      # a converted ImageNet folder (or a Hub id)

The app never reaches the network by itself: Gradio analytics are off, no share link, system fonts only.

API (gradio_client; examples in space/README.md): `/generate` (one image), `/generate_live` (the Generate tab, streamed),
`/inpaint` and `/control` (those tabs). The parameters are named as a user would type them (`class_label`, `steps`,
`guidance_scale`, `seed`, `token_schedule`, ...) and take what `Client.view_api()` lists: a class label is the class index
as a string ('8'), as Gradio lists a dropdown's values (`/generate` also takes the int, as it always has).
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import NamedTuple

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

from PIL import Image  # noqa: E402

from arpg_hf.optional_dependencies import require  # noqa: E402

gr = require("gradio", "demo", "space.demo")

from .session import MASK_PRESETS, MAX_IMAGES, TOKEN_SCHEDULES, DemoModel  # noqa: E402

GUIDANCE_MAX = 20.0
INTRO = """# ARPG: autoregressive image generation in a random order
Tokens are predicted **in a random order, several per step** ([arXiv 2503.10568](https://arxiv.org/abs/2503.10568)).
The live view shows the token grid while it is decoded: grey = not decoded yet, orange tint = decoded at this step.
The order map colours each token by the step that produced it (dark = early, yellow = late)."""
# Small images (the digits model) are shown enlarged with crisp pixels; their files keep the model's resolution.
CSS = """
#gallery img, #inpaint-result img { image-rendering: pixelated; }
#inpaint-result img { width: 256px; height: 256px; object-fit: contain; }
"""


def offline_theme() -> gr.themes.Base:
    """The default theme with system fonts (the stock theme loads fonts from Google, unreachable offline)."""
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "SFMono-Regular", "monospace"]
    )


def _display(image: Image.Image, scale: int) -> Image.Image:
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def _user_errors(function):
    """Shows the demo's ValueErrors (bad settings, no mask) as Gradio error messages."""

    @functools.wraps(function)  # keeps the parameter names (they name the API's parameters)
    def run(*args):
        try:
            result = function(*args)
            if hasattr(result, "__next__"):
                yield from result
            else:
                yield result
        except ValueError as error:
            raise gr.Error(str(error)) from error

    return run


def _class_picker(model: DemoModel, none_label: str | None = None, **kwargs) -> gr.Dropdown:
    """A dropdown of the model's classes whose values are the class indices as strings ('0', '1', ...): Gradio's API
    lists a dropdown's values as strings (`Literal['0', '1', ...]` in `Client.view_api()`) whatever their Python type,
    so that a client passes what is listed. The functions take `int(value)`. With `none_label`, a first choice '-1'
    (no class) of that label."""
    choices = [(label, str(index)) for label, index in model.class_choices]
    if none_label is not None:
        choices.insert(0, (none_label, "-1"))
    return gr.Dropdown(choices, value=choices[0][1], filterable=True, **kwargs)


def _class_index(value, model: DemoModel) -> int:
    """`/generate`'s class label: the listed string ('8'), or the int (which it took before the API listed strings)."""
    values = [str(index) for _, index in model.class_choices]
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value not in values:
        shown = (
            [repr(v) for v in values]
            if len(values) <= 3
            else [repr(values[0]), repr(values[1]), "...", repr(values[-1])]
        )
        raise ValueError(f"The class label must be one of {', '.join(shown)} (a string, or the int), got {value!r}.")
    return int(value)


class SamplingControls(NamedTuple):
    """The settings every tab has, in the order of the API's parameters (the page shows the token schedule before the
    seed)."""

    class_label: gr.Dropdown
    steps: gr.Slider
    guidance_scale: gr.Slider
    seed: gr.Number
    token_schedule: gr.Radio


def _sampling_controls(
    model: DemoModel, prefix: str, recommended: tuple[int, float] | None = None, **class_picker_kwargs
) -> SamplingControls:
    steps, guidance = recommended or model.recommended
    num_tokens = model.grid_size[0] * model.grid_size[1]
    class_label = _class_picker(model, label="Class", elem_id=f"{prefix}class-picker", **class_picker_kwargs)
    # precision=0: the API lists (and the function gets) an int
    steps = gr.Slider(1, num_tokens, value=steps, step=1, precision=0, label="Steps", elem_id=f"{prefix}steps")
    guidance = gr.Slider(0, GUIDANCE_MAX, value=guidance, step=0.5, label="Guidance scale")
    token_schedule = gr.Radio(
        list(TOKEN_SCHEDULES),
        value=model.default_token_schedule,
        label="Token schedule (how many tokens each step decodes)",
    )
    seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id=f"{prefix}seed")
    return SamplingControls(class_label, steps, guidance, seed, token_schedule)


def _negative_class_picker(model: DemoModel, prefix: str, label: str) -> gr.Dropdown:
    """The class of the guidance's second half (`negative_class_labels`); '-1': the null class (plain guidance)."""
    return _class_picker(model, none_label="nothing (plain guidance)", label=label, elem_id=f"{prefix}negative-class")


def _generate_tab(model: DemoModel, last_images: gr.State) -> None:
    with gr.Row():
        with gr.Column():
            controls = _sampling_controls(model, "")
            negative_picker = _negative_class_picker(model, "", "Guide away from (optional)")
            num_images = gr.Slider(
                1, MAX_IMAGES, value=4, step=1, precision=0, label="Images (seeds seed, seed + 1, ...)"
            )
            button = gr.Button("Generate", variant="primary", elem_id="generate-button")
        with gr.Column():
            live = gr.Image(
                label="Decoding, live (image 1)", type="pil", format="png", interactive=False, elem_id="live-view"
            )
            order = gr.Image(
                label="Decoding order map", type="pil", format="png", interactive=False, elem_id="order-map"
            )
    gallery = gr.Gallery(
        label="Samples (model resolution)",
        columns=MAX_IMAGES // 2,
        format="png",
        type="pil",
        elem_id="gallery",
        interactive=False,
    )

    def generate_live(class_label, steps, guidance_scale, seed, token_schedule, num_images, negative_class_label):
        class_label = int(class_label)  # the dropdowns' values: '0', '1', ...
        for live_image, order_image, images in model.stream_generation(
            class_label, steps, guidance_scale, seed, token_schedule, num_images, int(negative_class_label)
        ):
            if images is None:
                yield live_image, gr.skip(), gr.skip(), gr.skip()
            else:
                name = model.pipe.id2label[class_label]
                captions = [(image, f"{name} · seed {seed + i}") for i, image in enumerate(images)]
                yield live_image, order_image, captions, images

    button.click(
        _user_errors(generate_live),
        [*controls, num_images, negative_picker],
        [live, order, gallery, last_images],
        api_name="generate_live",
        api_description="The Generate tab: num_images images (seeds seed, seed + 1, ...), streamed step by step. "
        "Returns (live view of image 1, decoding order map, gallery of the images at the model's resolution).",
        concurrency_id="model",
    )


def _inpaint_tab(model: DemoModel, start_image: Image.Image, last_images: gr.State) -> None:
    gr.Markdown("Paint over what to regenerate (or pick a mask preset); the rest of the image is kept as tokens.")
    with gr.Row():
        with gr.Column():
            editor = gr.ImageEditor(
                value={"background": start_image, "layers": [], "composite": start_image},
                type="pil",
                sources=("upload", "clipboard"),
                transforms=(),
                label="Image and mask",
                elem_id="editor",
                brush=gr.Brush(colors=["#ff4040"], default_size=max(8, start_image.width // 8)),
            )
            use_generated = gr.Button("Use the generated image", elem_id="use-generated")
            preset = gr.Radio(list(MASK_PRESETS), value=MASK_PRESETS[0], label="Mask", elem_id="mask-preset")
            controls = _sampling_controls(model, "inpaint-")
            negative_picker = _negative_class_picker(
                model, "inpaint-", "Guide away from (e.g. the class the image shows, when editing it into another)"
            )
            button = gr.Button("Inpaint", variant="primary", elem_id="inpaint-button")
        with gr.Column():
            mask_view = gr.Image(label="Mask (white: regenerate)", type="pil", format="png", interactive=False)
            live = gr.Image(label="Decoding, live", type="pil", format="png", interactive=False, elem_id="inpaint-live")
            order = gr.Image(label="Decoding order map (grey: kept)", type="pil", format="png", interactive=False)
            result = gr.Image(
                label="Result (model resolution)",
                type="pil",
                format="png",
                interactive=False,
                elem_id="inpaint-result",
                height=300,
            )

    def inpaint(image, mask_preset, class_label, steps, guidance_scale, seed, token_schedule, negative_class_label):
        image, shown_mask = image or {}, False
        for mask, live_image, order_image, images in model.stream_inpainting(
            image.get("background"),
            image.get("layers"),
            mask_preset,
            int(class_label),
            steps,
            guidance_scale,
            seed,
            token_schedule,
            int(negative_class_label),
        ):
            # The mask on the first frame, and again on the last: a client's `predict` returns the last frame only.
            mask_update = gr.skip() if shown_mask and not images else _display(mask, model.scale)
            shown_mask = True
            live_update = live_image if live_image is not None else gr.skip()
            order_update = order_image if order_image is not None else gr.skip()
            yield mask_update, live_update, order_update, images[0] if images else gr.skip()

    def take_generated(images):
        if not images:
            raise gr.Error("Generate an image in the Generate tab first.")
        image = _display(images[0], model.scale)
        return {"background": image, "layers": [], "composite": image}

    use_generated.click(take_generated, [last_images], [editor], api_visibility="private")  # UI only
    button.click(
        _user_errors(inpaint),
        [editor, preset, *controls, negative_picker],
        [mask_view, live, order, result],
        api_name="inpaint",
        api_description="The Inpaint tab: regenerates the masked part of image['background'] (mask_preset, or the "
        "painted pixels of image['layers'] with mask_preset 'brush strokes'). Returns (mask, live view, decoding "
        "order map, inpainted image at the model's resolution).",
        concurrency_id="model",
    )


def _control_tab(model: DemoModel) -> None:
    gr.Markdown(
        "Draw a stroke: its edges become the condition (ControlARPG), and the model draws a digit of the chosen "
        "class that follows them."
    )
    size = model.image_size[0] * model.scale
    with gr.Row():
        with gr.Column():
            sketch = gr.Sketchpad(
                type="pil",
                canvas_size=(size, size),
                label="Your stroke (dark on white)",
                elem_id="control-sketch",
                brush=gr.Brush(colors=["#000000"], default_size=max(8, size // 8)),
            )
            recommended = model.control_pipe.default_sampling_settings(
                None, None, model.grid_size[0] * model.grid_size[1]
            )
            controls = _sampling_controls(model, "control-", recommended)
            button = gr.Button("Generate", variant="primary", elem_id="control-button")
        with gr.Column():
            condition = gr.Image(label="Condition (edges of the stroke)", type="pil", format="png", interactive=False)
            live = gr.Image(label="Decoding, live", type="pil", format="png", interactive=False, elem_id="control-live")
            result = gr.Image(
                label="Result (model resolution)",
                type="pil",
                format="png",
                interactive=False,
                elem_id="control-result",
                height=300,
            )

    def control(drawing, class_label, steps, guidance_scale, seed, token_schedule):
        drawing = drawing or {}
        picture = drawing.get("composite") or drawing.get("background")  # the page sends the composite
        for edges, live_image, _, images in model.stream_control(
            picture, int(class_label), steps, guidance_scale, seed, token_schedule
        ):
            yield (
                _display(edges, model.scale),
                live_image if live_image is not None else gr.skip(),
                images[0] if images else gr.skip(),
            )

    button.click(
        _user_errors(control),
        [sketch, *controls],
        [condition, live, result],
        api_name="control",
        api_description="The Control tab: an image of the class that follows the edges of drawing['composite'] (or "
        "drawing['background']): dark strokes on white, any size. Returns (condition, live view, image at the model's "
        "resolution).",
        concurrency_id="model",
    )


def _api(model: DemoModel) -> None:
    """`/generate`: (class_label, steps, guidance_scale, seed) -> one image at the model's resolution."""
    with gr.Group(visible=False):  # the same kinds of inputs as the tabs' (the same listed types), not shown
        # allow_custom_value: `_class_index` checks the class label, so that the int works too (no page shows it)
        controls = _sampling_controls(model, "api-", allow_custom_value=True)
        output = gr.Image(type="pil", format="png", label="image")
        trigger = gr.Button("generate")

    def generate(class_label, steps, guidance_scale, seed):
        try:
            return model.generate(_class_index(class_label, model), steps, guidance_scale, seed)
        except ValueError as error:
            raise gr.Error(str(error)) from error

    trigger.click(
        generate,
        [controls.class_label, controls.steps, controls.guidance_scale, controls.seed],
        output,
        api_name="generate",
        api_description="One image of the class at the model's resolution (the default token schedule).",
        concurrency_id="model",
    )


def build_demo(pipe, control_pipe=None) -> gr.Blocks:
    """The Gradio Blocks of the demo for an [`ARPGPipeline`]; with an [`ARPGControlPipeline`], a Control tab too."""
    model = DemoModel(pipe, control_pipe)
    start_image = _display(model.generate(0, *model.recommended, 0), model.scale)
    with gr.Blocks(title="ARPG: randomized parallel decoding", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        last_images = gr.State([])
        with gr.Tab("Generate", elem_id="generate-tab"):
            _generate_tab(model, last_images)
        with gr.Tab("Inpaint", elem_id="inpaint-tab"):
            _inpaint_tab(model, start_image, last_images)
        if model.control_pipe is not None:
            with gr.Tab("Control", elem_id="control-tab"):
                _control_tab(model)
        _api(model)
    demo.queue(default_concurrency_limit=1)
    return demo


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="The ARPG Gradio demo.")
    parser.add_argument("--host", default=None, help="Default: $GRADIO_SERVER_NAME or 127.0.0.1 (0.0.0.0 on Spaces).")
    parser.add_argument("--port", type=int, default=None, help="Default: $GRADIO_SERVER_PORT or 7860.")
    parser.add_argument("--model", default=None, help="Pipeline folder or Hub id (default: the bundled digits model).")
    parser.add_argument(
        "--control-model",
        default=None,
        help="ARPGControlPipeline folder for a Control tab (default: the bundled digits-edges model with the bundled "
        "model).",
    )
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="Default: bfloat16 on cuda, float32 on cpu.",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Starts the demo; returns the exit status (1 with a one-line message for a bad --model and the like)."""
    import torch

    from arpg_hf.pipeline_arpg_control import ARPGControlPipeline
    from arpg_hf.pipeline_loading import load_pipeline
    from arpg_hf.user_errors import run_guarded

    args = parse_args(argv)

    def serve():
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = load_pipeline(args.model, device, args.dtype)
        control_pipe = None
        if args.control_model is not None or args.model is None:  # the bundled digits-edges model by default
            control_pipe = load_pipeline(args.control_model, device, args.dtype, pipeline_class=ARPGControlPipeline)
        demo = build_demo(pipe, control_pipe)
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            share=False,
            show_error=True,
            ssr_mode=False,
            theme=offline_theme(),
            css=CSS,
            footer_links=["api"],
        )

    return run_guarded(serve, prog="app.py")
