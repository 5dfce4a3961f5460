"""Per-iteration learning-rate schedules: linear warm-up then half-cycle cosine (MAE's
`adjust_learning_rate`, applied every optimizer step), restarted at every dBOT stage.

The schedulers are `torch.optim.lr_scheduler.LRScheduler`s that set, for every param group,

    group["lr"] = base_lr * group.get("lr_scale", 1.0) * factor(step)

where `base_lr` is the group's `initial_lr` (the lr the optimizer was built with, or `base_lr=`) and
`step` counts optimizer steps (`last_epoch`). Their `state_dict` holds only numbers and lists, so
`accelerator.save_state/load_state` checkpoint them, whether they were passed to
`accelerator.prepare` or to `accelerator.register_for_checkpointing`.

Stepping with Accelerate: call `schedule.step()` once per *optimizer* step (after `optimizer.step()`,
only when `accelerator.sync_gradients`). A scheduler passed to `accelerator.prepare` is wrapped in
`AcceleratedScheduler`, which by default steps `num_processes` times per optimizer step (it assumes a
schedule written for one process); to keep `step == optimizer steps` either register it with
`accelerator.register_for_checkpointing(schedule)` and step it yourself (what `run_mim.py` does), or
create the `Accelerator(step_scheduler_with_optimizer=False)` (or `split_batches=True`).
"""

from __future__ import annotations

import functools
import logging
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

logger = logging.getLogger(__name__)

SCHEDULE_KINDS = ("cosine", "linear", "constant", "constant_with_warmup")
# transformers' `get_scheduler` names computed by transformers' own lr lambdas, per stage (see `schedule_factor`)
TRANSFORMERS_KINDS = ("cosine_with_restarts", "polynomial", "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr")
# get_scheduler names that are no per-step function of the step: {name: why not}
UNSUPPORTED_KINDS = {
    "reduce_lr_on_plateau": "it steps on an evaluation metric, not per optimizer step",
    "greedy": "it steps on an evaluation metric, not per optimizer step",
    "warmup_stable_decay": "it needs num_decay_steps, which no flag of transformers' examples gives either",
}
# an official recipe's own per-step schedule that no transformers name computes (see `schedule_factor`)
RECIPE_KINDS = ("simmim_cosine",)
ALL_KINDS = SCHEDULE_KINDS + TRANSFORMERS_KINDS + RECIPE_KINDS


def linear_scaled_lr(base_lr: float, total_batch_size: int) -> float:
    """The MAE/BEiT linear scaling rule: `lr = base_lr * total_batch_size / 256`."""
    return base_lr * total_batch_size / 256


