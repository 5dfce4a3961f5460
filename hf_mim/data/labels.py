"""Labelled streams for classification: the training and validation splits, and the label set
(a ClassLabel's names, or collected from integer labels in one pass that can also count the rows)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .embedded import embedded_digits_dir
from .splits import hold_out, limit
from .streaming import label_names, load_image_stream

logger = logging.getLogger(__name__)


@dataclass
class LabelledData:
    train: object  # the raw training stream
    image_column: str
    label_column: str
    validation: tuple | None  # (raw stream, image column, label column), or None: no evaluation
    id2label: dict[int, str]
    num_examples: int | None  # counted when asked for


def _source(args, embedded: bool, image_size: int) -> dict:
    if embedded:
        return {"train_dir": str(embedded_digits_dir(image_size=image_size))}
    return {"dataset_name": args.dataset_name, "dataset_config_name": args.dataset_config_name, "train_dir": args.train_dir}


def _is_missing_split(error: ValueError) -> bool:
    text = str(error)
    return "Bad split" in text or ("split" in text and "not found" in text) or "only split='train' exists" in text


def load_validation_stream(args, embedded: bool, image_size: int, label_column: str, load_kwargs: dict | None = None):
    """(stream, image column, label column) of --validation_dir or --validation_split, or None."""
    if args.validation_split.lower() == "none":
        return None
    kwargs = {"image_column_name": args.image_column_name, "label_column_name": label_column, "load_kwargs": load_kwargs}
    if args.validation_dir:
        try:
            return load_image_stream(train_dir=args.validation_dir, split=args.validation_split, **kwargs)
        except ValueError as error:  # a folder holding only validation data reads as one 'train' split
            if not _is_missing_split(error):
                raise
            return load_image_stream(train_dir=args.validation_dir, split="train", **kwargs)
    split = "validation" if embedded else args.validation_split
    try:
        return load_image_stream(**_source(args, embedded, image_size), split=split, **kwargs)
    except ValueError as error:
        if not _is_missing_split(error):
            raise
        logger.warning("no validation split %r (%s): no evaluation; give --validation_dir", args.validation_split, error)
        return None


def scan_labels(raw_stream, label_column: str, need_count: bool, need_labels: bool) -> tuple[int | None, list[int]]:
    """One pass over the label column: (number of rows or None, sorted distinct labels >= 0)."""
    if not (need_count or need_labels):
        return None, []
    logger.info(
        "one pass over the training labels to %s (pass --num_train_examples%s to skip it)",
        " and ".join(part for part, needed in (("count the examples", need_count), ("collect the classes", need_labels)) if needed),
        "" if need_labels else " or --max_train_steps and --num_warmup_steps",
    )
    count, seen = 0, set()
    for example in raw_stream.select_columns([label_column]):
        count += 1
        value = example[label_column]
        if need_labels and value is not None and int(value) >= 0:
            seen.add(int(value))
    return (count if need_count else None), sorted(seen)


def resolve_labels(train_raw, label_column: str, val_raw, need_count: bool) -> tuple[dict[int, str], int | None]:
    """id2label from the ClassLabel names, or collected from the integer labels (names = the ids)."""
    names = label_names(train_raw, label_column)
    count, seen = scan_labels(train_raw, label_column, need_count, need_labels=names is None)
    if names is None:
        if not seen:
            raise ValueError(f"the label column {label_column!r} of the training data holds no label >= 0")
        names = [str(index) for index in range(max(seen) + 1)]
        logger.info("labels collected from the training data: %d classes (ids 0..%d)", len(names), len(names) - 1)
    if val_raw is not None:
        val_names = label_names(val_raw[0], val_raw[2])
        if val_names is not None and val_names != names:
            raise ValueError(
                f"the validation labels {val_names[:10]} differ from the training labels {names[:10]}: "
                "ids would not match"
            )
    return dict(enumerate(names)), count


def load_labelled_data(args, embedded: bool, image_size: int, need_count: bool, load_kwargs: dict | None = None) -> LabelledData:
    """The training and validation streams of the classification flags (--dataset_name / --train_dir /
    --validation_dir / --*_split / --train_val_split / --max_*_samples / --*_column_name; `embedded`: the
    sample digits), and the label set. `load_kwargs` (token, cache_dir) go to `datasets`."""
    train, image_column, label_column = load_image_stream(
        **_source(args, embedded, image_size), split="train" if embedded else args.train_split,
        image_column_name=args.image_column_name, label_column_name=args.label_column_name, load_kwargs=load_kwargs,
    )
    if label_column is None:
        raise ValueError(
            f"the training data has no label column (none named label, labels or cls holding integers); "
            f"its columns are {train.column_names}. Pass one with --label_column_name."
        )
    held_out = getattr(args, "train_val_split", None)
    if held_out is not None:  # a fixed part of the training source instead of a validation split
        validation = (hold_out(train, image_column, held_out, validation=True), image_column, label_column)
        train = hold_out(train, image_column, held_out, validation=False)
    else:
        validation = load_validation_stream(args, embedded, image_size, label_column, load_kwargs)
    if validation is not None:
        validation = (limit(validation[0], getattr(args, "max_eval_samples", None)), *validation[1:])
    train = limit(train, getattr(args, "max_train_samples", None))
    id2label, count = resolve_labels(train, label_column, validation, need_count)
    return LabelledData(train, image_column, label_column, validation, id2label, count)


__all__ = ["LabelledData", "load_labelled_data", "load_validation_stream", "resolve_labels", "scan_labels"]
