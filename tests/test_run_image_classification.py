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
from hf_mim import DbotConfig, DbotForImageClassification, DbotForMaskedImageModeling
from hf_mim.hub import save_hub_folder
from hf_mim.training import (
    StagedSchedule,
    attach_batchnorm_probe,
    fold_batchnorm_probe,
    freeze_backbone,
    linear_probe_train_mode,
)
from hf_mim.training.classification import build_optimizer, mixup_active
from helpers import perturbed

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "training_scripts" / "run_image_classification.py"
CLASS_NAMES = ["cat", "dog", "bird"]  # ClassLabel order: ids 0, 1, 2
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 230)]
EIGHT = {"names": [f"colour{i}" for i in range(8)],
         "colours": [(r, g, b) for r in (40, 215) for g in (40, 215) for b in (40, 215)]}


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


def write_parquet_split(folder: Path, split: str, per_class: int, shards: int, with_labels: bool, seed: int,
                        names=CLASS_NAMES, colours=COLOURS) -> None:
    """`folder/<split>/<split>-0000k-of-0000n.parquet`: noisy single-colour 40x40 images, one colour per class."""
    from datasets import ClassLabel, Features, Value
    from datasets import Image as ImageFeature
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    rows = [(label, _png(colours[label], rng)) for label in range(len(names)) for _ in range(per_class)]
    rng.shuffle(rows)
    columns = {"image": ImageFeature(), "__key__": Value("string")}
    if with_labels:
        columns["label"] = ClassLabel(names=list(names))
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
    # --do_eval: a saved tiny classifier for 8 colour classes (top-5 of 8 is not trivially 100 %)
    write_parquet_split(root / "eight", "train", per_class=1, shards=1, with_labels=True, seed=4, **EIGHT)
    write_parquet_split(root / "eight", "validation", per_class=3, shards=2, with_labels=True, seed=5, **EIGHT)
    torch.manual_seed(1)
    classifier = DbotForImageClassification(DbotConfig.from_preset(
        "tiny", id2label=dict(enumerate(EIGHT["names"])), label2id={name: i for i, name in enumerate(EIGHT["names"])}))
    save_hub_folder(perturbed(classifier), root / "classifier")
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_MIM_CACHE=str(root / "cache"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    return {"root": root, "pretrained": root / "pretrained", "labelled": root / "labelled",
            "unlabelled": root / "unlabelled", "eight": root / "eight", "classifier": root / "classifier", "env": env}


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
        "lora": ["--model_name_or_path", str(ws["pretrained"]), "--train_dir", str(ws["labelled"]),
                 "--output_dir", str(ws["root"] / "lora"), "--max_train_steps", "3", "--learning_rate", "1e-2",
                 "--lora_rank", "4", "--lora_qkv_parts", "q", "v", "--checkpointing_steps", "2", *TINY],
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


def validation_logits(model, folder: Path, image_size: int = 32):
    """(logits, labels) of `model` on every image of `folder`'s validation split, through the evaluation
    transform, in one batch."""
    from hf_mim.data import ClassificationCollator, EvalTransform, load_image_stream, prepare_stream

    stream, image_column, label_column = load_image_stream(train_dir=str(folder), split="validation")
    batch = ClassificationCollator(EvalTransform(image_size))(list(prepare_stream(stream, image_column, seed=0, buffer_size=0,
                                                                                   label_column=label_column)))
    with torch.no_grad():
        return model.eval()(pixel_values=batch["pixel_values"]).logits, batch["labels"]


def hand_top_k(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 (percent) by sorting each row's logits."""
    order = logits.argsort(dim=-1, descending=True)
    top1 = sum(int(order[i, 0] == labels[i]) for i in range(len(labels)))
    top5 = sum(int(labels[i] in order[i, :5].tolist()) for i in range(len(labels)))
    return 100.0 * top1 / len(labels), 100.0 * top5 / len(labels)


@pytest.fixture(scope="module")
def hand_eval(workspace):
    """(top-1, top-5) of the saved 8-class classifier on its validation images, from its logits by hand."""
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(workspace["classifier"])
    logits, labels = validation_logits(model, workspace["eight"])
    top1, top5 = hand_top_k(logits, labels)
    assert len(labels) == 24 and 0 < top1 < top5 < 100  # neither trivial
    return top1, top5


def eval_only(workspace, name: str, *flags: str) -> Path:
    """run_image_classification.py in-process on the saved classifier and the 8-class data; its output folder."""
    out = workspace["root"] / name
    assert load_script().main(["--model_name_or_path", str(workspace["classifier"]), "--train_dir", str(workspace["eight"]),
                               "--output_dir", str(out), *TINY, *flags]) == 0
    return out


def test_do_eval_reports_the_hand_computed_top1_top5(workspace, hand_eval, fresh_accelerate_state, capsys):
    """--do_eval on a saved classifier: nothing trained, top-1/top-5 equal to the logits' own ranking,
    in eval_results.json and the card's model-index, the evaluated weights saved unchanged."""
    top1, top5 = hand_eval
    out = eval_only(workspace, "eval_only", "--do_eval")
    results = json.loads((out / "eval_results.json").read_text())
    assert results["top1"] == pytest.approx(top1, abs=1e-4) and results["top5"] == pytest.approx(top5, abs=1e-4)
    assert results["eval_examples"] == 24 and results["mode"] == "eval" and results["split"] == "validation"
    assert f"mode=eval top1={top1:.2f} top5={top5:.2f} images=24" in capsys.readouterr().out
    assert not list(out.glob("checkpoint-*"))
    card = (out / "README.md").read_text()
    assert f"value: {round(top1 / 100, 4)}" in card and f"value: {round(top5 / 100, 4)}" in card
    assert "evaluation only (no training)" in card
    saved, original = load_file(str(out / "model.safetensors")), load_file(str(workspace["classifier"] / "model.safetensors"))
    assert saved.keys() == original.keys() and all(torch.equal(saved[key], original[key]) for key in saved)


def test_max_train_steps_zero_is_do_eval(workspace, hand_eval, fresh_accelerate_state, capsys):
    out = eval_only(workspace, "eval_steps0", "--max_train_steps", "0")
    results = json.loads((out / "eval_results.json").read_text())
    assert (results["top1"], results["top5"], results["eval_examples"]) == (*hand_eval, 24)
    assert "mode=eval" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--model_type", "dbot", "--do_eval"], "--do_eval evaluates a classifier: give its folder"),
    (["--model_name_or_path", "x", "--do_eval", "--mode", "linear_probe"], "not with --mode linear_probe"),
    (["--model_name_or_path", "x", "--max_train_steps", "0", "--lora_rank", "4"], "--do_eval trains nothing"),
    (["--model_name_or_path", "x", "--do_eval", "--validation_split", "none"], "--do_eval evaluates on validation data"),
])
def test_bad_eval_only_flags_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script().parse_args(["--train_dir", "x", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_do_eval_of_a_pretraining_folder_is_a_clear_error(workspace, capsys):
    script = load_script()
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--model_name_or_path", str(workspace["pretrained"]), "--train_dir", str(workspace["eight"]),
                     "--do_eval", "--output_dir", str(workspace["root"] / "eval_pretrained")])
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--do_eval evaluates a classifier" in message and "--mode knn" in message
    with pytest.raises(SystemExit):  # 8 labels in the model, 3 in the data
        script.main(["--model_name_or_path", str(workspace["classifier"]), "--train_dir", str(workspace["labelled"]),
                     "--do_eval", "--output_dir", str(workspace["root"] / "eval_labels")])
    assert "a classifier for 8 labels, the validation data has 3" in capsys.readouterr().err


