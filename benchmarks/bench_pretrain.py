"""One pretraining step of dBOT (hf_mim) against transformers' ViTMAEForPreTraining, same dimensions.

What is measured
----------------
A *training step* is: forward (loss) + backward + AdamW step + zero_grad(set_to_none=True), on one
random batch, with the model in train mode. Both models are ViT-S/16 MAE-style students:

    encoder  384 wide, 12 blocks, 6 heads, MLP 1536, on the cls token + 49 visible patches (mask 0.75)
    decoder  512 wide, 8 blocks, 16 heads, MLP 2048, on all 197 tokens
    224 px, patch 16, batch 8, drop_path 0, LayerNorm eps 1e-6, attention "sdpa" (or --attn eager)

dBOT additionally has a frozen 12-block teacher that sees the full image (197 tokens) and produces the
regression targets. Three dBOT numbers are reported:

    dBOT teacher fwd   `model.teacher_features(pixel_values)` (no_grad) on the batch, alone
    dBOT student step  the training step with the teacher forward EXCLUDED: the features computed (and
                       timed) just before are injected by temporarily shadowing `model.teacher_features`
                       (see `injected_teacher_features`), so the step does everything else the real step
                       does (target normalisation, loss, backward, AdamW) and nothing more
    dBOT full step     the real, unpatched training step (teacher + student)

The headline ratio is dBOT-student images/s over ViTMAE images/s: the like-for-like comparison, since
ViTMAE's pixel targets cost nothing while dBOT's teacher is an extra model by design.

Method: both models live in ONE process and are stepped alternately (the order flips every
iteration), `--warmup` untimed iterations first, then the median of `--steps` timed iterations.
Every iteration draws one masking noise tensor that both models use, on one fixed random batch
(`torch.manual_seed`). fp32 throughout on CPU (this CPU has no bf16 hardware).

Peak memory
-----------
Measured on one extra, untimed step of each (after the timed ones).
CUDA: `torch.cuda.max_memory_allocated()` over the step, reported as the increase over what was
allocated before the step (activations, gradients, transient optimizer buffers), plus the absolute peak.
CPU: there is no allocator counter, so the process' resident-set high-water mark is used: freed heap is
returned to the OS (`malloc_trim(0)`), the kernel's VmHWM is reset (`/proc/self/clear_refs` = 5), and
the step's peak is VmHWM after the step minus VmRSS before it. It is an RSS measurement, so it includes
allocator slack and is coarser than the CUDA number. Where clear_refs is not available it falls back to
`resource.getrusage(...).ru_maxrss`, which can only grow; the table then says so.

FLOPs and efficiency
--------------------
`analytic_flops` counts matrix-multiply FLOPs (2 per multiply-add) of every Linear/conv and of
attention's QK^T and AV, per model part; a training step counts the trainable forward 3x (forward +
backward for inputs + backward for weights) and the teacher forward once. The count is cross-checked
against `torch.utils.flop_counter.FlopCounterMode` on one real step (run with eager attention, since
the counter has no formula for CPU SDPA kernels; the matmul work is the same). Achieved GFLOP/s =
analytic FLOPs / median time, shown against the machine's fp32 GEMM peak measured in this run (best of
a few square matmuls, 2048 on CPU, 8192 on GPU).

Shared machines
---------------
On a CPU the report says how much CPU time OTHER processes took during the iterations (/proc/stat):
on a 2-core machine shared with a test suite, 2-thread steps can take 4x longer (an OpenMP barrier
waits for a descheduled thread), and the wall-clock medians are only trustworthy when it says "quiet".
The process CPU time of each step ("cpu s") and `--threads 1` are much less sensitive to that.

Usage:  python benchmarks/bench_pretrain.py [--device cuda] [--attn eager] [--warmup 2] [--steps 5]
                                            [--threads N] [--dtype bfloat16 (GPU)] [--no-flop-counter]
Nothing is asserted: numbers are printed, as every hf_mim benchmark does.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from hf_mim import DbotConfig, DbotForMaskedImageModeling


# --------------------------------------------------------------------------------------------------
# Analytic FLOP count
# --------------------------------------------------------------------------------------------------


def block_forward_flops(tokens: int, dim: int, mlp_dim: int) -> int:
    """Matmul FLOPs of one pre-norm ViT block on `tokens` tokens of one image (2 FLOPs per MAC).

    qkv (dim -> 3 dim) + output projection (dim -> dim) + MLP (dim -> mlp_dim -> dim), plus attention's
    QK^T and AV (tokens x tokens x dim each, summed over heads). LayerNorm/softmax/GELU are ignored.
    """
    linear = 2 * tokens * (dim * 3 * dim + dim * dim + 2 * dim * mlp_dim)
    attention = 2 * (2 * tokens * tokens * dim)
    return linear + attention


def analytic_flops(
    batch_size: int,
    image_size: int,
    patch_size: int,
    num_channels: int,
    dim: int,
    depth: int,
    mlp_dim: int,
    decoder_dim: int,
    decoder_depth: int,
    decoder_mlp_dim: int,
    prediction_dim: int,
    mask_ratio: float,
    teacher_depth: int = 0,
) -> dict[str, int]:
    """Forward matmul FLOPs of a MAE-style model for one batch, per part, and the training-step total.

    Both ViTMAE and dBOT embed all N patches before dropping the masked ones, run the encoder on
    1 + int(N (1 - mask_ratio)) tokens, embed those into the decoder width, and run the decoder and its
    prediction head on all 1 + N tokens. `prediction_dim` is the head's output width (pixels p*p*C for
    ViTMAE, the teacher width for dBOT). The teacher (if any) runs patch embedding + `teacher_depth`
    blocks on all 1 + N tokens.

    Returns a dict with "patch_embed", "encoder", "decoder", "student_forward", "teacher_forward",
    "student_step" (= 3 x student_forward: forward, input-gradient and weight-gradient matmuls) and
    "full_step" (= student_step + teacher_forward; the teacher is not trained).
    """
    num_patches = (image_size // patch_size) ** 2
    visible = 1 + int(num_patches * (1 - mask_ratio))
    all_tokens = 1 + num_patches
    patch_embed = 2 * num_patches * (num_channels * patch_size * patch_size) * dim
    encoder = depth * block_forward_flops(visible, dim, mlp_dim)
    decoder = (
        2 * visible * dim * decoder_dim  # decoder_embed
        + decoder_depth * block_forward_flops(all_tokens, decoder_dim, decoder_mlp_dim)
        + 2 * all_tokens * decoder_dim * prediction_dim  # prediction head
    )
    teacher = (patch_embed + teacher_depth * block_forward_flops(all_tokens, dim, mlp_dim)) if teacher_depth else 0
    parts = {"patch_embed": patch_embed, "encoder": encoder, "decoder": decoder, "teacher_forward": teacher}
    parts = {name: value * batch_size for name, value in parts.items()}
    parts["student_forward"] = parts["patch_embed"] + parts["encoder"] + parts["decoder"]
    parts["student_step"] = 3 * parts["student_forward"]
    parts["full_step"] = parts["student_step"] + parts["teacher_forward"]
    return parts


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _proc_status_kib("VmHWM") is not None
    except OSError:
        return False


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


class Meter:
    """Times callables, and separately measures a callable's peak memory (module docstring: CPU method).

    Timing and memory are separate passes: the CPU memory measurement returns freed heap to the OS
    first, and the page faults of re-growing it would otherwise be timed too.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.reset_hwm = (not self.cuda) and _can_reset_hwm()

    @property
    def memory_label(self) -> str:
        if self.cuda:
            return "CUDA max_memory_allocated during one step, minus memory_allocated at its start"
        if self.reset_hwm:
            return "CPU RSS high-water mark (VmHWM, reset) during one step, minus RSS at its start (after malloc_trim)"
        return "CPU ru_maxrss increase over one step (monotonic: 0 once an earlier step peaked higher)"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> tuple[float, float]:
        """(wall seconds, process CPU seconds over all threads) of one call."""
        self.sync()
        cpu_begin = time.process_time()
        begin = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - begin, time.process_time() - cpu_begin

    def memory(self, fn: Callable[[], object]) -> tuple[int, int]:
        """(peak bytes above the start, absolute peak bytes) of one call."""
        self.sync()
        gc.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
                _LIBC.malloc_trim(0)
            if self.reset_hwm:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
                start_bytes = _proc_status_kib("VmRSS") * 1024
            else:
                start_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        fn()
        self.sync()
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.reset_hwm:
            peak = _proc_status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(peak - start_bytes, 0), peak


