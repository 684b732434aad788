"""Post-hoc calibration (docs/method.md#post-hoc-calibration): temperatures, and Platt's biases, fitted on a held-out
split.

Every method maps a class's logit z to p = sigmoid(z / T + b) (ScoreCalibration: a temperature T > 0 and a bias b
per class), fitted by minimising the mean BCE of the held-out (image, class) pairs that the metrics evaluate (known
and not difficult: metrics.evaluated_pairs). T > 0 keeps the ranking within each class, so AP and mAP do not change.

`temperature` and `per-class` (Guo et al. 2017) fit b = 0 and one T for all classes or one per class: T > 1 softens
over-confident scores, T < 1 sharpens under-confident ones. The BCE is convex in 1/T, hence unimodal in log T: a
golden-section search on log T in [T_MIN, T_MAX], vectorised over the classes, finds the minimum, deterministically.
A class whose BCE has no minimum there gets the global temperature (the `temperature` fit): one without a positive
or without a negative pair, or one whose logits put every pair on the right side of 0 (its BCE keeps falling as
T -> 0, which would turn its scores into 0 and 1).

`platt` (Platt 1999) fits p = sigmoid(a z + b) per class, kept as T = 1 / a and b: the bias moves the probability
of logit 0 away from 0.5, which no temperature can (ASL's scores are shifted, not over- or under-confident). The fit
is a logistic regression on one feature, convex in (a, b): Newton's method in float64, all classes at once (a 2 x 2
Hessian per class, solved in closed form), from a = 0 and the best b for it, each step halved until it lowers the BCE
by a quarter of what its slope promises (Armijo). It stops after a last full step once half the squared Newton
decrement (the BCE still to gain) is at most NEWTON_TOLERANCE, and gives up after NEWTON_MAX_STEPS steps or when no
step lowers the BCE. No randomness; 6 to 12 steps on 3,000 pairs per class (milliseconds). The targets are Platt's,
(N+ + 1) / (N+ + 2) for a positive and 1 / (N- + 2) for a negative (N+, N- the class's evaluated positives and
negatives), not 1 and 0: a class whose logits separate its labels perfectly then still has a finite minimum (with 1
and 0 its BCE keeps falling as a -> infinity). A class gets the pooled fit (one (a, b) over every class's pairs,
targets from the pooled counts) when it has no evaluated positive or no evaluated negative, when its evaluated logits
are all equal (no slope to fit), when Newton gave up, or when 1 / a falls outside [T_MIN, T_MAX]: a <= 0 would
reverse its ranking (and change its AP), and a slope near 0 would flatten its scores into float32 ties. The entry
stored beside the checkpoint (udtimm.tuning) names these classes (`unfitted_classes`). A split where even the pooled
fit fails is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from udtimm.errors import ConfigError
from udtimm.metrics import brier_score, evaluated_pairs, expected_calibration_error
from udtimm.predictions import SUMMARY_ROWS, Predictions, class_table, format_table

METHODS = ("temperature", "per-class", "platt")
T_MIN, T_MAX = 1e-2, 1e2
LOG_T_TOLERANCE = 1e-9  # width of the final log T interval: T to about 9 significant digits
_GOLDEN = (math.sqrt(5) - 1) / 2
# Newton converges quadratically near the minimum: from a decrement of 1e-12 the last full step lands within float64
# rounding of it, while above it the line search still tells what a step gains (> 5e-13) from rounding (~1e-16).
NEWTON_TOLERANCE = 1e-12
NEWTON_MAX_STEPS = 100  # 6 to 12 are typical; a class that needs more gets the pooled fit
LINE_SEARCH_HALVINGS = 50
ARMIJO_FRACTION = 0.25
# Classes fitted at a time: a fit holds a few [N, K] float64 intermediates, which at 10,000 classes and 5,000
# held-out images would take gigabytes at once.
FIT_COLUMNS = 1024


class CalibrationError(ConfigError):
    """A held-out split on which not even the pooled calibration can be fitted (e.g. no positive or no negative)."""


@dataclass(frozen=True)
class ScoreCalibration:
    """Per class, logits z to probabilities sigmoid(z / T + b): temperatures T [C] > 0 and biases b [C], float64
    (zero biases for the temperature methods; Platt's sigmoid(a z + b) has T = 1 / a)."""

    temperatures: Tensor
    biases: Tensor

    @classmethod
    def of_temperatures(cls, temperatures: Tensor) -> ScoreCalibration:
        """Temperatures alone: zero biases."""
        return cls(temperatures, torch.zeros_like(temperatures))


@dataclass
class FittedCalibration:
    calibration: ScoreCalibration  # per class
    fitted: Tensor  # [C] bool: False where the class got the global (pooled) fit
    global_temperature: float  # the one fitted over all classes' pairs
    global_bias: float = 0.0  # platt's pooled bias; 0 for the temperature methods


def mean_bce(logits: Tensor, target: Tensor, keep: Tensor, temperatures: Tensor,
             biases: Tensor | float = 0.0) -> Tensor:
    """Mean BCE of sigmoid(logits / T + b) per column of [N, K] over its kept pairs, for T and b [K] (float64);
    `target`: the labels (bool or 0/1), or Platt's targets; `keep`: bool, or 0/1 weights."""
    losses = F.binary_cross_entropy_with_logits(logits / temperatures + biases, target.to(logits.dtype),
                                                reduction="none")
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
    # Converted once rather than at each of the ~50 evaluations: at 10,000 classes the conversions took a fifth.
    target, weight = positive.to(logits.dtype), keep.to(logits.dtype)

    def loss(log_t: Tensor) -> Tensor:
        return mean_bce(logits, target, weight, log_t.exp())

    return golden_section(loss, logits.shape[1], math.log(T_MIN), math.log(T_MAX), LOG_T_TOLERANCE).exp()


def in_column_blocks(fit: Callable[..., Any], *columns: Tensor) -> Any:
    """fit(*columns) (tensors [N, K] to a tensor [K] or a tuple of them), FIT_COLUMNS columns at a time: each column
    is fitted on its own, so the result is the same, while the fit's [N, K] intermediates stay [N, FIT_COLUMNS]."""
    parts = [fit(*(tensor[:, start:start + FIT_COLUMNS] for tensor in columns))
             for start in range(0, columns[0].shape[1], FIT_COLUMNS)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(values) for values in zip(*parts, strict=True))
    return torch.cat(parts)


def has_minimum(logits: Tensor, positive: Tensor, keep: Tensor) -> Tensor:
    """[K] bool per column of [N, K]: a kept positive, a kept negative, and a kept pair on the wrong side of 0."""
    wrong_side = torch.where(positive, logits <= 0, logits >= 0)
    return ((positive & keep).any(0) & (~positive & keep).any(0) & (wrong_side & keep).any(0))


def platt_targets(positive: Tensor, keep: Tensor) -> Tensor:
    """Platt's targets [N, K] (float64) per column of [N, K]: (N+ + 1) / (N+ + 2) for a positive, 1 / (N- + 2) for
    a negative, N+ and N- the column's kept positives and negatives."""
    num_positive = (positive & keep).sum(0).to(torch.float64)
    num_negative = (~positive & keep).sum(0).to(torch.float64)
    return torch.where(positive, (num_positive + 1) / (num_positive + 2), 1 / (num_negative + 2))


def newton_platt(logits: Tensor, positive: Tensor, keep: Tensor,
                 max_steps: int = NEWTON_MAX_STEPS) -> tuple[Tensor, Tensor, Tensor]:
    """(a, b, converged), each [K], per column of [N, K] (float64): the minimiser of the mean BCE of
    sigmoid(a z + b) against platt_targets over the column's kept pairs, by Newton's method (module docstring)."""
    target = platt_targets(positive, keep)
    weight = keep.to(torch.float64) / keep.sum(0).clamp(min=1)  # each kept pair's share of its column's mean

    def loss(slope: Tensor, bias: Tensor) -> Tensor:
        return (F.binary_cross_entropy_with_logits(slope * logits + bias, target, reduction="none") * weight).sum(0)

    slope = torch.zeros(logits.shape[1], dtype=torch.float64)
    bias = torch.logit((target * weight).sum(0))  # the best bias for slope 0
    converged = torch.zeros(logits.shape[1], dtype=torch.bool)
    stalled = torch.zeros_like(converged)
    for _ in range(max_steps):
        active = ~(converged | stalled)
        if not active.any():
            break
        p = torch.sigmoid(slope * logits + bias)
        residual, curvature = (p - target) * weight, p * (1 - p) * weight
        grad_a, grad_b = (residual * logits).sum(0), residual.sum(0)
        h_aa, h_ab, h_bb = (curvature * logits ** 2).sum(0), (curvature * logits).sum(0), curvature.sum(0)
        determinant = h_aa * h_bb - h_ab ** 2
        step_a = (h_ab * grad_b - h_bb * grad_a) / determinant
        step_b = (h_ab * grad_a - h_aa * grad_b) / determinant
        decrement = -(grad_a * step_a + grad_b * step_b)  # g' H^-1 g: a full step lowers the BCE by about half
        last = active & (decrement / 2 <= NEWTON_TOLERANCE)
        # Far from the minimum a full step may overshoot: halve it until it gains enough (Armijo).
        accepted, size, current = last.clone(), torch.ones_like(slope), loss(slope, bias)
        for _ in range(LINE_SEARCH_HALVINGS):
            pending = active & ~accepted
            if not pending.any():
                break
            trial = loss(slope + size * step_a, bias + size * step_b)
            accepted |= pending & (trial <= current - ARMIJO_FRACTION * size * decrement)
            size = torch.where(accepted, size, size / 2)
        slope = torch.where(accepted, slope + size * step_a, slope)
        bias = torch.where(accepted, bias + size * step_b, bias)
        converged |= last
        stalled |= active & ~accepted  # no step lowers the BCE: a (numerically) singular Hessian
    return slope, bias, converged


def kept_logits_differ(logits: Tensor, keep: Tensor) -> Tensor:
    """[K] bool per column of [N, K]: two of its kept logits differ (else there is no slope to fit)."""
    if len(logits) == 0:  # amin and amax need a row
        return torch.zeros(logits.shape[1], dtype=torch.bool)
    return torch.where(keep, logits, -math.inf).amax(0) > torch.where(keep, logits, math.inf).amin(0)


def _platt_columns(logits: Tensor, positive: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(a, b, usable), each [K], per column of [N, K]: newton_platt's fit where the column has a kept positive, a
    kept negative and two different kept logits (nan elsewhere); usable where it converged with 1 / a in
    [T_MIN, T_MAX]."""
    fittable = (positive & keep).any(0) & (~positive & keep).any(0) & kept_logits_differ(logits, keep)
    slope = torch.full((logits.shape[1],), math.nan, dtype=torch.float64)
    bias, usable = slope.clone(), torch.zeros_like(fittable)
    if fittable.any():
        found_slope, found_bias, converged = in_column_blocks(newton_platt, logits[:, fittable],
                                                              positive[:, fittable], keep[:, fittable])
        slope[fittable], bias[fittable] = found_slope, found_bias
        usable[fittable] = converged & (found_slope >= 1 / T_MAX) & (found_slope <= 1 / T_MIN)
    return slope, bias, usable


def _fit_platt(z: Tensor, positive: Tensor, keep: Tensor, pooled: tuple[Tensor, Tensor, Tensor],
               split: str) -> FittedCalibration:
    """Platt scaling per class, the `pooled` pairs' fit for the classes without a usable one of their own."""
    global_slope, global_bias, usable = _platt_columns(*pooled)
    if not usable.item():
        raise CalibrationError(f"--tune-split {split}: no Platt scaling can be fitted there (it needs positive and "
                               "negative labels whose logits rank the positives higher); tune on a larger held-out "
                               "split")
    slopes, biases, fitted = _platt_columns(z, positive, keep)
    slopes, biases = torch.where(fitted, slopes, global_slope), torch.where(fitted, biases, global_bias)
    return FittedCalibration(ScoreCalibration(1 / slopes, biases), fitted, 1 / global_slope.item(),
                             global_bias.item())


def fit_calibration(logits: Tensor, target: Tensor, difficult: Tensor, method: str,
                    split: str = "the held-out split") -> FittedCalibration:
    """`method`'s per-class calibration from held-out logits [N, C], target and difficult mask (pairs left out).

    CalibrationError naming `split` when not even the pooled fit over all classes can be made there.
    """
    if method not in METHODS:
        raise ConfigError(f"--calibrate {method!r}: choose one of {', '.join(METHODS)}")
    z, positive, keep = logits.to(torch.float64), target > 0.5, evaluated_pairs(target, difficult)
    pooled = (z[keep][:, None], positive[keep][:, None], torch.ones(int(keep.sum()), 1, dtype=torch.bool))
    if method == "platt":
        return _fit_platt(z, positive, keep, pooled, split)
    if not has_minimum(*pooled).item():
        raise CalibrationError(f"--tune-split {split}: no temperature can be fitted there (it needs positive and "
                               "negative labels, and at least one misranked against 0.5); tune on a larger "
                               "held-out split")
    global_value = _fit_columns(*pooled).item()
    num_classes = z.shape[1]
    values = torch.full((num_classes,), global_value, dtype=torch.float64)
    fitted = has_minimum(z, positive, keep) if method == "per-class" else torch.zeros(num_classes, dtype=torch.bool)
    if fitted.any():
        values[fitted] = in_column_blocks(_fit_columns, z[:, fitted], positive[:, fitted], keep[:, fitted])
    return FittedCalibration(ScoreCalibration.of_temperatures(values), fitted, global_value)


def fitted_name(method: str) -> str:
    """What `method` fits, as validate.py prints it and results.csv's `calibration` column names it."""
    return f"{method} temperatures and biases" if method == "platt" else f"{method} temperatures"


def calibrated_scores(logits: Tensor, calibration: ScoreCalibration) -> Tensor:
    """sigmoid(logits / T + b) in float32, T and b [C] per class: the same operations as Predictor and the exported
    graphs."""
    def per_class(values: Tensor) -> Tensor:
        return values.to(device=logits.device, dtype=torch.float32)

    return torch.sigmoid(logits.float() / per_class(calibration.temperatures) + per_class(calibration.biases))


def calibrate_predictions(predictions: Predictions, calibration: ScoreCalibration) -> Predictions:
    """The same predictions with their scores calibrated per class by `calibration`; the logits stay as they are."""
    if predictions.logits is None:
        raise ValueError("calibrating predictions needs their logits (engine.predict keeps them)")
    return replace(predictions, scores=calibrated_scores(predictions.logits, calibration))


def summary_table(predictions: Predictions, class_names: Sequence[str], result: FittedCalibration,
                  method: str, rows: int | None = SUMMARY_ROWS) -> str:
    """Per class: its temperature (and bias, for platt) and the mean BCE (of the evaluated pairs) before and after,
    on the split it was fitted on; above MANY_CLASSES classes, the `rows` worst and best by BCE after and a summary
    (predictions.class_table)."""
    z, positive, keep = (predictions.logits.to(torch.float64), predictions.target > 0.5,
                         evaluated_pairs(predictions.target, predictions.difficult))
    temperatures, biases = result.calibration.temperatures, result.calibration.biases
    note = {"per-class": "global temperature (no minimum of its own)",
            "platt": "pooled fit (none usable of its own)"}.get(method, "")
    table = pd.DataFrame({
        "class": list(class_names), "temperature": temperatures.numpy(),
        **({"bias": biases.numpy()} if method == "platt" else {}),
        "BCE before": mean_bce(z, positive, keep, torch.ones_like(temperatures)).numpy(),
        "BCE after": mean_bce(z, positive, keep, temperatures, biases).numpy(),
        "note": ["" if fitted else note for fitted in result.fitted.tolist()],
    })
    return class_table(table, "BCE after", rows, dict.fromkeys(table.columns[1:-1], 4), lower_is_better=True)


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
