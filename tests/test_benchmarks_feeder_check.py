"""Smoke test of benchmarks/feeder_check.py on the CPU: its point is CUDA streams, but its thread runs here too."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import feeder_check  # noqa: E402


def test_feeder_check_passes_on_the_cpu(tiny_digits: str, capsys) -> None:
    argv = ["--dataset", "digits", "--data-dir", tiny_digits, "--model", "test_resnet", "--img-size", "32",
            "-b", "8", "--workers", "0", "--batches", "3"]
    assert feeder_check.main(argv) == 0
    out = capsys.readouterr().out
    assert "cpu-decode train: 3 batches prepared ahead equal those inline" in out
    assert "cpu-decode predict: max |score difference| 0.00e+00 (ok)" in out
