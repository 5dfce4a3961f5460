"""Resuming inside an epoch skips the consumed raw records before decoding them (hf_mim/data/streaming.py's
ResumePlan, hf_mim/training/loop.py's StreamPositions) and still delivers, bitwise, the batches of the
uninterrupted pass: the shuffle buffer, the example order, the bad-image counters, crops and masks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import encode, photo

import hf_mim.data.streaming as streaming
import hf_mim.training.loop as loop
from hf_mim.data import MaskedImageTransform, PretrainingCollator, example_id, load_image_stream, make_dataloader, prepare_stream
from hf_mim.masking import RandomMaskGenerator
from hf_mim.training.loop import StreamPositions, stream_batches

SHARDS, PER_SHARD, BATCH = 4, 7, 2
BAD = {(1, 3), (2, 0)}  # (shard, index) of undecodable records: counted in images_skipped, never batched


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict[int, str]]:
    """A 4-shard parquet folder, and example id -> digest of the record's bytes (good records)."""
    root = tmp_path_factory.mktemp("stream")
    features = datasets.Features({"image": datasets.Image(), "__key__": datasets.Value("string")})
    digests = {}
    for shard in range(SHARDS):
        images, keys = [], []
        for index in range(PER_SHARD):
            data = (b"not an image %d %d" % (shard, index)) if (shard, index) in BAD else encode(photo(10 * shard + index), "PNG")
            key = f"s{shard}-{index}"
            images.append({"bytes": data, "path": None})
            keys.append(key)
            if (shard, index) not in BAD:
                digests[example_id({"__key__": key}, "image")] = digest(data)
        datasets.Dataset.from_dict({"image": images, "__key__": keys}, features=features).to_parquet(
            str(root / f"train-{shard:05d}-of-{SHARDS:05d}.parquet"))
    return root, digests


def pipeline(root: Path, workers: int, persistent: bool = False):
    ds, column, _ = load_image_stream(train_dir=root)
    stream = prepare_stream(ds, column, seed=5, buffer_size=3)
    collator = PretrainingCollator(MaskedImageTransform(16), RandomMaskGenerator(4, 0.5), seed=5)
    return make_dataloader(stream, collator, batch_size=BATCH, num_workers=workers, persistent_workers=persistent), stream, collator


@pytest.fixture
def decoded(monkeypatch, tmp_path):
    """A counting stub of the decoder: the digest of every record decoded, in any process (the file is
    appended to by forked DataLoader workers)."""
    log = tmp_path / "decoded.txt"
    log.write_text("")
    real = streaming.decode_image_with_status

    def counting(value, *args, **kwargs):
        with open(log, "a") as handle:
            handle.write(digest(value if isinstance(value, bytes) else b"?") + "\n")
        return real(value, *args, **kwargs)

    monkeypatch.setattr(streaming, "decode_image_with_status", counting)
    return lambda: log.read_text().split()


def take(generator, count: int) -> list[tuple[int, int, dict]]:
    return [next(generator) for _ in range(count)]


@pytest.mark.parametrize("workers, persistent, consumed", [(0, False, 5), (2, False, 4), (2, True, 5)])
def test_resume_skips_consumed_records_undecoded_and_is_exact(data, decoded, workers, persistent, consumed):
    """Stop after `consumed` batches of epoch 0, resume from the recorded point: the next batches (to the
    middle of epoch 1, past the point where the skip is cleared) equal the uninterrupted run's, and no record
    of the first `rounds x workers` consumed batches is decoded again (with 2 workers and an odd stop, the
    one batch after the last full round is decoded and dropped)."""
    root, digests = data
    torch.set_num_threads(1)
    positions = StreamPositions(max(1, workers))
    full = stream_batches(*pipeline(root, workers, persistent), start_epoch=0, skip_batches=0, positions=positions)
    before = take(full, consumed)
    point = positions.resume_point()
    after = take(full, 14)  # 11 good images per worker pair -> 5 or 6 batches per epoch: crosses into epoch 1
    assert after[-1][0] == 1
    full.close()

    start = len(decoded())
    resumed = stream_batches(*pipeline(root, workers, persistent), start_epoch=0, skip_batches=consumed, resume=point)
    in_epoch = sum(1 for epoch, _, _ in after if epoch == 0)
    again = take(resumed, in_epoch)
    redone = set(decoded()[start:])  # the decodes of the rest of epoch 0 (epoch 1 decodes every record again)
    again += take(resumed, len(after) - in_epoch)
    resumed.close()
    for (epoch, index, batch), (epoch2, index2, batch2) in zip(after, again):
        assert (epoch, index) == (epoch2, index2)
        assert batch.keys() == batch2.keys() and "stream_position" not in batch
        for key in batch:
            assert torch.equal(batch[key], batch2[key]), (index, key)

    skipped_batches = point["rounds"] * max(1, workers)
    assert skipped_batches == consumed - (consumed % max(1, workers))
    skipped_ids = [i for _, _, batch in before[:skipped_batches] for i in batch["example_id"].tolist()]
    assert skipped_ids and not redone & {digests[i] for i in skipped_ids}  # zero decodes of skipped records
    replayed = [i for _, _, batch in before[skipped_batches:] for i in batch["example_id"].tolist()]
    assert {digests[i] for i in replayed} <= redone