def _check(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")


def schedule_factor(
    kind: str, step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """Multiplier at `step`: linear warm-up `step / warmup_steps` from 0 (not for "constant"), then `kind`:

    - "cosine": half-cycle cosine from 1 to `min_lr_ratio` at `total_steps` (MAE);
    - "linear": straight line from 1 to `min_lr_ratio` at `total_steps`;
    - "constant": 1, no warm-up (as transformers'); "constant_with_warmup": 1 after the warm-up;
    - one of `TRANSFORMERS_KINDS`: transformers' `get_scheduler` multiplier (warm-up included);
    - "simmim_cosine": SimMIM's (and SimMIM-AMT's) timm `CosineLRScheduler` as its loop steps it: the
      cosine runs over the whole stage, warm-up included (`min + (1 - min) * 0.5 * (1 + cos(pi * t / total))`
      once `t >= warmup_steps`), and `step_update(t)` is called after optimizer step t, so step t uses the
      value at t - 1 (steps 0 and 1 share the first). Warm-up from 0 (SimMIM's WARMUP_LR = 0).

    The four native kinds equal transformers' of the same name when `min_lr_ratio` is 0. Steps past
    `total_steps` stay at the final value.
    """
    _check(warmup_steps, total_steps, min_lr_ratio)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if kind in TRANSFORMERS_KINDS:
        return _transformers_lambda(kind, warmup_steps, total_steps, min_lr_ratio)(step)
    if kind == "simmim_cosine":
        step = max(step - 1, 0)
        if step < warmup_steps:
            return step / warmup_steps
        progress = 1.0 if total_steps <= 0 else min(1.0, step / total_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "constant":  # as transformers': no warm-up
        return 1.0
    if step < warmup_steps:
        return step / warmup_steps
    if kind == "constant_with_warmup":
        return 1.0
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)
    raise ValueError(f"unknown schedule kind {kind!r}; expected one of {ALL_KINDS}")


@functools.lru_cache(maxsize=64)
def _transformers_lambda(kind: str, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """transformers' own lr multiplier of `get_scheduler(kind)` (built once on a throw-away optimizer),
    so these kinds mean exactly what they mean in transformers' examples. `min_lr_ratio` is the
    `min_lr_rate` of the *_with_min_lr kinds; polynomial's `lr_end` (1e-7) is relative to the base lr."""
    import torch
    from transformers import get_scheduler

    if min_lr_ratio and "min_lr" not in kind:
        raise ValueError(f"--min_lr_ratio {min_lr_ratio} applies to cosine, linear and cosine_with_min_lr, not to {kind}")
    specific = {"min_lr_rate": min_lr_ratio} if "min_lr" in kind else {}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                              scheduler_specific_kwargs=specific)
    return scheduler.lr_lambdas[0]


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """MAE's per-iteration schedule: `step / warmup_steps` during warm-up, then
    `min + (1 - min) * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))`."""
    return schedule_factor("cosine", step, warmup_steps, total_steps, min_lr_ratio)


class StagedSchedule(LRScheduler):
    """Warm-up + decay restarted at every stage boundary (dBOT: each bootstrap stage has its own
    warm-up and cosine, computed on the stage-relative step). One stage is the plain MAE schedule.

    Args:
        optimizer: the optimizer whose groups' `lr` is set (each group's `lr_scale` is honoured).
        steps_per_stage: optimizer steps of each stage (a list), or of every stage (an int, with `num_stages`).
        num_stages: number of stages (needed when `steps_per_stage` is an int; checked against a list).
        warmup_steps: warm-up steps at the start of every stage.
        min_lr_ratio: final lr of each stage, as a fraction of the base lr.
        kind: "cosine" (default), "linear", "constant" or "constant_with_warmup" (see `schedule_factor`), or
            one of `TRANSFORMERS_KINDS` (transformers' `get_scheduler` lambdas, restarted per stage too).
        base_lr: if given, the base lr of every group (otherwise each group's lr at construction).

    The stage layout (steps_per_stage, warmup_steps, min_lr_ratio, kind) comes from the constructor;
    `load_state_dict` restores the progress (the step counter) and logs where the saved layout or base lrs
    differ: a resumed run follows this run's learning rate and length.
    """

    _LAYOUT_KEYS = ("steps_per_stage", "num_stages", "warmup_steps", "min_lr_ratio", "kind", "stage_starts")

    def __init__(
        self,
        optimizer: Optimizer,
        steps_per_stage: list[int] | int,
        num_stages: int | None = None,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        kind: str = "cosine",
        base_lr: float | None = None,
        last_epoch: int = -1,
    ):
        if isinstance(steps_per_stage, int):
            if num_stages is None:
                raise ValueError("num_stages is required when steps_per_stage is an int")
            lengths = [steps_per_stage] * num_stages
        else:
            lengths = [int(n) for n in steps_per_stage]
            if num_stages is not None and num_stages != len(lengths):
                raise ValueError(f"num_stages={num_stages} but steps_per_stage has {len(lengths)} entries")
        if not lengths or any(n <= 0 for n in lengths):
            raise ValueError(f"every stage needs at least one step, got steps_per_stage={lengths}")
        if kind not in ALL_KINDS:
            raise ValueError(f"unknown schedule kind {kind!r}; expected one of {ALL_KINDS}")
        _check(warmup_steps, max(lengths), min_lr_ratio)
        self.steps_per_stage: list[int] = lengths
        self.num_stages: int = len(lengths)
        self.warmup_steps: int = int(warmup_steps)
        self.min_lr_ratio: float = float(min_lr_ratio)
        self.kind: str = kind
        self.stage_starts: list[int] = [sum(lengths[:i]) for i in range(len(lengths))]
        if base_lr is not None and last_epoch == -1:
            for group in optimizer.param_groups:
                group["initial_lr"] = base_lr
        super().__init__(optimizer, last_epoch)

    # --- the schedule as a function of the optimizer step ---
    @property
    def total_steps(self) -> int:
        return sum(self.steps_per_stage)

    def stage_of(self, step: int) -> int:
        """The stage `step` belongs to (steps past the end belong to the last stage)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        stage = 0
        for index, start in enumerate(self.stage_starts):
            if step >= start:
                stage = index
        return stage

    def stage_start(self, stage: int) -> int:
        return self.stage_starts[stage]

    def is_stage_boundary(self, step: int) -> bool:
        """True at the first step of stages 1, 2, ... (where dBOT calls `start_new_stage()`)."""
        return step in self.stage_starts[1:]

    def factor(self, step: int) -> float:
        stage = self.stage_of(step)
        return schedule_factor(
            self.kind, step - self.stage_starts[stage], self.warmup_steps, self.steps_per_stage[stage], self.min_lr_ratio
        )

    @property
    def current_stage(self) -> int:
        return self.stage_of(max(self.last_epoch, 0))

    # --- LRScheduler ---
    def get_lr(self) -> list[float]:
        factor = self.factor(max(self.last_epoch, 0))
        return [
            base_lr * group.get("lr_scale", 1.0) * factor
            for base_lr, group in zip(self.base_lrs, self.optimizer.param_groups, strict=True)
        ]

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the progress (the step counter) only: the layout and the base lrs stay this run's, so a
        resumed run can be given another learning rate or length (call `apply_lr` once the optimizer's
        own state is loaded, to set the resumed step's lr at once)."""
        state = dict(state_dict)
        saved = {key: state.pop(key) for key in self._LAYOUT_KEYS if key in state}
        saved["base_lrs"] = state.pop("base_lrs", self.base_lrs)
        current = {key: getattr(self, key) for key in saved}
        if saved != current:
            logger.info(
                "%s: the checkpoint's schedule %s differs from this run's %s; continuing at step %s with this run's",
                type(self).__name__, saved, current, state.get("last_epoch"),
            )
        super().load_state_dict(state)

    def apply_lr(self) -> None:
        """Set every group's lr for the current step (after a resume, before the next optimizer step)."""
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class WarmupCosineSchedule(StagedSchedule):
    """One stage of `warmup_steps` linear warm-up then cosine to `min_lr_ratio` at `total_steps` (MAE)."""

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float = 0.0,
        base_lr: float | None = None,
        last_epoch: int = -1,
    ):
        super().__init__(
            optimizer,
            [total_steps],
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            kind="cosine",
            base_lr=base_lr,
            last_epoch=last_epoch,
        )
