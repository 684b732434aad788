"""benchmarks/scale.py: the synthetic OpenImages-shaped set it measures, and one row per measurement."""

import pandas as pd
import pytest

from benchmarks import scale
from udtimm.data import build_dataset
from udtimm.data.base import Label, label_counts


def test_the_synthetic_set_has_the_registered_labels_and_a_long_tail(tmp_path) -> None:
    labels = scale.write_set(str(tmp_path), 300)
    dataset = build_dataset("csv", str(tmp_path), "train", unlisted="unknown")
    assert len(dataset) == 300 and len(dataset.classes) == scale.CLASSES and labels == 300 * 28
    assert all(len(s.labels) == 28 and (s.labels["state"] == Label.PRESENT).sum() == 8 for s in dataset.samples)
    counts = label_counts(dataset)
    known = counts[:, Label.PRESENT] + counts[:, Label.ABSENT]
    assert known[:10].sum() > 10 * known[-1000:].sum()  # Zipf: the first classes are labelled far more often


@pytest.mark.slow
def test_each_measurement_runs_in_its_own_process_and_writes_its_row(tmp_path) -> None:
    results = tmp_path / "scale.csv"
    scale.main(["--work", str(tmp_path / "work"), "--results", str(results), "--sizes", "200"])
    table = pd.read_csv(results)
    assert list(table["measure"]) == ["load", "exact", "binned"] and list(table.columns) == list(scale.COLUMNS)
    assert (table["peak_mb"] > 0).all() and (table["labels"] == 200 * 28).all()
    exact, binned = table.set_index("measure").loc[["exact", "binned"], "map"]
    assert abs(binned - exact) < 1.0  # 200 images: a loose bound; the benchmark measures the real one
