"""Training steps as the official code takes them: run_mim's own training path (its parser, its
optimisation, its loop and the models' training events) from the official initial weights, over the
official batches and random choices, must end at the official weights (tests/fixtures/trajectories/*/README.md
says how the official scripts were run, and what each tensor is)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trajectory_helpers import assert_close_states, run_trajectory, state_of

from hf_mim.convert import convert_amt_checkpoint, convert_dbot_checkpoint
from hf_mim.masking import units_from_patches

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "trajectories"
TOL = 1e-5  # per tensor: max|hf_mim - official| / max|official|


def load_trajectory(method: str) -> dict:
    folder = FIXTURES / method
    fixture = {path.stem: load_file(str(path)) for path in folder.glob("*.safetensors")}
    fixture["config"] = json.loads((folder / "config.json").read_text())
    return fixture


# ------------------------------------------------------------------------------------------------ dBOT
DBOT_OVERRIDES = {"num_attention_heads": 2, "decoder_num_attention_heads": 2, "drop_path_rate": 0.0}  # --sdpr 0


def dbot_state(fixture, student: dict, teacher: dict) -> dict:
    """An official (student, teacher) pair in hf_mim's layout, through the converter."""
    # the snapshots hold the trained tensors; the fixed sin-cos tables are the initial ones
    fixed = {key: value for key, value in fixture["official_initial_state_dict"].items() if key.endswith("pos_embed")}
    model, _ = convert_dbot_checkpoint({**fixed, **student}, {"pos_embed": fixed["pos_embed"], **teacher}, overrides=DBOT_OVERRIDES)
    return state_of(model)


def encoder_of(student: dict) -> dict:
    """The keys a teacher loads from a student (official: teacher.load_state_dict(student, strict=False))."""
    return {key: value for key, value in student.items() if not key.startswith(("decoder", "mask_token"))}


def test_dbot_two_stages_follow_the_official_training(fresh_accelerate_state, tmp_path):
    """dBOT ViT-B recipe (AdamW 0.9/0.95, wd 0.05 on every weight matrix and token, blr scaling, per-iteration
    warm-up + cosine restarted per stage, clipping at max_grad_norm) over two stages: weights after the
    warm-up steps, at the end of stage 0, right after the stage start (teacher <- student, student
    re-initialised from a seeded generator, as the fixture seeded the official re-initialisation) and at the end."""
    fixture = load_trajectory("dbot")
    config, inputs = fixture["config"], fixture["inputs"]
    run = config["run"]
    initial, initial_teacher = fixture["official_initial_state_dict"], fixture["official_initial_teacher_state_dict"]
    model, _ = convert_dbot_checkpoint(initial, initial_teacher, overrides=DBOT_OVERRIDES)
    start_new_stage = model.start_new_stage

    def seeded_start_new_stage():
        torch.manual_seed(run["reinit_seed"])
        start_new_stage()

    model.start_new_stage = seeded_start_new_stage
    per_epoch, epochs = config["steps_per_epoch"], run["stage_epochs"][-1]
    batches = [[{"pixel_values": inputs["pixel_values"][inputs["batch_index"][i]], "noise": inputs["noise"][e * per_epoch + i]}
                for i in range(per_epoch)] for e in range(epochs)]
    stage_steps, total_steps = config["stage_steps"], config["total_steps"]
    argv = [
        "--model_type", "dbot", "--train_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
        "--per_device_train_batch_size", str(run["batch_size"]), "--num_train_epochs", str(epochs),
        "--num_train_examples", str(run["images"]), "--num_stages", str(len(run["stage_epochs"]) - 1),
        "--num_warmup_steps", str(run["warmup_epochs"] * per_epoch), "--base_learning_rate", str(run["blr"]),
        "--weight_decay", str(run["weight_decay"]), "--max_grad_norm", str(run["clip_grad"]), "--seed", str(run["seed"]),
    ]
    trajectory = run_trajectory(argv, model, batches, run["images"], snapshot_steps={2, 3, stage_steps, total_steps})
    assert trajectory.total_steps == total_steps

    official_lr = fixture["schedule"]["lr"].tolist()
    assert [max(lrs) for lrs in trajectory.lrs] == pytest.approx(official_lr, abs=1e-12)
    assert all(len(set(lrs)) == 1 for lrs in trajectory.lrs)

    stage0_end = fixture[f"official_step_{stage_steps}"]
    expected = {
        "step_2": (fixture["official_step_2"], initial_teacher),
        "step_3": (fixture["official_step_3"], initial_teacher),
        f"step_{stage_steps}": (stage0_end, initial_teacher),
        f"stage_start_{stage_steps}": (fixture["official_after_reinit"], encoder_of(stage0_end)),
        f"step_{total_steps}": (fixture[f"official_step_{total_steps}"], encoder_of(stage0_end)),
    }
    for name, (student, teacher) in expected.items():
        assert_close_states(trajectory.states[name], dbot_state(fixture, student, teacher), TOL, name)


