"""AMT (attention-driven masking and throwing, MAE and SimMIM hosts): official numerics, conversion,
the masking pieces and save/load."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import load_fixture, max_abs_diff, run_without_hf_mim
from transformers import AutoModelForMaskedImageModeling

import hf_mim  # noqa: F401  (registers the Auto classes)
from hf_mim.configuration_amt import AmtConfig
from hf_mim.convert.__main__ import main as convert_main
from hf_mim.convert.amt import convert_amt_checkpoint, simmim_head
from hf_mim.convert.common import CheckpointFormatError, load_official_state_dict
from hf_mim.training import AttentionMapStore
from hf_mim.masking_attention import (
    amt_counts,
    AttentionMaskGenerator,
    crop_attention_map,
    throw_masks_from_order,
    units_from_patches,
    units_to_patches,
    weighted_order,
)
from hf_mim.auto import family_for
from hf_mim.hub import save_hub_folder
from hf_mim.modeling_amt import (
    AmtForImageClassification,
    AmtForMaskedImageModeling,
    AmtModel,
    MaeHost,
    SimMIMHost,
)
from hf_mim.objectives import unpatchify

TOL = 1e-5
MAE_HEADS = "num_attention_heads=12,decoder_num_attention_heads=4"  # fixture: 12 heads at width 48
SIMMIM_HEADS = "num_attention_heads=12"
ATTN = ["eager", "sdpa"]


def rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |diff| relative to the largest |expected| (for sums of many pixel weights, values ~100)."""
    return max_abs_diff(actual, expected) / max(1.0, expected.abs().max().item())


# --------------------------------------------------------------------------------------------------
# Fixtures: official state dicts written as .pth files and converted with the command line
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mae(fixtures_dir):
    return load_fixture(fixtures_dir, "amt_mae")


@pytest.fixture(scope="module")
def simmim(fixtures_dir):
    return load_fixture(fixtures_dir, "amt_simmim")


@pytest.fixture(scope="module")
def converted(mae, simmim, tmp_path_factory):
    """The official state dicts written as .pth files and converted with `python -m hf_mim.convert amt`:
    one real subprocess (SimMIM pretraining, a raw state dict), the others through the same entry point
    in-process (MAE files as {"model": ...}), to keep the interpreter start-ups down."""
    tmp = tmp_path_factory.mktemp("amt_convert")
    torch.save({"model": mae["official_state_dict"], "epoch": 41}, tmp / "mae-checkpoint-41.pth")
    torch.save({"model": mae["official_classifier_state_dict"]}, tmp / "mae-finetune.pth")
    torch.save(simmim["official_state_dict"], tmp / "simmim-ckpt_epoch_41.pth")
    torch.save({"model": simmim["official_classifier_state_dict"]}, tmp / "simmim-finetune.pth")
    folders, stdout = {}, {}
    result = subprocess.run(
        [sys.executable, "-m", "hf_mim.convert", "amt", "--checkpoint", str(tmp / "simmim-ckpt_epoch_41.pth"),
         "--output", str(tmp / "simmim_pretrain"), "--config_overrides", SIMMIM_HEADS],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    folders["simmim_pretrain"], stdout["simmim_pretrain"] = tmp / "simmim_pretrain", result.stdout
    for name, ckpt, heads in (
        ("mae_pretrain", "mae-checkpoint-41.pth", MAE_HEADS),
        ("mae_finetune", "mae-finetune.pth", MAE_HEADS),
        ("simmim_finetune", "simmim-finetune.pth", SIMMIM_HEADS),
    ):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = convert_main(
                ["amt", "--checkpoint", str(tmp / ckpt), "--output", str(tmp / name), "--config_overrides", heads]
            )
        assert code == 0
        folders[name], stdout[name] = tmp / name, buffer.getvalue()
    folders["stdout"] = stdout
    return folders


def bool_from_indices(indices: torch.Tensor, size: int) -> torch.Tensor:
    return torch.zeros(indices.shape[0], size, dtype=torch.bool).scatter_(1, indices, True)


# --------------------------------------------------------------------------------------------------
# Official numerics: mae-AMT
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTN)
def test_mae_pretraining_matches_official(mae, converted, attn):
    inputs, expected = mae["inputs"], mae["outputs"]
    model = AmtForMaskedImageModeling.from_pretrained(converted["mae_pretrain"], attn_implementation=attn).eval()
    assert model.config.variant == "mae" and model.config.num_attention_heads == 12
    pixel_values = inputs["pixel_values"]

    # the attention refresh: last block's cls row, then the min-max / head-mean map
    assert max_abs_diff(model.amt.encoder.cls_attention(pixel_values), expected["attention_cls_row"]) <= TOL
    assert max_abs_diff(model.attention_scores(pixel_values), expected["attention_map"]) <= TOL

    # AMT phase with the official masked / thrown sets
    masked = bool_from_indices(inputs["ids_masked"], 196)
    thrown = bool_from_indices(inputs["ids_thrown"], 196)
    assert torch.equal(masked.float() - thrown.float(), inputs["mask"])
    out = model(pixel_values, bool_masked_pos=masked, bool_thrown_pos=thrown)
    # official encoder order = ids_keep order; ours = visible patches in raster order
    official = expected["encoder_last_hidden_state"]
    order = torch.argsort(inputs["ids_keep"], dim=1).unsqueeze(-1).expand(-1, -1, official.shape[-1])
    official_raster = torch.cat([official[:, :1], torch.gather(official[:, 1:], 1, order)], dim=1)
    assert max_abs_diff(out.encoder_last_hidden_state, official_raster) <= TOL
    assert out.predictions.shape == (2, 118, 192)
    assert max_abs_diff(out.predictions, expected["decoder_pred"]) <= TOL
    assert max_abs_diff(out.loss, expected["loss"]) <= TOL
    assert torch.equal(out.patch_labels, masked.long() + 2 * thrown.long())

    # warm-up phase: the official random-phase mask given, and the same mask drawn from its noise
    random_mask = expected["random_phase_mask"].bool()
    for kwargs in ({"bool_masked_pos": random_mask}, {"noise": inputs["noise_random_phase"]}):
        out = model(pixel_values, **kwargs)
        assert torch.equal(out.bool_masked_pos, random_mask) and not out.bool_thrown_pos.any()
        assert max_abs_diff(out.predictions, expected["random_phase_decoder_pred"]) <= TOL
        assert max_abs_diff(out.loss, expected["random_phase_loss"]) <= TOL


