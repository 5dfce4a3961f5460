#!/usr/bin/env python
"""Does pretraining help? A real-data check on data that ships inside installed packages (offline).

1. Pretrain a small dBOT with training_scripts/run_mim.py on embedded images (default: the digits
   training images, labels unused; `--pretrain_data photos` uses the embedded sample photos).
2. From that checkpoint AND from a random initialisation of the same config, run the same
   linear probe and the same fine-tuning recipe with training_scripts/run_image_classification.py
   on the embedded digits (sklearn `load_digits`, 1438 train / 359 validation, upscaled to 32 px).
3. Print top-1 / top-5 of the four runs and the time each step took.

This is a check, not a test: it takes ~10-20 minutes on 2 CPU cores. Numbers go in the notes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_MIM = ROOT / "training_scripts" / "run_mim.py"
RUN_CLS = ROOT / "training_scripts" / "run_image_classification.py"


def run(script: Path, args: list, log: Path) -> float:
    """Run a training script, log to a file, return the wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(
            [sys.executable, str(script), *map(str, args)], stdout=handle, stderr=subprocess.STDOUT,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
        )
    if result.returncode != 0:
        raise SystemExit(f"{script.name} failed, see {log}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default="outputs/real_data_check")
    parser.add_argument("--pretrain_data", choices=["digits", "photos"], default="digits")
    parser.add_argument("--pretrain_steps", type=int, default=600)
    parser.add_argument("--probe_epochs", type=float, default=20)
    parser.add_argument("--finetune_epochs", type=float, default=10)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse_pretrained", action="store_true", help="keep work_dir/pretrained from an earlier run")
    args = parser.parse_args()

    import torch

    import hf_mim
    from hf_mim.data import embedded_digits_dir, embedded_pretraining_dir
    from hf_mim.hub import save_hub_folder

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    digits = embedded_digits_dir(image_size=32)
    overrides = "image_size=32,patch_size=4"
    timings: dict[str, float] = {}

    # 1. pretraining on embedded images
    pretrain_dir = digits / "train" if args.pretrain_data == "digits" else embedded_pretraining_dir()
    pretrain_args = [
        "--model_type", "dbot", "--model_size", "demo", "--config_overrides", overrides,
        "--train_dir", pretrain_dir, "--max_train_steps", args.pretrain_steps,
        "--per_device_train_batch_size", args.batch_size, "--learning_rate", 1e-3, "--num_warmup_steps", 30,
        "--seed", args.seed, "--logging_steps", 50, "--output_dir", work / "pretrained",
    ]
    if args.reuse_pretrained and (work / "pretrained" / "model.safetensors").is_file():
        timings["pretrain"] = float("nan")
    else:
        timings["pretrain"] = run(RUN_MIM, pretrain_args, work / "pretrain.log")

    # 2. the same config, randomly initialised with the same seed
    torch.manual_seed(args.seed)
    config = hf_mim.DbotConfig.from_preset("demo", image_size=32, patch_size=4)
    save_hub_folder(hf_mim.DbotForMaskedImageModeling(config), work / "random")

    results = {}
    common = ["--train_dir", digits / "train", "--validation_dir", digits / "validation",
              "--per_device_train_batch_size", args.batch_size, "--seed", args.seed, "--logging_steps", 50,
              "--warmup_epochs", 1]
    # Short runs on a small set: SGD for the probe (LARS barely moves a head in a few hundred steps),
    # AdamW at 1e-3 for fine-tuning, one warm-up epoch; the same recipe for both initialisations.
    recipes = {
        "linear_probe": ["--optimizer", "sgd", "--learning_rate", 0.1, "--num_train_epochs", args.probe_epochs],
        "finetune": ["--learning_rate", 1e-3, "--num_train_epochs", args.finetune_epochs],
    }
    for init in ("pretrained", "random"):
        for mode, recipe in recipes.items():
            out = work / f"{init}-{mode}"
            timings[f"{init} {mode}"] = run(RUN_CLS, [
                "--model_name_or_path", work / init, "--mode", mode, *recipe, "--output_dir", out, *common,
            ], work / f"{init}-{mode}.log")
            results[(init, mode)] = json.loads((out / "eval_results.json").read_text())

    print(f"\nreal-data check: dBOT demo size (192 wide, 6 blocks, patch 4, 32 px), pretrained on "
          f"{args.pretrain_data} for {args.pretrain_steps} steps (batch {args.batch_size}); "
          f"embedded digits, 1438 train / 359 validation")
    print(f"{'init':<11} {'mode':<13} {'top-1 %':>8} {'top-5 %':>8} {'time':>8}")
    for (init, mode), metrics in results.items():
        print(f"{init:<11} {mode:<13} {metrics['top1']:>8.2f} {metrics['top5']:>8.2f} "
              f"{timings[f'{init} {mode}'] / 60:>7.1f}m")
    print(f"pretraining: {timings['pretrain'] / 60:.1f} min")
    for mode in ("linear_probe", "finetune"):
        gain = results[("pretrained", mode)]["top1"] - results[("random", mode)]["top1"]
        print(f"{mode}: pretrained - random = {gain:+.2f} top-1 points")


if __name__ == "__main__":
    main()
