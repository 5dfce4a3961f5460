"""Pretraining any hf_mim method with transformers' `Trainer`, as run_mim.py's loop trains it.

    from hf_mim.training import MIMTrainer, MIMTrainingArguments, pretraining_collator
    collator = pretraining_collator(model, seed=0)     # crops + masks per (seed, epoch, example id)
    args = MIMTrainingArguments("out", max_steps=1000, per_device_train_batch_size=64, learning_rate=1.5e-4,
                                lr_scheduler_type="cosine", warmup_steps=50, weight_decay=0.05, adam_beta2=0.95)
    MIMTrainer(model=model, args=args, train_dataset=rows_with_image_and_example_id, data_collator=collator).train()

What `Trainer` alone does not do, and where it is done here:

- the method's training events (`MIMTrainingEventsMixin`) at the moments of hf_mim's loop: a dBOT stage start
  and `on_train_step_start` (ExtreMA's momentum update) before the first forward of an optimizer step,
  `on_train_step_end` and AMT's attention refresh after it: `MIMTrainingCallback`, which every `MIMTrainer`
  carries (and which a plain `Trainer` can take for the events alone);
- the batch as the model takes it: AMT's masks drawn in the training process from the current attention maps
  (`PretrainingCollator.finish`: not in the DataLoader, which Accelerate runs one batch ahead, before a refresh),
  uint8 pixels normalised on the device, and only the entries `forward` accepts (no example ids): `MIMTrainer`
  overrides `_prepare_inputs`, and keeps Trainer from dropping the `image` / `example_id` columns the collator
  reads;
- the optimisation: run_mim's AdamW groups (the method's `pretraining_no_weight_decay`) and its per-stage
  schedule (`build_pretraining_optimizer` / `build_pretraining_schedule`), from Trainer's arguments plus the
  few of run_mim's that Trainer lacks (`MIMTrainingArguments`);
- checkpoints that can be trusted: Trainer writes `checkpoint-N` in place, so a save cut short (a full disk,
  a kill) leaves a folder its `resume_from_checkpoint=True` would pick; `MIMTrainer` adds
  `hf_mim_manifest.json` (sizes + sha256) once a save is complete and resumes only from a checkpoint that
  matches it (`trusted_trainer_checkpoint`).

A datasets' `set_transform` / `with_transform` can do the per-example work instead of the collator
(`dataset_transform(collator)`); the trainer's collator then only stacks, with the same result.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data import PretrainingCollator, ResizeTransform, batch_to_device
from .attention_refresh import AttentionMapStore, refresh_attention_maps
from .checkpoint import MANIFEST_NAME, UnusableCheckpointError, checkpoint_step, manifest_problem, write_manifest
from .loop import forward_inputs
from .pretraining import build_pretraining_optimizer, build_pretraining_schedule

logger = logging.getLogger(__name__)

ATTENTION_MAPS_NAME = "attention_maps.pt"  # in each Trainer checkpoint of an AMT run
FINISH_READS = ("example_id", "crop_box", "flipped")  # what PretrainingCollator.finish reads of a batch


@dataclass
class MIMTrainingArguments(TrainingArguments):
    """Trainer's arguments plus run_mim's flags that Trainer has no word for. Trainer's own keep their meaning:
    `learning_rate` (unless `base_learning_rate`), `weight_decay`, `adam_beta1/2`, `max_grad_norm` (Trainer's
    default 1.0; run_mim clips only when asked: pass 0), `lr_scheduler_type` and `warmup_steps` (both per stage)."""

    num_stages: int = field(default=1, metadata={"help": "dBOT bootstrap stages (the schedule restarts per stage)"})
    base_learning_rate: float | None = field(
        default=None, metadata={"help": "lr = base_learning_rate x total batch / 256 (overrides learning_rate)"})
    warmup_style: str = field(default="mae", metadata={"help": "mae or beit: where the warm-up reaches the peak"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "each stage's final lr, as a fraction of the peak"})
    mim_schedule: str | None = field(
        default=None, metadata={"help": "an hf_mim schedule kind Trainer does not name (e.g. simmim_cosine); "
                                        "overrides lr_scheduler_type"})


def optimization_arguments(args: TrainingArguments, total_steps: int | None = None) -> Namespace:
    """run_mim's optimisation flags from Trainer's arguments (plain `TrainingArguments`: run_mim's defaults for
    the fields only `MIMTrainingArguments` has); `total_steps` (for the schedule) turns a warm-up ratio into steps."""
    num_stages = getattr(args, "num_stages", 1)
    if num_stages < 1 or (total_steps is not None and total_steps < num_stages):
        raise ValueError(f"num_stages={num_stages} needs 1 <= num_stages <= the {total_steps} training steps")
    warmup = args.warmup_steps
    if 0 < warmup < 1:  # Trainer: a ratio of the steps (here: of a stage)
        warmup = None if total_steps is None else round(warmup * (total_steps // num_stages))
    base = getattr(args, "base_learning_rate", None)
    return Namespace(
        num_stages=num_stages, learning_rate=None if base is not None else args.learning_rate, base_learning_rate=base,
        num_warmup_steps=None if warmup is None else int(warmup), weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, min_lr_ratio=getattr(args, "min_lr_ratio", 0.0),
        lr_scheduler_type=getattr(args, "mim_schedule", None) or getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        warmup_style=getattr(args, "warmup_style", "mae"),
    )


def pretraining_collator(model, seed: int = 0, attention_maps: AttentionMapStore | None = None) -> PretrainingCollator:
    """run_mim's collator for `model`: its method's pretraining transform and mask generator (AMT: reading
    `attention_maps`, a new store when None), every example seeded by (seed, epoch, example id)."""
    from ..auto import family_for

    config = model.config
    if model.uses_attention_maps and attention_maps is None:
        attention_maps = AttentionMapStore()
    transform = family_for(config.model_type).pretraining_transform(config)
    return PretrainingCollator(transform, mask_generator=model.mask_generator(attention_maps=attention_maps), seed=seed)


def dataset_transform(collator: PretrainingCollator, image_column: str = "image") -> Callable[[dict], dict]:
    """A `datasets` `set_transform` / `with_transform` function doing `collator`'s per-example work (crop, flip,
    mask) on rows that hold a decoded image and an `example_id` (e.g. `ds.map(lambda _, i: {"example_id": i},
    with_indices=True)`); `MIMTrainer` then only stacks the rows, into the batch the collator would have made."""

    def transform(rows: dict[str, list]) -> dict[str, list]:
        if image_column not in rows or "example_id" not in rows:
            raise KeyError(f"dataset_transform needs the columns {image_column!r} and 'example_id'; got {sorted(rows)}")
        examples = [{"image": image if image.mode == "RGB" else image.convert("RGB"), "example_id": example_id,
                     **({"label": rows["label"][index]} if "label" in rows else {})}
                    for index, (image, example_id) in enumerate(zip(rows[image_column], rows["example_id"]))]
        return {key: list(value.unbind(0)) for key, value in collator(examples).items()}

    return transform


class StackOrCollate:
    """Trainer's `data_collator` around an hf_mim collator: rows a dataset transform already made
    (`dataset_transform`: they hold `pixel_values`) are stacked; raw rows (an image and an example id) are
    collated. `finish` / `normalize_pixels` / `set_epoch` are the collator's."""

    def __init__(self, collator: PretrainingCollator):
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if features and "pixel_values" in features[0]:
            return {key: torch.stack([feature[key] for feature in features]) for key in features[0]}
        return self.collator(features)

    def __getattr__(self, name):
        if name == "collator":  # not set yet (unpickling in a DataLoader worker)
            raise AttributeError(name)
        return getattr(self.collator, name)


