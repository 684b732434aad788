"""udtimm.calibration: the temperatures against scipy's bounded minimiser of an independently written BCE, Platt
scaling's Newton fit against scipy's Nelder-Mead on the same regularised objective, the classes without a fit of
their own, difficult pairs left out, mAP unchanged, the before/after table (the stored entries:
tests/test_tuning.py)."""


import numpy as np
import pytest
import torch
from conftest import OPENIMAGES_CLASSES
from scipy.optimize import minimize, minimize_scalar
from sklearn.metrics import brier_score_loss, log_loss

from udtimm import calibration, metrics
from udtimm.calibration import CalibrationError, ScoreCalibration, calibrated_scores, fit_calibration
from udtimm.config import ConfigError
from udtimm.predictions import Predictions

TRUE_TEMPERATURES = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
TRUE_SLOPES = torch.tensor([0.5, 1.0, 2.0, 0.8], dtype=torch.float64)
TRUE_BIASES = torch.tensor([-2.0, 0.0, 1.0, -1.0], dtype=torch.float64)


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
    result = fit_calibration(logits, target, difficult, "per-class")
    temperatures = result.calibration.temperatures
    assert result.fitted.all() and temperatures.dtype == torch.float64 and not result.calibration.biases.any()
    z, y, keep = logits.double().numpy(), target.numpy(), ~difficult.numpy()
    for c in range(logits.shape[1]):
        expected = scipy_temperature(z[keep[:, c], c], y[keep[:, c], c])
        # Both minimise the same smooth function to ~1e-9 in log T; float64 sums agree far beyond 1e-6.
        assert temperatures[c].item() == pytest.approx(expected, rel=1e-6), c
    # 3000 draws per class: the fit lands within a few percent of the temperature the labels were drawn with.
    torch.testing.assert_close(temperatures, TRUE_TEMPERATURES, rtol=0.1, atol=0)
    pooled = scipy_temperature(z[keep], y[keep])
    assert result.global_temperature == pytest.approx(pooled, rel=1e-6)


def test_one_temperature_for_all_classes_is_the_pooled_fit() -> None:
    logits, target, difficult = synthetic(seed=1)
    result = fit_calibration(logits, target, difficult, "temperature")
    keep = ~difficult.numpy()
    expected = scipy_temperature(logits.double().numpy()[keep], target.numpy()[keep])
    assert result.calibration.temperatures.tolist() == [result.global_temperature] * 4
    assert result.global_temperature == pytest.approx(expected, rel=1e-6)
    assert not result.fitted.any()


def test_difficult_pairs_are_left_out_of_the_fit() -> None:
    logits, target, difficult = synthetic(seed=2)
    result = fit_calibration(logits, target, difficult, "per-class")
    # Whatever a difficult pair's logit and label, the temperatures do not move.
    scrambled = torch.where(difficult, torch.full_like(logits, 50.0), logits)
    flipped = torch.where(difficult, 1 - target, target)
    again = fit_calibration(scrambled, flipped, difficult, "per-class")
    assert torch.equal(again.calibration.temperatures, result.calibration.temperatures)
    assert not torch.equal(fit_calibration(scrambled, flipped, torch.zeros_like(difficult),
                                           "per-class").calibration.temperatures, result.calibration.temperatures)


def test_a_class_without_a_minimum_of_its_own_gets_the_global_temperature() -> None:
    logits, target, difficult = synthetic(seed=3)
    target[:, 0] = 0  # no positive
    target[:, 1] = 1  # no negative
    target[:, 2] = (logits[:, 2] > 0).float()  # every pair on the right side of 0: BCE falls as T -> 0
    difficult[:, 3] = True  # no pair left at all
    result = fit_calibration(logits, target, difficult, "per-class")
    assert result.fitted.tolist() == [False] * 4
    assert result.calibration.temperatures.tolist() == [result.global_temperature] * 4
    assert calibration.T_MIN < result.global_temperature < calibration.T_MAX


