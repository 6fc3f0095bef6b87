#!/usr/bin/env python
"""Fine-tunes a ControlARPG adapter (and optionally the decoder) on token data that carries condition maps.

    python pipelines/tokenize_dataset.py --image_dir digits/train --vqvae BASE --output_dir tokens \
        --resolution 32 --no_flip --control_type edges
    accelerate launch train_control.py --base_model BASE --train_data_dir tokens --control_type edges \
        --output_dir control-run

BASE is a pipeline folder (or Hub id) of a trained ARPG model, or a local control pipeline folder, whose adapter (and,
with `--train_base`, decoder) is then trained further. The adapter ([`ARPGControlAdapter`]) turns each stored
condition map into one embedding per token position, added to the [MASK] query of that position; the loss is the ARPG
objective (random order, teacher forcing) with those queries. The decoder stays frozen unless
`--train_base`. Class dropout (the model's `class_dropout_prob`) and control dropout (`--control_dropout_prob`) are
drawn independently, so the model sees every combination guidance uses.

OUTPUT_DIR ends as an `ARPGControlPipeline` folder (its `controlnet/` alone is the adapter folder, to pair with BASE
again); checkpoints (`checkpoint-N`, atomic, with checksums) resume with `--resume_from_checkpoint latest`. Runs on
one process or several (`accelerate launch --multi_gpu`, or `ACCELERATE_USE_CPU=1` with gloo); sharded training
(FSDP / DeepSpeed) is for `train.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from torch import nn

from arpg_hf import ARPGControlAdapter, ARPGControlPipeline, ARPGPipeline
from arpg_hf.token_dataset import check_token_dataset, load_token_dataset, token_dataloader
from arpg_hf.training_checkpoints import (
    choose_resume_checkpoint,
    load_torch_state,
    publish_staged_folder,
    read_training_state,
    save_checkpoint,
    save_torch_state,
    staging_folder,
)
from arpg_hf.training_utils import (
    check_world_size,
    crop_choice,
    exit_process,
    exit_with_launcher,
    seed_step,
    weight_decay_param_groups,
)

logger = get_logger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--base_model", required=True, help="Pipeline folder or Hub id of the base ARPG model.")
    parser.add_argument("--train_data_dir", required=True, help="Token folder written with --control_type.")
    parser.add_argument("--control_type", choices=("edges", "depth"), default="edges")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--train_base", action="store_true", help="Fine-tune the decoder too (default: frozen).")
    parser.add_argument("--block_channels", type=int, default=64, help="Width of the adapter's convolution blocks.")
    parser.add_argument("--num_blocks", type=int, default=2, help="Residual blocks of the adapter.")
    parser.add_argument(
        "--control_dropout_prob", type=float, default=0.1, help="Share of rows trained without their control."
    )
    parser.add_argument("--train_batch_size", type=int, default=32, help="Rows per process per step.")
    parser.add_argument("--max_train_steps", type=int, default=2000)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument(
        "--base_learning_rate", type=float, default=None, help="With --train_base: the decoder's (default: a tenth)."
    )
    parser.add_argument("--lr_scheduler", default="cosine")
    parser.add_argument("--lr_warmup_steps", type=int, default=100)
    parser.add_argument("--adam_weight_decay", type=float, default=0.0)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=2)
    parser.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint-N folder.')
    parser.add_argument("--logging_steps", type=int, default=50)
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    positive = ("block_channels", "num_blocks", "train_batch_size", "max_train_steps", "checkpointing_steps")
    for name in positive + ("logging_steps",):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if not 0.0 <= args.control_dropout_prob < 1.0:
        parser.error(f"--control_dropout_prob must lie in [0, 1), got {args.control_dropout_prob}.")
    return args


class ControlTrainingModel(nn.Module):
    """The decoder and the adapter as one module (what accelerate wraps): `forward` returns the step's loss."""

    def __init__(self, transformer, controlnet, control_dropout_prob: float):
        super().__init__()
        self.transformer, self.controlnet, self.control_dropout_prob = transformer, controlnet, control_dropout_prob

    def forward(self, codes, controls, class_labels, generator=None):
        """codes (B, L) raster ids, controls (B, 1, H, W) in [0, 1], class_labels (B,): the mean cross-entropy."""
        conditions = self.controlnet(controls)  # (B, L, D)
        if self.training and self.control_dropout_prob > 0:
            keep = torch.rand(codes.shape[0], generator=generator, device=generator.device if generator else None)
            keep = (keep >= self.control_dropout_prob).to(conditions.device, conditions.dtype)
            conditions = conditions * keep[:, None, None]
        return self.transformer(
            input_ids=codes, class_labels=class_labels, generator=generator, position_conditions=conditions
        ).loss


