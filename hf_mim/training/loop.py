"""The one training loop of hf_mim's scripts.

`run_script` wraps a script's `train` (one-line user errors, the NaN advice as exit status 1);
`start_run` builds the Accelerator, seeds, claims the output folder and reads a resumed checkpoint;
`TrainingLoop` does the rest every script shares: prepare and resume, accumulate / backward / clip /
step, the lr schedule, the progress bar and the logging window, checkpoints holding every rank's data
position, and the end of the run (outputs written on the main process, a failed push as status 1).
A script subclasses `TrainingLoop` and overrides only the hooks that say what differs: how a batch
reaches the device (`training_batch`), its loss (`compute_loss`), what happens after each optimizer
step (`after_step`), its extra logs and checkpoint keys. A preemption signal stops it at the next
step boundary with a checkpoint of that step (`stop_if_preempted`, hf_mim/training/preemption.py).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.collators import POSITION_KEY
from ..data.streaming import MAX_LOADER_WORKERS, resume_plan_of
from .checkpoint import checkpoint_step, list_checkpoints, load_checkpoint, read_trainer_state, save_checkpoint, write_json_atomic
from .guards import NonFiniteLossError, check_finite_loss
from .preemption import HANDLER as PREEMPTION, PREEMPTED_EXIT_STATUS, Preempted, handled_signals
from .run_setup import (
    RunHyperparameters,
    apply_this_runs_hyperparameters,
    check_trackers,
    claim_output_dir,
    optimizer_hyperparameters,
    public_args,
    report_user_errors,
    secret_values,
    tracker_config,
    tracker_names,
)

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def make_accelerator(args, output_dir: Path):
    """The Accelerator both scripts train with: gradient accumulation stepped by the loop itself, no
    batch dispatching or splitting (each rank streams its own shards), trackers logging to
    `output_dir/runs` (tensorboard files there are uploaded with the model: the Hub's metrics tab)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration

    return Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False),
        log_with=([name for name in tracker_names(args) if name != "none"] or None) if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
    )


# True: a resumed run decodes and skips the batches it had consumed (the replay path), as before the
# stream recorded positions; the resume benchmark and the tests compare the two paths.
_REPLAY_RESUME = False


class StreamPositions:
    """Where each DataLoader worker of this rank stands in the current epoch: the raw records consumed
    after each of its batches (the batches' `stream_position`, popped here). A checkpoint keeps
    `resume_point()`: `rounds` (batches every worker had delivered) and each worker's raw records at its
    `rounds`-th batch. Resuming, every worker skips those records undecoded (`ResumePlan`); the DataLoader
    then delivers batch `rounds x workers` first, as the uninterrupted pass did (round robin over the
    workers), and only the < `workers` batches consumed after it are decoded again and dropped."""

    def __init__(self, workers: int):
        self.workers = max(1, int(workers))
        self.start_epoch(0)

    def start_epoch(self, epoch: int, rounds: int = 0, records: list[int] | None = None) -> None:
        self.epoch, self.rounds, self.known = epoch, rounds, True
        self.ends = {worker: [] if records is None else [records[worker]] for worker in range(self.workers)}

    def note(self, batch: dict) -> None:
        position = batch.pop(POSITION_KEY, None)
        if position is None or position.numel() == 0:
            self.known = False  # a stream without positions: resumes replay
            return
        worker, last = (int(value) for value in position[-1])
        if worker >= self.workers:
            self.known = False
            return
        self.ends[worker].append(last + 1)

    def resume_point(self) -> dict | None:
        """{"rounds", "records"} of the batches noted so far this epoch, or None (unknown: replay)."""
        if not self.known:
            return None
        offset = 1 if self.rounds else 0  # the resumed epoch's first entry is the skipped rounds' end
        done = min(len(ends) - offset for ends in self.ends.values())
        rounds = self.rounds + done
        records = [ends[done + offset - 1] if done + offset else 0 for ends in self.ends.values()]
        return {"rounds": rounds, "records": records}


