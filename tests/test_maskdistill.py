"""MaskDistill: official (BEiT v2 / OpenAI CLIP) numerics, the frozen teacher, the unified-view switches."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import load_fixture, max_abs_diff
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForImageClassification, AutoModelForMaskedImageModeling, CLIPVisionConfig, CLIPVisionModel

from hf_mim import MaskDistillConfig, MaskDistillForImageClassification, MaskDistillForMaskedImageModeling, MaskDistillModel
from hf_mim.convert.maskdistill import CLIP_MEAN, CLIP_STD, convert_maskdistill_checkpoint, save_teacher_folder
from hf_mim.hub import save_hub_folder
from hf_mim.modeling_maskdistill import FrozenTeacher

TOL = 1e-5


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    return load_fixture(fixtures_dir, "maskdistill")


@pytest.fixture(scope="module")
def converted(fixture, tmp_path_factory):
    """Student + CLIP teacher converted with the command line; the classifier in-process."""
    tmp = tmp_path_factory.mktemp("maskdistill_convert")
    torch.save({"model": fixture["official_state_dict"]}, tmp / "checkpoint-299.pth")
    torch.save(fixture["official_teacher_state_dict"], tmp / "clip_visual.pth")
    out = tmp / "pretrain"
    result = subprocess.run(
        [sys.executable, "-m", "hf_mim.convert", "maskdistill", "--checkpoint", str(tmp / "checkpoint-299.pth"),
         "--teacher_checkpoint", str(tmp / "clip_visual.pth"), "--output", str(out),
         "--config_overrides", "teacher_num_attention_heads=4"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    classifier, _ = convert_maskdistill_checkpoint(fixture["official_classifier_state_dict"])
    classifier.save_pretrained(tmp / "finetune")
    return {"pretrain": out, "finetune": tmp / "finetune"}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_pretraining_outputs_match_official(fixture, converted, attn):
    inputs, expected = fixture["inputs"], fixture["outputs"]
    model = MaskDistillForMaskedImageModeling.from_pretrained(converted["pretrain"], attn_implementation=attn).eval()
    assert model.config.teacher_name_or_path == "./teacher"  # converted into the student's folder
    mask = inputs["bool_masked_pos"]
    out = model(inputs["pixel_values"], bool_masked_pos=mask)
    assert max_abs_diff(out.last_hidden_state, expected["student_last_hidden_state"]) <= TOL
    assert max_abs_diff(out.predictions, expected["student_logits_all_tokens"]) <= TOL
    assert max_abs_diff(out.predictions[mask], expected["student_logits_masked"]) <= TOL
    assert max_abs_diff(out.targets, expected["teacher_target"]) <= TOL
    assert max_abs_diff(out.loss, expected["loss"]) <= TOL
    # the teacher gets its own (CLIP) normalisation, derived from the student's ImageNet pixel_values
    raw = model.teacher_features(inputs["pixel_values"])
    assert max_abs_diff(raw, expected["teacher_last_hidden_state"][:, 1:]) <= TOL


def test_alternative_teacher_layers_match_official(fixture, converted):
    inputs, expected = fixture["inputs"], fixture["outputs"]
    model = MaskDistillForMaskedImageModeling.from_pretrained(converted["pretrain"], teacher_layer="post_layernorm").eval()
    out = model(inputs["pixel_values"], bool_masked_pos=inputs["bool_masked_pos"])
    assert max_abs_diff(out.targets, expected["alt_teacher_target_from_post_layernorm"]) <= TOL
    assert max_abs_diff(out.loss, expected["alt_loss_post_layernorm_target"]) <= TOL
    assert max_abs_diff(model.teacher_features(inputs["pixel_values"]), expected["teacher_post_layernorm_patch_tokens"]) <= TOL
    teacher = model.teacher  # CLIPVisionModelWithProjection, as saved by the converter
    projected = FrozenTeacher(teacher, CLIP_MEAN, CLIP_STD, "projected").tokens(inputs["images"], 64)
    assert max_abs_diff(projected, expected["teacher_projected_tokens"][:, 1:]) <= TOL
    embedding = teacher(pixel_values=inputs["teacher_pixel_values"]).image_embeds
    assert max_abs_diff(embedding, expected["teacher_image_embedding"]) <= TOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_classifier_outputs_match_official(fixture, converted, attn):
    inputs, expected = fixture["inputs"], fixture["outputs"]
    model = MaskDistillForImageClassification.from_pretrained(converted["finetune"], attn_implementation=attn).eval()
    assert model.config.num_labels == 5
    assert max_abs_diff(model(inputs["pixel_values"]).logits, expected["classifier_logits"]) <= TOL
    assert max_abs_diff(model.maskdistill(inputs["pixel_values"]).pooler_output, expected["classifier_pooled_output"]) <= TOL


def test_classifier_from_pretraining_checkpoint_copies_the_shared_table_into_every_layer(converted):
    pretrained = MaskDistillForMaskedImageModeling.from_pretrained(converted["pretrain"])
    shared = pretrained.maskdistill.encoder.rel_pos_bias.relative_position_bias_table
    classifier = AutoModelForImageClassification.from_pretrained(converted["pretrain"], num_labels=3)
    for layer in classifier.maskdistill.encoder.layers:
        assert torch.equal(layer.rel_pos_bias.relative_position_bias_table, shared)
        assert layer.rel_pos_bias.relative_position_bias_table.requires_grad
    assert not classifier.maskdistill.encoder.rel_pos_bias.relative_position_bias_table.requires_grad
    qkv = pretrained.maskdistill.encoder.layers[0].attn.qkv
    assert torch.equal(classifier.maskdistill.encoder.layers[0].attn.qkv.weight, qkv.weight)


# ---- a tiny CLIP teacher saved by the test and loaded offline ------------------------------------


def tiny_clip(tmp_path, patch_size=8, image_size=32, name="clip"):
    torch.manual_seed(1)
    config = CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, projection_dim=8, hidden_act="quick_gelu",
    )
    return save_teacher_folder(CLIPVisionModel(config).eval(), tmp_path / name)


@pytest.fixture
def tiny_pair(tmp_path):
    folder = tiny_clip(tmp_path)
    config = MaskDistillConfig.for_teacher(folder, preset="tiny")
    assert config.teacher_hidden_size == 24
    torch.manual_seed(0)
    return MaskDistillForMaskedImageModeling(config), folder


def test_tiny_clip_teacher_gets_its_own_normalisation_and_no_gradients(tiny_pair):
    model, folder = tiny_pair
    model.train()
    pixel_values = torch.randn(2, 3, 32, 32)
    out = model(pixel_values)
    assert out.bool_masked_pos.sum(1).tolist() == [model.config.num_masking_patches] * 2
    out.loss.backward()
    teacher = model.teacher
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}
    assert all(p.grad is not None for n, p in model.named_parameters() if "ls" in n or "lm_head" in n)
    # teacher input = (student image back in [0, 1] - CLIP mean) / CLIP std, read from the teacher folder
    reference = CLIPVisionModel.from_pretrained(folder).eval()
    images = pixel_values * torch.tensor(model.config.image_std).view(1, 3, 1, 1) + torch.tensor(
        model.config.image_mean
    ).view(1, 3, 1, 1)
    clip_input = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference(pixel_values=clip_input).last_hidden_state[:, 1:]
    assert max_abs_diff(model.teacher_features(pixel_values), expected) <= 1e-6
    target = F.layer_norm(expected, (24,), eps=1e-6)
    assert max_abs_diff(out.targets, target) <= 1e-5
    hand = F.smooth_l1_loss(out.predictions[out.bool_masked_pos], target[out.bool_masked_pos], beta=1.0)
    assert max_abs_diff(out.loss, hand) <= 1e-6


def test_teacher_is_not_saved_and_reloads_lazily(tiny_pair, tmp_path):
    model, folder = tiny_pair
    model.eval()
    pixel_values, mask = torch.randn(2, 3, 32, 32), torch.arange(16).repeat(2, 1) % 3 == 0
    before = model(pixel_values, bool_masked_pos=mask)
    assert model.teacher is not None
    assert not any("teacher" in key or "vision_model" in key for key in model.state_dict())
    save_hub_folder(model, tmp_path / "saved")
    files = sorted(path.name for path in (tmp_path / "saved").iterdir())
    assert files == sorted(["config.json", "hf_mim_code.json", "model.safetensors", "preprocessor_config.json", "configuration_common.py",
                            "configuration_maskdistill.py", "masking.py", "masking_blockwise.py", "modeling_base.py",
                            "training_events.py", "vit_blocks.py", "relative_position.py", "beit_init.py",
                            "modeling_maskdistill.py",
                            "objectives.py", "backbone_common.py", "teachers.py"])
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert set(saved) == set(model.state_dict())
    assert sum(v.numel() for v in saved.values()) == sum(p.numel() for p in model.parameters())
    loaded = AutoModelForMaskedImageModeling.from_pretrained(tmp_path / "saved").eval()
    assert loaded._frozen_teacher is None  # not loaded until needed
    after = loaded(pixel_values, bool_masked_pos=mask)
    assert torch.equal(before.predictions, after.predictions) and torch.equal(before.loss, after.loss)
    # the backbone of a pretraining checkpoint: the pretrained encoder, its final norm kept (nothing fresh)
    backbone = AutoModel.from_pretrained(tmp_path / "saved").eval()
    trunk = model(pixel_values, bool_masked_pos=torch.zeros_like(mask), output_hidden_states=True).hidden_states[-1]
    assert torch.equal(backbone(pixel_values).last_hidden_state, model.maskdistill.encoder.layernorm(trunk))


def test_missing_teacher_folder_is_a_clear_error(tmp_path):
    model = MaskDistillForMaskedImageModeling(
        MaskDistillConfig.from_preset("tiny", teacher_name_or_path=str(tmp_path / "nowhere"))
    ).eval()
    with pytest.raises(OSError, match="teacher_name_or_path"):
        model(torch.randn(1, 3, 32, 32))
    assert model(torch.randn(1, 3, 32, 32), return_loss=False).loss is None


def test_teacher_grid_mismatch_and_width_mismatch_are_clear_errors(tmp_path):
    folder = tiny_clip(tmp_path, patch_size=4)  # 8x8 grid, the tiny student has 4x4
    model = MaskDistillForMaskedImageModeling(MaskDistillConfig.from_preset("tiny", teacher_name_or_path=str(folder),
                                                                              teacher_hidden_size=24))
    with pytest.raises(ValueError, match="patch grid"):
        model(torch.randn(1, 3, 32, 32))
    folder = tiny_clip(tmp_path, name="clip8")
    model = MaskDistillForMaskedImageModeling(MaskDistillConfig.from_preset("tiny", teacher_name_or_path=str(folder)))
    with pytest.raises(ValueError, match="teacher_hidden_size"):
        model(torch.randn(1, 3, 32, 32))


def test_without_a_teacher_eval_gives_predictions_and_training_explains():
    model = MaskDistillForMaskedImageModeling(MaskDistillConfig.from_preset("tiny")).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.loss is None and out.predictions.shape == (2, 16, 16)
    with pytest.raises(ValueError, match="needs a teacher"):
        model(torch.randn(2, 3, 32, 32), return_loss=True)
    with pytest.raises(ValueError, match="needs a teacher"):
        model.train()(torch.randn(2, 3, 32, 32))


def test_pixel_target_is_one_field_change():
    torch.manual_seed(0)
    model = MaskDistillForMaskedImageModeling(MaskDistillConfig.from_preset("tiny", target="pixels")).train()
    pixel_values = torch.randn(2, 3, 32, 32)
    out = model(pixel_values)
    patches = pixel_values.reshape(2, 3, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 192)
    target = F.layer_norm(patches, (192,), eps=1e-6)
    assert max_abs_diff(out.targets, target) <= 1e-5
    hand = F.smooth_l1_loss(out.predictions[out.bool_masked_pos], target[out.bool_masked_pos])
    assert max_abs_diff(out.loss, hand) <= 1e-6
    assert out.reconstruction.shape == pixel_values.shape
    out.loss.backward()


def test_config_validation_names_the_field():
    for field, value in [("target", "hog"), ("teacher_layer", "middle"), ("loss", "ce"), ("mask_ratio", 1.0),
                         ("target_normalization", "batch"), ("image_size", 30)]:
        with pytest.raises(ValueError, match=field):
            MaskDistillConfig.from_preset("tiny", **{field: value})
    with pytest.raises(ValueError, match="preset"):
        MaskDistillConfig.from_preset("huge")
    for field, value in [("image_std", 0.5), ("image_mean", "abc"), ("teacher_image_std", [0.2, "a", 0.1])]:
        with pytest.raises(ValueError, match=f"{field}=.*a list of 3 numbers"):  # not a bare TypeError
            MaskDistillConfig.from_preset("tiny", **{field: value})
    assert MaskDistillConfig.from_preset("tiny", image_std=(0.5, 0.5, 0.5)).image_std == [0.5, 0.5, 0.5]
    base = MaskDistillConfig.from_preset("base")
    assert (base.layer_scale_init_value, base.mask_ratio, base.loss, base.target_normalization) == (0.1, 0.4, "smooth_l1", "layer_norm")
    assert base.num_masking_patches == 78


@pytest.mark.parametrize("head", [MaskDistillModel, MaskDistillForMaskedImageModeling, MaskDistillForImageClassification])
def test_save_load_round_trip_is_exact(head, tmp_path):
    torch.manual_seed(0)
    model = head(MaskDistillConfig.from_preset("tiny", num_labels=3)).eval()
    with torch.no_grad():  # non-trivial relative position tables
        for module in model.modules():
            if hasattr(module, "relative_position_bias_table"):
                module.relative_position_bias_table.normal_()
    pixel_values = torch.randn(2, 3, 32, 32)
    kwargs = {"bool_masked_pos": torch.arange(16).repeat(2, 1) % 2 == 0} if head is MaskDistillForMaskedImageModeling else {}
    before = model(pixel_values, **kwargs)
    model.save_pretrained(tmp_path)
    after = head.from_pretrained(tmp_path).eval()(pixel_values, **kwargs)
    assert torch.equal(before[0], after[0])


def test_model_card_renders_for_every_head(tmp_path):
    from hf_mim.hub.card import render_model_card

    pretraining = render_model_card(
        MaskDistillForMaskedImageModeling(MaskDistillConfig.from_preset("tiny", teacher_name_or_path="my/clip")),
        "me/maskdistill-demo", run={"optimizer steps": 10}, is_demo=True,
    ).content
    assert "**MaskDistill**" in pretraining and "frozen teacher `my/clip`" in pretraining
    assert "| optimizer steps | 10 |" in pretraining and "demo run" in pretraining
    assert "BEiT block-wise, ratio 0.4" in pretraining and "`smooth_l1` (beta 1.0)" in pretraining
    pixels = render_model_card(MaskDistillForMaskedImageModeling(MaskDistillConfig.from_preset("tiny", target="pixels")),
                               "me/md-pixels").content
    assert "per-patch normalised pixels" in pixels and "No training run is recorded" in pixels
    classifier = render_model_card(MaskDistillForImageClassification(MaskDistillConfig.from_preset("tiny", num_labels=2)),
                                   "me/md-cls").content
    assert "pipeline_tag: image-classification" in classifier


def test_run_mim_pretrains_with_a_local_teacher(tmp_path):
    """`--teacher_name_or_path` names the frozen teacher; it is not part of the student's folder."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    teacher = tiny_clip(tmp_path)
    script = Path(__file__).resolve().parents[1] / "training_scripts" / "run_mim.py"
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(script), "--model_type", "maskdistill", "--model_size", "tiny",
         "--teacher_name_or_path", str(teacher), "--config_overrides", f"teacher_hidden_size={CLIPVisionConfig.from_pretrained(teacher).hidden_size}",
         "--max_train_steps", "2", "--per_device_train_batch_size", "4", "--downstream_eval", "none", "--output_dir", str(out)],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    config = json.loads((out / "config.json").read_text())
    assert config["teacher_name_or_path"] == str(teacher)
    from safetensors.torch import load_file

    assert not any(key.startswith("teacher") for key in load_file(out / "model.safetensors"))


