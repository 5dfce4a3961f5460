"""What users bring from transformers' examples and from `pip install` (issue 17): the examples' flag
names and values, refused flags with their reason, the validation loss on fixed masks, trackers,
declared dependencies, extras' install hints, and the installed commands (slow: wheel in a fresh venv)."""

from __future__ import annotations

import ast
import configparser
import contextlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from helpers import reset_accelerate_state

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {name: REPO_ROOT / "training_scripts" / f"{name}.py" for name in ("run_mim", "run_image_classification")}
BASE = {"run_mim": [], "run_image_classification": ["--model_type", "dbot"]}
TINY = ["--model_type", "dbot", "--model_size", "tiny", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--seed", "3",
        "--downstream_eval", "none"]  # the downstream check (on by default with the embedded data): tests/test_downstream.py
SECRET = "hf_CoNvEnTiOnSeCrEtToKeN0123456789"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_conventions", SCRIPTS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_error(module, argv) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        module.parse_args(argv)
    assert exit_info.value.code == 2
    return err.getvalue().strip().splitlines()[-1]


def run(script: Path | list, *args, env_extra=None, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    command = [sys.executable, str(script)] if isinstance(script, Path) else script
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=900, cwd=cwd)


# ------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_example_command_lines_parse(name):
    """The flags and values of transformers' run_mim_no_trainer.py / run_image_classification_no_trainer.py."""
    module = load_script(name)
    args = module.parse_args([
        *BASE[name], "--lr_scheduler_type", "linear", "--checkpointing_steps", "epoch", "--trust_remote_code",
        "--model_revision", "v1", "--cache_dir", "/tmp/cache", "--token", SECRET, "--train_val_split", "0.15",
        "--max_train_samples", "8", "--max_eval_samples", "4", "--per_device_eval_batch_size", "8",
        "--image_processor_name", "some/processor", *(["--mask_patch_size", "32", "--patch_size", "16"] if name == "run_mim"
                                                      else ["--ignore_mismatched_sizes"]),
    ])
    assert args.lr_scheduler_type == "linear" and args.checkpointing_steps == "epoch" and args.trust_remote_code
    assert (args.model_revision, args.cache_dir, args.token, args.train_val_split) == ("v1", "/tmp/cache", SECRET, 0.15)
    assert (args.max_train_samples, args.max_eval_samples, args.per_device_eval_batch_size) == (8, 4, 8)
    assert module.parse_args(BASE[name]).lr_scheduler_type == "cosine"  # the papers' default is kept
    assert module.parse_args([*BASE[name], "--checkpointing_steps", "7"]).checkpointing_steps == 7


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_refused_flags_say_why_in_one_line(name):
    from hf_mim.training.conventions import REFUSED_FLAGS

    module = load_script(name)
    own = {"do_eval"} if name == "run_image_classification" else set()  # evaluate-only there (test_run_image_classification)
    for flag, reason in REFUSED_FLAGS.items():
        if flag not in own:
            assert parse_error(module, [*BASE[name], f"--{flag}", "1"]).endswith(f": error: not supported by hf_mim: --{flag} ({reason})")
    # a Trainer command line: every refused flag named in one line, switches with or without a value
    do_eval = [] if own else ["--do_eval", "True"]
    line = parse_error(module, [*BASE[name], "--do_train", *do_eval, "--save_total_limit", "3", "--fp16"])
    do_eval_reason = "" if own else "--do_eval (evaluation runs whenever a validation split, --validation_dir or --train_val_split is given); "
    assert line.endswith("not supported by hf_mim: --do_train (the scripts always train); " + do_eval_reason + "--save_total_limit (give "
                         "--checkpoints_total_limit N); --fp16 (mixed precision is Accelerate's: accelerate launch --mixed_precision fp16)")
    assert module.parse_args([*BASE[name], "--trust_remote_code", "True"]).trust_remote_code is True
    assert module.parse_args([*BASE[name], "--trust_remote_code", "false"]).trust_remote_code is False
    assert "it steps on an evaluation metric" in parse_error(module, [*BASE[name], "--lr_scheduler_type", "reduce_lr_on_plateau"])
    assert "expected a number of steps or 'epoch'" in parse_error(module, [*BASE[name], "--checkpointing_steps", "often"])
    assert "--train_val_split must be in (0, 1)" in parse_error(module, [*BASE[name], "--train_val_split", "1.5"])
    assert "not both" in parse_error(module, [*BASE[name], "--train_val_split", "0.1", "--validation_dir", "/tmp"])


