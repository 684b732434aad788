"""validate.py's tuning: thresholds and post-hoc calibrations fitted on a held-out split, stored
beside the checkpoint, and never on the images trained on, tested on or evaluated."""

import csv
import json
import os
import shutil

import pytest
import torch
from conftest import TINY_DIGITS, data_flags, model_labelled_csv, tiny_train_args
from test_validate import assert_same_metrics, reference_predictions, tuning_run

import train
import validate
from udtimm import Predictor
from udtimm.calibration import CALIBRATION_METRICS, CalibrationError, calibrate_predictions, fit_calibration
from udtimm.config import ConfigError
from udtimm.data import build_dataset
from udtimm.data.base import hold_out
from udtimm.metrics import compute_metrics, threshold_metrics
from udtimm.thresholds import ThresholdObjective, tune_thresholds
from udtimm.tuning import tuning_path


def test_thresholds_are_tuned_on_val_stored_and_read_back(best: str, tiny_digits: str, tmp_path,
                                                          single_process: dict[str, float], capsys) -> None:
    checkpoint_copy, found = tuning_run(best, tiny_digits, tmp_path)
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "best.thresholds.json").read_text())
    assert record["split"] == "digits:val" and record["objective"] == "f1"
    val_set, val_predictions = reference_predictions(best, tiny_digits, "val")
    assert record["num_images"] == len(val_set) == TINY_DIGITS["num_test"] // 2
    on_val = tune_thresholds(val_predictions.scores, val_predictions.target, val_predictions.difficult,
                             ThresholdObjective("f1"))
    assert list(record["thresholds"].values()) == on_val.values.tolist()
    test_set, test_predictions = reference_predictions(best, tiny_digits)
    on_test = tune_thresholds(test_predictions.scores, test_predictions.target, test_predictions.difficult,
                              ThresholdObjective("f1"))
    assert not torch.equal(on_test.values, on_val.values)  # the split they were chosen on matters
    # The metrics of the test split: unchanged, and CP..OF1 with the tuned thresholds beside them.
    assert_same_metrics(found, single_process)
    expected = threshold_metrics(test_predictions.scores, test_predictions.target, test_predictions.difficult,
                                 on_val.values)
    assert {name: found[f"{name}_tuned"] for name in expected} == pytest.approx(expected, abs=1e-6)
    assert "thresholds for f1 on digits:val" in printed and "per-class thresholds (%)" in printed
    assert Predictor.from_checkpoint(checkpoint_copy).thresholds.tolist() == on_val.values.tolist()
    # Stored thresholds are read back by a later evaluation.
    again = validate.main(["--checkpoint", checkpoint_copy, *data_flags(tiny_digits)])
    assert again["cf1_tuned"] == found["cf1_tuned"]


@pytest.mark.parametrize("tuning", [("--tune-thresholds", "precision@0.9"), ("--calibrate", "temperature")])
def test_nothing_is_tuned_on_the_test_or_evaluated_split(tuning: tuple[str, str], best: str, tiny_digits: str,
                                                         tmp_path) -> None:
    checkpoint_copy = str(tmp_path / "best.safetensors")
    shutil.copy(best, checkpoint_copy)
    flags = ["--checkpoint", checkpoint_copy, *data_flags(tiny_digits), *tuning]
    with pytest.raises(ConfigError, match="digits:test is the test split"):
        validate.main([*flags, "--tune-split", "test"])
    with pytest.raises(ConfigError, match="digits:val shares 20 image"):
        validate.main([*flags, "--split", "val"])
    assert os.listdir(tmp_path) == ["best.safetensors"]
    with pytest.raises(ConfigError, match="--tune-thresholds 'f2'"):
        validate.main([*flags, "--tune-thresholds", "f2"])
    with pytest.raises(SystemExit):  # argparse's choices
        validate.parse_args([*flags, "--calibrate", "isotonic"])