class CpuContention:
    """Share of the machine's CPU time that OTHER processes used while the benchmark ran (Linux only).

    Timings on a shared machine are only as good as the machine is quiet: this reads the system-wide
    busy time from /proc/stat and subtracts this process' own (/proc/self/stat), so the report can say
    when the numbers were taken next to something else (e.g. a test suite).
    """

    def __init__(self):
        self.available = os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")
        self.ticks = os.sysconf("SC_CLK_TCK") if self.available else 100
        self.start = self._sample()

    def _sample(self) -> tuple[float, int, int, int] | None:
        if not self.available:
            return None
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
        steal = fields[7] if len(fields) > 7 else 0
        with open("/proc/self/stat") as stat:
            own_fields = stat.read().rsplit(")", 1)[1].split()
        own = int(own_fields[11]) + int(own_fields[12])  # utime + stime
        return time.perf_counter(), busy, steal, own

    def report(self) -> str:
        end = self._sample()
        if self.start is None or end is None:
            return "CPU contention: not measured (no /proc)"
        seconds = end[0] - self.start[0]
        capacity = seconds * self.ticks * (os.cpu_count() or 1)
        others = max(end[1] - self.start[1] - (end[3] - self.start[3]), 0) / capacity
        steal = (end[2] - self.start[2]) / capacity
        verdict = "quiet" if others < 0.05 and steal < 0.05 else "NOT quiet: timings are noisy, rerun on an idle machine"
        return (
            f"CPU contention during the iterations: other processes used {100 * others:.1f}% and the hypervisor "
            f"stole {100 * steal:.1f}% of the machine's CPU time ({verdict})"
        )


