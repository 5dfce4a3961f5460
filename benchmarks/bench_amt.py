#!/usr/bin/env python
"""AMT: training-step time of attention-driven masking and throwing against random masking, and the refresh pass.

AMT masks r of the patches and THROWS t more away (seen by nobody, not predicted), so its encoder and
decoder run on fewer tokens than the host method's. For each host variant, one model and one AdamW
optimizer are timed on three mask sets of the same batch (same weights, so only the token counts differ):

    MAE     (a) random 0.75 (MAE's own ratio)  (b) random 0.45 (AMT's mask ratio, nothing thrown)  (c) AMT 0.45 / 0.40
    SimMIM  (a) random 0.6 (SimMIM's own)      (b) random 0.44                                     (c) AMT 0.44 / 0.26

A training step is forward + backward + AdamW step + zero_grad, fp32, train mode, masks given (drawn
beforehand as the data pipeline does, with the model's own `mask_generator()`: `random_masks` for (a)
and (b), `guided_masks` from the model's own attention maps of the batch for (c), so the counts are the
real, officially rounded ones). The refresh pass is `model.attention_scores` over --refresh_images whole
images in batches of --batch (run_mim.py refreshes with the training batch size); its per-image time is
set against the per-image AMT step: "one refresh over the dataset costs X epochs of AMT training", and
the official schedule's overhead is refreshes x X / epochs (mae-AMT: 9 refreshes in 400 epochs). The
whole AMT run (random masks until the first refresh, then AMT, plus the refreshes) is also set against
as many epochs of (a), per image: what AMT costs next to its host method as published.

The rows and the refresh pass are interleaved (order rotated every iteration); --warmup iterations are
excluded and medians of --steps are shown, wall and process CPU time. Trust a CPU run only when its
contention line says "quiet": next to other work a 2-thread step can take several times longer, in
CPU time too (a thread spins waiting for a descheduled one; see bench_pretrain.py); --threads 1 is
less sensitive.

    python benchmarks/bench_amt.py [--size small] [--image_size 224] [--batch 4] [--warmup 1] [--steps 3]
                                   [--refresh_images 32] [--threads 2] [--device cpu|cuda] [--variants mae simmim]

The defaults (ViT-S dims, 224 px so that the counts are the paper's: 196 patches, SimMIM's 7 x 7 units of
32 px) take about a minute on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from bench_pretrain import CpuContention, Meter  # wall + CPU time with CUDA sync; other processes' CPU share

from hf_mim import AmtConfig, AmtForMaskedImageModeling
from hf_mim.masking_attention import ThrowMasks, units_from_patches

BASELINE_RATIO = {"mae": 0.75, "simmim": 0.6}  # each host method's own random-masking ratio
SCHEDULE_EPOCHS = {"mae": 400, "simmim": 200}  # official AMT pretraining lengths


@dataclass
class Row:
    key: str  # "a", "b", "c"
    name: str
    random_ratio: float | None  # None for AMT
    masks: ThrowMasks

    @property
    def label(self) -> str:
        return f"({self.key}) {self.name}"


def draw_masks(model: AmtForMaskedImageModeling, pixel_values: torch.Tensor, seed: int) -> list[Row]:
    """The three mask sets of the batch, drawn with the model's own generator (the official counts)."""
    config = model.config
    generator = model.mask_generator()
    noise = torch.rand(pixel_values.shape[0], generator.unit_grid**2, generator=torch.Generator().manual_seed(seed))
    patch_scores = model.attention_scores(pixel_values).flatten(1).cpu()  # what a refresh stores, per patch
    unit_weights = units_from_patches(patch_scores, generator.patch_grid, generator.unit_size)
    baseline, ratio = BASELINE_RATIO[config.variant], config.mask_ratio
    return [
        Row("a", f"random {baseline:g}", baseline, generator.random_masks(noise, baseline)),
        Row("b", f"random {ratio:g}", ratio, generator.random_masks(noise, ratio)),
        Row("c", f"AMT {ratio:g} / {config.throw_ratio:g}", None, generator.guided_masks(unit_weights, noise)),
    ]


@torch.no_grad()
def token_counts(model: AmtForMaskedImageModeling, pixel_values: torch.Tensor, masks: ThrowMasks) -> tuple[int, int]:
    """(encoder, decoder) tokens per image, read off a real forward. MAE's decoder runs on the cls token
    plus the unthrown patches; SimMIM's head is one linear map per unthrown patch token."""
    output = model(pixel_values, bool_masked_pos=masks.bool_masked_pos, bool_thrown_pos=masks.bool_thrown_pos)
    decoder = output.predictions.shape[1] + (1 if model.config.variant == "mae" else 0)
    return output.encoder_last_hidden_state.shape[1], decoder


def time_interleaved(tasks: dict[str, Callable[[], None]], args: argparse.Namespace, meter: Meter, tag: str):
    """{name: (median wall s, median CPU s)}. The tasks take turns, the order rotated every iteration so
    that no task always runs on a cache another just warmed; the first --warmup iterations are dropped."""
    names = list(tasks)
    wall, cpu = {name: [] for name in names}, {name: [] for name in names}
    for iteration in range(args.warmup + args.steps):
        shift = iteration % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, cpu_seconds = meter.time(tasks[name])
            if iteration >= args.warmup:
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
        print(f"[{tag} {iteration + 1}/{args.warmup + args.steps}]", file=sys.stderr, flush=True)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in names}


