"""AMT in the training pipeline: masks made after the DataLoader from the per-example attention store,
the refresh pass, the store in checkpoints, exact resume, several ranks, the picture."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hf_mim.configuration_amt import AmtConfig
from hf_mim.data import MaskedImageTransform, PretrainingCollator
from hf_mim.masking import AttentionMapStore
from hf_mim.modeling_amt import AmtForMaskedImageModeling
from test_run_mim import SCRIPT, TINY, run_mim


def tiny_amt(**overrides) -> AmtForMaskedImageModeling:
    torch.manual_seed(0)
    return AmtForMaskedImageModeling(AmtConfig.from_preset("tiny", **overrides))


def examples(count: int, size=(48, 40)):
    return [{"image": Image.new("RGB", size, (10 * i, 100, 200 - 10 * i)), "example_id": 1000 + i} for i in range(count)]


def test_collator_defers_amt_masks_to_the_training_process():
    """Workers only record crop box and flip; `finish` draws the masks: random before an example has a
    map (warm-up ratio, nothing thrown), attention-driven and thrown after, reproducibly."""
    model = tiny_amt()  # MAE: 16 patches, warm-up 0.75 -> 12 masked; AMT 0.45 / 0.4 -> 7 masked, 6 thrown
    generator = model.mask_generator()
    collator = PretrainingCollator(MaskedImageTransform(32), mask_generator=generator, seed=5)
    batch = collator(examples(3))
    assert "bool_masked_pos" not in batch and batch["crop_box"].shape == (3, 4) and batch["flipped"].shape == (3,)
    assert ((batch["crop_box"] >= 0) & (batch["crop_box"] <= 1)).all()

    warmup = collator.finish(dict(batch), epoch=0)
    assert warmup["bool_masked_pos"].sum(1).tolist() == [12, 12, 12]
    assert not warmup["bool_thrown_pos"].any() and not warmup["patch_attention"].any()

    generator.store.update(torch.tensor([1000, 1001, 1002]), torch.rand(3, 4, 4))
    guided = collator.finish(dict(batch), epoch=0)
    assert guided["bool_masked_pos"].sum(1).tolist() == [7, 7, 7]
    assert guided["bool_thrown_pos"].sum(1).tolist() == [6, 6, 6]
    assert not (guided["bool_masked_pos"] & guided["bool_thrown_pos"]).any()
    assert guided["patch_attention"].shape == (3, 16) and (guided["patch_attention"] > 0).all()
    again = collator.finish(dict(batch), epoch=0)
    assert torch.equal(again["bool_masked_pos"], guided["bool_masked_pos"])
    assert torch.equal(again["bool_thrown_pos"], guided["bool_thrown_pos"])
    other_epoch = collator.finish(dict(batch), epoch=1)
    assert not torch.equal(other_epoch["bool_masked_pos"], guided["bool_masked_pos"])

    output = model(**{k: guided[k] for k in ("pixel_values", "bool_masked_pos", "bool_thrown_pos", "patch_attention")})
    assert output.predictions.shape == (3, 10, 8 * 8 * 3)  # 16 - 6 thrown patches are predicted
    assert torch.equal(output.patch_labels, guided["bool_masked_pos"].long() + 2 * guided["bool_thrown_pos"].long())


def test_masks_follow_the_crop_of_the_stored_map():
    """A map hot only in the image's right half: a crop of the right half gets high weights everywhere,
    a crop of the left half none (the released code would read the map's top-left cells for both)."""
    generator = tiny_amt().mask_generator()
    hot_right = torch.zeros(4, 4)
    hot_right[:, 2:] = 1.0
    right = generator.patch_weights(hot_right, torch.tensor([0.0, 0.5, 1.0, 0.5]), flipped=False)
    left = generator.patch_weights(hot_right, torch.tensor([0.0, 0.0, 1.0, 0.5]), flipped=False)
    assert right.min() > 0.5 * right.max() and left.max() < 0.5 * right.max()
    whole = generator.patch_weights(hot_right, None, flipped=False).reshape(4, 4)
    mirrored = generator.patch_weights(hot_right, None, flipped=True).reshape(4, 4)
    assert torch.allclose(mirrored, whole.flip(1))
    assert whole[:, 3].min() > whole[:, 0].max()


def test_refresh_pass_fills_the_store_with_every_image():
    from accelerate import Accelerator

    from hf_mim.data import ResizeTransform, embedded_pretraining_dir, load_image_stream, make_dataloader, prepare_stream
    from hf_mim.training import refresh_attention_maps

    model = tiny_amt()
    raw, column, _ = load_image_stream(train_dir=str(embedded_pretraining_dir()))
    stream = prepare_stream(raw, column, seed=0, buffer_size=0)
    loader = make_dataloader(stream, PretrainingCollator(ResizeTransform(32)), batch_size=5, drop_last=False)
    store = AttentionMapStore()
    model.train()
    stats = refresh_attention_maps(model, store, loader, Accelerator(cpu=True))
    assert model.training  # the pass runs in eval mode and gives the model back in train mode
    assert stats["maps"] == len(store) == 22 and store.num_refreshes == 1  # every embedded photo, last batch included
    batch = next(iter(loader))
    expected = model.attention_scores(batch["pixel_values"])
    for example_id, reference in zip(batch["example_id"].tolist(), expected):
        assert torch.allclose(store.get(example_id), reference, atol=1e-3)  # stored in float16


def test_run_mim_refreshes_and_resumes_exactly_across_a_refresh(tmp_path):
    """6 steps, refresh after step 3 (amt_interval 0.5), checkpoint at 3: the store is saved with the
    checkpoint, and resuming from it gives bitwise the weights of the uninterrupted run, although every
    mask after step 3 depends on the refreshed maps. DataLoader workers hold copies of the collator made
    before the refresh: masks are drawn in the training process, so the copies' stale store is never read."""
    common = [*TINY, "--model_type", "amt", "--max_train_steps", 6, "--checkpointing_steps", 3,
              "--config_overrides", "amt_interval=0.5,drop_path_rate=0.1", "--checkpoints_total_limit", 3,
              "--dataloader_num_workers", 2]
    full = tmp_path / "full"
    log = run_mim(*common, "--output_dir", full)
    assert "attention refresh after steps [3]" in log.stderr
    assert "step 3: attention maps refreshed (22 images" in log.stderr
    store = torch.load(full / "checkpoint-3" / "custom_checkpoint_1.pkl", weights_only=True)
    assert store["maps"].shape == (22, 4, 4) and store["num_refreshes"] == 1

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    os.symlink(full / "checkpoint-3", resumed / "checkpoint-3")
    run_mim(*common, "--output_dir", resumed, "--resume_from_checkpoint", "latest")
    reference, restarted = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key in reference:
        assert torch.equal(reference[key], restarted[key]), key
    with Image.open(full / "mim_picture.png") as picture:
        assert picture.width > 5 * 32  # input, masked, patch loss, attention + kinds, reconstruction, recon + visible


def test_baseline_strategy_never_refreshes(tmp_path):
    out = tmp_path / "random"
    log = run_mim(*TINY, "--model_type", "amt", "--max_train_steps", 3, "--output_dir", out,
                  "--config_overrides", "masking_strategy=random,variant=simmim")
    assert "refresh" not in log.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["masking_strategy"] == "random" and config["variant"] == "simmim"


@pytest.mark.slow
def test_two_ranks_share_their_attention_maps(tmp_path):
    """Each rank reads half of the 4 shards in the refresh pass; after the gather both hold all 22 maps."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29537",
         str(SCRIPT), *TINY, "--model_type", "amt", "--max_train_steps", "4", "--checkpointing_steps", "4",
         "--config_overrides", "amt_interval=0.5", "--output_dir", str(out)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert "attention maps refreshed (22 images" in result.stderr
    store = torch.load(out / "checkpoint-4" / "custom_checkpoint_1.pkl", weights_only=True)
    assert store["maps"].shape[0] == 22 and store["num_refreshes"] == 1
