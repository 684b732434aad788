"""validate.py's outputs besides the metrics: per-image prediction CSVs and the tables it prints."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from udtimm import metrics
from udtimm.io import atomic_write_text, csv_line


@dataclass
class Predictions:
    scores: Tensor  # [N, C] sigmoid probabilities of the classification branch
    target: Tensor  # [N, C] float multi-hot
    difficult: Tensor  # [N, C] bool
    indices: Tensor  # [N] dataset indices, to name the images
    # [N, C] float32 logits behind `scores` (engine.predict keeps them): temperature scaling divides them, and
    # float32 probabilities saturate at 1 for logits above about 17, so they cannot be recovered from `scores`.
    logits: Tensor | None = None


def select(predictions: Predictions, keep: Tensor) -> Predictions:
    """The predictions of the images where the bool [N] mask `keep` is True."""
    logits = None if predictions.logits is None else predictions.logits[keep]
    return Predictions(predictions.scores[keep], predictions.target[keep], predictions.difficult[keep],
                       predictions.indices[keep], logits)


def joined_names(mask: Tensor, class_names: Sequence[str]) -> str:
    """The class names where the bool [C] mask is True, ';'-joined (the labels column)."""
    return ";".join(name for name, on in zip(class_names, mask.tolist(), strict=True) if on)


def _probability_cells(scores: Tensor) -> list[list[str]]:
    # numpy prints a float32 with the fewest digits that read back as the same float32: exact and short.
    return [[str(value) for value in row] for row in scores.float().numpy()]


def write_scores_csv(path: str, image_ids: Sequence[str], class_names: Sequence[str], scores: Tensor,
                     target: Tensor) -> None:
    """--save-preds: image_id, one probability column per class, labels (ground-truth names); written atomically."""
    lines = [csv_line(["image_id", *class_names, "labels"])]
    for image_id, cells, labels in zip(image_ids, _probability_cells(scores), target > 0.5, strict=True):
        lines.append(csv_line([image_id, *cells, joined_names(labels, class_names)]))
    atomic_write_text(path, "".join(lines))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "n/a"
    return True


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: columns as wide as their longest cell, numbers right-aligned."""
    cells = [[str(value) for value in row] for row in rows]
    widths = [max(len(text) for text in column) for column in zip(headers, *cells, strict=True)]
    numeric = [all(_is_number(row[i]) for row in cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(text.rjust(width) if right else text.ljust(width)
                         for text, width, right in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * width for width in widths]), *(line(row) for row in cells)])


def metrics_table(values: dict[str, float]) -> str:
    """The metrics in percent, the image and class counts as integers."""
    percent = {column.name: column.percent for column in metrics.METRIC_COLUMNS}
    rows = [(name, f"{value:.2f}" if percent.get(name, True) else f"{value:.0f}") for name, value in values.items()]
    return format_table(("metric", "value (%)"), rows)


PER_CLASS_COLUMNS = ("class", "ap", "precision", "recall", "f1", "ece", "positives", "difficult")


def per_class_metrics(predictions: Predictions, class_names: Sequence[str], threshold: float | Tensor = 0.5,
                      difficult_as_negative: bool = False) -> pd.DataFrame:
    """One row per class: AP, precision, recall and F1 at `threshold`, ECE (Eq. 2), all in percent (nan where a
    class has no evaluated positive), the number of positives (difficult ones left out) and of difficult labels.

    As in compute_metrics: AP and ECE leave difficult pairs out; precision, recall and F1 too, unless
    `difficult_as_negative`."""
    scores, target, difficult = predictions.scores, predictions.target, predictions.difficult
    ap = metrics.per_class_average_precision(scores, target, difficult)
    tp, n_predicted, n_positive = metrics.threshold_counts(scores, target, difficult, threshold,
                                                           difficult_as_negative=difficult_as_negative)
    precision = torch.where(n_predicted > 0, tp / n_predicted.clamp(min=1), 0.0)
    recall = torch.where(n_positive > 0, tp / n_positive.clamp(min=1), math.nan)
    f1 = torch.where(tp > 0, 2 * tp / (n_predicted + n_positive).clamp(min=1), 0.0)
    f1 = torch.where(n_positive > 0, f1, math.nan)
    positives = ((target > 0.5) & metrics.evaluated_pairs(target, difficult)).sum(0)
    return pd.DataFrame({
        "class": list(class_names),
        **{name: 100 * values.numpy() for name, values in (("ap", ap), ("precision", precision), ("recall", recall),
                                                              ("f1", f1))},
        "ece": 100 * metrics.per_class_calibration_error(scores, target, difficult).numpy(),
        "positives": positives.numpy(),
        "difficult": difficult.bool().sum(0).numpy(),
    }, columns=list(PER_CLASS_COLUMNS))


def frame_table(frame: pd.DataFrame, decimals: dict[str, int] | None = None) -> str:
    """A DataFrame as format_table prints it: floats with two decimals (or `decimals[column]`), nan as n/a."""
    places = [(decimals or {}).get(column, 2) for column in frame.columns]

    def cell(value: object, digits: int) -> object:
        if isinstance(value, (float, np.floating)):
            return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
        return value

    rows = [[cell(value, digits) for value, digits in zip(row, places, strict=True)]
            for row in frame.itertuples(index=False)]
    return format_table(list(frame.columns), rows)