def test_mae_mask_weights_and_masks_match_official(mae):
    inputs = mae["inputs"]
    config = AmtConfig(variant="mae", image_size=112, patch_size=8, hidden_size=48, num_attention_heads=12)
    generator = AmtForMaskedImageModeling(config).mask_generator()
    for b in range(2):
        pixels = crop_attention_map(inputs["attention_map"][b], None, False, (112, 112))
        assert max_abs_diff(pixels, inputs["mask_weights"][b, 0]) <= TOL
        weights = generator.patch_weights(inputs["attention_map"][b], None, False)
        assert rel_diff(weights, inputs["mask_weights_per_patch"][b]) <= TOL
    counts = amt_counts(196, config.mask_ratio, config.throw_ratio, "floor")
    masks = throw_masks_from_order(inputs["ids_shuffle"], *counts)
    assert torch.equal(masks.bool_masked_pos.float() - masks.bool_thrown_pos.float(), inputs["mask"])


@pytest.mark.parametrize("attn", ATTN)
def test_mae_classifier_matches_official(mae, converted, attn):
    inputs, expected = mae["inputs"], mae["outputs"]
    model = AmtForImageClassification.from_pretrained(converted["mae_finetune"], attn_implementation=attn).eval()
    assert model.config.use_mean_pooling and model.config.num_labels == 5
    assert max_abs_diff(model(inputs["pixel_values"]).logits, expected["classifier_logits"]) <= TOL
    pooled = model.amt(inputs["pixel_values"]).pooler_output
    assert max_abs_diff(pooled, expected["classifier_pooled_output"]) <= TOL


# --------------------------------------------------------------------------------------------------
# Official numerics: SimMIM-AMT
# --------------------------------------------------------------------------------------------------


def simmim_fixture_masks(inputs) -> tuple[torch.Tensor, torch.Tensor]:
    masked = units_to_patches(bool_from_indices(inputs["units_masked"], 49), 7, 2)
    thrown = units_to_patches(bool_from_indices(inputs["units_thrown"], 49), 7, 2)
    return masked, thrown


@pytest.mark.parametrize("attn", ATTN)
def test_simmim_pretraining_matches_official(simmim, converted, attn):
    inputs, expected = simmim["inputs"], simmim["outputs"]
    model = AmtForMaskedImageModeling.from_pretrained(converted["simmim_pretrain"], attn_implementation=attn).eval()
    config = model.config
    assert config.variant == "simmim" and not config.apply_attention_layer_scale and config.mask_patch_size == 16
    pixel_values = inputs["pixel_values"]

    assert max_abs_diff(model.amt.encoder.cls_attention(pixel_values), expected["attention_cls_row"]) <= TOL
    assert max_abs_diff(model.attention_scores(pixel_values), expected["attention_map"]) <= TOL

    masked, thrown = simmim_fixture_masks(inputs)
    assert torch.equal((masked.long() - thrown.long()).reshape(2, 14, 14), inputs["mask"])
    out = model(pixel_values, bool_masked_pos=masked, bool_thrown_pos=thrown)
    assert max_abs_diff(out.encoder_last_hidden_state, expected["encoder_last_hidden_state"]) <= TOL
    # the official output is the 144 unthrown patches laid out row-major on a fake 12 x 12 grid
    assert out.predictions.shape == (2, 144, 192)
    reconstruction = unpatchify(out.predictions, 8, (12, 12), 3)
    assert max_abs_diff(reconstruction, expected["decoder_reconstruction"]) <= TOL
    assert max_abs_diff(out.loss, expected["loss"]) <= TOL

    # warm-up phase: the official random units (44 %), nothing thrown, all 196 tokens in the encoder
    out = model(pixel_values, bool_masked_pos=inputs["random_phase_mask"].reshape(2, -1).bool())
    assert max_abs_diff(out.encoder_last_hidden_state, expected["random_phase_encoder_last_hidden_state"]) <= TOL
    assert max_abs_diff(out.loss, expected["random_phase_loss"]) <= TOL


