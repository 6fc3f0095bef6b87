"""The Gradio app: class-conditional generation with a live view of the random decoding order, inpainting, and
controlled generation (draw a stroke, get a digit that follows it: the Control tab, when a control adapter is loaded).

    python app.py --host 127.0.0.1 --port 7860              # the bundled digits model, offline
    python app.py --model path/to/arpg-l --device cuda      # a converted ImageNet folder (or a Hub id)

The app never reaches the network by itself: Gradio analytics are off, no share link, system fonts only.
API: `gradio_client.Client(url).predict(class_label, steps, guidance_scale, seed, api_name="/generate")` returns the
path of a PNG at the model's resolution.
"""

from __future__ import annotations

import argparse
import functools
import os

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


def _sampling_controls(model: DemoModel, prefix: str, recommended: tuple[int, float] | None = None) -> tuple:
    steps, guidance = recommended or model.recommended
    num_tokens = model.grid_size[0] * model.grid_size[1]
    class_picker = gr.Dropdown(
        model.class_choices,
        value=model.class_choices[0][1],
        label="Class",
        filterable=True,
        elem_id=f"{prefix}class-picker",
    )
    steps = gr.Slider(1, num_tokens, value=steps, step=1, label="Steps", elem_id=f"{prefix}steps")
    guidance = gr.Slider(0, GUIDANCE_MAX, value=guidance, step=0.5, label="Guidance scale")
    schedule = gr.Radio(
        list(TOKEN_SCHEDULES),
        value=model.default_token_schedule,
        label="Token schedule (how many tokens each step decodes)",
    )
    seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id=f"{prefix}seed")
    return class_picker, steps, guidance, schedule, seed


def _negative_class_picker(model: DemoModel, prefix: str, label: str) -> gr.Dropdown:
    """The class of the guidance's second half (`negative_class_labels`); -1: the null class (plain guidance)."""
    return gr.Dropdown(
        [("nothing (plain guidance)", -1)] + model.class_choices,
        value=-1,
        filterable=True,
        label=label,
        elem_id=f"{prefix}negative-class",
    )


def _generate_tab(model: DemoModel, last_images: gr.State) -> None:
    with gr.Row():
        with gr.Column():
            class_picker, steps, guidance, schedule, seed = _sampling_controls(model, "")
            negative_picker = _negative_class_picker(model, "", "Guide away from (optional)")
            num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images (seeds seed, seed + 1, ...)")
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

    def run(class_index, steps_, guidance_, schedule_, seed_, count, negative_index):
        for live_image, order_image, images in model.stream_generation(
            class_index, steps_, guidance_, seed_, schedule_, count, negative_index
        ):
            if images is None:
                yield live_image, gr.skip(), gr.skip(), gr.skip()
            else:
                names = model.pipe.id2label
                name = names[int(class_index)]
                captions = [(image, f"{name} · seed {int(seed_) + i}") for i, image in enumerate(images)]
                yield live_image, order_image, captions, images

    button.click(
        _user_errors(run),
        [class_picker, steps, guidance, schedule, seed, num_images, negative_picker],
        [live, order, gallery, last_images],
        api_name="generate_live",
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
            class_picker, steps, guidance, schedule, seed = _sampling_controls(model, "inpaint-")
            negative_picker = _negative_class_picker(
                model, "inpaint-", "Guide away from (e.g. the class the image shows, when editing it into another)"
            )
            button = gr.Button("Inpaint", variant="primary", elem_id="inpaint-button")
        with gr.Column():
            mask_view = gr.Image(label="Mask (white = regenerate)", type="pil", format="png", interactive=False)
            live = gr.Image(label="Decoding, live", type="pil", format="png", interactive=False, elem_id="inpaint-live")
            order = gr.Image(label="Decoding order map (grey = kept)", type="pil", format="png", interactive=False)
            result = gr.Image(
                label="Result (model resolution)",
                type="pil",
                format="png",
                interactive=False,
                elem_id="inpaint-result",
                height=300,
            )

    def run(editor_value, preset_, class_index, steps_, guidance_, schedule_, seed_, negative_index):
        editor_value, shown_mask = editor_value or {}, False
        for mask, live_image, order_image, images in model.stream_inpainting(
            editor_value.get("background"),
            editor_value.get("layers"),
            preset_,
            class_index,
            steps_,
            guidance_,
            seed_,
            schedule_,
            negative_index,
        ):
            mask_update, shown_mask = (gr.skip() if shown_mask else _display(mask, model.scale)), True
            live_update = live_image if live_image is not None else gr.skip()
            order_update = order_image if order_image is not None else gr.skip()
            yield mask_update, live_update, order_update, images[0] if images else gr.skip()

    def take_generated(images):
        if not images:
            raise gr.Error("Generate an image in the Generate tab first.")
        image = _display(images[0], model.scale)
        return {"background": image, "layers": [], "composite": image}

    use_generated.click(take_generated, [last_images], [editor], api_visibility="private")
    button.click(
        _user_errors(run),
        [editor, preset, class_picker, steps, guidance, schedule, seed, negative_picker],
        [mask_view, live, order, result],
        api_name="inpaint",
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
            class_picker, steps, guidance, schedule, seed = _sampling_controls(model, "control-", recommended)
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

    def run(sketch_value, class_index, steps_, guidance_, schedule_, seed_):
        drawing = (sketch_value or {}).get("composite")
        for edges, live_image, _, images in model.stream_control(
            drawing, class_index, steps_, guidance_, seed_, schedule_
        ):
            yield (
                _display(edges, model.scale),
                live_image if live_image is not None else gr.skip(),
                images[0] if images else gr.skip(),
            )

    button.click(
        _user_errors(run),
        [sketch, class_picker, steps, guidance, schedule, seed],
        [condition, live, result],
        api_name="control",
        concurrency_id="model",
    )


def _api(model: DemoModel) -> None:
    """`/generate`: (class label index, steps, guidance scale, seed) -> one image at the model's resolution."""
    steps, guidance = model.recommended
    with gr.Group(visible=False):
        # No rounding (precision): a non-integer class, step count or seed is an error, not another value.
        inputs = [
            gr.Number(0, label="class_label"),
            gr.Number(steps, label="steps"),
            gr.Number(guidance, label="guidance_scale"),
            gr.Number(0, label="seed"),
        ]
        output = gr.Image(type="pil", format="png", label="image")
        trigger = gr.Button("generate")

    def generate(class_label: int, steps: int, guidance_scale: float, seed: int) -> Image.Image:
        try:
            return model.generate(class_label, steps, guidance_scale, seed)
        except ValueError as error:
            raise gr.Error(str(error)) from error

    trigger.click(generate, inputs, output, api_name="generate", concurrency_id="model")


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