def test_the_replay_path_decodes_what_was_consumed(data, decoded, monkeypatch):
    """The old path (kept behind loop._REPLAY_RESUME for the benchmark) decodes every consumed record again:
    what the test above rules out."""
    root, digests = data
    monkeypatch.setattr(loop, "_REPLAY_RESUME", True)
    positions = StreamPositions(1)
    full = stream_batches(*pipeline(root, 0), start_epoch=0, skip_batches=0, positions=positions)
    before = take(full, 4)
    full.close()
    start = len(decoded())
    resumed = stream_batches(*pipeline(root, 0), start_epoch=0, skip_batches=4, resume=positions.resume_point())
    next(resumed)
    resumed.close()
    consumed = {digests[i] for _, _, batch in before for i in batch["example_id"].tolist()}
    assert consumed <= set(decoded()[start:])


def test_positions_and_resume_point():
    """rounds = full rounds of batches over the workers; records = each worker's raw records at that round."""
    def batch(worker: int, last: int) -> dict:
        return {"stream_position": torch.tensor([[worker, last - 1], [worker, last]])}

    positions = StreamPositions(2)
    assert positions.resume_point() == {"rounds": 0, "records": [0, 0]}
    for worker, last in ((0, 1), (1, 2), (0, 4)):  # worker 0 read a bad record before its second batch
        positions.note(batch(worker, last))
    assert positions.resume_point() == {"rounds": 1, "records": [2, 3]}
    positions.start_epoch(3, rounds=1, records=[2, 3])  # resumed there
    assert positions.resume_point() == {"rounds": 1, "records": [2, 3]}
    positions.note(batch(0, 4))
    positions.note(batch(1, 6))
    assert positions.resume_point() == {"rounds": 2, "records": [5, 7]}
    positions.note({"pixel_values": torch.zeros(1)})  # a stream without positions: resumes replay
    assert positions.resume_point() is None


@pytest.mark.slow
def test_two_ranks_with_two_workers_resume_run_mim_exactly(data, tmp_path):
    """run_mim.py on two gloo ranks x 2 DataLoader workers, stopped at the step-3 checkpoint (mid-epoch, an odd
    batch count per rank: one batch replayed after the skipped rounds) and resumed, ends with the weights of the
    uninterrupted run; the checkpoint records every rank's raw-record point."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    root, _ = data
    script = Path(__file__).resolve().parents[1] / "training_scripts" / "run_mim.py"
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")

    def run(out: Path, *extra: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29571", str(script),
             "--model_type", "dbot", "--model_size", "tiny", "--train_dir", str(root), "--per_device_train_batch_size", "2",
             "--dataloader_num_workers", "2", "--shuffle_buffer_size", "3", "--max_train_steps", "5", "--checkpointing_steps", "3",
             "--seed", "3", "--downstream_eval", "none", "--output_dir", str(out), *extra],
            capture_output=True, text=True, env=env, timeout=900)
        assert result.returncode == 0, result.stderr[-5000:]
        return result.stderr

    run(tmp_path / "full")
    state = json.loads((tmp_path / "full" / "checkpoint-3" / "trainer_state.json").read_text())
    assert [(p["batches"], p["rounds"], len(p["records"])) for p in state["positions"]] == [(3, 1, 2), (3, 1, 2)]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    os.symlink(tmp_path / "full" / "checkpoint-3", resumed / "checkpoint-3")
    log = run(resumed, "--resume_from_checkpoint", "latest")
    assert "undecoded, then 1 batches by replay" in log
    reference, restarted = load_file(tmp_path / "full" / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key in reference:
        assert torch.equal(reference[key], restarted[key]), key
