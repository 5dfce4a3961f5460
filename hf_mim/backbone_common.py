"""Feature pyramids and the AutoBackbone forward shared by the plain-ViT methods (dBOT, ExtreMA,
MaskDistill, AMT), for dense heads such as transformers' `UperNetForSemanticSegmentation`.

Model-zone file: copied flat next to every checkpoint (Hub remote code), so it imports only torch,
transformers and the standard library.

A ViT has one resolution (the patch grid); dense heads want strides 4, 8, 16, 32. Two recipes, chosen by
`config.backbone_pyramid`:
- "multi_scale": BEiT's / MAE's UperNet backbone (`beit/semantic_segmentation/backbone/beit.py`): the
  outputs of four blocks (`out_features`), resampled by fpn1 = deconv-BN-GELU-deconv (x4), fpn2 = deconv
  (x2), fpn3 = identity, fpn4 = 2x2 max-pool (x1/2).
- "simple": ViTDet's simple feature pyramid (detectron2 `SimpleFeaturePyramid`, scale factors 4, 2, 1,
  0.5, LayerNorm) from ONE block (the last by default), each level projected to
  `backbone_pyramid_channels` by a 1x1 and a 3x3 convolution, each followed by a channel LayerNorm.
- "none": the selected blocks as maps at the patch stride.
Block outputs are taken before any final norm (as both recipes do); position tables and relative
position tables are resized to the input's patch grid on every call (`interpolate_pos_encoding=True`).
`backbone_relative_position_bias` adds BEiT's per-block relative position bias, trained from scratch
(the MAE / dBOT segmentation recipe), kept on the backbone (`relative_position_biases`).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BackboneOutput

from .relative_position import RelativePositionBias

# relative resampling of each pyramid level (x4, x2, x1, x1/2 of the patch grid): strides 4/8/16/32 at patch 16
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (detectron2's `LayerNorm` for conv features)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def multi_scale_level(dim: int, scale: float) -> nn.Module:
    """One BEiT/MAE segmentation `fpn` branch: x4 two deconvolutions (BN + GELU between), x2 one, x1
    identity, x1/2 max-pooling; the width stays `dim`."""
    if scale == 4:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
        )
    if scale == 2:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
    if scale == 1:
        return nn.Identity()
    return nn.MaxPool2d(kernel_size=2, stride=2)


def simple_pyramid_level(dim: int, scale: float, out_channels: int, eps: float = 1e-6) -> nn.Sequential:
    """One ViTDet simple-pyramid level: resample (x4: deconv to dim/2, LN, GELU, deconv to dim/4; x2: deconv
    to dim/2; x1: none; x1/2: max-pool), then 1x1 conv + LN and 3x3 conv + LN to `out_channels`."""
    if scale == 4:
        layers = [
            nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),
            ChannelLayerNorm(dim // 2, eps=eps),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2),
        ]
        width = dim // 4
    elif scale == 2:
        layers, width = [nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2)], dim // 2
    elif scale == 1:
        layers, width = [], dim
    else:
        layers, width = [nn.MaxPool2d(kernel_size=2, stride=2)], dim
    layers += [
        nn.Conv2d(width, out_channels, kernel_size=1, bias=False),
        ChannelLayerNorm(out_channels, eps=eps),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
        ChannelLayerNorm(out_channels, eps=eps),
    ]
    return nn.Sequential(*layers)


@torch.no_grad()
def init_pyramid_module(module: nn.Module) -> None:
    """Pyramid weights: deconvolutions trunc-normal(0.02) with zero bias, convolutions MSRA-fill (kaiming
    normal, fan-out: detectron2's `c2_msra_fill`), norms 1/0, BatchNorm running statistics reset.
    Respects transformers' "already loaded" flags."""
    if isinstance(module, nn.ConvTranspose2d):
        init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
        init.ones_(module.weight)
        init.zeros_(module.bias)
        if isinstance(module, nn.BatchNorm2d):
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


def tokens_to_map(hidden_state: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, prefix + h*w, D) tokens -> (B, D, h, w) map of the patch tokens (raster order)."""
    patches = hidden_state[:, num_prefix_tokens:]
    batch_size, _, dim = patches.shape
    return patches.transpose(1, 2).reshape(batch_size, dim, grid[0], grid[1]).contiguous()


def backbone_ignore_patterns(prefix: str) -> list[str]:
    """Checkpoint keys a `<M>Backbone` does not use: everything outside the encoder `prefix` (decoders,
    teachers, momentum branches, classifier heads), the pooler (`fc_norm`) and the final norm."""
    return [rf"^(?!{prefix}\.)", rf"^{prefix}\.pooler\.", rf"^{prefix}\.encoder\.layernorm\."]


class ViTBackboneMixin:
    """The `<M>Backbone` of a plain-ViT method. Bases: `(ViTBackboneMixin, BackboneMixin, <M>PreTrainedModel)`.

    The subclass builds its encoder under the method's `base_model_prefix` (so pretraining and
    classification checkpoints load), without a final norm, and calls `init_pyramid(config)` and
    `post_init()`. `get_input_embeddings` is transformers' default (it recurses into `base_model`);
    `stage_hidden_states` reads the base model's `encoder` (override it for an encoder with another call).
    """

    def init_pyramid(self, config) -> None:
        """Stage widths, and the resampling modules `config.backbone_pyramid` asks for (tagged so
        `_init_weights` initialises them with `init_pyramid_module`)."""
        dim = config.hidden_size
        self.num_features = [dim] * len(self.stage_names)
        pyramid = config.backbone_pyramid
        selected = list(self.out_features)
        if pyramid == "multi_scale" and len(selected) != len(PYRAMID_SCALES):
            raise ValueError(
                f"backbone_pyramid='multi_scale' resamples four blocks to four strides: out_features must name "
                f"4 stages, got {selected} (the encoder has {config.num_hidden_layers} blocks)"
            )
        if pyramid == "simple" and len(selected) != 1:
            raise ValueError(
                f"backbone_pyramid='simple' (ViTDet) builds the pyramid from one block: out_features must name "
                f"1 stage, got {selected}"
            )
        if pyramid == "multi_scale":
            self.pyramid = nn.ModuleList(multi_scale_level(dim, scale) for scale in PYRAMID_SCALES)
        elif pyramid == "simple":
            channels = config.backbone_pyramid_channels
            eps = 1e-6
            self.pyramid = nn.ModuleList(simple_pyramid_level(dim, scale, channels, eps) for scale in PYRAMID_SCALES)
        else:
            self.pyramid = None
        if self.pyramid is not None:
            for module in self.pyramid.modules():
                module.pyramid_part = True
        self.relative_position_biases = None
        if getattr(config, "backbone_relative_position_bias", False) and not self.has_relative_position_bias:
            grid = config.image_size // config.patch_size
            self.relative_position_biases = nn.ModuleList(
                RelativePositionBias(grid, config.num_attention_heads) for _ in range(config.num_hidden_layers)
            )
            for module in self.relative_position_biases:
                module.pyramid_part = True  # initialised here (zeros), not by the encoder's init

    # a method whose blocks already own relative position tables (MaskDistill) sets this
    has_relative_position_bias = False

    def run_encoder_with_bias(
        self, encoder: nn.Module, pixel_values: torch.Tensor, interpolate_pos_encoding: bool, output_attentions: bool
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None, int]:
        """`stage_hidden_states` through `encoder.embeddings` and `encoder.layers`, each block with its
        `relative_position_biases` entry for this grid (cls rows dropped when there is no cls token)."""
        grid = self.get_input_embeddings().check_pixel_values(pixel_values, interpolate_pos_encoding)
        tokens = encoder.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        num_prefix_tokens = tokens.shape[1] - grid[0] * grid[1]
        states, attentions = (tokens,), () if output_attentions else None
        for layer, table in zip(encoder.layers, self.relative_position_biases):
            bias = table(grid).to(tokens.dtype)
            if num_prefix_tokens == 0:
                bias = bias[:, :, 1:, 1:]
            tokens, weights = layer(tokens, None, output_attentions, bias)
            states += (tokens,)
            if output_attentions:
                attentions += (weights,)
        return states, attentions, num_prefix_tokens

    @property
    def channels(self) -> list[int]:
        """Width of each returned feature map (what UperNet's head is built from)."""
        if self.config.backbone_pyramid == "simple":
            return [self.config.backbone_pyramid_channels] * len(PYRAMID_SCALES)
        return [self.num_features[self.stage_names.index(name)] for name in self.out_features]

    @property
    def feature_strides(self) -> list[float]:
        """Stride in pixels of each returned feature map."""
        patch = self.config.patch_size
        if self.pyramid is None:
            return [float(patch)] * len(self.out_features)
        return [patch / scale for scale in PYRAMID_SCALES]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, RelativePositionBias) and getattr(module, "pyramid_part", False):
            init.zeros_(module.relative_position_bias_table)  # BEiT: trained from zero
        elif getattr(module, "pyramid_part", False):
            init_pyramid_module(module)
        else:
            super()._init_weights(module)

    def layer_id_for_lr_decay(self, name: str) -> int:
        """BEiT/MAE `get_layer_id_for_vit` for a parameter name of this backbone (any prefix, e.g. UperNet's
        `backbone.`): 0 for the embeddings (patch projection, cls / mask / position tokens), i + 1 for encoder
        block i (its relative position table, or `relative_position_biases.i`, included),
        `num_hidden_layers + 1` for everything else (pyramid, the shared pretraining table, a dense head)."""
        match = re.search(r"(?:^|\.)(?:encoder\.layers|relative_position_biases)\.(\d+)\.", name)
        if match:
            return int(match.group(1)) + 1
        if re.search(r"(?:^|\.)encoder\.embeddings\.", name):
            return 0
        return self.config.num_hidden_layers + 1

    def stage_hidden_states(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool, output_attentions: bool
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None, int]:
        """(every stage's tokens: embedding output then each block's output, attentions or None, number of
        prefix tokens before the patches): the base model's `encoder` run on the full image, its
        `embeddings.num_prefix_tokens` (1 with a cls token, 0 without: ExtreMA)."""
        encoder = self.base_model.encoder
        encoded = encoder(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=True,
            output_attentions=output_attentions,
        )
        return encoded.hidden_states, encoded.attentions, encoder.embeddings.num_prefix_tokens

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = True,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
        r"""
        interpolate_pos_encoding (`bool`, defaults to `True`): dense tasks run at their own crop size (any
            multiple of the patch size, e.g. 512 x 512 for a model pretrained at 224); the position table
            (bicubic) and relative position tables (bilinear) are resized to its patch grid.
        """
        output_hidden_states, output_attentions, return_dict = self.output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        grid = self.get_input_embeddings().check_pixel_values(pixel_values, interpolate_pos_encoding)
        if self.relative_position_biases is not None:
            encoder = self.base_model.encoder
            hidden_states, attentions, num_prefix_tokens = self.run_encoder_with_bias(
                encoder, pixel_values, interpolate_pos_encoding, output_attentions
            )
        else:
            hidden_states, attentions, num_prefix_tokens = self.stage_hidden_states(
                pixel_values, interpolate_pos_encoding, output_attentions
            )
        maps = [tokens_to_map(hidden_states[index], num_prefix_tokens, grid) for index in self.out_indices]
        if self.pyramid is not None:
            if self.config.backbone_pyramid == "simple":
                maps = maps * len(self.pyramid)
            maps = [level(feature_map) for level, feature_map in zip(self.pyramid, maps)]
        output = BackboneOutput(
            feature_maps=tuple(maps),
            hidden_states=hidden_states if output_hidden_states else None,
            attentions=attentions if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "PYRAMID_SCALES",
    "ChannelLayerNorm",
    "ViTBackboneMixin",
    "backbone_ignore_patterns",
    "init_pyramid_module",
    "multi_scale_level",
    "simple_pyramid_level",
    "tokens_to_map",
]
