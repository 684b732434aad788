"""udtimm.tuning: the file beside the checkpoint with the thresholds of udtimm.thresholds and the calibration of
udtimm.calibration; its round trip, what it refuses, and a file in the format earlier versions wrote, read back and
written again byte for byte."""

import json
import os

import pytest
import torch
from conftest import OPENIMAGES_CLASSES
from test_calibration import platt_synthetic
from test_thresholds import CLASSES, make_data

from udtimm import tuning
from udtimm.calibration import FittedCalibration, ScoreCalibration, fit_calibration
from udtimm.checkpoint import CheckpointError
from udtimm.thresholds import ThresholdObjective, TunedThresholds, tune_thresholds

# best.thresholds.json as validate.py --calibrate platt --tune-thresholds f1 wrote it before udtimm.tuning existed,
# for a best.safetensors holding b"weights".
EXISTING_FILE = """{
  "checkpoint": "best.safetensors",
  "checkpoint_sha256": "9a129038d9a00aed0cf6a7ea059ca50a813449061ab87848cf1a13eafdf33b2c",
  "objective": "f1",
  "split": "digits:val",
  "num_images": 90,
  "thresholds": {
    "a": 0.425,
    "b": 0.5,
    "c": 0.0625
  },
  "untuned_classes": [
    "b"
  ],
  "calibration": {
    "method": "platt",
    "split": "digits:val",
    "num_images": 90,
    "temperatures": {
      "a": 0.5,
      "b": 1.25,
      "c": 2.0
    },
    "biases": {
      "a": -2.5,
      "b": 0.125,
      "c": -0.2
    },
    "global_temperature": 2.0,
    "global_bias": -0.2,
    "unfitted_classes": [
      "c"
    ]
  }
}
"""


def test_a_file_in_the_existing_format_is_read_and_written_the_same(tmp_path) -> None:
    checkpoint = tmp_path / "best.safetensors"
    checkpoint.write_bytes(b"weights")
    (tmp_path / "best.thresholds.json").write_text(EXISTING_FILE)
    names, path = ["a", "b", "c"], str(tmp_path / "best.thresholds.json")
    values, stored = tuning.tuning_tensors(tuning.read_tuning(str(checkpoint)), names, path)
    assert values.tolist() == [0.425, 0.5, 0.0625]
    assert stored.temperatures.tolist() == [0.5, 1.25, 2.0] and stored.biases.tolist() == [-2.5, 0.125, -0.2]
    # The same thresholds and calibration, written now, give the same file.
    thresholds = TunedThresholds(values, torch.tensor([True, False, True]), torch.tensor([True, False, True]))
    fitted = FittedCalibration(stored, torch.tensor([True, True, False]), 2.0, -0.2)
    record = tuning.tuning_record(str(checkpoint), tuning.thresholds_entries(
        names, thresholds, ThresholdObjective("f1"), "digits:val", 90),
        tuning.calibration_entry(names, fitted, "platt", "digits:val", 90))
    checkpoint.with_suffix(".thresholds.json").unlink()
    assert tuning.save_tuning(str(checkpoint), record) == path
    assert (tmp_path / "best.thresholds.json").read_text() == EXISTING_FILE


def test_file_round_trip_belongs_to_its_checkpoint(tmp_path) -> None:
    checkpoint = tmp_path / "best.safetensors"
    checkpoint.write_bytes(b"weights")
    scores, target, difficult = make_data(seed=5)
    result = tune_thresholds(scores, target, difficult, ThresholdObjective("f1"))
    record = tuning.tuning_record(str(checkpoint), tuning.thresholds_entries(
        CLASSES, result, ThresholdObjective("f1"), "digits:val", 90))
    path = tuning.save_tuning(str(checkpoint), record)
    assert path == str(tmp_path / "best.thresholds.json") == tuning.tuning_path(str(checkpoint))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "best.thresholds.json"]
    loaded = tuning.read_tuning(str(checkpoint))
    assert loaded["split"] == "digits:val" and loaded["objective"] == "f1"
    assert torch.equal(tuning.thresholds_tensor(loaded, CLASSES, path), result.values)
    assert tuning.read_tuning(str(tmp_path / "other.safetensors")) is None

    with pytest.raises(CheckpointError, match=r"best.thresholds.json: thresholds for classes .*'e'\]"):
        tuning.thresholds_tensor(loaded, [*CLASSES[:-1], "z"], path)
    checkpoint.write_bytes(b"retrained weights")
    with pytest.raises(CheckpointError, match="best.thresholds.json was tuned for another best.safetensors"):
        tuning.read_tuning(str(checkpoint))
    (tmp_path / "best.thresholds.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read as a thresholds file"):
        tuning.read_tuning(str(checkpoint))
    with pytest.raises(CheckpointError, match=r"must lie in \[0, 1\]"):
        tuning.thresholds_tensor(json.loads('{"thresholds": {"a": 1.5}}'), ["a"], "x.json")


