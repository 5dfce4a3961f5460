"""transformers' Trainer pretrains every hf_mim method as run_mim.py's own loop does (hf_mim/training/trainer_integration.py).

The reference is run_mim's training path as tests/trajectory_helpers.py drives it (its parser, its optimisation,
`PretrainingLoop` with the model's training events) over the same examples, collated by hf_mim's collator,
from the same weights and seed: after every step the weights (and the lr, the AMT store) must be the ones that
loop reaches. The official numerics of that loop are checked in tests/test_trajectories.py."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import pytest
import torch
from helpers import photo, reset_accelerate_state
from test_maskdistill import tiny_clip
from trajectory_helpers import run_trajectory, state_of
from transformers import AutoModelForPreTraining, Trainer, TrainerCallback

from hf_mim.auto import MODEL_FAMILIES, family_for
from hf_mim.data import PretrainingCollator, ResizeTransform
from hf_mim.training import (
    MIMTrainer, MIMTrainingArguments, MIMTrainingCallback, dataset_transform, forward_inputs, pretraining_collator,
)
from hf_mim.training.pretraining import build_pretraining_optimization
from hf_mim.training.trainer_integration import StackOrCollate, optimization_arguments

SEED = 7
IMAGES = 8  # per epoch; batches of 4


@dataclass
class Case:
    """One method's run, given once for both sides (run_mim flags and Trainer arguments)."""

    model_type: str
    config: dict = field(default_factory=dict)
    steps: int = 4
    batch: int = 4
    accumulation: int = 1
    stages: int = 1
    warmup: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.05
    beta2: float = 0.95
    clip: float | None = None
    schedule: str = "cosine"
    warmup_style: str = "mae"
    min_lr_ratio: float = 0.0
    sized: bool = False  # both sides know the epoch length: run_mim's --num_train_examples, a Trainer dataset with len
    refresh_after: int | None = None  # AMT: the step the refresh follows (None: steps // 2)

    def run_mim_flags(self, tmp_path) -> list[str]:
        flags = ["--model_type", self.model_type, "--train_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run_mim"),
                 "--per_device_train_batch_size", str(self.batch), "--gradient_accumulation_steps", str(self.accumulation),
                 "--max_train_steps", str(self.steps), "--num_stages", str(self.stages), "--num_warmup_steps", str(self.warmup),
                 "--learning_rate", str(self.lr), "--weight_decay", str(self.weight_decay), "--adam_beta2", str(self.beta2),
                 "--lr_scheduler_type", self.schedule, "--warmup_style", self.warmup_style,
                 "--min_lr_ratio", str(self.min_lr_ratio), "--seed", str(SEED)]
        flags += ["--num_train_examples", str(IMAGES)] if self.sized else []
        return flags + (["--max_grad_norm", str(self.clip)] if self.clip else [])

    def trainer_arguments(self, tmp_path) -> MIMTrainingArguments:
        trainer_kind = self.schedule if self.schedule in ("cosine", "linear", "constant", "constant_with_warmup") else "cosine"
        return MIMTrainingArguments(
            output_dir=str(tmp_path / "trainer"), max_steps=self.steps, per_device_train_batch_size=self.batch,
            gradient_accumulation_steps=self.accumulation, num_stages=self.stages, warmup_steps=self.warmup,
            learning_rate=self.lr, weight_decay=self.weight_decay, adam_beta2=self.beta2, max_grad_norm=self.clip or 0.0,
            lr_scheduler_type=trainer_kind, mim_schedule=None if trainer_kind == self.schedule else self.schedule,
            warmup_style=self.warmup_style, min_lr_ratio=self.min_lr_ratio, seed=SEED, per_device_eval_batch_size=IMAGES,
            report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
            dataloader_num_workers=0,
        )

    @property
    def epochs(self) -> int:
        return self.steps * self.batch * self.accumulation // IMAGES