def test_simmim_mask_weights_and_masks_match_official(simmim):
    inputs = simmim["inputs"]
    config = AmtConfig(
        variant="simmim", image_size=112, patch_size=8, hidden_size=48, num_attention_heads=12, mask_patch_size=16
    )
    generator = AmtForMaskedImageModeling(config).mask_generator()
    assert (generator.unit_grid, generator.unit_size) == (7, 2)
    for b in range(2):
        pixels = crop_attention_map(inputs["attention_map"][b], None, False, (112, 112))
        assert max_abs_diff(pixels, inputs["mask_weights"][b, 0]) <= TOL
        weights = generator.patch_weights(inputs["attention_map"][b], None, False)
        per_unit = units_from_patches(weights[None], 14, 2)[0]
        assert rel_diff(per_unit, inputs["mask_weights_per_unit"][b]) <= TOL
    counts = amt_counts(49, config.mask_ratio, config.throw_ratio, "ceil")
    assert counts == (22, 13)
    units = throw_masks_from_order(inputs["unit_order"], *counts)
    mask = units_to_patches(units.bool_masked_pos, 7, 2).long() - units_to_patches(units.bool_thrown_pos, 7, 2).long()
    assert torch.equal(mask.reshape(2, 14, 14), inputs["mask"])
    visible = units_to_patches(bool_from_indices(inputs["units_visible"], 49), 7, 2)
    assert torch.equal(visible.reshape(2, 14, 14), inputs["mask"] == 0)


@pytest.mark.parametrize("attn", ATTN)
def test_simmim_classifier_matches_official(simmim, converted, attn):
    inputs, expected = simmim["inputs"], simmim["outputs"]
    model = AmtForImageClassification.from_pretrained(converted["simmim_finetune"], attn_implementation=attn).eval()
    assert not model.config.use_mean_pooling and not model.config.apply_attention_layer_scale
    assert max_abs_diff(model(inputs["pixel_values"]).logits, expected["classifier_logits"]) <= TOL
    pooled = model.amt(inputs["pixel_values"]).pooler_output
    assert max_abs_diff(pooled, expected["classifier_pooled_output"]) <= TOL


# --------------------------------------------------------------------------------------------------
# Conversion details
# --------------------------------------------------------------------------------------------------


def test_conversion_reports_what_it_dropped_and_why(converted):
    mae_report, simmim_report = converted["stdout"]["mae_pretrain"], converted["stdout"]["simmim_pretrain"]
    assert "dropped decoder_pos_embed: fixed sin-cos table" in mae_report
    assert "dropped blocks.0.gamma_1: the released SimMIM-AMT Block.forward never applies gamma_1" in simmim_report
    assert "dropped blocks.1.attn.q_bias: merged into attn.qkv.bias" in simmim_report
    assert "mask_patch_size" in simmim_report


def test_raw_and_wrapped_state_dicts_convert_alike(simmim, tmp_path):
    state = simmim["official_state_dict"]
    torch.save(state, tmp_path / "raw.pth")
    torch.save({"model": state, "epoch": torch.tensor(3)}, tmp_path / "wrapped.pth")
    raw, _ = convert_amt_checkpoint(load_official_state_dict(tmp_path / "raw.pth"), {"num_attention_heads": 12})
    wrapped, _ = convert_amt_checkpoint(load_official_state_dict(tmp_path / "wrapped.pth"), {"num_attention_heads": 12})
    for name, tensor in raw.state_dict().items():
        assert torch.equal(tensor, wrapped.state_dict()[name]), name
    # the merged BEiT biases: [q; 0; v]
    qkv_bias = raw.amt.encoder.layers[0].attn.qkv.bias
    assert torch.equal(qkv_bias[:48], state["encoder.blocks.0.attn.q_bias"])
    assert torch.equal(qkv_bias[48:96], torch.zeros(48))
    assert torch.equal(qkv_bias[96:], state["encoder.blocks.0.attn.v_bias"])
    assert torch.equal(raw.amt.encoder.layers[0].ls2.gamma, state["encoder.blocks.0.gamma_2"])
    assert isinstance(raw.amt.encoder.layers[0].ls1, torch.nn.Identity)


def test_gamma_1_kept_when_asked(simmim):
    model, report = convert_amt_checkpoint(
        simmim["official_state_dict"], {"num_attention_heads": 12, "apply_attention_layer_scale": True}
    )
    assert model.config.apply_attention_layer_scale
    assert torch.equal(model.amt.encoder.layers[1].ls1.gamma, simmim["official_state_dict"]["encoder.blocks.1.gamma_1"])
    assert not any("gamma_1" in key for key in report.dropped)


def test_conversion_errors_are_clear(mae, tmp_path):
    state = dict(mae["official_state_dict"])
    with pytest.raises(CheckpointFormatError, match="num_attention_heads"):
        convert_amt_checkpoint(state)
    bad_table = dict(state, decoder_pos_embed=state["decoder_pos_embed"] + 0.1)
    heads = {"num_attention_heads": 12, "decoder_num_attention_heads": 4}
    with pytest.raises(CheckpointFormatError, match="decoder_pos_embed"):
        convert_amt_checkpoint(bad_table, heads)
    with pytest.raises(CheckpointFormatError, match="no mapping.*extra"):
        convert_amt_checkpoint(dict(state, extra=torch.zeros(1)), heads)
    with pytest.raises(CheckpointFormatError, match="cls_token"):
        convert_amt_checkpoint({"conv.weight": torch.zeros(3, 3)})


def test_simmim_head_permutation_equals_conv_and_pixel_shuffle():
    """1x1 conv + PixelShuffle(p) on a token grid == our Linear per token, unpatchified."""
    torch.manual_seed(0)
    p, channels, dim, grid = 4, 3, 10, (3, 5)
    conv = torch.nn.Conv2d(dim, p * p * channels, 1)
    tokens = torch.randn(2, grid[0] * grid[1], dim)
    feature_map = tokens.transpose(1, 2).reshape(2, dim, *grid)
    official = F.pixel_shuffle(conv(feature_map), p)
    weight, bias = simmim_head(conv.weight.detach(), conv.bias.detach(), p)
    ours = unpatchify(F.linear(tokens, weight, bias), p, grid, channels)
    assert max_abs_diff(ours, official) <= 1e-6


