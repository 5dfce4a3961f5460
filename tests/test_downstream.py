"""run_mim.py on labelled data (hf_mim/training/downstream.py): the k-NN monitor (`--knn_eval_steps`) and
the downstream check (`--downstream_eval`: the pretrained encoder against the same architecture at random
initialisation), which ends the default embedded run.

The monitor must compute what `run_image_classification.py --mode knn` computes on the saved folder, and
neither evaluation may change the run: the weights at the end are bitwise those of a run without them."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hf_mim  # noqa: F401  (registers the Auto classes)
from hf_mim.auto import family_for
from hf_mim.training.downstream import (
    KnnMonitor, downstream_classifiers, downstream_line, load_labelled_source, pretrained_encoder, record_evaluation,
)
from test_run_image_classification import CLASS_NAMES, write_parquet_split

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "run_mim.py"
TINY = ["--model_type", "dbot", "--model_size", "tiny", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--seed", "3"]
# a small labelled share of the embedded digits and a 2-step check: the default flow in seconds
SMALL_CHECK = ["--labelled_max_train_samples", "100", "--labelled_max_eval_samples", "40", "--downstream_steps", "2",
               "--downstream_batch_size", "8"]
LINE = re.compile(r"^downstream fine-tuning top-1 on 40 held-out digits: pretrained (\d+\.\d) vs random init (\d+\.\d) "
                  r"\(([+-]\d+\.\d)\)$", re.MULTILINE)


def load_run_mim():
    spec = importlib.util.spec_from_file_location("run_mim_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_mim(*args, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, f"run_mim failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    write_parquet_split(root / "labelled", "train", per_class=6, shards=2, with_labels=True, seed=1)
    write_parquet_split(root / "labelled", "validation", per_class=4, shards=1, with_labels=True, seed=2)
    write_parquet_split(root / "unlabelled", "train", per_class=4, shards=1, with_labels=False, seed=3)
    write_parquet_split(root / "train_only", "train", per_class=4, shards=1, with_labels=True, seed=4)
    return root


# ------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("argv, message", [
    (["--train_dir", "x", "--knn_eval_steps", "5"], "--knn_eval_steps needs labelled data: give --labelled_train_dir"),
    (["--train_dir", "x", "--downstream_eval", "linear_probe"], "--downstream_eval linear_probe needs labelled data"),
    (["--train_dir", "x", "--labelled_train_dir", "y"], "--labelled_train_dir: nothing evaluates on the labelled data"),
    (["--labelled_label_column_name", "cls"], "--labelled_label_column_name describes labelled data: give its source"),
    (["--labelled_dataset_name", "a", "--labelled_train_dir", "b"], "either --labelled_dataset_name or --labelled_train_dir"),
    (["--knn_eval_steps", "0"], "--knn_eval_steps must be >= 1, got 0"),
    (["--downstream_train_fraction", "0"], "--downstream_train_fraction must be in (0, 1], got 0.0"),
    (["--downstream_flags", "--mixup abc"], "run_mim.py --downstream_flags: error: argument --mixup: invalid float value"),
    (["--downstream_flags", "--train_dir z"], "--downstream_flags: give the labelled data with --labelled_train_dir, not --train_dir"),
    (["--downstream_flags=--mode=knn"], "--downstream_flags: not --mode=knn (give --downstream_eval)"),
])
def test_labelled_flag_mistakes_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_run_mim().parse_args([*TINY, *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_check_is_on_by_default_only_with_the_embedded_data():
    script = load_run_mim()
    assert script.parse_args([]).downstream_eval == "finetune"
    assert script.parse_args(["--train_dir", "x"]).downstream_eval == "none"
    asked = script.parse_args(["--train_dir", "x", "--labelled_train_dir", "y", "--downstream_eval", "knn"])
    assert asked.downstream_eval == "knn"


@pytest.mark.parametrize("source, message", [
    ("unlabelled", "the labelled data (k-NN / downstream check): the training data has no label column"),
    ("train_only", "the labelled data has no 'validation' split to evaluate on: give --labelled_validation_split"),
])
def test_labelled_data_without_labels_or_validation_is_a_one_line_error(source, message, labelled, tmp_path, capsys,
                                                                       fresh_accelerate_state):
    with pytest.raises(SystemExit) as exit_info:
        load_run_mim().main([*TINY, "--max_train_steps", "1", "--output_dir", str(tmp_path / "out"),
                             "--labelled_train_dir", str(labelled / source), "--knn_eval_steps", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "run_mim.py: error:" in err
    if source == "unlabelled":
        assert "--labelled_label_column_name" in err  # the flag to use, not the pretraining data's


# ------------------------------------------------------------------------------------ the pieces


@pytest.mark.parametrize("model_type", ["dbot", "extrema", "maskdistill", "amt", "revcolv2"])
def test_the_monitored_encoder_is_what_automodel_loads_from_the_saved_folder(model_type, tmp_path):
    """`pretrained_encoder` (the k-NN monitor's and the k-NN check's features) = `AutoModel.from_pretrained` of
    the folder run_mim.py writes (ExtreMA: the online encoder), sharing the weights without a copy."""
    from transformers import AutoModel

    torch.manual_seed(0)
    family = family_for(model_type)
    mim = family.masked_image_modeling_class(family.config_class.from_preset("tiny"))
    mim.save_pretrained(tmp_path)
    encoder = pretrained_encoder(mim)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, mim.config.image_size, mim.config.image_size)
    with torch.no_grad():
        assert torch.equal(encoder(pixel_values=pixels).pooler_output, loaded(pixel_values=pixels).pooler_output)
    shared = {tensor.data_ptr() for tensor in mim.base_model.state_dict().values()}
    assert all(tensor.data_ptr() in shared for tensor in encoder.state_dict().values())


def test_knn_monitor_matches_the_knn_mode_and_leaves_rng_and_train_mode_alone(labelled, tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator
    from transformers import AutoModel

    from hf_mim.training.classification import evaluation_dataloader
    from hf_mim.training.knn import knn_evaluate

    torch.manual_seed(0)
    family = family_for("extrema")  # the online encoder is monitored, as AutoModel loads it
    mim = family.masked_image_modeling_class(family.config_class.from_preset("tiny", drop_path_rate=0.1)).train()
    mim.save_pretrained(tmp_path / "saved")
    args = load_run_mim().parse_args([*TINY, "--model_type", "extrema", "--train_dir", "x", "--labelled_train_dir",
                                      str(labelled / "labelled"), "--knn_eval_steps", "1", "--per_device_eval_batch_size", "5"])
    accelerator = Accelerator(cpu=True)
    data = load_labelled_source(args, mim.config.image_size)
    monitor = KnnMonitor(args, data, mim.config.image_size, accelerator)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    modes = [module.training for module in mim.modules()]
    results = monitor.evaluate(mim)
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert [module.training for module in mim.modules()] == modes and mim.training
    loaded = AutoModel.from_pretrained(tmp_path / "saved")
    expected = knn_evaluate(loaded, evaluation_dataloader(args, data.train, data.image_column, data.label_column, 32, accelerator),
                            evaluation_dataloader(args, *data.validation, 32, accelerator), accelerator, len(CLASS_NAMES))
    assert (results["knn_top1"], results["knn_top5"]) == (expected["top1"], expected["top5"])
    assert (results["knn_bank_size"], results["knn_eval_examples"], results["knn_k"]) == (18, 12, 18)


def test_the_two_classifiers_are_the_saved_folders_and_the_config_at_one_seed(tmp_path):
    """The check's "pretrained" classifier is `AutoModelForImageClassification.from_pretrained` of the saved folder,
    its "random init" `from_config` of the same config, each after seeding; neither shares a tensor with the model
    being pretrained."""
    from accelerate.utils import set_seed
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    family = family_for("dbot")
    mim = family.masked_image_modeling_class(family.config_class.from_preset("tiny"))
    mim.save_pretrained(tmp_path)
    id2label = dict(enumerate(CLASS_NAMES))
    models = downstream_classifiers(mim, id2label, drop_path_rate=0.1, seed=7)
    set_seed(7)
    from_folder = AutoModelForImageClassification.from_pretrained(tmp_path, id2label=id2label, drop_path_rate=0.1)
    set_seed(7)
    config = type(mim.config).from_pretrained(tmp_path, id2label=id2label, drop_path_rate=0.1)
    from_config = AutoModelForImageClassification.from_config(config)
    for built, expected in ((models["pretrained"], from_folder), (models["random_init"], from_config)):
        assert built.config.drop_path_rate == 0.1 and built.config.id2label == id2label
        reference = expected.state_dict()
        assert all(torch.equal(value, reference[key]) for key, value in built.state_dict().items())
    training = {tensor.data_ptr() for tensor in mim.state_dict().values()}
    assert not any(tensor.data_ptr() in training for tensor in models["pretrained"].state_dict().values())


def test_record_evaluation_and_the_line():
    history = []
    record_evaluation(history, 0, {"knn_top1": 10.0})
    record_evaluation(history, 4, {"eval_loss": 0.5})
    record_evaluation(history, 4, {"knn_top1": 20.0})
    assert history == [{"step": 0, "knn_top1": 10.0}, {"step": 4, "eval_loss": 0.5, "knn_top1": 20.0}]
    results = {"mode": "finetune", "eval_examples": 359, "noun": "digits", "pretrained": {"top1": 81.34},
               "random_init": {"top1": 74.12}}
    assert downstream_line(results) == "downstream fine-tuning top-1 on 359 held-out digits: pretrained 81.3 vs random init 74.1 (+7.2)"
    results.update(mode="knn", random_init={"top1": 90.0})
    assert downstream_line(results) == "downstream k-NN top-1 on 359 held-out digits: pretrained 81.3 vs random init 90.0 (-8.7)"


# ------------------------------------------------------------------------------------ the script


def test_default_embedded_run_ends_with_the_check_and_the_evaluations_change_no_weight(tmp_path, capsys, caplog):
    """The embedded default with the k-NN monitor: step 0 / every 2 steps / the end logged and tracked, the check's
    one line last on stdout, both in eval_results.json and the card. Two dBOT stages and drop path make the
    run's RNG matter: the weights end bitwise equal to those of a run without any evaluation. (In this
    process, one run after the other: no start-up of their own.)"""
    from helpers import reset_accelerate_state

    caplog.set_level(logging.INFO)
    common = [*TINY, "--max_train_steps", "4", "--num_stages", "2", "--config_overrides", "drop_path_rate=0.2"]
    runs = {"without": [*common, "--downstream_eval", "none"],
            "with": [*common, *SMALL_CHECK, "--knn_eval_steps", "2", "--with_tracking"]}
    for name, argv in runs.items():
        reset_accelerate_state()
        try:
            assert load_run_mim().main([*argv, "--output_dir", str(tmp_path / name)]) == 0
        finally:
            reset_accelerate_state()
    stdout = capsys.readouterr().out
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("with", "without")]
    assert weights[0] == weights[1]

    out = tmp_path / "with"
    line = LINE.search(stdout)
    assert line and stdout.rstrip().endswith(line.group(0)), stdout[-2000:]
    pretrained, random_init, gain = map(float, line.groups())
    results = json.loads((out / "eval_results.json").read_text())
    check = results["downstream"]
    assert check["mode"] == "finetune" and check["steps"] == 2 and check["batch"] == 8 and check["train_fraction"] == 0.1
    assert check["train_examples"] == 10 and check["eval_examples"] == 40  # 1 per digit of the first 100
    assert round(check["pretrained"]["top1"], 1) == pretrained and round(check["random_init"]["top1"], 1) == random_init
    assert check["top1_gain"] == pytest.approx(check["pretrained"]["top1"] - check["random_init"]["top1"])
    assert [entry["step"] for entry in results["history"]] == [0, 2, 4]
    assert results["knn"]["top1"] == results["history"][-1]["knn_top1"] and results["knn"]["bank_size"] == 100
    assert "k-NN at step 0: top-1" in caplog.text and "k-NN at step 4: top-1" in caplog.text
    card = (out / "README.md").read_text()
    assert line.group(0) in card and "a demo-scale check that pretraining helps, not a benchmark result" in card
    assert "weighted k-NN (k=20, T=0.07) top-1 accuracy" in card and "demo-scale fine-tuning (10 labels) top-1 accuracy" in card
    events = b"".join(path.read_bytes() for path in (out / "runs").rglob("events.out.tfevents*"))
    assert b"knn_top1" in events


@pytest.mark.slow
def test_two_gloo_ranks_give_the_one_rank_numbers(tmp_path):
    """k-NN monitor and the k-NN check under two processes: each rank's share of the bank gathered, counts summed."""
    # every labelled digit (--labelled_max_*_samples would keep the first N of each rank's shards: other examples)
    common = [*TINY, "--max_train_steps", 2, "--knn_eval_steps", 1, "--downstream_eval", "knn", "--downstream_train_fraction", 0.5]
    run_mim(*common, "--output_dir", tmp_path / "one")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29561", str(SCRIPT),
         *map(str, common), "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert two.returncode == 0, two.stderr[-5000:]
    one, two = (json.loads((tmp_path / name / "eval_results.json").read_text()) for name in ("one", "two"))
    assert one["history"][0]["knn_top1"] == two["history"][0]["knn_top1"]  # step 0: the same initial weights
    assert one["history"][0]["knn_bank_size"] == two["history"][0]["knn_bank_size"] == 1438
    assert one["downstream"]["random_init"] == two["downstream"]["random_init"]
    assert one["downstream"]["train_examples"] == two["downstream"]["train_examples"] == 720  # 72 of each digit
    assert one["downstream"]["eval_examples"] == two["downstream"]["eval_examples"] == 359


