"""Smoke test of benchmarks/worker_rate.py on a few tiny digits (no timing assertion)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import worker_rate  # noqa: E402


def test_worker_rate_times_each_transform_against_decoding(tiny_digits: str, capsys) -> None:
    (folder,) = Path(tiny_digits).rglob("JPEGImages")
    rates = worker_rate.main(["--images", str(folder), "--count", "4", "--img-size", "32", "--repeats", "1"])
    assert len(rates) == 5 and all(rate > 0 for rate in rates.values())
    out = capsys.readouterr().out
    assert "decode only (ceiling)" in out and "1.000 of decoding alone" in out
