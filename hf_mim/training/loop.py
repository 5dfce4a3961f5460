"""Pieces of the training loop shared by run_mim.py and run_image_classification.py."""

from __future__ import annotations


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
