"""transformers' own common suites run against every hf_mim model class.

`ModelTesterMixin` (tests/test_modeling_common.py), `ConfigTester` and `BackboneTesterMixin` of the
INSTALLED transformers version, from its source distribution (see transformers_suite.py; never
copied here). One test case per model class, because the sequence a head's encoder sees differs
(MAE-style heads drop the masked patches). Pretraining heads get explicit masks so that every call
is deterministic. Suite flags are switched off only where a concept does not apply, with the reason.
"""

from __future__ import annotations

import unittest
from unittest import mock

import pytest
import torch
from torch import nn
from transformers.utils import ModelOutput

import transformers_suite
from hf_mim import (
    AmtConfig,
    AmtForImageClassification,
    AmtForMaskedImageModeling,
    AmtModel,
    DbotConfig,
    DbotForImageClassification,
    DbotForMaskedImageModeling,
    DbotModel,
    ExtremaConfig,
    ExtremaForImageClassification,
    ExtremaForMaskedImageModeling,
    ExtremaModel,
    MaskDistillConfig,
    MaskDistillForImageClassification,
    MaskDistillForMaskedImageModeling,
    MaskDistillModel,
    RevColV2Backbone,
    RevColV2Config,
    RevColV2ForImageClassification,
    RevColV2ForMaskedImageModeling,
    RevColV2Model,
)

try:
    transformers_suite.load()
except transformers_suite.SuiteUnavailable as error:
    pytest.skip(f"transformers' common tests are unavailable: {error}", allow_module_level=True)

from transformers_common_tests.test_backbone_common import BackboneTesterMixin  # noqa: E402
from transformers_common_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_common_tests.test_modeling_common import ModelTesterMixin, floats_tensor  # noqa: E402

BATCH = 2
IMAGE, PATCH = 32, 8  # the tiny presets
NUM_PATCHES = (IMAGE // PATCH) ** 2  # 16
VISIBLE = 4  # MAE-style heads: 12 of 16 patches hidden


def mask_with(visible: list[list[int]]) -> torch.Tensor:
    """(B, N) bool mask, True = hidden, with the given visible patch indices per image."""
    mask = torch.ones(len(visible), NUM_PATCHES, dtype=torch.bool)
    for row, keep in enumerate(visible):
        mask[row, keep] = False
    return mask


def mae_masks() -> dict:
    return {"bool_masked_pos": mask_with([[0, 5, 10, 15], [1, 2, 7, 12]])}


def extrema_masks() -> dict:
    """Two disjoint masks per image, each keeping VISIBLE patches."""
    first, second = mask_with([[0, 5, 10, 15], [1, 2, 7, 12]]), mask_with([[1, 6, 11, 14], [0, 3, 8, 13]])
    return {"bool_masked_pos": torch.stack([first, second], dim=1)}


def amt_mae_masks() -> dict:
    """4 visible, 6 masked (predicted), 6 thrown (neither seen nor predicted) per image."""
    thrown = torch.zeros(BATCH, NUM_PATCHES, dtype=torch.bool)
    thrown[0, [1, 2, 3, 4, 6, 7]] = True
    thrown[1, [0, 3, 4, 5, 6, 8]] = True
    return {"bool_masked_pos": mae_masks()["bool_masked_pos"] & ~thrown, "bool_thrown_pos": thrown}


def simmim_masks() -> dict:
    return {"bool_masked_pos": mask_with([[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]])}


class HeadTester:
    """transformers' "model tester" for one hf_mim class: tiny config, random images, explicit masks."""

    is_training = True

    def __init__(self, parent, spec: dict):
        self.parent = parent
        self.config_class = spec["config_class"]
        self.overrides = spec.get("overrides", {})
        self.extra_inputs = spec.get("inputs", dict)
        self.batch_size = BATCH
        self.image_size, self.patch_size, self.num_channels = IMAGE, PATCH, 3
        config = self.get_config()
        self.hidden_size = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.num_hidden_layers = spec.get("num_hidden_layers", getattr(config, "num_hidden_layers", None))
        self.seq_length = spec["seq_length"]
        self.is_training = spec.get("is_training", True)
        # the suite's own mask for heads taking `bool_masked_pos`: the first num_masks of mask_length patches
        self.num_masks, self.mask_length = spec.get("num_masks", NUM_PATCHES - VISIBLE), NUM_PATCHES
        if "expected_num_hidden_layers" in spec:
            self.expected_num_hidden_layers = spec["expected_num_hidden_layers"]

    def get_config(self):
        return self.config_class.from_preset("tiny", **self.overrides)

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), {"pixel_values": pixel_values, **self.extra_inputs()}


