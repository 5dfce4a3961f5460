"""The command-line flags every training script shares (data source, optimisation, outputs and Hub),
declared once; a script adds its own flags to the returned groups and passes the defaults and help
texts that differ."""

from __future__ import annotations

import argparse

from ..data import DEFAULT_MAX_IMAGE_PIXELS, max_pixels_argument
from .conventions import EXAMPLE_FLAGS, EXAMPLE_RANGES, add_refused_flags, check_example_flags, steps_or_epoch
from .preemption import DEFAULT_SIGNALS, FLAG_HELP as PREEMPTION_HELP, parse_signals
from .run_setup import check_positive_flags
from ..hub.training_pushes import HUB_STRATEGIES

# (group, flag, argparse keywords): the shared flags, in --help order
SHARED_FLAGS = [
    ("data", "dataset_name", dict(help="a Hub dataset name (streamed)")),
    ("data", "dataset_config_name", dict()),
    ("data", "train_dir", dict(help="local folder of parquet files, WebDataset .tar shards, or images")),
    ("data", "train_split", dict(default="train")),
    ("data", "image_column_name", dict(help="default: detected")),
    ("data", "shuffle_buffer_size", dict(type=int, default=1000)),
    ("data", "num_train_examples", dict(type=int, help="stream length, when epochs are asked for and unknown; with --max_train_steps it "
                                                      "sets the epoch of AMT's refresh delay")),
    ("data", "dataloader_num_workers", dict(type=int, default=0)),
    ("data", "max_image_pixels", dict(
        type=max_pixels_argument, default=DEFAULT_MAX_IMAGE_PIXELS,
        help="decode budget per image: larger JPEGs are decoded at 1/2-1/8 scale, other larger images skipped "
        "and counted ('none': no budget)",
    )),
    ("model", "model_name_or_path", dict()),
    ("model", "model_type", dict()),
    ("model", "model_size", dict()),
    ("model", "config_overrides", dict()),
    ("model", "attn_implementation", dict(default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])),
    ("model", "gradient_checkpointing", dict(action="store_true")),
    ("model", "torch_compile", dict(action="store_true", help="torch.compile the model after accelerator.prepare "
                                    "(in place: checkpoints keep the plain module's keys)")),
    ("model", "torch_compile_backend", dict(help="torch.compile backend (default inductor; 'aot_eager' for debugging); "
                                            "implies --torch_compile")),
    ("model", "torch_compile_mode", dict(choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                                         help="torch.compile mode; implies --torch_compile")),
    ("optim", "per_device_train_batch_size", dict(type=int, default=32)),
    ("optim", "learning_rate", dict(type=float, help="absolute lr; default base_learning_rate x total batch / 256")),
    ("optim", "base_learning_rate", dict(type=float)),
    ("optim", "weight_decay", dict(type=float)),
    ("optim", "adam_beta1", dict(type=float, default=0.9)),
    ("optim", "adam_beta2", dict(type=float)),
    ("optim", "max_grad_norm", dict(type=float, default=None, help="gradient clipping")),
    ("optim", "num_train_epochs", dict(type=float)),
    ("optim", "max_train_steps", dict(type=int, help="optimizer steps; overrides epochs")),
    ("optim", "gradient_accumulation_steps", dict(type=int, default=1)),
    ("optim", "num_warmup_steps", dict(type=int)),
    ("optim", "min_lr_ratio", dict(type=float, default=0.0)),
    ("optim", "seed", dict(type=int, default=0)),
    ("run", "output_dir", dict()),
    ("run", "overwrite_output_dir", dict(action="store_true", help="delete the checkpoints, logs and pictures of an earlier run in --output_dir")),
    ("run", "checkpointing_steps", dict(type=steps_or_epoch, help="save a resumable checkpoint every N steps, or every 'epoch'")),
    ("run", "checkpoints_total_limit", dict(type=int, default=2)),
    ("run", "resume_from_checkpoint", dict(
        help="a checkpoint folder, 'latest' (the newest in --output_dir; none yet: start from scratch), or a Hub id "
        "(owner/name) pushed with --hub_strategy checkpoint or all_checkpoints (its last checkpoint is downloaded). "
        "This run's lr, schedule, warm-up, weight decay and length apply after the resume")),
    ("run", "preemption_signals", dict(default=DEFAULT_SIGNALS, help=PREEMPTION_HELP)),
    ("run", "logging_steps", dict(type=int, default=10)),
    ("run", "with_tracking", dict(action="store_true")),
    ("run", "report_to", dict(default="tensorboard")),
    ("run", "push_to_hub", dict(action="store_true")),
    ("run", "hub_model_id", dict()),
    ("run", "hub_token", dict()),
    ("run", "hub_private_repo", dict(action="store_true")),
    ("run", "hub_strategy", dict(
        default="end", choices=HUB_STRATEGIES,
        help="what --push_to_hub pushes, as transformers' Trainer: end (the finished run folder, at the end), every_save "
        "(also the model at every --checkpointing_steps save), checkpoint (and the resumable checkpoint in last-checkpoint/), "
        "all_checkpoints (and every checkpoint-N/); uploads run in the background, a failed one is retried at the next save")),
    ("run", "license", dict(default="apache-2.0")),
]

