"""RevColV2: the reversible engine against RevCol v1's official one, heads, save/load, user mistakes."""

from __future__ import annotations

import json

import gc
import logging
import re
import weakref
from unittest import mock

import pytest
import torch
from helpers import max_abs_diff
from safetensors.torch import load_file
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from hf_mim import (
    RevColV2Backbone,
    RevColV2Config,
    RevColV2ForImageClassification,
    RevColV2ForMaskedImageModeling,
    RevColV2Model,
)
from hf_mim.hub import full_auto_map, save_hub_folder
from hf_mim.masking import RandomMaskGenerator
from hf_mim.modeling_revcolv2 import RevColV2Column
from hf_mim.objectives import patchify, unpatchify
from hf_mim.reversible import clamp_alpha, run_column

NUM_COLUMNS = NUM_LEVELS = 4


def tiny(**overrides) -> RevColV2Config:
    return RevColV2Config.from_preset("tiny", **overrides)


def relative_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().item()
    return (ours.detach().double() - reference.double()).abs().max().item() / (scale if scale > 0 else 1.0)


# --------------------------------------------------------------------------------------------------
# The engine against the official RevCol (v1) reversible function
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_fixture(fixtures_dir):
    folder = fixtures_dir / "revcol_engine"
    if not folder.is_dir():
        pytest.skip("the revcol_engine fixture is not available")
    return {name: load_file(str(folder / f"{name}.safetensors"))
            for name in ("state_dict", "inputs", "outputs", "outputs_float32")}


def our_key(official_key: str) -> str:
    """`subnet{i}.level{l}.X` -> `{i}.levels.{l}.X` (bottom-up columns store levels in level order)."""
    return re.sub(r"^subnet(\d+)\.level(\d+)\.", r"\1.levels.\2.", official_key)


def fixture_columns(state_dict: dict, dtype: torch.dtype) -> torch.nn.ModuleList:
    """Four of our bottom-up columns in the fixture's geometry, holding its weights."""
    config = RevColV2Config(
        image_size=32, patch_size=8, hidden_size=16, num_attention_heads=2, mlp_ratio=2.0, num_levels=4,
        blocks_per_level=[1, 1, 1, 1], fusion_type="linear", layer_scale_init_value=0.5, drop_path_rate=0.0,
    )
    config._attn_implementation = "sdpa"
    columns = torch.nn.ModuleList(RevColV2Column(config, has_prev=i > 0, top_down=False) for i in range(NUM_COLUMNS))
    columns.to(dtype)
    ours = {our_key(k): v for k, v in state_dict.items() if ".alpha" not in k}
    for i in range(1, NUM_COLUMNS):
        ours[f"{i}.alpha"] = torch.cat([state_dict[f"subnet{i}.alpha{l}"].reshape(1, -1) for l in range(NUM_LEVELS)])
    # strict: every parameter accounted for (the column-0 alphas: see compare_with_official)
    columns.load_state_dict({k: v.to(dtype) for k, v in ours.items()}, strict=True)
    return columns


def run_fixture_columns(columns, inputs, dtype, reversible: bool, x_requires_grad: bool = True, hand_off: bool = False):
    columns.zero_grad(set_to_none=True)
    x = inputs["x"].to(dtype).clone().requires_grad_(x_requires_grad)
    states, per_column = None, []
    for i, column in enumerate(columns):
        states = column(x, states, reversible, hand_off=hand_off and i < NUM_COLUMNS - 1)
        per_column.append(states)
    loss = sum((states[l] * inputs[f"upstream_grad.c{l}"].to(dtype)).sum() for l in range(NUM_LEVELS))
    loss.backward()
    grads = {name: p.grad for name, p in columns.named_parameters()}
    return per_column, loss, x.grad, grads