# ---- a tiny timm ViT teacher (transformers' TimmWrapperModel) saved by the test and loaded offline ---------

TIMM_MEAN, TIMM_STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]  # neither ImageNet's nor CLIP's: must come from the folder


def tiny_timm(tmp_path, patch_size=8, image_size=32, name="timm", **model_args):
    """A random timm ViT (cls + 2 register tokens) built with pretrained=False, saved as a transformers folder
    whose config.json carries timm's pretrained_cfg (mean/std), as timm Hub folders do."""
    from transformers import TimmWrapperConfig, TimmWrapperModel

    torch.manual_seed(2)
    config = TimmWrapperConfig(
        architecture="vit_tiny_patch16_224",
        model_args={"img_size": image_size, "patch_size": patch_size, "embed_dim": 24, "depth": 2, "num_heads": 2,
                    "reg_tokens": 2, **model_args},
        pretrained_cfg={"input_size": [3, image_size, image_size], "mean": TIMM_MEAN, "std": TIMM_STD},
    )
    folder = tmp_path / name
    TimmWrapperModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails: the timm teacher must load from its folder alone."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def timm_pair(tmp_path, no_network):
    folder = tiny_timm(tmp_path)
    config = MaskDistillConfig.for_teacher(folder, preset="tiny")
    assert config.teacher_hidden_size == 24  # read from the timm network (built on the meta device)
    torch.manual_seed(0)
    return MaskDistillForMaskedImageModeling(config), folder


