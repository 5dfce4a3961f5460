#!/usr/bin/env python
"""Masked-image-modeling pretraining for every hf_mim method, with Accelerate on streaming datasets.

    accelerate launch training_scripts/run_mim.py                      # embedded demo data, small dBOT
    accelerate launch training_scripts/run_mim.py --dataset_name <hub dataset> --model_type dbot \
        --model_size base --per_device_train_batch_size 128 --num_train_epochs 800 --num_stages 2

One generic loop. Methods differ only through their config and the event methods their
`...ForMaskedImageModeling` class defines, which the loop calls when present:
- `mask_generator()`: how the collator masks each image;
- `start_new_stage()`: at each stage boundary when `--num_stages` > 1 (dBOT's bootstrapping);
- `on_train_step_end(progress)`: after every optimizer step, with progress in [0, 1] (momentum teachers);
- `attention_refresh_steps(total_steps)` + `attention_scores(pixel_values)`: after those steps, one
  pass over the data reads the model's attention on every whole image into the mask generator's
  per-example store (attention-driven masking, AMT); the store is saved with every checkpoint;
- `momentum_backbone()`: at the end, the momentum encoder is saved as a backbone folder of its own.

Resume is exact: augmentation and masks are a pure function of (seed, epoch, example id), and a
resumed run skips the batches each rank had already consumed in its current epoch.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForMaskedImageModeling

import hf_mim
from hf_mim.data import (
    DEFAULT_MAX_IMAGE_PIXELS,
    PretrainingCollator,
    ResizeTransform,
    count_examples,
    embedded_pretraining_dir,
    load_image_stream,
    make_dataloader,
    max_pixels_argument,
    prepare_stream,
)
from hf_mim.hub import HubPushError, build_image_processor, finish_run_folder, save_hub_folder
from hf_mim.overrides import parse_overrides
from hf_mim.registry import family_for
from hf_mim.training import (
    stream_batches,
    NonFiniteLossError,
    RunHyperparameters,
    StagedSchedule,
    UserInputError,
    apply_this_runs_hyperparameters,
    build_adamw,
    check_finite_loss,
    check_local_path,
    check_positive_flags,
    claim_output_dir,
    linear_scaled_lr,
    load_checkpoint,
    make_accelerator,
    optimizer_hyperparameters,
    read_trainer_state,
    refresh_attention_maps,
    report_user_errors,
    save_checkpoint,
    tracker_config,
    weight_decay_param_groups,
)
from hf_mim.visualize import save_mim_picture

logger = logging.getLogger("run_mim")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (none given: the embedded sample photos)")
    data.add_argument("--dataset_name", help="a Hub dataset name (streamed)")
    data.add_argument("--dataset_config_name")
    data.add_argument("--train_dir", help="local folder of parquet files, WebDataset .tar shards, or images")
    data.add_argument("--train_split", default="train")
    data.add_argument("--image_column_name", help="default: detected")
    data.add_argument("--shuffle_buffer_size", type=int, default=1000)
    data.add_argument("--num_train_examples", type=int, help="stream length, when epochs are asked for and unknown")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    data.add_argument(
        "--max_image_pixels", type=max_pixels_argument, default=DEFAULT_MAX_IMAGE_PIXELS,
        help="decode budget per image: larger JPEGs are decoded at 1/2-1/8 scale, other larger images skipped "
        "and counted ('none': no budget)",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--model_type", default="dbot", help="an hf_mim method")
    model.add_argument("--model_size", help="a named size of the method (tiny, demo, small, base, large, huge)")
    model.add_argument("--model_name_or_path", help="start from these weights (hf_mim folder or Hub id)")
    model.add_argument(
        "--ignore_missing_weights", action="store_true",
        help="with --model_name_or_path: start the parts its weights lack (e.g. the decoder or teacher of a "
        "classifier checkpoint) from random initialisation instead of refusing",
    )
    model.add_argument("--config_name_or_path", help="start from this config, random weights")
    model.add_argument("--config_overrides", help="e.g. 'drop_path_rate=0.1,teacher_depth=0'")
    model.add_argument("--image_size", type=int)
    model.add_argument("--mask_ratio", type=float)
    model.add_argument(
        "--teacher_name_or_path", help="a frozen teacher for methods that distil one (MaskDistill): local folder or Hub id"
    )
    model.add_argument("--attn_implementation", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    model.add_argument("--gradient_checkpointing", action="store_true")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--per_device_train_batch_size", type=int, default=32)
    optim.add_argument("--learning_rate", type=float, help="absolute lr; default base_learning_rate x batch / 256")
    optim.add_argument("--base_learning_rate", type=float, default=1.5e-4)
    optim.add_argument("--weight_decay", type=float, default=0.05)
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.95)
    optim.add_argument("--max_grad_norm", type=float, default=None, help="gradient clipping (dBOT ViT-B: 3.0)")
    optim.add_argument("--num_train_epochs", type=float)
    optim.add_argument("--max_train_steps", type=int, help="optimizer steps; overrides epochs")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--lr_scheduler_type", default="cosine", choices=["cosine", "constant"])
    optim.add_argument("--num_warmup_steps", type=int, help="per stage; default 5%% of a stage")
    optim.add_argument("--min_lr_ratio", type=float, default=0.0)
    optim.add_argument("--num_stages", type=int, default=1, help="dBOT bootstrap stages (the schedule restarts per stage)")
    optim.add_argument("--seed", type=int, default=0)

    run = parser.add_argument_group("outputs")
    run.add_argument("--output_dir", default="outputs/run_mim")
    run.add_argument("--overwrite_output_dir", action="store_true", help="delete the checkpoints, logs and pictures of an earlier run in --output_dir")
    run.add_argument("--checkpointing_steps", type=int, help="save a resumable checkpoint every N steps")
    run.add_argument("--checkpoints_total_limit", type=int, default=2)
    run.add_argument(
        "--resume_from_checkpoint",
        help="a checkpoint folder, or 'latest' (the newest in --output_dir; none yet: start from scratch). "
        "This run's lr, schedule, warm-up, weight decay and length apply after the resume",
    )
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--picture_steps", type=int, help="save a picture of the model's work every N steps")
    run.add_argument("--with_tracking", action="store_true")
    run.add_argument("--report_to", default="tensorboard")
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id")
    run.add_argument("--hub_token")
    run.add_argument("--hub_private_repo", action="store_true")
    run.add_argument("--license", default="apache-2.0")
    args = parser.parse_args(argv)
    validate_args(args, parser)
    if uses_embedded_data(args):
        apply_demo_defaults(args, parser)
    return args


# The embedded sample set is ~20 photos: the demo trains a small model for many short epochs with a
# larger learning rate than the ImageNet recipe, so that the loss visibly falls within minutes on a CPU.
EMBEDDED_DEMO_DEFAULTS = {
    "model_size": "demo",
    "per_device_train_batch_size": 16,
    "learning_rate": 1e-3,
    "num_train_epochs": 400.0,
    "picture_steps": 100,
}


def apply_demo_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill the demo settings for every flag the user left at its default."""
    for name, value in EMBEDDED_DEMO_DEFAULTS.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.dataset_name and args.train_dir:
        parser.error("give either --dataset_name or --train_dir, not both")
    if args.model_name_or_path and args.config_name_or_path:
        parser.error("give either --model_name_or_path or --config_name_or_path, not both")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    check_positive_flags(
        parser, args,
        at_least_one=("per_device_train_batch_size", "gradient_accumulation_steps", "num_stages", "logging_steps",
                      "checkpointing_steps", "picture_steps", "max_train_steps", "num_train_examples", "image_size"),
        positive=("learning_rate", "base_learning_rate", "num_train_epochs", "max_grad_norm"),
        non_negative=("weight_decay", "num_warmup_steps", "shuffle_buffer_size", "dataloader_num_workers",
                      "checkpoints_total_limit", "min_lr_ratio"),
        fractions=("mask_ratio", "adam_beta1", "adam_beta2"),
    )
    if args.min_lr_ratio > 1:
        parser.error(f"--min_lr_ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.max_train_steps is not None and args.max_train_steps < args.num_stages:
        parser.error("--max_train_steps must be at least --num_stages")


def uses_embedded_data(args: argparse.Namespace) -> bool:
    return not (args.dataset_name or args.train_dir)


def build_model(args: argparse.Namespace, saved_config: dict | None = None):
    """The ForMaskedImageModeling model from weights, a config, or a named size (+ overrides)."""
    family = family_for(args.model_type)
    overrides = parse_overrides(args.config_overrides)
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    if args.mask_ratio is not None:
        overrides["mask_ratio"] = args.mask_ratio
    if args.teacher_name_or_path is not None:
        overrides["teacher_name_or_path"] = args.teacher_name_or_path
    known_fields = set(family.config_class().to_dict())
    unknown = sorted(name for name in overrides if name not in known_fields)
    if unknown:
        raise UserInputError(f"{family.config_class.__name__} has no field(s) {', '.join(unknown)} (set on the command line)")
    kwargs = {"attn_implementation": args.attn_implementation}
    if saved_config is not None:  # resuming: the checkpoint's config (e.g. after a dBOT stage change)
        config = family.config_class.from_dict(saved_config)
        return family.masked_image_modeling_class(config), config
    if args.model_name_or_path:
        check_local_path("--model_name_or_path", args.model_name_or_path)
        model, loading = AutoModelForMaskedImageModeling.from_pretrained(
            args.model_name_or_path, output_loading_info=True, **overrides, **kwargs
        )
        check_pretraining_weights(args, loading["missing_keys"])
        return model, model.config
    if args.config_name_or_path:
        config = AutoConfig.from_pretrained(args.config_name_or_path, **overrides)
    else:
        size = args.model_size or "base"
        config = family.config_class.from_preset(size, **overrides)
    config._attn_implementation = args.attn_implementation
    model = family.masked_image_modeling_class(config)
    return model, config


def check_pretraining_weights(args: argparse.Namespace, missing_keys) -> None:
    """Refuse weights that lack parts of the pretraining model (a classifier checkpoint has no decoder,
    teacher or predictor): they would silently train from random initialisation."""
    if not missing_keys or args.ignore_missing_weights:
        if missing_keys:
            logger.warning("--ignore_missing_weights: %d tensors start from random initialisation", len(missing_keys))
        return
    parts = sorted({".".join(key.split(".")[:2]) for key in missing_keys})
    shown = ", ".join(f"{part}.*" for part in parts[:8]) + (f" and {len(parts) - 8} more" if len(parts) > 8 else "")
    raise UserInputError(
        f"--model_name_or_path {args.model_name_or_path} lacks {len(missing_keys)} tensors of the pretraining model "
        f"({shown}): it is not a pretraining checkpoint (a classifier?). Pass --ignore_missing_weights to start "
        "those parts from random initialisation"
    )


def data_source(args: argparse.Namespace) -> dict:
    """The training data's source: keywords of load_image_stream and count_examples."""
    if uses_embedded_data(args):
        return {"train_dir": str(embedded_pretraining_dir()), "split": "train"}
    return {
        "dataset_name": args.dataset_name,
        "dataset_config_name": args.dataset_config_name,
        "train_dir": args.train_dir,
        "split": args.train_split,
    }


def load_stream(args: argparse.Namespace):
    if uses_embedded_data(args):
        return load_image_stream(**data_source(args))
    return load_image_stream(**data_source(args), image_column_name=args.image_column_name)


def count_stream(args: argparse.Namespace, progress: bool) -> int:
    """Number of training examples, from what the source records (hf_mim.data.count_examples)."""
    return count_examples(**data_source(args), progress=progress)  # a ValueError is a one-line user error


def model_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch entries the model's forward accepts (the rest: ids, counters)."""
    accepted = inspect.signature(model.forward).parameters
    return {key: value for key, value in batch.items() if key in accepted}


def save_picture(model, batch: dict, path: Path) -> None:
    """Run the model on up to 4 images of `batch` and save what it does."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        inputs = {key: value[:4] for key, value in model_inputs(model, batch).items()}
        output = model(**inputs)
    model.train(was_training)
    save_mim_picture(
        path,
        inputs["pixel_values"],
        output.bool_masked_pos,
        model.config.patch_size,
        patch_loss=getattr(output, "patch_loss", None),
        reconstruction=getattr(output, "reconstruction", None),
        patch_scores=getattr(output, "patch_scores", None),
        patch_labels=getattr(output, "patch_labels", None),
    )


def run_summary(args, config, total_batch: int, lr: float, total_steps: int, elapsed: float, world: int) -> dict:
    return {
        "method": config.model_type,
        "data": "embedded sample photos (hf_mim demo)" if uses_embedded_data(args) else (args.dataset_name or args.train_dir),
        "image size": config.image_size,
        "mask ratio": config.mask_ratio,
        "optimizer steps": total_steps,
        "stages": args.num_stages,
        "batch (total)": total_batch,
        "learning rate": f"{lr:.3g} (AdamW {args.adam_beta1}, {args.adam_beta2}; weight decay {args.weight_decay})",
        "schedule": f"{args.lr_scheduler_type}, warm-up {args.num_warmup_steps} steps per stage",
        "processes": world,
        "wall time": f"{elapsed / 60:.1f} min",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with report_user_errors("run_mim.py") as phase:
            return train(args, phase)
    except NonFiniteLossError as error:
        logger.error("%s", error)
        return 1


def train(args: argparse.Namespace, phase=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args, output_dir)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(args.seed)

    # --- resume bookkeeping first: the checkpoint's config decides the model's shape ---
    resume_path, run_id = claim_output_dir(args, accelerator, output_dir)
    saved_state = read_trainer_state(resume_path) if resume_path else None

    model, config = build_model(args, saved_state["model_config"] if saved_state else None)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.num_stages > 1 and not hasattr(model, "start_new_stage"):
        raise UserInputError(f"--num_stages {args.num_stages}: {type(model).__name__} has no training stages")

    # --- data ---
    raw_stream, image_column, _ = load_stream(args)
    transform = family_for(config.model_type).pretraining_transform(config)
    stream = prepare_stream(
        raw_stream,
        image_column,
        seed=args.seed,
        buffer_size=args.shuffle_buffer_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        max_image_pixels=args.max_image_pixels,
        decode_min_side=getattr(transform, "min_decode_side", None),  # large JPEGs decoded at reduced scale
    )
    mask_generator = model.mask_generator()
    collator = PretrainingCollator(transform, mask_generator=mask_generator, seed=args.seed)
    dataloader = make_dataloader(
        stream,
        collator,
        batch_size=args.per_device_train_batch_size,
        num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )

    # --- length of training ---
    world = accelerator.num_processes
    total_batch = args.per_device_train_batch_size * world * args.gradient_accumulation_steps
    if args.max_train_steps is not None:
        total_steps = args.max_train_steps
    else:
        epochs = args.num_train_epochs if args.num_train_epochs is not None else 1
        examples = args.num_train_examples or count_stream(args, progress=accelerator.is_local_main_process)
        total_steps = max(args.num_stages, math.ceil(epochs * examples / total_batch))
        logger.info("%d examples x %s epochs / batch %d = %d optimizer steps", examples, epochs, total_batch, total_steps)
    refresh_steps = set(model.attention_refresh_steps(total_steps)) if hasattr(model, "attention_refresh_steps") else set()
    attention_store = getattr(mask_generator, "store", None)
    refresh_loader = None
    if refresh_steps:
        # whole images, in stream order, every example once (no shuffle, no dropped last batch)
        refresh_stream = prepare_stream(
            raw_stream, image_column, seed=args.seed, buffer_size=0,
            rank=accelerator.process_index, world_size=accelerator.num_processes,
            max_image_pixels=args.max_image_pixels,
        )
        refresh_loader = make_dataloader(
            refresh_stream,
            PretrainingCollator(ResizeTransform(config.image_size), seed=args.seed),
            batch_size=args.per_device_train_batch_size,
            num_workers=args.dataloader_num_workers,
            drop_last=False,
            pin_memory=accelerator.device.type == "cuda",
        )
        logger.info("attention refresh after steps %s", sorted(refresh_steps))
    steps_per_stage = total_steps // args.num_stages
    stage_lengths = [steps_per_stage] * (args.num_stages - 1) + [total_steps - steps_per_stage * (args.num_stages - 1)]
    if args.num_warmup_steps is None:
        args.num_warmup_steps = max(1, round(0.05 * steps_per_stage))

    # --- optimisation ---
    lr = args.learning_rate if args.learning_rate is not None else linear_scaled_lr(args.base_learning_rate, total_batch)
    optimizer = build_adamw(
        weight_decay_param_groups(model, args.weight_decay), lr=lr, betas=(args.adam_beta1, args.adam_beta2)
    )
    schedule = StagedSchedule(
        optimizer,
        base_lr=lr,
        steps_per_stage=stage_lengths,
        warmup_steps=args.num_warmup_steps,
        min_lr_ratio=args.min_lr_ratio,
        kind=args.lr_scheduler_type,
    )
    hyperparameters = RunHyperparameters(
        learning_rate=lr, weight_decay=args.weight_decay, lr_scheduler_type=args.lr_scheduler_type,
        num_warmup_steps=args.num_warmup_steps, min_lr_ratio=args.min_lr_ratio, total_steps=total_steps,
        max_grad_norm=args.max_grad_norm, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    fresh_groups = optimizer_hyperparameters(optimizer)
    accelerator.register_for_checkpointing(schedule)
    if attention_store is not None:
        accelerator.register_for_checkpointing(attention_store)  # per-example maps resume with the run
    unwrapped = accelerator.unwrap_model(model)

    global_step, start_epoch, skip_batches = 0, 0, 0
    if resume_path is not None:
        trainer_state = load_checkpoint(accelerator, resume_path)
        global_step = trainer_state["global_step"]
        position = trainer_state["positions"][accelerator.process_index]
        start_epoch, skip_batches = position["epoch"], position["batches"]
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, global_step, start_epoch, skip_batches)
        apply_this_runs_hyperparameters(
            optimizer, schedule, fresh_groups, trainer_state.get("hyperparameters"), hyperparameters, global_step
        )

    if args.with_tracking:
        accelerator.init_trackers("run_mim", config=tracker_config(args))

    logger.info(
        "training %s (%s) for %d steps, batch %d (%d per device x %d processes x %d accumulation), lr %.3g",
        type(unwrapped).__name__, config.model_type, total_steps, total_batch, args.per_device_train_batch_size,
        world, args.gradient_accumulation_steps, lr,
    )
    progress = tqdm(total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="pretraining")
    last_checkpoint = resume_path
    images_seen, window_start, window_images = 0, time.perf_counter(), 0
    skipped_total, converted_total = 0, 0
    micro_step = 0
    run_start = time.perf_counter()
    batch = None
    model.train()
    batches = stream_batches(dataloader, stream, collator, start_epoch, skip_batches)
    position = {"epoch": start_epoch, "batches": skip_batches}
    if phase is not None:
        phase.training_started()
    while global_step < total_steps:
        if micro_step == 0 and schedule.is_stage_boundary(global_step):
            unwrapped.start_new_stage()
            logger.info("step %d: stage %d starts (teacher <- student, student re-initialised)", global_step, unwrapped.config.stage)
        epoch, index, batch = next(batches)
        position = {"epoch": epoch, "batches": index + 1}
        batch = collator.finish(batch, epoch)
        batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
        skipped_total += int(batch.get("images_skipped", torch.zeros(())).sum())
        converted_total += int(batch.get("images_converted", torch.zeros(())).sum())
        with accelerator.accumulate(model):
            output = model(**model_inputs(unwrapped, batch))
            loss = output.loss
            check_finite_loss(loss, global_step, last_checkpoint, accelerator=accelerator, inputs=batch["pixel_values"])
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        micro_step = (micro_step + 1) % args.gradient_accumulation_steps
        window_images += batch["pixel_values"].shape[0] * world
        if not accelerator.sync_gradients:
            continue
        schedule.step()
        global_step += 1
        progress.update(1)
        if hasattr(unwrapped, "on_train_step_end"):
            unwrapped.on_train_step_end(progress=global_step / total_steps)
        if global_step in refresh_steps:
            refresh = refresh_attention_maps(model, attention_store, refresh_loader, accelerator)
            logger.info(
                "step %d: attention maps refreshed (%d images, %.1f s)", global_step, refresh["maps"], refresh["seconds"]
            )

        if global_step % args.logging_steps == 0 or global_step == total_steps:
            elapsed = time.perf_counter() - window_start
            loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
            logs = {
                "loss": loss_value,
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_second": window_images / max(elapsed, 1e-9),
                "stage": unwrapped.config.stage if hasattr(unwrapped.config, "stage") else 0,
                "images_skipped": skipped_total,
                "images_converted": converted_total,
            }
            if "bool_thrown_pos" in batch:  # attention-driven masking: 0 until the first refresh
                logs["patches_thrown_per_image"] = float(batch["bool_thrown_pos"].sum(dim=1).float().mean())
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{logs['lr']:.2e}")
            if args.with_tracking:
                accelerator.log(logs, step=global_step)
            logger.info("step %d %s", global_step, json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in logs.items()}))
            window_start, window_images = time.perf_counter(), 0
        if args.picture_steps and global_step % args.picture_steps == 0 and accelerator.is_main_process:
            save_picture(unwrapped, batch, output_dir / "pictures" / f"step-{global_step:07d}.png")
        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
            last_checkpoint = save_training_checkpoint(
                accelerator, output_dir, global_step, position, unwrapped, args.checkpoints_total_limit,
                run_id=run_id, hyperparameters=hyperparameters.to_dict(),
            )
    progress.close()
    accelerator.wait_for_everyone()

    elapsed = time.perf_counter() - run_start
    status = 0
    if accelerator.is_main_process:
        if skipped_total or converted_total:
            logger.warning("images skipped (undecodable/truncated/tiny/over --max_image_pixels): %d, converted to RGB or reduced: %d", skipped_total, converted_total)
        try:
            write_outputs(args, accelerator, unwrapped, batch, output_dir, total_batch, lr, total_steps, elapsed, world)
        except HubPushError as error:
            logger.error("%s", error)
            status = 1
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return status


def save_training_checkpoint(accelerator, output_dir: Path, step: int, position: dict, model, total_limit, **run) -> Path:
    """`run`: the run's identity and hyper-parameters (`run_id`, `hyperparameters`), recorded for resumes."""
    positions = gather_positions(accelerator, position)
    trainer_state = {
        "global_step": step,
        "positions": positions,
        "model_config": model.config.to_dict(),
        **run,
    }
    return save_checkpoint(accelerator, output_dir, step, trainer_state, total_limit=total_limit)


def gather_positions(accelerator, position: dict) -> list[dict]:
    """Every rank's (epoch, batches consumed) — ranks read different shards and may differ."""
    local = torch.tensor([[position["epoch"], position["batches"]]], device=accelerator.device)
    gathered = accelerator.gather(local).cpu().tolist()
    return [{"epoch": int(epoch), "batches": int(batches)} for epoch, batches in gathered]


def write_outputs(args, accelerator, model, batch, output_dir: Path, total_batch, lr, total_steps, elapsed, world) -> None:
    """The Hub-ready folder: weights, config with full auto_map, code, processor, card, args, pictures."""
    save_hub_folder(model, output_dir, image_processor=build_image_processor(model.config.image_size))
    if hasattr(model, "momentum_backbone"):
        # Methods with a momentum teacher are linear-probed on it (ExtreMA): a ready backbone folder.
        momentum_dir = save_hub_folder(model.momentum_backbone(), output_dir / "momentum_encoder")
        logger.info("wrote the momentum encoder (linear-probe backbone) to %s", momentum_dir)
    if batch is not None:
        save_picture(model, batch, output_dir / "mim_picture.png")
    summary = run_summary(args, model.config, total_batch, lr, total_steps, elapsed, world)
    finish_run_folder(output_dir, model, args, run=summary, is_demo=uses_embedded_data(args))

if __name__ == "__main__":
    sys.exit(main())
