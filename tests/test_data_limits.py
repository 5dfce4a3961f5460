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


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def photo(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)


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
