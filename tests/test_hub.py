"""Hub repos: self-contained saves of any hf_mim object, native exports, evaluation preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import run_without_hf_mim
from PIL import Image

import hf_mim
from hf_mim import MODEL_FAMILIES
from hf_mim.data.transforms import EvalTransform
from hf_mim.hub import build_image_processor, full_auto_map, save_hub_folder
from hf_mim.hub import native as native_export
from hf_mim.hub.native import NotExpressible, to_native

LABELS = {0: "cat", 1: "dog", 2: "fish"}


def tiny(family, **overrides):
    return family.config_class.from_preset(
        "tiny", num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, **overrides
    )


def smooth_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A photo-like (smooth) RGB image: upsampled noise."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((height // 4 + 1, width // 4 + 1, 3)) * 255).astype("uint8"))
    return small.resize((width, height), Image.BILINEAR)


def perturbed(model):
    """Non-trivial norms, layer scales, biases, bias tables and head, so that a wrong mapping shows."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in ("norm", "gamma", "relative_position", "bias", "classifier")):
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


# ---------------------------------------------------------------- 1. self-contained saves


def made_in_python(tmp_path):
    return hf_mim.DbotForImageClassification(tiny(MODEL_FAMILIES["dbot"]))


def loaded_from_plain_folder(tmp_path):
    """A folder written before this change (no auto_map, no code), loaded with hf_mim."""
    model = hf_mim.AmtModel(tiny(MODEL_FAMILIES["amt"]))
    torch.save(model.state_dict(), tmp_path / "unused.pt")
    folder = tmp_path / "plain"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("auto_map")
    (folder / "config.json").write_text(json.dumps(config))
    return hf_mim.AmtModel.from_pretrained(folder)


def momentum_backbone(tmp_path):
    return hf_mim.ExtremaForMaskedImageModeling(tiny(MODEL_FAMILIES["extrema"])).momentum_backbone()


def revcolv2_backbone(tmp_path):
    return hf_mim.RevColV2Backbone(tiny(MODEL_FAMILIES["revcolv2"]))


@pytest.mark.parametrize("make", [made_in_python, loaded_from_plain_folder, momentum_backbone, revcolv2_backbone])
def test_save_pretrained_alone_writes_code_and_the_full_auto_map(make, tmp_path):
    model = make(tmp_path)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    model_type = model.config.model_type
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == full_auto_map(model_type)
    written = {path.name for path in folder.glob("*.py")}
    needed = {f"configuration_{model_type}.py", f"modeling_{model_type}.py", "modeling_common.py", "configuration_common.py"}
    assert needed <= written, needed - written


