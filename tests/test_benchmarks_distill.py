"""Smoke test of benchmarks/distill_step.py at a tiny CPU size (no timing assertion: timings are for GPUs)."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "distill_step.py"


def test_distill_step_benchmark_runs(tmp_path):
    csv_path = tmp_path / "distill_step.csv"
    args = ["--teacher", "test_resnet", "--student", "test_efficientnet", "--img-size", "64", "--batch-size", "4"]
    args += ["--steps", "1", "--warmup", "1", "--device", "cpu", "--csv", str(csv_path)]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"ud/kd = \d+\.\d+x, ud-naive/kd = \d+\.\d+x", result.stdout), result.stdout
    assert result.stdout.startswith("cpu:")
    assert len(csv_path.read_text().splitlines()) == 4  # header + kd, ud, ud-naive