def without_bool_tensors(output):
    """A model output with its bool tensors (masks) as uint8, same values."""
    if isinstance(output, torch.Tensor):
        return output.to(torch.uint8) if output.dtype == torch.bool else output
    if isinstance(output, ModelOutput):
        for key, value in output.items():
            output[key] = without_bool_tensors(value)
        return output
    if isinstance(output, (tuple, list)):
        return type(output)(without_bool_tensors(value) for value in output)
    return output


def outputs_transformed(model_class, transform):
    """Patch `model_class.forward` so that its output goes through `transform`."""
    forward = model_class.forward

    def transformed_forward(model, *args, **kwargs):
        return transform(forward(model, *args, **kwargs))

    return mock.patch.object(model_class, "forward", transformed_forward)


class HeadTestBase(ModelTesterMixin):
    spec: dict = {}
    # hf_mim models read images: no token embeddings to resize, no inputs_embeds.
    test_resize_embeddings = False

    def setUp(self):
        self.model_tester = HeadTester(self, self.spec)
        self.has_attentions = self.spec.get("has_attentions", True)

    def test_model_get_set_embeddings(self):
        """The suite's version expects token embeddings (nn.Embedding); image models expose their patch
        embedding instead, as transformers' own ViT-family tests check."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), nn.Module)
            output_embeddings = model.get_output_embeddings()
            self.assertTrue(output_embeddings is None or isinstance(output_embeddings, nn.Linear))

    def test_model_outputs_equivalence(self):
        """The suite's check, with the masks that pretraining heads return (bool, as transformers' Hiera
        does) compared as uint8: the suite builds its failure message eagerly with `tuple - dict`, which
        torch refuses for bool tensors even when they are equal."""
        with outputs_transformed(self.all_model_classes[0], without_bool_tensors):
            super().test_model_outputs_equivalence()

    def check_training_gradient_checkpointing(self, gradient_checkpointing_kwargs=None):
        overrides = self.spec.get("checkpointing_overrides")
        if overrides:
            self.model_tester.overrides = {**self.model_tester.overrides, **overrides}
        super().check_training_gradient_checkpointing(gradient_checkpointing_kwargs)

    def test_retain_grad_hidden_states_attentions(self):
        if self.spec.get("is_backbone"):
            self.skipTest(
                "a backbone's first output is the tuple of feature maps; transformers runs this check on the "
                "family's base model (TestRevcolv2Model here)"
            )
        super().test_retain_grad_hidden_states_attentions()

    def test_batching_equivalence(self):
        """The suite's check, without the outputs that are batch means by definition (ExtreMA's
        `loss_per_mask`: one loss per mask over the batch), which no single example can reproduce."""
        aggregates = self.spec.get("batch_aggregates", ())

        def without_aggregates(output):
            for key in aggregates:
                output[key] = None
            return output

        with outputs_transformed(self.all_model_classes[0], without_aggregates):
            super().test_batching_equivalence()

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        # Our classifiers are registered at run time, so the suite's name lists do not know them.
        if return_labels and model_class.__name__.endswith("ForImageClassification"):
            inputs_dict["labels"] = torch.zeros(self.model_tester.batch_size, dtype=torch.long)
        return inputs_dict


def method_specs(name, config_class, model, mim, classifier, *, full, mim_seq, mim_inputs, overrides=None, **extra):
    """The three heads of one method; `full`: tokens the unmasked encoder sees, `mim_seq`: the
    pretraining head's encoder length with the explicit masks."""
    common = dict(config_class=config_class, overrides=overrides or {}, **extra)
    return {
        f"{name}_model": dict(common, model_class=model, seq_length=full, is_training=False),  # no loss: nothing to train
        f"{name}_mim": dict(common, model_class=mim, seq_length=mim_seq, inputs=mim_inputs),
        f"{name}_classifier": dict(common, model_class=classifier, seq_length=full),
    }


