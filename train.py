#!/usr/bin/env python
"""Trains (or fine-tunes) an ARPG class-conditional image generator on a token dataset.

    accelerate launch train.py --train_data_dir TOKENS --model_config ARPG-L --vqvae arpg-l --output_dir arpg-l-run \
        --train_batch_size 32 --max_train_steps 500000 --mixed_precision bf16

TOKENS comes from `pipelines/tokenize_dataset.py`. The output folder ends up as a complete pipeline
(`ARPGPipeline.from_pretrained(OUTPUT_DIR)`, with a model card) next to rotated `checkpoint-N/` folders.
Every random draw of a step (dropout, view, class dropout, order) is seeded from (seed, micro-step, process), and
the batch order is a pure function of the seed and the micro-step, so `--resume_from_checkpoint latest` continues
exactly where the run stopped.

Nothing is lost, nothing is half-written: checkpoints record the sha256 of their files and `latest` resumes from the
newest intact one; the final pipeline is staged in `OUTPUT_DIR/.final-staging` and moved into place with its
`model_index.json` last; a run whose steps stay non-finite (or whose gradients vanish) stops (`--max_bad_steps`); a
step that cannot fit in memory is refused before anything is allocated. These end the run with one line and exit
status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, broadcast_object_list, gather_object, set_seed

from arpg_hf import ARPG_PRESETS, ARPGConfig, ARPGForImageGeneration, ARPGPipeline, ARPGScheduler
from arpg_hf.atomic_io import write_atomically
from arpg_hf.memory import InsufficientMemoryError, check_memory, training_memory
from arpg_hf.optional_dependencies import require
from arpg_hf.token_dataset import (
    check_token_dataset,
    class_names_of,
    load_token_dataset,
    load_vq_model,
    token_dataloader,
)
from arpg_hf.training_checkpoints import (
    STAGING_PREFIX,
    CheckpointError,
    choose_resume_checkpoint,
    load_torch_state,
    publish_staged_folder,
    read_training_state,
    remove_incomplete_checkpoints,
    remove_stale_staging,
    save_checkpoint,
    save_torch_state,
    staging_folder,
)
from arpg_hf.training_utils import (
    BadStepGuard,
    TrainingStopped,
    arpg_loss,
    check_world_size,
    describe_distributed,
    enable_fsdp_on_cpu,
    exit_process,
    exit_with_launcher,
    local_parameters,
    scale_learning_rate,
    seed_step,
    select_crops,
    weight_decay_param_groups,
)

logger = get_logger(__name__, log_level="INFO")
METRICS_FILE = os.path.join("logs", "metrics.jsonl")
# Errors the user acts on (a damaged checkpoint, too little memory, a diverged run): one line, exit status 1.
ONE_LINE_ERRORS = (CheckpointError, InsufficientMemoryError, TrainingStopped)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train an ARPG model with accelerate.")
    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", type=str, default=None, help="Token folder (pipelines/tokenize_dataset.py).")
    data.add_argument("--dataset_name", type=str, default=None, help="Hub token dataset (codes + label columns).")
    data.add_argument("--dataset_split", type=str, default="train")
    data.add_argument("--cache_dir", type=str, default=None)
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_config",
        type=str,
        default=None,
        help=f"Preset ({', '.join(ARPG_PRESETS)}; vocab, grid and classes follow the data) or an ARPGConfig "
        "config.json / folder.",
    )
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None, help="Pipeline to fine-tune.")
    model.add_argument(
        "--vqvae",
        type=str,
        default=None,
        help="Tokenizer (pipeline or ARPGVQModel folder / Hub id), saved into the output.",
    )
    model.add_argument("--dropout", type=float, default=None, help="Override token, residual and FFN dropout.")
    model.add_argument("--class_dropout_prob", type=float, default=None, help="Override the class dropout (CFG).")
    model.add_argument("--gradient_checkpointing", action="store_true")
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--train_batch_size", type=int, default=32, help="Images per device per micro-step.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="Absolute peak rate. Default: --base_learning_rate x global batch / 256.",
    )
    optim.add_argument("--base_learning_rate", type=float, default=1e-4, help="Rate per 256 images of global batch.")
    optim.add_argument(
        "--lr_scheduler",
        type=str,
        default="cosine",
        help='transformers schedule: "cosine", "constant", "constant_with_warmup", ...',
    )
    optim.add_argument("--lr_warmup_steps", type=int, default=None)
    optim.add_argument("--lr_warmup_ratio", type=float, default=None, help="Warmup as a fraction of max_train_steps.")
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.95)
    optim.add_argument("--adam_weight_decay", type=float, default=0.05, help="On >= 2-D weights only.")
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument(
        "--max_bad_steps",
        type=int,
        default=3,
        help="Stop (exit status 1, no final pipeline) after this many optimizer steps in a row with a non-finite loss "
        "or gradient norm (their updates are skipped, and no checkpoint is written meanwhile) or a zero gradient norm. "
        "Default 3; 0 turns the check off (it costs one synchronisation per optimizer step).",
    )
    optim.add_argument("--num_train_epochs", type=int, default=100)
    optim.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides the epochs.")
    optim.add_argument("--use_ema", action="store_true")
    optim.add_argument("--ema_decay", type=float, default=0.9999)
    optim.add_argument("--allow_tf32", action="store_true")
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", type=str, required=True)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="Defaults to the accelerate config."
    )
    run.add_argument("--checkpointing_steps", type=int, default=500)
    run.add_argument("--checkpoints_total_limit", type=int, default=None)
    run.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='"latest" (the newest checkpoint whose files match their recorded sha256 sums; damaged ones are skipped '
        "with a warning, and with none intact a new run starts) or a checkpoint-N folder (a damaged one is an error).",
    )
    run.add_argument("--report_to", type=str, default="none", help='"tensorboard", "wandb", "all" or "none".')
    run.add_argument("--logging_dir", type=str, default="logs")
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--validation_steps", type=int, default=None, help="Sample a grid every N steps (and at the end).")
    run.add_argument("--validation_class_labels", type=int, nargs="+", default=None)
    run.add_argument("--validation_inference_steps", type=int, default=64)
    run.add_argument("--validation_guidance_scale", type=float, default=4.0)
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id", type=str, default=None)
    run.add_argument("--hub_private_repo", action="store_true")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser, args) -> None:
    if (args.train_data_dir is None) == (args.dataset_name is None):
        parser.error("Pass exactly one of --train_data_dir (a token folder) or --dataset_name (a Hub token dataset).")
    if (args.model_config is None) == (args.pretrained_model_name_or_path is None):
        parser.error(
            "Pass exactly one of --model_config (train from scratch) or --pretrained_model_name_or_path (fine-tune)."
        )
    if args.vqvae is None and args.pretrained_model_name_or_path is None:
        parser.error("--vqvae is required: the output pipeline holds the tokenizer the data was encoded with.")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "logging_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.max_bad_steps < 0:
        parser.error(f"--max_bad_steps must be >= 0 (0 turns the check off), got {args.max_bad_steps}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        parser.error(f"--max_train_steps must be >= 1, got {args.max_train_steps}.")
    if args.lr_warmup_steps is not None and args.lr_warmup_ratio is not None:
        parser.error("Pass --lr_warmup_steps or --lr_warmup_ratio, not both.")
    if args.lr_warmup_ratio is not None and not 0 <= args.lr_warmup_ratio <= 1:
        parser.error(f"--lr_warmup_ratio must lie in [0, 1], got {args.lr_warmup_ratio}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error("--checkpoints_total_limit must be >= 1.")
    if args.push_to_hub and args.hub_model_id is None:
        parser.error("--push_to_hub needs --hub_model_id.")
    try:  # the token dataset loads with `datasets` (the training extra): say so before anything starts
        require("datasets", "training", "train.py")
    except ImportError as error:
        parser.error(str(error))
    trackers = {"all": (), "none": ()}.get(args.report_to, (args.report_to,))  # "all": whichever is installed
    for tracker in trackers:
        try:
            require(tracker, "training" if tracker == "tensorboard" else None, f"--report_to {args.report_to}")
        except ImportError as error:
            parser.error(f"{error}, or pass --report_to none.")


# ---------------------------------------------------------------------------------------------------- setup


def _config_overrides(args) -> dict:
    overrides = {}
    if args.dropout is not None:
        overrides.update(token_dropout=args.dropout, residual_dropout=args.dropout, ffn_dropout=args.dropout)
    if args.class_dropout_prob is not None:
        overrides["class_dropout_prob"] = args.class_dropout_prob
    return overrides


def load_model_config(args, info, class_names) -> ARPGConfig:
    """A preset (its vocab, grid and classes taken from the data) or a config.json / folder (taken as it is)."""
    overrides = _config_overrides(args)
    if args.model_config in ARPG_PRESETS:
        if info is not None:
            overrides.update(vocab_size=info.codebook_size, grid_height=info.grid_height, grid_width=info.grid_width)
        if class_names:
            overrides["num_classes"] = len(class_names)
        return ARPGConfig.from_preset(args.model_config, **overrides)
    path = args.model_config
    if os.path.isdir(path):
        nested = os.path.join(path, "transformer", "config.json")
        path = nested if os.path.isfile(nested) else os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"--model_config {args.model_config!r} is neither a preset ({sorted(ARPG_PRESETS)}) nor a config.json."
        )
    config_dict = ARPGConfig.get_config_dict(path)[0]
    return ARPGConfig.from_dict({**config_dict, **overrides})


def pretrained_subfolder(source: str) -> str:
    """Where the transformer of `--pretrained_model_name_or_path` lies: `"transformer"` in a pipeline, `""` in a
    model folder or repository."""
    if os.path.isdir(source):
        return "transformer" if os.path.isfile(os.path.join(source, "transformer", "config.json")) else ""
    try:
        ARPGConfig.get_config_dict(source, subfolder="transformer")
        return "transformer"
    except OSError:
        return ""


def transformer_config(args, info, class_names) -> ARPGConfig:
    """The configuration of the model to train (read before anything is allocated), its classes named by the data."""
    if args.model_config is not None:
        config = load_model_config(args, info, class_names)
    else:
        source = args.pretrained_model_name_or_path
        config = ARPGConfig.from_pretrained(source, subfolder=pretrained_subfolder(source), **_config_overrides(args))
    if class_names:
        name_classes(config, class_names)
    return config


def load_transformer(args, config: ARPGConfig) -> ARPGForImageGeneration:
    """A new model with `config`, or the pretrained one (`--pretrained_model_name_or_path`) loaded with it."""
    if args.model_config is not None:
        return ARPGForImageGeneration(config)
    source = args.pretrained_model_name_or_path
    return ARPGForImageGeneration.from_pretrained(source, subfolder=pretrained_subfolder(source), config=config)


def name_classes(config: ARPGConfig, class_names: list[str]) -> None:
    """Writes the data's class names into `config.id2label` (what `pipeline.get_label_ids` reads). When fine-tuning
    a model with more classes, the data's classes take ids 0..len-1 and the others keep their names (or ids)."""
    if len(class_names) > config.num_classes:
        return  # the data check reports the labels that do not fit
    previous = {int(k): v for k, v in (config.id2label or {}).items()}
    names = [class_names[i] if i < len(class_names) else previous.get(i, str(i)) for i in range(config.num_classes)]
    names = [str(i) if name == f"LABEL_{i}" else name for i, name in enumerate(names)]  # transformers' placeholders
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}


