"""The evaluation each paper uses runs through run_image_classification.py for every method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_mim
from hf_mim.hub import save_hub_folder

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "run_image_classification.py"


def run_classification(*args) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args), "--max_train_steps", "2", "--per_device_train_batch_size", "8",
         "--eval_steps", "2"],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow  # ~15 s of subprocess runs: in CI's slow phase (keeps the default suite near 10 min)
def test_maskdistill_fine_tunes_with_layer_decay(tmp_path):
    torch.manual_seed(0)
    save_hub_folder(hf_mim.MaskDistillForMaskedImageModeling(hf_mim.MaskDistillConfig.from_preset("tiny")), tmp_path / "pre")
    run_classification("--model_name_or_path", tmp_path / "pre", "--mode", "finetune", "--output_dir", tmp_path / "ft")
    results = json.loads((tmp_path / "ft" / "eval_results.json").read_text())
    assert 0 <= results["top1"] <= 100
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["model_type"] == "maskdistill"


@pytest.mark.slow  # ~15 s of subprocess runs: in CI's slow phase (keeps the default suite near 10 min)
def test_extrema_momentum_encoder_is_linear_probed(tmp_path):
    """ExtreMA's evaluation: the momentum encoder, class-attention token, BatchNorm + linear probe."""
    torch.manual_seed(0)
    model = hf_mim.ExtremaForMaskedImageModeling(hf_mim.ExtremaConfig.from_preset("tiny"))
    save_hub_folder(model.momentum_backbone(), tmp_path / "momentum")
    run_classification("--model_name_or_path", tmp_path / "momentum", "--mode", "linear_probe",
                       "--output_dir", tmp_path / "probe")
    from safetensors.torch import load_file

    probe = load_file(tmp_path / "probe" / "model.safetensors")
    momentum = model.momentum_encoder.state_dict()
    # the probed backbone is the momentum encoder, unchanged by probing
    key = "layers.0.attn.qkv.weight"
    probed = next(value for name, value in probe.items() if name.endswith("encoder." + key))
    assert torch.equal(probed, momentum[key])


@pytest.mark.slow  # ~30 s of subprocess runs: in CI's slow phase (keeps the default suite near 10 min)
def test_amt_both_hosts_fine_tune_from_their_pretraining_checkpoint(tmp_path):
    """MAE host: mean pool + fc_norm; SimMIM host: final norm + cls; the decoder and SimMIM's mask token
    are pretraining-only."""
    from safetensors.torch import load_file

    for variant in ("mae", "simmim"):
        torch.manual_seed(0)
        pretrained = hf_mim.AmtForMaskedImageModeling(hf_mim.AmtConfig.from_preset("tiny", variant=variant))
        save_hub_folder(pretrained, tmp_path / f"pre-{variant}")
        run_classification("--model_name_or_path", tmp_path / f"pre-{variant}", "--mode", "finetune",
                           "--layer_decay", "0.75", "--output_dir", tmp_path / f"ft-{variant}")
        weights = load_file(tmp_path / f"ft-{variant}" / "model.safetensors")
        assert not any(name.startswith("decoder.") or name.endswith("mask_token") for name in weights)
        assert ("amt.pooler.fc_norm.weight" in weights) == (variant == "mae")
        assert ("amt.encoder.layernorm.weight" in weights) == (variant == "simmim")
