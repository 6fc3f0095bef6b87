"""Conversion of the published upstream checkpoints into Hub-ready ARPGPipeline folders.

`arpg-hf convert` and `conversion/convert_arpg_to_hf.py` run it through `arpg_hf.conversion.command`. The steps, each
failing with one clear message before anything is written:

1. resolve each checkpoint argument: a local file, or a Hub file reference such as ``hp-l33/ARPG/arpg_300m.pt``;
2. read it safely (``torch.load(weights_only=True)`` or safetensors) and check that it is the kind of model expected;
3. infer what tensor shapes tell (width, vocabulary, classes, layer counts, FFN width, tokenizer widths) and check it
   against the configuration, naming the tensor, the expected and the found shape on a mismatch;
4. convert every key (none may be left over) and load strictly;
5. write the folder (model_index.json, transformer/, vqvae/, scheduler/, README.md) into a temporary sibling
   directory, read the weights back to verify them, then move it into place (so no half-written folder remains);
6. optionally upload it to the Hub.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..atomic_io import staged_folder
from ..configuration_arpg import swiglu_intermediate_size
from ..model_card import recommended_sampling
from .arpg import PRESET_REFERENCE_FIELDS, PUBLISHED_ARPG_L
from .checkpoints import WRAPPER_KEYS, abbreviate, load_reference_state_dict, read_checkpoint_file
from .vq import PUBLISHED_VQ16

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# "owner/repo/path/in/repo.ext", optionally prefixed with "hf://".
_HUB_FILE_REFERENCE = re.compile(r"^(?:hf://)?(?P<repo>[\w.-]+/[\w.-]+)/(?P<file>[^\s]+\.\w+)$")

_ARPG_MARKER_KEYS = ("embeddings.weight", "head.weight", "layers.to_k.weight", "layers.to_v.weight")
_VQ_MARKER_KEYS = ("quantize.embedding.weight", "encoder.conv_in.weight", "decoder.conv_out.weight")
_LLAMAGEN_GPT_MARKER_KEYS = ("tok_embeddings.weight", "cls_embedding.embedding_table.weight")


class ConversionError(ValueError):
    """A conversion input is wrong; the message says what was expected, what came and how to fix it."""


# ------------------------------------------------------------------------------------------ resolving inputs
def resolve_checkpoint(path_or_hub: str) -> str:
    """Returns a local path for a checkpoint argument: an existing file, or a Hub file reference
    (``owner/repo/file.pt``) downloaded (or taken from the cache) with huggingface_hub."""
    if os.path.isfile(path_or_hub):
        return path_or_hub
    if os.path.isdir(path_or_hub):
        raise ConversionError(f"{path_or_hub!r} is a directory; pass the checkpoint file inside it.")
    match = _HUB_FILE_REFERENCE.match(path_or_hub)
    if match is None:
        raise ConversionError(
            f"{path_or_hub!r} is neither an existing file nor a Hub file reference of the form "
            "'owner/repo/file.pt' (e.g. 'hp-l33/ARPG/arpg_300m.pt'). Check the path."
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    repo_id, filename = match.group("repo"), match.group("file")
    try:
        return hf_hub_download(repo_id=repo_id, filename=filename)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise ConversionError(
            f"{path_or_hub!r} is not a local file and cannot be downloaded now (offline, or the Hub is unreachable: "
            f"{type(error).__name__}). Download it on a machine with network access (e.g. `hf download {repo_id} "
            f"{filename} --local-dir .`) and pass the local path instead."
        ) from error
    except RepositoryNotFoundError as error:
        raise ConversionError(
            f"The Hub repository {repo_id!r} does not exist or is private: {path_or_hub!r}."
        ) from error
    except EntryNotFoundError as error:
        raise ConversionError(f"The Hub repository {repo_id!r} has no file {filename!r}.") from error


def file_sha256(path: str, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json_config(path: str | None, what: str) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except FileNotFoundError as error:
        raise ConversionError(f"The {what} file {path!r} does not exist.") from error
    except json.JSONDecodeError as error:
        raise ConversionError(f"The {what} file {path!r} is not valid JSON: {error}.") from error
    if not isinstance(config, dict):
        raise ConversionError(
            f"The {what} file {path!r} must hold a JSON object of fields, got {type(config).__name__}."
        )
    return config


# ---------------------------------------------------------------------------------- checking what came in
def check_model_family(state_dict: Mapping[str, torch.Tensor], expected: str, source: str) -> None:
    """Fails when a checkpoint is plainly not of the expected family ("arpg" decoder or "vq" tokenizer)."""

    def has_all(keys):
        return all(key in state_dict for key in keys)

    if expected == "arpg" and has_all(_ARPG_MARKER_KEYS):
        return
    if expected == "vq" and has_all(_VQ_MARKER_KEYS):
        return
    if expected == "arpg" and has_all(_VQ_MARKER_KEYS):
        hint = "it is a VQ tokenizer checkpoint: pass it as --vq-checkpoint (were the two arguments swapped?)."
    elif expected == "vq" and has_all(_ARPG_MARKER_KEYS):
        hint = "it is an ARPG decoder checkpoint: pass it as --arpg-checkpoint (were the two arguments swapped?)."
    elif any(key in state_dict for key in _LLAMAGEN_GPT_MARKER_KEYS):
        hint = "it looks like a LlamaGen raster-order GPT checkpoint, a different architecture from ARPG."
    else:
        hint = f"its keys are of another architecture (e.g. {abbreviate(sorted(state_dict), 4)})."
    wanted = _ARPG_MARKER_KEYS if expected == "arpg" else _VQ_MARKER_KEYS
    what = "an ARPG decoder" if expected == "arpg" else "a LlamaGen VQ tokenizer"
    raise ConversionError(f"{source} is not {what} checkpoint (expected keys such as {list(wanted)}): {hint}")


@dataclass(frozen=True)
class ShapeCheck:
    """One tensor whose shape the configuration determines."""

    key: str
    expected: tuple[int, ...]
    because: str


def _run_shape_checks(state_dict, checks: Sequence[ShapeCheck], source: str, hint: str) -> None:
    problems = []
    for check in checks:
        tensor = state_dict.get(check.key)
        if tensor is None:
            problems.append(f"{check.key}: expected shape {check.expected} ({check.because}), missing")
        elif tuple(tensor.shape) != check.expected:
            problems.append(
                f"{check.key}: expected shape {check.expected} ({check.because}), found {tuple(tensor.shape)}"
            )
    if problems:
        raise ConversionError(
            f"{source} does not match the configuration: "
            + "; ".join(problems[:6])
            + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
            + f". {hint}"
        )


def _layer_indices(state_dict, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for key in state_dict if (m := pattern.match(key))})


def infer_arpg_fields(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Upstream `ModelArgs` fields that the decoder's tensor shapes determine (not `n_head` nor `block_size`)."""
    dim = state_dict["embeddings.weight"].shape[1]
    vocab_size = state_dict["head.weight"].shape[0]
    self_layers = _layer_indices(state_dict, "layers.self_dec.")
    cross_layers = _layer_indices(state_dict, "layers.cross_dec.")
    fields = dict(
        dim=dim,
        vocab_size=vocab_size,
        num_classes=state_dict["embeddings.weight"].shape[0] - vocab_size - 3,  # + [MASK], null class, unused row
        num_self_layers=len(self_layers),
        num_cross_layers=len(cross_layers),
    )
    if self_layers:
        fields["ffn_hidden_dim"] = state_dict[f"layers.self_dec.{self_layers[0]}.ffn.w1.weight"].shape[0]
    return fields