def load_sampling_scheduler(args) -> ARPGScheduler:
    """The scheduler of the output pipeline: the tokenizer's or base pipeline's when it has one, else the default."""
    for source in (args.pretrained_model_name_or_path, args.vqvae):
        if source and os.path.isfile(os.path.join(source, "scheduler", "scheduler_config.json")):
            return ARPGScheduler.from_pretrained(source, subfolder="scheduler")
    return ARPGScheduler()


def prepare_data(args, accelerator):
    """Loads the token dataset (main process first, so the cache is built once) and its class names."""
    with accelerator.main_process_first():
        dataset, info = load_token_dataset(args.train_data_dir or args.dataset_name, args.dataset_split, args.cache_dir)
    return dataset, info, class_names_of(dataset, info)


def validate_data(accelerator, dataset, info, config, vqvae, source) -> None:
    """Every process scans its share of the rows; a problem anywhere stops every process before training."""
    try:
        check_token_dataset(
            dataset,
            info,
            config,
            codebook_size=vqvae.config.num_vq_embeddings if vqvae is not None else None,
            source=source,
            shard=(accelerator.process_index, accelerator.num_processes),
        )
        problem = None
    except ValueError as error:
        problem = str(error)
    problems = gather_object([problem]) if accelerator.num_processes > 1 else [problem]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(problems[0])


