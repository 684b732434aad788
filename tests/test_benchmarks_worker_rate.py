"""Smoke test of benchmarks/worker_rate.py on a few tiny digits (no timing assertion)."""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import worker_rate  # noqa: E402


def test_worker_rate_times_each_transform_against_decoding(tiny_digits: str, capsys) -> None:
    (folder,) = Path(tiny_digits).rglob("JPEGImages")
    rates = worker_rate.main(["--images", str(folder), "--count", "4", "--img-size", "32", "--repeats", "1"])
    assert len(rates) == 5 and all(rate > 0 for rate in rates.values())
    printed = {}
    for line in capsys.readouterr().out.splitlines()[1:]:
        name, rate, ratio = re.fullmatch(r"(.+?)\s+([\d.]+) img/s\s+([\d.]+) of decoding alone", line).groups()
        printed[name] = (float(rate), float(ratio))
    assert list(printed) == list(rates)  # one row per measured transform, in the order measured
    ceiling = rates["decode only (ceiling)"]
    for name, (rate, ratio) in printed.items():  # each row is its rate and its share of the ceiling, rounded
        assert rate == pytest.approx(rates[name], abs=0.05) and ratio == pytest.approx(rates[name] / ceiling, abs=5e-4)
