"""What both training scripts settle before their first step, so that a run loses nothing and leaks nothing.

- Credentials never reach a written file: `public_args` is the only view of the command line that goes
  to trackers, `training_args.json` and cards.
- One run per output folder (`claim_output_dir`): a new run refuses a folder holding another run's
  checkpoints unless `--overwrite_output_dir` (which clears them) or an explicit resume of that run;
  every checkpoint records the run's identity; `--resume_from_checkpoint latest` with no checkpoint yet
  starts from scratch, so one command line serves the first launch and every restart.
- Resume honours this run's hyper-parameters (`RunHyperparameters`): the checkpoint restores the state
  (weights, optimizer moments, step, data position, RNGs); learning rate, schedule, warm-up, weight decay,
  betas and length come from this run's command line, and every difference is logged.
- Mistakes on the command line end the run with one line naming what is wrong (`report_user_errors`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import sys
import uuid
from argparse import Namespace
from dataclasses import asdict, dataclass
from pathlib import Path

from ..utils.extras import MissingExtraError
from .checkpoint import (
    TMP_PREFIX,
    CheckpointSaveError,
    TRASH_PREFIX,
    checkpoint_step,
    list_checkpoints,
    read_trainer_state,
    resolve_resume_path,
)

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- secrets

# Argument names that carry a credential (--hub_token, --token, --wandb_api_key, ...).
SECRET_NAME = re.compile(r"token|secret|password|passwd|api_?key|credential", re.IGNORECASE)
# Environment variables that hold credentials the run may use (Hub, trackers, cloud storage).
SECRET_ENV_NAMES = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_TOKEN", "WANDB_API_KEY", "COMET_API_KEY",
    "NEPTUNE_API_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS_JSON", "AZURE_STORAGE_KEY",
)
# A Hugging Face user access token, wherever it appears.
HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{16,}")
REDACTED = "<redacted>"


def secret_values(args: Namespace | None = None) -> list[str]:
    """The credentials this process knows: credential-named arguments and credential environment values."""
    values = [str(v) for k, v in (vars(args).items() if args is not None else ()) if SECRET_NAME.search(k) and v]
    values += [os.environ[name] for name in SECRET_ENV_NAMES if os.environ.get(name)]
    return [v for v in values if len(v) >= 4]


def redact(value, secrets: list[str]):
    """`value` with every known secret and every Hugging Face token replaced by "<redacted>" (strings in
    lists and dicts too)."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return HF_TOKEN_PATTERN.sub(REDACTED, value)
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item, secrets) for item in value)
    if isinstance(value, dict):
        return {key: redact(item, secrets) for key, item in value.items()}
    return value


def public_args(args: Namespace) -> dict:
    """`vars(args)` as it may be written anywhere (training_args.json, cards, trackers): credential-named
    arguments dropped, and credentials inside any other value redacted."""
    secrets = secret_values(args)
    return {key: redact(value, secrets) for key, value in vars(args).items() if not SECRET_NAME.search(key)}


def tracker_config(args: Namespace) -> dict:
    """The hyper-parameters handed to `accelerator.init_trackers` (scalars only, no credential)."""
    return {k: v for k, v in public_args(args).items() if isinstance(v, (int, float, str, bool))}


# ----------------------------------------------------------------------------------- output folder


def new_run_id(accelerator) -> str:
    """A fresh run identity, the same on every rank (drawn on the main process, broadcast)."""
    run_id = [uuid.uuid4().hex]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(run_id, from_process=0)
    return run_id[0]


def _run_ids(checkpoints: list[Path]) -> set[str | None]:
    return {read_trainer_state(path).get("run_id") for path in checkpoints}


def _clear_previous_run(output_dir: Path) -> list[str]:
    """Delete what an earlier run left that a new run must not mix with: its checkpoints (complete,
    interrupted or being deleted), its tracker logs and its step pictures."""
    removed = []
    for child in sorted(output_dir.iterdir()) if output_dir.is_dir() else []:
        is_checkpoint_dir = child.is_dir() and (
            checkpoint_step(child) is not None or child.name.startswith((TMP_PREFIX, TRASH_PREFIX))
        )
        if is_checkpoint_dir or (child.is_dir() and child.name in ("runs", "pictures")):
            shutil.rmtree(child)
            removed.append(child.name)
    return removed


