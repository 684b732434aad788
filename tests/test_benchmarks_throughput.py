"""Smoke test of benchmarks/throughput.py at a tiny CPU size (no timing assertion: timings are for GPUs)."""

import csv
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def test_throughput_benchmark_runs(tmp_path):
    csv_path = tmp_path / "throughput.csv"
    args = ["--model", "test_resnet", "--teacher", "test_resnet", "--img-size", "32", "--batch-size", "4"]
    args += ["--steps", "1", "--warmup", "1", "--num-images", "16", "--workers", "0", "--prefetch", "1"]
    args += ["--synthetic-voc", str(tmp_path / "voc"), "--csv", str(csv_path)]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("cpu:")
    ratios = r"ratio real/ceiling: train cpu-decode \d+\.\d+, distill cpu-decode \d+\.\d+, predict cpu-decode \d+\.\d+"
    assert re.search(ratios, result.stdout), result.stdout
    assert re.search(r"calibration branch: [+-]\d+\.\d+ % train step time", result.stdout), result.stdout
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["workload"], row["pipeline"]) for row in rows] == [
        ("train", "ceiling"), ("train", "ceiling"), ("train", "ceiling"), ("train", "cpu-decode"),
        ("distill", "ceiling"), ("distill", "cpu-decode"), ("predict", "ceiling"), ("predict", "cpu-decode"),
    ]
    assert {"device", "img_per_s", "ms_per_step", "peak_mib", "real_over_ceiling", "prefetch"} <= set(rows[0])
    assert [row["cal"] for row in rows[:3]] == ["True", "False", "True"]  # without --cal: the branch is the extra
    assert rows[3]["prefetch"] == "1" and int(rows[3]["images"]) == 8  # 4 batches of 4: 1 skipped, 1 left ahead
    assert len(list((tmp_path / "voc" / "VOC2007" / "JPEGImages").glob("*.jpg"))) == 16
