"""Pictures of what a MIM model does, saved with the training outputs (tooling zone, PIL only).

One row per image: the input, the input with the masked patches greyed out, the per-patch loss
as a heat map (feature-distillation methods such as dBOT), the reconstruction (pixel methods), and
the reconstruction pasted into the visible patches.
"""

from __future__ import annotations

import contextlib
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


# ------------------------------------------------------------------ pictures of any saved checkpoint


def centred_view_transform(image_size):
    """The deterministic view the pictures show: the largest centred crop with the model's aspect, resized
    (bicubic, uint8 as training's transform), never flipped. Built on the training transform, so the
    crop box it reports lets AMT's masks follow their attention map as in training."""
    from ..data import MaskedImageTransform

    class CentredView(MaskedImageTransform):
        def get_params(self, image, generator=None):
            width, height = image.size
            out_height, out_width = self.size
            crop_height = min(height, round(width * out_height / out_width))
            crop_width = min(width, round(height * out_width / out_height))
            return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width

    return CentredView(image_size, hflip=False)


def list_images(images) -> list[Path]:
    """The image files of `images` (files, or folders searched recursively for image extensions, sorted)."""
    from ..data.streaming import IMAGE_EXTENSIONS
    from .run_setup import UserInputError

    paths: list[Path] = []
    for item in [images] if isinstance(images, (str, Path)) else list(images):
        item = Path(item).expanduser()
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise UserInputError(f"--images {item}: the folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise UserInputError(f"--images {item}: no such file or folder")
    if not paths:
        raise UserInputError("--images: no images given")
    return paths


@contextlib.contextmanager
def quiet_transformers():
    """No load report table and no progress bar from transformers while loading (restored after)."""
    from transformers.utils import logging as transformers_logging

    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def load_pretraining_checkpoint(model_name_or_path: str, mask_ratio: float | None = None, **hub_kwargs):
    """The `...ForMaskedImageModeling` of a folder or Hub id (run_mim's output, a converted pretraining
    checkpoint), in eval mode; one-line errors for anything else (a classifier folder lacks the decoder,
    teacher or predictor the pictures need)."""
    from transformers import AutoModelForMaskedImageModeling

    from .run_setup import UserInputError, check_local_path

    check_local_path("--model_name_or_path", model_name_or_path)
    overrides = {} if mask_ratio is None else {"mask_ratio": mask_ratio}
    try:
        with quiet_transformers():  # missing tensors are reported below, in one line
            model, loading = AutoModelForMaskedImageModeling.from_pretrained(
                model_name_or_path, output_loading_info=True, **hub_kwargs, **overrides
            )
    except ValueError as error:  # e.g. a config that is not an hf_mim method
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(f"--model_name_or_path {model_name_or_path}: not an hf_mim pretraining checkpoint ({first})") from error
    missing = loading["missing_keys"]
    if missing:
        parts = sorted({".".join(key.split(".")[:2]) for key in missing})
        raise UserInputError(
            f"--model_name_or_path {model_name_or_path} lacks {len(missing)} tensors of {type(model).__name__} "
            f"({', '.join(parts[:4])}{' ...' if len(parts) > 4 else ''}): pictures need a pretraining checkpoint "
            "(the folder run_mim.py saves, or a converted pretraining file), not a classifier or backbone"
        )
    return model.eval()


def read_picture_input(path: Path):
    """(RGB PIL image, stable example id from its bytes), or a one-line error naming the file."""
    from ..data import decode_image, example_id
    from .run_setup import UserInputError

    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserInputError(f"--images {path}: cannot read the file ({error.strerror or error})") from error
    image = decode_image(data, min_size=1)  # over hf_mim.data's pixel budget: a JPEG at reduced scale, else refused
    if image is None:
        raise UserInputError(f"--images {path}: not a readable image (undecodable, truncated or too large)")
    return image, example_id({"image": {"bytes": data, "path": None}}, "image")


def visualize_checkpoint(
    model_name_or_path: str | Path,
    images,
    output_dir: str | Path,
    seed: int = 0,
    mask_ratio: float | None = None,
    device: str | None = None,
    **hub_kwargs,
) -> list[Path]:
    """One PNG per image in `output_dir` (`<image stem>.png`) of what the pretraining checkpoint does
    (`save_mim_picture`: input, masked input, per-patch loss / attention / reconstruction, as that method
    shows). Each image is seen whole (centred crop, no flip) and masked by the model's own mask generator
    from a generator seeded by (seed, the image's content): the same picture on every run. AMT first reads
    each image's attention map as its refresh pass does, so its masks are the attention-guided ones.
    `mask_ratio` overrides the config's; `hub_kwargs` (revision, token, cache_dir) go to from_pretrained.
    Returns the written paths."""
    from ..data import PretrainingCollator, ResizeTransform, batch_to_device
    from .attention_refresh import AttentionMapStore
    from .pretraining import save_mim_picture_of

    paths = list_images(images)
    inputs = [read_picture_input(path) for path in paths]  # every file checked before the model loads
    model = load_pretraining_checkpoint(str(model_name_or_path), mask_ratio, **hub_kwargs)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    size = model.config.image_size
    store = None
    if model.uses_attention_maps:  # AMT: the maps its masks are drawn from, as the refresh pass computes them
        store = AttentionMapStore()
        whole = ResizeTransform(size)
        for image, identity in inputs:
            scores = model.attention_scores(whole(image)[None].to(device))
            store.update(torch.tensor([identity]), scores.cpu())
    collator = PretrainingCollator(centred_view_transform(size), mask_generator=model.mask_generator(attention_maps=store), seed=seed)
    output_dir = Path(output_dir)
    written, names = [], set()
    for path, (image, identity) in zip(paths, inputs):
        name = path.stem if path.stem not in names else f"{path.stem}-{len(names)}"
        names.add(name)
        batch = collator.finish(collator([{"image": image, "example_id": identity}]), 0)
        batch = batch_to_device(batch, device, collator)
        written.append(save_mim_picture_of(model, batch, output_dir / f"{name}.png"))
    return written
