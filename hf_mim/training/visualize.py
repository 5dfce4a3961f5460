"""Pictures of what a MIM model does, saved with the training outputs (tooling zone, PIL only).

One row per image: the input, the input with the masked patches greyed out, the per-patch loss
as a heat map (feature-distillation methods such as dBOT), the reconstruction (pixel methods), and
the reconstruction pasted into the visible patches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_uint8_images(pixel_values: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """(B, 3, H, W) normalised tensors -> (B, H, W, 3) uint8."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    images = pixel_values.detach().float().cpu() * std_t + mean_t
    return (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def patch_mask_to_pixels(patch_values: torch.Tensor, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """(B, h*w) per-patch values -> (B, h*p, w*p) arrays (each patch filled with its value)."""
    values = patch_values.detach().float().cpu().reshape(-1, *grid).numpy()
    return values.repeat(patch_size, axis=1).repeat(patch_size, axis=2)


# Outline colours of the kinds of patch (patch_labels): visible green, masked white, thrown blue.
PATCH_LABEL_COLOURS = {0: np.array([40, 200, 80]), 1: np.array([255, 255, 255]), 2: np.array([40, 40, 160])}


def patch_outline(height: int, width: int, patch_size: int) -> np.ndarray:
    """(H, W) bool: the one-pixel border of every patch."""
    rows = np.arange(height) % patch_size
    cols = np.arange(width) % patch_size
    row_edge = (rows == 0) | (rows == patch_size - 1)
    col_edge = (cols == 0) | (cols == patch_size - 1)
    return row_edge[:, None] | col_edge[None, :]


def heat_map(values: np.ndarray) -> np.ndarray:
    """(H, W) floats -> (H, W, 3) uint8, black -> red -> yellow -> white (0 = lowest of this image)."""
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    red = np.clip(scaled * 3, 0, 1)
    green = np.clip(scaled * 3 - 1, 0, 1)
    blue = np.clip(scaled * 3 - 2, 0, 1)
    return (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)


def save_mim_picture(
    path: str | Path,
    pixel_values: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    patch_size: int,
    patch_loss: torch.Tensor | None = None,
    reconstruction: torch.Tensor | None = None,
    patch_scores: torch.Tensor | None = None,
    patch_labels: torch.Tensor | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    max_images: int = 4,
) -> Path:
    """Save a PNG grid; returns the path. Columns depend on what is given:
    input | masked input | [per-patch loss] | [patch scores, e.g. an attention map] | [reconstruction,
    reconstruction + visible]. `patch_labels` (B, N) ints (0 visible, 1 masked, 2 thrown) paint thrown
    patches blue in the masked-input column and outline every patch of the scores column in the colour
    of its kind (AMT: the attention map with the masked / thrown / visible patches).
    """
    if bool_masked_pos.ndim == 3:  # several masks per image (ExtreMA): show the first
        bool_masked_pos = bool_masked_pos[:, 0]
    count = min(max_images, pixel_values.shape[0])
    height, width = pixel_values.shape[-2:]
    grid = (height // patch_size, width // patch_size)
    images = to_uint8_images(pixel_values[:count], mean, std)
    masked = patch_mask_to_pixels(bool_masked_pos[:count].float(), grid, patch_size) > 0.5
    columns: list[tuple[str, np.ndarray]] = [("input", images)]
    masked_input = images.copy()
    masked_input[masked] = (masked_input[masked] * 0.25 + 96).astype(np.uint8)
    if patch_labels is not None:
        labels = patch_mask_to_pixels(patch_labels[:count].float(), grid, patch_size)
        masked_input[labels == 2] = PATCH_LABEL_COLOURS[2]
    columns.append(("masked", masked_input))
    if patch_loss is not None:
        loss_pixels = patch_mask_to_pixels(patch_loss[:count], grid, patch_size)
        columns.append(("patch loss", np.stack([heat_map(p) for p in loss_pixels])))
    if patch_scores is not None:
        score_pixels = patch_mask_to_pixels(patch_scores[:count], grid, patch_size)
        scores = np.stack([heat_map(p) for p in score_pixels])
        if patch_labels is not None:  # outline each patch in the colour of its kind
            labels = patch_mask_to_pixels(patch_labels[:count].float(), grid, patch_size)
            outline = patch_outline(height, width, patch_size)[None] & np.ones_like(labels, dtype=bool)
            for value, colour in PATCH_LABEL_COLOURS.items():
                scores[outline & (labels == value)] = colour
        columns.append(("attention" if patch_labels is not None else "scores", scores))
    if reconstruction is not None:
        recon = to_uint8_images(reconstruction[:count], mean, std)
        columns.append(("reconstruction", recon))
        pasted = images.copy()
        pasted[masked] = recon[masked]
        columns.append(("recon + visible", pasted))

    label_height = 14
    canvas = Image.new("RGB", (len(columns) * (width + 4), count * (height + 4) + label_height), "white")
    draw = ImageDraw.Draw(canvas)
    for col, (title, stack) in enumerate(columns):
        draw.text((col * (width + 4) + 2, 1), title, fill="black")
        for row in range(count):
            canvas.paste(Image.fromarray(stack[row]), (col * (width + 4), label_height + row * (height + 4)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def log_pictures(accelerator, pictures: dict[str, str | Path | Image.Image], step: int) -> None:
    """Send pictures (PNG paths or PIL images) to every tracker of `accelerator` that takes images
    (tensorboard as NHWC uint8 batches, wandb and the others as lists of images), beside the files."""
    images = {name: Image.open(p).convert("RGB") if isinstance(p, (str, Path)) else p.convert("RGB") for name, p in pictures.items()}
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: np.asarray(image)[None] for name, image in images.items()}, step=step, dataformats="NHWC")
        elif callable(getattr(tracker, "log_images", None)):
            tracker.log_images({name: [image] for name, image in images.items()}, step=step)
