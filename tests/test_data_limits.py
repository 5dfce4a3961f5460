"""hf_mim.data limits: bounded image decoding (pixel budget, JPEG draft decoding, EXIF orientation)
and stream lengths read from what the source already records, without decoding images."""

from __future__ import annotations

import importlib.util
import io
import struct
import subprocess
import sys
import textwrap
import zlib

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import encode, photo

from hf_mim.data import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DecodeStats,
    MaskedImageTransform,
    PretrainingCollator,
    decode_image,
    decode_image_with_status,
    load_image_stream,
    make_dataloader,
    max_pixels_argument,
    pop_decode_counts,
    prepare_stream,
)
from hf_mim.masking import RandomMaskGenerator

HUGE_SIDE = 13000  # 169 M pixels: ~0.5 GB as RGB, ~0.8 GB peak through a mode conversion


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def grey_png(width: int, height: int) -> bytes:
    """A valid all-black 8-bit greyscale PNG, written row by row (never held as pixels): ~1/1000 of its
    pixel count in bytes, the decompression-bomb shape."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    data = grey_png(HUGE_SIDE, HUGE_SIDE)
    assert len(data) < 200_000
    return data


# ------------------------------------------------------------------------------------------- pixel budget


def test_huge_png_is_skipped_without_allocating_it(huge_png, tmp_path):
    """In a fresh process (images.py alone, so the baseline is small): the 13000 x 13000 PNG is skipped
    as too_large and the peak resident memory barely moves; the old decode grew it by ~0.8 GB."""
    import hf_mim.data.images

    (tmp_path / "huge.png").write_bytes(huge_png)
    script = textwrap.dedent(
        f"""
        import importlib.util, resource, sys, warnings
        spec = importlib.util.spec_from_file_location("images_alone", {hf_mim.data.images.__file__!r})
        images = sys.modules["images_alone"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(images)
        data = open({str(tmp_path / "huge.png")!r}, "rb").read()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image, status = images.decode_image_with_status(data)
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(status, image is None, round(grown_mb, 1), [type(w.message).__name__ for w in caught])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    status, is_none, grown_mb, warned = result.stdout.split(maxsplit=3)
    assert (status, is_none) == ("too_large", "True")
    assert float(grown_mb) < 50, f"decoding grew the peak memory by {grown_mb} MB"
    assert "DecompressionBombWarning" in warned  # Pillow's warning is not silenced


def test_pixel_budget_is_the_users_and_counted():
    stats = DecodeStats()
    small_png = encode(photo(0, (300, 200)))
    assert decode_image(small_png, stats=stats, max_pixels=60_000).size == (300, 200)
    assert decode_image(small_png, stats=stats, max_pixels=59_999) is None  # not a JPEG: skipped
    assert decode_image(small_png, stats=stats, max_pixels=None).size == (300, 200)
    assert decode_image(photo(0, (300, 200)), stats=stats, max_pixels=1000) is None  # decoded images too
    assert stats.as_dict() == {
        "ok": 2, "converted": 0, "reduced": 0, "skipped_undecodable": 0, "skipped_truncated": 0,
        "skipped_too_small": 0, "skipped_too_large": 2,
    }
    assert stats.skipped == 2 and stats.kept == 2
    assert DEFAULT_MAX_IMAGE_PIXELS < HUGE_SIDE * HUGE_SIDE


def test_pillow_decompression_bomb_error_counts_as_too_large(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses over 2 x this at open
    assert decode_image_with_status(encode(photo(0, (60, 40))), max_pixels=None) == (None, "too_large")


def test_large_jpeg_is_decoded_at_reduced_scale():
    """libjpeg's draft decode at the smallest of 1/2, 1/4, 1/8 that fits the budget; the pixels match a
    full decode downscaled, up to JPEG's DCT-domain scaling."""
    source = photo(1, (800, 600))
    data = encode(source, "JPEG", quality=95)
    expected = {480_000: ((800, 600), "ok"), 479_999: ((400, 300), "reduced"), 120_000: ((400, 300), "reduced"),
                119_999: ((200, 150), "reduced"), 7_500: ((100, 75), "reduced")}
    for budget, (size, status) in expected.items():
        image, got = decode_image_with_status(data, max_pixels=budget)
        assert (image.size, got) == (size, status), budget
    assert decode_image_with_status(data, max_pixels=7_499) == (None, "too_large")
    reduced, _ = decode_image_with_status(data, max_pixels=100_000)
    reference = source.resize((200, 150), Image.Resampling.BOX)
    assert np.abs(np.asarray(reduced, np.float64) - np.asarray(reference, np.float64)).mean() < 3
    # odd sizes: ceil(side / scale) pixels, still under the budget
    image, status = decode_image_with_status(encode(photo(2, (1001, 999)), "JPEG"), max_pixels=70_000)
    assert (image.size, status) == ((251, 250), "reduced")


def test_exif_orientation_is_applied_as_datasets_does():
    """A landscape JPEG tagged 'rotate 90 CW' (orientation 6) comes out portrait, pixel for pixel what
    `datasets.Image().decode_example` gives; the old decode returned it on its side."""
    array = np.zeros((40, 64, 3), np.uint8)
    array[:, :32] = (250, 10, 10)  # left half red, right half blue
    array[:, 32:] = (10, 10, 250)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(array), "JPEG", quality=95, exif=exif.tobytes())
    image, status = decode_image_with_status(data)
    assert status == "ok" and image.size == (40, 64)
    upright = np.asarray(image)
    assert upright[5, 20, 0] > 200 and upright[60, 20, 2] > 200  # red on top, blue below
    reference = datasets.Image().decode_example({"bytes": data, "path": None}).convert("RGB")
    assert np.array_equal(upright, np.asarray(reference))
    # a reduced decode is turned upright as well
    small, status = decode_image_with_status(data, max_pixels=1000)
    assert status == "reduced" and small.size == (20, 32)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, at open; expected here
def test_stream_skips_and_counts_too_large_images_from_folder_and_parquet(huge_png, tmp_path):
    """Through prepare_stream and the DataLoader: the huge PNG is skipped and counted in images_skipped,
    a large JPEG is reduced and counted in images_converted, in an image folder and in parquet."""
    big_jpeg = encode(photo(3, (640, 480)), "JPEG")
    good = [encode(photo(i, (48, 40))) for i in range(3)]
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in (("a.png", good[0]), ("b.png", huge_png), ("c.jpg", big_jpeg), ("d.png", good[1]),
                       ("e.png", good[2])):
        (folder / name).write_bytes(data)
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    features = datasets.Features({"image": datasets.Image(), "__key__": datasets.Value("string")})
    rows = {"image": [{"bytes": b, "path": None} for b in (good[0], huge_png, big_jpeg, good[1], good[2])],
            "__key__": [str(i) for i in range(5)]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(parquet / "train-0.parquet"))

    collator = PretrainingCollator(MaskedImageTransform(16), RandomMaskGenerator(4, 0.5), seed=0)
    for root in (folder, parquet):
        ds, image_column, _ = load_image_stream(train_dir=root, num_shards=1)
        stats = DecodeStats()
        kept = list(prepare_stream(ds, image_column, seed=0, buffer_size=0, stats=stats, max_image_pixels=100_000))
        assert len(kept) == 4 and stats.skipped_too_large == 1 and stats.reduced == 1, root
        assert sorted(ex["image"].size for ex in kept) == [(48, 40)] * 3 + [(320, 240)]
        stream = prepare_stream(ds, image_column, seed=0, buffer_size=0, max_image_pixels=100_000)
        totals = {"images_skipped": 0, "images_converted": 0}
        for batch in make_dataloader(stream, collator, batch_size=2, num_workers=0, drop_last=False):
            for key, value in pop_decode_counts(batch).items():
                totals[key] += int(value)
        assert totals == {"images_skipped": 1, "images_converted": 1}, root
    with pytest.raises(ValueError, match="max_image_pixels must be a positive integer"):
        prepare_stream(ds, image_column, seed=0, buffer_size=0, max_image_pixels=0)


def test_max_image_pixels_flag_of_both_scripts(capsys):
    assert max_pixels_argument("1000") == 1000 and max_pixels_argument("none") is None
    root = __import__("pathlib").Path(__file__).resolve().parents[1] / "training_scripts"
    for name, base in (("run_mim", []), ("run_image_classification", ["--model_type", "dbot"])):
        spec = importlib.util.spec_from_file_location(f"{name}_script", root / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.parse_args(base).max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
        assert module.parse_args([*base, "--max_image_pixels", "5000"]).max_image_pixels == 5000
        for bad in ("0", "-3", "lots"):
            with pytest.raises(SystemExit):
                module.parse_args([*base, "--max_image_pixels", bad])
            assert "argument --max_image_pixels: must be a positive integer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- stream length


def forbid_decoding_and_streaming(patch: pytest.MonkeyPatch) -> None:
    """Counting must not decode an image nor iterate a stream: both raise under `patch`."""

    def refuse(*args, **kwargs):
        raise AssertionError("counting decoded an image or read the stream")

    patch.setattr(Image, "open", refuse)
    patch.setattr(datasets, "load_dataset", refuse)


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def stream_rows(**source) -> int:
    return sum(1 for _ in load_image_stream(**source)[0])


def test_count_parquet_from_footers(tmp_path, monkeypatch):
    from hf_mim.data import count_examples

    features = datasets.Features({"image": datasets.Image(), "__key__": datasets.Value("string")})
    image = encode(photo(0))
    for shard, rows in enumerate((5, 7)):
        table = {"image": [{"bytes": image, "path": None}] * rows, "__key__": [f"{shard}-{i}" for i in range(rows)]}
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(tmp_path / f"train-{shard}.parquet"))
    files = sorted(str(p) for p in tmp_path.glob("*.parquet"))
    assert stream_rows(train_dir=tmp_path) == 12
    with monkeypatch.context() as patch:
        forbid_decoding_and_streaming(patch)
        assert count_examples(train_dir=tmp_path) == 12
        assert count_examples(dataset_name=str(tmp_path)) == 12
        assert count_examples(data_files=files[:1]) == 5
        # remote files: the footer is read through datasets' xopen (range reads), not the whole file
        assert count_examples(data_files=[f"file://{files[1]}"]) == 7


def test_count_tar_shards_from_headers_or_an_index(tmp_path, monkeypatch, capsys):
    """Examples grouped as datasets' webdataset builder groups them (hidden and `__` files skipped,
    several files per key), counted from the tar headers; a sizes.json or <shard>_stats.json beside the
    shards is used instead of scanning, and does not disturb loading."""
    from hf_mim.data import count_examples

    image = encode(photo(0), "JPEG")
    write_tar(tmp_path / "train-0000.tar", [("a.jpg", image), ("a.cls", b"1"), (".hidden.jpg", image),
                                           ("b.jpg", image), ("__meta__.cls", b"0"), ("b.cls", b"0"),
                                           ("dir/c.jpg", image), ("dir/c.cls", b"2"), ("noextension", b"")])
    write_tar(tmp_path / "train-0001.tar", [(f"{i:04d}.{ext}", data) for i in range(4)
                                           for ext, data in (("jpg", image), ("cls", b"1"))])
    assert stream_rows(train_dir=tmp_path) == 7
    with monkeypatch.context() as patch:
        forbid_decoding_and_streaming(patch)
        assert count_examples(train_dir=tmp_path) == 7
        (tmp_path / "train-0001_stats.json").write_text('{"successes": 40, "count": 50}')  # img2dataset
        assert count_examples(train_dir=tmp_path) == 43
        (tmp_path / "sizes.json").write_text('{"train-0000.tar": 300, "train-0001.tar": 400}')  # OpenCLIP
        assert count_examples(train_dir=tmp_path) == 700
    assert stream_rows(train_dir=tmp_path) == 7  # the index files are not read as shards


def test_count_image_folder_by_listing(tmp_path, monkeypatch):
    from hf_mim.data import count_examples

    for split, n in (("train", 5), ("validation", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                (tmp_path / split / cls / f"{i}.png").write_bytes(encode(photo(i)))
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    with monkeypatch.context() as patch:
        forbid_decoding_and_streaming(patch)
        assert count_examples(train_dir=tmp_path) == 10
        assert count_examples(train_dir=tmp_path, split="validation") == 4
        with pytest.raises(ValueError, match="split 'test' not found"):
            count_examples(train_dir=tmp_path, split="test")
    assert stream_rows(train_dir=tmp_path) == 10


def test_count_uses_the_split_sizes_datasets_knows(tmp_path, monkeypatch):
    """A dataset whose card records its split sizes (as Hub datasets do) is not read at all: the
    recorded 123 wins over the 3 rows actually stored."""
    from hf_mim.data import count_examples

    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict({"image": [{"bytes": encode(photo(0)), "path": None}] * 3},
                               features=datasets.Features({"image": datasets.Image()})).to_parquet(
        str(tmp_path / "data" / "train-0.parquet"))
    (tmp_path / "README.md").write_text(textwrap.dedent(
        """\
        ---
        dataset_info:
          features:
          - name: image
            dtype: image
          splits:
          - name: train
            num_bytes: 1000
            num_examples: 123
        ---
        """
    ))
    import hf_mim.data.streaming as streaming

    monkeypatch.setattr(streaming, "_parquet_rows", lambda path: pytest.fail("read a parquet footer"))
    assert count_examples(dataset_name=str(tmp_path)) == 123


def test_count_refuses_to_download_a_remote_dataset(monkeypatch):
    """Remote tar shards without an index (and remote data of other formats) would have to be
    downloaded to be counted: one clear error asking for --num_train_examples."""
    from types import SimpleNamespace

    from hf_mim.data import count_examples

    def fake_builder(kind, files):
        return lambda **source: SimpleNamespace(
            name=kind, info=datasets.DatasetInfo(), config=SimpleNamespace(data_files={"train": files})
        )

    shards = [f"hf://datasets/someone/web-scale@main/train/{i:05d}.tar" for i in range(3)]
    monkeypatch.setattr(datasets, "load_dataset_builder", fake_builder("webdataset", shards))
    with pytest.raises(ValueError, match=r"would mean downloading its 3 tar shards .*pass --num_train_examples"):
        count_examples(dataset_name="someone/web-scale")
    monkeypatch.setattr(datasets, "load_dataset_builder", fake_builder("json", ["hf://datasets/someone/x@main/a.jsonl"]))
    with pytest.raises(ValueError, match=r"would mean downloading it .*pass --num_train_examples"):
        count_examples(dataset_name="someone/x")


# ------------------------------------------------------------------------------------------- draft decoding


def test_large_jpegs_are_decoded_at_the_scale_the_crop_needs(tmp_path):
    """`decode_min_side` (the transform's `min_decode_side`): a JPEG decodes at the largest 1/2, 1/4,
    1/8 reduction keeping its shorter side >= it; PNGs and small JPEGs are untouched; no crop the
    transform can draw from an image of that side is smaller than the output."""
    transform = MaskedImageTransform(64)
    side = transform.min_decode_side
    assert side == 166  # ceil(64 / sqrt(0.2 * 0.75))
    big = encode(photo(0, (1600, 1200)), "JPEG")
    for min_side, size in ((None, (1600, 1200)), (600, (800, 600)), (300, (400, 300)), (150, (200, 150)),
                           (100, (200, 150)), (1201, (1600, 1200))):
        image, status = decode_image_with_status(big, decode_min_side=min_side)
        assert (image.size, status) == (size, "ok"), min_side
    # the budget needs 1/2, the crops allow 1/4: one decode at 1/4, counted as reduced by the budget
    image, status = decode_image_with_status(big, max_pixels=1_000_000, decode_min_side=300)
    assert (image.size, status) == ((400, 300), "reduced")
    png = encode(photo(0, (1600, 1200)))
    assert decode_image_with_status(png, decode_min_side=150)[0].size == (1600, 1200)
    # every crop of an image whose shorter side is min_decode_side has at least the output's pixels
    generator = torch.Generator().manual_seed(0)
    image = photo(1, (side, side))
    shortest = min(min(transform.get_params(image, generator)[2:]) for _ in range(3000))
    assert 63 <= shortest < 80
    # through a stream
    (tmp_path / "big.jpg").write_bytes(big)
    ds, image_column, _ = load_image_stream(train_dir=tmp_path)
    (example,) = list(prepare_stream(ds, image_column, seed=0, buffer_size=0, decode_min_side=300))
    assert example["image"].size == (400, 300) and example["images_converted"] == 0
