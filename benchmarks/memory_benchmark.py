"""Memory over a long streaming run, and the size of AMT's per-example attention-map store.

What is measured
----------------
1. Resident memory of `training_scripts/run_mim.py` over a long run: AMT (MAE host) at the tiny size on
   generated 32 x 32 PNGs in parquet shards, with DataLoader workers, attention refreshes on the official
   10 % schedule. The training process and its workers (its child processes) are sampled with psutil every
   `--interval` seconds: the training process's RSS, the workers' USS (memory private to them; a forked
   worker's RSS also counts the pages it shares with the training process) and their sum (the run's
   footprint; PSS would also move with other processes on the machine that share its libraries). Each
   sample gets the step of the latest log line; samples before the first logged step and after the
   last-but-one (the run's end: saving, no workers) are left out, so "100 %" is the last logging interval.
   Printed: memory at 10 %, 50 % and 100 % of the steps, and the slope over the second half (least squares,
   MB per 1,000 steps); the verdict is "flat" when every slope is below `--flat-mb-per-1k-steps`. Workers
   are started again every epoch (`make_dataloader` keeps no persistent workers), so `--images` sets how
   long one worker lives.
2. `hf_mim.training.AttentionMapStore` (int64 example ids + float16 maps) built for `--store-entries`
   synthetic examples: its state_dict bytes and its `torch.save` size, scaled to ImageNet-1k and -22k.
   Every rank holds every map (the refresh all-gathers them), so the memory is per rank; a checkpoint holds
   one copy (Accelerate saves registered objects on the main process). In a fresh process, the peak RSS of
   a refresh that replaces every map of a full store (`update`'s concatenated and re-indexed copies).

Usage:  python benchmarks/memory_benchmark.py [--steps 3000] [--workers 2] [--images 4000] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN_MIM = ROOT / "training_scripts" / "run_mim.py"
MB = 1024 * 1024
STEP_LINE = re.compile(r"run_mim: step (\d+) \{")

IMAGENET = {"ImageNet-1k": 1_281_167, "ImageNet-22k": 14_197_122}
# (label, map rows = cols): the store keeps patch-level maps for both hosts (refresh_attention_maps:
# image_size // patch_size); SimMIM-AMT sums them into its 7 x 7 grid of 32 px mask units when drawing masks
MAP_GRIDS = [("14 x 14: 224/16, MAE and SimMIM hosts", 14), ("16 x 16: 224/14 (ViT-H/14)", 16)]


def slope_per_1k_steps(steps, values) -> float:
    """Least-squares slope of `values` against `steps`, per 1,000 steps (0 with fewer than two distinct steps)."""
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    if steps.size < 2 or np.ptp(steps) == 0:
        return 0.0
    return float(np.polyfit(steps, values, 1)[0] * 1000)


def value_at(steps, values, step: float) -> float:
    """The first sample at or after `step` (the last sample if none)."""
    for s, v in zip(steps, values):
        if s >= step:
            return v
    return values[-1]


def store_bytes(entries: int, grid: int) -> int:
    """State-dict bytes of an AttentionMapStore of `entries` maps of grid x grid: an int64 id and float16 cells each."""
    return entries * (torch.empty(0, dtype=torch.int64).element_size() + grid * grid * torch.empty(0, dtype=torch.float16).element_size())


# ------------------------------------------------------------------------------------------------ part 1
def write_images(folder: Path, count: int, shards: int = 4) -> Path:
    """`count` random 32 x 32 RGB PNGs in parquet shards (an `image` column, as the Hub's image datasets)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        images = []
        for index in range(shard, count, shards):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": f"{index:07d}.png"})
        pq.write_table(pa.table({"image": images}), folder / f"train-{shard:05d}-of-{shards:05d}.parquet")
    return folder


def sample(process: psutil.Process) -> tuple[float, float, float, int]:
    """(training process RSS, workers' USS summed, the two summed, live workers) in MB. A forked worker's RSS
    counts the pages it shares with the training process, so workers are counted by what is their own (USS)."""
    main_rss = process.memory_info().rss / MB
    worker_uss, workers = 0.0, 0
    for child in process.children(recursive=True):
        try:
            worker_uss += child.memory_full_info().uss / MB
        except psutil.Error:  # a worker that ended between listing and reading
            continue
        workers += 1
    return main_rss, worker_uss, main_rss + worker_uss, workers


def run_and_sample(args, data: Path, output_dir: Path) -> list[tuple]:
    """run_mim.py in a subprocess; rows of (step, training process RSS, workers' USS, their sum, workers), from
    the first logged step (start-up is not the steady state) to the last logging interval before the end
    (the last step's line comes when training is over: then the outputs are saved, workers gone)."""
    flags = ["--model_type", "amt", "--model_size", "tiny", "--train_dir", data, "--max_train_steps", args.steps,
             "--per_device_train_batch_size", args.batch_size, "--dataloader_num_workers", args.workers,
             "--logging_steps", args.logging_steps, "--downstream_eval", "none", "--seed", 0,
             "--output_dir", output_dir, "--overwrite_output_dir"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen([sys.executable, str(RUN_MIM), *map(str, flags)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env)
    step, tail = [0], []

    def read_log():
        for line in child.stdout:  # text mode splits tqdm's \r updates too
            tail.append(line)
            del tail[:-40]
            match = STEP_LINE.search(line)
            if match:
                step[0] = int(match.group(1))

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    process, rows = psutil.Process(child.pid), []
    while child.poll() is None:
        try:
            rows.append((step[0], *sample(process)))
        except psutil.Error:  # the run ended while being read
            break
        time.sleep(args.interval)
    child.wait()
    reader.join()
    if child.returncode != 0:
        raise SystemExit(f"run_mim.py failed (exit {child.returncode}):\n{''.join(tail)}")
    last_logged = max((row[0] for row in rows), default=0)  # logged when training ends; after it: saving
    return [row for row in rows if 0 < row[0] < last_logged]


def memory_table(args, rows: list[tuple]) -> None:
    """Workers and the sum are read only from samples with exactly the training loader's workers alive: between
    epochs and during attention refreshes other (or no) workers are alive."""
    steady = [row for row in rows if row[4] == args.workers] or rows
    columns = [("training process RSS", 1, rows), ("workers' USS (sum)", 2, steady), ("sum (the run)", 3, steady)]
    print(f"{'MB':<22} {'10 %':>8} {'50 %':>8} {'100 %':>8}  {'slope, 2nd half (MB / 1k steps)':>32}")
    slopes = {}
    for name, column, chosen in columns:
        steps, values = [row[0] for row in chosen], [row[column] for row in chosen]
        at = [value_at(steps, values, fraction * args.steps) for fraction in (0.1, 0.5, 1.0)]
        half = [(s, v) for s, v in zip(steps, values) if s >= args.steps / 2]
        slopes[name] = slope_per_1k_steps([s for s, _ in half], [v for _, v in half])
        print(f"{name:<22} {at[0]:>8.1f} {at[1]:>8.1f} {at[2]:>8.1f}  {slopes[name]:>+32.2f}")
    print(f"samples {len(rows)} ({len(steady)} with the {args.workers} training workers alive)")
    growing = [name for name, slope in slopes.items() if slope >= args.flat_mb_per_1k_steps]
    verdict = "flat" if not growing else "GROWING: " + ", ".join(growing)
    print(f"verdict: {verdict} (flat = every slope below {args.flat_mb_per_1k_steps:g} MB per 1,000 steps)")


# ------------------------------------------------------------------------------------------------ part 2
def refresh_peak(entries: int, grid: int) -> None:
    """Prints (store bytes, peak RSS above the RSS before the refresh) for a refresh that replaces every map
    of a full store; run in a fresh process, so the peak (ru_maxrss) is this refresh's."""
    import resource

    from hf_mim.training import AttentionMapStore

    store = AttentionMapStore()
    store.update(torch.randperm(entries), torch.rand(entries, grid, grid, dtype=torch.float16))
    new_maps = torch.rand(entries, grid, grid, dtype=torch.float16)  # what the refresh gathered
    before = psutil.Process().memory_info().rss
    store.update(torch.randperm(entries), new_maps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(store_bytes(entries, grid), peak - before)


def measured_refresh_peak(entries: int, grid: int) -> float:
    """The transient memory of a refresh's merge, in store sizes (beyond the store and the gathered maps)."""
    done = subprocess.run([sys.executable, __file__, "--refresh-peak", str(entries), str(grid)], capture_output=True,
                          text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    size, extra = map(int, done.stdout.split())
    return extra / size


def store_table(entries: int) -> None:
    from hf_mim.training import AttentionMapStore

    print(f"\nAMT attention-map store (int64 id + float16 map per example), measured on {entries:,} synthetic entries, scaled")
    print(f"{'maps':<44} {'bytes/example':>13} {'saved/example':>13} "
          + " ".join(f"{name + ' ' + unit:>21}" for name in IMAGENET for unit in ("memory", "checkpoint")))
    peaks = []
    for label, grid in MAP_GRIDS:
        store = AttentionMapStore()
        store.update(torch.randperm(entries), torch.rand(entries, grid, grid))
        state = store.state_dict()
        in_memory = sum(value.nbytes for value in state.values() if torch.is_tensor(value))
        assert in_memory == store_bytes(entries, grid), (in_memory, store_bytes(entries, grid))
        buffer = io.BytesIO()
        torch.save(state, buffer)
        per_example, saved_per_example = in_memory / entries, buffer.getbuffer().nbytes / entries
        sizes = " ".join(f"{count * per_example / 1e9:>18.2f} GB {count * saved_per_example / 1e9:>18.2f} GB"
                         for count in IMAGENET.values())
        print(f"{label:<44} {per_example:>13.1f} {saved_per_example:>13.1f} {sizes}")
        peaks.append((label, measured_refresh_peak(entries, grid)))
    print("memory: per rank (every rank holds every map); checkpoint: one copy per saved checkpoint")
    for label, extra in peaks:
        print(f"{label.split(':')[0]}: a refresh replacing every map peaks at {extra:.1f} x the store above the store and the "
              f"gathered maps (ImageNet-22k: +{extra * store_bytes(IMAGENET['ImageNet-22k'], dict(MAP_GRIDS)[label]) / 1e9:.1f} GB per rank)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2, help="--dataloader_num_workers of the run")
    parser.add_argument("--images", type=int, default=4000, help="generated training images (one epoch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--logging-steps", type=int, default=25)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--flat-mb-per-1k-steps", type=float, default=5.0, help="the verdict's threshold")
    parser.add_argument("--store-entries", type=int, default=100_000)
    parser.add_argument("--csv", help="also write every sample to this file")
    parser.add_argument("--skip-run", action="store_true", help="only the store table")
    parser.add_argument("--refresh-peak", nargs=2, type=int, help=argparse.SUPPRESS)  # entries grid: the child of part 2
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.refresh_peak:
        return refresh_peak(*args.refresh_peak)
    if not args.skip_run:
        with tempfile.TemporaryDirectory() as tmp:
            data = write_images(Path(tmp) / "data", args.images)
            print(f"run_mim.py: AMT (MAE host) tiny, {args.steps} steps of batch {args.batch_size}, {args.workers} workers, "
                  f"{args.images} generated 32 x 32 PNGs ({args.images // args.batch_size} steps per epoch), "
                  f"a sample every {args.interval:g} s")
            start = time.perf_counter()
            rows = run_and_sample(args, data, Path(tmp) / "out")
            print(f"wall time {time.perf_counter() - start:.0f} s")
        if args.csv:
            Path(args.csv).write_text("step,training_rss_mb,workers_uss_mb,sum_mb,workers\n"
                                      + "".join(",".join(map(str, row)) + "\n" for row in rows))
        memory_table(args, rows)
    store_table(args.store_entries)


if __name__ == "__main__":
    main()
