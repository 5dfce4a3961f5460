"""Unit tests of the shared model core: position tables, embeddings, attention, blocks, gradient
checkpointing, masking, objectives and config validation.

Numerics are checked against hand computations or independent re-derivations (numpy / plain torch
written here from the papers' descriptions), never against the code under test itself.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hf_mim.masking_blockwise as masking_blockwise
from hf_mim import DbotConfig, DbotForMaskedImageModeling, DbotModel
from hf_mim.masking import indices_from_bool_masked_pos, num_visible_patches, random_masking, RandomMaskGenerator
from hf_mim.masking_blockwise import BlockwiseMaskGenerator
from hf_mim.vit_blocks import (
    Attention,
    Block,
    drop_path,
    drop_path_rates,
    DropPath,
    init_vit_weights,
    LayerScale,
    make_blocks,
    PatchEmbeddings,
    resize_position_table,
    sincos_1d_table,
    sincos_2d_table,
    VisionEmbeddings,
)
from hf_mim.objectives import (
    masked_mse,
    normalize_per_token,
    patchify,
    pixel_targets,
    smooth_l1,
    unpatchify,
    weighted_token_mean,
)


def tiny_config(**overrides) -> DbotConfig:
    return DbotConfig.from_preset("tiny", **overrides)


# ==================================================================================================
# 1. 2-D sin-cos position tables
# ==================================================================================================


def reference_1d(width: int, positions: np.ndarray) -> np.ndarray:
    """MAE's 1-D table, from the description: omega_i = 1 / 10000^(i / (d/2)), i < d/2;
    emb(pos) = [sin(pos * omega), cos(pos * omega)]."""
    half = width // 2
    omega = np.array([1.0 / 10000 ** (i / half) for i in range(half)], dtype=np.float64)
    out = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def reference_2d(width: int, grid_h: int, grid_w: int, cls_token: bool = True) -> np.ndarray:
    """MAE's `get_2d_sincos_pos_embed`, generalised to a non-square grid: meshgrid(grid_w, grid_h)
    ('xy' indexing, so grid[0] holds the column index and grid[1] the row index, both (grid_h, grid_w));
    the first half of the channels encodes grid[0], the second half grid[1]; flattened row-major."""
    grid = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_h, grid_w)
    emb = np.concatenate([reference_1d(width // 2, grid[0]), reference_1d(width // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, width)), emb], axis=0)
    return emb


@pytest.mark.parametrize("width,grid_h,grid_w", [(16, 4, 4), (32, 3, 5), (8, 6, 2), (64, 14, 14), (12, 1, 3)])
def test_sincos_2d_matches_mae_reference(width, grid_h, grid_w):
    table = sincos_2d_table(width, grid_h, grid_w)
    assert table.shape == (1, 1 + grid_h * grid_w, width)
    assert table.dtype == torch.float32
    assert torch.equal(table[0, 0], torch.zeros(width))
    expected = torch.from_numpy(reference_2d(width, grid_h, grid_w)).float()
    torch.testing.assert_close(table[0], expected, rtol=0, atol=1e-6)


def test_sincos_2d_hand_values_and_layout():
    # D = 8: each half has a 1-D width of 4, so omega = (1, 1/100).
    grid_h, grid_w = 3, 5
    table = sincos_2d_table(8, grid_h, grid_w)[0]
    row, col = 1, 2
    token = table[1 + row * grid_w + col].double()
    expected = torch.tensor(
        [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02),  # column
         math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)],  # row
        dtype=torch.float64,
    )
    torch.testing.assert_close(token, expected, rtol=0, atol=1e-7)
    # Position (0, 0): sin = 0, cos = 1 in both halves.
    torch.testing.assert_close(table[1], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    # Same column, different rows: the first half (column code) is identical.
    assert torch.equal(table[1 + 0 * grid_w + 3, :4], table[1 + 2 * grid_w + 3, :4])
    assert not torch.equal(table[1 + 0 * grid_w + 3, 4:], table[1 + 2 * grid_w + 3, 4:])


def test_sincos_prefix_rows_and_1d_table():
    table = sincos_2d_table(16, 2, 3, num_prefix_tokens=0)
    assert table.shape == (1, 6, 16)
    torch.testing.assert_close(table[0], torch.from_numpy(reference_2d(16, 2, 3, cls_token=False)).float())
    table3 = sincos_2d_table(16, 2, 3, num_prefix_tokens=3)
    assert table3.shape == (1, 9, 16)
    assert torch.equal(table3[0, :3], torch.zeros(3, 16))
    assert torch.equal(table3[0, 3:], table[0])
    positions = torch.tensor([0.0, 1.0, 7.0])
    torch.testing.assert_close(
        sincos_1d_table(6, positions), torch.from_numpy(reference_1d(6, positions.numpy())), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("width", [6, 10, 18])
def test_sincos_2d_width_not_divisible_by_4_raises(width):
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_table(width, 2, 2)


def test_sincos_1d_odd_width_raises():
    with pytest.raises(ValueError, match="even"):
        sincos_1d_table(5, torch.arange(3.0))


# ==================================================================================================
# 2. Patch embedding, VisionEmbeddings, position-table resizing
# ==================================================================================================


def test_patch_embeddings_equal_hand_projection():
    torch.manual_seed(0)
    patch, channels, dim = 4, 3, 10
    embed = PatchEmbeddings(image_size=12, patch_size=patch, num_channels=channels, embed_dim=dim)
    pixels = torch.randn(2, channels, 12, 8)  # non-square: 3 x 2 grid
    out = embed(pixels)
    assert out.shape == (2, 6, dim)
    weight = embed.projection.weight.reshape(dim, -1)  # (D, C*p*p), C slowest
    for b in range(2):
        for row in range(3):
            for col in range(2):
                crop = pixels[b, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch].reshape(-1)
                expected = weight @ crop + embed.projection.bias
                torch.testing.assert_close(out[b, row * 2 + col], expected, rtol=1e-5, atol=1e-5)


def test_patch_embeddings_input_errors():
    embed = PatchEmbeddings(image_size=32, patch_size=8, num_channels=3, embed_dim=16)
    with pytest.raises(ValueError, match=r"2 channels but the config says num_channels=3"):
        embed.check_pixel_values(torch.zeros(1, 2, 32, 32), False)
    with pytest.raises(ValueError, match=r"shape \(batch, 3, height, width\)"):
        embed.check_pixel_values(torch.zeros(3, 32, 32), False)
    with pytest.raises(ValueError, match=r"30x32 is not a multiple of patch_size=8"):
        embed.check_pixel_values(torch.zeros(1, 3, 30, 32), False)
    with pytest.raises(ValueError, match=r"30x32 is not a multiple of patch_size=8"):
        embed.check_pixel_values(torch.zeros(1, 3, 30, 32), True)  # interpolation does not rescue it
    with pytest.raises(ValueError, match=r"does not match the model's image_size=32.*interpolate_pos_encoding=True"):
        embed.check_pixel_values(torch.zeros(1, 3, 48, 32), False)
    assert embed.check_pixel_values(torch.zeros(1, 3, 48, 32), True) == (6, 4)
    assert embed.check_pixel_values(torch.zeros(1, 3, 32, 32), False) == (4, 4)


def test_model_forward_input_errors():
    model = DbotModel(tiny_config()).eval()
    with pytest.raises(ValueError, match="num_channels"):
        model(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="image_size=32"):
        model(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ValueError, match="multiple of patch_size=8"):
        model(torch.zeros(1, 3, 36, 36), interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match="pixel_values"):
        model(None)


def test_vision_embeddings_forward_layout():
    torch.manual_seed(0)
    emb = VisionEmbeddings(image_size=16, patch_size=4, num_channels=3, embed_dim=8)
    nn.init.normal_(emb.position_embeddings)
    nn.init.normal_(emb.cls_token)
    pixels = torch.randn(2, 3, 16, 16)
    out = emb(pixels)
    assert out.shape == (2, 1 + 16, 8)
    patches = emb.patch_embeddings(pixels)
    torch.testing.assert_close(out[:, 1:], patches + emb.position_embeddings[:, 1:])
    torch.testing.assert_close(out[:, 0], (emb.cls_token + emb.position_embeddings[:, :1])[:, 0].expand(2, -1))
    # interpolate_pos_encoding at the native size changes nothing
    torch.testing.assert_close(emb(pixels, interpolate_pos_encoding=True), out, rtol=0, atol=0)
    # no cls token: only patches
    emb_nocls = VisionEmbeddings(16, 4, 3, 8, use_cls_token=False)
    assert emb_nocls.num_prefix_tokens == 0
    assert emb_nocls.position_embeddings.shape == (1, 16, 8)
    assert emb_nocls(pixels).shape == (2, 16, 8)


def test_vision_embeddings_interpolate_other_sizes():
    emb = VisionEmbeddings(image_size=16, patch_size=4, num_channels=3, embed_dim=8)
    init_vit_weights(emb)
    for height, width in [(24, 16), (8, 12), (32, 32)]:
        out = emb(torch.randn(2, 3, height, width), interpolate_pos_encoding=True)
        assert out.shape == (2, 1 + (height // 4) * (width // 4), 8)
        assert torch.isfinite(out).all()


def test_model_interpolate_pos_encoding_other_size():
    model = DbotModel(tiny_config()).eval()
    out = model(torch.randn(2, 3, 48, 32), interpolate_pos_encoding=True)
    assert out.last_hidden_state.shape == (2, 1 + 6 * 4, 32)
    assert out.pooler_output.shape == (2, 32)


def test_resize_position_table():
    torch.manual_seed(0)
    table = torch.randn(1, 1 + 16, 8)
    assert resize_position_table(table, 1, 4, 4) is table
    resized = resize_position_table(table, 1, 6, 3)
    assert resized.shape == (1, 1 + 18, 8)
    assert torch.equal(resized[:, 0], table[:, 0])  # the prefix row is untouched
    # Interpolating a constant table gives the same constant (interpolation weights sum to 1).
    constant = torch.cat([torch.zeros(1, 1, 4), torch.full((1, 9, 4), 2.5)], dim=1)
    torch.testing.assert_close(resize_position_table(constant, 1, 5, 7)[:, 1:], torch.full((1, 35, 4), 2.5))
    # Without a prefix
    resized0 = resize_position_table(table[:, 1:], 0, 2, 2)
    assert resized0.shape == (1, 4, 8)
    # Upsampling then reading back the original grid: bicubic at integer scale 2 keeps the structure;
    # a table that varies only along columns keeps varying only along columns.
    cols_only = torch.arange(4.0).repeat(4).reshape(1, 16, 1).expand(1, 16, 2).contiguous()
    up = resize_position_table(cols_only, 0, 8, 8).reshape(8, 8, 2)
    torch.testing.assert_close(up, up[:1].expand(8, 8, 2))
    with pytest.raises(ValueError, match="not a square grid"):
        resize_position_table(torch.randn(1, 1 + 12, 8), 1, 4, 4)


# ==================================================================================================
# 3. Attention
# ==================================================================================================


def hand_attention(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(d)) V per head, with the fused qkv weight split in rows [q; k; v]."""
    batch, length, dim = x.shape
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    w_q, w_k, w_v = attn.qkv.weight.split(dim, dim=0)
    b_q, b_k, b_v = attn.qkv.bias.split(dim, dim=0)
    q, k, v = x @ w_q.T + b_q, x @ w_k.T + b_k, x @ w_v.T + b_v
    outs, probs = [], []
    for h in range(heads):
        sl = slice(h * head_dim, (h + 1) * head_dim)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(head_dim)
        p = torch.softmax(scores, dim=-1)
        probs.append(p)
        outs.append(p @ v[..., sl])
    out = torch.cat(outs, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    return out, torch.stack(probs, dim=1)


@pytest.fixture
def attn_config():
    return tiny_config()


def randomize(module: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("implementation", ["eager", "sdpa", None])
def test_attention_equals_hand_softmax(attn_config, implementation):
    attn_config._attn_implementation = implementation
    attn = Attention(attn_config, dim=32, num_heads=2).eval()
    randomize(attn)
    x = torch.randn(3, 7, 32)
    out, weights = attn(x)
    assert weights is None
    expected, _ = hand_attention(attn, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_attention_eager_vs_sdpa_and_weights(attn_config):
    attn_config._attn_implementation = "eager"
    attn = Attention(attn_config, dim=32, num_heads=4).eval()
    randomize(attn, seed=1)
    x = torch.randn(2, 9, 32)
    eager_out, _ = attn(x)
    attn_config._attn_implementation = "sdpa"
    sdpa_out, _ = attn(x)
    assert (eager_out - sdpa_out).abs().max() < 1e-5
    # Asking for the weights works under sdpa too (that call runs eager).
    out, weights = attn(x, output_attentions=True)
    assert weights.shape == (2, 4, 9, 9)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 9))
    assert (weights >= 0).all()
    expected_out, expected_weights = hand_attention(attn, x)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)


