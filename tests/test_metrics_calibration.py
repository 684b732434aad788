"""udtimm.metrics' calibration measures: classwise and pooled ECE (Eq. 2), reliability bins and the Brier score,
each against torchmetrics, scikit-learn or a slow loop written from the equation; and unknown labels left out of
every metric."""

import math

import pytest
import torch
from sklearn.metrics import average_precision_score, brier_score_loss
from test_metrics import assert_metrics_close, make_data, sklearn_threshold_metrics
from torchmetrics.classification import BinaryCalibrationError

from udtimm.metrics import (
    brier_score,
    compute_metrics,
    expected_calibration_error,
    per_class_average_precision,
    reliability_bins,
    threshold_metrics,
)


def off_edge_probs(n, c, n_bins=15, seed=0):
    """Probabilities kept 1% of a bin width away from every bin edge (and from 0 and 1).

    torchmetrics bins with torch.bucketize on a float32 linspace and puts p == 1 in a bin of its
    own; away from the edges both binnings agree.
    """
    g = torch.Generator().manual_seed(seed)
    bins = torch.randint(0, n_bins, (n, c), generator=g).double()
    offset = 0.01 + 0.98 * torch.rand(n, c, generator=g, dtype=torch.float64)
    return (bins + offset) / n_bins


def eq2_classwise_ece(probs, target, difficult, n_bins):
    """Slow Eq. 2: per class, sum over bins of (n_b / n) |acc_b - conf_b|, then mean over classes."""
    per_class = []
    for c in range(probs.shape[1]):
        bins = [[] for _ in range(n_bins)]
        for i in range(probs.shape[0]):
            if difficult[i, c]:
                continue
            p = probs[i, c].item()
            bins[min(int(p * n_bins), n_bins - 1)].append((p, float(target[i, c] > 0.5)))
        n = sum(len(b) for b in bins)
        if n == 0:
            continue
        ece = 0.0
        for b in bins:
            if b:
                conf = sum(p for p, _ in b) / len(b)
                acc = sum(y for _, y in b) / len(b)
                ece += len(b) / n * abs(acc - conf)
        per_class.append(ece)
    return 100 * sum(per_class) / len(per_class)


def test_pooled_ece_matches_torchmetrics():
    _, target, difficult = make_data(n=200, c=5, seed=9)
    probs = off_edge_probs(200, 5, seed=9)
    encoded = target.long()
    encoded[difficult] = -1
    metric = BinaryCalibrationError(n_bins=15, norm="l1", ignore_index=-1)
    expected = metric(probs.flatten(), encoded.flatten()).item()
    ece = expected_calibration_error(probs, target, difficult, classwise=False)
    assert ece == pytest.approx(100 * expected, abs=1e-4)
    assert ece != pytest.approx(expected_calibration_error(probs, target, classwise=False))


def test_brier_score_matches_sklearn_without_the_difficult_pairs():
    _, target, difficult = make_data(n=80, c=5, seed=11)
    probs = off_edge_probs(80, 5, seed=11)
    keep = ~difficult
    expected = brier_score_loss(target[keep].numpy(), probs[keep].numpy())
    assert brier_score(probs, target, difficult) == pytest.approx(100 * expected, abs=1e-9)
    assert compute_metrics(probs, target, difficult)["brier"] == pytest.approx(100 * expected, abs=1e-9)


def test_classwise_ece_matches_eq2_loop():
    _, target, difficult = make_data(n=60, c=4, seed=10)
    probs = off_edge_probs(60, 4, seed=10)
    probs[:3, 0] = torch.tensor([0.0, 1.0, 2 / 15], dtype=torch.float64)  # edges too
    difficult[:, 3] = True  # class with no evaluated pair: skipped
    ece = expected_calibration_error(probs, target, difficult, n_bins=10)
    assert ece == pytest.approx(eq2_classwise_ece(probs, target, difficult, 10), abs=1e-9)
    pooled = expected_calibration_error(probs, target, difficult, n_bins=10, classwise=False)
    assert ece != pytest.approx(pooled)


