"""Model cards (README.md with YAML metadata) for ARPG pipeline folders, built with huggingface_hub's ModelCard."""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration_arpg import ARPG_PRESETS, ARPGConfig

CITATION = """@article{li2025autoregressive,
    title={Autoregressive Image Generation with Randomized Parallel Decoding},
    author={Haopeng Li and Jinyue Yang and Guoqi Li and Huan Wang},
    journal={arXiv preprint arXiv:2503.10568},
    year={2025}
}"""

UPSTREAM_REPOSITORY = "https://github.com/hp-l33/ARPG"
# The Hub model repository of the upstream checkpoints: the `base_model` of the folders converted from them.
UPSTREAM_HUB_REPOSITORY = "hp-l33/ARPG"
PAPER_URL = "https://arxiv.org/abs/2503.10568"

# Published ImageNet 256x256 results of the upstream checkpoints (50K samples, ADM evaluator), per preset. The first
# entry of each list is the setting we recommend and write into the scheduler config of a converted folder.
# Sources: the upstream repository's model zoo (cosine token schedule, guidance 4.5 / 6.0 / 7.5, 64 steps; the rows
# with `model_zoo=True`, which also go into the card's model-index as `eval_results`) and, for ARPG-L, its arccos
# schedule with linear guidance 5.0.
PUBLISHED_RESULTS: dict[str, list[dict[str, Any]]] = {
    "ARPG-L": [
        dict(
            token_schedule="arccos",
            guidance_schedule="linear",
            guidance_scale=5.0,
            num_inference_steps=64,
            fid=2.38,
            inception_score=None,
        ),
        dict(
            token_schedule="cosine",
            guidance_schedule="linear",
            guidance_scale=4.5,
            num_inference_steps=64,
            fid=2.44,
            inception_score=292,
            model_zoo=True,
        ),
    ],
    "ARPG-XL": [
        dict(
            token_schedule="cosine",
            guidance_schedule="linear",
            guidance_scale=6.0,
            num_inference_steps=64,
            fid=2.10,
            inception_score=331,
            model_zoo=True,
        ),
    ],
    "ARPG-XXL": [
        dict(
            token_schedule="cosine",
            guidance_schedule="linear",
            guidance_scale=7.5,
            num_inference_steps=64,
            fid=1.94,
            inception_score=340,
            model_zoo=True,
        ),
    ],
}

# model-index fields of the published figures. The task type is the Hub task the cards' `pipeline_tag` names (the Hub
# has no class-conditional image generation task; its task ids are text-to-image, image-to-image,
# unconditional-image-generation, ...); the task name says what it is.
EVAL_TASK_TYPE = "unconditional-image-generation"
EVAL_TASK_NAME = "Class-conditional image generation"
EVAL_DATASET_TYPE = "ILSVRC/imagenet-1k"
EVAL_DATASET_NAME = "ImageNet 256x256"

# Upstream checkpoint file of each preset on the Hub (repository hp-l33/ARPG).
PUBLISHED_CHECKPOINTS = {"ARPG-L": "arpg_300m.pt", "ARPG-XL": "arpg_700m.pt", "ARPG-XXL": "arpg_1b.pt"}

DEFAULT_TAGS = ["arpg", "arpg-hf", "autoregressive", "image-generation", "class-conditional", "diffusers"]

# A Hub file reference into the upstream model repository, as `arpg-hf convert` accepts it ("hp-l33/ARPG/arpg_1b.pt").
_UPSTREAM_HUB_FILE = re.compile(r"^(?:hf://)?" + re.escape(UPSTREAM_HUB_REPOSITORY) + r"/[^\s]+$", re.IGNORECASE)


def preset_of(config: ARPGConfig) -> str | None:
    """The preset name whose architecture `config` has (width, heads, layer counts, 16x16 grid, ImageNet), or None."""
    for name, fields in ARPG_PRESETS.items():
        if all(getattr(config, key) == value for key, value in fields.items()) and (
            config.grid_height,
            config.grid_width,
            config.vocab_size,
            config.num_classes,
        ) == (16, 16, 16384, 1000):
            return name
    return None


def recommended_sampling(config: ARPGConfig) -> dict[str, Any]:
    """The sampling settings a pipeline folder of this architecture should carry in its scheduler config."""
    preset = preset_of(config)
    if preset is not None:
        best = PUBLISHED_RESULTS[preset][0]
        return {
            key: best[key] for key in ("token_schedule", "guidance_schedule", "guidance_scale", "num_inference_steps")
        }
    return dict(
        token_schedule="arccos",
        guidance_schedule="linear",
        guidance_scale=4.0,
        num_inference_steps=min(64, config.num_image_tokens),
    )


