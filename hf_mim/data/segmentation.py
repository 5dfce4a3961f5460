"""Semantic-segmentation data: streams of (image, segmentation map) pairs, the ADE20K recipe's joint
augmentation, a seeded collator, and the embedded offline set (shapes drawn on textures).

Sources (`load_segmentation_data`): a Hub dataset or parquet files with an image column and a
segmentation-map column (the `scene_parse_150` layout: `image`, `annotation`), or a folder of pairs
`<dir>/images/<split>/<name>.jpg` + `<dir>/annotations/<split>/<name>.png` (ADEChallengeData2016's
layout; `<split>` may be absent). Maps are 8-bit class ids; 255 is ignored (padding). With
`reduce_labels` (scene_parse_150 / ADE20K: 0 = "other"), 0 becomes 255 and every other id drops by 1.

Augmentation (mmseg's ADE20K pipeline, as BEiT / MAE / dBOT fine-tune): resize to fit a random
multiple (ratio 0.5-2.0) of (4 x scale, scale) keeping the aspect, random crop (the crop with no class
over 75 % of its pixels, up to 10 tries), horizontal flip, photometric distortion, padding to the crop
(image 0, map 255). Image and map share every draw (maps with nearest neighbour), and every draw comes
from the collator's per-example generator, so a resumed run sees the same batches.
"""

from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as F

from .collators import _SeededCollator, example_generator
from .embedded import _build_once, _encode, _write_parquet, default_cache_dir
from .images import _raw_bytes_and_path, read_path_bytes
from .streaming import IMAGE_EXTENSIONS, _DecodeExamples, count_examples, load_image_stream
from .transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
MASK_COLUMN_CANDIDATES = ("annotation", "segmentation_map", "semantic_map", "mask", "seg", "label")
PAIR_SPLITS = {"train": ("training", "train"), "validation": ("validation", "val", "valid")}


# --------------------------------------------------------------------------------------------- maps


def decode_mask(value) -> Image.Image | None:
    """A segmentation map (PIL, {"bytes", "path"}, bytes or path) as a mode "L" image of class ids, or None.
    Palette maps keep their indices; 16-bit maps are refused above 255 (ids must fit 8 bits)."""
    try:
        if not isinstance(value, Image.Image):
            data, path = _raw_bytes_and_path(value)
            if data is None and path is not None:
                data = read_path_bytes(path)
            value = Image.open(io.BytesIO(data))
        value.load()
        if value.mode in ("L", "P"):
            return Image.fromarray(np.asarray(value, dtype=np.uint8))
        array = np.asarray(value)
        if array.ndim == 3:  # an RGB map of grey ids (R = G = B)
            array = array[..., 0]
        if array.max() > 255 or array.min() < 0:
            return None
        return Image.fromarray(array.astype(np.uint8))
    except Exception:  # noqa: BLE001 - a bad map drops its example, counted like a bad image
        return None


def reduce_labels(mask: np.ndarray) -> np.ndarray:
    """scene_parse_150 / ADE20K ids: 0 ("other") -> 255 (ignored), k -> k - 1, 255 stays 255."""
    mask = mask.astype(np.int64)
    out = np.where(mask == 0, IGNORE_INDEX, mask - 1)
    out[mask == IGNORE_INDEX] = IGNORE_INDEX
    return out


