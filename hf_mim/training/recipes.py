"""Small-budget pretraining recipes: what `run_mim.py --model_size demo` trains with when it is given only
data and a step budget (`--max_train_steps`, or the embedded default run).

The papers' recipes are ImageNet recipes: 100k-500k optimizer steps at batch 2048-4096. Copied to a
small model that sees a few thousand images for a few hundred steps, several of their constants stop
meaning what they meant, and the run learns less than a random initialisation already knows (measured:
see benchmarks/learning_benchmark.py and the README). The rules below keep what each constant *does*
and restate it for the budget, each a documented function of the total steps T and the total batch B:

- learning rate = DEMO_BASE_LEARNING_RATE x B / 256 (the papers' linear rule with a base rate sized for
  hundreds, not hundreds of thousands, of steps: 1e-3 at batch 64); warm-up 5 % of a stage (every run).
- dBOT: as many stages as keep DBOT_STEPS_PER_STAGE steps each, up to three (the official recipe has two):
  a stage-0 student distils a random network and the bootstrapped stages learn from it, but a stage
  re-initialises the student, which then needs its steps (measured on the embedded digits: 2 stages of
  200 steps fine-tune 37.9 points below random initialisation in run_mim's downstream check, 2 stages of 300
  steps 7.3 points above it in the benchmark).
- ExtreMA: the paper's momentum (0.996 -> 1, cosine). Not scaled to the budget: a teacher that follows the
  student faster makes the run collapse sooner (measured on the embedded digits, 600 steps, lr 1e-3: base
  momentum 0.917 gives a loss of 8e-4 after 50 steps and 2e-5 after 100, 0.996 gives 0.016 and 0.004).
- MaskDistill without a teacher (`--teacher_name_or_path`; no CLIP can be downloaded offline): the pixel
  target of the unified view (normalised patch pixels: the MAE/SimMIM instance of MaskDistill).
- AMT and RevColV2: their schedules are fractions of the run already (attention refresh every 10 % /
  20 %); the learning-rate rule only.

`demo_recipe(model_type, total_steps, total_batch, teacher)` returns (flag values, config fields);
run_mim.py applies them to whatever the user did not set.
"""

from __future__ import annotations

DEMO_BASE_LEARNING_RATE = 4e-3
DBOT_STEPS_PER_STAGE = 300


def demo_learning_rate(total_batch: int) -> float:
    return DEMO_BASE_LEARNING_RATE * total_batch / 256


def dbot_stages(total_steps: int) -> int:
    """1 to 3 stages, each of at least DBOT_STEPS_PER_STAGE steps."""
    return max(1, min(3, total_steps // DBOT_STEPS_PER_STAGE))


def _dbot(total_steps: int, has_teacher: bool) -> tuple[dict, dict]:
    return {"num_stages": dbot_stages(total_steps)}, {}


def _maskdistill(total_steps: int, has_teacher: bool) -> tuple[dict, dict]:
    return {}, ({} if has_teacher else {"target": "pixels"})


# model_type -> (flags, config fields) beyond the learning rate, as a function of (total steps, has a teacher)
METHOD_RULES = {"dbot": _dbot, "maskdistill": _maskdistill}


def demo_recipe(model_type: str, total_steps: int, total_batch: int, has_teacher: bool = False) -> tuple[dict, dict]:
    """(run_mim.py flag values, config fields) of the small-budget recipe of `model_type`."""
    if total_steps < 1 or total_batch < 1:
        raise ValueError(f"the recipe needs at least one step and one image per step, got {total_steps} x {total_batch}")
    flags, config = METHOD_RULES.get(model_type, lambda *_: ({}, {}))(total_steps, has_teacher)
    return {"learning_rate": demo_learning_rate(total_batch), **flags}, config


def apply_demo_recipe(args, total_steps: int, total_batch: int) -> dict:
    """For `--model_size demo` trained from scratch: set the recipe's flags the user left unset
    (`args.explicit_flags`; an explicit --base_learning_rate keeps its lr) and its config fields as
    `args.recipe_config` (beneath --config_overrides). Returns what it set ({} for any other run)."""
    from .overrides import parse_overrides

    if args.model_size != "demo" or args.model_name_or_path or getattr(args, "config_name_or_path", None):
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
    "DEMO_BASE_LEARNING_RATE", "apply_demo_recipe", "dbot_stages", "demo_learning_rate", "demo_recipe",
]
