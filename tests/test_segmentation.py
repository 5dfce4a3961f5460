"""Semantic segmentation: the metrics against a hand computation, the joint transforms (image and map
stay aligned), data sources, sliding-window inference, and training_scripts/run_semantic_segmentation.py
end to end (tiny dBOT on a tiny generated set), its resume, its Hub folder without hf_mim, its errors."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hf_mim.data.segmentation import (
    SegmentationCollator, SegmentationEvalTransform, SegmentationTrainTransform, decode_mask, pairs_folder_stream,
    reduce_labels,
)
from hf_mim.data import prepare_stream
from hf_mim.training.metrics import SegmentationMeter
from hf_mim.training.segmentation import padded_logits, slide_logits

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "training_scripts" / "run_semantic_segmentation.py"
PALETTE = np.array([[0, 0, 0], [250, 10, 10], [10, 250, 10], [10, 10, 250]], dtype=np.uint8)


def load_script():
    spec = importlib.util.spec_from_file_location("run_semantic_segmentation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def blocks(seed: int, size=(40, 48), cell: int = 8) -> np.ndarray:
    """A map of random classes 0..3 in cell x cell blocks (no class symmetry: flips are visible)."""
    rng = np.random.RandomState(seed)
    grid = rng.randint(0, 4, size=(size[0] // cell, size[1] // cell))
    return np.kron(grid, np.ones((cell, cell), dtype=np.int64)).astype(np.uint8)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ metrics


def test_segmentation_meter_matches_a_hand_computation():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    predictions = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])  # the 255 pixels are ignored whatever predicted
    meter = SegmentationMeter(num_labels=4, ignore_index=255)
    meter.update(predictions, labels)
    assert meter.confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    results = meter.compute()
    # class 0: TP 1, FP 1 (a 2 predicted 0), FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: 1/2; class 3: absent
    assert results["per_class_iou"][:3] == pytest.approx([100 / 3, 200 / 3, 50])
    assert results["per_class_iou"][3] is None
    assert results["mean_iou"] == pytest.approx((100 / 3 + 200 / 3 + 50) / 3)
    assert results["pixel_accuracy"] == pytest.approx(100 * 4 / 6)
    assert results["mean_accuracy"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 2) / 3)
    assert results["eval_pixels"] == 6
    with pytest.raises(ValueError, match="--reduce_labels"):
        meter.update(torch.zeros(2, dtype=torch.long), torch.tensor([0, 7]))


def test_reduce_labels_as_scene_parse_150():
    assert reduce_labels(np.array([0, 1, 2, 150, 255])).tolist() == [255, 0, 1, 149, 255]


# ------------------------------------------------------------------------------------ transforms


def colour_classes(pixels: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation and read each pixel's class from its palette colour (255: padding)."""
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    rgb = ((pixels * std + mean) * 255).round()
    distances = ((rgb[None] - torch.tensor(PALETTE, dtype=torch.float32)[:, :, None, None]) ** 2).sum(1)
    classes = distances.argmin(0)
    classes[(pixels == 0).all(0)] = 255  # padded pixels are 0 after normalisation
    return classes


@pytest.mark.parametrize("seed", range(6))
def test_crop_flip_pad_keep_image_and_map_aligned(seed):
    """No rescale (ratio 1): every pixel's colour still names its label, across crops, flips and padding."""
    mask = blocks(seed)
    image = Image.fromarray(PALETTE[mask])
    transform = SegmentationTrainTransform(crop_size=32, scale=40, ratio_range=(1.0, 1.0), photometric=False)
    generator = torch.Generator().manual_seed(seed)
    pixels, labels = transform(image, Image.fromarray(mask), generator)
    assert pixels.shape == (3, 32, 32) and labels.shape == (32, 32) and labels.dtype == torch.int64
    assert torch.equal(colour_classes(pixels), labels)
    # the crop is a 32 x 32 window of the 40 x 48 map, possibly mirrored
    full = torch.from_numpy(mask.astype(np.int64))
    assert any(torch.equal(full[t:t + 32, l:l + 32], view) for t in range(9) for l in range(17)
               for view in (labels, labels.flip(-1)))


