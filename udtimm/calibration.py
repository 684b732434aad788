"""Post-hoc calibration (docs/method.md#post-hoc-calibration): temperatures fitted on a held-out split.

A temperature T divides a class's logit before the sigmoid, p = sigmoid(z / T) (Guo et al. 2017): T > 1 softens
over-confident scores, T < 1 sharpens under-confident ones, and the ranking within a class never changes (so AP and
mAP do not either). `temperature` fits one T for all classes, `per-class` one per class; both minimise the mean BCE
of the held-out (image, class) pairs that are not difficult. The BCE is convex in 1/T, hence unimodal in log T: a
golden-section search on log T in [T_MIN, T_MAX], vectorised over the classes, finds the minimum, deterministically.
A class whose BCE has no minimum there gets the global temperature (the `temperature` fit): one without a positive
or without a negative pair, or one whose logits put every pair on the right side of 0 (its BCE keeps falling as
T -> 0, which would turn its scores into 0 and 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from udtimm.checkpoint import CheckpointError
from udtimm.config import ConfigError
from udtimm.metrics import brier_score, evaluated_pairs, expected_calibration_error
from udtimm.predictions import Predictions, format_table

METHODS = ("temperature", "per-class")
T_MIN, T_MAX = 1e-2, 1e2
LOG_T_TOLERANCE = 1e-9  # width of the final log T interval: T to about 9 significant digits
_GOLDEN = (math.sqrt(5) - 1) / 2


class CalibrationError(ConfigError):
    """A held-out split on which no temperature can be fitted (no positive, no negative, or perfectly separated)."""


@dataclass
class FittedTemperatures:
    values: Tensor  # [C] float64
    fitted: Tensor  # [C] bool: False where the class got the global temperature
    global_value: float  # the one temperature fitted over all classes' pairs


def mean_bce(logits: Tensor, positive: Tensor, keep: Tensor, temperatures: Tensor) -> Tensor:
    """Mean BCE of sigmoid(logits / T) per column of [N, K] over its kept pairs, for T [K] (float64)."""
    losses = F.binary_cross_entropy_with_logits(logits / temperatures, positive.to(logits.dtype), reduction="none")
    weight = keep.to(losses.dtype)
    return (losses * weight).sum(0) / weight.sum(0).clamp(min=1)


def golden_section(loss: Callable[[Tensor], Tensor], count: int, low: float, high: float,
                   tolerance: float) -> Tensor:
    """The minimiser in [low, high] of each of `count` unimodal functions, evaluated together by
    loss(x [count]) -> [count]."""
    a = torch.full((count,), low, dtype=torch.float64)
    b = torch.full((count,), high, dtype=torch.float64)
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    loss_c, loss_d = loss(c), loss(d)
    for _ in range(math.ceil(math.log(tolerance / (high - low)) / math.log(_GOLDEN))):
        left = loss_c <= loss_d  # the minimum lies in [a, d]; else in [c, b]
        a, b = torch.where(left, a, c), torch.where(left, d, b)
        # The surviving inner point is reused: one new evaluation per step.
        new = torch.where(left, b - _GOLDEN * (b - a), a + _GOLDEN * (b - a))
        loss_new = loss(new)
        c, d, loss_c, loss_d = (torch.where(left, new, d), torch.where(left, c, new),
                                torch.where(left, loss_new, loss_d), torch.where(left, loss_c, loss_new))
    return (a + b) / 2


def _fit_columns(logits: Tensor, positive: Tensor, keep: Tensor) -> Tensor:
    """The BCE-minimising temperature of each column of [N, K] (float64)."""
    def loss(log_t: Tensor) -> Tensor:
        return mean_bce(logits, positive, keep, log_t.exp())

    return golden_section(loss, logits.shape[1], math.log(T_MIN), math.log(T_MAX), LOG_T_TOLERANCE).exp()


def has_minimum(logits: Tensor, positive: Tensor, keep: Tensor) -> Tensor:
    """[K] bool per column of [N, K]: a kept positive, a kept negative, and a kept pair on the wrong side of 0."""
    wrong_side = torch.where(positive, logits <= 0, logits >= 0)
    return ((positive & keep).any(0) & (~positive & keep).any(0) & (wrong_side & keep).any(0))


def fit_temperatures(logits: Tensor, target: Tensor, difficult: Tensor, method: str,
                     split: str = "the held-out split") -> FittedTemperatures:
    """`method`'s temperatures [C] from held-out logits [N, C], target and difficult mask (pairs left out).

    CalibrationError naming `split` when not even one temperature for all classes can be fitted there.
    """
    if method not in METHODS:
        raise ConfigError(f"--calibrate {method!r}: choose one of {', '.join(METHODS)}")
    z, positive, keep = logits.to(torch.float64), target > 0.5, evaluated_pairs(target, difficult)
    pooled = (z[keep][:, None], positive[keep][:, None], torch.ones(int(keep.sum()), 1, dtype=torch.bool))
    if not has_minimum(*pooled).item():
        raise CalibrationError(f"--tune-split {split}: no temperature can be fitted there (it needs positive and "
                               "negative labels, and at least one misranked against 0.5); tune on a larger "
                               "held-out split")
    global_value = _fit_columns(*pooled).item()
    num_classes = z.shape[1]
    values = torch.full((num_classes,), global_value, dtype=torch.float64)
    fitted = has_minimum(z, positive, keep) if method == "per-class" else torch.zeros(num_classes, dtype=torch.bool)
    if fitted.any():
        values[fitted] = _fit_columns(z[:, fitted], positive[:, fitted], keep[:, fitted])
    return FittedTemperatures(values, fitted, global_value)


def calibrated_scores(logits: Tensor, temperatures: Tensor) -> Tensor:
    """sigmoid(logits / T) in float32, T [C] per class: the same operations as Predictor and the exported graphs."""
    return torch.sigmoid(logits.float() / temperatures.to(device=logits.device, dtype=torch.float32))


def calibration_entry(class_names: Sequence[str], result: FittedTemperatures, method: str, split: str,
                      num_images: int) -> dict:
    """What the file beside the checkpoint holds under `calibration` (udtimm.thresholds.tuning_record)."""
    return {
        "method": method,
        "split": split,
        "num_images": num_images,
        "temperatures": dict(zip(class_names, result.values.tolist(), strict=True)),
        "global_temperature": result.global_value,
        "unfitted_classes": [name for name, fitted in zip(class_names, result.fitted.tolist(), strict=True)
                             if not fitted] if method == "per-class" else [],
    }


def temperatures_tensor(entry: dict, class_names: Sequence[str], source: str) -> Tensor:
    """The entry's temperatures in class order, [C] float64; CheckpointError naming `source` if its classes differ or
    a temperature is not a positive finite number."""
    stored = entry.get("temperatures") if isinstance(entry, dict) else None
    if not isinstance(stored, dict) or list(stored) != list(class_names):
        found = list(stored) if isinstance(stored, dict) else stored
        raise CheckpointError(f"{source}: temperatures for classes {found}, but the model has {list(class_names)}")
    values = torch.tensor([float(value) for value in stored.values()], dtype=torch.float64)
    if not (values.isfinite() & (values > 0)).all():
        raise CheckpointError(f"{source}: temperatures must be positive and finite, got {values.tolist()}")
    return values


def calibrate_predictions(predictions: Predictions, temperatures: Tensor) -> Predictions:
    """The same predictions with their scores calibrated by `temperatures` [C]; the logits stay as they are."""
    if predictions.logits is None:
        raise ValueError("calibrating predictions needs their logits (engine.predict keeps them)")
    return replace(predictions, scores=calibrated_scores(predictions.logits, temperatures))


def summary_table(predictions: Predictions, class_names: Sequence[str], result: FittedTemperatures,
                  method: str) -> str:
    """Per class: its temperature and the mean BCE (of pairs not difficult) before and after, on the split it was
    fitted on."""
    z, positive, keep = (predictions.logits.to(torch.float64), predictions.target > 0.5,
                         evaluated_pairs(predictions.target, predictions.difficult))
    before = mean_bce(z, positive, keep, torch.ones_like(result.values))
    after = mean_bce(z, positive, keep, result.values)
    note = "global temperature (no minimum of its own)" if method == "per-class" else ""
    rows = [(name, f"{value:.4f}", f"{b:.4f}", f"{a:.4f}", "" if fitted else note)
            for name, value, b, a, fitted in zip(class_names, result.values.tolist(), before.tolist(), after.tolist(),
                                                 result.fitted.tolist(), strict=True)]
    return format_table(("class", "temperature", "BCE before", "BCE after", "note"), rows)


CALIBRATION_METRICS = ("ece", "ece_pooled", "brier")


def calibration_metrics(scores: Tensor, target: Tensor, difficult: Tensor) -> dict[str, float]:
    """CALIBRATION_METRICS of these probabilities, in percent, as compute_metrics has them."""
    return {"ece": expected_calibration_error(scores, target, difficult),
            "ece_pooled": expected_calibration_error(scores, target, difficult, classwise=False),
            "brier": brier_score(scores, target, difficult)}


def compare(raw: Predictions, calibrated: Predictions) -> tuple[str, dict[str, float]]:
    """Classwise ECE, pooled ECE and Brier (percent) before and after calibration: the printed table, and the
    former as `<metric>_uncalibrated`."""
    before, after = (calibration_metrics(scores, raw.target, raw.difficult) for scores in (raw.scores,
                                                                                         calibrated.scores))
    rows = [(name, f"{before[name]:.2f}", f"{after[name]:.2f}") for name in CALIBRATION_METRICS]
    table = format_table(("metric", "uncalibrated (%)", "calibrated (%)"), rows)
    return table, {f"{name}_uncalibrated": value for name, value in before.items()}