class DecodePairs(_DecodeExamples):
    """`prepare_stream`'s decoding map with a segmentation map: adds "mask" (mode "L", the image's size:
    a reduced-scale JPEG decode resizes its map with nearest neighbour). A bad map drops the example."""

    def __init__(self, *args, mask_column: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_column = mask_column

    def __call__(self, example: dict) -> dict:
        out = super().__call__(example)
        if out["image"] is None:
            return {**out, "mask": None}
        mask = decode_mask(example[self.mask_column])
        if mask is None:
            self._log_bad(example, f"undecodable segmentation map in column {self.mask_column!r}")
            self.pending_skipped = out["images_skipped"] + 1
            return {**out, "image": None, "example_id": -1, "mask": None, "images_skipped": 0}
        if mask.size != out["image"].size:
            mask = mask.resize(out["image"].size, Image.Resampling.NEAREST)
        return {**out, "mask": mask}


# --------------------------------------------------------------------------------------------- transforms


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _coin(generator: torch.Generator, p: float = 0.5) -> bool:
    return torch.rand((), generator=generator).item() < p


def fit_scale(size: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of `size` resized, keeping its aspect, to fit (long <= scale[0], short <= scale[1])
    (mmseg's `Resize(keep_ratio=True)`)."""
    width, height = size
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))


def photometric_distortion(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """mmseg `PhotoMetricDistortion` on a (3, H, W) float 0-255 tensor: brightness +-32, contrast
    0.5-1.5 (before or after the colour steps), saturation 0.5-1.5, hue +-18/180; each with p = 0.5."""
    if _coin(generator):
        pixels = (pixels + _uniform(generator, -32, 32)).clamp(0, 255)
    contrast_first = _coin(generator)

    def contrast(x):
        return (x * _uniform(generator, 0.5, 1.5)).clamp(0, 255) if _coin(generator) else x

    if contrast_first:
        pixels = contrast(pixels)
    if _coin(generator):
        pixels = F.adjust_saturation(pixels / 255, _uniform(generator, 0.5, 1.5)) * 255
    if _coin(generator):
        pixels = F.adjust_hue(pixels / 255, _uniform(generator, -18, 18) / 180) * 255
    if not contrast_first:
        pixels = contrast(pixels)
    return pixels


def _normalize(pixels: torch.Tensor) -> torch.Tensor:
    return F.normalize(pixels / 255.0, list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))


def _labels(mask: Image.Image, reduce: bool) -> torch.Tensor:
    array = np.asarray(mask, dtype=np.int64)
    return torch.from_numpy(reduce_labels(array) if reduce else array.copy())


def _pad(pixels: torch.Tensor, labels: torch.Tensor, height: int, width: int):
    """Bottom/right padding to (height, width): image 0 (after normalisation, as mmseg), map 255."""
    pad_h, pad_w = height - pixels.shape[-2], width - pixels.shape[-1]
    if pad_h or pad_w:
        pixels = torch.nn.functional.pad(pixels, (0, pad_w, 0, pad_h), value=0.0)
        labels = torch.nn.functional.pad(labels, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    return pixels, labels


class SegmentationTrainTransform:
    """The ADE20K recipe's joint augmentation (see the module docstring): `(image, mask, generator) ->
    (pixel_values (3, crop, crop), labels (crop, crop) int64)`."""

    def __init__(self, crop_size: int, scale: int | None = None, ratio_range=(0.5, 2.0), cat_max_ratio: float = 0.75,
                 photometric: bool = True, reduce_labels: bool = False):
        self.crop_size = crop_size
        self.scale = (4 * (scale or crop_size), scale or crop_size)
        self.ratio_range, self.cat_max_ratio = ratio_range, cat_max_ratio
        self.photometric, self.reduce_labels = photometric, reduce_labels

    def crop_box(self, labels: torch.Tensor, generator: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, height, width): a random crop; up to 10 draws for one where no class covers more
        than `cat_max_ratio` of the labelled pixels (mmseg `RandomCrop`)."""
        height, width = labels.shape
        crop_h, crop_w = min(self.crop_size, height), min(self.crop_size, width)
        for _ in range(10):
            top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
            left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
            window = labels[top:top + crop_h, left:left + crop_w]
            counts = torch.bincount(window[window != IGNORE_INDEX].flatten(), minlength=1)
            if self.cat_max_ratio >= 1 or (len(counts.nonzero()) > 1 and counts.max() / counts.sum() < self.cat_max_ratio):
                break
        return top, left, crop_h, crop_w

    def __call__(self, image: Image.Image, mask: Image.Image, generator: torch.Generator):
        ratio = _uniform(generator, *self.ratio_range)
        size = fit_scale(image.size, (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        labels = _labels(mask.resize(size, Image.Resampling.NEAREST), self.reduce_labels)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()
        top, left, crop_h, crop_w = self.crop_box(labels, generator)
        pixels = pixels[:, top:top + crop_h, left:left + crop_w]
        labels = labels[top:top + crop_h, left:left + crop_w]
        if _coin(generator):
            pixels, labels = pixels.flip(-1), labels.flip(-1)
        if self.photometric:
            pixels = photometric_distortion(pixels, generator)
        return _pad(_normalize(pixels), labels, self.crop_size, self.crop_size)


class SegmentationEvalTransform:
    """Evaluation: resize to fit (4 x scale, scale) keeping the aspect (map: nearest), normalise; no crop
    (sliding-window or whole-image inference covers the image)."""

    def __init__(self, scale: int, reduce_labels: bool = False):
        self.scale, self.reduce_labels = (4 * scale, scale), reduce_labels

    def __call__(self, image: Image.Image, mask: Image.Image, generator: torch.Generator | None = None):
        size = fit_scale(image.size, self.scale)
        pixels = torch.from_numpy(np.array(image.resize(size, Image.Resampling.BILINEAR), dtype=np.uint8))
        labels = _labels(mask.resize(size, Image.Resampling.NEAREST), self.reduce_labels)
        return _normalize(pixels.permute(2, 0, 1).float()), labels


class SegmentationCollator(_SeededCollator):
    """(image, mask) examples -> `pixel_values` (B, 3, H, W), `labels` (B, H, W) int64 (ignore 255),
    `example_id`, decode counters; examples of different sizes (evaluation) are padded to the largest."""

    def __call__(self, examples):
        self._check(examples)
        epoch = self.epoch
        pairs = [self.transform(e["image"], e["mask"], example_generator(self.seed, epoch, e["example_id"])) for e in examples]
        height = max(pixels.shape[-2] for pixels, _ in pairs)
        width = max(pixels.shape[-1] for pixels, _ in pairs)
        pairs = [_pad(pixels, labels, height, width) for pixels, labels in pairs]
        batch = self._common(examples, torch.stack([pixels for pixels, _ in pairs]))
        batch["labels"] = torch.stack([labels for _, labels in pairs])
        return batch


# --------------------------------------------------------------------------------------------- sources


def resolve_mask_column(ds, name: str | None) -> str:
    """The segmentation-map column: `name` if given (must exist), else the first of
    MASK_COLUMN_CANDIDATES holding images."""
    from datasets import Image as ImageFeature

    columns = list(ds.features or {}) or ds.column_names or []
    if name is not None:
        if name not in columns:
            raise ValueError(f"--segmentation_column_name {name!r} is not a column of the data; its columns: {columns}")
        return name
    features = ds.features or {}
    for candidate in MASK_COLUMN_CANDIDATES:
        if candidate in columns and (not features or isinstance(features[candidate], ImageFeature)):
            return candidate
    raise ValueError(f"no segmentation-map column (looked for {MASK_COLUMN_CANDIDATES}) in {columns}: "
                     "pass --segmentation_column_name")


def _pair_files(root: Path, split: str) -> tuple[list[str], Path, Path]:
    """(relative stems, image folder, map folder) of a folder of pairs for `split`."""
    images, annotations = root / "images", root / "annotations"
    for name in PAIR_SPLITS.get(split, (split,)):
        if (images / name).is_dir():
            images, annotations = images / name, annotations / name
            break
    else:
        if any(p.is_dir() for p in images.iterdir()) or split != "train":
            raise ValueError(f"no split {split!r} under {root}/images (looked for {PAIR_SPLITS.get(split, (split,))})")
    maps = {p.stem: p for p in annotations.glob("*.png")}
    stems = sorted(p.stem for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem in maps)
    if not stems:
        raise ValueError(f"no image with a map of the same name (<name>.png) in {annotations} for the images in {images}")
    return stems, images, annotations


def _generate_pairs(shards, images: str, annotations: str):
    for shard in shards:
        for stem, image_name in shard:
            yield {"image": {"path": f"{images}/{image_name}", "bytes": None},
                   "annotation": {"path": f"{annotations}/{stem}.png", "bytes": None}, "__key__": stem}


def pairs_folder_stream(root: Path, split: str, num_shards: int = 64):
    """A many-shard stream of a folder of (image, map) pairs: columns image, annotation, __key__."""
    from datasets import Features, IterableDataset, Value
    from datasets import Image as ImageFeature

    stems, images, annotations = _pair_files(root, split)
    names = {p.stem: p.name for p in images.iterdir() if p.stem in set(stems)}
    rows = [(stem, names[stem]) for stem in stems]
    random.Random(0).shuffle(rows)
    n = max(1, min(len(rows), num_shards))
    features = Features({"image": ImageFeature(decode=False), "annotation": ImageFeature(decode=False), "__key__": Value("string")})
    return IterableDataset.from_generator(_generate_pairs, features=features, gen_kwargs={
        "shards": [rows[k::n] for k in range(n)], "images": str(images), "annotations": str(annotations)})


def is_pairs_folder(path) -> bool:
    return path is not None and (Path(path) / "images").is_dir() and (Path(path) / "annotations").is_dir()


def load_pairs(source: dict, split: str, image_column: str | None, mask_column: str | None):
    """(stream, image column, map column) of a source: {"train_dir": ...} or {"dataset_name", "dataset_config_name"}."""
    from datasets import Image as ImageFeature

    if is_pairs_folder(source.get("train_dir")):
        return pairs_folder_stream(Path(source["train_dir"]), split), "image", "annotation"
    stream, image, _ = load_image_stream(**source, split=split, image_column_name=image_column)
    mask = resolve_mask_column(stream, mask_column)
    if mask == image:
        raise ValueError(f"the image and segmentation-map columns are both {image!r}: pass --image_column_name")
    return stream.cast_column(mask, ImageFeature(decode=False)), image, mask


def count_pairs(source: dict, split: str) -> int:
    if is_pairs_folder(source.get("train_dir")):
        return len(_pair_files(Path(source["train_dir"]), split)[0])
    return count_examples(**source, split=split)


# --------------------------------------------------------------------------------------------- embedded set

SEGMENTATION_VERSION = "v2"
EMBEDDED_SIZES = {"train": 800, "validation": 200}
EMBEDDED_SHAPES = ("disk", "square", "triangle", "cross")
EMBEDDED_ID2LABEL = {0: "background", **{index + 1: name for index, name in enumerate(EMBEDDED_SHAPES)}}


def _texture(rng: np.random.RandomState, size: int) -> np.ndarray:
    """A smooth random colour texture (sum of upsampled noise octaves), (size, size, 3) float 0-255."""
    out = np.zeros((size, size, 3))
    for cells, weight in ((2, 0.5), (4, 0.3), (8, 0.15), (size // 2, 0.05)):
        grid = Image.fromarray((rng.rand(cells, cells, 3) * 255).astype(np.uint8))
        out += weight * np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    return out


def shape_mask(name: str, side: int) -> np.ndarray:
    """A filled `name` shape in a side x side box, (side, side) bool: drawn at 4x and reduced, so small
    shapes keep their outline."""
    from PIL import ImageDraw

    big = side * 4
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    if name == "disk":
        draw.ellipse([0, 0, big - 1, big - 1], fill=255)
    elif name == "square":
        draw.rectangle([0, 0, big - 1, big - 1], fill=255)
    elif name == "triangle":
        draw.polygon([(big / 2, 0), (big - 1, big - 1), (0, big - 1)], fill=255)
    elif name == "cross":
        draw.rectangle([big * 0.35, 0, big * 0.65, big - 1], fill=255)
        draw.rectangle([0, big * 0.35, big - 1, big * 0.65], fill=255)
    else:
        raise ValueError(f"unknown shape {name!r}; expected one of {EMBEDDED_SHAPES}")
    return np.asarray(canvas.resize((side, side), Image.Resampling.BILINEAR)) > 127


def _compose(rng: np.random.RandomState, size: int):
    """One image and its exact map: 1-3 filled shapes (random kind, size 5/16-11/16 of the image, place and
    colour; later ones cover earlier ones) over a texture; class = index in EMBEDDED_SHAPES + 1."""
    image, mask = _texture(rng, size), np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randint(len(EMBEDDED_SHAPES))
        side = rng.randint(size * 5 // 16, size * 11 // 16 + 1)
        shape = shape_mask(EMBEDDED_SHAPES[kind], side)
        top, left = rng.randint(0, size - side + 1), rng.randint(0, size - side + 1)
        image[top:top + side, left:left + side][shape] = rng.rand(3) * 255
        mask[top:top + side, left:left + side][shape] = kind + 1
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)), Image.fromarray(mask)


def embedded_segmentation_dir(cache_dir=None, image_size: int = 64) -> Path:
    """`<dir>/train` (800 images, 4 parquet shards) and `<dir>/validation` (200): filled shapes (disk,
    square, triangle, cross) in random colours on random textures, lossless PNG, with exact maps
    (0 = background): columns `image`, `annotation`, `__key__`. Generated (nothing to download: the
    segmentation demo works offline with the base install), written once."""
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    target = Path(cache_dir or default_cache_dir()) / f"segmentation-{image_size}-{SEGMENTATION_VERSION}"

    def build(tmp: Path) -> None:
        features = Features({"image": ImageFeature(), "annotation": ImageFeature(), "__key__": Value("string")})
        for split, seed, shards in (("train", 5, 4), ("validation", 10, 1)):
            rng = np.random.RandomState(seed)
            pairs = [_compose(rng, image_size) for _ in range(EMBEDDED_SIZES[split])]
            (tmp / split).mkdir()
            for shard in range(shards):
                part = list(range(shard, len(pairs), shards))
                _write_parquet(tmp / split / f"{split}-{shard:05d}-of-{shards:05d}.parquet", {
                    "image": [{"bytes": _encode(pairs[i][0], "PNG"), "path": None} for i in part],
                    "annotation": [{"bytes": _encode(pairs[i][1], "PNG"), "path": None} for i in part],
                    "__key__": [f"{split}/{i:04d}" for i in part]}, features)
        (tmp / "id2label.json").write_text(json.dumps(EMBEDDED_ID2LABEL, indent=1))

    return _build_once(target, build)


# --------------------------------------------------------------------------------------------- the run's data


@dataclass
class SegmentationData:
    train: object
    image_column: str
    mask_column: str
    validation: tuple | None  # (raw stream, image column, map column) or None
    num_examples: int | None


def data_source(args, embedded: bool, image_size: int) -> dict:
    if embedded:
        return {"train_dir": str(embedded_segmentation_dir(image_size=image_size))}
    if args.dataset_name:
        return {"dataset_name": args.dataset_name, "dataset_config_name": args.dataset_config_name}
    return {"train_dir": args.train_dir}


def load_segmentation_data(args, embedded: bool, image_size: int, need_count: bool) -> SegmentationData:
    """Training and validation pairs of the flags (--dataset_name / --train_dir / --validation_dir,
    --*_split, --train_val_split, --max_train_samples / --max_eval_samples, --image_column_name,
    --segmentation_column_name), or the embedded set."""
    from .splits import hold_out, limit, training_examples

    source = data_source(args, embedded, image_size)
    split = "train" if embedded else args.train_split
    train, image, mask = load_pairs(source, split, args.image_column_name, args.segmentation_column_name)
    validation = None
    if args.train_val_split is not None:  # a fixed held-out part of the training source (by example id)
        validation = (limit(hold_out(train, image, args.train_val_split, validation=True), args.max_eval_samples), image, mask)
        train = hold_out(train, image, args.train_val_split, validation=False)
    elif args.validation_split.lower() != "none":
        val_source = {"train_dir": args.validation_dir} if args.validation_dir else source
        try:
            validation = load_pairs(val_source, "validation" if embedded else args.validation_split,
                                    args.image_column_name, args.segmentation_column_name)
        except ValueError as error:
            if "split" not in str(error).lower():
                raise
            logger.warning("no validation split %r (%s): no evaluation; give --validation_dir", args.validation_split, error)
    if validation is not None and args.train_val_split is None:
        validation = (limit(validation[0], args.max_eval_samples), *validation[1:])
    train = limit(train, args.max_train_samples)
    count = count_pairs(source, split) if need_count else None
    if count is not None and (args.train_val_split is not None or args.max_train_samples is not None):
        count = training_examples(args, count)
    return SegmentationData(train, image, mask, validation, count)


def load_id2label(args, embedded: bool) -> dict[int, str]:
    """The label set: the embedded one, `--id2label` (a JSON file or text {"0": "wall", ...}), or
    `--num_labels` (names = ids)."""
    if embedded and not (args.id2label or args.num_labels):
        return dict(EMBEDDED_ID2LABEL)
    if args.id2label:
        text = Path(args.id2label).read_text() if Path(args.id2label).is_file() else args.id2label
        try:
            table = json.loads(text)
            return {int(key): str(value) for key, value in sorted(table.items(), key=lambda kv: int(kv[0]))}
        except (ValueError, AttributeError):
            raise ValueError(f"--id2label must be a JSON file or JSON text {{\"0\": \"name\", ...}}; got {args.id2label[:80]!r}") from None
    if args.num_labels:
        return {index: str(index) for index in range(args.num_labels)}
    raise ValueError("give the label set: --num_labels N or --id2label <file.json> (scene_parse_150: --num_labels 150 --reduce_labels)")


__all__ = [
    "EMBEDDED_ID2LABEL", "IGNORE_INDEX", "DecodePairs", "SegmentationCollator", "SegmentationData",
    "SegmentationEvalTransform", "SegmentationTrainTransform", "decode_mask", "embedded_segmentation_dir",
    "fit_scale", "load_id2label", "load_segmentation_data", "pairs_folder_stream", "photometric_distortion",
    "reduce_labels", "resolve_mask_column",
]