def load_data(args, accelerator, config, vqvae):
    with accelerator.main_process_first():
        dataset, info = load_token_dataset(args.train_data_dir)
    if "control" not in dataset.column_names:
        raise ValueError(
            f"{args.train_data_dir} has no 'control' column (it has {dataset.column_names}); tokenize the images with "
            f"pipelines/tokenize_dataset.py --control_type {args.control_type}."
        )
    recorded = (info.extra if info is not None else {}).get("control_type")
    if recorded is not None and recorded != args.control_type:
        raise ValueError(
            f"{args.train_data_dir} holds '{recorded}' maps but --control_type is '{args.control_type}'; pass "
            f"--control_type {recorded} or tokenize with --control_type {args.control_type}."
        )
    check_token_dataset(dataset, info, config, vqvae.config.num_vq_embeddings, source=args.train_data_dir)
    size = dataset.features["control"].shape[-1]
    expected = config.grid_height * vqvae.downsample_factor
    if size != expected:
        raise ValueError(
            f"The condition maps are {size}x{size} px but the base model makes {expected}x{expected} images; tokenize "
            f"with --resolution {expected}."
        )
    return dataset


def make_dataloader(dataset, args, accelerator, start_step: int):
    return token_dataloader(
        dataset,
        args.train_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        seed=args.seed,
        start_batch=start_step,
        num_batches=args.max_train_steps - start_step,
        columns=("codes", "label", "control"),
    )


def pick_views(batch, generator, device):
    """One stored view per image, the same for its codes and its condition map."""
    codes, controls = batch["codes"], batch["controls"]  # (B, n_crops, L), (B, n_crops, H, W)
    if codes.ndim == 2:
        codes, controls = codes[:, None], controls[:, None]
    choice = crop_choice(codes, generator)
    rows = torch.arange(codes.shape[0])
    views = codes[rows, choice].to(device)  # (B, L)
    maps = controls[rows, choice].to(device=device, dtype=torch.float32)[:, None] / 255.0  # (B, 1, H, W)
    return views, maps, batch["labels"].to(device)


def write_card(args, pipeline, summary: dict, folder: str) -> None:
    adapter = pipeline.controlnet.config
    parameters = sum(p.numel() for p in pipeline.controlnet.parameters())
    lines = [
        "---",
        "library_name: diffusers",
        "tags:\n- arpg\n- arpg-hf\n- controlnet\n- image-generation\n- class-conditional",
        "---",
        "",
        "# ControlARPG pipeline",
        "",
        f"A control adapter ({parameters:,} parameters, `{adapter.control_type}` maps) fine-tuned with "
        f"`train_control.py` of arpg-hf on top of `{os.path.basename(os.path.normpath(args.base_model))}`. Load it "
        "with `ARPGControlPipeline.from_pretrained(folder)`; `controlnet/` alone pairs with the base pipeline.",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| steps | {summary['steps']} |",
        f"| global batch size | {summary['global_batch_size']} |",
        f"| learning rate | {args.learning_rate} ({args.lr_scheduler}, {args.lr_warmup_steps} warmup steps) |",
        f"| decoder | {'fine-tuned' if args.train_base else 'frozen'} |",
        f"| control dropout | {args.control_dropout_prob} |",
        f"| final loss | {summary['final_loss']:.4f} |" if summary["final_loss"] is not None else "| final loss | - |",
        "",
    ]
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as file:
        file.write("\n".join(lines))


