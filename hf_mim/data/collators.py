"""Collators that make augmentation and masks a pure function of (seed, epoch, example_id).

Each example gets its own `torch.Generator`, seeded with blake2b(seed, epoch, example_id); it drives the
transform (crop, flip) and then the mask generator. Which worker, rank or batch position handles an
example does not matter, so resuming by skipping already-seen batches reproduces the remaining batches
exactly.

Batches hold only tensors (Accelerate's batch dispatching broadcasts tensors):

- `pixel_values` (B, 3, H, W) float32
- `bool_masked_pos` (B, N) bool            (PretrainingCollator with a mask generator)
- `labels` (B,) int64                      (when the examples carry "label")
- `example_id` (B,) int64
- `images_converted` (B,) int64: 1 where the example's image had to be converted to RGB
- `images_skipped` (B,) int64: bad images dropped just before this example in its worker's stream

The decode counters are per example (not 0-d) so that slicing a batch between processes (dispatching,
`split_batches`) keeps their sums right. Take them out before calling the model: `pop_decode_counts`.

`set_epoch` writes into a shared-memory tensor, so DataLoader workers, persistent ones included,
see the new epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

DECODE_COUNT_KEYS = ("images_converted", "images_skipped")
NON_MODEL_KEYS = ("example_id",) + DECODE_COUNT_KEYS


def example_seed(seed: int, epoch: int, example_id: int) -> int:
    """Non-negative 63-bit seed from (seed, epoch, example_id) via blake2b; identical in every process."""
    digest = hashlib.blake2b(f"hf_mim:{int(seed)}:{int(epoch)}:{int(example_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


def example_generator(seed: int, epoch: int, example_id: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(example_seed(seed, epoch, example_id))
    return generator


def pop_decode_counts(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the decode counters from `batch` and return their sums as 0-d tensors (no host sync)."""
    return {key: batch.pop(key).sum() for key in DECODE_COUNT_KEYS if key in batch}


class _SeededCollator:
    def __init__(self, transform: Callable[..., torch.Tensor], seed: int = 0):
        self.transform = transform
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def _check(self, examples: Sequence[dict[str, Any]]) -> None:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        for example in examples:
            if not isinstance(example.get("image"), Image.Image) or "example_id" not in example:
                raise TypeError(
                    "collator examples need a decoded PIL 'image' and an 'example_id' (build the stream with "
                    f"hf_mim.data.prepare_stream); got keys {sorted(example)}"
                )

    def _common(self, examples: Sequence[dict[str, Any]], pixel_values: list) -> dict[str, torch.Tensor]:
        """`pixel_values` holds one tensor per example, or a tuple of views per example (two-view
        methods): views after the first become `pixel_values_2`, `pixel_values_3`, ..."""
        if isinstance(pixel_values[0], (tuple, list)):
            batch = {
                ("pixel_values" if view == 0 else f"pixel_values_{view + 1}"): torch.stack(
                    [views[view] for views in pixel_values]
                ).to(torch.float32)
                for view in range(len(pixel_values[0]))
            }
        else:
            batch = {"pixel_values": torch.stack(pixel_values).to(torch.float32)}
        if all("label" in example for example in examples):
            batch["labels"] = torch.tensor([int(example["label"]) for example in examples], dtype=torch.int64)
        batch["example_id"] = torch.tensor([int(example["example_id"]) for example in examples], dtype=torch.int64)
        for key in DECODE_COUNT_KEYS:
            batch[key] = torch.tensor([int(example.get(key, 0)) for example in examples], dtype=torch.int64)
        return batch


class PretrainingCollator(_SeededCollator):
    """Transform + mask per example from one generator seeded by (seed, epoch, example_id).

    `mask_generator(generator)` must return a (num_patches,) bool tensor (hf_mim.masking generators do).
    """

    def __init__(
        self,
        transform: Callable[..., torch.Tensor],
        mask_generator: Callable[[torch.Generator], torch.Tensor] | None = None,
        seed: int = 0,
    ):
        super().__init__(transform, seed)
        self.mask_generator = mask_generator

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        self._check(examples)
        epoch = self.epoch
        pixel_values, masks = [], []
        for example in examples:
            generator = example_generator(self.seed, epoch, example["example_id"])
            pixel_values.append(self.transform(example["image"], generator))
            if self.mask_generator is not None:
                masks.append(self.mask_generator(generator).to(torch.bool))
        batch = self._common(examples, pixel_values)
        if masks:
            batch["bool_masked_pos"] = torch.stack(masks)
        return batch


class ClassificationCollator(_SeededCollator):
    """Labelled batches; a random train transform draws from the per-example generator, an eval
    transform (EvalTransform) ignores it. Every example must carry an integer "label"."""

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        self._check(examples)
        missing = [example["example_id"] for example in examples if "label" not in example]
        if missing:
            raise ValueError(
                f"ClassificationCollator needs a 'label' in every example (missing for example ids {missing[:5]}); "
                "pass label_column to prepare_stream"
            )
        epoch = self.epoch
        pixel_values = [
            self.transform(example["image"], example_generator(self.seed, epoch, example["example_id"]))
            for example in examples
        ]
        return self._common(examples, pixel_values)
