#!/usr/bin/env python
"""Fine-tuning and linear probing of any hf_mim checkpoint for image classification, with Accelerate
on streaming datasets.

    accelerate launch training_scripts/run_image_classification.py --model_name_or_path outputs/run_mim
        # embedded handwritten digits (offline), full fine-tuning of a run_mim.py output
    accelerate launch training_scripts/run_image_classification.py --model_name_or_path <folder or Hub id> \
        --dataset_name <hub dataset> --mode linear_probe --per_device_train_batch_size 1024

`--model_name_or_path` may be a pretraining folder (`...ForMaskedImageModeling`, from run_mim.py or a
converter: the backbone is kept, the pretraining-only parts dropped), or a classifier (its head is
kept when the label set is the same, re-initialised otherwise). `--model_type/--model_size` without
it trains a randomly initialised baseline.

- `--mode finetune` (MAE/BEiT recipe): layer-wise lr decay, AdamW, drop path, RandAugment +
  RandomResizedCrop + flip + RandomErasing (timm), mixup/cutmix with label smoothing (timm `Mixup` +
  `SoftTargetCrossEntropy`), per-iteration warm-up + cosine.
- `--mode linear_probe` (MAE): frozen backbone in eval mode, `BatchNorm1d(affine=False)` + Linear
  head (always re-initialised) on `pooler_output`, LARS, RandomResizedCrop + flip only; at the end the BatchNorm is folded
  into the Linear, so the saved model is a plain `...ForImageClassification`.

Augmentation is a pure function of (seed, epoch, example id) (timm's transforms run under RNGs
seeded per example and restored afterwards), mixup/cutmix of (seed, step); a resumed run skips the
batches each rank had already consumed in its current epoch, so resuming reproduces the run.
Top-1/top-5 on the validation split are computed in the package (no Hub), at `--eval_steps` and at
the end, and written to `eval_results.json` and the model card's model-index.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForImageClassification

import hf_mim  # noqa: F401  (registers every hf_mim model with the Auto classes)
from hf_mim.data import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ClassificationCollator,
    EvalTransform,
    MaskedImageTransform,
    embedded_digits_dir,
    example_seed,
    label_names,
    load_image_stream,
    make_dataloader,
    max_pixels_argument,
    prepare_stream,
)
from hf_mim.hub import HubPushError, build_image_processor, finish_run_folder, save_hub_folder
from hf_mim.hub.card import classification_eval_results
from hf_mim.overrides import parse_overrides
from hf_mim.registry import family_for
from hf_mim.training import (
    stream_batches,
    AccuracyMeter,
    NonFiniteLossError,
    RunHyperparameters,
    StagedSchedule,
    UserInputError,
    apply_this_runs_hyperparameters,
    attach_batchnorm_probe,
    build_adamw,
    check_finite_loss,
    check_local_path,
    check_positive_flags,
    claim_output_dir,
    fold_batchnorm_probe,
    freeze_backbone,
    layer_decay_param_groups,
    linear_probe_train_mode,
    linear_scaled_lr,
    load_checkpoint,
    make_accelerator,
    optimizer_hyperparameters,
    read_trainer_state,
    report_user_errors,
    save_checkpoint,
    tracker_config,
    weight_decay_param_groups,
    write_json_atomic,
)

logger = logging.getLogger("run_image_classification")

HEAD_NAME = "classifier"  # the linear head of every hf_mim ...ForImageClassification
EMBEDDED_DATASET = "hf_mim embedded digits (scikit-learn handwritten digits)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (none given: the embedded handwritten digits, train/validation)")
    data.add_argument("--dataset_name", help="a Hub dataset name (streamed)")
    data.add_argument("--dataset_config_name")
    data.add_argument("--train_dir", help="local folder of parquet files, WebDataset .tar shards, or images (<class>/<img>)")
    data.add_argument("--validation_dir", help="a separate folder for the validation data (default: a split of the training source)")
    data.add_argument("--train_split", default="train")
    data.add_argument("--validation_split", default="validation", help="'none': no evaluation")
    data.add_argument("--image_column_name", help="default: detected")
    data.add_argument("--label_column_name", help="default: detected (label, labels, cls); integers or a ClassLabel")
    data.add_argument("--shuffle_buffer_size", type=int, default=1000)
    data.add_argument("--num_train_examples", type=int, help="stream length, when epochs are asked for and unknown")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    data.add_argument(
        "--max_image_pixels", type=max_pixels_argument, default=DEFAULT_MAX_IMAGE_PIXELS,
        help="decode budget per image: larger JPEGs are decoded at 1/2-1/8 scale, other larger images skipped "
        "and counted ('none': no budget)",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="hf_mim weights: a pretraining, converted or classifier folder, or a Hub id")
    model.add_argument("--model_type", help="random-init baseline (without --model_name_or_path): an hf_mim method (default dbot)")
    model.add_argument("--model_size", help="random-init baseline: a named size (tiny, demo, small, base, large, huge)")
    model.add_argument("--config_overrides", help="config fields set when loading, e.g. 'use_mean_pooling=false'")
    model.add_argument("--attn_implementation", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    model.add_argument("--gradient_checkpointing", action="store_true")
    model.add_argument("--mode", default="finetune", choices=["finetune", "linear_probe"])

    optim = parser.add_argument_group("optimisation (None: the mode's default, see MODE_DEFAULTS)")
    optim.add_argument("--per_device_train_batch_size", type=int, default=32)
    optim.add_argument("--per_device_eval_batch_size", type=int, default=64)
    optim.add_argument("--learning_rate", type=float, help="absolute lr; default base_learning_rate x total batch / 256")
    optim.add_argument("--base_learning_rate", type=float, help="finetune 5e-4, linear_probe 0.1")
    optim.add_argument("--optimizer", choices=["adamw", "lars", "sgd"], help="finetune adamw, linear_probe lars")
    optim.add_argument("--weight_decay", type=float, help="finetune 0.05, linear_probe 0")
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--layer_decay", type=float, default=0.65, help="layer-wise lr decay (finetune only)")
    optim.add_argument("--drop_path_rate", type=float, help="finetune 0.1 (set in the config when loading), linear_probe 0")
    optim.add_argument("--max_grad_norm", type=float, default=None)
    optim.add_argument("--num_train_epochs", type=float, help="finetune 100, linear_probe 90")
    optim.add_argument("--max_train_steps", type=int, help="optimizer steps; overrides epochs")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--num_warmup_steps", type=int, help="default: --warmup_epochs")
    optim.add_argument("--warmup_epochs", type=float, help="finetune 5, linear_probe 10")
    optim.add_argument("--min_lr_ratio", type=float, default=0.0)
    optim.add_argument("--seed", type=int, default=0)

    aug = parser.add_argument_group("augmentation and regularisation (None: the mode's default)")
    aug.add_argument("--label_smoothing", type=float, help="finetune 0.1, linear_probe 0")
    aug.add_argument("--mixup", type=float, help="mixup alpha: finetune 0.8, linear_probe 0")
    aug.add_argument("--cutmix", type=float, help="cutmix alpha: finetune 1.0, linear_probe 0")
    aug.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    aug.add_argument("--mixup_switch_prob", type=float, default=0.5, help="probability of cutmix when both are on")
    aug.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"])
    aug.add_argument("--randaug", help="timm RandAugment spec: finetune 'rand-m9-mstd0.5-inc1', linear_probe 'none'")
    aug.add_argument("--reprob", type=float, help="RandomErasing probability: finetune 0.25, linear_probe 0")

    run = parser.add_argument_group("outputs")
    run.add_argument("--output_dir", default="outputs/run_image_classification")
    run.add_argument("--overwrite_output_dir", action="store_true", help="delete the checkpoints, logs and pictures of an earlier run in --output_dir")
    run.add_argument("--checkpointing_steps", type=int, help="save a resumable checkpoint every N steps")
    run.add_argument("--checkpoints_total_limit", type=int, default=2)
    run.add_argument(
        "--resume_from_checkpoint",
        help="a checkpoint folder, or 'latest' (the newest in --output_dir; none yet: start from scratch). "
        "This run's lr, schedule, warm-up, weight decay and length apply after the resume",
    )
    run.add_argument("--eval_steps", type=int, help="evaluate every N steps (always at the end)")
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--with_tracking", action="store_true")
    run.add_argument("--report_to", default="tensorboard")
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id")
    run.add_argument("--hub_token")
    run.add_argument("--hub_private_repo", action="store_true")
    run.add_argument("--license", default="apache-2.0")
    args = parser.parse_args(argv)
    if uses_embedded_data(args):
        apply_demo_defaults(args, parser)
    apply_mode_defaults(args)
    validate_args(args, parser)
    return args


# The recipes (dBOT/MAE `main_finetune.py` and MAE `main_linprobe.py`), for every flag left unset.
MODE_DEFAULTS = {
    "finetune": {
        "base_learning_rate": 5e-4,
        "optimizer": "adamw",
        "weight_decay": 0.05,
        "drop_path_rate": 0.1,
        "num_train_epochs": 100.0,
        "warmup_epochs": 5.0,
        "label_smoothing": 0.1,
        "mixup": 0.8,
        "cutmix": 1.0,
        "randaug": "rand-m9-mstd0.5-inc1",
        "reprob": 0.25,
    },
    "linear_probe": {
        "base_learning_rate": 0.1,
        "optimizer": "lars",
        "weight_decay": 0.0,
        "drop_path_rate": 0.0,
        "num_train_epochs": 90.0,
        "warmup_epochs": 10.0,
        "label_smoothing": 0.0,
        "mixup": 0.0,
        "cutmix": 0.0,
        "randaug": "none",
        "reprob": 0.0,
    },
}

# The embedded digits are 1,438 training and 359 validation images. Fine-tuning: 5 short epochs with
# a larger learning rate than the ImageNet recipe (whose lr scales with a batch of 1024). Linear probe:
# SGD instead of LARS, whose trust ratio (0.001 |w| / |g| per step) is made for ~16k batches and
# thousands of steps and barely moves a head in ~200 steps (lr 0.1 works on the BatchNorm-ed features
# whatever their scale). Both evaluate about once an epoch and end in minutes on a CPU.
EMBEDDED_DEMO_DEFAULTS = {
    "finetune": {
        "per_device_train_batch_size": 64,
        "learning_rate": 1e-3,
        "num_train_epochs": 5.0,
        "warmup_epochs": 1.0,
        "eval_steps": 25,
    },
    "linear_probe": {
        "per_device_train_batch_size": 64,
        "optimizer": "sgd",
        "learning_rate": 0.1,
        "num_train_epochs": 10.0,
        "warmup_epochs": 1.0,
        "eval_steps": 25,
    },
}


def apply_demo_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill the demo settings for every flag the user left at its default."""
    for name, value in EMBEDDED_DEMO_DEFAULTS[args.mode].items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)