def test_the_borrowed_accelerator_forgets_the_extra_trainings(fresh_accelerate_state):
    """The check's classifiers train under the run's Accelerator with accumulation 1; afterwards the run's
    accumulation is back and nothing they prepared or registered stays (no later checkpoint would hold it)."""
    from accelerate import Accelerator

    from hf_mim.training.downstream import borrowed_accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    with borrowed_accelerator(accelerator):
        assert accelerator.gradient_accumulation_steps == 1
        extra = torch.nn.Linear(2, 2)
        accelerator.prepare(extra, torch.optim.SGD(extra.parameters(), lr=0.1))
        accelerator.register_for_checkpointing(torch.optim.lr_scheduler.StepLR(torch.optim.SGD(extra.parameters(), lr=1), 1))
    assert accelerator.gradient_accumulation_steps == 4
    assert accelerator._models == [model] and accelerator._optimizers == [] and accelerator._custom_objects == []


def test_sharded_engines_are_refused():
    from accelerate.utils import DistributedType

    from hf_mim.training.downstream import check_can_read_encoder
    from hf_mim.training.run_setup import UserInputError

    for engine in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(UserInputError, match=f"not under {engine.value}"):
            check_can_read_encoder(type("Run", (), {"distributed_type": engine})())
    check_can_read_encoder(type("Run", (), {"distributed_type": DistributedType.MULTI_GPU})())
