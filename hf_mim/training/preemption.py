"""Preemption: SLURM and cloud spot instances send SIGTERM (SLURM's `--signal=USR1@<seconds>`: SIGUSR1)
and kill the job after a grace period. Every training script stops cleanly on such a signal:

- `run_script` installs one `PreemptionHandler` for the run (`--preemption_signals`, default TERM,USR1;
  'none' keeps the default actions). Its Python handler only records the signal and its time.
- Once a `TrainingLoop` trains (`TrainingLoop.train`), the loop looks at the record at every optimizer
  step boundary (after the step's logs, evaluations and periodic checkpoint): under several processes
  one all-reduce (MAX) of (signal, -time) per step, so every rank stops after the same step even when
  only one was signalled. The loop then checkpoints that step through the normal atomic save (a
  signal during a save lets it finish, and that checkpoint is the one kept), waits for its Hub pushes,
  and raises `Preempted`; `run_script` logs "preempted at step N by SIGTERM, checkpoint <path>, x.x s
  from signal to exit" and returns `PREEMPTED_EXIT_STATUS`.
- Before a loop trains (set-up, evaluation-only runs) there is nothing to save: the handler raises
  `Preempted` at once, with the same exit status.
- DataLoader workers ignore the handled signals (`hf_mim.data.streaming.make_dataloader` gives them a
  `worker_init_fn` doing so), so a signal sent to the whole process group reaches the training process
  alone; torch would otherwise let a worker die of it and fail the next batch.

The same command line with `--resume_from_checkpoint latest` continues bitwise as the uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# EX_TEMPFAIL of sysexits.h ("temporary failure, try again"): the checkpoint is written, run the same command
# line again (a SLURM batch script requeues on it: `[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID`)
PREEMPTED_EXIT_STATUS = 75
DEFAULT_SIGNALS = "TERM,USR1"
FLAG = "--preemption_signals"
FLAG_HELP = (f"signals that stop the run cleanly after the current optimizer step, with a checkpoint of it and exit status "
             f"{PREEMPTED_EXIT_STATUS} (run the same command line with --resume_from_checkpoint latest to continue): "
             "comma-separated names (TERM, USR1, USR2, HUP, INT), or 'none'")
ALLOWED = ("TERM", "USR1", "USR2", "HUP", "INT")


class Preempted(Exception):
    """The run stopped on a preemption signal. `checkpoint` is what a resume continues from (None: nothing
    trained yet); `step` None: before any loop trained; `nested`: raised by a loop inside another run's
    finishing work (run_mim's downstream check), which the outer loop checkpoints."""

    def __init__(self, signum: int, received_at: float, step: int | None = None, checkpoint: Path | None = None,
                 nested: bool = False):
        super().__init__(signum, received_at, step, checkpoint)
        self.signum, self.received_at, self.step, self.checkpoint, self.nested = signum, received_at, step, checkpoint, nested

    def describe(self) -> str:
        where = "before training" if self.step is None else f"at step {self.step}"
        if self.checkpoint is not None:
            saved = f"checkpoint {self.checkpoint}"
        else:
            saved = "nothing new to save" if self.step is None else "no checkpoint (nothing trained yet)"
        return (f"preempted {where} by {signal.Signals(self.signum).name}, {saved}, "
                f"{time.time() - self.received_at:.1f} s from signal to exit")


def parse_signals(text: str | None) -> tuple[signal.Signals, ...]:
    """'TERM,USR1' (SIG prefix and case optional) -> the signals; 'none' or '' -> (). ValueError names the flag."""
    if text is None or text.strip().lower() in ("", "none"):
        return ()
    found = []
    for name in (part.strip().upper().removeprefix("SIG") for part in text.split(",")):
        if name not in ALLOWED:
            raise ValueError(f"{FLAG} {text}: {name or 'an empty name'} is not one of {', '.join(ALLOWED)} (or 'none')")
        found.append(getattr(signal, f"SIG{name}"))
    return tuple(dict.fromkeys(found))


class PreemptionHandler:
    """The process's signal handler. Deferred (a loop trains): records the first signal and its wall time,
    nothing else; immediate (no loop yet): raises `Preempted`. `ignore_in_dataloader_workers` tells
    `make_dataloader` to have its workers ignore the signals handled here."""

    ignore_in_dataloader_workers = True

    def __init__(self):
        self.signals: tuple[signal.Signals, ...] = ()
        self._previous: dict = {}
        self.reset()

    def reset(self) -> None:
        self.signum, self.received_at, self.owner = 0, None, None

    def install(self, signals) -> None:
        """Handle `signals` from now on (main thread only: elsewhere, e.g. a notebook's worker thread, nothing is installed)."""
        self.uninstall()
        self.reset()
        if not signals or threading.current_thread() is not threading.main_thread():
            return
        self.signals = tuple(signals)
        self._previous = {number: signal.signal(number, self) for number in self.signals}

    def uninstall(self) -> None:
        """Give the signals their earlier handlers back (a run in a test or notebook leaves none behind)."""
        for number, previous in self._previous.items():
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        self.signals, self._previous = (), {}
        self.owner = None

    def __call__(self, signum, frame) -> None:
        if not self.signum:  # the first signal counts; a second one (SLURM repeats them) changes nothing
            self.signum, self.received_at = signum, time.time()
        if self.owner is None:  # set-up or an evaluation-only run: nothing to save, stop now
            raise Preempted(signum, self.received_at)

    def claim(self, loop) -> bool:
        """`loop` starts training: from now on signals are only recorded. True for the run's own loop (the
        first), False for a loop nested in its finishing work."""
        if self.owner is None:
            self.owner = loop
        return self.owner is loop

    def agreed(self, accelerator) -> tuple[int, float] | None:
        """(signal, earliest wall time it came) if any rank got one, else None: the same answer on every rank
        (one all-reduce MAX of two numbers under several processes; call it on every rank at the same point)."""
        if accelerator is None or accelerator.num_processes == 1:
            return (self.signum, self.received_at) if self.signum else None
        import torch
        import torch.distributed as dist

        local = torch.tensor([float(self.signum), -(self.received_at or math.inf)], dtype=torch.float64, device=accelerator.device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        signum, received_at = int(local[0].item()), -float(local[1].item())
        return (signum, received_at) if signum else None


HANDLER = PreemptionHandler()  # one per process: signal handlers are process-wide


def handled_signals(args) -> tuple[signal.Signals, ...]:
    return parse_signals(getattr(args, "preemption_signals", DEFAULT_SIGNALS))


__all__ = ["DEFAULT_SIGNALS", "HANDLER", "PREEMPTED_EXIT_STATUS", "Preempted", "PreemptionHandler", "handled_signals", "parse_signals"]
