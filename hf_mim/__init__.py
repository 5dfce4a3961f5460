"""hf_mim: masked image modeling methods as Hugging Face transformers models.

Importing the package registers every model with the Auto classes (AutoConfig, AutoModel, AutoModelForPreTraining,
AutoModelForMaskedImageModeling, AutoModelForImageClassification, AutoBackbone, AutoImageProcessor).
"""

from .configuration_dbot import DbotConfig
from .configuration_extrema import ExtremaConfig
from .modeling_dbot import (
    DbotBackbone,
    DbotForImageClassification,
    DbotForMaskedImageModeling,
    DbotModel,
    DbotPreTrainedModel,
)
from .modeling_extrema import (
    ExtremaBackbone,
    ExtremaForImageClassification,
    ExtremaForMaskedImageModeling,
    ExtremaModel,
    ExtremaPreTrainedModel,
)
from .configuration_revcolv2 import RevColV2Config
from .modeling_revcolv2 import (
    RevColV2Backbone,
    RevColV2ForImageClassification,
    RevColV2ForMaskedImageModeling,
    RevColV2Model,
    RevColV2PreTrainedModel,
)
from .configuration_maskdistill import MaskDistillConfig
from .modeling_maskdistill import (
    MaskDistillBackbone,
    MaskDistillForImageClassification,
    MaskDistillForMaskedImageModeling,
    MaskDistillModel,
    MaskDistillPreTrainedModel,
)
from .configuration_amt import AmtConfig
from .modeling_amt import (
    AmtBackbone,
    AmtForImageClassification,
    AmtForMaskedImageModeling,
    AmtModel,
    AmtPreTrainedModel,
)
from .auto import MODEL_FAMILIES, ModelFamily, register_all
from .modeling_base import HF_MIM_VERSION as __version__  # one place, which the code of saved folders reads too

register_all()

__all__ = [
    "DbotConfig",
    "DbotModel",
    "DbotPreTrainedModel",
    "DbotForMaskedImageModeling",
    "DbotForImageClassification",
    "DbotBackbone",
    "ExtremaConfig",
    "ExtremaModel",
    "ExtremaPreTrainedModel",
    "ExtremaForMaskedImageModeling",
    "ExtremaForImageClassification",
    "ExtremaBackbone",
    "RevColV2Config",
    "RevColV2Model",
    "RevColV2PreTrainedModel",
    "RevColV2ForMaskedImageModeling",
    "RevColV2ForImageClassification",
    "RevColV2Backbone",
    "MaskDistillConfig",
    "MaskDistillModel",
    "MaskDistillPreTrainedModel",
    "MaskDistillForMaskedImageModeling",
    "MaskDistillForImageClassification",
    "MaskDistillBackbone",
    "AmtConfig",
    "AmtModel",
    "AmtPreTrainedModel",
    "AmtForMaskedImageModeling",
    "AmtForImageClassification",
    "AmtBackbone",
    "MODEL_FAMILIES",
    "ModelFamily",
]