def test_attention_mask_and_bias_are_added(attn_config):
    attn_config._attn_implementation = "eager"
    attn = Attention(attn_config, dim=32, num_heads=2).eval()
    randomize(attn, seed=2)
    x = torch.randn(1, 5, 32)
    # A -inf bias on key 0 removes it from the softmax.
    bias = torch.zeros(1, 1, 5, 5)
    bias[..., 0] = float("-inf")
    _, weights = attn(x, attention_bias=bias, output_attentions=True)
    assert torch.equal(weights[..., 0], torch.zeros(1, 2, 5))
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 5))
    out_eager, _ = attn(x, attention_bias=bias)
    attn_config._attn_implementation = "sdpa"
    out_sdpa, _ = attn(x, attention_bias=bias)
    assert (out_eager - out_sdpa).abs().max() < 1e-5


def test_block_eager_vs_sdpa(attn_config):
    attn_config._attn_implementation = "eager"
    block = Block(attn_config, dim=32, num_heads=2, layer_scale_init_value=0.5).eval()
    randomize(block, seed=3)
    x = torch.randn(2, 17, 32)
    eager_out, _ = block(x)
    attn_config._attn_implementation = "sdpa"
    sdpa_out, _ = block(x)
    assert (eager_out - sdpa_out).abs().max() < 1e-5


