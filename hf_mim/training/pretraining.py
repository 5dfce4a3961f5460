"""Pretraining tooling for run_mim.py: the `...ForMaskedImageModeling` model from weights, a config or
a named size (with the command line's config fields), and a picture of what it does."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..data import batch_to_device, embedded_digits_dir, load_image_stream
from .arguments import uses_embedded_data
from .checkpoint import write_json_atomic
from .conventions import hold_out, hub_kwargs, limit, output_image_processor
from .loop import forward_inputs
from .overrides import parse_overrides
from .run_setup import UserInputError, check_local_path
from .visualize import log_pictures, save_mim_picture

logger = logging.getLogger(__name__)


def build_pretraining_model(args, saved_config: dict | None = None):
    """(model, config) from --model_name_or_path, --config_name_or_path or --model_type/--model_size, with
    --config_overrides, --image_size, --patch_size, --mask_ratio, --mask_patch_size and --teacher_name_or_path, and the Hub
    flags (--cache_dir, --model_revision, --token, --trust_remote_code); `saved_config`: a resumed
    checkpoint's config (e.g. after a dBOT stage change), which wins."""
    from transformers import AutoConfig, AutoModelForMaskedImageModeling

    from ..auto import family_for

    family = family_for(args.model_type)
    overrides = {**getattr(args, "recipe_config", {}), **parse_overrides(args.config_overrides)}  # the user's win
    for name in ("image_size", "patch_size", "mask_ratio", "mask_patch_size", "teacher_name_or_path"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    reads_teacher = hasattr(family.config_class, "teacher_width_of")  # other methods: refused by name below
    if args.teacher_name_or_path is not None and "teacher_hidden_size" not in overrides and reads_teacher:
        try:  # the head's output width
            overrides["teacher_hidden_size"] = family.config_class.teacher_width_of(
                args.teacher_name_or_path, overrides.get("teacher_layer", "last_hidden_state")
            )
        except (OSError, ValueError) as error:
            raise UserInputError(f"--teacher_name_or_path {args.teacher_name_or_path}: cannot read its config ({error})") from error
    known_fields = set(family.config_class().to_dict())
    unknown = sorted(name for name in overrides if name not in known_fields)
    if unknown:
        raise UserInputError(f"{family.config_class.__name__} has no field(s) {', '.join(unknown)} (set on the command line)")
    if saved_config is not None:
        config = family.config_class.from_dict(saved_config)
        return family.masked_image_modeling_class(config), config
    if args.model_name_or_path:
        check_local_path("--model_name_or_path", args.model_name_or_path)
        model, loading = AutoModelForMaskedImageModeling.from_pretrained(
            args.model_name_or_path, output_loading_info=True, attn_implementation=args.attn_implementation,
            **hub_kwargs(args), **overrides,
        )
        check_pretraining_weights(args, loading["missing_keys"])
        return model, model.config
    if args.config_name_or_path:
        config = AutoConfig.from_pretrained(args.config_name_or_path, **hub_kwargs(args), **overrides)
    else:
        config = family.config_class.from_preset(args.model_size or "base", **overrides)
    config._attn_implementation = args.attn_implementation
    return family.masked_image_modeling_class(config), config


def build_pretraining_optimization(args, model, total_steps: int, total_batch: int):
    """(optimizer, schedule, lr) of a pretraining run: AdamW over the weight-decay groups, and the per-step
    warm-up + decay restarted at every stage (`--num_stages`: the last stage takes the remainder). lr is
    --learning_rate, else --base_learning_rate x total batch / 256; warm-up defaults to 5 % of a stage and
    reaches the peak as --warmup_style says; parameters named in the model's `pretraining_no_weight_decay`
    (the official optimizer's skip list) are not decayed, nor are 1-D ones.
    One function for run_mim.py, transformers' Trainer (`MIMTrainer`, which needs the two halves apart) and
    the trajectory tests, so the tests check the optimisation the script runs."""
    optimizer, lr = build_pretraining_optimizer(args, model, total_batch)
    return optimizer, build_pretraining_schedule(args, optimizer, lr, total_steps), lr


def build_pretraining_optimizer(args, model, total_batch: int):
    """(AdamW over the method's weight-decay groups, its lr): the first half of `build_pretraining_optimization`."""
    from .optim import DEFAULT_SKIP_NAMES, build_adamw, weight_decay_param_groups
    from .schedule import linear_scaled_lr

    lr = args.learning_rate if args.learning_rate is not None else linear_scaled_lr(args.base_learning_rate, total_batch)
    skip = getattr(model, "pretraining_no_weight_decay", None)  # the method's official exclusions (MIMTrainingEventsMixin)
    groups = weight_decay_param_groups(model, args.weight_decay, DEFAULT_SKIP_NAMES if skip is None else skip)
    return build_adamw(groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2)), lr


