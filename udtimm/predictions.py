"""validate.py's outputs besides the metrics: per-image prediction CSVs and the tables it prints."""

from __future__ import annotations

import argparse
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
    if len(mask) != len(class_names):
        raise ValueError(f"a mask of {len(mask)} classes for {len(class_names)} class names")
    # Only the few True entries are visited: a Python loop over 10,000 classes per image would dominate.
    return ";".join(class_names[index] for index in mask.nonzero().flatten().tolist())


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


# Above this many classes a per-class table prints as a summary (class_table) and predict.py writes the
# probabilities of the predicted classes only: 10,000 rows (OpenImages) or columns are read by no one.
MANY_CLASSES = 100  # COCO (80) and NUS-WIDE (81) still print every row
SUMMARY_ROWS = 10  # the worst and best classes a summary shows (validate.py --per-class-rows)
POSITIVE_BANDS = 5  # a summary's quantile bands of evaluated positives
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def summary_rows(text: str) -> int | None:
    """--per-class-rows: N (at least 1) worst and best classes in a summary, or `all` (None): every row."""
    if text == "all":
        return None
    try:
        rows = int(text)
    except ValueError:
        rows = 0
    if rows < 1:
        raise argparse.ArgumentTypeError(f"expected a number of rows (at least 1) or all, got {text!r}")
    return rows


def class_table(frame: pd.DataFrame, rank_by: str, rows: int | None = SUMMARY_ROWS,
                decimals: dict[str, int] | None = None, lower_is_better: bool = False) -> str:
    """A per-class DataFrame (a `class` column, one row per class) as frame_table prints it, every row, when it has
    at most MANY_CLASSES rows or `rows` is None; else a summary: the `rows` worst and best classes by `rank_by`
    (classes where it is nan left out), the quantiles of every numeric column, `rank_by` by quantile band of the
    `positives` column when there is one, and how many classes carry each `note` when there is that column."""
    if rows is None or len(frame) <= MANY_CLASSES:
        return frame_table(frame, decimals)
    ranked = frame.dropna(subset=[rank_by])
    worst = ranked.sort_values(rank_by, ascending=not lower_is_better, kind="stable").head(rows)
    best = ranked.sort_values(rank_by, ascending=lower_is_better, kind="stable").head(rows)
    parts = [f"{len(frame)} classes, summarised (validate.py --per-class-rows all prints every row)",
             f"worst {len(worst)} by {rank_by}:", frame_table(worst, decimals),
             f"best {len(best)} by {rank_by}:", frame_table(best, decimals),
             "quantiles over the classes:", quantile_table(frame, decimals)]
    if "positives" in frame.columns and rank_by != "positives":
        parts += [f"{rank_by} by evaluated positives (quantile bands):", band_table(frame, rank_by, decimals)]
    if "note" in frame.columns:
        parts += [f"{count} classes: {note}" for note, count in frame["note"][frame["note"] != ""].value_counts(
            sort=False).items()]
    return "\n".join(parts)


def _number(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def quantile_table(frame: pd.DataFrame, decimals: dict[str, int] | None = None) -> str:
    """Per numeric column of a per-class frame: its smallest, quartiles and largest value over the classes (nan
    left out; integer columns as integers) and how many classes have no value (n/a)."""
    rows = []
    for column in frame.select_dtypes("number").columns:
        values = frame[column].to_numpy(dtype=float)
        known = values[~np.isnan(values)]
        # "lower": values the classes have, so that integer columns (positives) stay integers.
        found = np.quantile(known, QUANTILES, method="lower") if known.size else np.full(len(QUANTILES), math.nan)
        digits = 0 if pd.api.types.is_integer_dtype(frame[column]) else (decimals or {}).get(column, 2)
        rows.append((column, *(_number(value, digits) for value in found), str(values.size - known.size)))
    return format_table(("column", "min", "25 %", "median", "75 %", "max", "n/a"), rows)


def band_table(frame: pd.DataFrame, column: str, decimals: dict[str, int] | None = None) -> str:
    """`column` of a per-class frame by band of its `positives`: the classes without a positive, then
    POSITIVE_BANDS quantile bands of the others (fewer where counts tie); per band its classes and the mean,
    median, smallest and largest `column` (nan left out)."""
    positives, values = frame["positives"].to_numpy(), frame[column].to_numpy(dtype=float)
    counted = np.sort(positives[positives > 0])
    # Upper edges drawn from the counts themselves, at the ceil(k n / bands)-th smallest (integer arithmetic:
    # np.quantile's 0.6 * 100 rounds up to 61): every band holds a class, none splits a count.
    ranks = [(k * counted.size + POSITIVE_BANDS - 1) // POSITIVE_BANDS - 1 for k in range(1, POSITIVE_BANDS + 1)]
    edges = np.unique(counted[ranks]) if counted.size else counted
    digits = (decimals or {}).get(column, 2)
    rows = []
    for low, high in zip([-1, 0, *edges[:-1]], [0, *edges], strict=True):
        members = values[(positives > low) & (positives <= high)]
        if members.size == 0:
            continue
        label = str(int(high)) if low + 1 == high else f"{int(low) + 1}-{int(high)}"
        known = members[~np.isnan(members)]
        stats = (known.mean(), np.median(known), known.min(), known.max()) if known.size else (math.nan,) * 4
        rows.append((label, str(members.size), *(_number(value, digits) for value in stats)))
    return format_table(("positives", "classes", f"mean {column}", f"median {column}", f"min {column}",
                         f"max {column}"), rows)
