"""dBOT: official numerics, conversion, heads, save/load, stages and user mistakes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import load_fixture, max_abs_diff
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
)

from hf_mim import DbotConfig, DbotForImageClassification, DbotForMaskedImageModeling, DbotModel
from hf_mim.convert import CheckpointFormatError, load_official_state_dict
from hf_mim.hub import save_hub_folder

TOL = 1e-5
FIXTURE_HEADS = "num_attention_heads=2,decoder_num_attention_heads=2"


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    return load_fixture(fixtures_dir, "dbot")


@pytest.fixture(scope="module")
def converted(fixture, tmp_path_factory):
    """The official state dicts written as official .pth files and converted with the command line."""
    tmp = tmp_path_factory.mktemp("dbot_convert")
    torch.save({"model": fixture["official_state_dict"], "epoch": 799}, tmp / "checkpoint-799.pth")
    torch.save({"model": fixture["official_teacher_state_dict"]}, tmp / "checkpoint-teacher-799.pth")
    torch.save({"model": fixture["official_classifier_state_dict"]}, tmp / "finetune.pth")
    folders = {}
    for name, args in {
        "pretrain": ["--checkpoint", tmp / "checkpoint-799.pth", "--teacher_checkpoint", tmp / "checkpoint-teacher-799.pth"],
        "finetune": ["--checkpoint", tmp / "finetune.pth"],
    }.items():
        out = tmp / name
        result = subprocess.run(
            [sys.executable, "-m", "hf_mim.convert", "dbot", *map(str, args), "--output", str(out),
             "--config_overrides", FIXTURE_HEADS],
            capture_output=True, text=True,
        )
        assert result.returncode == 0, result.stderr
        folders[name] = out
    return folders


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_pretraining_outputs_match_official(fixture, converted, attn):
    inputs, expected = fixture["inputs"], fixture["outputs"]
    model = DbotForMaskedImageModeling.from_pretrained(converted["pretrain"], attn_implementation=attn).eval()
    out = model(inputs["pixel_values"], noise=inputs["noise"])
    assert max_abs_diff(out.encoder_last_hidden_state, expected["encoder_last_hidden_state"]) <= TOL
    assert max_abs_diff(out.predictions, expected["decoder_pred"]) <= TOL
    assert max_abs_diff(out.targets, expected["teacher_target"]) <= TOL
    assert max_abs_diff(out.loss, expected["loss"]) <= TOL
    mask_with_cls = torch.cat([torch.ones(2, 1), out.bool_masked_pos.float()], dim=1)
    assert torch.equal(mask_with_cls, expected["mask_with_cls"])
    teacher = model.teacher_features(inputs["pixel_values"])
    assert max_abs_diff(teacher, expected["teacher_last_hidden_state"]) <= TOL


def test_bool_masked_pos_gives_the_same_predictions_and_loss(fixture, converted):
    inputs, expected = fixture["inputs"], fixture["outputs"]
    model = DbotForMaskedImageModeling.from_pretrained(converted["pretrain"]).eval()
    out = model(inputs["pixel_values"], bool_masked_pos=inputs["bool_masked_pos"])
    assert torch.equal(out.bool_masked_pos, inputs["bool_masked_pos"])
    assert max_abs_diff(out.predictions, expected["decoder_pred"]) <= TOL
    assert max_abs_diff(out.loss, expected["loss"]) <= TOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_classifier_outputs_match_official(fixture, converted, attn):
    inputs, expected = fixture["inputs"], fixture["outputs"]
    model = DbotForImageClassification.from_pretrained(converted["finetune"], attn_implementation=attn).eval()
    assert model.config.num_labels == 5
    out = model(inputs["pixel_values"])
    assert max_abs_diff(out.logits, expected["classifier_logits"]) <= TOL
    pooled = model.dbot(inputs["pixel_values"]).pooler_output
    assert max_abs_diff(pooled, expected["classifier_pooled_output"]) <= TOL


def test_loss_is_smooth_l1_beta2_on_masked_and_cls_against_unbiased_normalised_teacher(fixture, converted):
    """Recompute the loss by hand from the model's own predictions and teacher features."""
    inputs = fixture["inputs"]
    model = DbotForMaskedImageModeling.from_pretrained(converted["pretrain"]).eval()
    out = model(inputs["pixel_values"], noise=inputs["noise"])
    teacher = model.teacher_features(inputs["pixel_values"])
    target = (teacher - teacher.mean(-1, keepdim=True)) / torch.sqrt(teacher.var(-1, keepdim=True) + 1e-6)
    diff = (out.predictions - target).abs()
    per_elem = torch.where(diff < 2.0, 0.25 * diff**2, diff - 1.0)
    weights = torch.cat([torch.ones(2, 1), inputs["mask"]], dim=1)
    loss = (per_elem.mean(-1) * weights).sum() / weights.sum()
    assert max_abs_diff(out.loss, loss) <= 1e-6


