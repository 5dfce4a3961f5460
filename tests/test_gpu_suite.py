"""benchmarks/gpu_suite.py keeps working without a GPU: its --dry-run (tiny sizes on the CPU, the same
code paths) fills every section's rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_dry(tmp_path, monkeypatch, *argv) -> dict:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_suite

    return gpu_suite.main(["--dry-run", "--output-dir", str(tmp_path), *argv])


def test_gpu_suite_dry_run_fills_every_section(tmp_path, monkeypatch):
    """The rows with their own code paths (MaskDistill's teacher, AMT's throwing from attention maps,
    RevColV2's reversible engine) against the ViTMAE references: step, MFU, memory; RevColV2's columns
    memory, Table 7 inference and the input pipeline, written as markdown and JSON. The whole dry run,
    compile included, is the slow test below (dynamo's tracing alone takes tens of seconds on 2 shared
    cores; the loop's in-place compile is tested in test_loop.py)."""
    results = run_dry(tmp_path, monkeypatch, "--sections", "train", "flash", "columns", "inference", "input",
                      "--models", "MaskDistill", "AMT", "RevColV2-B reversible")
    check(results, tmp_path, ["ViTMAE-B (transformers)", "MaskDistill-B", "AMT-B", "RevColV2-B reversible",
                              "ViTMAE-L (transformers)"])


@pytest.mark.slow
def test_gpu_suite_whole_dry_run(tmp_path, monkeypatch):
    results = run_dry(tmp_path, monkeypatch)
    check(results, tmp_path, ["ViTMAE-B (transformers)", "dBOT-B", "ExtreMA-B", "MaskDistill-B", "AMT-B",
                              "RevColV2-B reversible", "RevColV2-B plain", "ViTMAE-L (transformers)",
                              "RevColV2-L reversible", "RevColV2-L plain"])
    assert results["train"][0]["compiled_img_s"] > 0 and results["train"][1]["compile"] == "skipped (time cap)"


def check(results: dict, tmp_path, names: list[str]) -> None:
    assert [row["model"] for row in results["train"]] == names
    for row in results["train"]:
        assert "error" not in row and "skipped" not in row, row
        assert row["sdpa_img_s"] > 0 and row["vs_vitmae"] > 0 and "peak_mib" in row
        assert "mfu" in row or "reversible" in row["model"], row  # FlopCounterMode cannot see inside autograd.grad
        assert row["flash"] == "n/a (CPU)"
    assert {(r["columns"], r["engine"]) for r in results["columns"]} == {(2, "reversible"), (2, "plain")}
    assert all(r["step_mib"] > 0 for r in results["columns"])
    assert {r["model"] for r in results["inference"]} == {"RevColV2-L", "ViT-L (transformers)"}
    assert all(r["img_s"] > 0 for r in results["inference"])
    assert {r["pipeline"] for r in results["input"] if r.get("vs_official")} == {
        "official (torchvision, folder)", "hf_mim folder", "hf_mim parquet"}
    table = (tmp_path / "table.md").read_text()
    assert "| AMT-B |" in table and "DRY RUN" in table and "Table 7" in table
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["dry_run"] is True