SPECS = {
    **method_specs("dbot", DbotConfig, DbotModel, DbotForMaskedImageModeling, DbotForImageClassification,
                   full=1 + NUM_PATCHES, mim_seq=1 + VISIBLE, mim_inputs=mae_masks),
    **method_specs("amt", AmtConfig, AmtModel, AmtForMaskedImageModeling, AmtForImageClassification,
                   full=1 + NUM_PATCHES, mim_seq=1 + VISIBLE, mim_inputs=amt_mae_masks),
    **method_specs("amt_simmim", AmtConfig, AmtModel, AmtForMaskedImageModeling, AmtForImageClassification,
                   full=1 + NUM_PATCHES, mim_seq=1 + NUM_PATCHES, mim_inputs=simmim_masks,
                   overrides={"variant": "simmim"}),
    **method_specs("extrema", ExtremaConfig, ExtremaModel, ExtremaForMaskedImageModeling, ExtremaForImageClassification,
                   full=NUM_PATCHES, mim_seq=VISIBLE, mim_inputs=extrema_masks),
    **method_specs("maskdistill", MaskDistillConfig, MaskDistillModel, MaskDistillForMaskedImageModeling,
                   MaskDistillForImageClassification, full=1 + NUM_PATCHES, mim_seq=1 + NUM_PATCHES,
                   mim_inputs=simmim_masks),
    **method_specs("revcolv2", RevColV2Config, RevColV2Model, RevColV2ForMaskedImageModeling,
                   RevColV2ForImageClassification, full=1 + NUM_PATCHES, mim_seq=1 + VISIBLE, mim_inputs=mae_masks),
}
SPECS["extrema_mim"]["batch_aggregates"] = ("loss_per_mask",)
SPECS["maskdistill_mim"]["overrides"] = {"target": "pixels"}  # the teacher is a separate folder, not built from a config
SPECS["amt_simmim_mim"]["num_masks"] = SPECS["maskdistill_mim"]["num_masks"] = 8
for _name in ("revcolv2_model", "revcolv2_mim", "revcolv2_classifier"):
    SPECS[_name].update(
        # the reversible columns recompute every block in backward and keep no attention maps
        has_attentions=False,
        # not one stack of layers (config.num_hidden_layers is the lr-decay depth): the suite reads this
        # only for attention maps (none) and hidden-state counts (given below); the blocks per level
        num_hidden_layers=max(RevColV2Config.from_preset("tiny").blocks_per_level),
        # the reversible engine recomputes every level itself, so checkpointing is a no-op there: the
        # suite's checkpointing checks (which count checkpointed calls) run on plain columns
        checkpointing_overrides={"use_reversible": False},
        # embeddings + the top level after each top-down column, for every head (issue 25 item 8)
        expected_num_hidden_layers=1 + RevColV2Config.from_preset("tiny").num_top_down_columns,
    )
SPECS["revcolv2_backbone"] = dict(SPECS["revcolv2_model"], model_class=RevColV2Backbone, is_backbone=True,
                                  # a backbone's hidden states are its stages: stem + one per level
                                  expected_num_hidden_layers=1 + RevColV2Config.from_preset("tiny").num_levels)


for _name, _spec in SPECS.items():
    _class_name = "Test" + "".join(part.capitalize() for part in _name.split("_"))
    globals()[_class_name] = type(
        _class_name,
        (HeadTestBase, unittest.TestCase),
        {"spec": _spec, "all_model_classes": (_spec["model_class"],), "__module__": __name__},
    )


CONFIGS = {
    "dbot": (DbotConfig, None),
    "amt": (AmtConfig, None),
    "extrema": (ExtremaConfig, None),
    "maskdistill": (MaskDistillConfig, None),
    "revcolv2": (RevColV2Config, None),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_common(name):
    config_class, common_properties = CONFIGS[name]

    class Case(unittest.TestCase):
        def runTest(self):
            pass

    tester = ConfigTester(
        Case(), config_class=config_class, has_text_modality=False, common_properties=common_properties,
        **config_class.from_preset("tiny").to_diff_dict(),
    )
    tester.run_common_tests()


class TestRevColV2BackboneCommon(BackboneTesterMixin, unittest.TestCase):
    all_model_classes = (RevColV2Backbone,)
    config_class = RevColV2Config
    has_attentions = False  # RevColV2Backbone returns feature maps only

    def setUp(self):
        self.model_tester = HeadTester(self, SPECS["revcolv2_backbone"])