def compare_with_official(engine_fixture, dtype, reversible: bool, hand_off: bool = False) -> dict[str, float]:
    state_dict, inputs = engine_fixture["state_dict"], engine_fixture["inputs"]
    expected = engine_fixture["outputs" if dtype == torch.float64 else "outputs_float32"]
    path = "reversible" if reversible else "plain"
    columns = fixture_columns(state_dict, dtype)
    per_column, loss, grad_x, grads = run_fixture_columns(columns, inputs, dtype, reversible, hand_off=hand_off)
    worst = {"forward": 0.0, "loss": 0.0, "grads": 0.0}
    for i in range(NUM_COLUMNS):
        for level in range(NUM_LEVELS):
            reference = expected[f"columns.{path}.subnet{i}.c{level}"]
            worst["forward"] = max(worst["forward"], relative_diff(per_column[i][level], reference))
    worst["loss"] = relative_diff(loss, expected[f"loss.{path}"])
    worst["grads"] = relative_diff(grad_x, expected[f"grad.{path}.input"])
    for key in state_dict:
        reference = expected[f"grad.{path}.{key}"]
        match = re.match(r"subnet(\d+)\.alpha(\d+)$", key)
        if match and match[1] == "0":
            # The official first column multiplies its alphas by the int 0: they are inert, their gradient
            # exactly zero. Our first column has no alphas at all.
            assert torch.count_nonzero(reference) == 0
            continue
        ours = grads[f"{match[1]}.alpha"][int(match[2])] if match else grads[our_key(key)]
        worst["grads"] = max(worst["grads"], relative_diff(ours.reshape(reference.shape), reference))
    return worst


ENGINES = pytest.mark.parametrize(
    "reversible, hand_off", [(True, False), (True, True), (False, False)], ids=["reversible", "hand-off", "plain"]
)


@ENGINES
def test_engine_matches_official_in_float64(engine_fixture, reversible, hand_off):
    worst = compare_with_official(engine_fixture, torch.float64, reversible, hand_off)
    assert worst["forward"] <= 1e-10 and worst["loss"] <= 1e-10 and worst["grads"] <= 1e-10, worst


@ENGINES
def test_engine_matches_official_in_float32(engine_fixture, reversible, hand_off):
    """README §7: float32 gradients relative to each tensor's max |value|, about 1e-4 (the official
    reversible and plain float32 gradients already differ by 2.2e-6 relative). The hand-off must stay at
    that level, not at the 9.2e-3 of reconstructing every column from the last one."""
    worst = compare_with_official(engine_fixture, torch.float32, reversible, hand_off)
    assert worst["forward"] <= 1e-5 and worst["loss"] <= 1e-5 and worst["grads"] <= 1e-4, worst
    if hand_off:
        assert worst["grads"] <= 1e-5, worst


def test_hand_off_frees_earlier_columns_and_recovers_them(engine_fixture):
    """After the forward only the last column's outputs are alive; the gradients equal those of the
    engine that keeps every column's outputs, and a retained graph back-propagates twice."""
    columns = fixture_columns(engine_fixture["state_dict"], torch.float32)
    inputs = engine_fixture["inputs"]
    _, _, grad_x_kept, kept = run_fixture_columns(columns, inputs, torch.float32, reversible=True)
    columns.zero_grad(set_to_none=True)
    x = inputs["x"].float().requires_grad_(True)
    states, alive = None, []
    for i, column in enumerate(columns):
        states = column(x, states, True, hand_off=i < NUM_COLUMNS - 1)
        alive.append([weakref.ref(state) for state in states])
    gc.collect()
    assert all(ref() is None for refs in alive[:-1] for ref in refs)
    assert all(ref() is not None for ref in alive[-1])
    loss = sum((states[l] * inputs[f"upstream_grad.c{l}"].float()).sum() for l in range(NUM_LEVELS))
    loss.backward(retain_graph=True)
    assert relative_diff(x.grad, grad_x_kept) <= 1e-5
    first = {name: p.grad.clone() for name, p in columns.named_parameters()}
    for name in kept:
        assert relative_diff(first[name], kept[name]) <= 1e-5, name
    loss.backward()
    for name, p in columns.named_parameters():
        assert torch.equal(p.grad, 2 * first[name]), name


