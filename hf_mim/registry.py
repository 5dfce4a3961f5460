"""The one table of hf_mim architectures and their registration with transformers' Auto classes.

Tooling-zone file (never copied to the Hub). Adding a method means adding one `ModelFamily` row.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
    PreTrainedConfig,
    PreTrainedModel,
)

from .configuration_dbot import DbotConfig
from .modeling_dbot import DbotForImageClassification, DbotForMaskedImageModeling, DbotModel


@dataclass(frozen=True)
class ModelFamily:
    """One architecture: its config class, its heads, and the flat model-zone files defining them."""

    model_type: str
    config_class: type[PreTrainedConfig]
    base_model_class: type[PreTrainedModel]
    masked_image_modeling_class: type[PreTrainedModel]
    image_classification_class: type[PreTrainedModel]
    backbone_class: type[PreTrainedModel] | None = None
    # Pretraining augmentation: RandomResizedCrop scale range (+ horizontal flip), as the paper trains.
    crop_scale: tuple[float, float] = (0.2, 1.0)

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
        return mapping


MODEL_FAMILIES: dict[str, ModelFamily] = {
    "dbot": ModelFamily(
        model_type="dbot",
        config_class=DbotConfig,
        base_model_class=DbotModel,
        masked_image_modeling_class=DbotForMaskedImageModeling,
        image_classification_class=DbotForImageClassification,
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
        AutoModelForImageClassification.register(family.config_class, family.image_classification_class, exist_ok=True)
        if family.backbone_class is not None:
            from transformers import AutoBackbone

            AutoBackbone.register(family.config_class, family.backbone_class, exist_ok=True)
        AutoImageProcessor.register(
            family.config_class,
            image_processor_classes={"torchvision": ViTImageProcessor, "pil": ViTImageProcessorPil},
            exist_ok=True,
        )