def stream_batches(dataloader, stream, collator, start_epoch: int, skip_batches: int, resume: dict | None = None,
                   positions: StreamPositions | None = None):
    """(epoch, index in epoch, batch) forever: each rank cycles through its own shards, so every rank
    takes the same number of optimizer steps even when shards are uneven.

    Resuming continues epoch `start_epoch` after its first `skip_batches` batches: with per-example
    seeding (hf_mim.data collators) that reproduces the interrupted run exactly, which datasets'
    own state_dict does not (it loses the shuffle buffer). With `resume` (a checkpoint's `resume_point`)
    and a stream from `prepare_stream`, the workers skip the consumed raw records before decoding
    (`StreamPositions`); otherwise the epoch is replayed and its first batches dropped. `positions`
    follows every batch (its `stream_position` popped) for the next checkpoint.
    """
    workers = max(1, getattr(dataloader, "num_workers", 0))
    positions = positions or StreamPositions(workers)
    plan = resume_plan_of(stream)
    rounds, records = (resume["rounds"], resume["records"]) if resume else (0, None)
    usable = records is not None and len(records) == workers <= MAX_LOADER_WORKERS and rounds * workers <= skip_batches
    if _REPLAY_RESUME or plan is None or not usable:
        rounds, records = 0, None
    if records is not None:
        logger.info("resume: the stream skips %s raw records (per DataLoader worker) undecoded, then %d batches by replay",
                    records, skip_batches - rounds * workers)
    elif skip_batches:
        logger.info("resume: replaying %d batches of epoch %d", skip_batches, start_epoch)
    epoch, skip = start_epoch, skip_batches
    while True:
        stream.set_epoch(epoch)
        collator.set_epoch(epoch)
        positions.start_epoch(epoch, rounds, records)
        if records is not None:
            plan.set(records)
        empty = True
        for index, batch in enumerate(dataloader, start=rounds * workers):
            empty = False
            positions.note(batch)
            if index < skip:
                continue
            yield epoch, index, batch
        if records is not None:
            plan.clear()
        elif empty:
            raise RuntimeError("the training stream yielded no full batch: lower --per_device_train_batch_size")
        epoch, skip, rounds, records = epoch + 1, 0, 0, None


def gather_positions(accelerator, position: dict, resume_point: dict | None = None) -> list[dict]:
    """Every rank's (epoch, batches consumed) — ranks read different shards and may differ — with, where
    every rank knows it, its raw-record `resume_point` (`StreamPositions`: "rounds", "records" per worker)."""
    local = [position["epoch"], position["batches"]]
    records = resume_point["records"] if resume_point else []
    width = accelerator.gather(torch.tensor([len(records)], device=accelerator.device)).cpu()
    known = resume_point is not None and bool((width == len(records)).all())  # same worker count on every rank
    known = bool(accelerator.gather(torch.tensor([int(known)], device=accelerator.device)).cpu().all())
    if known:
        local += [resume_point["rounds"], *records]
    gathered = accelerator.gather(torch.tensor([local], device=accelerator.device)).cpu().tolist()
    positions = [{"epoch": int(row[0]), "batches": int(row[1])} for row in gathered]
    if known:
        for entry, row in zip(positions, gathered):
            entry.update(rounds=int(row[2]), records=[int(value) for value in row[3:]])
    return positions


def check_replicas_in_sync(accelerator, model) -> None:
    """Under DDP every rank must end with the same weights; a parameter that silently stopped being
    reduced (or a rank-local update) would otherwise be found only after the run, in its checkpoint.
    Compares per-parameter float64 sums across ranks (one small all-gather at the end of the run);
    sharded engines (FSDP, DeepSpeed ZeRO) hold different shards per rank and are left out."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return
    names, sums = zip(*[(name, parameter.detach().double().sum()) for name, parameter in model.module.named_parameters()])
    gathered = accelerator.gather(torch.stack(sums)[None]).cpu()
    differing = [name for name, column in zip(names, gathered.T) if not bool((column == column[0]).all())]
    if differing:
        raise RuntimeError(f"weights differ across ranks after training (first: {differing[0]}, {len(differing)} in all): "
                           "a parameter was updated on one rank only")
    logger.info("weights identical on all %d ranks (%d parameters compared)", accelerator.num_processes, len(names))


def forward_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch entries `model.forward` accepts (the rest: example ids, decode counters)."""
    accepted = inspect.signature(model.forward).parameters
    return {key: value for key, value in batch.items() if key in accepted}


