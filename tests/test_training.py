"""hf_mim.training: parameter groups, lr schedules, atomic/exact checkpoints, loss guard, accuracy."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import pytest
import torch

import hf_mim
from hf_mim.training import (
    AccuracyMeter,
    NonFiniteLossError,
    StagedSchedule,
    WarmupCosineSchedule,
    build_adamw,
    check_finite_loss,
    find_latest_checkpoint,
    layer_decay_param_groups,
    linear_scaled_lr,
    load_checkpoint,
    resolve_resume_path,
    save_checkpoint,
    topk_correct,
    warmup_cosine_factor,
    weight_decay_param_groups,
    write_json_atomic,
)
from hf_mim.training import checkpoint as checkpoint_module


def tiny_classifier(num_labels: int = 5) -> hf_mim.DbotForImageClassification:
    return hf_mim.DbotForImageClassification(hf_mim.DbotConfig.from_preset("tiny", num_labels=num_labels))


def tiny_mim() -> hf_mim.DbotForMaskedImageModeling:
    return hf_mim.DbotForMaskedImageModeling(hf_mim.DbotConfig.from_preset("tiny"))


def names_by_decay(groups: list[dict]) -> tuple[set[str], set[str]]:
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["param_names"]}
    return decay, no_decay


# --------------------------------------------------------------------------- optim
def test_weight_decay_groups_classifier():
    model = tiny_classifier()
    groups = weight_decay_param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(g["lr_scale"] == 1.0 for g in groups)
    decay, no_decay = names_by_decay(groups)
    params = dict(model.named_parameters())
    assert decay | no_decay == set(params) and not decay & no_decay
    for group in groups:  # params and names line up
        assert all(p is params[n] for p, n in zip(group["params"], group["param_names"]))
    for name in (
        "dbot.encoder.embeddings.cls_token",
        "dbot.encoder.embeddings.position_embeddings",
        "dbot.encoder.embeddings.patch_embeddings.projection.bias",
        "dbot.encoder.layers.0.norm1.weight",
        "dbot.encoder.layers.1.attn.qkv.bias",
        "dbot.pooler.fc_norm.weight",
        "classifier.bias",
    ):
        assert name in no_decay, name
    assert decay == {n for n, p in params.items() if p.ndim >= 2 and "token" not in n and "position" not in n}
    assert "dbot.encoder.embeddings.patch_embeddings.projection.weight" in decay
    assert "classifier.weight" in decay


def test_weight_decay_groups_mim_excludes_frozen():
    model = tiny_mim()
    groups = weight_decay_param_groups(model, 0.05)
    decay, no_decay = names_by_decay(groups)
    grouped = decay | no_decay
    assert not any(n.startswith("teacher.") for n in grouped)
    assert "dbot.encoder.embeddings.position_embeddings" not in grouped  # fixed sin-cos table
    assert grouped == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"decoder.mask_token", "dbot.encoder.embeddings.cls_token", "dbot.encoder.layernorm.weight",
            "decoder.decoder_norm.bias", "decoder.layers.0.mlp.fc1.bias"} <= no_decay
    assert {"decoder.decoder_embed.weight", "decoder.layers.1.attn.qkv.weight", "decoder.decoder_pred.weight",
            "dbot.encoder.layers.0.mlp.fc2.weight"} <= decay
    assert all(p.ndim >= 2 for g in groups if g["weight_decay"] > 0 for p in g["params"])
    optimizer = build_adamw(groups, lr=1e-3)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95) and optimizer.param_groups[0]["eps"] == 1e-8
    assert not optimizer.param_groups[0]["fused"]  # CPU parameters: torch's default


def test_layer_decay_ids_and_scales_classifier():
    model = tiny_classifier()
    d = 0.65
    groups = layer_decay_param_groups(model, 0.05, layer_decay=d, num_layers=2)
    got = {n: (g["layer_id"], g["lr_scale"], g["weight_decay"]) for g in groups for n in g["param_names"]}
    assert set(got) == {n for n, _ in model.named_parameters()}

    def expected(name: str, param: torch.Tensor) -> tuple[int, float, float]:
        if name.startswith("dbot.encoder.embeddings."):
            layer = 0
        elif name.startswith("dbot.encoder.layers.0."):
            layer = 1
        elif name.startswith("dbot.encoder.layers.1."):
            layer = 2
        else:
            assert name.startswith(("dbot.pooler.", "classifier.")), name
            layer = 3
        scale = {0: d**3, 1: d**2, 2: d, 3: 1.0}[layer]
        decayed = param.ndim >= 2 and not name.endswith(("cls_token", "position_embeddings"))
        return layer, scale, 0.05 if decayed else 0.0

    for name, param in model.named_parameters():
        layer, scale, wd = expected(name, param)
        assert got[name][0] == layer, name
        assert got[name][1] == pytest.approx(scale), name
        assert got[name][2] == wd, name
    assert got["dbot.encoder.embeddings.patch_embeddings.projection.weight"] == (0, pytest.approx(0.274625), 0.05)
    assert got["classifier.weight"] == (3, 1.0, 0.05)
    # one group per (layer, decay/no decay), sorted
    keys = [(g["layer_id"], g["weight_decay"] == 0) for g in groups]
    assert keys == sorted(set(keys))


def test_layer_decay_decoder_and_custom_fn():
    model = tiny_mim()
    groups = layer_decay_param_groups(model, 0.05, layer_decay=0.5, num_layers=2)
    layer = {n: g["layer_id"] for g in groups for n in g["param_names"]}
    assert layer["decoder.layers.0.norm1.weight"] == 3  # a decoder block is not encoder block 0
    assert layer["decoder.mask_token"] == 3
    assert layer["dbot.encoder.layers.1.mlp.fc1.weight"] == 2
    assert layer["dbot.encoder.layernorm.weight"] == 3
    custom = layer_decay_param_groups(model, 0.05, 0.5, num_layers=2, layer_id_fn=lambda name: 1)
    assert {g["lr_scale"] for g in custom} == {0.25}
    with pytest.raises(ValueError, match="layer id 7"):
        layer_decay_param_groups(model, 0.05, 0.5, num_layers=2, layer_id_fn=lambda name: 7)
    with pytest.raises(ValueError, match="num_layers"):  # 2 encoder blocks but num_layers=1
        layer_decay_param_groups(model, 0.05, 0.5, num_layers=1)


# --------------------------------------------------------------------------- schedule
def test_warmup_cosine_factor_values():
    # warmup 4, total 12: cosine over steps 4..12
    assert warmup_cosine_factor(0, 4, 12) == 0.0
    assert warmup_cosine_factor(2, 4, 12) == 0.5
    assert warmup_cosine_factor(4, 4, 12) == 1.0
    assert warmup_cosine_factor(8, 4, 12) == pytest.approx(0.5)
    assert warmup_cosine_factor(6, 4, 12) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine_factor(12, 4, 12) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine_factor(50, 4, 12) == pytest.approx(0.0, abs=1e-12)
    # with a floor: mid-cosine = min + (1 - min) / 2
    assert warmup_cosine_factor(8, 4, 12, min_lr_ratio=0.1) == pytest.approx(0.55)
    assert warmup_cosine_factor(12, 4, 12, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(0, 0, 10) == 1.0  # no warm-up
    assert linear_scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


def _optimizer(lr: float = 1.0) -> torch.optim.AdamW:
    return build_adamw(weight_decay_param_groups(tiny_classifier(), 0.05), lr=lr)


def test_scheduler_sets_scaled_lrs():
    model = tiny_classifier()
    groups = layer_decay_param_groups(model, 0.05, 0.5, num_layers=2)
    optimizer = build_adamw(groups, lr=2.0)
    schedule = WarmupCosineSchedule(optimizer, warmup_steps=4, total_steps=12)
    assert [g["lr"] for g in optimizer.param_groups] == [0.0] * len(groups)  # step 0 of warm-up
    for _ in range(2):
        optimizer.step()
        schedule.step()
    for group in optimizer.param_groups:  # step 2: factor 0.5
        assert group["lr"] == pytest.approx(2.0 * group["lr_scale"] * 0.5)
    assert schedule.get_last_lr() == [g["lr"] for g in optimizer.param_groups]


def test_staged_schedule_restarts_and_round_trips():
    optimizer = _optimizer(lr=1.0)
    schedule = StagedSchedule(optimizer, steps_per_stage=[6, 10], warmup_steps=2, min_lr_ratio=0.1)
    assert schedule.total_steps == 16 and schedule.num_stages == 2
    lrs = []
    for step in range(18):
        lrs.append(optimizer.param_groups[0]["lr"])
        assert schedule.last_epoch == step
        expected = (
            warmup_cosine_factor(step, 2, 6, 0.1) if step < 6 else warmup_cosine_factor(min(step - 6, 10), 2, 10, 0.1)
        )
        assert lrs[-1] == pytest.approx(expected), step
        assert schedule.stage_of(step) == (0 if step < 6 else 1)
        assert schedule.is_stage_boundary(step) == (step == 6)
        optimizer.step()
        schedule.step()
    assert lrs[6] == 0.0 and lrs[7] == 0.5 and lrs[8] == 1.0  # warm-up again at the stage start

    same = StagedSchedule(_optimizer(), 5, num_stages=3, warmup_steps=1)
    assert same.steps_per_stage == [5, 5, 5]
    assert [s for s in range(20) if same.is_stage_boundary(s)] == [5, 10]

    # state_dict round trip (mid-run, into a fresh optimizer + scheduler)
    optimizer = _optimizer(lr=3.0)
    schedule = StagedSchedule(optimizer, [6, 10], warmup_steps=2, min_lr_ratio=0.1)
    for _ in range(7):
        optimizer.step()
        schedule.step()
    state = schedule.state_dict()
    assert "optimizer" not in state
    torch.save(state, buffer := __import__("io").BytesIO())
    buffer.seek(0)
    fresh_optimizer = _optimizer(lr=3.0)
    fresh_optimizer.load_state_dict(optimizer.state_dict())
    fresh = StagedSchedule(fresh_optimizer, [6, 10], warmup_steps=2, min_lr_ratio=0.1)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.last_epoch == 7 and fresh.get_last_lr() == schedule.get_last_lr()
    for _ in range(5):
        optimizer.step()
        schedule.step()
        fresh_optimizer.step()
        fresh.step()
        assert fresh.get_last_lr() == schedule.get_last_lr()
    assert fresh.state_dict() == schedule.state_dict()


# --------------------------------------------------------------------------- checkpoints
def _training_objects(seed: int):
    from accelerate import Accelerator

    torch.manual_seed(seed)
    model = tiny_mim()
    optimizer = build_adamw(weight_decay_param_groups(model, 0.05), lr=1e-3)
    schedule = StagedSchedule(optimizer, [3, 4], warmup_steps=2)
    meter = AccuracyMeter()
    accelerator = Accelerator(cpu=True)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    accelerator.register_for_checkpointing(meter)
    return accelerator, model, optimizer, schedule, meter


def _train(accelerator, model, optimizer, schedule, meter, steps: int) -> None:
    model.train()
    for _ in range(steps):
        pixels = torch.randn(2, 3, 32, 32)  # draws from the global RNG, as does the masking noise
        loss = model(pixel_values=pixels).loss
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        meter.update_counts({1: 1, 5: 2}, 2)


def test_exact_resume(tmp_path, fresh_accelerate_state):
    accelerator, model, optimizer, schedule, meter = _training_objects(seed=0)
    _train(accelerator, model, optimizer, schedule, meter, 3)
    path = save_checkpoint(accelerator, tmp_path, 3, {"epoch": 1, "batches_in_epoch": 4, "stage": 0, "note": "x"})
    assert path == tmp_path / "checkpoint-3"
    _train(accelerator, model, optimizer, schedule, meter, 2)
    reference = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    reference_optimizer = optimizer.state_dict()
    reference_lr, reference_meter = schedule.get_last_lr(), meter.state_dict()

    state = json.loads((path / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batches_in_epoch"], state["stage"], state["note"]) == (3, 1, 4, 0, "x")
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"} <= set(state["files"])

    accelerator, model, optimizer, schedule, meter = _training_objects(seed=123)  # different init
    assert resolve_resume_path("latest", tmp_path) == path
    loaded = load_checkpoint(accelerator, resolve_resume_path("latest", tmp_path))
    assert loaded["step"] == 3 and loaded["note"] == "x"
    assert schedule.scheduler.last_epoch == 3 and meter.total == 6
    _train(accelerator, model, optimizer, schedule, meter, 2)
    resumed = accelerator.unwrap_model(model).state_dict()
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key
    resumed_optimizer = optimizer.state_dict()
    for index, moments in reference_optimizer["state"].items():
        for name, value in moments.items():
            assert torch.equal(resumed_optimizer["state"][index][name], value), (index, name)
    assert schedule.get_last_lr() == reference_lr
    assert meter.state_dict() == reference_meter


class _Stub:
    """Just enough of an Accelerator for save_checkpoint's file handling (one process)."""

    num_processes, process_index, is_main_process, is_local_main_process = 1, 0, True, True
    device = torch.device("cpu")

    def __init__(self):
        self.project_configuration = type("P", (), {"automatic_checkpoint_naming": False, "save_on_each_node": False})()
        self.saved = []

    def save_state(self, output_dir, **kwargs):
        os.makedirs(output_dir, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"w" * (len(self.saved) + 10))
        (Path(output_dir) / "random_states_0.pkl").write_bytes(b"r")
        self.saved.append(output_dir)

    def wait_for_everyone(self):
        pass


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    accelerator = _Stub()
    first = save_checkpoint(accelerator, tmp_path, 1, {})
    assert find_latest_checkpoint(tmp_path) == first

    # killed after save_state, before trainer_state.json is written
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint_module, "write_json_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, 2, {})
    monkeypatch.undo()
    half = tmp_path / ".tmp-checkpoint-2"
    assert (half / "model.safetensors").exists() and not (half / "trainer_state.json").exists()
    assert find_latest_checkpoint(tmp_path) == first
    with pytest.raises(FileNotFoundError, match=r"\.tmp-checkpoint-2.*trainer_state\.json"):
        resolve_resume_path(half, tmp_path)

    # killed after trainer_state.json, before the folder rename
    real_rename = os.rename

    def crash_on_publish(src, dst):
        if Path(src).name.startswith(".tmp-checkpoint"):
            raise KeyboardInterrupt("killed")
        return real_rename(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "rename", crash_on_publish)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, 3, {})
    monkeypatch.undo()
    assert (tmp_path / ".tmp-checkpoint-3" / "trainer_state.json").exists()
    assert find_latest_checkpoint(tmp_path) == first

    # a checkpoint-N without trainer_state.json, or with a truncated file, is not a checkpoint
    (tmp_path / "checkpoint-9").mkdir()
    truncated = save_checkpoint(accelerator, tmp_path, 8, {})
    (truncated / "model.safetensors").write_bytes(b"")
    assert find_latest_checkpoint(tmp_path) == first
    with pytest.raises(FileNotFoundError, match="checkpoint-9"):
        resolve_resume_path(tmp_path / "checkpoint-9", tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        resolve_resume_path(truncated, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resume_path(tmp_path / "checkpoint-77", tmp_path)

    # the next save clears the leftovers; saving an existing step replaces it
    second = save_checkpoint(accelerator, tmp_path, 2, {"try": 1})
    second = save_checkpoint(accelerator, tmp_path, 2, {"try": 2})
    assert json.loads((second / "trainer_state.json").read_text())["try"] == 2
    assert find_latest_checkpoint(tmp_path) == second
    assert resolve_resume_path(tmp_path, tmp_path) == second  # a folder of checkpoints: its newest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp", ".trash"))]


def test_total_limit_and_resume_errors(tmp_path):
    accelerator = _Stub()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        resolve_resume_path("latest", tmp_path)
    assert resolve_resume_path("latest", tmp_path, missing_ok=True) is None
    assert resolve_resume_path(None, tmp_path) is None
    for step in (1, 2, 3, 4):
        save_checkpoint(accelerator, tmp_path, step, {}, total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    save_checkpoint(accelerator, tmp_path, 10, {}, total_limit=None)
    assert len(list(tmp_path.iterdir())) == 3
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(accelerator, tmp_path, 11, {"bad": object()})
    assert not (tmp_path / "checkpoint-11").exists() and not (tmp_path / ".tmp-checkpoint-11").exists()


def test_write_json_atomic(tmp_path):
    target = write_json_atomic(tmp_path / "sub" / "a.json", {"x": torch.tensor(2.5), "p": tmp_path, "d": torch.float16})
    assert json.loads(target.read_text()) == {"x": 2.5, "p": str(tmp_path), "d": "float16"}
    write_json_atomic(target, [1])
    assert json.loads(target.read_text()) == [1]
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]  # no temp files left


# --------------------------------------------------------------------------- trust: checksums, failed saves
def _real_checkpoints(tmp_path, steps) -> list[Path]:
    """Checkpoints of a tiny model written by Accelerate itself (safetensors, torch.save, pickle files)."""
    accelerator, model, optimizer, schedule, meter = _training_objects(seed=0)
    paths = []
    for step in steps:
        _train(accelerator, model, optimizer, schedule, meter, 1)
        paths.append(save_checkpoint(accelerator, tmp_path, step, {}))
    return paths


def test_truncated_and_corrupted_checkpoints_are_skipped_by_latest_and_refused_by_name(tmp_path, caplog, fresh_accelerate_state):
    first, second, third = _real_checkpoints(tmp_path, (1, 2, 3))
    state = json.loads((third / "trainer_state.json").read_text())
    assert set(state["sha256"]) == set(state["files"]) and all(len(d) == 64 for d in state["sha256"].values())
    optimizer_file = third / "optimizer.bin"
    os.truncate(optimizer_file, optimizer_file.stat().st_size // 2)  # a copy cut short
    weights = second / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in a weight: same size, and safetensors would load it silently
    weights.write_bytes(bytes(data))

    with caplog.at_level("WARNING", logger="hf_mim.training.checkpoint"):
        assert resolve_resume_path("latest", tmp_path) == first
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 2
    assert "checkpoint-3" in skipped[0] and "optimizer.bin has" in skipped[0] and "truncated" in skipped[0]
    assert "checkpoint-2" in skipped[1] and "model.safetensors does not match the sha256" in skipped[1]
    assert resolve_resume_path(tmp_path, tmp_path) == first  # a folder of checkpoints: the same choice
    with pytest.raises(checkpoint_module.UnusableCheckpointError, match=r"checkpoint-2 is corrupted: model\.safetensors"):
        resolve_resume_path(second, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"checkpoint-3 is not a complete checkpoint: optimizer\.bin has"):
        resolve_resume_path(third, tmp_path)
    accelerator, *_ = _training_objects(seed=1)
    assert load_checkpoint(accelerator, first)["step"] == 1

    os.truncate(first / "random_states_0.pkl", 3)
    with pytest.raises(FileNotFoundError, match="files match their recorded sizes and checksums"):
        resolve_resume_path("latest", tmp_path)
    assert resolve_resume_path("latest", tmp_path, missing_ok=True) is None


def test_checkpoints_saved_without_checksums_still_load(tmp_path, caplog, fresh_accelerate_state):
    (path,) = _real_checkpoints(tmp_path, (1,))
    state = json.loads((path / "trainer_state.json").read_text())
    del state["sha256"]
    state["format_version"] = 1
    (path / "trainer_state.json").write_text(json.dumps(state))
    with caplog.at_level("INFO", logger="hf_mim.training.checkpoint"):
        assert resolve_resume_path(path, tmp_path) == path
        assert resolve_resume_path("latest", tmp_path) == path
    assert any("has no checksums" in r.getMessage() and "checkpoint-1" in r.getMessage() for r in caplog.records)


def _full_disk(real, target: str):
    """`real` (a save function taking (obj, path)) that, for a file named `target`, writes half of it and
    then fails as a full disk does."""
    def save(obj, path, *args, **kwargs):
        if Path(path).name != target:
            return real(obj, path, *args, **kwargs)
        with open(path, "wb") as handle:
            handle.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return save


@pytest.mark.parametrize("target", ["model.safetensors", "optimizer.bin", "trainer_state.json"])
def test_a_save_failing_on_a_full_disk_keeps_the_previous_checkpoint(target, tmp_path, monkeypatch, fresh_accelerate_state):
    import accelerate.utils.other

    accelerator, model, optimizer, schedule, meter = _training_objects(seed=0)
    first = save_checkpoint(accelerator, tmp_path, 1, {})
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    if target == "model.safetensors":
        monkeypatch.setattr(accelerate.utils.other, "safe_save_file", _full_disk(accelerate.utils.other.safe_save_file, target))
    elif target == "optimizer.bin":
        monkeypatch.setattr(torch, "save", _full_disk(torch.save, target))
    else:
        def write_json(path, obj):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        monkeypatch.setattr(checkpoint_module, "write_json_atomic", write_json)
    _train(accelerator, model, optimizer, schedule, meter, 1)
    with pytest.raises(checkpoint_module.CheckpointSaveError) as error:
        save_checkpoint(accelerator, tmp_path, 2, {}, total_limit=1)
    message = str(error.value)
    assert f"saving checkpoint {tmp_path / 'checkpoint-2'} failed" in message and "No space left on device" in message
    assert "(the disk is full)" in message and f"the newest checkpoint is still {first}" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # no half-written folder left, nothing pruned
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert resolve_resume_path("latest", tmp_path) == first


def test_a_failed_replacement_of_a_checkpoint_puts_the_old_one_back(tmp_path, monkeypatch):
    accelerator = _Stub()
    first = save_checkpoint(accelerator, tmp_path, 1, {"try": 1})
    real_rename = os.rename

    def no_permission(src, dst):
        if Path(src).name.startswith(".tmp-checkpoint"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "rename", no_permission)
    with pytest.raises(checkpoint_module.CheckpointSaveError, match=r"Permission denied.*\(no permission to write there\)"):
        save_checkpoint(accelerator, tmp_path, 1, {"try": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert json.loads((first / "trainer_state.json").read_text())["try"] == 1
    assert resolve_resume_path("latest", tmp_path) == first


FULL_DISK_SCRIPT = r'''
import sys, torch
torch.set_num_threads(1)
from accelerate import Accelerator
import hf_mim
from hf_mim.training import build_adamw, weight_decay_param_groups, save_checkpoint, resolve_resume_path
from hf_mim.training.checkpoint import CheckpointSaveError
model = hf_mim.DbotForMaskedImageModeling(hf_mim.DbotConfig.from_preset("tiny"))
accelerator = Accelerator(cpu=True)
model, optimizer = accelerator.prepare(model, build_adamw(weight_decay_param_groups(model, 0.05), lr=1e-3))
model(pixel_values=torch.randn(2, 3, 32, 32)).loss.backward()
optimizer.step()
saved = []
try:
    for step in range(1, 10):
        saved.append(save_checkpoint(accelerator, sys.argv[1], step, {}))
except CheckpointSaveError as error:
    print("FAILED:", error)
print("LATEST:", resolve_resume_path("latest", sys.argv[1]), "SAVED:", len(saved))
'''


@pytest.mark.slow
def test_a_real_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """A 1.5 MB tmpfs (mounted in a private mount namespace: `unshare`, as root or as a user) holds two
    checkpoints of the tiny model (~680 KB each); the third save runs out of space inside torch.save or
    safetensors."""
    import shutil
    import subprocess
    import sys

    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(FULL_DISK_SCRIPT)
    mount = f"mount -t tmpfs -o size=1500k tmpfs {disk}"
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "sh", "-c", mount], capture_output=True).returncode:
        pytest.skip("no private mount namespace for a small tmpfs (unshare -rm)")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(hf_mim.__file__).parents[1]))
    result = subprocess.run(["unshare", "-rm", "sh", "-c", f'{mount} && "$0" "$1" "$2"', sys.executable, str(script), str(disk / "out")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED:")]
    assert len(failed) == 1 and "checkpoint-3 failed while writing the state" in failed[0] and "the disk is full" in failed[0]
    assert f"the newest checkpoint is still {disk / 'out' / 'checkpoint-2'}" in failed[0]
    assert f"LATEST: {disk / 'out' / 'checkpoint-2'} SAVED: 2" in result.stdout


# --------------------------------------------------------------------------- guards
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_loss(tmp_path, bad):
    check_finite_loss(torch.tensor(1.25), step=3, last_checkpoint=None)
    check_finite_loss(0.5, step=3)
    with pytest.raises(NonFiniteLossError) as info:
        check_finite_loss(torch.tensor(bad), step=17, last_checkpoint=tmp_path / "checkpoint-10")
    message = str(info.value)
    assert "step 17" in message and str(bad) in message and str(tmp_path / "checkpoint-10") in message
    assert "learning rate" in message and "clipping" in message and "fp32" in message
    assert info.value.step == 17 and info.value.last_checkpoint == tmp_path / "checkpoint-10"
    with pytest.raises(NonFiniteLossError, match="No checkpoint has been saved yet"):
        check_finite_loss(torch.tensor(bad), step=2, last_checkpoint=None)


# --------------------------------------------------------------------------- metrics
def test_topk_correct_and_meter():
    logits = torch.tensor(
        [
            [0.1, 0.5, 0.2, 0.9, 0.0, 0.3],  # label 3: top-1
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # label 4: rank 5 -> top-5 only
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # label 5: rank 6 -> neither
            [0.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # labelled ignore_index: not counted
        ]
    )
    labels = torch.tensor([3, 4, 5, -100])
    assert topk_correct(logits, labels) == {1: 1, 5: 2}
    assert topk_correct(logits, labels, ks=(1, 2, 6)) == {1: 1, 2: 1, 6: 3}
    # k larger than the number of classes: every labelled row is correct
    three = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert topk_correct(three, torch.tensor([2, 2]), ks=(1, 5)) == {1: 1, 5: 2}

    meter = AccuracyMeter()
    meter.update(logits, labels)
    meter.update(three, torch.tensor([2, 2]))
    assert meter.total == 5 and meter.correct == {1: 2, 5: 4}
    assert meter.compute() == {"top1": pytest.approx(40.0), "top5": pytest.approx(80.0)}

    class OneProcess:
        device = torch.device("cpu")

        def reduce(self, tensor, reduction):
            assert reduction == "sum"
            return tensor * 2  # as if two identical processes

    merged = meter.reduce(OneProcess())
    assert merged.total == 10 and merged.correct == {1: 4, 5: 8}
    with pytest.raises(ValueError):
        AccuracyMeter().compute()


# --------------------------------------------------------------------------- two processes (slow)
TWO_PROCESS_SCRIPT = r'''
import sys, torch
from pathlib import Path
from accelerate import Accelerator
import hf_mim
from hf_mim.training import (StagedSchedule, build_adamw, weight_decay_param_groups, save_checkpoint,
    load_checkpoint, resolve_resume_path, check_finite_loss, NonFiniteLossError, find_latest_checkpoint)

out = Path(sys.argv[1])
def objects(seed):
    torch.manual_seed(seed)
    model = hf_mim.DbotForMaskedImageModeling(hf_mim.DbotConfig.from_preset("tiny"))
    optimizer = build_adamw(weight_decay_param_groups(model, 0.05), lr=1e-3)
    schedule = StagedSchedule(optimizer, [3, 4], warmup_steps=2)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(schedule)
    return accelerator, model, optimizer, schedule
def train(accelerator, model, optimizer, schedule, steps):
    for _ in range(steps):
        loss = model(pixel_values=torch.randn(2, 3, 32, 32)).loss
        check_finite_loss(loss, schedule.last_epoch, None, accelerator=accelerator)
        accelerator.backward(loss); optimizer.step(); schedule.step(); optimizer.zero_grad()
accelerator, model, optimizer, schedule = objects(0)
rank = accelerator.process_index
torch.manual_seed(100 + rank)  # the ranks see different data
train(accelerator, model, optimizer, schedule, 3)
path = save_checkpoint(accelerator, out, 3, {"epoch": 0}, total_limit=1)
train(accelerator, model, optimizer, schedule, 2)
reference = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
accelerator, model, optimizer, schedule = objects(5)
load_checkpoint(accelerator, resolve_resume_path("latest", out))
train(accelerator, model, optimizer, schedule, 2)
resumed = accelerator.unwrap_model(model).state_dict()
assert all(torch.equal(resumed[k], reference[k]) for k in reference), "resume is not exact"
try:  # a NaN on rank 1 only: both ranks stop
    check_finite_loss(torch.tensor(float("nan") if rank == 1 else 1.0), 7, path, accelerator=accelerator)
    raise AssertionError("no NonFiniteLossError")
except NonFiniteLossError as error:
    assert "step 7" in str(error) and "nan" in str(error) and str(path) in str(error)
if rank == 1:  # a save failing on rank 1 only: both ranks raise, nobody hangs, checkpoint-3 stays latest
    def fail(*args, **kwargs):
        raise OSError("disk full")
    accelerator.save_state = fail
try:
    save_checkpoint(accelerator, out, 9, {})
    raise AssertionError("no error")
except (OSError, RuntimeError) as error:
    assert "disk full" in str(error) or "another process" in str(error), error
accelerator.wait_for_everyone()
assert find_latest_checkpoint(out) == path
print(f"rank {rank} ok", flush=True)
'''


@pytest.mark.slow
def test_two_processes_exact_resume_and_guards(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "two_processes.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 0 ok" in result.stdout and "rank 1 ok" in result.stdout
