"""training_scripts/run_image_classification.py: fine-tuning and linear probing from hf_mim checkpoints.

The script runs as a subprocess with a tiny dBOT (image 32, patch 8) on a tiny labelled parquet
folder written here, or on the embedded digits at 32 px. The independent runs start together (one
thread each) when the module's first test needs them, so their start-up costs overlap.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import hf_mim  # noqa: F401  (registers the Auto classes)
from hf_mim import DbotConfig, DbotForMaskedImageModeling
from hf_mim.hub import save_hub_folder
from hf_mim.training import (
    StagedSchedule,
    attach_batchnorm_probe,
    fold_batchnorm_probe,
    freeze_backbone,
    linear_probe_train_mode,
)
from hf_mim.training.classification import build_optimizer, mixup_active

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "training_scripts" / "run_image_classification.py"
CLASS_NAMES = ["cat", "dog", "bird"]  # ClassLabel order: ids 0, 1, 2
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 230)]


def load_script():
    spec = importlib.util.spec_from_file_location("run_image_classification", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png(colour, rng: random.Random) -> bytes:
    array = np.clip(np.array(colour)[None, None, :] + np.array(
        [[[rng.randint(-30, 30)] * 3 for _ in range(40)] for _ in range(40)]), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet_split(folder: Path, split: str, per_class: int, shards: int, with_labels: bool, seed: int) -> None:
    """`folder/<split>/<split>-0000k-of-0000n.parquet`: noisy single-colour 40x40 images, one colour per class."""
    from datasets import ClassLabel, Features, Value
    from datasets import Image as ImageFeature
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    rows = [(label, _png(COLOURS[label], rng)) for label in range(len(CLASS_NAMES)) for _ in range(per_class)]
    rng.shuffle(rows)
    columns = {"image": ImageFeature(), "__key__": Value("string")}
    if with_labels:
        columns["label"] = ClassLabel(names=CLASS_NAMES)
    features = Features(columns)
    (folder / split).mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        part = rows[shard::shards]
        data = {"image": [{"bytes": png, "path": None} for _, png in part], "__key__": [f"{split}/{shard}/{i}" for i in range(len(part))]}
        if with_labels:
            data["label"] = [label for label, _ in part]
        pq.write_table(pa.Table.from_pydict(data, schema=features.arrow_schema),
                       folder / split / f"{split}-{shard:05d}-of-{shards:05d}.parquet")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_image_classification")
    # a "pretraining checkpoint": the folder run_mim.py writes, from a tiny random dBOT
    torch.manual_seed(0)
    pretrained = DbotForMaskedImageModeling(DbotConfig.from_preset("tiny"))
    save_hub_folder(pretrained, root / "pretrained")
    write_parquet_split(root / "labelled", "train", per_class=8, shards=2, with_labels=True, seed=1)
    write_parquet_split(root / "labelled", "validation", per_class=4, shards=1, with_labels=True, seed=2)
    write_parquet_split(root / "unlabelled", "train", per_class=4, shards=1, with_labels=False, seed=3)
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_MIM_CACHE=str(root / "cache"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    return {"root": root, "pretrained": root / "pretrained", "labelled": root / "labelled",
            "unlabelled": root / "unlabelled", "env": env}


TINY = ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--num_warmup_steps", "1",
        "--logging_steps", "1", "--shuffle_buffer_size", "16"]


def run_script(workspace, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(command, capture_output=True, text=True, env=workspace["env"], cwd=workspace["root"], timeout=600)


@pytest.fixture(scope="module")
def runs(workspace):
    """The independent script runs, started together; `runs[name].result()` waits for one."""
    ws = workspace
    commands = {
        "finetune": ["--model_name_or_path", str(ws["pretrained"]), "--train_dir", str(ws["labelled"]),
                     "--output_dir", str(ws["root"] / "finetune"), "--max_train_steps", "4", "--eval_steps", "2",
                     "--checkpointing_steps", "2", "--with_tracking", *TINY],
        "linear_probe": ["--model_name_or_path", str(ws["pretrained"]), "--train_dir", str(ws["labelled"]),
                         "--mode", "linear_probe", "--output_dir", str(ws["root"] / "linear_probe"),
                         "--max_train_steps", "4", *TINY],
        # no data flags: the embedded digits at the tiny model's 32 px
        "random_init": ["--model_type", "dbot", "--model_size", "tiny", "--output_dir", str(ws["root"] / "random_init"),
                        "--max_train_steps", "2", "--per_device_train_batch_size", "8", "--num_warmup_steps", "1",
                        "--per_device_eval_batch_size", "128",
                        # offline: the push fails clearly after the folder is written
                        "--push_to_hub", "--hub_model_id", "someone/dbot-tiny-digits"],
    }
    pool = ThreadPoolExecutor(max_workers=len(commands))
    futures = {name: pool.submit(run_script, ws, *command) for name, command in commands.items()}
    yield futures
    pool.shutdown(wait=True)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return result


def check_eval_results(folder: Path) -> dict:
    results = json.loads((folder / "eval_results.json").read_text())
    for key in ("top1", "top5"):
        assert 0.0 <= results[key] <= 100.0
    assert results["top5"] >= results["top1"]
    return results


# ------------------------------------------------------------------------------------ subprocess runs


def test_finetune_from_pretraining_checkpoint(workspace, runs):
    from transformers import AutoModelForImageClassification

    result = succeeded(runs["finetune"].result())
    out = workspace["root"] / "finetune"
    assert "run_image_classification: mode=finetune steps=4 top1=" in result.stdout

    model = AutoModelForImageClassification.from_pretrained(out)
    assert type(model).__name__ == "DbotForImageClassification"
    assert model.config.id2label == dict(enumerate(CLASS_NAMES))
    assert model.config.label2id == {name: i for i, name in enumerate(CLASS_NAMES)}
    assert model.config.drop_path_rate == pytest.approx(0.1)  # the fine-tuning default, set when loading
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_dbot.DbotForImageClassification"
    assert (out / "preprocessor_config.json").is_file() and (out / "modeling_dbot.py").is_file()

    results = check_eval_results(out)
    assert results["eval_examples"] == 12 and [h["step"] for h in results["history"]] == [2, 4]
    args = json.loads((out / "training_args.json").read_text())
    assert args["mode"] == "finetune" and args["layer_decay"] == 0.65 and args["mixup"] == 0.8
    card = (out / "README.md").read_text()
    assert "model-index" in card and "top-1 accuracy" in card and "image-classification" in card
    assert "produced by `training_scripts/run_image_classification.py`" in card
    assert f"value: {round(results['top1'] / 100, 4)}" in card  # model-index metrics are fractions
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert list((out / "runs").rglob("events.out.tfevents*")), "no tensorboard log written"

    # fine-tuning trains the backbone, which started from the pretraining checkpoint
    pretrained = load_file(str(workspace["pretrained"] / "model.safetensors"))
    tuned = load_file(str(out / "model.safetensors"))
    key = "dbot.encoder.layers.0.attn.qkv.weight"
    assert tuned[key].shape == pretrained[key].shape and not torch.equal(tuned[key], pretrained[key])
    assert "layer-wise lr decay 0.65 over 2 blocks" in result.stderr


def test_linear_probe_keeps_backbone_and_saves_a_plain_linear(workspace, runs):
    from transformers import AutoModelForImageClassification

    from hf_mim.data import ClassificationCollator, EvalTransform, load_image_stream, prepare_stream

    result = succeeded(runs["linear_probe"].result())
    out = workspace["root"] / "linear_probe"
    assert "mode=linear_probe steps=4" in result.stdout

    pretrained = load_file(str(workspace["pretrained"] / "model.safetensors"))
    probed = load_file(str(out / "model.safetensors"))
    backbone = [key for key in pretrained if key.startswith("dbot.encoder.")]
    # the pretraining-only final norm is dropped (the classifier pools with fc_norm); the rest is kept
    assert {key for key in backbone if key not in probed} == {"dbot.encoder.layernorm.weight", "dbot.encoder.layernorm.bias"}
    backbone = [key for key in backbone if key in probed]
    assert len(backbone) > 20
    for key in backbone:  # bit for bit
        assert torch.equal(probed[key], pretrained[key]), key
    assert sorted(k for k in probed if k.startswith("classifier")) == ["classifier.bias", "classifier.weight"]

    model = AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(model.classifier) is nn.Linear and model.classifier.out_features == 3
    assert model.config.id2label == dict(enumerate(CLASS_NAMES))
    results = check_eval_results(out)

    # the saved (folded) model reproduces the reported accuracy
    stream, image_column, label_column = load_image_stream(train_dir=str(workspace["labelled"]), split="validation")
    stream = prepare_stream(stream, image_column, seed=0, buffer_size=0, label_column=label_column)
    collate = ClassificationCollator(EvalTransform(32))
    batch = collate(list(stream))
    with torch.no_grad():
        predictions = model(pixel_values=batch["pixel_values"]).logits.argmax(-1)
    top1 = 100.0 * (predictions == batch["labels"]).float().mean().item()
    assert top1 == pytest.approx(results["top1"], abs=1e-4)
    args = json.loads((out / "training_args.json").read_text())
    assert args["optimizer"] == "lars" and args["mixup"] == 0.0 and args["randaug"] == "none"


def test_random_init_baseline_on_embedded_digits_and_offline_push(workspace, runs):
    from transformers import AutoModelForImageClassification

    result = runs["random_init"].result()
    out = workspace["root"] / "random_init"
    assert result.returncode == 1, result.stderr[-4000:]  # the push failed (offline) ...
    assert "someone/dbot-tiny-digits" in result.stderr and "Traceback" not in result.stderr
    assert "mode=finetune steps=2" in result.stdout  # ... after training, evaluation and the folder
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label == {i: str(i) for i in range(10)}
    assert model.config.image_size == 32 and model.config.hidden_size == 32
    results = check_eval_results(out)
    assert results["eval_examples"] == 359
    assert "hf_mim embedded digits" in results["dataset"]


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(workspace, runs):
    """Stopping after step 2 and resuming gives the same final weights as running 4 steps at once."""
    succeeded(runs["finetune"].result())
    out = workspace["root"] / "resumed"
    result = succeeded(run_script(
        workspace, "--model_name_or_path", str(workspace["pretrained"]), "--train_dir", str(workspace["labelled"]),
        "--output_dir", str(out), "--max_train_steps", "4", "--eval_steps", "2", *TINY,
        "--resume_from_checkpoint", str(workspace["root"] / "finetune" / "checkpoint-2"),
    ))
    assert "resumed from" in result.stderr
    straight = load_file(str(workspace["root"] / "finetune" / "model.safetensors"))
    resumed = load_file(str(out / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_linear_probe_folder_loads_without_hf_mim(workspace, runs, tmp_path):
    """The folded probe is an ordinary classifier: remote code and the pipeline load it without hf_mim."""
    from helpers import run_without_hf_mim

    succeeded(runs["linear_probe"].result())
    folder = workspace["root"] / "linear_probe"
    result = run_without_hf_mim(f"""
        import numpy as np
        from PIL import Image
        from transformers import AutoModelForImageClassification, pipeline
        model = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model.classifier).__name__ == "Linear", type(model.classifier)
        classify = pipeline("image-classification", model={str(folder)!r}, trust_remote_code=True)
        predictions = classify(Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)))
        print("labels", sorted(p["label"] for p in predictions))
    """, tmp_path)
    assert "labels ['bird', 'cat', 'dog']" in result.stdout


# ------------------------------------------------------------------------------------ in-process


def test_missing_or_wrong_label_column_is_a_clear_error(workspace, capsys):
    """Data errors end the run before anything is built, with a message naming the fix."""
    script = load_script()
    base = ["--model_name_or_path", str(workspace["pretrained"]), "--max_train_steps", "1"]
    out = workspace["root"] / "no_label"
    with pytest.raises(SystemExit) as error:
        script.main([*base, "--train_dir", str(workspace["unlabelled"]), "--output_dir", str(out)])
    message = capsys.readouterr().err  # one line on stderr, exit status 2, as argparse errors
    assert error.value.code == 2
    assert "no label column" in message and "--label_column_name" in message and "'image'" in message
    assert not out.exists()
    with pytest.raises(SystemExit) as error:
        script.main([*base, "--train_dir", str(workspace["labelled"]), "--label_column_name", "species",
                     "--output_dir", str(out)])
    message = capsys.readouterr().err
    assert "label column 'species' not found" in message and "--label_column_name" in message
    with pytest.raises(SystemExit):
        script.parse_args(["--train_dir", str(workspace["labelled"])])  # no model at all
    assert "--model_name_or_path" in capsys.readouterr().err


def test_layer_decay_scales_the_learning_rates(workspace):
    script = load_script()
    args = script.parse_args(["--model_type", "dbot", "--model_size", "tiny", "--learning_rate", "1e-3",
                              "--layer_decay", "0.5"])
    assert args.mode == "finetune" and args.weight_decay == 0.05 and args.optimizer == "adamw"
    model = script.build_model(args, dict(enumerate(CLASS_NAMES)))
    optimizer = build_optimizer(args, model, lr=1e-3)
    schedule = StagedSchedule(optimizer, base_lr=1e-3, steps_per_stage=[10], warmup_steps=0)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)
    depth = model.config.num_hidden_layers  # 2: ids 0 (embeddings), 1, 2 (blocks), 3 (fc_norm, head)
    lr_of = {}
    for group in optimizer.param_groups:
        for name in group["param_names"]:
            lr_of[name] = group["lr"]
            assert group["lr"] == pytest.approx(1e-3 * 0.5 ** (depth + 1 - group["layer_id"]))
    assert lr_of["dbot.encoder.embeddings.patch_embeddings.projection.weight"] == pytest.approx(1e-3 * 0.5**3)
    assert lr_of["dbot.encoder.layers.0.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5**2)
    assert lr_of["dbot.encoder.layers.1.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5)
    assert lr_of["classifier.weight"] == pytest.approx(1e-3) and lr_of["dbot.pooler.fc_norm.weight"] == pytest.approx(1e-3)
    optimizer.step()
    schedule.step()  # cosine over 10 steps: every group keeps its scale
    factor = 0.5 * (1 + np.cos(np.pi * 1 / 10))
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * factor * 0.5 ** (depth + 1 - group["layer_id"]))
    decayed = {name for group in optimizer.param_groups if group["weight_decay"] > 0 for name in group["param_names"]}
    assert "classifier.weight" in decayed and "classifier.bias" not in decayed
    assert "dbot.encoder.embeddings.cls_token" not in decayed


def test_linear_probe_defaults_and_lars_groups(workspace):
    script = load_script()
    args = script.parse_args(["--model_type", "dbot", "--model_size", "tiny", "--mode", "linear_probe",
                              "--train_dir", "x"])
    assert (args.base_learning_rate, args.weight_decay, args.optimizer) == (0.1, 0.0, "lars")
    assert (args.mixup, args.cutmix, args.randaug, args.reprob, args.drop_path_rate) == (0.0, 0.0, "none", 0.0, 0.0)
    assert not mixup_active(args)
    model = script.build_model(args, dict(enumerate(CLASS_NAMES)))
    attach_batchnorm_probe(model)
    assert freeze_backbone(model) == ["classifier.1.weight", "classifier.1.bias"]
    optimizer = build_optimizer(args, model, lr=0.1)
    from timm.optim import Lars

    assert isinstance(optimizer, Lars)
    adapt = {name: group["always_adapt"] for group in optimizer.param_groups for name in group["param_names"]}
    assert adapt == {"classifier.1.weight": True, "classifier.1.bias": False}  # MAE's LARS: matrices only
    # the finetune defaults, for comparison
    finetune = script.parse_args(["--model_type", "dbot", "--train_dir", "x"])
    assert (finetune.base_learning_rate, finetune.label_smoothing, finetune.mixup, finetune.cutmix) == (5e-4, 0.1, 0.8, 1.0)
    assert (finetune.randaug, finetune.reprob, finetune.drop_path_rate) == ("rand-m9-mstd0.5-inc1", 0.25, 0.1)


def test_seeded_timm_transform_is_pure_and_leaves_global_rngs_alone():
    from hf_mim.data import example_generator

    from hf_mim.data.finetune_transforms import SeededTimmTransform, finetune_train_transform

    args = load_script().parse_args(["--model_type", "dbot", "--train_dir", "x"])
    transform = finetune_train_transform(32, args.randaug, args.reprob)
    assert isinstance(transform, SeededTimmTransform)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    before = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    first = transform(image, example_generator(0, 0, 123))
    again = transform(image, example_generator(0, 0, 123))
    other = transform(image, example_generator(0, 1, 123))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == before  # global RNGs untouched
    assert first.shape == (3, 32, 32) and torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("randaug", ["none", "rand-m1-n1"])
def test_scale_and_hflip_reach_both_train_transforms(randaug):
    """--scale 1 1 keeps the whole image and --hflip 0 never mirrors it (digits), on hf_mim's seeded crop and
    on timm's RandAugment transform alike; --hflip 1 always mirrors it."""
    from hf_mim.data import example_generator
    from hf_mim.data.finetune_transforms import finetune_train_transform

    script = load_script()
    args = script.parse_args(["--model_type", "dbot", "--train_dir", "x", "--randaug", randaug, "--reprob", "0",
                              "--scale", "1", "1", "--hflip", "0"])
    assert tuple(args.scale) == (1.0, 1.0) and args.hflip == 0.0
    image = Image.new("RGB", (32, 32))
    image.paste((255, 255, 255), (0, 0, 8, 32))  # a white bar on the left edge
    for flip, left_is_white in ((0.0, True), (1.0, False)):
        transform = finetune_train_transform(32, randaug if randaug != "none" else "none", 0.0, (1.0, 1.0), flip)
        for example in range(6):
            pixels = transform(image, example_generator(0, 0, example))
            pixels = pixels.float() if pixels.dtype == torch.uint8 else pixels
            assert (pixels[0, :, :4].mean() > pixels[0, :, -4:].mean()) == left_is_white


