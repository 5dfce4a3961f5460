"""The one training loop (hf_mim.training.TrainingLoop) on a toy task, the shared flags, and the
declared method protocol (MIMTrainingEventsMixin) every pretraining model implements."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import hf_mim
from hf_mim.training_events import MIMTrainingEventsMixin
from hf_mim.auto import MODEL_FAMILIES
from hf_mim.training import (
    AttentionMapStore,
    RunHyperparameters,
    StagedSchedule,
    TrainingLoop,
    build_adamw,
    start_run,
)
from hf_mim.training.arguments import add_shared_flags, fill_defaults, validate_shared_flags

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- the loop, generic


class ToyStream:
    def __init__(self):
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


class ToyCollator(ToyStream):
    pass


def toy_batches(epoch_batches: int = 3, size: int = 2) -> list[dict]:
    """A fixed 'epoch': pixel_values (B, 3) and the decode counters every hf_mim collator adds."""
    generator = torch.Generator().manual_seed(0)
    return [
        {"pixel_values": torch.randn(size, 3, generator=generator), "images_skipped": torch.tensor([1, 0]),
         "images_converted": torch.tensor([0, 0])}
        for _ in range(epoch_batches)
    ]


class ToyLoop(TrainingLoop):
    """A regression of a random linear target: what a script supplies, and nothing else."""

    def compute_loss(self, batch):
        return ((self.model(batch["pixel_values"]) - batch["pixel_values"].sum(1, keepdim=True)) ** 2).mean(), None

    def trainer_state(self):
        return {"toy": self.global_step}


def toy_args(output_dir: Path, **changes) -> argparse.Namespace:
    args = dict(output_dir=str(output_dir), gradient_accumulation_steps=2, with_tracking=False, report_to="tensorboard",
                seed=0, resume_from_checkpoint=None, overwrite_output_dir=False, max_grad_norm=1.0, logging_steps=1,
                checkpointing_steps=2, checkpoints_total_limit=3, weight_decay=0.0, num_warmup_steps=1, min_lr_ratio=0.0,
                adam_beta1=0.9, adam_beta2=0.999)
    return argparse.Namespace(**{**args, **changes})


def train_toy(args, total_steps: int) -> tuple[ToyLoop, nn.Linear]:
    run = start_run(args)
    torch.manual_seed(1)
    model = nn.Linear(3, 1)
    optimizer = build_adamw([{"params": list(model.parameters()), "weight_decay": 0.0}], lr=0.1)
    schedule = StagedSchedule(optimizer, base_lr=0.1, steps_per_stage=[total_steps], warmup_steps=1)
    hyperparameters = RunHyperparameters.from_args(args, 0.1, total_steps, lr_scheduler_type="cosine")
    loop = ToyLoop(args, run, model, optimizer, schedule, hyperparameters, (toy_batches(), ToyStream(), ToyCollator()))
    loop.prepare()
    loop.train()
    return loop, loop.unwrapped


def test_loop_accumulates_checkpoints_positions_and_resumes_exactly(tmp_path):
    full, full_model = train_toy(toy_args(tmp_path / "full"), total_steps=5)
    # 5 steps x 2 micro-batches over 3-batch epochs: ends in epoch 3 after its first batch
    assert full.global_step == 5 and full.position == {"epoch": 3, "batches": 1}
    assert full.decode_counts == {"images_skipped": 10, "images_converted": 0}  # one per micro-batch
    state = hf_mim.training.read_trainer_state(tmp_path / "full" / "checkpoint-4")
    assert state["positions"] == [{"epoch": 2, "batches": 2}] and state["toy"] == 4 and state["run_id"]
    assert state["hyperparameters"]["total_steps"] == 5

    resumed, resumed_model = train_toy(
        toy_args(tmp_path / "part", resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2")), total_steps=5
    )
    assert resumed.global_step == 5
    for ours, theirs in zip(resumed_model.parameters(), full_model.parameters()):
        assert torch.equal(ours, theirs)  # bitwise: the same batches, lr and optimizer moments


def test_loop_finish_turns_a_failed_push_into_status_1(tmp_path):
    from hf_mim.hub import HubPushError

    loop, _ = train_toy(toy_args(tmp_path / "run", checkpointing_steps=None), total_steps=1)

    def failing_push():
        raise HubPushError("no network")

    assert loop.finish(failing_push) == 1
    assert loop.finish(lambda: None) == 0


def test_torch_compile_trains_as_eager_and_checkpoints_the_plain_keys(tmp_path):
    """--torch_compile (backend "eager": dynamo's graph capture, ~3 s here; aot_eager takes ~18 s on these
    2 cores and runs in the slow run_mim test; inductor is what a GPU run uses) gives the eager run's
    weights within float tolerance, compiles in place (no `_orig_mod.` keys in checkpoints), and its
    checkpoints resume in an eager run."""
    from safetensors.torch import load_file

    eager, eager_model = train_toy(toy_args(tmp_path / "eager"), total_steps=3)
    compiled_args = toy_args(tmp_path / "compiled", torch_compile=True, torch_compile_backend="eager")
    compiled, compiled_model = train_toy(compiled_args, total_steps=3)
    assert compiled.model._compiled_call_impl is not None and eager.model._compiled_call_impl is None
    for ours, theirs in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert set(load_file(tmp_path / "compiled" / "checkpoint-2" / "model.safetensors")) == {"weight", "bias"}
    resumed, resumed_model = train_toy(
        toy_args(tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "compiled" / "checkpoint-2")), total_steps=3
    )
    for ours, theirs in zip(resumed_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ shared flags


def test_shared_flags_take_each_scripts_defaults_and_are_checked_once():
    parser = argparse.ArgumentParser()
    groups = add_shared_flags(parser, {"data": "d", "model": "m", "optim": "o", "run": "r"},
                              adam_beta2={"default": 0.95}, output_dir={"default": "out"})
    groups["run"].add_argument("--picture_steps", type=int)
    args = parser.parse_args(["--train_dir", "x"])
    assert (args.adam_beta2, args.output_dir, args.per_device_train_batch_size, args.picture_steps) == (0.95, "out", 32, None)
    fill_defaults(args, parser, {"per_device_train_batch_size": 16, "train_dir": "y"})
    assert args.per_device_train_batch_size == 16 and args.train_dir == "x"  # only flags left at their default
    for argv, message in ((["--train_dir", "x", "--dataset_name", "y"], "not both"),
                          (["--push_to_hub"], "--hub_model_id"),
                          (["--min_lr_ratio", "2"], "--min_lr_ratio must be in [0, 1]"),
                          (["--picture_steps", "0"], "--picture_steps must be >= 1"),
                          (["--torch_compile_backend", "no_such_backend"], "not a torch.compile backend")):
        with pytest.raises(SystemExit):
            validate_shared_flags(parser, parser.parse_args(argv), at_least_one=("picture_steps",))
    assert not args.torch_compile
    for argv in (["--torch_compile"], ["--torch_compile_mode", "max-autotune"], ["--torch_compile_backend", "aot_eager"]):
        compiled = parser.parse_args(argv)
        validate_shared_flags(parser, compiled)
        assert compiled.torch_compile, argv  # a backend or mode implies --torch_compile, as in transformers


# ----------------------------------------------------------------------------------------- the protocol


@pytest.mark.parametrize("family", list(MODEL_FAMILIES.values()), ids=lambda family: family.model_type)
def test_every_pretraining_model_declares_the_training_events(family):
    model = family.masked_image_modeling_class(family.config_class.from_preset("tiny"))
    assert isinstance(model, MIMTrainingEventsMixin)
    assert callable(model.mask_generator(attention_maps=None))  # every method masks in the collator
    assert model.has_training_stages == (family.model_type == "dbot")
    assert model.uses_attention_maps == (family.model_type == "amt")
    assert isinstance(model.attention_refresh_steps(100), list)
    assert set(model.exported_backbones()) == ({"momentum_encoder"} if family.model_type == "extrema" else set())
    assert model.on_train_step_end(progress=0.5) is None
    assert model.on_train_step_start(progress=0.5) is None or family.model_type == "extrema"


def test_protocol_defaults_do_nothing():
    events = MIMTrainingEventsMixin()
    assert events.mask_generator() is None and events.start_new_stage() is None
    assert events.on_train_step_end(0.5) is None and events.on_train_step_start(0.5) is None
    assert events.attention_refresh_steps(10) == []
    assert events.training_logs(None) == {} and events.exported_backbones() == {}
    assert not events.has_training_stages and not events.uses_attention_maps


def test_method_logs_come_from_the_model():
    from hf_mim import AmtConfig, AmtForMaskedImageModeling, DbotConfig, DbotForMaskedImageModeling

    amt = AmtForMaskedImageModeling(AmtConfig.from_preset("tiny"))
    thrown = torch.zeros(2, 16, dtype=torch.bool)
    thrown[:, :6] = True
    assert amt.training_logs(hf_mim.modeling_amt.AmtMaskedImageModelingOutput(bool_thrown_pos=thrown)) == {
        "patches_thrown_per_image": 6.0}
    assert DbotForMaskedImageModeling(DbotConfig.from_preset("tiny", stage=1)).training_logs(None) == {"stage": 1}


def test_the_attention_map_store_is_training_state_outside_the_hub_files():
    """The mask generator reads whatever store the loop hands it; none: warm-up masks."""
    from hf_mim import AmtConfig, AmtForMaskedImageModeling

    assert not hasattr(hf_mim.masking, "AttentionMapStore")
    model = AmtForMaskedImageModeling(AmtConfig.from_preset("tiny"))
    store = AttentionMapStore()
    generator = model.mask_generator(attention_maps=store)
    assert generator.store is store and model.mask_generator().store is None
    masks, weights = model.mask_generator()(torch.Generator().manual_seed(0), example_id=3)
    assert weights is None and not masks.bool_thrown_pos.any()


def test_scripts_and_loop_call_the_protocol_without_probing():
    """No hasattr/getattr on the model and no batch-key tests in the scripts; no method wording in the loop."""
    for path in [ROOT / "training_scripts" / "run_mim.py", ROOT / "training_scripts" / "run_image_classification.py",
                 ROOT / "hf_mim" / "training" / "loop.py"]:
        tree = ast.parse(path.read_text())
        calls = [node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
        assert "hasattr" not in calls, path
        in_batch = [node for node in ast.walk(tree) if isinstance(node, ast.Compare)
                    and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops)
                    and any(isinstance(c, ast.Name) and c.id == "batch" for c in node.comparators)]
        assert not in_batch, path
    loop = (ROOT / "hf_mim" / "training" / "loop.py").read_text().lower()
    assert "teacher" not in loop and "momentum" not in loop and "attention" not in loop
