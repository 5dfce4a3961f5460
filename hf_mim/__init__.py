"""hf_mim: masked image modeling methods as Hugging Face transformers models.

Importing the package registers every model with the Auto classes (AutoConfig, AutoModel,
AutoModelForMaskedImageModeling, AutoModelForImageClassification, AutoImageProcessor).
"""

from .configuration_dbot import DbotConfig
from .modeling_dbot import (
    DbotForImageClassification,
    DbotForMaskedImageModeling,
    DbotModel,
    DbotPreTrainedModel,
)
from .registry import MODEL_FAMILIES, ModelFamily, register_all

__version__ = "0.1.0"

register_all()

__all__ = [
    "DbotConfig",
    "DbotModel",
    "DbotPreTrainedModel",
    "DbotForMaskedImageModeling",
    "DbotForImageClassification",
    "MODEL_FAMILIES",
    "ModelFamily",
]
