"""Validation and named sizes shared by every hf_mim configuration.

Model-zone file: it is copied next to every checkpoint, so it imports only the standard library and
transformers.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin


def config_error(field: str, value: Any, expected: str) -> ValueError:
    """A ValueError that names the offending config field, its value and what was expected."""
    return ValueError(f"Invalid config value {field}={value!r}: {expected}.")


def check_positive_int(field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise config_error(field, value, "expected a positive integer")


def check_non_negative_int(field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise config_error(field, value, "expected an integer >= 0")


def check_fraction(field: str, value: Any, *, allow_one: bool = False) -> None:
    upper_ok = value <= 1 if allow_one else value < 1
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 <= value and upper_ok):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise config_error(field, value, f"expected a number in {interval}")


def check_leaves_visible(field: str, value: Any, num_hidden: int, total: int, unit: str = "patch", detail: str = "") -> None:
    """The one "leaves no visible patch" check of every method: hiding `num_hidden` of `total` units (as
    `field`=`value` says) must leave the encoder at least one to see."""
    if total - num_hidden < 1:
        raise config_error(field, value, f"leaves no visible {unit} out of {total}" + (f" ({detail})" if detail else ""))


def check_positive_numbers(config: Any, *fields: str) -> None:
    """Each named field of `config` must be a number > 0 (the first that is not is named)."""
    for field in fields:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise config_error(field, value, "expected a positive number")


def check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise config_error(field, value, f"expected one of {', '.join(map(repr, choices))}")


def check_heads_divide(width_field: str, width: int, heads_field: str, heads: int) -> None:
    check_positive_int(width_field, width)
    check_positive_int(heads_field, heads)
    if width % heads != 0:
        raise config_error(
            width_field, width, f"must be divisible by {heads_field}={heads} (the per-head width must be whole)"
        )


def check_patch_grid(image_size: Any, patch_size: Any) -> None:
    check_positive_int("image_size", image_size)
    check_positive_int("patch_size", patch_size)
    if image_size % patch_size != 0:
        raise config_error("image_size", image_size, f"must be a multiple of patch_size={patch_size}")


class PresetConfigMixin:
    """Named model sizes (`base`, `large`, ..., `tiny` for tests) from one table per method.

    `Config.from_preset("large", mask_ratio=0.8)` builds the paper's Large configuration with overrides.
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> PreTrainedConfig:
        if name not in cls.presets:
            raise ValueError(
                f"Unknown preset {name!r} for {cls.__name__}; available presets: {', '.join(sorted(cls.presets))}."
            )
        kwargs = copy.deepcopy(cls.presets[name])
        kwargs.update(overrides)
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Backbone stages of the plain-ViT methods (dBOT, ExtreMA, MaskDistill, AMT)
# --------------------------------------------------------------------------------------------------

BACKBONE_PYRAMIDS = ("multi_scale", "simple", "none")


def vit_stage_names(num_layers: int) -> list[str]:
    """["stem", "stage1", ..., "stageN"]: the patch embedding, then the output of each block."""
    return ["stem"] + [f"stage{index}" for index in range(1, num_layers + 1)]


def default_vit_out_features(num_layers: int, pyramid: str) -> list[str]:
    """The stages a ViT backbone returns by default.

    "simple" (ViTDet): the last block only. Otherwise the BEiT / MAE UperNet recipe's four blocks at
    depth d/3, d/2, 2d/3, d (blocks 4, 6, 8, 12 of ViT-B; 8, 12, 16, 24 of ViT-L: BEiT's `out_indices`
    [3, 5, 7, 11] and [7, 11, 15, 23]); fewer when the encoder has fewer than four blocks.
    """
    if num_layers == 0:
        return ["stem"]
    if pyramid == "simple":
        return [f"stage{num_layers}"]
    depths = sorted({max(1, int(num_layers * fraction + 0.5)) for fraction in (1 / 3, 1 / 2, 2 / 3, 1.0)})
    return [f"stage{depth}" for depth in depths]


class ViTBackboneConfigMixin(BackboneConfigMixin):
    """`out_features` / `out_indices` / `stage_names` (transformers' backbone conventions) and the feature
    pyramid of the `<M>Backbone` of a plain-ViT config. Put it first in the config's bases; the config's
    own `__init__` sets `num_hidden_layers` before calling `super().__init__(**kwargs)`.

    Fields (keyword arguments):
        backbone_pyramid: how the backbone turns block outputs into multi-scale feature maps.
            "multi_scale" (default): the BEiT / MAE UperNet recipe, four blocks (`out_features`) resampled
            to strides patch/4, patch/2, patch, 2*patch (4, 8, 16, 32 at patch 16) by two deconvolutions
            (+ BatchNorm + GELU), one deconvolution, identity and max-pooling.
            "simple": ViTDet's simple feature pyramid from ONE block (`out_features`, default the last),
            strides 4, 8, 16, 32 at patch 16, each level projected to `backbone_pyramid_channels` (1x1 and
            3x3 convolutions with channel LayerNorm).
            "none": each `out_features` block as a (B, D, h, w) map at the patch stride.
        backbone_pyramid_channels: output width of the "simple" pyramid (ViTDet: 256).
        backbone_relative_position_bias: give every block a relative position bias, zero-initialised and
            trained from scratch on top of the absolute positions (the MAE / dBOT segmentation recipe;
            BEiT's `use_rel_pos_bias`). Models that already have per-block tables (MaskDistill) ignore it.
        out_features / out_indices: stages among `stage_names` = ["stem", "stage1", ..., "stageN"];
            default: see `default_vit_out_features`.
    """

    def __init__(
        self,
        *args,
        backbone_pyramid: str = "multi_scale",
        backbone_pyramid_channels: int = 256,
        backbone_relative_position_bias: bool = False,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        stage_names: list[str] | None = None,  # derived from num_hidden_layers; a saved value is ignored
        **kwargs,
    ):
        self.backbone_pyramid = backbone_pyramid
        self.backbone_pyramid_channels = backbone_pyramid_channels
        self.backbone_relative_position_bias = backbone_relative_position_bias
        super().__init__(*args, **kwargs)
        if not isinstance(backbone_relative_position_bias, bool):
            raise config_error("backbone_relative_position_bias", backbone_relative_position_bias, "expected True or False")
        check_choice("backbone_pyramid", backbone_pyramid, BACKBONE_PYRAMIDS)
        check_positive_int("backbone_pyramid_channels", backbone_pyramid_channels)
        check_non_negative_int("num_hidden_layers", self.num_hidden_layers)
        self.stage_names = vit_stage_names(self.num_hidden_layers)
        if out_features is None and out_indices is None:
            out_features = default_vit_out_features(self.num_hidden_layers, backbone_pyramid)
        try:
            self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        except ValueError as error:
            raise ValueError(f"Invalid config value out_features={out_features!r} / out_indices={out_indices!r}: {error}") from None
