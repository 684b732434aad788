"""What validate.py tunes on a held-out split, kept beside the checkpoint: per-class thresholds (udtimm.thresholds)
and a calibration, temperatures and Platt's biases (udtimm.calibration), in one file and one format.

The file is `<checkpoint stem>.thresholds.json` (named before calibration existed; the name stays so that existing
files keep working). Its record (tuning_record) holds the checkpoint's name and sha256, so that it is never applied
to another model; the thresholds' entries (thresholds_entries) at its top level; the calibration's entry
(calibration_entry) under `calibration`, and thresholds stored with one were tuned on the calibrated scores. Files
written before calibration existed have no `calibration`; temperature entries, and those written before `platt`, no
biases. Predictor, predict.py, validate.py, udtimm.visualize and udtimm.export (whose config.json keeps the record
under udtimm.thresholds) read it here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from udtimm.calibration import FittedCalibration, ScoreCalibration
from udtimm.data.base import MultiLabelDataset
from udtimm.errors import CheckpointError, ConfigError, shortened
from udtimm.io import atomic_write_text
from udtimm.provenance import file_sha256
from udtimm.thresholds import ThresholdObjective, TunedThresholds


def tuning_path(checkpoint: str) -> str:
    """`<dir>/<stem>.thresholds.json` for `<dir>/<stem>.safetensors`."""
    return os.path.splitext(checkpoint)[0] + ".thresholds.json"


def check_held_out(tune_set: MultiLabelDataset, eval_set: MultiLabelDataset, test_split: str) -> None:
    """ConfigError unless the tuning split is neither the test split (`dataset:split` name) nor shares an image
    with the evaluated split: thresholds or temperatures fitted there would flatter the metrics they are reported
    with."""
    if tune_set.name == test_split:
        raise ConfigError(f"--tune-split: {tune_set.name} is the test split; thresholds and temperatures are fitted "
                          "on a held-out split (e.g. val), never on the test split")
    shared = set(tune_set.samples.paths()) & set(eval_set.samples.paths())
    if shared:
        raise ConfigError(f"--tune-split: {tune_set.name} shares {len(shared)} image(s) with the evaluated split "
                          f"{eval_set.name} (e.g. {sorted(shared)[0]}); tune on a split held out from it")


def thresholds_entries(class_names: Sequence[str], result: TunedThresholds, objective: ThresholdObjective,
                       split: str, num_images: int) -> dict:
    """The thresholds' part of the record (tuning_record)."""
    return {
        "objective": str(objective),
        "split": split,
        "num_images": num_images,
        "thresholds": dict(zip(class_names, result.values.tolist(), strict=True)),
        "untuned_classes": [name for name, tuned in zip(class_names, result.tuned.tolist(), strict=True)
                            if not tuned],
    }


def calibration_entry(class_names: Sequence[str], result: FittedCalibration, method: str, split: str,
                      num_images: int) -> dict:
    """What the record holds under `calibration` (tuning_record). Only `platt` writes biases: the temperature
    methods' entries stay as they were before it (read with zero biases)."""
    def by_class(values: Tensor) -> dict[str, float]:
        return dict(zip(class_names, values.tolist(), strict=True))

    with_biases = method == "platt"
    return {
        "method": method,
        "split": split,
        "num_images": num_images,
        "temperatures": by_class(result.calibration.temperatures),
        **({"biases": by_class(result.calibration.biases)} if with_biases else {}),
        "global_temperature": result.global_temperature,
        **({"global_bias": result.global_bias} if with_biases else {}),
        "unfitted_classes": [name for name, fitted in zip(class_names, result.fitted.tolist(), strict=True)
                             if not fitted] if method != "temperature" else [],
    }