def apply_mode_defaults(args: argparse.Namespace) -> None:
    for name, value in MODE_DEFAULTS[args.mode].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def mixup_active(args: argparse.Namespace) -> bool:
    return (args.mixup > 0 or args.cutmix > 0) and args.mixup_prob > 0


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.dataset_name and args.train_dir:
        parser.error("give either --dataset_name or --train_dir, not both")
    if not args.model_name_or_path and not (args.model_type or args.model_size):
        parser.error(
            "give --model_name_or_path (e.g. the output folder of run_mim.py, a converted checkpoint, a Hub id), "
            "or --model_type/--model_size for a randomly initialised baseline"
        )
    if args.model_name_or_path and args.model_size:
        parser.error("--model_size is for a random-init baseline: not with --model_name_or_path")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    check_positive_flags(
        parser, args,
        at_least_one=("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                      "max_train_steps", "logging_steps", "checkpointing_steps", "eval_steps", "num_train_examples"),
        positive=("learning_rate", "base_learning_rate", "num_train_epochs", "max_grad_norm"),
        non_negative=("weight_decay", "num_warmup_steps", "warmup_epochs", "shuffle_buffer_size", "dataloader_num_workers",
                      "checkpoints_total_limit", "min_lr_ratio", "mixup", "cutmix", "reprob", "drop_path_rate"),
        fractions=("adam_beta1", "adam_beta2"),
    )
    for name in ("min_lr_ratio", "mixup_prob", "mixup_switch_prob", "reprob"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    if not 0.0 < args.layer_decay <= 1.0:
        parser.error("--layer_decay must be in (0, 1]")
    if not 0.0 <= args.label_smoothing < 1.0:
        parser.error("--label_smoothing must be in [0, 1)")
    if mixup_active(args) and args.mixup_mode == "batch" and args.per_device_train_batch_size % 2:
        parser.error("mixup/cutmix (mode 'batch') needs an even --per_device_train_batch_size (or --mixup 0 --cutmix 0)")
    if args.randaug.lower() != "none" and not args.randaug.startswith("rand"):
        parser.error(f"--randaug takes a timm RandAugment spec such as 'rand-m9-mstd0.5-inc1', or 'none'; got {args.randaug!r}")


def uses_embedded_data(args: argparse.Namespace) -> bool:
    return not (args.dataset_name or args.train_dir)


# ------------------------------------------------------------------------------------------ model


def base_config(args: argparse.Namespace):
    """The config the run starts from (image size, depth), before labels are known."""
    overrides = parse_overrides(args.config_overrides)
    if args.model_name_or_path:
        check_local_path("--model_name_or_path", args.model_name_or_path)
        return AutoConfig.from_pretrained(args.model_name_or_path, **overrides)
    return family_for(args.model_type or "dbot").config_class.from_preset(args.model_size or "base", **overrides)


def is_classifier(config) -> bool:
    return any(name.endswith("ForImageClassification") for name in (getattr(config, "architectures", None) or []))


def build_model(args: argparse.Namespace, id2label: dict[int, str]):
    """The ...ForImageClassification model with our labels: from weights (backbone kept; the head kept
    only when it was trained on the same labels) or randomly initialised."""
    label2id = {name: index for index, name in id2label.items()}
    overrides = parse_overrides(args.config_overrides)
    overrides.update(id2label=id2label, label2id=label2id, drop_path_rate=args.drop_path_rate)
    if args.model_name_or_path:
        saved = AutoConfig.from_pretrained(args.model_name_or_path)
        classifier = is_classifier(saved)
        same_labels = classifier and {int(k): v for k, v in saved.id2label.items()} == id2label
        new_head = classifier and not same_labels
        model = AutoModelForImageClassification.from_pretrained(
            args.model_name_or_path,
            ignore_mismatched_sizes=new_head,
            attn_implementation=args.attn_implementation,
            **overrides,
        )
        if new_head:
            logger.info("%s is a classifier for other labels: its head is re-initialised", args.model_name_or_path)
            if saved.num_labels == len(id2label):  # same shape: ignore_mismatched_sizes kept the old weights
                reset_head(model)
        elif same_labels:
            logger.info("%s is a classifier for the same labels: its head is kept", args.model_name_or_path)
    else:
        family = family_for(args.model_type or "dbot")
        config = family.config_class.from_preset(args.model_size or "base", **overrides)
        config._attn_implementation = args.attn_implementation
        model = family.image_classification_class(config)
    model.config.problem_type = "single_label_classification"
    return model


@torch.no_grad()
def reset_head(model) -> None:
    head = getattr(model, HEAD_NAME)
    torch.nn.init.trunc_normal_(head.weight, std=getattr(model.config, "classifier_init_std", 0.01))
    torch.nn.init.zeros_(head.bias)


def build_optimizer(args: argparse.Namespace, model, lr: float) -> torch.optim.Optimizer:
    """Fine-tuning: layer-wise lr decay groups over every parameter; linear probe: the head only.
    Each group's `lr_scale` is applied by the schedule."""
    if args.mode == "finetune":
        # Architectures whose depth is not a plain block index (RevColV2's column grid) say how their
        # parameters map to layers through `layer_id_for_lr_decay`; ViTs use the block index.
        groups = layer_decay_param_groups(
            model,
            args.weight_decay,
            args.layer_decay,
            num_layers=model.config.num_hidden_layers,
            layer_id_fn=getattr(model, "layer_id_for_lr_decay", None),
        )
    else:
        groups = weight_decay_param_groups(model, args.weight_decay)
    if args.optimizer == "adamw":
        return build_adamw(groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2))
    if args.optimizer == "lars":
        try:
            from timm.optim import Lars
        except ImportError:
            logger.warning("timm.optim.Lars is not available in this timm: using SGD with momentum 0.9")
        else:
            # MAE's LARS: matrices are adapted (trust ratio 0.001 * |w| / |g|) even without weight decay;
            # biases and norms are not.
            for group in groups:
                group["always_adapt"] = all(p.ndim > 1 for p in group["params"])
            return Lars(groups, lr=lr, momentum=0.9, trust_coeff=0.001)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def describe_lr_scales(optimizer) -> str:
    by_layer: dict[int, float] = {}
    for group in optimizer.param_groups:
        by_layer[group.get("layer_id", -1)] = group.get("lr_scale", 1.0)
    return ", ".join(f"{layer}: {scale:.3g}" for layer, scale in sorted(by_layer.items()))


# ------------------------------------------------------------------------------------------ data


class SeededTimmTransform:
    """A timm transform (which draws from python `random`, numpy and torch's global RNGs) made a pure
    function of the per-example generator the collator passes: all three RNGs are seeded from it and
    restored afterwards, so nothing else in the process sees a difference."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None:
            return self.transform(image)
        seed = generator.initial_seed()
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % (2**32))
                return self.transform(image)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


@contextlib.contextmanager
def seeded_numpy(seed: int):
    """numpy's global RNG seeded with `seed` inside, restored afterwards (timm's Mixup draws from it)."""
    state = np.random.get_state()
    np.random.seed(seed % (2**32))
    try:
        yield
    finally:
        np.random.set_state(state)


def train_transform(args: argparse.Namespace, image_size: int):
    """timm's `create_transform(is_training=True)` as MAE fine-tunes (RandomResizedCrop 0.08-1 bicubic,
    flip, RandAugment, no colour jitter, RandomErasing 'pixel') when RandAugment or RandomErasing is on;
    otherwise hf_mim's seeded RandomResizedCrop(0.08-1, bicubic) + flip (MAE's linear probe)."""
    randaug = None if args.randaug.lower() == "none" else args.randaug
    if randaug is None and args.reprob <= 0:
        return MaskedImageTransform(image_size, scale=(0.08, 1.0), interpolation="bicubic")
    from timm.data import create_transform

    transform = create_transform(
        input_size=image_size,
        is_training=True,
        color_jitter=None,
        auto_augment=randaug,
        interpolation="bicubic",
        re_prob=args.reprob,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
    return SeededTimmTransform(fix_posterize(transform))


def posterize_zero_bits_black(image, bits_to_keep, **kwargs):
    """timm's posterize, with 0 bits giving a black image as Pillow < 13 did (Pillow 13 raises)."""
    if bits_to_keep < 1:
        from PIL import Image

        return Image.new(image.mode, image.size)
    from timm.data import auto_augment

    return auto_augment.posterize(image, bits_to_keep, **kwargs)


