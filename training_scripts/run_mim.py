#!/usr/bin/env python
"""Masked-image-modeling pretraining for every hf_mim method, with Accelerate on streaming datasets.

    accelerate launch training_scripts/run_mim.py                      # embedded demo data, small dBOT
    accelerate launch -m hf_mim.scripts.run_mim ...                    # the same, installed (hf-mim-pretrain)
    accelerate launch training_scripts/run_mim.py --dataset_name <hub dataset> --model_type dbot \
        --model_size base --per_device_train_batch_size 128 --num_train_epochs 800 --num_stages 2

With a validation source (--validation_split, --validation_dir or --train_val_split) the pretraining
loss is evaluated every --eval_steps and at the end, on fixed masks: every evaluation sees the same
crops and masks (seeded per example), so the numbers are comparable across steps and runs.

One generic loop (`hf_mim.training.TrainingLoop`). Methods differ only through their config and the
training events of `MIMTrainingEventsMixin` (hf_mim/training_events.py), which every
`...ForMaskedImageModeling` inherits with do-nothing defaults and overrides where its method needs:
masks per example (`mask_generator`), stage starts (dBOT), per-step updates (ExtreMA's momentum encoder),
attention refreshes and their per-example store (AMT), extra logs, extra exported backbones.

With labelled data (--labelled_train_dir / --labelled_dataset_name; with no data flag at all, the
embedded digits) the encoder is measured on what pretraining is for (hf_mim/training/downstream.py):
--knn_eval_steps N logs its weighted k-NN top-1 (as run_image_classification.py --mode knn) at step 0,
every N steps and at the end; --downstream_eval finetune | linear_probe | knn (on by default with the
embedded data) ends the run by training the pretrained encoder and the same architecture at random
initialisation with one recipe and seed on a few labels, and prints both accuracies in one line.
Neither changes the run: its weights end bitwise as without them.

Resume is exact: augmentation and masks are a pure function of (seed, epoch, example id), and a
resumed run skips the batches each rank had already consumed in its current epoch.

Preemption (SIGTERM, SIGUSR1; --preemption_signals): the run finishes its current optimizer step (and that
step's evaluations), checkpoints it, and exits with status 75; the same command line with
--resume_from_checkpoint latest continues bitwise. After the last step (final evaluations, the downstream
check) it stops at the end of the evaluation or at the next step of the check's training, which a resume redoes.
"""

from __future__ import annotations

import argparse
import logging
import sys

import hf_mim  # noqa: F401  (registers every hf_mim model with the Auto classes)
from hf_mim.data import PretrainingCollator, ResizeTransform, count_examples, make_dataloader, prepare_stream
from hf_mim.auto import family_for
from hf_mim.training import (
    AttentionMapStore, RunHyperparameters, TrainingLoop, UserInputError, forward_inputs, optimizer_steps,
    refresh_attention_maps, run_script, start_run,
)
from hf_mim.training.arguments import (
    add_shared_flags, explicit_flags, fill_defaults, uses_embedded_data, validate_shared_flags,
)
from hf_mim.training.conventions import checkpoint_every, epoch_length_known, hub_kwargs, steps_per_epoch, training_examples
from hf_mim.training.downstream import (
    KnnMonitor, add_labelled_flags, check_can_read_encoder, check_labelled_flags, downstream_line, load_labelled_source,
    record_evaluation, run_downstream_check,
)
from hf_mim.training.schedule import WARMUP_STYLES
from hf_mim.training.pretraining import (
    build_pretraining_model, build_pretraining_optimization, data_source, evaluate_pretraining_loss, load_stream, load_validation_stream, run_summary,
    save_mim_picture_of, write_outputs,
)
from hf_mim.training.recipes import apply_demo_budget, apply_demo_recipe
from hf_mim.training.visualize import log_pictures

