"""Per-class decision thresholds chosen on a held-out split, and the file that keeps them beside the checkpoint.

A class is predicted when its probability reaches its threshold. `f1` picks, per class, the threshold with the best
F1 on the held-out split; `precision@R` the lowest threshold whose precision there is at least R (the most recall at
that precision). Difficult (image, class) pairs are left out, as in the metrics (docs/method.md#difficult-labels).
The thresholds are written to `<checkpoint stem>.thresholds.json` beside the checkpoint, with the checkpoint's
sha256, so that they are never applied to another model; Predictor, predict.py and the export read them from there.
The same file holds the temperatures (and, for `platt`, the biases) of `validate.py --calibrate` (udtimm.calibration)
under `calibration`: the thresholds stored with them were tuned on the calibrated scores.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from udtimm.calibration import ScoreCalibration, stored_calibration
from udtimm.checkpoint import CheckpointError
from udtimm.data.base import MultiLabelDataset
from udtimm.errors import ConfigError, shortened
from udtimm.io import atomic_write_text
from udtimm.metrics import evaluated_pairs, threshold_metrics
from udtimm.predictions import SUMMARY_ROWS, Predictions, class_table, format_table, per_class_metrics
from udtimm.provenance import file_sha256

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


def thresholds_path(checkpoint: str) -> str:
    """`<dir>/<stem>.thresholds.json` for `<dir>/<stem>.safetensors`."""
    return os.path.splitext(checkpoint)[0] + ".thresholds.json"


def thresholds_entries(class_names: Sequence[str], result: TunedThresholds, objective: ThresholdObjective,
                       split: str, num_images: int) -> dict:
    """The thresholds' part of the file beside the checkpoint (tuning_record)."""
    return {
        "objective": str(objective),
        "split": split,
        "num_images": num_images,
        "thresholds": dict(zip(class_names, result.values.tolist(), strict=True)),
        "untuned_classes": [name for name, tuned in zip(class_names, result.tuned.tolist(), strict=True)
                            if not tuned],
    }


def tuning_record(checkpoint: str, thresholds: dict | None = None, calibration: dict | None = None) -> dict:
    """What the file beside the checkpoint holds (and an export's config.json, under udtimm.thresholds): the
    checkpoint's name and sha256, the thresholds_entries when there are thresholds, and the temperatures' (and
    biases') udtimm.calibration.calibration_entry under `calibration` when there are some. Files written before
    calibration existed have no `calibration`."""
    record = {"checkpoint": os.path.basename(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
              **(thresholds or {})}
    if calibration is not None:
        record["calibration"] = calibration
    return record


def stored_thresholds_entries(record: dict) -> dict | None:
    """The thresholds' part of a stored record (tuning_record), None when it holds temperatures only."""
    if "thresholds" not in record:
        return None
    return {key: value for key, value in record.items()
            if key not in ("checkpoint", "checkpoint_sha256", "calibration")}


def tuning_tensors(record: dict | None, class_names: Sequence[str],
                   source: str) -> tuple[Tensor | None, ScoreCalibration | None]:
    """(per-class thresholds, calibration: temperatures and biases) of a stored record, each None when it has none;
    CheckpointError naming `source` when they do not fit the model's classes."""
    if record is None:
        return None, None
    values = thresholds_tensor(record, class_names, source) if "thresholds" in record else None
    calibration = record.get("calibration")
    return values, stored_calibration(calibration, class_names, source) if calibration is not None else None


def save_thresholds(checkpoint: str, record: dict) -> str:
    """Write the record beside the checkpoint (atomically); returns the path."""
    path = thresholds_path(checkpoint)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def read_thresholds_file(checkpoint: str, other_checkpoint_ok: bool = False) -> dict | None:
    """The record stored beside `checkpoint`, checked to belong to it; None when there is none (or, with
    `other_checkpoint_ok`, when it belongs to another checkpoint of that name and is about to be replaced)."""
    path = thresholds_path(checkpoint)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            record = json.load(handle)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read as a thresholds file: {err}") from err
    if record.get("checkpoint_sha256") != file_sha256(checkpoint):
        if other_checkpoint_ok:
            return None
        raise CheckpointError(f"{path} was tuned for another {os.path.basename(checkpoint)} (its sha256 differs): "
                              "run validate.py --tune-thresholds (or --calibrate) again, or delete the file")
    return record


def thresholds_tensor(record: dict, class_names: Sequence[str], source: str) -> Tensor:
    """The record's thresholds in class order, [C] float64; CheckpointError naming `source` if its classes differ."""
    stored = record.get("thresholds")
    if not isinstance(stored, dict) or list(stored) != list(class_names):
        found = list(stored) if isinstance(stored, dict) else stored
        raise CheckpointError(f"{source}: thresholds for classes {shortened(found)}, but the model has "
                              f"{shortened(list(class_names))}")
    numbers = [value for value in stored.values() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    if len(numbers) != len(stored):
        raise CheckpointError(f"{source}: thresholds must be numbers, got {shortened(list(stored.values()))}")
    values = torch.tensor([float(value) for value in numbers], dtype=torch.float64)
    if not ((values >= 0) & (values <= 1)).all():
        raise CheckpointError(f"{source}: thresholds must lie in [0, 1], got {shortened(values.tolist())}")
    return values


def check_held_out(tune_set: MultiLabelDataset, eval_set: MultiLabelDataset, test_split: str) -> None:
    """ConfigError unless the tuning split is neither the test split (`dataset:split` name) nor shares an image
    with the evaluated split: thresholds or temperatures fitted there would flatter the metrics they are reported
    with."""
    if tune_set.name == test_split:
        raise ConfigError(f"--tune-split: {tune_set.name} is the test split; thresholds and temperatures are fitted "
                          "on a held-out split (e.g. val), never on the test split")
    shared = {sample.path for sample in tune_set.samples} & {sample.path for sample in eval_set.samples}
    if shared:
        raise ConfigError(f"--tune-split: {tune_set.name} shares {len(shared)} image(s) with the evaluated split "
                          f"{eval_set.name} (e.g. {sorted(shared)[0]}); tune on a split held out from it")


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
