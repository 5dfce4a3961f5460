"""Evaluation protocols of the papers: weighted k-NN on frozen features (`--mode knn`, DINO) and label
fractions (`--train_fraction`, SimCLR's / ExtreMA's 1% and 10% subsets)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_mim.data.fractions import check_fraction, class_balanced_subset
from hf_mim.training.knn import knn_evaluate, knn_votes
from hf_mim.training.metrics import topk_correct
from test_run_image_classification import SCRIPT, load_script, write_parquet_split


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# bank: unit vectors at these angles, with these labels (cosine similarity = cos of the angle between)
BANK_ANGLES = [0.0, 60.0, 90.0, 180.0, 30.0]
BANK_LABELS = [0, 1, 1, 2, 0]


@pytest.mark.parametrize("bank_chunk", [1, 2, 3, 100])
def test_knn_votes_match_a_hand_computation(bank_chunk):
    bank = torch.tensor([unit(a) for a in BANK_ANGLES], dtype=torch.float64)
    queries = torch.tensor([unit(0.0), unit(180.0)], dtype=torch.float64)
    votes = knn_votes(bank, torch.tensor(BANK_LABELS), queries, num_classes=4, k=3, temperature=0.5, bank_chunk=bank_chunk)
    # query at 0 deg: the 3 nearest are 0 deg (sim 1, class 0), 30 deg (cos 30, class 0), 60 deg (0.5, class 1);
    # query at 180 deg: 180 deg (1, class 2), 90 deg (0, class 1), 60 deg (-0.5, class 1).
    expected = torch.tensor([
        [math.exp(1 / 0.5) + math.exp(math.cos(math.radians(30)) / 0.5), math.exp(0.5 / 0.5), 0.0, 0.0],
        [0.0, math.exp(0 / 0.5) + math.exp(-0.5 / 0.5), math.exp(1 / 0.5), 0.0],
    ], dtype=torch.float32)
    torch.testing.assert_close(votes, expected, rtol=1e-6, atol=1e-6)
    assert topk_correct(votes, torch.tensor([0, 1]), ks=(1, 2)) == {1: 1, 2: 2}  # query 2: class 2 beats class 1


def test_knn_votes_k_is_capped_at_the_bank_and_inputs_are_checked():
    bank = torch.tensor([unit(0.0), unit(90.0)])
    votes = knn_votes(bank, torch.tensor([0, 1]), torch.tensor([unit(0.0)]), num_classes=2, k=20, temperature=1.0)
    torch.testing.assert_close(votes, torch.tensor([[math.e, 1.0]]))
    with pytest.raises(ValueError, match="bank_labels"):
        knn_votes(bank, torch.tensor([0]), bank, num_classes=2)
    with pytest.raises(ValueError, match="temperature"):
        knn_votes(bank, torch.tensor([0, 1]), bank, num_classes=2, temperature=0.0)


class PooledIdentity(torch.nn.Module):
    """A 'model' whose pooler_output is the input's first two pixels: features we choose."""

    config = type("Config", (), {"hidden_size": 2})()

    def forward(self, pixel_values):
        return type("Output", (), {"pooler_output": pixel_values.flatten(1)[:, :2] * 3.0})()  # scale: normalised away


def batches(angles, labels, size):
    pixels = torch.tensor([unit(a) for a in angles]).view(-1, 2, 1, 1)
    return [{"pixel_values": pixels[i : i + size], "labels": torch.tensor(labels[i : i + size])}
            for i in range(0, len(angles), size)]