def test_a_remotely_loaded_model_saves_a_self_contained_folder_again(tmp_path):
    """Without hf_mim: load (trust_remote_code), save again, load the copy with every head."""
    family = MODEL_FAMILIES["dbot"]
    save_hub_folder(family.image_classification_class(tiny(family)), tmp_path / "first")
    result = run_without_hf_mim(
        f"""
        import json, transformers
        model = transformers.AutoModelForImageClassification.from_pretrained({str(tmp_path / "first")!r}, trust_remote_code=True)
        model.save_pretrained({str(tmp_path / "second")!r})
        for auto in ("AutoModel", "AutoModelForMaskedImageModeling", "AutoModelForImageClassification"):
            getattr(transformers, auto).from_pretrained({str(tmp_path / "second")!r}, trust_remote_code=True)
        print(json.dumps(json.load(open({str(tmp_path / "second" / "config.json")!r}))["auto_map"]))
        """,
        tmp_path,
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == full_auto_map("dbot")


# ---------------------------------------------------------------- 4. preprocessing = evaluation


@pytest.mark.parametrize("height,width,size", [(200, 300, 224), (300, 200, 224), (41, 57, 32)])
def test_saved_processor_reproduces_the_evaluation_transform_on_non_square_images(height, width, size, tmp_path):
    from transformers import AutoImageProcessor

    image = smooth_image(height, width)
    expected = EvalTransform(size, crop_pct=0.875)(image)
    build_image_processor(size).save_pretrained(tmp_path)
    pil = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")(image, return_tensors="pt").pixel_values[0]
    assert pil.shape == expected.shape
    assert (pil - expected).abs().max().item() <= 1e-4
    # transformers' default backend (torchvision) resizes uint8 tensors: at most one grey level apart
    default = AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt").pixel_values[0]
    assert (default - expected).abs().max().item() <= 1 / 255 / 0.224 + 1e-6


def test_old_square_processor_differed_from_evaluation():
    """What the issue measured: squashing to S x S is far from the evaluation crop."""
    from transformers import ViTImageProcessor

    image = smooth_image(200, 300)
    squashed = ViTImageProcessor(
        size={"height": 224, "width": 224}, resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    )(image, return_tensors="pt").pixel_values[0]
    assert (squashed - EvalTransform(224)(image)).abs().max().item() > 0.1


# ---------------------------------------------------------------- 2. native export

EXPORTS = [
    ("dbot", {}, "classifier", "BeitForImageClassification"),
    ("dbot", {}, "backbone", "BeitModel"),
    ("amt", {"variant": "mae"}, "classifier", "BeitForImageClassification"),
    ("amt", {"variant": "simmim"}, "classifier", "BeitForImageClassification"),
    ("amt", {"variant": "mae"}, "backbone", "BeitModel"),
    ("maskdistill", {}, "classifier", "BeitForImageClassification"),
    ("maskdistill", {}, "backbone", "BeitModel"),
    ("extrema", {"pooling": "mean"}, "classifier", "BeitForImageClassification"),
    ("extrema", {"pooling": "class_attention"}, "classifier", None),
    ("revcolv2", {}, "classifier", None),
    ("revcolv2", {}, "backbone", None),
]


@pytest.mark.parametrize("model_type,overrides,head,native_class", EXPORTS, ids=lambda v: str(v))
def test_native_export_equals_the_hf_mim_model_or_is_refused(model_type, overrides, head, native_class):
    family = MODEL_FAMILIES[model_type]
    cls = family.image_classification_class if head == "classifier" else family.base_model_class
    torch.manual_seed(0)
    model = perturbed(cls(tiny(family, **overrides)))
    if native_class is None:
        with pytest.raises(NotExpressible) as refusal:
            to_native(model)
        assert "\n" not in str(refusal.value)
        return
    native, difference = to_native(model)
    assert type(native).__name__ == native_class
    assert difference <= 1e-5
    # independently of the check inside to_native: the native model on other images
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours, theirs = model(pixels), native(pixels)
    key = "logits" if head == "classifier" else "pooler_output"
    assert (ours[key] - theirs[key]).abs().max().item() <= 1e-5


def test_export_refuses_a_model_it_does_not_reproduce(monkeypatch):
    """Without the bias entry that hides BEiT's cls token, ExtreMA's export differs: refused."""
    monkeypatch.setattr(native_export, "HIDDEN_CLS", 0.0)
    family = MODEL_FAMILIES["extrema"]
    torch.manual_seed(0)
    with pytest.raises(NotExpressible, match="differs"):
        to_native(perturbed(family.image_classification_class(tiny(family, pooling="mean"))))


def test_exported_folder_serves_the_evaluation_logits_without_hf_mim(tmp_path):
    """CLI export -> AutoModelForImageClassification and pipeline() in a process without hf_mim and
    without trust_remote_code; the pipeline's logits equal the evaluation loop's."""
    from hf_mim.data import ClassificationCollator
    from hf_mim.export import main as export_main

    family = MODEL_FAMILIES["maskdistill"]
    torch.manual_seed(0)
    model = perturbed(family.image_classification_class(tiny(family)))
    save_hub_folder(model, tmp_path / "hf_mim_form")
    assert export_main(["--model_name_or_path", str(tmp_path / "hf_mim_form"), "--output_dir", str(tmp_path / "native")]) == 0
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "beit"
    assert not list((tmp_path / "native").glob("*.py"))

    images = [smooth_image(41, 57, seed=1), smooth_image(60, 45, seed=2)]
    for index, image in enumerate(images):
        image.save(tmp_path / f"image{index}.png")
    batch = ClassificationCollator(EvalTransform(32))([{"image": image, "label": 0, "example_id": str(i)} for i, image in enumerate(images)])
    with torch.no_grad():
        evaluation = model(batch["pixel_values"]).logits  # what the evaluation loop computes
    result = run_without_hf_mim(
        f"""
        import json
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
        folder = {str(tmp_path / "native")!r}
        model = AutoModelForImageClassification.from_pretrained(folder)
        images = [Image.open({str(tmp_path)!r} + f"/image{{i}}.png") for i in range(2)]
        report = {{}}
        for backend in ("pil", None):
            kwargs = {{"backend": backend}} if backend else {{}}
            classify = pipeline("image-classification", model=model, image_processor=AutoImageProcessor.from_pretrained(folder, **kwargs))
            rows = []
            for image in images:
                scores = {{p["label"]: p["score"] for p in classify(image, top_k=3, function_to_apply="none")}}
                rows.append([scores[model.config.id2label[i]] for i in range(3)])
            report[backend or "default"] = rows
        default = pipeline("image-classification", model=folder)(images[0], top_k=3)
        report["plain_pipeline_labels"] = sorted(p["label"] for p in default)
        print(json.dumps(report))
        """,
        tmp_path,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["plain_pipeline_labels"] == ["cat", "dog", "fish"]
    assert (torch.tensor(report["pil"]) - evaluation).abs().max().item() <= 1e-5
    # default (torchvision) backend: pixels at most one grey level apart, logits close
    assert (torch.tensor(report["default"]) - evaluation).abs().max().item() <= 1e-2
