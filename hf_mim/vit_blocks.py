"""The ViT building blocks every ViT-style method (dBOT, ExtreMA, MaskDistill, AMT, RevColV2's
decoder) assembles its encoder, teacher and decoder from: position tables, embeddings, attention,
block, encoder, MAE decoder, pooling, MAE initialisation. None of them re-implements these.

Model-zone file: copied next to checkpoints (Hub remote code); imports only torch and transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


# --------------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position tables (MAE / dBOT / ExtreMA construction)
# --------------------------------------------------------------------------------------------------


def sincos_1d_table(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(len(positions), embed_dim) table: sin of pos * omega in the first half, cos in the second."""
    if embed_dim % 2 != 0:
        raise ValueError(f"sin-cos position tables need an even width, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d_table(embed_dim: int, grid_height: int, grid_width: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """(1, num_prefix_tokens + H*W, embed_dim) float32 table; prefix (cls) rows are zero.

    Patch index = row * grid_width + column. The first half of the channels encodes the column, the
    second half the row: exactly the table MAE's `get_2d_sincos_pos_embed` builds (computed in float64
    and rounded once, as the official numpy code does).
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos position tables need a width divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid_height, dtype=torch.float64), torch.arange(grid_width, dtype=torch.float64), indexing="ij"
    )
    table = torch.cat([sincos_1d_table(embed_dim // 2, cols), sincos_1d_table(embed_dim // 2, rows)], dim=1)
    table = torch.cat([torch.zeros(num_prefix_tokens, embed_dim, dtype=torch.float64), table], dim=0)
    return table.to(torch.float32).unsqueeze(0)


def resize_position_table(
    table: torch.Tensor, num_prefix_tokens: int, grid_height: int, grid_width: int
) -> torch.Tensor:
    """Bicubically resize the patch part of a square (1, prefix + N, D) table to a new patch grid."""
    prefix, patches = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"position table with {patches.shape[1]} patch rows is not a square grid")
    if (grid_height, grid_width) == (side, side):
        return table
    dim = patches.shape[-1]
    patches = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(
        patches.to(torch.float32), size=(grid_height, grid_width), mode="bicubic", align_corners=False
    ).to(table.dtype)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, dim)
    return torch.cat([prefix, patches], dim=1)


# --------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------


class PatchEmbeddings(nn.Module):
    """Non-overlapping patches through a strided convolution, flattened row-major to (B, N, D)."""

    def __init__(self, image_size: int, patch_size: int, num_channels: int, embed_dim: int):
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.projection = nn.Conv2d(num_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def check_pixel_values(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> tuple[int, int]:
        """Validate the input and return its patch grid (rows, columns)."""
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.num_channels}, height, width), got {tuple(pixel_values.shape)}"
            )
        _, channels, height, width = pixel_values.shape
        if channels != self.num_channels:
            raise ValueError(
                f"pixel_values has {channels} channels but the config says num_channels={self.num_channels}"
            )
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"pixel_values of size {height}x{width} is not a multiple of patch_size={self.patch_size}"
            )
        if not interpolate_pos_encoding and (height, width) != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values of size {height}x{width} does not match the model's image_size={self.image_size}; "
                "resize the image or pass interpolate_pos_encoding=True"
            )
        return height // self.patch_size, width // self.patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.projection.weight.dtype)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class VisionEmbeddings(nn.Module):
    """Patch embedding + optional cls token + position table (fixed sin-cos or learned) + optional
    mask token (SimMIM/BEiT-style: masked patches are replaced by it before positions are added).

    `position_embeddings` is always a parameter of shape (1, num_prefix_tokens + N, D) so pretraining
    checkpoints (sin-cos, frozen) and fine-tuning checkpoints (learned) share one layout; whether it
    trains is decided by the head that owns it (`requires_grad_`).
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_channels: int,
        embed_dim: int,
        use_cls_token: bool = True,
        use_position_embeddings: bool = True,
        use_mask_token: bool = False,
    ):
        super().__init__()
        self.patch_embeddings = PatchEmbeddings(image_size, patch_size, num_channels, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_mask_token else None
        self.num_prefix_tokens = 1 if use_cls_token else 0
        self.embed_dim = embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_cls_token else None
        num_positions = self.num_prefix_tokens + self.patch_embeddings.num_patches
        self.position_embeddings = (
            nn.Parameter(torch.zeros(1, num_positions, embed_dim)) if use_position_embeddings else None
        )

    def sincos_table(self) -> torch.Tensor:
        grid = self.patch_embeddings.grid_size
        return sincos_2d_table(self.embed_dim, grid, grid, self.num_prefix_tokens)

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        bool_masked_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, prefix + N, D) tokens with positions added; cls (if any) first. `bool_masked_pos` (B, N)
        replaces those patches by the mask token (needs `use_mask_token`)."""
        grid_h, grid_w = self.patch_embeddings.check_pixel_values(pixel_values, interpolate_pos_encoding)
        patches = self.patch_embeddings(pixel_values)
        batch_size = patches.shape[0]
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("these embeddings have no mask token: build them with use_mask_token=True")
            if bool_masked_pos.shape != patches.shape[:2]:
                raise ValueError(
                    f"bool_masked_pos must have shape {tuple(patches.shape[:2])}, got {tuple(bool_masked_pos.shape)}"
                )
            masked = bool_masked_pos.to(device=patches.device, dtype=torch.bool).unsqueeze(-1)
            patches = torch.where(masked, self.mask_token.to(patches.dtype), patches)
        if self.position_embeddings is not None:
            positions = resize_position_table(self.position_embeddings, self.num_prefix_tokens, grid_h, grid_w)
            patches = patches + positions[:, self.num_prefix_tokens :]
        if self.cls_token is None:
            return patches
        cls = self.cls_token
        if self.position_embeddings is not None:
            cls = cls + self.position_embeddings[:, :1]
        return torch.cat([cls.expand(batch_size, -1, -1), patches], dim=1)