def test_from_pretrained_attn_implementations_agree(tmp_path):
    torch.manual_seed(0)
    DbotModel(tiny_config()).save_pretrained(tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = DbotModel.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert model.config._attn_implementation == implementation
        attention = model.encoder.layers[0].attn
        assert attention.config._attn_implementation == implementation
        with torch.no_grad():
            outputs[implementation] = model(pixels).last_hidden_state
    assert (outputs["eager"] - outputs["sdpa"]).abs().max() < 1e-5
    # sdpa really goes through torch's fused kernel
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
        model(pixels)
    assert len(calls) == tiny_config().num_hidden_layers


def test_model_output_attentions_shapes():
    model = DbotModel(tiny_config(), add_pooling_layer=False).eval()
    out = model(torch.randn(2, 3, 32, 32), output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 2
    for weights in out.attentions:
        assert weights.shape == (2, 2, 17, 17)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 17))
    assert len(out.hidden_states) == 3  # input + one per block


# ==================================================================================================
# 4. Block: drop path, layer scale
# ==================================================================================================


def test_drop_path_function():
    torch.manual_seed(0)
    x = torch.randn(400, 3, 5)
    assert drop_path(x, 0.3, training=False) is x
    assert drop_path(x, 0.0, training=True) is x
    out = drop_path(x, 0.3, training=True)
    kept = torch.tensor([torch.allclose(out[i], x[i] / 0.7) for i in range(400)])
    dropped = torch.tensor([torch.equal(out[i], torch.zeros(3, 5)) for i in range(400)])
    assert (kept ^ dropped).all()  # whole samples: either rescaled or zero
    assert 0.2 < dropped.float().mean() < 0.4
    module = DropPath(0.3)
    module.eval()
    assert torch.equal(module(x), x)
    assert "0.3" in repr(module)