def test_a_split_where_no_temperature_fits_is_refused_naming_it() -> None:
    logits, target, difficult = synthetic(seed=4, n=50)
    with pytest.raises(CalibrationError, match="--tune-split digits:val: no temperature can be fitted"):
        fit_calibration(logits, (logits > 0).float(), difficult, "per-class", "digits:val")
    with pytest.raises(CalibrationError, match="no temperature"):
        fit_calibration(logits, torch.zeros_like(target), difficult, "temperature")
    with pytest.raises(ConfigError, match="--calibrate 'isotonic'"):
        fit_calibration(logits, target, difficult, "isotonic")


def test_a_per_class_temperature_leaves_every_ap_and_the_map_unchanged() -> None:
    logits, target, difficult = synthetic(seed=5, n=400)
    temperatures = ScoreCalibration.of_temperatures(torch.tensor([0.3, 1.7, 5.0, 0.9], dtype=torch.float64))
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
    result = fit_calibration(logits, target, difficult, "per-class")
    calibrated = calibration.calibrate_predictions(raw, result.calibration)
    assert torch.equal(calibrated.logits, logits) and calibrated.scores.dtype == torch.float32
    expected = torch.sigmoid(logits.double() / result.calibration.temperatures).float()
    torch.testing.assert_close(calibrated.scores, expected, rtol=0, atol=1e-6)
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
        calibration.calibrate_predictions(Predictions(raw.scores, target, difficult, raw.indices),
                                          result.calibration)


