"""AutoBackbone feature pyramids of the plain-ViT methods (dBOT, ExtreMA, MaskDistill, AMT on both hosts):
hand-computed feature maps, UperNet training steps, checkpoint loading, layer ids, remote code."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import max_abs_diff, run_without_hf_mim
from safetensors.torch import save_file
from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation

from hf_mim import (
    MODEL_FAMILIES,
    AmtBackbone,
    AmtConfig,
    DbotBackbone,
    DbotConfig,
    ExtremaBackbone,
    ExtremaConfig,
    MaskDistillBackbone,
    MaskDistillConfig,
)
from hf_mim.hub import full_auto_map, save_hub_folder
from hf_mim.hub.card import render_model_card
from hf_mim.auto import family_for
from hf_mim.training.optim import layer_decay_param_groups, vit_layer_id

# variant -> (model type, backbone class, config overrides)
VARIANTS = {
    "dbot": ("dbot", DbotBackbone, {}),
    "extrema": ("extrema", ExtremaBackbone, {}),
    "maskdistill": ("maskdistill", MaskDistillBackbone, {}),
    "amt_mae": ("amt", AmtBackbone, {"variant": "mae"}),
    "amt_simmim": ("amt", AmtBackbone, {"variant": "simmim"}),
}
PREFIX = {"dbot": "dbot", "extrema": "extrema", "maskdistill": "maskdistill", "amt": "amt"}
DEPTH = 4  # tiny presets have 2 blocks; the multi-scale recipe needs four stages


def tiny(variant: str, **overrides):
    model_type, _, extra = VARIANTS[variant]
    return family_for(model_type).config_class.from_preset("tiny", num_hidden_layers=DEPTH, **extra, **overrides)


def perturb(model: torch.nn.Module) -> None:
    """Move every parameter away from its initial value, so loading is visible."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def encoder_of(backbone):
    return getattr(backbone, backbone.base_model_prefix).encoder