logger = logging.getLogger("run_mim")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = add_shared_flags(
        parser,
        {"data": "data (none given: the embedded digits' training images, labels unused)", "model": "model", "optim": "optimisation", "run": "outputs"},
        model_type={"default": "dbot", "help": "an hf_mim method"},
        model_size={"help": "a named size of the method (tiny, demo, small, base, large, huge)"},
        model_name_or_path={"help": "start from these weights (hf_mim folder or Hub id)"},
        config_overrides={"help": "e.g. 'drop_path_rate=0.1,teacher_depth=0'"},
        learning_rate={"help": "absolute lr; default base_learning_rate x batch / 256"},
        base_learning_rate={"default": 1.5e-4}, weight_decay={"default": 0.05}, adam_beta2={"default": 0.95},
        max_grad_norm={"help": "gradient clipping (dBOT ViT-B: 3.0)"},
        num_warmup_steps={"help": "per stage; default 5%% of a stage"}, output_dir={"default": "outputs/run_mim"},
    )
    model, optim, run = groups["model"], groups["optim"], groups["run"]
    model.add_argument(
        "--ignore_missing_weights", action="store_true",
        help="with --model_name_or_path: start the parts its weights lack (e.g. the decoder or teacher of a "
        "classifier checkpoint) from random initialisation instead of refusing",
    )
    model.add_argument("--config_name_or_path", help="start from this config, random weights")
    model.add_argument("--image_size", type=int)
    model.add_argument("--patch_size", type=int)
    model.add_argument("--mask_ratio", type=float)
    model.add_argument("--mask_patch_size", type=int, help="side in pixels of one mask unit (methods with that field: AMT)")
    model.add_argument(
        "--teacher_name_or_path",
        help="a frozen teacher (CLIP, timm ViT or hf_mim model; local folder or Hub id) for the methods that regress "
        "one: MaskDistill, RevColV2 with target=teacher, dBOT's stage 0; its width sets teacher_hidden_size",
    )
    optim.add_argument("--num_stages", type=int, default=1, help="dBOT bootstrap stages (the schedule restarts per stage)")
    optim.add_argument(
        "--warmup_style", choices=WARMUP_STYLES, default="mae",
        help="mae: lr x step / warm-up, the peak after the warm-up (MAE, ExtreMA); beit: np.linspace(0, lr, warm-up), the "
        "peak at its last step (BEiT v2's cosine_scheduler, MaskDistill's code base)",
    )
    run.add_argument("--picture_steps", type=int, help="save a picture of the model's work every N steps")
    run.add_argument("--eval_steps", type=int, help="with a validation source: evaluate the loss every N steps (always at the end)")
    groups["data"].add_argument("--validation_split", help="evaluate the pretraining loss on this split of the training source")
    add_labelled_flags(parser)
    args = parser.parse_args(argv)
    if args.model_name_or_path and args.config_name_or_path:
        parser.error("give either --model_name_or_path or --config_name_or_path, not both")
    validate_shared_flags(parser, args, at_least_one=("num_stages", "picture_steps", "image_size", "eval_steps", "patch_size",
                                                      "mask_patch_size"), fractions=("mask_ratio",))
    if args.max_train_steps is not None and args.max_train_steps < args.num_stages:
        parser.error("--max_train_steps must be at least --num_stages")
    args.explicit_flags = explicit_flags(parser, argv)  # the demo recipe fills only what the user left unset
    if uses_embedded_data(args):
        fill_defaults(args, parser, EMBEDDED_DEMO_DEFAULTS, given=args.explicit_flags)
    check_labelled_flags(parser, args)
    return args


# No data flag: the demo pretrains AMT on MAE (unless --model_type says otherwise) at the demo size on the embedded
# digits' 1,438 training images (labels unused) with the small-budget recipe (hf_mim/training/recipes.py), and
# ends with the downstream check on their 359 held-out labelled images. 600 steps: the k-NN first falls below
# the random initialisation (74.9 -> 62.4 at step 200) and passes it later (83.6 at 400, 86.4 at 600); 400 steps
# end in the dip (fine-tuning 51.3 vs 83.8 at random initialisation, against 93.6 vs 83.8 after 600).
EMBEDDED_DEMO_DEFAULTS = {
    "model_type": "amt",  # MAE host: the largest measured gain over random initialisation (README's table)
    "model_size": "demo",
    "per_device_train_batch_size": 64,
    "max_train_steps": 600,
    "picture_steps": 100,
}