def platt_synthetic(seed: int, n: int = 2000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits whose calibrated probabilities are sigmoid(TRUE_SLOPES * logits + TRUE_BIASES), and a fifth class
    whose logits separate its labels perfectly (positive above 1); 5 % of the pairs unknown (-1), 5 % difficult."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, 5, generator=g, dtype=torch.float64)
    probabilities = torch.sigmoid(TRUE_SLOPES * logits[:, :4] + TRUE_BIASES)
    drawn = torch.rand(n, 4, generator=g, dtype=torch.float64) < probabilities
    target = torch.cat([drawn, logits[:, 4:] > 1], 1).float()
    target[torch.rand(n, 5, generator=g) < 0.05] = -1
    return logits.float(), target, torch.rand(n, 5, generator=g) < 0.05


def scipy_platt(logits: np.ndarray, labels: np.ndarray) -> list[float]:
    """(a, b) minimising the mean BCE of sigmoid(a z + b) against Platt's targets, written apart from udtimm: the
    loss as log(1 + e^x) - t x, minimised by scipy's Nelder-Mead (no derivatives)."""
    positive = labels == 1
    num_positive, num_negative = int(positive.sum()), int((~positive).sum())
    targets = np.where(positive, (num_positive + 1) / (num_positive + 2), 1 / (num_negative + 2))

    def loss(params: np.ndarray) -> float:
        x = params[0] * logits + params[1]
        return float(np.mean(np.logaddexp(0, x) - targets * x))

    found = minimize(loss, [1.0, 0.0], method="Nelder-Mead",
                     options={"xatol": 1e-11, "fatol": 1e-15, "maxiter": 20000, "maxfev": 40000})
    return found.x.tolist()


def test_platt_scaling_matches_scipy_on_platts_regularised_objective() -> None:
    logits, target, difficult = platt_synthetic(seed=0)
    result = fit_calibration(logits, target, difficult, "platt")
    assert result.fitted.all()
    slopes, biases = 1 / result.calibration.temperatures, result.calibration.biases
    z, y = logits.double().numpy(), target.numpy()
    keep = (y >= 0) & ~difficult.numpy()  # unknown and difficult pairs left out
    for c in range(5):
        expected = scipy_platt(z[keep[:, c], c], y[keep[:, c], c])
        # Newton ends within float64 rounding of the minimum, Nelder-Mead within ~1e-8 of it.
        assert [slopes[c].item(), biases[c].item()] == pytest.approx(expected, rel=0, abs=1e-6), c
    assert [1 / result.global_temperature, result.global_bias] == pytest.approx(scipy_platt(z[keep], y[keep]),
                                                                                rel=0, abs=1e-6)
    # ~1,800 draws per class: the fit lands near the (a, b) the labels were drawn with.
    torch.testing.assert_close(slopes[:4], TRUE_SLOPES, rtol=0.15, atol=0)
    torch.testing.assert_close(biases[:4], TRUE_BIASES, rtol=0, atol=0.3)
    # The separated class has a finite minimum (Platt's targets), steep but inside the temperature range.
    assert 1 < slopes[4] < 1 / calibration.T_MIN


def test_platt_classes_without_a_usable_fit_get_the_pooled_one() -> None:
    # Ten classes, four of them spoilt below: the pooled fit comes from the other six.
    logits, target, difficult = (torch.cat(parts, 1)
                                 for parts in zip(platt_synthetic(seed=1), platt_synthetic(seed=11), strict=True))
    target[:, 0] = 0  # no positive
    target[:, 1] = 1  # no negative
    g = torch.Generator().manual_seed(1)
    target[:, 2] = (torch.rand(len(logits), generator=g) < torch.sigmoid(-logits[:, 2])).float()  # ranked backwards
    logits[:, 3] = 0.5  # its logits all equal: no slope to fit
    result = fit_calibration(logits, target, difficult, "platt")
    assert result.fitted.tolist() == [False] * 4 + [True] * 6  # the separated classes have their own fit
    assert result.calibration.temperatures[:4].tolist() == [result.global_temperature] * 4
    assert result.calibration.biases[:4].tolist() == [result.global_bias] * 4
    assert 0 < 1 / result.global_temperature and result.global_bias != 0
    # The backwards class converges, to a negative slope: kept, it would reverse the ranking and change the AP.
    keep = metrics.evaluated_pairs(target, difficult)[:, 2:3]
    slope, _, converged = calibration.newton_platt(logits.double()[:, 2:3], target[:, 2:3] > 0.5, keep)
    assert converged.item() and slope.item() < 0
    # Newton's own guards: a singular Hessian (constant logits) stops it, and so does the step cap, unconverged.
    positive, every_pair = torch.arange(10)[:, None] % 2 == 0, torch.ones(10, 1, dtype=torch.bool)
    assert not calibration.newton_platt(torch.zeros(10, 1, dtype=torch.float64), positive, every_pair)[2].item()
    separated = logits.double()[:, 4:5], target[:, 4:5] > 0.5, metrics.evaluated_pairs(target, difficult)[:, 4:5]
    assert calibration.newton_platt(*separated)[2].item()
    assert not calibration.newton_platt(*separated, max_steps=1)[2].item()


def test_a_split_where_no_platt_scaling_fits_is_refused_naming_it() -> None:
    logits, target, difficult = platt_synthetic(seed=2, n=50)
    with pytest.raises(CalibrationError, match="--tune-split digits:val: no Platt scaling can be fitted"):
        fit_calibration(logits, torch.zeros_like(target), difficult, "platt", "digits:val")
    with pytest.raises(CalibrationError, match="no Platt scaling"):
        fit_calibration(logits, target, torch.ones_like(difficult), "platt")  # not one pair evaluated
    with pytest.raises(CalibrationError, match="no Platt scaling"):
        fit_calibration(-logits, (logits > 0).float(), difficult, "platt")  # every class ranked backwards


def test_platt_scaling_keeps_the_map_and_calibrates_shifted_scores_that_temperatures_cannot() -> None:
    # Labels drawn from sigmoid(u), logits (u + shift) / 1.5: too high, as ASL's are; logit 0 is not probability 0.5.
    g = torch.Generator().manual_seed(7)
    u = 2.5 * torch.randn(1000, 4, generator=g, dtype=torch.float64) - 1
    target = (torch.rand(u.shape, generator=g, dtype=torch.float64) < torch.sigmoid(u)).float()
    logits = ((u + torch.tensor([3.0, 2.0, 4.0, 1.0], dtype=torch.float64)) / 1.5).float()
    difficult = torch.rand(u.shape, generator=g) < 0.05
    platt = fit_calibration(logits, target, difficult, "platt")
    scores = calibrated_scores(logits, platt.calibration)
    torch.testing.assert_close(scores.double(), torch.sigmoid(logits.double() / platt.calibration.temperatures
                                                              + platt.calibration.biases), rtol=0, atol=1e-6)
    before = metrics.per_class_average_precision(torch.sigmoid(logits), target, difficult)
    torch.testing.assert_close(metrics.per_class_average_precision(scores, target, difficult), before, rtol=0,
                               atol=1e-12)
    assert metrics.mean_average_precision(scores, target, difficult) == \
        pytest.approx(metrics.mean_average_precision(torch.sigmoid(logits), target, difficult), abs=1e-10)
    temperatures = fit_calibration(logits, target, difficult, "per-class").calibration
    ece = {name: metrics.expected_calibration_error(values, target, difficult) for name, values in (
        ("raw", torch.sigmoid(logits)), ("per-class", calibrated_scores(logits, temperatures)), ("platt", scores))}
    assert ece["platt"] < ece["per-class"] / 4 and ece["per-class"] < ece["raw"]
    raw = Predictions(torch.sigmoid(logits), target, difficult, torch.arange(len(logits)), logits)
    summary = calibration.summary_table(raw, list("abcd"), platt, "platt").splitlines()
    assert summary[0].split()[:3] == ["class", "temperature", "bias"]
    for line, bias in zip(summary[2:], platt.calibration.biases.tolist(), strict=True):
        _, _, shown_bias, bce_before, bce_after = line.split()[:5]
        assert float(shown_bias) == pytest.approx(bias, abs=1e-4) and float(bce_after) < float(bce_before)


@pytest.mark.parametrize("method", ["per-class", "platt"])
def test_classes_fitted_in_blocks_get_the_fit_of_all_at_once(method: str, monkeypatch) -> None:
    logits, target, difficult = platt_synthetic(seed=6, n=200)
    logits, target, difficult = (tensor.repeat(1, 3) for tensor in (logits, target, difficult))  # 15 classes
    whole = fit_calibration(logits, target, difficult, method)
    monkeypatch.setattr(calibration, "FIT_COLUMNS", 4)  # blocks of 4, 4, 4 and 3 classes
    blocks = fit_calibration(logits, target, difficult, method)
    assert torch.equal(blocks.calibration.temperatures, whole.calibration.temperatures)
    assert torch.equal(blocks.calibration.biases, whole.calibration.biases)
    assert torch.equal(blocks.fitted, whole.fitted) and blocks.fitted[:4].all()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["per-class", "platt"])