# checked by `validate_shared_flags` (see check_positive_flags)
SHARED_RANGES = dict(
    at_least_one=("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                  "max_train_steps", "num_train_examples") + EXAMPLE_RANGES["at_least_one"],
    positive=("learning_rate", "base_learning_rate", "num_train_epochs", "max_grad_norm"),
    non_negative=("weight_decay", "num_warmup_steps", "shuffle_buffer_size", "dataloader_num_workers",
                  "checkpoints_total_limit", "min_lr_ratio"),
    fractions=("adam_beta1", "adam_beta2"),
)


def add_shared_flags(parser: argparse.ArgumentParser, titles: dict[str, str], own_flags=(), **per_flag: dict) -> dict:
    """Add the shared flags to groups titled `titles` (keys data, model, optim, run); `per_flag[name]`
    updates a flag's keywords (its default or help); `own_flags`: refused Trainer flags the script
    declares itself. Returns the groups for the script's own flags."""
    groups = {key: parser.add_argument_group(title) for key, title in titles.items()}
    for group, name, kwargs in SHARED_FLAGS + EXAMPLE_FLAGS:  # EXAMPLE_FLAGS: transformers' examples' names
        groups[group].add_argument(f"--{name}", **{**kwargs, **per_flag.get(name, {})})
    add_refused_flags(parser, accepted=own_flags)
    return groups


def validate_shared_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, **more_ranges) -> None:
    """One `parser.error` line for the first shared mistake, then for the script's own `more_ranges`."""
    if args.dataset_name and args.train_dir:
        parser.error("give either --dataset_name or --train_dir, not both")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    if args.hub_strategy != "end" and not args.push_to_hub:
        parser.error(f"--hub_strategy {args.hub_strategy} pushes during training: give --push_to_hub (and --hub_model_id)")
    if args.hub_strategy != "end" and not args.checkpointing_steps:
        parser.error(f"--hub_strategy {args.hub_strategy} pushes at every save: give --checkpointing_steps N or epoch")
    check_compile_flags(parser, args)
    try:
        parse_signals(args.preemption_signals)
    except ValueError as error:
        parser.error(str(error))
    ranges = {kind: SHARED_RANGES[kind] + tuple(more_ranges.get(kind, ())) for kind in SHARED_RANGES}
    check_positive_flags(parser, args, **ranges)
    check_example_flags(parser, args)
    if not 0 <= args.min_lr_ratio <= 1:
        parser.error(f"--min_lr_ratio must be in [0, 1], got {args.min_lr_ratio}")


def check_compile_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--torch_compile_backend / --torch_compile_mode imply --torch_compile (as in transformers'
    TrainingArguments); an unknown backend is one parser error naming the flag."""
    if getattr(args, "torch_compile_backend", None) or getattr(args, "torch_compile_mode", None):
        args.torch_compile = True
    if getattr(args, "torch_compile_backend", None):
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if args.torch_compile_backend not in known:
            parser.error(f"--torch_compile_backend {args.torch_compile_backend!r} is not a torch.compile backend "
                         f"(known: {', '.join(known)})")


def uses_embedded_data(args: argparse.Namespace) -> bool:
    """No data flag: the run trains on the sample data shipped with hf_mim."""
    return not (args.dataset_name or args.train_dir)


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> frozenset[str]:
    """The flags given on the command line `argv` (None: sys.argv), whatever their value (`--num_stages 1`
    counts even though 1 is the default): what later defaults must not overwrite. Parsed again with every
    default suppressed, so only given flags land in the namespace."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return frozenset(vars(given))


def fill_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser, table: dict, given=frozenset()) -> None:
    """Set every flag of `table` the user left at its parser default to the table's value; flags in `given`
    (`explicit_flags`: on the command line, even at the default's value) are left alone."""
    for name, value in table.items():
        if name not in given and getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)


__all__ = [
    "SHARED_FLAGS", "add_shared_flags", "check_compile_flags", "explicit_flags", "fill_defaults", "uses_embedded_data",
    "validate_shared_flags",
]