@pytest.mark.slow
def test_calibration_is_fitted_on_val_stored_reported_and_kept_by_later_tuning(best: str, tiny_digits: str, tmp_path,
                                                                               single_process: dict[str, float],
                                                                               capsys) -> None:
    checkpoint_copy = str(tmp_path / "best.safetensors")
    shutil.copy(best, checkpoint_copy)
    results, plots = str(tmp_path / "r.csv"), str(tmp_path / "plots")
    flags = ["--checkpoint", checkpoint_copy, *data_flags(tiny_digits)]
    found = validate.main([*flags, "--calibrate", "per-class", "--results-file", results, "--plots", plots])
    printed = capsys.readouterr().out
    val_set, val_predictions = reference_predictions(best, tiny_digits, "val")
    fitted = fit_calibration(val_predictions.logits, val_predictions.target, val_predictions.difficult, "per-class")
    record = json.loads((tmp_path / "best.thresholds.json").read_text())
    assert "thresholds" not in record and record["calibration"]["split"] == "digits:val"
    assert list(record["calibration"]["temperatures"].values()) == pytest.approx(
        fitted.calibration.temperatures.tolist(), rel=1e-6)
    # The metrics of test are those of the calibrated scores; before, the plain ones; the ranking (mAP) stays.
    _, test_predictions = reference_predictions(best, tiny_digits)
    calibrated = calibrate_predictions(test_predictions, fitted.calibration)
    expected = compute_metrics(calibrated.scores, calibrated.target, calibrated.difficult)
    assert_same_metrics(found, expected, ("ece", "ece_pooled", "brier", "map", "cf1", "of1"))
    assert found["map"] == pytest.approx(single_process["map"], abs=1e-9)
    for name in CALIBRATION_METRICS:
        assert found[f"{name}_uncalibrated"] == pytest.approx(single_process[name], abs=1e-6)
    assert "per-class temperatures fitted on digits:val (20 images)" in printed and "uncalibrated (%)" in printed
    with open(results, newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert row["calibration"] == "per-class temperatures fitted on digits:val"
    assert float(row["ece"]) == pytest.approx(found["ece"]) and "brier_uncalibrated" in row
    assert os.path.isfile(os.path.join(plots, "reliability.png"))
    # A later evaluation applies the stored temperatures; thresholds tuned later are chosen on calibrated scores
    # and keep the temperatures beside them.
    assert validate.main(flags)["ece"] == pytest.approx(found["ece"], abs=1e-9)
    validate.main([*flags, "--tune-thresholds", "f1"])
    record = json.loads((tmp_path / "best.thresholds.json").read_text())
    on_calibrated = tune_thresholds(*(calibrate_predictions(val_predictions, fitted.calibration).scores,
                                      val_predictions.target, val_predictions.difficult), ThresholdObjective("f1"))
    assert list(record["thresholds"].values()) == pytest.approx(on_calibrated.values.tolist(), abs=1e-6)
    assert record["calibration"]["method"] == "per-class"
    assert "thresholds for f1 on digits:val (20 images, calibrated scores)" in capsys.readouterr().out
    # Calibrating again drops thresholds chosen on other scores, and says so.
    validate.main([*flags, "--calibrate", "temperature"])
    record = json.loads((tmp_path / "best.thresholds.json").read_text())
    assert "thresholds" not in record and len(set(record["calibration"]["temperatures"].values())) == 1
    assert "are dropped" in capsys.readouterr().out


@pytest.mark.slow
def test_platt_scaling_is_fitted_on_val_stored_printed_and_applied_as_predictor_does(best: str, tiny_digits: str,
                                                                                    tmp_path, capsys) -> None:
    checkpoint_copy = str(tmp_path / "best.safetensors")
    shutil.copy(best, checkpoint_copy)
    # With the digits labels the tiny model ranks the val images backwards, even pooled: refused, nothing stored.
    with pytest.raises(CalibrationError, match="--tune-split digits:val: no Platt scaling can be fitted there"):
        validate.main(["--checkpoint", checkpoint_copy, *data_flags(tiny_digits), "--calibrate", "platt"])
    assert os.listdir(tmp_path) == ["best.safetensors"]
    folder = tmp_path / "csv"
    folder.mkdir()
    flags = ["--checkpoint", checkpoint_copy, *model_labelled_csv(best, tiny_digits, str(folder))]
    results = str(tmp_path / "r.csv")
    found = validate.main([*flags, "--calibrate", "platt", "--results-file", results])
    printed = capsys.readouterr().out
    entry = json.loads((tmp_path / "best.thresholds.json").read_text())["calibration"]
    assert (entry["method"], entry["split"]) == ("platt", "csv:val")
    assert list(entry["biases"]) == list(entry["temperatures"])
    # The printed table: each class's temperature and bias.
    table = printed.split("platt temperatures and biases fitted on csv:val (20 images):\n")[1].splitlines()
    assert table[0].split()[:3] == ["class", "temperature", "bias"]
    name, temperature, bias = table[2].split()[:3]
    assert float(temperature) == pytest.approx(entry["temperatures"][name], abs=1e-4)
    assert float(bias) == pytest.approx(entry["biases"][name], abs=1e-4)
    # Predictor applies the stored temperatures and biases as validate.py did; the ranking (mAP) stays.
    test_set = build_dataset("csv", str(folder), "test")
    samples, (target, difficult) = test_set.samples, test_set.dense_labels()
    calibrated, plain = (Predictor.from_checkpoint(checkpoint_copy, stored_tuning=stored) for stored in (True, False))
    assert calibrated.calibration.biases.abs().max() > 0.1
    scores, raw = (torch.tensor(predictor.predict([sample.path for sample in samples])[
        predictor.class_names].to_numpy()) for predictor in (calibrated, plain))
    assert_same_metrics(found, compute_metrics(scores, target, difficult), ("ece", "ece_pooled", "brier", "map", "cf1"))
    uncalibrated = compute_metrics(raw, target, difficult)
    assert found["map"] == pytest.approx(uncalibrated["map"], abs=1e-9)
    assert found["ece_uncalibrated"] == pytest.approx(uncalibrated["ece"], abs=1e-6)
    with open(results, newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert row["calibration"] == "platt temperatures and biases fitted on csv:val"


@pytest.mark.slow
def test_tuning_defaults_to_the_images_that_chose_the_checkpoint_and_refuses_training_images(
        best: str, tiny_digits: str, tmp_path) -> None:
    checkpoint_copy = str(tmp_path / "best.safetensors")
    shutil.copy(best, checkpoint_copy)
    flags = ["--checkpoint", checkpoint_copy, *data_flags(tiny_digits), "--calibrate", "temperature"]
    with pytest.raises(ConfigError, match=r"--tune-split train shares \d+ image\(s\) with the images the checkpoint "
                                          r"was trained on \(train\).*--tune-split val, which chose"):
        validate.main([*flags, "--tune-split", "train"])
    with pytest.raises(ConfigError, match="--tune-split holdout: its run held no images out"):
        validate.main([*flags, "--tune-split", "holdout"])
    # A run that chose on a part of its training split held out: validate.py draws the same part again.
    train.main(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "held", "--epochs", "1", "--val-split",
                               "holdout", "--holdout-fraction", "0.25", "--holdout-seed", "3"))
    held = str(tmp_path / "held" / "best.safetensors")
    validate.main(["--checkpoint", held, *data_flags(tiny_digits), "--calibrate", "temperature"])
    record = json.loads(open(tuning_path(held)).read())
    held_out = hold_out(build_dataset("digits", tiny_digits, "train", **TINY_DIGITS), 0.25, 3)[1]
    assert record["calibration"]["split"] == held_out.name == "digits:trainval holdout"
    assert record["calibration"]["num_images"] == len(held_out)


# The metrics --eval-memory binned approximates; the others equal the exact path's.