def test_rescale_uses_nearest_for_the_map_and_pads_with_ignore():
    mask = blocks(0, size=(40, 48), cell=8)
    image = Image.fromarray(PALETTE[mask])
    transform = SegmentationTrainTransform(crop_size=64, scale=40, ratio_range=(0.5, 0.5), photometric=False)
    pixels, labels = transform(image, Image.fromarray(mask), torch.Generator().manual_seed(0))
    # 48 x 40 -> 24 x 20: the map keeps only original ids (no interpolation), the rest is padding
    assert set(labels.unique().tolist()) <= {0, 1, 2, 3, 255}
    assert (labels[20:] == 255).all() and (labels[:, 24:] == 255).all() and (labels[:20, :24] != 255).all()
    expected = torch.from_numpy(np.array(Image.fromarray(mask).resize((24, 20), Image.Resampling.NEAREST))).long()
    assert torch.equal(labels[:20, :24], expected) or torch.equal(labels[:20, :24], expected.flip(-1))
    agree = (colour_classes(pixels)[:20, :24] == labels[:20, :24]).float().mean()
    assert agree > 0.7  # bilinear image, nearest map: they differ only along block borders


def test_photometric_distortion_changes_pixels_not_labels():
    mask = blocks(1)
    image = Image.fromarray(PALETTE[mask])
    plain = SegmentationTrainTransform(32, 40, ratio_range=(1.0, 1.0), photometric=False)
    distorted = SegmentationTrainTransform(32, 40, ratio_range=(1.0, 1.0), photometric=True)
    changed = 0
    for seed in range(4):
        a = plain(image, Image.fromarray(mask), torch.Generator().manual_seed(seed))
        b = distorted(image, Image.fromarray(mask), torch.Generator().manual_seed(seed))
        changed += int(not torch.equal(a[0], b[0]))
        assert torch.equal(colour_classes(a[0]), a[1])  # undistorted: colours name the labels
        assert set(b[1].unique().tolist()) <= {0, 1, 2, 3}  # distortion never touches the map
    assert changed > 0


def test_collator_is_a_pure_function_of_seed_epoch_and_example():
    examples = [{"image": Image.fromarray(PALETTE[blocks(i)]), "mask": Image.fromarray(blocks(i)), "example_id": 10 + i}
                for i in range(3)]
    collator = SegmentationCollator(SegmentationTrainTransform(32, 40), seed=3)
    first = collator(examples)
    again = collator(list(reversed(examples)))
    assert torch.equal(first["labels"], again["labels"].flip(0)) and torch.equal(first["pixel_values"], again["pixel_values"].flip(0))
    collator.set_epoch(1)
    assert not torch.equal(collator(examples)["pixel_values"], first["pixel_values"])
    evaluation = SegmentationCollator(SegmentationEvalTransform(16))([
        {"image": Image.new("RGB", (32, 16)), "mask": Image.new("L", (32, 16)), "example_id": 1},
        {"image": Image.new("RGB", (16, 32)), "mask": Image.new("L", (16, 32)), "example_id": 2}])
    # both fit (long <= 64, short <= 16) as they are; padded to the largest (32 x 32) with ignore
    labels = evaluation["labels"]
    assert evaluation["pixel_values"].shape == (2, 3, 32, 32)
    assert (labels[0, 16:] == 255).all() and (labels[0, :16] == 0).all() and (labels[1, :, 16:] == 255).all()


def test_folder_of_pairs_streams_decoded_maps(tmp_path):
    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        for index in range(3):
            mask = blocks(index)
            Image.fromarray(PALETTE[mask]).save(tmp_path / "images" / split / f"ADE_{index}.jpg")
            (tmp_path / "annotations" / split / f"ADE_{index}.png").write_bytes(png(mask))
    stream = prepare_stream(pairs_folder_stream(tmp_path, "validation"), "image", seed=0, buffer_size=0,
                            mask_column="annotation")
    examples = sorted(stream, key=lambda e: e["example_id"])
    assert len(examples) == 3
    masks = {tuple(np.asarray(e["mask"]).ravel()[:5]) for e in examples}
    assert all(e["mask"].size == e["image"].size == (48, 40) and e["mask"].mode == "L" for e in examples)
    assert len(masks) >= 2
    assert decode_mask(b"not an image") is None


# ------------------------------------------------------------------------------------ inference


class PixelwiseModel(torch.nn.Module):
    """Logits that depend on each pixel only: sliding windows must reproduce whole-image logits."""

    def forward(self, pixel_values):
        assert pixel_values.shape[-1] % 8 == 0 and pixel_values.shape[-2] % 8 == 0
        logits = torch.stack([pixel_values.sum(1), -pixel_values[:, 0]], dim=1)
        return type("Output", (), {"logits": logits})()


