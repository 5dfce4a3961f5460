"""run_mim's own training path over a trajectory fixture's fixed batches (tests/test_trajectories.py).

The pieces are the script's: `parse_args` (the recipe's flags), `build_pretraining_model` (the converted
official weights, as `--model_name_or_path`), `build_pretraining_optimization` (AdamW groups, schedule,
lr rule), `PretrainingLoop` (forward, backward, clipping, step, schedule and the model's training events,
in their order). Only the data differ: the fixture's batches, in order, stand in for the collated stream.
(To be unified with tests/trajectory_helpers.py by the lead.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from hf_mim.scripts.run_mim import PretrainingLoop, parse_args
from hf_mim.training import RunHyperparameters, optimizer_steps, start_run
from hf_mim.training.pretraining import build_pretraining_model, build_pretraining_optimization


class FixedBatches:
    """Stream and collator stand-in: the batches are already collated (pixels, masks) and fixed."""

    def set_epoch(self, epoch: int) -> None:
        pass

    def finish(self, batch: dict, epoch: int) -> dict:
        return batch


class RecordingLoop(PretrainingLoop):
    """run_mim's loop, recording what every optimizer step used and produced."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lrs, self.weight_decays, self.losses, self.states = [], [], [], []

    def before_step(self, step):
        super().before_step(step)
        self.lrs.append([group["lr"] for group in self.optimizer.param_groups])
        self.weight_decays.append([group["weight_decay"] for group in self.optimizer.param_groups])

    def compute_loss(self, batch):
        loss, output = super().compute_loss(batch)
        self.losses.append(float(loss.detach()))
        return loss, output

    def after_step(self, step, output):
        super().after_step(step, output)
        self.states.append({key: value.detach().clone() for key, value in self.unwrapped.state_dict().items()})


def run_mim_steps(flags: list[str], model_folder: Path, batches: list[dict], output_dir: Path) -> RecordingLoop:
    """`len(batches)` optimizer steps (one batch each) of run_mim with `flags`, from the weights in `model_folder`."""
    batch_size = len(batches[0]["pixel_values"])
    args = parse_args([*flags, "--model_name_or_path", str(model_folder), "--output_dir", str(output_dir),
                       "--max_train_steps", str(len(batches)), "--per_device_train_batch_size", str(batch_size)])
    run = start_run(args)
    model, _ = build_pretraining_model(args)
    total_batch = run.total_batch(args)
    total_steps = optimizer_steps(args, None, total_batch)
    optimizer, schedule, lr = build_pretraining_optimization(args, model, total_steps, total_batch)
    hyperparameters = RunHyperparameters.from_args(args, lr, total_steps, lr_scheduler_type=args.lr_scheduler_type)
    counters = {"images_skipped": torch.zeros(batch_size, dtype=torch.int64)}
    counters["images_converted"] = counters["images_skipped"]
    stream = [{**batch, **counters} for batch in batches]
    loop = RecordingLoop(args, run, model, optimizer, schedule, hyperparameters, (stream, FixedBatches(), FixedBatches()),
                         attention_maps=None, refresh_loader=None, refresh_steps=set(), eval_data=None)
    loop.prepare()
    loop.train()
    return loop


def relative_differences(ours: dict[str, torch.Tensor], official: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor max|ours - official| / max|official| over the official tensors (keys already in hf_mim's names)."""
    missing = sorted(set(official) - set(ours))
    if missing:
        raise KeyError(f"hf_mim has no tensor for {missing[:5]}")
    return {
        key: float((ours[key].double() - value.double()).abs().max() / value.double().abs().max().clamp(min=1e-30))
        for key, value in official.items()
    }
