"""RevColV2 training-step memory and time: the reversible engine against plain autograd, 2 / 4 / 8 columns.

What is measured
----------------
A *training step* of `RevColV2ForMaskedImageModeling` (75 % masking, norm-pix MSE): forward (loss) +
backward + AdamW step + zero_grad(set_to_none=True), train mode, drop path 0.1, fp32. The network has
n columns, n/2 bottom-up (on the 25 % visible patches) + n/2 top-down (on every patch), 4 levels of
`--blocks` ViT blocks each; every column count has the same width, heads and geometry. The reversible
engine (`use_reversible=True`) keeps the level outputs of the last column of each stack and, for every
earlier column, a bfloat16 residual of its inversion (`hf_mim.reversible`, "hand-off"), and recomputes
levels in backward; plain autograd (`use_reversible=False`) keeps every activation.

The "step" peak (the targets' measure) counts the parameter gradients alive at that moment, which
grow with the columns in any engine; "grads" is that part of the peak, so that "step - grads"
(activations, recomputation and temporaries) can be read apart from it.

Memory (a FRESH subprocess per (columns, engine), one warm-up step first, which creates the AdamW state)
------
- "step": the peak, during one step, of the bytes of live tensor storages created in that step:
  activations saved for backward, gradients, recomputation and optimizer temporaries. Counted exactly
  on any device with a `TorchDispatchMode` that sees every aten op's output storage and a weakref that
  sees it freed (storages that existed before the step, parameters and AdamW state, are excluded).
  It ignores allocator slack, which is what makes it precise.
- "grads": the bytes, among those live at the step peak, of storages that end up as a parameter's
  `.grad` after backward.
- "total" = step + what is held between steps: parameters and the AdamW state (exp_avg, exp_avg_sq).
- "RSS": the CPU cross-check the brief asked for, process resident-set high-water mark during one
  (untracked) step above the RSS before the model was built (`malloc_trim(0)` first, VmHWM reset via
  `/proc/self/clear_refs`; `ru_maxrss` without it). It includes glibc's retained free heap and
  fragmentation, which on small steps is as large as the tensors themselves; read it as an upper bound.
  With `--device cuda` this column is `torch.cuda.max_memory_allocated()` above the allocation before
  the model was built (precise).

Time (one subprocess per column count, both engines built from the same seed and stepped alternately,
the order flipping every iteration, `--warmup` untimed steps, then the median of `--steps`): process
CPU seconds (all threads; robust on a shared machine) and wall seconds. With the default single
thread the CPU-time ratio is the trustworthy one here.

Targets from the RevColV2 issue: reversible peak at 8 columns <= 1.25x its peak at 2 columns, >= 3x
below plain at 8 columns, step time <= 1.4x plain. Nothing is asserted: numbers are printed, as every
hf_mim benchmark does.

Usage:  python benchmarks/bench_revcolv2_memory.py [--device cuda] [--image-size 224] [--patch-size 8]
            [--width 64] [--heads 4] [--blocks 1] [--batch 4] [--warmup 1] [--steps 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import weakref

# /proc readings (VmRSS, VmHWM and its reset) and libc's malloc_trim, as the pretraining benchmark takes them
from bench_pretrain import _LIBC, _proc_status_kib
from bench_pretrain import _can_reset_hwm as _reset_hwm

COLUMNS = (2, 4, 8)
ENGINES = ("reversible", "plain")


# --------------------------------------------------------------------------------------------------
# Memory measurement helpers
# --------------------------------------------------------------------------------------------------


def _trim() -> None:
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def live_tensor_tracker(known_storages: set[int]):
    """A TorchDispatchMode counting the bytes of live storages created under it (and their peak).

    Each storage gets a serial number (addresses are reused); `peak_live` maps the serials live at the
    peak to their bytes, `serial_of` names the storage of a live tensor.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    import torch

    class LiveTensorBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = 0
            self.peak = 0
            self.seen = set(known_storages)
            self.serials: dict[int, tuple[int, int]] = {}  # storage address -> (serial, bytes)
            self.count = 0
            self.peak_live: dict[int, int] = {}

        def _free(self, key: int, nbytes: int) -> None:
            self.seen.discard(key)
            self.serials.pop(key, None)
            self.live -= nbytes

        def serial_of(self, tensor: torch.Tensor) -> int | None:
            entry = self.serials.get(tensor.untyped_storage().data_ptr())
            return entry[0] if entry else None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:
                if not isinstance(tensor, torch.Tensor):
                    continue
                storage = tensor.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes == 0 or key in self.seen:
                    continue  # a view, an in-place result, or a tensor from before the step
                self.seen.add(key)
                self.count += 1
                self.serials[key] = (self.count, nbytes)
                self.live += nbytes
                if self.live > self.peak:
                    self.peak = self.live
                    self.peak_live = dict(self.serials.values())
                weakref.finalize(storage, self._free, key, nbytes)
            return out

    return LiveTensorBytes()


