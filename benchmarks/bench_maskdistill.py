#!/usr/bin/env python
"""MaskDistill: where a training step's time goes — the frozen teacher's forward vs the student step.

A randomly initialised CLIP vision teacher of the chosen width (saved to a temporary folder and loaded
the way training loads it) and a MaskDistill student of the same patch grid. Timed, in one process,
alternating: the teacher forward alone (no grad), the student step alone (forward + backward + AdamW,
with the teacher's features for that batch injected), and the full step. Median of --steps.

    python benchmarks/bench_maskdistill.py [--preset base] [--image_size 224] [--batch 8] [--steps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from hf_mim import MaskDistillConfig, MaskDistillForMaskedImageModeling
from hf_mim.convert.maskdistill import save_teacher_folder

TEACHERS = {  # CLIP ViT vision towers (width, depth, heads)
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}


@contextlib.contextmanager
def injected_teacher(model, features: torch.Tensor):
    """Make the model use precomputed teacher features, so the student step excludes the teacher."""
    original = model.teacher_features
    model.teacher_features = lambda pixel_values: features
    try:
        yield
    finally:
        model.teacher_features = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(TEACHERS))
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    width, depth, heads = TEACHERS[args.preset]
    teacher_config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth, num_attention_heads=heads,
        image_size=args.image_size, patch_size=16,
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_teacher_folder(CLIPVisionModel(teacher_config).eval(), Path(tmp) / "teacher")
        config = MaskDistillConfig.for_teacher(
            str(folder), preset="base", image_size=args.image_size, patch_size=16,
            hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,  # student as wide as the teacher
        )
        model = MaskDistillForMaskedImageModeling(config).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        pixel_values = torch.randn(args.batch, 3, args.image_size, args.image_size)
        masks = torch.stack([model.mask_generator()(torch.Generator().manual_seed(i)) for i in range(args.batch)])

        def teacher():
            with torch.no_grad():
                return model.teacher_features(pixel_values)

        def step():
            model(pixel_values, bool_masked_pos=masks).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        times = {"teacher forward": [], "student step": [], "full step": []}
        for index in range(args.steps + 1):
            start = time.perf_counter()
            features = teacher()
            teacher_time = time.perf_counter() - start
            with injected_teacher(model, features):
                start = time.perf_counter()
                step()
                student_time = time.perf_counter() - start
            start = time.perf_counter()
            step()
            full_time = time.perf_counter() - start
            if index > 0:  # the first round is warm-up
                times["teacher forward"].append(teacher_time)
                times["student step"].append(student_time)
                times["full step"].append(full_time)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"MaskDistill, student {config.hidden_size} wide x {config.num_hidden_layers}, CLIP teacher {width} wide x "
          f"{depth}, {args.image_size} px, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.steps}")
    for name, value in medians.items():
        print(f"{name:<16} {value:8.3f} s  ({100 * value / medians['full step']:5.1f} % of the full step)")


if __name__ == "__main__":
    main()
