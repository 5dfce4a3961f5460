"""Pretraining tooling for run_mim.py: the `...ForMaskedImageModeling` model from weights, a config or
a named size (with the command line's config fields), and a picture of what it does."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..data import batch_to_device
from .conventions import hub_kwargs
from .loop import forward_inputs
from .overrides import parse_overrides
from .run_setup import UserInputError, check_local_path
from .visualize import save_mim_picture

logger = logging.getLogger(__name__)


def build_pretraining_model(args, saved_config: dict | None = None):
    """(model, config) from --model_name_or_path, --config_name_or_path or --model_type/--model_size, with
    --config_overrides, --image_size, --patch_size, --mask_ratio, --mask_patch_size and --teacher_name_or_path, and the Hub
    flags (--cache_dir, --model_revision, --token, --trust_remote_code); `saved_config`: a resumed
    checkpoint's config (e.g. after a dBOT stage change), which wins."""
    from transformers import AutoConfig, AutoModelForMaskedImageModeling

    from ..registry import family_for

    family = family_for(args.model_type)
    overrides = parse_overrides(args.config_overrides)
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


__all__ = ["build_pretraining_model", "check_pretraining_weights", "evaluate_pretraining_loss", "save_mim_picture_of"]