# --------------------------------------------------------------------------------------------------
# Workers (each runs in its own process)
# --------------------------------------------------------------------------------------------------


def build(args: argparse.Namespace, columns: int, reversible: bool):
    import torch

    from hf_mim import RevColV2Config, RevColV2ForMaskedImageModeling

    torch.manual_seed(0)
    config = RevColV2Config(
        image_size=args.image_size, patch_size=args.patch_size, hidden_size=args.width,
        num_attention_heads=args.heads, num_levels=4, blocks_per_level=[args.blocks] * 4,
        num_bottom_up_columns=columns // 2, num_top_down_columns=columns - columns // 2,
        use_reversible=reversible, drop_path_rate=0.1,
    )
    config._attn_implementation = "sdpa"
    model = RevColV2ForMaskedImageModeling(config).to(args.device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def make_step(args: argparse.Namespace, model, optimizer, seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator).to(args.device)
    num_patches = (args.image_size // args.patch_size) ** 2

    def step(after_backward=None) -> None:
        noise = torch.rand(args.batch, num_patches, generator=generator).to(args.device)
        model(pixel_values, noise=noise).loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device != "cpu":
            torch.cuda.synchronize()

    return step, pixel_values


def memory_worker(args: argparse.Namespace, columns: int, engine: str) -> dict:
    import torch

    import hf_mim  # noqa: F401  (imported before the baseline: only the model and its step are measured)

    torch.set_num_threads(args.threads)
    cuda = args.device != "cpu"
    _trim()
    hwm_ok = (not cuda) and _reset_hwm()
    base = torch.cuda.memory_allocated() if cuda else (_proc_status_kib("VmRSS") or 0) * 1024
    model, optimizer = build(args, columns, engine == "reversible")
    step, pixel_values = make_step(args, model, optimizer)
    step()  # warm-up: AdamW state exists from here on

    # 1) process-level peak of one untracked step
    _trim()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    elif hwm_ok:
        _reset_hwm()
    step()
    if cuda:
        process_peak = torch.cuda.max_memory_allocated() - base
    elif hwm_ok:
        process_peak = _proc_status_kib("VmHWM") * 1024 - base
    else:
        process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base

    # 2) exact live-tensor peak of one step
    held_tensors = list(model.parameters()) + [pixel_values]
    for state in optimizer.state.values():
        held_tensors += [value for value in state.values() if isinstance(value, torch.Tensor)]
    known = {t.untyped_storage().data_ptr() for t in held_tensors}
    held = sum(t.untyped_storage().nbytes() for t in held_tensors if t is not pixel_values)
    tracker = live_tensor_tracker(known)
    grad_serials: set[int | None] = set()

    def note_grads() -> None:
        grad_serials.update(tracker.serial_of(p.grad) for p in model.parameters() if p.grad is not None)

    with tracker:
        step(after_backward=note_grads)
    return {
        "columns": columns,
        "engine": engine,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_peak": tracker.peak,
        "grads_at_peak": sum(nbytes for serial, nbytes in tracker.peak_live.items() if serial in grad_serials),
        "held": held,
        "process_peak": max(process_peak, 0),
        "process_method": "cuda" if cuda else ("vmhwm" if hwm_ok else "ru_maxrss"),
    }


def time_worker(args: argparse.Namespace, columns: int) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    steps = {}
    for engine in ENGINES:
        model, optimizer = build(args, columns, engine == "reversible")
        steps[engine] = make_step(args, model, optimizer)[0]
    walls = {engine: [] for engine in ENGINES}
    cpus = {engine: [] for engine in ENGINES}
    for iteration in range(args.warmup + args.steps):
        order = ENGINES if iteration % 2 else ENGINES[::-1]
        for engine in order:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            steps[engine]()
            if iteration >= args.warmup:
                walls[engine].append(time.perf_counter() - wall0)
                cpus[engine].append(time.process_time() - cpu0)
    return {
        "columns": columns,
        **{f"wall_{e}": statistics.median(walls[e]) for e in ENGINES},
        **{f"cpu_{e}": statistics.median(cpus[e]) for e in ENGINES},
    }


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=1, help="ViT blocks per level")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _forwarded(args: argparse.Namespace) -> list[str]:
    out = []
    for name in ("device", "image_size", "patch_size", "width", "heads", "blocks", "batch", "warmup", "steps", "threads"):
        out += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return out


def _run_worker(args: argparse.Namespace, *worker: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), *_forwarded(args), "--worker", *worker]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker {' '.join(worker)} failed:\n{done.stderr}")
    print(f"  done: {' '.join(worker)}", file=sys.stderr, flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(value: float) -> str:
    return f"{value / 2**20:9.1f}"


def report(args: argparse.Namespace, memory: dict, times: dict) -> str:
    grid = args.image_size // args.patch_size
    method = {
        "cuda": "CUDA max_memory_allocated",
        "vmhwm": "RSS high-water mark (VmHWM)",
        "ru_maxrss": "ru_maxrss (monotonic)",
    }[next(iter(memory.values()))["process_method"]]
    lines = [
        f"RevColV2 MIM training step (fwd + bwd + AdamW), {args.device}, fp32, sdpa attention, {args.threads} thread(s)",
        f"  {args.image_size} px, patch {args.patch_size}: {grid * grid} tokens ({grid * grid // 4} visible), batch "
        f"{args.batch}, width {args.width}, {args.heads} heads, 4 levels x {args.blocks} block(s); n columns = n/2 "
        "bottom-up + n/2 top-down; drop path 0.1",
        "  step = peak live tensor bytes created during the step (exact); grads = the parameter gradients among",
        "  them; total = step + params + AdamW state;",
        f"  process = {method} during a step above the process before the model was built (cross-check)",
        "",
        "columns  engine      params M   step MiB  grads MiB  total MiB  process MiB   cpu s   wall s",
    ]
    for columns in COLUMNS:
        for engine in ENGINES:
            m, t = memory[(columns, engine)], times[columns]
            lines.append(
                f"{columns:>7}  {engine:<10}  {m['parameters'] / 1e6:8.3f}  {mib(m['step_peak'])}  "
                f"{mib(m['grads_at_peak'])}  {mib(m['step_peak'] + m['held'])}  {mib(m['process_peak'])}    {t['cpu_' + engine]:6.3f}  {t['wall_' + engine]:7.3f}"
            )

    def total(columns, engine):
        m = memory[(columns, engine)]
        return m["step_peak"] + m["held"]

    def ratio_row(label, a, b, key):
        values = {
            "step": a["step_peak"] / b["step_peak"],
            "step - grads": (a["step_peak"] - a["grads_at_peak"]) / (b["step_peak"] - b["grads_at_peak"]),
            "total": (a["step_peak"] + a["held"]) / (b["step_peak"] + b["held"]),
            "process": a["process_peak"] / max(b["process_peak"], 1),
        }
        return (f"  {label:<44} {values['step']:6.2f}x  {values['step - grads']:11.2f}x  {values['total']:8.2f}x  "
                f"{values['process']:9.2f}x")

    lines += ["", f"  {'ratio':<44} {'step':>7}  {'step - grads':>12}  {'total':>9}  {'process':>10}"]
    for columns in COLUMNS:
        lines.append(ratio_row(f"plain / reversible, {columns} columns", memory[(columns, "plain")],
                               memory[(columns, "reversible")], None))
    for engine in ENGINES:
        for columns in COLUMNS[1:]:
            lines.append(ratio_row(f"{engine} {columns} / 2 columns", memory[(columns, engine)],
                                   memory[(2, engine)], None))
    lines += ["", f"  {'time, reversible / plain':<44} {'cpu':>7}  {'wall':>9}"]
    for columns in COLUMNS:
        t = times[columns]
        lines.append(
            f"  {str(columns) + ' columns':<44} {t['cpu_reversible'] / t['cpu_plain']:6.2f}x  "
            f"{t['wall_reversible'] / t['wall_plain']:8.2f}x"
        )
    r8, r2, p8 = memory[(8, "reversible")], memory[(2, "reversible")], memory[(8, "plain")]
    t8 = times[8]
    lines += [
        "",
        "targets: reversible 8 / 2 columns <= 1.25x: "
        f"step {r8['step_peak'] / r2['step_peak']:.2f}x "
        f"(step - grads {(r8['step_peak'] - r8['grads_at_peak']) / (r2['step_peak'] - r2['grads_at_peak']):.2f}x), "
        f"total {total(8, 'reversible') / total(2, 'reversible'):.2f}x; "
        f"plain / reversible at 8 columns >= 3x: step {p8['step_peak'] / r8['step_peak']:.2f}x, "
        f"total {total(8, 'plain') / total(8, 'reversible'):.2f}x; "
        f"reversible / plain time <= 1.4x: {t8['cpu_reversible'] / t8['cpu_plain']:.2f}x cpu (8 columns)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        kind, columns, *rest = args.worker
        result = memory_worker(args, int(columns), rest[0]) if kind == "memory" else time_worker(args, int(columns))
        print(json.dumps(result))
        return
    memory = {(c, e): _run_worker(args, "memory", str(c), e) for c in COLUMNS for e in ENGINES}
    times = {c: _run_worker(args, "time", str(c)) for c in COLUMNS}
    print(report(args, memory, times))


if __name__ == "__main__":
    main()