CASES = {
    # a stage boundary after step 2 of 4: teacher <- student, student re-initialised, schedule restarted
    "dbot": Case("dbot", stages=2, clip=3.0),
    "extrema": Case("extrema", config={"ema_momentum": 0.9}, lr=5e-3, weight_decay=0.1),  # momentum update per step
    "maskdistill": Case("maskdistill", beta2=0.999, clip=0.3, warmup=2, warmup_style="beit", min_lr_ratio=0.01),
    "revcolv2": Case("revcolv2", beta2=0.999, clip=5.0),
    # a refresh after step 2 of 4 (at the interval's end: no epoch delay): the masks of steps 3-4 are drawn from
    # the maps it stores
    "amt_mae": Case("amt", config={"variant": "mae", "amt_interval": 0.5, "amt_refresh_delay_epochs": 0}, accumulation=2,
                    steps=4),
    "amt_simmim": Case("amt", config={"variant": "simmim", "amt_interval": 0.5, "amt_refresh_delay_epochs": 0}, beta2=0.999,
                       clip=5.0, schedule="simmim_cosine", min_lr_ratio=0.1),
    # the official schedule from the epoch length both sides know: interval 1 step + 1 epoch of 2 steps -> after step 3
    "amt_mae_epoch_delay": Case("amt", config={"variant": "mae", "amt_interval": 0.25}, sized=True, refresh_after=3),
}


def examples() -> list[dict]:
    return [{"image": photo(index), "example_id": 100 + index} for index in range(IMAGES)]


def tiny_model(case: Case, tmp_path):
    family = family_for(case.model_type)
    config = dict(case.config)
    if case.model_type == "maskdistill":  # its loss needs a frozen teacher
        config.update(teacher_name_or_path=str(tiny_clip(tmp_path)), teacher_hidden_size=24)
    torch.manual_seed(0)
    return family.masked_image_modeling_class(family.config_class.from_preset("tiny", **config))


class ExampleEpochs(torch.utils.data.IterableDataset):
    """The same examples in the same order every epoch (Trainer batches them; the collator's epoch varies crops and masks)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


class SizedExampleEpochs(ExampleEpochs):
    """`ExampleEpochs` whose length Trainer can read (its epoch length in steps)."""

    def __len__(self):
        return len(self.rows)


class Recorder(TrainerCallback):
    """What trajectory_helpers.RecordingLoop records, at the same moments."""

    def __init__(self, steps: int):
        self.steps, self.lrs, self.states = steps, [], {}

    def on_step_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if lr_scheduler.is_stage_boundary(state.global_step):
            self.states[f"stage_start_{state.global_step}"] = state_of(model)
        self.lrs.append([group["lr"] for group in optimizer.param_groups])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.states[f"step_{state.global_step}"] = state_of(model)


@contextlib.contextmanager
def one_thread():
    """Tiny tensors: one thread is faster, and immune to a busy machine (as trajectory_helpers runs its loop)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        reset_accelerate_state()


def run_mim_reference(case: Case, tmp_path, model):
    """run_mim's trajectory (trajectory_helpers) over the examples, collated by run_mim's collator."""
    rows = examples()
    with one_thread():
        reset_accelerate_state()
        collator = pretraining_collator(model, seed=SEED)
        batches = [rows[start:start + case.batch] for start in range(0, IMAGES, case.batch)]
        refresh = [PretrainingCollator(ResizeTransform(model.config.image_size), seed=SEED)(rows)]
        return run_trajectory(case.run_mim_flags(tmp_path), model, [batches] * case.epochs, IMAGES,
                              snapshot_steps=range(1, case.steps + 1), refresh_batches=refresh, collator=collator)


def train_both(case: Case, tmp_path):
    """(run_mim's trajectory, the Trainer's recorder, the trainer) over the same examples, weights and seed."""
    model = tiny_model(case, tmp_path)
    trainer_model = copy.deepcopy(model)
    trajectory = run_mim_reference(case, tmp_path, model)
    recorder = Recorder(case.steps)
    with one_thread():
        reset_accelerate_state()
        dataset = (SizedExampleEpochs if case.sized else ExampleEpochs)(examples())
        trainer = MIMTrainer(model=trainer_model, args=case.trainer_arguments(tmp_path), train_dataset=dataset,
                             data_collator=pretraining_collator(trainer_model, seed=SEED), refresh_dataset=examples(),
                             callbacks=[recorder])
        trainer.train()
    return trajectory, recorder, trainer


def worst_relative_difference(ours: dict, reference: dict) -> float:
    assert set(ours) == set(reference)
    worst = 0.0
    for key, want in reference.items():
        scale = want.double().abs().max().item() or 1.0
        worst = max(worst, (ours[key].double() - want.double()).abs().max().item() / scale)
    return worst