def test_sliding_window_equals_whole_image_for_a_pixelwise_model():
    pixels = torch.randn(2, 3, 37, 53)
    whole = padded_logits(PixelwiseModel(), pixels, multiple=8)
    assert whole.shape == (2, 2, 37, 53)
    slide = slide_logits(PixelwiseModel(), pixels, crop=16, stride=11, multiple=8)
    torch.testing.assert_close(slide, whole, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ the script


def write_pairs_parquet(folder: Path, split: str, count: int, seed: int) -> None:
    from datasets import Features, Value
    from datasets import Image as ImageFeature
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = Features({"image": ImageFeature(), "annotation": ImageFeature(), "__key__": Value("string")})
    masks = [blocks(seed * 100 + i, size=(32, 32)) for i in range(count)]
    rows = {"image": [{"bytes": png(PALETTE[m]), "path": None} for m in masks],
            "annotation": [{"bytes": png(m), "path": None} for m in masks],
            "__key__": [f"{split}/{i}" for i in range(count)]}
    (folder / split).mkdir(parents=True, exist_ok=True)
    for shard in range(2):
        part = {k: v[shard::2] for k, v in rows.items()}
        pq.write_table(pa.Table.from_pydict(part, schema=features.arrow_schema), folder / split / f"{split}-{shard:05d}-of-00002.parquet")


TINY = ["--model_type", "dbot", "--model_size", "tiny", "--config_overrides", "num_hidden_layers=4",
        "--num_labels", "4", "--crop_size", "32", "--decode_head_channels", "16", "--per_device_train_batch_size", "4",
        "--num_warmup_steps", "1", "--logging_steps", "1", "--shuffle_buffer_size", "8", "--max_train_steps", "4",
        "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_semantic_segmentation")
    write_pairs_parquet(root / "pairs", "train", 16, seed=1)
    write_pairs_parquet(root / "pairs", "validation", 4, seed=2)
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_MIM_CACHE=str(root / "cache"), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO_ROOT))
    return {"root": root, "pairs": root / "pairs", "env": env}


def run_script(workspace, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=workspace["env"],
                            cwd=workspace["root"], timeout=900)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return result


@pytest.fixture(scope="module")
def straight_run(workspace):
    out = workspace["root"] / "straight"
    result = run_script(workspace, *TINY, "--train_dir", str(workspace["pairs"]), "--output_dir", str(out),
                        "--checkpointing_steps", "2", "--eval_steps", "2", "--eval_mode", "slide", "--eval_stride", "16")
    return out, result


