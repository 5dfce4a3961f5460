"""MaskDistill configuration ("A Unified View of Masked Image Modeling", Peng et al., TMLR 2023).

The paper writes every MIM method as five parts: teacher T, normalisation N of the teacher output,
student S that sees the masked image, head H, loss L on masked positions. Each part is a named field
here, with MaskDistill's choice as the default; MAE-style normalised-pixel regression is the one-field
change `target="pixels"`.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from .teachers import TARGET_NORMALIZATIONS, TeacherConfigMixin
from .configuration_common import (
    ViTBackboneConfigMixin,
    PresetConfigMixin,
    check_choice,
    check_fraction,
    check_heads_divide,
    check_non_negative_int,
    check_patch_grid,
    check_positive_numbers,
    check_positive_int,
    config_error,
)

TARGETS = ("teacher", "pixels")
LOSSES = ("smooth_l1", "mse", "l1")


class MaskDistillConfig(ViTBackboneConfigMixin, PresetConfigMixin, TeacherConfigMixin, PreTrainedConfig):
    r"""Configuration of a MaskDistill student (BEiT-style ViT + linear head) and its frozen teacher.

    Defaults are ViT-B/16 with a CLIP-B/16 teacher. Named sizes: `MaskDistillConfig.from_preset("base" |
    "large")`, "demo" (embedded-data run) and "tiny" (tests; image 32, patch 8, no teacher, so a MIM
    forward returns predictions with `loss=None` until a teacher is set).

    Teacher T:
        target: "teacher" (regress a frozen teacher's patch tokens; MaskDistill) or "pixels" (regress the
            per-patch normalised pixels of the student's input, i.e. MAE's norm-pix target in this view).
        teacher_name_or_path: a local folder (or Hub id) of any vision model `AutoModel` loads whose
            output has `last_hidden_state` with a cls token first (e.g. `CLIPVisionModel`, or a full
            `CLIPModel`, whose `vision_model` is used), or of a timm ViT-style model (`TimmWrapperModel`,
            e.g. a `timm/...` Hub folder; its `num_prefix_tokens` cls/register tokens are dropped). Loaded
            lazily on first use, frozen, in eval mode, never saved with the student. None: no teacher (set
            one with `set_teacher`). Its patch grid must equal the student's. "./name" is relative to the
            student's own folder or Hub repo (converted students carry their teacher in "./teacher").
        teacher_layer: which teacher tokens: "last_hidden_state" (output of the last block, before CLIP's
            `post_layernorm` / a timm model's final `norm`; default, as both public re-implementations),
            "post_layernorm" (after it, the BEiT v2 tokenizer's choice) or "projected" (after
            `post_layernorm` and `visual_projection`; CLIP only, a timm teacher has no projection).
            The paper does not say which; see the model card.
        teacher_hidden_size: width of the chosen teacher tokens (768 for CLIP-B/16 before projection);
            checked against the teacher when it loads. `MaskDistillConfig.for_teacher(path)` reads it.
        teacher_image_mean, teacher_image_std: the teacher's input normalisation. None: read from the
            `preprocessor_config.json` in the teacher's folder (CLIP's mean/std for a CLIP teacher), else
            from a timm teacher's `pretrained_cfg`.
        image_mean, image_std: the student's input normalisation (ImageNet), used to turn the student's
            `pixel_values` back into images before the teacher's normalisation is applied.

    Normalisation N:
        target_normalization: "layer_norm" (per token over channels, no affine, biased variance as
            `F.layer_norm`; default), "layer_norm_unbiased" (torch.var, as dBOT/MAE code) or "none".
        target_norm_eps: eps of that normalisation (1e-6).

    Student S (BEiT v2 layout): image_size, patch_size, num_channels, hidden_size, num_hidden_layers,
        num_attention_heads, mlp_ratio, layer_norm_eps (1e-6), drop_path_rate, layer_scale_init_value
        (0.1), a learned `[MASK]` token, one relative position bias shared by all blocks, no absolute
        position embedding, q/v biases (the k bias exists in the fused qkv but is zero and receives no
        gradient: a constant per query shift of the logits does not change the softmax).

    Head H: a linear layer from `hidden_size` to the target width (teacher_hidden_size, or
        patch_size**2 * num_channels for pixels), applied after the final LayerNorm.

    Loss L: loss ("smooth_l1" default, "mse", "l1") averaged over masked patches and channels;
        smooth_l1_beta (1.0, torch's default).

    Masking: BEiT block-wise, mask_ratio (0.4) of the patches (`int(mask_ratio * num_patches)`, exact),
        blocks of at least mask_min_num_patches (16) patches, aspect in [mask_min_aspect, 1/mask_min_aspect].

    Fine-tuning: use_mean_pooling (mean of patch tokens + fc_norm); initializer_range (0.02, BEiT's
        trunc-normal std); classifier_init_scale (0.001, BEiT's `init_scale` on the head's init).
        backbone_pyramid, backbone_pyramid_channels, backbone_relative_position_bias, out_features, out_indices:
            the `<M>Backbone`'s feature maps (AutoBackbone, dense tasks); see `ViTBackboneConfigMixin`.
    """

    model_type = "maskdistill"

    presets = {
        "tiny": dict(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            teacher_hidden_size=16, drop_path_rate=0.0, mask_min_num_patches=4,
        ),
        # hf_mim's own size for the embedded-data demo and the learning benchmark (32 px digits, patch 4, 64
        # patches; minutes on 2 CPU cores); not from the paper. Its small-budget recipe: hf_mim/training/recipes.py.
        "demo": dict(
            image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
            drop_path_rate=0.0, mask_min_num_patches=8,
        ),
        "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, drop_path_rate=0.1),
        # ViT-L/16 student; the paper's teacher for L is not verified here (CLIP-B/16 assumed, width 768).
        "large": dict(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, drop_path_rate=0.1,
            layer_scale_init_value=1e-5,
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
        layer_norm_eps: float = 1e-6,
        drop_path_rate: float = 0.1,
        layer_scale_init_value: float = 0.1,
        target: str = "teacher",
        teacher_name_or_path: str | None = None,
        teacher_layer: str = "last_hidden_state",
        teacher_hidden_size: int = 768,
        teacher_image_mean: list[float] | None = None,
        teacher_image_std: list[float] | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        target_normalization: str = "layer_norm",
        target_norm_eps: float = 1e-6,
        loss: str = "smooth_l1",
        smooth_l1_beta: float = 1.0,
        mask_ratio: float = 0.4,
        mask_min_num_patches: int = 16,
        mask_min_aspect: float = 0.3,
        use_mean_pooling: bool = True,
        initializer_range: float = 0.02,
        classifier_init_scale: float = 0.001,
        **kwargs,
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.layer_norm_eps = layer_norm_eps
        self.drop_path_rate = drop_path_rate
        self.layer_scale_init_value = layer_scale_init_value
        self.target = target
        self.set_teacher_fields(teacher_name_or_path, teacher_layer, teacher_hidden_size, teacher_image_mean,
                                teacher_image_std, image_mean, image_std)
        self.target_normalization = target_normalization
        self.target_norm_eps = target_norm_eps
        self.loss = loss
        self.smooth_l1_beta = smooth_l1_beta
        self.mask_ratio = mask_ratio
        self.mask_min_num_patches = mask_min_num_patches
        self.mask_min_aspect = mask_min_aspect
        self.use_mean_pooling = use_mean_pooling
        self.initializer_range = initializer_range
        self.classifier_init_scale = classifier_init_scale
        super().__init__(**kwargs)
        self.validate()

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def target_size(self) -> int:
        """Width of the head's output: the teacher's token width, or one patch of pixels."""
        if self.target == "pixels":
            return self.patch_size**2 * self.num_channels
        return self.teacher_hidden_size

    @property
    def num_masking_patches(self) -> int:
        return int(self.mask_ratio * self.num_patches)

    def validate(self) -> None:
        """Raise a ValueError naming the first invalid field."""
        check_patch_grid(self.image_size, self.patch_size)
        check_positive_int("num_channels", self.num_channels)
        check_heads_divide("hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        check_non_negative_int("num_hidden_layers", self.num_hidden_layers)
        check_choice("target", self.target, TARGETS)
        check_choice("target_normalization", self.target_normalization, TARGET_NORMALIZATIONS)
        check_choice("loss", self.loss, LOSSES)
        self.validate_teacher_fields()
        check_fraction("mask_ratio", self.mask_ratio)
        check_positive_int("mask_min_num_patches", self.mask_min_num_patches)
        if not 0 < self.mask_min_aspect <= 1:
            raise config_error("mask_min_aspect", self.mask_min_aspect, "expected a number in (0, 1]")
        check_fraction("drop_path_rate", self.drop_path_rate)
        check_positive_numbers(self, "mlp_ratio", "layer_norm_eps", "target_norm_eps", "smooth_l1_beta", "initializer_range")
        if self.layer_scale_init_value is not None and self.layer_scale_init_value < 0:
            raise config_error("layer_scale_init_value", self.layer_scale_init_value, "expected >= 0 (0 = no layer scale)")


__all__ = ["MaskDistillConfig"]