# --------------------------------------------------------------------------------------------------
# Masking pieces
# --------------------------------------------------------------------------------------------------


def test_weighted_order_has_the_distribution_of_multinomial():
    torch.manual_seed(0)
    weights = torch.tensor([5.0, 3.0, 1.0, 0.5, 2.0, 0.2])
    draws = 20000
    ours = weighted_order(weights.expand(draws, -1), torch.rand(draws, 6))
    official = torch.multinomial(weights.expand(draws, -1), 6)
    # frequency of unit u at position k
    freq_ours = F.one_hot(ours, 6).float().mean(dim=0)
    freq_official = F.one_hot(official, 6).float().mean(dim=0)
    assert (freq_ours - freq_official).abs().max() < 0.02
    assert torch.equal(ours.sort(dim=1).values, torch.arange(6).expand(draws, -1))


def test_zero_weights_are_still_drawn_last():
    torch.manual_seed(0)
    weights = torch.tensor([2.0, 0.0, 1.0, 0.0])
    order = weighted_order(weights.expand(2000, -1), torch.rand(2000, 4))
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(2000, -1))  # a full permutation
    assert set(order[:, 2:].flatten().tolist()) == {1, 3}  # zero weights after the positive ones
    assert 0.4 < (order[:, 2] == 1).float().mean() < 0.6  # and in random order among themselves


def test_amt_counts_use_the_official_rounding():
    assert amt_counts(196, 0.45, 0.4, "floor") == (88, 78)
    assert amt_counts(49, 0.44, 0.26, "ceil") == (22, 13)
    with pytest.raises(ValueError, match="rounding"):
        amt_counts(49, 0.44, 0.26, "round")


def test_crop_aligned_map_reads_the_crop_and_mirrors_with_flips():
    attention = torch.zeros(14, 14)
    attention[7:, 7:] = 1.0  # all attention in the bottom-right quarter
    bottom_right = (0.5, 0.5, 0.5, 0.5)
    weights = crop_attention_map(attention, torch.tensor(bottom_right), False, (112, 112))
    assert weights[8:, 8:].min() == 1.0  # the crop's own part of the map, not the top-left cells
    top_left = crop_attention_map(attention, torch.tensor((0.0, 0.0, 0.5, 0.5)), False, (112, 112))
    assert top_left[:-8, :-8].max() == 0.0 and top_left.mean() < 0.01  # only the edge blends with the next cells
    # inside the crop the weights are the crop's cells resized (edges blend with the neighbours outside)
    graded = torch.arange(196, dtype=torch.float32).reshape(14, 14) / 196
    inside = F.interpolate(graded[None, None, 7:, 7:], size=(112, 112), mode="bilinear", align_corners=False)[0, 0]
    weights = crop_attention_map(graded, torch.tensor(bottom_right), False, (112, 112))
    assert max_abs_diff(weights[8:-8, 8:-8], inside[8:-8, 8:-8]) <= 1e-6
    # flipped with the image
    box = torch.tensor((0.1, 0.3, 0.6, 0.5))
    flipped = crop_attention_map(graded, box, True, (64, 64))
    assert max_abs_diff(flipped, crop_attention_map(graded, box, False, (64, 64)).flip(-1)) <= 1e-6
    generator = AttentionMaskGenerator(8, 8, 1, 0.45, 0.4, 0.75, "floor")
    per_patch = generator.patch_weights(graded, box, True).reshape(8, 8)
    assert max_abs_diff(per_patch, generator.patch_weights(graded, box, False).reshape(8, 8).flip(-1)) <= 1e-5


def test_most_attended_patches_are_masked_and_least_attended_stay_visible():
    torch.manual_seed(0)
    generator = AttentionMaskGenerator(14, 16, 1, 0.45, 0.4, 0.75, "floor", store=AttentionMapStore())
    rows = torch.arange(14, dtype=torch.float32)
    peaked = torch.exp(-((rows[:, None] - 6.5) ** 2 + (rows[None, :] - 6.5) ** 2) / 8)
    weights = generator.patch_weights(peaked, None, False)
    draws = 2000
    masks = generator.guided_masks(weights.expand(draws, -1), torch.rand(draws, 196))
    assert masks.bool_masked_pos.sum(1).eq(88).all() and masks.bool_thrown_pos.sum(1).eq(78).all()
    masked_rate = masks.bool_masked_pos.float().mean(0)
    visible_rate = (~(masks.bool_masked_pos | masks.bool_thrown_pos)).float().mean(0)
    top, bottom = weights.argsort(descending=True)[:20], weights.argsort()[:20]
    assert masked_rate[top].min() > 0.95 and masked_rate[bottom].max() < 0.1
    assert visible_rate[bottom].mean() > 0.3 and visible_rate[top].max() < 0.01
    mean_weight = [(weights * m.float()).sum(1).mean() / m.sum(1).float().mean() for m in
                   (masks.bool_masked_pos, masks.bool_thrown_pos, ~(masks.bool_masked_pos | masks.bool_thrown_pos))]
    assert mean_weight[0] > mean_weight[1] > mean_weight[2]
    # per example through the store: a map gives AMT masks and the weights; once the store holds maps,
    # an example without one gets a uniform map (official all-ones init), so a batch never mixes counts
    generator.store.update(torch.tensor([7]), peaked[None])
    masks, patch_weights = generator(torch.Generator().manual_seed(1), example_id=7)
    assert masks.bool_masked_pos.sum() == 88 and masks.bool_thrown_pos.sum() == 78
    assert rel_diff(patch_weights, generator.patch_weights(peaked.half().float(), None, False)) <= 1e-6
    masks, patch_weights = generator(torch.Generator().manual_seed(1), example_id=8)
    assert torch.equal(patch_weights, torch.full((196,), 256.0))  # 16 x 16 pixels of weight 1
    assert masks.bool_masked_pos.sum() == 88 and masks.bool_thrown_pos.sum() == 78
    empty = AttentionMaskGenerator(14, 16, 1, 0.45, 0.4, 0.75, "floor")  # before any refresh: warm-up masks
    masks, patch_weights = empty(torch.Generator().manual_seed(1), example_id=8)
    assert patch_weights is None and masks.bool_masked_pos.sum() == 196 - 49 and not masks.bool_thrown_pos.any()


