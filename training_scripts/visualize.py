#!/usr/bin/env python
"""Pictures of what a pretraining checkpoint does, for any hf_mim method (hf-mim-visualize).

    hf-mim-visualize --model_name_or_path outputs/run_mim --images photos/ --output_dir pictures/
    python -m hf_mim.scripts.visualize --model_name_or_path <folder or Hub id> --images a.jpg b.png \
        --output_dir pictures/ --seed 1 --mask_ratio 0.6

One PNG per image (`<image name>.png`): the input (centred crop at the model's size), the input with the
patches the model's own mask generator hides (seeded by --seed and the image's content), and what that
method's picture shows besides (dBOT, MaskDistill: the per-patch loss; RevColV2: the loss and the
reconstruction; AMT: the loss, its attention map with the masked / thrown / visible patches and the
reconstruction). The same as a function: `hf_mim.training.visualize_checkpoint`.
"""

from __future__ import annotations

import argparse
import logging
import sys

import hf_mim  # noqa: F401  (registers every hf_mim model with the Auto classes)
from hf_mim.training.run_setup import check_positive_flags, report_user_errors
from hf_mim.training import visualize_checkpoint

SCRIPT = "hf-mim-visualize"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="a pretraining folder (run_mim.py's output) or Hub id")
    parser.add_argument("--images", nargs="+", required=True, help="image files and/or folders (searched recursively)")
    parser.add_argument("--output_dir", required=True, help="where the pictures go (<image name>.png)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the masks (with each image's content)")
    parser.add_argument("--mask_ratio", type=float, help="instead of the checkpoint's mask ratio")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--model_revision", help="Hub revision of --model_name_or_path")
    parser.add_argument("--cache_dir")
    parser.add_argument("--token", help="Hub token (private repositories)")
    args = parser.parse_args(argv)
    check_positive_flags(parser, args, fractions=("mask_ratio",))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    with report_user_errors(SCRIPT):
        paths = visualize_checkpoint(
            args.model_name_or_path, args.images, args.output_dir, seed=args.seed, mask_ratio=args.mask_ratio,
            device=args.device, revision=args.model_revision, cache_dir=args.cache_dir, token=args.token,
        )
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
