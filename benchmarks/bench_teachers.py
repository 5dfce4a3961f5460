#!/usr/bin/env python
"""Teacher share of a training step, for every method that regresses a frozen teacher.

For each (method, teacher) pair: the teacher's forward alone (no grad, the exact call the objective makes)
and the full training step (forward with the teacher + backward + AdamW), median of --steps after one
warm-up round, and their ratio. Teachers are randomly initialised, saved to a temporary folder and loaded
the way training loads them (hf_mim/teachers.py); students and teachers have the same width and depth, so
the ratio reflects the methods' structure, not a size mismatch.

    python benchmarks/bench_teachers.py [--image_size 64] [--patch_size 8] [--width 192] [--depth 12]
        [--batch 8] [--steps 3] [--device cpu|cuda] [--bf16]

`--bf16` runs the step under bf16 autocast (GPUs; this CPU has no bf16 hardware): the teacher runs
under the same autocast as the student (tests/test_teachers.py checks it is not upcast).
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

from hf_mim import (
    DbotConfig,
    DbotForMaskedImageModeling,
    MaskDistillConfig,
    MaskDistillForMaskedImageModeling,
    RevColV2Config,
    RevColV2ForMaskedImageModeling,
)
from hf_mim.convert.maskdistill import save_teacher_folder


def build_cases(args, clip_folder: Path) -> dict:
    """name -> (model, teacher forward callable taking pixel_values)."""
    geometry = dict(image_size=args.image_size, patch_size=args.patch_size, drop_path_rate=0.0)
    vit = dict(hidden_size=args.width, num_hidden_layers=args.depth, num_attention_heads=args.heads, **geometry)
    cases = {}
    model = MaskDistillForMaskedImageModeling(MaskDistillConfig.for_teacher(clip_folder, preset="base", **vit))
    cases["MaskDistill, CLIP teacher"] = (model, model.teacher_features)
    blocks = max(1, args.depth // 12)  # 2 bottom-up + 1 top-down columns of 4 levels: as many blocks as the ViTs
    model = RevColV2ForMaskedImageModeling(RevColV2Config.for_teacher(
        clip_folder, preset="base", target="teacher", hidden_size=args.width, num_attention_heads=args.heads,
        blocks_per_level=[blocks] * 4, **geometry,
    ))
    cases[f"RevColV2 (2+1 columns x 4 levels x {blocks}), CLIP teacher"] = (model, model.external_teacher_features)
    dbot = dict(vit, decoder_hidden_size=args.width, decoder_num_attention_heads=args.heads, teacher_depth=args.depth)
    model = DbotForMaskedImageModeling(DbotConfig.for_teacher(clip_folder, preset="base", **dbot))
    cases["dBOT stage 0, CLIP teacher"] = (model, model.external_teacher_features)
    model = DbotForMaskedImageModeling(DbotConfig.from_preset("base", stage=1, **dbot))
    cases["dBOT stage >= 1, bootstrapped teacher"] = (model, model.teacher_features)
    return cases


def timed(function, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(model, teacher_forward, args, device) -> dict[str, float]:
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    pixel_values = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    generator = model.mask_generator()
    masks = torch.stack([generator(torch.Generator().manual_seed(i)) for i in range(args.batch)]).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def teacher():
        with autocast, torch.no_grad():
            teacher_forward(pixel_values)

    def step():
        with autocast:
            loss = model(pixel_values, bool_masked_pos=masks).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    teacher_times, step_times = [], []
    for index in range(args.steps + 1):
        teacher_time, step_time = timed(teacher, device), timed(step, device)
        if index > 0:  # the first round is warm-up (and loads the teacher)
            teacher_times.append(teacher_time)
            step_times.append(step_time)
    model.to("cpu")
    return {"teacher": statistics.median(teacher_times), "step": statistics.median(step_times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--patch_size", type=int, default=8)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for student and teacher (GPUs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher_config = CLIPVisionConfig(
        hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.depth,
        num_attention_heads=args.heads, image_size=args.image_size, patch_size=args.patch_size,
    )
    with tempfile.TemporaryDirectory() as tmp:
        clip_folder = save_teacher_folder(CLIPVisionModel(teacher_config).eval(), Path(tmp) / "clip")
        results = {name: measure(model, forward, args, device) for name, (model, forward) in build_cases(args, clip_folder).items()}
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"teacher share of a training step: students and teachers {args.width} wide x {args.depth} blocks, "
          f"{args.image_size} px / patch {args.patch_size}, batch {args.batch}, {device.type} ({threads}), "
          f"{'bf16 autocast' if args.bf16 else 'float32'}, median of {args.steps}")
    print(f"| {'method, teacher':<52} | teacher forward | full step | teacher / step |")
    print(f"|{'-' * 54}|-----------------|-----------|----------------|")
    for name, times in results.items():
        print(f"| {name:<52} | {times['teacher']:13.4f} s | {times['step']:7.4f} s | {times['teacher'] / times['step']:14.2f} |")


if __name__ == "__main__":
    main()
