"""Per-class decision thresholds chosen on a held-out split (validate.py --tune-thresholds).

A class is predicted when its probability reaches its threshold. `f1` picks, per class, the threshold with the best
F1 on the held-out split; `precision@R` the lowest threshold whose precision there is at least R (the most recall at
that precision). Difficult (image, class) pairs are left out, as in the metrics (docs/method.md#difficult-labels).
udtimm.tuning keeps the thresholds beside the checkpoint, with the calibration they were tuned on if any.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from udtimm.errors import ConfigError
from udtimm.metrics import evaluated_pairs, threshold_metrics
from udtimm.predictions import SUMMARY_ROWS, Predictions, class_table, format_table, per_class_metrics

DEFAULT_THRESHOLD = 0.5
OBJECTIVES = "f1 | precision@R (0 < R <= 1, e.g. precision@0.9)"


@dataclass(frozen=True)
class ThresholdObjective:
    """What a threshold is chosen for: the best F1, or the most recall at precision >= `precision`."""

    name: str  # "f1" or "precision"
    precision: float | None = None

    def __str__(self) -> str:
        return self.name if self.precision is None else f"precision@{self.precision:g}"


def parse_objective(text: str) -> ThresholdObjective:
    """`f1` or `precision@R`; ConfigError naming the flag otherwise."""
    if text == "f1":
        return ThresholdObjective("f1")
    name, _, value = text.partition("@")
    try:
        precision = float(value)
    except ValueError:
        precision = math.nan
    if name != "precision" or not 0 < precision <= 1:
        raise ConfigError(f"--tune-thresholds {text!r}: expected {OBJECTIVES}")
    return ThresholdObjective("precision", precision)


@dataclass
class TunedThresholds:
    values: Tensor  # [C] float64
    tuned: Tensor  # [C] bool: False where the class had no positive and keeps the default threshold
    reached: Tensor  # [C] bool: precision@R reached (always True for f1 where tuned)


def tune_thresholds(scores: Tensor, target: Tensor, difficult: Tensor, objective: ThresholdObjective,
                    default: float = DEFAULT_THRESHOLD) -> TunedThresholds:
    """One threshold per class, chosen on these (held-out) predictions for `objective`."""
    s, positive, keep = scores.to(torch.float64), target > 0.5, evaluated_pairs(target, difficult)
    num_classes = s.shape[1]
    values = torch.full((num_classes,), float(default), dtype=torch.float64)
    tuned = torch.zeros(num_classes, dtype=torch.bool)
    reached = torch.zeros(num_classes, dtype=torch.bool)
    for c in range(num_classes):
        kept = keep[:, c]
        choice = _class_threshold(s[kept, c], positive[kept, c], objective)
        if choice is not None:
            values[c], reached[c] = choice
            tuned[c] = True
    return TunedThresholds(values, tuned, reached)


def _class_threshold(scores: Tensor, positive: Tensor, objective: ThresholdObjective) -> tuple[float, bool] | None:
    """(threshold, objective reached) for one class, or None when it has no positive to tune on."""
    num_positive = int(positive.sum())
    if num_positive == 0:
        return None
    ranked, order = torch.sort(scores, descending=True, stable=True)
    true_positives = positive[order].to(torch.float64).cumsum(0)
    predicted = torch.arange(1, len(ranked) + 1, dtype=torch.float64)
    # A threshold can only fall between two different scores: tied images are predicted together.
    last_of_tie = torch.ones_like(ranked, dtype=torch.bool)
    last_of_tie[:-1] = ranked[:-1] > ranked[1:]
    cuts = torch.nonzero(last_of_tie).flatten()
    tp, count = true_positives[cuts], predicted[cuts]
    if objective.name == "f1":
        cut = cuts[torch.argmax(2 * tp / (count + num_positive))]  # the first (highest threshold) of equal F1s
        reached = True
    else:
        precision = tp / count
        best = precision.max()
        reached = bool(best >= objective.precision)
        # Of the thresholds reaching the precision asked for (or the best there is), the lowest: the most recall.
        target = objective.precision if reached else best
        cut = cuts[torch.nonzero(precision >= target).flatten()[-1]]
    # Halfway to the next lower score: the same images are predicted here, and new scores get a margin either side.
    below = ranked[cut + 1] if cut + 1 < len(ranked) else ranked[cut]
    return float((ranked[cut] + below) / 2), reached


def summary_table(predictions: Predictions, class_names: Sequence[str], result: TunedThresholds,
                  objective: ThresholdObjective, rows: int | None = SUMMARY_ROWS) -> str:
    """Per class: its threshold and the precision, recall and F1 (percent) it gives on the split it was tuned on;
    above MANY_CLASSES classes, the `rows` worst and best by F1 and a summary (predictions.class_table)."""
    table = per_class_metrics(predictions, class_names, result.values)[["class", "positives", "precision", "recall",
                                                                         "f1"]]
    table.insert(1, "threshold", result.values.numpy())
    table["note"] = ["no positive: default kept" if not tuned else "" if reached else f"{objective} not reached"
                     for tuned, reached in zip(result.tuned.tolist(), result.reached.tolist(), strict=True)]
    return class_table(table, "f1", rows, {"threshold": 4})


def compare(predictions: Predictions, threshold: float, per_class: Tensor,
            difficult_as_negative: bool = False) -> tuple[str, dict[str, float]]:
    """CP..OF1 with one threshold and with per-class ones: the printed table, and the latter as `<metric>_tuned`."""
    arguments = (predictions.scores, predictions.target, predictions.difficult)
    plain = threshold_metrics(*arguments, threshold, difficult_as_negative=difficult_as_negative)
    tuned = threshold_metrics(*arguments, per_class, difficult_as_negative=difficult_as_negative)
    rows = [(name, f"{plain[name]:.2f}", f"{tuned[name]:.2f}") for name in plain]
    table = format_table(("metric", f"threshold {threshold:g} (%)", "per-class thresholds (%)"), rows)
    return table, {f"{name}_tuned": value for name, value in tuned.items()}


def per_class_table(predictions: Predictions, class_names: Sequence[str], threshold: float,
                    per_class: Tensor | None = None, difficult_as_negative: bool = False) -> pd.DataFrame:
    """predictions.per_class_metrics at `threshold`; with per-class thresholds, their value and the precision,
    recall and F1 they give, as `threshold_tuned`, `precision_tuned`, ... columns."""
    table = per_class_metrics(predictions, class_names, threshold, difficult_as_negative)
    if per_class is not None:
        tuned = per_class_metrics(predictions, class_names, per_class, difficult_as_negative)
        table["threshold_tuned"] = per_class.numpy()
        for column in ("precision", "recall", "f1"):
            table[f"{column}_tuned"] = tuned[column]
    return table
