"""CaiT class attention: a query token that reads the patch tokens without changing them (ExtreMA's
predictor head). Model-zone file imported by ExtreMA only.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .vit_blocks import DropPath, LayerScale, Mlp, attention_kernel


class ClassAttention(nn.Module):
    """Multi-head attention of ONE query (row 0 of the input, the cls token) over every row of the input.

    Separate q/k/v projections (CaiT / ExtreMA `Class_Attention`), output (B, 1, D) through `proj`.
    The kernel comes from transformers' attention interface, as in `Attention`.
    """

    is_causal = False

    def __init__(self, config, dim: int, num_heads: int, qkv_bias: bool = True, attention_dropout: float = 0.0):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = attention_dropout
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, length, dim = hidden_states.shape
        query = self.q(hidden_states[:, :1]).reshape(batch_size, 1, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k(hidden_states).reshape(batch_size, length, self.num_heads, self.head_dim).transpose(1, 2)
        value = self.v(hidden_states).reshape(batch_size, length, self.num_heads, self.head_dim).transpose(1, 2)
        attention_fn = attention_kernel(self.config, output_attentions)
        output, weights = attention_fn(
            self,
            query,
            key,
            value,
            None,
            scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
            is_causal=False,
        )
        output = self.proj(output.reshape(batch_size, 1, dim))
        return output, (weights if output_attentions else None)


class ClassAttentionBlock(GradientCheckpointingLayer):
    """CaiT class-attention block: only the cls token is updated, the patch tokens are read.

        u   = cat(cls, tokens)
        cls = cls + DropPath(LS1(ClassAttention(norm1(u))))
        cls = cls + DropPath(LS2(MLP(norm2(cls))))

    `layer_scale_init_value` 0 or None means no layer scale. Returns (cls (B, 1, D), attention weights
    (B, H, 1, 1 + N) or None).
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
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.attn = ClassAttention(config, dim, num_heads, qkv_bias=qkv_bias, attention_dropout=attention_dropout)
        self.ls1 = LayerScale(dim, layer_scale_init_value) if layer_scale_init_value else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init_value) if layer_scale_init_value else nn.Identity()
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(
        self, cls_token: torch.Tensor, tokens: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.norm1(torch.cat([cls_token, tokens], dim=1)), output_attentions)
        cls_token = cls_token + self.drop_path(self.ls1(attended))
        cls_token = cls_token + self.drop_path(self.ls2(self.mlp(self.norm2(cls_token))))
        return cls_token, weights