@pytest.mark.parametrize("flags, message", [(["--scale", "0.5", "0.2"], "--scale"), (["--hflip", "1.5"], "--hflip")])
def test_bad_crop_flags_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script().parse_args(["--model_type", "dbot", "--train_dir", "x", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_randaugment_posterize_to_zero_bits_gives_a_black_image():
    """'PosterizeIncreasing' at magnitude 10 keeps 0 bits: Pillow 13 raises, older Pillow (and the
    script) return a black image."""
    from timm.data import auto_augment

    from hf_mim.data.finetune_transforms import finetune_train_transform, posterize_zero_bits_black

    args = load_script().parse_args(["--model_type", "dbot", "--train_dir", "x"])
    transform = finetune_train_transform(32, args.randaug, args.reprob)
    rand_augment = next(t for t in transform.transform.transforms if hasattr(t, "ops"))
    posterize_ops = [op for op in rand_augment.ops if op.name.startswith("Posterize")]
    assert posterize_ops and all(op.aug_fn is posterize_zero_bits_black for op in posterize_ops)
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert np.asarray(posterize_zero_bits_black(image, 0)).max() == 0
    assert np.array_equal(np.asarray(posterize_zero_bits_black(image, 2)), np.asarray(auto_augment.posterize(image, 2)))
    op = posterize_ops[0]
    op.magnitude, op.magnitude_std, op.prob = 10, 0, 1.0
    assert np.asarray(op(image)).max() == 0


# ------------------------------------------------------------------------------------ folding


def test_fold_batchnorm_probe_is_exact():
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(6, 16)
            self.classifier = nn.Linear(16, 5)

        def forward(self, x):
            return self.classifier(self.backbone(x))

    model = Tiny()
    probe = attach_batchnorm_probe(model)
    assert isinstance(probe[0], nn.BatchNorm1d) and not probe[0].affine and probe[0].eps == 1e-6
    assert probe[1].bias.abs().max() == 0 and probe[1].weight.std() < 0.02  # re-initialised, MAE's std 0.01
    assert freeze_backbone(model) == ["classifier.1.weight", "classifier.1.bias"]
    backbone_before = model.backbone.weight.clone()

    # a few training steps: the BatchNorm collects running statistics, only the head moves
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(5):
        linear_probe_train_mode(model)
        assert not model.training and model.classifier.training and model.classifier[0].training
        x = torch.randn(32, 6) * 3 + 1
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 5, (32,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(model.backbone.weight, backbone_before)
    assert probe[0].num_batches_tracked == 5 and not torch.allclose(probe[0].running_var, torch.ones(16))

    model.eval()
    x = torch.randn(64, 6) * 3 + 1
    with torch.no_grad():
        expected = model(x)
    folded = fold_batchnorm_probe(model)
    assert type(model.classifier) is nn.Linear and model.classifier is folded
    with torch.no_grad():
        actual = model(x)
    assert (actual - expected).abs().max().item() < 1e-6
    assert set(model.state_dict()) == {"backbone.weight", "backbone.bias", "classifier.weight", "classifier.bias"}
    with pytest.raises(TypeError, match="not a BatchNorm probe"):
        fold_batchnorm_probe(model)


def test_fold_batchnorm_probe_with_affine_batchnorm():
    torch.manual_seed(1)
    model = nn.Module()
    linear = nn.Linear(8, 3)
    norm = nn.BatchNorm1d(8, eps=1e-5)
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.normal_()
        norm.bias.normal_()
    model.classifier = nn.Sequential(norm, linear).eval()
    x = torch.randn(20, 8)
    with torch.no_grad():
        expected = model.classifier(x)
        fold_batchnorm_probe(model)
        assert (model.classifier(x) - expected).abs().max().item() < 1e-6
    with pytest.raises(TypeError, match="not nn.Linear"):
        attach_batchnorm_probe(_with_head(nn.Identity()))


def _with_head(head: nn.Module) -> nn.Module:
    module = nn.Module()
    module.classifier = head
    return module
