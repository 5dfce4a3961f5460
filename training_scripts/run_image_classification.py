#!/usr/bin/env python
"""Fine-tuning and linear probing of any hf_mim checkpoint for image classification, with Accelerate
on streaming datasets.

    accelerate launch training_scripts/run_image_classification.py --model_name_or_path outputs/run_mim
        # embedded handwritten digits (offline), full fine-tuning of a run_mim.py output
    accelerate launch -m hf_mim.scripts.run_image_classification ...   # the same, installed (hf-mim-finetune)
    accelerate launch training_scripts/run_image_classification.py --model_name_or_path <folder or Hub id> \
        --dataset_name <hub dataset> --mode linear_probe --per_device_train_batch_size 1024

`--model_name_or_path` may be a pretraining folder (`...ForMaskedImageModeling`, from run_mim.py or a
converter: the backbone is kept, the pretraining-only parts dropped), or a classifier (its head is
kept when the label set is the same, re-initialised otherwise). `--model_type/--model_size` without
it trains a randomly initialised baseline.

- `--mode finetune` (MAE/BEiT recipe): layer-wise lr decay, AdamW, drop path, RandAugment +
  RandomResizedCrop + flip + RandomErasing (timm), mixup/cutmix with label smoothing (timm `Mixup` +
  `SoftTargetCrossEntropy`), per-iteration warm-up + cosine.
- `--mode linear_probe` (MAE): frozen backbone in eval mode, `BatchNorm1d(affine=False)` + Linear
  head (always re-initialised) on `pooler_output`, LARS, RandomResizedCrop + flip only; at the end the BatchNorm is folded
  into the Linear, so the saved model is a plain `...ForImageClassification`.
- `--mode knn` (DINO): no training; weighted k-NN (`--knn_k 20 --knn_temperature 0.07`) of the validation
  images among the training images, on the L2-normalised `pooler_output` of the frozen base model
  (hf_mim/training/knn.py). Several processes share the work; every one holds the whole training bank.
- `--lora_rank R [--lora_alpha A --lora_dropout P --lora_target_modules qkv ... --lora_qkv_parts q v]`
  (finetune, needs `pip install 'hf_mim[peft]'`): a LoRA adapter (peft) on every block's fused `qkv`
  (or the Linears named), the head trained fully; the saved folder holds the merged model (no peft
  needed to load it), `lora_adapter/` the adapter alone (hf_mim/training/lora.py).
- `--do_eval` (or `--max_train_steps 0`): no training; top-1/top-5 of the classifier `--model_name_or_path`
  (a folder or Hub id, a converted official checkpoint included) on the validation data, on as many
  processes as launched, into `eval_results.json` and the card of `--output_dir`.
- `--train_fraction 0.01 | 0.1` (any mode): a fixed, seeded, class-balanced subset of the training data
  (SimCLR's and ExtreMA's semi-supervised 1% / 10% protocols; hf_mim/data/fractions.py).

Augmentation is a pure function of (seed, epoch, example id) (timm's transforms run under RNGs
seeded per example and restored afterwards), mixup/cutmix of (seed, step); a resumed run skips the
batches each rank had already consumed in its current epoch, so resuming reproduces the run.
Top-1/top-5 on the validation split are computed in the package (no Hub), at `--eval_steps` and at
the end, and written to `eval_results.json` and the model card's model-index.
"""

from __future__ import annotations

import argparse
import logging
import sys

import hf_mim  # noqa: F401  (registers every hf_mim model with the Auto classes)
from hf_mim.training import run_script, start_run
from hf_mim.training.classification import base_config, build_model, write_outputs
from hf_mim.training.classification_run import (
    check_resumed_labels, load_classification_data, parse_classification_args, run_evaluation_only, train_classifier,
)
from hf_mim.training.knn import run_knn

logger = logging.getLogger("run_image_classification")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_classification_args(argv, description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    return run_script("run_image_classification.py", train, parse_args(argv))


def train(args: argparse.Namespace, phase=None) -> int:
    # --- data and labels first (the model's head needs the label set; data errors end the run at once) ---
    need_count = args.num_train_examples is None and (args.max_train_steps is None or args.num_warmup_steps is None
                                                      or args.checkpointing_steps == "epoch")
    trains = args.mode != "knn" and not args.do_eval
    data = load_classification_data(args, base_config(args).image_size, need_count and trains)
    if args.mode == "knn":
        return run_knn(args, data, phase)
    if args.do_eval:
        return run_evaluation_only(args, data, phase)
    run = start_run(args)
    check_resumed_labels(run, data.id2label)

    model = build_model(args, data.id2label)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    loop = train_classifier(args, run, model, data, phase)
    results, total_batch = loop.results, run.total_batch(args)

    def write() -> None:
        try:
            write_outputs(args, loop.unwrapped, run.output_dir, results, loop.eval_history, total_batch,
                          loop.hyperparameters.learning_rate, loop.total_steps, loop.elapsed, run.world)
        finally:
            top1, top5 = (f"{results['top1']:.2f}", f"{results['top5']:.2f}") if results else ("n/a", "n/a")
            print(f"run_image_classification: mode={args.mode} steps={loop.global_step} top1={top1} top5={top5} "
                  f"time={loop.elapsed:.1f}s output_dir={run.output_dir}", flush=True)

    return loop.finish(write)


if __name__ == "__main__":
    sys.exit(main())