def trainer_steps_per_epoch(train_dataloader, gradient_accumulation_steps: int) -> int | None:
    """Trainer's own count of the optimizer steps in one epoch (None for a dataloader without length)."""
    try:
        length = len(train_dataloader)
    except TypeError:
        return None
    return max(length // gradient_accumulation_steps + int(length % gradient_accumulation_steps > 0), 1)


def epochs_already_trained(state, train_dataloader, gradient_accumulation_steps: int) -> int:
    """Trainer's own count of the epochs before `state.global_step` (0 for a dataloader without length)."""
    per_epoch = trainer_steps_per_epoch(train_dataloader, gradient_accumulation_steps)
    return 0 if per_epoch is None else state.global_step // per_epoch


class MIMTrainingCallback(TrainerCallback):
    """The method's training events at hf_mim's loop's moments: before the first micro-batch of optimizer step
    s (0-based) a stage start where the schedule starts one (dBOT), then `on_train_step_start(s / total)`;
    after optimizer step s (1-based) `on_train_step_end(s / total)`, then the attention refresh where
    `attention_refresh_steps` says (AMT; its epoch delay counts Trainer's epochs: none for a dataset without
    length, with a warning). The collator (if given) is told each epoch (masks and crops are seeded by it). A
    refresh needs the trainer (its Accelerator and prepared model): `MIMTrainer` passes itself."""

    def __init__(self, collator=None, attention_maps: AttentionMapStore | None = None, trainer: Trainer | None = None,
                 refresh_dataloader=None):
        self.collator, self.attention_maps, self.trainer = collator, attention_maps, trainer
        self.refresh_dataloader = refresh_dataloader
        self.epoch, self.total_steps, self.refresh_steps = 0, 0, set()

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.total_steps = state.max_steps
        per_epoch = trainer_steps_per_epoch(train_dataloader, args.gradient_accumulation_steps)
        self.refresh_steps = set(model.attention_refresh_steps(self.total_steps, per_epoch))
        if self.refresh_steps and (self.attention_maps is None or self.trainer is None):
            raise ValueError(f"{type(model).__name__} refreshes its attention maps after steps {sorted(self.refresh_steps)}: "
                             "train it with hf_mim.training.MIMTrainer (it keeps the maps and runs the refresh)")
        if getattr(args, "num_stages", 1) > 1 and not model.has_training_stages:
            raise ValueError(f"num_stages={args.num_stages}: {type(model).__name__} has no training stages")
        if getattr(args, "num_stages", 1) > 1 and not hasattr(kwargs.get("lr_scheduler"), "is_stage_boundary"):
            raise ValueError(f"num_stages={args.num_stages} needs hf_mim's staged schedule (MIMTrainer builds it; or pass "
                             "build_pretraining_optimization's to Trainer's `optimizers`)")
        self.epoch = epochs_already_trained(state, train_dataloader, args.gradient_accumulation_steps) - 1

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch += 1
        if self.collator is not None:
            self.collator.set_epoch(self.epoch)

    def on_step_begin(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        step = state.global_step
        if getattr(lr_scheduler, "is_stage_boundary", lambda step: False)(step):
            model.start_new_stage()
            logger.info("step %d: stage %d starts", step, lr_scheduler.stage_of(step))
        model.on_train_step_start(progress=step / self.total_steps)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        model.on_train_step_end(progress=step / self.total_steps)
        if step in self.refresh_steps:
            loader = self.refresh_dataloader if self.refresh_dataloader is not None else self.trainer.get_refresh_dataloader()
            refresh = refresh_attention_maps(self.trainer.model_wrapped, self.attention_maps, loader, self.trainer.accelerator)
            logger.info("step %d: attention maps refreshed (%d images, %.1f s)", step, refresh["maps"], refresh["seconds"])


class MIMTrainer(Trainer):
    """`Trainer` that pretrains an hf_mim `...ForMaskedImageModeling` as run_mim.py does (see the module
    docstring): its training events (`MIMTrainingCallback`, added here), its batches, its optimizer and
    schedule. `data_collator`: an hf_mim `PretrainingCollator` (default: `pretraining_collator(model,
    args.seed)`); `train_dataset` rows hold a decoded `image` and a stable `example_id`, or are made by
    `dataset_transform`. `refresh_dataset` (AMT): the images its refresh reads whole, every one once with its
    `example_id` (default: `train_dataset`, which must then be the raw rows)."""

    def __init__(self, model=None, args: TrainingArguments | None = None, data_collator=None, train_dataset=None,
                 refresh_dataset=None, callbacks=None, **kwargs):
        if model is None:
            raise ValueError("MIMTrainer needs the model (an hf_mim ...ForMaskedImageModeling)")
        args = args if args is not None else MIMTrainingArguments("tmp_trainer")
        if data_collator is None:
            data_collator = pretraining_collator(model, seed=args.seed)
        self.mim_collator = data_collator if isinstance(data_collator, StackOrCollate) else StackOrCollate(data_collator)
        mask_generator = getattr(self.mim_collator.collator, "mask_generator", None)
        attention_maps = getattr(mask_generator, "store", None) if model.uses_attention_maps else None
        if model.uses_attention_maps and attention_maps is None:
            raise ValueError("an AMT model needs the collator of `pretraining_collator(model)`: its masks read the "
                             "attention maps the refresh writes")
        self.attention_maps, self.refresh_dataset = attention_maps, refresh_dataset
        if refresh_dataset is None and attention_maps is not None:
            self.refresh_dataset = train_dataset
        self.events = MIMTrainingCallback(self.mim_collator, attention_maps, trainer=self)
        super().__init__(model=model, args=args, data_collator=self.mim_collator, train_dataset=train_dataset,
                         callbacks=[self.events, *(callbacks or [])], **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is a per-batch mean: Trainer divides it per accumulation step
        self._mim_lr = None

    # ------------------------------------------------------------------ data
    def _remove_unused_columns(self, dataset, description=None):
        return dataset  # the collator reads `image` and `example_id`; `_prepare_inputs` keeps what forward takes

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator

    def get_train_dataloader(self):
        """Trainer's loader, drawing its iterators' worker base seed from a private generator (as run_mim's
        `make_dataloader`): from torch's global RNG, every new epoch would shift what dropout, drop path,
        in-model masks and a dBOT re-initialisation draw, and Trainer opens an epoch's iterator before the step's
        events where hf_mim's loop opens it after them."""
        loader = super().get_train_dataloader()
        # Accelerate's loaders wrap the torch DataLoader that draws the seed (`base_dataloader`)
        getattr(loader, "base_dataloader", loader).generator = torch.Generator().manual_seed(0)
        return loader

    def _prepare_inputs(self, inputs: dict) -> dict:
        """As run_mim's loop: `finish` (AMT's masks, from the maps as they are now), then to the device with
        uint8 pixels normalised there, then the entries `forward` accepts."""
        # Accelerate's loader may already have moved the batch to the accelerator; `finish` reads these on the CPU,
        # beside the attention maps (as in run_mim, which finishes before moving the batch)
        inputs = {key: value.cpu() if key in FINISH_READS else value for key, value in inputs.items()}
        inputs = self.mim_collator.finish(inputs, self.events.epoch)
        inputs = batch_to_device(inputs, self.args.device, self.mim_collator)
        return forward_inputs(self.accelerator.unwrap_model(self.model), inputs)

    def get_refresh_dataloader(self):
        """The refresh pass's loader: every image of `refresh_dataset` whole (resized), once, in order."""
        if self.refresh_dataset is None:
            raise ValueError("the attention refresh needs refresh_dataset (or train_dataset) rows with image and example_id")
        collator = PretrainingCollator(ResizeTransform(self.model.config.image_size), seed=self.args.seed)
        return torch.utils.data.DataLoader(self.refresh_dataset, batch_size=self.args.per_device_eval_batch_size,
                                           collate_fn=collator, num_workers=self.args.dataloader_num_workers,
                                           generator=torch.Generator().manual_seed(0))  # see get_train_dataloader

    # ------------------------------------------------------------------ checkpoints
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer's, resuming only from a checkpoint that verifies (`trusted_trainer_checkpoint`)."""
        resume_from_checkpoint = trusted_trainer_checkpoint(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's (which writes `checkpoint-N` in place, file by file), then, once every rank has written its
        part, `hf_mim_manifest.json` (sizes + sha256): a checkpoint without it never finished saving."""
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            write_manifest(Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Trainer's, plus AMT's attention maps (every rank holds all of them): a resumed run masks with them."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self.attention_maps is not None and self.args.should_save:
            torch.save(self.attention_maps.state_dict(), Path(output_dir) / ATTENTION_MAPS_NAME)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.attention_maps is not None and (Path(checkpoint) / ATTENTION_MAPS_NAME).is_file():
            self.attention_maps.load_state_dict(torch.load(Path(checkpoint) / ATTENTION_MAPS_NAME, weights_only=True))

    # ------------------------------------------------------------------ optimisation
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            args = self.args
            total_batch = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
            self.optimizer, self._mim_lr = build_pretraining_optimizer(
                optimization_arguments(args), model if model is not None else self.model, total_batch)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            flags = optimization_arguments(self.args, num_training_steps)
            self.lr_scheduler = build_pretraining_schedule(flags, optimizer if optimizer is not None else self.optimizer,
                                                           self._mim_lr, num_training_steps)
            self._created_lr_scheduler = True
        return self.lr_scheduler


def trusted_trainer_checkpoint(resume_from_checkpoint, output_dir):
    """`resume_from_checkpoint` as `Trainer.train` takes it, checked against `hf_mim_manifest.json`:
    True gives the newest `checkpoint-N` of `output_dir` whose files match it, warning about each newer one
    skipped (no manifest while others have one: its save did not finish); a named checkpoint that does not
    match is an `UnusableCheckpointError` naming the file. Checkpoints of a run without manifests (saved
    before hf_mim wrote them, or by a plain Trainer) are taken as Trainer takes them, with an info line."""
    if resume_from_checkpoint is True:
        root = Path(output_dir)
        folders = sorted((p for p in root.iterdir() if checkpoint_step(p) is not None and p.is_dir()), key=checkpoint_step,
                         reverse=True) if root.is_dir() else []
        any_manifest = any((folder / MANIFEST_NAME).is_file() for folder in folders)
        for folder in folders:
            problem = manifest_problem(folder)
            if problem is None and any_manifest and not (folder / MANIFEST_NAME).is_file():
                problem = f"it has no {MANIFEST_NAME} (its save did not finish)"
            if problem is None:
                if not any_manifest:
                    logger.info("%s has no %s (saved without hf_mim's manifest): not verified", folder, MANIFEST_NAME)
                return str(folder)
            logger.warning("resume: skipping %s: %s", folder.name, problem)
        raise UnusableCheckpointError(f"resume_from_checkpoint=True: no checkpoint in {output_dir} whose files match "
                                      f"their {MANIFEST_NAME}")
    if isinstance(resume_from_checkpoint, (str, Path)) and Path(resume_from_checkpoint).is_dir():
        problem = manifest_problem(resume_from_checkpoint)
        if problem is not None:
            raise UnusableCheckpointError(problem)
        if not (Path(resume_from_checkpoint) / MANIFEST_NAME).is_file():
            logger.info("%s has no %s (saved without hf_mim's manifest): not verified", resume_from_checkpoint, MANIFEST_NAME)
    return resume_from_checkpoint


__all__ = [
    "MIMTrainer", "MIMTrainingArguments", "MIMTrainingCallback", "StackOrCollate", "dataset_transform",
    "optimization_arguments", "pretraining_collator", "trusted_trainer_checkpoint",
]