def tuning_record(checkpoint: str, thresholds: dict | None = None, calibration: dict | None = None) -> dict:
    """What the file beside the checkpoint holds: the checkpoint's name and sha256, the thresholds_entries when there
    are thresholds, and the calibration_entry under `calibration` when there is one."""
    record = {"checkpoint": os.path.basename(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
              **(thresholds or {})}
    if calibration is not None:
        record["calibration"] = calibration
    return record


def stored_thresholds_entries(record: dict) -> dict | None:
    """The thresholds' part of a stored record, None when it holds a calibration only."""
    if "thresholds" not in record:
        return None
    return {key: value for key, value in record.items()
            if key not in ("checkpoint", "checkpoint_sha256", "calibration")}


def save_tuning(checkpoint: str, record: dict) -> str:
    """Write the record beside the checkpoint (atomically); returns the path."""
    path = tuning_path(checkpoint)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def read_tuning(checkpoint: str, other_checkpoint_ok: bool = False) -> dict | None:
    """The record stored beside `checkpoint`, checked to belong to it; None when there is none (or, with
    `other_checkpoint_ok`, when it belongs to another checkpoint of that name and is about to be replaced)."""
    path = tuning_path(checkpoint)
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


def _stored_by_class(entry: dict, key: str, class_names: Sequence[str], source: str) -> Tensor:
    """entry[key], numbers by class name, in class order, [C] float64; CheckpointError naming `source` if its classes
    are not the model's or a value is not a number."""
    stored = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(stored, dict) or list(stored) != list(class_names):
        found = list(stored) if isinstance(stored, dict) else stored
        raise CheckpointError(f"{source}: {key} for classes {shortened(found)}, but the model has "
                              f"{shortened(list(class_names))}")
    values = list(stored.values())
    # bool is an int to Python, but true is no threshold or temperature.
    if not all(isinstance(value, int | float) and not isinstance(value, bool) for value in values):
        raise CheckpointError(f"{source}: {key} must be numbers, got {shortened(values)}")
    return torch.tensor([float(value) for value in values], dtype=torch.float64)


def thresholds_tensor(record: dict, class_names: Sequence[str], source: str) -> Tensor:
    """The record's thresholds in class order, [C] float64; CheckpointError naming `source` if its classes differ
    from the model's or a threshold is not a number in [0, 1]."""
    values = _stored_by_class(record, "thresholds", class_names, source)
    if not ((values >= 0) & (values <= 1)).all():
        raise CheckpointError(f"{source}: thresholds must lie in [0, 1], got {shortened(values.tolist())}")
    return values


def stored_calibration(entry: dict, class_names: Sequence[str], source: str) -> ScoreCalibration:
    """The entry's temperatures and biases in class order (zero biases when it has none: the temperature methods,
    and files written before `platt`); CheckpointError naming `source` if their classes differ from the model's,
    a temperature is not positive and finite, or a bias is not finite."""
    temperatures = _stored_by_class(entry, "temperatures", class_names, source)
    if not (temperatures.isfinite() & (temperatures > 0)).all():
        raise CheckpointError(f"{source}: temperatures must be positive and finite, got "
                              f"{shortened(temperatures.tolist())}")
    if "biases" not in entry:
        return ScoreCalibration.of_temperatures(temperatures)
    biases = _stored_by_class(entry, "biases", class_names, source)
    if not biases.isfinite().all():
        raise CheckpointError(f"{source}: biases must be finite, got {shortened(biases.tolist())}")
    return ScoreCalibration(temperatures, biases)


def tuning_tensors(record: dict | None, class_names: Sequence[str],
                   source: str) -> tuple[Tensor | None, ScoreCalibration | None]:
    """(per-class thresholds, calibration: temperatures and biases) of a stored record, each None when it has none;
    CheckpointError naming `source` when they do not fit the model's classes."""
    if record is None:
        return None, None
    values = thresholds_tensor(record, class_names, source) if "thresholds" in record else None
    calibration = record.get("calibration")
    return values, stored_calibration(calibration, class_names, source) if calibration is not None else None