def check_training_memory(args, accelerator, config: ARPGConfig, sharded: bool) -> None:
    """Refuses a training step whose estimate ([`training_memory`]) exceeds the device's memory budget, on every
    process alike (`InsufficientMemoryError`), before the model, the optimizer or a batch is allocated."""
    num_shards = accelerator.num_processes if sharded else 1
    activation_bytes = 2 if accelerator.mixed_precision in ("fp16", "bf16") else 4
    required = training_memory(
        config,
        args.train_batch_size,
        config.num_image_tokens,
        args.use_ema,
        args.gradient_checkpointing,
        dtype_bytes=4,
        activation_bytes=activation_bytes,
        num_shards=num_shards,
    )
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if accelerator.device.type == "cpu" else 1
    layers = config.num_self_attention_layers + config.num_cross_attention_layers
    details = [f"{config.num_image_tokens} tokens per image", f"{layers} layers"]
    details += ["--use_ema"] * args.use_ema + ["--gradient_checkpointing"] * args.gradient_checkpointing
    details += [f"{sharing} processes on this machine"] * (sharing > 1)
    what = f"A training step with --train_batch_size {args.train_batch_size} ({', '.join(details)})"
    advice = "Lower --train_batch_size (raise --gradient_accumulation_steps to keep the global batch)"
    advice += "" if args.gradient_checkpointing else " or pass --gradient_checkpointing"
    try:
        check_memory(required * sharing, what, advice, device=accelerator.device)
        problem = None
    except InsufficientMemoryError as error:
        problem = str(error)
    problems = gather_object([problem]) if accelerator.num_processes > 1 else [problem]  # budgets differ per device
    problems = [p for p in problems if p]
    if problems:
        raise InsufficientMemoryError(problems[0])


