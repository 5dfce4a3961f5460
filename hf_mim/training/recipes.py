"""Small-budget pretraining recipes: what `run_mim.py --model_size demo` trains with when it is given only
data and a step budget (`--max_train_steps`, or the embedded default run).

The papers' recipes are ImageNet recipes: 100k-500k optimizer steps at batch 2048-4096. Copied to a
small model that sees a few thousand images for a few hundred steps, several of their constants stop
meaning what they meant, and the run learns less than a random initialisation already knows (measured:
see benchmarks/learning_benchmark.py and the README). The rules below keep what each constant *does*
and restate it for the budget, each a documented function of the total steps T and the total batch B:

- budget, when the command line gives none (no --max_train_steps, no --num_train_epochs): DEMO_EPOCHS epochs
  of the training set, at least DEMO_MIN_STEPS steps (`demo_steps`). The run must pass through the phase where
  masked modeling first unlearns what a random initialisation knows (measured with AMT on MAE, batch 64: the
  embedded digits' 1,438 images learn in 600 steps, 27 epochs; MNIST's 4,000 do not in 600 steps, 10 epochs,
  k-NN 37.3 against 43.1 at random initialisation, fine-tuning on 10 % 42.4 against 69.2, and do in 1,500
  steps, 24 epochs: k-NN 70.6, fine-tuning 92.7). Epochs, not steps, decide it.
- learning rate = DEMO_BASE_LEARNING_RATE x B / 256 (the papers' linear rule with a base rate sized for
  hundreds, not hundreds of thousands, of steps: 1e-3 at batch 64); warm-up 5 % of a stage (every run).
- dBOT: as many stages as keep DBOT_STEPS_PER_STAGE steps each, up to three (the official recipe has two):
  a stage-0 student distils a random network and the bootstrapped stages learn from it, but a stage
  re-initialises the student, which then needs its steps. Measured in the benchmark (fine-tuning on 10 % of
  the labels, against random initialisation): the embedded digits at 600 steps, one stage 91.4 vs 77.7 (+13.6,
  k-NN +10.0), two stages of 300 56.5 vs 77.7 (-21.2; +1.1 with seed 1), with the current training steps (two
  stages of 200 were 37.9 points below in run_mim's downstream check); MNIST at 1,500 steps, three stages of
  500: 92.2 vs 75.7 (+16.5, k-NN +24.2).
- ExtreMA: BYOL's BatchNorm in the projector and predictor (`projector_norm="batch_norm"`) instead of the
  official LayerNorm. With LayerNorm the projections of different images converge and the loss falls to
  nothing (measured on the embedded digits, 600 steps, lr 1e-3: 0.008 after 50 steps, 1e-4 by step 350,
  with a crop shared by both views as official or a crop per view), a collapse the paper's 300 ImageNet epochs
  do not hit; fine-tuning on 10 % of the labels then lands below random initialisation (72.7 vs 76.0).
  Batch statistics keep the projections apart (loss 0.17-0.75 over the run) and the same run fine-tunes to
  86.9 (+10.9), linear probe 97.8 vs 97.2. The paper's momentum (0.996 -> 1, cosine), not scaled to the
  budget: a teacher that follows the student faster collapses sooner (LayerNorm, lr 1e-3: base momentum
  0.917 gives a loss of 8e-4 after 50 steps and 2e-5 after 100, 0.996 gives 0.016 and 0.004). The official
  shared crop stays (a crop per view with BatchNorm: linear probe 93.6, below random).
- MaskDistill without a teacher (`--teacher_name_or_path`; no CLIP can be downloaded offline): the pixel
  target of the unified view (normalised patch pixels: the MAE/SimMIM instance of MaskDistill).
- AMT and RevColV2: their schedules are fractions of the run already (attention refresh every 10 % /
  20 %); the learning-rate rule only.

`demo_recipe(model_type, total_steps, total_batch, teacher)` returns (flag values, config fields);
run_mim.py applies them to whatever the user did not set.
"""

from __future__ import annotations

import math

DEMO_BASE_LEARNING_RATE = 4e-3
DEMO_EPOCHS = 24
DEMO_MIN_STEPS = 600
DBOT_STEPS_PER_STAGE = 500


