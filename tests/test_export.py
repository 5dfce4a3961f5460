"""torch.export and torch.compile(fullgraph=True) of hf_mim models, outputs equal to eager.

Masks decide sequence lengths, so a traced model takes its mask counts from the config (the official
constant ratios) instead of reading them from the masks (`masking.uniform_count`); the masks it is
given are checked against those counts inside the graph. The default suite traces AMT's pretraining
head on both hosts (the head whose counts used to be read from tensor values); the slow test traces
every model class.
"""

from __future__ import annotations

import pytest
import torch
from transformers.utils import ModelOutput

from hf_mim import AmtConfig, AmtForMaskedImageModeling
from hf_mim.auto import MODEL_FAMILIES

TOLERANCE = 1e-5


def tensors_of(output) -> list[torch.Tensor]:
    """Every tensor of a (nested) model output, in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, ModelOutput):
        output = output.to_tuple()
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in tensors_of(item)]
    if isinstance(output, dict):
        return [tensor for item in output.values() for tensor in tensors_of(item)]
    return []


def assert_same_outputs(traced, eager, name: str) -> None:
    traced, eager = tensors_of(traced), tensors_of(eager)
    assert len(traced) == len(eager), name
    for index, (got, want) in enumerate(zip(traced, eager)):
        assert got.shape == want.shape, f"{name}: output {index} has shape {tuple(got.shape)}, eager {tuple(want.shape)}"
        if want.dtype == torch.bool or not want.is_floating_point():
            assert torch.equal(got, want), f"{name}: output {index} differs"
        else:
            diff = (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
            assert diff <= TOLERANCE, f"{name}: output {index} differs from eager by {diff}"


def amt_inputs(model: AmtForMaskedImageModeling, seed: int = 0) -> dict:
    """Images and attention-driven masks (masked + thrown) drawn by the model's own generator."""
    generator = torch.Generator().manual_seed(seed)
    masking = model.mask_generator()
    pixel_values = torch.randn(2, 3, model.config.image_size, model.config.image_size, generator=generator)
    unit_weights = torch.rand(2, masking.num_units, generator=generator)
    masks = masking.guided_masks(unit_weights, torch.rand(2, masking.num_units, generator=generator))
    return {"pixel_values": pixel_values, "bool_masked_pos": masks.bool_masked_pos, "bool_thrown_pos": masks.bool_thrown_pos}


def amt_model(variant: str) -> AmtForMaskedImageModeling:
    torch.manual_seed(0)
    return AmtForMaskedImageModeling(AmtConfig.from_preset("tiny", variant=variant)).eval()


@pytest.mark.parametrize("variant", ["mae", "simmim"])
def test_amt_pretraining_head_exports_with_explicit_masks(variant):
    """Outputs equal eager, for the example's masks and for others with the config's counts; masks with
    other counts are refused by the program (eager takes any counts that agree across the batch)."""
    model = amt_model(variant)
    inputs = amt_inputs(model)
    assert inputs["bool_thrown_pos"].any()  # masking and throwing, the data-dependent case
    with torch.no_grad():
        program = torch.export.export(model, args=(), kwargs=inputs)
        assert_same_outputs(program.module()(**inputs), model(**inputs), "export")
        other = amt_inputs(model, seed=1)
        assert_same_outputs(program.module()(**other), model(**other), "export, other masks")

        fewer = dict(inputs, bool_thrown_pos=torch.zeros_like(inputs["bool_thrown_pos"]))
        with pytest.raises(RuntimeError, match="bool_thrown_pos must select the same number of patches.*config"):
            program.module()(**fewer)
        assert model(**fewer).bool_thrown_pos.sum() == 0
        uneven = inputs["bool_thrown_pos"].clone()
        uneven[0, uneven[0].nonzero()[0]] = False
        with pytest.raises(ValueError, match=r"bool_thrown_pos must select the same number of patches in every image, got"):
            model(**dict(inputs, bool_thrown_pos=uneven))


def test_amt_pretraining_head_compiles_fullgraph():
    """The MAE host; the SimMIM host compiles in the slow test of every class (keeps this file ~20 s)."""
    model = amt_model("mae")
    inputs = amt_inputs(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert_same_outputs(compiled(**inputs), model(**inputs), "compile")


# ------------------------------------------------------------------------------ every class (slow)


def class_cases() -> list:
    cases = []
    for name, family in MODEL_FAMILIES.items():
        classes = [family.base_model_class, family.masked_image_modeling_class, family.image_classification_class]
        classes += [family.backbone_class] if family.backbone_class is not None else []
        variants = ["mae", "simmim"] if name == "amt" else [None]
        for variant in variants:
            for model_class in classes:
                label = model_class.__name__ + (f"-{variant}" if variant else "")
                cases.append(pytest.param(name, model_class, variant, id=label))
    return cases


def case_model_and_inputs(name: str, model_class, variant: str | None):
    family = MODEL_FAMILIES[name]
    overrides = {"variant": variant} if variant else {}
    if name == "maskdistill":
        overrides["target"] = "pixels"  # the teacher is a separate folder, not built from a config
    if model_class is family.backbone_class and name != "revcolv2":
        overrides["num_hidden_layers"] = 4  # the multi-scale pyramid reads four blocks
    config = family.config_class.from_preset("tiny", **overrides)
    torch.manual_seed(0)
    model = model_class(config).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = {"pixel_values": torch.randn(2, 3, config.image_size, config.image_size, generator=generator)}
    mim = family.masked_image_modeling_class
    if model_class is mim:
        if name == "amt":
            inputs.update({key: value for key, value in amt_inputs(model).items() if key != "pixel_values"})
        else:  # the collator's per-example masks: what training feeds
            draw = model.mask_generator()
            inputs["bool_masked_pos"] = torch.stack([draw(generator) for _ in range(2)])
        if name == "extrema":
            inputs["pixel_values_2"] = torch.randn(2, 3, config.image_size, config.image_size, generator=generator)
    elif model_class is family.base_model_class and name != "maskdistill" and variant != "simmim":
        # the masked backbone path where masked patches are dropped (MAE-style); counts as the config's
        draw = mim(config).mask_generator()
        if name == "amt":
            inputs["bool_masked_pos"] = torch.stack([draw(generator)[0].bool_masked_pos for _ in range(2)])
        elif name == "extrema":
            inputs["bool_masked_pos"] = torch.stack([draw(generator)[0] for _ in range(2)])
        else:
            inputs["bool_masked_pos"] = torch.stack([draw(generator) for _ in range(2)])
    return model, inputs


@pytest.mark.slow
@pytest.mark.parametrize("name, model_class, variant", class_cases())
def test_every_class_exports_and_compiles_fullgraph(name, model_class, variant):
    model, inputs = case_model_and_inputs(name, model_class, variant)
    with torch.no_grad():
        eager = model(**inputs)
        program = torch.export.export(model, args=(), kwargs=inputs)
        assert_same_outputs(program.module()(**inputs), eager, "export")
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert_same_outputs(compiled(**inputs), eager, "compile")
