#!/usr/bin/env python
"""Fine-tuning and linear probing of any hf_mim checkpoint for image classification, with Accelerate
on streaming datasets.

    accelerate launch training_scripts/run_image_classification.py --model_name_or_path outputs/run_mim
        # embedded handwritten digits (offline), full fine-tuning of a run_mim.py output
    accelerate launch -m hf_mim.scripts.run_image_classification ...   # the same, installed (hf-mim-finetune)
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
- `--mode knn` (DINO): no training; weighted k-NN (`--knn_k 20 --knn_temperature 0.07`) of the validation
  images among the training images, on the L2-normalised `pooler_output` of the frozen base model
  (hf_mim/training/knn.py). Several processes share the work; every one holds the whole training bank.
- `--train_fraction 0.01 | 0.1` (any mode): a fixed, seeded, class-balanced subset of the training data
  (SimCLR's and ExtreMA's semi-supervised 1% / 10% protocols; hf_mim/data/fractions.py).

Augmentation is a pure function of (seed, epoch, example id) (timm's transforms run under RNGs
seeded per example and restored afterwards), mixup/cutmix of (seed, step); a resumed run skips the
batches each rank had already consumed in its current epoch, so resuming reproduces the run.
Top-1/top-5 on the validation split are computed in the package (no Hub), at `--eval_steps` and at
the end, and written to `eval_results.json` and the model card's model-index.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

import hf_mim  # noqa: F401  (registers every hf_mim model with the Auto classes)
from hf_mim.data import load_labelled_data
from hf_mim.data.finetune_transforms import SeededMixup
from hf_mim.data.fractions import class_balanced_subset
from hf_mim.training import (
    RunHyperparameters, StagedSchedule, TrainingLoop, UserInputError, attach_batchnorm_probe, fold_batchnorm_probe,
    freeze_backbone, linear_probe_train_mode, linear_scaled_lr, optimizer_steps, run_script, start_run,
)
from hf_mim.training.arguments import add_shared_flags, fill_defaults, uses_embedded_data, validate_shared_flags
from hf_mim.training.conventions import SWITCH, checkpoint_every, hub_kwargs
from hf_mim.training.classification import (
    EMBEDDED_DEMO_DEFAULTS, HEAD_NAME, MODE_DEFAULTS, base_config, build_model, build_optimizer,
    build_dataloaders, describe_lr_scales, evaluate, mixup_active, write_outputs,
)
from hf_mim.training.knn import add_protocol_flags, check_protocol_flags, run_knn

logger = logging.getLogger("run_image_classification")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = add_shared_flags(
        parser,
        {"data": "data (none given: the embedded handwritten digits, train/validation)", "model": "model",
         "optim": "optimisation (None: the mode's default, see MODE_DEFAULTS)", "run": "outputs"},
        train_dir={"help": "local folder of parquet files, WebDataset .tar shards, or images (<class>/<img>)"},
        model_name_or_path={"help": "hf_mim weights: a pretraining, converted or classifier folder, or a Hub id"},
        model_type={"help": "random-init baseline (without --model_name_or_path): an hf_mim method (default dbot)"},
        model_size={"help": "random-init baseline: a named size (tiny, demo, small, base, large, huge)"},
        config_overrides={"help": "config fields set when loading, e.g. 'use_mean_pooling=false'"},
        base_learning_rate={"help": "finetune 5e-4, linear_probe 0.1"},
        weight_decay={"help": "finetune 0.05, linear_probe 0"}, adam_beta2={"default": 0.999},
        num_train_epochs={"help": "finetune 100, linear_probe 90"}, num_warmup_steps={"help": "default: --warmup_epochs"},
        output_dir={"default": "outputs/run_image_classification"},
    )
    data, model, optim, run = groups["data"], groups["model"], groups["optim"], groups["run"]
    data.add_argument("--validation_split", default="validation", help="'none': no evaluation")
    data.add_argument("--label_column_name", help="default: detected (label, labels, cls); integers or a ClassLabel")
    model.add_argument("--mode", default="finetune", choices=["finetune", "linear_probe", "knn"])
    model.add_argument("--ignore_mismatched_sizes", **SWITCH,
                       help="start a new head when --model_name_or_path is a classifier for another number of labels")
    optim.add_argument("--optimizer", choices=["adamw", "lars", "sgd"], help="finetune adamw, linear_probe lars")
    optim.add_argument("--layer_decay", type=float, default=0.65, help="layer-wise lr decay (finetune only)")
    optim.add_argument("--drop_path_rate", type=float, help="finetune 0.1 (set in the config when loading), linear_probe 0")
    optim.add_argument("--warmup_epochs", type=float, help="finetune 5, linear_probe 10")
    aug = parser.add_argument_group("augmentation and regularisation (None: the mode's default)")
    aug.add_argument("--label_smoothing", type=float, help="finetune 0.1, linear_probe 0")
    aug.add_argument("--mixup", type=float, help="mixup alpha: finetune 0.8, linear_probe 0")
    aug.add_argument("--cutmix", type=float, help="cutmix alpha: finetune 1.0, linear_probe 0")
    aug.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    aug.add_argument("--mixup_switch_prob", type=float, default=0.5, help="probability of cutmix when both are on")
    aug.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"])
    aug.add_argument("--randaug", help="timm RandAugment spec: finetune 'rand-m9-mstd0.5-inc1', linear_probe 'none'")
    aug.add_argument("--reprob", type=float, help="RandomErasing probability: finetune 0.25, linear_probe 0")
    run.add_argument("--eval_steps", type=int, help="evaluate every N steps (always at the end)")
    add_protocol_flags(parser)
    args = parser.parse_args(argv)
    if uses_embedded_data(args):
        fill_defaults(args, parser, EMBEDDED_DEMO_DEFAULTS[args.mode])
    fill_defaults(args, parser, MODE_DEFAULTS[args.mode])
    validate_args(args, parser)
    return args


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not args.model_name_or_path and not (args.model_type or args.model_size):
        parser.error(
            "give --model_name_or_path (e.g. the output folder of run_mim.py, a converted checkpoint, a Hub id), "
            "or --model_type/--model_size for a randomly initialised baseline"
        )
    if args.model_name_or_path and args.model_size:
        parser.error("--model_size is for a random-init baseline: not with --model_name_or_path")
    validate_shared_flags(
        parser, args, at_least_one=("eval_steps",),
        non_negative=("warmup_epochs", "mixup", "cutmix", "reprob", "drop_path_rate"),
    )
    for name in ("mixup_prob", "mixup_switch_prob", "reprob"):
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
    check_protocol_flags(args, parser)

class ClassificationLoop(TrainingLoop):
    """Cross-entropy (or timm's soft-target loss under mixup/cutmix), evaluation every --eval_steps."""

    tracker_project = "run_image_classification"

    def __init__(self, *loop_args, mixup, criterion, eval_dataloader, id2label):
        super().__init__(*loop_args)
        self.progress_label = self.args.mode
        self.mixup, self.criterion, self.eval_dataloader, self.id2label = mixup, criterion, eval_dataloader, id2label
        self.eval_history: list[dict] = []

    def training_batch(self, batch, epoch):
        batch = self.to_device({"pixel_values": batch["pixel_values"], "labels": batch["labels"]})
        pixel_values, targets = batch["pixel_values"], batch["labels"]
        if self.mixup is not None:  # a pure function of (seed, step, micro step, rank): exact on resume
            mix_id = (self.global_step * self.args.gradient_accumulation_steps + self.micro_step) * self.run.world
            pixel_values, targets = self.mixup(pixel_values, targets, mix_id + self.accelerator.process_index)
        return {"pixel_values": pixel_values, "labels": targets}

    def compute_loss(self, batch):
        logits = self.model(pixel_values=batch["pixel_values"]).logits
        return self.criterion(logits.float(), batch["labels"]), None

    def clip_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def train_mode(self):
        if self.args.mode == "linear_probe":
            linear_probe_train_mode(self.unwrapped, True, head_name=HEAD_NAME)
        else:
            self.unwrapped.train()

    def extra_logs(self, output):
        return {"epoch": self.epoch}

    def after_step(self, step, output):
        if self.eval_dataloader is not None and self.args.eval_steps and step % self.args.eval_steps == 0 and step < self.total_steps:
            self.evaluate()

    def evaluate(self) -> dict:
        results = evaluate(self.unwrapped, self.eval_dataloader, self.accelerator)
        self.eval_history.append({"step": self.global_step, **results})
        logger.info("eval at step %d: top-1 %.2f%%, top-5 %.2f%% (%d images)", self.global_step, results["top1"],
                    results["top5"], results["eval_examples"])
        if self.args.with_tracking:
            self.accelerator.log({f"eval_{key}": value for key, value in results.items()}, step=self.global_step)
        return results

    def trainer_state(self):
        return {"mode": self.args.mode, "id2label": {str(k): v for k, v in self.id2label.items()}, "eval_history": self.eval_history}

    def resumed(self, trainer_state):
        self.eval_history = trainer_state.get("eval_history", [])


def main(argv: list[str] | None = None) -> int:
    return run_script("run_image_classification.py", train, parse_args(argv))


def train(args: argparse.Namespace, phase=None) -> int:
    # --- data and labels first (the model's head needs the label set; data errors end the run at once) ---
    image_size = base_config(args).image_size
    need_count = args.num_train_examples is None and (args.max_train_steps is None or args.num_warmup_steps is None
                                                      or args.checkpointing_steps == "epoch")
    need_count = need_count and args.mode != "knn" and args.train_fraction == 1
    try:
        data = load_labelled_data(args, uses_embedded_data(args), image_size, need_count, hub_kwargs(args, revision=False))
        if args.train_fraction < 1:  # before the split over processes: every rank keeps the same subset
            subset = class_balanced_subset(data.train, data.image_column, data.label_column, args.train_fraction, args.seed)
            data.train, data.num_examples = data.train.filter(subset.keeps), subset.size
    except ValueError as error:
        raise UserInputError(str(error)) from None
    if args.mode == "knn":
        return run_knn(args, data, phase)
    run = start_run(args)
    accelerator, world, total_batch = run.accelerator, run.world, run.total_batch(args)
    if run.saved_state is not None and {int(k): v for k, v in run.saved_state["id2label"].items()} != data.id2label:
        raise UserInputError(f"{run.resume_path} was trained on other labels")

    model = build_model(args, data.id2label)
    config = model.config
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.mode == "linear_probe":
        attach_batchnorm_probe(model, head_name=HEAD_NAME)
        logger.info("linear probe: backbone frozen, training %s", freeze_backbone(model, head_name=HEAD_NAME))

    stream, collator, dataloader, eval_dataloader = build_dataloaders(args, data, config.image_size, accelerator)

    # --- length, optimisation, loss ---
    examples = args.num_train_examples or data.num_examples
    total_steps = optimizer_steps(args, examples, total_batch)
    if args.num_warmup_steps is None:
        args.num_warmup_steps = round(args.warmup_epochs * examples / total_batch)
    if args.num_warmup_steps > total_steps:
        logger.warning("warm-up of %d steps > %d training steps: warming up over the whole run", args.num_warmup_steps, total_steps)
        args.num_warmup_steps = total_steps
    lr = args.learning_rate if args.learning_rate is not None else linear_scaled_lr(args.base_learning_rate, total_batch)
    optimizer = build_optimizer(args, model, lr)
    schedule = StagedSchedule(optimizer, base_lr=lr, steps_per_stage=[total_steps], warmup_steps=args.num_warmup_steps,
                              min_lr_ratio=args.min_lr_ratio, kind=args.lr_scheduler_type)
    if args.mode == "finetune":
        logger.info("layer-wise lr decay %.3g over %d blocks: lr scale by layer id {%s}",
                    args.layer_decay, config.num_hidden_layers, describe_lr_scales(optimizer))
    mixup, criterion = None, torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    if mixup_active(args):
        from timm.loss import SoftTargetCrossEntropy

        mixup = SeededMixup(args.seed, config.num_labels, args.mixup, args.cutmix, args.mixup_prob,
                            args.mixup_switch_prob, args.mixup_mode, args.label_smoothing)
        criterion = SoftTargetCrossEntropy()
    hyperparameters = RunHyperparameters.from_args(args, lr, total_steps, lr_scheduler_type=args.lr_scheduler_type)

    loop = ClassificationLoop(args, run, model, optimizer, schedule, hyperparameters, (dataloader, stream, collator),
                              mixup=mixup, criterion=criterion, eval_dataloader=eval_dataloader, id2label=data.id2label)
    loop.checkpoint_every = checkpoint_every(args, examples, total_batch)
    loop.prepare()
    logger.info(
        "%s %s (%s, %d labels) for %d steps, batch %d (%d per device x %d processes x %d accumulation), lr %.3g, %s",
        args.mode, type(loop.unwrapped).__name__, config.model_type, config.num_labels, total_steps, total_batch,
        args.per_device_train_batch_size, world, args.gradient_accumulation_steps, lr,
        type(getattr(loop.optimizer, "optimizer", loop.optimizer)).__name__,
    )
    loop.train(phase)
    if args.mode == "linear_probe":
        fold_batchnorm_probe(loop.unwrapped, head_name=HEAD_NAME)  # what is evaluated below is what is saved
    results = loop.evaluate() if eval_dataloader is not None else None

    def write() -> None:
        try:
            write_outputs(args, loop.unwrapped, run.output_dir, results, loop.eval_history, total_batch, lr, total_steps, loop.elapsed, world)
        finally:
            top1, top5 = (f"{results['top1']:.2f}", f"{results['top5']:.2f}") if results else ("n/a", "n/a")
            print(f"run_image_classification: mode={args.mode} steps={loop.global_step} top1={top1} top5={top5} "
                  f"time={loop.elapsed:.1f}s output_dir={run.output_dir}", flush=True)

    return loop.finish(write)


if __name__ == "__main__":
    sys.exit(main())