def test_get_scheduler_names_compute_what_transformers_computes_restarted_per_stage():
    from transformers import get_scheduler

    from hf_mim.training import StagedSchedule, schedule_factor
    from hf_mim.training.schedule import SCHEDULE_KINDS, TRANSFORMERS_KINDS

    warmup, length = 3, 12
    for kind in SCHEDULE_KINDS + TRANSFORMERS_KINDS:
        reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        min_lr = 0.1 if "min_lr" in kind else 0.0
        reference = get_scheduler(kind, reference_opt, num_warmup_steps=warmup, num_training_steps=length,
                                  scheduler_specific_kwargs={"min_lr_rate": min_lr} if min_lr else None)
        expected = []
        for _ in range(length):
            expected.append(reference_opt.param_groups[0]["lr"])
            reference_opt.step()
            reference.step()
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        staged = StagedSchedule(optimizer, steps_per_stage=[length, length], warmup_steps=warmup, kind=kind, min_lr_ratio=min_lr)
        got = []
        for _ in range(2 * length):
            got.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            staged.step()
        tolerance = 1e-7 if kind == "polynomial" else 1e-12  # its lr_end (1e-7) is taken relative to the base lr
        assert got[:length] == pytest.approx(expected, abs=tolerance), kind
        assert got[length:] == pytest.approx(expected, abs=tolerance), kind  # the second stage restarts
    # by hand: cosine warms up 1/3, 2/3, then 0.5 (1 + cos(pi k / 9)); constant has no warm-up (transformers')
    assert schedule_factor("cosine", 1, 3, 12) == pytest.approx(1 / 3)
    assert schedule_factor("cosine", 6, 3, 12) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 9)))
    assert schedule_factor("constant", 0, 3, 12) == 1.0 and schedule_factor("constant_with_warmup", 0, 3, 12) == 0.0


def test_hub_flags_reach_every_from_pretrained(monkeypatch, tmp_path):
    """--cache_dir --model_revision --token --trust_remote_code in every config and model load of both scripts."""
    from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForMaskedImageModeling

    from hf_mim import DbotConfig
    from hf_mim.training.classification import base_config, build_model
    from hf_mim.training.pretraining import build_pretraining_model

    calls = []

    class Stop(Exception):
        pass

    def recording(result=None):
        def from_pretrained(name, *args, **kwargs):
            calls.append(kwargs)
            if result is None:
                raise Stop
            return result
        return from_pretrained

    config = DbotConfig.from_preset("tiny")
    monkeypatch.setattr(AutoConfig, "from_pretrained", recording(config))
    monkeypatch.setattr(AutoModelForMaskedImageModeling, "from_pretrained", recording())
    monkeypatch.setattr(AutoModelForImageClassification, "from_pretrained", recording())
    hub = dict(cache_dir=str(tmp_path), model_revision="v2", token=SECRET, trust_remote_code=True)
    common = dict(model_type="dbot", config_overrides=None, image_size=None, patch_size=None, mask_ratio=None, mask_patch_size=None,
                  teacher_name_or_path=None, attn_implementation="eager", ignore_missing_weights=False, **hub)
    for name_args in (dict(model_name_or_path="org/model", config_name_or_path=None),
                      dict(model_name_or_path=None, config_name_or_path="org/config")):
        with contextlib.suppress(Stop):
            build_pretraining_model(Namespace(**common, **name_args))
    cls_args = Namespace(**common, model_name_or_path="org/model", model_size=None, drop_path_rate=0.0, ignore_mismatched_sizes=False)
    base_config(cls_args)
    with pytest.raises(Stop):
        build_model(cls_args, {0: "a", 1: "b"})
    assert len(calls) == 5
    for kwargs in calls:
        assert kwargs["cache_dir"] == str(tmp_path) and kwargs["revision"] == "v2" and kwargs["token"] == SECRET
        assert kwargs["trust_remote_code"] is True