# ------------------------------------------------------------------------------------------------ AMT
def amt_state(fixture, weights: dict, overrides: dict) -> dict:
    """Official weights (a snapshot: the trained tensors; fixed tables from the initial weights) in hf_mim's layout."""
    model, _ = convert_amt_checkpoint({**fixture["official_initial_state_dict"], **weights}, overrides)
    return state_of(model)


def amt_batches(fixture) -> list[list[dict]]:
    """Every micro-batch of the official run, epoch by epoch: its images and its official masks over patches
    (mae-AMT stores them per patch, SimMIM-AMT per 2 x 2-patch unit); thrown patches from the first AMT step on."""
    config, inputs = fixture["config"], fixture["inputs"]
    if "mask" in inputs:
        masks = inputs["mask"]
    else:
        units = inputs["unit_mask"]
        grid = int(units.shape[-1] ** 0.5)
        masks = units.reshape(-1, grid, grid).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(*units.shape[:2], -1)
    micro = config["micro_batches_per_step"] * config["steps_per_epoch"]
    epochs = []
    for index, mask in enumerate(masks):
        batch = {"pixel_values": inputs["pixel_values"][inputs["batch_index"][index % micro].long()],
                 "bool_masked_pos": mask == 1}
        if index >= config["first_amt_step"] * config["micro_batches_per_step"]:
            batch["bool_thrown_pos"] = mask == -1
        if index % micro == 0:
            epochs.append([])
        epochs[-1].append(batch)
    return epochs


def check_amt_trajectory(fixture, trajectory, overrides: dict, snapshot_steps) -> None:
    """The per-step lr, the weights after `snapshot_steps`, the refresh (when, and the maps it stores) and the
    per-patch weights the first attention-driven masks are drawn from, against the official run."""
    config, inputs = fixture["config"], fixture["inputs"]
    assert [max(lrs) for lrs in trajectory.lrs] == pytest.approx(fixture["schedule"]["lr"].tolist(), rel=1e-12, abs=1e-15)
    for step in snapshot_steps:
        name = f"step_{step}"
        assert_close_states(trajectory.states[name], amt_state(fixture, fixture[f"official_{name}"], overrides), TOL, name)
    assert trajectory.refresh_steps == [config["refresh_after_step"]]
    store = trajectory.attention_maps
    official_maps = inputs["refreshed_maps"]
    stored = torch.stack([store.get(example_id) for example_id in range(len(official_maps))])
    assert (stored - official_maps).abs().max() <= 1e-3  # the store keeps float16 maps
    # the weights of the first AMT micro-batch's images, as torch.multinomial got them (per patch or per unit)
    generator = trajectory.model.mask_generator(store)
    weights = generator.batch_patch_weights(stored, None, None)  # whole images, no flip
    weights = units_from_patches(weights, generator.patch_grid, generator.unit_size)
    batch_index = inputs["batch_index"]
    first = batch_index[config["first_amt_step"] * config["micro_batches_per_step"] % len(batch_index)].long()
    official_weights = inputs["amt_weights"].reshape(-1, weights.shape[-1])[: len(first)]
    assert (weights[first] - official_weights).abs().max() <= 2e-3 * official_weights.abs().max()


AMT_MAE_OVERRIDES = {"num_attention_heads": 12, "decoder_num_attention_heads": 4}


