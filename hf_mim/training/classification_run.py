"""One classification run, as run_image_classification.py runs it, callable in-process: its flags
(`parse_classification_args`), its labelled data (`load_classification_data`), its loop
(`ClassificationLoop`) and the training of a built classifier (`train_classifier`).

run_image_classification.py is these pieces around a model from --model_name_or_path; run_mim.py's
downstream check (hf_mim/training/downstream.py) trains the pretrained encoder and its random-init
twin through the same `train_classifier`, so the check runs exactly the script's recipe.
"""

from __future__ import annotations

import argparse
import logging
import re

import torch

from .arguments import add_shared_flags, fill_defaults, uses_embedded_data, validate_shared_flags
from .classification import (
    EMBEDDED_DEMO_DEFAULTS, HEAD_NAME, MODE_DEFAULTS, build_dataloaders, build_optimizer, describe_lr_scales, evaluate,
    mixup_active,
)
from .conventions import SWITCH, checkpoint_every, hub_kwargs
from .knn import add_protocol_flags, check_protocol_flags
from .lora import QKV_PARTS, apply_lora, check_lora_flags, describe_lora
from .linear_probe import attach_batchnorm_probe, fold_batchnorm_probe, freeze_backbone, linear_probe_train_mode
from .loop import TrainingLoop, optimizer_steps
from .run_setup import RunHyperparameters, UserInputError
from .schedule import StagedSchedule, linear_scaled_lr

SCRIPT_LOGGER = "run_image_classification"


def classification_parser(description: str = "", prog: str | None = None) -> argparse.ArgumentParser:
    """run_image_classification.py's parser (every shared flag, the modes, their recipes' flags)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = add_shared_flags(
        parser,
        {"data": "data (none given: the embedded handwritten digits, train/validation)", "model": "model",
         "optim": "optimisation (None: the mode's default, see MODE_DEFAULTS)", "run": "outputs"},
        own_flags=("do_eval",),
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
    aug.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                     help="RandomResizedCrop area range (timm's --scale; 0.08 1 as ImageNet; small images of whole "
                     "objects, e.g. digits, need a larger minimum)")
    aug.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (timm's --hflip; 0 for digits, text)")
    run.add_argument("--eval_steps", type=int, help="evaluate every N steps (always at the end)")
    run.add_argument("--do_eval", **SWITCH,
                     help="evaluate only, no training (as --max_train_steps 0): top-1/top-5 of the classifier "
                     "--model_name_or_path (a folder or Hub id) on the validation data, eval_results.json and a card")
    add_protocol_flags(parser)
    lora = parser.add_argument_group("LoRA fine-tuning (needs peft: pip install 'hf_mim[peft]'; hf_mim/training/lora.py)")
    lora.add_argument("--lora_rank", type=int, help="train a LoRA adapter of this rank (and the head) instead of every weight; "
                      "the saved model has it merged, the adapter alone is in <output_dir>/lora_adapter/")
    lora.add_argument("--lora_alpha", type=float, help="LoRA scale alpha / rank (default: alpha = rank, a scale of 1)")
    lora.add_argument("--lora_dropout", type=float, help="dropout on the adapter's input (default 0)")
    lora.add_argument("--lora_target_modules", nargs="+", metavar="NAME",
                      help="Linear layers to adapt, by last name: default qkv (every block's fused attention projection); "
                      "e.g. qkv proj fc1 fc2")
    lora.add_argument("--lora_qkv_parts", nargs="+", choices=QKV_PARTS, metavar="PART",
                      help="restrict the qkv adapter to these parts of the fused projection, one rank-R adapter each: "
                      "'q v' is the usual ViT recipe (LoRA on query and value)")
    return parser


def parse_classification_args(argv: list[str] | None = None, description: str = "", prog: str | None = None) -> argparse.Namespace:
    """The parsed command line with the mode's recipe (and the embedded demo's values) for every unset flag."""
    parser = classification_parser(description, prog)
    args = parser.parse_args(argv)
    if uses_embedded_data(args):
        fill_defaults(args, parser, EMBEDDED_DEMO_DEFAULTS[args.mode])
    fill_defaults(args, parser, MODE_DEFAULTS[args.mode])
    validate_args(args, parser)
    return args


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.max_train_steps == 0:  # no training: the same run as --do_eval (the shared check wants >= 1)
        args.do_eval, args.max_train_steps = True, None
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
    if not 0 < args.scale[0] <= args.scale[1] <= 1:
        parser.error(f"--scale must satisfy 0 < MIN <= MAX <= 1, got {args.scale[0]} {args.scale[1]}")
    for name in ("mixup_prob", "mixup_switch_prob", "reprob", "hflip"):
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
    check_lora_flags(args, parser)
    if args.do_eval:
        check_eval_only_flags(args, parser)


def check_eval_only_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--do_eval (or --max_train_steps 0) evaluates an existing classifier: nothing that trains."""
    if not args.model_name_or_path:
        parser.error("--do_eval evaluates a classifier: give its folder or Hub id with --model_name_or_path")
    if args.mode != "finetune":
        parser.error(f"--do_eval evaluates the classifier as it is: not with --mode {args.mode}")
    if args.lora_rank is not None:
        parser.error("--do_eval trains nothing: not with --lora_rank")
    if args.hub_strategy != "end":
        parser.error(f"--do_eval trains nothing: not with --hub_strategy {args.hub_strategy} (the evaluated folder is pushed at the end)")
    if args.validation_split.lower() == "none":
        parser.error("--do_eval evaluates on validation data: not with --validation_split none")