def test_conversion_rejects_a_non_dbot_checkpoint(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"conv.weight": torch.zeros(3, 3)}}, path)
    with pytest.raises(CheckpointFormatError, match="cls_token"):
        from hf_mim.convert import convert_dbot_checkpoint

        convert_dbot_checkpoint(load_official_state_dict(path))


def tiny(**overrides) -> DbotConfig:
    return DbotConfig.from_preset("tiny", **overrides)


def test_auto_classes_and_processor_are_registered(tmp_path):
    config = AutoConfig.for_model("dbot", **DbotConfig.presets["tiny"])
    assert isinstance(config, DbotConfig)
    assert type(AutoModel.from_config(config)) is DbotModel
    assert type(AutoModelForMaskedImageModeling.from_config(config)) is DbotForMaskedImageModeling
    assert type(AutoModelForImageClassification.from_config(config)) is DbotForImageClassification
    save_hub_folder(DbotModel(config), tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    # evaluation preprocessing: short side to int(32 / 0.875) = 36, centre crop 32
    assert (processor.size.shortest_edge, processor.crop_size.height, processor.crop_size.width) == (36, 32, 32)


@pytest.mark.parametrize("head", [DbotModel, DbotForMaskedImageModeling, DbotForImageClassification])
def test_save_load_round_trip_is_exact(head, tmp_path):
    torch.manual_seed(0)
    model = head(tiny(num_labels=3)).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    kwargs = {"noise": torch.rand(2, 16)} if head is DbotForMaskedImageModeling else {}
    before = model(pixel_values, **kwargs)
    model.save_pretrained(tmp_path)
    loaded = head.from_pretrained(tmp_path).eval()
    after = loaded(pixel_values, **kwargs)
    for name in ("last_hidden_state", "pooler_output", "loss", "predictions", "logits"):
        if getattr(before, name, None) is not None:
            assert torch.equal(getattr(before, name), getattr(after, name)), name
    if head is DbotForMaskedImageModeling:  # the non-persistent sin-cos buffer was refilled after meta loading
        assert torch.equal(loaded.decoder.position_embeddings, loaded.decoder.sincos_table())


def test_pretraining_checkpoint_loads_into_the_classifier_and_back(tmp_path):
    torch.manual_seed(0)
    pretrain = DbotForMaskedImageModeling(tiny())
    pretrain.save_pretrained(tmp_path / "pre")
    classifier, info = DbotForImageClassification.from_pretrained(
        tmp_path / "pre", num_labels=4, output_loading_info=True
    )
    student = pretrain.dbot.encoder.state_dict()
    for name, tensor in classifier.dbot.encoder.state_dict().items():
        assert torch.equal(tensor, student[name]), name
    assert sorted(info["missing_keys"]) == sorted(
        ["classifier.weight", "classifier.bias", "dbot.pooler.fc_norm.weight", "dbot.pooler.fc_norm.bias"]
    )
    assert info["unexpected_keys"] == [] or all(
        k.startswith(("decoder.", "teacher.", "dbot.encoder.layernorm.")) for k in info["unexpected_keys"]
    )
    # fc_norm starts at the identity affine, the head at the paper's small init: nothing large and random.
    assert torch.equal(classifier.dbot.pooler.fc_norm.weight, torch.ones(32))
    assert classifier.classifier.weight.abs().max() < 0.05

    classifier.save_pretrained(tmp_path / "cls")
    back, info = DbotForMaskedImageModeling.from_pretrained(tmp_path / "cls", output_loading_info=True)
    for name, tensor in back.dbot.encoder.state_dict().items():
        if not name.startswith("layernorm"):
            assert torch.equal(tensor, classifier.dbot.encoder.state_dict()[name]), name
    assert any(k.startswith("decoder.") for k in info["missing_keys"])
    # The missing teacher is the stage-0 teacher: a copy of the (loaded) student.
    for name, tensor in back.teacher.state_dict().items():
        assert torch.equal(tensor, back.dbot.encoder.state_dict()[name]), name


def test_wrong_image_size_is_a_clear_error_or_interpolated():
    model = DbotForMaskedImageModeling(tiny()).eval()
    with pytest.raises(ValueError, match="image_size=32.*interpolate_pos_encoding"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model(torch.randn(1, 3, 36, 36), interpolate_pos_encoding=True)
    out = model(torch.randn(1, 3, 48, 64), interpolate_pos_encoding=True)
    assert out.predictions.shape == (1, 1 + 6 * 8, 32)
    backbone = DbotModel(tiny()).eval()
    assert backbone(torch.randn(2, 3, 48, 48), interpolate_pos_encoding=True).last_hidden_state.shape == (2, 37, 32)


def test_stage_zero_teacher_is_the_student_initialisation():
    torch.manual_seed(0)
    model = DbotForMaskedImageModeling(tiny())
    for name, tensor in model.teacher.state_dict().items():
        assert torch.equal(tensor, model.dbot.encoder.state_dict()[name]), name
    assert not any(p.requires_grad for p in model.teacher.parameters())
    # Large/Huge recipe: a teacher with no blocks (patch embedding + positions only).
    shallow = DbotForMaskedImageModeling(tiny(teacher_depth=0))
    assert len(shallow.teacher.layers) == 0
    assert torch.equal(
        shallow.teacher.embeddings.patch_embeddings.projection.weight,
        shallow.dbot.encoder.embeddings.patch_embeddings.projection.weight,
    )


@pytest.mark.parametrize("teacher_depth", [2, 0])
def test_start_new_stage_bootstraps_teacher_and_reinitialises_student(teacher_depth, tmp_path):
    torch.manual_seed(0)
    model = DbotForMaskedImageModeling(tiny(teacher_depth=teacher_depth))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # train a little so the student is not its initialisation
        model(torch.randn(2, 3, 32, 32)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    student_before = {k: v.clone() for k, v in model.dbot.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    params_before = [id(p) for p in model.dbot.parameters()]
    model.start_new_stage()
    assert model.config.stage == 1 and model.config.teacher_depth == 2
    for name, tensor in model.teacher.state_dict().items():
        assert torch.equal(tensor, student_before[name]), name
    for name, tensor in model.dbot.encoder.state_dict().items():
        if name.endswith(("weight",)) and tensor.ndim == 2:
            assert not torch.equal(tensor, student_before[name]), f"{name} was not re-initialised"
    assert not torch.equal(model.decoder.decoder_pred.weight, decoder_before["decoder_pred.weight"])
    assert torch.equal(model.decoder.position_embeddings, model.decoder.sincos_table())
    assert [id(p) for p in model.dbot.parameters()] == params_before  # optimizer keeps its tensors
    assert not any(p.requires_grad for p in model.teacher.parameters())
    # The bootstrapped model saves and reloads as stage 1 with a full-depth teacher.
    model.save_pretrained(tmp_path)
    reloaded = DbotForMaskedImageModeling.from_pretrained(tmp_path)
    assert reloaded.config.stage == 1
    for name, tensor in reloaded.teacher.state_dict().items():
        assert torch.equal(tensor, student_before[name]), name


def test_base_parameter_count_matches_the_official_student():
    """Official ViT-B student incl. decoder: 111.9 M parameters (with its two stored sin-cos tables)."""
    with torch.device("meta"):
        model = DbotForMaskedImageModeling(DbotConfig())
    student = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("teacher."))
    decoder_table = model.decoder.position_embeddings.numel()
    assert round((student + decoder_table) / 1e6, 1) == 111.9


def test_importing_hf_mim_registers_the_native_vit_processor():
    from transformers import ViTImageProcessor
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    backends = IMAGE_PROCESSOR_MAPPING[DbotConfig]
    assert backends["torchvision"] is ViTImageProcessor
    assert backends["pil"].__name__ == "ViTImageProcessorPil"