def test_tiny_timm_teacher_loads_offline_and_gets_no_gradients(timm_pair):
    from transformers import TimmWrapperModel

    model, folder = timm_pair
    assert isinstance(AutoModel.from_pretrained(folder), TimmWrapperModel)
    assert not (folder / "preprocessor_config.json").exists()  # normalisation comes from config.json's pretrained_cfg
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    out.loss.backward()
    teacher = model.teacher
    assert isinstance(teacher, TimmWrapperModel) and not teacher.training
    assert teacher.timm_model.num_prefix_tokens == 3 and out.targets.shape == (2, 16, 24)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}
    assert all(p.grad is not None for n, p in model.named_parameters() if "ls" in n or "lm_head" in n)
    assert torch.equal(model._frozen_teacher.image_mean.flatten(), torch.tensor(TIMM_MEAN))


@pytest.mark.parametrize("layer", ["last_hidden_state", "post_layernorm"])
def test_timm_teacher_targets_match_a_hand_computation(tmp_path, layer):
    folder = tiny_timm(tmp_path)
    model = MaskDistillForMaskedImageModeling(MaskDistillConfig.for_teacher(folder, preset="tiny", teacher_layer=layer))
    model.eval()
    pixel_values, mask = torch.randn(2, 3, 32, 32), torch.arange(16).repeat(2, 1) % 3 == 0
    out = model(pixel_values, bool_masked_pos=mask)
    # by hand: student ImageNet pixel_values -> image in [0, 1] -> the timm teacher's own mean/std
    timm_model = AutoModel.from_pretrained(folder).eval().timm_model
    images = pixel_values * torch.tensor(model.config.image_std).view(1, 3, 1, 1) + torch.tensor(
        model.config.image_mean
    ).view(1, 3, 1, 1)
    teacher_input = (images - torch.tensor(TIMM_MEAN).view(1, 3, 1, 1)) / torch.tensor(TIMM_STD).view(1, 3, 1, 1)
    before_norm = []
    hook = timm_model.norm.register_forward_hook(lambda module, inputs, output: before_norm.append(inputs[0]))
    with torch.no_grad():
        after_norm = timm_model.forward_features(teacher_input)
        on_student_input = timm_model.forward_features(pixel_values)
    hook.remove()
    tokens = {"last_hidden_state": before_norm[0], "post_layernorm": after_norm}[layer][:, 3:]  # cls + 2 registers
    assert max_abs_diff(model.teacher_features(pixel_values), tokens) <= 1e-6
    assert max_abs_diff(on_student_input[:, 3:], after_norm[:, 3:]) > 1e-2  # the normalisation matters
    target = F.layer_norm(tokens, (24,), eps=1e-6)
    assert max_abs_diff(out.targets, target) <= 1e-5
    hand = F.smooth_l1_loss(out.predictions[mask], target[mask], beta=1.0)
    assert max_abs_diff(out.loss, hand) <= 1e-6
    # a bare timm model given with set_teacher is used the same way
    bare = MaskDistillForMaskedImageModeling(model.config).eval()
    bare.set_teacher(timm_model, image_mean=TIMM_MEAN, image_std=TIMM_STD)
    assert max_abs_diff(bare.teacher_features(pixel_values), tokens) <= 1e-6


