"""Parts of a raw stream that transformers' examples select with flags: `--train_val_split F` (a held-out
validation part) and `--max_train_samples` / `--max_eval_samples` (the first N examples).

A stream cannot be shuffled and split the way `Dataset.train_test_split` does, so the held-out part is
chosen by the example's id (`images.example_id`: its key, else its bytes): the same examples in every
run, process and epoch, whatever the seed, and never seen in training.
"""

from __future__ import annotations

import math

from .collators import example_seed
from .images import example_id


class _HeldOut:
    """Picklable filter: is the example in the held-out fraction (a hash of its id, seed-independent)?"""

    def __init__(self, image_column: str, fraction: float, validation: bool):
        self.image_column, self.fraction, self.validation = image_column, fraction, validation

    def __call__(self, example: dict) -> bool:
        draw = example_seed(0, 0, example_id(example, self.image_column), stream="train_val_split") / 2**63
        return (draw < self.fraction) == self.validation


def hold_out(raw_stream, image_column: str, fraction: float | None, validation: bool):
    """The training part (`validation=False`) or the held-out validation part of a raw stream
    (`fraction` None: the stream unchanged)."""
    if fraction is None:
        return raw_stream
    return raw_stream.filter(_HeldOut(image_column, fraction, validation))


def limit(raw_stream, max_samples: int | None):
    """The first `max_samples` examples of a raw stream (None: all)."""
    return raw_stream if max_samples is None else raw_stream.take(max_samples)


def training_examples(args, source_examples: int) -> int:
    """How many training examples remain of `source_examples` under --train_val_split / --max_train_samples."""
    examples = source_examples
    if args.train_val_split is not None:
        examples = max(1, math.floor(examples * (1 - args.train_val_split)))
    if args.max_train_samples is not None:
        examples = min(examples, args.max_train_samples)
    return examples


__all__ = ["hold_out", "limit", "training_examples"]