def build_pretraining_schedule(args, optimizer, lr: float, total_steps: int):
    """The per-stage warm-up + decay over `total_steps`: the second half of `build_pretraining_optimization`."""
    from .schedule import StagedSchedule

    steps_per_stage = total_steps // args.num_stages
    stage_lengths = [steps_per_stage] * (args.num_stages - 1) + [total_steps - steps_per_stage * (args.num_stages - 1)]
    if args.num_warmup_steps is None:
        args.num_warmup_steps = max(1, round(0.05 * steps_per_stage))
    return StagedSchedule(optimizer, base_lr=lr, steps_per_stage=stage_lengths, warmup_steps=args.num_warmup_steps,
                          min_lr_ratio=args.min_lr_ratio, kind=args.lr_scheduler_type, warmup_style=args.warmup_style)


def check_pretraining_weights(args, missing_keys) -> None:
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


@torch.no_grad()
def evaluate_pretraining_loss(model, dataloader, collator, accelerator, seed: int) -> dict:
    """Mean pretraining loss over this rank's share of a validation stream, averaged over every image of
    every rank. Fixed masks: the loader's collator stays at epoch 0 (crops and masks a function of the
    seed and the example id), and any draw inside the model comes from torch's RNG reseeded with `seed`
    (forked: training's RNG stream is untouched). Runs the unwrapped model in eval mode."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (loss x images, images)
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
        torch.manual_seed(seed)
        with accelerator.autocast():
            for batch in dataloader:
                batch = batch_to_device(collator.finish(batch, 0), accelerator.device, collator)
                inputs = forward_inputs(model, batch)
                images = inputs["pixel_values"].shape[0]
                total += torch.tensor([float(model(**inputs).loss) * images, images], dtype=torch.float64, device=accelerator.device)
    model.train(was_training)
    total = accelerator.reduce(total, reduction="sum")
    return {"eval_loss": float(total[0] / total[1].clamp(min=1)), "eval_examples": int(total[1])}


def save_mim_picture_of(model, batch: dict, path: Path) -> Path:
    """Run the model on up to 4 images of `batch` and save what it does (`save_mim_picture`)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        inputs = {key: value[:4] for key, value in forward_inputs(model, batch).items()}
        output = model(**inputs)
    model.train(was_training)
    return save_mim_picture(
        path, inputs["pixel_values"], output.bool_masked_pos, model.config.patch_size,
        **{name: output.get(name) for name in ("patch_loss", "reconstruction", "patch_scores", "patch_labels")},
    )


# ---------------------------------------------------------------- run_mim.py's data sources and outputs


def data_source(args) -> dict:
    """The training data's source: keywords of load_image_stream and count_examples."""
    if uses_embedded_data(args):
        return {"train_dir": str(embedded_digits_dir() / "train"), "split": "train"}  # images only, labels unused
    return {
        "dataset_name": args.dataset_name,
        "dataset_config_name": args.dataset_config_name,
        "train_dir": args.train_dir,
        "split": args.train_split,
    }


def load_stream(args):
    """The training stream (--train_val_split: without its held-out part; --max_train_samples: its first N)."""
    raw, image_column, label_column = load_raw(args, data_source(args))
    return limit(hold_out(raw, image_column, args.train_val_split, validation=False), args.max_train_samples), image_column, label_column


def load_raw(args, source: dict):
    column = None if uses_embedded_data(args) else args.image_column_name
    return load_image_stream(**source, image_column_name=column, load_kwargs=hub_kwargs(args, revision=False))


