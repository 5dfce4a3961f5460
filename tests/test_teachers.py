"""Frozen teachers (hf_mim/teachers.py) for every method that regresses one: RevColV2's teacher target,
dBOT's external stage-0 teacher, hf_mim models as teachers, and the teacher's precision.

MaskDistill's CLIP / timm teachers are tested against the official fixture and by hand in
tests/test_maskdistill.py; here every target is checked against a hand computation from the teacher
model itself (its own forward, outside hf_mim's teacher code).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import max_abs_diff
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from hf_mim import (
    DbotConfig,
    DbotForMaskedImageModeling,
    ExtremaConfig,
    ExtremaForMaskedImageModeling,
    MaskDistillConfig,
    MaskDistillForMaskedImageModeling,
    RevColV2Config,
    RevColV2ForMaskedImageModeling,
)
from hf_mim.convert.maskdistill import save_teacher_folder
from hf_mim.hub import save_hub_folder
from hf_mim.teachers import FrozenTeacher

TEACHER_MEAN, TEACHER_STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]  # neither ImageNet's nor CLIP's
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "run_mim.py"


def tiny_clip_folder(tmp_path, width=24, name="clip", patch_size=8, model_class=CLIPVisionModel) -> Path:
    torch.manual_seed(1)
    config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=patch_size, projection_dim=8, hidden_act="quick_gelu",
    )
    return save_teacher_folder(model_class(config).eval(), tmp_path / name, TEACHER_MEAN, TEACHER_STD)


def clip_tokens_by_hand(folder, pixel_values) -> torch.Tensor:
    """Student ImageNet pixel_values -> image in [0, 1] -> the teacher's own mean/std -> CLIP, cls dropped."""
    images = pixel_values * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    teacher_input = (images - torch.tensor(TEACHER_MEAN).view(1, 3, 1, 1)) / torch.tensor(TEACHER_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return CLIPVisionModel.from_pretrained(folder).eval()(pixel_values=teacher_input).last_hidden_state[:, 1:]


def unbiased_norm(tokens, eps=1e-6):
    return (tokens - tokens.mean(-1, keepdim=True)) / torch.sqrt(tokens.var(-1, keepdim=True, unbiased=True) + eps)


# ---- RevColV2: target="teacher" --------------------------------------------------------------------


@pytest.mark.parametrize("level, loss", [(0, "mse"), (3, "smooth_l1")])
def test_revcolv2_teacher_target_matches_a_hand_computation(tmp_path, level, loss):
    folder = tiny_clip_folder(tmp_path)
    config = RevColV2Config.for_teacher(folder, preset="tiny", target="teacher", teacher_head_level=level, teacher_loss=loss)
    assert config.teacher_hidden_size == 24 and config.target_size == 24
    torch.manual_seed(0)
    model = RevColV2ForMaskedImageModeling(config).eval()
    pixel_values, mask = torch.randn(2, 3, 32, 32), torch.arange(16).repeat(2, 1) % 4 != 0
    out = model(pixel_values, bool_masked_pos=mask)
    target = F.layer_norm(clip_tokens_by_hand(folder, pixel_values), (24,), eps=1e-6)
    assert max_abs_diff(out.targets, target) <= 1e-5
    # the head reads the chosen level of the last top-down column (levels 0..L-1 of the columns' run)
    columns = model.revcolv2.run_columns(pixel_values, model.mask_generator().masks(2, 16, mask, None, "cpu"))
    level_tokens = columns.levels[level][:, 1:]
    assert max_abs_diff(out.predictions, model.decoder.pred(model.decoder.norm(level_tokens))) <= 1e-6
    elementwise = (out.predictions - target) ** 2 if loss == "mse" else F.smooth_l1_loss(out.predictions, target, reduction="none")
    hand = elementwise[mask].mean()
    assert max_abs_diff(out.loss, hand) <= 1e-6
    assert out.reconstruction is None and out.predictions.shape == (2, 16, 24)


def test_revcolv2_teacher_gets_no_gradient_and_the_reversible_engine_is_unchanged(tmp_path):
    """The loss backprops through the reversible columns (gradients equal plain autograd's, in float64);
    the teacher, run outside the columns under no_grad, gets none and is not part of the student."""
    folder = tiny_clip_folder(tmp_path)
    pixel_values = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(1))
    grads = []
    for reversible in (True, False):
        torch.manual_seed(0)
        model = RevColV2ForMaskedImageModeling(
            RevColV2Config.for_teacher(folder, preset="tiny", target="teacher", use_reversible=reversible)
        ).to(torch.float64).train()
        model(pixel_values, noise=noise).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
        teacher = model.teacher
        assert not teacher.training and next(teacher.parameters()).dtype == torch.float64  # follows the student
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
        assert not {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}
        assert not any("vision_model" in key or "teacher" in key for key in model.state_dict())
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads[0].values())
    for prefix in ("revcolv2.bottom_up.0.", "revcolv2.bottom_up.1.", "revcolv2.top_down.1.", "decoder."):
        assert sum(grad.abs().sum() for name, grad in grads[0].items() if name.startswith(prefix)) > 0, prefix
    for name in grads[0]:
        assert max_abs_diff(grads[0][name], grads[1][name]) <= 1e-7 * grads[1][name].abs().max().item(), name