DATA_FLAGS = ("dataset_name", "dataset_config_name", "train_dir", "validation_dir", "train_split", "validation_split",
              "image_column_name", "label_column_name", "train_val_split", "max_train_samples", "max_eval_samples")


def load_classification_data(args, image_size: int, need_count: bool, embedded: bool | None = None, flag_prefix: str = ""):
    """`LabelledData` of the data flags (`embedded`: the sample digits; default: no data flag given), cut
    to `--train_fraction` (a class-balanced subset, the same on every rank). Data errors are
    `UserInputError`s; `flag_prefix` renames the data flags they name (run_mim.py's are "labelled_...")."""
    from ..data import load_labelled_data
    from ..data.fractions import class_balanced_subset

    embedded = uses_embedded_data(args) if embedded is None else embedded
    fraction = getattr(args, "train_fraction", 1.0)
    try:
        data = load_labelled_data(args, embedded, image_size, need_count and fraction == 1, hub_kwargs(args, revision=False))
        if fraction < 1:  # before the split over processes: every rank keeps the same subset
            subset = class_balanced_subset(data.train, data.image_column, data.label_column, fraction, args.seed)
            data.train, data.num_examples = data.train.filter(subset.keeps), subset.size
    except ValueError as error:
        message = str(error)
        if flag_prefix:
            message = re.sub(rf"--({'|'.join(DATA_FLAGS)})\b", rf"--{flag_prefix}\1", message)
        raise UserInputError(message) from None
    return data


class ClassificationLoop(TrainingLoop):
    """Cross-entropy (or timm's soft-target loss under mixup/cutmix), evaluation every --eval_steps."""

    tracker_project = SCRIPT_LOGGER

    def __init__(self, *loop_args, mixup, criterion, eval_dataloader, id2label):
        super().__init__(*loop_args)
        self.progress_label = self.args.mode
        self.mixup, self.criterion, self.eval_dataloader, self.id2label = mixup, criterion, eval_dataloader, id2label
        self.eval_history: list[dict] = []
        self.results = None  # the final evaluation (train_classifier)

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
        self.logger.info("eval at step %d: top-1 %.2f%%, top-5 %.2f%% (%d images)", self.global_step, results["top1"],
                         results["top5"], results["eval_examples"])
        if self.args.with_tracking:
            self.accelerator.log({f"eval_{key}": value for key, value in results.items()}, step=self.global_step)
        return results

    def trainer_state(self):
        return {"mode": self.args.mode, "id2label": {str(k): v for k, v in self.id2label.items()}, "eval_history": self.eval_history}

    def resumed(self, trainer_state):
        self.eval_history = trainer_state.get("eval_history", [])


