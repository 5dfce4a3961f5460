"""Pieces of the training loop shared by run_mim.py and run_image_classification.py."""

from __future__ import annotations

from pathlib import Path


def make_accelerator(args, output_dir: Path):
    """The Accelerator both scripts train with: gradient accumulation stepped by the loop itself, no
    batch dispatching or splitting (each rank streams its own shards), trackers logging to
    `output_dir/runs` (tensorboard files there are uploaded with the model: the Hub's metrics tab)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration

    return Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False),
        log_with=args.report_to if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
    )


def stream_batches(dataloader, stream, collator, start_epoch: int, skip_batches: int):
    """(epoch, index in epoch, batch) forever: each rank cycles through its own shards, so every rank
    takes the same number of optimizer steps even when shards are uneven.

    Resuming replays epoch `start_epoch` and skips its first `skip_batches` batches: with per-example
    seeding (hf_mim.data collators) that reproduces the interrupted run exactly, which datasets'
    own state_dict does not (it loses the shuffle buffer).
    """
    epoch, skip = start_epoch, skip_batches
    while True:
        stream.set_epoch(epoch)
        collator.set_epoch(epoch)
        empty = True
        for index, batch in enumerate(dataloader):
            empty = False
            if index < skip:
                continue
            yield epoch, index, batch
        if empty:
            raise RuntimeError("the training stream yielded no full batch: lower --per_device_train_batch_size")
        epoch, skip = epoch + 1, 0