def test_attention_map_store_update_get_replace_and_state_dict():
    store = AttentionMapStore()
    assert len(store) == 0 and store.get(3) is None
    maps = torch.rand(3, 4, 4)
    store.update(torch.tensor([5, 2, 9]), maps)
    assert len(store) == 3 and store.get(7) is None
    assert max_abs_diff(store.get(2), maps[1]) <= 1e-3 and store.get(2).dtype == torch.float32
    new = torch.rand(2, 4, 4)
    store.update(torch.tensor([9, 11]), new)  # replaces 9, adds 11
    assert len(store) == 4
    assert max_abs_diff(store.get(9), new[0]) <= 1e-3 and max_abs_diff(store.get(5), maps[0]) <= 1e-3
    store.num_refreshes = 2
    copy = AttentionMapStore()
    copy.load_state_dict(store.state_dict())
    assert copy.num_refreshes == 2 and torch.equal(copy.example_ids, store.example_ids)
    for example_id in (2, 5, 9, 11):
        assert torch.equal(copy.get(example_id), store.get(example_id))
    with pytest.raises(ValueError, match="differ"):
        store.update(torch.tensor([1]), torch.rand(1, 5, 5))
    with pytest.raises(ValueError, match="example ids"):
        store.update(torch.tensor([1, 2]), torch.rand(1, 4, 4))


# --------------------------------------------------------------------------------------------------
# Model behaviour (tiny configs)
# --------------------------------------------------------------------------------------------------


def tiny(variant: str, **overrides) -> AmtConfig:
    if variant == "simmim":
        overrides.setdefault("mask_patch_size", 16)  # 2 x 2 units of 2 x 2 patches
        # SimMIM's 0.44 / 0.26 would mask 2 and throw 2 of 4 units (ceil): nothing visible
        overrides.setdefault("mask_ratio", 0.25)
        overrides.setdefault("throw_ratio", 0.25)
    return AmtConfig.from_preset("tiny", variant=variant, **overrides)


def test_attention_layer_scale_applies_gamma_1_to_the_attention_branch_only():
    torch.manual_seed(0)
    with_ls = AmtModel(tiny("simmim", num_hidden_layers=1, apply_attention_layer_scale=True)).eval()
    without = AmtModel(tiny("simmim", num_hidden_layers=1, apply_attention_layer_scale=False)).eval()
    with torch.no_grad():
        for parameter in with_ls.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    state = {k: v for k, v in with_ls.state_dict().items() if ".ls1." not in k}
    without.load_state_dict(state, strict=True)
    block_ls, block = with_ls.encoder.layers[0], without.encoder.layers[0]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        attended = block.attn(block.norm1(x))[0]
        gamma_1, gamma_2 = block_ls.ls1.gamma, block.ls2.gamma

        def mlp_branch(h):
            return h + gamma_2 * block.mlp(block.norm2(h))

        assert max_abs_diff(block_ls(x)[0], mlp_branch(x + gamma_1 * attended)) <= 1e-6
        assert max_abs_diff(block(x)[0], mlp_branch(x + attended)) <= 1e-6
        pixel_values = torch.randn(2, 3, 32, 32)
        assert max_abs_diff(with_ls(pixel_values).last_hidden_state, without(pixel_values).last_hidden_state) > 1e-3


@pytest.mark.parametrize("variant", ["mae", "simmim"])
def test_random_strategy_masks_at_mask_ratio_and_throws_nothing(variant):
    torch.manual_seed(0)
    # throw_ratio stays at its default (MAE 0.4, SimMIM 0.26): the random baseline ignores it
    model = AmtForMaskedImageModeling(tiny(variant, masking_strategy="random", mask_ratio=0.55)).eval()
    out = model(torch.randn(3, 3, 32, 32), patch_attention=torch.rand(3, 16))
    expected = 16 - int(16 * 0.45) if variant == "mae" else 4 * 3  # MAE keeps int(N(1-r)); SimMIM ceil(4 * 0.55) units
    assert out.bool_masked_pos.sum(1).eq(expected).all() and not out.bool_thrown_pos.any()
    assert out.predictions.shape[1] == 16 and model.attention_refresh_steps(100) == []
    generator = model.mask_generator(attention_maps=AttentionMapStore())
    generator.store.update(torch.tensor([0]), torch.rand(1, 4, 4))
    masks, weights = generator(torch.Generator().manual_seed(0), example_id=0)
    assert weights is None and masks.bool_masked_pos.sum() == expected and not masks.bool_thrown_pos.any()