def test_block_drop_path_train_and_eval(attn_config):
    torch.manual_seed(0)
    rate = 0.5
    block = Block(attn_config, dim=32, num_heads=2, drop_path_rate=rate)
    randomize(block, seed=4)
    x = torch.randn(64, 5, 32)
    scale = 1 / (1 - rate)

    with torch.no_grad():
        block.eval()
        attn_branch = block.attn(block.norm1(x))[0]

        def after(keep_attn: float, keep_mlp: float) -> torch.Tensor:
            h = x + keep_attn * attn_branch
            return h + keep_mlp * block.mlp(block.norm2(h))

        expected_eval = after(1.0, 1.0)
        torch.testing.assert_close(block(x)[0], expected_eval, rtol=1e-5, atol=1e-5)

        block.train()
        out = block(x)[0]
        # Each sample must equal exactly one of the four (attention kept?, mlp kept?) outcomes.
        combos = [(a, m) for a in (False, True) for m in (False, True)]
        matches = torch.stack(
            [
                torch.isclose(out, after(scale * a, scale * m), rtol=1e-5, atol=1e-5).flatten(1).all(1)
                for a, m in combos
            ],
            dim=1,
        )  # (B, 4)
    assert (matches.sum(1) == 1).all(), matches
    outcomes = [combos[i] for i in matches.float().argmax(1).tolist()]
    # both branches are dropped independently, and both kept and dropped states occur
    assert {o[0] for o in outcomes} == {False, True}
    assert {o[1] for o in outcomes} == {False, True}
    assert not torch.allclose(out, expected_eval)


def test_drop_path_rates_linear():
    assert drop_path_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert drop_path_rates(0.2, 1) == [0.0]
    assert drop_path_rates(0.5, 0) == []
    blocks = make_blocks(tiny_config(), dim=32, depth=5, num_heads=2, drop_path_rate=0.4)
    assert isinstance(blocks[0].drop_path, nn.Identity)  # rate 0 -> no DropPath module
    rates = [b.drop_path.drop_prob for b in list(blocks)[1:]]
    assert rates == pytest.approx([0.1, 0.2, 0.3, 0.4])
    model = DbotModel(tiny_config(num_hidden_layers=3, drop_path_rate=0.2))
    assert isinstance(model.encoder.layers[0].drop_path, nn.Identity)
    assert [layer.drop_path.drop_prob for layer in list(model.encoder.layers)[1:]] == pytest.approx([0.1, 0.2])


def test_layer_scale(attn_config):
    scale = LayerScale(6, 0.1)
    assert torch.equal(scale.gamma, torch.full((6,), 0.1))
    with torch.no_grad():
        scale.gamma.copy_(torch.arange(6.0))
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(scale(x), x * torch.arange(6.0))
    init_vit_weights(scale)
    assert torch.equal(scale.gamma, torch.full((6,), 0.1))

    block = Block(attn_config, dim=32, num_heads=2, layer_scale_init_value=1e-2).eval()
    plain = Block(attn_config, dim=32, num_heads=2).eval()
    assert isinstance(block.ls1, LayerScale) and isinstance(block.ls2, LayerScale)
    assert isinstance(plain.ls1, nn.Identity) and isinstance(plain.ls2, nn.Identity)
    randomize(block, seed=5)
    gamma1, gamma2 = torch.linspace(-1, 1, 32), torch.linspace(2, 0, 32)
    with torch.no_grad():
        block.ls1.gamma.copy_(gamma1)
        block.ls2.gamma.copy_(gamma2)
        x = torch.randn(2, 5, 32)
        h = x + gamma1 * block.attn(block.norm1(x))[0]
        expected = h + gamma2 * block.mlp(block.norm2(h))
        torch.testing.assert_close(block(x)[0], expected, rtol=1e-5, atol=1e-5)
        block.apply(init_vit_weights)
    assert torch.equal(block.ls1.gamma, torch.full((32,), 1e-2))
    assert torch.equal(block.ls2.gamma, torch.full((32,), 1e-2))


# ==================================================================================================
# 5. Gradient checkpointing
# ==================================================================================================


