"""udtimm.calibration: the temperatures against scipy's bounded minimiser of an independently written BCE, the
classes without a minimum of their own, difficult pairs left out, mAP unchanged, the before/after table."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from sklearn.metrics import brier_score_loss, log_loss

from udtimm import calibration, metrics
from udtimm.calibration import CalibrationError, calibrated_scores, fit_temperatures
from udtimm.checkpoint import CheckpointError
from udtimm.config import ConfigError
from udtimm.predictions import Predictions

TRUE_TEMPERATURES = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)


def synthetic(seed: int, n: int = 3000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits whose calibrated probabilities are sigmoid(logits / TRUE_TEMPERATURES): labels drawn from those."""
    g = torch.Generator().manual_seed(seed)
    calibrated_logits = 2.5 * torch.randn(n, len(TRUE_TEMPERATURES), generator=g, dtype=torch.float64) - 0.5
    target = (torch.rand(calibrated_logits.shape, generator=g, dtype=torch.float64) < calibrated_logits.sigmoid())
    difficult = torch.rand(calibrated_logits.shape, generator=g) < 0.05
    return (calibrated_logits * TRUE_TEMPERATURES).float(), target.float(), difficult


def scipy_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The BCE-minimising temperature, written apart from udtimm: sklearn's log loss, scipy's bounded search."""
    def loss(log_t: float) -> float:
        probs = 1 / (1 + np.exp(-logits / np.exp(log_t)))
        return log_loss(labels, probs, labels=[0, 1])

    found = minimize_scalar(loss, bounds=(np.log(calibration.T_MIN), np.log(calibration.T_MAX)), method="bounded",
                            options={"xatol": 1e-10})
    return float(np.exp(found.x))


def test_per_class_temperatures_match_scipy_and_recover_the_true_ones() -> None:
    logits, target, difficult = synthetic(seed=0)
    result = fit_temperatures(logits, target, difficult, "per-class")
    assert result.fitted.all() and result.values.dtype == torch.float64
    z, y, keep = logits.double().numpy(), target.numpy(), ~difficult.numpy()
    for c in range(logits.shape[1]):
        expected = scipy_temperature(z[keep[:, c], c], y[keep[:, c], c])
        # Both minimise the same smooth function to ~1e-9 in log T; float64 sums agree far beyond 1e-6.
        assert result.values[c].item() == pytest.approx(expected, rel=1e-6), c
    # 3000 draws per class: the fit lands within a few percent of the temperature the labels were drawn with.
    torch.testing.assert_close(result.values, TRUE_TEMPERATURES, rtol=0.1, atol=0)
    pooled = scipy_temperature(z[keep], y[keep])
    assert result.global_value == pytest.approx(pooled, rel=1e-6)


def test_one_temperature_for_all_classes_is_the_pooled_fit() -> None:
    logits, target, difficult = synthetic(seed=1)
    result = fit_temperatures(logits, target, difficult, "temperature")
    keep = ~difficult.numpy()
    expected = scipy_temperature(logits.double().numpy()[keep], target.numpy()[keep])
    assert result.values.tolist() == [result.global_value] * 4
    assert result.global_value == pytest.approx(expected, rel=1e-6)
    assert not result.fitted.any()


def test_difficult_pairs_are_left_out_of_the_fit() -> None:
    logits, target, difficult = synthetic(seed=2)
    result = fit_temperatures(logits, target, difficult, "per-class")
    # Whatever a difficult pair's logit and label, the temperatures do not move.
    scrambled = torch.where(difficult, torch.full_like(logits, 50.0), logits)
    flipped = torch.where(difficult, 1 - target, target)
    again = fit_temperatures(scrambled, flipped, difficult, "per-class")
    assert torch.equal(again.values, result.values)
    assert not torch.equal(fit_temperatures(scrambled, flipped, torch.zeros_like(difficult), "per-class").values,
                           result.values)


def test_a_class_without_a_minimum_of_its_own_gets_the_global_temperature() -> None:
    logits, target, difficult = synthetic(seed=3)
    target[:, 0] = 0  # no positive
    target[:, 1] = 1  # no negative
    target[:, 2] = (logits[:, 2] > 0).float()  # every pair on the right side of 0: BCE falls as T -> 0
    difficult[:, 3] = True  # no pair left at all
    result = fit_temperatures(logits, target, difficult, "per-class")
    assert result.fitted.tolist() == [False] * 4
    assert result.values.tolist() == [result.global_value] * 4
    assert calibration.T_MIN < result.global_value < calibration.T_MAX
    entry = calibration.calibration_entry(list("abcd"), result, "per-class", "digits:val", 3000)
    assert entry["unfitted_classes"] == list("abcd") and entry["temperatures"]["a"] == result.global_value


def test_a_split_where_no_temperature_fits_is_refused_naming_it() -> None:
    logits, target, difficult = synthetic(seed=4, n=50)
    with pytest.raises(CalibrationError, match="--tune-split digits:val: no temperature can be fitted"):
        fit_temperatures(logits, (logits > 0).float(), difficult, "per-class", "digits:val")
    with pytest.raises(CalibrationError, match="no temperature"):
        fit_temperatures(logits, torch.zeros_like(target), difficult, "temperature")
    with pytest.raises(ConfigError, match="--calibrate 'platt'"):
        fit_temperatures(logits, target, difficult, "platt")


def test_a_per_class_temperature_leaves_every_ap_and_the_map_unchanged() -> None:
    logits, target, difficult = synthetic(seed=5, n=400)
    temperatures = torch.tensor([0.3, 1.7, 5.0, 0.9], dtype=torch.float64)
    before = metrics.per_class_average_precision(torch.sigmoid(logits), target, difficult)
    after = metrics.per_class_average_precision(calibrated_scores(logits, temperatures), target, difficult)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)
    assert metrics.mean_average_precision(calibrated_scores(logits, temperatures), target, difficult) == \
        pytest.approx(metrics.mean_average_precision(torch.sigmoid(logits), target, difficult), abs=1e-10)
    # ... while the calibration metrics do move.
    assert metrics.brier_score(calibrated_scores(logits, temperatures), target, difficult) != \
        pytest.approx(metrics.brier_score(torch.sigmoid(logits), target, difficult), abs=1e-3)


def test_calibrated_predictions_and_the_before_after_table() -> None:
    logits, target, difficult = synthetic(seed=6, n=500)
    raw = Predictions(torch.sigmoid(logits), target, difficult, torch.arange(len(logits)), logits)
    result = fit_temperatures(logits, target, difficult, "per-class")
    calibrated = calibration.calibrate_predictions(raw, result.values)
    assert torch.equal(calibrated.logits, logits) and calibrated.scores.dtype == torch.float32
    torch.testing.assert_close(calibrated.scores, torch.sigmoid(logits.double() / result.values).float(),
                               rtol=0, atol=1e-6)
    table, before = calibration.compare(raw, calibrated)
    keep = ~difficult.numpy()
    sklearn_brier = brier_score_loss(target.numpy()[keep], raw.scores.double().numpy()[keep])
    assert before["brier_uncalibrated"] == pytest.approx(100 * sklearn_brier, rel=1e-9)
    assert before["ece_uncalibrated"] == pytest.approx(metrics.expected_calibration_error(raw.scores, target,
                                                                                          difficult))
    after = calibration.calibration_metrics(calibrated.scores, target, difficult)
    assert f"{after['ece']:.2f}" in table.splitlines()[2] and f"{before['ece_uncalibrated']:.2f}" in table
    # The temperatures were drawn at 0.5 .. 4: fitting them lowers the held-out ECE and Brier.
    assert after["ece"] < before["ece_uncalibrated"] and after["brier"] < before["brier_uncalibrated"]
    summary = calibration.summary_table(raw, list("abcd"), result, "per-class").splitlines()
    for line in summary[2:]:
        _, _, bce_before, bce_after = line.split()[:4]
        assert float(bce_after) <= float(bce_before)
    with pytest.raises(ValueError, match="needs their logits"):
        calibration.calibrate_predictions(Predictions(raw.scores, target, difficult, raw.indices), result.values)


def test_stored_temperatures_are_checked_against_the_classes() -> None:
    entry = {"temperatures": {"a": 1.5, "b": 0.5}}
    assert calibration.temperatures_tensor(entry, ["a", "b"], "x.json").tolist() == [1.5, 0.5]
    with pytest.raises(CheckpointError, match=r"x.json: temperatures for classes \['a', 'b'\].*\['b', 'a'\]"):
        calibration.temperatures_tensor(entry, ["b", "a"], "x.json")
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(CheckpointError, match="positive and finite"):
            calibration.temperatures_tensor({"temperatures": {"a": bad}}, ["a"], "x.json")
