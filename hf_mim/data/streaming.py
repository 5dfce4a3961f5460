"""Image streams with `datasets` (streaming): Hub datasets, local parquet / WebDataset shards, image folders.

Pipeline:  load_image_stream(...)  ->  prepare_stream(...)  ->  DataLoader(..., collate_fn=<collator>)

`load_image_stream` resolves the image/label columns and casts the image column to
`datasets.Image(decode=False)` so that decoding is ours (`decode_image`: robust, counted).
`prepare_stream` splits by rank, shuffles (shards + buffer), decodes and ids every example, drops bad
images, and keeps only `image` (PIL RGB), `example_id`, `label` (if asked) and two decode counters.

How decode counts reach the training loop with num_workers > 0: the decoding map is a small stateful
callable (`_DecodeExamples`). Each DataLoader worker holds its own copy and counts the bad images it
drops; the next good image that worker yields carries that count in `images_skipped` (and
`images_converted` = 1 if its own image needed a mode conversion or a reduced-scale decode). The
collator turns both into (B,) int64 tensors, so summing them over batches (and ranks) gives the
totals, whatever the number of workers. Bad images after a worker's last good image of an epoch are
not reported (at most a handful). The optional `stats` object is updated in the process that runs
the map: the caller's process only when num_workers == 0; with workers, use the batch counters.

A local image folder is streamed through our own sharded generator (many shards, so several workers
and ranks can read it in parallel; `datasets`' imagefolder builder streams a local folder as one shard).
"""

from __future__ import annotations

import io
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm
from datasets.distributed import split_dataset_by_node
from datasets import ClassLabel, Features, IterableDataset, Value
from datasets import Image as ImageFeature

from .collators import POSITION_KEY
from .images import (
    CONVERTED,
    DEFAULT_MAX_IMAGE_PIXELS,
    REDUCED,
    TOO_LARGE,
    DecodeStats,
    _is_remote,
    _raw_bytes_and_path,
    check_max_pixels,
    decode_image_with_status,
    example_id,
    read_path_bytes,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "cls")
SPLIT_DIR_NAMES = ("train", "training", "validation", "valid", "val", "eval", "test", "testing", "dev")
METADATA_FILE_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
DEFAULT_FOLDER_SHARDS = 960  # divisible by 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 16, 20, 24, 30, 32, 40, 48, 60, 64


# --------------------------------------------------------------------------------------------- loading


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith((".", "_")) for part in path.relative_to(root).parts)