def optimizer_steps(args, examples: int | None, total_batch: int, minimum: int = 1) -> int:
    """`--max_train_steps`, else ceil(epochs x examples / total batch) (at least `minimum`)."""
    if args.max_train_steps is not None:
        return args.max_train_steps
    epochs = args.num_train_epochs if args.num_train_epochs is not None else 1
    steps = max(minimum, math.ceil(epochs * examples / total_batch))
    logger.info("%d examples x %s epochs / batch %d = %d optimizer steps", examples, epochs, total_batch, steps)
    return steps


def compile_in_place(model, args) -> None:
    """`--torch_compile`: `model.compile(...)` (nn.Module.compile) on the prepared model, after any DDP
    wrapping, as accelerate's dynamo plugin orders it. In place rather than `torch.compile(model)`, whose
    wrapper would put `_orig_mod.` in front of every key of every checkpoint: checkpoints and the saved
    model stay interchangeable between compiled and eager runs."""
    if not getattr(args, "torch_compile", False):
        return
    options = {"backend": getattr(args, "torch_compile_backend", None) or "inductor"}
    if getattr(args, "torch_compile_mode", None):
        options["mode"] = args.torch_compile_mode
    logger.info("torch.compile of the model: %s", options)
    model.compile(**options)


def run_script(script: str, train, args) -> int:
    """Run `train(args, phase)`: setup mistakes end in one line (exit status 2), a non-finite loss in its
    advice (status 1), a preemption signal (--preemption_signals) in a checkpoint of the last finished step
    and `PREEMPTED_EXIT_STATUS` (hf_mim/training/preemption.py)."""
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    PREEMPTION.install(handled_signals(args))
    try:
        with report_user_errors(script) as phase:
            return train(args, phase)
    except NonFiniteLossError as error:
        logging.getLogger(Path(script).stem).error("%s", error)
        return 1
    except Preempted as stop:
        logging.getLogger(Path(script).stem).warning("%s", stop.describe())
        return PREEMPTED_EXIT_STATUS
    finally:
        PREEMPTION.uninstall()


@dataclass
class RunStart:
    """What a run knows before its model exists: where it writes, and what it resumes."""

    accelerator: object
    output_dir: Path
    resume_path: Path | None
    run_id: str
    saved_state: dict | None

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def total_batch(self, args) -> int:
        return args.per_device_train_batch_size * self.world * args.gradient_accumulation_steps


def start_run(args) -> RunStart:
    """The Accelerator, the seed, the claimed output folder and the resumed checkpoint's trainer state."""
    from accelerate.utils import set_seed

    output_dir = Path(args.output_dir)
    check_trackers(args)  # an asked-for tracker that is missing is a setup error, not a warning
    accelerator = make_accelerator(args, output_dir)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(args.seed)
    resume_path, run_id = claim_output_dir(args, accelerator, output_dir)
    saved_state = read_trainer_state(resume_path) if resume_path else None
    return RunStart(accelerator, output_dir, resume_path, run_id, saved_state)