def _parameter_count_text(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.2f}B"
    return f"{count / 1e6:.0f}M" if count >= 1e7 else f"{count / 1e6:.2f}M"


def _sampling_section(scheduler_config: Mapping[str, Any]) -> str:
    steps = scheduler_config.get("recommended_num_inference_steps")
    scale = scheduler_config.get("recommended_guidance_scale")
    rows = [
        ("token schedule (tokens per step)", scheduler_config.get("token_schedule")),
        ("guidance schedule", scheduler_config.get("guidance_schedule")),
        ("guidance scale", scale),
        ("decoding steps", steps),
        ("sampling method", scheduler_config.get("sampling_method")),
        ("temperature / top-k / top-p", "1.0 / off / off"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (
        "## Sampling settings\n\n"
        "These are stored in `scheduler/scheduler_config.json`; the pipeline uses them unless you pass other values.\n\n"
        f"| setting | value |\n| --- | --- |\n{table}\n"
    )


def _results_section(results: Sequence[Mapping[str, Any]], source: str) -> str:
    lines = [
        "| steps | token schedule | guidance | FID | IS |",
        "| --- | --- | --- | --- | --- |",
    ]
    for result in results:
        inception, fid = result.get("inception_score"), result["fid"]
        lines.append(
            f"| {result['num_inference_steps']} | {result['token_schedule']} | {result['guidance_schedule']} "
            f"{result['guidance_scale']} | {f'{fid:.2f}' if isinstance(fid, float) else fid} | "
            f"{inception if inception is not None else '-'} |"
        )
    return f"## Results\n\n{source}\n\n" + "\n".join(lines) + "\n"


def _provenance_section(provenance: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| component | source | sha256 |", "| --- | --- | --- |"]
    for entry in provenance:
        lines.append(f"| {entry.get('component', '')} | `{entry.get('source', '')}` | `{entry.get('sha256', '')}` |")
    return (
        "## Conversion provenance\n\n"
        f"Converted from the upstream checkpoints ({UPSTREAM_REPOSITORY}) with `arpg-hf convert` "
        "(`conversion/convert_arpg_to_hf.py`); every source tensor was consumed and loaded strictly.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def _training_section(training: Mapping[str, Any]) -> str:
    lines = ["| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in training.items()]
    return "## Training\n\nTrained with `accelerate launch train.py` of arpg-hf.\n\n" + "\n".join(lines) + "\n"


def _usage_section(repo_id: str | None, num_classes: int, scheduler_config: Mapping[str, Any]) -> str:
    location = repo_id or "path/to/this/folder"
    if num_classes == 1000:  # ImageNet-1k: class names resolve through the pipeline's id2label
        labels = [207, 360]
        choose = 'class_labels = pipe.get_label_ids(["golden retriever", "otter"])  # ImageNet classes 207 and 360'
        device = '\npipe.to("cuda" if torch.cuda.is_available() else "cpu")'
    else:
        labels = list(range(min(num_classes, 2)))
        choose = f"class_labels = {labels}  # class ids in [0, {num_classes}); pipe.id2label names them"
        device = ""
    arguments = ["class_labels=class_labels"]
    steps = scheduler_config.get("recommended_num_inference_steps")
    scale = scheduler_config.get("recommended_guidance_scale")
    if steps is not None:
        arguments.append(f"num_inference_steps={steps}")
    if scale is not None:
        arguments.append(f"guidance_scale={scale}")
    arguments.append("generator=torch.Generator().manual_seed(0)")
    call = ",\n    ".join(arguments)
    generate = f"""{choose}
images = pipe(
    {call},
).images
images[0].save("sample.png")"""
    return f"""## Usage

Install the `arpg-hf` package, which holds the pipeline and model classes:

```bash
pip install arpg-hf
arpg-hf generate --model {location} --class-labels {" ".join(map(str, labels))} --seed 0 --output-dir samples
```

In Python, with the pipeline class of `arpg_hf`:

```python
import torch
from arpg_hf import ARPGPipeline

pipe = ARPGPipeline.from_pretrained("{location}"){device}
{generate}
```

or generically through diffusers, without importing `arpg_hf` first (it must still be installed):

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{location}", trust_remote_code=True){device}
{generate}
```

Without arguments, `num_inference_steps` and `guidance_scale` default to the sampling settings above.
"""


def published_eval_results(preset: str) -> list[EvalResult]:
    """The model-index entries (FID and IS on ImageNet 256x256) of a published size: the upstream model-zoo figures,
    reported by the ARPG authors, not measured by arpg-hf."""
    results = []
    for entry in PUBLISHED_RESULTS[preset]:
        if not entry.get("model_zoo"):
            continue
        setting = {
            key: entry[key] for key in ("num_inference_steps", "token_schedule", "guidance_schedule", "guidance_scale")
        }
        for metric_type, metric_name, value in (
            ("FID", "FID", entry["fid"]),
            ("IS", "Inception score", entry["inception_score"]),
        ):
            if value is None:
                continue
            results.append(
                EvalResult(
                    task_type=EVAL_TASK_TYPE,
                    task_name=EVAL_TASK_NAME,
                    dataset_type=EVAL_DATASET_TYPE,
                    dataset_name=EVAL_DATASET_NAME,
                    metric_type=metric_type,
                    metric_name=metric_name,
                    metric_value=value,
                    metric_args={"num_samples": 50000, **setting},
                    source_name="ARPG model zoo (reported by the authors, arXiv 2503.10568)",
                    source_url=UPSTREAM_REPOSITORY,
                )
            )
    return results


def _from_upstream_hub(provenance: Sequence[Mapping[str, Any]] | None) -> bool:
    """Whether a converted source file is a Hub file of the upstream repository (e.g. hp-l33/ARPG/arpg_1b.pt)."""
    return any(_UPSTREAM_HUB_FILE.match(str(entry.get("source", ""))) for entry in provenance or ())


def _license_section() -> str:
    return (
        "## License\n\n"
        f"The weights are converted from the upstream checkpoints ({UPSTREAM_REPOSITORY}, "
        f"[{UPSTREAM_HUB_REPOSITORY}](https://huggingface.co/{UPSTREAM_HUB_REPOSITORY})) and carry the upstream "
        "repositories' licence (MIT).\n"
    )


def create_model_card(
    transformer_config: ARPGConfig,
    scheduler_config: Mapping[str, Any],
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    provenance: Sequence[Mapping[str, Any]] | None = None,
    training: Mapping[str, Any] | None = None,
    license: str = "mit",
    num_parameters: int | None = None,
    results: Sequence[Mapping[str, Any]] | None = None,
    tags: Sequence[str] | None = None,
) -> ModelCard:
    """Builds the model card of an ARPG pipeline folder.

    A card of a published size (the architecture of ARPG-L, -XL or -XXL, and `results` not given) describes the
    upstream weights: it lists their published figures, in the text and as model-index `eval_results` (FID and IS on
    ImageNet 256x256, as reported upstream), and names `hp-l33/ARPG` as `base_model`. Folders converted from files of
    that Hub repository get the `base_model` too. Cards of other folders (trained with `train.py`, the bundled digits
    model: they pass `results=[]` or have another architecture) get neither.

    Args:
        transformer_config ([`ARPGConfig`]): the decoder's configuration.
        scheduler_config (`Mapping`): the scheduler's config (its recommended sampling settings are listed).
        repo_id (`str`, *optional*): the Hub repository the folder goes to (used in the usage snippet and as the
            model-index name).
        model_name (`str`, *optional*): title; defaults to the preset name or "ARPG".
        base_model (`str`, *optional*): the model this one was fine-tuned or converted from (YAML `base_model`);
            defaults to `hp-l33/ARPG` for the published sizes and for conversions of its files, to none otherwise.
        datasets (`list[str]`, *optional*): training datasets (YAML `datasets`); ImageNet-1k for the presets.
        provenance (`list[dict]`, *optional*): converted source files, dicts with `component`, `source`, `sha256`.
        training (`dict`, *optional*): a summary of the training run (steps, batch size, lr, final loss, ...).
        license (`str`, *optional*, defaults to `"mit"`): YAML `license`.
        num_parameters (`int`, *optional*): parameter count of the decoder, shown in the title block.
        results (`list[dict]`, *optional*): measured results (keys of [`PUBLISHED_RESULTS`] entries); the published
            figures of the preset by default. Measured results are listed in the text only.
        tags (`list[str]`, *optional*): extra YAML tags.

    Returns:
        `huggingface_hub.ModelCard`; `card.save(path)` writes it, `ModelCard.load(path)` reads it back.
    """
    preset = preset_of(transformer_config)
    published = results is None and preset is not None  # the card describes the upstream weights
    if datasets is None:
        datasets = ["ILSVRC/imagenet-1k"] if transformer_config.num_classes == 1000 else []
    upstream_weights = published or _from_upstream_hub(provenance)
    if base_model is None and upstream_weights:
        base_model = UPSTREAM_HUB_REPOSITORY
    title = model_name or preset or "ARPG"
    eval_results = published_eval_results(preset) if published else None
    card_data = ModelCardData(
        license=license,
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *(tags or []), *([preset] if preset else [])])),
        datasets=list(datasets) or None,
        base_model=base_model,
        model_name=(repo_id or title) if eval_results else None,
        eval_results=eval_results or None,
    )
    config = transformer_config
    size = f" ({_parameter_count_text(num_parameters)} parameters)" if num_parameters else ""
    architecture = (
        f"{config.num_self_attention_layers} + {config.num_cross_attention_layers} layers, width {config.hidden_size}, "
        f"{config.num_attention_heads} heads, {config.grid_height}x{config.grid_width} tokens from a "
        f"{config.vocab_size}-code VQ tokenizer, {config.num_classes} classes"
    )
    sections = [
        f"# {title}\n\n"
        f"Class-conditional image generation with ARPG{size} — *Autoregressive Image Generation with Randomized "
        f"Parallel Decoding* ([arXiv 2503.10568]({PAPER_URL})) — packaged as a diffusers "
        "pipeline folder for the `arpg-hf` package: `transformer/` (the two-pass decoder, "
        "`ARPGForImageGeneration`), `vqvae/` (the VQ tokenizer, `ARPGVQModel`) and `scheduler/` (`ARPGScheduler`).\n\n"
        f"Architecture: {architecture}.\n",
        _sampling_section(scheduler_config),
    ]
    if published:
        sections.append(
            _results_section(
                PUBLISHED_RESULTS[preset],
                f"Published ImageNet 256x256 figures of the upstream `{PUBLISHED_CHECKPOINTS[preset]}` "
                f"({UPSTREAM_REPOSITORY}; 50,000 samples, ADM evaluator), as reported by the ARPG authors — not "
                "measured by arpg-hf. The model-zoo row (cosine schedule) is also in this card's metadata "
                "(model-index). This folder reproduces the upstream sampler token for token.",
            )
        )
    elif results:
        sections.append(_results_section(results, "Measured with this folder."))
    if training:
        sections.append(_training_section(training))
    sections.append(_usage_section(repo_id, config.num_classes, scheduler_config))
    if provenance:
        sections.append(_provenance_section(provenance))
    if upstream_weights:
        sections.append(_license_section())
    sections.append(f"## Citation\n\n```bibtex\n{CITATION}\n```\n")
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(sections)
    return ModelCard(content)


def card_for_pipeline(pipeline, repo_id: str | None = None) -> ModelCard:
    """The model card to publish with `pipeline`: the README.md of the folder it was loaded from when there is one
    (it carries the conversion provenance or the training summary), a fresh card otherwise."""
    source = getattr(pipeline.config, "_name_or_path", None) or ""
    readme = os.path.join(source, "README.md")
    if source and os.path.isfile(readme):
        return ModelCard.load(readme)
    from .cpu_gemm import packed_weights  # (imports torch)

    transformer = pipeline.transformer
    count = transformer.num_parameters() + sum(weight.numel() for weight in packed_weights(transformer))
    card = create_model_card(transformer.config, pipeline.scheduler.config, repo_id=repo_id, num_parameters=count)
    adapter = getattr(pipeline, "controlnet", None)
    if adapter is not None:  # an ARPGControlPipeline: say how to give the condition
        name = repo_id or "path/to/this/folder"
        card.content += CONTROL_SECTION.format(
            control_type=adapter.config.control_type,
            parameters=sum(parameter.numel() for parameter in adapter.parameters()),
            name=name,
        )
    return card


CONTROL_SECTION = """
## Control (ControlARPG)

This folder also holds `controlnet/`, an `ARPGControlAdapter` ({parameters:,} parameters) for `{control_type}` condition
maps: images follow the map as well as the class. Load it with `ARPGControlPipeline`:

```python
import torch
from arpg_hf import ARPGControlPipeline, canny_edges

pipe = ARPGControlPipeline.from_pretrained("{name}")
control_image = canny_edges(picture)  # edges: white on black, any size
images = pipe([0], control_image=control_image, generator=torch.Generator().manual_seed(0)).images
```
"""
