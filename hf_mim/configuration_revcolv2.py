"""RevColV2 configuration ("RevColV2: Exploring Disentangled Representations in Masked Image Modeling",
Han, Cai, Zhang, NeurIPS 2023).

No official RevColV2 code or weights exist (the official repository holds RevCol v1 only). Every value
the paper's available text does not give is a named field here; model_cards/revcolv2.md lists the
choices.
"""

from __future__ import annotations

import re

from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

from .configuration_common import (
    PresetConfigMixin,
    check_choice,
    check_fraction,
    check_leaves_visible,
    check_heads_divide,
    check_patch_grid,
    check_positive_numbers,
    check_positive_int,
    config_error,
)
from .teachers import TARGET_NORMALIZATIONS, TeacherConfigMixin

TARGETS = ("pixels", "teacher")
TEACHER_LOSSES = ("mse", "smooth_l1")
FUSION_TYPES = ("linear", "up_linear", "identity")
POOLING_TYPES = ("mean", "cls")
PYRAMID_TYPES = ("multi_scale", "none")  # the names of backbone_common (`configuration_common.BACKBONE_PYRAMIDS`)


_UNSET = object()  # an argument not given at all (None given explicitly follows transformers' rule)


class RevColV2Config(BackboneConfigMixin, PresetConfigMixin, TeacherConfigMixin, PreTrainedConfig):
    r"""Configuration of a RevColV2 network: bottom-up and top-down reversible columns of ViT-block levels.

    Defaults are hf_mim's reading of RevColV2-B (about 90 M parameters, the paper reports 88 M).
    Named sizes: `RevColV2Config.from_preset("base" | "large")`, plus "demo" (the embedded-data run)
    and "tiny" (tests).

    Args:
        image_size, patch_size, num_channels: input geometry (224, 16, 3).
        hidden_size, num_attention_heads, mlp_ratio, qkv_bias, layer_norm_eps: every ViT block (one width
            at every level: a plain ViT keeps one token grid).
        num_levels: levels per column (4, as RevCol v1).
        blocks_per_level: ViT blocks in each level (list of `num_levels` ints).
        num_bottom_up_columns: columns run level 0 -> top on the (visible) patch tokens; the patch
            embedding is re-injected into level 0 of every one.
        num_top_down_columns: columns run top -> level 0; the first one continues from the last
            bottom-up column (its states, with mask tokens filled in, are the "previous column"), and the
            filled top level of the last bottom-up column is re-injected into the top level of every one.
        fusion_type: how a level fuses the level before it in its own column (`down`) and the next level
            of the previous column (`up`): "linear" = Linear + LayerNorm on both (the token form of RevCol
            v1's Conv-s2 + LN and Linear + LN + upsample), "up_linear" = identity `down` (nothing to
            down-sample in a ViT) and Linear + LayerNorm `up`, "identity" = plain sum.
        alpha_init: initial value of the channel-wise reversible shortcut scales (0.5, RevCol v1).
        alpha_min: |alpha| is clamped to at least this (sign kept, 0 -> +alpha_min) so that the inverse
            `(x_i - F) / alpha` stays finite (1e-3, RevCol v1).
        use_reversible: train with the memory-saving reversible engine (recompute levels in backward,
            reconstruct previous columns); False runs plain autograd with the same numbers.
        layer_scale_init_value: per-channel residual scale in every block (1e-6 as RevCol v1's blocks);
            0 disables it.
        drop_path_rate: stochastic depth, rising 0 -> rate over the blocks of one column; every column
            reuses the same ramp (RevCol v1).
        mask_ratio: fraction of patches removed before the bottom-up columns (uniform random, 0.75).
        norm_pix_loss, norm_pix_eps: per-patch normalised pixel targets (MAE), masked-patch MSE.
        target: "pixels" (default: the masked patches' pixels from the lowest level of the last top-down
            column) or "teacher" (the paper's "extra teacher" variant: a frozen teacher's normalised patch
            features at the masked positions, through a LayerNorm + Linear head on the last top-down column).
            The paper leaves open what follows; each is a field (see the model card):
        teacher_name_or_path, teacher_layer, teacher_hidden_size, teacher_image_mean, teacher_image_std,
            image_mean, image_std: the frozen teacher (CLIP, timm ViT or hf_mim model) and its input, as in
            `TeacherConfigMixin` (hf_mim/teachers.py); `RevColV2Config.for_teacher(path)` reads the width.
        teacher_head_level: which level of the last top-down column the teacher head reads (0 = the lowest,
            where the pixel head sits: only the target changes; num_levels - 1 = the top, semantic level).
        target_normalization, target_norm_eps: N of the teacher tokens ("layer_norm" per token without
            affine, as MaskDistill; "layer_norm_unbiased"; "none").
        teacher_loss, smooth_l1_beta: "mse" (as the pixel target) or "smooth_l1" (as MaskDistill) over the
            masked patches.
        use_cls_token: a cls token enters with the patches and runs through every level (MAE layout);
            the fine-tuning representation still pools patch tokens by default.
        classifier_pooling: "mean" (mean of the top-level patch tokens + fc_norm, as RevCol v1 and MAE
            fine-tuning) or "cls" (top-level cls token + fc_norm; needs `use_cls_token`).
        backbone_pyramid: how `RevColV2Backbone` turns the last top-down column's levels into feature
            maps: "multi_scale" resamples level l by 4 / 2**l (strides 4, 8, 16, 32 at patch 16: the BEiT / MAE
            UperNet recipe's deconvolutions up, max-pool down, as the ViT backbones' "multi_scale"), "none"
            keeps every level at the patch stride. Configs saved with the earlier name "simple" for the
            same pyramid load as "multi_scale".
        out_features / out_indices: backbone stages among `stage_names` = ["stem", "stage1", ...] (the
            names transformers' backbones use; stage k is level k-1; the old "level0".. names still load);
            default all levels.
        initializer_range: std of the cls and mask tokens; classifier_init_std: the head's (2e-5, the
            effective MAE / RevCol v1 fine-tuning head init).
    """

    model_type = "revcolv2"

    presets = {
        "tiny": dict(
            image_size=32, patch_size=8, hidden_size=32, num_attention_heads=2, num_levels=4,
            blocks_per_level=[1, 1, 1, 1], num_bottom_up_columns=2, num_top_down_columns=2, drop_path_rate=0.0,
        ),
        # hf_mim's own size for the embedded-data demo and the learning benchmark (32 px digits, patch 4, 64
        # patches; minutes on 2 CPU cores); not from the paper. Its small-budget recipe: hf_mim/training/recipes.py.
        "demo": dict(
            image_size=32, patch_size=4, hidden_size=128, num_attention_heads=4, num_levels=4,
            blocks_per_level=[1, 1, 1, 1], num_bottom_up_columns=2, num_top_down_columns=1, drop_path_rate=0.0,
        ),
        # ViT-B width; 2 + 1 columns of 4 one-block levels = 12 ViT-B blocks: 89.8 M parameters with the
        # pixel head (paper: 88 M).
        "base": dict(
            hidden_size=768, num_attention_heads=12, blocks_per_level=[1, 1, 1, 1], num_bottom_up_columns=2,
            num_top_down_columns=1, drop_path_rate=0.1,
        ),
        # ViT-L width; 24 ViT-L blocks in 2 + 1 columns (the paper's Large size is not retrievable).
        "large": dict(
            hidden_size=1024, num_attention_heads=16, blocks_per_level=[2, 2, 2, 2], num_bottom_up_columns=2,
            num_top_down_columns=1, drop_path_rate=0.2,
        ),
    }

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_attention_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        num_levels: int = 4,
        blocks_per_level: list[int] | tuple[int, ...] = (1, 1, 1, 1),
        num_bottom_up_columns: int = 2,
        num_top_down_columns: int = 1,
        fusion_type: str = "up_linear",
        alpha_init: float = 0.5,
        alpha_min: float = 1e-3,
        use_reversible: bool = True,
        layer_scale_init_value: float = 1e-6,
        drop_path_rate: float = 0.1,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        norm_pix_eps: float = 1e-6,
        target: str = "pixels",
        teacher_name_or_path: str | None = None,
        teacher_layer: str = "last_hidden_state",
        teacher_hidden_size: int = 768,
        teacher_image_mean: list[float] | None = None,
        teacher_image_std: list[float] | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        teacher_head_level: int = 0,
        target_normalization: str = "layer_norm",
        target_norm_eps: float = 1e-6,
        teacher_loss: str = "mse",
        smooth_l1_beta: float = 1.0,
        use_cls_token: bool = True,
        classifier_pooling: str = "mean",
        backbone_pyramid: str = "multi_scale",
        initializer_range: float = 0.02,
        classifier_init_std: float = 2e-5,
        **kwargs,
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.layer_norm_eps = layer_norm_eps
        self.num_levels = num_levels
        self.blocks_per_level = list(blocks_per_level) if isinstance(blocks_per_level, (list, tuple)) else blocks_per_level
        self.num_bottom_up_columns = num_bottom_up_columns
        self.num_top_down_columns = num_top_down_columns
        self.fusion_type = fusion_type
        self.alpha_init = alpha_init
        self.alpha_min = alpha_min
        self.use_reversible = use_reversible
        self.layer_scale_init_value = layer_scale_init_value
        self.drop_path_rate = drop_path_rate
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.norm_pix_eps = norm_pix_eps
        self.target = target
        self.set_teacher_fields(teacher_name_or_path, teacher_layer, teacher_hidden_size, teacher_image_mean,
                                teacher_image_std, image_mean, image_std)
        self.teacher_head_level = teacher_head_level
        self.target_normalization = target_normalization
        self.target_norm_eps = target_norm_eps
        self.teacher_loss = teacher_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.use_cls_token = use_cls_token
        self.classifier_pooling = classifier_pooling
        self.backbone_pyramid = "multi_scale" if backbone_pyramid == "simple" else backbone_pyramid  # the earlier name
        self.initializer_range = initializer_range
        self.classifier_init_std = classifier_init_std
        out_features = kwargs.pop("out_features", _UNSET)
        out_indices = kwargs.pop("out_indices", _UNSET)
        kwargs.pop("stage_names", None)
        super().__init__(**kwargs)
        self.validate()
        self.stage_names = ["stem"] + [f"stage{level + 1}" for level in range(self.num_levels)]
        if out_features is _UNSET and out_indices is _UNSET:  # nothing said: every level (a UperNet-ready pyramid)
            out_features, out_indices = self.stage_names[1:], None
        out_features = None if out_features is _UNSET else out_features
        out_indices = None if out_indices is _UNSET else out_indices
        if out_features is not None:  # configs saved before the transformers names: "level{k}" = "stage{k+1}"
            out_features = [
                f"stage{int(name[5:]) + 1}" if re.fullmatch(r"level\d+", str(name)) else name for name in out_features
            ]
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)

    @property
    def depths(self) -> list[int]:
        """Blocks per level, i.e. per backbone stage (the name transformers' backbone configs use)."""
        return list(self.blocks_per_level)

    @property
    def target_size(self) -> int:
        """Width of the pretraining head's output: one patch of pixels, or the teacher's token width."""
        return self.teacher_hidden_size if self.target == "teacher" else self.patch_size**2 * self.num_channels

    @property
    def num_hidden_layers(self) -> int:
        """Depth of the deepest block for layer-wise lr decay, RevCol v1's rule (`optimizer.py`): block b of
        a column (in processing order) in column c has depth b + c + 1, so the last block of the last
        column has sum(blocks_per_level) + columns - 1. See `RevColV2PreTrainedModel.layer_id_for_lr_decay`."""
        return sum(self.blocks_per_level) + self.num_bottom_up_columns + self.num_top_down_columns - 1

    def validate(self) -> None:
        """Raise a ValueError naming the first invalid field."""
        check_patch_grid(self.image_size, self.patch_size)
        check_positive_int("num_channels", self.num_channels)
        check_heads_divide("hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        if self.hidden_size % 4:
            raise config_error("hidden_size", self.hidden_size, "must be divisible by 4 (2-D sin-cos positions)")
        check_positive_int("num_levels", self.num_levels)
        if not isinstance(self.blocks_per_level, list) or len(self.blocks_per_level) != self.num_levels:
            raise config_error(
                "blocks_per_level", self.blocks_per_level, f"expected a list of num_levels={self.num_levels} integers"
            )
        for count in self.blocks_per_level:
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise config_error("blocks_per_level", self.blocks_per_level, "expected integers >= 0")
        check_positive_int("num_bottom_up_columns", self.num_bottom_up_columns)
        check_positive_int("num_top_down_columns", self.num_top_down_columns)
        check_choice("fusion_type", self.fusion_type, FUSION_TYPES)
        check_choice("classifier_pooling", self.classifier_pooling, POOLING_TYPES)
        check_choice("backbone_pyramid", self.backbone_pyramid, PYRAMID_TYPES)
        if self.classifier_pooling == "cls" and not self.use_cls_token:
            raise config_error("classifier_pooling", self.classifier_pooling, "needs use_cls_token=True")
        check_positive_numbers(self, "alpha_init", "alpha_min", "mlp_ratio", "layer_norm_eps", "norm_pix_eps")
        if abs(self.alpha_init) < self.alpha_min:
            raise config_error("alpha_init", self.alpha_init, f"must be at least alpha_min={self.alpha_min} in magnitude")
        if isinstance(self.layer_scale_init_value, bool) or not isinstance(self.layer_scale_init_value, (int, float)) or (
            self.layer_scale_init_value < 0
        ):
            raise config_error("layer_scale_init_value", self.layer_scale_init_value, "expected a number >= 0 (0 = off)")
        check_fraction("drop_path_rate", self.drop_path_rate)
        check_fraction("mask_ratio", self.mask_ratio)
        num_patches = (self.image_size // self.patch_size) ** 2
        check_leaves_visible("mask_ratio", self.mask_ratio, num_patches - int(num_patches * (1 - self.mask_ratio)), num_patches)
        check_choice("target", self.target, TARGETS)
        check_choice("target_normalization", self.target_normalization, TARGET_NORMALIZATIONS)
        check_choice("teacher_loss", self.teacher_loss, TEACHER_LOSSES)
        if not isinstance(self.teacher_head_level, int) or not 0 <= self.teacher_head_level < self.num_levels:
            raise config_error(
                "teacher_head_level", self.teacher_head_level, f"expected a level in [0, num_levels={self.num_levels})"
            )
        check_positive_numbers(self, "target_norm_eps", "smooth_l1_beta")
        self.validate_teacher_fields()
        for field in ("use_reversible", "norm_pix_loss", "use_cls_token", "qkv_bias"):
            if not isinstance(getattr(self, field), bool):
                raise config_error(field, getattr(self, field), "expected True or False")


__all__ = ["RevColV2Config"]
