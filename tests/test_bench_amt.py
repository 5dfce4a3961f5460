"""benchmarks/bench_amt.py runs to its end for both hosts (tiny sizes; the timings themselves are not
checked: benchmarks print ratios, tests never assert timings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_amt.py"


def test_bench_amt_reports_the_official_schedule_for_both_hosts():
    """SimMIM-AMT's warm-up ratio is unset (it follows mask_ratio): the schedule line must still find its
    random row (it once failed there with a TypeError)."""
    result = subprocess.run(
        [sys.executable, str(BENCH), "--size", "tiny", "--image_size", "32", "--batch", "2", "--warmup", "0", "--steps", "1",
         "--refresh_images", "4", "--threads", "1", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
        cwd=BENCH.parents[1],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("official schedule (wall)") == 2, result.stdout[-3000:]
    assert "whole AMT run (41 epochs random 0.44" in result.stdout  # SimMIM-AMT: its first refresh after 41 epochs
    assert "4 refreshes in 200 epochs" in result.stdout and "9 refreshes in 400 epochs" in result.stdout
