"""MaskDistill: masked distillation of a frozen teacher's normalised features ("A Unified View of Masked
Image Modeling", Peng, Dong, Bao, Wei, Ye; TMLR 2023).

Five parts, each a config field: teacher T (a frozen vision model loaded with `AutoModel`: CLIP, or a timm
ViT through transformers' `TimmWrapperModel`),
normalisation N (LayerNorm without affine), student S (BEiT v2 ViT: `[MASK]` token, one shared relative
position bias, layer scale, no absolute positions), head H (linear to the teacher width) and loss L
(smooth-L1 on the masked patches). `target="pixels"` swaps the teacher for per-patch normalised pixels.

The teacher is never part of the student's module tree: it is loaded lazily from
`config.teacher_name_or_path` (or given with `set_teacher`), kept frozen and in eval mode, and is not in
`state_dict()`, `save_pretrained` or a Hub folder. No official MaskDistill code exists; numerics follow
BEiT v2 (microsoft/unilm/beit2), which the first author names as its base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .backbone_common import ViTBackboneMixin, backbone_ignore_patterns
from .configuration_maskdistill import MaskDistillConfig
from .masking_blockwise import BlockwiseMaskGenerator
from .beit_init import init_beit_weights, tag_beit_rescaled_layers
from .relative_position import RelativePositionBias
from .modeling_base import backbone_output, builds_pretrained_encoder, ImageClassificationMixin, MIMPreTrainedModel
from .training_events import MIMTrainingEventsMixin
from .vit_blocks import init_as_copy, make_blocks, MeanPooler, PatchEmbeddings, starts_as_copy
from .objectives import elementwise_loss, patchify, predictions_to_pixels, weighted_token_mean
from .teachers import FrozenTeacher, FrozenTeacherMixin, normalize_teacher_tokens, resolve_teacher_path  # noqa: F401 (re-exported)


@dataclass
class MaskDistillMaskedImageModelingOutput(ModelOutput):
    """Output of `MaskDistillForMaskedImageModeling`.

    loss: the configured loss (smooth-L1) over the masked patches; None when no target is available
        (target "teacher" and no teacher loaded, in eval mode).
    predictions: (B, N, target width) head output for every patch (raster order); the MaskDistill
        prediction is `predictions[bool_masked_pos]`.
    targets: (B, N, target width) normalised teacher tokens (or normalised pixel patches), or None.
    bool_masked_pos: (B, N) True = replaced by the mask token.
    patch_loss: (B, N) per-patch loss (mean over channels), every patch, for pictures.
    reconstruction: (B, C, H, W) the predicted image in `pixel_values` space (target "pixels" only;
        each patch de-normalised with the statistics of the input patch).
    last_hidden_state: (B, 1 + N, D) student output after the final norm (cls first).
    """

    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    bool_masked_pos: torch.Tensor | None = None
    patch_loss: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class MaskDistillEmbeddings(nn.Module):
    """Patch embedding; masked patches replaced by `mask_token`; cls prepended. No absolute positions."""

    def __init__(self, config: MaskDistillConfig, use_mask_token: bool = True):
        super().__init__()
        self.patch_embeddings = PatchEmbeddings(config.image_size, config.patch_size, config.num_channels, config.hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        # the classifier never masks: no trainable parameter without a gradient (DDP would stop on it)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if use_mask_token else None

    def forward(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None, interpolate_pos_encoding: bool = False
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = self.patch_embeddings.check_pixel_values(pixel_values, interpolate_pos_encoding)
        patches = self.patch_embeddings(pixel_values)
        batch_size, num_patches, _ = patches.shape
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("this model has no mask token (the classifier never masks): bool_masked_pos is not accepted")
            if bool_masked_pos.shape != (batch_size, num_patches):
                raise ValueError(
                    f"bool_masked_pos must have shape {(batch_size, num_patches)}, got {tuple(bool_masked_pos.shape)}"
                )
            weight = bool_masked_pos.to(device=patches.device, dtype=patches.dtype).unsqueeze(-1)
            patches = patches * (1 - weight) + self.mask_token.to(patches.dtype) * weight
        cls = self.cls_token.to(patches.dtype).expand(batch_size, -1, -1)
        return torch.cat([cls, patches], dim=1), grid


class MaskDistillEncoder(nn.Module):
    """Embeddings -> BEiT blocks with relative position bias -> optional final LayerNorm.

    `per_layer_relative_position_bias=False`: one table shared by every block (pretraining layout).
    True (fine-tuning layout): each block owns `rel_pos_bias`; the shared table is still there, frozen and
    unused, as the place a pretraining checkpoint's table loads into before `_init_weights` copies it
    into every block (BEiT's fine-tuning checkpoint loading).
    """

    def __init__(
        self,
        config: MaskDistillConfig,
        use_final_norm: bool = True,
        per_layer_relative_position_bias: bool = False,
        use_mask_token: bool = True,
    ):
        super().__init__()
        grid = config.image_size // config.patch_size
        self.embeddings = MaskDistillEmbeddings(config, use_mask_token)
        self.rel_pos_bias = RelativePositionBias(grid, config.num_attention_heads)
        self.layers = make_blocks(
            config,
            config.hidden_size,
            config.num_hidden_layers,
            config.num_attention_heads,
            mlp_ratio=config.mlp_ratio,
            qkv_bias=True,
            layer_norm_eps=config.layer_norm_eps,
            drop_path_rate=config.drop_path_rate,
            layer_scale_init_value=config.layer_scale_init_value,
        )
        tag_beit_rescaled_layers(self.layers)
        self.per_layer_relative_position_bias = per_layer_relative_position_bias
        if per_layer_relative_position_bias:
            self.rel_pos_bias.requires_grad_(False)
            for layer in self.layers:
                layer.rel_pos_bias = RelativePositionBias(grid, config.num_attention_heads)
                starts_as_copy(layer.rel_pos_bias, self.rel_pos_bias)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if use_final_norm else None

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ):
        hidden_states, grid = self.embeddings(pixel_values, bool_masked_pos, interpolate_pos_encoding)
        shared_bias = None if self.per_layer_relative_position_bias else self.rel_pos_bias(grid).to(hidden_states.dtype)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            bias = layer.rel_pos_bias(grid).to(hidden_states.dtype) if shared_bias is None else shared_bias
            hidden_states, weights = layer(hidden_states, None, output_attentions, bias)
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
            if output_attentions:
                all_attentions = all_attentions + (weights,)
        if self.layernorm is not None:
            hidden_states = self.layernorm(hidden_states)
        return hidden_states, all_hidden_states, all_attentions


class MaskDistillPreTrainedModel(MIMPreTrainedModel):
    config_class = MaskDistillConfig
    config: MaskDistillConfig
    base_model_prefix = "maskdistill"
    _no_split_modules = ["Block", "MaskDistillEmbeddings"]
    _supports_flash_attn = False  # an additive attention bias is not supported by flash attention
    _supports_flex_attn = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BEiT v2 initialisation (`init_beit_weights`), the mask and cls tokens trunc-normal, relative
        tables zero (per-layer tables copy the shared one), the classifier scaled by `classifier_init_scale`."""
        std = self.config.initializer_range
        if module is getattr(self, "classifier", None) and isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std * self.config.classifier_init_scale)
            init.zeros_(module.bias)
        elif isinstance(module, MaskDistillEmbeddings):
            init.trunc_normal_(module.cls_token, std=std)
            if module.mask_token is not None:
                init.trunc_normal_(module.mask_token, std=std)
        elif isinstance(module, RelativePositionBias):
            if not init_as_copy(module):  # a per-block table starts as the shared one
                init.zeros_(module.relative_position_bias_table)
        else:
            init_beit_weights(module, std)