def test_ten_thousand_classes_are_fitted_and_summarised(method: str) -> None:
    names = [f"class{index:05d}" for index in range(OPENIMAGES_CLASSES)]
    g = torch.Generator().manual_seed(8)
    num_images = 60
    # OpenImages' long tail: from classes without a positive to classes on a third of the images.
    target = (torch.rand(num_images, len(names), generator=g) < torch.logspace(-2.5, -0.5, len(names))).float()
    logits = 3 * torch.randn(target.shape, generator=g) + 2 * target - 1
    difficult = torch.rand(target.shape, generator=g) < 0.01
    result = fit_calibration(logits, target, difficult, method)
    fitted = result.fitted.nonzero().flatten()
    assert 0 < len(fitted) < len(names)  # the classes without a positive (or a fit) take the pooled one
    # Each class as if fitted alone, to the fits' tolerances (sums over other columns round otherwise).
    for c in fitted[[0, len(fitted) // 2, -1]].tolist():
        alone = fit_calibration(logits[:, [c]], target[:, [c]], difficult[:, [c]], method).calibration
        torch.testing.assert_close(alone.temperatures[0], result.calibration.temperatures[c], rtol=1e-6, atol=0)
        torch.testing.assert_close(alone.biases[0], result.calibration.biases[c], rtol=1e-6, atol=1e-9)

    raw = Predictions(torch.sigmoid(logits), target, difficult, torch.arange(num_images), logits)
    summary = calibration.summary_table(raw, names, result, method, rows=5).splitlines()
    assert len(summary) < 50 and summary[0].startswith(f"{OPENIMAGES_CLASSES} classes, summarised")
    note = "global temperature (no minimum of its own)" if method == "per-class" else \
        "pooled fit (none usable of its own)"
    assert f"{len(names) - len(fitted)} classes: {note}" in summary
    quantiles = {line.split()[0]: line.split()[1:] for line in summary[summary.index("quantiles over the classes:")
                                                                       + 3:]}
    low, high = result.calibration.temperatures.min().item(), result.calibration.temperatures.max().item()
    assert quantiles["temperature"][0] == f"{low:.4f}" and quantiles["temperature"][4] == f"{high:.4f}"