def fix_posterize(transform):
    """RandAugment's 'PosterizeIncreasing' keeps 4 - int(4 * m / 10) bits, i.e. 0 bits at magnitude 10,
    which 'mstd0.5' noise around m9 reaches: Pillow 13 raises there ("bits must be between or equal to 1
    and 8") where older Pillow, which MAE/dBOT trained with, returned a black image. Give this
    transform's posterize ops that behaviour back (the timm module itself is left alone)."""
    from timm.data import auto_augment

    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = posterize_zero_bits_black
    return transform


def load_train_stream(args: argparse.Namespace, image_size: int):
    if uses_embedded_data(args):
        return load_image_stream(
            train_dir=str(embedded_digits_dir(image_size=image_size)),
            split="train",
            image_column_name=args.image_column_name,
            label_column_name=args.label_column_name,
        )
    return load_image_stream(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_dir=args.train_dir,
        split=args.train_split,
        image_column_name=args.image_column_name,
        label_column_name=args.label_column_name,
    )


def _is_missing_split(error: ValueError) -> bool:
    text = str(error)
    return "Bad split" in text or ("split" in text and "not found" in text) or "only split='train' exists" in text


def load_validation_stream(args: argparse.Namespace, image_size: int, label_column: str):
    """(stream, image column, label column), or None when there is no validation data."""
    if args.validation_split.lower() == "none":
        return None
    kwargs = {"image_column_name": args.image_column_name, "label_column_name": label_column}
    if args.validation_dir:
        try:
            return load_image_stream(train_dir=args.validation_dir, split=args.validation_split, **kwargs)
        except ValueError as error:  # a folder holding only validation data reads as one 'train' split
            if not _is_missing_split(error):
                raise
            return load_image_stream(train_dir=args.validation_dir, split="train", **kwargs)
    try:
        if uses_embedded_data(args):
            return load_image_stream(train_dir=str(embedded_digits_dir(image_size=image_size)), split="validation", **kwargs)
        return load_image_stream(
            dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            train_dir=args.train_dir,
            split=args.validation_split,
            **kwargs,
        )
    except ValueError as error:
        if not _is_missing_split(error):
            raise
        logger.warning("no validation split %r (%s): no evaluation; give --validation_dir", args.validation_split, error)
        return None


