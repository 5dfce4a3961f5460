"""dBOT configuration ("Exploring Target Representations for Masked Autoencoders", Liu et al., ICLR 2024)."""

from __future__ import annotations

from transformers import PreTrainedConfig

from .configuration_common import (
    ViTBackboneConfigMixin,
    PresetConfigMixin,
    check_fraction,
    check_leaves_visible,
    check_heads_divide,
    check_non_negative_int,
    check_patch_grid,
    check_positive_numbers,
    config_error,
)
from .teachers import TeacherConfigMixin


class DbotConfig(ViTBackboneConfigMixin, PresetConfigMixin, TeacherConfigMixin, PreTrainedConfig):
    r"""Configuration of a dBOT student (ViT encoder + feature-regressing decoder) and its frozen teacher.

    Defaults are the paper's ViT-B/16 pretraining recipe (official repository, `PRETRAIN.md`).
    Named sizes: `DbotConfig.from_preset("base" | "large" | "huge")` (official), plus "small" (ViT-S/16),
    "demo" (the embedded-data run) and "tiny" (tests).

    Args:
        image_size, patch_size, num_channels: input geometry (224, 16, 3).
        hidden_size, num_hidden_layers, num_attention_heads, mlp_ratio, qkv_bias, layer_norm_eps:
            the student ViT (LayerNorm eps 1e-6 as the official code; HF's ViTMAE ships 1e-12).
        drop_path_rate: stochastic depth of the student encoder *and* decoder (0.2 for B/L, 0.3 for H in
            pretraining; fine-tuning uses 0.1 at B).
        decoder_hidden_size, decoder_num_hidden_layers, decoder_num_attention_heads: 512 / 8 / 16 at
            every size.
        mask_ratio: fraction of patches hidden from the student (uniform random, 0.75).
        teacher_depth: blocks of the frozen teacher. The stage-0 teacher is the student's own random
            initialisation truncated to this depth: 12 at Base, 0 at Large/Huge (patch embedding +
            position table only), as the official scripts do. `start_new_stage()` sets it to
            `num_hidden_layers`.
        teacher_use_final_norm: apply the teacher's final LayerNorm to its features (`--tlayernorm`,
            off in every official script).
        normalize_targets: per-token normalisation of the teacher features (unbiased variance,
            `target_norm_eps` inside the square root) before the loss (`--norm_feature_loss`).
        smooth_l1_beta: Smooth-L1 transition point (2.0).
        stage: number of bootstraps done so far (0 = random teacher); bookkeeping for checkpoints.
        teacher_name_or_path: an external teacher for stage 0 instead of the random one (the paper's
            comparison with CLIP / larger teachers): a CLIP vision tower, a timm ViT (TimmWrapperModel) or an
            hf_mim model (e.g. a finished dBOT stage), frozen and never saved (hf_mim/teachers.py). Stage 0
            then regresses its per-token-normalised patch tokens on the masked patches (the cls position is
            left out: an external cls token is not the student's, as in the official CLIP-teacher branch);
            later stages bootstrap from the student as before. None (default): the random stage-0 teacher.
        teacher_layer, teacher_image_mean, teacher_image_std, image_mean, image_std: how the external
            teacher is read and fed (see `TeacherConfigMixin`).
        teacher_hidden_size: width of the external teacher's tokens (None: hidden_size); the decoder
            predicts it in stage 0. A width other than hidden_size allows one stage only (the decoder
            could not regress the bootstrapped teacher of stage 1).
        use_mean_pooling: the fine-tuning representation is the mean of patch tokens + `fc_norm`
            (official `global_pool=True`); False uses the cls token after the final norm.
        initializer_range: std of the cls/mask token init; classifier_init_std: the head's (0.01).
        backbone_pyramid, backbone_pyramid_channels, backbone_relative_position_bias, out_features, out_indices:
            the `<M>Backbone`'s feature maps (AutoBackbone, dense tasks); see `ViTBackboneConfigMixin`.
    """

    model_type = "dbot"

    presets = {
        "tiny": dict(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            decoder_hidden_size=16, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
            teacher_depth=2, drop_path_rate=0.0,
        ),
        # hf_mim's own size for the embedded-data demo and the learning benchmark (32 px digits, patch 4, 64
        # patches; minutes on 2 CPU cores); not from the paper. Its small-budget recipe: hf_mim/training/recipes.py.
        "demo": dict(
            image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
            decoder_hidden_size=128, decoder_num_hidden_layers=4, decoder_num_attention_heads=4,
            teacher_depth=6, drop_path_rate=0.0,
        ),
        # ViT-S/16 is not an official dBOT size (the repository has none); hf_mim's benchmarks use it.
        "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, teacher_depth=12, drop_path_rate=0.1),
        "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, teacher_depth=12, drop_path_rate=0.2),
        "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, teacher_depth=0, drop_path_rate=0.2),
        "huge": dict(
            patch_size=14, hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, teacher_depth=0,
            drop_path_rate=0.3,
        ),
    }

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        drop_path_rate: float = 0.2,
        decoder_hidden_size: int = 512,
        decoder_num_hidden_layers: int = 8,
        decoder_num_attention_heads: int = 16,
        mask_ratio: float = 0.75,
        teacher_depth: int = 12,
        teacher_use_final_norm: bool = False,
        normalize_targets: bool = True,
        target_norm_eps: float = 1e-6,
        smooth_l1_beta: float = 2.0,
        stage: int = 0,
        teacher_name_or_path: str | None = None,
        teacher_layer: str = "last_hidden_state",
        teacher_hidden_size: int | None = None,
        teacher_image_mean: list[float] | None = None,
        teacher_image_std: list[float] | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        use_mean_pooling: bool = True,
        initializer_range: float = 0.02,
        classifier_init_std: float = 0.01,
        **kwargs,
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.layer_norm_eps = layer_norm_eps
        self.drop_path_rate = drop_path_rate
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.decoder_num_attention_heads = decoder_num_attention_heads
        self.mask_ratio = mask_ratio
        self.teacher_depth = teacher_depth
        self.teacher_use_final_norm = teacher_use_final_norm
        self.normalize_targets = normalize_targets
        self.target_norm_eps = target_norm_eps
        self.smooth_l1_beta = smooth_l1_beta
        self.stage = stage
        self.set_teacher_fields(teacher_name_or_path, teacher_layer, teacher_hidden_size, teacher_image_mean,
                                teacher_image_std, image_mean, image_std)
        self.use_mean_pooling = use_mean_pooling
        self.initializer_range = initializer_range
        self.classifier_init_std = classifier_init_std
        super().__init__(**kwargs)
        self.validate()

    @property
    def target_size(self) -> int:
        """Width the decoder predicts: the external teacher's in stage 0 (when given), else hidden_size."""
        if self.stage == 0 and self.teacher_hidden_size is not None:
            return self.teacher_hidden_size
        return self.hidden_size

    def validate(self) -> None:
        """Raise a ValueError naming the first invalid field."""
        check_patch_grid(self.image_size, self.patch_size)
        check_heads_divide("hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        if self.hidden_size % 4:
            raise config_error("hidden_size", self.hidden_size, "must be divisible by 4 (2-D sin-cos positions)")
        check_heads_divide(
            "decoder_hidden_size", self.decoder_hidden_size, "decoder_num_attention_heads", self.decoder_num_attention_heads
        )
        if self.decoder_hidden_size % 4:
            raise config_error(
                "decoder_hidden_size", self.decoder_hidden_size, "must be divisible by 4 (2-D sin-cos positions)"
            )
        check_non_negative_int("num_hidden_layers", self.num_hidden_layers)
        check_non_negative_int("decoder_num_hidden_layers", self.decoder_num_hidden_layers)
        check_non_negative_int("teacher_depth", self.teacher_depth)
        check_non_negative_int("stage", self.stage)
        check_fraction("mask_ratio", self.mask_ratio)
        num_patches = (self.image_size // self.patch_size) ** 2
        check_leaves_visible("mask_ratio", self.mask_ratio, num_patches - int(num_patches * (1 - self.mask_ratio)), num_patches)
        check_fraction("drop_path_rate", self.drop_path_rate)
        check_positive_numbers(self, "smooth_l1_beta", "mlp_ratio", "layer_norm_eps", "target_norm_eps")
        self.validate_teacher_fields(optional_width=True)


__all__ = ["DbotConfig"]