def hand_tokens(backbone, variant: str, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Embedding output and every block's output, computed from the weights: patch convolution, the
    position table bicubically resized to the new grid by hand, then the blocks one by one (MaskDistill:
    with each block's relative position bias for the new grid)."""
    encoder = encoder_of(backbone)
    embeddings = encoder.embeddings
    projection = embeddings.patch_embeddings.projection
    patch = backbone.config.patch_size
    grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
    tokens = F.conv2d(pixel_values, projection.weight, projection.bias, stride=patch).flatten(2).transpose(1, 2)
    table = getattr(embeddings, "position_embeddings", None)
    has_cls = getattr(embeddings, "cls_token", None) is not None
    prefix = 1 if has_cls else 0
    if table is not None:
        side = int((table.shape[1] - prefix) ** 0.5)
        patches = table[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
        tokens = tokens + resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    if has_cls:
        cls = embeddings.cls_token + (table[:, :1] if table is not None else 0)
        tokens = torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    states = [tokens]
    tables = backbone.relative_position_biases  # trained from scratch (backbone_relative_position_bias)
    for index, layer in enumerate(encoder.layers):
        bias = None
        if variant == "maskdistill":
            bias = layer.rel_pos_bias(grid)
        elif tables is not None:
            bias = tables[index](grid)
            bias = bias if prefix else bias[:, :, 1:, 1:]  # no cls token: the patch rows only
        tokens, _ = layer(tokens, None, False, bias)
        states.append(tokens)
    return states, prefix, grid


def as_map(tokens: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    return tokens[:, prefix:].reshape(tokens.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------------
# Feature maps by hand
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_multi_scale_maps_are_the_resampled_block_outputs(variant):
    torch.manual_seed(0)
    backbone = VARIANTS[variant][1](tiny(variant)).eval()
    perturb(backbone)
    assert backbone.out_features == ["stage1", "stage2", "stage3", "stage4"]
    pixel_values = torch.randn(2, 3, 64, 64)  # pretrained at 32 px: an 8 x 8 grid instead of 4 x 4
    with torch.no_grad():
        maps = backbone(pixel_values).feature_maps
        states, prefix, grid = hand_tokens(backbone, variant, pixel_values)
        block = [as_map(states[index], prefix, grid) for index in (1, 2, 3, 4)]
        fpn1, fpn2 = backbone.pyramid[0], backbone.pyramid[1]
        up = F.conv_transpose2d(block[0], fpn1[0].weight, fpn1[0].bias, stride=2)
        bn = fpn1[1]
        up = (up - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        up = F.gelu(up * bn.weight[:, None, None] + bn.bias[:, None, None])
        expected = [
            F.conv_transpose2d(up, fpn1[3].weight, fpn1[3].bias, stride=2),
            F.conv_transpose2d(block[1], fpn2[0].weight, fpn2[0].bias, stride=2),
            block[2],  # the stride-16 level (stride = patch) is the block output reshaped
            F.max_pool2d(block[3], 2),
        ]
    assert [tuple(m.shape) for m in maps] == [(2, 32, 32, 32), (2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4)]
    assert backbone.feature_strides == [2.0, 4.0, 8.0, 16.0]  # patch 8: 4/8/16/32 at patch 16
    for got, want in zip(maps, expected):
        assert max_abs_diff(got, want) <= 1e-5


@pytest.mark.parametrize("variant", ["dbot", "extrema", "amt_mae"])
def test_relative_position_bias_trained_from_scratch(variant, tmp_path):
    """MAE / dBOT segmentation recipe: a zero-initialised relative position bias per block on top of the
    absolute positions; zero at the start (same maps as without it), used once trained, loads from a
    pretraining checkpoint as new parameters, layer id of its block, gradients under UperNet."""
    model_type, backbone_class, _ = VARIANTS[variant]
    torch.manual_seed(0)
    pretrain = family_for(model_type).masked_image_modeling_class(tiny(variant))
    perturb(pretrain)
    pretrain.save_pretrained(tmp_path)
    plain = backbone_class.from_pretrained(tmp_path).eval()
    biased, info = backbone_class.from_pretrained(tmp_path, backbone_relative_position_bias=True, output_loading_info=True)
    biased.eval()
    assert all(k.startswith(("pyramid.", "relative_position_biases.")) for k in info["missing_keys"])
    assert len(biased.relative_position_biases) == DEPTH
    assert all(not t.relative_position_bias_table.any() for t in biased.relative_position_biases)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        biased.pyramid.load_state_dict(plain.pyramid.state_dict())
        assert max_abs_diff(biased(pixel_values).feature_maps[2], plain(pixel_values).feature_maps[2]) == 0
        perturb(biased)
        maps = biased(pixel_values).feature_maps
        states, prefix, grid = hand_tokens(biased, variant, pixel_values)
    assert max_abs_diff(maps[2], as_map(states[3], prefix, grid)) <= 1e-5
    assert biased.layer_id_for_lr_decay("relative_position_biases.2.relative_position_bias_table") == 3

    upernet = UperNetForSemanticSegmentation(UperNetConfig(
        backbone_config=tiny(variant, backbone_relative_position_bias=True), hidden_size=8, num_labels=3
    ))
    upernet(pixel_values.repeat(2, 1, 1, 1), labels=torch.zeros(2, 64, 64, dtype=torch.long)).loss.backward()
    assert [n for n, p in upernet.backbone.named_parameters() if p.requires_grad and p.grad is None] == []


def test_relative_position_tables_are_resized_to_the_crop():
    """MaskDistill at 64 px from a 32 px config: bias(i, j) = the (2*8-1)^2 table, bilinearly resized
    from the (2*4-1)^2 one, at the displacement of patches i and j; the cls rows are kept."""
    backbone = MaskDistillBackbone(tiny("maskdistill")).eval()
    perturb(backbone)
    module = backbone.maskdistill.encoder.layers[0].rel_pos_bias
    table = module.relative_position_bias_table.detach()
    heads = table.shape[1]
    small = table[: 7 * 7].reshape(1, 7, 7, heads).permute(0, 3, 1, 2)
    resized = F.interpolate(small, size=(15, 15), mode="bilinear", align_corners=False)[0]  # (heads, 15, 15)
    bias = module((8, 8))[0].detach()  # (heads, 65, 65)
    for i, j in [(0, 0), (0, 63), (9, 17), (62, 3), (27, 36)]:
        dy, dx = i // 8 - j // 8, i % 8 - j % 8
        assert torch.allclose(bias[:, 1 + i, 1 + j], resized[:, dy + 7, dx + 7], atol=1e-6)
    assert torch.equal(bias[:, 0, 5], table[49]) and torch.equal(bias[:, 5, 0], table[50])
    assert torch.equal(bias[:, 0, 0], table[51])


def test_simple_pyramid_and_flat_features():
    torch.manual_seed(0)
    pixel_values = torch.randn(1, 3, 64, 64)
    simple = DbotBackbone(tiny("dbot", backbone_pyramid="simple", backbone_pyramid_channels=16)).eval()
    assert simple.out_features == ["stage4"] and simple.channels == [16] * 4
    maps = simple(pixel_values).feature_maps
    assert [tuple(m.shape) for m in maps] == [(1, 16, 32, 32), (1, 16, 16, 16), (1, 16, 8, 8), (1, 16, 4, 4)]
    with torch.no_grad():  # the stride-patch level: last block -> 1x1 conv -> LN -> 3x3 conv -> LN
        states, prefix, grid = hand_tokens(simple, "dbot", pixel_values)
        level = simple.pyramid[2]
        x = F.conv2d(as_map(states[-1], prefix, grid), level[0].weight)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (16,), level[1].weight, level[1].bias, 1e-6).permute(0, 3, 1, 2)
        x = F.conv2d(x, level[2].weight, padding=1)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (16,), level[3].weight, level[3].bias, 1e-6).permute(0, 3, 1, 2)
    assert max_abs_diff(maps[2], x) <= 1e-5

    flat = ExtremaBackbone(tiny("extrema", backbone_pyramid="none", out_indices=[0, -1])).eval()
    assert flat.out_features == ["stem", "stage4"] and flat.feature_strides == [8.0, 8.0]
    out = flat(pixel_values, output_hidden_states=True)
    assert [tuple(m.shape) for m in out.feature_maps] == [(1, 32, 8, 8)] * 2
    assert len(out.hidden_states) == 1 + DEPTH
    states, prefix, grid = hand_tokens(flat, "extrema", pixel_values)
    assert max_abs_diff(out.feature_maps[0], as_map(states[0], prefix, grid)) <= 1e-5


def test_default_stages_follow_beit_and_vitdet():
    # BEiT / MAE segmentation out_indices [3, 5, 7, 11] (Base) and [7, 11, 15, 23] (Large), 1-based here
    assert DbotConfig.from_preset("base").out_features == ["stage4", "stage6", "stage8", "stage12"]
    assert AmtConfig.from_preset("large").out_features == ["stage8", "stage12", "stage16", "stage24"]
    assert MaskDistillConfig(backbone_pyramid="simple").out_features == ["stage12"]
    config = ExtremaConfig.from_preset("tiny", num_hidden_layers=4, out_features=["stem", "stage1", "stage2", "stage4"])
    reloaded = ExtremaConfig.from_dict(config.to_dict())
    assert reloaded.out_features == config.out_features and reloaded.out_indices == [0, 1, 2, 4]
    assert reloaded.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]


def test_bad_backbone_settings_are_named():
    with pytest.raises(ValueError, match="backbone_pyramid"):
        DbotConfig(backbone_pyramid="fpn")
    with pytest.raises(ValueError, match="out_features=\\['stage13'\\]"):
        DbotConfig(out_features=["stage13"])
    with pytest.raises(ValueError, match="backbone_pyramid_channels"):
        AmtConfig(backbone_pyramid_channels=0)
    with pytest.raises(ValueError, match="out_features must name 4 stages"):
        DbotBackbone(DbotConfig.from_preset("tiny"))  # two blocks: no four evenly spaced stages
    with pytest.raises(ValueError, match="out_features must name 1 stage"):
        AmtBackbone(tiny("amt_mae", backbone_pyramid="simple", out_features=["stage2", "stage4"]))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DbotBackbone(tiny("dbot"))(torch.randn(1, 3, 60, 60))


# --------------------------------------------------------------------------------------------------
# UperNet
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_upernet_trains_on_the_backbone(variant):
    torch.manual_seed(0)
    config = UperNetConfig(
        backbone_config=tiny(variant), hidden_size=16, auxiliary_in_channels=32, auxiliary_channels=8, num_labels=5
    )
    model = UperNetForSemanticSegmentation(config)
    assert type(model.backbone) is VARIANTS[variant][1]
    out = model(torch.randn(2, 3, 64, 64), labels=torch.randint(0, 5, (2, 64, 64)))
    assert out.logits.shape == (2, 5, 64, 64) and torch.isfinite(out.loss)
    out.loss.backward()
    # every trainable backbone parameter gets a gradient (DDP stops on one that does not)
    assert [n for n, p in model.backbone.named_parameters() if p.requires_grad and p.grad is None] == []
    encoder = encoder_of(model.backbone)
    assert encoder.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    assert encoder.layers[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.backbone.pyramid[0][0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 64)).logits.shape == (1, 5, 48, 64)  # any multiple of the patch


# --------------------------------------------------------------------------------------------------
# Loading checkpoints
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encoder_weights_load_from_pretraining_and_classification_checkpoints(variant, tmp_path):
    model_type, backbone_class, _ = VARIANTS[variant]
    family = family_for(model_type)
    prefix = PREFIX[model_type]
    torch.manual_seed(0)
    for head, name in ((family.masked_image_modeling_class, "pre"), (family.image_classification_class, "cls")):
        source = head(tiny(variant, num_labels=3))
        perturb(source)
        source.save_pretrained(tmp_path / name)
        saved = {k: v for k, v in source.state_dict().items() if k.startswith(prefix + ".encoder.")}
        backbone, info = backbone_class.from_pretrained(tmp_path / name, output_loading_info=True)
        assert info["unexpected_keys"] == set() or info["unexpected_keys"] == [], (name, info["unexpected_keys"])
        assert info["mismatched_keys"] in (set(), []), info["mismatched_keys"]
        assert all(key.startswith("pyramid.") for key in info["missing_keys"]), info["missing_keys"]
        state = backbone.state_dict()
        for key, tensor in state.items():
            if key.startswith(prefix + ".encoder.") and key in saved:
                assert torch.equal(tensor, saved[key]), (name, key)
        encoder_keys = {k for k in state if k.startswith(prefix + ".encoder.")}
        if variant == "maskdistill" and name == "pre":  # per-block tables start as the shared pretraining one
            shared = saved[prefix + ".encoder.rel_pos_bias.relative_position_bias_table"]
            for layer in backbone.maskdistill.encoder.layers:
                assert torch.equal(layer.rel_pos_bias.relative_position_bias_table, shared)
            encoder_keys = {k for k in encoder_keys if ".rel_pos_bias." not in k or ".layers." not in k}
        if variant == "maskdistill":  # unused here: frozen after loading too; no mask token at all
            assert not backbone.maskdistill.encoder.rel_pos_bias.relative_position_bias_table.requires_grad
            assert backbone.maskdistill.encoder.embeddings.mask_token is None
        assert encoder_keys <= set(saved), sorted(encoder_keys - set(saved))
        # the pyramid is initialised, not left as garbage from meta-device loading
        batch_norm = backbone.pyramid[0][1]
        assert torch.equal(batch_norm.running_var, torch.ones(32)) and torch.equal(batch_norm.running_mean, torch.zeros(32))
        assert 0.01 < backbone.pyramid[1][0].weight.std() < 0.03
        maps = backbone.eval()(torch.randn(1, 3, 64, 64)).feature_maps
        assert all(torch.isfinite(m).all() for m in maps)

    backbone.save_pretrained(tmp_path / "backbone")
    again = backbone_class.from_pretrained(tmp_path / "backbone").eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    for a, b in zip(backbone(pixel_values).feature_maps, again(pixel_values).feature_maps):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# Layer-wise lr decay
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layer_ids_for_lr_decay(variant):
    backbone = VARIANTS[variant][1](tiny(variant))
    layer_id = backbone.layer_id_for_lr_decay
    for name, _ in backbone.named_parameters():
        expected = vit_layer_id(name, DEPTH)  # BEiT/MAE get_layer_id_for_vit
        if name.startswith("pyramid.") or ".encoder.rel_pos_bias." in name:
            expected = DEPTH + 1
        assert layer_id(name) == expected, name
        assert layer_id("backbone." + name) == expected, name  # as UperNet names it
    assert layer_id("decode_head.classifier.weight") == DEPTH + 1
    groups = layer_decay_param_groups(backbone, 0.05, 0.65, DEPTH, layer_id_fn=layer_id)
    assert sorted({group["layer_id"] for group in groups}) == list(range(DEPTH + 2))


@pytest.mark.parametrize("model_type", sorted(MODEL_FAMILIES))
def test_cards_say_how_to_run_dense_transfer(model_type):
    family = MODEL_FAMILIES[model_type]
    card = str(render_model_card(family.base_model_class(family.config_class.from_preset("tiny")), "someone/model"))
    section = card.split("## Dense transfer", 1)[1].split("\n## ", 1)[0]
    assert f'{family.backbone_class.__name__}.from_pretrained("someone/model")' in section
    assert "UperNetForSemanticSegmentation" in section and "ADE20K" in section


# --------------------------------------------------------------------------------------------------
# Auto classes and remote code
# --------------------------------------------------------------------------------------------------


def check_backbones_load_without_hf_mim_and_run_upernet(variants: list[str], tmp_path) -> None:
    torch.manual_seed(0)
    pixel_values = torch.randn(1, 3, 64, 64)
    tensors = {"pixel_values": pixel_values}
    folders = {}
    for variant in variants:
        model_type, backbone_class, _ = VARIANTS[variant]
        config = tiny(variant)
        assert type(AutoBackbone.from_config(config)) is backbone_class
        assert full_auto_map(model_type)["AutoBackbone"] == f"modeling_{model_type}.{backbone_class.__name__}"
        backbone = backbone_class(config).eval()
        perturb(backbone)
        for index, feature_map in enumerate(backbone(pixel_values).feature_maps):
            tensors[f"{variant}.{index}"] = feature_map.detach().contiguous()
        folder = save_hub_folder(backbone, tmp_path / variant)
        assert (folder / "backbone_common.py").is_file()
        folders[variant] = str(folder)
    save_file(tensors, str(tmp_path / "expected.safetensors"))
    result = run_without_hf_mim(
        f"""
        import json, torch
        from safetensors.torch import load_file
        from transformers import AutoBackbone, AutoConfig, UperNetConfig, UperNetForSemanticSegmentation
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        report = {{}}
        for variant, folder in json.loads({json.dumps(json.dumps(folders))}).items():
            config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
            # AutoBackbone.from_pretrained asks the Hub whether a local folder is a repo; from_config does not
            assert "hf_mim" not in type(AutoBackbone.from_config(config, trust_remote_code=True)).__module__
            remote_class = get_class_from_dynamic_module(config.auto_map["AutoBackbone"], folder)
            backbone = remote_class.from_pretrained(folder).eval()
            maps = backbone(expected["pixel_values"]).feature_maps
            diff = max((m - expected[f"{{variant}}.{{i}}"]).abs().max().item() for i, m in enumerate(maps))
            upernet = UperNetForSemanticSegmentation(UperNetConfig(
                backbone_config=config, hidden_size=8, auxiliary_in_channels=32, auxiliary_channels=8, num_labels=3))
            out = upernet(expected["pixel_values"].repeat(2, 1, 1, 1), labels=torch.zeros(2, 64, 64, dtype=torch.long))
            out.loss.backward()
            report[variant] = [diff, list(out.logits.shape), type(upernet.backbone).__name__]
        print(json.dumps(report))
        """,
        tmp_path,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == set(variants)
    for variant, (diff, shape, name) in report.items():
        assert diff == 0.0 and shape == [2, 3, 64, 64] and name == VARIANTS[variant][1].__name__, (variant, report)


def test_backbone_loads_without_hf_mim_and_runs_upernet(tmp_path):
    """One family in the default suite (MaskDistill: relative position tables, per-block copies)."""
    check_backbones_load_without_hf_mim_and_run_upernet(["maskdistill"], tmp_path)


@pytest.mark.slow
def test_every_backbone_loads_without_hf_mim_and_runs_upernet(tmp_path):
    check_backbones_load_without_hf_mim_and_run_upernet(sorted(VARIANTS), tmp_path)
