"""Smoke test of benchmarks/throughput.py at a tiny CPU size (no timing assertion: timings are for GPUs)."""

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.mark.slow
def test_throughput_benchmark_runs(tmp_path):
    csv_path = tmp_path / "throughput.csv"
    args = ["--model", "test_resnet", "--teacher", "test_resnet", "--img-size", "32", "--batch-size", "4"]
    args += ["--steps", "1", "--cal-rounds", "2", "--warmup", "1", "--num-images", "16", "--workers", "0"]
    args += ["--prefetch", "1"]
    args += ["--synthetic-voc", str(tmp_path / "voc"), "--csv", str(csv_path)]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("cpu:")
    ratios = r"ratio real/ceiling: train cpu-decode \d+\.\d+, distill cpu-decode \d+\.\d+, predict cpu-decode \d+\.\d+"
    assert re.search(ratios, result.stdout), result.stdout
    assert re.search(r"calibration branch: [+-]\d+\.\d+ % train step time \(median of 2 rounds", result.stdout), \
        result.stdout
    flops = re.search(r"calibration branch: \+(\d+\.\d+) % train step FLOPs \((\d+\.\d+) -> (\d+\.\d+) GFLOP",
                      result.stdout)
    assert flops and float(flops[1]) > 0 and float(flops[3]) >= float(flops[2]) > 0, result.stdout
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["workload"], row["pipeline"], row["cal"], row["cal_round"]) for row in rows] == [
        ("train", "ceiling", "False", "0"), ("train", "ceiling", "True", "0"),  # rounds alternate the order
        ("train", "ceiling", "True", "1"), ("train", "ceiling", "False", "1"),
        ("train", "ceiling", "False", ""), ("train", "cpu-decode", "False", ""),
        ("distill", "ceiling", "True", ""), ("distill", "cpu-decode", "True", ""),
        ("predict", "ceiling", "False", ""), ("predict", "cpu-decode", "False", ""),
    ]
    assert {"device", "img_per_s", "ms_per_step", "peak_mib", "real_over_ceiling", "prefetch",
            "first_batch_s"} <= set(rows[0])
    assert all(float(row["first_batch_s"]) >= 0 for row in rows)
    assert [row["real_over_ceiling"] for row in rows[:5]] == ["nan"] * 4 + ["1.000"]
    assert rows[5]["prefetch"] == "1" and int(rows[5]["images"]) == 8  # 4 batches of 4: 1 skipped, 1 left ahead
    assert len(list((tmp_path / "voc" / "VOC2007" / "JPEGImages").glob("*.jpg"))) == 16
