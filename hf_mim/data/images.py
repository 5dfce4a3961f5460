"""Robust image decoding and stable example ids.

`decode_image` turns whatever a dataset hands us (a PIL image, the `{"bytes", "path"}` dict that
`datasets.Image(decode=False)` yields, raw bytes, a path) into an 8-bit RGB `PIL.Image.Image`, or
returns None and says why. It never raises for bad image data: a training run over millions of web
images must not die on one truncated JPEG.

Mode conversions (an image in any mode other than RGB counts as "converted"):

- L, 1, CMYK, YCbCr, LAB, HSV and P without transparency: `Image.convert("RGB")`.
- Anything with alpha (RGBA, RGBa, LA, La, PA, and P/L/RGB with a `transparency` entry) is composited
  on a WHITE background, not just stripped of alpha: transparent pixels often hold arbitrary colour
  (commonly black), and white is what a viewer shows.
- 16-bit (I;16, I;16L, I;16B, I;16N) is scaled to 8 bits with round(v * 255 / 65535) (= v / 257), so
  65535 -> 255; it is not clipped. Mode I (32-bit int; Pillow opens some 16-bit PNG/TIFF files this way)
  is read the same way when its values lie in [0, 65535], otherwise min-max normalised. Mode F is
  taken as [0, 1] when it lies there, otherwise min-max normalised.

Bounded decoding: an image file declares its size in its header, and decoding allocates that much
whatever the file's size (a 13000 x 13000 PNG of 160 KB decodes to ~0.5 GB). The header is read
first; an image over `max_pixels` (default `DEFAULT_MAX_IMAGE_PIXELS`, ~120 MB as RGB) is never decoded
in full: a JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (`Image.draft`, status "reduced") when
that fits the budget, anything else is skipped and counted ("too_large"). Pillow's own
DecompressionBombError (over twice `Image.MAX_IMAGE_PIXELS`) also counts as too_large. MIM crops are
resized to ~224 pixels, so a reduced decode loses nothing a model sees.

EXIF orientation is applied as `datasets.Image` does (`ImageOps.exif_transpose`), so phone photos
come out upright.

Truncated files are rejected: decoding calls `.load()` inside a try with Pillow's
`ImageFile.LOAD_TRUNCATED_IMAGES` left False (this module never changes it; if some other library has
set it True, a warning is logged once, since truncation then goes unnoticed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import warnings
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

logger = logging.getLogger(__name__)

MAX_ID = (1 << 63) - 1

# Status strings returned by `decode_image_with_status`.
OK = "ok"
CONVERTED = "converted"
UNDECODABLE = "undecodable"
TRUNCATED = "truncated"
TOO_SMALL = "too_small"
REDUCED = "reduced"
TOO_LARGE = "too_large"

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # ~120 MB as 8-bit RGB; Pillow's own warning starts at ~89 M
_DRAFT_SCALES = (2, 4, 8)  # the reductions libjpeg decodes directly

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I;16S"}
_warned_load_truncated = False


@dataclasses.dataclass
class DecodeStats:
    """Counts of what `decode_image` did. Mergeable (`merge`, `+`), loggable (`as_dict`)."""

    ok: int = 0
    converted: int = 0
    reduced: int = 0
    skipped_undecodable: int = 0
    skipped_truncated: int = 0
    skipped_too_small: int = 0
    skipped_too_large: int = 0

    def record(self, status: str) -> None:
        if status == OK:
            self.ok += 1
        elif status == CONVERTED:
            self.converted += 1
        elif status == REDUCED:
            self.reduced += 1
        elif status == UNDECODABLE:
            self.skipped_undecodable += 1
        elif status == TRUNCATED:
            self.skipped_truncated += 1
        elif status == TOO_SMALL:
            self.skipped_too_small += 1
        elif status == TOO_LARGE:
            self.skipped_too_large += 1
        else:
            raise ValueError(f"unknown decode status {status!r}")

    @property
    def kept(self) -> int:
        return self.ok + self.converted + self.reduced

    @property
    def skipped(self) -> int:
        return self.skipped_undecodable + self.skipped_truncated + self.skipped_too_small + self.skipped_too_large

    @property
    def total(self) -> int:
        return self.kept + self.skipped

    def merge(self, other: DecodeStats) -> DecodeStats:
        """Add `other`'s counts into this object (in place) and return it."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        return self

    def __add__(self, other: DecodeStats) -> DecodeStats:
        return dataclasses.replace(self).merge(other)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _is_remote(path: str) -> bool:
    return "://" in path or "::" in path