def _loss_and_grads(model, pixels, noise):
    model.zero_grad(set_to_none=True)
    loss = model(pixels, noise=noise).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("method", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_gradient_checkpointing_same_loss_and_grads(method):
    torch.manual_seed(0)
    model = DbotForMaskedImageModeling(tiny_config()).train()
    if not hasattr(model, method):
        pytest.skip(f"{method} is not available in this transformers")
    pixels = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    loss_ref, grads_ref = _loss_and_grads(model, pixels, noise)
    assert len(grads_ref) > 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is a deprecated alias
        getattr(model, method)()
    is_checkpointing = getattr(type(model), "is_activation_checkpointing", None)
    assert (model.is_activation_checkpointing if is_checkpointing is not None else model.is_gradient_checkpointing)
    student_blocks = list(model.dbot.encoder.layers) + list(model.decoder.layers)
    assert all(block.gradient_checkpointing for block in student_blocks)
    calls = []
    for block in student_blocks:
        original = block._gradient_checkpointing_func

        def counting(*args, _original=original, **kwargs):
            calls.append(1)
            return _original(*args, **kwargs)

        block._gradient_checkpointing_func = counting
    model.train()
    loss_ckpt, grads_ckpt = _loss_and_grads(model, pixels, noise)
    assert len(calls) >= len(student_blocks)  # the checkpointed path was really taken
    torch.testing.assert_close(loss_ckpt, loss_ref, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads_ckpt[name], grads_ref[name], rtol=1e-6, atol=1e-6, msg=name)
    # The frozen teacher and the fixed student position table get no gradient.
    assert not any(name.startswith("teacher.") for name in grads_ref)
    assert "dbot.encoder.embeddings.position_embeddings" not in grads_ref


# ==================================================================================================
# 6. Masking
# ==================================================================================================


def test_random_masking_hand_example():
    noise = torch.tensor([[0.5, 0.1, 0.9, 0.3], [0.2, 0.8, 0.0, 0.6]])
    ids_keep, ids_restore, bool_masked_pos = random_masking(noise, 0.5)
    assert ids_keep.tolist() == [[1, 3], [2, 0]]  # ascending noise, smallest kept, in that order
    assert bool_masked_pos.tolist() == [[True, False, True, False], [False, True, False, True]]
    # argsort: row 0 -> [1, 3, 0, 2]; its inverse -> [2, 0, 3, 1]; row 1 -> [2, 0, 3, 1] -> [1, 3, 0, 2]
    assert ids_restore.tolist() == [[2, 0, 3, 1], [1, 3, 0, 2]]


@pytest.mark.parametrize(
    "num_patches,ratio,len_keep", [(196, 0.75, 49), (16, 0.75, 4), (196, 0.9, 19), (196, 0.4, 117), (10, 0.0, 10)]
)
def test_random_masking_counts_and_permutations(num_patches, ratio, len_keep):
    assert num_visible_patches(num_patches, ratio) == len_keep
    generator = torch.Generator().manual_seed(num_patches)
    noise = torch.rand(4, num_patches, generator=generator)
    ids_keep, ids_restore, bool_masked_pos = random_masking(noise, ratio)
    assert ids_keep.shape == (4, len_keep)
    assert bool_masked_pos.dtype == torch.bool
    assert (bool_masked_pos.sum(1) == num_patches - len_keep).all()
    for b in range(4):
        order = sorted(range(num_patches), key=lambda i: noise[b, i].item())
        assert ids_keep[b].tolist() == order[:len_keep]
        expected_mask = torch.ones(num_patches, dtype=torch.bool)
        expected_mask[order[:len_keep]] = False
        assert torch.equal(bool_masked_pos[b], expected_mask)
        # ids_restore is the inverse permutation of the argsort
        inverse = [0] * num_patches
        for position, patch in enumerate(order):
            inverse[patch] = position
        assert ids_restore[b].tolist() == inverse
    # gathering [kept..., masked...] with ids_restore puts patches back in raster order
    shuffled = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), torch.arange(num_patches).expand(4, -1))


def test_indices_from_bool_masked_pos():
    mask = torch.tensor([[True, False, False, True, False, True], [False, True, True, False, True, False]])
    ids_keep, ids_restore, bool_masked_pos = indices_from_bool_masked_pos(mask)
    assert ids_keep.tolist() == [[1, 2, 4], [0, 3, 5]]  # raster order of the visible patches
    assert torch.equal(bool_masked_pos, mask)
    # ids_restore unshuffles [visible (raster)..., masked (raster)...] back to raster order
    for b in range(2):
        visible = (~mask[b]).nonzero().squeeze(1)
        hidden = mask[b].nonzero().squeeze(1)
        order = torch.cat([visible, hidden])
        assert torch.equal(order[ids_restore[b]], torch.arange(6))
    # a larger mask: visible patches in raster order, whatever the sort algorithm
    generator = torch.Generator().manual_seed(0)
    big = torch.stack([torch.randperm(196, generator=generator) < 147 for _ in range(3)])
    big_keep, big_restore, _ = indices_from_bool_masked_pos(big)
    for b in range(3):
        assert big_keep[b].tolist() == (~big[b]).nonzero().squeeze(1).tolist()
        order = torch.cat([(~big[b]).nonzero().squeeze(1), big[b].nonzero().squeeze(1)])
        assert torch.equal(order[big_restore[b]], torch.arange(196))
    # integer masks are accepted
    assert indices_from_bool_masked_pos(mask.long()).ids_keep.tolist() == [[1, 2, 4], [0, 3, 5]]
    with pytest.raises(ValueError, match=r"same number of patches.*\[2, 1\]"):
        indices_from_bool_masked_pos(torch.tensor([[True, True, False], [True, False, False]]))
    with pytest.raises(ValueError, match="batch, num_patches"):
        indices_from_bool_masked_pos(torch.zeros(6, dtype=torch.bool))


def test_model_bool_masked_pos_uses_raster_visible_patches():
    model = DbotModel(tiny_config(), add_pooling_layer=False).eval()
    pixels = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 5, 6, 15]] = True
    mask[1, [1, 2, 3, 4]] = True
    with torch.no_grad():
        out = model(pixels, bool_masked_pos=mask).last_hidden_state
        emb = model.encoder.embeddings(pixels)
        expected = []
        for b in range(2):
            tokens = torch.cat([emb[b, :1], emb[b, 1:][~mask[b]]])[None]
            for layer in model.encoder.layers:
                tokens = layer(tokens)[0]
            expected.append(model.encoder.layernorm(tokens))
    assert out.shape == (2, 1 + 12, 32)
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same number of patches"):
        model(pixels, bool_masked_pos=torch.tensor([[True] + [False] * 15, [False] * 16]))


