"""The transformers plumbing every hf_mim model shares: the `PreTrainedModel` base, the base-model
layout rule, the family's `auto_map`, the backbone output and the classification head, and the record of
the code a saved folder ships (`hf_mim_code.json`: the hf_mim version and each code file's sha256, which
`hf-mim-verify` compares with hf_mim's released model zone).

Model-zone file: copied next to every checkpoint (Hub remote code); imports only torch and transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput


HF_MIM_VERSION = "0.1.0"  # hf_mim.__version__; kept here so that the code of a saved folder knows it
CODE_RECORD_NAME = "hf_mim_code.json"


def code_sha256(folder) -> dict[str, str]:
    """{file name: sha256} of the code files (*.py) at the top of `folder`."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(Path(folder).glob("*.py"))}


def write_code_record(folder) -> None:
    """Write `hf_mim_code.json`: which hf_mim version saved `folder` and the sha256 of each code file it ships."""
    record = {"hf_mim_version": HF_MIM_VERSION, "code_sha256": code_sha256(folder)}
    (Path(folder) / CODE_RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


class MIMPreTrainedModel(PreTrainedModel):
    """What every hf_mim model shares: image input, gradient checkpointing, attention kernels from
    transformers' interface (eager / sdpa / flash / flex), per-call output switches defaulting to the
    config. Each method's `<M>PreTrainedModel` adds its config class, prefix and initialisation."""

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block", "VisionEmbeddings"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def post_init(self):
        super().post_init()
        # what __init__ froze (fixed position tables, momentum branches, teachers): see `from_pretrained`
        self._frozen_parameter_names = {name for name, param in self.named_parameters() if not param.requires_grad}

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As PreTrainedModel's, with the parameters `__init__` froze frozen again: transformers (5.x) re-creates
        every loaded parameter with requires_grad=True, which would train a fixed sin-cos table or a momentum
        encoder by gradient (and put them in the optimizer) in a run started from saved weights."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        for name, param in model.named_parameters():
            if name in model._frozen_parameter_names:
                param.requires_grad_(False)
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Record the whole family in `config.auto_map` before saving: transformers' custom-object saving
        (`register_for_auto_class`, done by `hf_mim` on import; by transformers for remote code) copies
        the flat code files but maps only the saved class, and every head must load the folder."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **family_auto_map(type(self))}
        # what AutoModel must build to load these weights (see `builds_pretrained_encoder`)
        pooler = getattr(self.base_model, "pooler", None)
        fine_tuned = getattr(pooler, "fc_norm", None) is not None
        self.config.base_model_layout = FINE_TUNING_LAYOUT if fine_tuned else PRETRAINED_ENCODER_LAYOUT
        result = super().save_pretrained(save_directory, *args, **kwargs)
        is_main_process = args[0] if args else kwargs.get("is_main_process", True)
        if is_main_process and os.path.isdir(save_directory):  # after the code files were copied
            write_code_record(save_directory)
        return result

    def output_flags(
        self, output_hidden_states: bool | None, output_attentions: bool | None, return_dict: bool | None
    ) -> tuple[bool, bool, bool]:
        """(output_hidden_states, output_attentions, return_dict), each the config's value when None."""
        config = self.config
        return (
            config.output_hidden_states if output_hidden_states is None else output_hidden_states,
            config.output_attentions if output_attentions is None else output_attentions,
            config.return_dict if return_dict is None else return_dict,
        )


FINE_TUNING_LAYOUT = "fine_tuning"
PRETRAINED_ENCODER_LAYOUT = "pretrained_encoder"


def builds_pretrained_encoder(config, add_pooling_layer: bool, pretrained_encoder: bool | None = None) -> bool:
    """Whether a base model (AutoModel) is built as the pretrained encoder: the encoder's final norm kept
    and pooling without new parameters, so a pretraining checkpoint loads with nothing missing and the
    outputs are what pretraining trained. Otherwise the fine-tuning layout (fc_norm on the mean of the
    patch tokens, the final norm dropped), which classifiers always use.

    `pretrained_encoder` decides when given; else `config.base_model_layout`, written by every save;
    else (folders saved before that field) whether the saved class was a pretraining model."""
    if not add_pooling_layer:
        return False
    if pretrained_encoder is not None:
        return pretrained_encoder
    layout = getattr(config, "base_model_layout", None)
    if layout is None:
        return any(name.endswith("ForMaskedImageModeling") for name in (getattr(config, "architectures", None) or []))
    if layout not in (FINE_TUNING_LAYOUT, PRETRAINED_ENCODER_LAYOUT):
        raise ValueError(
            f"Invalid config value base_model_layout={layout!r}: expected {FINE_TUNING_LAYOUT!r} or {PRETRAINED_ENCODER_LAYOUT!r}."
        )
    return layout == PRETRAINED_ENCODER_LAYOUT


# A class records one auto class (`_auto_class`); these auto classes load the same class too. The pretraining
# head is where ViTMAE users look for it (`AutoModelForPreTraining` -> ViTMAEForPreTraining).
AUTO_CLASS_ALIASES = {"AutoModelForMaskedImageModeling": ("AutoModelForPreTraining",)}


def family_auto_map(model_class: type) -> dict[str, str]:
    """{"AutoConfig": "configuration_x.XConfig", "AutoModel": "modeling_x.XModel", ...}: the config class
    and every class of `model_class`'s module registered for an auto class (`register_for_auto_class`)."""
    module = sys.modules[model_class.__module__]
    classes = [model_class.config_class] + [
        value for value in vars(module).values()
        if isinstance(value, type) and value.__module__ == module.__name__ and vars(value).get("_auto_class")
    ]
    auto_map = {
        vars(cls)["_auto_class"]: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
        for cls in classes if vars(cls).get("_auto_class")
    }
    for auto_name, aliases in AUTO_CLASS_ALIASES.items():
        if auto_name in auto_map:
            auto_map.update(dict.fromkeys(aliases, auto_map[auto_name]))
    return auto_map


def backbone_output(
    hidden_states: torch.Tensor,
    pooler: nn.Module | None,
    add_pooling_layer: bool,
    all_hidden_states: tuple[torch.Tensor, ...] | None,
    attentions: tuple[torch.Tensor, ...] | None,
    return_dict: bool,
) -> BaseModelOutputWithPooling | tuple:
    """A ViT backbone's output: `pooler_output` is `pooler(hidden_states)` (mean + fc_norm) when there
    is a pooler, else the cls token when pooling was asked for, else None."""
    if pooler is not None:
        pooled = pooler(hidden_states)
    elif add_pooling_layer:
        pooled = hidden_states[:, 0]
    else:
        pooled = None
    output = BaseModelOutputWithPooling(
        last_hidden_state=hidden_states, pooler_output=pooled, hidden_states=all_hidden_states, attentions=attentions
    )
    return output if return_dict else output.to_tuple()


class ImageClassificationMixin:
    """`forward` of every `...ForImageClassification`: the backbone (`self.base_model`, found through
    `base_model_prefix`) gives `pooler_output`, the method's fine-tuning representation; `self.classifier`
    maps it to logits; `labels` go to transformers' `self.loss_function`. Put it first in the bases.
    """

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.base_model(
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = self.loss_function(labels, logits, self.config, **kwargs) if labels is not None else None
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict else output.to_tuple()