# --------------------------------------------------------------------------------------------------
# Transformer block
# --------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; returns (B, L, H, d) output and (B, H, L, L) weights."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    # float32 softmax for half precision (as transformers' eager kernels); float64 stays float64 (exact)
    weights = F.softmax(weights, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def attention_kernel(config, output_attentions: bool) -> Callable:
    """The attention function `config._attn_implementation` names ("eager", "sdpa", "flash_attention_2",
    ...) from transformers' interface; eager when weights are asked for, since only eager returns them."""
    implementation = config._attn_implementation or "eager"
    if output_attentions or implementation == "eager":
        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (rows [q; k; v], as timm and the official repos).

    The kernel comes from transformers' attention interface, chosen by `config._attn_implementation`
    ("eager", "sdpa", "flash_attention_2", ...). Attention weights are only materialised by eager
    attention, so a call that asks for them runs eager for that call.
    """

    is_causal = False

    def __init__(self, config, dim: int, num_heads: int, qkv_bias: bool = True, attention_dropout: float = 0.0):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        attention_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, length, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch_size, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if attention_bias is not None:
            attention_mask = attention_bias if attention_mask is None else attention_mask + attention_bias
        attention_fn = attention_kernel(self.config, output_attentions)
        output, weights = attention_fn(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
            is_causal=False,
        )
        output = self.proj(output.reshape(batch_size, length, -1))
        return output, (weights if output_attentions else None)

    def cls_attention_probs(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, heads, L) post-softmax attention of the query at row 0 (the cls token) over all L keys,
        in float32: only what attention-driven masking reads, without materialising the L x L map."""
        batch_size, length, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch_size, length, 3, self.num_heads, self.head_dim)
        query = qkv[:, :1, 0].transpose(1, 2)  # (B, heads, 1, d)
        key = qkv[:, :, 1].transpose(1, 2)  # (B, heads, L, d)
        scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * self.scaling
        return F.softmax(scores, dim=-1).squeeze(2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


def drop_path(hidden_states: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples' residual branches with probability drop_prob, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1.0 - drop_prob
    if keep_prob == 0.0:
        return hidden_states * 0.0
    shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    keep = hidden_states.new_empty(shape).bernoulli_(keep_prob)
    return hidden_states * keep / keep_prob


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return drop_path(hidden_states, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT/BEiT); initialised to `init_value` by `init_vit_weights`."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.gamma


class Block(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + DropPath(LS(Attn(LN(x)))), then the same with the MLP.

    `layer_scale_init_value` of 0 or None means no layer scale (plain ViT/MAE); `layer_scale_attention=False`
    keeps it on the MLP branch only (the released SimMIM-AMT blocks never apply their `gamma_1`).
    `config` is only read for the attention implementation, so encoder, teacher and decoder blocks of
    one model share it.
    """

    def __init__(
        self,
        config,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float | None = None,
        attention_dropout: float = 0.0,
        layer_scale_attention: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.attn = Attention(config, dim, num_heads, qkv_bias=qkv_bias, attention_dropout=attention_dropout)
        use_ls1 = layer_scale_init_value and layer_scale_attention
        self.ls1 = LayerScale(dim, layer_scale_init_value) if use_ls1 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init_value) if layer_scale_init_value else nn.Identity()
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        attention_bias: torch.Tensor | None = None,
        cls_attention_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(new hidden states, attention weights or None). `cls_attention_only`: instead, (the cls query's
        post-softmax attention (B, heads, L), None) — through the block's own call, so FSDP's per-block
        hooks gather its weights."""
        if cls_attention_only:
            return self.attn.cls_attention_probs(self.norm1(hidden_states)), None
        attended, weights = self.attn(
            self.norm1(hidden_states), attention_mask, output_attentions=output_attentions, attention_bias=attention_bias
        )
        hidden_states = hidden_states + self.drop_path(self.ls1(attended))
        hidden_states = hidden_states + self.drop_path(self.ls2(self.mlp(self.norm2(hidden_states))))
        return hidden_states, weights


def drop_path_rates(max_rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate per block, linear from 0 to max_rate (timm/MAE convention)."""
    if depth == 0:
        return []
    # device="cpu": also under a `torch.device("meta")` context (models built on the meta device)
    return [float(rate) for rate in torch.linspace(0, max_rate, depth, device="cpu")]


def make_blocks(
    config,
    dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    layer_norm_eps: float = 1e-6,
    drop_path_rate: float = 0.0,
    layer_scale_init_value: float | None = None,
    layer_scale_attention: bool = True,
) -> nn.ModuleList:
    """`depth` blocks with stochastic depth rising linearly to `drop_path_rate`."""
    return nn.ModuleList(
        Block(
            config,
            dim,
            num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            layer_norm_eps=layer_norm_eps,
            drop_path_rate=rate,
            layer_scale_init_value=layer_scale_init_value,
            layer_scale_attention=layer_scale_attention,
        )
        for rate in drop_path_rates(drop_path_rate, depth)
    )


def run_blocks(
    layers: nn.ModuleList,
    hidden_states: torch.Tensor,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
    """Run blocks in order; optionally collect the input + every block output, and attention maps."""
    all_hidden_states = (hidden_states,) if output_hidden_states else None
    all_attentions = () if output_attentions else None
    for layer in layers:
        hidden_states, weights = layer(hidden_states, None, output_attentions)
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)
        if output_attentions:
            all_attentions = all_attentions + (weights,)
    return hidden_states, all_hidden_states, all_attentions


class EncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None
    attentions: tuple[torch.Tensor, ...] | None


class ViTEncoder(nn.Module):
    """Embeddings -> blocks -> optional final LayerNorm, optionally on a subset of patches.

    The trunk of every ViT-style hf_mim model: a student encoder (given `ids_keep`, only those
    patches enter, in that order, after the cls token), a frozen teacher (all patches), a backbone.
    """

    def __init__(
        self,
        config,
        image_size: int,
        patch_size: int,
        num_channels: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float | None = None,
        use_cls_token: bool = True,
        use_final_norm: bool = True,
        use_mask_token: bool = False,
        layer_scale_attention: bool = True,
    ):
        super().__init__()
        self.embeddings = VisionEmbeddings(
            image_size, patch_size, num_channels, dim, use_cls_token=use_cls_token, use_mask_token=use_mask_token
        )
        self.layers = make_blocks(
            config, dim, depth, num_heads, mlp_ratio, qkv_bias, layer_norm_eps, drop_path_rate, layer_scale_init_value,
            layer_scale_attention=layer_scale_attention,
        )
        self.layernorm = nn.LayerNorm(dim, eps=layer_norm_eps) if use_final_norm else None

    @property
    def num_prefix_tokens(self) -> int:
        return self.embeddings.num_prefix_tokens

    def forward(
        self,
        pixel_values: torch.Tensor,
        ids_keep: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        bool_masked_pos: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """`bool_masked_pos` replaces patches by the mask token (SimMIM); `ids_keep` (B, K) then keeps only
        those patches, in that order, after the prefix tokens (MAE's visible set, or the unthrown ones)."""
        tokens = self.embeddings(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, bool_masked_pos=bool_masked_pos
        )
        if ids_keep is not None:
            prefix = self.num_prefix_tokens
            tokens = torch.cat([tokens[:, :prefix], gather_tokens(tokens[:, prefix:], ids_keep)], dim=1)
        hidden_states, all_hidden_states, attentions = run_blocks(
            self.layers, tokens, output_hidden_states, output_attentions
        )
        if self.layernorm is not None:
            hidden_states = self.layernorm(hidden_states)
        return EncoderOutput(hidden_states, all_hidden_states, attentions)


    @torch.no_grad()
    def cls_attention(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """(B, heads, prefix + N) post-softmax attention of the cls query in the LAST block, on the full
        image (no masking): the signal attention-driven masking (AMT) reads."""
        if self.num_prefix_tokens == 0 or len(self.layers) == 0:
            raise ValueError("cls attention needs a cls token and at least one block")
        tokens = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        tokens, _, _ = run_blocks(self.layers[:-1], tokens)
        cls_attention, _ = self.layers[-1](tokens, cls_attention_only=True)
        return cls_attention


class MaeDecoder(nn.Module):
    """MAE's decoder: embed the encoder tokens, fill mask tokens for every removed patch, unshuffle to
    raster order, add fixed sin-cos positions, optionally drop patches nobody predicts (AMT's thrown
    patches: positions are added first, then they are removed), blocks, norm, linear head.

    Attribute names follow MAE (`decoder_embed`, `mask_token`, `decoder_norm`, `decoder_pred`); the
    position table is a non-persistent buffer, filled at construction and by `init_vit_weights`.
    """

    def __init__(
        self,
        config,
        input_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        output_dim: int,
        grid_size: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.grid_size = grid_size
        self.decoder_embed = nn.Linear(input_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # filled here (a model built with initialisation skipped has it) and again in `init_vit_weights`
        # (a model built on the meta device, as `from_pretrained` does)
        table = sincos_2d_table(dim, grid_size, grid_size, num_prefix_tokens=1)
        self.register_buffer("position_embeddings", table, persistent=False)
        self.layers = make_blocks(config, dim, depth, num_heads, mlp_ratio, qkv_bias, layer_norm_eps, drop_path_rate)
        self.decoder_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.decoder_pred = nn.Linear(dim, output_dim)

    def sincos_table(self, grid_height: int | None = None, grid_width: int | None = None) -> torch.Tensor:
        grid_height = grid_height or self.grid_size
        grid_width = grid_width or self.grid_size
        return sincos_2d_table(self.mask_token.shape[-1], grid_height, grid_width, num_prefix_tokens=1)

    def forward(
        self,
        latent: torch.Tensor,
        ids_restore: torch.Tensor,
        grid: tuple[int, int],
        ids_predict: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """latent (B, 1 + visible, D_enc) -> (B, 1 + N, out) predictions, cls first, patches in raster
        order; with `ids_predict` (B, K) only those patches (in that order) after the cls row."""
        tokens = self.decoder_embed(latent)
        batch_size, num_patches = ids_restore.shape
        num_removed = num_patches - (tokens.shape[1] - 1)
        patches = torch.cat([tokens[:, 1:], self.mask_token.to(tokens.dtype).expand(batch_size, num_removed, -1)], dim=1)
        patches = gather_tokens(patches, ids_restore)
        tokens = torch.cat([tokens[:, :1], patches], dim=1)
        if tuple(grid) == (self.grid_size, self.grid_size):
            positions = self.position_embeddings
        else:
            positions = self.sincos_table(*grid).to(device=tokens.device)
        tokens = tokens + positions.to(tokens.dtype)
        if ids_predict is not None:
            tokens = torch.cat([tokens[:, :1], gather_tokens(tokens[:, 1:], ids_predict)], dim=1)
        tokens, _, _ = run_blocks(self.layers, tokens)
        return self.decoder_pred(self.decoder_norm(tokens))


# --------------------------------------------------------------------------------------------------
# Token bookkeeping and pooling
# --------------------------------------------------------------------------------------------------


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, D), index (B, K) -> (B, K, D) = tokens[b, index[b]]."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class MeanPooler(nn.Module):
    """Mean of the patch tokens (prefix tokens excluded) followed by `fc_norm` (MAE/BEiT fine-tuning);
    `use_fc_norm=False`: the plain mean (a pretrained encoder's tokens, already normalised)."""

    def __init__(self, dim: int, layer_norm_eps: float, num_prefix_tokens: int, use_fc_norm: bool = True):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.fc_norm = nn.LayerNorm(dim, eps=layer_norm_eps) if use_fc_norm else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        pooled = hidden_states[:, self.num_prefix_tokens :].mean(dim=1)
        return pooled if self.fc_norm is None else self.fc_norm(pooled)


# --------------------------------------------------------------------------------------------------
# Weight initialisation (MAE convention) — used from every model's `_init_weights`
# --------------------------------------------------------------------------------------------------


def _initialized(tensor: torch.Tensor) -> bool:
    return getattr(tensor, "_is_hf_initialized", False)


@torch.no_grad()
def init_vit_weights(module: nn.Module, token_std: float = 0.02) -> None:
    """MAE/dBOT initialisation for one module: Linear xavier-uniform (bias 0), patch projection
    xavier-uniform on its flattened (D, C*p*p) view, LayerNorm 1/0, tokens N(0, token_std), sin-cos
    position tables, layer scale to its init value. Respects transformers' "already loaded" flags.

    Written per module that *owns* parameters: when transformers initialises the missing weights of a
    custom-code model it skips modules without direct parameters (Block, PatchEmbeddings, ...), so no
    initialisation may live at such a container level.
    """
    if isinstance(module, nn.Linear):
        init.xavier_uniform_(module.weight)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            init.ones_(module.weight)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):  # the patch projection: xavier on its (D, C*p*p) view
        if not _initialized(module.weight):
            nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, VisionEmbeddings):
        if module.cls_token is not None:
            init.normal_(module.cls_token, std=token_std)
        if module.mask_token is not None:
            init.normal_(module.mask_token, std=token_std)
        if module.position_embeddings is not None:
            init.copy_(module.position_embeddings, module.sincos_table())
    elif isinstance(module, MaeDecoder):
        init.normal_(module.mask_token, std=token_std)
        init.copy_(module.position_embeddings, module.sincos_table())
    elif isinstance(module, LayerScale):
        init.constant_(module.gamma, module.init_value)



def forget_initialization(module: nn.Module) -> None:
    """Clear transformers' "already initialised" marks under `module`: they are set on loaded tensors and
    make its init functions skip them, so a re-initialisation (dBOT's student at a stage boundary) would
    silently keep the old weights."""
    for sub in module.modules():
        sub.__dict__.pop("_is_hf_initialized", None)
        for tensor in list(sub.parameters(recurse=False)) + list(sub.buffers(recurse=False)):
            tensor.__dict__.pop("_is_hf_initialized", None)


def starts_as_copy(target: nn.Module, source: nn.Module) -> None:
    """Declare that `target` starts as an exact copy of `source` (dBOT's stage-0 teacher of the student,
    ExtreMA's momentum branch of the online one, a per-block relative position table of the shared
    one): each submodule of `target` whose namesake in `source` has the same type is tagged, and
    `init_as_copy`, called from `_init_weights`, copies the namesake's direct parameters into it.
    `source` must be registered first, so that it is initialised (or loaded) before `target`."""
    source_modules = dict(source.named_modules())
    for name, module in target.named_modules():
        twin = source_modules.get(name)
        if twin is not None and type(twin) is type(module):
            module._copy_source = (twin,)  # in a tuple: not registered as a submodule


def init_as_copy(module: nn.Module) -> bool:
    """From `_init_weights`: copy the direct parameters of a module tagged by `starts_as_copy` from its
    source; tensors loaded from a checkpoint are left alone (init.copy_ checks the flag). False when
    `module` is not such a copy."""
    source = getattr(module, "_copy_source", None)
    if source is None:
        return False
    for name, tensor in module.named_parameters(recurse=False):
        init.copy_(tensor, getattr(source[0], name))
    return True