def main(args):
    exit_with_launcher()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    project = ProjectConfiguration(project_dir=args.output_dir)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, project_config=project)
    check_world_size(accelerator)
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise ValueError(
            f"train_control.py runs on one process or with DDP, not {accelerator.distributed_type.value}; launch "
            "without FSDP / DeepSpeed (the adapter is small)."
        )
    controlnet = None
    if os.path.isdir(os.path.join(args.base_model, "controlnet")):  # a control pipeline: train it further
        base = ARPGControlPipeline.from_pretrained(args.base_model, cpu_gemm=None, dtype=torch.float32)
        controlnet = base.controlnet
        if controlnet.config.control_type != args.control_type:
            raise ValueError(
                f"{args.base_model} follows '{controlnet.config.control_type}' maps, not '{args.control_type}'; pass "
                f"--control_type {controlnet.config.control_type}."
            )
    else:
        base = ARPGPipeline.from_pretrained(args.base_model, cpu_gemm=None)
    transformer, vqvae, scheduler = base.transformer, base.vqvae, base.scheduler
    dataset = load_data(args, accelerator, transformer.config, vqvae)
    choice = choose_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    set_seed(args.seed)
    if controlnet is None:
        controlnet = ARPGControlAdapter(
            output_size=transformer.config.hidden_size,
            patch_size=vqvae.downsample_factor,
            block_channels=args.block_channels,
            num_blocks=args.num_blocks,
            control_type=args.control_type,
        )
    transformer.requires_grad_(args.train_base)
    model = ControlTrainingModel(transformer, controlnet, args.control_dropout_prob)
    trainable = nn.ModuleList([controlnet] + ([transformer] if args.train_base else []))
    groups = weight_decay_param_groups(controlnet, args.adam_weight_decay)
    if args.train_base:
        base_lr = args.base_learning_rate if args.base_learning_rate is not None else args.learning_rate / 10
        groups += [{**group, "lr": base_lr} for group in weight_decay_param_groups(transformer, args.adam_weight_decay)]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
    from transformers import get_scheduler

    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, args.lr_warmup_steps, args.max_train_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    start_step = 0
    if choice.checkpoint is not None:
        accelerator.load_state(choice.checkpoint)
        lr_scheduler.load_state_dict(load_torch_state(os.path.join(choice.checkpoint, "lr_scheduler.pt")))
        start_step = int(read_training_state(choice.checkpoint)["global_step"])
        logger.info(f"Resumed from {choice.checkpoint} at step {start_step}.")
    global_batch = args.train_batch_size * accelerator.num_processes
    logger.info(
        f"{len(dataset)} images, {args.max_train_steps} steps, global batch {global_batch}, "
        f"{sum(p.numel() for p in trainable.parameters()):,} trainable parameters "
        f"({'adapter and decoder' if args.train_base else 'adapter'})"
    )
    model.train()  # the decoder too, frozen or not: class dropout draws in train mode
    window, window_steps, last_loss, start = 0.0, 0, None, time.perf_counter()
    step = start_step
    for batch in make_dataloader(dataset, args, accelerator, start_step):
        generator = seed_step(args.seed, step, accelerator.process_index)
        codes, controls, labels = pick_views(batch, generator, accelerator.device)
        loss = model(codes, controls, labels, generator=generator)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable.parameters(), args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window, window_steps = window + accelerator.reduce(loss.detach(), reduction="mean").item(), window_steps + 1
        if step % args.logging_steps == 0 or step == args.max_train_steps:
            last_loss = window / window_steps
            rate = window_steps * global_batch / (time.perf_counter() - start)
            logger.info(f"step {step}: loss {last_loss:.4f}, lr {lr_scheduler.get_last_lr()[0]:.3g}, {rate:.0f} img/s")
            window, window_steps, start = 0.0, 0, time.perf_counter()
        if step % args.checkpointing_steps == 0 and step < args.max_train_steps:
            state = dict(global_step=step, global_batch_size=global_batch, seed=args.seed)

            def write_extra(directory):
                save_torch_state(lr_scheduler.state_dict(), os.path.join(directory, "lr_scheduler.pt"))

            path = save_checkpoint(accelerator, args.output_dir, step, state, write_extra, args.checkpoints_total_limit)
            logger.info(f"Saved {path}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(model)
        pipeline = ARPGControlPipeline(
            transformer=trained.transformer.eval(),
            vqvae=vqvae,
            scheduler=scheduler,
            controlnet=trained.controlnet.eval(),
        )
        staging = staging_folder(args.output_dir)
        pipeline.save_pretrained(staging)
        summary = dict(steps=args.max_train_steps, global_batch_size=global_batch, final_loss=last_loss)
        write_card(args, pipeline, summary, staging)
        with open(os.path.join(staging, "training_summary.json"), "w", encoding="utf-8") as file:
            json.dump({**summary, "seed": args.seed}, file, indent=2)
        publish_staged_folder(staging, args.output_dir)
        logger.info(f"Saved the control pipeline to {args.output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    exit_process(main(parse_args()) or 0)