def decide_on_main_process(accelerator, decide):
    """Runs `decide()` on the main process only and hands its result, or the `CheckpointError` it raised, to every
    process: all of them take the same decision (which checkpoint to resume from)."""
    outcome = [None, None]
    if accelerator.is_main_process:
        try:
            outcome[0] = decide()
        except CheckpointError as error:
            outcome[1] = str(error)
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise CheckpointError(outcome[1])
    return outcome[0]


def prepare_output_dir(args, accelerator) -> None:
    """Creates the output folder (once everything was checked) and deletes what interrupted runs left there."""
    if accelerator.is_main_process:
        os.makedirs(os.path.join(args.output_dir, "logs"), exist_ok=True)
        removed = remove_incomplete_checkpoints(args.output_dir) + remove_stale_staging(args.output_dir)
        if removed:
            logger.info(f"Removed what interrupted runs left: {removed}")
    accelerator.wait_for_everyone()


def training_plan(args, num_samples: int, num_processes: int) -> dict:
    global_batch = args.train_batch_size * num_processes * args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(num_samples / global_batch)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    if args.lr_warmup_ratio is not None:
        warmup = int(args.lr_warmup_ratio * max_steps)
    else:
        warmup = args.lr_warmup_steps or 0
    learning_rate = args.learning_rate or scale_learning_rate(args.base_learning_rate, global_batch)
    return dict(
        global_batch_size=global_batch,
        steps_per_epoch=steps_per_epoch,
        max_train_steps=max_steps,
        warmup_steps=warmup,
        learning_rate=learning_rate,
    )


def make_dataloader(dataset, args, accelerator, start_micro_step: int, num_micro_steps: int):
    return token_dataloader(
        dataset,
        args.train_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        seed=args.seed,
        start_batch=start_micro_step,
        num_batches=num_micro_steps,
        num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )


def check_distributed_support(args, accelerator) -> bool:
    """Checks the options against the parallelism in use. Returns whether the weights are sharded (FSDP, DeepSpeed
    ZeRO-3): the full weights then exist only when gathered, which validation and the final save do."""
    zero3 = (
        accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3
    )
    if zero3 and args.use_ema:
        raise ValueError(
            "--use_ema is not supported with DeepSpeed ZeRO-3 (its partitioned parameters are not torch "
            "tensors the EMA can follow). Use FSDP, DDP or ZeRO-1/2, or drop --use_ema."
        )
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 1) == 1 and not plugin.use_orig_params:
            raise ValueError(
                "FSDP1 needs `fsdp_use_orig_params: true` with train.py: the optimizer and its weight-decay groups are "
                "built on the original parameters before wrapping, and FSDP1 replaces them otherwise (the optimizer "
                "would update nothing). Set it, or use `fsdp_version: 2` (configs/accelerate/fsdp.yaml)."
            )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
        if ds_config.get("gradient_clipping", "auto") == "auto":  # DeepSpeed clips inside its engine (else at 1.0)
            ds_config["gradient_clipping"] = args.max_grad_norm or 0.0
    return accelerator.distributed_type == DistributedType.FSDP or zero3


def ema_parameters(accelerator, model) -> list[torch.Tensor]:
    """The tensors the EMA follows: this process's shards under FSDP (the EMA is sharded too), the parameters
    otherwise."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return local_parameters(model)
    return list(accelerator.unwrap_model(model).parameters())


def prepare_model(accelerator, model, optimizer):
    """`accelerator.prepare` for the transformer and its optimizer (built beforehand, on the original parameters)."""
    return accelerator.prepare(model, optimizer)


# ---------------------------------------------------------------------------------------------------- checkpoints


def ema_file(accelerator) -> str:
    """`ema.pt`, or under FSDP (a sharded EMA) one `ema_rank{i}.pt` per process."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return f"ema_rank{accelerator.process_index}.pt"
    return "ema.pt"