def scan_labels(raw_stream, label_column: str, need_count: bool, need_labels: bool) -> tuple[int | None, list[int]]:
    """One pass over the label column: (number of rows or None, sorted distinct labels >= 0)."""
    if not (need_count or need_labels):
        return None, []
    logger.info(
        "one pass over the training labels to %s (pass --num_train_examples%s to skip it)",
        " and ".join(part for part, needed in (("count the examples", need_count), ("collect the classes", need_labels)) if needed),
        "" if need_labels else " or --max_train_steps and --num_warmup_steps",
    )
    count, seen = 0, set()
    for example in raw_stream.select_columns([label_column]):
        count += 1
        value = example[label_column]
        if need_labels and value is not None and int(value) >= 0:
            seen.add(int(value))
    return (count if need_count else None), sorted(seen)


def resolve_labels(train_raw, label_column: str, val_raw, need_count: bool) -> tuple[dict[int, str], int | None]:
    """id2label from the ClassLabel names, or collected from the integer labels (names = the ids)."""
    names = label_names(train_raw, label_column)
    count, seen = scan_labels(train_raw, label_column, need_count, need_labels=names is None)
    if names is None:
        if not seen:
            raise ValueError(f"the label column {label_column!r} of the training data holds no label >= 0")
        names = [str(index) for index in range(max(seen) + 1)]
        logger.info("labels collected from the training data: %d classes (ids 0..%d)", len(names), len(names) - 1)
    if val_raw is not None:
        val_names = label_names(val_raw[0], val_raw[2])
        if val_names is not None and val_names != names:
            raise ValueError(
                f"the validation labels {val_names[:10]} differ from the training labels {names[:10]}: "
                "ids would not match"
            )
    return dict(enumerate(names)), count