def load_validation_stream(args):
    """(raw stream, image column) to evaluate the loss on: --validation_dir (its 'validation' split, else
    all of it), --validation_split of the training source, or the --train_val_split part; None: no
    evaluation."""
    if args.validation_dir:
        try:
            raw, column, _ = load_raw(args, {"train_dir": args.validation_dir, "split": args.validation_split or "validation"})
        except ValueError:
            if args.validation_split:
                raise
            raw, column, _ = load_raw(args, {"train_dir": args.validation_dir, "split": "train"})
    elif args.validation_split:
        raw, column, _ = load_raw(args, {**data_source(args), "split": args.validation_split})
    elif args.train_val_split is not None:
        raw, column, _ = load_raw(args, data_source(args))
        raw = hold_out(raw, column, args.train_val_split, validation=True)
    else:
        return None
    return limit(raw, args.max_eval_samples), column


def run_summary(args, config, total_batch: int, lr: float, total_steps: int, world: int) -> dict:
    return {
        "method": config.model_type,
        "data": "embedded digits, training images (hf_mim demo)" if uses_embedded_data(args) else (args.dataset_name or args.train_dir),
        "image size": config.image_size,
        "mask ratio": config.mask_ratio,
        "optimizer steps": total_steps,
        "stages": args.num_stages,
        "batch (total)": total_batch,
        "learning rate": f"{lr:.3g} (AdamW {args.adam_beta1}, {args.adam_beta2}; weight decay {args.weight_decay})",
        "schedule": f"{args.lr_scheduler_type}, warm-up {args.num_warmup_steps} steps per stage ({args.warmup_style} style)",
        "processes": world,
    }


def write_outputs(args, model, batch, output_dir: Path, summary: dict, elapsed: float, results=None, eval_history=(),
                  accelerator=None, knn=None, downstream=None) -> None:
    """The Hub-ready folder: weights, config with full auto_map, code, processor, card, args, pictures, the
    validation loss, the final k-NN (`knn`) and the downstream check (`downstream`) (eval_results.json,
    card), and every extra backbone the method exports (e.g. ExtreMA's momentum encoder, what it
    linear-probes); the final picture also goes to the trackers."""
    from .run_folder import finish_run_folder
    from ..hub import save_hub_folder
    from ..hub.card import pretraining_eval_results

    save_hub_folder(model, output_dir, image_processor=output_image_processor(args, model.config.image_size))
    for name, backbone in model.exported_backbones().items():
        logger.info("wrote the %s backbone to %s", name, save_hub_folder(backbone, output_dir / name))
    if batch is not None:
        path = save_mim_picture_of(model, batch, output_dir / "mim_picture.png")
        if accelerator is not None:
            log_pictures(accelerator, {"mim_picture": path}, summary["optimizer steps"])
    summary = {**summary, "wall time": f"{elapsed / 60:.1f} min"}
    eval_results, entries = [], {}
    if results is not None:
        dataset_type, dataset_name, split = validation_names(args)
        summary["validation loss"] = f"{results['eval_loss']:.4f} ({results['eval_examples']} images of {dataset_name}, {split}, fixed masks)"
        entries = {**results, "dataset": dataset_name, "split": split}
        eval_results = pretraining_eval_results(results["eval_loss"], dataset_type, dataset_name, split, args.dataset_config_name)
    if knn is not None or downstream is not None:
        from .downstream import labelled_outputs

        labelled_entries, rows, labelled_results = labelled_outputs(args, knn, downstream, eval_history)
        entries.update(labelled_entries)
        summary.update(rows)
        eval_results += labelled_results
    if entries:
        write_json_atomic(output_dir / "eval_results.json", {**entries, "step": summary["optimizer steps"], "history": list(eval_history)})
    finish_run_folder(output_dir, model, args, run=summary, results=eval_results, is_demo=uses_embedded_data(args))


def validation_names(args) -> tuple[str, str, str]:
    """(dataset id, readable name, split) of the validation source, for the card's model-index."""
    if args.validation_dir:
        return Path(args.validation_dir).name, f"local data ({Path(args.validation_dir).name})", args.validation_split or "validation"
    source = args.dataset_name or (Path(args.train_dir).name if args.train_dir else "hf_mim-embedded-digits")
    name = source if args.dataset_name else f"local data ({source})" if args.train_dir else "hf_mim embedded digits (training images)"
    split = args.validation_split or f"{args.train_val_split:g} of {args.train_split} held out"
    return source, name, split


__all__ = [
    "build_pretraining_model", "build_pretraining_optimization", "build_pretraining_optimizer",
    "build_pretraining_schedule", "check_pretraining_weights", "data_source",
    "evaluate_pretraining_loss", "load_stream", "load_validation_stream", "run_summary", "save_mim_picture_of",
    "write_outputs",
]