def write_checkpoint(args, accelerator, global_step, plan, lr_scheduler, ema) -> None:
    sharded_ema = ema is not None and accelerator.distributed_type == DistributedType.FSDP

    def write_extra(directory):
        save_torch_state(lr_scheduler.state_dict(), os.path.join(directory, "lr_scheduler.pt"))
        if ema is not None and not sharded_ema:
            save_torch_state(ema.state_dict(), os.path.join(directory, "ema.pt"))

    def write_local(directory):  # every process: its shard of the EMA
        save_torch_state(ema.state_dict(), os.path.join(directory, ema_file(accelerator)))

    state = dict(
        global_step=global_step,
        micro_step=global_step * args.gradient_accumulation_steps,
        train_batch_size=args.train_batch_size,
        num_processes=accelerator.num_processes,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        **plan,
    )
    path = save_checkpoint(
        accelerator,
        args.output_dir,
        global_step,
        state,
        write_extra,
        args.checkpoints_total_limit,
        write_local=write_local if sharded_ema else None,
    )
    logger.info(f"Saved {path}")


def report_resume_choice(args, choice) -> None:
    """One warning line for damaged checkpoints passed over, one for a checkpoint that records no sums."""
    if choice.skipped:
        damaged = "; ".join(f"{os.path.basename(path)}: {problem}" for path, problem in choice.skipped)
        then = f"resuming from {choice.checkpoint}" if choice.checkpoint else "none is intact: starting a new run"
        logger.warning(f"Skipping damaged checkpoint(s) ({damaged}); {then}.")
    elif choice.checkpoint is None and args.resume_from_checkpoint:
        logger.info(f"No checkpoint in {args.output_dir}: starting a new run.")
    if choice.checkpoint is not None and not choice.verified:
        logger.warning(
            f"{choice.checkpoint} records no checksums (written before checkpoints did): resuming from it "
            "without verifying its files."
        )


def resume(args, accelerator, choice, plan, lr_scheduler, ema) -> int:
    """Loads the checkpoint picked by --resume_from_checkpoint (`choice`, a `ResumeChoice`); returns the global step
    to continue from."""
    report_resume_choice(args, choice)
    checkpoint = choice.checkpoint
    if checkpoint is None:
        return 0
    state = read_training_state(checkpoint)
    for key in ("global_batch_size", "seed"):
        if state.get(key) != plan.get(key):
            logger.warning(
                f"The checkpoint was written with {key}={state.get(key)}; this run uses {plan.get(key)}: the data "
                "order will not continue exactly."
            )
    if (
        ema is not None
        and accelerator.distributed_type == DistributedType.FSDP
        and state.get("num_processes") != accelerator.num_processes
    ):
        raise CheckpointError(
            f"{checkpoint} holds an EMA sharded over {state.get('num_processes')} processes; this run has "
            f"{accelerator.num_processes}. Resume FSDP with --use_ema on the same number of processes."
        )
    accelerator.load_state(checkpoint)
    lr_scheduler.load_state_dict(load_torch_state(os.path.join(checkpoint, "lr_scheduler.pt")))
    if ema is not None:
        device = ema.shadow_params[0].device if ema.shadow_params else accelerator.device  # the parameters' device
        ema.load_state_dict(load_torch_state(os.path.join(checkpoint, ema_file(accelerator))))
        ema.to(device)  # loaded on the CPU
    logger.info(f"Resumed from {checkpoint} at step {state['global_step']}.")
    return int(state["global_step"])


# ---------------------------------------------------------------------------------------------------- logging


def log_metrics(args, accelerator, metrics: dict, step: int) -> None:
    accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, METRICS_FILE), "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        logger.info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