def fetch_hub_checkpoint(args: Namespace, accelerator, output_dir: Path, resume_arg: str) -> str:
    """`--resume_from_checkpoint <hub id>`: the main process downloads the checkpoint pushed there
    (`hf_mim.hub.training_pushes.download_checkpoint`) into `output_dir`; every rank gets its path (or the
    same one-line error). Anything else is returned as it is."""
    from ..hub.training_pushes import download_checkpoint, looks_like_hub_id

    if not looks_like_hub_id(resume_arg):
        return resume_arg
    outcome = [None]  # (path, None) or (None, why)
    if accelerator.is_main_process:
        try:
            token = getattr(args, "hub_token", None) or getattr(args, "token", None)
            outcome = [(str(download_checkpoint(resume_arg, output_dir, token=token)), None)]
        except FileNotFoundError as error:
            outcome = [(None, str(error))]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome, from_process=0)
    path, why = outcome[0]
    if why is not None:
        raise UserInputError(why)
    return path


def claim_output_dir(args: Namespace, accelerator, output_dir: Path) -> tuple[Path | None, str]:
    """Decide what this run does with `output_dir`, identically on every rank; returns (the checkpoint to
    resume from or None, the run id to record in every checkpoint).

    Raises `UserInputError` when a new run would share the folder with another run's checkpoints."""
    resume_arg = args.resume_from_checkpoint
    latest = resume_arg is not None and str(resume_arg).lower() == "latest"
    if args.overwrite_output_dir and resume_arg:
        raise UserInputError("--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint would read: give one of them")
    if resume_arg and not latest:
        resume_arg = fetch_hub_checkpoint(args, accelerator, output_dir, resume_arg)
    existing = list_checkpoints(output_dir)
    stale = [child.name for child in output_dir.iterdir() if checkpoint_step(child) is not None] if output_dir.is_dir() else []
    resume_path = resolve_resume_path(resume_arg, output_dir, missing_ok=True) if resume_arg else None
    accelerator.wait_for_everyone()  # every rank has looked before the main process changes anything

    if args.overwrite_output_dir:
        if accelerator.is_main_process and output_dir.is_dir():
            removed = _clear_previous_run(output_dir)
            if removed:
                logger.info("--overwrite_output_dir: removed %s from %s", ", ".join(removed), output_dir)
    elif resume_path is None and (existing or stale):
        if latest:
            raise UserInputError(f"--resume_from_checkpoint latest: {output_dir} holds only incomplete or corrupted checkpoint folders ({', '.join(sorted(stale))}); "
                                 "remove them or start over with --overwrite_output_dir")
        names = ", ".join(path.name for path in existing) or ", ".join(sorted(stale))
        raise UserInputError(
            f"--output_dir {output_dir} holds the checkpoints of another run ({names}): continue it with "
            "--resume_from_checkpoint latest, start over with --overwrite_output_dir (deletes them), or choose another --output_dir"
        )
    elif resume_path is not None and existing:
        resumed_run = read_trainer_state(resume_path).get("run_id")
        others = _run_ids(existing) - {resumed_run}
        if others:
            raise UserInputError(
                f"--resume_from_checkpoint {resume_path} belongs to another run than the checkpoints in --output_dir "
                f"{output_dir}: resume it into its own folder, or clear this one with --overwrite_output_dir"
            )
    if latest and resume_path is None:
        logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting from scratch", output_dir)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    run_id = read_trainer_state(resume_path).get("run_id") if resume_path is not None else None
    return resume_path, run_id or new_run_id(accelerator)


# --------------------------------------------------------------------------- resume hyper-parameters


@dataclass
class RunHyperparameters:
    """What a user may deliberately change between a run and its resume. Recorded in every checkpoint;
    at resume this run's values apply (the schedule is rebuilt for this run's length at the resumed step)."""

    learning_rate: float
    weight_decay: float
    lr_scheduler_type: str
    num_warmup_steps: int
    min_lr_ratio: float
    total_steps: int
    max_grad_norm: float | None
    adam_beta1: float | None = None
    adam_beta2: float | None = None

    @classmethod
    def from_args(cls, args: Namespace, learning_rate: float, total_steps: int, lr_scheduler_type: str) -> "RunHyperparameters":
        """This run's values: the lr and length it computed, the rest from the scripts' shared flags."""
        return cls(
            learning_rate=learning_rate, weight_decay=args.weight_decay, lr_scheduler_type=lr_scheduler_type,
            num_warmup_steps=args.num_warmup_steps, min_lr_ratio=args.min_lr_ratio, total_steps=total_steps,
            max_grad_norm=args.max_grad_norm, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def changes_from(self, saved: dict | None) -> dict[str, tuple]:
        """{name: (checkpoint's value, this run's value)} for every setting that differs."""
        if not saved:
            return {}
        changes = {}
        for name, value in self.to_dict().items():
            old = saved.get(name)
            same = old == value or (isinstance(old, float) and isinstance(value, float) and math.isclose(old, value))
            if name in saved and not same:
                changes[name] = (old, value)
        return changes


def optimizer_hyperparameters(optimizer) -> list[dict]:
    """Every param group's settings (all but the parameters), as this run built them."""
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


def apply_this_runs_hyperparameters(optimizer, schedule, fresh_groups: list[dict], saved: dict | None, current: RunHyperparameters, step: int) -> None:
    """After `load_checkpoint`: put this run's group settings (lr, weight decay, betas, lr scales) back
    over the checkpoint's, set the lr of the resumed step from this run's schedule, and log what changed."""
    for group, fresh in zip(optimizer.param_groups, fresh_groups, strict=True):
        group.update(fresh)
    schedule.apply_lr()
    changes = current.changes_from(saved)
    if changes:
        described = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changes.items())
        logger.info("resume: this run changes %s; its values apply from step %d", described, step)


