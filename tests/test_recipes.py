"""The small-budget recipes of `run_mim.py --model_size demo` (hf_mim/training/recipes.py): the documented
rules by hand, and that they fill only what the user left unset."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hf_mim.training.recipes import (
    DEMO_BASE_LEARNING_RATE, apply_demo_budget, apply_demo_recipe, dbot_stages, demo_learning_rate, demo_recipe, demo_steps,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training_scripts"))
import run_mim  # noqa: E402


def test_learning_rate_follows_the_linear_rule_with_the_demo_base_rate():
    assert demo_learning_rate(256) == DEMO_BASE_LEARNING_RATE
    assert demo_learning_rate(64) == pytest.approx(DEMO_BASE_LEARNING_RATE / 4)


@pytest.mark.parametrize("steps, stages", [(150, 1), (600, 1), (999, 1), (1000, 2), (1499, 2), (1500, 3), (50_000, 3)])
def test_dbot_trains_as_many_stages_as_keep_500_steps_each_up_to_three(steps, stages):
    assert dbot_stages(steps) == stages


@pytest.mark.parametrize("steps", [600, 1500, 50_000])
def test_extrema_projects_with_batch_statistics_and_keeps_the_papers_momentum_whatever_the_budget(steps):
    assert demo_recipe("extrema", steps, 64) == ({"learning_rate": demo_learning_rate(64)}, {"projector_norm": "batch_norm"})


def test_maskdistill_without_a_teacher_regresses_pixels_and_with_one_keeps_its_target():
    assert demo_recipe("maskdistill", 600, 64)[1] == {"target": "pixels"}
    assert demo_recipe("maskdistill", 600, 64, has_teacher=True)[1] == {}
    assert demo_recipe("amt", 600, 64) == ({"learning_rate": demo_learning_rate(64)}, {})


@pytest.mark.parametrize("examples, batch, steps", [(1438, 64, 600), (4000, 64, 1500), (4001, 64, 1501), (100, 8, 600),
                                                    (1_281_167, 4096, 7507)])
def test_the_budget_is_24_epochs_and_at_least_600_steps(examples, batch, steps):
    assert demo_steps(examples, batch) == steps  # by hand: max(600, ceil(24 x examples / batch))


def test_the_budget_fills_only_a_run_without_one(tmp_path):
    args = parse("--per_device_train_batch_size", "64")
    assert apply_demo_budget(args, 4000, 64) == {"max_train_steps": 1500} and args.max_train_steps == 1500
    for given in (["--max_train_steps", "50"], ["--num_train_epochs", "2"]):
        args = parse(*given)
        before = args.max_train_steps
        assert apply_demo_budget(args, 4000, 64) == {} and args.max_train_steps == before
    args = run_mim.parse_args(["--train_dir", "unused", "--model_size", "base"])
    assert apply_demo_budget(args, 4000, 64) == {} and args.max_train_steps is None
    args = parse()
    assert apply_demo_budget(args, None, 64) == {} and args.max_train_steps is None  # not counted: the user's epochs


def parse(*flags):
    return run_mim.parse_args(["--train_dir", "unused", "--model_size", "demo", *flags])


def test_the_recipe_fills_what_the_user_left_unset():
    args = parse("--model_type", "dbot", "--max_train_steps", "1000", "--per_device_train_batch_size", "64")  # 2 stages
    applied = apply_demo_recipe(args, 1000, 64)
    assert applied == {"learning_rate": demo_learning_rate(64), "num_stages": 2}
    assert args.learning_rate == demo_learning_rate(64) and args.num_stages == 2 and args.recipe_config == {}


def test_the_users_flags_and_config_fields_win():
    args = parse("--model_type", "maskdistill", "--learning_rate", "3e-4", "--config_overrides", "target=teacher")
    assert apply_demo_recipe(args, 600, 64) == {} and args.learning_rate == 3e-4 and args.recipe_config == {}
    args = parse("--model_type", "dbot", "--base_learning_rate", "1e-4", "--num_stages", "1")
    assert apply_demo_recipe(args, 600, 64) == {} and args.learning_rate is None and args.num_stages == 1


def test_other_sizes_and_given_weights_get_no_recipe(tmp_path):
    args = run_mim.parse_args(["--train_dir", "unused", "--model_type", "extrema", "--model_size", "base"])
    assert apply_demo_recipe(args, 600, 64) == {} and not getattr(args, "recipe_config", {})
    args = run_mim.parse_args(["--train_dir", "unused", "--model_name_or_path", str(tmp_path)])
    assert apply_demo_recipe(args, 600, 64) == {}


def test_recipe_config_fields_reach_the_model():
    from hf_mim.training.pretraining import build_pretraining_model

    args = parse("--model_type", "maskdistill")
    apply_demo_recipe(args, 600, 64)
    _, config = build_pretraining_model(args)
    assert config.target == "pixels"
    assert (config.image_size, config.patch_size, config.hidden_size) == (32, 4, 128)  # the demo size
    args = parse("--model_type", "extrema")
    apply_demo_recipe(args, 600, 64)
    model, config = build_pretraining_model(args)
    assert config.projector_norm == "batch_norm" and isinstance(model.projector[1], torch.nn.BatchNorm1d)
    args = parse("--model_type", "extrema", "--config_overrides", "projector_norm=layer_norm")  # the official projector
    apply_demo_recipe(args, 600, 64)
    assert build_pretraining_model(args)[1].projector_norm == "layer_norm"


def test_the_embedded_default_trains_amt_unless_a_model_type_is_given():
    assert run_mim.parse_args([]).model_type == "amt"
    assert run_mim.parse_args(["--model_type", "dbot"]).model_type == "dbot"  # given, though it is the parser default
    assert run_mim.parse_args(["--train_dir", "unused"]).model_type == "dbot"  # user data: the parser default
