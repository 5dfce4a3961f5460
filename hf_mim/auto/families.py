"""The one table of hf_mim architectures and their registration with transformers' Auto classes.

Tooling-zone file (never copied to the Hub). Adding a method means adding one `ModelFamily` row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
    AutoModelForPreTraining,
    PreTrainedConfig,
    PreTrainedModel,
)

from ..configuration_amt import AmtConfig
from ..configuration_dbot import DbotConfig
from ..configuration_extrema import ExtremaConfig
from ..configuration_maskdistill import MaskDistillConfig
from ..configuration_revcolv2 import RevColV2Config
from ..modeling_base import AUTO_CLASS_ALIASES
from ..modeling_amt import AmtBackbone, AmtForImageClassification, AmtForMaskedImageModeling, AmtModel, amt_host
from ..modeling_dbot import DbotBackbone, DbotForImageClassification, DbotForMaskedImageModeling, DbotModel
from ..modeling_extrema import (
    ExtremaBackbone,
    ExtremaForImageClassification,
    ExtremaForMaskedImageModeling,
    ExtremaModel,
)
from ..modeling_maskdistill import (
    MaskDistillBackbone,
    MaskDistillForImageClassification,
    MaskDistillForMaskedImageModeling,
    MaskDistillModel,
)
from ..modeling_revcolv2 import (
    RevColV2Backbone,
    RevColV2ForImageClassification,
    RevColV2ForMaskedImageModeling,
    RevColV2Model,
)


ALIASED_AUTO_CLASSES = {alias for aliases in AUTO_CLASS_ALIASES.values() for alias in aliases}


@dataclass(frozen=True)
class ModelFamily:
    """One architecture: its config class, its heads, and the flat model-zone files defining them."""

    model_type: str
    config_class: type[PreTrainedConfig]
    base_model_class: type[PreTrainedModel]
    masked_image_modeling_class: type[PreTrainedModel]
    image_classification_class: type[PreTrainedModel]
    backbone_class: type[PreTrainedModel] | None = None
    # Pretraining augmentation, as the paper trains: RandomResizedCrop scale range + horizontal flip;
    # `two_views` adds a second view with independent colour jitter and the same crop, or a crop of its own
    # (ExtreMA; its config's `view_crops`).
    # A function of the config where the config picks the recipe (AMT: its MAE or SimMIM host's crop).
    crop_scale: tuple[float, float] | Callable[[PreTrainedConfig], tuple[float, float]] = (0.2, 1.0)
    two_views: bool = False

    def pretraining_transform(self, config: PreTrainedConfig):
        """The per-example transform the pretraining collator applies (seeded by the collator)."""
        from ..data import MaskedImageTransform, TwoViewTransform

        scale = self.crop_scale(config) if callable(self.crop_scale) else self.crop_scale
        if self.two_views:
            return TwoViewTransform(config.image_size, scale=scale, shared_crop=config.view_crops == "shared")
        return MaskedImageTransform(config.image_size, scale=scale)

    def auto_classes(self) -> dict[str, type]:
        """Auto-class name -> class, the full `auto_map` a Hub folder needs."""
        mapping: dict[str, type] = {
            "AutoConfig": self.config_class,
            "AutoModel": self.base_model_class,
            "AutoModelForMaskedImageModeling": self.masked_image_modeling_class,
            "AutoModelForImageClassification": self.image_classification_class,
        }
        if self.backbone_class is not None:
            mapping["AutoBackbone"] = self.backbone_class
        for auto_name, aliases in AUTO_CLASS_ALIASES.items():  # e.g. the pretraining head as AutoModelForPreTraining
            mapping.update(dict.fromkeys(aliases, mapping[auto_name]))
        return mapping


MODEL_FAMILIES: dict[str, ModelFamily] = {
    "dbot": ModelFamily(
        model_type="dbot",
        config_class=DbotConfig,
        base_model_class=DbotModel,
        masked_image_modeling_class=DbotForMaskedImageModeling,
        image_classification_class=DbotForImageClassification,
        backbone_class=DbotBackbone,
    ),
    "extrema": ModelFamily(
        model_type="extrema",
        config_class=ExtremaConfig,
        base_model_class=ExtremaModel,
        masked_image_modeling_class=ExtremaForMaskedImageModeling,
        image_classification_class=ExtremaForImageClassification,
        backbone_class=ExtremaBackbone,
        # official SpatialConsistentColorAug: one RandomResizedCrop(scale 0.2-1) + flip for both views,
        # then independent colour jitter (0.4, 0.4, 0.2, 0.1, p 0.8) and grayscale (p 0.2) per view
        crop_scale=(0.2, 1.0),
        two_views=True,
    ),
    "revcolv2": ModelFamily(
        model_type="revcolv2",
        config_class=RevColV2Config,
        base_model_class=RevColV2Model,
        masked_image_modeling_class=RevColV2ForMaskedImageModeling,
        image_classification_class=RevColV2ForImageClassification,
        backbone_class=RevColV2Backbone,
        # MAE-style pretraining augmentation: RandomResizedCrop(scale 0.2-1) + flip (no official code)
        crop_scale=(0.2, 1.0),
    ),
    "maskdistill": ModelFamily(
        model_type="maskdistill",
        config_class=MaskDistillConfig,
        base_model_class=MaskDistillModel,
        masked_image_modeling_class=MaskDistillForMaskedImageModeling,
        image_classification_class=MaskDistillForImageClassification,
        backbone_class=MaskDistillBackbone,
        # BEiT v2 pipeline (beit2/datasets.py): RandomResizedCrop(min_crop_scale 0.2) + flip; the teacher
        # sees the same crop (the model derives its input from the student's pixel_values)
        crop_scale=(0.2, 1.0),
    ),
    "amt": ModelFamily(
        model_type="amt",
        config_class=AmtConfig,
        base_model_class=AmtModel,
        masked_image_modeling_class=AmtForMaskedImageModeling,
        image_classification_class=AmtForImageClassification,
        backbone_class=AmtBackbone,
        # the host's own pretraining crop (`pretraining_crop_scale` of its class: mae-AMT 0.2-1, SimMIM-AMT
        # 0.67-1); the crop box also crops the stored attention map
        crop_scale=lambda config: amt_host(config).pretraining_crop_scale,
    ),
}


def family_for(model_type: str) -> ModelFamily:
    if model_type not in MODEL_FAMILIES:
        raise ValueError(f"Unknown hf_mim model_type {model_type!r}; known: {', '.join(sorted(MODEL_FAMILIES))}")
    return MODEL_FAMILIES[model_type]


def register_all() -> None:
    """Register every family with the Auto classes and the native ViT image processor (idempotent)."""
    from transformers import ViTImageProcessor
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    for family in MODEL_FAMILIES.values():
        AutoConfig.register(family.model_type, family.config_class, exist_ok=True)
        AutoModel.register(family.config_class, family.base_model_class, exist_ok=True)
        AutoModelForMaskedImageModeling.register(family.config_class, family.masked_image_modeling_class, exist_ok=True)
        AutoModelForPreTraining.register(family.config_class, family.masked_image_modeling_class, exist_ok=True)  # AUTO_CLASS_ALIASES
        AutoModelForImageClassification.register(family.config_class, family.image_classification_class, exist_ok=True)
        if family.backbone_class is not None:
            from transformers import AutoBackbone

            AutoBackbone.register(family.config_class, family.backbone_class, exist_ok=True)
        # transformers' custom-object saving: save_pretrained / push_to_hub of any of these objects copy
        # the flat model-zone files (MIMPreTrainedModel.save_pretrained maps the whole family)
        family.config_class.register_for_auto_class("AutoConfig")
        for auto_name, cls in family.auto_classes().items():
            if auto_name != "AutoConfig" and auto_name not in ALIASED_AUTO_CLASSES:  # a class records one auto class
                cls.register_for_auto_class(auto_name)
        AutoImageProcessor.register(
            family.config_class,
            image_processor_classes={"torchvision": ViTImageProcessor, "pil": ViTImageProcessorPil},
            exist_ok=True,
        )