@pytest.mark.parametrize("variant", ["mae", "simmim"])
def test_amt_masks_from_patch_attention_and_warmup_without(variant):
    torch.manual_seed(0)
    model = AmtForMaskedImageModeling(tiny(variant)).eval()
    config = model.config
    pixel_values = torch.randn(2, 3, 32, 32)
    units = 16 if variant == "mae" else 4
    unit_patches = 16 // units
    rounding = "floor" if variant == "mae" else "ceil"
    num_masked, num_thrown = amt_counts(units, config.mask_ratio, config.throw_ratio, rounding)
    out = model(pixel_values, patch_attention=torch.rand(2, 16), noise=torch.rand(2, units))
    assert out.bool_masked_pos.sum(1).eq(num_masked * unit_patches).all()
    assert out.bool_thrown_pos.sum(1).eq(num_thrown * unit_patches).all()
    assert out.predictions.shape[1] == 16 - num_thrown * unit_patches and torch.isfinite(out.loss)
    warmup = model(pixel_values)
    assert not warmup.bool_thrown_pos.any()
    # the mae-AMT / SimMIM-AMT defaults at one step per epoch: after 41, 81, ... epochs (the official schedule)
    assert model.attention_refresh_steps(400, 1) == list(range(41, 400, 40) if variant == "mae" else range(81, 400, 80))


@pytest.mark.parametrize("variant", ["mae", "simmim"])
def test_save_load_round_trip_is_exact(variant, tmp_path):
    torch.manual_seed(0)
    model = AmtForMaskedImageModeling(tiny(variant)).eval()
    units = 16 if variant == "mae" else 4
    kwargs = dict(pixel_values=torch.randn(2, 3, 32, 32), patch_attention=torch.rand(2, 16), noise=torch.rand(2, units))
    before = model(**kwargs)
    model.save_pretrained(tmp_path)
    loaded = AmtForMaskedImageModeling.from_pretrained(tmp_path).eval()
    after = loaded(**kwargs)
    for name in ("loss", "predictions", "encoder_last_hidden_state", "bool_masked_pos", "bool_thrown_pos"):
        assert torch.equal(getattr(before, name), getattr(after, name)), name
    assert torch.equal(model.attention_scores(kwargs["pixel_values"]), loaded.attention_scores(kwargs["pixel_values"]))
    if variant == "mae":
        assert torch.equal(loaded.decoder.position_embeddings, loaded.decoder.sincos_table())


@pytest.mark.parametrize("variant", ["mae", "simmim"])
def test_pretraining_checkpoint_loads_into_the_classifier_with_only_expected_keys(variant, tmp_path, caplog):
    torch.manual_seed(0)
    pretrain = AmtForMaskedImageModeling(tiny(variant))
    pretrain.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        classifier, info = AmtForImageClassification.from_pretrained(tmp_path, num_labels=3, output_loading_info=True)
    reported = [line.split("|") for line in caplog.text.splitlines() if line.count("|") >= 2]
    reported = {key.strip(): status.strip() for key, status, *_ in reported if status.strip() not in ("Status", "")}
    expected_missing = {"classifier.weight", "classifier.bias"}
    if variant == "mae":
        expected_missing |= {"amt.pooler.fc_norm.weight", "amt.pooler.fc_norm.bias"}
    assert set(info["missing_keys"]) == expected_missing
    assert reported == {key: "MISSING" for key in expected_missing}  # the load report warns about nothing else
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    encoder = pretrain.amt.encoder.state_dict()
    for name, tensor in classifier.amt.encoder.state_dict().items():
        assert torch.equal(tensor, encoder[name]), name


def mae_amt_refreshes(epochs: int, loc_interval: int, warmup_epochs: int) -> list[int]:
    """Completed epochs after which mae-AMT's main_pretrain.py refreshes (its condition after epoch index e)."""
    return [e + 1 for e in range(epochs) if e >= warmup_epochs and e + 1 != epochs and e % loc_interval == 0]


def simmim_amt_refreshes(epochs: int, warmup_epochs: int) -> list[int]:
    """Completed epochs after which SimMIM-AMT's main_simmim.py refreshes (40 hard-coded)."""
    return [e + 1 for e in range(epochs) if e > warmup_epochs and e != epochs - 1 and e % 40 == 0]


