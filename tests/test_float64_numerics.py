"""Float64 runs are float64 throughout: eager attention (also what every `output_attentions=True` call
runs) must not round its softmax through float32. Checked on the official fixtures: eager and sdpa
agree to float64 precision, and both reproduce the official (float32) numbers."""

from __future__ import annotations

import pytest
import torch
from helpers import load_fixture, max_abs_diff

from hf_mim.convert import (
    convert_amt_checkpoint,
    convert_dbot_checkpoint,
    convert_extrema_checkpoint,
    convert_maskdistill_checkpoint,
)

TOL = 1e-5  # against the official float32 numbers
FLOAT64_TOL = 1e-12  # eager vs sdpa, both float64 (float32 softmax gave ~1e-7)

CLASSIFIERS = {
    "dbot": lambda state: convert_dbot_checkpoint(state, overrides={"num_attention_heads": 2})[0],
    "extrema": lambda state: convert_extrema_checkpoint(state, overrides={"num_attention_heads": 2})[0],
    "maskdistill": lambda state: convert_maskdistill_checkpoint(state)[0],
    "amt_mae": lambda state: convert_amt_checkpoint(state, overrides={"num_attention_heads": 12})[0],
    "amt_simmim": lambda state: convert_amt_checkpoint(state, overrides={"num_attention_heads": 12})[0],
}


def in_float64(model, attn: str):
    model = model.to(torch.float64).eval()
    model.set_attn_implementation(attn)
    return model


@pytest.mark.parametrize("method", sorted(CLASSIFIERS))
def test_classifier_float64_eager_equals_sdpa_and_the_official_logits(fixtures_dir, method):
    fixture = load_fixture(fixtures_dir, method)
    pixel_values = fixture["inputs"]["pixel_values"].to(torch.float64)
    logits = {}
    for attn in ("eager", "sdpa"):
        model = in_float64(CLASSIFIERS[method](fixture["official_classifier_state_dict"]), attn)
        with torch.no_grad():
            out = model(pixel_values, output_attentions=attn == "eager")
        assert out.logits.dtype == torch.float64
        assert max_abs_diff(out.logits, fixture["outputs"]["classifier_logits"]) <= TOL
        logits[attn] = out.logits
    assert (logits["eager"] - logits["sdpa"]).abs().max().item() <= FLOAT64_TOL


def test_dbot_pretraining_float64_eager_equals_sdpa_and_the_official_loss(fixtures_dir):
    fixture = load_fixture(fixtures_dir, "dbot")
    inputs = {name: tensor.to(torch.float64) for name, tensor in fixture["inputs"].items() if name in ("pixel_values", "noise")}
    results = {}
    for attn in ("eager", "sdpa"):
        model, _ = convert_dbot_checkpoint(
            fixture["official_state_dict"], fixture["official_teacher_state_dict"],
            overrides={"num_attention_heads": 2, "decoder_num_attention_heads": 2},
        )
        model = in_float64(model, attn)
        with torch.no_grad():
            out = model(**inputs)
        assert max_abs_diff(out.loss, fixture["outputs"]["loss"]) <= TOL
        assert max_abs_diff(out.predictions, fixture["outputs"]["decoder_pred"]) <= TOL
        results[attn] = out
    for name in ("loss", "predictions", "encoder_last_hidden_state"):
        diff = (getattr(results["eager"], name) - getattr(results["sdpa"], name)).abs().max().item()
        assert diff <= FLOAT64_TOL, (name, diff)
