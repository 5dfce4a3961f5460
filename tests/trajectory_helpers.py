"""Drive run_mim's own training path over a trajectory fixture's fixed batches (tests/fixtures/trajectories).

What runs is the script's: its parser (`run_mim.parse_args`), its optimisation
(`build_pretraining_optimization`, the function `run_mim.train` calls), its loop (`run_mim.PretrainingLoop`:
`TrainingLoop.micro_batch` / `end_step`, `before_step` stage starts, `after_step` refreshes, clipping,
gradient accumulation) and the model's training events. Only the data differs: the fixture's batches, with
every random choice inside them (noise, masks), stand in for the streamed, collated data; a refresh reads
the fixture's whole images. `RecordingLoop` only records (the lr of every step, weights after chosen steps,
the weights right after a stage start).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hf_mim.scripts import run_mim
from hf_mim.training import AttentionMapStore, RunHyperparameters, optimizer_steps, start_run
from hf_mim.training.conventions import epoch_length_known, steps_per_epoch
from hf_mim.training.pretraining import build_pretraining_optimization

DECODE_COUNTS = ("images_skipped", "images_converted")


class FixedBatches:
    """The training stream of a fixture: epoch e yields the batches `epochs[e]` (dicts of tensors) in order.
    Stands in for the loop's dataloader, its stream and its collator (they are told the epoch).
    With `collator` (an hf_mim collator, told the epoch by the loop): `epochs[e]` holds lists of raw examples
    (image, example_id), collated as the loop's DataLoader would."""

    def __init__(self, epochs: list[list], collator=None):
        self.epochs, self.epoch, self.collator = epochs, 0, collator

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.epoch >= len(self.epochs):
            raise AssertionError(f"the loop asked for epoch {self.epoch}; the fixture holds {len(self.epochs)}")
        for batch in self.epochs[self.epoch]:
            if self.collator is not None:
                yield self.collator(batch)
                continue
            size = batch["pixel_values"].shape[0]
            yield {**{key: torch.zeros(size, dtype=torch.int64) for key in DECODE_COUNTS}, **batch}

    def finish(self, batch: dict, epoch: int) -> dict:  # the fixture's masks are final
        return batch


def state_of(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


class RecordingLoop(run_mim.PretrainingLoop):
    """run_mim's loop, recording: the lr every step uses, the weights after `snapshot_steps` (1-based, named
    "step_N") and right after a stage starts ("stage_start_N", N the 0-based step it starts at)."""

    snapshot_steps: set[int] = set()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lrs: list[list[float]] = []
        self.states: dict[str, dict[str, torch.Tensor]] = {}

    def before_step(self, step):
        super().before_step(step)
        if self.schedule.is_stage_boundary(step):
            self.states[f"stage_start_{step}"] = state_of(self.unwrapped)
        self.lrs.append([group["lr"] for group in self.optimizer.param_groups])

    def after_step(self, step, output):
        super().after_step(step, output)
        if step in self.snapshot_steps:
            self.states[f"step_{step}"] = state_of(self.unwrapped)


@dataclass
class Trajectory:
    args: object
    model: object
    optimizer: object
    schedule: object
    total_steps: int
    lrs: list[list[float]]
    states: dict[str, dict[str, torch.Tensor]]
    refresh_steps: list[int] = field(default_factory=list)
    attention_maps: AttentionMapStore | None = None


def run_trajectory(argv: list[str], model, epochs: list[list[dict]], num_examples: int, snapshot_steps=(),
                   refresh_batches: list[dict] | None = None, collator=None) -> Trajectory:
    """Train `model` as `run_mim.py <argv>` would, over the fixed `epochs` of batches (`num_examples`
    images per epoch; the run's length comes from --num_train_epochs or --max_train_steps in `argv`, as in
    the script). `argv` names a data source (e.g. `--train_dir`, never read): without one run_mim would fill
    in its embedded demo's defaults (lr, size). `refresh_batches`: the whole images (with `example_id`) an
    attention refresh reads. `collator`: `epochs` then hold raw examples, which this hf_mim collator batches
    (the loop finishes and normalises them), its mask generator reading the loop's attention maps (AMT: the
    store given to `model.mask_generator`). Needs a fresh Accelerate state (the `fresh_accelerate_state` fixture)."""
    args = run_mim.parse_args(argv)
    run = start_run(args)
    total_batch = run.total_batch(args)
    total_steps = optimizer_steps(args, num_examples, total_batch, minimum=args.num_stages)
    optimizer, schedule, lr = build_pretraining_optimization(args, model, total_steps, total_batch)
    hyperparameters = RunHyperparameters.from_args(args, lr, total_steps, lr_scheduler_type=args.lr_scheduler_type)
    attention_maps = AttentionMapStore() if model.uses_attention_maps else None
    if collator is not None and model.uses_attention_maps:
        attention_maps = collator.mask_generator.store
    examples = num_examples if epoch_length_known(args) else None  # as run_mim: a step budget alone counts nothing
    refresh_steps = set(model.attention_refresh_steps(total_steps, steps_per_epoch(examples, total_batch)))
    stream = FixedBatches(epochs, collator)
    RecordingLoop.snapshot_steps = set(snapshot_steps)
    loop = RecordingLoop(args, run, model, optimizer, schedule, hyperparameters, (stream, stream, collator or stream),
                         attention_maps=attention_maps, refresh_loader=refresh_batches, refresh_steps=refresh_steps,
                         eval_data=None)
    loop.prepare()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and immune to a busy machine
    try:
        loop.train()
    finally:
        torch.set_num_threads(threads)
    return Trajectory(args, loop.unwrapped, optimizer, schedule, total_steps, loop.lrs, loop.states,
                      sorted(refresh_steps), attention_maps)


def without_key_bias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every fused `qkv.bias` cut to its query and value thirds. The key bias is inert: adding
    the same vector to every key shifts each query's scores by one constant, which the softmax ignores, so
    its exact gradient is 0 and no output depends on it. What it gets is rounding noise (~1e-10), which
    AdamW turns into steps of up to ~lr/100 (noise / (noise + eps)): its values, in the official run as in
    hf_mim's, are amplified float noise, not training."""
    out = {}
    for key, value in state.items():
        if key.endswith("qkv.bias"):
            third = value.shape[0] // 3
            value = torch.cat([value[:third], value[2 * third:]])
        out[key] = value
    return out


def relative_diffs(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor max|actual - expected| / max|expected| (absolute where `expected` is all zeros)."""
    if set(actual) != set(expected):
        raise AssertionError(f"keys differ: only in hf_mim {sorted(set(actual) - set(expected))}, "
                             f"only in the official {sorted(set(expected) - set(actual))}")
    diffs = {}
    for key, want in expected.items():
        got = actual[key].detach().double()
        want = want.detach().double()
        scale = want.abs().max().item()
        diffs[key] = (got - want).abs().max().item() / (scale if scale > 0 else 1.0)
    return diffs


def assert_close_states(actual, expected, tol: float, label: str) -> float:
    """Every tensor within `tol` relative (see `relative_diffs`; key biases left out, see `without_key_bias`);
    returns the largest."""
    diffs = relative_diffs(without_key_bias(actual), without_key_bias(expected))
    worst = max(diffs, key=diffs.get)
    bad = {key: f"{value:.2e}" for key, value in diffs.items() if value > tol}
    assert not bad, f"{label}: {len(bad)} tensors off by more than {tol} relative: {bad}"
    return diffs[worst]
