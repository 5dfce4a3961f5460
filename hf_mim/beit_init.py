"""BEiT's initialisation: the weights of MaskDistill's students and of AMT's SimMIM host.

Model-zone file imported by those two methods only.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init

from .vit_blocks import LayerScale, VisionEmbeddings


@torch.no_grad()
def init_beit_weights(module: nn.Module, std: float = 0.02) -> None:
    """BEiT initialisation for one parameter-owning module: trunc-normal(std) linears and convolutions
    (a module tagged `rescale_layer_id` is drawn with std / sqrt(2 * layer_id): BEiT's fix_init_weight
    for attn.proj and mlp.fc2), LayerNorm 1/0, layer scale to its value, tokens trunc-normal(std), a
    learned position table trunc-normal(std). Respects transformers' "already loaded" flags."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        layer_id = getattr(module, "rescale_layer_id", None)
        scale = 1.0 / math.sqrt(2.0 * layer_id) if layer_id else 1.0
        init.trunc_normal_(module.weight, std=std * scale, a=-2.0 * scale, b=2.0 * scale)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            init.ones_(module.weight)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, LayerScale):
        init.constant_(module.gamma, module.init_value)
    elif isinstance(module, VisionEmbeddings):
        for token in (module.cls_token, module.mask_token, module.position_embeddings):
            if token is not None:
                init.trunc_normal_(token, std=std)


def tag_beit_rescaled_layers(layers: nn.ModuleList) -> None:
    """Mark each block's attn.proj / mlp.fc2 with its 1-based depth for `init_beit_weights`."""
    for layer_id, layer in enumerate(layers, start=1):
        layer.attn.proj.rescale_layer_id = layer_id
        layer.mlp.fc2.rescale_layer_id = layer_id
