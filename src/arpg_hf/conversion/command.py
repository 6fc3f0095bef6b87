"""The command line of the conversion: the arguments of `arpg-hf convert` and of `conversion/convert_arpg_to_hf.py`,
and running them (see `arpg_hf.conversion.convert` for the steps).

Declaring the arguments imports neither torch nor transformers, so that `--help` answers at once: the choices below
repeat `ARPG_PRESETS` and `convert.DTYPES` (tests/test_cli.py checks that they agree)."""

from __future__ import annotations

import argparse
from typing import Sequence

from ..user_errors import run_guarded

PRESETS = ("ARPG-L", "ARPG-XL", "ARPG-XXL")
DTYPE_CHOICES = ("bfloat16", "float16", "float32")


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--arpg-checkpoint",
        required=True,
        metavar="PATH_OR_HUB",
        help="upstream decoder checkpoint: a file, or a Hub file like hp-l33/ARPG/arpg_300m.pt",
    )
    parser.add_argument(
        "--vq-checkpoint",
        required=True,
        metavar="PATH_OR_HUB",
        help="LlamaGen VQ tokenizer checkpoint, e.g. FoundationVision/LlamaGen/vq_ds16_c2i.pt",
    )
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="the pipeline folder to write")
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--preset",
        choices=PRESETS,
        help="published decoder size (default: detected from the checkpoint's width)",
    )
    size.add_argument(
        "--reference-config",
        metavar="JSON",
        help="JSON of the upstream ModelArgs fields (dim, n_layer, n_head, vocab_size, ...)",
    )
    parser.add_argument(
        "--vq-config",
        metavar="JSON",
        help="JSON of the upstream VQ fields (ch, encoder_ch_mult, z_channels, codebook_size, ...); "
        "default: the published VQ-16",
    )
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="dtype of the decoder weights")
    parser.add_argument(
        "--vq-dtype",
        choices=DTYPE_CHOICES,
        default="float32",
        help="dtype of the tokenizer weights (it decodes in float32 either way)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--license", default="mit", help="license in the model card metadata")
    return parser


def run_convert(args: argparse.Namespace) -> str:
    """Runs a conversion from parsed arguments; returns the output folder."""
    from ..model_card import create_model_card
    from .convert import (
        check_output_dir,
        convert_reference_checkpoints,
        read_json_config,
        save_pipeline_folder,
        upload_pipeline_folder,
    )

    check_output_dir(args.output_dir, args.overwrite)
    pipeline, provenance = convert_reference_checkpoints(
        args.arpg_checkpoint,
        args.vq_checkpoint,
        preset=args.preset,
        reference_config=read_json_config(args.reference_config, "--reference-config"),
        vq_config=read_json_config(args.vq_config, "--vq-config"),
        dtype=args.dtype,
        vq_dtype=args.vq_dtype,
    )
    card = create_model_card(
        pipeline.transformer.config,
        pipeline.scheduler.config,
        repo_id=args.push_to_hub,
        provenance=provenance,
        license=args.license,
        num_parameters=pipeline.transformer.num_parameters(),
    )
    folder = save_pipeline_folder(pipeline, args.output_dir, card, overwrite=args.overwrite)
    print(f"Wrote {folder}")
    if args.push_to_hub:
        print(f"Uploaded to {upload_pipeline_folder(folder, args.push_to_hub, private=args.private)}")
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_convert_arguments(
        argparse.ArgumentParser(
            prog="convert_arpg_to_hf.py",
            description="Convert the published ARPG + LlamaGen VQ checkpoints into an ARPGPipeline folder.",
        )
    )
    return run_guarded(lambda: run_convert(parser.parse_args(argv)), prog=parser.prog)