# ------------------------------------------------------------------------------------------ loop


def set_train_mode(model, args: argparse.Namespace) -> None:
    if args.mode == "linear_probe":
        linear_probe_train_mode(model, True, head_name=HEAD_NAME)
    else:
        model.train()


def evaluate(model, dataloader, accelerator) -> dict:
    """Top-1/top-5 (percent) over this rank's share of the validation stream, summed over ranks.
    Runs the unwrapped model: ranks may hold different numbers of batches (no collectives inside)."""
    was_training = {name: module.training for name, module in model.named_modules()}
    model.eval()
    meter = AccuracyMeter((1, 5))
    with torch.no_grad(), accelerator.autocast():
        for batch in dataloader:
            logits = model(pixel_values=batch["pixel_values"].to(accelerator.device)).logits
            meter.update(logits.float(), batch["labels"].to(accelerator.device))
    for name, module in model.named_modules():
        module.training = was_training[name]
    meter = meter.reduce(accelerator)
    results = meter.compute()
    results["eval_examples"] = meter.total
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with report_user_errors("run_image_classification.py") as phase:
            return train(args, phase)
    except NonFiniteLossError as error:
        logger.error("%s", error)
        return 1


def train(args: argparse.Namespace, phase=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    output_dir = Path(args.output_dir)

    # --- data and labels first (the model's head needs the label set; data errors end the run at once) ---
    image_size = base_config(args).image_size
    need_count = args.num_train_examples is None and (args.max_train_steps is None or args.num_warmup_steps is None)
    try:
        train_raw, image_column, label_column = load_train_stream(args, image_size)
        if label_column is None:
            raise ValueError(
                f"the training data has no label column (none named label, labels or cls holding integers); "
                f"its columns are {train_raw.column_names}. Pass one with --label_column_name."
            )
        val_raw = load_validation_stream(args, image_size, label_column)
        id2label, counted = resolve_labels(train_raw, label_column, val_raw, need_count)
    except ValueError as error:
        raise UserInputError(str(error)) from None

    accelerator = make_accelerator(args, output_dir)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(args.seed)
    world = accelerator.num_processes
    total_batch = args.per_device_train_batch_size * world * args.gradient_accumulation_steps

    resume_path, run_id = claim_output_dir(args, accelerator, output_dir)
    saved_state = read_trainer_state(resume_path) if resume_path else None
    if saved_state is not None and {int(k): v for k, v in saved_state["id2label"].items()} != id2label:
        raise UserInputError(f"{resume_path} was trained on other labels")

    # --- model ---
    model = build_model(args, id2label)
    config = model.config
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.mode == "linear_probe":
        attach_batchnorm_probe(model, head_name=HEAD_NAME)
        trainable = freeze_backbone(model, head_name=HEAD_NAME)
        logger.info("linear probe: backbone frozen, training %s", trainable)

    stream = prepare_stream(
        train_raw,
        image_column,
        seed=args.seed,
        buffer_size=args.shuffle_buffer_size,
        rank=accelerator.process_index,
        world_size=world,
        label_column=label_column,
        max_image_pixels=args.max_image_pixels,
    )
    transform = train_transform(args, config.image_size)
    collator = ClassificationCollator(transform, seed=args.seed)
    dataloader = make_dataloader(
        stream,
        collator,
        batch_size=args.per_device_train_batch_size,
        num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    eval_dataloader = None
    if val_raw is not None:
        val_stream = prepare_stream(
            val_raw[0], val_raw[1], seed=args.seed, buffer_size=0, rank=accelerator.process_index,
            world_size=world, label_column=val_raw[2], max_image_pixels=args.max_image_pixels,
        )
        eval_dataloader = make_dataloader(
            val_stream,
            ClassificationCollator(EvalTransform(config.image_size), seed=args.seed),
            batch_size=args.per_device_eval_batch_size,
            num_workers=args.dataloader_num_workers,
            drop_last=False,
        )

    # --- length of training ---
    examples = args.num_train_examples or counted
    if args.max_train_steps is not None:
        total_steps = args.max_train_steps
    else:
        total_steps = max(1, math.ceil(args.num_train_epochs * examples / total_batch))
        logger.info("%d examples x %s epochs / batch %d = %d optimizer steps", examples, args.num_train_epochs, total_batch, total_steps)
    if args.num_warmup_steps is None:
        args.num_warmup_steps = round(args.warmup_epochs * examples / total_batch)
    if args.num_warmup_steps > total_steps:
        logger.warning("warm-up of %d steps > %d training steps: warming up over the whole run", args.num_warmup_steps, total_steps)
        args.num_warmup_steps = total_steps

    # --- optimisation ---
    lr = args.learning_rate if args.learning_rate is not None else linear_scaled_lr(args.base_learning_rate, total_batch)
    optimizer = build_optimizer(args, model, lr)
    schedule = StagedSchedule(
        optimizer,
        base_lr=lr,
        steps_per_stage=[total_steps],
        warmup_steps=args.num_warmup_steps,
        min_lr_ratio=args.min_lr_ratio,
        kind="cosine",
    )
    if args.mode == "finetune":
        logger.info(
            "layer-wise lr decay %.3g over %d blocks: lr scale by layer id {%s}",
            args.layer_decay, config.num_hidden_layers, describe_lr_scales(optimizer),
        )
    mixup_fn = None
    if mixup_active(args):
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob, switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode, label_smoothing=args.label_smoothing, num_classes=config.num_labels,
        )
        criterion = SoftTargetCrossEntropy()
    else:
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    hyperparameters = RunHyperparameters(
        learning_rate=lr, weight_decay=args.weight_decay, lr_scheduler_type="cosine",
        num_warmup_steps=args.num_warmup_steps, min_lr_ratio=args.min_lr_ratio, total_steps=total_steps,
        max_grad_norm=args.max_grad_norm, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    fresh_groups = optimizer_hyperparameters(optimizer)
    accelerator.register_for_checkpointing(schedule)
    unwrapped = accelerator.unwrap_model(model)

    global_step, start_epoch, skip_batches = 0, 0, 0
    eval_history: list[dict] = []
    if resume_path is not None:
        trainer_state = load_checkpoint(accelerator, resume_path)
        global_step = trainer_state["global_step"]
        position = trainer_state["positions"][accelerator.process_index]
        start_epoch, skip_batches = position["epoch"], position["batches"]
        eval_history = trainer_state.get("eval_history", [])
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, global_step, start_epoch, skip_batches)
        apply_this_runs_hyperparameters(
            optimizer, schedule, fresh_groups, trainer_state.get("hyperparameters"), hyperparameters, global_step
        )

    if args.with_tracking:
        accelerator.init_trackers("run_image_classification", config=tracker_config(args))

    logger.info(
        "%s %s (%s, %d labels) for %d steps, batch %d (%d per device x %d processes x %d accumulation), lr %.3g, %s",
        args.mode, type(unwrapped).__name__, config.model_type, config.num_labels, total_steps, total_batch,
        args.per_device_train_batch_size, world, args.gradient_accumulation_steps, lr, type(optimizer.optimizer).__name__
        if hasattr(optimizer, "optimizer") else type(optimizer).__name__,
    )
    progress = tqdm(total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc=args.mode)
    last_checkpoint = resume_path
    window_start, window_images = time.perf_counter(), 0
    skipped_total = 0
    micro_step = 0
    run_start = time.perf_counter()
    set_train_mode(unwrapped, args)
    batches = stream_batches(dataloader, stream, collator, start_epoch, skip_batches)
    position = {"epoch": start_epoch, "batches": skip_batches}
    if phase is not None:
        phase.training_started()
    while global_step < total_steps:
        epoch, index, batch = next(batches)
        position = {"epoch": epoch, "batches": index + 1}
        skipped_total += int(batch["images_skipped"].sum())
        pixel_values = batch["pixel_values"].to(accelerator.device, non_blocking=True)
        targets = batch["labels"].to(accelerator.device, non_blocking=True)
        if mixup_fn is not None:
            # a pure function of (seed, step, micro step, rank): exact on resume
            mix_id = (global_step * args.gradient_accumulation_steps + micro_step) * world + accelerator.process_index
            with seeded_numpy(example_seed(args.seed, -1, mix_id)):
                pixel_values, targets = mixup_fn(pixel_values, targets)
        with accelerator.accumulate(model):
            logits = model(pixel_values=pixel_values).logits
            loss = criterion(logits.float(), targets)
            check_finite_loss(loss, global_step, last_checkpoint, accelerator=accelerator, inputs=pixel_values)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        micro_step = (micro_step + 1) % args.gradient_accumulation_steps
        window_images += pixel_values.shape[0] * world
        if not accelerator.sync_gradients:
            continue
        schedule.step()
        global_step += 1
        progress.update(1)

        if global_step % args.logging_steps == 0 or global_step == total_steps:
            elapsed = time.perf_counter() - window_start
            loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
            logs = {
                "loss": loss_value,
                "lr": max(group["lr"] for group in optimizer.param_groups),
                "images_per_second": window_images / max(elapsed, 1e-9),
                "epoch": epoch,
                "images_skipped": skipped_total,
            }
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{logs['lr']:.2e}")
            if args.with_tracking:
                accelerator.log(logs, step=global_step)
            logger.info("step %d %s", global_step, json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in logs.items()}))
            window_start, window_images = time.perf_counter(), 0
        if eval_dataloader is not None and args.eval_steps and global_step % args.eval_steps == 0 and global_step < total_steps:
            results = evaluate(unwrapped, eval_dataloader, accelerator)
            eval_history.append({"step": global_step, **results})
            log_eval(accelerator, args, global_step, results)
        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
            last_checkpoint = save_training_checkpoint(
                accelerator, output_dir, global_step, position, id2label, eval_history, args,
                run_id=run_id, hyperparameters=hyperparameters.to_dict(),
            )
    progress.close()
    accelerator.wait_for_everyone()
    elapsed = time.perf_counter() - run_start

    if args.mode == "linear_probe":
        fold_batchnorm_probe(unwrapped, head_name=HEAD_NAME)  # what is evaluated below is what is saved
    results = None
    if eval_dataloader is not None:
        results = evaluate(unwrapped, eval_dataloader, accelerator)
        eval_history.append({"step": global_step, **results})
        log_eval(accelerator, args, global_step, results)

    status = 0
    if accelerator.is_main_process:
        if skipped_total:
            logger.warning("images skipped (undecodable/truncated/tiny/over --max_image_pixels/unlabelled): %d", skipped_total)
        try:
            write_outputs(args, unwrapped, output_dir, results, eval_history, total_batch, lr, total_steps, elapsed, world)
        except HubPushError as error:
            logger.error("%s", error)
            status = 1
        top1 = f"{results['top1']:.2f}" if results else "n/a"
        top5 = f"{results['top5']:.2f}" if results else "n/a"
        print(
            f"run_image_classification: mode={args.mode} steps={global_step} top1={top1} top5={top5} "
            f"time={elapsed:.1f}s output_dir={output_dir}",
            flush=True,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return status


def log_eval(accelerator, args, step: int, results: dict) -> None:
    logger.info("eval at step %d: top-1 %.2f%%, top-5 %.2f%% (%d images)", step, results["top1"], results["top5"], results["eval_examples"])
    if args.with_tracking:
        accelerator.log({f"eval_{key}": value for key, value in results.items()}, step=step)


def save_training_checkpoint(accelerator, output_dir: Path, step: int, position: dict, id2label, eval_history, args, **run) -> Path:
    """`run`: the run's identity and hyper-parameters (`run_id`, `hyperparameters`), recorded for resumes."""
    positions = gather_positions(accelerator, position)
    trainer_state = {
        "global_step": step,
        "positions": positions,
        "mode": args.mode,
        "id2label": {str(k): v for k, v in id2label.items()},
        "eval_history": eval_history,
        **run,
    }
    return save_checkpoint(accelerator, output_dir, step, trainer_state, total_limit=args.checkpoints_total_limit)


def gather_positions(accelerator, position: dict) -> list[dict]:
    """Every rank's (epoch, batches consumed) — ranks read different shards and may differ."""
    local = torch.tensor([[position["epoch"], position["batches"]]], device=accelerator.device)
    gathered = accelerator.gather(local).cpu().tolist()
    return [{"epoch": int(epoch), "batches": int(batches)} for epoch, batches in gathered]


def dataset_names(args) -> tuple[str, str]:
    """(dataset_type: a Hub id or a local name, dataset_name: human-readable) for the model-index."""
    if args.dataset_name:
        name = args.dataset_name + (f" ({args.dataset_config_name})" if args.dataset_config_name else "")
        return args.dataset_name, name
    if args.train_dir:
        return Path(args.train_dir).name, f"local data ({Path(args.train_dir).name})"
    return "hf_mim-embedded-digits", EMBEDDED_DATASET


def run_summary(args, config, total_batch: int, lr: float, total_steps: int, elapsed: float, world: int) -> dict:
    summary = {
        "script": "training_scripts/run_image_classification.py",
        "mode": args.mode,
        "initialised from": args.model_name_or_path or f"random ({config.model_type} {args.model_size or 'base'})",
        "data": dataset_names(args)[1],
        "labels": config.num_labels,
        "image size": config.image_size,
        "optimizer steps": total_steps,
        "batch (total)": total_batch,
        "learning rate": f"{lr:.3g} ({args.optimizer}; weight decay {args.weight_decay})",
        "schedule": f"cosine, warm-up {args.num_warmup_steps} steps, min lr ratio {args.min_lr_ratio}",
    }
    if args.mode == "finetune":
        summary["layer decay"] = args.layer_decay
        summary["drop path"] = args.drop_path_rate
    else:
        summary["head"] = "BatchNorm1d(affine=False) + Linear on the frozen pooler output, folded into the Linear"
    summary["augmentation"] = (
        f"RandomResizedCrop(0.08-1) + flip, RandAugment {args.randaug}, RandomErasing {args.reprob}, "
        f"mixup {args.mixup}, cutmix {args.cutmix}, label smoothing {args.label_smoothing}"
    )
    summary["processes"] = world
    summary["wall time"] = f"{elapsed / 60:.1f} min"
    return summary


def write_outputs(args, model, output_dir: Path, results, eval_history, total_batch, lr, total_steps, elapsed, world) -> None:
    """The Hub-ready folder: weights, config (labels, full auto_map), code, processor, card, args, results."""
    save_hub_folder(model, output_dir, image_processor=build_image_processor(model.config.image_size))
    dataset_type, dataset_name = dataset_names(args)
    split = "validation" if uses_embedded_data(args) else args.validation_split
    eval_results = []
    if results is not None:
        write_json_atomic(
            output_dir / "eval_results.json",
            {**results, "step": total_steps, "mode": args.mode, "dataset": dataset_name, "split": split, "history": eval_history},
        )
        eval_results = classification_eval_results(
            results["top1"], results["top5"], dataset_type, dataset_name, split, args.dataset_config_name
        )
    summary = run_summary(args, model.config, total_batch, lr, total_steps, elapsed, world)
    finish_run_folder(output_dir, model, args, run=summary, results=eval_results, is_demo=uses_embedded_data(args))

if __name__ == "__main__":
    sys.exit(main())