def test_hand_off_needs_the_next_column_in_the_backward():
    level = lambda down, up: down * 2 if up is None else down * 2 + up  # noqa: E731
    weight = torch.ones(3, requires_grad=True)
    x = torch.randn(2, 3)
    first = run_column([level, level], x * weight, hand_off=True)
    run_column([level, level], x, first, [torch.full((3,), 0.5)] * 2)  # claims `first`, never back-propagated
    with pytest.raises(RuntimeError, match="took no part in this backward"):
        first[0].sum().backward()


def test_engine_reversible_equals_plain_and_needs_no_input_grad(engine_fixture):
    columns = fixture_columns(engine_fixture["state_dict"], torch.float64)
    inputs = engine_fixture["inputs"]
    _, loss_r, gx_r, grads_r = run_fixture_columns(columns, inputs, torch.float64, reversible=True)
    _, loss_p, gx_p, grads_p = run_fixture_columns(columns, inputs, torch.float64, reversible=False)
    assert loss_r.item() == loss_p.item()
    assert relative_diff(gx_r, gx_p) <= 1e-12
    for name in grads_p:
        assert relative_diff(grads_r[name], grads_p[name]) <= 1e-12, name
    # Parameters are inputs of our Function: a frozen stem (x without grad) still trains the columns.
    _, _, gx, grads = run_fixture_columns(columns, inputs, torch.float64, reversible=True, x_requires_grad=False)
    assert gx is None
    for name in grads_p:
        assert relative_diff(grads[name], grads_p[name]) <= 1e-12, name


def test_alpha_clamp_matches_the_official_rule_except_exact_zero(engine_fixture):
    raw = engine_fixture["inputs"]["alpha_clamp_example.raw"]
    official = engine_fixture["outputs"]["alpha_clamp_example.clamped"]
    alpha = raw.clone().requires_grad_(True)
    ours = clamp_alpha(alpha, 1e-3)
    zero = raw == 0
    assert zero.any() and torch.equal(ours[~zero].detach(), official[~zero])
    # The official clamp leaves 0 at 0 (its inverse then divides by zero); ours gives +1e-3.
    assert torch.all(ours[zero].detach() == 1e-3)
    ours.sum().backward()  # straight-through: the gradient reaches the stored value unmasked
    assert torch.equal(alpha.grad, torch.ones_like(raw))


# --------------------------------------------------------------------------------------------------
# The reversible engine inside the model
# --------------------------------------------------------------------------------------------------


def model_gradients(model, pixel_values, noise, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(pixel_values, noise=noise)
    rng_after_forward = torch.get_rng_state()
    out.loss.backward()
    assert torch.equal(torch.get_rng_state(), rng_after_forward)  # backward leaves the global RNG alone
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_model_reversible_gradients_equal_plain_with_drop_path(dtype):
    """Drop path 0.3 in train mode: the recomputation must replay the forward's random masks."""
    torch.manual_seed(0)
    model = RevColV2ForMaskedImageModeling(tiny(drop_path_rate=0.3, layer_scale_init_value=0.3)).to(dtype).train()
    pixel_values, noise = torch.randn(2, 3, 32, 32, dtype=dtype), torch.rand(2, 16)
    model.config.use_reversible = True
    out_r, grads_r = model_gradients(model, pixel_values, noise)
    model.config.use_reversible = False
    out_p, grads_p = model_gradients(model, pixel_values, noise)
    assert torch.equal(out_r.predictions, out_p.predictions) and out_r.loss.item() == out_p.loss.item()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads_p) == set(grads_r) == trainable
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    worst = max(relative_diff(grads_r[name], grads_p[name]) for name in grads_p)
    assert worst <= tolerance, worst
    # A different drop-path draw changes the gradients: the test above is not vacuous.
    _, grads_other = model_gradients(model, pixel_values, noise, seed=1)
    assert max(relative_diff(grads_other[n], grads_p[n]) for n in grads_p) > 1e-3


