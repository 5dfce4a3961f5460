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
from hf_mim.training import AttentionMapStore
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
    generator = model.mask_generator(attention_maps=AttentionMapStore())
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


def test_a_batch_never_mixes_mask_counts_once_maps_exist():
    """Examples added after the last refresh get a uniform map (the official all-ones init), so a batch
    with and without stored maps keeps one mask count (the encoder batch must be rectangular)."""
    generator = tiny_amt().mask_generator(attention_maps=AttentionMapStore())
    collator = PretrainingCollator(MaskedImageTransform(32), mask_generator=generator, seed=5)
    generator.store.update(torch.tensor([1000, 1001]), torch.rand(2, 4, 4))
    batch = collator.finish(collator(examples(3)), epoch=0)  # example 1002 has no map
    assert batch["bool_masked_pos"].sum(1).tolist() == [7, 7, 7]
    assert batch["bool_thrown_pos"].sum(1).tolist() == [6, 6, 6]
    assert torch.equal(batch["patch_attention"][2], torch.full((16,), 64.0))  # 8 x 8 pixels of weight 1


def test_crop_box_and_flip_describe_the_pixels_the_transform_produced():
    """The box and flip the transform reports, applied to a map of the image, must point at the pixels it
    actually cropped: the image is bright in its right half only, so the crop's per-patch map weights
    must track the per-patch brightness of the transformed pixels, over many crops and flips."""
    import numpy as np

    array = np.zeros((60, 80, 3), dtype=np.uint8)
    array[:, 40:] = 255
    image = Image.fromarray(array)
    bright_right = torch.zeros(6, 8)
    bright_right[:, 4:] = 1.0  # the same image as a map (any grid: fractions of the image)
    generator = tiny_amt().mask_generator(attention_maps=AttentionMapStore())
    transform = MaskedImageTransform(32, scale=(0.1, 0.5))
    checked = flips = 0
    for seed in range(40):
        pixels, crop_box, flipped = transform.transform_with_params(image, torch.Generator().manual_seed(seed))
        brightness = pixels.mean(0).reshape(4, 8, 4, 8).mean(dim=(1, 3)).reshape(-1)
        weights = generator.patch_weights(bright_right, crop_box, flipped)
        if brightness.max() - brightness.min() < 1.0:  # the crop lies on one side: nothing to compare
            continue
        correlation = torch.corrcoef(torch.stack([brightness, weights]))[0, 1]
        assert correlation > 0.9, (seed, crop_box, flipped)
        checked += 1
        flips += flipped
    assert checked >= 10 and 0 < flips < checked


def test_masks_follow_the_crop_of_the_stored_map():
    """A map hot only in the image's right half: a crop of the right half gets high weights everywhere,
    a crop of the left half none (the released code would read the map's top-left cells for both)."""
    generator = tiny_amt().mask_generator(attention_maps=AttentionMapStore())
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


def test_run_mim_refreshes_one_epoch_after_each_interval(tmp_path, caplog, fresh_accelerate_state):
    """run_mim gives the model its epoch length (--num_train_examples 22 at batch 11: 2 steps) with a step budget:
    4 steps, amt_interval 0.25 (1 step), the official epoch of delay -> one refresh, after step 3 (at the
    interval ends it would be after steps 1, 2 and 3). In this process: no start-up of its own."""
    import logging

    from hf_mim.data import embedded_pretraining_dir
    from hf_mim.scripts import run_mim as script

    caplog.set_level(logging.INFO)
    argv = [*TINY, "--model_type", "amt", "--per_device_train_batch_size", 11, "--max_train_steps", 4,
            "--num_train_examples", 22, "--config_overrides", "amt_interval=0.25",
            "--train_dir", embedded_pretraining_dir(), "--output_dir", tmp_path / "run"]
    assert script.main(list(map(str, argv))) == 0
    assert "attention refresh after steps [3]" in caplog.text
    assert "step 3: attention maps refreshed (22 images" in caplog.text and "epoch length is unknown" not in caplog.text