def test_revcolv2_teacher_fields_are_validated_and_saved_without_the_teacher(tmp_path):
    for field, value in [("target", "clip"), ("teacher_head_level", 4), ("teacher_loss", "ce"),
                         ("teacher_layer", "middle"), ("teacher_image_std", [0.1, 0.2])]:
        with pytest.raises(ValueError, match=field):
            RevColV2Config.from_preset("tiny", **{field: value})
    folder = tiny_clip_folder(tmp_path)
    model = RevColV2ForMaskedImageModeling(RevColV2Config.for_teacher(folder, preset="tiny", target="teacher")).eval()
    pixel_values, mask = torch.randn(1, 3, 32, 32), torch.arange(16).repeat(1, 1) % 2 == 0
    before = model(pixel_values, bool_masked_pos=mask)
    model.save_pretrained(tmp_path / "student")
    assert set(load_file(str(tmp_path / "student" / "model.safetensors"))) == set(model.state_dict())
    loaded = RevColV2ForMaskedImageModeling.from_pretrained(tmp_path / "student").eval()
    assert loaded._frozen_teacher is None  # loaded lazily from config.teacher_name_or_path
    after = loaded(pixel_values, bool_masked_pos=mask)
    assert torch.equal(before.loss, after.loss)
    grid = tiny_clip_folder(tmp_path, name="clip_p4", patch_size=4)  # 8x8 grid, the tiny student has 4x4
    with pytest.raises(ValueError, match="patch grid .* teacher_name_or_path"):
        RevColV2ForMaskedImageModeling(RevColV2Config.for_teacher(grid, preset="tiny", target="teacher"))(pixel_values)


# ---- dBOT: an external stage-0 teacher ---------------------------------------------------------------