def test_hub_flags_reach_datasets(monkeypatch):
    import datasets

    from hf_mim.data import load_image_stream
    from hf_mim.training.conventions import hub_kwargs

    seen = {}

    def load_dataset(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    args = Namespace(cache_dir="/tmp/c", token=SECRET, model_revision="v2", trust_remote_code=True)
    with pytest.raises(RuntimeError, match="stop"):
        load_image_stream(dataset_name="org/images", load_kwargs=hub_kwargs(args, revision=False))
    assert seen["cache_dir"] == "/tmp/c" and seen["token"] == SECRET and "revision" not in seen  # the model's revision


def test_mask_patch_size_and_patch_size_set_the_config_where_the_method_has_them():
    from hf_mim.training import UserInputError
    from hf_mim.training.pretraining import build_pretraining_model

    common = dict(model_name_or_path=None, config_name_or_path=None, model_size="tiny", config_overrides=None, image_size=None,
                  mask_ratio=None, teacher_name_or_path=None, attn_implementation="eager")
    _, config = build_pretraining_model(Namespace(**common, model_type="amt", patch_size=None, mask_patch_size=16))
    assert config.mask_patch_size == 16
    _, config = build_pretraining_model(Namespace(**common, model_type="dbot", patch_size=8, mask_patch_size=None))
    assert config.patch_size == 8
    with pytest.raises(UserInputError, match="DbotConfig has no field.s. mask_patch_size"):
        build_pretraining_model(Namespace(**common, model_type="dbot", patch_size=None, mask_patch_size=16))


def test_image_processor_name_is_saved_when_it_normalises_as_training_did(tmp_path):
    from transformers import CLIPImageProcessor

    from hf_mim.training.conventions import output_image_processor

    args = Namespace(image_processor_name=None, cache_dir=None, token=None, model_revision="main", trust_remote_code=False)
    built = output_image_processor(args, 32)
    assert built.crop_size == {"height": 32, "width": 32}
    same = tmp_path / "same"
    CLIPImageProcessor(image_mean=list(built.image_mean), image_std=list(built.image_std), crop_size=48).save_pretrained(same)
    assert output_image_processor(Namespace(**{**vars(args), "image_processor_name": str(same)}), 32).crop_size["height"] == 48
    other = tmp_path / "other"
    CLIPImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(other)
    with pytest.raises(ValueError, match=r"--image_processor_name .*other: its image_mean \[0.5, 0.5, 0.5\] differs"):
        output_image_processor(Namespace(**{**vars(args), "image_processor_name": str(other)}), 32)


def test_a_classifier_for_other_labels_needs_ignore_mismatched_sizes(tmp_path):
    from hf_mim import DbotConfig, DbotForImageClassification
    from hf_mim.training import UserInputError
    from hf_mim.training.classification import build_model

    folder = tmp_path / "classifier"
    DbotForImageClassification(DbotConfig.from_preset("tiny", num_labels=3)).save_pretrained(folder)
    args = dict(model_name_or_path=str(folder), config_overrides=None, drop_path_rate=0.0, attn_implementation="eager",
                cache_dir=None, model_revision="main", token=None, trust_remote_code=False)
    labels = {index: str(index) for index in range(5)}
    with pytest.raises(UserInputError, match="classifier for 3 labels, the data has 5: pass --ignore_mismatched_sizes"):
        build_model(Namespace(**args, ignore_mismatched_sizes=False), labels)
    assert build_model(Namespace(**args, ignore_mismatched_sizes=True), labels).config.num_labels == 5


def test_checkpointing_epoch_is_one_epoch_of_optimizer_steps():
    from hf_mim.training.conventions import checkpoint_every, training_examples

    args = Namespace(checkpointing_steps="epoch", train_val_split=0.25, max_train_samples=None)
    assert checkpoint_every(args, training_examples(args, 40), total_batch=4) == 7  # 30 examples / 4
    assert checkpoint_every(Namespace(checkpointing_steps=5), None, 4) == 5
    with pytest.raises(ValueError, match="--num_train_examples"):
        checkpoint_every(args, None, 4)


# ----------------------------------------------------------------------------------- data splits


def key_stream(count: int):
    from datasets import Features, IterableDataset, Value
    from datasets import Image as ImageFeature

    def rows():
        for index in range(count):
            yield {"image": {"bytes": b"", "path": None}, "__key__": f"img/{index:04d}"}

    return IterableDataset.from_generator(rows, features=Features({"image": ImageFeature(decode=False), "__key__": Value("string")}))


def test_train_val_split_holds_out_fixed_disjoint_examples_and_limits_take_the_first():
    from hf_mim.data.splits import hold_out, limit

    stream = key_stream(400)
    train = [row["__key__"] for row in hold_out(stream, "image", 0.2, validation=False)]
    held = [row["__key__"] for row in hold_out(stream, "image", 0.2, validation=True)]
    assert not set(train) & set(held) and len(train) + len(held) == 400
    assert 50 <= len(held) <= 110  # about 20 %
    again = [row["__key__"] for row in hold_out(stream.shuffle(seed=5, buffer_size=50), "image", 0.2, validation=True)]
    assert sorted(again) == sorted(held)  # chosen by id: the same whatever the order or seed
    assert [row["__key__"] for row in limit(stream, 3)] == ["img/0000", "img/0001", "img/0002"]
    assert limit(stream, None) is stream and hold_out(stream, "image", None, validation=True) is stream


# ------------------------------------------------------------------------------ validation loss


def test_validation_loss_uses_the_same_masks_every_evaluation(fresh_accelerate_state):
    """Two evaluations of one model agree exactly and equal the image-weighted mean of the model's loss on
    the collator's masks; another epoch of the collator (other masks and crops) gives another value."""
    from accelerate import Accelerator

    from hf_mim import DbotConfig, DbotForMaskedImageModeling
    from hf_mim.data import (
        PretrainingCollator, batch_to_device, embedded_pretraining_dir, load_image_stream, make_dataloader, prepare_stream,
    )
    from hf_mim.auto import family_for
    from hf_mim.training.pretraining import evaluate_pretraining_loss

    torch.manual_seed(0)
    config = DbotConfig.from_preset("tiny")
    model = DbotForMaskedImageModeling(config)
    raw, column, _ = load_image_stream(train_dir=str(embedded_pretraining_dir()))
    stream = prepare_stream(raw.take(10), column, seed=1, buffer_size=0)
    collator = PretrainingCollator(family_for("dbot").pretraining_transform(config), mask_generator=model.mask_generator(), seed=1)
    loader = make_dataloader(stream, collator, batch_size=4, drop_last=False)
    accelerator = Accelerator(cpu=True)
    first = evaluate_pretraining_loss(model, loader, collator, accelerator, seed=1)
    model.train()
    torch.rand(3)  # the global RNG moves on between evaluations, as in training
    second = evaluate_pretraining_loss(model, loader, collator, accelerator, seed=1)
    assert first == second and first["eval_examples"] == 10 and model.training
    model.eval()
    with torch.no_grad():  # uint8 batches normalised as the loop does (batch_to_device)
        batches = [batch_to_device(b, "cpu", collator) for b in loader]
        by_hand = [(float(model(pixel_values=b["pixel_values"], bool_masked_pos=b["bool_masked_pos"]).loss), len(b["pixel_values"]))
                   for b in batches]
    assert first["eval_loss"] == pytest.approx(sum(loss * n for loss, n in by_hand) / 10, abs=1e-6)
    collator.set_epoch(1)
    assert evaluate_pretraining_loss(model, loader, collator, accelerator, seed=1)["eval_loss"] != first["eval_loss"]


def read_events(folder: Path) -> tuple[dict, dict]:
    """({scalar tag: [(step, value)]}, {image tag: [(step, width, height)]}) of the tensorboard files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = {}, {}
    for path in folder.rglob("events.out.tfevents*"):
        events = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
        for tag in events.Tags()["images"]:
            images.setdefault(tag, []).extend((e.step, e.width, e.height) for e in events.Images(tag))
    return scalars, images


def test_run_mim_validation_loss_tracker_pictures_epoch_checkpoints_and_no_token(tmp_path):
    """--train_val_split with evaluation every 2 steps: the loss is logged, tracked (tensorboard scalars),
    written to eval_results.json and the card; pictures reach tensorboard as images; --checkpointing_steps
    epoch checkpoints once per epoch; --token appears in no written file."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    result = run(SCRIPTS["run_mim"], *TINY, "--max_train_steps", 4, "--output_dir", out, "--train_val_split", 0.3,
                 "--eval_steps", 2, "--per_device_eval_batch_size", 4, "--with_tracking", "--picture_steps", 2,
                 "--checkpointing_steps", "epoch", "--num_train_examples", 24, "--lr_scheduler_type", "linear",
                 "--token", SECRET)
    assert result.returncode == 0, result.stderr[-4000:]
    # 24 examples, 30 % held out: 16 to train on, an epoch of 4 steps
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-4"]
    results = json.loads((out / "eval_results.json").read_text())
    assert [entry["step"] for entry in results["history"]] == [2, 4] and results["eval_examples"] > 0
    assert "held out" in results["split"]
    card = (out / "README.md").read_text()
    assert "validation loss (fixed masks)" in card and f"{results['eval_loss']:.4f}" in card
    scalars, images = read_events(out / "runs")
    assert [step for step, _ in scalars["eval_loss"]] == [2, 4]
    assert scalars["eval_loss"][-1][1] == pytest.approx(results["eval_loss"], rel=1e-6)
    assert {step for step, _, _ in images["mim_picture"]} == {2, 4} and images["mim_picture"][0][1] > 64
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in result.stderr + result.stdout