def test_random_mask_generator():
    gen = RandomMaskGenerator(14, 0.75)
    masks = [gen(torch.Generator().manual_seed(seed)) for seed in range(20)]
    for mask in masks:
        assert mask.shape == (196,) and mask.dtype == torch.bool
        assert int(mask.sum()) == 196 - 49
    assert torch.equal(gen(torch.Generator().manual_seed(3)), masks[3])
    assert len({tuple(m.tolist()) for m in masks}) == 20
    assert int(RandomMaskGenerator(4, 0.6)(torch.Generator().manual_seed(0)).sum()) == 16 - int(16 * 0.4)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="mask_ratio"):
            RandomMaskGenerator(14, bad)


def test_blockwise_exact_count_and_reproducible():
    gen = BlockwiseMaskGenerator(14, 75)
    masks = []
    for seed in range(200):
        mask = gen(torch.Generator().manual_seed(seed))
        assert mask.shape == (196,) and mask.dtype == torch.bool
        assert int(mask.sum()) == 75, seed
        masks.append(mask)
    assert torch.equal(gen(torch.Generator().manual_seed(7)), masks[7])
    assert len({tuple(m.tolist()) for m in masks}) == 200
    # Non-square grid, other counts
    rect = BlockwiseMaskGenerator((6, 10), 24)
    for seed in range(30):
        assert int(rect(torch.Generator().manual_seed(seed)).sum()) == 24
    assert int(BlockwiseMaskGenerator(14, 0)().sum()) == 0
    assert int(BlockwiseMaskGenerator(4, 16)(torch.Generator().manual_seed(0)).sum()) == 16


def test_blockwise_blocks_shape_and_top_up(monkeypatch):
    gen = BlockwiseMaskGenerator(14, 75)
    randint_calls: list[tuple[int, int]] = []
    original_randint = masking_blockwise._randint

    def recording_randint(generator, low, high_inclusive):
        value = original_randint(generator, low, high_inclusive)
        randint_calls.append((high_inclusive, value))
        return value

    monkeypatch.setattr(masking_blockwise, "_randint", recording_randint)
    placed: list[tuple[int, int, int, int]] = []
    original_place = gen._place_block

    def recording_place(mask, max_new, generator):
        randint_calls.clear()
        new = original_place(mask, max_new, generator)
        if new:
            (high_top, top), (high_left, left) = randint_calls[-2:]
            placed.append((top, left, gen.height - high_top, gen.width - high_left))
        return new

    gen._place_block = recording_place
    block_counts = []
    for seed in range(100):
        placed.clear()
        block_only = gen(torch.Generator().manual_seed(seed), top_up=False)
        assert placed, "at least one block is placed"
        union = torch.zeros(14, 14, dtype=torch.bool)
        for top, left, h, w in placed:
            assert h * w >= 16
            assert 1 <= h < 14 and 1 <= w < 14
            assert 0 <= top <= 14 - h and 0 <= left <= 14 - w
            # aspect h/w in [0.3, 1/0.3] before rounding each side to the nearest integer
            assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 + 1e-9
            assert (h + 0.5) / max(w - 0.5, 1e-9) >= 0.3 - 1e-9
            union[top : top + h, left : left + w] = True
        assert torch.equal(union.flatten(), block_only)  # the block phase is exactly those rectangles
        block_counts.append(int(block_only.sum()))
        assert block_counts[-1] <= 75
        full = gen(torch.Generator().manual_seed(seed), top_up=True)
        assert int(full.sum()) == 75
        assert torch.equal(full & block_only, block_only)  # the top-up only adds patches
    assert sum(block_counts) / len(block_counts) > 60  # blocks do most of the work (BEiT's loop)


@pytest.mark.parametrize("count", [-1, 197, 1000])
def test_blockwise_out_of_range_raises(count):
    with pytest.raises(ValueError, match="num_masking_patches"):
        BlockwiseMaskGenerator(14, count)


# ==================================================================================================
# 7. Objectives
# ==================================================================================================


def mae_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """MAE's patchify ('nchpwq->nhwpqc'), generalised to non-square images."""
    n, c, height, width = imgs.shape
    h, w = height // p, width // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