def test_dbot_stage0_regresses_the_given_teacher_and_the_next_stage_copies_the_student(tmp_path):
    folder = tiny_clip_folder(tmp_path, width=32)  # as wide as the tiny student: bootstrapping continues
    config = DbotConfig.for_teacher(folder, preset="tiny")
    assert config.teacher_hidden_size == 32 and config.target_size == 32
    torch.manual_seed(0)
    model = DbotForMaskedImageModeling(config).train()
    pixel_values, mask = torch.randn(2, 3, 32, 32), torch.arange(16).repeat(2, 1) % 4 != 0
    out = model(pixel_values, bool_masked_pos=mask)
    target = unbiased_norm(clip_tokens_by_hand(folder, pixel_values))  # dBOT's own target normalisation
    assert max_abs_diff(out.targets, target) <= 1e-5
    hand = F.smooth_l1_loss(out.predictions[:, 1:][mask], target[mask], beta=2.0)  # masked patches, no cls
    assert max_abs_diff(out.loss, hand) <= 1e-6
    out.loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.external_teacher.parameters())
    # the random stage-0 teacher is not used while an external one is given
    assert max_abs_diff(out.targets, unbiased_norm(model.teacher_features(pixel_values)[:, 1:])) > 0.1

    student = {name: tensor.clone() for name, tensor in model.dbot.encoder.state_dict().items()}
    model.start_new_stage()
    assert model.config.stage == 1 and model._frozen_teacher is None and model.load_teacher() is None
    for name, tensor in model.teacher.state_dict().items():
        assert torch.equal(tensor, student[name]), name
    assert not torch.equal(model.dbot.encoder.state_dict()["layers.0.mlp.fc1.weight"], student["layers.0.mlp.fc1.weight"])
    model.eval()
    stage1 = model(pixel_values, bool_masked_pos=mask)
    assert stage1.targets.shape == (2, 17, 32)  # the bootstrapped teacher: cls + patches, as before
    assert max_abs_diff(stage1.targets, unbiased_norm(model.teacher_features(pixel_values))) <= 1e-6


def test_dbot_wider_external_teacher_allows_one_stage_only(tmp_path):
    folder = tiny_clip_folder(tmp_path, width=24)
    model = DbotForMaskedImageModeling(DbotConfig.for_teacher(folder, preset="tiny"))
    assert model.decoder.decoder_pred.out_features == 24
    model(torch.randn(1, 3, 32, 32)).loss.backward()
    with pytest.raises(ValueError, match="teacher_hidden_size=24 differs from hidden_size=32"):
        model.start_new_stage()
    with pytest.raises(ValueError, match="teacher_hidden_size"):
        DbotForMaskedImageModeling(DbotConfig.from_preset("tiny", teacher_name_or_path=str(folder)))(torch.randn(1, 3, 32, 32))


def test_dbot_without_an_external_teacher_is_unchanged():
    torch.manual_seed(0)
    model = DbotForMaskedImageModeling(DbotConfig.from_preset("tiny")).eval()
    pixel_values, mask = torch.randn(2, 3, 32, 32), torch.arange(16).repeat(2, 1) % 4 != 0
    out = model(pixel_values, bool_masked_pos=mask)
    assert model.load_teacher() is None and out.targets.shape == (2, 17, 32)
    target = unbiased_norm(model.teacher_features(pixel_values))
    weights = torch.cat([torch.ones(2, 1, dtype=torch.bool), mask], 1)
    hand = F.smooth_l1_loss(out.predictions[weights], target[weights], beta=2.0)
    assert max_abs_diff(out.loss, hand) <= 1e-6


# ---- hf_mim models as teachers ------------------------------------------------------------------------


def test_a_finished_dbot_stage_is_a_teacher(tmp_path):
    """A saved dBOT pretraining folder as teacher gives exactly what dBOT's own bootstrapped teacher gives."""
    torch.manual_seed(0)
    finished = DbotForMaskedImageModeling(DbotConfig.from_preset("tiny")).eval()
    folder = save_hub_folder(finished, tmp_path / "dbot_stage")  # with its ImageNet preprocessor
    student = MaskDistillForMaskedImageModeling(MaskDistillConfig.for_teacher(folder, preset="tiny")).eval()
    assert student.config.teacher_hidden_size == 32
    pixel_values = torch.randn(2, 3, 32, 32)
    tokens = student.teacher_features(pixel_values)
    in_memory = MaskDistillForMaskedImageModeling(MaskDistillConfig.from_preset("tiny", teacher_hidden_size=32)).eval()
    in_memory.set_teacher(copy.deepcopy(finished))  # its backbone; mean/std from the teacher's own config
    assert in_memory._frozen_teacher.image_mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    assert max_abs_diff(in_memory.teacher_features(pixel_values), tokens) <= 1e-6
    final_norm = torch.nn.LayerNorm(32, eps=1e-6).requires_grad_(False)
    final_norm.load_state_dict(finished.dbot.encoder.layernorm.state_dict())  # start_new_stage re-draws it
    finished.start_new_stage()  # the student encoder becomes dBOT's own teacher (no final norm)
    reference = finished.teacher_features(pixel_values)[:, 1:]
    assert max_abs_diff(tokens, reference) <= 1e-5
    post = MaskDistillForMaskedImageModeling(MaskDistillConfig.for_teacher(folder, preset="tiny", teacher_layer="post_layernorm"))
    assert max_abs_diff(post.teacher_features(pixel_values), final_norm(reference)) <= 1e-5
    with pytest.raises(ValueError, match="teacher_layer='projected' needs a teacher with a `visual_projection`"):
        FrozenTeacher(finished.dbot, IMAGENET_MEAN, IMAGENET_STD, "projected")