@pytest.mark.slow  # ~30 s of subprocess runs: in CI's slow phase (keeps the default suite near 10 min)
def test_run_mim_refreshes_and_resumes_exactly_across_a_refresh(tmp_path):
    """6 steps, refresh after step 3 (amt_interval 0.5; a step budget without --num_train_examples has no epoch
    length: the refresh comes at the interval's end, with a warning), checkpoint at 3: the store is saved with the
    checkpoint, and resuming from it gives bitwise the weights of the uninterrupted run, although every
    mask after step 3 depends on the refreshed maps. DataLoader workers hold copies of the collator made
    before the refresh: masks are drawn in the training process, so the copies' stale store is never read."""
    from hf_mim.data import embedded_pretraining_dir

    # the 22 embedded photos (no data flag would pretrain on the 1,438 embedded digits)
    common = [*TINY, "--model_type", "amt", "--max_train_steps", 6, "--checkpointing_steps", 3,
              "--config_overrides", "amt_interval=0.5,drop_path_rate=0.1", "--checkpoints_total_limit", 3,
              "--dataloader_num_workers", 2, "--train_dir", embedded_pretraining_dir()]
    full = tmp_path / "full"
    log = run_mim(*common, "--output_dir", full)
    assert "attention refresh after steps [3]" in log.stderr
    assert "without its amt_refresh_delay_epochs=1: the epoch length is unknown" in log.stderr
    assert "step 3: attention maps refreshed (22 images" in log.stderr
    logged = [line.split("run_mim: step ", 1)[1] for line in log.stderr.splitlines() if "run_mim: step " in line]
    thrown = {int(entry.split(" ", 1)[0]): json.loads(entry.split(" ", 1)[1])["patches_thrown_per_image"]
              for entry in logged if "patches_thrown_per_image" in entry}
    # the refreshed store is the one masks are drawn from: 6 of 16 patches thrown after step 3, none before
    assert [thrown[step] for step in range(1, 7)] == [0.0, 0.0, 0.0, 6.0, 6.0, 6.0]
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
        assert picture.width > 5 * 32  # input, masked, patch loss, attention with patch kinds, reconstruction, recon + visible


@pytest.mark.slow  # ~15 s of subprocess runs: in CI's slow phase (keeps the default suite near 10 min)
def test_baseline_strategy_never_refreshes(tmp_path):
    out = tmp_path / "random"
    log = run_mim(*TINY, "--model_type", "amt", "--max_train_steps", 3, "--output_dir", out,
                  "--config_overrides", "masking_strategy=random,variant=simmim")
    assert "refresh" not in log.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["masking_strategy"] == "random" and config["variant"] == "simmim"


def write_uneven_shards(folder, sizes=(5, 12)) -> None:
    """Parquet shards of random images with different lengths: ranks get different batch counts."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for shard, size in enumerate(sizes):
        images = []
        for _ in range(size):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
        table = pa.table({"image": images, "__key__": [f"{shard}-{i}" for i in range(size)]})
        pq.write_table(table, folder / f"train-{shard}.parquet")


@pytest.mark.slow
def test_two_ranks_share_their_attention_maps(tmp_path):
    """Rank 0 reads a 5-image shard, rank 1 a 12-image shard: in the refresh pass rank 0 runs out of
    batches first (2 vs 3 batches of 4) and steps along with a throw-away batch, so the collective
    forwards stay in lockstep; after the gather both ranks hold all 17 maps."""
    data = tmp_path / "data"
    write_uneven_shards(data)
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29537",
         str(SCRIPT), *TINY, "--model_type", "amt", "--train_dir", str(data), "--shuffle_buffer_size", "4",
         "--max_train_steps", "4", "--checkpointing_steps", "4",
         "--config_overrides", "amt_interval=0.5,amt_refresh_delay_epochs=0",  # a refresh after step 2 of 4
         "--output_dir", str(out)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert "attention maps refreshed (17 images" in result.stderr
    store = torch.load(out / "checkpoint-4" / "custom_checkpoint_1.pkl", weights_only=True)
    assert store["maps"].shape[0] == 17 and store["num_refreshes"] == 1


FSDP_SCRIPT = """
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from hf_mim.configuration_amt import AmtConfig
from hf_mim.modeling_amt import AmtForMaskedImageModeling
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
torch.manual_seed(0)
model = AmtForMaskedImageModeling(AmtConfig.from_preset("tiny"))
pixel_values = torch.randn(2, 3, 32, 32)
reference = model.attention_scores(pixel_values)
for layer in model.amt.encoder.layers:  # each Block its own FSDP unit, as auto-wrapping does
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
maps = model(pixel_values=pixel_values, attention_scores_only=True).attention_map
print(f"max diff {float((maps - reference).abs().max())}", flush=True)  # one write: ranks share stdout
# both ranks leave together: destroying gloo while the other rank still talks to it aborted one in five runs
# ("terminate called without an active exception")
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_refresh_forward_gathers_sharded_weights_under_fsdp2(tmp_path):
    """The refresh reads the last block through the block's own call, so FSDP's per-block hooks gather
    its sharded weights (reading norm1/attn directly failed with mixed Tensor/DTensor)."""
    script = tmp_path / "fsdp_refresh.py"
    script.write_text(FSDP_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563", str(script)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("max diff 0.0") == 2
