"""run_mim.py end to end on tiny models: outputs, exact resume, stages, faults, push."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "run_mim.py"
TINY = ["--model_type", "dbot", "--model_size", "tiny", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--seed", "3",
        "--downstream_eval", "none"]  # the downstream check (on by default with the embedded data): tests/test_downstream.py


def run_mim(*args, check=True, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"run_mim failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def test_embedded_default_writes_a_hub_ready_folder(tmp_path):
    out = tmp_path / "run"
    run_mim(*TINY, "--max_train_steps", 3, "--output_dir", out, "--with_tracking")
    assert list((out / "runs").rglob("events.out.tfevents*")), "no tensorboard log written"
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "training_args.json",
                 "mim_picture.png", "modeling_dbot.py", "configuration_dbot.py", "modeling_base.py"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_dbot.DbotForImageClassification"
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "embedded digits" in card
    assert "hub_token" not in json.loads((out / "training_args.json").read_text())
    with Image.open(out / "mim_picture.png") as picture:
        assert picture.width > 3 * 32
    import hf_mim  # noqa: F401
    from transformers import AutoModel

    AutoModel.from_pretrained(out)
    from hf_mim.training.visualize import visualize_checkpoint  # hf-mim-visualize reads run_mim's folder

    (picture,) = visualize_checkpoint(out, out / "mim_picture.png", tmp_path / "pictures")
    with Image.open(picture) as image:
        assert image.size == (3 * (32 + 4), 32 + 4 + 14)  # input, masked, per-patch loss; one row


def test_resume_is_exact_across_a_stage_boundary(tmp_path):
    """6 steps, 2 dBOT stages (boundary at step 3), drop path on: stopping after the step-3 checkpoint
    and resuming gives bitwise the weights of the uninterrupted run."""
    common = [*TINY, "--max_train_steps", 6, "--num_stages", 2, "--checkpointing_steps", 3,
              "--config_overrides", "drop_path_rate=0.2", "--checkpoints_total_limit", 3]
    full = tmp_path / "full"
    run_mim(*common, "--output_dir", full)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    os.symlink(full / "checkpoint-3", resumed / "checkpoint-3")
    log = run_mim(*common, "--output_dir", resumed, "--resume_from_checkpoint", "latest")
    assert "resumed from" in log.stderr
    reference, restarted = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert reference.keys() == restarted.keys()
    for key in reference:
        assert torch.equal(reference[key], restarted[key]), key
    config = json.loads((full / "config.json").read_text())
    assert config["stage"] == 1  # the bootstrap happened once
    # The teacher of stage 1 is the student of stage 0 at the boundary, kept in checkpoint-3.
    at_boundary = load_file(full / "checkpoint-3" / "model.safetensors")
    assert torch.equal(
        reference["teacher.layers.0.attn.qkv.weight"], at_boundary["dbot.encoder.layers.0.attn.qkv.weight"]
    )


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "diverge"
    result = run_mim(*TINY, "--max_train_steps", 8, "--checkpointing_steps", 1, "--learning_rate", "1e30", "--num_warmup_steps", 1,
                     "--output_dir", out, check=False)
    assert result.returncode == 1
    assert "non-finite" in result.stderr.lower() or "not finite" in result.stderr.lower()
    assert "checkpoint-" in result.stderr
    from hf_mim.training import checkpoint_step, list_checkpoints

    # the newest checkpoint saved before the failing step (one saved at it holds the diverged weights)
    failed_at = int(result.stderr.split("non-finite training loss", 1)[1].split(" at step ", 1)[1].split(".", 1)[0])
    good = [path for path in list_checkpoints(out) if checkpoint_step(path) < failed_at]
    assert good and f"--resume_from_checkpoint {good[-1]}," in result.stderr


def write_parquet_with_bad_images(folder: Path) -> None:
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)

    def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        return buffer.getvalue()

    good = [encode(Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))) for _ in range(12)]
    jpeg = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    bad = [
        b"not an image at all",
        jpeg[: len(jpeg) // 2],  # truncated
        encode(Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8))),  # tiny
        encode(Image.new("L", (1500, 1500))),  # over --max_image_pixels 1000000, not a JPEG
    ]
    converted = [
        encode(Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8))),  # grayscale
        encode(Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8))),  # RGBA
        encode(Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16))),  # 16-bit
        encode(Image.new("RGB", (1600, 1200), (90, 30, 200)), "JPEG"),  # decoded at 1/2 scale
    ]
    images = good[:6] + bad + converted + good[6:]
    folder.mkdir(parents=True)
    for shard in range(2):
        part = images[shard::2]
        table = pa.table({
            "image": [{"bytes": b, "path": None} for b in part],
            "__key__": [f"{shard}-{i}" for i in range(len(part))],
        })
        pq.write_table(table, folder / f"train-{shard}.parquet")


def test_bad_images_are_skipped_or_converted_and_counted(tmp_path):
    data = tmp_path / "data"
    write_parquet_with_bad_images(data)
    result = run_mim(*TINY, "--train_dir", data, "--max_train_steps", 6, "--output_dir", tmp_path / "out",
                     "--shuffle_buffer_size", 4, "--max_image_pixels", 1_000_000)
    counts = [json.loads(line.split("step ", 1)[1].split(" ", 1)[1]) for line in result.stderr.splitlines()
              if "run_mim: step " in line]
    assert counts[-1]["images_skipped"] >= 4 and counts[-1]["images_converted"] >= 4
    assert "too_large (over max_image_pixels=1000000" in result.stderr


def test_epochs_are_counted_from_the_shard_index_without_reading_the_stream(tmp_path):
    """--num_train_epochs without --num_train_examples: the length comes from the sizes.json beside the
    WebDataset shards (it says 10; the shards hold 6, which reading them would have found)."""
    import io
    import tarfile

    data = tmp_path / "shards"
    data.mkdir()
    for shard in range(2):
        with tarfile.open(data / f"train-{shard}.tar", "w") as tar:
            for i in range(3):
                buffer = io.BytesIO()
                Image.new("RGB", (40, 40), (60 * i, 90, 30 * shard)).save(buffer, format="PNG")
                info = tarfile.TarInfo(f"{i:03d}.png")
                info.size = len(buffer.getvalue())
                tar.addfile(info, io.BytesIO(buffer.getvalue()))
    (data / "sizes.json").write_text(json.dumps({"train-0.tar": 5, "train-1.tar": 5}))
    result = run_mim(*TINY, "--train_dir", data, "--num_train_epochs", 2, "--output_dir", tmp_path / "out",
                     "--shuffle_buffer_size", 2)
    assert "10 examples x 2.0 epochs / batch 4 = 5 optimizer steps" in result.stderr


def test_push_without_network_fails_clearly_and_keeps_the_folder(tmp_path):
    out = tmp_path / "push"
    result = run_mim(*TINY, "--max_train_steps", 1, "--output_dir", out, "--push_to_hub",
                     "--hub_model_id", "someone/dbot-tiny", check=False)
    assert result.returncode == 1
    assert "someone/dbot-tiny" in result.stderr
    assert (out / "model.safetensors").is_file()


def test_upload_excludes_checkpoints_and_optimizer_states(tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    from hf_mim.hub import HUB_IGNORE_PATTERNS, push_folder_to_hub

    folder = tmp_path / "folder"
    for name in ("model.safetensors", "config.json", "README.md", "modeling_dbot.py", "mim_picture.png",
                 "pictures/step-0000100.png", "training_args.json",
                 "checkpoint-10/model.safetensors", "checkpoint-10/optimizer.bin", "checkpoint-10/trainer_state.json",
                 ".tmp-checkpoint-20/model.safetensors", "runs/run_mim/events.out.tfevents.1", "token"):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")

    class FakeApi:
        def __init__(self):
            self.calls = []

        def create_repo(self, **kwargs):
            self.calls.append(("create_repo", kwargs))

        def upload_folder(self, **kwargs):
            files = sorted(
                str(p.relative_to(kwargs["folder_path"])) for p in Path(kwargs["folder_path"]).rglob("*") if p.is_file()
            )
            uploaded = sorted(filter_repo_objects(files, ignore_patterns=kwargs["ignore_patterns"]))
            self.calls.append(("upload_folder", uploaded))
            return "https://hub/commit/1"

    api = FakeApi()
    push_folder_to_hub(folder, "me/model", private=True, api=api)
    assert api.calls[0] == ("create_repo", {"repo_id": "me/model", "private": True, "exist_ok": True, "repo_type": "model"})
    uploaded = api.calls[1][1]
    assert uploaded == sorted(["model.safetensors", "config.json", "README.md", "modeling_dbot.py", "mim_picture.png",
                               "pictures/step-0000100.png", "training_args.json", "runs/run_mim/events.out.tfevents.1"])
    assert HUB_IGNORE_PATTERNS


@pytest.mark.slow
def test_two_cpu_ranks_train_with_gloo_on_different_shards(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
         str(SCRIPT), *TINY, "--max_train_steps", "4", "--checkpointing_steps", "2", "--output_dir", str(out),
         "--resume_from_checkpoint", "latest"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert "2 processes" in result.stderr
    assert "no checkpoint in" in result.stderr  # 'latest' on a first launch: both ranks start from scratch
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert len(state["positions"]) == 2
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "model_type, extra",
    [("extrema", []), ("revcolv2", []), ("maskdistill", ["--config_overrides", "target=pixels"]),
     ("amt", ["--config_overrides", "variant=simmim,amt_interval=0.5,amt_refresh_delay_epochs=0"])],  # refresh after step 1
)
def test_every_method_pretrains_through_the_one_generic_loop(model_type, extra, tmp_path):
    """Methods differ only by config and event methods: the same script, the same flags."""
    from hf_mim import MODEL_FAMILIES

    assert model_type in MODEL_FAMILIES
    out = tmp_path / model_type
    run_mim(*TINY, "--model_type", model_type, *extra, "--max_train_steps", 2, "--output_dir", out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type
    assert (out / "mim_picture.png").is_file() and (out / "README.md").is_file()
    if model_type == "extrema":  # the momentum encoder, ready for the paper's linear probe
        momentum = json.loads((out / "momentum_encoder" / "config.json").read_text())
        assert momentum["pooling"] == "class_attention" and (out / "momentum_encoder" / "model.safetensors").is_file()


@pytest.mark.slow
def test_torch_compile_gives_the_eager_losses_and_plain_checkpoint_keys(tmp_path):
    """run_mim --torch_compile (backend aot_eager: dynamo + AOTAutograd on a CPU, minutes with inductor
    on 2 cores): the same logged losses as eager within float tolerance, and no `_orig_mod.` keys in the
    checkpoint or the saved model."""
    common = [*TINY, "--max_train_steps", 2, "--checkpointing_steps", 2]
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--torch_compile", "--torch_compile_backend", "aot_eager"])):
        log = run_mim(*common, *extra, "--output_dir", tmp_path / name).stderr
        losses[name] = [json.loads(found)["loss"] for found in re.findall(r"INFO run_mim: step \d+ (\{.*?\})", log)]
    assert len(losses["eager"]) == 2
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5, abs=1e-6)
    for path in (tmp_path / "compiled" / "checkpoint-2" / "model.safetensors", tmp_path / "compiled" / "model.safetensors"):
        keys = load_file(path).keys()
        assert keys == load_file(tmp_path / "eager" / path.relative_to(tmp_path / "compiled")).keys()
        assert not any("_orig_mod" in key for key in keys)

