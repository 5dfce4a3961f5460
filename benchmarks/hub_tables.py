"""The Hub tables of issue 12: native export (method x head -> native class, largest difference) and
the saved image processor against the evaluation transform (before: ViT's S x S squash; after: the
CLIP-style short-side resize + centre crop, PIL and torchvision backends).

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/hub_tables.py [--fixtures ../shared/fixtures]

Classifiers come from the official fixture state dicts (converted) where the fixtures have one, and
from tiny random models with perturbed norms, scales and bias tables otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, ViTImageProcessor

import hf_mim
from hf_mim import MODEL_FAMILIES
from hf_mim.data.transforms import EvalTransform
from hf_mim.hub import build_image_processor
from hf_mim.hub.native import NotExpressible, to_native

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import perturbed  # noqa: E402  (the same perturbation the export tests use)

OFFICIAL = {  # fixture folder -> (converter, config overrides the tiny fixtures need)
    "dbot": ("convert_dbot_checkpoint", {"num_attention_heads": 2}),
    "amt_mae": ("convert_amt_checkpoint", {"num_attention_heads": 12}),
    "amt_simmim": ("convert_amt_checkpoint", {"num_attention_heads": 12}),
    "extrema": ("convert_extrema_checkpoint", {"num_attention_heads": 2}),
    "maskdistill": ("convert_maskdistill_checkpoint", None),
}


def export_row(label: str, model) -> str:
    try:
        native, difference = to_native(model.eval())
        return f"| {label} | {type(model).__name__} | {type(native).__name__} | {difference:.2e} |"
    except NotExpressible as reason:
        return f"| {label} | {type(model).__name__} | refused: {reason} | - |"


def export_table(fixtures: Path) -> None:
    import hf_mim.convert as convert

    print("| source | hf_mim class | native class | max difference |\n|---|---|---|---|")
    for folder, (converter, overrides) in OFFICIAL.items():
        path = fixtures / folder / "official_classifier_state_dict.safetensors"
        if path.is_file():
            model, _ = getattr(convert, converter)(load_file(str(path)), overrides=overrides)
            print(export_row(f"official fixture {folder}", model))
    torch.manual_seed(0)
    for model_type, overrides in [("dbot", {}), ("amt", {"variant": "mae"}), ("amt", {"variant": "simmim"}),
                                  ("maskdistill", {}), ("extrema", {"pooling": "mean"}),
                                  ("extrema", {"pooling": "class_attention"}), ("revcolv2", {})]:
        family = MODEL_FAMILIES[model_type]
        config = family.config_class.from_preset("tiny", num_labels=5, **overrides)
        for cls in (family.image_classification_class, family.base_model_class):
            print(export_row(f"tiny random {model_type} {overrides or ''}", perturbed(cls(config))))


def processor_table() -> None:
    rng = np.random.default_rng(0)
    print("\n| image (h x w) | size | ViT squash (before) | CLIP-style, PIL backend | CLIP-style, torchvision backend |")
    print("|---|---|---|---|---|")
    for height, width, size in [(200, 300, 224), (300, 200, 224), (375, 500, 224), (41, 57, 32)]:
        small = Image.fromarray((rng.random((height // 4 + 1, width // 4 + 1, 3)) * 255).astype("uint8"))
        image = small.resize((width, height), Image.BILINEAR)
        expected = EvalTransform(size)(image)
        before = ViTImageProcessor(
            size={"height": size, "width": size}, resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
        )(image, return_tensors="pt").pixel_values[0]
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            build_image_processor(size).save_pretrained(folder)
            pil = AutoImageProcessor.from_pretrained(folder, backend="pil")(image, return_tensors="pt").pixel_values[0]
            vision = AutoImageProcessor.from_pretrained(folder, backend="torchvision")(image, return_tensors="pt").pixel_values[0]
        diffs = [(t - expected).abs().max().item() for t in (before, pil, vision)]
        print(f"| {height} x {width} | {size} | " + " | ".join(f"{d:.3g}" for d in diffs) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "fixtures")
    args = parser.parse_args()
    assert hf_mim  # registers the classes
    export_table(args.fixtures)
    processor_table()


if __name__ == "__main__":
    main()