def demo_steps(examples: int, total_batch: int) -> int:
    """The demo budget: DEMO_EPOCHS epochs of `examples` images, at least DEMO_MIN_STEPS optimizer steps."""
    if examples < 1 or total_batch < 1:
        raise ValueError(f"the demo budget needs images and a batch, got {examples} images x batch {total_batch}")
    return max(DEMO_MIN_STEPS, math.ceil(DEMO_EPOCHS * examples / total_batch))


def demo_learning_rate(total_batch: int) -> float:
    return DEMO_BASE_LEARNING_RATE * total_batch / 256


def dbot_stages(total_steps: int) -> int:
    """1 to 3 stages, each of at least DBOT_STEPS_PER_STAGE steps."""
    return max(1, min(3, total_steps // DBOT_STEPS_PER_STAGE))


def _dbot(total_steps: int, has_teacher: bool) -> tuple[dict, dict]:
    return {"num_stages": dbot_stages(total_steps)}, {}


def _maskdistill(total_steps: int, has_teacher: bool) -> tuple[dict, dict]:
    return {}, ({} if has_teacher else {"target": "pixels"})


def _extrema(total_steps: int, has_teacher: bool) -> tuple[dict, dict]:
    return {}, {"projector_norm": "batch_norm"}


# model_type -> (flags, config fields) beyond the learning rate, as a function of (total steps, has a teacher)
METHOD_RULES = {"dbot": _dbot, "extrema": _extrema, "maskdistill": _maskdistill}


def demo_recipe(model_type: str, total_steps: int, total_batch: int, has_teacher: bool = False) -> tuple[dict, dict]:
    """(run_mim.py flag values, config fields) of the small-budget recipe of `model_type`."""
    if total_steps < 1 or total_batch < 1:
        raise ValueError(f"the recipe needs at least one step and one image per step, got {total_steps} x {total_batch}")
    flags, config = METHOD_RULES.get(model_type, lambda *_: ({}, {}))(total_steps, has_teacher)
    return {"learning_rate": demo_learning_rate(total_batch), **flags}, config


def uses_demo_recipe(args) -> bool:
    """`--model_size demo` trained from scratch (no weights or config given)."""
    return args.model_size == "demo" and not args.model_name_or_path and not getattr(args, "config_name_or_path", None)


def apply_demo_budget(args, examples: int | None, total_batch: int) -> dict:
    """For the demo recipe with no budget on the command line: --max_train_steps = `demo_steps` of the counted
    training images. Returns what it set ({} otherwise)."""
    if not uses_demo_recipe(args) or args.max_train_steps is not None or args.num_train_epochs is not None or not examples:
        return {}
    args.max_train_steps = demo_steps(examples, total_batch)
    return {"max_train_steps": args.max_train_steps}


def apply_demo_recipe(args, total_steps: int, total_batch: int) -> dict:
    """For `--model_size demo` trained from scratch: set the recipe's flags the user left unset
    (`args.explicit_flags`; an explicit --base_learning_rate keeps its lr) and its config fields as
    `args.recipe_config` (beneath --config_overrides). Returns what it set ({} for any other run)."""
    from .overrides import parse_overrides

    if not uses_demo_recipe(args):
        return {}
    flags, config = demo_recipe(args.model_type, total_steps, total_batch, has_teacher=args.teacher_name_or_path is not None)
    explicit = set(args.explicit_flags) | ({"learning_rate"} if "base_learning_rate" in args.explicit_flags else set())
    applied = {name: value for name, value in flags.items() if name not in explicit}
    for name, value in applied.items():
        setattr(args, name, value)
    user_fields = parse_overrides(args.config_overrides)
    args.recipe_config = {name: value for name, value in config.items() if name not in user_fields}
    return {**applied, **args.recipe_config}


__all__ = [
    "DEMO_BASE_LEARNING_RATE", "DEMO_EPOCHS", "DEMO_MIN_STEPS", "apply_demo_budget", "apply_demo_recipe", "dbot_stages",
    "demo_learning_rate", "demo_recipe", "demo_steps", "uses_demo_recipe",
]
