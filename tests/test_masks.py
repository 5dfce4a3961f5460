"""One mask resolution per generator kind, one visible-patch check, one pixels inverse, one loss selector,
one "starts as a copy" helper (issue #13 item 3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_mim.masking import RandomMaskGenerator
from hf_mim.masking_attention import AttentionMaskGenerator
from hf_mim.masking_blockwise import BlockwiseMaskGenerator
from hf_mim.masking_disjoint import DisjointMaskGenerator
from hf_mim.vit_blocks import init_as_copy, starts_as_copy
from hf_mim.objectives import elementwise_loss, normalize_per_token, patchify, predictions_to_pixels
from hf_mim.auto import MODEL_FAMILIES


def per_example(generator_kind, batch_size: int, seed: int) -> torch.Tensor:
    """The collator's way: one draw per example, here all from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    draws = [generator_kind(generator) for _ in range(batch_size)]
    return torch.stack([draw[0].bool_masked_pos if isinstance(draw, tuple) else draw for draw in draws])


def mask_of(resolved) -> torch.Tensor:
    if isinstance(resolved, tuple) and hasattr(resolved[0], "bool_thrown_pos"):
        return resolved[0].bool_masked_pos  # AMT: (ThrowMasks, counts)
    return resolved if isinstance(resolved, torch.Tensor) else resolved.bool_masked_pos


GENERATORS = {
    "random": RandomMaskGenerator(4, 0.75),
    "blockwise": BlockwiseMaskGenerator(4, 6, min_num_patches=2),
    "disjoint": DisjointMaskGenerator(4, 0.75, 3),
    "independent": DisjointMaskGenerator(4, 0.5, 3, disjoint=False),
    "amt_warmup": AttentionMaskGenerator(4, 8, 1, 0.45, 0.4, 0.75, "floor"),
    "amt_simmim_units": AttentionMaskGenerator(4, 8, 2, 0.44, 0.26, 0.44, "ceil", strategy="random"),
}


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_batch_fallback_equals_per_example_draws_for_the_same_seed(kind):
    generator_kind = GENERATORS[kind]
    batch = generator_kind.masks(5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(mask_of(batch), per_example(generator_kind, 5, 7))
    # given masks win, unchanged
    given = per_example(generator_kind, 5, 8)
    assert torch.equal(mask_of(generator_kind.masks(5, bool_masked_pos=given)), given)


@pytest.mark.parametrize("name", ["dbot", "extrema", "revcolv2", "maskdistill", "amt"])
def test_every_pretraining_head_draws_its_masks_with_its_generator(name):
    """Without masks, `forward` masks exactly as `mask_generator().masks` does from the same RNG state."""
    family = MODEL_FAMILIES[name]
    config = family.config_class.from_preset("tiny", **({"target": "pixels"} if name == "maskdistill" else {}))
    model = family.masked_image_modeling_class(config).eval()
    pixel_values = torch.randn(3, 3, config.image_size, config.image_size)
    torch.manual_seed(3)
    with torch.no_grad():
        output = model(pixel_values)
    torch.manual_seed(3)
    expected = mask_of(model.mask_generator().masks(3))
    assert torch.equal(output.bool_masked_pos, expected)


NO_VISIBLE = r"^Invalid config value \w+=[\d.]+: leaves no visible (patch|mask unit) out of \d+"


@pytest.mark.parametrize(
    "build",
    [
        lambda: MODEL_FAMILIES["dbot"].config_class.from_preset("tiny", mask_ratio=0.97),
        lambda: MODEL_FAMILIES["revcolv2"].config_class.from_preset("tiny", mask_ratio=0.97),
        lambda: MODEL_FAMILIES["extrema"].config_class.from_preset("tiny", mask_ratio=0.97),
        lambda: RandomMaskGenerator(4, 0.97),
        lambda: DisjointMaskGenerator(4, 0.97, 1),
        lambda: AttentionMaskGenerator(4, 8, 1, 0.97, 0.0, 0.5, "floor", strategy="random"),
        lambda: AttentionMaskGenerator(4, 8, 1, 0.5, 0.3, 0.97, "floor"),  # warm-up ratio
        lambda: AttentionMaskGenerator(2, 8, 1, 0.5, 0.26, 0.5, "ceil"),  # ceil(2) + ceil(1.04) of 4 units
    ],
    ids=["dbot", "revcolv2", "extrema", "random", "disjoint", "amt_random", "amt_warmup", "amt_throw"],
)
def test_one_visible_patch_check_one_message_for_every_method(build):
    with pytest.raises(ValueError, match=NO_VISIBLE):
        build()


def test_predictions_to_pixels_inverts_norm_pix_targets_and_pastes_patches():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8)
    raw = patchify(images, 4)  # (2, 4, 48)
    for unbiased in (True, False):
        normalized = normalize_per_token(raw, eps=1e-6, unbiased=unbiased)
        back = predictions_to_pixels(normalized, raw, 4, (2, 2), 3, norm_eps=1e-6, unbiased=unbiased)
        torch.testing.assert_close(back, images, rtol=0, atol=1e-5)
    assert torch.equal(predictions_to_pixels(raw, raw, 4, (2, 2), 3, norm_eps=None), images)  # plain pixels
    ids = torch.tensor([[3, 0], [1, 2]])
    pasted = predictions_to_pixels(torch.gather(raw, 1, ids[..., None].expand(-1, -1, 48)), raw, 4, (2, 2), 3, None, patch_ids=ids)
    kept = torch.zeros(2, 4, 1)
    kept.scatter_(1, ids[..., None], 1.0)
    assert torch.equal(patchify(pasted, 4), raw * kept)  # the other patches are 0


def test_elementwise_loss_selector_hand_values():
    prediction, target = torch.tensor([0.5, 3.0, -2.0]), torch.zeros(3)
    assert elementwise_loss(prediction, target, "mse").tolist() == [0.25, 9.0, 4.0]
    assert elementwise_loss(prediction, target, "l1").tolist() == [0.5, 3.0, 2.0]
    assert elementwise_loss(prediction, target, "smooth_l1", beta=1.0).tolist() == [0.125, 2.5, 1.5]
    assert elementwise_loss(prediction, target, "smooth_l1", beta=2.0).tolist() == [0.0625, 2.0, 1.0]
    with pytest.raises(ValueError, match="loss must be one of 'mse', 'l1', 'smooth_l1', got 'huber'"):
        elementwise_loss(prediction, target, "huber")


def test_starts_as_copy_copies_namesakes_of_the_same_type_only():
    source = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    target = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3))
    starts_as_copy(target, source)
    assert list(target.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]  # no new submodule
    assert [init_as_copy(module) for module in target] == [True, False]  # index 1: another type
    assert torch.equal(target[0].weight, source[0].weight) and torch.equal(target[0].bias, source[0].bias)


@pytest.mark.parametrize(
    "name, copy_of",
    [
        ("dbot", lambda m: [(m.teacher, m.dbot.encoder)]),
        ("extrema", lambda m: [(m.momentum_encoder, m.extrema.encoder), (m.momentum_projector, m.projector)]),
    ],
)
def test_target_networks_start_as_copies(name, copy_of):
    family = MODEL_FAMILIES[name]
    model = family.masked_image_modeling_class(family.config_class.from_preset("tiny"))
    for target, source in copy_of(model):
        source_state = source.state_dict()
        for key, tensor in target.state_dict().items():
            assert torch.equal(tensor, source_state[key]), key
