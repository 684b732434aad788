"""validate.py's prediction files and tables: exact CSV round trips, aligned tables, per-class AP."""

import math

import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_fscore_support
from torchmetrics.classification import BinaryCalibrationError

from udtimm import metrics
from udtimm.predictions import (
    PER_CLASS_COLUMNS,
    Predictions,
    format_table,
    frame_table,
    joined_names,
    metrics_table,
    per_class_metrics,
    select,
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


def per_class_data() -> Predictions:
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(60, 4, generator=g) < 0.4).float()
    scores = (0.3 * target + 0.7 * torch.rand(60, 4, generator=g)).clamp(0.0001, 0.9999)
    difficult = torch.rand(60, 4, generator=g) < 0.1
    target[:, 3] = 0  # a class without positive
    return Predictions(scores, target, difficult, torch.arange(60))


@pytest.mark.parametrize("as_negative", [False, True])
def test_per_class_metrics_match_sklearn_and_torchmetrics(as_negative: bool) -> None:
    predictions, names = per_class_data(), ["a", "b", "c", "d"]
    table = per_class_metrics(predictions, names, 0.45, difficult_as_negative=as_negative)
    assert list(table.columns) == list(PER_CLASS_COLUMNS) and table["class"].tolist() == names
    for c in range(3):
        keep = ~predictions.difficult[:, c]
        y, s = predictions.target[keep, c].numpy() > 0.5, predictions.scores[keep, c].numpy()
        assert table["ap"][c] == pytest.approx(100 * average_precision_score(y, s))
        ece = BinaryCalibrationError(n_bins=15, norm="l1")(torch.from_numpy(s), torch.from_numpy(y).long())
        assert table["ece"][c] == pytest.approx(100 * ece.item(), abs=1e-4)
        if as_negative:  # difficult pairs count as negatives for P/R/F1
            y, s = ((predictions.target[:, c] > 0.5) & keep).numpy(), predictions.scores[:, c].numpy()
        p, r, f1, _ = precision_recall_fscore_support(y, s >= 0.45, average="binary", zero_division=0)
        assert table[["precision", "recall", "f1"]].iloc[c].tolist() == pytest.approx([100 * p, 100 * r, 100 * f1])
        assert table["positives"][c] == ((predictions.target[:, c] > 0.5) & keep).sum()
        assert table["difficult"][c] == (~keep).sum()
    assert math.isnan(table["ap"][3]) and math.isnan(table["recall"][3]) and table["positives"][3] == 0
    rows = frame_table(table).splitlines()
    assert rows[0].split() == list(PER_CLASS_COLUMNS) and rows[5].split()[1] == "n/a"
    assert rows[2].split()[1] == f"{table['ap'][0]:.2f}"


def test_empty_rows_table_has_header_only() -> None:
    assert format_table(("a", "b"), []).splitlines() == ["a  b", "-  -"]


@pytest.mark.parametrize("value", ["1e-05", "-3", "inf"])
def test_numbers_in_any_notation_are_right_aligned(value: str) -> None:
    assert format_table(("number",), [(value,)]).splitlines()[-1] == value.rjust(6)
