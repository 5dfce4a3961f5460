"""Stop a run cleanly, on every process at once, when the loss stops being finite."""

from __future__ import annotations

import math
from pathlib import Path

import torch


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf. Carries `step`, `loss` (the non-finite value: this process's
    if it is non-finite, else the first non-finite rank's) and
    `last_checkpoint` (the newest complete checkpoint, or None)."""

    def __init__(self, message: str, step: int, loss: float, last_checkpoint: Path | None):
        super().__init__(message)
        self.step = step
        self.loss = loss
        self.last_checkpoint = last_checkpoint


def _as_float_tensor(loss) -> torch.Tensor:
    if isinstance(loss, torch.Tensor):
        value = loss.detach().float()
        return value.mean() if value.numel() != 1 else value.reshape(())
    return torch.tensor(float(loss))


def check_finite_loss(loss, step: int, last_checkpoint: Path | str | None = None, accelerator=None) -> None:
    """Raise `NonFiniteLossError` if `loss` is NaN or infinite.

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

    bad_ranks = [index for index, v in enumerate(values) if not math.isfinite(v)]
    local = values[rank] if rank in bad_ranks else values[bad_ranks[0]]
    where = "" if len(values) == 1 else f" on process(es) {bad_ranks} of {len(values)} (losses {values})"
    checkpoint = Path(last_checkpoint) if last_checkpoint is not None else None
    if checkpoint is not None:
        resume = f"The last good checkpoint is {checkpoint}: resume from it with --resume_from_checkpoint {checkpoint}"
    else:
        resume = "No checkpoint has been saved yet (save some with --checkpointing_steps)"
    message = (
        f"non-finite training loss {local} at step {step}{where}. {resume}, after one of: a lower learning "
        "rate or a longer warm-up (--learning_rate/--base_learning_rate, --num_warmup_steps), gradient "
        "clipping (--max_grad_norm 1.0), or full fp32 precision (--mixed_precision no; fp16 overflows first)."
    )
    raise NonFiniteLossError(message, step=step, loss=local, last_checkpoint=checkpoint)