def test_an_extrema_momentum_encoder_is_a_teacher(tmp_path):
    torch.manual_seed(0)
    extrema = ExtremaForMaskedImageModeling(ExtremaConfig.from_preset("tiny")).eval()
    with torch.no_grad():  # a momentum encoder that differs from the online one
        for parameter in extrema.momentum_encoder.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    folder = save_hub_folder(extrema.exported_backbones()["momentum_encoder"], tmp_path / "momentum")
    config = RevColV2Config.for_teacher(folder, preset="tiny", target="teacher")
    model = RevColV2ForMaskedImageModeling(config).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = extrema.momentum_encoder(pixel_values).patch_tokens  # ImageNet in, ImageNet teacher: same input
    assert max_abs_diff(model.external_teacher_features(pixel_values), expected) <= 1e-5
    out = model(pixel_values, bool_masked_pos=torch.arange(16).repeat(2, 1) % 4 != 0)
    assert max_abs_diff(out.targets, F.layer_norm(expected, expected.shape[-1:], eps=1e-6)) <= 1e-5


# ---- precision: the teacher runs as the student does ---------------------------------------------------


def linear_output_dtypes(module: torch.nn.Module, run) -> set[torch.dtype]:
    dtypes, hooks = set(), []
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear):
            hooks.append(sub.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype)))
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return dtypes


