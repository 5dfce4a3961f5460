"""ExtreMA configuration ("Extreme Masking for Learning Instance and Distributed Visual Representations",
Wu, Lai, Sun, Lin, TMLR 2023)."""

from __future__ import annotations

from transformers import PreTrainedConfig

from .configuration_common import (
    ViTBackboneConfigMixin,
    PresetConfigMixin,
    check_choice,
    check_fraction,
    check_leaves_visible,
    check_heads_divide,
    check_non_negative_int,
    check_patch_grid,
    check_positive_numbers,
    check_positive_int,
    config_error,
)

POOLING_CHOICES = ("mean", "class_attention")
MOMENTUM_SCHEDULES = ("cosine", "constant")
VIEW_CROPS = ("shared", "independent")
PROJECTOR_NORMS = ("layer_norm", "batch_norm")


class ExtremaConfig(ViTBackboneConfigMixin, PresetConfigMixin, PreTrainedConfig):
    r"""Configuration of an ExtreMA model: a ViT without cls token in its self-attention stack, class-attention
    blocks that pool it into an instance vector, projector + predictor MLPs, and the momentum (EMA) copy.

    Defaults are the released ViT-B/16 models (official README command: 80 % masking x 5 disjoint masks).
    Named sizes: `ExtremaConfig.from_preset("small" | "base" | "large")` (the sizes in the official
    `vits.py`; only Base was trained and released), "mask08x5" / "mask09x8" (Base with the two released
    masking settings), "demo" (the embedded-data run) and "tiny" (tests).

    Args:
        image_size, patch_size, num_channels: input geometry (224, 16, 3).
        hidden_size, num_hidden_layers, num_attention_heads, mlp_ratio, qkv_bias, layer_norm_eps:
            the ViT (LayerNorm eps 1e-6 as the official code).
        drop_path_rate: stochastic depth of the online encoder (0.1 in pretraining; the official
            fine-tuning recipe uses 0.2). The momentum encoder never drops paths.
        attention_dropout: attention-probability dropout (0 in every official recipe).
        num_class_attention_layers: class-attention blocks after the self-attention stack (2).
        layer_scale_init_value: initial layer scale of the class-attention blocks only (0.1; the
            official help text suggests 1e-5 for Large). The self-attention blocks have none.
        projector_hidden_size, projection_dim: the projector D -> 4096 -> 4096 -> 256 and the predictor
            256 -> 4096 -> 256 (`--mlp-dim`, `--proj-dim`). Their hidden layers use LayerNorm (not
            BatchNorm; see `projector_norm`) with eps `projector_layer_norm_eps` (1e-5, PyTorch's default, as
            official).
        projector_norm: "layer_norm" (official) or "batch_norm" (BYOL's: batch statistics, which keep the
            projections of different images apart; the demo recipe's choice, see `hf_mim/training/recipes.py`).
        mask_ratio: fraction of patches each mask hides (0.8); every mask keeps int(N * (1 - mask_ratio))
            patches (39 of 196).
        num_masks: masks per image (5); all share one momentum-encoder target.
        disjoint_masks: cut the masks from one permutation, so no patch is visible twice (official
            default); otherwise every mask is drawn independently.
        ema_momentum: base momentum m0 of the momentum encoder (0.996).
        ema_momentum_schedule: "cosine" (m = 1 - (1 + cos(pi * progress)) / 2 * (1 - m0), from m0 to 1
            over training, official) or "constant".
        view_crops: how the pretraining pipeline crops the student's and the teacher's view of an image.
            "shared" = the official SpatialConsistentColorAug: one random resized crop + flip for both, then an
            independent colour jitter per view (masking is the only spatial difference). "independent" = a
            crop + flip of its own per view, as BYOL (not in the official code; measured on the demo digits it
            neither stops the LayerNorm projector's collapse nor helps the BatchNorm one: see
            `hf_mim/training/recipes.py`).
        pooling: the representation `pooler_output` holds and the classifier uses. "mean" = the
            official fine-tuning representation (mean of the patch tokens after the self-attention stack +
            `fc_norm`; class attention and the final norm are not used). "class_attention" = the official
            linear-probe representation (the cls token after the class-attention blocks, final norm
            removed).
        initializer_range: std of the cls token init (0.02).
        classifier_init_std: std of the classifier weights: 0.02 x init_scale 0.001 as the official
            fine-tuning (`--init_scale 0.001`).
        backbone_pyramid, backbone_pyramid_channels, backbone_relative_position_bias, out_features, out_indices:
            the `<M>Backbone`'s feature maps (AutoBackbone, dense tasks); see `ViTBackboneConfigMixin`.
    """

    model_type = "extrema"

    presets = {
        "tiny": dict(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            projector_hidden_size=64, projection_dim=16, drop_path_rate=0.0,
        ),
        # hf_mim's own size for the embedded-data demo and the learning benchmark (32 px digits, patch 4; not
        # from the paper). 64 patches: 5 disjoint masks of 12 visible patches.
        "demo": dict(
            image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
            projector_hidden_size=1024, projection_dim=128, drop_path_rate=0.0,
        ),
        "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
        "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
        "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, layer_scale_init_value=1e-5),
        # The released ViT-B/16 masking settings (extrema_mask08x5_*.pth, extrema_mask09x8_*.pth).
        "mask08x5": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mask_ratio=0.8, num_masks=5),
        "mask09x8": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mask_ratio=0.9, num_masks=8),
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
        drop_path_rate: float = 0.1,
        attention_dropout: float = 0.0,
        num_class_attention_layers: int = 2,
        layer_scale_init_value: float = 0.1,
        projector_hidden_size: int = 4096,
        projection_dim: int = 256,
        projector_layer_norm_eps: float = 1e-5,
        projector_norm: str = "layer_norm",
        mask_ratio: float = 0.8,
        num_masks: int = 5,
        disjoint_masks: bool = True,
        ema_momentum: float = 0.996,
        ema_momentum_schedule: str = "cosine",
        view_crops: str = "shared",
        pooling: str = "mean",
        initializer_range: float = 0.02,
        classifier_init_std: float = 2e-5,
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
        self.attention_dropout = attention_dropout
        self.num_class_attention_layers = num_class_attention_layers
        self.layer_scale_init_value = layer_scale_init_value
        self.projector_hidden_size = projector_hidden_size
        self.projection_dim = projection_dim
        self.projector_layer_norm_eps = projector_layer_norm_eps
        self.projector_norm = projector_norm
        self.mask_ratio = mask_ratio
        self.num_masks = num_masks
        self.disjoint_masks = disjoint_masks
        self.ema_momentum = ema_momentum
        self.ema_momentum_schedule = ema_momentum_schedule
        self.view_crops = view_crops
        self.pooling = pooling
        self.initializer_range = initializer_range
        self.classifier_init_std = classifier_init_std
        super().__init__(**kwargs)
        self.validate()

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_visible_patches(self) -> int:
        """Patches each mask keeps: int(N * (1 - mask_ratio)), truncated as the official code."""
        return int(self.num_patches * (1 - self.mask_ratio))

    def validate(self) -> None:
        """Raise a ValueError naming the first invalid field."""
        check_patch_grid(self.image_size, self.patch_size)
        check_positive_int("num_channels", self.num_channels)
        check_heads_divide("hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        if self.hidden_size % 4:
            raise config_error("hidden_size", self.hidden_size, "must be divisible by 4 (2-D sin-cos positions)")
        check_non_negative_int("num_hidden_layers", self.num_hidden_layers)
        check_positive_int("num_class_attention_layers", self.num_class_attention_layers)
        check_positive_int("projector_hidden_size", self.projector_hidden_size)
        check_positive_int("projection_dim", self.projection_dim)
        check_positive_int("num_masks", self.num_masks)
        check_fraction("mask_ratio", self.mask_ratio)
        check_leaves_visible("mask_ratio", self.mask_ratio, self.num_patches - self.num_visible_patches, self.num_patches)
        if not isinstance(self.disjoint_masks, bool):
            raise config_error("disjoint_masks", self.disjoint_masks, "expected True or False")
        if self.disjoint_masks and self.num_masks * self.num_visible_patches > self.num_patches:
            raise config_error(
                "num_masks",
                self.num_masks,
                f"{self.num_masks} disjoint masks of {self.num_visible_patches} visible patches need more than the "
                f"{self.num_patches} patches of the image (lower num_masks or mask_ratio, or set disjoint_masks=False)",
            )
        check_fraction("ema_momentum", self.ema_momentum, allow_one=True)
        check_choice("ema_momentum_schedule", self.ema_momentum_schedule, MOMENTUM_SCHEDULES)
        check_choice("view_crops", self.view_crops, VIEW_CROPS)
        check_choice("projector_norm", self.projector_norm, PROJECTOR_NORMS)
        check_choice("pooling", self.pooling, POOLING_CHOICES)
        check_fraction("drop_path_rate", self.drop_path_rate)
        check_fraction("attention_dropout", self.attention_dropout)
        check_positive_numbers(
            self, "mlp_ratio", "layer_norm_eps", "projector_layer_norm_eps", "initializer_range", "classifier_init_std"
        )
        value = self.layer_scale_init_value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise config_error("layer_scale_init_value", value, "expected a number >= 0 (0 = no layer scale)")


__all__ = ["ExtremaConfig"]