def test_temperatures_share_the_file_with_the_thresholds(tmp_path) -> None:
    checkpoint = tmp_path / "best.safetensors"
    checkpoint.write_bytes(b"weights")
    scores, target, difficult = make_data(seed=6)
    result = tune_thresholds(scores, target, difficult, ThresholdObjective("f1"))
    entries = tuning.thresholds_entries(CLASSES, result, ThresholdObjective("f1"), "digits:val", 90)
    temperatures = torch.tensor([0.5, 1.25, 2.0, 3.5, 1.0], dtype=torch.float64)
    fitted = FittedCalibration(ScoreCalibration.of_temperatures(temperatures),
                               torch.tensor([True, True, True, True, False]), 1.0)
    calibration = tuning.calibration_entry(CLASSES, fitted, "per-class", "digits:val", 90)
    path = tuning.save_tuning(str(checkpoint), tuning.tuning_record(str(checkpoint), entries, calibration))
    loaded = tuning.read_tuning(str(checkpoint))
    assert loaded["calibration"] == calibration and loaded["calibration"]["unfitted_classes"] == ["e"]
    assert tuning.stored_thresholds_entries(loaded) == entries
    values, stored = tuning.tuning_tensors(loaded, CLASSES, path)
    assert torch.equal(values, result.values) and torch.equal(stored.temperatures, temperatures)
    # The temperature methods' format, as files written before platt: no biases.
    assert not {"biases", "global_bias"} & set(loaded["calibration"]) and not stored.biases.any()
    # `temperature` fits no class apart: it names none unfitted.
    assert tuning.calibration_entry(CLASSES, fitted, "temperature", "digits:val", 90)["unfitted_classes"] == []
    # Temperatures alone, and a file written before calibration existed (no `calibration`), read back too.
    alone = tuning.tuning_record(str(checkpoint), calibration=calibration)
    assert tuning.stored_thresholds_entries(alone) is None
    assert tuning.tuning_tensors(alone, CLASSES, path)[0] is None
    old = {key: value for key, value in loaded.items() if key != "calibration"}
    assert tuning.tuning_tensors(old, CLASSES, path)[1] is None
    assert tuning.tuning_tensors(None, CLASSES, path) == (None, None)
    with pytest.raises(CheckpointError, match="best.thresholds.json: temperatures for classes"):
        tuning.tuning_tensors(alone, CLASSES[::-1], path)
    # A file of another checkpoint of that name is refused, unless it is about to be replaced.
    checkpoint.write_bytes(b"retrained weights")
    assert tuning.read_tuning(str(checkpoint), other_checkpoint_ok=True) is None
    with pytest.raises(CheckpointError, match=r"--tune-thresholds \(or --calibrate\) again"):
        tuning.read_tuning(str(checkpoint))


def test_platt_biases_share_the_file_and_are_checked(tmp_path) -> None:
    checkpoint = tmp_path / "best.safetensors"
    checkpoint.write_bytes(b"weights")
    temperatures = torch.tensor([0.5, 1.25, 2.0, 3.5, 0.8], dtype=torch.float64)
    biases = torch.tensor([-2.5, 0.125, 1.0, -0.75, -0.2], dtype=torch.float64)
    fitted = FittedCalibration(ScoreCalibration(temperatures, biases), torch.tensor([True] * 4 + [False]), 0.8, -0.2)
    entry = tuning.calibration_entry(CLASSES, fitted, "platt", "digits:val", 90)
    path = tuning.save_tuning(str(checkpoint), tuning.tuning_record(str(checkpoint), calibration=entry))
    loaded = tuning.read_tuning(str(checkpoint))
    assert loaded["calibration"]["biases"] == dict(zip(CLASSES, biases.tolist(), strict=True))
    assert (loaded["calibration"]["global_bias"], loaded["calibration"]["unfitted_classes"]) == (-0.2, ["e"])
    values, stored = tuning.tuning_tensors(loaded, CLASSES, path)
    assert values is None and torch.equal(stored.temperatures, temperatures) and torch.equal(stored.biases, biases)
    loaded["calibration"]["biases"]["c"] = float("inf")
    with pytest.raises(CheckpointError, match="best.thresholds.json: biases must be finite"):
        tuning.tuning_tensors(loaded, CLASSES, path)
    del loaded["calibration"]["biases"]["c"]
    with pytest.raises(CheckpointError, match="best.thresholds.json: biases for classes"):
        tuning.tuning_tensors(loaded, CLASSES, path)


