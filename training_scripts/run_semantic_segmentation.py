#!/usr/bin/env python
"""Semantic-segmentation fine-tuning of any hf_mim checkpoint with transformers' UperNet, with
Accelerate on streaming datasets.

    accelerate launch training_scripts/run_semantic_segmentation.py --model_name_or_path outputs/run_mim
        # embedded shapes-on-textures set (offline, minutes), compared with random initialisation
    accelerate launch training_scripts/run_semantic_segmentation.py --model_name_or_path <folder or Hub id> \
        --dataset_name scene_parse_150 --num_labels 150 --reduce_labels --per_device_train_batch_size 2

`--model_name_or_path`: a pretraining or classification folder (the encoder loads into the method's
AutoBackbone; the feature pyramid and the UperNet heads start fresh, and the run says what was not in
the checkpoint), or a segmentation folder of this script (loads whole). `--model_type/--model_size`
without it: a randomly initialised baseline. Data: a Hub dataset or parquet with an image and a
segmentation-map column (scene_parse_150: `image`, `annotation`), or a folder `images/<split>/*.jpg` +
`annotations/<split>/*.png`.

The recipe (BEiT / MAE / dBOT on ADE20K, the defaults): 512 crops, random rescale 0.5-2 / crop / flip /
photometric distortion on image and map together (ignore index 255), AdamW lr 1e-4 with layer decay
0.65 through the backbone's `layer_id_for_lr_decay`, 1500 warm-up steps, poly decay, 160k steps, batch
16; sliding-window evaluation (mIoU, pixel accuracy, per-class IoU, computed in the package). Every
draw is a function of (seed, epoch, example id): a resumed run reproduces the interrupted one.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path

import hf_mim  # noqa: F401  (registers every hf_mim model with the Auto classes)
from hf_mim.data import make_dataloader, prepare_stream
from hf_mim.data.segmentation import (
    SegmentationCollator, SegmentationEvalTransform, SegmentationTrainTransform, load_id2label, load_segmentation_data,
)
from hf_mim.training import RunHyperparameters, StagedSchedule, TrainingLoop, UserInputError, optimizer_steps, run_script, start_run
from hf_mim.training.arguments import add_shared_flags, fill_defaults, uses_embedded_data, validate_shared_flags
from hf_mim.training.checkpoint import write_json_atomic
from hf_mim.training.segmentation import (
    EMBEDDED_DEFAULTS, EMBEDDED_MODEL, RECIPE_DEFAULTS, build_model, build_optimizer, evaluate, write_outputs,
)

logger = logging.getLogger("run_semantic_segmentation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = add_shared_flags(
        parser, {"data": "data (none given: the embedded shapes on textures)", "model": "model",
                 "optim": "optimisation (None: the ADE20K recipe)", "run": "outputs"},
        train_dir={"help": "parquet files, or a folder images/<split>/*.jpg + annotations/<split>/*.png"},
        model_name_or_path={"help": "a pretraining, classification or segmentation folder, or a Hub id"},
        model_type={"help": "random-init baseline (without --model_name_or_path): an hf_mim method"},
        output_dir={"default": "outputs/run_semantic_segmentation"},
        validation_dir={"help": "a separate folder of validation pairs"},
        per_device_eval_batch_size={"default": 1},
        lr_scheduler_type={"default": None, "help": "transformers' get_scheduler names; the recipe's poly (power 1) "
                           "decay is 'linear' (the default)"},
    )
    data, model, optim, run = groups["data"], groups["model"], groups["optim"], groups["run"]
    data.add_argument("--validation_split", default="validation", help="'none': no evaluation")
    data.add_argument("--segmentation_column_name", help="default: detected (annotation, segmentation_map, mask, ...)")
    data.add_argument("--num_labels", type=int, help="classes after --reduce_labels (scene_parse_150: 150)")
    data.add_argument("--id2label", help="a JSON file or text {\"0\": \"wall\", ...}")
    data.add_argument("--reduce_labels", action="store_true", help="map 0 ('other') to 255 (ignored), k to k-1 (ADE20K)")
    model.add_argument("--decode_head_channels", type=int, help="UperNet width (recipe 512)")
    model.add_argument("--compare_random_init", action="store_true",
                       help="then train the same recipe from random initialisation (into <output_dir>-random_init) and report both "
                       "mIoUs (default with embedded data)")
    optim.add_argument("--layer_decay", type=float, help="layer-wise lr decay (recipe 0.65)")
    optim.add_argument("--drop_path_rate", type=float)
    aug = parser.add_argument_group("augmentation and evaluation")
    aug.add_argument("--crop_size", type=int, help="training crop and sliding window (recipe 512)")
    aug.add_argument("--scale_size", type=int, help="images are resized to fit (4x, 1x) this (default: --crop_size)")
    aug.add_argument("--cat_max_ratio", type=float, default=0.75, help="crops where one class covers more are redrawn")
    aug.add_argument("--no_photometric_distortion", action="store_true")
    aug.add_argument("--eval_mode", default="slide", choices=["slide", "whole"])
    aug.add_argument("--eval_stride", type=int, help="sliding-window stride (default 2/3 of --crop_size: 341 at 512)")
    run.add_argument("--eval_steps", type=int, help="evaluate every N steps (always at the end)")
    args = parser.parse_args(argv)
    args.random_init = False
    if uses_embedded_data(args):
        fill_defaults(args, parser, EMBEDDED_DEFAULTS)
        args.compare_random_init = args.compare_random_init or bool(args.model_name_or_path)
        if not (args.model_name_or_path or args.model_type or args.model_size):
            fill_defaults(args, parser, EMBEDDED_MODEL)
    # epochs asked for: the recipe's step count does not apply
    fill_defaults(args, parser, {k: v for k, v in RECIPE_DEFAULTS.items() if k != "max_train_steps" or args.num_train_epochs is None})
    args.scale_size = args.scale_size or args.crop_size
    args.eval_stride = args.eval_stride or max(1, args.crop_size * 2 // 3)
    validate_args(args, parser)
    return args


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not args.model_name_or_path and not (args.model_type and args.model_size):
        parser.error("give --model_name_or_path (a run_mim.py or classification output, a Hub id), or --model_type and "
                     "--model_size for a randomly initialised baseline")
    if args.model_name_or_path and args.model_size:
        parser.error("--model_size is for a random-init baseline: not with --model_name_or_path")
    if args.compare_random_init and not args.model_name_or_path:
        parser.error("--compare_random_init compares a checkpoint with random initialisation: give --model_name_or_path")
    if args.num_labels is not None and args.id2label:
        parser.error("give either --num_labels or --id2label, not both")
    validate_shared_flags(parser, args, at_least_one=("per_device_eval_batch_size", "eval_steps", "crop_size", "scale_size",
                                                      "eval_stride", "num_labels", "decode_head_channels"),
                          non_negative=("drop_path_rate",))
    if not 0.0 < args.layer_decay <= 1.0:
        parser.error(f"--layer_decay must be in (0, 1], got {args.layer_decay}")
    if not 0.0 < args.cat_max_ratio <= 1.0:
        parser.error(f"--cat_max_ratio must be in (0, 1], got {args.cat_max_ratio}")


class SegmentationLoop(TrainingLoop):
    """UperNet's loss (decode head + 0.4 x auxiliary head, ignore index 255), evaluation every --eval_steps."""

    tracker_project = "run_semantic_segmentation"
    progress_label = "segmentation"

    def __init__(self, *loop_args, eval_dataloader, id2label):
        super().__init__(*loop_args)
        self.eval_dataloader, self.id2label = eval_dataloader, id2label
        self.eval_history: list[dict] = []

    def compute_loss(self, batch):
        output = self.model(pixel_values=batch["pixel_values"], labels=batch["labels"])
        return output.loss, output

    def after_step(self, step, output):
        if self.eval_dataloader is not None and self.args.eval_steps and step % self.args.eval_steps == 0 and step < self.total_steps:
            self.evaluate()

    def evaluate(self) -> dict:
        results = evaluate(self.unwrapped, self.eval_dataloader, self.accelerator, self.args)
        self.eval_history.append({"step": self.global_step, "mean_iou": results["mean_iou"], "pixel_accuracy": results["pixel_accuracy"]})
        self.logger.info("eval at step %d: mIoU %.2f, pixel accuracy %.2f (%d pixels)", self.global_step, results["mean_iou"],
                         results["pixel_accuracy"], results["eval_pixels"])
        if self.args.with_tracking:
            self.accelerator.log({"eval_mean_iou": results["mean_iou"], "eval_pixel_accuracy": results["pixel_accuracy"]},
                                 step=self.global_step)
        return results

    def trainer_state(self):
        return {"id2label": {str(k): v for k, v in self.id2label.items()}, "eval_history": self.eval_history}

    def resumed(self, trainer_state):
        self.eval_history = trainer_state.get("eval_history", [])


