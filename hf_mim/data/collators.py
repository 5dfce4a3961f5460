"""Collators that make augmentation and masks a pure function of (seed, epoch, example_id).

Each example gets its own `torch.Generator`, seeded with blake2b(seed, epoch, example_id); it drives the
transform (crop, flip) and then the mask generator. Which worker, rank or batch position handles an
example does not matter, so resuming by skipping already-seen batches reproduces the remaining batches
exactly.

Batches hold only tensors (Accelerate's batch dispatching broadcasts tensors):

- `pixel_values` (B, 3, H, W): uint8 where the transform can batch its normalisation
  (`uint8_batches`, e.g. `MaskedImageTransform`), float32 otherwise. uint8 batches are turned into
  normalised float32 by `batch_to_device` on the accelerator, once per batch: the CPU workers do no
  float work and copy a quarter of the bytes (bitwise what torchvision's ToTensor + Normalize give)
- `bool_masked_pos` (B, N) bool            (PretrainingCollator with a mask generator)
- `crop_box` (B, 4) float64, `flipped` (B,) bool   (a mask generator that follows the crop, e.g. AMT's;
  `finish` then adds `bool_masked_pos`, `bool_thrown_pos` and `patch_attention` in the main process)
- `labels` (B,) int64                      (when the examples carry "label")
- `example_id` (B,) int64
- `images_converted` (B,) int64: 1 where the example's image had to be converted to RGB or decoded at
  reduced size to fit the pixel budget
- `images_skipped` (B,) int64: bad images dropped just before this example in its worker's stream
- `stream_position` (B, 2) int64: (DataLoader worker, raw record index in its pass), from `prepare_stream`:
  where the training loop's checkpoints resume the stream without decoding consumed records

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
POSITION_KEY = "stream_position"  # (worker, raw record index in that worker's pass) of each example (prepare_stream)
NON_MODEL_KEYS = ("example_id",) + DECODE_COUNT_KEYS + (POSITION_KEY,)
PIXEL_KEY = "pixel_values"  # and pixel_values_2, ... (two-view methods)


def example_seed(seed: int, epoch: int, example_id: int, stream: str = "") -> int:
    """Non-negative 63-bit seed from (seed, epoch, example_id[, stream]) via blake2b; identical in every
    process. `stream` names an independent random stream of the same example (e.g. "mask")."""
    text = f"hf_mim:{int(seed)}:{int(epoch)}:{int(example_id)}" + (f":{stream}" if stream else "")
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


def example_generator(seed: int, epoch: int, example_id: int, stream: str = "") -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(example_seed(seed, epoch, example_id, stream))
    return generator


def batch_to_device(batch: dict[str, torch.Tensor], device, collator=None) -> dict[str, torch.Tensor]:
    """`batch` on `device` (non-blocking copies, which pinned memory overlaps with compute), its uint8
    pixel entries normalised there into float32 by `collator.normalize_pixels`: ToTensor + Normalize
    once per batch on the accelerator rather than per image in the DataLoader workers."""
    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    normalize = getattr(collator, "normalize_pixels", None)
    if normalize is not None:
        return normalize(batch)
    if any(key.startswith(PIXEL_KEY) and value.dtype == torch.uint8 for key, value in batch.items()):
        raise ValueError(f"the batch holds uint8 pixels but {type(collator).__name__} cannot normalise them: "
                         "pass the hf_mim collator that made the batch")
    return batch


def pop_decode_counts(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the decode counters from `batch` and return their sums as 0-d tensors (no host sync)."""
    return {key: batch.pop(key).sum() for key in DECODE_COUNT_KEYS if key in batch}


