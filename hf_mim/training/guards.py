"""Stop a run cleanly, on every process at once, when the loss stops being finite."""

from __future__ import annotations

import math
from pathlib import Path

import torch


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf. Carries `step`, `loss` (the non-finite value: this process's
    if it is non-finite, else the first non-finite rank's) and
    `last_checkpoint` (the newest complete checkpoint saved before `step`, or None)."""

    def __init__(self, message: str, step: int, loss: float, last_checkpoint: Path | None):
        super().__init__(message)
        self.step = step
        self.loss = loss
        self.last_checkpoint = last_checkpoint


class NonFiniteInputError(NonFiniteLossError):
    """The batch itself holds NaN/inf: the data, not the optimisation, would make the loss non-finite."""


def checkpoint_before(last_checkpoint: Path | None, step: int) -> Path | None:
    """The newest complete checkpoint saved before `step`. A checkpoint saved AT the failing step holds the
    very weights that gave the non-finite loss: resuming from it would fail again, whatever the lr."""
    if last_checkpoint is None:
        return None
    from .checkpoint import checkpoint_step, list_checkpoints

    saved = checkpoint_step(last_checkpoint)
    if saved is None or saved < step:
        return last_checkpoint
    earlier = [path for path in list_checkpoints(last_checkpoint.parent) if checkpoint_step(path) < step]
    return earlier[-1] if earlier else None


def _as_float_tensor(loss) -> torch.Tensor:
    if isinstance(loss, torch.Tensor):
        value = loss.detach().float()
        return value.mean() if value.numel() != 1 else value.reshape(())
    return torch.tensor(float(loss))


def check_finite_loss(loss, step: int, last_checkpoint: Path | str | None = None, accelerator=None, inputs=None) -> None:
    """Raise `NonFiniteLossError` if `loss` is NaN or infinite; `NonFiniteInputError` if, moreover, this
    rank's `inputs` (the batch's pixel values) hold NaN/inf: then the data is to blame, not the
    optimisation. The inputs are only looked at once the loss is non-finite: nothing extra per step.

    With an `accelerator` running several processes, every rank's loss is all-gathered (one float per
    rank), so all ranks raise together at the same step instead of one rank dying and the others hanging
    in the next collective; call it on every process, every step (or every N steps, the same N on all).
    Note that it reads the loss on the host, i.e. it synchronises with the accelerator once per call.
    """
    value = _as_float_tensor(loss)
    if accelerator is not None and accelerator.num_processes > 1:
        values = accelerator.gather(value.reshape(1).to(accelerator.device)).float().cpu().tolist()
        rank = accelerator.process_index
    else:
        values = [value.item()]
        rank = 0
    if all(math.isfinite(v) for v in values):
        return

    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        bad = int((~torch.isfinite(inputs)).sum())
        raise NonFiniteInputError(
            f"the batch of step {step} has {bad} NaN/inf values in pixel_values: the data is broken, not the "
            "optimisation (check the dataset's images and transform)",
            step=step, loss=values[rank], last_checkpoint=None,
        )
    bad_ranks = [index for index, v in enumerate(values) if not math.isfinite(v)]
    local = values[rank] if rank in bad_ranks else values[bad_ranks[0]]
    where = "" if len(values) == 1 else f" on process(es) {bad_ranks} of {len(values)} (losses {values})"
    checkpoint = checkpoint_before(Path(last_checkpoint) if last_checkpoint is not None else None, step)
    if checkpoint is not None:
        resume = f"The last good checkpoint is {checkpoint}: resume from it with --resume_from_checkpoint {checkpoint}"
    elif last_checkpoint is not None:
        resume = (f"{last_checkpoint} already holds the weights that give this loss and no earlier checkpoint is kept "
                  "(keep more with --checkpoints_total_limit); start again")
    else:
        resume = "No checkpoint has been saved yet (save some with --checkpointing_steps)"
    message = (
        f"non-finite training loss {local} at step {step}{where}. {resume}, after one of: a lower learning "
        "rate or a longer warm-up (--learning_rate/--base_learning_rate, --num_warmup_steps), gradient "
        "clipping (--max_grad_norm 1.0), or full fp32 precision (--mixed_precision no; fp16 overflows first)."
    )
    raise NonFiniteLossError(message, step=step, loss=local, last_checkpoint=checkpoint)