def test_knn_evaluate_builds_the_bank_and_counts_top1_top5(fresh_accelerate_state):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    train = batches(BANK_ANGLES, BANK_LABELS, size=2)
    # 3 validation images: 0 deg (class 0: right), 180 deg labelled 1 (wrong at top-1, right at top-2),
    # 75 deg labelled 2 (neighbours 60, 90, 30: class 2 gets no vote, so it is only in the top 5 of 3 classes)
    val = batches([0.0, 180.0, 75.0], [0, 1, 2], size=2)
    model = PooledIdentity().train()
    results = knn_evaluate(model, train, val, accelerator, num_classes=3, k=3, temperature=0.5, bank_chunk=2)
    assert model.training  # restored
    assert results["bank_size"] == 5 and results["eval_examples"] == 3 and results["k"] == 3
    assert results["top1"] == pytest.approx(100 / 3) and results["top5"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------- label fractions


def labelled_stream(counts: dict[int, int], keyed: bool = True, num_shards: int = 4):
    """An undecoded image stream (as load_image_stream returns) with `counts[label]` rows per class."""
    import datasets

    rows = [(label, i) for label, n in counts.items() for i in range(n)]
    data = {"image": [{"bytes": f"img-{label}-{i}".encode(), "path": None} for label, i in rows],
            "label": [label for label, _ in rows]}
    if keyed:
        data["__key__"] = [f"{label}/{i}" for label, i in rows]
    return datasets.Dataset.from_dict(data).to_iterable_dataset(num_shards=num_shards)


def kept_rows(stream, subset) -> list[tuple[int, bytes]]:
    return sorted((row["label"], row["image"]["bytes"]) for row in stream.filter(subset.keeps))


@pytest.mark.parametrize("keyed", [True, False], ids=["by key", "by image bytes"])
def test_train_fraction_is_class_balanced_seeded_and_independent_of_stream_order(keyed):
    counts = {0: 100, 1: 60, 2: 30}
    stream = labelled_stream(counts, keyed)
    subsets = {f: class_balanced_subset(stream, "image", "label", f, seed=0) for f in (0.01, 0.1, 0.5)}
    # round(fraction x 190 / 3) per class; class 2 has only 30 for 0.5
    assert {f: s.counts for f, s in subsets.items()} == {
        0.01: {0: 1, 1: 1, 2: 1}, 0.1: {0: 6, 1: 6, 2: 6}, 0.5: {0: 32, 1: 32, 2: 30}}
    chosen = kept_rows(stream, subsets[0.1])
    assert [label for label, _ in chosen] == [0] * 6 + [1] * 6 + [2] * 6
    # the same subset from a shuffled, re-sharded stream, and from a second run
    reordered = labelled_stream(counts, keyed, num_shards=3).shuffle(seed=7, buffer_size=64)
    again = class_balanced_subset(reordered, "image", "label", 0.1, seed=0)
    assert again.thresholds == subsets[0.1].thresholds and kept_rows(reordered, again) == chosen
    # every process keeps its share of the same subset
    from datasets.distributed import split_dataset_by_node

    filtered = stream.filter(subsets[0.1].keeps)
    shares = [sorted((r["label"], r["image"]["bytes"]) for r in split_dataset_by_node(filtered, rank, 2)) for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == chosen and not set(shares[0]) & set(shares[1])
    # nested: the 1% subset lies inside the 10% one; another seed picks other examples
    assert set(kept_rows(stream, subsets[0.01])) <= set(chosen)
    assert kept_rows(stream, class_balanced_subset(stream, "image", "label", 0.1, seed=1)) != chosen
    assert len(kept_rows(stream, class_balanced_subset(stream, "image", "label", 1.0, seed=0))) == 190


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan")])
def test_train_fraction_outside_0_1_is_a_one_line_error(bad, capsys):
    with pytest.raises(ValueError, match=r"--train_fraction must be in \(0, 1\]"):
        check_fraction(bad)
    with pytest.raises(SystemExit):
        load_script().parse_args(["--model_type", "dbot", "--model_size", "tiny", "--train_fraction", str(bad)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--train_fraction must be in (0, 1]" in error


def test_knn_flag_errors(capsys):
    script = load_script()
    for flags, message in ((["--knn_k", "0"], "--knn_k must be >= 1"), (["--validation_split", "none"], "--mode knn evaluates")):
        with pytest.raises(SystemExit):
            script.parse_args(["--model_type", "dbot", "--model_size", "tiny", "--mode", "knn", *flags])
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def knn_workspace(tmp_path_factory):
    from hf_mim import DbotConfig, DbotForMaskedImageModeling
    from hf_mim.hub import save_hub_folder

    root = tmp_path_factory.mktemp("knn")
    torch.manual_seed(0)
    save_hub_folder(DbotForMaskedImageModeling(DbotConfig.from_preset("tiny")), root / "pretrained")
    write_parquet_split(root / "labelled", "train", per_class=8, shards=2, with_labels=True, seed=1)
    write_parquet_split(root / "labelled", "validation", per_class=4, shards=1, with_labels=True, seed=2)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_MIM_CACHE=str(root / "cache"),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return {"root": root, "env": env}


def knn_command(ws, output: str) -> list[str]:
    return [str(SCRIPT), "--mode", "knn", "--model_name_or_path", str(ws["root"] / "pretrained"),
            "--train_dir", str(ws["root"] / "labelled"), "--train_fraction", "0.5", "--per_device_eval_batch_size", "5",
            "--output_dir", str(ws["root"] / output)]


def test_knn_mode_writes_results_and_card(knn_workspace, fresh_accelerate_state, capsys, monkeypatch):
    ws = knn_workspace
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_MIM_CACHE"):
        monkeypatch.setenv(name, ws["env"][name])
    assert load_script().main(knn_command(ws, "knn")[1:]) == 0  # in this process: no start-up of its own
    folder = ws["root"] / "knn"
    results = json.loads((folder / "eval_results.json").read_text())
    # 24 training images in 3 classes, fraction 0.5: round(0.5 x 24 / 3) = 4 per class
    assert results["bank_size"] == 12 and results["eval_examples"] == 12 and results["k"] == 12
    assert results["mode"] == "knn" and results["train_fraction"] == 0.5 and 0 <= results["top1"] <= results["top5"] <= 100
    card = (folder / "README.md").read_text()
    assert "weighted k-NN (k=12, T=0.07) top-1 accuracy" in card and "label fraction 0.5" in card
    assert "mode=knn k=12 bank=12" in capsys.readouterr().out


@pytest.mark.slow
def test_knn_on_two_gloo_ranks_gives_the_one_rank_accuracy(knn_workspace):
    ws = knn_workspace
    env = dict(ws["env"], ACCELERATE_USE_CPU="1")
    one = subprocess.run([sys.executable, *knn_command(ws, "knn_one")], capture_output=True, text=True, env=env, timeout=900)
    assert one.returncode == 0, one.stderr[-5000:]
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29547", *knn_command(ws, "knn_two")],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert two.returncode == 0, two.stderr[-5000:]
    results = [json.loads((ws["root"] / name / "eval_results.json").read_text()) for name in ("knn_one", "knn_two")]
    for key in ("top1", "top5", "bank_size", "eval_examples"):
        assert results[0][key] == results[1][key], key
    assert results[0]["bank_size"] == 12
