"""transformers' UperNet over an hf_mim backbone, loadable where hf_mim is not installed.

Model-zone file (copied flat next to a segmentation checkpoint). `UperNetConfig` resolves its
`backbone_config` through transformers' static config table, which knows no hf_mim model type, so a
saved UperNet folder alone would not load without hf_mim. These two thin subclasses exist only so that
`save_pretrained` copies this file and its flat siblings and writes an `auto_map`: importing this file
(as `trust_remote_code=True` does) registers every hf_mim config and backbone with `AutoConfig` /
`AutoBackbone` first. The computation is transformers' own `UperNetForSemanticSegmentation`.
"""

from __future__ import annotations

import os

from transformers import AutoBackbone, AutoConfig, UperNetConfig, UperNetForSemanticSegmentation
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .configuration_amt import AmtConfig
from .configuration_dbot import DbotConfig
from .configuration_extrema import ExtremaConfig
from .configuration_maskdistill import MaskDistillConfig
from .configuration_revcolv2 import RevColV2Config
from .modeling_amt import AmtBackbone
from .modeling_base import write_code_record
from .modeling_dbot import DbotBackbone
from .modeling_extrema import ExtremaBackbone
from .modeling_maskdistill import MaskDistillBackbone
from .modeling_revcolv2 import RevColV2Backbone

BACKBONES = (
    (AmtConfig, AmtBackbone),
    (DbotConfig, DbotBackbone),
    (ExtremaConfig, ExtremaBackbone),
    (MaskDistillConfig, MaskDistillBackbone),
    (RevColV2Config, RevColV2Backbone),
)


def register_backbones() -> None:
    """Make `UperNetConfig(backbone_config={"model_type": "dbot", ...})` and `load_backbone` work: hf_mim's
    own registration when it is installed, else these (remote-code) classes."""
    for config_class, backbone_class in BACKBONES:
        if config_class.model_type not in CONFIG_MAPPING:
            AutoConfig.register(config_class.model_type, config_class)
        AutoBackbone.register(config_class, backbone_class, exist_ok=True)


register_backbones()


class MIMUperNetConfig(UperNetConfig):
    """`UperNetConfig` (same fields, same `model_type`); see the module docstring for why it exists."""


class MIMUperNetForSemanticSegmentation(UperNetForSemanticSegmentation):
    """`UperNetForSemanticSegmentation` over an hf_mim backbone; see the module docstring."""

    config_class = MIMUperNetConfig

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, plus the record of the code it ships (`hf_mim_code.json`, as every hf_mim model)."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if (args[0] if args else kwargs.get("is_main_process", True)) and os.path.isdir(save_directory):
            write_code_record(save_directory)
        return result


MIMUperNetConfig.register_for_auto_class("AutoConfig")
MIMUperNetForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")

__all__ = ["MIMUperNetConfig", "MIMUperNetForSemanticSegmentation", "register_backbones"]
