"""Data layer (tooling zone): robust decoding, streaming datasets, seeded transforms and collators,
and the embedded offline sample data.

    ds, image_col, label_col = load_image_stream(train_dir=embedded_pretraining_dir())
    ds = prepare_stream(ds, image_col, seed=seed, buffer_size=1000, rank=rank, world_size=world_size)
    collator = PretrainingCollator(MaskedImageTransform(224), RandomMaskGenerator(14, 0.75), seed=seed)
    loader = make_dataloader(ds, collator, batch_size=64, num_workers=4)
    for epoch in ...: ds.set_epoch(epoch); collator.set_epoch(epoch); for batch in loader: ...
        batch = batch_to_device(batch, device, collator)  # uint8 pixels normalised on the device
"""

from .collators import (
    DECODE_COUNT_KEYS,
    NON_MODEL_KEYS,
    ClassificationCollator,
    PretrainingCollator,
    batch_to_device,
    example_generator,
    example_seed,
    pop_decode_counts,
)
from .embedded import default_cache_dir, embedded_digits_dir, embedded_mnist_dir, embedded_pretraining_dir
from .images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DecodeStats,
    check_max_pixels,
    decode_image,
    decode_image_with_status,
    example_id,
    max_pixels_argument,
)
from .labels import LabelledData, load_labelled_data
from .streaming import (
    count_examples,
    label_names,
    load_image_stream,
    make_dataloader,
    prepare_stream,
    resolve_image_column,
    resolve_label_column,
)
from .transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    EvalTransform,
    MaskedImageTransform,
    ResizeTransform,
    TwoViewTransform,
    random_resized_crop_params,
)

__all__ = [
    "DECODE_COUNT_KEYS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "NON_MODEL_KEYS",
    "ClassificationCollator",
    "DecodeStats",
    "EvalTransform",
    "MaskedImageTransform",
    "ResizeTransform",
    "TwoViewTransform",
    "PretrainingCollator",
    "batch_to_device",
    "check_max_pixels",
    "count_examples",
    "decode_image",
    "decode_image_with_status",
    "default_cache_dir",
    "embedded_digits_dir",
    "embedded_mnist_dir",
    "embedded_pretraining_dir",
    "example_generator",
    "example_id",
    "example_seed",
    "LabelledData",
    "label_names",
    "load_labelled_data",
    "load_image_stream",
    "make_dataloader",
    "max_pixels_argument",
    "pop_decode_counts",
    "prepare_stream",
    "random_resized_crop_params",
    "resolve_image_column",
    "resolve_label_column",
]