class PretrainingLoop(TrainingLoop):
    """The model's own loss; its training events (MIMTrainingEventsMixin) at their moments; pictures."""

    progress_label = "pretraining"
    tracker_project = "run_mim"

    def __init__(self, *loop_args, attention_maps, refresh_loader, refresh_steps, eval_data, knn=None):
        super().__init__(*loop_args)
        self.attention_maps, self.refresh_loader, self.refresh_steps = attention_maps, refresh_loader, refresh_steps
        self.eval_data, self.eval_history = eval_data, []  # (loader, collator) of the validation stream, or None
        self.knn = knn  # the k-NN monitor (--knn_eval_steps), or None

    def checkpointed_objects(self):
        return [self.attention_maps] if self.attention_maps is not None else []  # maps resume with the run

    def training_batch(self, batch, epoch):
        return super().training_batch(self.collator.finish(batch, epoch), epoch)

    def compute_loss(self, batch):
        output = self.model(**forward_inputs(self.unwrapped, batch))
        return output.loss, output

    def before_step(self, step):
        if step == 0 and self.knn is not None:
            self.evaluate_knn()  # the curve starts at the random initialisation
        if self.schedule.is_stage_boundary(step):
            self.unwrapped.start_new_stage()
            logger.info("step %d: stage %d starts", step, self.schedule.stage_of(step))
        self.unwrapped.on_train_step_start(progress=step / self.total_steps)

    def after_step(self, step, output):
        self.unwrapped.on_train_step_end(progress=step / self.total_steps)
        if step in self.refresh_steps:
            refresh = refresh_attention_maps(self.model, self.attention_maps, self.refresh_loader, self.accelerator)
            logger.info("step %d: attention maps refreshed (%d images, %.1f s)", step, refresh["maps"], refresh["seconds"])
        if self.args.picture_steps and step % self.args.picture_steps == 0 and self.accelerator.is_main_process:
            path = save_mim_picture_of(self.unwrapped, self.last_batch, self.run.output_dir / "pictures" / f"step-{step:07d}.png")
            log_pictures(self.accelerator, {"mim_picture": path}, step)
        if self.eval_data is not None and self.args.eval_steps and step % self.args.eval_steps == 0 and step < self.total_steps:
            self.evaluate()
        if self.knn is not None and step % self.args.knn_eval_steps == 0 and step < self.total_steps:
            self.evaluate_knn()

    def evaluate(self) -> dict:
        """The validation loss on fixed masks, logged (and tracked) at this step."""
        results = evaluate_pretraining_loss(self.unwrapped, *self.eval_data, self.accelerator, self.args.seed)
        record_evaluation(self.eval_history, self.global_step, results)
        logger.info("eval at step %d: loss %.6f (%d images)", self.global_step, results["eval_loss"], results["eval_examples"])
        if self.args.with_tracking:
            self.accelerator.log(results, step=self.global_step)
        return results

    def evaluate_knn(self) -> dict:
        """The encoder's k-NN top-1 at this step (every rank; the run's RNG untouched), logged and tracked."""
        results = self.knn.evaluate(self.unwrapped)
        record_evaluation(self.eval_history, self.global_step, results)
        logger.info("k-NN at step %d: top-1 %.2f%%, top-5 %.2f%% (%d training / %d validation images, %.1f s)", self.global_step,
                    results["knn_top1"], results["knn_top5"], results["knn_bank_size"], results["knn_eval_examples"],
                    results["knn_seconds"])
        if self.args.with_tracking:
            self.accelerator.log({"knn_top1": results["knn_top1"], "knn_top5": results["knn_top5"]}, step=self.global_step)
        return results

    def extra_logs(self, output):
        return self.unwrapped.training_logs(output)

    def trainer_state(self):
        return {"model_config": self.unwrapped.config.to_dict(), "eval_history": self.eval_history}

    def resumed(self, trainer_state):
        self.eval_history = trainer_state.get("eval_history", [])


def main(argv: list[str] | None = None) -> int:
    return run_script("run_mim.py", train, parse_args(argv))