class MaskDistillModel(MaskDistillPreTrainedModel):
    """The MaskDistill (BEiT v2-style) ViT backbone. Nothing is masked unless `bool_masked_pos` is given.

    With `add_pooling_layer` and `config.use_mean_pooling` (fine-tuning layout) the final LayerNorm is
    replaced by `pooler.fc_norm` on the mean of the patch tokens, as BEiT fine-tuning does; otherwise
    `last_hidden_state` is normalised and `pooler_output` is the cls token. Loaded from a pretraining
    checkpoint (`builds_pretrained_encoder`): the final LayerNorm is kept and `pooler_output` is the
    plain mean of its patch tokens (nothing untrained).
    """

    # a pretraining checkpoint's head, or a fine-tuning checkpoint's classifier
    _keys_to_ignore_on_load_unexpected = [r"lm_head\.", r"classifier\.", r"encoder\.layernorm\.", r"layers\.\d+\.rel_pos_bias\."]

    def __init__(
        self,
        config: MaskDistillConfig,
        add_pooling_layer: bool = True,
        per_layer_relative_position_bias: bool = False,
        use_mask_token: bool = True,
        pretrained_encoder: bool | None = None,
    ):
        super().__init__(config)
        pretrained = builds_pretrained_encoder(config, add_pooling_layer, pretrained_encoder)
        mean_pooling = add_pooling_layer and config.use_mean_pooling
        self.encoder = MaskDistillEncoder(
            config,
            use_final_norm=pretrained or not mean_pooling,
            per_layer_relative_position_bias=per_layer_relative_position_bias,
            use_mask_token=use_mask_token,
        )
        self.pooler = (
            MeanPooler(config.hidden_size, config.layer_norm_eps, num_prefix_tokens=1, use_fc_norm=not pretrained)
            if mean_pooling else None
        )
        self.add_pooling_layer = add_pooling_layer
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
            True = that patch embedding is replaced by the mask token (every patch still enters, BEiT style).
        """
        if pixel_values is None:
            raise ValueError("MaskDistillModel needs pixel_values")
        output_hidden_states, output_attentions, return_dict = self.output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        hidden_states, all_hidden_states, attentions = self.encoder(
            pixel_values, bool_masked_pos, interpolate_pos_encoding, output_hidden_states, output_attentions
        )
        return backbone_output(hidden_states, self.pooler, self.add_pooling_layer, all_hidden_states, attentions, return_dict)


class MaskDistillForMaskedImageModeling(MIMTrainingEventsMixin, FrozenTeacherMixin, MaskDistillPreTrainedModel):
    """The MaskDistill objective: BEiT-style student + linear head regress LN(teacher(full image)) on the
    masked patches with smooth-L1. The teacher is frozen and not saved (see the module docstring)."""

    _keys_to_ignore_on_load_unexpected = [r"^maskdistill\.pooler\.", r"^classifier\.", r"layers\.\d+\.rel_pos_bias\."]
    # BEiT v2's pretraining `no_weight_decay()` is {pos_embed, cls_token}: the mask token and the shared relative
    # position table ARE decayed (1-D tensors and biases are not)
    pretraining_no_weight_decay = ("cls_token",)
    # no `_keys_to_ignore_on_save`: transformers matches exact names there, and the teacher is not a
    # submodule, so it has no key to drop

    def __init__(self, config: MaskDistillConfig):
        super().__init__(config)
        self.maskdistill = MaskDistillModel(config, add_pooling_layer=False)
        self.lm_head = nn.Linear(config.hidden_size, config.target_size)
        self.init_frozen_teacher()
        self.post_init()

    # ---- teacher (hf_mim/teachers.py: lazy loading, set_teacher, normalisation, never saved) -------

    teacher = FrozenTeacherMixin.external_teacher

    def teacher_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, N, D_teacher) raw teacher patch tokens (chosen layer, before N) for the student's pixel_values."""
        return self.external_teacher_features(pixel_values)

    def normalize_targets(self, tokens: torch.Tensor) -> torch.Tensor:
        return normalize_teacher_tokens(tokens, self.config.target_normalization, self.config.target_norm_eps)

    def mask_generator(self, attention_maps=None) -> BlockwiseMaskGenerator:
        """How the data pipeline masks an image for this model: BEiT block-wise masking at mask_ratio."""
        return BlockwiseMaskGenerator(
            self.config.grid_size,
            self.config.num_masking_patches,
            min_num_patches=self.config.mask_min_num_patches,
            min_aspect=self.config.mask_min_aspect,
        )

    # ---- objective -----------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        return_loss: bool | None = None,
        **kwargs,
    ) -> MaskDistillMaskedImageModelingOutput | tuple:
        r"""
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
            Patches replaced by the mask token (True). Drawn per image with `mask_generator()` when absent.
        return_loss (`bool`, *optional*):
            None (default): compute the loss whenever a target exists; with target "teacher" and no teacher
            this is an error in training mode and `loss=None` in eval mode (predictions only). True: always
            compute it (error without a teacher). False: skip the teacher and the loss.
        """
        if pixel_values is None:
            raise ValueError("MaskDistillForMaskedImageModeling needs pixel_values")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        grid = self.maskdistill.get_input_embeddings().check_pixel_values(pixel_values, interpolate_pos_encoding)
        bool_masked_pos = self.mask_generator().masks(pixel_values.shape[0], grid[0] * grid[1], bool_masked_pos, pixel_values.device)

        outputs = self.maskdistill(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        predictions = self.lm_head(hidden_states[:, 1:])

        if return_loss is None:
            has_target = self.config.target == "pixels" or self.load_teacher() is not None
            return_loss = has_target or self.training  # training without a teacher: the error below
        loss = targets = patch_loss = reconstruction = None
        if return_loss:
            if self.config.target == "pixels":
                raw = patchify(pixel_values.float(), self.config.patch_size)
            else:
                raw = self.teacher_features(pixel_values)
            targets = self.normalize_targets(raw)
            if targets.shape != predictions.shape:
                raise ValueError(f"targets of shape {tuple(targets.shape)} do not match predictions {tuple(predictions.shape)}")
            patch_loss = elementwise_loss(
                predictions.float(), targets, self.config.loss, self.config.smooth_l1_beta
            ).mean(dim=-1)
            loss = weighted_token_mean(patch_loss, bool_masked_pos)
            patch_loss = patch_loss.detach()
            if self.config.target == "pixels":
                reconstruction = self._reconstruct(predictions.detach().float(), raw, pixel_values)

        output = MaskDistillMaskedImageModelingOutput(
            loss=loss,
            predictions=predictions,
            targets=targets,
            bool_masked_pos=bool_masked_pos,
            patch_loss=patch_loss,
            reconstruction=reconstruction,
            last_hidden_state=hidden_states,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    def _reconstruct(self, predictions: torch.Tensor, raw: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        method = self.config.target_normalization
        grid = (pixel_values.shape[-2] // self.config.patch_size, pixel_values.shape[-1] // self.config.patch_size)
        return predictions_to_pixels(
            predictions, raw, self.config.patch_size, grid, self.config.num_channels,
            norm_eps=None if method == "none" else self.config.target_norm_eps, unbiased=method == "layer_norm_unbiased",
        )


class MaskDistillForImageClassification(ImageClassificationMixin, MaskDistillPreTrainedModel):
    """BEiT v2-style fine-tuning: per-layer relative position tables (copied from the shared pretraining
    table on load), mean of the patch tokens -> fc_norm -> linear head (`use_mean_pooling`)."""

    # a pretraining checkpoint's head, final norm and mask token (the classifier never masks)
    _keys_to_ignore_on_load_unexpected = [
        r"^lm_head\.", r"^maskdistill\.encoder\.layernorm\.", r"^maskdistill\.encoder\.embeddings\.mask_token$"
    ]
    # not reported as missing: _init_weights copies the (loaded) shared pretraining table into each block
    _keys_to_ignore_on_load_missing = [r"layers\.\d+\.rel_pos_bias\."]

    def __init__(self, config: MaskDistillConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.maskdistill = MaskDistillModel(
            config, add_pooling_layer=True, per_layer_relative_position_bias=True, use_mask_token=False,
            pretrained_encoder=False,
        )
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()


class MaskDistillBackbone(ViTBackboneMixin, BackboneMixin, MaskDistillPreTrainedModel):
    """MaskDistill feature maps for dense heads (UperNet through `AutoBackbone`), BEiT's segmentation
    backbone: per-block relative position tables (copied from the shared pretraining table on load, as
    the classifier; bilinearly resized to the crop's grid), stages "stem", "stage1".."stageN" (block
    outputs, no final norm), resampled as `config.backbone_pyramid` says (see `backbone_common`). Loads
    a pretraining or classification checkpoint (`maskdistill.` prefix); lm_head, pooler and final norm
    are ignored.
    """

    # beyond the encoder: a pretraining checkpoint's mask token (the backbone never masks)
    _keys_to_ignore_on_load_unexpected = backbone_ignore_patterns("maskdistill") + [r"^maskdistill\.encoder\.embeddings\.mask_token$"]
    has_relative_position_bias = True  # every block owns its table already
    # not reported as missing: _init_weights copies the (loaded) shared pretraining table into each block
    _keys_to_ignore_on_load_missing = [r"layers\.\d+\.rel_pos_bias\."]

    def __init__(self, config: MaskDistillConfig):
        super().__init__(config)
        self.maskdistill = MaskDistillModel(
            config, add_pooling_layer=False, per_layer_relative_position_bias=True, use_mask_token=False
        )
        self.maskdistill.encoder.layernorm = None  # dense recipes read the blocks' outputs
        self.freeze_unused()
        self.init_pyramid(config)
        self.post_init()

    def freeze_unused(self) -> None:
        """The shared pretraining table (copied into every block) gets no gradient here: frozen, so DDP
        does not stop on a trainable parameter without a gradient (the backbone holds no mask token)."""
        self.maskdistill.encoder.rel_pos_bias.requires_grad_(False)

    def stage_hidden_states(self, pixel_values, interpolate_pos_encoding, output_attentions):
        _, hidden_states, attentions = self.maskdistill.encoder(
            pixel_values, None, interpolate_pos_encoding, True, output_attentions
        )
        return hidden_states, attentions, 1


__all__ = [
    "MaskDistillPreTrainedModel",
    "MaskDistillModel",
    "MaskDistillForMaskedImageModeling",
    "MaskDistillForImageClassification",
    "MaskDistillBackbone",
]