@torch.no_grad()
def log_validation(args, accelerator, model, vqvae, scheduler, ema, step: int) -> None:
    """Samples a grid with the current (EMA, when used) weights on the main process and logs / saves it."""
    from diffusers.utils import make_image_grid

    transformer = accelerator.unwrap_model(model)
    if ema is not None:
        ema.store(transformer.parameters())
        ema.copy_to(transformer.parameters())
    transformer.eval()
    try:
        config = transformer.config
        labels = args.validation_class_labels or list(range(min(config.num_classes, 8)))
        pipeline = ARPGPipeline(transformer=transformer, vqvae=vqvae.to(accelerator.device), scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        steps = min(args.validation_inference_steps, config.num_image_tokens)
        generator = torch.Generator().manual_seed(args.seed)
        images = pipeline(
            labels, num_inference_steps=steps, guidance_scale=args.validation_guidance_scale, generator=generator
        ).images
    finally:
        transformer.train()
        if ema is not None:
            ema.restore(transformer.parameters())
    columns = min(len(images), 8)
    padded = images + [images[-1]] * (-len(images) % columns)  # fill the last row
    grid = make_image_grid(padded, rows=len(padded) // columns, cols=columns)
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step:08d}.png")  # complete or absent: written beside it, then renamed
    write_atomically(path, lambda partial: grid.save(partial, format="PNG"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            samples = [wandb.Image(image, caption=f"class {c}") for image, c in zip(images, labels)]
            tracker.log({"validation": samples}, step=step)


# ---------------------------------------------------------------------------------------------------- final save


def full_transformer(accelerator, model, ema, sharded: bool) -> ARPGForImageGeneration | None:
    """A plain copy of the transformer with the full weights (the EMA ones when used) on the main process, None on the
    others. Every process must call it: under FSDP / ZeRO-3 it gathers the shards."""
    if sharded and ema is not None:  # a sharded EMA: swap it into the shards, gather, swap the raw weights back
        parameters = ema_parameters(accelerator, model)
        ema.store(parameters)
        ema.copy_to(parameters)
        try:
            state_dict = {k: v.detach().clone() for k, v in accelerator.get_state_dict(model).items()}
        finally:
            ema.restore(parameters)
    else:
        state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    transformer = ARPGForImageGeneration(accelerator.unwrap_model(model).config)
    transformer.load_state_dict(state_dict)
    if ema is not None and not sharded:
        ema.copy_to(transformer.parameters())
    return transformer


def save_pipeline(args, accelerator, model, vqvae, scheduler, ema, plan, summary, sharded) -> None:
    """Writes the output pipeline (EMA weights when used) with its model card; pushes it when asked.

    The pipeline is written into `OUTPUT_DIR/.final-staging` and moved into place beside the checkpoints and logs,
    `model_index.json` last (`publish_staged_folder`): a reader finds the complete pipeline or none."""
    transformer = full_transformer(accelerator, model, ema, sharded)
    if transformer is None:
        return
    pipeline = ARPGPipeline(transformer=transformer.eval(), vqvae=vqvae.to("cpu"), scheduler=scheduler)
    staging = staging_folder(args.output_dir)
    pipeline.save_pretrained(staging)
    write_model_card(args, transformer, scheduler, plan, summary, staging)
    publish_staged_folder(staging, args.output_dir)
    logger.info(f"Saved the pipeline to {args.output_dir}")
    if args.push_to_hub:
        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(args.hub_model_id, exist_ok=True, private=args.hub_private_repo).repo_id
        upload_folder(
            repo_id=repo_id,
            folder_path=args.output_dir,
            commit_message=f"Training step {summary['steps']}",
            ignore_patterns=["checkpoint-*", ".tmp-*", ".trash-*", f"{STAGING_PREFIX}*", "logs/*", "validation/*"],
        )


def write_model_card(args, transformer, scheduler, plan, summary, folder: str) -> None:
    from arpg_hf.model_card import create_model_card

    training = {
        "steps": summary["steps"],
        "global batch size": plan["global_batch_size"],
        "learning rate": f"{plan['learning_rate']:.3g} ({args.lr_scheduler}, {plan['warmup_steps']} warmup steps)",
        "optimizer": f"AdamW betas ({args.adam_beta1}, {args.adam_beta2}), weight decay {args.adam_weight_decay}",
        "mixed precision": summary["mixed_precision"],
        "EMA": f"decay {args.ema_decay}" if args.use_ema else "no",
        "final loss": f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "-",
        "data": args.dataset_name or os.path.basename(os.path.normpath(args.train_data_dir)),
    }
    card = create_model_card(
        transformer.config,
        dict(scheduler.config),
        repo_id=args.hub_model_id,
        base_model=args.pretrained_model_name_or_path,
        datasets=[args.dataset_name] if args.dataset_name else None,
        training=training,
        results=[],
        num_parameters=transformer.num_parameters(),
    )
    card.save(os.path.join(folder, "README.md"))


# ---------------------------------------------------------------------------------------------------- training


def bad_step_guard(args, accelerator) -> BadStepGuard:
    """The `--max_bad_steps` guard. It skips non-finite updates itself unless fp16's gradient scaler does (it also
    stops counting a non-finite gradient norm then: the scaler's calibration) or DeepSpeed steps inside `backward`."""
    uses_scaler = getattr(accelerator, "scaler", None) is not None
    can_skip = not uses_scaler and accelerator.distributed_type != DistributedType.DEEPSPEED
    return BadStepGuard(args.max_bad_steps, can_skip=can_skip, uses_scaler=uses_scaler)


def check_step(args, accelerator, guard: BadStepGuard, grad_norm, step: int) -> bool:
    """Checks an optimizer step before its update (every process); returns whether to skip the update. Raises
    `TrainingStopped` on the `--max_bad_steps`-th bad step in a row."""
    problem, skip = guard.end_step(accelerator, grad_norm, step)
    if problem:
        action = "its update is skipped" if skip else "it is applied"
        logger.warning(
            f"Step {step}: {problem}; {action} (bad step {guard.streak} in a row, "
            f"--max_bad_steps {args.max_bad_steps} stop the run)."
        )
    return skip


class MetricsWindow:
    """The losses and throughput since the last log line (the loss is summed on the device: no synchronisation)."""

    def __init__(self, device, plan: dict, tokens_per_image: int):
        self.plan, self.tokens_per_image = plan, tokens_per_image
        self.loss = torch.zeros((), device=device)
        self.micro_steps, self.steps, self.start = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss.detach().float()
        self.micro_steps += 1

    def flush(self, accelerator, learning_rate: float, global_step: int, grad_norm) -> dict:
        """The window's metrics (the loss averaged over processes); starts a new window."""
        elapsed = time.perf_counter() - self.start
        images = self.steps * self.plan["global_batch_size"]
        metrics = {
            "loss": accelerator.reduce(self.loss / self.micro_steps, reduction="mean").item(),
            "lr": learning_rate,
            "epoch": global_step / self.plan["steps_per_epoch"],
            "samples_per_second": images / elapsed,
            "tokens_per_second": images * self.tokens_per_image / elapsed,
        }
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        self.loss.zero_()
        self.micro_steps, self.steps, self.start = 0, 0, time.perf_counter()
        return metrics


def checkpoint_unless_bad(args, accelerator, guard, global_step, plan, lr_scheduler, ema) -> None:
    """Writes checkpoint-N, unless step N was bad (the same on every process: the guard's flags were all-reduced)."""
    if guard.streak:
        logger.warning(
            f"Not writing checkpoint-{global_step}: step {global_step} was bad; the previous checkpoint "
            "stays the latest."
        )
        return
    write_checkpoint(args, accelerator, global_step, plan, lr_scheduler, ema)


def train(args, accelerator, model, optimizer, lr_scheduler, ema, dataset, plan, start_step, validate):
    """The loop; returns the mean loss of the last logging window (None when no step ran)."""
    from tqdm.auto import tqdm

    accumulation = args.gradient_accumulation_steps
    max_steps = plan["max_train_steps"]
    tokens_per_image = accelerator.unwrap_model(model).config.num_image_tokens
    loader = make_dataloader(
        dataset, args, accelerator, start_step * accumulation, (max_steps - start_step) * accumulation
    )
    first_rows = loader.batch_sampler.batch_indices(start_step * accumulation) if max_steps > start_step else []
    logger.info(
        f"process {accelerator.process_index}/{accelerator.num_processes}: first micro-batch rows {first_rows}",
        main_process_only=False,
    )
    progress = tqdm(range(max_steps), initial=start_step, desc="steps", disable=not accelerator.is_local_main_process)
    global_step, micro_step, last_loss = start_step, start_step * accumulation, None
    window = MetricsWindow(accelerator.device, plan, tokens_per_image)
    guard = bad_step_guard(args, accelerator)
    model.train()
    try:  # the progress bar ends its line, also when a bad streak stops the run
        for batch in loader:
            generator = seed_step(args.seed, micro_step, accelerator.process_index)
            skipped = False
            with accelerator.accumulate(model):
                views = select_crops(batch["codes"], generator)  # (B, L): one view per image, picked before the copy
                views, labels = views.to(accelerator.device, non_blocking=True), batch["labels"].to(accelerator.device)
                loss = arpg_loss(model, views, labels, generator=generator)
                accelerator.backward(loss)
                guard.add_loss(loss)
                grad_norm = None
                if accelerator.sync_gradients:  # the step is checked before its update (TrainingStopped at the last)
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
                    skipped = check_step(args, accelerator, guard, grad_norm, global_step + 1)
                if not skipped:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window.add(loss)
            micro_step += 1
            if not accelerator.sync_gradients:
                continue
            if not skipped and not accelerator.optimizer_step_was_skipped:
                lr_scheduler.step()
            if ema is not None and not skipped:
                ema.step(ema_parameters(accelerator, model))
            global_step += 1
            window.steps += 1
            progress.update(1)
            if global_step % args.logging_steps == 0 or global_step in (start_step + 1, max_steps):
                metrics = window.flush(accelerator, lr_scheduler.get_last_lr()[0], global_step, grad_norm)
                log_metrics(args, accelerator, metrics, global_step)
                last_loss = metrics["loss"]
                progress.set_postfix(loss=f"{last_loss:.4f}")
            if global_step % args.checkpointing_steps == 0:
                checkpoint_unless_bad(args, accelerator, guard, global_step, plan, lr_scheduler, ema)
            if args.validation_steps and global_step % args.validation_steps == 0:
                validate(global_step)  # every process: a sharded model is gathered first
            if global_step >= max_steps:
                break
    finally:
        progress.close()
    return last_loss


def check_run(args, accelerator, sharded: bool):
    """Everything checked before the output folder is created and before anything large is allocated: the data
    against the model's configuration and the tokenizer, the memory of a step, the checkpoint to resume from.
    Returns the dataset, the transformer's configuration, the tokenizer and the `ResumeChoice`."""
    dataset, info, class_names = prepare_data(args, accelerator)
    config = transformer_config(args, info, class_names)
    vqvae = load_vq_model(args.vqvae or args.pretrained_model_name_or_path)
    validate_data(accelerator, dataset, info, config, vqvae, args.train_data_dir or args.dataset_name)
    check_training_memory(args, accelerator, config, sharded)
    choice = decide_on_main_process(
        accelerator, lambda: choose_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    )
    return dataset, config, vqvae, choice


def main(args):
    exit_with_launcher()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project,
    )
    enable_fsdp_on_cpu(accelerator)  # accelerate runs an FSDP config as DDP on CPU otherwise
    check_world_size(accelerator)
    logger.info(f"Parallelism: {describe_distributed(accelerator)}")
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    sharded = check_distributed_support(args, accelerator)
    dataset, config, vqvae, choice = check_run(args, accelerator, sharded)
    prepare_output_dir(args, accelerator)
    scheduler = load_sampling_scheduler(args)
    set_seed(args.seed)  # the initial weights
    model = load_transformer(args, config)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    plan = training_plan(args, len(dataset), accelerator.num_processes)
    plan["seed"] = args.seed
    optimizer = torch.optim.AdamW(
        weight_decay_param_groups(model, args.adam_weight_decay),
        lr=plan["learning_rate"],
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    from transformers import get_scheduler

    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, plan["warmup_steps"], plan["max_train_steps"])
    num_parameters = model.num_parameters()  # before any sharding
    model, optimizer = prepare_model(accelerator, model, optimizer)
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(ema_parameters(accelerator, model), decay=args.ema_decay)
    start_step = resume(args, accelerator, choice, plan, lr_scheduler, ema)
    if accelerator.is_main_process:
        hyperparameters = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("arpg", config=hyperparameters)
    logger.info(
        f"{len(dataset)} images, {plan['steps_per_epoch']} steps per epoch, {plan['max_train_steps']} steps, global "
        f"batch {plan['global_batch_size']}, lr {plan['learning_rate']:.3g}, {accelerator.num_processes} process(es), "
        f"{num_parameters:,} parameters"
    )

    def validate(step):  # called on every process
        if not sharded:
            if accelerator.is_main_process:
                log_validation(args, accelerator, model, vqvae, scheduler, ema, step)
            return
        transformer = full_transformer(accelerator, model, ema, sharded)  # EMA weights already in
        if transformer is not None:
            log_validation(args, accelerator, transformer.to(accelerator.device), vqvae, scheduler, None, step)

    last_loss = None
    if start_step < plan["max_train_steps"]:
        last_loss = train(args, accelerator, model, optimizer, lr_scheduler, ema, dataset, plan, start_step, validate)
    accelerator.wait_for_everyone()
    if args.validation_steps and plan["max_train_steps"] % args.validation_steps:
        validate(plan["max_train_steps"])  # the last step, unless the loop just sampled it
    summary = dict(steps=plan["max_train_steps"], final_loss=last_loss, mixed_precision=accelerator.mixed_precision)
    save_pipeline(args, accelerator, model, vqvae, scheduler, ema, plan, summary, sharded)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def cli(argv=None) -> int:
    """`python train.py ...` / `accelerate launch train.py ...`: returns the exit status. A damaged checkpoint, a step
    that cannot fit in memory and a diverged run end with one line on stderr (from the main process) and status 1."""
    args = parse_args(argv)
    try:
        main(args)
    except ONE_LINE_ERRORS as error:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"train.py: error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return 1
    return 0


if __name__ == "__main__":
    exit_process(cli())