@pytest.mark.parametrize("name", list(CASES))
def test_trainer_steps_reach_run_mims_weights(name, tmp_path):
    """Every step's weights (and a stage start's), the lr of every step and AMT's attention store are bitwise
    run_mim's: same batches, masks, events at the same moments, same groups, schedule, clipping, accumulation."""
    case = CASES[name]
    trajectory, recorder, trainer = train_both(case, tmp_path)
    assert recorder.lrs == trajectory.lrs
    assert set(recorder.states) == set(trajectory.states)
    for key, state in trajectory.states.items():
        difference = worst_relative_difference(recorder.states[key], state)
        assert difference == 0.0, f"{name} {key}: {difference:.2e} relative"  # bitwise
    moved = worst_relative_difference(recorder.states[f"step_{case.steps}"], state_of(tiny_model(case, tmp_path)))
    assert moved > 1e-4  # the steps did train
    groups = [(group["weight_decay"], group["param_names"]) for group in trainer.optimizer.param_groups]
    assert groups == [(group["weight_decay"], group["param_names"]) for group in trajectory.optimizer.param_groups]
    if case.stages > 1:
        assert f"stage_start_{case.steps // case.stages}" in recorder.states
        assert trainer.model.config.stage == trajectory.model.config.stage == 1
    if trajectory.refresh_steps:
        assert trajectory.refresh_steps == sorted(trainer.events.refresh_steps) == [case.refresh_after or case.steps // 2]
        ours, theirs = trainer.attention_maps, trajectory.attention_maps
        assert ours.num_refreshes == theirs.num_refreshes == 1
        assert torch.equal(ours.example_ids, theirs.example_ids) and torch.equal(ours.maps, theirs.maps)


def test_a_plain_trainer_with_the_callback_follows_run_mim(tmp_path):
    """The callback alone gives a plain `Trainer` the events: with run_mim's optimizer and schedule (`optimizers`) and a
    collator that hands `forward` its inputs, ExtreMA's Trainer steps reach run_mim's weights bitwise."""
    case = CASES["extrema"]
    model = tiny_model(case, tmp_path)
    trainer_model = copy.deepcopy(model)
    trajectory = run_mim_reference(case, tmp_path, model)
    collator = pretraining_collator(trainer_model, seed=SEED)

    def model_inputs(features):
        return forward_inputs(trainer_model, collator.normalize_pixels(collator(features)))

    args = case.trainer_arguments(tmp_path)
    args.remove_unused_columns = False  # the collator reads `image` and `example_id`
    optimizer, schedule, _ = build_pretraining_optimization(optimization_arguments(args, case.steps), trainer_model,
                                                           case.steps, case.batch)
    recorder = Recorder(case.steps)
    with one_thread():
        reset_accelerate_state()
        Trainer(model=trainer_model, args=args, train_dataset=ExampleEpochs(examples()), data_collator=model_inputs,
                optimizers=(optimizer, schedule), callbacks=[MIMTrainingCallback(collator), recorder]).train()
    assert recorder.lrs == trajectory.lrs
    assert worst_relative_difference(recorder.states[f"step_{case.steps}"], trajectory.states[f"step_{case.steps}"]) == 0.0


def test_without_the_events_the_trainer_leaves_run_mims_path(tmp_path):
    """The comparison above can fail: ExtreMA trained by the Trainer without its momentum update (what a plain
    Trainer would not call) ends with another momentum branch."""
    case = CASES["extrema"]
    finals = []
    for skip_event in (False, True):
        model = tiny_model(case, tmp_path)
        if skip_event:
            model.on_train_step_start = lambda progress: None
        with one_thread():
            reset_accelerate_state()
            MIMTrainer(model=model, args=case.trainer_arguments(tmp_path), train_dataset=ExampleEpochs(examples()),
                       data_collator=pretraining_collator(model, seed=SEED)).train()
        finals.append(state_of(model))
    momentum = [key for key in finals[0] if key.startswith("momentum")]
    assert momentum and all(not torch.equal(finals[0][key], finals[1][key]) for key in momentum if finals[0][key].is_floating_point()
                            and "position" not in key)


def test_a_resumed_trainer_run_ends_as_the_uninterrupted_one(tmp_path):
    """AMT on SimMIM, a checkpoint after the refresh at step 2: resumed there, the run reaches the uninterrupted
    run's weights bitwise, its masks drawn from the attention maps the checkpoint holds."""
    case = CASES["amt_simmim"]
    finals, refreshes = {}, []
    for name in ("whole", "resumed"):
        model = tiny_model(case, tmp_path)
        args = case.trainer_arguments(tmp_path / name)
        args.save_strategy, args.save_steps = "steps", 2
        with one_thread():
            reset_accelerate_state()
            trainer = MIMTrainer(model=model, args=args, train_dataset=ExampleEpochs(examples()), refresh_dataset=examples(),
                                 data_collator=pretraining_collator(model, seed=SEED))
            trainer.train(resume_from_checkpoint=str(tmp_path / "whole" / "trainer" / "checkpoint-2") if name == "resumed" else None)
        finals[name] = state_of(model)
        refreshes.append(trainer.attention_maps.num_refreshes)
    assert worst_relative_difference(finals["resumed"], finals["whole"]) == 0.0
    assert refreshes == [1, 1]  # the resumed run did not refresh again: its maps came from the checkpoint


def test_a_dataset_transform_gives_the_collators_batch():
    """`set_transform(dataset_transform(collator))` does the per-example work in the dataset; the trainer's
    collator then stacks the rows into the batch the collator makes from raw rows (AMT: crop boxes for `finish`)."""
    datasets = pytest.importorskip("datasets")
    for case in (CASES["dbot"], CASES["extrema"], CASES["amt_mae"]):
        model = tiny_model(case, None)
        collator = pretraining_collator(model, seed=SEED)
        collator.set_epoch(3)
        rows = examples()
        dataset = datasets.Dataset.from_dict({"image": [row["image"] for row in rows],
                                              "example_id": [row["example_id"] for row in rows]})
        dataset.set_transform(dataset_transform(collator))
        stacked = StackOrCollate(collator)([dataset[index] for index in range(4)])
        direct = collator(rows[:4])
        assert set(stacked) == set(direct)
        assert all(torch.equal(stacked[key], direct[key]) for key in direct)


@pytest.mark.parametrize("model_type", sorted(MODEL_FAMILIES))
def test_auto_model_for_pretraining_builds_and_loads_every_pretraining_head(model_type, tmp_path):
    family = family_for(model_type)
    config = family.config_class.from_preset("tiny")
    model = AutoModelForPreTraining.from_config(config)
    assert isinstance(model, family.masked_image_modeling_class)  # (AMT: its host's subclass)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in model.state_dict().items())


def test_trainer_checkpoints_carry_a_manifest_and_a_cut_one_is_never_resumed(tmp_path, caplog):
    """Trainer writes checkpoint-N in place: MIMTrainer adds hf_mim_manifest.json once a save is complete, and
    resuming skips a checkpoint with a truncated file (True) or refuses it (named), and one whose save never
    wrote its manifest."""
    import json
    import os
    from pathlib import Path

    from hf_mim.training import UnusableCheckpointError
    from hf_mim.training.trainer_integration import trusted_trainer_checkpoint

    case = CASES["dbot"]
    model = tiny_model(case, tmp_path)
    args = case.trainer_arguments(tmp_path)
    args.save_strategy, args.save_steps = "steps", 2
    with one_thread():
        reset_accelerate_state()
        MIMTrainer(model=model, args=args, train_dataset=ExampleEpochs(examples()),
                   data_collator=pretraining_collator(model, seed=SEED)).train()
    out = Path(args.output_dir)
    second, fourth = out / "checkpoint-2", out / "checkpoint-4"
    manifest = json.loads((fourth / "hf_mim_manifest.json").read_text())
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(manifest["sha256"]) == set(manifest["files"])
    assert trusted_trainer_checkpoint(True, out) == str(fourth)

    os.truncate(fourth / "optimizer.pt", (fourth / "optimizer.pt").stat().st_size // 2)
    with caplog.at_level("WARNING"):
        assert trusted_trainer_checkpoint(True, out) == str(second)
    assert "resume: skipping checkpoint-4" in caplog.text and "optimizer.pt has" in caplog.text
    with one_thread(), pytest.raises(UnusableCheckpointError, match=r"checkpoint-4 is not a complete checkpoint: optimizer\.pt has"):
        reset_accelerate_state()
        MIMTrainer(model=model, args=args, train_dataset=ExampleEpochs(examples()),
                   data_collator=pretraining_collator(model, seed=SEED)).train(resume_from_checkpoint=str(fourth))

    (fourth / "hf_mim_manifest.json").unlink()  # as a save cut short leaves it
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert trusted_trainer_checkpoint(True, out) == str(second)
    assert "has no hf_mim_manifest.json (its save did not finish)" in caplog.text
    (second / "hf_mim_manifest.json").unlink()  # a run saved without manifests: Trainer's own choice
    assert trusted_trainer_checkpoint(True, out) == str(fourth)