def build_dataloaders(args, data, accelerator):
    """(stream, collator, loader) of this rank's training pairs, and the evaluation loader (or None)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    stream = prepare_stream(data.train, data.image_column, seed=args.seed, buffer_size=args.shuffle_buffer_size, rank=rank,
                            world_size=world, max_image_pixels=args.max_image_pixels, mask_column=data.mask_column)
    transform = SegmentationTrainTransform(args.crop_size, args.scale_size, cat_max_ratio=args.cat_max_ratio,
                                           photometric=not args.no_photometric_distortion, reduce_labels=args.reduce_labels)
    collator = SegmentationCollator(transform, seed=args.seed)
    loader = make_dataloader(stream, collator, batch_size=args.per_device_train_batch_size,
                             num_workers=args.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda")
    eval_loader = None
    if data.validation is not None:
        raw, image_column, mask_column = data.validation
        val_stream = prepare_stream(raw, image_column, seed=args.seed, buffer_size=0, rank=rank, world_size=world,
                                    max_image_pixels=args.max_image_pixels, mask_column=mask_column)
        eval_loader = make_dataloader(val_stream, SegmentationCollator(SegmentationEvalTransform(args.scale_size, args.reduce_labels)),
                                      batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers,
                                      drop_last=False)
    return stream, collator, loader, eval_loader


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    status = run_script("run_semantic_segmentation.py", train, args)
    if status or not args.compare_random_init:
        return status
    baseline = copy.copy(args)
    # a sibling folder: <output_dir> stays exactly what is published (an upload of it takes no second model)
    output = Path(args.output_dir)
    baseline.random_init, baseline.output_dir = True, str(output.with_name(output.name + "-random_init"))
    baseline.push_to_hub, baseline.resume_from_checkpoint = False, args.resume_from_checkpoint and "latest"
    status = run_script("run_semantic_segmentation.py", train, baseline)
    results = [json.loads((Path(d) / "eval_results.json").read_text()) for d in (args.output_dir, baseline.output_dir)
               if (Path(d) / "eval_results.json").is_file()]
    if not status and len(results) == 2:
        comparison = {"pretrained": results[0]["mean_iou"], "random_init": results[1]["mean_iou"],
                      "checkpoint": args.model_name_or_path}
        write_json_atomic(Path(args.output_dir) / "comparison.json", comparison)
        print(f"run_semantic_segmentation: mIoU pretrained={comparison['pretrained']:.2f} "
              f"random_init={comparison['random_init']:.2f}", flush=True)
    return status


def train(args: argparse.Namespace, phase=None) -> int:
    embedded = uses_embedded_data(args)
    need_count = args.max_train_steps is None
    try:
        id2label = load_id2label(args, embedded)
        data = load_segmentation_data(args, embedded, args.crop_size, need_count)
    except (ValueError, OSError) as error:
        raise UserInputError(str(error)) from None
    run = start_run(args)
    accelerator, world, total_batch = run.accelerator, run.world, run.total_batch(args)
    if run.saved_state is not None and {int(k): v for k, v in run.saved_state["id2label"].items()} != id2label:
        raise UserInputError(f"{run.resume_path} was trained on other labels")

    model, missing = build_model(args, id2label)
    multiple = int(max(model.backbone.feature_strides))
    if args.crop_size % multiple:
        raise UserInputError(f"--crop_size {args.crop_size} must be a multiple of the backbone's coarsest stride {multiple}")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    stream, collator, dataloader, eval_dataloader = build_dataloaders(args, data, accelerator)

    total_steps = optimizer_steps(args, args.num_train_examples or data.num_examples, total_batch)
    args.num_warmup_steps = min(args.num_warmup_steps, total_steps)
    optimizer = build_optimizer(args, model, args.learning_rate)
    kind = args.lr_scheduler_type
    schedule = StagedSchedule(optimizer, base_lr=args.learning_rate, steps_per_stage=[total_steps],
                              warmup_steps=args.num_warmup_steps, min_lr_ratio=args.min_lr_ratio, kind=kind)
    hyperparameters = RunHyperparameters.from_args(args, args.learning_rate, total_steps, lr_scheduler_type=kind)
    loop = SegmentationLoop(args, run, model, optimizer, schedule, hyperparameters, (dataloader, stream, collator),
                            eval_dataloader=eval_dataloader, id2label=id2label)
    loop.prepare()
    backbone = loop.unwrapped.backbone
    logger.info("UperNet on %s (%s, strides %s, %d labels) for %d steps, batch %d, lr %.3g, layer decay %.3g",
                type(backbone).__name__, backbone.config.model_type, backbone.feature_strides, len(id2label), total_steps,
                total_batch, args.learning_rate, args.layer_decay)
    loop.train(phase)
    results = loop.evaluate() if eval_dataloader is not None else None

    def write() -> None:
        summary = {"script": "training_scripts/run_semantic_segmentation.py",
                   "initialised from": "random" if args.random_init or not args.model_name_or_path else args.model_name_or_path,
                   "backbone": f"{type(backbone).__name__}, pyramid {backbone.config.backbone_pyramid}, strides {backbone.feature_strides}",
                   "not in the checkpoint": f"{len(missing)} tensors (pyramid, heads)" if args.model_name_or_path else "all",
                   "optimizer steps": total_steps, "batch (total)": total_batch, "crop": args.crop_size,
                   "learning rate": f"{args.learning_rate:.3g} (AdamW, weight decay {args.weight_decay}, layer decay {args.layer_decay})",
                   "schedule": f"{args.lr_scheduler_type}, warm-up {args.num_warmup_steps} steps",
                   "evaluation": f"{args.eval_mode} (window {args.crop_size}, stride {args.eval_stride})",
                   "processes": world, "wall time": f"{loop.elapsed / 60:.1f} min"}
        extra = {"step": loop.global_step, "history": loop.eval_history, "not_in_checkpoint": missing}
        try:
            write_outputs(args, loop.unwrapped, run.output_dir, results, summary, embedded, extra)
        finally:
            miou = f"{results['mean_iou']:.2f}" if results else "n/a"
            print(f"run_semantic_segmentation: steps={loop.global_step} mIoU={miou} time={loop.elapsed:.1f}s "
                  f"output_dir={run.output_dir}", flush=True)

    return loop.finish(write)


if __name__ == "__main__":
    sys.exit(main())