@pytest.mark.parametrize("patch,height,width,channels", [(4, 16, 16, 3), (2, 6, 10, 3), (8, 16, 32, 1), (3, 9, 6, 2)])
def test_patchify_layout_and_round_trip(patch, height, width, channels):
    torch.manual_seed(patch + height)
    imgs = torch.randn(2, channels, height, width)
    patches = patchify(imgs, patch)
    assert patches.shape == (2, (height // patch) * (width // patch), patch * patch * channels)
    assert torch.equal(patches, mae_patchify(imgs, patch))
    assert torch.equal(unpatchify(patches, patch, (height // patch, width // patch), channels), imgs)


def test_patchify_hand_layout():
    # one 2x2 patch of 2 channels: vector order is (row, column, channel)
    img = torch.arange(8.0).reshape(1, 2, 2, 2)  # c, y, x
    assert patchify(img, 2).tolist() == [[[0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]]]
    # two patches side by side: raster order
    img = torch.arange(8.0).reshape(1, 1, 2, 4)
    assert patchify(img, 2).tolist() == [[[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0]]]
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patchify(torch.zeros(1, 3, 10, 8), 4)
    with pytest.raises(ValueError, match="do not fit"):
        unpatchify(torch.zeros(1, 4, 48), 4, (2, 3), 3)


def test_normalize_per_token_unbiased_with_eps_inside_sqrt():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=torch.float64)
    # mean 3, squared deviations 4, 1, 0, 9 -> unbiased variance 14 / 3
    eps = 0.5
    expected = (x - 3.0) / math.sqrt(14 / 3 + eps)
    torch.testing.assert_close(normalize_per_token(x, eps=eps), expected)
    # biased variance 14 / 4 when asked
    torch.testing.assert_close(normalize_per_token(x, eps=eps, unbiased=False), (x - 3.0) / math.sqrt(3.5 + eps))

    torch.manual_seed(0)
    for dim in (2, 3, 4, 8):
        tokens = torch.randn(5, 7, dim, dtype=torch.float64)
        ours = normalize_per_token(tokens, eps=1e-12)
        layer_norm = F.layer_norm(tokens, (dim,), eps=1e-12)
        torch.testing.assert_close(ours, layer_norm * math.sqrt((dim - 1) / dim))
        assert not torch.allclose(ours, layer_norm, atol=1e-3)
        torch.testing.assert_close(ours.var(dim=-1), torch.ones(5, 7, dtype=torch.float64))


def test_pixel_targets_norm_pix():
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 8, 12)
    plain = pixel_targets(imgs, 4, norm_pix=False)
    assert torch.equal(plain, mae_patchify(imgs, 4))
    normed = pixel_targets(imgs, 4, norm_pix=True)
    # MAE: mean / var(unbiased) per patch, (target - mean) / (var + 1e-6) ** 0.5
    mean = plain.mean(dim=-1, keepdim=True)
    var = ((plain - mean) ** 2).sum(-1, keepdim=True) / (plain.shape[-1] - 1)
    torch.testing.assert_close(normed, (plain - mean) / (var + 1e-6) ** 0.5)
    torch.testing.assert_close(pixel_targets(imgs, 4, norm_pix=True, eps=1.0), (plain - mean) / (var + 1.0) ** 0.5)


def test_smooth_l1_beta_2_hand_values():
    target = torch.zeros(7)
    prediction = torch.tensor([0.0, 1.0, -1.0, 3.0, -3.0, 2.0, 0.5])
    expected = torch.tensor([0.0, 0.25, 0.25, 2.0, 2.0, 1.0, 0.0625])
    torch.testing.assert_close(smooth_l1(prediction, target, beta=2.0), expected)
    # shifted: the difference is what matters, and beta = 1 gives the classic Huber
    torch.testing.assert_close(smooth_l1(prediction + 5, target + 5, beta=2.0), expected)
    torch.testing.assert_close(
        smooth_l1(torch.tensor([0.5, 3.0]), torch.zeros(2), beta=1.0), torch.tensor([0.125, 2.5])
    )


def test_weighted_token_mean_and_masked_mse():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    weights = torch.tensor([[True, False, True], [False, False, True]])
    assert weighted_token_mean(loss, weights).item() == pytest.approx((1 + 3 + 6) / 3)
    assert weighted_token_mean(loss, torch.tensor([[0.5, 0, 0], [0, 0, 1.5]])).item() == pytest.approx(
        (0.5 + 9.0) / 2.0
    )
    zero = weighted_token_mean(loss, torch.zeros(2, 3))
    assert zero.item() == 0.0 and torch.isfinite(zero)

    prediction = torch.tensor([[[1.0, 1.0], [0.0, 2.0]], [[3.0, 0.0], [1.0, 1.0]]])
    target = torch.zeros(2, 2, 2)
    # per-token MSE over channels: [[1, 2], [4.5, 1]]
    mask = torch.tensor([[True, True], [True, False]])
    assert masked_mse(prediction, target, mask).item() == pytest.approx((1 + 2 + 4.5) / 3)
    assert masked_mse(prediction, target, torch.ones(2, 2)).item() == pytest.approx((1 + 2 + 4.5 + 1) / 4)


# ==================================================================================================
# 8. Config validation and presets
# ==================================================================================================


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(image_size=30), "image_size"),
        (dict(image_size=0), "image_size"),
        (dict(patch_size=0), "patch_size"),
        (dict(hidden_size=30), "hidden_size"),  # 2 heads divide 30, but sin-cos needs a multiple of 4
        (dict(hidden_size=36, num_attention_heads=8), "hidden_size"),
        (dict(decoder_hidden_size=18, decoder_num_attention_heads=4), "decoder_hidden_size"),
        (dict(num_attention_heads=0), "num_attention_heads"),
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(mask_ratio=-0.1), "mask_ratio"),
        (dict(mask_ratio=0.95), "mask_ratio"),  # int(16 * 0.05) = 0 visible patches
        (dict(teacher_depth=-1), "teacher_depth"),
        (dict(num_hidden_layers=-2), "num_hidden_layers"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(smooth_l1_beta=0.0), "smooth_l1_beta"),
        (dict(stage=-1), "stage"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
        (dict(target_norm_eps=-1.0), "target_norm_eps"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"\b{field}="):
        tiny_config(**overrides)


def test_config_no_visible_patch_message():
    with pytest.raises(ValueError, match="mask_ratio.*no visible patch"):
        tiny_config(mask_ratio=0.95)
    assert tiny_config(mask_ratio=0.9375).mask_ratio == 0.9375  # int(16 * 0.0625) = 1 visible patch
    with pytest.raises(ValueError, match="image_size=30.*multiple of patch_size=8"):
        tiny_config(image_size=30)
    with pytest.raises(ValueError, match="hidden_size=36.*num_attention_heads=8"):
        tiny_config(hidden_size=36, num_attention_heads=8)


@pytest.mark.parametrize(
    "preset,hidden,layers,heads,patch,teacher_depth",
    [
        ("small", 384, 12, 6, 16, 12),
        ("base", 768, 12, 12, 16, 12),
        ("large", 1024, 24, 16, 16, 0),
        ("huge", 1280, 32, 16, 14, 0),
    ],
)
def test_presets_official_dims(preset, hidden, layers, heads, patch, teacher_depth):
    config = DbotConfig.from_preset(preset)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (hidden, layers, heads)
    assert config.patch_size == patch
    assert config.image_size == 224
    assert config.teacher_depth == teacher_depth
    assert (config.decoder_hidden_size, config.decoder_num_hidden_layers, config.decoder_num_attention_heads) == (
        512,
        8,
        16,
    )
    assert config.mask_ratio == 0.75
    assert config.smooth_l1_beta == 2.0
    assert config.model_type == "dbot"


def test_presets_defaults_tiny_overrides_and_unknown():
    default = DbotConfig()
    base = DbotConfig.from_preset("base")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "teacher_depth",
                  "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads"):
        assert getattr(default, field) == getattr(base, field), field
    tiny = DbotConfig.from_preset("tiny")
    assert (tiny.image_size, tiny.patch_size, tiny.hidden_size) == (32, 8, 32)
    assert tiny.decoder_hidden_size != 512
    large = DbotConfig.from_preset("large", mask_ratio=0.6)
    assert large.mask_ratio == 0.6 and large.hidden_size == 1024
    # from_preset does not mutate the table
    assert "mask_ratio" not in DbotConfig.presets["large"]
    with pytest.raises(ValueError, match=r"Unknown preset 'gigantic'.*base.*huge.*large.*small.*tiny"):
        DbotConfig.from_preset("gigantic")
    with pytest.raises(ValueError, match="mask_ratio"):
        DbotConfig.from_preset("base", mask_ratio=1.0)


def test_config_round_trip(tmp_path):
    config = tiny_config(mask_ratio=0.5, teacher_depth=1)
    config.save_pretrained(tmp_path)
    loaded = DbotConfig.from_pretrained(tmp_path)
    assert loaded.mask_ratio == 0.5 and loaded.teacher_depth == 1 and loaded.hidden_size == 32


def test_relative_position_bias_resizes_for_another_grid():
    """Same grid: the table itself. Another grid: the distance part resized bilinearly per head (a table
    linear in the row distance stays linear in it, an exact property of bilinear resizing with
    align_corners=False on the half-pixel grid), the three cls rows kept, the index of the new grid."""
    from hf_mim.relative_position import RelativePositionBias, relative_position_index

    bias = RelativePositionBias((3, 3), num_heads=2)
    with torch.no_grad():
        bias.relative_position_bias_table.copy_(torch.randn_like(bias.relative_position_bias_table))
    assert bias.table_for((3, 3)) is bias.relative_position_bias_table
    same = bias((3, 3))
    table, index = bias.relative_position_bias_table, relative_position_index(3, 3)
    assert torch.equal(same[0, 1], table[index.reshape(-1), 1].reshape(10, 10))

    with torch.no_grad():  # head 0: constant 2.0; head 1: 0.5 per step of row distance
        rows = torch.arange(5, dtype=torch.float32).repeat_interleave(5)  # (2*3-1) x (2*3-1) distances
        table[:25, 0] = 2.0
        table[:25, 1] = 0.5 * rows
        table[25:] = torch.tensor([[7.0, 8.0], [9.0, 10.0], [11.0, 12.0]])
    resized = bias.table_for((5, 4))
    assert resized.shape == ((2 * 5 - 1) * (2 * 4 - 1) + 3, 2)
    torch.testing.assert_close(resized[:-3, 0], torch.full((63,), 2.0))
    assert torch.equal(resized[-3:], table[25:])
    row_values = resized[:-3, 1].reshape(9, 7)[:, 0]
    steps = row_values[1:-1].diff()  # away from the clamped borders the slope is the rescaled one
    torch.testing.assert_close(steps, torch.full_like(steps, 0.5 * 5 / 9))
    out = bias((5, 4))
    assert out.shape == (1, 2, 21, 21)
    assert torch.equal(out[0, 0, 0, 1:], torch.full((20,), 7.0))  # cls -> token row of head 0
    assert out[0, 0, 0, 0] == 11.0  # cls -> cls


def test_maskdistill_classifies_at_another_resolution_with_interpolation():
    import hf_mim

    torch.manual_seed(0)
    model = hf_mim.MaskDistillForImageClassification(hf_mim.MaskDistillConfig.from_preset("tiny", num_labels=3)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(pixels, interpolate_pos_encoding=True).logits, model(pixels).logits, rtol=0, atol=0)
    assert model(torch.randn(2, 3, 48, 40), interpolate_pos_encoding=True).logits.shape == (2, 3)