def test_reliability_bins_match_loop():
    _, target, difficult = make_data(n=50, c=4, seed=11)
    probs = off_edge_probs(50, 4, seed=11) * 0.5  # upper bins stay empty
    bins = reliability_bins(probs, target, difficult, n_bins=10)
    assert set(bins) == {"lower", "upper", "confidence", "accuracy", "count"}
    assert bins["count"].sum().item() == (~difficult).sum().item()
    torch.testing.assert_close(bins["lower"], torch.arange(10, dtype=torch.float64) / 10)
    torch.testing.assert_close(bins["upper"], torch.arange(1, 11, dtype=torch.float64) / 10)
    keep = ~difficult
    p, y = probs[keep].tolist(), (target[keep] > 0.5).tolist()
    for b in range(10):
        members = [k for k in range(len(p)) if min(int(p[k] * 10), 9) == b]
        assert bins["count"][b].item() == len(members)
        if members:
            conf = sum(p[k] for k in members) / len(members)
            acc = sum(y[k] for k in members) / len(members)
            assert bins["confidence"][b].item() == pytest.approx(conf)
            assert bins["accuracy"][b].item() == pytest.approx(acc)
        else:
            assert math.isnan(bins["confidence"][b]) and math.isnan(bins["accuracy"][b])
    assert bins["count"][5:].sum() == 0
    # The drawn bins are the pooled ECE's bins.
    n = bins["count"].sum().item()
    nonempty = bins["count"] > 0
    gaps = (bins["accuracy"] - bins["confidence"]).abs()[nonempty]
    from_bins = 100 * (bins["count"][nonempty] / n * gaps).sum().item()
    pooled = expected_calibration_error(probs, target, difficult, n_bins=10, classwise=False)
    assert pooled == pytest.approx(from_bins)


# ---------------------------------------------------------------- unknown labels (docs/datasets.md#missing-labels)


def test_unknown_pairs_are_left_out_of_every_metric_against_sklearn_and_torchmetrics():
    scores, target, difficult = make_data(n=150, c=5, seed=12)
    probs = off_edge_probs(150, 5, seed=12)
    g = torch.Generator().manual_seed(12)
    unknown = (torch.rand(150, 5, generator=g) < 0.3) & ~difficult
    stored = target.masked_fill(unknown, -1.0)
    keep = ~difficult & ~unknown
    # AP of each class over its known, not difficult images only.
    for column in range(5):
        rows = keep[:, column]
        expected = average_precision_score(target[rows, column].numpy(), scores[rows, column].numpy())
        assert per_class_average_precision(scores, stored, difficult)[column].item() == pytest.approx(expected)
    # F1 family: an unknown pair is neither a true nor a false positive.
    y_true, y_pred = (target > 0.5).numpy(), (scores >= 0.5).numpy()
    assert_metrics_close(threshold_metrics(scores, stored, difficult),
                         sklearn_threshold_metrics(y_true, y_pred, keep.numpy()))
    # With --eval-difficult-negative, difficult pairs count as negatives; unknown pairs still do not count.
    as_negative = threshold_metrics(scores, stored, difficult, difficult_as_negative=True)
    assert_metrics_close(as_negative, sklearn_threshold_metrics(((target > 0.5) & ~difficult).numpy(), y_pred,
                                                                (~unknown).numpy()))
    encoded = target.long().masked_fill(~keep, -1)
    pooled = BinaryCalibrationError(n_bins=15, norm="l1", ignore_index=-1)(probs.flatten(), encoded.flatten()).item()
    assert expected_calibration_error(probs, stored, difficult, classwise=False) == pytest.approx(100 * pooled,
                                                                                                  abs=1e-4)
    brier = brier_score_loss(target[keep].numpy(), probs[keep].numpy())
    assert brier_score(probs, stored, difficult) == pytest.approx(100 * brier, abs=1e-9)
    assert expected_calibration_error(probs, stored, difficult, n_bins=10) == pytest.approx(
        eq2_classwise_ece(probs, target, difficult | unknown, 10), abs=1e-9)


def test_unknown_labels_by_hand():
    scores = torch.tensor([[0.9, 0.8], [0.7, 0.2], [0.4, 0.6], [0.1, 0.3]], dtype=torch.float64)
    target = torch.tensor([[1.0, -1.0], [0.0, 1.0], [1.0, -1.0], [-1.0, 0.0]])
    # Class 0 ranks (known) 0.9 +, 0.7 -, 0.4 +: AP = (1/1 + 2/3) / 2. Class 1 ranks 0.3 -, 0.2 +: AP = 1/2.
    assert per_class_average_precision(scores, target, torch.zeros(4, 2, dtype=torch.bool)).tolist() == \
        pytest.approx([(1 + 2 / 3) / 2, 0.5])
    assert compute_metrics(scores, target, torch.zeros(4, 2, dtype=torch.bool))["brier"] == pytest.approx(
        100 * ((0.1**2 + 0.7**2 + 0.6**2) + (0.8**2 + 0.3**2)) / 5)