def test_gradient_checkpointing_is_accepted_and_a_no_op_with_the_reversible_engine(caplog):
    """`TrainingArguments(gradient_checkpointing=True)` and saved configs with it must work: with the
    reversible engine it is accepted, said once in the log, and changes neither results nor work."""
    torch.manual_seed(0)
    model = RevColV2ForMaskedImageModeling(tiny()).train()
    pixel_values, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    model(pixel_values, noise=noise).loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with caplog.at_level(logging.WARNING):
        model.activation_checkpointing_enable()
        with pytest.warns(FutureWarning):
            model.gradient_checkpointing_enable()  # the deprecated alias run_mim.py calls
    assert model.is_activation_checkpointing
    assert caplog.text.count("changes nothing") == 1
    calls = []
    block = model.revcolv2.top_down[0].levels[0].blocks[0]
    original = torch.utils.checkpoint.checkpoint
    with mock.patch("torch.utils.checkpoint.checkpoint", side_effect=lambda *a, **k: calls.append(1) or original(*a, **k)):
        block._gradient_checkpointing_func = torch.utils.checkpoint.checkpoint
        model(pixel_values, noise=noise).loss.backward()
    assert not calls  # the engine's own recomputation only
    for name, grad in reference.items():
        assert torch.equal(dict(model.named_parameters())[name].grad, grad), name
    plain = RevColV2ForMaskedImageModeling(tiny(use_reversible=False)).train()
    plain.activation_checkpointing_enable()
    assert plain.revcolv2.top_down[0].levels[0].blocks[0].gradient_checkpointing
    plain(torch.randn(2, 3, 32, 32)).loss.backward()
    assert plain.revcolv2.bottom_up[0].levels[0].blocks[0].attn.qkv.weight.grad is not None


def test_recomputation_reenters_the_forward_autocast_state():
    torch.manual_seed(0)
    linears = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
    seen = []

    def make_level(linear):
        def level(down, up):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            out = linear(down if up is None else down + up)
            return out.float()
        return level

    levels = [make_level(linear) for linear in linears]
    params = [list(linear.parameters()) for linear in linears]
    x = torch.randn(2, 3, 8)
    prev = [torch.randn(2, 3, 8, requires_grad=True) for _ in range(2)]
    alphas = [torch.full((1, 1, 8), 0.5, requires_grad=True) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        states = run_column(levels, x, prev, alphas, level_params=params, reversible=True)
    assert states[0].grad_fn is not None and len(seen) == 2
    sum(state.sum() for state in states).backward()
    assert seen == [(True, torch.bfloat16)] * 4  # 2 forward calls, 2 recomputations in backward
    assert all(p.grad is not None for p in linears.parameters()) and all(a.grad is not None for a in alphas)


def test_run_column_validates_its_inputs():
    level = lambda down, up: down  # noqa: E731
    with pytest.raises(ValueError, match="one previous state and one alpha per level"):
        run_column([level, level], torch.zeros(1, 2, 4), prev_states=[torch.zeros(1, 2, 4)] * 2, alphas=None)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_size", 30),
        ("hidden_size", 30),
        ("num_levels", 0),
        ("blocks_per_level", [1, 1]),
        ("blocks_per_level", [1, 1, -1, 1]),
        ("num_bottom_up_columns", 0),
        ("num_top_down_columns", 0),
        ("fusion_type", "conv"),
        ("alpha_init", 0.0),
        ("alpha_min", -1.0),
        ("layer_scale_init_value", -0.1),
        ("drop_path_rate", 1.5),
        ("mask_ratio", 1.0),
        ("classifier_pooling", "max"),
        ("backbone_pyramid", "fpn"),
        ("use_reversible", "yes"),
    ],
)
def test_invalid_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny(**{field: value})
    with pytest.raises(ValueError, match="classifier_pooling"):
        tiny(classifier_pooling="cls", use_cls_token=False)


