"""validate.py's prediction files and tables: exact CSV round trips, aligned tables, per-class AP."""

import math

import pandas as pd
import pytest
import torch

from udtimm import metrics
from udtimm.engine import Predictions
from udtimm.predictions import (
    format_table,
    joined_names,
    metrics_table,
    per_class_table,
    select,
    write_image_predictions,
    write_scores_csv,
)

CLASSES = ["cat", "dog", "bird"]


def make_predictions() -> Predictions:
    scores = torch.tensor([[0.9, 0.1, 0.123456789], [0.2, 0.8, 0.5], [0.6, 0.7, 1e-8]])
    target = torch.tensor([[1.0, 0, 0], [0, 1, 1], [1, 0, 0]])
    difficult = torch.tensor([[False, False, False], [False, False, True], [False, False, False]])
    return Predictions(scores, target, difficult, torch.tensor([10, 11, 12]))


def test_select_keeps_rows_by_mask_or_order() -> None:
    predictions = make_predictions()
    kept = select(predictions, torch.tensor([True, False, True]))
    assert kept.indices.tolist() == [10, 12] and torch.equal(kept.scores, predictions.scores[[0, 2]])
    assert select(predictions, torch.tensor([2, 0, 1])).indices.tolist() == [12, 10, 11]


def test_joined_names() -> None:
    assert joined_names(torch.tensor([True, False, True]), CLASSES) == "cat;bird"
    assert joined_names(torch.tensor([False, False, False]), CLASSES) == ""


def test_scores_csv_round_trips_exactly(tmp_path) -> None:
    predictions, path = make_predictions(), str(tmp_path / "preds.csv")
    write_scores_csv(path, ["0001", "0002", "0003"], CLASSES, predictions.scores, predictions.target)
    table = pd.read_csv(path, dtype={"image_id": str}, keep_default_na=False)
    assert list(table.columns) == ["image_id", *CLASSES, "labels"]
    assert table["image_id"].tolist() == ["0001", "0002", "0003"]
    assert torch.equal(torch.tensor(table[CLASSES].to_numpy(), dtype=torch.float32), predictions.scores)
    assert table["labels"].tolist() == ["cat", "dog;bird", "cat"]


def test_image_predictions_csv(tmp_path) -> None:
    predictions, path = make_predictions(), str(tmp_path / "out.csv")
    predicted = metrics.predicted_labels(predictions.scores, 0.5)
    write_image_predictions(path, ["a.jpg", "b, c.jpg", "d.png"], CLASSES, predictions.scores, predicted)
    table = pd.read_csv(path, keep_default_na=False)
    assert list(table.columns) == ["image", "labels", *CLASSES]
    assert table["image"].tolist() == ["a.jpg", "b, c.jpg", "d.png"]
    assert table["labels"].tolist() == ["cat", "dog;bird", "cat;dog"]
    assert torch.equal(torch.tensor(table[CLASSES].to_numpy(), dtype=torch.float32), predictions.scores)


def test_predicted_labels_top_k_keeps_at_most_k_above_threshold() -> None:
    scores = make_predictions().scores
    assert metrics.predicted_labels(scores, 0.5, topk=1).tolist() == [
        [True, False, False], [False, True, False], [False, True, False]]
    assert metrics.predicted_labels(scores, 0.0, topk=2).sum(1).tolist() == [2, 2, 2]


def test_format_table_aligns_text_left_and_numbers_right() -> None:
    lines = format_table(("name", "value"), [("a", "1.50"), ("longer", "12.25"), ("c", "n/a")]).splitlines()
    assert lines == ["name    value", "------  -----", "a        1.50", "longer  12.25", "c         n/a"]


def test_metrics_table_prints_percentages_and_counts() -> None:
    text = metrics_table({"map": 12.3456, "num_images": 40.0})
    assert "12.35" in text and "40" in text and "40.00" not in text


def test_per_class_table_leaves_difficult_out_and_marks_classes_without_positive() -> None:
    predictions = make_predictions()
    predictions.target[:, 2] = 0  # bird: its only positive gone, no AP
    rows = [line.split() for line in per_class_table(predictions, CLASSES).splitlines()[2:]]
    ap = metrics.per_class_average_precision(predictions.scores, predictions.target, predictions.difficult)
    assert rows[0] == ["cat", f"{100 * ap[0].item():.2f}", "2"]
    assert rows[1] == ["dog", f"{100 * ap[1].item():.2f}", "1"]
    assert rows[2] == ["bird", "n/a", "0"] and math.isnan(ap[2].item())


def test_empty_rows_table_has_header_only() -> None:
    assert format_table(("a", "b"), []).splitlines() == ["a  b", "-  -"]


@pytest.mark.parametrize("value", ["1e-05", "-3", "inf"])
def test_numbers_in_any_notation_are_right_aligned(value: str) -> None:
    assert format_table(("number",), [(value,)]).splitlines()[-1] == value.rjust(6)
