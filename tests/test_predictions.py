"""validate.py's prediction files and tables: exact CSV round trips, aligned tables, per-class AP."""

import argparse
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import OPENIMAGES_CLASSES
from sklearn.metrics import average_precision_score, precision_recall_fscore_support
from torchmetrics.classification import BinaryCalibrationError

from udtimm import metrics, predictions
from udtimm.predictions import (
    MANY_CLASSES,
    PER_CLASS_COLUMNS,
    POSITIVE_BANDS,
    Predictions,
    class_table,
    format_table,
    frame_table,
    joined_names,
    metrics_table,
    per_class_metrics,
    select,
    summary_rows,
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


def many_classes_frame(num_classes: int = OPENIMAGES_CLASSES) -> pd.DataFrame:
    """A per-class table as validate.py prints it, of OpenImages' size: positives from none to hundreds (a long tail
    of ties), AP nan where a class has none, a note on some classes."""
    g = np.random.default_rng(0)
    positives = np.floor(g.pareto(1.0, num_classes)).astype(np.int64)
    ap = np.where(positives > 0, 100 * g.random(num_classes), np.nan)
    return pd.DataFrame({"class": [f"class{index:05d}" for index in range(num_classes)], "ap": ap,
                         "ece": 100 * g.random(num_classes), "positives": positives,
                         "note": np.where(positives == 0, "no positive", "")})


def section(text: str, title: str) -> list[list[str]]:
    """The split rows of the table printed under the line `title` of a summary."""
    lines = text.splitlines()
    start = lines.index(title) + 3  # the title, the header, the rule
    rows = []
    for line in lines[start:]:
        if line.endswith(":") or (line[:1].isdigit() and "classes:" in line):  # the next title, or a note count
            break
        rows.append(line.split())
    return rows


def test_few_classes_or_all_rows_print_every_row_as_before() -> None:
    few = many_classes_frame(MANY_CLASSES)
    assert class_table(few, "ap") == frame_table(few)  # VOC's 20, COCO's 80: as before
    every = class_table(many_classes_frame(), "ap", rows=None)
    assert len(every.splitlines()) == OPENIMAGES_CLASSES + 2


def test_many_classes_print_the_worst_and_best_quantiles_and_bands_of_positives() -> None:
    frame = many_classes_frame()
    text = class_table(frame, "ap", rows=7, decimals={"ap": 3})
    assert len(text.splitlines()) < 50 and text.startswith(f"{OPENIMAGES_CLASSES} classes, summarised")
    ranked = frame.dropna(subset=["ap"])
    order = np.argsort(ranked["ap"].to_numpy(), kind="stable")
    worst, best = section(text, "worst 7 by ap:"), section(text, "best 7 by ap:")
    assert [row[0] for row in worst] == ranked["class"].to_numpy()[order[:7]].tolist()
    assert [row[0] for row in best] == ranked["class"].to_numpy()[order[::-1][:7]].tolist()
    assert worst[0][1] == f"{ranked['ap'].min():.3f}"  # the column's decimals

    quantiles = {row[0]: row[1:] for row in section(text, "quantiles over the classes:")}
    assert quantiles["ap"][-1] == str((frame["ap"].isna()).sum())
    expected = np.percentile(ranked["ap"], [0, 25, 50, 75, 100], method="lower")
    assert quantiles["ap"][:5] == [f"{value:.3f}" for value in expected]
    assert quantiles["positives"][:5] == [str(value) for value in np.percentile(frame["positives"],
                                                                                  [0, 25, 50, 75, 100],
                                                                                  method="lower")]

    bands = section(text, "ap by evaluated positives (quantile bands):")
    assert len(bands) <= POSITIVE_BANDS + 1 and sum(int(row[1]) for row in bands) == OPENIMAGES_CLASSES
    previous = -1
    for label, count, mean, median, low, high in bands:
        first, _, last = label.partition("-")
        first, last = int(first), int(last or first)
        assert first == previous + 1  # contiguous: every count in one band, none split between two
        members = frame[(frame["positives"] >= first) & (frame["positives"] <= last)]
        assert int(count) == len(members)
        if first == 0:
            assert [mean, median, low, high] == ["n/a"] * 4
        else:
            values = members["ap"]
            assert [mean, median, low, high] == [f"{value:.3f}" for value in (values.mean(), values.median(),
                                                                              values.min(), values.max())]
        previous = last
    assert previous == frame["positives"].max()
    assert f"{(frame['positives'] == 0).sum()} classes: no positive" in text.splitlines()


def test_distinct_positives_fall_in_equal_bands_and_lower_is_better_swaps_worst_and_best(monkeypatch) -> None:
    monkeypatch.setattr(predictions, "MANY_CLASSES", 10)
    frame = pd.DataFrame({"class": [f"c{index}" for index in range(100)], "loss": np.arange(100) / 100,
                          "positives": np.arange(1, 101)})
    text = class_table(frame, "loss", rows=2, lower_is_better=True)
    assert [row[0] for row in section(text, "worst 2 by loss:")] == ["c99", "c98"]
    assert [row[0] for row in section(text, "best 2 by loss:")] == ["c0", "c1"]
    bands = section(text, "loss by evaluated positives (quantile bands):")
    assert [(row[0], row[1]) for row in bands] == [("1-20", "20"), ("21-40", "20"), ("41-60", "20"),
                                                   ("61-80", "20"), ("81-100", "20")]


def test_summary_rows_is_a_count_or_all() -> None:
    assert summary_rows("all") is None and summary_rows("25") == 25
    for bad in ("0", "-3", "many", "2.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="at least 1"):
            summary_rows(bad)


def test_joined_names_visits_the_predicted_classes_of_many() -> None:
    mask = torch.zeros(OPENIMAGES_CLASSES, dtype=torch.bool)
    mask[[3, 9_999]] = True
    names = [f"class{index:05d}" for index in range(OPENIMAGES_CLASSES)]
    assert joined_names(mask, names) == "class00003;class09999"
    with pytest.raises(ValueError, match="a mask of 10000 classes for 9999 class names"):
        joined_names(mask, names[1:])