def test_log_pictures_sends_images_to_every_image_tracker():
    from PIL import Image

    from hf_mim.training.visualize import log_pictures

    class Tracker:
        def __init__(self, name):
            self.name, self.logged = name, []

        def log_images(self, values, step, **kwargs):
            self.logged.append((values, step, kwargs))

    board, wandb = Tracker("tensorboard"), Tracker("wandb")
    log_pictures(Namespace(trackers=[board, wandb]), {"mim_picture": Image.new("RGB", (6, 4), "red")}, 7)
    (values, step, kwargs), = board.logged
    assert values["mim_picture"].shape == (1, 4, 6, 3) and step == 7 and kwargs == {"dataformats": "NHWC"}
    (values, step, kwargs), = wandb.logged
    assert values["mim_picture"][0].size == (6, 4) and step == 7 and kwargs == {}


def test_an_asked_for_tracker_that_is_missing_ends_the_run(monkeypatch):
    import accelerate.tracking

    from hf_mim.training import UserInputError
    from hf_mim.training.run_setup import check_trackers

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    args = Namespace(with_tracking=True, report_to="tensorboard")
    with pytest.raises(UserInputError, match=r"--report_to tensorboard: tensorboard is not installed \(pip install 'hf_mim\[tracking\]'\)"):
        check_trackers(args)
    with pytest.raises(UserInputError, match="--report_to wandb: wandb is not installed"):
        check_trackers(Namespace(with_tracking=True, report_to="wandb"))
    with pytest.raises(UserInputError, match="not a tracker Accelerate knows"):
        check_trackers(Namespace(with_tracking=True, report_to="tensorbord"))
    check_trackers(Namespace(with_tracking=False, report_to="wandb"))  # not asked for: nothing to check
    check_trackers(Namespace(with_tracking=True, report_to="all"))