def test_presets_and_parameter_counts():
    with torch.device("meta"):
        base = RevColV2ForMaskedImageModeling(RevColV2Config.from_preset("base"))
        large = RevColV2ForMaskedImageModeling(RevColV2Config.from_preset("large"))
    assert round(sum(p.numel() for p in base.parameters()) / 1e6, 1) == 90.0  # paper: 88 M
    assert large.config.hidden_size == 1024
    assert 300e6 < sum(p.numel() for p in large.parameters()) < 320e6
    config = RevColV2Config.from_preset("demo")
    assert (config.image_size, config.patch_size) == (32, 4)
    assert config.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]  # transformers' backbone names
    assert config.out_features == ["stage1", "stage2", "stage3", "stage4"]
    assert RevColV2Config.from_preset("tiny", out_features=["stage2", "stage4"]).out_indices == [2, 4]
    assert RevColV2Config.from_preset("tiny", out_features=["level1"]).out_features == ["stage2"]  # saved before


# --------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------


def test_pretraining_output_loss_and_reconstruction():
    torch.manual_seed(0)
    model = RevColV2ForMaskedImageModeling(tiny()).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    out = model(pixel_values, noise=torch.rand(2, 16))
    assert out.predictions.shape == (2, 16, 8 * 8 * 3)
    assert out.bool_masked_pos.shape == (2, 16) and out.bool_masked_pos.sum(1).tolist() == [12, 12]
    assert out.reconstruction.shape == (2, 3, 32, 32)
    assert out.last_hidden_state.shape == (2, 17, 32)
    # norm-pix MSE on masked patches only (unbiased per-patch variance, eps 1e-6), by hand
    patches = patchify(pixel_values, 8)
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    target = (patches - mean) / torch.sqrt(var + 1e-6)
    per_patch = ((out.predictions - target) ** 2).mean(-1)
    mask = out.bool_masked_pos.float()
    assert max_abs_diff(out.loss, (per_patch * mask).sum() / mask.sum()) <= 1e-6
    assert max_abs_diff(out.patch_loss, per_patch) <= 1e-6
    # the reconstruction is the prediction un-normalised with the target patch statistics
    expected = unpatchify(out.predictions * torch.sqrt(var + 1e-6) + mean, 8, (4, 4))
    assert max_abs_diff(out.reconstruction, expected) <= 1e-5
    # bool_masked_pos gives the same mask; the generator masks 12 of 16
    again = model(pixel_values, bool_masked_pos=out.bool_masked_pos)
    assert torch.equal(again.bool_masked_pos, out.bool_masked_pos)
    generator = model.mask_generator()
    assert isinstance(generator, RandomMaskGenerator) and int(generator(torch.Generator().manual_seed(0)).sum()) == 12


def test_bottom_up_sees_only_visible_patches():
    """Changing what is under the mask changes no prediction: masked patches never enter the columns."""
    torch.manual_seed(0)
    model = RevColV2ForMaskedImageModeling(tiny()).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    bool_masked_pos = torch.arange(16).repeat(2, 1) % 4 != 0
    out = model(pixel_values, bool_masked_pos=bool_masked_pos)
    pixel_mask = unpatchify(bool_masked_pos.float()[..., None].expand(-1, -1, 192), 8, (4, 4)).bool()
    changed = torch.where(pixel_mask, torch.randn_like(pixel_values), pixel_values)
    out_changed = model(changed, bool_masked_pos=bool_masked_pos)
    assert torch.equal(out.predictions, out_changed.predictions)
    assert not torch.equal(model(changed).predictions, out.predictions)  # another mask -> other predictions


