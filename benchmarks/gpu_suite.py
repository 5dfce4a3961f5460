#!/usr/bin/env python
"""One command for the day a GPU is lent: every method's pretraining step at ViT-B scale, in < 8 minutes.

    python benchmarks/gpu_suite.py                    # one GPU: the table, gpu_suite_results/{table.md,results.json}
    python benchmarks/gpu_suite.py --dry-run          # CPU, tiny sizes, seconds: the same code paths (CI runs it)

Sections (each with a time cap; a row whose section or the whole run is out of time is listed as
skipped, so the run ends in time whatever the GPU; `--budget` is the whole run's cap):

    train       a pretraining step (forward + backward + AdamW + zero_grad + the method's per-step event)
                of every method at ViT-B (dBOT, ExtreMA, MaskDistill, AMT, RevColV2-B reversible and
                plain) and RevColV2-L, against transformers' ViTMAEForPreTraining at the same width and
                depth (ViT-B; ViT-L for RevColV2-L): images/s in bf16 autocast with sdpa, MFU = counted
                FLOPs (FlopCounterMode on one step, eager attention: the same matmul work) / step time /
                the measured bf16 GEMM peak, peak memory (CUDA max_memory_allocated over one step).
                Batches come from the real data path (PretrainingCollator with the method's transform
                and mask generator, uint8 pixels normalised on the device); AMT's masks are drawn from
                attention maps (random ones), so its throwing is measured.
    flash       the same step with attn_implementation="flash_attention_2", where flash-attn is installed
    compile     the same step after `model.compile()` (inductor; the compile time is reported)
    columns     RevColV2 reversible vs plain step memory at 2 / 4 / 8 columns (bench_revcolv2_memory's
                exact live-tensor count) at ViT-B width
    inference   RevColV2-L backbone inference images/s and peak memory against a ViT-L (transformers
                ViTModel) at batch 1 .. 256 (RevColV2 paper, Table 7), bf16
    input       the pretraining input pipeline with every core as DataLoader workers: hf_mim (image
                folder and parquet) against the official torchvision pipeline (bench_input_pipeline)

Nothing is asserted: numbers are printed (and written as markdown, to paste in the README with the date
and GPU name, and as JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from argparse import Namespace
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_input_pipeline  # noqa: E402
import bench_pretrain  # noqa: E402
import bench_revcolv2_memory  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

SECTIONS = ("train", "flash", "compile", "columns", "inference", "input")
# seconds per section on a GPU (the dry run gives each section one row at least, in seconds)
CAPS = {"gemm": 10, "train": 110, "flash": 45, "compile": 120, "columns": 25, "inference": 40, "input": 50}


# --------------------------------------------------------------------------------------------- settings


def settings(args: argparse.Namespace) -> dict:
    """Sizes per run kind: ViT-B/L on a GPU, tiny presets for the CPU dry run (same code paths)."""
    if args.dry_run:
        return dict(base="tiny", large="tiny", batch_base=2, batch_large=2, warmup=0, steps=1, dtype=torch.float32,
                    gemm=256, compile_backend="eager", inference_batches=(1, 2), columns_batch=1, photos=8, input_batch=4,
                    photo_size=(64, 48), workers=[0], image_size=32, columns=(2,))
    return dict(base="base", large="large", batch_base=args.batch, batch_large=args.batch // 2, warmup=3,
                steps=args.steps, dtype=torch.bfloat16, gemm=8192, compile_backend="inductor",
                inference_batches=(1, 8, 32, 64, 128, 256), columns_batch=32, photos=512, input_batch=16, photo_size=(500, 375),
                workers=[os.cpu_count() or 1], image_size=224, columns=bench_revcolv2_memory.COLUMNS)


class Budget:
    """Per-section and whole-run deadlines: `allows(section)` is False once either is spent."""

    def __init__(self, total: float, caps: dict[str, float]):
        self.start = time.perf_counter()
        self.total, self.caps = total, caps
        self.spent = {name: 0.0 for name in caps}

    def allows(self, section: str, first: bool = False) -> bool:
        """The first row of a section always runs (so every code path runs in a dry run)."""
        if first:
            return time.perf_counter() - self.start < self.total
        return self.spent[section] < self.caps[section] and time.perf_counter() - self.start < self.total

    def charge(self, section: str, begin: float) -> None:
        self.spent[section] += time.perf_counter() - begin

    def cases(self, section: str, keys: list[dict], rows: list[dict]):
        """Yields each case's key (e.g. {"columns": 4, "engine": ...}) while the section's time allows (the
        first always runs), charging the time until the next one is asked for; the rest become
        "time cap" rows."""
        for index, key in enumerate(keys):
            if not self.allows(section, first=index == 0):
                rows.append({**key, "skipped": "time cap"})
                continue
            begin = time.perf_counter()
            yield key
            self.charge(section, begin)


# --------------------------------------------------------------------------------------------- models


def vitmae_like(config, image_size: int, patch_size: int, depth: int | None = None):
    """transformers' ViTMAEForPreTraining at a method's width, heads and depth (MAE's 512-wide decoder)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    tiny = config.hidden_size < 128
    vitmae_config = ViTMAEConfig(
        hidden_size=config.hidden_size, num_hidden_layers=depth or config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=4 * config.hidden_size,
        decoder_hidden_size=16 if tiny else 512, decoder_num_hidden_layers=2 if tiny else 8,
        decoder_num_attention_heads=2 if tiny else 16, decoder_intermediate_size=64 if tiny else 2048,
        image_size=image_size, patch_size=patch_size, mask_ratio=0.75, layer_norm_eps=1e-6,
    )
    return ViTMAEForPreTraining._from_config(vitmae_config, attn_implementation="sdpa")


CLIP_MEAN, CLIP_STD = [0.4815, 0.4578, 0.4082], [0.2686, 0.2613, 0.2758]


def clip_teacher(config):
    """MaskDistill's teacher: a randomly initialised CLIP vision tower (ViT-B/16 at the base preset, as
    the paper distils CLIP ViT-B/16), in memory."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    width = config.teacher_hidden_size
    tiny = width < 128
    return CLIPVisionModel(CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=1 if tiny else 12,
        num_attention_heads=2 if tiny else 12, image_size=config.image_size, patch_size=config.patch_size,
    )).eval()


def model_rows(sizes: dict) -> list[dict]:
    """(name, how to build it, batch) of the train/flash/compile table, in order of importance."""
    from hf_mim.auto import MODEL_FAMILIES

    rows = []

    def method(name, family, size, batch, **overrides):
        def build():
            config = MODEL_FAMILIES[family].config_class.from_preset(size, **overrides)
            model = MODEL_FAMILIES[family].masked_image_modeling_class._from_config(config, attn_implementation="sdpa")
            if family == "maskdistill":
                model.set_teacher(clip_teacher(config), image_mean=CLIP_MEAN, image_std=CLIP_STD)
            return model, config, MODEL_FAMILIES[family]
        rows.append({"name": name, "build": build, "batch": batch})

    def baseline(name, size, batch, depth):
        def build():
            config = MODEL_FAMILIES["dbot"].config_class.from_preset(size)
            return vitmae_like(config, config.image_size, config.patch_size, depth), config, None
        rows.append({"name": name, "build": build, "batch": batch})

    b, bb, large, bl = sizes["base"], sizes["batch_base"], sizes["large"], sizes["batch_large"]
    baseline("ViTMAE-B (transformers)", b, bb, None)
    method("dBOT-B", "dbot", b, bb)
    method("ExtreMA-B", "extrema", b, bb)
    method("MaskDistill-B", "maskdistill", b, bb)
    method("AMT-B", "amt", b, bb)
    method("RevColV2-B reversible", "revcolv2", b, bb, use_reversible=True)
    method("RevColV2-B plain", "revcolv2", b, bb, use_reversible=False)
    baseline("ViTMAE-L (transformers)", large, bl, None if large == "tiny" else 24)
    method("RevColV2-L reversible", "revcolv2", large, bl, use_reversible=True)
    method("RevColV2-L plain", "revcolv2", large, bl, use_reversible=False)
    return rows


def synthetic_batch(model, config, family, batch_size: int, device: torch.device) -> dict:
    """A batch made as run_mim makes it: random photos through PretrainingCollator (the method's
    transform and mask generator; AMT with attention maps, so it throws), normalised on the device."""
    from hf_mim.data import PretrainingCollator, batch_to_device
    from hf_mim.training import AttentionMapStore, forward_inputs

    rng = np.random.default_rng(0)
    side = int(config.image_size * 1.15)
    examples = [{"image": Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)), "example_id": i}
                for i in range(batch_size)]
    if family is None:  # ViTMAE: pixels only, masks drawn inside
        from hf_mim.data import MaskedImageTransform

        collator = PretrainingCollator(MaskedImageTransform(config.image_size))
        return {"pixel_values": batch_to_device(collator(examples), device, collator)["pixel_values"]}
    store = None
    if model.uses_attention_maps:
        store = AttentionMapStore()
        grid = config.image_size // config.patch_size
        store.update(torch.arange(batch_size), torch.rand(batch_size, grid, grid, generator=torch.Generator().manual_seed(0)))
        store.num_refreshes = 1
    collator = PretrainingCollator(family.pretraining_transform(config), model.mask_generator(attention_maps=store), seed=0)
    batch = batch_to_device(collator.finish(collator(examples), epoch=0), device, collator)
    return forward_inputs(model, batch)


def step_function(model, optimizer, inputs: dict, autocast):
    def step() -> None:
        if hasattr(model, "on_train_step_start"):
            model.on_train_step_start(progress=0.5)  # ExtreMA's momentum update: part of its step
        bench_pretrain.train_step(model, optimizer, autocast, **inputs)
    return step


def time_step(meter, step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    return statistics.median(meter.time(step)[0] for _ in range(steps))


def count_flops(model, step) -> int:
    """Matmul FLOPs of one step, attention counted through its eager (matmul) implementation."""
    with bench_pretrain.attention_implementation(model, "eager"):
        return bench_pretrain.counted_flops(step)


def flash_available() -> bool:
    try:
        from transformers.utils import is_flash_attn_2_available

        return bool(is_flash_attn_2_available())
    except ImportError:
        return False


def train_sections(args, sizes, device, meter, budget, peak: float, results: dict) -> None:
    """The train, flash and compile sections, row by row (one model built per row)."""
    autocast = (lambda: torch.autocast(device.type, dtype=sizes["dtype"])) if sizes["dtype"] != torch.float32 else nullcontext
    flash = flash_available() and device.type == "cuda"
    rows = results.setdefault("train", [])
    wanted = [name.lower() for name in args.models or []]
    chosen = [row for row in model_rows(sizes)
              if not wanted or row["name"].startswith("ViTMAE") or any(row["name"].lower().startswith(w) for w in wanted)]
    for index, row in enumerate(chosen):
        record = {"model": row["name"], "batch": row["batch"]}
        rows.append(record)
        if "train" not in args.sections or not budget.allows("train", first=index == 0):
            record["skipped"] = "time cap" if "train" in args.sections else "section not asked"
            continue
        begin = time.perf_counter()
        model = optimizer = None
        try:
            model, config, family = row["build"]()
            model = model.to(device).train()
            optimizer = bench_pretrain.make_optimizer(model)
            inputs = synthetic_batch(model, config, family, row["batch"], device)
            step = step_function(model, optimizer, inputs, autocast)
            seconds = time_step(meter, step, sizes["warmup"], sizes["steps"])
            record["sdpa_img_s"] = row["batch"] / seconds
            record["peak_mib"] = meter.memory(step)[0] / 2**20
            record["params_m"] = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
            try:
                record["flops"] = count_flops(model, step)
                record["mfu"] = record["flops"] / seconds / peak
            except RuntimeError as error:  # the reversible engine's autograd.grad under FlopCounterMode
                record["flops_note"] = f"FLOPs not counted ({str(error).splitlines()[0][:60]})"
        except Exception as error:  # noqa: BLE001 - one failing row must not end the suite
            record["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            traceback.print_exc()
        budget.charge("train", begin)
        if "error" not in record and "flash" in args.sections:
            if not flash:
                record["flash"] = "n/a (flash-attn not installed)" if device.type == "cuda" else "n/a (CPU)"
            elif budget.allows("flash"):
                begin = time.perf_counter()
                try:
                    with bench_pretrain.attention_implementation(model, "flash_attention_2"):
                        record["flash_img_s"] = row["batch"] / time_step(meter, step, sizes["warmup"], sizes["steps"])
                except Exception as error:  # noqa: BLE001
                    record["flash"] = f"error: {type(error).__name__}: {error}".splitlines()[0][:120]
                budget.charge("flash", begin)
            else:
                record["flash"] = "skipped (time cap)"
        if "error" not in record and "compile" in args.sections:
            if budget.allows("compile", first=index == 0):
                begin = time.perf_counter()
                try:
                    model.compile(backend=sizes["compile_backend"])
                    start = time.perf_counter()
                    step()
                    record["compile_s"] = time.perf_counter() - start
                    seconds = time_step(meter, step, max(sizes["warmup"] - 1, 0), sizes["steps"])
                    record["compiled_img_s"] = row["batch"] / seconds
                    if "flops" in record:
                        record["compiled_mfu"] = record["flops"] / seconds / peak
                    record["compiled_peak_mib"] = meter.memory(step)[0] / 2**20
                except Exception as error:  # noqa: BLE001
                    record["compile"] = f"error: {type(error).__name__}: {error}".splitlines()[0][:120]
                budget.charge("compile", begin)
            else:
                record["compile"] = "skipped (time cap)"
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # ratio to transformers' ViTMAE of the same size
    reference = {size: next((r.get("sdpa_img_s") for r in rows if r["model"].startswith(f"ViTMAE-{size}")), None)
                 for size in ("B", "L")}
    for record in rows:
        size = "L" if "-L" in record["model"] else "B"
        if record.get("sdpa_img_s") and reference[size]:
            record["vs_vitmae"] = record["sdpa_img_s"] / reference[size]


# --------------------------------------------------------------------------------------------- other sections


def columns_section(args, sizes, device, budget, results: dict) -> None:
    """RevColV2 reversible vs plain step memory at 2/4/8 columns, exact (bench_revcolv2_memory)."""
    rows = results.setdefault("columns", [])
    tiny = args.dry_run
    options = Namespace(device=str(device), image_size=sizes["image_size"], patch_size=8 if tiny else 16,
                        width=32 if tiny else 768, heads=2 if tiny else 12, blocks=1, batch=sizes["columns_batch"],
                        threads=torch.get_num_threads())
    keys = [{"columns": columns, "engine": engine} for columns in sizes["columns"] for engine in bench_revcolv2_memory.ENGINES]
    for key in budget.cases("columns", keys, rows):
        try:
            measured = bench_revcolv2_memory.memory_worker(options, key["columns"], key["engine"])
            rows.append({**key, "step_mib": measured["step_peak"] / 2**20,
                         "total_mib": (measured["step_peak"] + measured["held"]) / 2**20})
        except Exception as error:  # noqa: BLE001
            rows.append({**key, "error": f"{type(error).__name__}: {error}"[:200]})
        if device.type == "cuda":
            torch.cuda.empty_cache()


def inference_section(args, sizes, device, meter, budget, results: dict) -> None:
    """RevColV2-L backbone vs ViT-L inference throughput and memory by batch (RevColV2 paper, Table 7)."""
    from transformers import ViTConfig, ViTModel

    from hf_mim import RevColV2Config, RevColV2Model

    rows = results.setdefault("inference", [])
    config = RevColV2Config.from_preset(sizes["large"])
    tiny = config.hidden_size < 128
    vit_config = ViTConfig(hidden_size=config.hidden_size, num_hidden_layers=2 if tiny else 24,
                           num_attention_heads=config.num_attention_heads, intermediate_size=4 * config.hidden_size,
                           image_size=config.image_size, patch_size=config.patch_size)
    models = {
        "RevColV2-L": RevColV2Model._from_config(config, attn_implementation="sdpa"),
        "ViT-L (transformers)": ViTModel._from_config(vit_config, attn_implementation="sdpa", add_pooling_layer=False),
    }
    autocast = (lambda: torch.autocast(device.type, dtype=sizes["dtype"])) if sizes["dtype"] != torch.float32 else nullcontext
    keys = [{"model": name, "batch": batch} for batch in sizes["inference_batches"] for name in models]
    for key in budget.cases("inference", keys, rows):
        model, batch = models[key["model"]], key["batch"]
        model.to(device).eval()
        pixels = torch.randn(batch, 3, config.image_size, config.image_size, device=device)

        def forward():
            with torch.no_grad(), autocast():
                model(pixel_values=pixels)

        try:
            seconds = time_step(meter, forward, sizes["warmup"], sizes["steps"])
            rows.append({**key, "img_s": batch / seconds, "peak_mib": meter.memory(forward)[0] / 2**20})
        except Exception as error:  # noqa: BLE001 (e.g. out of memory at the largest batch)
            rows.append({**key, "error": f"{type(error).__name__}: {error}"[:120]})
    if device.type == "cuda":
        torch.cuda.empty_cache()


def input_section(args, sizes, budget, results: dict) -> None:
    """The input pipeline with every core as workers: hf_mim (folder, parquet) vs official torchvision."""
    rows = results.setdefault("input", [])
    batch = results["meta"]["input_batch"] = sizes["input_batch"]
    with tempfile.TemporaryDirectory(prefix="gpu_suite_input_") as folder:
        root = Path(folder)
        paths = bench_input_pipeline.make_photos(root, sizes["photos"], sizes["photo_size"])
        bench_input_pipeline.write_parquet(root, paths, shards=max(4, max(sizes["workers"])))
        loaders = {
            "official (torchvision, folder)": lambda w: bench_input_pipeline.official_loader(root / "folder" / "train", batch, w),
            "hf_mim folder": lambda w: bench_input_pipeline.hf_mim_loader(root / "folder" / "train", batch, w),
            "hf_mim parquet": lambda w: bench_input_pipeline.hf_mim_loader(root / "parquet", batch, w),
        }
        keys = [{"pipeline": name, "workers": workers} for workers in sizes["workers"] for name in loaders]
        for key in budget.cases("input", keys, rows):
            try:
                images, wall, cpu = bench_input_pipeline.one_pass(loaders[key["pipeline"]](key["workers"]))
                rows.append({**key, "img_s": images / wall, "img_cpu_s": images / max(cpu, 1e-9)})
            except Exception as error:  # noqa: BLE001 (e.g. torchvision missing)
                rows.append({**key, "error": f"{type(error).__name__}: {error}"[:120]})
    official = {row["workers"]: row.get("img_s") for row in rows if row["pipeline"].startswith("official")}
    for row in rows:
        if row.get("img_s") and official.get(row["workers"]):
            row["vs_official"] = row["img_s"] / official[row["workers"]]


# --------------------------------------------------------------------------------------------- report


def _cell(value, spec: str = ".1f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"### GPU suite, {meta['date']}: {meta['device_name']}",
        "",
        f"torch {meta['torch']}, transformers {meta['transformers']}, {meta['dtype']} autocast, "
        f"GEMM peak {meta['gemm_peak_tflops']:.1f} TFLOP/s ({meta['gemm']}), {meta['cpus']} CPU cores"
        + (" — DRY RUN (tiny sizes on CPU; the numbers mean nothing)" if meta["dry_run"] else ""),
        "",
        "| model | batch | img/s sdpa | vs ViTMAE | MFU | peak MiB | img/s flash | img/s compiled | MFU compiled "
        "| compile s | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results.get("train", []):
        note = r.get("skipped") or r.get("error") or "; ".join(str(r[k]) for k in ("flash", "compile", "flops_note") if k in r)
        lines.append(
            f"| {r['model']} | {r['batch']} | {_cell(r.get('sdpa_img_s'))} | {_cell(r.get('vs_vitmae'), '.2f')} "
            f"| {_cell(100 * r['mfu'] if 'mfu' in r else None)}% | {_cell(r.get('peak_mib'), '.0f')} "
            f"| {_cell(r.get('flash_img_s'))} | {_cell(r.get('compiled_img_s'))} "
            f"| {_cell(100 * r['compiled_mfu'] if 'compiled_mfu' in r else None)}% | {_cell(r.get('compile_s'))} | {note} |"
        )
    if results.get("columns"):
        lines += ["", "RevColV2 step memory by columns (exact live tensors; ViT-B width)", "",
                  "| columns | engine | step MiB | step + params + AdamW MiB | note |", "|---:|---|---:|---:|---|"]
        for r in results["columns"]:
            lines.append(f"| {r['columns']} | {r['engine']} | {_cell(r.get('step_mib'))} | {_cell(r.get('total_mib'))} "
                         f"| {r.get('skipped') or r.get('error') or ''} |")
    if results.get("inference"):
        lines += ["", "Inference (RevColV2 Table 7): images/s and peak MiB by batch", "",
                  "| model | batch | img/s | peak MiB | note |", "|---|---:|---:|---:|---|"]
        for r in results["inference"]:
            lines.append(f"| {r['model']} | {r['batch']} | {_cell(r.get('img_s'))} | {_cell(r.get('peak_mib'), '.0f')} "
                         f"| {r.get('skipped') or r.get('error') or ''} |")
    if results.get("input"):
        lines += ["", f"Input pipeline (224 crops + flip + masks, batch {meta.get('input_batch')}; hf_mim leaves "
                  "normalisation to the GPU)", "",
                  "| pipeline | workers | img/s | img/cpu-s | vs official | note |", "|---|---:|---:|---:|---:|---|"]
        for r in results["input"]:
            lines.append(f"| {r['pipeline']} | {r['workers']} | {_cell(r.get('img_s'))} | {_cell(r.get('img_cpu_s'))} "
                         f"| {_cell(r.get('vs_official'), '.2f')} | {r.get('skipped') or r.get('error') or ''} |")
    seconds = results["meta"].get("seconds")
    lines += ["", f"whole run: {seconds:.0f} s; section seconds {json.dumps(results['meta'].get('section_seconds', {}))}"
              if seconds is not None else ""]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, seconds (CI)")
    parser.add_argument("--device", help="default: cuda when available, else cpu (the dry run: cpu)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--models", nargs="+", help="only the train rows whose names start with these (e.g. dBOT "
                        "RevColV2-L); the ViTMAE references always run")
    parser.add_argument("--batch", type=int, default=128, help="ViT-B batch (ViT-L: half)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (median)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450: < 8 min)")
    parser.add_argument("--output-dir", default="gpu_suite_results", help="where table.md and results.json go")
    args = parser.parse_args(argv)
    if args.batch < 2 or args.steps < 1:
        parser.error("--batch must be >= 2 and --steps >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import hf_mim  # noqa: F401

    device = torch.device("cpu" if args.dry_run else (args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda given but torch.cuda.is_available() is False")
    if device.type == "cpu" and not args.dry_run:
        print("warning: no GPU: bf16 on this CPU is very slow; use --dry-run to check the suite", file=sys.stderr)
    sizes = settings(args)
    threads = torch.get_num_threads()
    if args.dry_run:
        torch.set_num_threads(1)  # tiny steps: threads only wait for each other on a shared CPU
    try:
        return run_sections(args, sizes, device)
    finally:
        torch.set_num_threads(threads)


def run_sections(args: argparse.Namespace, sizes: dict, device: torch.device) -> dict:
    import transformers

    # the dry run: every row of every section (tiny models), but only the first compile (dynamo's tracing
    # is the slow part on a CPU)
    caps = dict(CAPS) if not args.dry_run else {**{name: float("inf") for name in CAPS}, "compile": 0.0}
    budget = Budget(args.budget if not args.dry_run else float("inf"), caps)
    meter = bench_pretrain.Meter(device)
    torch.manual_seed(0)
    peak = bench_pretrain.gemm_peak_flops(device, sizes["gemm"], 3 if args.dry_run else 10, sizes["dtype"], meter)
    results = {"meta": {
        "date": datetime.date.today().isoformat(), "dry_run": args.dry_run,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()}",
        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(sizes["dtype"]).replace("torch.", ""),
        "gemm": f"{sizes['gemm']}^3 matmul", "gemm_peak_tflops": peak / 1e12, "cpus": os.cpu_count(),
    }}
    train_sections(args, sizes, device, meter, budget, peak, results)
    if "columns" in args.sections:
        columns_section(args, sizes, device, budget, results)
    if "inference" in args.sections:
        inference_section(args, sizes, device, meter, budget, results)
    if "input" in args.sections:
        input_section(args, sizes, budget, results)
    results["meta"]["seconds"] = time.perf_counter() - budget.start
    results["meta"]["section_seconds"] = {name: round(value, 1) for name, value in budget.spent.items() if value}
    table = markdown(results)
    print(table)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "table.md").write_text(table)
    (output / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {output / 'table.md'} and {output / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