def preset_for_width(dim: int) -> str | None:
    return next((name for name, fields in PRESET_REFERENCE_FIELDS.items() if fields["dim"] == dim), None)


def check_arpg_shapes(state_dict: Mapping[str, torch.Tensor], fields: Mapping[str, Any], source: str) -> None:
    """Checks the decoder checkpoint against upstream `ModelArgs` fields, naming tensor, expected and found shape."""
    dim, vocab, classes = fields["dim"], fields["vocab_size"], fields["num_classes"]
    per_pass = fields["n_layer"] // 2
    ffn = swiglu_intermediate_size(dim, fields["multiple_of"], fields["ffn_dim_multiplier"])
    checks = [
        ShapeCheck(
            "embeddings.weight",
            (vocab + classes + 3, dim),
            f"vocab_size {vocab} + num_classes {classes} + 3 rows ([MASK], null class, unused), dim {dim}",
        ),
        ShapeCheck("head.weight", (vocab, dim), f"vocab_size {vocab}, dim {dim}"),
        ShapeCheck("layers.to_k.weight", (dim, dim), f"dim {dim}"),
    ]
    for layer in range(per_pass):
        checks += [
            ShapeCheck(
                f"layers.self_dec.{layer}.attn.to_q.weight", (dim, dim), f"n_layer {fields['n_layer']}, dim {dim}"
            ),
            ShapeCheck(f"layers.self_dec.{layer}.ffn.w1.weight", (ffn, dim), f"SwiGLU width {ffn} of dim {dim}"),
            ShapeCheck(
                f"layers.cross_dec.{layer}.attn.to_q.weight", (dim, dim), f"n_layer {fields['n_layer']}, dim {dim}"
            ),
            ShapeCheck(f"layers.cross_dec.{layer}.ffn.w1.weight", (ffn, dim), f"SwiGLU width {ffn} of dim {dim}"),
        ]
    for prefix in ("layers.self_dec.", "layers.cross_dec."):
        extra = [i for i in _layer_indices(state_dict, prefix) if i >= per_pass]
        if extra:
            checks.append(
                ShapeCheck(
                    f"{prefix}{extra[0]}.attn.to_q.weight",
                    (),
                    f"n_layer {fields['n_layer']} gives {per_pass} layers per pass, found {max(extra) + 1}",
                )
            )
    inferred = infer_arpg_fields(state_dict)
    preset = preset_for_width(inferred["dim"])
    hint = (
        f"The tensors say: dim {inferred['dim']}, vocab_size {inferred['vocab_size']}, num_classes "
        f"{inferred['num_classes']}, {inferred['num_self_layers']} + {inferred['num_cross_layers']} layers"
        + (
            f"; that is {preset}: pass --preset {preset}."
            if preset
            else "; pass a --reference-config with those values."
        )
    )
    _run_shape_checks(state_dict, checks, source, hint)


