"""A training step is right when a few optimizer steps of run_mim's own training path reproduce the weights the
official training code reached from the same weights, batches and masks (tests/fixtures/trajectories/*/README.md):
parameter groups and weight-decay exclusions, the per-step lr (warm-up + cosine), clipping, momentum updates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trajectory_loop import relative_differences, run_mim_steps

TRAJECTORIES = Path(__file__).resolve().parent / "fixtures" / "trajectories"
REL_TOL = 1e-5


def official_steps(method: str) -> tuple[dict, dict, dict, list[dict]]:
    folder = TRAJECTORIES / method
    record = json.loads((folder / "trajectory.json").read_text())
    after = [load_file(str(folder / f"official_state_dict_after_step_{step}.safetensors"))
             for step in range(1, record["total_steps"] + 1)]
    return record, load_file(str(folder / "inputs.safetensors")), load_file(str(folder / "steps.safetensors")), after


# ------------------------------------------------------------------------------------------------ what the steps rely on


@pytest.mark.parametrize("model_type", ["dbot", "extrema", "maskdistill", "revcolv2", "amt"])
def test_parameters_frozen_at_construction_stay_frozen_after_from_pretrained(model_type, tmp_path):
    """transformers re-creates loaded parameters with requires_grad=True; run_mim --model_name_or_path would then
    train the fixed sin-cos tables and put momentum branches and teachers in the optimizer."""
    from hf_mim.auto import family_for

    family = family_for(model_type)
    frozen = {}
    for model_class in (family.masked_image_modeling_class, family.image_classification_class):
        model = model_class(family.config_class.from_preset("tiny"))
        model.save_pretrained(tmp_path / model_class.__name__)
        loaded = model_class.from_pretrained(tmp_path / model_class.__name__)
        frozen[model_class] = {name for name, param in model.named_parameters() if not param.requires_grad}
        assert {name for name, param in loaded.named_parameters() if not param.requires_grad} == frozen[model_class]
    # a sin-cos table, a momentum branch, a teacher (MaskDistill's teacher is not a submodule; its classifier's shared table is)
    assert frozen[family.masked_image_modeling_class] or frozen[family.image_classification_class]
