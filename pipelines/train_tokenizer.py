#!/usr/bin/env python
"""Trains an ARPG VQ tokenizer (`ARPGVQModel`) on an image folder with accelerate.

    accelerate launch pipelines/train_tokenizer.py --image_dir digits/train --output_dir digits-vq \
        --resolution 32 --channel_multipliers 1 2 2 --codebook_size 128 --max_train_steps 1500

Objective: reconstruction (MSE or L1) + codebook + commitment (beta 0.25) losses with the straight-through estimator
(`arpg_hf.vq_training`). The codebook is initialised from encoder latents of the first batch, and codes unused over
`--dead_code_window` steps are restarted at random latents. Every image of the folder is loaded once into memory
(resized / centre-cropped to `--resolution`): meant for small datasets. Checkpoints (`checkpoint-N`, accelerate
state) every `--checkpointing_steps`; `--resume_from_checkpoint latest` continues a run. The tokenizer is saved with
`save_pretrained` into `--output_dir`, which `pipelines/tokenize_dataset.py --vqvae` and `train.py --vqvae` read.

`--finetune_decoder TOKENIZER` trains further only the decoder side (post_quant_conv and decoder) of a saved
tokenizer, on the reconstruction loss alone: its encoder and codebook stay frozen, so every image gets the same tokens
and every token means the same, and models trained on its tokens keep working with the sharper decoder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from PIL import Image
from tqdm.auto import tqdm

from arpg_hf.token_dataset import IMAGE_EXTENSIONS, images_to_tensor, resize_and_center_crop
from arpg_hf.vq_model import ARPGVQModel, llamagen_vq_config
from arpg_hf.vq_training import (
    DEFAULT_COMMITMENT_BETA,
    RECONSTRUCTION_LOSSES,
    codebook_perplexity,
    codebook_usage,
    init_codebook_from_latents,
    normalized_latents,
    psnr,
    register_codebook_normalization,
    remove_codebook_normalization,
    restart_dead_codes,
    vq_training_loss,
)

logger = logging.getLogger("train_tokenizer")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    data = parser.add_argument_group("data")
    data.add_argument("--image_dir", required=True, help="Folder of images (sub-folders are searched).")
    data.add_argument("--eval_image_dir", default=None, help="Held-out images: PSNR reported at the end.")
    data.add_argument("--resolution", type=int, default=32)
    model = parser.add_argument_group("model (ARPGVQModel config; --vq_config overrides all)")
    model.add_argument("--vq_config", default=None, help="A config.json of ARPGVQModel.")
    model.add_argument(
        "--finetune_decoder",
        default=None,
        metavar="TOKENIZER",
        help="A saved ARPGVQModel folder whose decoder is trained further (encoder and codebook frozen: same tokens).",
    )
    model.add_argument("--base_channels", type=int, default=32)
    model.add_argument("--channel_multipliers", type=int, nargs="+", default=[1, 2, 2])
    model.add_argument("--layers_per_block", type=int, default=1)
    model.add_argument("--z_channels", type=int, default=32)
    model.add_argument("--codebook_size", type=int, default=128)
    model.add_argument("--codebook_embed_dim", type=int, default=8)
    model.add_argument("--norm_num_groups", type=int, default=8)
    model.add_argument(
        "--no_attention",
        action="store_true",
        help="A purely convolutional tokenizer (no self-attention): local codes, an easier prior.",
    )
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--train_batch_size", type=int, default=64)
    optim.add_argument("--max_train_steps", type=int, default=1500)
    optim.add_argument("--learning_rate", type=float, default=1e-3)
    optim.add_argument("--lr_warmup_steps", type=int, default=50)
    optim.add_argument("--adam_weight_decay", type=float, default=0.0)
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--commitment_beta", type=float, default=DEFAULT_COMMITMENT_BETA)
    optim.add_argument("--reconstruction_loss", choices=RECONSTRUCTION_LOSSES, default="mse")
    optim.add_argument(
        "--dead_code_window", type=int, default=100, help="Restart codes unused for this many steps (0: never)."
    )
    optim.add_argument(
        "--dead_code_restart_until",
        type=float,
        default=0.8,
        help="Fraction of training after which no restarts happen.",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", required=True)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None)
    run.add_argument("--checkpointing_steps", type=int, default=500)
    run.add_argument("--checkpoints_total_limit", type=int, default=2)
    run.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint-N folder.')
    run.add_argument("--logging_steps", type=int, default=50)
    args = parser.parse_args(argv)
    for name in ("resolution", "train_batch_size", "max_train_steps", "checkpointing_steps", "logging_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    return args


# ------------------------------------------------------------------------------------------------ data / model


def load_images(directory: str, resolution: int) -> torch.Tensor:
    """Every image under `directory` (sorted paths), as `(n, 3, R, R)` float32 in [-1, 1]."""
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(directory)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {directory!r}.")
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(resize_and_center_crop(image.convert("RGB"), resolution))
    return images_to_tensor(images)


def build_model(args) -> ARPGVQModel:
    if args.finetune_decoder:
        vq = ARPGVQModel.from_pretrained(args.finetune_decoder, torch_dtype=torch.float32)
        trainable = set(decoder_parameters(vq))
        for parameter in vq.parameters():
            parameter.requires_grad_(parameter in trainable)
        return vq
    if args.vq_config:
        return ARPGVQModel.from_config(ARPGVQModel.load_config(args.vq_config))
    return ARPGVQModel(
        **llamagen_vq_config(
            base_channels=args.base_channels,
            channel_multipliers=tuple(args.channel_multipliers),
            layers_per_block=args.layers_per_block,
            z_channels=args.z_channels,
            codebook_size=args.codebook_size,
            codebook_embed_dim=args.codebook_embed_dim,
            norm_num_groups=args.norm_num_groups,
            attention=not args.no_attention,
        )
    )


def decoder_parameters(vq: ARPGVQModel) -> list[torch.nn.Parameter]:
    """What `--finetune_decoder` trains: everything after the codebook."""
    return [*vq.post_quant_conv.parameters(), *vq.decoder.parameters()]


def batch_rows(step: int, num_images: int, batch_size: int, seed: int) -> torch.Tensor:
    """The image rows of optimizer step `step`: epochs of seeded permutations, cut into batches (resumable)."""
    start = step * batch_size
    rows = []
    while len(rows) < batch_size:
        epoch, offset = divmod(start + len(rows), num_images)
        permutation = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        rows += permutation[offset : offset + batch_size - len(rows)].tolist()
    return torch.tensor(rows)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ------------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(accelerator, args, step: int) -> None:
    directory = os.path.join(args.output_dir, f"checkpoint-{step}")
    accelerator.save_state(directory)
    if accelerator.is_main_process:
        with open(os.path.join(directory, "step.json"), "w") as file:
            json.dump({"step": step}, file)
        checkpoints = sorted(
            (name for name in os.listdir(args.output_dir) if name.startswith("checkpoint-")),
            key=lambda name: int(name.split("-")[1]),
        )
        for name in checkpoints[: max(0, len(checkpoints) - args.checkpoints_total_limit)]:
            shutil.rmtree(os.path.join(args.output_dir, name))


def resume_step(accelerator, args) -> int:
    if not args.resume_from_checkpoint:
        return 0
    path = args.resume_from_checkpoint
    if path == "latest":
        names = (
            [n for n in os.listdir(args.output_dir) if n.startswith("checkpoint-")]
            if os.path.isdir(args.output_dir)
            else []
        )
        if not names:
            logger.info("No checkpoint to resume from; starting a new run.")
            return 0
        path = os.path.join(args.output_dir, max(names, key=lambda name: int(name.split("-")[1])))
    accelerator.load_state(path)
    with open(os.path.join(path, "step.json")) as file:
        step = json.load(file)["step"]
    logger.info(f"Resumed from {path} at step {step}")
    return step


# ------------------------------------------------------------------------------------------------ training


@torch.no_grad()
def evaluate(vq: ARPGVQModel, images: torch.Tensor, batch_size: int = 256) -> dict:
    """Mean PSNR (dB) and codebook use of `vq` on `images` `(n, 3, R, R)` in [-1, 1]."""
    vq.eval()
    values, counts = [], torch.zeros(vq.config.num_vq_embeddings, dtype=torch.long)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(vq.device)
        encoded = vq.encode(batch)
        values.append(psnr(vq.decode(encoded.latents).sample, batch).cpu())
        counts += codebook_usage(encoded.indices.cpu(), vq.config.num_vq_embeddings)
    vq.train()
    return {
        "psnr": float(torch.cat(values).mean()),
        "codes_used": int((counts > 0).sum()),
        "perplexity": codebook_perplexity(counts),
    }


def train_step(accelerator, vq, optimizer, images, args, usage) -> dict:
    out = vq_training_loss(
        vq,
        images,
        beta=args.commitment_beta,
        reconstruction=args.reconstruction_loss,
        decoder_only=bool(args.finetune_decoder),
    )
    accelerator.backward(out.loss)
    if args.max_grad_norm:
        accelerator.clip_grad_norm_([p for p in vq.parameters() if p.requires_grad], args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    usage += codebook_usage(out.indices.detach().cpu(), usage.numel())
    return {
        "loss": out.loss.item(),
        "rec": out.reconstruction_loss.item(),
        "codebook": out.codebook_loss.item(),
        "commit": out.commitment_loss.item(),
        "latents": out.latents,
    }


def main(args):
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, project_config=ProjectConfiguration(project_dir=args.output_dir)
    )
    set_seed(args.seed)
    images = load_images(args.image_dir, args.resolution)
    logger.info(f"{len(images)} training images of {args.resolution}x{args.resolution} from {args.image_dir}")
    vq = build_model(args)
    if not args.finetune_decoder:
        register_codebook_normalization(vq)  # free rows for the optimizer, seen normalised by the model
    vq.train()
    logger.info(
        f"ARPGVQModel with {sum(p.numel() for p in vq.parameters()):,} parameters, downsample {vq.downsample_factor}"
    )
    optimizer = torch.optim.AdamW(
        [p for p in vq.parameters() if p.requires_grad],
        lr=args.learning_rate,
        betas=(0.9, 0.99),
        weight_decay=args.adam_weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, args.lr_warmup_steps, args.max_train_steps)
    )
    vq, optimizer, scheduler = accelerator.prepare(vq, optimizer, scheduler)
    model = accelerator.unwrap_model(vq)
    start = resume_step(accelerator, args)
    generator = torch.Generator().manual_seed(args.seed)
    if start == 0 and not args.finetune_decoder:  # data-dependent codebook initialisation from the first batch
        with torch.no_grad():
            first = images[batch_rows(0, len(images), args.train_batch_size, args.seed)].to(accelerator.device)
            init_codebook_from_latents(
                model, normalized_latents(model, model.quant_conv(model.encoder(first))), generator
            )
    usage = torch.zeros(model.config.num_vq_embeddings, dtype=torch.long)
    progress = tqdm(
        range(args.max_train_steps), initial=start, desc="steps", disable=not accelerator.is_local_main_process
    )
    window, window_start, history = [], time.perf_counter(), []
    for step in range(start, args.max_train_steps):
        batch = images[batch_rows(step, len(images), args.train_batch_size, args.seed)].to(accelerator.device)
        metrics = train_step(accelerator, vq, optimizer, batch, args, usage)
        scheduler.step()
        window.append(metrics["loss"])
        restart_allowed = step < args.dead_code_restart_until * args.max_train_steps and not args.finetune_decoder
        if args.dead_code_window and (step + 1) % args.dead_code_window == 0:
            restarted = restart_dead_codes(model, usage, metrics["latents"], generator) if restart_allowed else 0
            metrics["codes_used"], metrics["restarted"] = int((usage > 0).sum()), restarted
            usage.zero_()
        progress.update(1)
        if (step + 1) % args.logging_steps == 0 or step in (start, args.max_train_steps - 1):
            entry = {
                "step": step + 1,
                "loss": sum(window) / len(window),
                "rec": metrics["rec"],
                "codebook": metrics["codebook"],
                "commit": metrics["commit"],
                "lr": scheduler.get_last_lr()[0],
                "images_per_second": len(window) * args.train_batch_size / (time.perf_counter() - window_start),
            }
            entry.update({k: metrics[k] for k in ("codes_used", "restarted") if k in metrics})
            history.append(entry)
            progress.set_postfix(loss=f"{entry['loss']:.4f}")
            logger.info(json.dumps(entry))
            window, window_start = [], time.perf_counter()
        if (step + 1) % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args, step + 1)
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if not args.finetune_decoder:
            remove_codebook_normalization(model)  # the folder stores the normalised rows
        model.eval().save_pretrained(args.output_dir)
        summary = {"train": evaluate(model, images), "history": history}
        if args.eval_image_dir:
            summary["eval"] = evaluate(model, load_images(args.eval_image_dir, args.resolution))
        with open(os.path.join(args.output_dir, "training_summary.json"), "w") as file:
            json.dump(summary, file, indent=2)
        logger.info(
            f"Saved the tokenizer to {args.output_dir}: "
            + json.dumps({k: v for k, v in summary.items() if k != "history"})
        )


if __name__ == "__main__":
    main(parse_args())