@pytest.mark.parametrize("use_reversible", [True, False])
def test_every_head_returns_the_same_hidden_states(use_reversible):
    """One meaning for `hidden_states` (issue 25): (embedding output, top level after each top-down
    column) from the base model, the classifier (which builds only the levels its top level reads) and
    the pretraining head (same count and shapes; it masks). Same weights: the same tensors."""
    torch.manual_seed(0)
    config = tiny(num_labels=3, use_reversible=use_reversible)
    pixel_values = torch.randn(2, 3, 32, 32)
    classifier = RevColV2ForImageClassification(config).eval()
    model = RevColV2Model(config).eval()
    missing, unexpected = model.load_state_dict(classifier.revcolv2.state_dict(), strict=False)
    assert unexpected == [] and all(".levels." in key or "mask_tokens" in key for key in missing)
    from_model = model(pixel_values, output_hidden_states=True).hidden_states
    from_classifier = classifier(pixel_values, output_hidden_states=True).hidden_states
    assert len(from_model) == len(from_classifier) == 1 + config.num_top_down_columns
    for a, b in zip(from_model, from_classifier):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    pretraining = RevColV2ForMaskedImageModeling(config).eval()(pixel_values, output_hidden_states=True)
    assert [h.shape[-1] for h in pretraining.hidden_states] == [h.shape[-1] for h in from_model]
    assert torch.equal(pretraining.hidden_states[-1], pretraining.last_hidden_state)


def test_model_classifier_and_backbone_shapes():
    torch.manual_seed(0)
    pixel_values = torch.randn(2, 3, 32, 32)
    model = RevColV2Model(tiny()).eval()
    out = model(pixel_values, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 17, 32) and out.pooler_output.shape == (2, 32)
    assert len(out.hidden_states) == 1 + 2 and torch.equal(out.hidden_states[-1], out.last_hidden_state)
    # no masking: features are deterministic
    assert torch.equal(model(pixel_values).pooler_output, out.pooler_output)
    with pytest.raises(ValueError, match="attention maps"):
        model(pixel_values, output_attentions=True)

    classifier = RevColV2ForImageClassification(tiny(num_labels=3)).train()
    result = classifier(pixel_values, labels=torch.tensor([0, 2]))
    assert result.logits.shape == (2, 3) and result.loss.ndim == 0
    result.loss.backward()
    assert classifier.revcolv2.bottom_up[0].levels[0].blocks[0].attn.qkv.weight.grad is not None
    cls_pooled = RevColV2Model(tiny(classifier_pooling="cls")).eval()(pixel_values).pooler_output
    assert cls_pooled.shape == (2, 32)

    backbone = RevColV2Backbone(tiny(out_features=["stem", "stage1", "stage4"])).eval()
    maps = backbone(pixel_values).feature_maps
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 4), (2, 32, 16, 16), (2, 32, 2, 2)]
    flat = RevColV2Backbone(tiny(backbone_pyramid="none")).eval()
    assert [tuple(m.shape) for m in flat(pixel_values).feature_maps] == [(2, 32, 4, 4)] * 4


def test_backbone_pyramid_names_and_strides_follow_the_vit_backbones(tmp_path):
    """"multi_scale" as in backbone_common (the earlier "simple" of saved configs still loads as it), and
    `feature_strides` reported like the ViT backbones': what the maps measure."""
    assert tiny().backbone_pyramid == "multi_scale"
    config = tiny()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["backbone_pyramid"] = "simple"  # a config written before the rename
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert RevColV2Config.from_pretrained(tmp_path).backbone_pyramid == "multi_scale"
    pixel_values = torch.randn(1, 3, 64, 64)
    for overrides in ({}, {"out_features": ["stem", "stage2", "stage4"]}, {"backbone_pyramid": "none"}):
        backbone = RevColV2Backbone(tiny(**overrides)).eval()
        with torch.no_grad():
            maps = backbone(pixel_values).feature_maps
        assert [64 / m.shape[-1] for m in maps] == backbone.feature_strides, overrides
    assert RevColV2Backbone(tiny()).feature_strides == [2.0, 4.0, 8.0, 16.0]  # patch 8: strides 4..32 at patch 16
    norm = RevColV2Backbone(tiny()).resamplers[1][1]
    assert type(norm).__name__ == "ChannelLayerNorm"  # backbone_common's, not a copy