def test_stored_values_that_are_not_numbers_are_refused_naming_the_file() -> None:
    with pytest.raises(CheckpointError, match=r"t.json: thresholds must be numbers, got \[0.5, 'high'\]"):
        tuning.thresholds_tensor({"thresholds": {"a": 0.5, "b": "high"}}, ["a", "b"], "t.json")
    # JSON's true is an int to Python, and "0.5" a float to float(): neither is a number of the file.
    for bad in (True, "0.5", None):
        with pytest.raises(CheckpointError, match="t.json: thresholds must be numbers"):
            tuning.thresholds_tensor({"thresholds": {"a": bad}}, ["a"], "t.json")
        with pytest.raises(CheckpointError, match="t.json: temperatures must be numbers"):
            tuning.stored_calibration({"temperatures": {"a": bad}}, ["a"], "t.json")


def test_stored_temperatures_are_checked_against_the_classes() -> None:
    entry = {"temperatures": {"a": 1.5, "b": 0.5}}
    stored = tuning.stored_calibration(entry, ["a", "b"], "x.json")
    assert stored.temperatures.tolist() == [1.5, 0.5] and stored.biases.tolist() == [0.0, 0.0]
    with pytest.raises(CheckpointError, match=r"x.json: temperatures for classes \['a', 'b'\].*\['b', 'a'\]"):
        tuning.stored_calibration(entry, ["b", "a"], "x.json")
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(CheckpointError, match="positive and finite"):
            tuning.stored_calibration({"temperatures": {"a": bad}}, ["a"], "x.json")


def test_platt_entries_keep_the_biases_checked_like_the_temperatures() -> None:
    logits, target, difficult = platt_synthetic(seed=3, n=500)
    result = fit_calibration(logits, target, difficult, "platt")
    entry = json.loads(json.dumps(tuning.calibration_entry(list("abcde"), result, "platt", "digits:val", 500)))
    assert list(entry) == ["method", "split", "num_images", "temperatures", "biases", "global_temperature",
                           "global_bias", "unfitted_classes"]
    stored = tuning.stored_calibration(entry, list("abcde"), "x.json")
    assert torch.equal(stored.temperatures, result.calibration.temperatures)
    assert torch.equal(stored.biases, result.calibration.biases)
    temperatures = {"a": 1.0, "b": 2.0}
    with pytest.raises(CheckpointError, match=r"x.json: biases for classes \['b', 'a'\].*\['a', 'b'\]"):
        tuning.stored_calibration({"temperatures": temperatures, "biases": {"b": 0.0, "a": 0.0}}, ["a", "b"],
                                  "x.json")
    for bad, message in ((float("inf"), "biases must be finite"), (float("nan"), "biases must be finite"),
                         (None, "biases must be numbers"), ("high", "biases must be numbers")):
        with pytest.raises(CheckpointError, match=f"x.json: {message}"):
            tuning.stored_calibration({"temperatures": temperatures, "biases": {"a": bad, "b": 0.0}}, ["a", "b"],
                                      "x.json")


def test_ten_thousand_classes_are_stored_read_back_and_refused_in_one_short_line(tmp_path) -> None:
    checkpoint = tmp_path / "best.safetensors"
    checkpoint.write_bytes(b"weights")
    names = [f"class{index:05d}" for index in range(OPENIMAGES_CLASSES)]
    g = torch.Generator().manual_seed(7)
    values = torch.rand(len(names), generator=g, dtype=torch.float64)
    tuned = torch.rand(len(names), generator=g) < 0.9
    calibration = ScoreCalibration(torch.rand(len(names), generator=g, dtype=torch.float64) + 0.5,
                                   torch.randn(len(names), generator=g, dtype=torch.float64))
    record = tuning.tuning_record(str(checkpoint), tuning.thresholds_entries(
        names, TunedThresholds(values, tuned, tuned), ThresholdObjective("f1"), "openimages:val", 60),
        tuning.calibration_entry(names, FittedCalibration(calibration, tuned, 1.0, 0.0), "platt", "openimages:val",
                                 60))
    path = tuning.save_tuning(str(checkpoint), record)
    assert os.path.getsize(path) < 3_000_000  # one JSON entry per class and value
    loaded = tuning.read_tuning(str(checkpoint))
    assert len(loaded["untuned_classes"]) == len(loaded["calibration"]["unfitted_classes"]) == int((~tuned).sum())
    stored_values, stored = tuning.tuning_tensors(loaded, names, path)
    assert torch.equal(stored_values, values) and torch.equal(stored.temperatures, calibration.temperatures)
    assert torch.equal(stored.biases, calibration.biases)
    # A file of other classes, or of values out of range, is refused in one short line, not 10,000 class names.
    refusals = ((tuning.thresholds_tensor, loaded, [*names[:-1], "other"]),
                (tuning.thresholds_tensor, {"thresholds": dict.fromkeys(names, 1.5)}, names),
                (tuning.stored_calibration, loaded["calibration"], names[::-1]))
    for read, bad_file, bad_names in refusals:
        with pytest.raises(CheckpointError) as refused:
            read(bad_file, bad_names, path)
        assert len(str(refused.value)) < 500 and "... 9,990 more]" in str(refused.value)