# ----------------------------------------------------------------------------------- user errors


class UserInputError(ValueError):
    """A mistake in what the user asked for (a flag, a path, a config field): reported in one line."""


class SetupPhase:
    """Tells `report_user_errors` whether training has started (before it, errors are the user's input)."""

    def __init__(self):
        self.training = False

    def training_started(self) -> None:
        self.training = True


@contextlib.contextmanager
def report_user_errors(script: str):
    """Turn errors raised while a run is set up (bad flags, paths, config fields, data columns) into one
    line `<script>: error: ...` and exit status 2, as argparse does; errors during training keep their
    traceback, except a checkpoint that could not be saved (`CheckpointSaveError`: one line, exit status 1).
    HF_MIM_TRACEBACK=1 keeps every traceback."""
    phase = SetupPhase()
    try:
        yield phase
    except CheckpointSaveError as error:  # at any time: the run stops, its previous checkpoint intact
        if os.environ.get("HF_MIM_TRACEBACK"):
            raise
        print(f"{script}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except (ValueError, OSError, KeyError, MissingExtraError) as error:
        if phase.training or os.environ.get("HF_MIM_TRACEBACK"):
            raise
        message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        message = " ".join(message.split()) or type(error).__name__
        print(f"{script}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def check_trackers(args: Namespace) -> None:
    """With --with_tracking, every tracker --report_to names must be installed: Accelerate would only
    warn and train untracked."""
    if not args.with_tracking:
        return
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    available = {str(tracker) for tracker in get_available_trackers()}
    for name in tracker_names(args):
        if name in ("all", "none"):
            continue
        if name not in LoggerType.list():
            raise UserInputError(f"--report_to {name}: not a tracker Accelerate knows ({', '.join(LoggerType.list())})")
        if name not in available:
            hint = "pip install 'hf_mim[tracking]'" if name == "tensorboard" else f"pip install {name}"
            raise UserInputError(f"--report_to {name}: {name} is not installed ({hint}), or drop --with_tracking")


def tracker_names(args: Namespace) -> list[str]:
    """--report_to as a list ("tensorboard,wandb" or "all")."""
    return [name.strip() for name in str(args.report_to).split(",") if name.strip()]


def check_local_path(flag: str, value: str | None) -> None:
    """A value that can only be a local path (absolute, ./, ../, ~ or a trailing slash) must exist:
    otherwise transformers would try it as a Hub repo id and fail with an unrelated validation error."""
    if not value:
        return
    looks_local = value.startswith(("/", "./", "../", "~")) or value.endswith("/") or value.count("/") > 1
    if looks_local and not Path(value).expanduser().exists():
        raise UserInputError(f"{flag} {value}: no such file or folder")


def check_positive_flags(parser, args: Namespace, at_least_one=(), positive=(), non_negative=(), fractions=()) -> None:
    """One `parser.error` line for the first flag out of range: `at_least_one` (counts, >= 1),
    `positive` (> 0), `non_negative` (>= 0), `fractions` ([0, 1)). Unset (None) flags are skipped."""
    checks = [(at_least_one, lambda v: v >= 1, "must be >= 1"), (positive, lambda v: v > 0, "must be > 0"),
              (non_negative, lambda v: v >= 0, "must be >= 0"), (fractions, lambda v: 0 <= v < 1, "must be in [0, 1)")]
    for names, ok, rule in checks:
        for name in names:
            value = getattr(args, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
                parser.error(f"--{name} {rule}, got {value}")


__all__ = [
    "REDACTED",
    "RunHyperparameters",
    "SetupPhase",
    "UserInputError",
    "apply_this_runs_hyperparameters",
    "check_local_path",
    "check_positive_flags",
    "check_trackers",
    "claim_output_dir",
    "new_run_id",
    "optimizer_hyperparameters",
    "public_args",
    "redact",
    "report_user_errors",
    "secret_values",
    "tracker_config",
    "tracker_names",
]