def test_upernet_runs_on_the_backbone():
    torch.manual_seed(0)
    config = UperNetConfig(
        backbone_config=tiny(), hidden_size=16, auxiliary_in_channels=32, auxiliary_channels=8, num_labels=5
    )
    model = UperNetForSemanticSegmentation(config)
    assert type(model.backbone) is RevColV2Backbone
    out = model(torch.randn(2, 3, 32, 32), labels=torch.randint(0, 5, (2, 32, 32)))
    assert out.logits.shape == (2, 5, 32, 32) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.backbone.revcolv2.top_down[0].alpha.grad is not None
    model.eval()
    assert model(torch.randn(1, 3, 48, 64)).logits.shape == (1, 5, 48, 64)  # any multiple of the patch


# --------------------------------------------------------------------------------------------------
# Saving, loading, Auto classes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head", [RevColV2Model, RevColV2ForMaskedImageModeling, RevColV2ForImageClassification, RevColV2Backbone]
)
def test_save_load_round_trip_is_exact(head, tmp_path):
    torch.manual_seed(0)
    model = head(tiny(num_labels=3)).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    kwargs = {"noise": torch.rand(2, 16)} if head is RevColV2ForMaskedImageModeling else {}
    before = model(pixel_values, **kwargs)
    model.save_pretrained(tmp_path)
    loaded = head.from_pretrained(tmp_path).eval()
    after = loaded(pixel_values, **kwargs)
    for name in ("last_hidden_state", "pooler_output", "loss", "predictions", "reconstruction", "logits"):
        if getattr(before, name, None) is not None:
            assert torch.equal(getattr(before, name), getattr(after, name)), name
    if head is RevColV2Backbone:
        assert all(torch.equal(a, b) for a, b in zip(before.feature_maps, after.feature_maps))
        assert loaded.config.out_features == model.config.out_features


def test_pretraining_checkpoint_loads_into_the_classifier_and_backbone(tmp_path):
    torch.manual_seed(0)
    pretrain = RevColV2ForMaskedImageModeling(tiny())
    with torch.no_grad():  # make every alpha and token differ from its initial value
        for param in pretrain.parameters():
            param.add_(0.01 * torch.randn_like(param))
    pretrain.save_pretrained(tmp_path / "pre")
    body = pretrain.revcolv2.state_dict()
    classifier, info = RevColV2ForImageClassification.from_pretrained(
        tmp_path / "pre", num_labels=4, output_loading_info=True
    )
    for name, tensor in classifier.revcolv2.state_dict().items():
        if not name.startswith("pooler."):
            assert torch.equal(tensor, body[name]), name
    assert sorted(info["missing_keys"]) == sorted(
        ["classifier.weight", "classifier.bias", "revcolv2.pooler.fc_norm.weight", "revcolv2.pooler.fc_norm.bias"]
    )
    assert all(k.startswith("decoder.") for k in info["unexpected_keys"])
    assert torch.equal(classifier.revcolv2.pooler.fc_norm.weight, torch.ones(32))
    assert classifier.classifier.weight.abs().max() < 1e-3  # the small fine-tuning head init
    backbone = RevColV2Backbone.from_pretrained(tmp_path / "pre")
    for name, tensor in backbone.revcolv2.state_dict().items():
        assert torch.equal(tensor, body[name]), name

    # The classifier builds only what its output needs (no mask tokens, no level after the top one in
    # the last top-down column: under DDP they would get no gradient), so those come back missing.
    assert classifier.revcolv2.mask_tokens is None
    assert [len(column.levels) for column in classifier.revcolv2.top_down] == [2, 1]  # what the top level reads
    classifier.save_pretrained(tmp_path / "cls")
    back, info = RevColV2ForMaskedImageModeling.from_pretrained(tmp_path / "cls", output_loading_info=True)
    kept = classifier.revcolv2.state_dict()
    for name, tensor in back.revcolv2.state_dict().items():
        if name in kept:
            assert torch.equal(tensor, body[name]), name
    not_in_classifier = {"revcolv2." + name for name in body if name not in kept and not name.startswith("pooler.")}
    assert not_in_classifier and all(
        re.match(r"revcolv2\.(mask_tokens\.|top_down\.1\.levels\.[123]\.|top_down\.0\.levels\.[23]\.)", name) for name in not_in_classifier
    )
    decoder = {"decoder.norm.bias", "decoder.norm.weight", "decoder.pred.bias", "decoder.pred.weight"}
    assert set(info["missing_keys"]) == decoder | not_in_classifier


