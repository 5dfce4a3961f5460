"""Resuming at half an epoch: time to the first resumed batch, replaying the epoch vs skipping raw records.

What is measured
----------------
The pretraining stream of run_mim.py (bench_input_pipeline's `hf_mim_loader`: parquet shards of generated
500 x 375 JPEGs -> prepare_stream (shuffle buffer 1000, decode at the transform's reduced scale, ids) ->
PretrainingCollator(MaskedImageTransform(224), RandomMaskGenerator(14, 0.75)) -> make_dataloader) is read
for half an epoch through the training loop's `stream_batches`, which records where each DataLoader worker
stands (`StreamPositions`). A fresh stream then resumes there, as a restarted run does, twice:

    replay     the path before this change (hf_mim.training.loop._REPLAY_RESUME = True): the epoch is read
               again from its start, every consumed image decoded, cropped and masked, and the consumed
               batches dropped
    skip       the workers drop the consumed raw records before decoding them (`ResumePlan`), after the
               shuffle buffer; only the < num_workers batches after the last full round of workers are
               decoded again

Reported per number of workers: seconds from creating the DataLoader iterator to holding the first resumed
batch (best of `--repeats`), their ratio, and whether both paths delivered the same first batches as the
uninterrupted pass (bitwise). The model step itself is the same on both paths and left out.

Usage:  python benchmarks/resume_benchmark.py [--images 1024] [--batch-size 32] [--workers 0 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_input_pipeline import hf_mim_loader, make_photos, write_parquet  # noqa: E402

import hf_mim.training.loop as loop  # noqa: E402
from hf_mim.training.loop import StreamPositions, stream_batches  # noqa: E402


def batches(source: Path, batch_size: int, workers: int, **kwargs):
    loader = hf_mim_loader(source, batch_size, workers)
    return stream_batches(loader, loader.dataset, loader.collate_fn, start_epoch=0, **kwargs)


def first_resumed(source: Path, batch_size: int, workers: int, consumed: int, point: dict, replay: bool, count: int):
    """(seconds to the first resumed batch, the first `count` resumed batches)."""
    loop._REPLAY_RESUME = replay
    try:
        start = time.perf_counter()
        resumed = batches(source, batch_size, workers, skip_batches=consumed, resume=point)
        first = [next(resumed)]
        seconds = time.perf_counter() - start
        first += [next(resumed) for _ in range(count - 1)]
        resumed.close()
        return seconds, first
    finally:
        loop._REPLAY_RESUME = False


def same(ours: list, theirs: list) -> bool:
    return all(a[:2] == b[:2] and a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])
               for a, b in zip(ours, theirs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = write_parquet(root, make_photos(root, args.images), shards=8)
        epoch_batches = args.images // args.batch_size
        consumed = epoch_batches // 2
        print(f"{args.images} JPEGs of 500 x 375 in 8 parquet shards, batches of {args.batch_size}: resume after "
              f"{consumed} of {epoch_batches} batches ({consumed * args.batch_size} images consumed)")
        print(f"{'workers':>7}  {'replay s':>9}  {'skip s':>9}  {'ratio':>6}  exact")
        for workers in args.workers:
            positions = StreamPositions(max(1, workers))
            full = batches(source, args.batch_size, workers, skip_batches=0, positions=positions)
            for _ in range(consumed):
                next(full)
            point = positions.resume_point()
            reference = [next(full) for _ in range(2)]
            full.close()
            replay_s, skip_s, exact = [], [], True
            for _ in range(args.repeats):
                for replay, times in ((True, replay_s), (False, skip_s)):
                    seconds, first = first_resumed(source, args.batch_size, workers, consumed, point, replay, len(reference))
                    times.append(seconds)
                    exact &= same(first, reference)
            print(f"{workers:>7}  {min(replay_s):>9.2f}  {min(skip_s):>9.2f}  {min(replay_s) / min(skip_s):>5.1f}x  {exact}")


if __name__ == "__main__":
    main()
