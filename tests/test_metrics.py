import math

import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_fscore_support
from torchmetrics.classification import MultilabelAveragePrecision

from udtimm.metrics import (
    GROUP_COLUMNS,
    METRIC_NAMES,
    average_precision,
    compute_metrics,
    difficult_subset,
    expected_calibration_error,
    mean_average_precision,
    metric_names,
    per_class_average_precision,
    threshold_metrics,
)


def make_data(n=120, c=6, seed=0, p_pos=0.3, p_difficult=0.1):
    """Untied scores (a permutation), multi-hot target, difficult mask; every class has a positive."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randperm(n * c, generator=g).reshape(n, c).double() + 0.5) / (n * c)
    target = (torch.rand(n, c, generator=g) < p_pos).float()
    difficult = torch.rand(n, c, generator=g) < p_difficult
    # Difficult pairs are stored as present, as with `--difficult positive` loaders: the metrics
    # must not care.
    target[difficult] = 1.0
    assert ((target > 0) & ~difficult).any(0).all()
    return scores, target, difficult


# ---------------------------------------------------------------- AP / mAP


def test_average_precision_matches_sklearn():
    scores, target, difficult = make_data(n=200, c=1, seed=1)
    s, t, d = scores[:, 0], target[:, 0], difficult[:, 0]
    assert average_precision(s, t) == pytest.approx(average_precision_score(t, s), abs=1e-12)
    keep = ~d
    expected = average_precision_score(t[keep], s[keep])
    assert average_precision(s, t, ignore=d) == pytest.approx(expected, abs=1e-12)
    # The ignore mask must change the answer here, or the check above proves nothing.
    assert abs(average_precision(s, t) - expected) > 1e-6


def test_per_class_average_precision_matches_sklearn_with_difficult():
    scores, target, difficult = make_data(seed=2)
    ap = per_class_average_precision(scores, target, difficult)
    assert ap.dtype == torch.float64 and ap.shape == (6,)
    expected = []
    for c in range(6):
        keep = ~difficult[:, c]
        expected.append(average_precision_score(target[keep, c], scores[keep, c]))
    torch.testing.assert_close(ap, torch.tensor(expected, dtype=torch.float64))
    assert mean_average_precision(scores, target, difficult) == pytest.approx(100 * sum(expected) / 6)


def test_per_class_average_precision_matches_torchmetrics_ignore_index():
    scores, target, difficult = make_data(seed=3)
    encoded = target.long()
    encoded[difficult] = -1
    metric = MultilabelAveragePrecision(num_labels=6, average=None, ignore_index=-1)
    expected = metric(scores.float(), encoded).double()
    ap = per_class_average_precision(scores, target, difficult)
    torch.testing.assert_close(ap, expected, atol=1e-6, rtol=0)


def test_average_precision_hand_computed():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    target = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    # Positives at ranks 1, 3, 5: precision 1/1, 2/3, 3/5 -> (1 + 2/3 + 3/5) / 3 = 34/45.
    assert average_precision(scores, target) == pytest.approx(34 / 45)
    # Ignoring the negative at rank 2 leaves ranks 1, 2, 4: (1 + 2/2 + 3/4) / 3 = 11/12.
    ignore = torch.tensor([False, True, False, False, False])
    assert average_precision(scores, target, ignore) == pytest.approx(11 / 12)


def test_average_precision_ties_follow_input_order():
    # Tied scores are ranked by a stable sort: the earlier image ranks first.
    scores = torch.tensor([0.5, 0.5, 0.5, 0.2])
    # Ranking 0(neg), 1(pos), 2(pos), 3(neg): (1/2 + 2/3) / 2 = 7/12.
    assert average_precision(scores, torch.tensor([0.0, 1.0, 1.0, 0.0])) == pytest.approx(7 / 12)
    # Same tie group, positives first: (1/1 + 2/2) / 2 = 1.
    assert average_precision(scores, torch.tensor([1.0, 1.0, 0.0, 0.0])) == pytest.approx(1.0)
    # A large tie group too (unstable sorts reorder those): 50 positives listed first give AP 1.
    many = torch.full((150,), 0.5)
    assert average_precision(many, (torch.arange(150) < 50).float()) == 1.0
    # sklearn instead scores the whole tie group at one threshold: precision 2/3 at recall 1.
    assert average_precision_score([0, 1, 1, 0], scores.numpy()) == pytest.approx(2 / 3)


def test_classes_without_positive_are_skipped():
    scores, target, difficult = make_data(n=40, c=4, seed=4)
    target[:, 2] = 0.0
    target[:, 3] = 0.0
    difficult[:, 3] = False
    target[7, 3] = 1.0
    difficult[7, 3] = True  # class 3's only positive is difficult
    ap = per_class_average_precision(scores, target, difficult)
    assert torch.isnan(ap[2:]).all() and torch.isfinite(ap[:2]).all()
    assert mean_average_precision(scores, target, difficult) == pytest.approx(100 * ap[:2].mean().item())
    # CR skips classes 2 and 3 too (the loop reference averages recall over classes with a positive).
    expected = reference_threshold_metrics(scores, target, difficult, 0.5, None, False)
    assert_metrics_close(threshold_metrics(scores, target, difficult), expected)
    metrics = compute_metrics(scores, target, difficult)
    assert metrics["num_classes_evaluated"] == 2.0
    assert metrics["map"] == pytest.approx(100 * ap[:2].mean().item())


def reference_map(scores, target, difficult, min_positives):
    """mAP over the classes with at least `min_positives` evaluated positives (sklearn's AP of each), and the
    numbers of classes averaged and left out for having fewer, by a plain loop."""
    aps, few = [], 0
    for c in range(scores.shape[1]):
        rows = ~difficult[:, c] & (target[:, c] >= 0)
        positives = int((target[rows, c] > 0.5).sum())
        if positives >= min_positives:
            aps.append(average_precision_score(target[rows, c].numpy() > 0.5, scores[rows, c].numpy()))
        elif positives > 0:
            few += 1
    return (100 * sum(aps) / len(aps) if aps else math.nan), len(aps), few


@pytest.mark.parametrize("min_positives", [1, 25, 30])
def test_min_positives_leaves_out_classes_with_fewer_evaluated_positives(min_positives):
    scores, target, difficult = make_data(n=120, c=6, seed=15)
    target[60:, 2] = 0.0  # classes with fewer positives than the others
    target[90:, 4] = -1.0  # unknown labels are no positives
    expected, classes, few = reference_map(scores, target, difficult, min_positives)
    subset = difficult_subset(difficult)
    expected_difficult = reference_map(scores[subset], target[subset], difficult[subset], min_positives)[0]
    metrics = compute_metrics(scores, target, difficult, min_positives=min_positives)
    assert metrics["map"] == pytest.approx(expected, abs=1e-9)
    assert metrics["map_difficult"] == pytest.approx(expected_difficult, abs=1e-9, nan_ok=True)
    assert (metrics["num_classes_evaluated"], metrics["num_classes_few_positives"]) == (classes, few)
    assert mean_average_precision(scores, target, difficult, min_positives) == metrics["map"]
    if min_positives == 1:
        assert few == 0 and metrics == compute_metrics(scores, target, difficult)  # the default
    else:
        assert 0 < few and 0 < classes  # some classes left out, some kept: the option is measured


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        per_class_average_precision(torch.rand(3, 2), torch.zeros(3, 3), torch.zeros(3, 2).bool())
    with pytest.raises(ValueError):
        average_precision(torch.rand(3, 2), torch.zeros(3, 2))


# ---------------------------------------------------------------- CP ... OF1


def reference_threshold_metrics(scores, target, difficult, threshold, topk, as_negative):
    """Plain-loop ML-GCN counts over (image, class) pairs, written independently of metrics.py."""
    n, c = scores.shape
    tp, n_pred, n_pos = [0] * c, [0] * c, [0] * c
    for i in range(n):
        row = scores[i].tolist()
        ranked = sorted(range(c), key=lambda j: -row[j])  # sorted() is stable
        allowed = set(ranked[:topk]) if topk is not None else set(range(c))
        for j in range(c):
            is_difficult = bool(difficult[i, j])
            if is_difficult and not as_negative:
                continue
            pos = bool(target[i, j] > 0.5) and not is_difficult
            pred = j in allowed and row[j] >= threshold
            tp[j] += pos and pred
            n_pred[j] += pred
            n_pos[j] += pos
    cp = sum(t / p if p else 0.0 for t, p in zip(tp, n_pred, strict=True)) / c
    recalls = [t / p for t, p in zip(tp, n_pos, strict=True) if p]
    cr = sum(recalls) / len(recalls)
    op = sum(tp) / sum(n_pred) if sum(n_pred) else 0.0
    orr = sum(tp) / sum(n_pos)

    def f1(p, r):
        return 2 * p * r / (p + r) if p + r else 0.0

    values = {"cp": cp, "cr": cr, "cf1": f1(cp, cr), "op": op, "or": orr, "of1": f1(op, orr)}
    return {k: 100 * v for k, v in values.items()}


def sklearn_threshold_metrics(y_true, y_pred, keep):
    """CP/CR/CF1/OP/OR/OF1 from sklearn on the evaluated pairs of each class."""
    precisions, recalls = [], []
    for c in range(y_true.shape[1]):
        k = keep[:, c]
        p, r, _, _ = precision_recall_fscore_support(y_true[k, c], y_pred[k, c], average="binary", zero_division=0)
        precisions.append(p)
        recalls.append(r)
    cp, cr = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    op, orr, of1, _ = precision_recall_fscore_support(y_true[keep], y_pred[keep], average="binary", zero_division=0)
    cf1 = 2 * cp * cr / (cp + cr)
    values = {"cp": cp, "cr": cr, "cf1": cf1, "op": op, "or": orr, "of1": of1}
    return {k: 100 * v for k, v in values.items()}


def assert_metrics_close(actual, expected):
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-9), key


def test_threshold_metrics_match_sklearn():
    scores, target, difficult = make_data(n=150, c=6, seed=5)
    scores[:, 0] *= 0.4  # class 0 never predicted: its precision counts as 0
    y_true = (target > 0.5).numpy()
    y_pred = (scores >= 0.5).numpy()
    metrics = threshold_metrics(scores, target, difficult)
    assert metrics["cp"] > 0
    assert_metrics_close(metrics, sklearn_threshold_metrics(y_true, y_pred, (~difficult).numpy()))
    # CF1 comes from the averaged CP and CR, not from the mean of per-class F1 scores.
    _, _, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert abs(metrics["cf1"] - 100 * f1) > 1e-3


def test_threshold_metrics_difficult_as_negative_matches_sklearn():
    scores, target, difficult = make_data(n=150, c=6, seed=6, p_difficult=0.2)
    y_true = ((target > 0.5) & ~difficult).numpy()
    y_pred = (scores >= 0.3).numpy()
    keep_all = torch.ones_like(difficult).numpy()
    metrics = threshold_metrics(scores, target, difficult, threshold=0.3, difficult_as_negative=True)
    assert_metrics_close(metrics, sklearn_threshold_metrics(y_true, y_pred, keep_all))
    # Difficult pairs predicted positive become false positives, so precision drops.
    left_out = threshold_metrics(scores, target, difficult, threshold=0.3)
    assert metrics["op"] < left_out["op"]


@pytest.mark.parametrize("as_negative", [False, True])
def test_threshold_metrics_top3_matches_loop(as_negative):
    scores, target, difficult = make_data(n=80, c=8, seed=7)
    scores[0] = 0.9  # a full tie: the first three classes win
    scores[1, :4] = 0.95
    metrics = threshold_metrics(scores, target, difficult, topk=3, difficult_as_negative=as_negative)
    expected = reference_threshold_metrics(scores, target, difficult, 0.5, 3, as_negative)
    assert_metrics_close(metrics, expected)
    plain = threshold_metrics(scores, target, difficult, difficult_as_negative=as_negative)
    assert metrics["or"] < plain["or"]


def test_threshold_metrics_loop_reference_agrees_without_topk():
    scores, target, difficult = make_data(n=60, c=5, seed=8)
    expected = reference_threshold_metrics(scores, target, difficult, 0.5, None, False)
    assert_metrics_close(threshold_metrics(scores, target, difficult), expected)


# ---------------------------------------------------------------- compute_metrics


def test_top_k_columns_are_named_after_k():
    scores, target, difficult = make_data(n=100, c=6, seed=12)
    top5 = compute_metrics(scores, target, difficult, topk=5)
    assert tuple(top5) == metric_names(5) and metric_names() == METRIC_NAMES
    renamed = {name: name.replace("_top3", "_top5") for name in METRIC_NAMES}
    assert metric_names(5) == tuple(renamed.values()) != METRIC_NAMES
    expected = threshold_metrics(scores, target, difficult, topk=5)
    assert {name: top5[f"{name}_top5"] for name in expected} == pytest.approx(expected)
    assert top5["cr_top5"] > compute_metrics(scores, target, difficult)["cr_top3"]  # more labels: more recall


def test_difficult_subset():
    difficult = torch.tensor([[False, True], [False, False], [True, True]])
    assert difficult_subset(difficult).tolist() == [True, False, True]


def test_compute_metrics_keys_and_consistency():
    scores, target, difficult = make_data(n=100, c=6, seed=12)
    metrics = compute_metrics(scores, target, difficult)
    assert tuple(metrics) == METRIC_NAMES
    assert all(isinstance(v, float) for v in metrics.values())
    subset = difficult_subset(difficult)
    assert 0 < subset.sum() < 100
    expected = mean_average_precision(scores[subset], target[subset], difficult[subset])
    assert metrics["map_difficult"] == pytest.approx(expected)
    assert metrics["map_difficult"] != pytest.approx(metrics["map"])
    assert metrics["map"] == pytest.approx(mean_average_precision(scores, target, difficult))
    top3 = threshold_metrics(scores, target, difficult, topk=3)
    assert all(metrics[f"{k}_top3"] == pytest.approx(v) for k, v in top3.items())
    assert metrics["ece"] == pytest.approx(expected_calibration_error(scores, target, difficult))
    assert metrics["ece_pooled"] == pytest.approx(
        expected_calibration_error(scores, target, difficult, classwise=False)
    )
    assert metrics["num_images"] == 100.0 and metrics["num_classes_evaluated"] == 6.0


def test_degenerate_inputs():
    scores, target, _ = make_data(n=30, c=4, seed=13, p_difficult=0.0)
    target[:, 0] = 0.0
    target[:, 1] = 1.0
    target[0, 2:] = 0.0  # the N = 1 case below has only class 1 positive
    no_difficult = torch.zeros(30, 4, dtype=torch.bool)
    ap = per_class_average_precision(scores, target, no_difficult)
    assert math.isnan(ap[0]) and ap[1].item() == 1.0
    metrics = compute_metrics(scores, target, no_difficult)
    assert math.isnan(metrics["map_difficult"])
    assert metrics["num_classes_evaluated"] == 3.0
    assert all(math.isfinite(v) for k, v in metrics.items() if k not in ("map_difficult", *GROUP_COLUMNS))
    assert all(math.isnan(metrics[name]) for name in GROUP_COLUMNS)  # no class groups given

    one = compute_metrics(scores[:1], target[:1], no_difficult[:1])
    assert one["num_images"] == 1.0 and one["num_classes_evaluated"] == 1.0
    assert one["map"] == 100.0 and math.isnan(one["map_difficult"])


def test_group_map_is_sklearn_ap_averaged_over_each_group_and_nan_for_an_empty_one():
    scores, target, difficult = make_data(n=200, c=6, seed=21)
    groups = torch.tensor([0, 2, 0, 2, 0, 0])  # no medium class
    metrics = compute_metrics(scores, target, difficult, class_groups=groups, min_positives=1)
    keep = ~difficult
    ap = [100 * average_precision_score(target[keep[:, c], c] > 0, scores[keep[:, c], c]) for c in range(6)]
    assert metrics["map_head"] == pytest.approx(sum(ap[c] for c in (0, 2, 4, 5)) / 4, abs=1e-9)
    assert metrics["map_tail"] == pytest.approx((ap[1] + ap[3]) / 2, abs=1e-9)
    assert math.isnan(metrics["map_medium"])
    assert metrics["map"] == pytest.approx(sum(ap) / 6, abs=1e-9)


def test_everything_difficult_gives_nan_not_crash():
    scores, target, _ = make_data(n=10, c=3, seed=14)
    difficult = torch.ones(10, 3, dtype=torch.bool)
    metrics = compute_metrics(scores, target, difficult)
    assert metrics["num_classes_evaluated"] == 0.0
    assert math.isnan(metrics["map"]) and math.isnan(metrics["ece"])
    assert math.isnan(metrics["map_difficult"]) and math.isnan(metrics["cr"])
