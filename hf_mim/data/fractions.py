"""Label fractions for semi-supervised evaluation (`--train_fraction 0.01 | 0.1`, as SimCLR's and
ExtreMA's 1% / 10% ImageNet protocols): a fixed, seeded, class-balanced subset of a training stream.

    subset = class_balanced_subset(raw_stream, image_column, label_column, fraction=0.01, seed=0)
    raw_stream = raw_stream.filter(subset.keeps)        # before prepare_stream: dropped images are never decoded

Which examples are kept depends only on (seed, example id, label), never on a position in the stream:
each example gets a rank, blake2b(seed, example id) (the id of `hf_mim.data.images.example_id`: the
WebDataset / folder key, else the image bytes), and each class keeps its `per_class` lowest ranks. So
the subset is the same on every rank, after every resume, and whatever the shard order or shuffling;
a smaller fraction's subset lies inside a larger one's. Class-balanced: every class gets the same number of
examples, round(fraction x examples / classes) (at least 1), or all of its own when it has fewer.
`fraction = 1` is the whole stream.

Finding the per-class thresholds takes one pass over the ids and labels (the key column where there is
one, else the undecoded image bytes); no image is decoded.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from dataclasses import dataclass, field

import numpy as np

from .images import example_id

logger = logging.getLogger(__name__)


def check_fraction(fraction: float, name: str = "train_fraction") -> float:
    """`fraction` as a float in (0, 1], else a one-line ValueError naming the flag."""
    value = float(fraction)
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(f"--{name} must be in (0, 1] (e.g. 0.01 or 0.1 of the labelled training data), got {fraction}")
    return value


def subset_rank(seed: int, example_id_value: int) -> int:
    """The 63-bit rank of an example in every label-fraction subset of `seed` (lower ranks are kept first)."""
    digest = hashlib.blake2b(f"hf_mim:fraction:{int(seed)}:{int(example_id_value)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


@dataclass
class ClassBalancedSubset:
    """The per-class rank thresholds of a label fraction; `keeps(example)` tells whether a raw example
    (its id columns and label) is in the subset."""

    fraction: float
    seed: int
    image_column: str
    label_column: str
    per_class: int
    thresholds: dict[int, int] = field(default_factory=dict)  # label -> highest kept rank
    counts: dict[int, int] = field(default_factory=dict)  # label -> examples kept
    total_examples: int = 0  # labelled examples in the whole stream

    @property
    def size(self) -> int:
        return sum(self.counts.values())

    def keeps(self, example: dict) -> bool:
        label = example.get(self.label_column)
        if label is None or int(label) < 0 or int(label) not in self.thresholds:
            return False
        return subset_rank(self.seed, example_id(example, self.image_column)) <= self.thresholds[int(label)]

    def describe(self) -> str:
        return (f"label fraction {self.fraction:g} (seed {self.seed}): {self.size} of {self.total_examples} labelled "
                f"examples, {self.per_class} per class ({len(self.counts)} classes; fewer where a class has fewer)")


def _id_columns(raw, image_column: str, label_column: str) -> list[str]:
    """The columns the ids come from: the key (and shard URL) when the stream has one, else the image."""
    names = raw.column_names
    if names is None:
        return []
    if "__key__" in names:
        return [label_column, "__key__"] + (["__url__"] if "__url__" in names else [])
    return [label_column, image_column]


def class_balanced_subset(raw, image_column: str, label_column: str, fraction: float, seed: int) -> ClassBalancedSubset:
    """One pass over `raw` (a `datasets` stream as `load_image_stream` returns it, images undecoded):
    the per-class thresholds of the `fraction` subset. Unlabelled rows (None, -1) are never kept."""
    fraction = check_fraction(fraction)
    columns = _id_columns(raw, image_column, label_column)
    rows = raw.select_columns(columns) if columns else raw
    labels, ranks = array("q"), array("q")
    for example in rows:
        label = example.get(label_column)
        if label is None or int(label) < 0:
            continue
        labels.append(int(label))
        ranks.append(subset_rank(seed, example_id(example, image_column)))
    if not labels:
        raise ValueError(f"--train_fraction: the label column {label_column!r} of the training data holds no label >= 0")
    label_array, rank_array = np.frombuffer(labels, dtype=np.int64), np.frombuffer(ranks, dtype=np.int64)
    classes = np.unique(label_array)
    per_class = max(1, round(fraction * len(label_array) / len(classes))) if fraction < 1 else len(label_array)
    thresholds, counts = {}, {}
    for label in classes.tolist():
        class_ranks = np.sort(rank_array[label_array == label])
        kept = min(per_class, len(class_ranks))
        thresholds[label] = int(class_ranks[kept - 1])
        counts[label] = int((class_ranks <= thresholds[label]).sum())  # identical ids share a rank
    subset = ClassBalancedSubset(fraction, int(seed), image_column, label_column, per_class, thresholds, counts,
                                 len(label_array))
    logger.info("%s", subset.describe())
    return subset


__all__ = ["ClassBalancedSubset", "check_fraction", "class_balanced_subset", "subset_rank"]
