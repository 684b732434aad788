"""Smoke test of benchmarks/distill_step.py at a tiny CPU size (no timing assertion: timings are for GPUs)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import read_rows

import distill
from udtimm.attention import DEFAULT_VARIANT

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "distill_step.py"


@pytest.mark.slow
def test_distill_step_benchmark_times_what_distill_py_builds(tmp_path):
    csv_path = tmp_path / "distill_step.csv"
    args = ["--teacher", "test_resnet", "--student", "test_efficientnet", "--img-size", "64", "--batch-size", "4"]
    args += ["--steps", "1", "--warmup", "1", "--cpu", "--csv", str(csv_path)]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"ud/kd = \d+\.\d+x", result.stdout), result.stdout
    assert result.stdout.startswith("cpu:") and f"att-variant {DEFAULT_VARIANT}" in result.stdout
    rows = read_rows(str(csv_path))
    assert [row["method"] for row in rows] == ["kd", "ud"] and float(rows[0]["ratio_vs_kd"]) == 1.0
    assert {row["att_variant"] for row in rows} == {distill.parse_args(["--teacher-ckpt", "t"]).att_variant}