def test_amt_mae_follows_the_official_training(fresh_accelerate_state, tmp_path):
    """mae-AMT recipe (AdamW 0.9/0.95, wd 0.05 on every weight matrix and token, blr scaling with gradient
    accumulation, per-iteration warm-up + cosine, no clipping): random 75 % masking until the refresh after
    epoch 40, the refresh pass on the weights after it, then attention-driven masking and throwing."""
    fixture = load_trajectory("amt_mae")
    config = fixture["config"]
    run = config["run"]
    # the official refresh comes after epoch index 40, i.e. after 41 of the 42 epochs (see the README)
    overrides = {**AMT_MAE_OVERRIDES, "amt_interval": config["refresh_after_step"] / config["total_steps"]}
    model, _ = convert_amt_checkpoint(fixture["official_initial_state_dict"], overrides)
    argv = [
        "--model_type", "amt", "--train_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
        "--per_device_train_batch_size", str(run["batch_size"]), "--gradient_accumulation_steps", str(run["accum_iter"]),
        "--num_train_epochs", str(run["epochs"]), "--num_train_examples", str(run["images"]),
        "--num_warmup_steps", str(run["warmup_epochs"] * config["steps_per_epoch"]), "--base_learning_rate", str(run["blr"]),
        "--weight_decay", str(run["weight_decay"]), "--seed", str(run["seed"]),
    ]
    images = fixture["inputs"]["pixel_values"]
    refresh = [{"pixel_values": images, "example_id": torch.arange(len(images))}]
    steps = config["total_steps"]
    snapshot_steps = (2, 3, steps)
    trajectory = run_trajectory(argv, model, amt_batches(fixture), run["images"], snapshot_steps, refresh_batches=refresh)
    assert trajectory.total_steps == steps
    check_amt_trajectory(fixture, trajectory, overrides, snapshot_steps)


def test_amt_simmim_follows_the_official_training(fresh_accelerate_state, tmp_path):
    """SimMIM-AMT recipe (AdamW 0.9/0.999, wd 0.05 except biases, norms, pos_embed and cls_token, lr scaled
    as SimMIM's BASE_LR x batch / 512, its timm cosine with warm-up as its loop steps it, clipping): random
    masks of 2 x 2-patch units until the refresh after epoch 40, then attention-driven masking and throwing
    (the two-line fix of the released forward that lets it run past epoch 39: see the README)."""
    fixture = load_trajectory("amt_simmim")
    config = fixture["config"]
    run, train = config["run"], config["config"]["TRAIN"]  # the official yacs config of the run
    overrides = {"num_attention_heads": 12, "drop_path_rate": 0.0,
                 "amt_interval": config["refresh_after_step"] / config["total_steps"]}
    model, _ = convert_amt_checkpoint(fixture["official_initial_state_dict"], overrides)
    argv = [
        "--model_type", "amt", "--train_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
        "--per_device_train_batch_size", str(run["batch_size"]), "--num_train_epochs", str(run["epochs"]),
        "--num_train_examples", str(run["images"]), "--num_warmup_steps", str(int(train["WARMUP_EPOCHS"]) * config["steps_per_epoch"]),
        # SimMIM scales BASE_LR x batch / 512; run_mim base x batch / 256
        "--base_learning_rate", str(train["BASE_LR"] / 2), "--lr_scheduler_type", "simmim_cosine",
        "--min_lr_ratio", str(train["MIN_LR"] / train["BASE_LR"]), "--adam_beta2", "0.999",
        "--weight_decay", str(train["WEIGHT_DECAY"]), "--max_grad_norm", str(train["CLIP_GRAD"]),
    ]
    images = fixture["inputs"]["pixel_values"]
    refresh = [{"pixel_values": images, "example_id": torch.arange(len(images))}]
    steps = config["total_steps"]
    snapshot_steps = (3, 5, config["refresh_after_step"], steps)
    trajectory = run_trajectory(argv, model, amt_batches(fixture), run["images"], snapshot_steps, refresh_batches=refresh)
    assert trajectory.total_steps == steps
    check_amt_trajectory(fixture, trajectory, overrides, snapshot_steps)