@pytest.mark.slow
def test_do_eval_on_two_processes_gives_the_hand_computed_numbers(workspace, hand_eval):
    """Each of two gloo ranks evaluates its shard (the validation split's 2 files); the counts are summed."""
    out = workspace["root"] / "eval_two"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29551", str(SCRIPT),
         "--model_name_or_path", str(workspace["classifier"]), "--train_dir", str(workspace["eight"]), "--do_eval",
         "--output_dir", str(out), *TINY],
        capture_output=True, text=True, env=dict(workspace["env"], ACCELERATE_USE_CPU="1"), cwd=workspace["root"], timeout=600,
    )
    succeeded(result)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["top1"] == pytest.approx(hand_eval[0], abs=1e-4) and results["top5"] == pytest.approx(hand_eval[1], abs=1e-4)
    assert results["eval_examples"] == 24 and "24 images, 2 processes" in result.stderr


# ------------------------------------------------------------------------------------ LoRA

NO_PEFT = """
import importlib.machinery, importlib.util, sys
class HidePeft(importlib.machinery.PathFinder):  # peft as if not installed; everything else found as usual
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "peft" or name.startswith("peft."):
            return None
        return super().find_spec(name, path, target)
sys.meta_path = [HidePeft if finder is importlib.machinery.PathFinder else finder for finder in sys.meta_path]
assert importlib.util.find_spec("peft") is None
"""