def test_end_to_end_run_writes_a_hub_folder(straight_run):
    out, result = straight_run
    assert "mIoU=" in result.stdout
    results = json.loads((out / "eval_results.json").read_text())
    assert 0 <= results["mean_iou"] <= 100 and len(results["per_class_iou"]) == 4
    assert [entry["step"] for entry in results["history"]] == [2, 4] or len(results["history"]) >= 1
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "upernet" and config["backbone_config"]["model_type"] == "dbot"
    assert config["auto_map"]["AutoModelForSemanticSegmentation"] == "modeling_upernet.MIMUperNetForSemanticSegmentation"
    for name in ("model.safetensors", "preprocessor_config.json", "modeling_upernet.py", "modeling_dbot.py",
                 "backbone_common.py", "training_args.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-segmentation" in card and "mean_iou" in card and "model-index" in card
    from hf_mim.hub.verify import verify_code

    assert verify_code(out).identical and "modeling_upernet.py" in verify_code(out).files  # hf_mim_code.json written


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(workspace, straight_run):
    out, _ = straight_run
    resumed = workspace["root"] / "resumed"
    result = run_script(workspace, *TINY, "--train_dir", str(workspace["pairs"]), "--output_dir", str(resumed),
                        "--eval_steps", "2", "--eval_mode", "slide", "--eval_stride", "16",
                        "--resume_from_checkpoint", str(out / "checkpoint-2"))
    assert "resumed from" in result.stderr
    straight, again = load_file(str(out / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert straight.keys() == again.keys()
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_folder_loads_without_hf_mim(straight_run, tmp_path):
    from helpers import run_without_hf_mim

    from transformers import AutoModelForSemanticSegmentation

    out, _ = straight_run
    pixels = torch.randn(1, 3, 32, 32)
    torch.save(pixels, tmp_path / "pixels.pt")
    expected = AutoModelForSemanticSegmentation.from_pretrained(out).eval()(pixels).logits
    result = run_without_hf_mim(f"""
        import torch
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation
        model = AutoModelForSemanticSegmentation.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert "hf_mim" not in type(model.backbone).__module__
        processor = AutoImageProcessor.from_pretrained({str(out)!r})
        logits = model(torch.load({str(tmp_path / "pixels.pt")!r})).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        print(type(model.backbone).__name__, type(processor).__name__)
    """, tmp_path)
    assert "DbotBackbone" in result.stdout
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-5)


def test_segmentation_folder_loads_whole(workspace, straight_run):
    """A folder of this script given as --model_name_or_path loads every weight (nothing fresh); with
    another label set only the two classifiers start fresh, and the run says so."""
    from hf_mim.training.segmentation import build_model

    out, _ = straight_run
    script = load_script()
    saved = load_file(str(out / "model.safetensors"))
    args = script.parse_args(["--model_name_or_path", str(out), "--train_dir", str(workspace["pairs"]), "--num_labels", "4",
                              "--crop_size", "32"])
    model, missing = build_model(args, {i: str(i) for i in range(4)})
    assert missing == []
    state = model.state_dict()
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    args.num_labels = 5
    model, missing = build_model(args, {i: str(i) for i in range(5)})
    assert missing and all(key.split(".")[0] in ("decode_head", "auxiliary_head") and ".classifier." in key for key in missing)
    assert model.config.num_labels == 5 and torch.equal(model.state_dict()["backbone.dbot.encoder.layers.0.attn.qkv.weight"],
                                                        saved["backbone.dbot.encoder.layers.0.attn.qkv.weight"])


def test_pretraining_checkpoint_loads_into_the_backbone(workspace, tmp_path, fresh_accelerate_state):
    """Encoder weights load from a run_mim.py-style folder; the model reports what it did not provide."""
    from hf_mim import DbotConfig, DbotForMaskedImageModeling
    from hf_mim.hub import save_hub_folder

    script = load_script()
    torch.manual_seed(0)
    pretrained = DbotForMaskedImageModeling(DbotConfig.from_preset("tiny", num_hidden_layers=4))
    save_hub_folder(pretrained, tmp_path / "pre")
    args = script.parse_args(["--model_name_or_path", str(tmp_path / "pre"), "--train_dir", str(workspace["pairs"]),
                              "--num_labels", "4", "--crop_size", "32", "--decode_head_channels", "16"])
    from hf_mim.training.segmentation import build_model

    model, missing = build_model(args, {i: str(i) for i in range(4)})
    encoder = pretrained.dbot.encoder.state_dict()
    for key, tensor in model.backbone.dbot.encoder.state_dict().items():
        if key in encoder:
            assert torch.equal(tensor, encoder[key]), key
    assert missing and all(key.startswith("backbone.pyramid.") for key in missing)
    args.random_init = True
    baseline, _ = build_model(args, {i: str(i) for i in range(4)})
    assert not torch.equal(baseline.backbone.dbot.encoder.layers[0].attn.qkv.weight, pretrained.dbot.encoder.layers[0].attn.qkv.weight)


def test_bad_flags_are_one_line_errors(workspace, capsys):
    script = load_script()
    base = ["--train_dir", str(workspace["pairs"]), "--model_type", "dbot", "--model_size", "tiny"]
    cases = [
        ([*base, "--layer_decay", "0"], "--layer_decay must be in (0, 1]"),
        ([*base, "--num_labels", "4", "--id2label", "{}"], "either --num_labels or --id2label"),
        ([*base, "--compare_random_init"], "--compare_random_init"),
        (["--train_dir", str(workspace["pairs"])], "--model_name_or_path"),
        ([*base, "--crop_size", "0"], "--crop_size"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as error:
            script.parse_args(argv)
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.value.code == 2 and expected in message, (argv, message)


def test_missing_label_set_and_column_are_one_line_errors(workspace, capsys, fresh_accelerate_state):
    script = load_script()
    out = workspace["root"] / "refused"
    base = ["--train_dir", str(workspace["pairs"]), "--model_type", "dbot", "--model_size", "tiny", "--output_dir", str(out)]
    for argv, expected in (([*base], "--num_labels"),
                           ([*base, "--num_labels", "4", "--segmentation_column_name", "seg_map"], "--segmentation_column_name")):
        with pytest.raises(SystemExit) as error:
            script.main(argv)
        assert error.value.code == 2
        assert expected in capsys.readouterr().err
    assert not out.exists()


def test_train_val_split_and_sample_limits_select_fixed_disjoint_pairs(tmp_path):
    """The examples' --train_val_split / --max_train_samples / --max_eval_samples (transformers' flag names)
    on segmentation pairs: a held-out part chosen by example id, disjoint from training, limits on top."""
    from hf_mim.data.segmentation import load_segmentation_data

    write_pairs_parquet(tmp_path / "pairs", "train", count=16, seed=3)
    args = load_script().parse_args([*TINY, "--train_dir", str(tmp_path / "pairs"), "--train_val_split", "0.25",
                                     "--output_dir", str(tmp_path / "out")])

    def keys(stream):
        return [example["__key__"] for example in stream]

    data = load_segmentation_data(args, embedded=False, image_size=32, need_count=True)
    train, held_out = keys(data.train), keys(data.validation[0])
    assert set(train).isdisjoint(held_out) and len(train) + len(held_out) == 16 and held_out
    assert data.num_examples == 12 and keys(load_segmentation_data(args, False, 32, False).validation[0]) == held_out
    args.max_train_samples, args.max_eval_samples = 3, 1
    limited = load_segmentation_data(args, embedded=False, image_size=32, need_count=True)
    assert keys(limited.train) == train[:3] and keys(limited.validation[0]) == held_out[:1] and limited.num_examples == 3


# ------------------------------------------------------------------------------------ the embedded set


@pytest.mark.parametrize("name, area", [("square", 1.0), ("disk", np.pi / 4), ("triangle", 0.5),
                                         ("cross", 2 * 0.3 - 0.3 * 0.3)])
def test_embedded_shapes_have_their_geometric_area(name, area):
    """Each class is the shape its name says: its filled fraction of the box, by hand (cross: two bars of
    width 0.3 minus their overlap)."""
    from hf_mim.data.segmentation import shape_mask

    assert abs(shape_mask(name, 200).mean() - area) < 0.02


def test_embedded_set_maps_are_exact_and_reproducible(tmp_path):
    """800 / 200 pairs with the label table; every labelled object is one flat colour in the image (the
    map is exact, not drawn separately); a second build writes the same bytes."""
    import pandas as pd

    from hf_mim.data.segmentation import EMBEDDED_ID2LABEL, embedded_segmentation_dir

    folder = embedded_segmentation_dir(tmp_path / "a", image_size=32)
    assert json.loads((folder / "id2label.json").read_text()) == {str(k): v for k, v in EMBEDDED_ID2LABEL.items()}
    frames = {split: pd.read_parquet(folder / split) for split in ("train", "validation")}
    assert {split: len(frame) for split, frame in frames.items()} == {"train": 800, "validation": 200}
    seen = set()
    for row in frames["validation"].itertuples():
        image = np.asarray(Image.open(io.BytesIO(row.image["bytes"])).convert("RGB")).astype(int)
        labels = np.asarray(Image.open(io.BytesIO(row.annotation["bytes"])))
        assert labels.shape == (32, 32) and (labels > 0).any()
        for label in np.unique(labels[labels > 0]):
            seen.add(int(label))
            colours = np.unique(image[labels == label].reshape(-1, 3), axis=0)
            assert len(colours) <= 3, (row.__key__, label)  # 1-3 objects of one class, one colour each
    assert seen == set(range(1, len(EMBEDDED_ID2LABEL)))
    again = embedded_segmentation_dir(tmp_path / "b", image_size=32)
    assert (again / "validation" / "validation-00000-of-00001.parquet").read_bytes() == \
        (folder / "validation" / "validation-00000-of-00001.parquet").read_bytes()


@pytest.mark.slow
def test_embedded_default_compares_with_random_initialisation(workspace, tmp_path, fresh_accelerate_state):
    """No data flags and a checkpoint: the embedded set, then the same recipe from random initialisation
    in the sibling <output_dir>-random_init, both mIoUs in comparison.json and on stdout."""
    from hf_mim import DbotConfig, DbotForMaskedImageModeling
    from hf_mim.hub import save_hub_folder

    save_hub_folder(DbotForMaskedImageModeling(DbotConfig.from_preset("tiny", image_size=64, num_hidden_layers=4)), tmp_path / "pre")
    out = tmp_path / "seg"
    result = run_script(workspace, "--model_name_or_path", str(tmp_path / "pre"), "--output_dir", str(out),
                        "--max_train_steps", "2", "--max_eval_samples", "4", "--decode_head_channels", "16")
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["checkpoint"] == str(tmp_path / "pre")
    assert f"mIoU pretrained={comparison['pretrained']:.2f} random_init={comparison['random_init']:.2f}" in result.stdout
    baseline = tmp_path / "seg-random_init"
    for folder in (out, baseline):
        results = json.loads((folder / "eval_results.json").read_text())
        assert len(results["per_class_iou"]) == 5
    assert json.loads((baseline / "config.json").read_text())["id2label"]["1"] == "disk"
    assert not (out / "random_init").exists()