def read_path_bytes(path: str | os.PathLike) -> bytes:
    """Bytes of a local file, or of a remote/chained URL (hf://, zip://...::) through datasets' xopen."""
    path = os.fspath(path)
    if _is_remote(path):
        from datasets.utils.file_utils import xopen

        with xopen(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _raw_bytes_and_path(value: Any) -> tuple[bytes | None, str | None]:
    """(bytes, path) of a dataset image value without decoding; either may be None."""
    if isinstance(value, dict):
        data = value.get("bytes")
        path = value.get("path")
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        return (data if isinstance(data, bytes) and data else None), (str(path) if path else None)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, (str, os.PathLike)):
        return None, os.fspath(value)
    return None, None


def _scale_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    array = array.astype(np.float64)
    if mode in _SIXTEEN_BIT_MODES:
        array = array / 257.0
    elif mode == "I" and array.size and array.min() >= 0 and array.max() <= 65535:
        array = array / 257.0
    elif mode == "F" and array.size and array.min() >= 0 and array.max() <= 1:
        array = array * 255.0
    else:
        finite = np.isfinite(array)
        array = np.where(finite, array, 0.0)
        low, high = (array[finite].min(), array[finite].max()) if finite.any() else (0.0, 0.0)
        array = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """(RGB image, whether a conversion was needed)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image, False
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        gray = Image.fromarray(_scale_to_uint8(np.asarray(image), mode), mode="L")
        return gray.convert("RGB"), True
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), True
    return image.convert("RGB"), True


def _classify_error(error: BaseException) -> str:
    if isinstance(error, Image.DecompressionBombError):
        return TOO_LARGE
    message = str(error).lower()
    if "truncat" in message or isinstance(error, EOFError):
        return TRUNCATED
    return UNDECODABLE


def _check_truncation_setting() -> None:
    global _warned_load_truncated
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_load_truncated:
        _warned_load_truncated = True
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by another library?): truncated images "
            "cannot be detected and will be decoded with missing pixels."
        )


def check_max_pixels(max_pixels: int | None, name: str = "max_image_pixels") -> int | None:
    """`max_pixels` if it is None or a positive integer, else a ValueError naming `name`."""
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"{name} must be a positive integer (a number of pixels), got {max_pixels!r}")
    return max_pixels


def max_pixels_argument(text: str) -> int | None:
    """argparse `type` of the scripts' --max_image_pixels: a positive integer, or 'none' (no budget)."""
    import argparse

    if text.strip().lower() == "none":
        return None
    try:
        return check_max_pixels(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer (a number of pixels) or 'none', got {text!r}") from None


def _plan_decode(image: Image.Image, max_pixels: int | None, min_side: int | None) -> str:
    """Before any pixel is decoded: OK, REDUCED (a JPEG set up to decode at the smallest 1/2, 1/4, 1/8
    scale under `max_pixels`) or TOO_LARGE, from the header's size. A JPEG whose shorter side stays
    >= `min_side` at a larger reduction is decoded at that one instead (speed; status unchanged)."""
    width, height = image.size
    is_jpeg = image.format in ("JPEG", "MPO") and not getattr(image, "decoderconfig", ())

    def reduced(scale: int) -> tuple[int, int]:
        return -(-width // scale), -(-height // scale)

    need = 1  # the smallest reduction that fits the budget
    if max_pixels is not None and width * height > max_pixels:
        fitting = [s for s in _DRAFT_SCALES if is_jpeg and reduced(s)[0] * reduced(s)[1] <= max_pixels]
        if not fitting:
            return TOO_LARGE
        need = fitting[0]
    allow = max([s for s in _DRAFT_SCALES if is_jpeg and min_side and min(reduced(s)) >= min_side], default=1)
    scale = max(need, allow)
    if scale > 1:  # floor sizes: Pillow picks the largest scale s with size // request >= s
        image.draft(None, (max(1, width // scale), max(1, height // scale)))
        if max_pixels is not None and image.size[0] * image.size[1] > max_pixels:
            return TOO_LARGE
    return REDUCED if need > 1 else OK


def _apply_exif_orientation(image: Image.Image) -> None:
    """Turn the image upright in place as `datasets.Image.decode_example` does; no copy when upright."""
    orientation = image.getexif().get(ExifTags.Base.Orientation)
    if orientation not in (None, 1):
        ImageOps.exif_transpose(image, in_place=True)


def decode_image_with_status(
    value: Any,
    min_size: int = 8,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    decode_min_side: int | None = None,
) -> tuple[Image.Image | None, str]:
    """(RGB image or None, status) where status is one of ok / converted / reduced / undecodable /
    truncated / too_small / too_large. `max_pixels=None` lifts the pixel budget (Pillow's own
    `Image.MAX_IMAGE_PIXELS` check still applies). `decode_min_side`: a JPEG whose shorter side is at
    least 2x this is decoded at the largest reduction that keeps it >= this (a speed-up when the
    consumer needs no more pixels, e.g. `MaskedImageTransform.min_decode_side`; status unchanged)."""
    _check_truncation_setting()
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, np.ndarray):
            image = Image.fromarray(value)
        else:
            data, path = _raw_bytes_and_path(value)
            if data is None:
                if path is None:
                    return None, UNDECODABLE
                data = read_path_bytes(path)
            image = Image.open(io.BytesIO(data))  # reads the header only
        budget = _plan_decode(image, max_pixels, decode_min_side)
        if budget == TOO_LARGE:
            return None, TOO_LARGE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette/EXIF warnings (the size was checked above)
            image.load()
            _apply_exif_orientation(image)
            image, converted = _to_rgb(image)
            image.load()
    except Exception as error:  # noqa: BLE001 - bad image data must never stop a run
        return None, _classify_error(error)
    if min(image.size) < min_size:
        return None, TOO_SMALL
    if budget == REDUCED:
        return image, REDUCED
    return image, CONVERTED if converted else OK


def decode_image(
    value: Any,
    min_size: int = 8,
    stats: DecodeStats | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image | None:
    """Decode a PIL image / {"bytes", "path"} dict / bytes / path into an 8-bit RGB image, or None.

    None means the data was undecodable, truncated, smaller than `min_size` on a side, or over
    `max_pixels` (and not a JPEG that decodes under it at reduced scale); `stats` (when given) counts
    which. Never raises for bad image data.
    """
    image, status = decode_image_with_status(value, min_size=min_size, max_pixels=max_pixels)
    if stats is not None:
        stats.record(status)
    return image


def _hash63(*parts: bytes) -> int:
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return int.from_bytes(digest.digest(), "big") & MAX_ID


def id_from_key(key: str, url: str | None = None) -> int:
    """Id of a keyed example. The shard's file name (not its full path/URL, which differs between
    machines) is included because WebDataset keys such as "000" often repeat across shards."""
    shard = os.path.basename(str(url).rstrip("/")) if url else ""
    return _hash63(b"key", shard.encode(), str(key).encode())


def id_from_bytes(data: bytes) -> int:
    return _hash63(b"bytes", data)


def id_from_path(path: str) -> int:
    return _hash63(b"path", str(path).encode())


def example_id(example: dict, image_column: str) -> int:
    """A stable non-negative 63-bit id for a dataset example (blake2b, identical across processes and runs).

    Order of preference:
    1. `__key__` (WebDataset, the embedded data, our local image folders; with the basename of
       `__url__` when present, since keys repeat across tar shards);
    2. the image's bytes (content hash; for a path-only value the file is read);
    3. the image's path, when its bytes cannot be read.
    The content hash is preferred over the path because paths in parquet datasets are often bare,
    repeated file names ("image.jpg") and paths of local folders are absolute (machine-specific).
    Identical images therefore share an id, which is harmless for per-example state.
    """
    key = example.get("__key__")
    if key is not None and str(key) != "":
        return id_from_key(key, example.get("__url__"))
    if image_column not in example:
        raise ValueError(
            f"example has no `__key__` and no image column {image_column!r}; columns: {sorted(example)}"
        )
    value = example[image_column]
    if isinstance(value, Image.Image):
        return _hash63(b"pixels", value.mode.encode(), repr(value.size).encode(), value.tobytes())
    data, path = _raw_bytes_and_path(value)
    if data is None and path is not None:
        try:
            data = read_path_bytes(path)
        except OSError:
            return id_from_path(path)
    if data is not None:
        return id_from_bytes(data)
    raise ValueError(f"cannot derive an example id: the {image_column!r} value has neither bytes nor a path")
