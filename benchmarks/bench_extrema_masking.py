#!/usr/bin/env python
"""ExtreMA: training-step time against the mask ratio and the number of masks.

For mask ratio r in (0.75, 0.8, 0.9) and K in (1, 5, 8) masks, one ExtreMA training step (online
encoder on the visible tokens of each mask, class attention, projector/predictor, momentum encoder on
all tokens of the other view, BYOL loss, backward, AdamW) is timed, together with the online encoder's
forward+backward alone. The reference is the same encoder on ALL tokens (forward+backward), in the same
process. Printed: median seconds, and the encoder cost relative to the all-token encoder, which should
fall with the visible fraction (1 - r) times K.

    python benchmarks/bench_extrema_masking.py [--size small] [--image_size 224] [--batch 8] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_mim import ExtremaConfig, ExtremaForMaskedImageModeling


def median_time(fn, steps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pixel_values = torch.randn(args.batch, 3, args.image_size, args.image_size)
    pixel_values_2 = torch.randn_like(pixel_values)

    base = ExtremaConfig.from_preset(args.size, image_size=args.image_size, drop_path_rate=0.0)
    reference_model = ExtremaForMaskedImageModeling(base)
    encoder = reference_model.extrema

    def encoder_all_tokens():
        encoder(pixel_values).last_hidden_state.float().mean().backward()

    full_encoder = median_time(encoder_all_tokens, args.steps)
    num_patches = (args.image_size // base.patch_size) ** 2
    print(f"ExtreMA {args.size} ({base.hidden_size} wide, {base.num_hidden_layers} blocks), {args.image_size} px, "
          f"{num_patches} patches, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.steps}")
    print(f"reference: online encoder on all tokens, forward+backward: {full_encoder:.3f} s")
    print(f"{'ratio':>6} {'masks':>6} {'visible x K':>12} {'step s':>8} {'encoder s':>10} {'encoder / all':>14}")
    for ratio in (0.75, 0.8, 0.9):
        for num_masks in (1, 5, 8):
            if num_masks * (1 - ratio) > 1 + 1e-9:  # disjoint masks need K * visible <= all
                print(f"{ratio:>6} {num_masks:>6} {'-':>12}  (K disjoint masks need K x (1 - r) <= 1)")
                continue
            config = ExtremaConfig.from_preset(
                args.size, image_size=args.image_size, drop_path_rate=0.0, mask_ratio=ratio, num_masks=num_masks
            )
            model = ExtremaForMaskedImageModeling(config)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            masks = torch.stack([model.mask_generator()(torch.Generator().manual_seed(i)) for i in range(args.batch)])

            def step():
                model(pixel_values, pixel_values_2=pixel_values_2, bool_masked_pos=masks).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            backbone = model.extrema
            stacked_pixels = pixel_values.repeat(num_masks, 1, 1, 1)  # (K*B) images, mask k for block k
            stacked_masks = masks.transpose(0, 1).reshape(num_masks * args.batch, -1)

            def online_encoder_only():
                # the encoder cost of the objective: the visible tokens of all K masks in one batch
                backbone(stacked_pixels, bool_masked_pos=stacked_masks).last_hidden_state.float().mean().backward()

            step_time = median_time(step, args.steps)
            encoder_time = median_time(online_encoder_only, args.steps)
            visible = num_masks * round(num_patches * (1 - ratio)) / num_patches
            print(f"{ratio:>6} {num_masks:>6} {visible:>12.2f} {step_time:>8.3f} {encoder_time:>10.3f} "
                  f"{encoder_time / full_encoder:>13.2f}x")


if __name__ == "__main__":
    main()