class TrainingLoop:
    """The loop every script runs; subclasses override the hooks below (each default is what a plain
    supervised run needs, or nothing).

    `data` is (dataloader, stream, collator) of this rank's training stream. Attributes a hook may
    read: `model` (prepared), `unwrapped`, `optimizer`, `global_step`, `micro_step`, `epoch`,
    `last_checkpoint`, `total_steps`."""

    progress_label = "training"
    tracker_project = "training"  # also the logger's name: the script's own ("run_mim: step 3 {...}")

    def __init__(self, args, run: RunStart, model, optimizer, schedule, hyperparameters: RunHyperparameters, data):
        self.args, self.run = args, run
        self.accelerator = run.accelerator
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.hyperparameters = hyperparameters
        self.total_steps = hyperparameters.total_steps
        self.dataloader, self.stream, self.collator = data
        self.global_step, self.micro_step, self.epoch = 0, 0, 0
        self.position = {"epoch": 0, "batches": 0}
        self.last_checkpoint = run.resume_path
        self.decode_counts = {"images_skipped": 0, "images_converted": 0}
        self.last_batch = None
        self.elapsed = 0.0
        self.logger = logging.getLogger(self.tracker_project)
        # steps between checkpoints; a script sets it for --checkpointing_steps epoch (conventions.checkpoint_every)
        self.checkpoint_every = args.checkpointing_steps if isinstance(args.checkpointing_steps, int) else None
        self.hub_pusher = make_hub_pusher(args, run)

    # ------------------------------------------------------------------------------ hooks
    def checkpointed_objects(self) -> list:
        """Objects with state_dict/load_state_dict saved in every checkpoint beside the schedule."""
        return []

    def training_batch(self, batch: dict, epoch: int) -> dict:
        """The collated batch as the loss needs it, on the device (uint8 pixels normalised there)."""
        return self.to_device(batch)

    def to_device(self, batch: dict) -> dict:
        """`batch` on the device, its uint8 pixels normalised there by the collator (`batch_to_device`)."""
        from ..data import batch_to_device

        return batch_to_device(batch, self.accelerator.device, self.collator)

    def compute_loss(self, batch: dict):
        """(loss, model output) of one micro-batch."""
        raise NotImplementedError

    def clip_parameters(self):
        return self.model.parameters()

    def train_mode(self) -> None:
        self.model.train()

    def before_step(self, step: int) -> None:
        """Before the first micro-batch of optimizer step `step` (0-based)."""

    def after_step(self, step: int, output) -> None:
        """After optimizer step `step` (1-based) and its logs, before its checkpoint."""

    def extra_logs(self, output) -> dict:
        return {}

    def trainer_state(self) -> dict:
        """Extra JSON-serializable keys of every checkpoint's trainer_state.json."""
        return {}

    def resumed(self, trainer_state: dict) -> None:
        """Read back what `trainer_state` added."""

    def write_hub_model(self, folder: Path) -> None:
        """The model as pushed at a save (--hub_strategy every_save and up): its `save_pretrained` form
        (config, weights, hf_mim's model-zone code), a peft model's adapter in `lora_adapter/` (an adapter
        at the root would make `from_pretrained` of the repo load it as one), else its bare weights."""
        from transformers import PreTrainedModel
        from transformers.utils import is_peft_available

        if is_peft_available():
            from peft import PeftModel

            from .lora import ADAPTER_FOLDER

            if isinstance(self.unwrapped, PeftModel):  # where the finished folder keeps it, not peft's root layout
                self.unwrapped.save_pretrained(folder / ADAPTER_FOLDER)
                return
        if isinstance(self.unwrapped, PreTrainedModel):
            self.unwrapped.save_pretrained(folder)
        else:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in self.unwrapped.state_dict().items()}, folder / "model.safetensors")

    # ------------------------------------------------------------------------------ the loop
    def prepare(self) -> None:
        """`accelerator.prepare`, checkpointed objects registered, and the resume (this run's
        hyper-parameters applied over the checkpoint's)."""
        accelerator = self.accelerator
        self.model, self.optimizer = accelerator.prepare(self.model, self.optimizer)
        compile_in_place(self.model, self.args)
        fresh_groups = optimizer_hyperparameters(self.optimizer)
        for obj in [self.schedule, *self.checkpointed_objects()]:
            accelerator.register_for_checkpointing(obj)
        self.unwrapped = accelerator.unwrap_model(self.model)
        if self.run.resume_path is None:
            return
        state = load_checkpoint(accelerator, self.run.resume_path)
        self.global_step = state["global_step"]
        self.position = dict(state["positions"][accelerator.process_index])
        self.resumed(state)
        self.logger.info("resumed from %s at step %d (epoch %d, batch %d)", self.run.resume_path, self.global_step,
                         self.position["epoch"], self.position["batches"])
        apply_this_runs_hyperparameters(self.optimizer, self.schedule, fresh_groups, state.get("hyperparameters"),
                                        self.hyperparameters, self.global_step)

    def train(self, phase=None) -> None:
        """Train until `total_steps` optimizer steps (after `prepare`)."""
        from tqdm.auto import tqdm

        args, accelerator = self.args, self.accelerator
        if args.with_tracking:
            accelerator.init_trackers(self.tracker_project, config=tracker_config(args))
        self.progress = tqdm(total=self.total_steps, initial=self.global_step,
                             disable=not accelerator.is_local_main_process, desc=self.progress_label)
        self.window_start, self.window_images = time.perf_counter(), 0
        run_start = time.perf_counter()
        self.train_mode()
        self.stream_positions = StreamPositions(getattr(self.dataloader, "num_workers", 0))
        resume = {key: self.position[key] for key in ("rounds", "records")} if "records" in self.position else None
        batches = stream_batches(self.dataloader, self.stream, self.collator, self.position["epoch"], self.position["batches"],
                                 resume=resume, positions=self.stream_positions)
        if phase is not None:
            phase.training_started()
        self.stop_if_preempted()  # a signal during set-up
        while self.global_step < self.total_steps:
            if self.micro_step == 0:
                self.before_step(self.global_step)
            loss, output = self.micro_batch(*next(batches))
            if accelerator.sync_gradients:
                self.end_step(loss, output)
                self.stop_if_preempted()
        self.progress.close()
        accelerator.wait_for_everyone()
        self.elapsed = time.perf_counter() - run_start
        check_replicas_in_sync(accelerator, self.model)

    def micro_batch(self, epoch: int, index: int, batch: dict):
        """Forward, finite-loss check, backward, and (on the last micro-batch) clip and step."""
        accelerator, args = self.accelerator, self.args
        self.epoch, self.position = epoch, {"epoch": epoch, "batches": index + 1}
        for key in self.decode_counts:
            self.decode_counts[key] += int(batch[key].sum())
        batch = self.training_batch(batch, epoch)
        self.last_batch = batch
        with accelerator.accumulate(self.model):
            loss, output = self.compute_loss(batch)
            check_finite_loss(loss, self.global_step, self.last_checkpoint, accelerator=accelerator,
                              inputs=batch["pixel_values"])
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(self.clip_parameters(), args.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_step = (self.micro_step + 1) % args.gradient_accumulation_steps
        self.window_images += batch["pixel_values"].shape[0] * self.run.world
        return loss, output

    def end_step(self, loss, output) -> None:
        """Schedule, progress, logs, the script's `after_step`, and the periodic checkpoint."""
        args = self.args
        self.schedule.step()
        self.global_step += 1
        self.progress.update(1)
        if self.global_step % args.logging_steps == 0 or self.global_step == self.total_steps:
            self.log_window(loss, output)
        self.after_step(self.global_step, output)
        if self.checkpoint_every and self.global_step % self.checkpoint_every == 0:
            self.save()

    def stop_if_preempted(self) -> None:
        """A step boundary (collective): if any rank got a preemption signal, every rank stops here; the
        run's own loop checkpoints this step (unless saved already) and raises `Preempted`, a loop nested
        in another run's finishing work (run_mim's downstream check) raises it for that run to do so."""
        if not PREEMPTION.signals:  # --preemption_signals none (the same on every rank)
            return
        own = PREEMPTION.claim(self)
        received = PREEMPTION.agreed(self.accelerator)
        if received is None:
            return
        if not own:
            raise Preempted(*received, step=self.global_step, nested=True)
        self.preempt(*received)

    @contextlib.contextmanager
    def finishing(self):
        """The work after the last step (final evaluations, run_mim's downstream check): a preemption signal
        during it stops the run at its end, or at a step of a loop it runs (redone on resume), with this
        run's last step checkpointed."""
        try:
            yield
        except Preempted as stop:
            if not stop.nested:
                raise
            self.preempt(stop.signum, stop.received_at)
        self.stop_if_preempted()

    def preempt(self, signum: int, received_at: float):
        """The exit path of a preemption, on every rank: this step's checkpoint (the normal atomic save; none
        before the first step), the Hub pushes waited for, then `Preempted`."""
        if self.global_step > 0 and not self.checkpointed_this_step():
            self.save()
        if getattr(self, "progress", None) is not None:
            self.progress.close()
        problem = self.hub_pusher.finish() if self.hub_pusher is not None else None
        if problem:
            self.logger.error("%s", problem)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        raise Preempted(signum, received_at, step=self.global_step, checkpoint=self.last_checkpoint)

    def checkpointed_this_step(self) -> bool:
        """This step is already a complete checkpoint of this run's --output_dir (a periodic save, or the
        checkpoint it resumed from)."""
        last = self.last_checkpoint
        return (last is not None and checkpoint_step(last) == self.global_step
                and Path(last).parent.resolve() == Path(self.run.output_dir).resolve())

    def log_window(self, loss, output) -> None:
        """Loss (mean over ranks), lr, throughput since the last log, and the script's extra logs."""
        elapsed = time.perf_counter() - self.window_start
        loss_value = self.accelerator.reduce(loss.detach(), reduction="mean").item()
        logs = {
            "loss": loss_value,
            "lr": max(group["lr"] for group in self.optimizer.param_groups),
            "images_per_second": self.window_images / max(elapsed, 1e-9),
            **self.extra_logs(output),
            **self.decode_counts,
        }
        self.progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{logs['lr']:.2e}")
        if self.args.with_tracking:
            self.accelerator.log(logs, step=self.global_step)
        rounded = {key: round(value, 6) if isinstance(value, float) else value for key, value in logs.items()}
        self.logger.info("step %d %s", self.global_step, json.dumps(rounded))
        self.window_start, self.window_images = time.perf_counter(), 0

    def resume_point(self) -> dict | None:
        """This rank's raw-record position in the epoch (`StreamPositions`), None when the stream has none."""
        positions = getattr(self, "stream_positions", None)
        if positions is None or positions.epoch != self.position["epoch"]:
            return None
        return positions.resume_point()

    def save(self) -> None:
        """A checkpoint of this step on every rank (collective), holding every rank's data position."""
        trainer_state = {
            "global_step": self.global_step,
            "positions": gather_positions(self.accelerator, self.position, self.resume_point()),
            **self.trainer_state(),
            "run_id": self.run.run_id,
            "hyperparameters": self.hyperparameters.to_dict(),
        }
        self.last_checkpoint = save_checkpoint(self.accelerator, self.run.output_dir, self.global_step, trainer_state,
                                               total_limit=self.args.checkpoints_total_limit)
        if self.hub_pusher is not None:  # the main process stages the push; a worker thread uploads it
            def write(folder: Path) -> None:
                self.write_hub_model(folder)
                write_json_atomic(folder / "training_args.json", public_args(self.args))  # without credentials

            self.hub_pusher.save(self.global_step, self.last_checkpoint, list_checkpoints(self.run.output_dir), write)

    def finish(self, write_outputs) -> int:
        """The pushes during training finished (waited for; a last one that failed twice: status 1), then
        `write_outputs()` on the main process (a failed push: status 1, the folder kept), then the end of
        training on every rank. Returns the exit status."""
        if self.accelerator.is_main_process and any(self.decode_counts.values()):
            self.logger.warning("images skipped (undecodable/truncated/tiny/over --max_image_pixels/unlabelled): %d, "
                                "converted to RGB or decoded at reduced scale: %d",
                                self.decode_counts["images_skipped"], self.decode_counts["images_converted"])
        problem = self.hub_pusher.finish() if self.hub_pusher is not None else None
        if problem:
            self.logger.error("%s", problem)
        return max(finish_run(self.accelerator, write_outputs, self.logger), 1 if problem else 0)


def make_hub_pusher(args, run: RunStart):
    """The main process's `TrainingPusher` for --push_to_hub --hub_strategy every_save / checkpoint /
    all_checkpoints, else None."""
    strategy = getattr(args, "hub_strategy", "end") or "end"
    if strategy == "end" or not getattr(args, "push_to_hub", False) or not run.accelerator.is_main_process:
        return None
    from ..hub.training_pushes import TrainingPusher

    return TrainingPusher(run.output_dir, args.hub_model_id, strategy, token=getattr(args, "hub_token", None),
                          private=getattr(args, "hub_private_repo", False) or None, secrets=secret_values(args))


def finish_run(accelerator, write_outputs, run_logger) -> int:
    """The end of any run (training or evaluation only): `write_outputs()` on the main process (a failed
    push: logged, status 1, the folder kept), then every rank waits and ends its trackers."""
    from hf_mim.hub import HubPushError

    status = 0
    if accelerator.is_main_process:
        try:
            write_outputs()
        except HubPushError as error:
            run_logger.error("%s", error)
            status = 1
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return status


__all__ = [
    "RunStart",
    "TrainingLoop",
    "check_replicas_in_sync",
    "compile_in_place",
    "finish_run",
    "forward_inputs",
    "gather_positions",
    "make_accelerator",
    "optimizer_steps",
    "run_script",
    "start_run",
    "stream_batches",
]