def train_classifier(args, run, model, data, phase=None, logger_name: str = SCRIPT_LOGGER,
                     progress_label: str | None = None) -> ClassificationLoop:
    """Train `model` (a ...ForImageClassification for `data.id2label`) with the recipe of `args` (--mode
    finetune: every parameter, layer-wise lr decay, or with --lora_rank a LoRA adapter and the head, the
    loop's `unwrapped` then a peft model; linear_probe: a BatchNorm probe on the frozen
    backbone, folded into the head at the end), evaluate it at the end (`loop.results`, None without
    validation data) and return the loop (`unwrapped`, `hyperparameters`, `eval_history`, `elapsed`).
    `run` is the run's `RunStart` (its accelerator and output folder); it resumes from `run.resume_path`."""
    from ..data.finetune_transforms import SeededMixup

    log = logging.getLogger(logger_name)
    accelerator, world, total_batch = run.accelerator, run.world, run.total_batch(args)
    config = model.config
    if args.mode == "linear_probe":
        attach_batchnorm_probe(model, head_name=HEAD_NAME)
        log.info("linear probe: backbone frozen, training %s", freeze_backbone(model, head_name=HEAD_NAME))
    if getattr(args, "lora_rank", None):
        model = apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout or 0.0, args.lora_target_modules,
                           args.lora_qkv_parts, head_name=HEAD_NAME)
        log.info("%s", describe_lora(model))
    stream, collator, dataloader, eval_dataloader = build_dataloaders(args, data, config.image_size, accelerator)

    # --- length, optimisation, loss ---
    examples = args.num_train_examples or data.num_examples
    total_steps = optimizer_steps(args, examples, total_batch)
    if args.num_warmup_steps is None:
        args.num_warmup_steps = round(args.warmup_epochs * examples / total_batch)
    if args.num_warmup_steps > total_steps:
        log.warning("warm-up of %d steps > %d training steps: warming up over the whole run", args.num_warmup_steps, total_steps)
        args.num_warmup_steps = total_steps
    lr = args.learning_rate if args.learning_rate is not None else linear_scaled_lr(args.base_learning_rate, total_batch)
    optimizer = build_optimizer(args, model, lr)
    schedule = StagedSchedule(optimizer, base_lr=lr, steps_per_stage=[total_steps], warmup_steps=args.num_warmup_steps,
                              min_lr_ratio=args.min_lr_ratio, kind=args.lr_scheduler_type)
    if args.mode == "finetune" and not getattr(args, "lora_rank", None):
        log.info("layer-wise lr decay %.3g over %d blocks: lr scale by layer id {%s}",
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
    loop.logger = log
    if progress_label:
        loop.progress_label = progress_label
    loop.checkpoint_every = checkpoint_every(args, examples, total_batch)
    loop.prepare()
    log.info(
        "%s %s (%s, %d labels) for %d steps, batch %d (%d per device x %d processes x %d accumulation), lr %.3g, %s",
        args.mode, type(loop.unwrapped).__name__, config.model_type, config.num_labels, total_steps, total_batch,
        args.per_device_train_batch_size, world, args.gradient_accumulation_steps, lr,
        type(getattr(loop.optimizer, "optimizer", loop.optimizer)).__name__,
    )
    loop.train(phase)
    if args.mode == "linear_probe":
        fold_batchnorm_probe(loop.unwrapped, head_name=HEAD_NAME)  # what is evaluated (and saved) is the plain head
    loop.results = loop.evaluate() if eval_dataloader is not None else None
    return loop


def run_evaluation_only(args, data, phase=None, logger_name: str = SCRIPT_LOGGER) -> int:
    """--do_eval (--max_train_steps 0): top-1/top-5 of the classifier --model_name_or_path, as saved, on the
    validation stream (each process its share, the counts summed: several processes give the one-process
    numbers), logged, tracked, in eval_results.json and the card of <output_dir> (the evaluated model
    saved there as a Hub-ready folder, pushed with --push_to_hub)."""
    import time

    from .classification import evaluation_dataloader, load_classifier_for_evaluation, write_evaluation_folder
    from .loop import finish_run, start_run
    from .run_setup import tracker_config

    log = logging.getLogger(logger_name)
    if data.validation is None:
        raise UserInputError("--do_eval needs validation data: give --validation_dir or a source with a validation split")
    model = load_classifier_for_evaluation(args, data.id2label)
    run = start_run(args)
    accelerator = run.accelerator
    model.to(accelerator.device)
    if phase is not None:
        phase.training_started()  # set-up done: from here errors keep their traceback
    start = time.perf_counter()
    results = evaluate(model, evaluation_dataloader(args, *data.validation, model.config.image_size, accelerator), accelerator)
    elapsed = time.perf_counter() - start
    log.info("evaluation of %s: top-1 %.2f%%, top-5 %.2f%% (%d images, %d processes)", args.model_name_or_path,
             results["top1"], results["top5"], results["eval_examples"], run.world)
    if args.with_tracking:
        accelerator.init_trackers(SCRIPT_LOGGER, config=tracker_config(args))
        accelerator.log({f"eval_{key}": value for key, value in results.items()}, step=0)

    def write() -> None:
        summary = {"mode": "evaluation only (no training)", "evaluated": args.model_name_or_path,
                   "preprocessing": "resize the shorter side to image size / 0.875 (bicubic), center crop, ImageNet mean/std",
                   "processes": run.world, "wall time": f"{elapsed / 60:.1f} min"}
        write_evaluation_folder(args, model, run.output_dir, results, summary, mode="eval", evaluated=args.model_name_or_path)
        print(f"run_image_classification: mode=eval top1={results['top1']:.2f} top5={results['top5']:.2f} "
              f"images={results['eval_examples']} time={elapsed:.1f}s output_dir={run.output_dir}", flush=True)

    return finish_run(accelerator, write, log)


def check_resumed_labels(run, id2label: dict) -> None:
    """A resumed classification run must have been trained on the same label set."""
    if run.saved_state is not None and {int(k): v for k, v in run.saved_state["id2label"].items()} != id2label:
        raise UserInputError(f"{run.resume_path} was trained on other labels")


__all__ = [
    "ClassificationLoop", "check_resumed_labels", "classification_parser", "load_classification_data",
    "parse_classification_args", "run_evaluation_only", "train_classifier", "validate_args",
]