def infer_vq_fields(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Upstream VQ fields that the tokenizer's tensor shapes determine."""
    ch = state_dict["encoder.conv_in.weight"].shape[0]
    widths = [
        state_dict[f"encoder.conv_blocks.{i}.res.0.conv2.weight"].shape[0]
        for i in _layer_indices(state_dict, "encoder.conv_blocks.")
    ]
    return dict(
        codebook_size=state_dict["quantize.embedding.weight"].shape[0],
        codebook_embed_dim=state_dict["quantize.embedding.weight"].shape[1],
        ch=ch,
        encoder_ch_mult=[width // ch for width in widths],
        z_channels=state_dict["encoder.conv_out.weight"].shape[0],
        in_channels=state_dict["encoder.conv_in.weight"].shape[1],
        out_channels=state_dict["decoder.conv_out.weight"].shape[0],
    )


def check_vq_shapes(state_dict: Mapping[str, torch.Tensor], fields: Mapping[str, Any], source: str) -> None:
    """Checks the tokenizer checkpoint against upstream VQ fields, naming tensor, expected and found shape."""
    ch, mult, z = fields["ch"], list(fields["encoder_ch_mult"]), fields["z_channels"]
    size, embed = fields["codebook_size"], fields["codebook_embed_dim"]
    checks = [
        ShapeCheck("quantize.embedding.weight", (size, embed), f"codebook_size {size}, codebook_embed_dim {embed}"),
        ShapeCheck(
            "encoder.conv_in.weight", (ch, fields["in_channels"], 3, 3), f"ch {ch}, in_channels {fields['in_channels']}"
        ),
        ShapeCheck("encoder.conv_out.weight", (z, ch * mult[-1], 3, 3), f"z_channels {z}, ch {ch} x {mult[-1]}"),
        ShapeCheck("quant_conv.weight", (embed, z, 1, 1), f"codebook_embed_dim {embed}, z_channels {z}"),
        ShapeCheck(
            "decoder.conv_out.weight",
            (fields["out_channels"], ch * mult[0], 3, 3),
            f"out_channels {fields['out_channels']}, ch {ch} x {mult[0]}",
        ),
    ]
    checks += [
        ShapeCheck(f"encoder.conv_blocks.{level}.res.0.conv2.weight", (ch * m, ch * m, 3, 3), f"ch {ch} x ch_mult {m}")
        for level, m in enumerate(mult)
    ]
    levels = _layer_indices(state_dict, "encoder.conv_blocks.")
    if len(levels) != len(mult):
        checks.append(
            ShapeCheck(
                f"encoder.conv_blocks.{len(levels) - 1}",
                (),
                f"encoder_ch_mult {mult} gives {len(mult)} levels, found {len(levels)}",
            )
        )
    try:
        inferred = infer_vq_fields(state_dict)
        hint = (
            "The tensors say: "
            + ", ".join(f"{k} {v}" for k, v in inferred.items())
            + "; pass a --vq-config with those."
        )
    except KeyError:
        hint = "Pass the --vq-config the tokenizer was trained with."
    _run_shape_checks(state_dict, checks, source, hint)


# ------------------------------------------------------------------------------------------- conversion
def reference_fields_for(arpg_state_dict, preset: str | None, reference_config: Mapping | None, source: str) -> dict:
    """The upstream decoder fields to convert with: --reference-config, else --preset, else the published size
    whose width the checkpoint has (ARPG-L defaults when none matches, so that the shape check explains)."""
    if reference_config is not None:
        return {**PUBLISHED_ARPG_L, **{k: v for k, v in reference_config.items() if not k.startswith("_")}}
    if preset is not None:
        if preset not in PRESET_REFERENCE_FIELDS:
            raise ConversionError(f"Unknown preset {preset!r}; choose one of {sorted(PRESET_REFERENCE_FIELDS)}.")
        return dict(PRESET_REFERENCE_FIELDS[preset])
    detected = preset_for_width(infer_arpg_fields(arpg_state_dict)["dim"])
    return dict(PRESET_REFERENCE_FIELDS[detected or "ARPG-L"])


def convert_reference_checkpoints(
    arpg_checkpoint: str,
    vq_checkpoint: str,
    preset: str | None = None,
    reference_config: Mapping[str, Any] | None = None,
    vq_config: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    vq_dtype: str = "float32",
):
    """Builds an [`ARPGPipeline`] from upstream checkpoint files (paths or Hub file references).

    Returns:
        `(pipeline, provenance)`: the pipeline (scheduler set to the recommended sampling settings of its size) and a
        list of `{"component", "source", "sha256", "layout"}` dicts describing the source files.
    """
    from ..pipeline_arpg import ARPGPipeline  # heavy imports only when converting
    from ..scheduling_arpg import ARPGScheduler

    if preset is not None and reference_config is not None:
        raise ConversionError("Pass either --preset or --reference-config, not both.")
    for name, value in (("dtype", dtype), ("vq_dtype", vq_dtype)):
        if value not in DTYPES:
            raise ConversionError(f"{name} must be one of {sorted(DTYPES)}, got {value!r}.")
    provenance, state_dicts = [], {}
    for component, argument, family in (("transformer", arpg_checkpoint, "arpg"), ("vqvae", vq_checkpoint, "vq")):
        path = resolve_checkpoint(argument)
        raw = _read(path)
        layout = next(
            (f'{{"{key}": state_dict}}' for key in WRAPPER_KEYS if isinstance(raw.get(key), Mapping)), "raw state dict"
        )  # the wrapper load_reference_state_dict unwraps
        state_dict = load_reference_state_dict(raw)
        check_model_family(state_dict, family, f"{component} checkpoint {argument!r}")
        state_dicts[component] = state_dict
        provenance.append(dict(component=component, source=argument, sha256=file_sha256(path), layout=layout))

    arpg_fields = reference_fields_for(state_dicts["transformer"], preset, reference_config, arpg_checkpoint)
    check_arpg_shapes(state_dicts["transformer"], arpg_fields, f"ARPG checkpoint {arpg_checkpoint!r}")
    vq_fields = {**PUBLISHED_VQ16, **{k: v for k, v in (vq_config or {}).items() if not k.startswith("_")}}
    vq_fields.setdefault("decoder_ch_mult", vq_fields["encoder_ch_mult"])
    check_vq_shapes(state_dicts["vqvae"], vq_fields, f"VQ checkpoint {vq_checkpoint!r}")

    block_size = arpg_fields["block_size"]
    if math.isqrt(block_size) ** 2 != block_size:
        raise ConversionError(f"block_size must be a square number of tokens, got {block_size}.")
    if arpg_fields["dim"] % arpg_fields["n_head"]:
        raise ConversionError(f"dim {arpg_fields['dim']} is not divisible by n_head {arpg_fields['n_head']}.")

    pipeline = ARPGPipeline.from_reference_checkpoints(
        state_dicts["transformer"], state_dicts["vqvae"], reference_config=arpg_fields, vq_config=vq_fields
    )
    sampling = recommended_sampling(pipeline.transformer.config)
    pipeline.scheduler = ARPGScheduler(
        token_schedule=sampling["token_schedule"],
        guidance_schedule=sampling["guidance_schedule"],
        recommended_guidance_scale=sampling["guidance_scale"],
        recommended_num_inference_steps=sampling["num_inference_steps"],
    )
    for component, name in ((pipeline.transformer, dtype), (pipeline.vqvae, vq_dtype)):
        if component.dtype != DTYPES[name]:
            component.to(DTYPES[name])
    return pipeline, provenance


def _read(path: str) -> Mapping:
    checkpoint = read_checkpoint_file(path)
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(
            f"{path!r} holds a {type(checkpoint).__name__}, expected a state dict (a mapping of names to tensors)."
        )
    return checkpoint


# ----------------------------------------------------------------------------------------- writing
def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Fails early (before any conversion work) when the output folder exists and may not be replaced."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConversionError(f"--output-dir {output_dir!r} is an existing file; choose a folder path.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ConversionError(
            f"--output-dir {output_dir!r} exists and is not empty; choose a new folder or pass --overwrite to replace it."
        )


def save_pipeline_folder(pipeline, output_dir: str, model_card=None, overwrite: bool = False) -> str:
    """Writes a complete pipeline folder atomically: into a hidden staging folder beside it first, verified, then
    renamed into place (`arpg_hf.atomic_io.staged_folder`). An existing folder is replaced only with `overwrite` (and
    only once the new one is complete); the staging folders of interrupted runs are removed."""
    from safetensors.torch import load_file

    check_output_dir(output_dir, overwrite)
    output_dir = os.path.abspath(output_dir)
    with staged_folder(output_dir, overwrite=overwrite) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
        if model_card is not None:
            model_card.save(os.path.join(staging, "README.md"))
        for component in ("transformer", "vqvae"):  # read back what was written, bit for bit
            model = getattr(pipeline, component)
            written = {}
            folder = os.path.join(staging, component)
            for name in sorted(os.listdir(folder)):
                if name.endswith(".safetensors"):
                    written.update(load_file(os.path.join(folder, name)))
            expected = model.state_dict()
            bad = [k for k, v in expected.items() if k not in written or not torch.equal(written[k], v.cpu())]
            if bad:
                raise RuntimeError(f"Verification of the written {component} failed for {abbreviate(bad)}.")
    return output_dir


def upload_pipeline_folder(folder: str, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Creates the Hub repository (one per model size) and uploads the finished folder; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload ARPG pipeline (arpg-hf)")
    return str(getattr(commit, "commit_url", commit))