def train(args: argparse.Namespace, phase=None) -> int:
    run = start_run(args)  # the resumed checkpoint's config decides the model's shape (e.g. a dBOT stage)
    accelerator, world, total_batch = run.accelerator, run.world, run.total_batch(args)

    # --- length of training, and the small-budget recipe that depends on it (--model_size demo) ---
    examples = None
    if epoch_length_known(args):  # counted from what the source records, unless --num_train_examples says
        examples = training_examples(args, args.num_train_examples or count_examples(
            **data_source(args), progress=accelerator.is_local_main_process, load_kwargs=hub_kwargs(args, revision=False)))
    budget = apply_demo_budget(args, examples, total_batch)  # the demo recipe's epochs when no budget is given
    total_steps = optimizer_steps(args, examples, total_batch, minimum=args.num_stages)
    recipe = {**budget, **apply_demo_recipe(args, total_steps, total_batch)}
    total_steps = max(total_steps, args.num_stages)

    model, config = build_pretraining_model(args, run.saved_state["model_config"] if run.saved_state else None)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.num_stages > 1 and not model.has_training_stages:
        raise UserInputError(f"--num_stages {args.num_stages}: {type(model).__name__} has no training stages")

    # --- data ---
    raw_stream, image_column, _ = load_stream(args)
    transform = family_for(config.model_type).pretraining_transform(config)
    shard = dict(rank=accelerator.process_index, world_size=world, max_image_pixels=args.max_image_pixels)
    stream = prepare_stream(raw_stream, image_column, seed=args.seed, buffer_size=args.shuffle_buffer_size, **shard,
                            decode_min_side=getattr(transform, "min_decode_side", None))  # large JPEGs at reduced scale
    attention_maps = AttentionMapStore() if model.uses_attention_maps else None
    collator = PretrainingCollator(transform, mask_generator=model.mask_generator(attention_maps=attention_maps), seed=args.seed)
    loader_options = dict(num_workers=args.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda")
    dataloader = make_dataloader(stream, collator, batch_size=args.per_device_train_batch_size, **loader_options)
    epoch_steps = steps_per_epoch(examples, total_batch)  # None for a step budget without --num_train_examples
    refresh_steps, refresh_loader = set(model.attention_refresh_steps(total_steps, epoch_steps)), None
    if refresh_steps:  # whole images, in stream order, every example once (no shuffle, no dropped last batch)
        refresh_stream = prepare_stream(raw_stream, image_column, seed=args.seed, buffer_size=0, **shard)
        refresh_loader = make_dataloader(refresh_stream, PretrainingCollator(ResizeTransform(config.image_size), seed=args.seed),
                                         batch_size=args.per_device_train_batch_size, drop_last=False, **loader_options)
        logger.info("attention refresh after steps %s", sorted(refresh_steps))
    eval_data = None
    validation = load_validation_stream(args)
    if validation is not None:  # fixed crops and masks: epoch 0 of the eval collator, never advanced
        eval_stream = prepare_stream(validation[0], validation[1], seed=args.seed, buffer_size=0, **shard,
                                     decode_min_side=getattr(transform, "min_decode_side", None))
        eval_collator = PretrainingCollator(transform, mask_generator=model.mask_generator(attention_maps=AttentionMapStore()
                                            if model.uses_attention_maps else None), seed=args.seed)
        eval_data = (make_dataloader(eval_stream, eval_collator, batch_size=args.per_device_eval_batch_size, drop_last=False,
                                     **loader_options), eval_collator)

    labelled = knn = None
    if args.knn_eval_steps or args.downstream_eval != "none":  # labelled data: errors end the run before training
        check_can_read_encoder(accelerator)
        labelled = load_labelled_source(args, config.image_size)
        knn = KnnMonitor(args, labelled, config.image_size, accelerator) if args.knn_eval_steps else None

    optimizer, schedule, lr = build_pretraining_optimization(args, model, total_steps, total_batch)
    hyperparameters = RunHyperparameters.from_args(args, lr, total_steps, lr_scheduler_type=args.lr_scheduler_type)

    loop = PretrainingLoop(args, run, model, optimizer, schedule, hyperparameters, (dataloader, stream, collator),
                           attention_maps=attention_maps, refresh_loader=refresh_loader, refresh_steps=refresh_steps,
                           eval_data=eval_data, knn=knn)
    loop.checkpoint_every = checkpoint_every(args, examples, total_batch)
    loop.prepare()
    if recipe:
        logger.info("small-budget recipe (--model_size demo, hf_mim/training/recipes.py): %s", recipe)
    logger.info(
        "training %s (%s) for %d steps, batch %d (%d per device x %d processes x %d accumulation), lr %.3g",
        type(loop.unwrapped).__name__, config.model_type, total_steps, total_batch, args.per_device_train_batch_size,
        world, args.gradient_accumulation_steps, lr,
    )
    loop.train(phase)
    with loop.finishing():  # a preemption signal here: the last step checkpointed, this work redone on resume
        results = loop.evaluate() if eval_data is not None else None
        knn_results = loop.evaluate_knn() if knn is not None else None
        downstream = run_downstream_check(args, run, loop.unwrapped, labelled) if args.downstream_eval != "none" else None
    summary = run_summary(args, config, total_batch, lr, total_steps, world)

    def write() -> None:
        try:
            write_outputs(args, loop.unwrapped, loop.last_batch, run.output_dir, summary, loop.elapsed, results=results,
                          eval_history=loop.eval_history, accelerator=accelerator, knn=knn_results, downstream=downstream)
        finally:
            if downstream is not None:  # the run's last word: does pretraining help?
                print(downstream_line(downstream), flush=True)

    return loop.finish(write)


if __name__ == "__main__":
    sys.exit(main())
