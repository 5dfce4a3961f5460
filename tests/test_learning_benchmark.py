"""benchmarks/learning_benchmark.py's pieces that decide its numbers: the ViTMAE peer's encoder copied into
hf_mim's identical ViT, the converged linear probe and the collapse measure (checked by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import learning_benchmark  # noqa: E402


def test_vitmae_encoder_copied_into_dbot_computes_the_same_tokens():
    from transformers import ViTMAEConfig, ViTMAEModel

    import hf_mim

    torch.manual_seed(0)
    dbot = hf_mim.DbotConfig.from_preset("tiny")
    config = ViTMAEConfig(
        image_size=dbot.image_size, patch_size=dbot.patch_size, hidden_size=dbot.hidden_size,
        num_hidden_layers=dbot.num_hidden_layers, num_attention_heads=dbot.num_attention_heads,
        intermediate_size=int(dbot.hidden_size * dbot.mlp_ratio), layer_norm_eps=dbot.layer_norm_eps, mask_ratio=0.0,
    )
    vitmae = ViTMAEModel(config).eval()
    with torch.no_grad():  # trained-looking weights: no parameter at its constant init
        for parameter in vitmae.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    model = hf_mim.DbotForMaskedImageModeling(dbot).dbot.eval()  # the pretraining encoder, final norm included
    model.load_state_dict(learning_benchmark.vitmae_encoder_as_dbot(vitmae.state_dict()))  # strict: every tensor
    pixels = torch.randn(2, 3, dbot.image_size, dbot.image_size)
    patches = (dbot.image_size // dbot.patch_size) ** 2
    noise = torch.arange(patches, dtype=torch.float32).expand(2, -1)  # mask ratio 0 and sorted noise: raster order
    with torch.no_grad():
        expected = vitmae(pixel_values=pixels, noise=noise).last_hidden_state
        actual = model(pixel_values=pixels).last_hidden_state
    assert torch.allclose(actual, expected, atol=1e-5)


def test_linear_probe_separates_separable_features_and_spread_is_by_hand():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    centres = torch.eye(3, 8) * 5
    features = {split: (centres[labels] + 0.1 * torch.randn(60, 8, generator=generator), labels) for split in ("train", "validation")}
    assert learning_benchmark.linear_probe(features) == 100.0
    spread = learning_benchmark.feature_spread(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    # pairwise cosines 0, 1/sqrt(2), 1/sqrt(2): mean sqrt(2) / 3
    assert spread["mean_cosine"] == pytest.approx(2 ** 0.5 / 3)
    assert spread["feature_std"] == pytest.approx(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).std(0).mean().item())


def test_frozen_evaluations_read_extremas_momentum_encoder_and_fine_tuning_the_online_one(tmp_path):
    """ExtreMA's paper probes its momentum encoder (class-attention token): the random initialisation is saved
    with it as run_mim.py saves a pretrained folder, and `probed_encoder` picks it; a method without an exported
    probing backbone (dBOT) is probed as saved."""
    from safetensors.torch import load_file

    args = learning_benchmark.parse_args(["--model_size", "tiny", "--image_size", "32", "--patch_size", "8"])
    learning_benchmark.save_random_init(args, "extrema", tmp_path / "extrema")
    learning_benchmark.save_random_init(args, "dbot", tmp_path / "dbot")
    probed = learning_benchmark.probed_encoder(tmp_path / "extrema")
    assert probed == tmp_path / "extrema" / "momentum_encoder"
    assert learning_benchmark.probed_encoder(tmp_path / "dbot") == tmp_path / "dbot"
    import json

    assert json.loads((probed / "config.json").read_text())["pooling"] == "class_attention"
    momentum = {key.removeprefix("momentum_encoder."): value
                for key, value in load_file(tmp_path / "extrema" / "model.safetensors").items() if key.startswith("momentum_encoder.")}
    exported = load_file(probed / "model.safetensors")
    assert momentum and all(torch.equal(exported[f"encoder.{key}"], value) for key, value in momentum.items())


def test_the_default_budget_is_the_demo_recipes_for_the_training_set():
    """24 epochs of the labelled training images, at least 600 steps (recipes.demo_steps): 1,438 digits -> 600."""
    args = learning_benchmark.parse_args([])
    assert learning_benchmark.pretraining_steps(args) == 600
    args = learning_benchmark.parse_args(["--batch_size", "16"])
    assert learning_benchmark.pretraining_steps(args) == 2157  # ceil(24 x 1438 / 16)
    assert learning_benchmark.pretraining_steps(learning_benchmark.parse_args(["--pretrain_steps", "7"])) == 7


def test_run_mim_is_told_the_epoch_length():
    """A step budget alone leaves run_mim without an epoch (AMT would refresh at the interval ends, one epoch
    before the official scripts): the benchmark passes the counted training images."""
    args = learning_benchmark.parse_args([])
    flags = list(map(str, learning_benchmark.mim_flags(args, "amt-mae", ["--train_dir", "x"], Path("out"))))
    assert flags[flags.index("--num_train_examples") + 1] == "1438" and flags[flags.index("--max_train_steps") + 1] == "600"
