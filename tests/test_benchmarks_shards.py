"""Smoke test of benchmarks/shards.py at a tiny size (no timing assertion)."""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import shards as shards_benchmark  # noqa: E402


@pytest.mark.slow
def test_shards_benchmark_times_files_and_shards_for_each_size_and_worker_count(tmp_path, capsys) -> None:
    rows = shards_benchmark.main(["--num-images", "8", "--sizes", "32", "--workers", "0", "1", "--batch-size", "4",
                                  "--shard-size", "3", "--synthetic-voc", str(tmp_path / "voc")])
    assert [(row["source"], row["workers"]) for row in rows] == [("files", 0), ("shards", 0), ("files", 1),
                                                                 ("shards", 1)]
    assert all(row["img_per_s"] > 0 and row["first_batch_s"] > 0 for row in rows)
    printed = capsys.readouterr().out
    assert "3 shard(s) of 3" in printed and len(re.findall(r"^\| shards \| 32 \| \d \| ", printed, re.M)) == 2
    assert re.search(r"converter: \d+ img/s copying the files, \d+ img/s with --resize 256", printed)
