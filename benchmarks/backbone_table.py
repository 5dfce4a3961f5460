"""The AutoBackbone table: per method (and AMT host), the feature strides each pyramid returns at the Base
size and the parameter counts (encoder alone, and encoder + pyramid), built on the meta device.

    python benchmarks/backbone_table.py [--size base] [--image_size 512]

Also runs one 64 x 64 forward of each tiny backbone, so the printed strides are what the maps have.
"""

from __future__ import annotations

import argparse

import torch

from hf_mim import MODEL_FAMILIES

HOSTS = {"amt": [{"variant": "mae"}, {"variant": "simmim"}]}
PYRAMIDS = {"revcolv2": ("multi_scale",)}  # RevColV2 resamples its own levels; it has no one-block (ViTDet) pyramid


def count(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base")
    parser.add_argument("--image_size", type=int, default=512, help="crop whose map sizes are printed")
    args = parser.parse_args()
    print(f"| method | pyramid | out_features ({args.size}) | strides | maps at {args.image_size}^2 | encoder params (M) | backbone params (M) |")
    print("|---|---|---|---|---|---|---|")
    for model_type, family in MODEL_FAMILIES.items():
        if family.backbone_class is None:
            continue
        for extra in HOSTS.get(model_type, [{}]):
            for pyramid in PYRAMIDS.get(model_type, ("multi_scale", "simple")):
                config = family.config_class.from_preset(args.size, backbone_pyramid=pyramid, **extra)
                with torch.device("meta"):
                    backbone = family.backbone_class(config)
                encoder = getattr(backbone, backbone.base_model_prefix)
                trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad) / 1e6
                strides = [int(s) if float(s).is_integer() else s for s in backbone.feature_strides]
                sides = [int(args.image_size / s) for s in backbone.feature_strides]
                name = model_type + (f" ({extra['variant']})" if extra else "")
                print(
                    f"| {name} | {pyramid} | {', '.join(backbone.out_features)} | {strides} | "
                    f"{[f'{c}x{s}x{s}' for c, s in zip(backbone.channels, sides)]} | {count(encoder):.2f} | "
                    f"{count(backbone):.2f} (trainable {trainable:.2f}) |"
                )
                # the stride rule is what a (tiny, patch 8) backbone of the same kind returns
                vit = {} if model_type == "revcolv2" else dict(num_hidden_layers=4, backbone_pyramid_channels=16)
                tiny = family.config_class.from_preset("tiny", backbone_pyramid=pyramid, **vit, **extra)
                small = family.backbone_class(tiny).eval()
                with torch.no_grad():
                    maps = small(torch.randn(1, 3, 64, 64)).feature_maps
                assert [64 // m.shape[-1] for m in maps] == [int(s) for s in small.feature_strides], model_type


if __name__ == "__main__":
    main()