@pytest.mark.parametrize("steps_per_epoch", [1, 3, 7])
@pytest.mark.parametrize("variant, epochs, interval, official", [
    ("mae", 400, 40, mae_amt_refreshes(400, 40, 40)),  # the recipe: after 41, 81, ..., 361 epochs
    ("simmim", 200, 40, simmim_amt_refreshes(200, 10)),  # the recipe: after 41, 81, 121, 161 epochs
    ("mae", 42, 40, mae_amt_refreshes(42, 40, 2)),  # the trajectory fixtures' runs: after 41
    ("simmim", 42, 40, simmim_amt_refreshes(42, 2)),
    ("mae", 41, 40, mae_amt_refreshes(41, 40, 40)),  # the refresh would fall on the last epoch: none
    ("mae", 100, 25, mae_amt_refreshes(100, 25, 25)),
    ("mae", 10, 3, mae_amt_refreshes(10, 3, 3)),
    ("simmim", 120, 40, simmim_amt_refreshes(120, 10)),
    ("simmim", 81, 40, simmim_amt_refreshes(81, 10)),
])
def test_refresh_schedule_is_the_official_one(variant, epochs, interval, official, steps_per_epoch):
    """The default schedule (`amt_interval` = interval / epochs, as the converter sets it, and one epoch of delay)
    refreshes after exactly the optimizer steps that end the epochs after which the official scripts refresh;
    delay 0 refreshes one epoch earlier, at each interval's end."""
    model = AmtForMaskedImageModeling(tiny(variant, amt_interval=interval / epochs))
    assert model.config.amt_refresh_delay_epochs == 1
    total = epochs * steps_per_epoch
    assert model.attention_refresh_steps(total, steps_per_epoch) == [e * steps_per_epoch for e in official]
    assert official or epochs == interval + 1  # a refresh in every case but the one that would fall at the end
    model.config.amt_refresh_delay_epochs = 0
    at_interval_ends = list(range(interval, epochs, interval))
    assert model.attention_refresh_steps(total, steps_per_epoch) == [e * steps_per_epoch for e in at_interval_ends]


def test_refresh_without_an_epoch_length_drops_the_delay_and_says_so(caplog):
    """A stream trained for a step budget has no epoch length: refreshes at each interval's end, with a
    warning naming the field; with delay 0 there is nothing to drop and nothing to say. Bad lengths are refused."""
    model = AmtForMaskedImageModeling(tiny("mae"))  # amt_interval 0.1, delay 1
    with caplog.at_level(logging.WARNING):
        assert model.attention_refresh_steps(400) == list(range(40, 400, 40))
    assert "amt_refresh_delay_epochs=1" in caplog.text and "epoch length is unknown" in caplog.text
    caplog.clear()
    model.config.amt_refresh_delay_epochs = 2
    with caplog.at_level(logging.WARNING):
        assert model.attention_refresh_steps(400, None) == list(range(40, 400, 40))
        assert model.attention_refresh_steps(400, 5) == list(range(50, 400, 40))
    assert caplog.text.count("epoch length is unknown") == 1
    caplog.clear()
    model.config.amt_refresh_delay_epochs = 0
    with caplog.at_level(logging.WARNING):
        assert model.attention_refresh_steps(400) == list(range(40, 400, 40))
    assert "epoch length" not in caplog.text
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="steps_per_epoch"):
            model.attention_refresh_steps(400, bad)
    with pytest.raises(ValueError, match="amt_refresh_delay_epochs"):
        AmtConfig(amt_refresh_delay_epochs=-1)


def test_throw_ratio_only_constrains_the_amt_strategy():
    from hf_mim.configuration_amt import AmtConfig

    assert AmtConfig(masking_strategy="random", mask_ratio=0.75).mask_ratio == 0.75  # MAE's own baseline
    with pytest.raises(ValueError, match="throw_ratio"):
        AmtConfig(mask_ratio=0.75)  # + the default throw_ratio 0.4 leaves nothing visible
    with pytest.raises(ValueError, match="variant"):
        AmtConfig(variant="beit")
    with pytest.raises(ValueError, match="mask_patch_size"):
        AmtConfig(mask_patch_size=24)


def test_pixel_targets_stay_float32_under_bf16_autocast():
    """Under autocast the predictions are bfloat16, but the norm-pix targets and their statistics are
    computed in float32 (as the official code): the loss equals a float32 hand computation from them."""
    from hf_mim.objectives import normalize_per_token, patchify

    torch.manual_seed(0)
    model = AmtForMaskedImageModeling(tiny("mae", norm_pix_loss=True)).train()
    pixel_values = torch.randn(2, 3, 32, 32) * 3 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values, patch_attention=torch.rand(2, 16), noise=torch.rand(2, 16))
    assert out.predictions.dtype == torch.bfloat16
    keep = (~out.bool_thrown_pos).nonzero()[:, 1].reshape(2, -1)
    target = torch.gather(normalize_per_token(patchify(pixel_values, 8)), 1, keep[..., None].expand(-1, -1, 192))
    masked = torch.gather(out.bool_masked_pos, 1, keep).float()
    expected = (((out.predictions.float() - target) ** 2).mean(-1) * masked).sum() / masked.sum()
    assert abs(out.loss.item() - expected.item()) <= 1e-6 * expected.item()


def test_simmim_warmup_masks_follow_mask_ratio_unless_set(tmp_path):
    """SimMIM-AMT draws its warm-up (random-phase) masks at MASK_RATIO, the ratio of the attention-driven
    phase; mae-AMT hard-codes 75 %. An explicit warmup_mask_ratio wins; a later mask_ratio change
    (e.g. `from_pretrained(..., mask_ratio=...)`) carries over."""
    simmim = tiny("simmim", mask_ratio=0.2, throw_ratio=0.2)
    assert simmim.warmup_mask_ratio is None and simmim.effective_warmup_mask_ratio == 0.2
    model = AmtForMaskedImageModeling(simmim).eval()
    warmup = model(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 4))
    assert warmup.bool_masked_pos.sum(1).eq(4).all()  # ceil(4 units * 0.2) = 1 unit of 2x2 patches (0.44 gave 2)
    masks, _ = model.mask_generator()(torch.Generator().manual_seed(0), example_id=0)
    assert masks.bool_masked_pos.sum() == 4
    assert tiny("simmim", mask_ratio=0.2, throw_ratio=0.2, warmup_mask_ratio=0.25).effective_warmup_mask_ratio == 0.25
    assert tiny("mae", mask_ratio=0.3).effective_warmup_mask_ratio == 0.75
    model.save_pretrained(tmp_path)
    reloaded = AmtForMaskedImageModeling.from_pretrained(tmp_path, mask_ratio=0.3)
    assert reloaded.config.effective_warmup_mask_ratio == 0.3