def _scan(root: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {"parquet": [], "tar": [], "image": [], "metadata": []}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not _visible(path, root):
            continue
        name = path.name.lower()
        if name in METADATA_FILE_NAMES:
            found["metadata"].append(path)
        elif name.endswith(".parquet"):
            found["parquet"].append(path)
        elif name.endswith(".tar"):
            found["tar"].append(path)
        elif name.endswith(IMAGE_EXTENSIONS):
            found["image"].append(path)
    return found


def _builder_for_files(files: Sequence[str]) -> str:
    names = [str(f).lower() for f in files]
    if names and all(n.endswith(".parquet") for n in names):
        return "parquet"
    if names and all(n.endswith(".tar") for n in names):
        return "webdataset"
    if names and all(n.endswith(IMAGE_EXTENSIONS + METADATA_FILE_NAMES) for n in names):
        return "imagefolder"
    raise ValueError(
        "data_files must all be .parquet files, all .tar (WebDataset) shards, or all image files; got "
        f"{list(files)[:5]}{' ...' if len(files) > 5 else ''}"
    )


def _generate_folder_examples(shards: list[list[str]], base: str, label_to_id: dict[str, int] | None):
    for shard in shards:
        for rel in shard:
            example: dict[str, Any] = {"image": {"path": os.path.join(base, rel), "bytes": None}, "__key__": rel}
            if label_to_id is not None:
                example["label"] = label_to_id[Path(rel).parent.name]
            yield example


def _image_folder_files(root: Path, split: str) -> tuple[Path, list[str], list[Path]]:
    """(split folder, image paths relative to it, all split folders) of a local image folder."""
    split_dirs = [root / name for name in SPLIT_DIR_NAMES if (root / name).is_dir()]
    if split_dirs:
        base = root / split
        if not base.is_dir():
            raise ValueError(
                f"split {split!r} not found in {root}: it has split folders {[d.name for d in split_dirs]}"
            )
    elif split not in ("train", None):
        raise ValueError(f"{root} has no split folders, so only split='train' exists (asked for {split!r})")
    else:
        base = root
    files = [p for p in _scan(base)["image"]]
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {base}")
    return base, [p.relative_to(base).as_posix() for p in files], split_dirs


def _local_image_folder(root: Path, split: str, num_shards: int | None) -> IterableDataset:
    """A many-shard stream of an image folder: `root/<class>/*.jpg`, or `root/<split>/<class>/*.jpg`.

    Labels (ClassLabel, sorted names) are the images' parent folder names, as in `datasets`'
    imagefolder, when every image lies in a subfolder; with split folders the label names are taken
    from all split folders so that train and validation ids agree. `__key__` is the path relative to
    the split folder (stable across machines). Files are spread over shards by a fixed-seed
    permutation, so every shard mixes all classes.
    """
    base, rel, split_dirs = _image_folder_files(root, split)
    label_to_id = None
    if all("/" in r for r in rel):
        names = {Path(r).parent.name for r in rel}
        for split_dir in split_dirs:
            names |= {p.parent.name for p in _scan(split_dir)["image"] if p.parent != split_dir}
        label_to_id = {name: i for i, name in enumerate(sorted(names))}
    random.Random(0).shuffle(rel)
    n = max(1, min(len(rel), num_shards or DEFAULT_FOLDER_SHARDS))
    shards = [rel[k::n] for k in range(n)]
    features = {"image": ImageFeature(decode=False), "__key__": Value("string")}
    if label_to_id is not None:
        features["label"] = ClassLabel(names=list(label_to_id))
    return IterableDataset.from_generator(
        _generate_folder_examples,
        features=Features(features),
        gen_kwargs={"shards": shards, "base": str(base), "label_to_id": label_to_id},
    )


def _feature_kind(feature: Any) -> str:
    if isinstance(feature, ImageFeature):
        return "image"
    if isinstance(feature, ClassLabel):
        return "int"
    if isinstance(feature, Value):
        if feature.dtype.startswith(("int", "uint")):
            return "int"
        if feature.dtype in ("string", "large_string"):
            return "string"
    return "other"


def _columns(ds: IterableDataset) -> tuple[list[str], dict[str, Any]]:
    if ds.features is not None:
        return list(ds.features), dict(ds.features)
    example = next(iter(ds.take(1)), None)
    if example is None:
        raise ValueError("the dataset is empty")
    return list(example), {}


def resolve_image_column(ds: IterableDataset, image_column_name: str | None = None) -> str:
    """The image column: `image_column_name` if given (must exist and hold images), else the first column
    of type `datasets.Image`, else the first of image/img/jpg/jpeg/png/webp present (whose type must be
    one that can hold images)."""
    names, features = _columns(ds)
    if image_column_name is not None:
        if image_column_name not in names:
            raise ValueError(
                f"image column {image_column_name!r} not found in the dataset; available columns: {names}. "
                "Pass the right one with --image_column_name."
            )
        check_holds_images(ds, image_column_name, features.get(image_column_name))
        return image_column_name
    for name in names:
        if _feature_kind(features.get(name)) == "image":
            return name
    lowered = {name.lower(): name for name in names}
    for candidate in IMAGE_COLUMN_CANDIDATES:
        if candidate in lowered:
            column = lowered[candidate]
            if features and not _may_hold_images(features.get(column)):
                raise ValueError(
                    f"the image column {column!r} (found by its name) has type {describe_feature(features[column])}, "
                    f"which cannot hold images; pass the right one with --image_column_name (columns: {names})"
                )
            return column
    raise ValueError(
        f"could not find an image column (no column of type datasets.Image and none named {IMAGE_COLUMN_CANDIDATES}); "
        f"available columns: {names}. Pass one with --image_column_name."
    )


IMAGE_CHECK_ROWS = 8  # rows read to check a named column that is not a datasets.Image


def describe_feature(feature: Any) -> str:
    """A short name of a `datasets` feature type for error messages: string, int64, ClassLabel, struct{a, b}..."""
    if feature is None:
        return "unknown"
    if isinstance(feature, Value):
        return str(feature.dtype)
    if isinstance(feature, dict):
        return "struct{" + ", ".join(map(str, feature)) + "}"
    return type(feature).__name__


def _may_hold_images(feature: Any) -> bool:
    """Whether a column of this type can hold images as our decoding reads them: a datasets.Image, encoded
    bytes, a {bytes, path} struct, or a string (image file paths). None (unknown type): maybe."""
    if feature is None or isinstance(feature, ImageFeature):
        return True
    if isinstance(feature, Value):
        return feature.dtype in ("binary", "large_binary", "string", "large_string")
    return isinstance(feature, dict) and bool({"bytes", "path"} & set(feature))


def _is_image_value(value: Any) -> bool:
    """Whether one stored value is an image: a PIL image, or bytes / a readable file (local or remote,
    alone or in a {bytes, path} dict) whose header Pillow recognises. Reads the header only."""
    from PIL import Image

    if hasattr(value, "getpixel"):
        return True
    if not isinstance(value, (dict, bytes, bytearray, memoryview, str)):
        return False
    data, path = _raw_bytes_and_path(value)
    if data is None and path is not None:
        if _is_remote(path):
            return True  # not fetched here: a remote path is trusted until it is decoded
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    if data is None:
        return False
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except Image.DecompressionBombError:
        return True  # an image, too large to decode: `prepare_stream` counts it
    except Exception:  # noqa: BLE001 - not an image Pillow knows
        return False


def check_holds_images(ds: IterableDataset, column: str, feature: Any) -> None:
    """A column named by the user must hold images (a datasets.Image, encoded images as bytes or
    {bytes, path}, or paths of image files that exist): a text or number column would otherwise make
    every row "undecodable" and the run end with no full batch. The type is checked from the features;
    other than a datasets.Image, the first `IMAGE_CHECK_ROWS` non-empty values are read (headers only)
    and one of them must be an image."""
    if isinstance(feature, ImageFeature):
        return
    hint = "give the column with the images (datasets.Image, encoded bytes, or paths of image files that exist)"
    if not _may_hold_images(feature):
        raise ValueError(f"--image_column_name {column!r}: the column has type {describe_feature(feature)}, which cannot hold images; {hint}")
    values = [v for v in (row.get(column) for row in ds.select_columns([column]).take(IMAGE_CHECK_ROWS * 4)) if v is not None]
    values = values[:IMAGE_CHECK_ROWS]
    if not values or any(_is_image_value(v) for v in values):
        return
    kind = describe_feature(feature) if feature is not None else type(values[0]).__name__
    raise ValueError(
        f"--image_column_name {column!r}: the column has type {kind} and none of its first {len(values)} values is an "
        f"image or an image file that exists (first: {_short(values[0])}); {hint}"
    )


def _short(value: Any) -> str:
    if isinstance(value, dict):
        value = {k: (f"<{len(v)} bytes>" if isinstance(v, (bytes, bytearray)) else v) for k, v in value.items()}
    elif isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def resolve_label_column(ds: IterableDataset, label_column_name: str | None = None) -> str | None:
    """The label column: `label_column_name` if given (must exist and hold integers or a ClassLabel),
    else the first of label/labels/cls holding integers, else None."""
    names, features = _columns(ds)
    if label_column_name is not None:
        if label_column_name not in names:
            raise ValueError(
                f"label column {label_column_name!r} not found in the dataset; available columns: {names}. "
                "Pass the right one with --label_column_name."
            )
        kind = _feature_kind(features.get(label_column_name)) if features else "int"
        if kind != "int":
            raise ValueError(
                f"label column {label_column_name!r} has type {features.get(label_column_name)}; labels must be "
                "integers or a datasets.ClassLabel"
            )
        return label_column_name
    for candidate in LABEL_COLUMN_CANDIDATES:
        if candidate in names and (not features or _feature_kind(features.get(candidate)) == "int"):
            return candidate
    return None


def label_names(ds: IterableDataset, label_column: str | None) -> list[str] | None:
    """The ClassLabel names of `label_column` (for id2label), or None when it is not a ClassLabel."""
    if label_column is None or ds.features is None:
        return None
    feature = ds.features.get(label_column)
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def _tar_data_files(root: Path) -> dict[str, list[str]]:
    """{split: .tar files} of `root`, splits inferred from names as `datasets` does. Only the shards:
    the index files that often lie beside them (sizes.json, img2dataset's <shard>_stats.json) are not
    tar archives, and the webdataset builder given `data_dir` would try to read them as shards."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    files = DataFilesDict.from_patterns(get_data_patterns(str(root)), base_path=str(root)).filter(extensions=[".tar"])
    return {str(split): list(split_files) for split, split_files in files.items() if split_files}


def _resolve_source(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_dir: str | os.PathLike | None,
    data_files: str | Sequence[str] | dict | None,
    split: str,
) -> dict[str, Any]:
    """Where `load_image_stream` reads from: {"image_folder": root} for a local image folder (our own
    sharded generator), else the `path`, `name`, `data_dir`, `data_files` of `datasets.load_dataset`
    (and of `load_dataset_builder`, which `count_examples` asks)."""
    if dataset_name is None and train_dir is None and data_files is None:
        raise ValueError(
            "give a dataset: dataset_name, train_dir or data_files (hf_mim.data.embedded_pretraining_dir() "
            "gives a small offline one)"
        )
    if dataset_name is not None and train_dir is not None:
        raise ValueError("give either dataset_name or train_dir, not both")
    if train_dir is not None and data_files is not None:
        raise ValueError("give either train_dir or data_files, not both")

    if dataset_name is not None:
        return {"path": dataset_name, "name": dataset_config_name, "data_files": data_files}
    if data_files is not None:
        if isinstance(data_files, dict):
            all_files = [f for files in data_files.values() for f in ([files] if isinstance(files, str) else files)]
        else:
            all_files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
            data_files = {split: [os.fspath(f) for f in all_files]}
        return {"path": _builder_for_files([os.fspath(f) for f in all_files]), "data_files": data_files}
    root = Path(train_dir)
    if not root.is_dir():
        raise ValueError(f"train_dir {root} is not a directory")
    found = _scan(root)
    if found["parquet"]:
        return {"path": "parquet", "data_dir": str(root)}
    if found["tar"]:
        return {"path": "webdataset", "data_files": _tar_data_files(root)}
    if found["image"] and found["metadata"]:
        return {"path": "imagefolder", "data_dir": str(root)}
    if found["image"]:
        return {"image_folder": root}
    raise ValueError(f"no parquet files, .tar shards or images found under {root}")


def load_image_stream(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | os.PathLike | None = None,
    data_files: str | Sequence[str] | dict | None = None,
    split: str = "train",
    image_column_name: str | None = None,
    label_column_name: str | None = None,
    streaming: bool = True,
    num_shards: int | None = None,
    load_kwargs: dict | None = None,
) -> tuple[IterableDataset, str, str | None]:
    """(stream, image column, label column or None). The image column is cast to Image(decode=False).

    Sources (one of):
    - `dataset_name`: anything `datasets.load_dataset` takes (a Hub id, a local dataset folder), with
      `dataset_config_name` and, optionally, `data_files`.
    - `train_dir`: a local folder of parquet files or WebDataset `.tar` shards (one shard per file;
      splits inferred by `datasets` from file/folder names, e.g. `train-00000.parquet`,
      `validation/...`), or of images (`<class>/<img>` or `<split>/<class>/<img>`; streamed as up to
      `num_shards` (default 960) shards; a folder with a metadata.csv/jsonl goes through `datasets`'
      imagefolder builder).
    - `data_files`: parquet / tar / image files (a path, glob, list, or {split: files}).
    `streaming=False` loads into the Arrow cache first and returns `to_iterable_dataset(num_shards)`
    (default: min(rows, 64) shards). `load_kwargs` (e.g. token, cache_dir) go to `datasets.load_dataset`.
    """
    source = {**_resolve_source(dataset_name, dataset_config_name, train_dir, data_files, split), **(load_kwargs or {})}
    if "image_folder" in source:
        ds = _local_image_folder(source["image_folder"], split, num_shards)
    else:
        ds = datasets.load_dataset(**source, split=split, streaming=streaming)

    if isinstance(ds, datasets.Dataset):
        ds = ds.to_iterable_dataset(num_shards=max(1, min(len(ds), num_shards or 64)))
    if not isinstance(ds, IterableDataset):
        raise ValueError(f"expected one split, got {type(ds).__name__}; pass split=...")

    image_column = resolve_image_column(ds, image_column_name)
    label_column = resolve_label_column(ds, label_column_name)
    if ds.features is not None and not (
        isinstance(ds.features[image_column], ImageFeature) and not ds.features[image_column].decode
    ):
        ds = ds.cast_column(image_column, ImageFeature(decode=False))
    return ds, image_column, label_column


# --------------------------------------------------------------------------------------------- counting


def _parquet_rows(path: str) -> int:
    """Rows from the parquet footer (a few KB, also over hf:// or https:// with range reads)."""
    import pyarrow.parquet as pq

    if not _is_remote(path):
        return pq.read_metadata(path).num_rows
    from datasets.utils.file_utils import xopen

    with xopen(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _read_json(path: str) -> Any:
    import json

    from datasets.utils.file_utils import xopen

    with xopen(path, "r") as f:
        return json.load(f)


def _tar_index_size(path: str, indexes: dict[str, Any]) -> int | None:
    """Examples in a tar shard from an index beside it, when one exists: `sizes.json`
    ({shard name: examples}, as written for OpenCLIP / webdataset) or img2dataset's `<shard>_stats.json`
    ("successes")."""
    folder, name = path.rsplit("/", 1) if "/" in path else ("", path)
    if folder not in indexes:
        try:
            indexes[folder] = _read_json(f"{folder}/sizes.json" if folder else "sizes.json")
        except Exception:  # noqa: BLE001 - no readable index (missing, offline, malformed): count otherwise
            indexes[folder] = None
    sizes = indexes[folder]
    if isinstance(sizes, dict) and isinstance(sizes.get(name), int):
        return sizes[name]
    stem = name[: -len(".tar")] if name.endswith(".tar") else name
    try:
        stats = _read_json(f"{folder}/{stem}_stats.json" if folder else f"{stem}_stats.json")
    except Exception:  # noqa: BLE001
        return None
    return stats["successes"] if isinstance(stats, dict) and isinstance(stats.get("successes"), int) else None


def _tar_examples(path: str) -> int:
    """Examples in a local WebDataset shard by reading the member headers only (data is seeked over),
    grouped into examples exactly as `datasets`' webdataset builder does."""
    import tarfile

    from datasets.packaged_modules.webdataset.webdataset import base_plus_ext

    count, last_key = 0, None
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isreg() or os.path.basename(member.name).startswith((".", "__")):
                continue  # what datasets' tar iterator skips
            key, _ = base_plus_ext(member.name)
            if key is not None and key != last_key:
                count, last_key = count + 1, key
    return count


def count_examples(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | os.PathLike | None = None,
    data_files: str | Sequence[str] | dict | None = None,
    split: str = "train",
    progress: bool = True,
    load_kwargs: dict | None = None,
) -> int:
    """Number of examples in the split that `load_image_stream` (same arguments) streams, from what
    the source already records, never by decoding images:

    1. the split sizes `datasets` knows (`DatasetInfo.splits`, e.g. from a Hub dataset card);
    2. a local image folder: its file list;
    3. parquet: the footers (`num_rows`; a few KB per remote file);
    4. WebDataset tar shards: `sizes.json` / `<shard>_stats.json` indexes beside them, else (local
       shards) a scan of the member headers;
    5. an imagefolder without metadata: its image files; other local data: one pass over the
       records.
    A progress bar (`progress`) appears when counting takes more than a second. Where counting would
    mean downloading the dataset (remote tar shards without an index, other remote formats), a
    ValueError asks for `--num_train_examples`. `load_kwargs` (e.g. token, cache_dir) go to `datasets`.
    """
    source = {**_resolve_source(dataset_name, dataset_config_name, train_dir, data_files, split), **(load_kwargs or {})}
    if "image_folder" in source:
        return len(_image_folder_files(source["image_folder"], split)[1])
    builder = datasets.load_dataset_builder(**source)
    known = (builder.info.splits or {}).get(split)
    if known is not None and known.num_examples:
        return int(known.num_examples)
    data_files_by_split = {str(name): list(files) for name, files in (builder.config.data_files or {}).items()}
    if data_files_by_split and split not in data_files_by_split:
        raise ValueError(f"split {split!r} not found; the data has splits {sorted(data_files_by_split)}")
    files = data_files_by_split.get(split, [])
    what = dataset_name or train_dir or "the data files"
    bar = {"disable": not progress, "delay": 1.0, "desc": f"counting {what} (skip: --num_train_examples)"}
    if files and builder.name == "parquet":
        return sum(_parquet_rows(f) for f in tqdm(files, unit="file", **bar))
    if files and builder.name == "webdataset":
        indexes: dict[str, Any] = {}
        sizes = [_tar_index_size(f, indexes) for f in files]
        unindexed_remote = [f for f, size in zip(files, sizes) if size is None and _is_remote(f)]
        if unindexed_remote:
            raise ValueError(
                f"counting the examples of {what} would mean downloading its {len(unindexed_remote)} tar shards "
                f"without a sizes.json index (e.g. {unindexed_remote[0]}): pass --num_train_examples "
                "(or --max_train_steps)"
            )
        shards = zip(tqdm(files, unit="shard", **bar), sizes)
        return sum(size if size is not None else _tar_examples(f) for f, size in shards)
    if files and builder.name == "imagefolder" and not any(f.lower().endswith(METADATA_FILE_NAMES) for f in files):
        return sum(1 for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files or any(_is_remote(f) for f in files):
        raise ValueError(
            f"counting the examples of {what} would mean downloading it ({builder.name} data without split sizes in "
            "its dataset card): pass --num_train_examples (or --max_train_steps)"
        )
    stream = datasets.load_dataset(**source, split=split, streaming=True)
    return sum(1 for _ in tqdm(stream, unit="example", **bar))


# --------------------------------------------------------------------------------------------- preparing


def _describe(example: dict, image_column: str) -> str:
    if example.get("__key__") is not None:
        return f"key={example['__key__']!r}"
    _, path = _raw_bytes_and_path(example.get(image_column))
    return f"path={path!r}" if path else "(no key or path)"


class _DecodeExamples:
    """The map of `prepare_stream`. Stateful on purpose: `pending_skipped` counts bad images since the
    last good one in this process (a DataLoader worker has its own copy)."""

    def __init__(
        self,
        image_column: str,
        label_column: str | None,
        min_size: int,
        stats: DecodeStats | None,
        max_pixels: int | None,
        decode_min_side: int | None = None,
    ):
        self.image_column = image_column
        self.label_column = label_column
        self.min_size = min_size
        self.max_pixels = max_pixels
        self.decode_min_side = decode_min_side
        self.stats = stats
        self.pending_skipped = 0
        self.bad_seen = 0

    def _log_bad(self, example: dict, reason: str) -> None:
        self.bad_seen += 1
        n = self.bad_seen
        if n <= 10 or (n & (n - 1)) == 0:  # the first ten, then at powers of two
            logger.warning(
                "skipping image %s: %s (%d bad images so far in this process)",
                _describe(example, self.image_column), reason, n,
            )

    def __call__(self, example: dict) -> dict:
        value = example[self.image_column]
        data, path = _raw_bytes_and_path(value)
        if data is None and path is not None:
            try:
                data = read_path_bytes(path)
            except OSError:
                data = None
        image, status = decode_image_with_status(
            data if data is not None else value, self.min_size, self.max_pixels, self.decode_min_side
        )
        if self.stats is not None:
            self.stats.record(status)
        label = None
        if image is not None and self.label_column is not None:
            label = example.get(self.label_column)
            if label is None or int(label) < 0:  # -1 is datasets' "no label" for ClassLabel
                image, status = None, "unlabelled"
        if image is None:
            if status == TOO_LARGE:
                status = f"{status} (over max_image_pixels={self.max_pixels}; not a JPEG that fits it at 1/8 scale)"
            self._log_bad(example, status)
            self.pending_skipped += 1
            out = {"image": None, "example_id": -1, "images_converted": 0, "images_skipped": 0}
            if self.label_column is not None:
                out["label"] = -1
            return out
        id_source = dict(example)
        if data is not None:
            id_source[self.image_column] = {"bytes": data, "path": path}
        out = {
            "image": image,
            "example_id": example_id(id_source, self.image_column),
            "images_converted": int(status in (CONVERTED, REDUCED)),
            "images_skipped": self.pending_skipped,
        }
        self.pending_skipped = 0
        if self.label_column is not None:
            out["label"] = int(label)
        return out


def _keep(example: dict) -> bool:
    return example["image"] is not None


# --------------------------------------------------------------------------------------------- resuming

MAX_LOADER_WORKERS = 1024


def _worker_id() -> int:
    import torch

    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


class ResumePlan:
    """How many raw records each DataLoader worker skips, undecoded, at the start of its pass: what a
    resumed run had already consumed of its epoch (`hf_mim.training.loop.stream_batches` sets it before
    opening the epoch's iterator and clears it after). Shared memory, so workers see what the loop sets,
    persistent ones included. Skipping happens after the shuffle buffer, on the raw records: the
    buffer, the order and the example ids stay those of the uninterrupted pass."""

    def __init__(self):
        import torch

        self.counts = torch.zeros(MAX_LOADER_WORKERS, dtype=torch.int64).share_memory_()

    def set(self, counts: Sequence[int]) -> None:
        import torch

        if len(counts) > MAX_LOADER_WORKERS:
            raise ValueError(f"at most {MAX_LOADER_WORKERS} DataLoader workers can resume without replaying, got {len(counts)}")
        self.counts.zero_()
        self.counts[: len(counts)] = torch.as_tensor(list(counts), dtype=torch.int64)

    def clear(self) -> None:
        self.counts.zero_()

    def start(self, worker: int) -> int:
        return int(self.counts[worker]) if worker < MAX_LOADER_WORKERS else 0


class _WithPosition:
    """The decoding map, plus each example's `stream_position` (worker, raw record index of this pass):
    what a checkpoint records so that a resumed run skips the consumed records without decoding them.
    The first `plan.start(worker)` records of the pass are not decoded (nor read, for path-only images):
    they come out empty, without a bad-image count, and the keep-filter drops them."""

    def __init__(self, decode, plan: ResumePlan):
        self.decode, self.plan = decode, plan

    def __call__(self, example: dict, index: int) -> dict:
        worker = _worker_id()
        if index < self.plan.start(worker):
            out = {"image": None, "example_id": -1, "images_converted": 0, "images_skipped": 0}
            if self.decode.label_column is not None:
                out["label"] = -1
            if getattr(self.decode, "mask_column", None) is not None:
                out["mask"] = None
        else:
            out = self.decode(example)
        out[POSITION_KEY] = [worker, index]
        return out


def resume_plan_of(stream) -> ResumePlan | None:
    """The `ResumePlan` of a stream from `prepare_stream` (None for any other stream: resumes replay)."""
    return getattr(stream, "hf_mim_resume_plan", None)


def prepare_stream(
    ds: IterableDataset,
    image_column: str,
    *,
    seed: int,
    buffer_size: int,
    rank: int = 0,
    world_size: int = 1,
    label_column: str | None = None,
    stats: DecodeStats | None = None,
    min_size: int = 8,
    max_buffer_input_shards: int | None = 1,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    decode_min_side: int | None = None,
    mask_column: str | None = None,
) -> IterableDataset:
    """Split by node (world_size > 1), shuffle, decode + id, drop bad images.

    Output examples: {"image": PIL RGB, "example_id": int, "images_converted": 0/1, "images_skipped": int,
    "stream_position": [DataLoader worker, raw record index in its pass], ["label": int]}; the stream's
    `ResumePlan` (`resume_plan_of`) lets a resumed run skip consumed raw records before decoding them.
    `buffer_size=0` skips shuffling (evaluation streams). Call `ds.set_epoch(epoch)` on the result every
    epoch (it reshuffles shards and buffer). Unlabelled examples (label None or -1) are dropped and
    counted as skipped when `label_column` is given. `max_image_pixels` bounds what one
    decode may allocate (see `hf_mim.data.images`): larger JPEGs are decoded at reduced scale (counted
    in `images_converted`), other larger images are skipped (counted in `images_skipped`).
    `decode_min_side` (e.g. the transform's `min_decode_side`): JPEGs much larger than the transform
    can use are decoded at 1/2, 1/4 or 1/8 scale by libjpeg, keeping the shorter side >= it.
    `mask_column` (semantic segmentation): its segmentation map is decoded too, into "mask"
    (`hf_mim.data.segmentation.DecodePairs`).

    `max_buffer_input_shards` goes to `IterableDataset.shuffle`. The default here, 1, fills the buffer
    from one shard at a time (shard order is still reshuffled every epoch). datasets' own default (10,
    pass None) reads several shards in parallel threads, which shuffles class-sorted shards better but,
    in datasets 5.2, (a) sleeps 5 s (`datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN`, an Arrow
    workaround) at the end of every pass in every worker, which dominates small datasets such as the
    embedded one, and (b) makes `StatefulDataLoader.load_state_dict` fail with an IndexError when
    num_workers > 0.
    """
    check_max_pixels(max_image_pixels)
    keep = [image_column] + ([label_column] if label_column else []) + ([mask_column] if mask_column else [])
    if ds.column_names is not None:
        missing = [c for c in keep if c not in ds.column_names]
        if missing:
            raise ValueError(f"columns {missing} not in the dataset; available columns: {ds.column_names}")
        keep += [c for c in ("__key__", "__url__") if c in ds.column_names]
        ds = ds.select_columns(keep)
    if world_size > 1:
        if ds.num_shards % world_size != 0:
            logger.warning(
                "the stream has %d shards, not divisible by world_size=%d: every rank reads all shards and keeps "
                "one example in %d (correct but wasteful); use a multiple of %d shards",
                ds.num_shards, world_size, world_size, world_size,
            )
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    if buffer_size and buffer_size > 0:
        shuffle_kwargs = {} if max_buffer_input_shards is None else {"max_buffer_input_shards": max_buffer_input_shards}
        ds = ds.shuffle(seed=seed, buffer_size=buffer_size, **shuffle_kwargs)
    decode = _DecodeExamples(image_column, label_column, min_size, stats, max_image_pixels, decode_min_side)
    if mask_column is not None:
        from .segmentation import DecodePairs

        decode = DecodePairs(image_column, label_column, min_size, stats, max_image_pixels, decode_min_side, mask_column=mask_column)
    plan = ResumePlan()
    ds = ds.map(_WithPosition(decode, plan), with_indices=True, remove_columns=ds.column_names)
    ds = ds.filter(_keep)
    ds.hf_mim_resume_plan = plan
    return ds


def make_dataloader(
    ds: IterableDataset,
    collator,
    batch_size: int,
    num_workers: int = 0,
    drop_last: bool = True,
    pin_memory: bool = False,
    persistent_workers: bool = False,
):
    """A torch DataLoader over a prepared stream. `datasets` gives each worker whole shards, so workers
    beyond `ds.num_shards` would sit idle: num_workers is capped there (with a log line).

    The loader draws its workers' base seed from a private generator, never from torch's global RNG:
    otherwise every new epoch iterator would shift the global stream (drop path, re-initialisation)
    and a resumed run, which opens its iterator at another moment, would diverge.

    Its workers ignore the signals the training process handles itself (a handler marked
    `ignore_in_dataloader_workers`: hf_mim.training.preemption): a signal sent to the whole process group
    (SLURM, a container stop) would otherwise kill a worker first, and torch would fail the next batch.
    """
    import torch

    if num_workers > ds.num_shards:
        logger.warning(
            "num_workers=%d > %d shards in the stream: using %d workers", num_workers, ds.num_shards, ds.num_shards
        )
        num_workers = ds.num_shards
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        collate_fn=collator,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=IgnoreSignals.of_this_process() if num_workers > 0 else None,
    )


class IgnoreSignals:
    """A DataLoader `worker_init_fn` (picklable, for any start method): the worker ignores `signals`."""

    def __init__(self, signals: tuple):
        self.signals = tuple(signals)

    @classmethod
    def of_this_process(cls) -> "IgnoreSignals | None":
        """The signals whose current handler asks its process's DataLoader workers to ignore them, or None."""
        import signal

        handled = tuple(number for number in signal.valid_signals() if number not in (signal.SIGKILL, signal.SIGSTOP)
                        and getattr(signal.getsignal(number), "ignore_in_dataloader_workers", False))
        return cls(handled) if handled else None

    def __call__(self, worker_id: int) -> None:
        import signal

        for number in self.signals:
            signal.signal(number, signal.SIG_IGN)
