"""Training tooling shared by the scripts: parameter groups and AdamW, per-iteration lr schedules
(MAE warm-up + cosine, restarted per dBOT stage), exact atomic checkpoints with Accelerate, a
cross-process non-finite-loss guard, and top-k accuracy without the Hub.

    groups = weight_decay_param_groups(model, 0.05)                 # pretraining
    groups = layer_decay_param_groups(model, 0.05, 0.65, num_layers=12)  # fine-tuning (BEiT/MAE lrd)
    optimizer = build_adamw(groups, lr=linear_scaled_lr(1.5e-4, total_batch))
    schedule = StagedSchedule(optimizer, steps_per_stage=[n, n], warmup_steps=w)  # lr *= lr_scale
    accelerator.register_for_checkpointing(schedule)                # saved with every checkpoint
    ...
    check_finite_loss(loss, step, last_checkpoint, accelerator=accelerator)
    last_checkpoint = save_checkpoint(accelerator, output_dir, step, {"epoch": e, "batches_in_epoch": b})
    state = load_checkpoint(accelerator, resolve_resume_path("latest", output_dir))
"""

from .attention_refresh import AttentionMapStore, refresh_attention_maps
from .checkpoint import (
    TRAINER_STATE_NAME,
    CheckpointSaveError,
    UnusableCheckpointError,
    atomic_write_bytes,
    checkpoint_problem,
    checkpoint_step,
    find_latest_checkpoint,
    is_complete_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_trainer_state,
    resolve_resume_path,
    save_checkpoint,
    verify_checkpoint,
    write_json_atomic,
)
from .guards import NonFiniteInputError, NonFiniteLossError, check_finite_loss
from .preemption import PREEMPTED_EXIT_STATUS, Preempted
from .run_setup import (
    RunHyperparameters,
    UserInputError,
    apply_this_runs_hyperparameters,
    check_local_path,
    check_positive_flags,
    claim_output_dir,
    optimizer_hyperparameters,
    public_args,
    report_user_errors,
    tracker_config,
)
from .loop import (
    RunStart,
    TrainingLoop,
    forward_inputs,
    gather_positions,
    make_accelerator,
    optimizer_steps,
    run_script,
    start_run,
    stream_batches,
)
from .linear_probe import attach_batchnorm_probe, fold_batchnorm_probe, freeze_backbone, linear_probe_train_mode
from .metrics import AccuracyMeter, topk_correct
from .optim import (
    DEFAULT_SKIP_NAMES,
    build_adamw,
    is_no_decay,
    layer_decay_param_groups,
    vit_layer_id,
    weight_decay_param_groups,
)
from .schedule import (
    SCHEDULE_KINDS,
    StagedSchedule,
    WarmupCosineSchedule,
    linear_scaled_lr,
    schedule_factor,
    warmup_cosine_factor,
)

from .visualize import visualize_checkpoint

TRAINER_NAMES = ("MIMTrainer", "MIMTrainingArguments", "MIMTrainingCallback", "dataset_transform", "pretraining_collator")

__all__ = [
    # optim
    "DEFAULT_SKIP_NAMES",
    "build_adamw",
    "is_no_decay",
    "layer_decay_param_groups",
    "vit_layer_id",
    "weight_decay_param_groups",
    # schedule
    "SCHEDULE_KINDS",
    "StagedSchedule",
    "WarmupCosineSchedule",
    "linear_scaled_lr",
    "schedule_factor",
    "warmup_cosine_factor",
    # checkpoint
    "TRAINER_STATE_NAME",
    "atomic_write_bytes",
    "checkpoint_problem",
    "verify_checkpoint",
    "CheckpointSaveError",
    "UnusableCheckpointError",
    "checkpoint_step",
    "find_latest_checkpoint",
    "is_complete_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "read_trainer_state",
    "resolve_resume_path",
    "save_checkpoint",
    "write_json_atomic",
    # guards
    "NonFiniteLossError",
    "PREEMPTED_EXIT_STATUS",
    "Preempted",
    "NonFiniteInputError",
    # the loop
    "RunStart",
    "TrainingLoop",
    "forward_inputs",
    "gather_positions",
    "make_accelerator",
    "optimizer_steps",
    "run_script",
    "start_run",
    "stream_batches",
    "visualize_checkpoint",
    "check_finite_loss",
    # run setup: secrets, output folder, resume hyper-parameters, user errors
    "RunHyperparameters",
    "UserInputError",
    "apply_this_runs_hyperparameters",
    "check_local_path",
    "check_positive_flags",
    "claim_output_dir",
    "optimizer_hyperparameters",
    "public_args",
    "report_user_errors",
    "tracker_config",
    # metrics
    "AccuracyMeter",
    "topk_correct",
    # attention-driven masking
    "AttentionMapStore",
    "refresh_attention_maps",
    # linear probe
    "attach_batchnorm_probe", "fold_batchnorm_probe", "freeze_backbone", "linear_probe_train_mode",
    # transformers' Trainer (imported on first use: transformers.Trainer is a heavy import)
    *TRAINER_NAMES,
]


def __getattr__(name):
    if name in TRAINER_NAMES:
        from . import trainer_integration

        return getattr(trainer_integration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