def bench_variant(variant: str, args: argparse.Namespace, device: torch.device, meter: Meter) -> None:
    config = AmtConfig.from_preset(args.size, variant=variant, image_size=args.image_size, drop_path_rate=0.0)
    model = AmtForMaskedImageModeling(config).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    pixel_values = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    refresh_images = torch.randn(args.refresh_images, 3, args.image_size, args.image_size, device=device)
    rows = draw_masks(model, pixel_values, seed=0)
    for row in rows:
        row.masks = ThrowMasks(*(mask.to(device) for mask in row.masks))
    a, b, c = rows

    def step(masks: ThrowMasks) -> None:
        model(pixel_values, bool_masked_pos=masks.bool_masked_pos, bool_thrown_pos=masks.bool_thrown_pos).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def refresh() -> None:
        for chunk in refresh_images.split(args.batch):
            model.attention_scores(chunk)

    tasks = {row.key: (lambda masks=row.masks: step(masks)) for row in rows} | {"refresh": refresh}
    contention = CpuContention()
    medians = time_interleaved(tasks, args, meter, variant)
    contention_line = contention.report()
    # per-image (wall, cpu) seconds: the unit both a training epoch and a refresh pass scale with
    per_image = {
        name: tuple(t / (args.refresh_images if name == "refresh" else args.batch) for t in pair)
        for name, pair in medians.items()
    }

    patches = (args.image_size // config.patch_size) ** 2
    decoder = "linear head"
    if variant == "mae":
        decoder = f"decoder {config.decoder_hidden_size} wide x {config.decoder_num_hidden_layers}"
    print(
        f"\n{variant.upper()} variant, ViT {args.size} ({config.hidden_size} wide x {config.num_hidden_layers}, "
        f"{decoder}), {args.image_size} px, {patches} patches, mask unit {config.mask_patch_size} px, batch {args.batch}"
    )
    print(f"{'training step':<22} {'masked':>6} {'thrown':>6} {'enc tok':>7} {'dec tok':>7} {'step s':>7} {'cpu s':>7}"
          f" {'img/s':>6} {'(x)/(a) wall/cpu':>17} {'(x)/(b) wall/cpu':>17}")
    for row in rows:
        (wall, cpu), (wall_a, cpu_a), (wall_b, cpu_b) = medians[row.key], medians[a.key], medians[b.key]
        encoder_tokens, decoder_tokens = token_counts(model, pixel_values, row.masks)
        print(
            f"{row.label:<22} {int(row.masks.bool_masked_pos[0].sum()):>6} {int(row.masks.bool_thrown_pos[0].sum()):>6} "
            f"{encoder_tokens:>7} {decoder_tokens:>7} {wall:>7.3f} {cpu:>7.3f} {args.batch / wall:>6.1f} "
            f"{wall / wall_a:>8.2f} /{cpu / cpu_a:>5.2f}   {wall / wall_b:>8.2f} /{cpu / cpu_b:>5.2f}"
        )

    # The refresh pass, per image, in units of the AMT training step per image (= epochs of AMT training).
    (refresh_wall, refresh_cpu), (image_wall, image_cpu) = medians["refresh"], per_image["refresh"]
    epochs_wall, epochs_cpu = (per_image["refresh"][i] / per_image[c.key][i] for i in (0, 1))
    print(
        f"refresh pass: attention_scores over {args.refresh_images} images (batch {args.batch}): "
        f"{refresh_wall:.3f} s wall, {refresh_cpu:.3f} s cpu -> {1e3 * image_wall:.1f} ms/image ({1e3 * image_cpu:.1f} ms cpu)"
    )
    print(
        f"  = {epochs_wall:.2f} ({epochs_cpu:.2f} cpu) AMT training steps' worth per image: one refresh over "
        f"the dataset costs {epochs_wall:.2f} epochs of AMT training"
    )

    # The official schedule: random masking until the first refresh, then AMT, refreshes in between.
    epochs = SCHEDULE_EPOCHS[variant]
    refreshes = model.attention_refresh_steps(epochs, steps_per_epoch=1)  # in epoch units: the same events as in steps
    random_epochs = refreshes[0] if refreshes else epochs
    before = next(  # the random row matching the masks used until the first refresh
        row for row in rows if row.random_ratio is not None and math.isclose(row.random_ratio, config.effective_warmup_mask_ratio)
    )
    for i, kind in enumerate(("wall", "cpu")):
        refresh_cost = len(refreshes) * per_image["refresh"][i]
        training = random_epochs * per_image[before.key][i] + (epochs - random_epochs) * per_image[c.key][i]
        print(
            f"  official schedule ({kind}): {len(refreshes)} refreshes in {epochs} epochs -> "
            f"{100 * refresh_cost / (epochs * per_image[c.key][i]):.1f} % overhead over AMT steps; whole AMT run "
            f"({random_epochs} epochs {before.name}, {epochs - random_epochs} AMT, refreshes) = "
            f"{(training + refresh_cost) / (epochs * per_image[a.key][i]):.2f} x {epochs} epochs of {a.name}"
        )
    print(contention_line if device.type == "cpu" else f"device {torch.cuda.get_device_name(device)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(AmtConfig.presets))
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--steps", type=int, default=3, help="timed iterations, median shown")
    parser.add_argument("--refresh_images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=["mae", "simmim"], choices=["mae", "simmim"])
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    meter = Meter(device)
    print(
        f"AMT vs random masking: training step (forward + backward + AdamW), fp32, {device.type}, "
        f"{torch.get_num_threads()} threads; {args.warmup} warm-up + {args.steps} timed iterations, median"
    )
    for variant in args.variants:
        bench_variant(variant, args, device, meter)


if __name__ == "__main__":
    main()