# --------------------------------------------------------------------------------------------------
# One model class holding the host of the variant
# --------------------------------------------------------------------------------------------------

HOSTS = {"mae": MaeHost, "simmim": SimMIMHost}
# what folders saved while each host was a subclass name in `architectures`
OLD_HOST_CLASSES = {"mae": "AmtMaeForMaskedImageModeling", "simmim": "AmtSimMIMForMaskedImageModeling"}


@pytest.mark.parametrize("variant", sorted(HOSTS))
def test_the_model_holds_the_host_of_the_variant_and_loads_old_folders(variant, tmp_path):
    """No `__new__`, no subclass table: the one class holds the host component of `config.variant`,
    which owns no weights (the state dict is the model's); folders that name a host class (saved
    before) and folders that name the shared class load with the same loss."""
    assert "__new__" not in vars(AmtForMaskedImageModeling)
    assert AmtForMaskedImageModeling.__subclasses__() == []
    config = tiny(variant)
    for model in (AmtForMaskedImageModeling(config), AutoModelForMaskedImageModeling.from_config(config)):
        assert type(model) is AmtForMaskedImageModeling and model.host is HOSTS[variant]
        assert model.pretraining_no_weight_decay == HOSTS[variant].pretraining_no_weight_decay

    torch.manual_seed(0)
    model = AmtForMaskedImageModeling(config).eval()
    assert {key.split(".")[0] for key in model.state_dict()} == {"amt", "decoder"}
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForMaskedImageModeling"] == "modeling_amt.AmtForMaskedImageModeling"
    assert saved["architectures"] == ["AmtForMaskedImageModeling"] and (tmp_path / "modeling_amt.py").exists()
    units = 16 if variant == "mae" else 4
    kwargs = dict(pixel_values=torch.randn(2, 3, 32, 32), patch_attention=torch.rand(2, 16), noise=torch.rand(2, units))
    expected = model(**kwargs).loss
    for architecture in ("AmtForMaskedImageModeling", OLD_HOST_CLASSES[variant]):
        saved["architectures"] = [architecture]
        (tmp_path / "config.json").write_text(json.dumps(saved))
        for loader in (AmtForMaskedImageModeling, AutoModelForMaskedImageModeling):
            loaded = loader.from_pretrained(tmp_path).eval()
            assert loaded.host is HOSTS[variant] and torch.equal(loaded(**kwargs).loss, expected), loader


def test_each_host_brings_its_crop_and_classifier_init():
    """What a host decides for the other classes: the pretraining crop (mae-AMT 0.2-1, SimMIM-AMT
    0.67-1) and the classifier head's init (MAE trunc-normal 2e-5, BEiT 0.02)."""
    family = family_for("amt")
    assert family.pretraining_transform(tiny("mae")).scale == (0.2, 1.0)
    assert family.pretraining_transform(tiny("simmim")).scale == (0.67, 1.0)
    torch.manual_seed(0)
    for variant, std in (("mae", 2e-5), ("simmim", 0.02)):
        weight = AmtForImageClassification(tiny(variant, num_labels=200)).classifier.weight
        assert abs(weight.std().item() / std - 1) < 0.05, variant


@pytest.mark.slow  # one fresh interpreter (~14 s); the MAE host's folder loads remotely in test_remote_code
def test_both_hosts_load_remotely_and_save_again_as_the_shared_class(tmp_path):
    """Without hf_mim: each host's folder loads through AutoModelForMaskedImageModeling (trust_remote_code),
    computes the same loss, and saved again still maps the class that dispatches."""
    torch.manual_seed(0)
    pixel_values = torch.randn(2, 3, 32, 32)
    expected, folders = {}, {}
    for variant in HOSTS:
        model = AmtForMaskedImageModeling(tiny(variant)).eval()
        units = 16 if variant == "mae" else 4
        noise = torch.rand(2, units)
        expected[variant] = (model(pixel_values, noise=noise).loss.item(), noise.tolist())
        folders[variant] = str(save_hub_folder(model, tmp_path / variant))
    result = run_without_hf_mim(
        f"""
        import json, torch, transformers
        pixel_values = torch.tensor({pixel_values.tolist()})
        report = {{}}
        for variant, folder in {folders!r}.items():
            loss, noise = {expected!r}[variant]
            model = transformers.AutoModelForMaskedImageModeling.from_pretrained(folder, trust_remote_code=True).eval()
            again = folder + "_again"
            model.save_pretrained(again)
            auto_map = json.load(open(again + "/config.json"))["auto_map"]["AutoModelForMaskedImageModeling"]
            reloaded = transformers.AutoModelForMaskedImageModeling.from_pretrained(again, trust_remote_code=True).eval()
            diff = abs(reloaded(pixel_values, noise=torch.tensor(noise)).loss.item() - loss)
            report[variant] = [type(model).__name__, type(reloaded).__name__, auto_map, diff]
        print(json.dumps(report))
        """,
        tmp_path,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for variant in HOSTS:
        name = "AmtForMaskedImageModeling"
        assert report[variant] == [name, name, "modeling_amt.AmtForMaskedImageModeling", 0.0], report