def test_teacher_runs_in_the_students_autocast_and_dtype(tmp_path):
    folder = tiny_clip_folder(tmp_path)
    projected = tiny_clip_folder(tmp_path, name="clip_projection", model_class=CLIPVisionModelWithProjection)
    model = MaskDistillForMaskedImageModeling(
        MaskDistillConfig.for_teacher(projected, preset="tiny", teacher_layer="projected")  # ends in a Linear
    ).train()
    pixel_values = torch.randn(2, 3, 32, 32)
    teacher = model.teacher
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values)
        features = model.teacher_features(pixel_values)
        teacher_dtypes = linear_output_dtypes(teacher, lambda: model.teacher_features(pixel_values))
    assert out.predictions.dtype == torch.bfloat16 and features.dtype == torch.bfloat16  # not upcast
    assert teacher_dtypes == {torch.bfloat16}
    assert next(teacher.parameters()).dtype == torch.float32  # autocast: weights untouched
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert model.teacher_features(pixel_values).dtype == torch.float32  # no autocast: float32 as the student
    # a bf16 student (weights cast) gets a bf16 teacher; RevColV2 and dBOT read it the same way
    model.to(torch.bfloat16)
    assert model.teacher_features(pixel_values).dtype == torch.bfloat16
    assert next(teacher.parameters()).dtype == torch.bfloat16
    revcol = RevColV2ForMaskedImageModeling(RevColV2Config.for_teacher(folder, preset="tiny", target="teacher"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear_output_dtypes(revcol.teacher, lambda: revcol(pixel_values)) == {torch.bfloat16}


# ---- run_mim.py: one --teacher_name_or_path flag for every method ----------------------------------------


def run_mim(*args) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args), "--downstream_eval", "none"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


def test_the_teacher_flag_sets_the_teacher_and_its_width_for_every_method(tmp_path):
    import importlib.util

    from hf_mim.training.pretraining import build_pretraining_model
    from hf_mim.training.run_setup import UserInputError

    spec = importlib.util.spec_from_file_location("run_mim_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    parse_args = script.parse_args
    teacher = tiny_clip_folder(tmp_path)
    for model_type, overrides in [("revcolv2", "target=teacher"), ("dbot", ""), ("maskdistill", "")]:
        args = parse_args(["--model_type", model_type, "--model_size", "tiny", "--teacher_name_or_path", str(teacher),
                           "--config_overrides", overrides])
        model, config = build_pretraining_model(args)
        assert config.teacher_name_or_path == str(teacher) and config.teacher_hidden_size == 24, model_type
        assert model.external_teacher is not None, model_type
    with pytest.raises(UserInputError, match="no field.*teacher_name_or_path"):
        build_pretraining_model(parse_args(["--model_type", "extrema", "--model_size", "tiny", "--teacher_name_or_path", str(teacher)]))
    with pytest.raises(UserInputError, match="--teacher_name_or_path"):
        build_pretraining_model(parse_args(["--model_type", "dbot", "--model_size", "tiny", "--teacher_name_or_path", str(tmp_path / "none")]))


@pytest.mark.slow
def test_run_mim_pretrains_revcolv2_with_a_teacher(tmp_path):
    teacher = tiny_clip_folder(tmp_path)
    out = tmp_path / "run"
    run_mim("--model_type", "revcolv2", "--model_size", "tiny", "--teacher_name_or_path", teacher,
            "--config_overrides", "target=teacher", "--max_train_steps", 2, "--per_device_train_batch_size", 4,
            "--output_dir", out)
    config = json.loads((out / "config.json").read_text())
    assert config["target"] == "teacher" and config["teacher_name_or_path"] == str(teacher)
    assert config["teacher_hidden_size"] == 24  # read from the teacher by the flag
    saved = load_file(str(out / "model.safetensors"))
    assert saved["decoder.pred.weight"].shape == (24, 32)
    assert not any("vision_model" in key for key in saved)


@pytest.mark.slow
def test_run_mim_dbot_starts_from_a_teacher_and_bootstraps(tmp_path):
    teacher = tiny_clip_folder(tmp_path, width=32)
    out = tmp_path / "run"
    run_mim("--model_type", "dbot", "--model_size", "tiny", "--teacher_name_or_path", teacher, "--num_stages", 2,
            "--max_train_steps", 4, "--per_device_train_batch_size", 4, "--output_dir", out)
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == 1 and config["teacher_name_or_path"] == str(teacher)
    assert any(key.startswith("teacher.") for key in load_file(str(out / "model.safetensors")))  # the bootstrapped one


def test_model_cards_state_the_teacher():
    from hf_mim.hub.card import render_model_card

    revcol = render_model_card(RevColV2ForMaskedImageModeling(RevColV2Config.from_preset(
        "tiny", target="teacher", teacher_name_or_path="my/clip", teacher_hidden_size=24)), "me/revcol").content
    assert "| target | the frozen teacher `my/clip`'s `last_hidden_state` tokens (24 wide, `layer_norm`)" in revcol
    assert "head on level 0 of the last top-down column" in revcol and "`teacher_head_level`" in revcol
    pixels = render_model_card(RevColV2ForMaskedImageModeling(RevColV2Config.from_preset("tiny")), "me/rc").content
    assert "| target | per-patch normalised pixels, MSE on the masked patches |" in pixels
    dbot = render_model_card(DbotForMaskedImageModeling(DbotConfig.from_preset("tiny", teacher_name_or_path="my/clip")),
                             "me/dbot").content
    assert "| stage-0 teacher | the frozen external teacher `my/clip`" in dbot
    plain = render_model_card(DbotForMaskedImageModeling(DbotConfig.from_preset("tiny")), "me/dbot").content
    assert "| stage-0 teacher | the student's random initialisation |" in plain
