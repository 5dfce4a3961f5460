"""What users bring from transformers' examples (image-pretraining `run_mim[_no_trainer].py`,
image-classification `run_image_classification[_no_trainer].py`): the same flag names and values where
the concept exists in hf_mim, and one table of the flags that do not, each refused with its reason.

- Hub loading: `--cache_dir --model_revision --token --trust_remote_code` go to every `from_pretrained`
  and `datasets.load_dataset` of a run (`hub_kwargs`); the token is a credential: `public_args` drops it.
- `--checkpointing_steps N | epoch`; `--lr_scheduler_type` takes transformers' `get_scheduler` names.
- Data limits on streams (`hf_mim.data.splits`): `--max_train_samples` / `--max_eval_samples` keep the
  first N examples of the source; `--train_val_split F` holds out the examples whose id hashes below F,
  the same examples in every run, process and epoch, whatever the seed.
"""

from __future__ import annotations

import argparse

from ..data.splits import hold_out, limit, training_examples  # noqa: F401  (re-exported: the flags' data side)
from .schedule import ALL_KINDS, UNSUPPORTED_KINDS

# flags of transformers' examples (and of the Trainer flags their READMEs pass) that have no meaning
# in hf_mim: {flag: why, and what to use instead}. Accepted and checked flags are declared with the others.
REFUSED_FLAGS = {
    "encoder_stride": "SimMIM's decoder stride; hf_mim methods have their own decoders (set fields with --config_overrides)",
    "fp16": "mixed precision is Accelerate's: accelerate launch --mixed_precision fp16",
    "bf16": "mixed precision is Accelerate's: accelerate launch --mixed_precision bf16",
    "do_train": "the scripts always train",
    "do_eval": "evaluation runs whenever a validation split, --validation_dir or --train_val_split is given",
    "remove_unused_columns": "batches are built by hf_mim's collators, not the Trainer",
    "label_names": "batches are built by hf_mim's collators, not the Trainer",
    "eval_strategy": "give --eval_steps N (and evaluation always runs at the end)",
    "evaluation_strategy": "give --eval_steps N (and evaluation always runs at the end)",
    "save_strategy": "give --checkpointing_steps N or --checkpointing_steps epoch",
    "save_steps": "give --checkpointing_steps N",
    "save_total_limit": "give --checkpoints_total_limit N",
    "logging_strategy": "give --logging_steps N",
    "load_best_model_at_end": "the final model is saved; every --checkpointing_steps checkpoint is kept up to --checkpoints_total_limit",
    "warmup_ratio": "give --num_warmup_steps (run_image_classification.py also takes --warmup_epochs)",
    "label_smoothing_factor": "give --label_smoothing (run_image_classification.py)",
    "optim": "run_image_classification.py takes --optimizer adamw|lars|sgd; pretraining uses AdamW",
    "deepspeed": "DeepSpeed and FSDP come from `accelerate config` / accelerate launch flags",
    "local_rank": "start processes with accelerate launch (or torchrun), which set the rank",
}