def test_timm_teacher_mismatches_are_clear_errors(tmp_path):
    from transformers import TimmWrapperConfig, TimmWrapperModel

    folder = tiny_timm(tmp_path, patch_size=4, name="timm_p4")  # 8x8 grid, the tiny student has 4x4
    model = MaskDistillForMaskedImageModeling(MaskDistillConfig.for_teacher(folder, preset="tiny"))
    with pytest.raises(ValueError, match=r"patch grid \(32x32 / 4x4 = 8x8\) does not match the student's \(4x4\)"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="teacher_layer"):  # timm models have no projection
        MaskDistillConfig.for_teacher(tiny_timm(tmp_path), preset="tiny", teacher_layer="projected")
    projected = MaskDistillForMaskedImageModeling(
        MaskDistillConfig.from_preset("tiny", teacher_layer="projected", teacher_hidden_size=24)
    )
    with pytest.raises(ValueError, match="teacher_layer='projected' cannot be honoured by a timm teacher"):
        projected.set_teacher(AutoModel.from_pretrained(tmp_path / "timm"))
    pooled = TimmWrapperModel(TimmWrapperConfig(  # mean pooling + fc_norm: no final norm on the tokens
        architecture="vit_tiny_patch16_224",
        model_args={"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2, "global_pool": "avg"},
    ))
    post = MaskDistillForMaskedImageModeling(
        MaskDistillConfig.from_preset("tiny", teacher_layer="post_layernorm", teacher_hidden_size=24)
    )
    with pytest.raises(ValueError, match="teacher_layer='post_layernorm' cannot be honoured"):
        post.set_teacher(pooled, TIMM_MEAN, TIMM_STD)


def test_timm_teacher_is_not_saved_with_the_student(timm_pair, tmp_path):
    model, folder = timm_pair
    model.eval()
    pixel_values, mask = torch.randn(2, 3, 32, 32), torch.arange(16).repeat(2, 1) % 2 == 0
    before = model(pixel_values, bool_masked_pos=mask)
    assert model.teacher is not None
    assert not any("teacher" in key or "timm_model" in key for key in model.state_dict())
    model.save_pretrained(tmp_path / "student")
    saved = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert set(saved) == set(model.state_dict())
    loaded = MaskDistillForMaskedImageModeling.from_pretrained(tmp_path / "student").eval()
    assert loaded.config.teacher_name_or_path == str(folder) and loaded._frozen_teacher is None
    after = loaded(pixel_values, bool_masked_pos=mask)
    assert torch.equal(before.targets, after.targets) and torch.equal(before.loss, after.loss)
