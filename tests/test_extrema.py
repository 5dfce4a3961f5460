"""ExtreMA: official numerics, conversion, masks, momentum encoder, heads, save/load and config checks."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import load_fixture, max_abs_diff
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForMaskedImageModeling

from hf_mim import ExtremaConfig, ExtremaForImageClassification, ExtremaForMaskedImageModeling, ExtremaModel
from hf_mim.convert import CheckpointFormatError
from hf_mim.masking_disjoint import DisjointMaskGenerator, multi_mask_indices_from_bool_masked_pos, multi_masking
from hf_mim.modeling_extrema import momentum_at

TOL = 1e-5
FIXTURE_HEADS = "num_attention_heads=2"


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    return load_fixture(fixtures_dir, "extrema")


@pytest.fixture(scope="module")
def converted(fixture, tmp_path_factory):
    """The official state dicts written as the official files and converted with the command line."""
    tmp = tmp_path_factory.mktemp("extrema_convert")
    pretrain_sd = fixture["official_state_dict"]
    assert all(key.startswith("module.") for key in pretrain_sd)  # DDP layout, as the released files
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": pretrain_sd}, tmp / "extrema_mask08x5_1k_300ep.pth")
    torch.save({"model": fixture["official_classifier_state_dict"], "epoch": 99}, tmp / "finetune.pth")
    folders = {}
    for name, path in {"pretrain": "extrema_mask08x5_1k_300ep.pth", "finetune": "finetune.pth"}.items():
        out = tmp / name
        result = subprocess.run(
            [sys.executable, "-m", "hf_mim.convert", "extrema", "--checkpoint", str(tmp / path), "--output", str(out),
             "--config_overrides", FIXTURE_HEADS],
            capture_output=True, text=True,
        )
        assert result.returncode == 0, result.stderr
        folders[name] = out
        folders[name + "_log"] = result.stdout
    return folders


def mask_major_to_batch_major(tensor: torch.Tensor, num_masks: int = 5) -> torch.Tensor:
    """Official student rows are i * B + b (mask i of image b); hf_mim returns (B, K, ...)."""
    return tensor.reshape(num_masks, -1, *tensor.shape[1:]).transpose(0, 1)


def hf_mim_outputs(fixture, converted, attn: str) -> dict[str, torch.Tensor]:
    """Every quantity of outputs.safetensors, computed by hf_mim from the converted folders."""
    inputs = fixture["inputs"]
    model = ExtremaForMaskedImageModeling.from_pretrained(converted["pretrain"], attn_implementation=attn).eval()
    views = dict(pixel_values=inputs["pixel_values"], pixel_values_2=inputs["target_pixel_values"], noise=inputs["noise"])
    ours: dict[str, torch.Tensor] = {}
    out = model(**views, output_hidden_states=True)
    ours["loss_without_ema_update"] = out.loss
    ours["loss_per_mask_without_ema_update"] = out.loss_per_mask
    ours["teacher_projection"] = out.targets
    ours["teacher_last_hidden_state"] = out.target_last_hidden_state
    ours["student_last_hidden_state"] = out.encoder_last_hidden_state
    ours["student_patch_tokens_after_blocks"] = out.hidden_states[-1].unflatten(0, (2, -1))
    ours["student_projection"] = out.projections
    ours["student_prediction"] = out.predictions
    # The official forward updates the momentum encoder (m = ema_momentum) before its teacher pass.
    model.update_momentum_encoder(float(inputs["ema_momentum"]))
    out = model(**views)
    ours["loss"] = out.loss
    ours["loss_per_mask"] = out.loss_per_mask
    ours["teacher_projection_after_ema_update"] = out.targets
    ours["momentum_encoder_after_ema.blocks.0.attn.qkv.weight"] = model.momentum_encoder.layers[0].attn.qkv.weight
    ours["momentum_encoder_after_ema.blocks_token.0.gamma_1"] = model.momentum_encoder.class_attention.layers[0].ls1.gamma
    ours["momentum_encoder_after_ema.head.6.weight"] = model.momentum_projector[6].weight

    classifier = ExtremaForImageClassification.from_pretrained(converted["finetune"], attn_implementation=attn).eval()
    ours["classifier_logits"] = classifier(inputs["pixel_values"]).logits
    ours["classifier_pooled_output"] = classifier.extrema(inputs["pixel_values"]).pooler_output
    return ours


STUDENT_ROWS = {"student_last_hidden_state", "student_patch_tokens_after_blocks", "student_projection", "student_prediction"}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_every_official_output_is_reproduced(fixture, converted, attn):
    expected = fixture["outputs"]
    ours = hf_mim_outputs(fixture, converted, attn)
    assert set(ours) == set(expected)
    diffs = {}
    for name, value in expected.items():
        value = mask_major_to_batch_major(value) if name in STUDENT_ROWS else value
        assert ours[name].shape == value.shape, name
        diffs[name] = max_abs_diff(ours[name], value)
    assert max(diffs.values()) <= TOL, diffs


def test_conversion_report_and_config(converted):
    assert "converted 158 tensors" in converted["pretrain_log"]
    assert "converted 31 tensors" in converted["finetune_log"] and "dropped cls_token" in converted["finetune_log"]
    config = ExtremaConfig.from_pretrained(converted["pretrain"])
    assert (config.image_size, config.patch_size, config.hidden_size, config.num_hidden_layers) == (112, 8, 32, 2)
    assert (config.num_class_attention_layers, config.projector_hidden_size, config.projection_dim) == (2, 64, 16)
    assert (config.mask_ratio, config.num_masks, config.num_visible_patches) == (0.8, 5, 39)
    classifier = ExtremaConfig.from_pretrained(converted["finetune"])
    assert classifier.num_labels == 5 and classifier.pooling == "mean"


def test_noise_reproduces_the_official_disjoint_masks(fixture):
    inputs = fixture["inputs"]
    mask = multi_masking(inputs["noise"], mask_ratio=0.8, num_masks=5)
    assert torch.equal(mask.ids_keep, inputs["mask_indices"].transpose(0, 1))
    assert torch.equal(mask.bool_masked_pos, inputs["bool_masked_pos"].transpose(0, 1))
    assert torch.equal(mask.ids_keep.reshape(2, -1), inputs["ids_shuffle"][:, :195])


def test_bool_masked_pos_gives_the_official_loss(fixture, converted):
    """Given as booleans, the visible tokens enter in raster order: same loss, permuted tokens."""
    inputs, expected = fixture["inputs"], fixture["outputs"]
    model = ExtremaForMaskedImageModeling.from_pretrained(converted["pretrain"]).eval()
    bool_masked_pos = inputs["bool_masked_pos"].transpose(0, 1)
    out = model(inputs["pixel_values"], inputs["target_pixel_values"], bool_masked_pos=bool_masked_pos,
                output_hidden_states=True)
    assert torch.equal(out.bool_masked_pos, bool_masked_pos)
    assert max_abs_diff(out.loss, expected["loss_without_ema_update"]) <= TOL
    assert max_abs_diff(out.predictions, mask_major_to_batch_major(expected["student_prediction"])) <= TOL
    official = mask_major_to_batch_major(expected["student_patch_tokens_after_blocks"])
    order = torch.argsort(inputs["mask_indices"].transpose(0, 1), dim=-1)  # official order -> raster order
    official_raster = torch.gather(official, 2, order.unsqueeze(-1).expand(-1, -1, -1, official.shape[-1]))
    assert max_abs_diff(out.hidden_states[-1].unflatten(0, (2, -1)), official_raster) <= TOL


def test_on_train_step_start_is_the_official_in_forward_update(fixture, converted):
    """Updating before the step's forward (hf_mim's training event) = the official update inside the forward."""
    inputs, expected = fixture["inputs"], fixture["outputs"]
    model = ExtremaForMaskedImageModeling.from_pretrained(
        converted["pretrain"], ema_momentum=float(inputs["ema_momentum"]), ema_momentum_schedule="constant"
    ).eval()
    assert model.on_train_step_start(progress=0.3) == pytest.approx(0.99)
    out = model(inputs["pixel_values"], inputs["target_pixel_values"], noise=inputs["noise"])
    assert max_abs_diff(out.loss, expected["loss"]) <= TOL
    assert max_abs_diff(out.targets, expected["teacher_projection_after_ema_update"]) <= TOL


def test_momentum_backbone_is_the_linear_probe_encoder(fixture, converted, tmp_path):
    """Paper protocol: linear probe on the momentum encoder, final norm removed, class-attention token."""
    inputs, expected = fixture["inputs"], fixture["outputs"]
    model = ExtremaForMaskedImageModeling.from_pretrained(converted["pretrain"]).eval()
    backbone = model.momentum_backbone()
    assert type(backbone) is ExtremaModel and backbone.config.pooling == "class_attention"
    features = backbone(inputs["target_pixel_values"])
    assert max_abs_diff(features.last_hidden_state, expected["teacher_last_hidden_state"]) <= TOL
    encoded = model.momentum_encoder(inputs["target_pixel_values"])
    assert torch.equal(features.pooler_output, encoded.cls_token)  # before the final norm
    assert not torch.allclose(features.pooler_output, features.last_hidden_state[:, 0])
    backbone.save_pretrained(tmp_path / "probe")
    probe, info = ExtremaForImageClassification.from_pretrained(tmp_path / "probe", num_labels=7, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert probe.extrema.encoder.layernorm is None
    pooled = probe.eval().extrema(inputs["target_pixel_values"]).pooler_output
    assert torch.equal(pooled, features.pooler_output)


def test_classifier_conversion_rejects_other_layouts(fixture, tmp_path):
    from hf_mim.convert.extrema import convert_extrema_checkpoint

    with pytest.raises(CheckpointFormatError, match="not an ExtreMA checkpoint"):
        convert_extrema_checkpoint({"conv.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointFormatError, match="num_attention_heads"):
        convert_extrema_checkpoint(fixture["official_state_dict"])  # width 32 is no official size
    state = dict(fixture["official_state_dict"], **{"module.base_encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointFormatError, match="no mapping"):
        convert_extrema_checkpoint(state, {"num_attention_heads": 2})


# ------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize(("ratio", "count", "visible"), [(0.8, 5, 39), (0.9, 8, 19)])
def test_disjoint_masks_have_exact_counts_and_do_not_overlap(ratio, count, visible):
    generator = DisjointMaskGenerator(14, ratio, count)
    masks = generator(torch.Generator().manual_seed(3))
    assert masks.shape == (count, 196) and masks.dtype == torch.bool
    assert ((~masks).sum(dim=1) == visible).all()
    assert (~masks).sum(dim=0).max() == 1  # no patch visible in two masks
    assert (~masks).sum() == count * visible
    again = generator(torch.Generator().manual_seed(3))
    assert torch.equal(masks, again)
    assert not torch.equal(masks, generator(torch.Generator().manual_seed(4)))


def test_independent_masks_and_mask_validation():
    masks = DisjointMaskGenerator(4, 0.5, 3, disjoint=False)(torch.Generator().manual_seed(0))
    assert masks.shape == (3, 16) and ((~masks).sum(dim=1) == 8).all()
    assert (~masks).sum(dim=0).max() > 1  # 3 x 8 > 16: independent masks must overlap
    with pytest.raises(ValueError, match="disjoint masks"):
        DisjointMaskGenerator(4, 0.5, 3)
    with pytest.raises(ValueError, match="same number of visible"):
        multi_mask_indices_from_bool_masked_pos(torch.tensor([[[True, False, False], [True, True, False]]]))
    model = ExtremaForMaskedImageModeling(tiny()).eval()
    with pytest.raises(ValueError, match="bool_masked_pos must have shape"):
        model(torch.randn(2, 3, 32, 32), bool_masked_pos=torch.zeros(2, 5, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="noise must have shape"):
        model(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 15))


def test_masks_are_drawn_from_the_config_when_absent():
    torch.manual_seed(0)
    model = ExtremaForMaskedImageModeling(tiny()).eval()
    out = model(torch.randn(3, 3, 32, 32))
    assert out.bool_masked_pos.shape == (3, 5, 16)
    assert ((~out.bool_masked_pos).sum(-1) == 3).all() and ((~out.bool_masked_pos).sum(1) <= 1).all()
    assert out.predictions.shape == (3, 5, 16) and out.encoder_last_hidden_state.shape == (3, 5, 4, 32)
    assert out.loss_per_mask.shape == (5,)


# ------------------------------------------------------------------------------------------ momentum encoder


def tiny(**overrides) -> ExtremaConfig:
    return ExtremaConfig.from_preset("tiny", **overrides)


def test_momentum_branch_starts_as_a_copy_and_gets_no_gradient():
    torch.manual_seed(0)
    model = ExtremaForMaskedImageModeling(tiny())
    online = dict(model.extrema.encoder.named_parameters()) | {
        f"head.{k}": v for k, v in model.projector.named_parameters()
    }
    momentum = dict(model.momentum_encoder.named_parameters()) | {
        f"head.{k}": v for k, v in model.momentum_projector.named_parameters()
    }
    assert online.keys() == momentum.keys()
    for name in online:
        assert torch.equal(online[name], momentum[name]), name
        assert not momentum[name].requires_grad
    model.train()
    assert not model.momentum_encoder.training and model.extrema.training
    model(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)).loss.backward()
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    assert model.predictor[0].weight.grad is not None and model.extrema.encoder.layers[0].attn.qkv.weight.grad is not None
    assert model.extrema.encoder.embeddings.position_embeddings.grad is None  # fixed sin-cos table


def test_momentum_update_is_the_hand_computed_ema():
    torch.manual_seed(0)
    model = ExtremaForMaskedImageModeling(tiny())
    with torch.no_grad():
        for param in list(model.extrema.parameters()) + list(model.projector.parameters()):
            param.add_(torch.randn_like(param))
    online = {f"e.{k}": v.clone() for k, v in model.extrema.encoder.named_parameters()}
    online |= {f"p.{k}": v.clone() for k, v in model.projector.named_parameters()}
    before = {f"e.{k}": v.clone() for k, v in model.momentum_encoder.named_parameters()}
    before |= {f"p.{k}": v.clone() for k, v in model.momentum_projector.named_parameters()}
    predictor = {k: v.clone() for k, v in model.predictor.state_dict().items()}
    model.update_momentum_encoder(0.9)
    after = {f"e.{k}": v for k, v in model.momentum_encoder.named_parameters()}
    after |= {f"p.{k}": v for k, v in model.momentum_projector.named_parameters()}
    for name in after:
        assert max_abs_diff(after[name], 0.9 * before[name] + 0.1 * online[name]) <= 1e-6, name
    for name, tensor in model.predictor.state_dict().items():
        assert torch.equal(tensor, predictor[name])  # the predictor has no momentum twin
    model.update_momentum_encoder(1.0)  # m = 1: no change
    for name, tensor in after.items():
        assert max_abs_diff(tensor, 0.9 * before[name] + 0.1 * online[name]) <= 1e-6
    model.update_momentum_encoder(0.0)  # m = 0: copy of the online branch
    for name, tensor in after.items():
        assert torch.equal(tensor, online[name]), name
    with pytest.raises(ValueError, match="momentum"):
        model.update_momentum_encoder(1.5)


def test_cosine_momentum_schedule_values():
    assert momentum_at(0.0, 0.996) == pytest.approx(0.996, abs=1e-12)
    assert momentum_at(0.5, 0.996) == pytest.approx(0.998, abs=1e-12)
    assert momentum_at(1.0, 0.996) == pytest.approx(1.0, abs=1e-12)
    assert momentum_at(0.25, 0.996) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi / 4)) * 0.004, abs=1e-12)
    assert momentum_at(0.7, 0.99, "constant") == 0.99
    # official adjust_ema_momentum(epoch + i / iters, args) at fractional epoch 30 of 300
    assert momentum_at(30 / 300, 0.996) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi * 0.1)) * 0.004, abs=1e-12)
    model = ExtremaForMaskedImageModeling(tiny())
    values = [model.on_train_step_start(progress=step / 4) for step in range(1, 5)]
    assert values == sorted(values) and values[-1] == 1.0
    assert values[1] == pytest.approx(0.998)


def test_byol_loss_by_hand():
    torch.manual_seed(0)
    model = ExtremaForMaskedImageModeling(tiny()).eval()
    out = model(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    cos = F.cosine_similarity(out.predictions, out.targets[:, None], dim=-1)  # (B, K)
    per_mask = (2 - 2 * cos).mean(dim=0)
    assert max_abs_diff(out.loss_per_mask, per_mask) <= 1e-6
    assert max_abs_diff(out.loss, per_mask.sum() / 5) <= 1e-6
    # Not symmetrised: the second view only feeds the momentum branch.
    targets, _ = model.momentum_targets(torch.randn(2, 3, 32, 32))
    assert targets.shape == (2, 16)


def test_single_view_uses_the_same_image_for_both_branches():
    torch.manual_seed(0)
    model = ExtremaForMaskedImageModeling(tiny()).eval()
    pixel_values, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    one = model(pixel_values, noise=noise)
    two = model(pixel_values, pixel_values_2=pixel_values.clone(), noise=noise)
    assert torch.equal(one.loss, two.loss)


# ------------------------------------------------------------------------------------------ heads, save/load


@pytest.mark.parametrize("head", [ExtremaModel, ExtremaForMaskedImageModeling, ExtremaForImageClassification])
def test_save_load_round_trip_is_exact(head, tmp_path):
    torch.manual_seed(0)
    model = head(tiny(num_labels=3)).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    kwargs = {"pixel_values_2": torch.randn(2, 3, 32, 32), "noise": torch.rand(2, 16)} if head is ExtremaForMaskedImageModeling else {}
    before = model(pixel_values, **kwargs)
    model.save_pretrained(tmp_path)
    loaded = head.from_pretrained(tmp_path).eval()
    after = loaded(pixel_values, **kwargs)
    for name in ("last_hidden_state", "pooler_output", "loss", "loss_per_mask", "predictions", "targets", "logits"):
        if getattr(before, name, None) is not None:
            assert torch.equal(getattr(before, name), getattr(after, name)), name
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_pretraining_checkpoint_loads_into_the_classifier_and_back(tmp_path):
    torch.manual_seed(0)
    pretrain = ExtremaForMaskedImageModeling(tiny())
    pretrain.save_pretrained(tmp_path / "pre")
    classifier, info = ExtremaForImageClassification.from_pretrained(tmp_path / "pre", num_labels=4, output_loading_info=True)
    online = pretrain.extrema.encoder.state_dict()
    for name, tensor in classifier.extrema.encoder.state_dict().items():
        assert torch.equal(tensor, online[name]), name
    assert sorted(info["missing_keys"]) == sorted(
        ["classifier.weight", "classifier.bias", "extrema.pooler.fc_norm.weight", "extrema.pooler.fc_norm.bias"]
    )
    assert classifier.extrema.encoder.class_attention is None and classifier.extrema.encoder.layernorm is None
    assert classifier.extrema.encoder.embeddings.position_embeddings.requires_grad  # learnable when fine-tuning
    assert torch.equal(classifier.extrema.pooler.fc_norm.weight, torch.ones(32))
    assert classifier.classifier.weight.abs().max() < 1e-3  # official init_scale 0.001
    out = classifier(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 3]))
    assert out.logits.shape == (2, 4) and out.loss.ndim == 0

    classifier.save_pretrained(tmp_path / "cls")
    back, info = ExtremaForMaskedImageModeling.from_pretrained(tmp_path / "cls", output_loading_info=True)
    for name, tensor in classifier.extrema.encoder.state_dict().items():
        assert torch.equal(back.extrema.encoder.state_dict()[name], tensor), name
    assert any(k.startswith("predictor.") for k in info["missing_keys"])
    # The missing momentum branch starts as a copy of the (partly loaded) online branch.
    for name, tensor in back.momentum_encoder.state_dict().items():
        assert torch.equal(tensor, back.extrema.encoder.state_dict()[name]), name


def test_backbone_features_and_auto_classes():
    config = AutoConfig.for_model("extrema", **ExtremaConfig.presets["tiny"])
    assert isinstance(config, ExtremaConfig)
    assert type(AutoModel.from_config(config)) is ExtremaModel
    assert type(AutoModelForMaskedImageModeling.from_config(config)) is ExtremaForMaskedImageModeling
    assert type(AutoModelForImageClassification.from_config(config)) is ExtremaForImageClassification
    torch.manual_seed(0)
    model = ExtremaModel(config).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    out = model(pixel_values, output_hidden_states=True, output_attentions=True)
    assert out.last_hidden_state.shape == (2, 17, 32)  # instance token + 16 patches, after the final norm
    expected_pool = F.layer_norm(out.hidden_states[-1].mean(1), (32,), eps=1e-6)  # fc_norm starts at 1/0
    assert max_abs_diff(out.pooler_output, expected_pool) <= 1e-6
    # self-attention maps (one per block, stackable) apart from the class-attention maps
    assert [a.shape for a in out.attentions] == [(2, 2, 16, 16)] * 2
    assert [a.shape for a in out.class_attentions] == [(2, 2, 1, 17)] * 2
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    masked = model(pixel_values, bool_masked_pos=torch.arange(16).repeat(2, 1) % 4 != 0)
    assert masked.last_hidden_state.shape == (2, 5, 32)
    with pytest.raises(ValueError, match="image_size=32"):
        model(torch.randn(1, 3, 48, 48))
    assert model(torch.randn(1, 3, 48, 64), interpolate_pos_encoding=True).last_hidden_state.shape == (1, 49, 32)


def test_base_parameter_counts_match_the_official_model():
    """Official ViT-B (ran): encoder 99.98 M (85.8 M self-attention + 14.2 M class attention), projector
    21.0 M, predictor 2.11 M."""
    with torch.device("meta"):
        model = ExtremaForMaskedImageModeling(ExtremaConfig())
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    encoder = model.extrema.encoder
    assert round(count(encoder) / 1e6, 2) == 99.98
    assert round(count(encoder.class_attention) / 1e6, 1) == 14.2
    assert round(count(model.projector) / 1e6, 1) == 21.0
    assert round(count(model.predictor) / 1e6, 2) == 2.11
    assert count(model.momentum_encoder) == count(encoder)


# ------------------------------------------------------------------------------------------ config


def test_presets_and_defaults():
    base = ExtremaConfig()
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads, base.image_size) == (768, 12, 12, 224)
    assert (base.mask_ratio, base.num_masks, base.num_visible_patches, base.ema_momentum) == (0.8, 5, 39, 0.996)
    assert (base.projector_hidden_size, base.projection_dim, base.layer_scale_init_value) == (4096, 256, 0.1)
    assert ExtremaConfig.from_preset("mask09x8").num_visible_patches == 19
    assert ExtremaConfig.from_preset("large").layer_scale_init_value == 1e-5
    tiny_config = tiny()
    assert tiny_config.image_size // tiny_config.patch_size == 4
    demo = ExtremaConfig.from_preset("demo")
    assert demo.image_size == 32 and demo.num_masks * demo.num_visible_patches <= demo.num_patches


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(image_size=30), "image_size"),
        (dict(num_attention_heads=5), "hidden_size"),
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(mask_ratio=0.99), "mask_ratio"),
        (dict(num_masks=6), "num_masks"),
        (dict(num_masks=0), "num_masks"),
        (dict(ema_momentum=1.5), "ema_momentum"),
        (dict(ema_momentum_schedule="linear"), "ema_momentum_schedule"),
        (dict(pooling="cls"), "pooling"),
        (dict(num_class_attention_layers=0), "num_class_attention_layers"),
        (dict(projection_dim=0), "projection_dim"),
        (dict(layer_scale_init_value=-1.0), "layer_scale_init_value"),
        (dict(projector_layer_norm_eps=0.0), "projector_layer_norm_eps"),
        (dict(view_crops="different"), "view_crops"),
        (dict(projector_norm="group_norm"), "projector_norm"),
    ],
)
def test_invalid_config_values_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"\b{field}="):
        tiny(**overrides)


def test_non_disjoint_masks_allow_more_masks():
    config = tiny(num_masks=6, disjoint_masks=False)
    model = ExtremaForMaskedImageModeling(config).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.bool_masked_pos.shape == (2, 6, 16)


def test_other_image_sizes_mask_the_new_patch_grid():
    model = ExtremaForMaskedImageModeling(tiny()).eval()
    out = model(torch.randn(2, 3, 48, 48), interpolate_pos_encoding=True)
    assert out.bool_masked_pos.shape == (2, 5, 36) and ((~out.bool_masked_pos).sum(-1) == 7).all()


def test_model_card_renders_for_every_head():
    from hf_mim.hub.card import render_model_card

    pretraining = render_model_card(
        ExtremaForMaskedImageModeling(tiny()), "me/extrema-demo", run={"optimizer steps": 10}, is_demo=True
    ).content
    assert "**ExtreMA**" in pretraining and "5 disjoint uniform random masks, ratio 0.8" in pretraining
    assert "| optimizer steps | 10 |" in pretraining and "demo run" in pretraining
    assert "momentum_backbone()" in pretraining
    probe = render_model_card(
        ExtremaForImageClassification(tiny(pooling="class_attention", num_labels=2)), "me/extrema-probe"
    ).content
    assert "pipeline_tag: image-classification" in probe
    assert "official linear probe" in probe and "No training run is recorded" in probe


def test_pretraining_outputs_are_on_the_loss_graph_and_attention_is_switchable():
    """hidden_states / attentions of the pretraining head are the tensors the loss is computed from, so
    gradient attribution (`retain_grad`) sees them; `set_attn_implementation` really switches kernels."""
    torch.manual_seed(0)
    model = ExtremaForMaskedImageModeling(ExtremaConfig.from_preset("tiny", num_masks=2)).train()
    out = model(torch.randn(2, 3, 32, 32), output_hidden_states=True, output_attentions=True)
    for tensor in (out.hidden_states[0], out.hidden_states[-1], out.attentions[0], out.class_attentions[0]):
        tensor.retain_grad()
    out.loss.backward()
    assert all(t.grad is not None for t in (out.hidden_states[0], out.hidden_states[-1], out.attentions[0], out.class_attentions[0]))
    assert len(out.attentions) == model.config.num_hidden_layers
    backbone = ExtremaModel(ExtremaConfig.from_preset("tiny"))
    backbone.set_attn_implementation("eager")
    assert backbone.config._attn_implementation == "eager"
    backbone.set_attn_implementation("sdpa")
    assert backbone.config._attn_implementation == "sdpa"


def test_batch_norm_projector_normalises_with_the_batch_and_saves_no_statistics(tmp_path):
    """projector_norm="batch_norm" (BYOL's projector): each hidden feature is standardised over the batch
    being projected, in training and in eval mode alike (no running statistics), checked by hand."""
    config = tiny(projector_norm="batch_norm")
    model = ExtremaForMaskedImageModeling(config)
    projector = model.projector
    features = torch.randn(6, config.hidden_size)
    hidden = projector[0](features)
    by_hand = (hidden - hidden.mean(0)) / torch.sqrt(hidden.var(0, unbiased=False) + config.projector_layer_norm_eps)
    for mode in (True, False):
        projector.train(mode)
        assert torch.allclose(projector[1](hidden), by_hand, atol=1e-5)
    assert not any("running" in name or "num_batches" in name for name in model.state_dict())
    model.save_pretrained(tmp_path)
    reloaded = ExtremaForMaskedImageModeling.from_pretrained(tmp_path)
    assert isinstance(reloaded.momentum_projector[4], torch.nn.BatchNorm1d)
    assert torch.equal(reloaded.predictor[1].weight, model.predictor[1].weight)
    # the official projector is untouched: LayerNorm per projection
    assert isinstance(ExtremaForMaskedImageModeling(tiny()).projector[1], torch.nn.LayerNorm)