def test_missing_tracker_is_a_one_line_error_with_status_2(monkeypatch, tmp_path):
    """Through the script's own error handling (status 2, one line, no traceback)."""
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    module = load_script("run_mim")
    reset_accelerate_state()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        module.main([*TINY, "--max_train_steps", "1", "--output_dir", str(tmp_path / "run"), "--with_tracking", "--report_to", "wandb"])
    reset_accelerate_state()
    assert exit_info.value.code == 2
    assert err.getvalue().strip().splitlines()[-1] == (
        "run_mim.py: error: --report_to wandb: wandb is not installed (pip install wandb), or drop --with_tracking")


# ---------------------------------------------------------------------------------- dependencies


def declared() -> tuple[set[str], dict[str, set[str]]]:
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")

    def names(text: str) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", line.strip())[0].lower().replace("_", "-")
                for line in text.splitlines() if line.strip() and not line.strip().startswith("#")}

    extras = {extra: names(text) for extra, text in config["options.extras_require"].items()}
    return names(config["options"]["install_requires"]), extras


def imported_distributions() -> dict[str, set[str]]:
    """{distribution: files importing it} over the package and the training scripts (stdlib and hf_mim aside)."""
    from importlib.metadata import packages_distributions

    by_module = packages_distributions()
    found: dict[str, set[str]] = {}
    files = [p for p in (REPO_ROOT / "hf_mim").rglob("*.py") if "scripts" not in p.relative_to(REPO_ROOT).parts]
    for path in files + list((REPO_ROOT / "training_scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "hf_mim":
                    continue
                for dist in by_module.get(top, [top]):
                    found.setdefault(dist.lower().replace("_", "-"), set()).add(str(path.relative_to(REPO_ROOT)))
    return found


def test_every_direct_import_is_declared_and_every_requirement_used():
    required, extras = declared()
    imported = imported_distributions()
    optional = set().union(*(extras[name] for name in ("demo", "tracking", "peft")))
    undeclared = {dist: sorted(files)[:2] for dist, files in imported.items() if dist not in required | optional}
    assert not undeclared, f"imported but not declared in setup.cfg: {undeclared}"
    assert not required - set(imported), f"required but never imported: {sorted(required - set(imported))}"
    assert {"torchvision", "pyarrow"} <= required


def test_a_missing_extra_names_the_install_command(monkeypatch, tmp_path):
    from hf_mim.data import embedded_digits_dir
    from hf_mim.utils.extras import MissingExtraError

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if scikit-learn were not installed
    with pytest.raises(MissingExtraError, match=r"the embedded digits needs sklearn, which is not installed: pip install 'hf_mim\[demo\]'"):
        embedded_digits_dir(cache_dir=tmp_path)


# ------------------------------------------------------------------------------ installed commands


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the checkout (the build leaves build/ and egg-info beside the sources)."""
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "outputs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    result = run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Deprecat" not in result.stdout + result.stderr and "BuildBackendWarning" not in result.stdout + result.stderr
    return next((tmp_path / "dist").glob("hf_mim-*.whl"))


@pytest.mark.slow
def test_wheel_installs_commands_that_train_outside_the_repository(tmp_path):
    """The wheel, installed into a fresh venv (this environment's packages beneath it, offline), runs the
    README's main job from outside the checkout: `hf-mim-pretrain`, `accelerate launch -m
    hf_mim.scripts.run_mim` with the README's launch flags (no 'values were not passed' warning), `hf-mim-visualize` on
    the pretrained folder, and the other commands answer --help."""
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "_hf_mim_test_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co. from here
    result = run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                  "--no-build-isolation", "--no-index", str(wheel)])
    assert result.returncode == 0, result.stderr[-3000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {"PYTHONPATH": ""}
    where = run([venv / "bin" / "python", "-c", "import hf_mim; print(hf_mim.__file__)"], env_extra=env, cwd=outside)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    job = [*TINY, "--max_train_steps", 2]
    pretrain = run([venv / "bin" / "hf-mim-pretrain"], *job, "--output_dir", outside / "pretrain", env_extra=env, cwd=outside)
    assert pretrain.returncode == 0, pretrain.stderr[-4000:]
    assert (outside / "pretrain" / "model.safetensors").is_file() and (outside / "pretrain" / "README.md").is_file()
    launch = run([venv / "bin" / "python", "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hf_mim.scripts.run_mim"],
                 *job, "--output_dir", outside / "launched", env_extra=env, cwd=outside)
    assert launch.returncode == 0, launch.stderr[-4000:]
    assert "were not passed" not in launch.stderr and (outside / "launched" / "model.safetensors").is_file()
    finetune = run([venv / "bin" / "hf-mim-finetune"], "--model_name_or_path", outside / "pretrain", "--max_train_steps", 1,
                   "--per_device_train_batch_size", 8, "--num_warmup_steps", 0, "--output_dir", outside / "finetune",
                   env_extra=env, cwd=outside)
    assert finetune.returncode == 0, finetune.stderr[-4000:]
    pictures = run([venv / "bin" / "hf-mim-visualize"], "--model_name_or_path", outside / "pretrain", "--images",
                   outside / "pretrain" / "mim_picture.png", "--output_dir", outside / "pictures", env_extra=env, cwd=outside)
    assert pictures.returncode == 0 and (outside / "pictures" / "mim_picture.png").is_file(), pictures.stderr[-4000:]
    # the folder's code is the installed wheel's model zone, byte for byte (`hf-mim-verify`, status 0)
    verified = run([venv / "bin" / "hf-mim-verify"], outside / "pretrain", env_extra=env, cwd=outside)
    assert verified.returncode == 0, verified.stdout[-2000:] + verified.stderr[-2000:]
    for command in ("hf-mim-segment", "hf-mim-convert", "hf-mim-export"):
        shown = run([venv / "bin" / command], "--help", env_extra=env, cwd=outside)
        assert shown.returncode == 0 and "usage" in shown.stdout.lower(), command + shown.stderr[-2000:]