class _Refused(argparse.Action):
    """Collects the refused flags of a command line, so that one line names them all (`check_example_flags`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        refused = getattr(namespace, "refused_flags", None) or []
        setattr(namespace, "refused_flags", [*refused, option_string[2:]])


def add_refused_flags(parser: argparse.ArgumentParser, accepted=()) -> None:
    """Every `REFUSED_FLAGS` entry as a hidden flag (with or without a value, as the Trainer's
    `--do_eval True`) that ends the run with its reason, not argparse's 'unrecognized arguments';
    `accepted`: the entries a script gives a meaning (run_image_classification.py's --do_eval)."""
    for name in REFUSED_FLAGS:
        if name in accepted:
            continue
        parser.add_argument(f"--{name}", nargs="?", action=_Refused, help=argparse.SUPPRESS)


def bool_flag(text: str) -> bool:
    """A switch that also takes the Trainer's value form (`--trust_remote_code True`)."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


SWITCH = dict(type=bool_flag, nargs="?", const=True, default=False)


def scheduler_type(text: str) -> str:
    """--lr_scheduler_type: a `transformers.get_scheduler` name this package schedules per step."""
    if text in UNSUPPORTED_KINDS:
        raise argparse.ArgumentTypeError(f"{text} is not supported: {UNSUPPORTED_KINDS[text]}")
    if text not in ALL_KINDS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(ALL_KINDS)}")
    return text


def steps_or_epoch(text: str) -> int | str:
    """--checkpointing_steps: a number of optimizer steps, or 'epoch' (as transformers' examples)."""
    if text == "epoch":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps or 'epoch', got {text!r}") from None
    return value  # the range: check_example_flags


# the example flags, with the same names and meaning: (group, flag, argparse keywords)
EXAMPLE_FLAGS = [
    ("data", "validation_dir", dict(help="a separate folder (or parquet / WebDataset shards) of validation images")),
    ("data", "train_val_split", dict(type=float, help="hold out this fraction of the training source for validation "
                                     "(fixed examples, chosen by their id)")),
    ("data", "max_train_samples", dict(type=int, help="keep the first N examples of the training source")),
    ("data", "max_eval_samples", dict(type=int, help="keep the first N examples of the validation source")),
    ("model", "cache_dir", dict(help="where downloaded models and datasets are cached")),
    ("model", "model_revision", dict(default="main", help="branch, tag or commit of Hub models")),
    ("model", "token", dict(help="Hub token for reading private models and datasets (never written anywhere)")),
    ("model", "trust_remote_code", dict(**SWITCH, help="allow Hub code of models not in hf_mim")),
    ("model", "image_processor_name", dict(help="the image processor saved with the model (default: built from the image size)")),
    ("optim", "lr_scheduler_type", dict(type=scheduler_type, default="cosine", help=(
        "transformers' get_scheduler names (linear, cosine, cosine_with_restarts, polynomial, constant, "
        "constant_with_warmup, inverse_sqrt, cosine_with_min_lr), or simmim_cosine (SimMIM's timm cosine as its "
        "loop steps it); restarted at every stage (dBOT). Default: the papers' per-iteration warm-up + cosine (MAE)"))),
    ("optim", "per_device_eval_batch_size", dict(type=int, default=64)),
]
EXAMPLE_RANGES = dict(at_least_one=("max_train_samples", "max_eval_samples", "per_device_eval_batch_size"))


def check_example_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One line naming every refused flag with its reason, then the example flags' own ranges."""
    refused = getattr(args, "refused_flags", None)
    if refused:
        parser.error("not supported by hf_mim: " + "; ".join(f"--{name} ({REFUSED_FLAGS[name]})" for name in dict.fromkeys(refused)))
    if isinstance(args.checkpointing_steps, int) and args.checkpointing_steps < 1:
        parser.error(f"--checkpointing_steps must be >= 1, got {args.checkpointing_steps}")
    if args.train_val_split is not None and not 0 < args.train_val_split < 1:
        parser.error(f"--train_val_split must be in (0, 1), got {args.train_val_split}")
    if args.train_val_split is not None and args.validation_dir:
        parser.error("give either --validation_dir or --train_val_split, not both")


def hub_kwargs(args: argparse.Namespace, revision: bool = True) -> dict:
    """The Hub keywords of every `from_pretrained` of a run (`revision=False`: for `datasets`, whose
    revision is the dataset's, not the model's)."""
    kwargs = {"cache_dir": args.cache_dir, "token": args.token}
    if revision:
        kwargs.update(revision=args.model_revision, trust_remote_code=args.trust_remote_code)
    return kwargs


def epoch_length_known(args: argparse.Namespace) -> bool:
    """Whether a run knows (or counts) its training examples: it trains epochs, checkpoints per epoch, or is
    told --num_train_examples. A stream trained for --max_train_steps alone is never counted."""
    return args.max_train_steps is None or args.checkpointing_steps == "epoch" or bool(args.num_train_examples)


def steps_per_epoch(examples: int | None, total_batch: int) -> int | None:
    """Optimizer steps in one epoch of `examples` (the loaders drop the last partial batch); None when unknown."""
    return None if examples is None else max(1, examples // total_batch)


def checkpoint_every(args: argparse.Namespace, examples: int | None, total_batch: int) -> int | None:
    """Optimizer steps between checkpoints: --checkpointing_steps, or for 'epoch' one epoch of `examples`."""
    if args.checkpointing_steps != "epoch":
        return args.checkpointing_steps
    if examples is None:
        raise ValueError("--checkpointing_steps epoch needs the epoch length: give --num_train_examples")
    return steps_per_epoch(examples, total_batch)


def output_image_processor(args: argparse.Namespace, image_size: int):
    """The processor saved with the model: --image_processor_name (checked against the transform the
    model was trained with), else the evaluation transform of `image_size`."""
    from ..hub import build_image_processor

    built = build_image_processor(image_size)
    if not args.image_processor_name:
        return built
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(args.image_processor_name, **hub_kwargs(args))
    for field in ("image_mean", "image_std"):
        given, used = [round(float(v), 4) for v in getattr(processor, field)], [round(float(v), 4) for v in getattr(built, field)]
        if given != used:
            raise ValueError(f"--image_processor_name {args.image_processor_name}: its {field} {given} differs from "
                             f"the normalisation hf_mim trains with {used}")
    return processor


__all__ = [
    "EXAMPLE_FLAGS", "EXAMPLE_RANGES", "REFUSED_FLAGS", "SWITCH", "add_refused_flags", "bool_flag", "check_example_flags", "checkpoint_every",
    "epoch_length_known", "hold_out", "hub_kwargs", "limit", "output_image_processor", "scheduler_type", "steps_or_epoch",
    "steps_per_epoch", "training_examples",
]
