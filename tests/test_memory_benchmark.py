"""benchmarks/memory_benchmark.py's arithmetic, checked by hand (the run itself is a benchmark: never asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_benchmark.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("memory_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slope_is_megabytes_per_thousand_steps(bench):
    # 100 MB at step 1000, 103 MB at step 3000: 3 MB over 2,000 steps = 1.5 MB per 1,000 steps
    assert bench.slope_per_1k_steps([1000, 2000, 3000], [100.0, 101.5, 103.0]) == pytest.approx(1.5)
    # least squares through noise: (0, 0), (1000, 2), (2000, 1) -> slope 0.5 per 1,000
    assert bench.slope_per_1k_steps([0, 1000, 2000], [0.0, 2.0, 1.0]) == pytest.approx(0.5)
    assert bench.slope_per_1k_steps([500, 500], [1.0, 9.0]) == 0.0  # one step only: no slope


def test_value_at_takes_the_first_sample_at_or_after_the_step(bench):
    assert bench.value_at([10, 20, 30], [1.0, 2.0, 3.0], 15) == 2.0
    assert bench.value_at([10, 20, 30], [1.0, 2.0, 3.0], 99) == 3.0


def test_store_bytes_match_the_store_dtypes(bench):
    # 8-byte id + 14 x 14 float16 cells = 8 + 392 = 400 bytes; ImageNet-1k 1,281,167 x 400 = 512,466,800
    assert bench.store_bytes(1, 14) == 400
    assert bench.store_bytes(1_281_167, 14) == 512_466_800
    assert bench.store_bytes(14_197_122, 16) == 14_197_122 * (8 + 512)