def test_auto_classes_and_remote_backbone(tmp_path):
    config = tiny()
    assert type(AutoModel.from_config(config)) is RevColV2Model
    assert type(AutoModelForMaskedImageModeling.from_config(config)) is RevColV2ForMaskedImageModeling
    assert type(AutoModelForImageClassification.from_config(config)) is RevColV2ForImageClassification
    assert type(AutoBackbone.from_config(config)) is RevColV2Backbone
    torch.manual_seed(0)
    backbone = RevColV2Backbone(config).eval()
    folder = save_hub_folder(backbone, tmp_path)
    assert full_auto_map("revcolv2")["AutoBackbone"] == "modeling_revcolv2.RevColV2Backbone"
    assert (folder / "reversible.py").is_file()
    # transformers 5.23's AutoBackbone.from_pretrained asks the Hub `repo_exists` even for a local folder
    # (and offline that fails), so the folder's own class is loaded through the dynamic-module path.
    auto_map = AutoConfig.from_pretrained(folder, trust_remote_code=True).auto_map
    remote_class = get_class_from_dynamic_module(auto_map["AutoBackbone"], str(folder))
    remote = remote_class.from_pretrained(folder).eval()
    assert "hf_mim" not in type(remote).__module__
    pixel_values = torch.randn(1, 3, 32, 32)
    for a, b in zip(backbone(pixel_values).feature_maps, remote(pixel_values).feature_maps):
        assert torch.equal(a, b)


def test_wrong_image_size_is_a_clear_error_or_interpolated():
    model = RevColV2ForMaskedImageModeling(tiny()).eval()
    with pytest.raises(ValueError, match="image_size=32.*interpolate_pos_encoding"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model(torch.randn(1, 3, 36, 36), interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match="bool_masked_pos must have shape"):
        model(torch.randn(1, 3, 32, 32), bool_masked_pos=torch.zeros(1, 9, dtype=torch.bool))
    out = model(torch.randn(1, 3, 48, 64), interpolate_pos_encoding=True)
    assert out.predictions.shape == (1, 6 * 8, 192) and out.reconstruction.shape == (1, 3, 48, 64)
    backbone = RevColV2Model(tiny()).eval()
    assert backbone(torch.randn(2, 3, 48, 48), interpolate_pos_encoding=True).last_hidden_state.shape == (2, 37, 32)


def test_layer_ids_follow_revcol_v1_grid_depth():
    from hf_mim.training.optim import layer_decay_param_groups

    model = RevColV2ForImageClassification(tiny(blocks_per_level=[1, 2, 1, 1], num_labels=2))
    layer_id = model.layer_id_for_lr_decay
    assert model.config.num_hidden_layers == 5 + 4 - 1
    assert layer_id("revcolv2.embeddings.patch_embeddings.projection.weight") == 0
    assert layer_id("revcolv2.bottom_up.0.levels.0.blocks.0.attn.qkv.weight") == 1
    assert layer_id("revcolv2.bottom_up.1.levels.1.blocks.1.mlp.fc1.weight") == 2 + 1 + 1  # block 2, column 1
    assert layer_id("revcolv2.bottom_up.1.alpha") == 2
    # top-down levels are stored top first: position 2 is level 1 (two blocks), after levels 3 and 2
    assert layer_id("revcolv2.top_down.0.levels.2.fusion.up.0.weight") == 2 + 2 + 1
    assert layer_id("revcolv2.top_down.1.levels.3.blocks.0.norm1.weight") == 4 + 3 + 1
    assert layer_id("classifier.weight") == model.config.num_hidden_layers + 1
    groups = layer_decay_param_groups(
        model, 0.05, 0.75, num_layers=model.config.num_hidden_layers, layer_id_fn=layer_id
    )
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