class _SeededCollator:
    """`uint8_pixels=False`: normalised float32 pixels from the collator itself (no `batch_to_device`
    needed), at the cost of that float work in the workers."""

    def __init__(self, transform: Callable[..., torch.Tensor], seed: int = 0, uint8_pixels: bool = True):
        self.transform = transform
        self.seed = int(seed)
        self.uint8_pixels = bool(uint8_pixels)
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

    def _pixels(self, image, generator, with_params: bool = False) -> tuple[Any, torch.Tensor | None, bool | None]:
        """(pixels, crop box, flipped) of one example: uint8 pixels from a transform that batches its
        normalisation (`uint8_batches`, finished by `_normalized`), else the transform's output (with
        its crop box and flip when `with_params`)."""
        if getattr(self.transform, "uint8_batches", False):
            return self.transform.crop_flip(image, generator)
        if with_params:
            return self.transform.transform_with_params(image, generator)
        return self.transform(image, generator), None, None

    def _normalized(self, pixel_values: list) -> list | torch.Tensor:
        """The batch's uint8 pixels (see `_pixels`) stacked, left uint8 for `normalize_pixels` on the
        device, or (`uint8_pixels=False`) normalised here in one vectorised call."""
        if getattr(self.transform, "uint8_batches", False):
            stacked = torch.stack(pixel_values)
            return stacked if self.uint8_pixels else self.transform.normalize(stacked)
        return pixel_values

    def normalize_pixels(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`batch` with its uint8 pixel entries replaced by the transform's ToTensor + Normalize, on
        whatever device they are (see `batch_to_device`); float entries are left as they are."""
        for key, value in batch.items():
            if key.startswith(PIXEL_KEY) and value.dtype == torch.uint8:
                batch[key] = self.transform.normalize(value)
        return batch

    def _common(self, examples: Sequence[dict[str, Any]], pixel_values: list | torch.Tensor) -> dict[str, torch.Tensor]:
        """`pixel_values` is a (B, 3, H, W) tensor, or holds one tensor per example, or a tuple of views
        per example (two-view methods): views after the first become `pixel_values_2`, `pixel_values_3`, ..."""
        if isinstance(pixel_values, torch.Tensor):
            batch = {"pixel_values": pixel_values if pixel_values.dtype == torch.uint8 else pixel_values.to(torch.float32)}
        elif isinstance(pixel_values[0], (tuple, list)):
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
        if all(POSITION_KEY in example for example in examples):
            batch[POSITION_KEY] = torch.tensor([example[POSITION_KEY] for example in examples], dtype=torch.int64)
        return batch


class PretrainingCollator(_SeededCollator):
    """Transform + mask per example from one generator seeded by (seed, epoch, example_id).

    `mask_generator(generator)` must return a (num_patches,) bool tensor (hf_mim.masking generators do).

    A mask generator with `needs_crop_box = True` (AMT's) depends on state that changes during training
    (per-example attention maps). Its masks are not made here, in a DataLoader worker that holds a copy
    of that state, but by `finish(batch, epoch)` in the training process: the batch carries each crop
    box and flip, and the mask draws come from an independent per-example stream ("mask"), so masks
    are exact on resume whatever the number of workers.
    """

    def __init__(
        self,
        transform: Callable[..., torch.Tensor],
        mask_generator: Callable[[torch.Generator], torch.Tensor] | None = None,
        seed: int = 0,
        uint8_pixels: bool = True,
    ):
        super().__init__(transform, seed, uint8_pixels)
        self.mask_generator = mask_generator
        self.masks_in_finish = bool(getattr(mask_generator, "needs_crop_box", False))

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        self._check(examples)
        epoch = self.epoch
        pixel_values, masks, crop_boxes, flips = [], [], [], []
        for example in examples:
            generator = example_generator(self.seed, epoch, example["example_id"])
            tensor, crop_box, flipped = self._pixels(example["image"], generator, with_params=self.masks_in_finish)
            pixel_values.append(tensor)
            if self.masks_in_finish:
                crop_boxes.append(crop_box)
                flips.append(flipped)
            elif self.mask_generator is not None:
                masks.append(self.mask_generator(generator).to(torch.bool))
        batch = self._common(examples, self._normalized(pixel_values))
        if masks:
            batch["bool_masked_pos"] = torch.stack(masks)
        if self.masks_in_finish:
            batch["crop_box"] = torch.stack(crop_boxes)
            batch["flipped"] = torch.tensor(flips, dtype=torch.bool)
        return batch

    def __getstate__(self) -> dict:
        """DataLoader workers get a copy without a deferred mask generator: its per-example store can be
        large (~0.5 GB for ImageNet) and workers never read it."""
        state = self.__dict__.copy()
        if self.masks_in_finish:
            state["mask_generator"] = None
        return state

    def finish(self, batch: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        """Main-process step after the DataLoader: masks that follow the crop (see the class docstring).
        A no-op for ordinary mask generators."""
        if not self.masks_in_finish:
            return batch
        example_ids = batch["example_id"].tolist()
        noise = torch.cat(
            [
                torch.rand(1, self.mask_generator.num_units, generator=example_generator(self.seed, epoch, example_id, stream="mask"))
                for example_id in example_ids
            ]
        )
        masks, weights = self.mask_generator.draw(noise, example_ids, batch.pop("crop_box"), batch.pop("flipped"))
        batch["bool_masked_pos"] = masks.bool_masked_pos
        batch["bool_thrown_pos"] = masks.bool_thrown_pos
        # the attention weights behind the masks (zeros before the first refresh), for pictures
        batch["patch_attention"] = (
            weights if weights is not None else torch.zeros(masks.bool_masked_pos.shape)
        ).to(torch.float32)
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
            self._pixels(example["image"], example_generator(self.seed, epoch, example["example_id"]))[0]
            for example in examples
        ]
        return self._common(examples, self._normalized(pixel_values))