def test_lora_run_saves_the_merged_model_and_the_adapter(workspace, runs, tmp_path):
    """The saved folder is a plain classifier (loaded where peft cannot be imported) equal to the base
    model with the saved adapter; only the adapted parts of the weights moved."""
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    result = succeeded(runs["lora"].result())
    out = workspace["root"] / "lora"
    # 2 blocks x (A 8x32 + the q and v blocks of B, 2 x 32x4) + head 32x3 + 3
    assert "LoRA rank 4 (alpha 4) on qkv (qkv restricted to q+v): 1,123 trainable parameters" in result.stderr
    assert "mode=finetune steps=3" in result.stdout
    assert (out / "lora_adapter" / "adapter_config.json").is_file()
    assert (out / "lora_adapter" / "adapter_model.safetensors").is_file()

    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(pixel_values, tmp_path / "pixels.pt")
    code = NO_PEFT + f"""
import torch, hf_mim
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained({str(out)!r}).eval()
assert not any("lora" in name for name in model.state_dict()), "adapter weights in the merged model"
with torch.no_grad():
    torch.save(model(pixel_values=torch.load({str(tmp_path / 'pixels.pt')!r})).logits, {str(tmp_path / 'logits.pt')!r})
print("loaded", type(model).__name__)
"""
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=workspace["env"], timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    assert "loaded DbotForImageClassification" in loaded.stdout

    base = AutoModelForImageClassification.from_pretrained(
        workspace["pretrained"], id2label=dict(enumerate(CLASS_NAMES)), label2id={n: i for i, n in enumerate(CLASS_NAMES)})
    adapted = PeftModel.from_pretrained(base, out / "lora_adapter").eval()
    with torch.no_grad():
        expected = adapted(pixel_values=pixel_values).logits
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max().item() <= 1e-5

    pretrained, merged = load_file(str(workspace["pretrained"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    d = 32
    for key in merged:
        if key.endswith("attn.qkv.weight"):
            q, k, v = merged[key].split(d)
            q0, k0, v0 = pretrained[key].split(d)
            assert torch.equal(k, k0) and not torch.equal(q, q0) and not torch.equal(v, v0), key
        elif key in pretrained:
            assert torch.equal(merged[key], pretrained[key]), key  # frozen


@pytest.mark.slow
def test_lora_resume_reproduces_the_uninterrupted_run(workspace, runs):
    """A LoRA run resumed from its step-2 checkpoint (adapter, head and optimizer state) ends bitwise equal."""
    succeeded(runs["lora"].result())
    out = workspace["root"] / "lora_resumed"
    succeeded(run_script(
        workspace, "--model_name_or_path", str(workspace["pretrained"]), "--train_dir", str(workspace["labelled"]),
        "--output_dir", str(out), "--max_train_steps", "3", "--learning_rate", "1e-2", "--lora_rank", "4",
        "--lora_qkv_parts", "q", "v", *TINY, "--resume_from_checkpoint", str(workspace["root"] / "lora" / "checkpoint-2"),
    ))
    for name in ("model.safetensors", "lora_adapter/adapter_model.safetensors"):
        straight, resumed = load_file(str(workspace["root"] / "lora" / name)), load_file(str(out / name))
        assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight), name


def tiny_lora(rank=4, targets=None, parts=None, **config):
    from hf_mim.training.lora import apply_lora

    torch.manual_seed(0)
    model = DbotForImageClassification(DbotConfig.from_preset("tiny", num_labels=3, **config))
    return apply_lora(model, rank, target_modules=targets, qkv_parts=parts)


@pytest.mark.parametrize("targets, parts, adapter, stored", [
    # tiny dBOT: width d = 32, 2 blocks, MLP 128; rank 4. qkv: A 4 x d + B 3d x 4 per block
    (None, None, 2 * (4 * 32 + 96 * 4), 2 * (4 * 32 + 96 * 4)),
    (["qkv", "fc1"], None, 2 * (4 * 32 + 96 * 4 + 4 * 32 + 128 * 4), 2 * (4 * 32 + 96 * 4 + 4 * 32 + 128 * 4)),
    # q and v: two rank-4 adapters (A 4 x d, B d x 4 each); stored as rank 8 on qkv (A 8 x d, B 3d x 8)
    (None, ["q", "v"], 2 * 2 * (4 * 32 + 32 * 4), 2 * (8 * 32 + 96 * 8)),
    (["qkv", "proj"], ["q"], 2 * (4 * 32 + 32 * 4 + 4 * 32 + 32 * 4), 2 * (4 * 32 + 96 * 4 + 4 * 32 + 32 * 4)),
])
def test_lora_trainable_parameters_are_the_hand_count(targets, parts, adapter, stored):
    from hf_mim.training.lora import describe_lora, lora_parameter_counts

    model = tiny_lora(targets=targets, parts=parts)
    config = model.base_model.model.config
    assert (config.hidden_size, config.num_hidden_layers, int(config.hidden_size * config.mlp_ratio)) == (32, 2, 128)
    head = 32 * 3 + 3
    counts = lora_parameter_counts(model)
    assert (counts["adapter"], counts["head"], counts["stored"]) == (adapter, head, stored + head)
    assert f"{adapter + head:,} trainable parameters" in describe_lora(model)


def test_one_lora_step_moves_only_the_adapter_and_the_head(workspace):
    """AdamW steps (weight decay on) on q/v-restricted LoRA: every base weight bit-identical, the head and
    the adapter moved, the k rows and cross blocks of B still exactly zero."""
    from hf_mim.training.lora import qkv_part_mask

    script = load_script()
    args = script.parse_args(["--model_type", "dbot", "--model_size", "tiny", "--train_dir", "x", "--lora_rank", "4",
                              "--lora_qkv_parts", "q", "v", "--learning_rate", "1e-2"])
    model = script.build_model(args, dict(enumerate(CLASS_NAMES)))
    from hf_mim.training.lora import apply_lora

    model = apply_lora(model, args.lora_rank, qkv_parts=args.lora_qkv_parts)
    optimizer = build_optimizer(args, model, lr=1e-2)
    assert all("lora_" in name or "classifier" in name for group in optimizer.param_groups for name in group["param_names"])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(2):  # the first step moves B (A's gradient is 0 while B is), the second A too
        loss = nn.functional.cross_entropy(model(pixel_values=torch.randn(4, 3, 32, 32, generator=generator)).logits,
                                           torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    adapter = {name for name in before if ".lora_" in name}
    head = {name for name in before if ".modules_to_save." in name}
    assert moved == adapter | head and len(adapter) == 4 and len(head) == 2
    mask = qkv_part_mask(96, ("q", "v"), 4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert p[mask == 0].abs().max() == 0 and p[mask == 1].abs().max() > 0, name


def test_merged_lora_equals_unmerged_and_leaves_k_alone():
    from hf_mim.training.lora import qkv_part_mask

    model = tiny_lora(targets=["qkv", "fc2"], parts=["q", "v"])
    original_qkv = model.base_model.model.dbot.encoder.layers[0].attn.qkv.base_layer.weight.detach().clone()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:  # a trained-looking adapter, within the q/v restriction
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
                if "qkv.lora_B" in name:
                    p.mul_(qkv_part_mask(96, ("q", "v"), 4))
    model.eval()
    pixel_values = torch.randn(3, 3, 32, 32, generator=generator)
    with torch.no_grad():
        unmerged = model(pixel_values=pixel_values).logits
        with model.disable_adapter():
            plain = model(pixel_values=pixel_values).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(pixel_values=pixel_values).logits
    assert (unmerged - plain).abs().max().item() > 1e-3  # the adapter matters
    assert (merged - unmerged).abs().max().item() <= 1e-5
    qkv = merged_model.dbot.encoder.layers[0].attn.qkv.weight
    assert torch.equal(qkv[32:64], original_qkv[32:64]) and not torch.equal(qkv[:32], original_qkv[:32])


def test_lora_trains_through_revcolv2_reversible_columns():
    """RevColV2 recomputes its blocks in its own backward (`use_reversible`): the adapters' gradients there
    equal plain autograd's, and the q/v restriction holds (k rows of B get no gradient)."""
    from hf_mim import RevColV2Config, RevColV2ForImageClassification
    from hf_mim.training.lora import apply_lora, qkv_part_mask

    grads = []
    for reversible in (True, False):
        torch.manual_seed(0)  # layer scale 1 and a non-tiny head: gradients of a visible size
        config = RevColV2Config.from_preset("tiny", num_labels=3, use_reversible=reversible, layer_scale_init_value=1.0,
                                            drop_path_rate=0.0)
        model = apply_lora(RevColV2ForImageClassification(config), 2, qkv_parts=["q", "v"])
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_" in name or "classifier" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=generator))
                if "qkv.lora_B" in name:
                    p.mul_(qkv_part_mask(p.shape[0], ("q", "v"), 2))
        model.train()(pixel_values=torch.randn(2, 3, 32, 32, generator=generator)).logits.square().sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if ".lora_" in name})
    assert len(grads[0]) == 22  # A and B of 11 qkv projections
    assert min(g.abs().max().item() for g in grads[1].values()) > 1e-4
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
        if "lora_B" in name:
            assert grad[qkv_part_mask(grad.shape[0], ("q", "v"), 2) == 0].abs().max() == 0, name


@pytest.mark.parametrize("flags, message", [
    (["--lora_rank", "0"], "--lora_rank must be a positive integer, got 0"),
    (["--lora_alpha", "8"], "--lora_alpha needs --lora_rank"),
    (["--lora_rank", "4", "--mode", "linear_probe"], "use it with --mode finetune"),
    (["--lora_rank", "4", "--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    (["--lora_rank", "4", "--lora_target_modules", "proj", "--lora_qkv_parts", "q"], "keep qkv in --lora_target_modules"),
])
def test_bad_lora_flags_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script().parse_args(["--model_type", "dbot", "--train_dir", "x", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_unknown_lora_target_and_missing_peft_name_the_fix(monkeypatch):
    from hf_mim.training.run_setup import UserInputError
    from hf_mim.utils.extras import MissingExtraError

    with pytest.raises(UserInputError, match=r"'query' is not a Linear of DbotForImageClassification; available: fc1, fc2, proj, qkv"):
        tiny_lora(targets=["query"])
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(MissingExtraError, match=r"--lora_rank needs peft, which is not installed: pip install 'hf_mim\[peft\]'"):
        tiny_lora()


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
