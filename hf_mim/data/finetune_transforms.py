"""Fine-tuning augmentation from timm (RandAugment, RandomErasing, Mixup/CutMix), made a pure function
of the per-example generator or of (seed, step) so that a resumed run reproduces the interrupted one."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from .transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, MaskedImageTransform


class SeededTimmTransform:
    """A timm transform (which draws from python `random`, numpy and torch's global RNGs) made a pure
    function of the per-example generator the collator passes: all three RNGs are seeded from it and
    restored afterwards, so nothing else in the process sees a difference."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None:
            return self.transform(image)
        seed = generator.initial_seed()
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % (2**32))
                return self.transform(image)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


@contextlib.contextmanager
def seeded_numpy(seed: int):
    """numpy's global RNG seeded with `seed` inside, restored afterwards (timm's Mixup draws from it)."""
    state = np.random.get_state()
    np.random.seed(seed % (2**32))
    try:
        yield
    finally:
        np.random.set_state(state)


def finetune_train_transform(image_size: int, randaug: str, reprob: float, scale: tuple[float, float] = (0.08, 1.0),
                             hflip: float = 0.5):
    """timm's `create_transform(is_training=True)` as MAE fine-tunes (RandomResizedCrop `scale` bicubic, flip
    with probability `hflip`, RandAugment `randaug`, no colour jitter, RandomErasing 'pixel' with probability
    `reprob`) when RandAugment or RandomErasing is on; otherwise hf_mim's seeded RandomResizedCrop(`scale`,
    bicubic) + flip (MAE's linear probe; the flip is on or off: 0 < hflip < 1 needs timm's transform)."""
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"--scale must satisfy 0 < MIN <= MAX <= 1, got {scale[0]} {scale[1]}")
    if not 0 <= hflip <= 1:
        raise ValueError(f"--hflip must be a probability in [0, 1], got {hflip}")
    randaug = None if randaug.lower() == "none" else randaug
    if randaug is None and reprob <= 0 and hflip in (0.0, 0.5):
        return MaskedImageTransform(image_size, scale=tuple(scale), interpolation="bicubic", hflip=hflip > 0)
    from timm.data import create_transform

    transform = create_transform(
        input_size=image_size,
        is_training=True,
        scale=tuple(scale),
        hflip=hflip,
        color_jitter=None,
        auto_augment=randaug,
        interpolation="bicubic",
        re_prob=reprob,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
    return SeededTimmTransform(fix_posterize(transform))


def posterize_zero_bits_black(image, bits_to_keep, **kwargs):
    """timm's posterize, with 0 bits giving a black image as Pillow < 13 did (Pillow 13 raises)."""
    if bits_to_keep < 1:
        from PIL import Image

        return Image.new(image.mode, image.size)
    from timm.data import auto_augment

    return auto_augment.posterize(image, bits_to_keep, **kwargs)


def fix_posterize(transform):
    """RandAugment's 'PosterizeIncreasing' keeps 4 - int(4 * m / 10) bits, i.e. 0 bits at magnitude 10,
    which 'mstd0.5' noise around m9 reaches: Pillow 13 raises there ("bits must be between or equal to 1
    and 8") where older Pillow, which MAE/dBOT trained with, returned a black image. Give this
    transform's posterize ops that behaviour back (the timm module itself is left alone)."""
    from timm.data import auto_augment

    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = posterize_zero_bits_black
    return transform


class SeededMixup:
    """timm's Mixup/CutMix with label smoothing, drawing from numpy seeded by (seed, mix id): a pure
    function of the step, micro step and rank, so exact on resume."""

    def __init__(self, seed: int, num_classes: int, mixup: float, cutmix: float, prob: float, switch_prob: float,
                 mode: str, label_smoothing: float):
        from timm.data import Mixup

        self.seed = seed
        self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob, mode=mode,
                           label_smoothing=label_smoothing, num_classes=num_classes)

    def __call__(self, pixel_values: torch.Tensor, targets: torch.Tensor, mix_id: int):
        from .collators import example_seed

        with seeded_numpy(example_seed(self.seed, -1, mix_id)):
            return self.mixup(pixel_values, targets)


__all__ = ["SeededMixup", "SeededTimmTransform", "finetune_train_transform", "fix_posterize",
           "posterize_zero_bits_black", "seeded_numpy"]