@dataclass
class Record:
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    peak_delta: int = 0
    peak_abs: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def gemm_peak_flops(device: torch.device, size: int, repeats: int, dtype: torch.dtype, meter: Meter) -> float:
    """Best FLOP/s of a size x size x size matmul (2 size^3 FLOPs) over `repeats` timed runs."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        meter.sync()
        begin = time.perf_counter()
        torch.matmul(a, b, out=out)
        meter.sync()
        best = min(best, time.perf_counter() - begin)
    del a, b, out
    return 2 * size**3 / best


# --------------------------------------------------------------------------------------------------
# Models and steps
# --------------------------------------------------------------------------------------------------


def build_models(attn: str, device: torch.device) -> tuple[DbotForMaskedImageModeling, ViTMAEForPreTraining]:
    dbot_config = DbotConfig.from_preset("small", drop_path_rate=0.0)
    vitmae_config = ViTMAEConfig(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        decoder_hidden_size=512,
        decoder_num_hidden_layers=8,
        decoder_num_attention_heads=16,
        decoder_intermediate_size=2048,
        image_size=224,
        patch_size=16,
        mask_ratio=0.75,
        layer_norm_eps=1e-6,
    )
    dbot = DbotForMaskedImageModeling._from_config(dbot_config, attn_implementation=attn).to(device).train()
    vitmae = ViTMAEForPreTraining._from_config(vitmae_config, attn_implementation=attn).to(device).train()
    return dbot, vitmae


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)


@contextmanager
def injected_teacher_features(model: DbotForMaskedImageModeling, features: torch.Tensor):
    """Inside the block, `model.teacher_features(...)` returns `features` instead of running the teacher.

    An instance attribute shadows the method; leaving the block deletes it, restoring the real method.
    """

    def precomputed(pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        if pixel_values.shape[0] != features.shape[0]:
            raise ValueError("injected teacher features were computed for another batch")
        return features

    model.teacher_features = precomputed
    try:
        yield
    finally:
        del model.teacher_features


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, autocast, **inputs) -> None:
    with autocast():
        loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextmanager
def attention_implementation(model: torch.nn.Module, name: str):
    """Temporarily switch the attention kernel of every config a submodule reads at call time.

    Both models look up `config._attn_implementation` per call; ViTMAE's decoder holds its own deep
    copy of the config, so every distinct config object under the model is switched.
    """
    configs = {id(module.config): module.config for module in model.modules() if hasattr(module, "config")}
    previous = {key: config._attn_implementation for key, config in configs.items()}
    for config in configs.values():
        config._attn_implementation = name
    try:
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = previous[key]


def counted_flops(step: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed iterations, median reported (default 5)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"],
        help="float32 (default), or bfloat16 autocast (GPUs only; this CPU has no bf16 hardware)",
    )
    parser.add_argument("--gemm-size", type=int, default=None, help="square matmul size for the peak (2048 CPU / 8192 GPU)")
    parser.add_argument("--gemm-repeats", type=int, default=5)
    parser.add_argument("--no-flop-counter", action="store_true", help="skip the FlopCounterMode cross-check")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda given but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if dtype == torch.bfloat16 and device.type == "cpu":
        print("warning: bfloat16 on a CPU without bf16 hardware is very slow", file=sys.stderr)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else nullcontext
    )
    torch.manual_seed(args.seed)
    meter = Meter(device)

    dbot, vitmae = build_models(args.attn, device)
    dbot_optimizer, vitmae_optimizer = make_optimizer(dbot), make_optimizer(vitmae)
    num_patches = (224 // 16) ** 2
    pixel_values = torch.randn(args.batch_size, 3, 224, 224, device=device)
    noise_generator = torch.Generator(device="cpu").manual_seed(args.seed)

    def next_noise() -> torch.Tensor:
        return torch.rand(args.batch_size, num_patches, generator=noise_generator).to(device)

    # Sanity: the injected student step computes exactly the loss of the real step (drop_path is 0).
    with torch.no_grad():
        noise = next_noise()
        real = dbot(pixel_values, noise=noise).loss
        with injected_teacher_features(dbot, dbot.teacher_features(pixel_values)):
            injected = dbot(pixel_values, noise=noise).loss
    if not torch.equal(real, injected):
        sys.exit(f"injected teacher features change the loss: {real.item()} vs {injected.item()}")

    def vitmae_step(noise: torch.Tensor) -> None:
        train_step(vitmae, vitmae_optimizer, autocast, pixel_values=pixel_values, noise=noise)

    def dbot_full_step(noise: torch.Tensor) -> None:
        train_step(dbot, dbot_optimizer, autocast, pixel_values=pixel_values, noise=noise)

    def dbot_teacher() -> torch.Tensor:
        with autocast():
            return dbot.teacher_features(pixel_values)

    def dbot_student_step(noise: torch.Tensor, features: torch.Tensor) -> None:
        with injected_teacher_features(dbot, features):
            train_step(dbot, dbot_optimizer, autocast, pixel_values=pixel_values, noise=noise)

    records = {name: Record() for name in ("vitmae", "teacher", "student", "full")}

    def dbot_steps(noise: torch.Tensor, measure: Callable) -> dict[str, object]:
        """Teacher forward, then the student step with those features injected, then the full step."""
        features: list[torch.Tensor] = []
        return {
            "teacher": measure(lambda: features.append(dbot_teacher())),
            "student": measure(lambda: dbot_student_step(noise, features[0])),
            "full": measure(lambda: dbot_full_step(noise)),
        }

    contention = CpuContention()
    for iteration in range(args.warmup + args.steps):
        noise = next_noise()
        # Alternate which model goes first, so neither always runs on a cache the other just warmed.
        if iteration % 2 == 0:
            results = {"vitmae": meter.time(lambda: vitmae_step(noise))} | dbot_steps(noise, meter.time)
        else:
            results = dbot_steps(noise, meter.time) | {"vitmae": meter.time(lambda: vitmae_step(noise))}
        timed = iteration >= args.warmup
        if timed:
            for name, (seconds, cpu_seconds) in results.items():
                records[name].seconds.append(seconds)
                records[name].cpu_seconds.append(cpu_seconds)
        phase = "timed" if timed else "warm-up"
        print(
            f"[{phase} {iteration + 1}/{args.warmup + args.steps}] "
            + " ".join(f"{name}={results[name][0]:.3f}s" for name in records),
            file=sys.stderr,
            flush=True,
        )

    contention_line = contention.report()

    # Peak memory: one more step of each, measured on its own (not timed).
    noise = next_noise()
    memory = {"vitmae": meter.memory(lambda: vitmae_step(noise))} | dbot_steps(noise, meter.memory)
    for name, (delta, absolute) in memory.items():
        records[name].peak_delta, records[name].peak_abs = delta, absolute

    # FLOPs: analytic, and FlopCounterMode on one real step (eager attention; see the docstring).
    common = dict(
        batch_size=args.batch_size, image_size=224, patch_size=16, num_channels=3, dim=384, depth=12,
        mlp_dim=1536, decoder_dim=512, decoder_depth=8, decoder_mlp_dim=2048, mask_ratio=0.75,
    )
    dbot_flops = analytic_flops(**common, prediction_dim=dbot.config.hidden_size, teacher_depth=dbot.config.teacher_depth)
    vitmae_flops = analytic_flops(**common, prediction_dim=16 * 16 * 3)
    counted = {}
    if not args.no_flop_counter:
        noise = next_noise()
        with attention_implementation(vitmae, "eager"):
            counted["vitmae"] = counted_flops(lambda: vitmae_step(noise))
        with attention_implementation(dbot, "eager"):
            counted["teacher"] = counted_flops(dbot_teacher)
            features = dbot_teacher()
            counted["student"] = counted_flops(lambda: dbot_student_step(noise, features))
            counted["full"] = counted_flops(lambda: dbot_full_step(noise))
    analytic = {
        "vitmae": vitmae_flops["student_step"],
        "teacher": dbot_flops["teacher_forward"],
        "student": dbot_flops["student_step"],
        "full": dbot_flops["full_step"],
    }

    gemm_size = args.gemm_size or (8192 if device.type == "cuda" else 2048)
    peak = gemm_peak_flops(device, gemm_size, args.gemm_repeats, dtype, meter)

    # ---------------------------------------------------------------------------------------------
    mib = 1024**2
    cpu_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu_name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu_name}"
    trainable = {
        "dbot": sum(p.numel() for p in dbot.parameters() if p.requires_grad),
        "vitmae": sum(p.numel() for p in vitmae.parameters() if p.requires_grad),
    }
    print()
    print("dBOT (hf_mim) vs ViTMAEForPreTraining (transformers): one pretraining step, ViT-S/16 dims")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {device_name}, "
        f"threads {torch.get_num_threads()}, dtype {args.dtype}, attention {args.attn} "
        f"(dBOT: {dbot.config._attn_implementation}, ViTMAE: {vitmae.config._attn_implementation})"
    )
    print(
        f"batch {args.batch_size}, 224 px, mask 0.75, drop_path 0; {args.warmup} warm-up + {args.steps} timed "
        f"iterations, models alternated, median shown; trainable params dBOT {trainable['dbot'] / 1e6:.2f} M, "
        f"ViTMAE {trainable['vitmae'] / 1e6:.2f} M"
    )
    print(f"GEMM peak: {peak / 1e9:.1f} GFLOP/s ({args.dtype} {gemm_size}^3 matmul, best of {args.gemm_repeats})")
    print(f"peak memory = {meter.memory_label}")
    if device.type == "cpu":
        print(contention_line)
    print()
    rows = [
        ("ViTMAE step", "vitmae"),
        ("dBOT student step", "student"),
        ("dBOT teacher fwd", "teacher"),
        ("dBOT full step", "full"),
    ]
    header = (
        f"{'':<18} {'median s':>9} {'min s':>8} {'cpu s':>7} {'img/s':>8} {'GFLOP':>8} {'counted':>8} "
        f"{'GFLOP/s':>8} {'% peak':>7} {'peak MiB':>9} {'abs MiB':>8}"
    )
    print(header)
    print("-" * len(header))
    for label, key in rows:
        record = records[key]
        median = record.median
        flops = analytic[key]
        count = f"{counted[key] / 1e9:8.1f}" if key in counted else f"{'-':>8}"
        cpu = f"{statistics.median(record.cpu_seconds):7.2f}" if device.type == "cpu" else f"{'-':>7}"
        print(
            f"{label:<18} {median:9.3f} {min(record.seconds):8.3f} {cpu} {args.batch_size / median:8.2f} "
            f"{flops / 1e9:8.1f} {count} {flops / median / 1e9:8.1f} {100 * flops / median / peak:6.1f}% "
            f"{record.peak_delta / mib:9.0f} {record.peak_abs / mib:8.0f}"
        )
    print()
    student_ratio = records["vitmae"].median / records["student"].median
    full_ratio = records["vitmae"].median / records["full"].median
    best_student_ratio = min(records["vitmae"].seconds) / min(records["student"].seconds)
    best_full_ratio = min(records["vitmae"].seconds) / min(records["full"].seconds)
    print(
        f"dBOT student / ViTMAE throughput: {student_ratio:.3f}x median, {best_student_ratio:.3f}x best-of  "
        "(target >= 1.0x)"
    )
    print(
        f"dBOT full    / ViTMAE throughput: {full_ratio:.3f}x median, {best_full_ratio:.3f}x best-of  "
        "(includes the teacher forward)"
    )
    if device.type == "cpu":
        cpu_ratio = statistics.median(records["vitmae"].cpu_seconds) / statistics.median(records["student"].cpu_seconds)
        print(
            f"dBOT student / ViTMAE by process CPU time: {cpu_ratio:.3f}x  (less sensitive to other processes "
            "than wall time; most meaningful with --threads 1)"
        )
    print(
        f"teacher forward: {1000 * records['teacher'].median:.1f} ms median; full - student = "
        f"{1000 * (records['full'].median - records['student'].median):.1f} ms"
    )
    print()
    print("Columns:")
    print("  median s / min s  wall-clock seconds per call over the timed iterations; img/s = batch / median")
    print("  cpu s             median process CPU seconds per call, all threads (CPU only)")
    print("  GFLOP             analytic matmul FLOPs (trainable forward x3, teacher forward x1); GFLOP/s and")
    print("                    % peak use it and the median time")
    print("  counted           FlopCounterMode on one call with eager attention (omits the patch embedding's")
    print("                    unneeded input gradient, so slightly lower than the analytic count)")
    print("  peak MiB          peak memory above the call's start, on one separate untimed call; abs MiB = the")
    print("                    absolute peak (process RSS on CPU, allocated tensors on CUDA) in that call")


if __name__ == "__main__":
    main()
