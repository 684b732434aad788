import math

import pytest
import torch
from sklearn.metrics import average_precision_score

from udtimm.metric_statistics import (
    AP_BINS,
    EXACT_PAIRS_LIMIT,
    LOGIT_RANGE,
    MetricStatistics,
    binned_evaluation,
    exact_size,
    score_bins,
)
from udtimm.metrics import compute_metrics, difficult_subset, evaluated_pairs, metric_names, reliability_bins

# Summed in float64 over the batches rather than over all pairs at once: equal up to the order of the additions.
# Every other metric but AP comes from integer counts, identical in both paths.
SUMMED = ("ece", "ece_pooled", "brier")
BINNED = ("map", "map_difficult", "map_head", "map_medium", "map_tail")
MAP_TOLERANCE = 0.05  # percentage points, docs/method.md#evaluation-in-bounded-memory


def digits_like(n: int = 1000, c: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 probabilities of a model near the digits runs' 89 % mAP (positive logits around +2.5, negative
    around -2.5, both spread by 2), targets with unknown labels (-1) and difficult flags on a fifth of the images."""
    g = torch.Generator().manual_seed(seed)
    positive = torch.rand(n, c, generator=g) < 0.2
    logits = torch.randn(n, c, generator=g) * 2.0 + torch.where(positive, 2.5, -2.5)
    difficult = (torch.rand(n, c, generator=g) < 0.1) & (torch.rand(n, 1, generator=g) < 0.2)
    unknown = (torch.rand(n, c, generator=g) < 0.05) & ~difficult
    target = positive.float().masked_fill(unknown, -1.0)
    return torch.sigmoid(logits), target, difficult


def sharp_many_classes(positive_logit: float, negative_logit: float, n: int = 300, c: int = 10_000,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 10,000-class set as sure of itself as a large OpenImages model: each class present in up to 2 % of the
    images, logits around `positive_logit` and `negative_logit` (spread by 3); difficult flags on a tenth of the
    images."""
    g = torch.Generator().manual_seed(seed)
    positive = torch.rand(n, c, generator=g) < torch.rand(c, generator=g) * 0.02
    logits = torch.randn(n, c, generator=g) * 3.0 + torch.where(positive, positive_logit, negative_logit)
    difficult = (torch.rand(n, c, generator=g) < 0.001) & (torch.rand(n, 1, generator=g) < 0.1)
    return torch.sigmoid(logits), positive.float(), difficult


def binned(scores: torch.Tensor, target: torch.Tensor, difficult: torch.Tensor, batch: int = 64,
           **options: object) -> MetricStatistics:
    statistics = MetricStatistics(scores.shape[1], **options)
    for rows in torch.arange(len(scores)).split(batch):
        statistics.update(scores[rows], target[rows], difficult[rows])
    return statistics


def assert_binned_matches_exact(found: dict[str, float], exact: dict[str, float]) -> dict[str, float]:
    """Every key, in order: AP within MAP_TOLERANCE, the sums up to float64 rounding, the rest equal; returns
    binned - exact mAP and Difficult mAP."""
    assert list(found) == list(exact)
    for name, value in exact.items():
        if name in BINNED and not math.isnan(value):
            assert abs(found[name] - value) <= MAP_TOLERANCE, (name, found[name], value)
        elif name in SUMMED:
            assert found[name] == pytest.approx(value, rel=1e-12), name
        else:
            assert found[name] == value or (math.isnan(found[name]) and math.isnan(value)), name
    return {name: found[name] - exact[name] for name in BINNED if not math.isnan(exact[name])}


@pytest.mark.parametrize("difficult_as_negative", [False, True], ids=["difficult-ignored", "difficult-negative"])
@pytest.mark.parametrize("topk", [3, 5])
def test_binned_metrics_equal_the_exact_ones_on_digits_like_scores(difficult_as_negative: bool, topk: int) -> None:
    scores, target, difficult = digits_like()
    options = {"topk": topk, "difficult_as_negative": difficult_as_negative}
    exact = compute_metrics(scores, target, difficult, **options)
    assert 0 < difficult_subset(difficult).sum() < len(scores) and exact["map"] < 95  # AP has ties to get wrong
    gap = assert_binned_matches_exact(binned(scores, target, difficult, **options).compute(), exact)
    assert all(value < 0 for value in gap.values())  # measured: -0.025 and -0.010 (a bin ranks its pairs together)


@pytest.mark.slow
@pytest.mark.parametrize(("positive_logit", "negative_logit"), [(7.0, -9.0), (-4.0, -12.0)],
                         ids=["near-1-and-0", "all-near-0"])
def test_binned_map_is_within_tolerance_of_exact_on_10000_sharply_confident_classes(positive_logit: float,
                                                                                    negative_logit: float) -> None:
    """Probabilities within 1e-3 of 0 or 1 for most pairs: positives near 1 and negatives near 0, or a rare class's
    positives near 0 too (where bins uniform in probability lose 0.66 mAP). Measured: -0.0002 and -0.028."""
    scores, target, difficult = sharp_many_classes(positive_logit, negative_logit)
    assert ((scores < 1e-3) | (scores > 1 - 1e-3)).float().mean() > 0.75
    exact = compute_metrics(scores, target, difficult, min_positives=2)
    assert exact["num_classes_evaluated"] > 5000 and exact["num_classes_few_positives"] > 1000
    assert_binned_matches_exact(binned(scores, target, difficult, min_positives=2).compute(), exact)


def test_statistics_of_separate_batches_add_up_to_those_of_one_batch() -> None:
    scores, target, difficult = digits_like(n=300)
    whole = binned(scores, target, difficult, batch=300)
    parts = binned(scores, target, difficult, batch=7)
    halves = binned(scores[:150], target[:150], difficult[:150]) + binned(scores[150:], target[150:], difficult[150:])
    for summed in (parts, halves):
        for name, total in whole.sums.items():
            if total.is_floating_point():
                torch.testing.assert_close(summed.sums[name], total, rtol=1e-12, atol=1e-12, msg=name)
            else:  # the AP counts
                assert torch.equal(summed.sums[name], total), name
    assert halves.compute() == pytest.approx(whole.compute(), rel=1e-12, nan_ok=True)


def test_left_out_images_count_in_no_statistic() -> None:
    scores, target, difficult = digits_like(n=200)
    counted = torch.rand(200, generator=torch.Generator().manual_seed(1)) < 0.7
    with_mask = MetricStatistics(10)
    with_mask.update(scores, target, difficult, counted)
    assert with_mask.compute() == pytest.approx(binned(scores[counted], target[counted], difficult[counted],
                                                       batch=200).compute(), rel=1e-12, nan_ok=True)


def test_binned_ap_is_sklearn_average_precision_of_the_scores_rounded_to_their_bins() -> None:
    scores, target, difficult = digits_like(n=400)
    statistics = binned(scores, target, difficult, ap_bins=64)  # coarse: many bins hold positives and negatives
    keep = evaluated_pairs(target, difficult)
    subset = difficult_subset(difficult)
    bins = score_bins(scores, 64)
    for images, ap in ((torch.ones(400, dtype=torch.bool), statistics.average_precision()),
                       (subset, statistics.average_precision(difficult_images=True))):
        for c in range(10):
            rows = keep[:, c] & images
            expected = average_precision_score(target[rows, c].numpy() > 0.5, bins[rows, c].numpy())
            assert ap[c].item() == pytest.approx(expected, abs=1e-12), c


@pytest.mark.parametrize("min_positives", [1, 25, 40])
def test_min_positives_leaves_out_the_same_classes_in_both_paths(min_positives: int) -> None:
    scores, target, difficult = digits_like(n=250)
    target[:, 3] = (target[:, 3] > 0) & (torch.arange(250) < 100)  # fewer positives for some classes
    target[:, 7] = (target[:, 7] > 0) & (torch.arange(250) < 150)
    exact = compute_metrics(scores, target, difficult, min_positives=min_positives)
    assert_binned_matches_exact(binned(scores, target, difficult, min_positives=min_positives).compute(), exact)
    if min_positives > 1:  # some classes left out, some kept: the option is measured
        assert exact["num_classes_few_positives"] > 0 and exact["num_classes_evaluated"] > 0


def test_class_groups_average_the_same_classes_in_both_paths() -> None:
    scores, target, difficult = digits_like()
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    exact = compute_metrics(scores, target, difficult, class_groups=groups)
    assert all(not math.isnan(exact[name]) for name in ("map_head", "map_medium", "map_tail"))
    assert_binned_matches_exact(binned(scores, target, difficult, class_groups=groups).compute(), exact)


def test_reliability_bins_are_those_of_the_pairs() -> None:
    scores, target, difficult = digits_like(n=200)
    found, expected = binned(scores, target, difficult).reliability_bins(), reliability_bins(scores, target, difficult)
    assert set(found) == set(expected)
    for name, values in expected.items():
        torch.testing.assert_close(found[name], values, rtol=1e-12, atol=1e-12, equal_nan=True, msg=name)


def test_keys_follow_topk_and_empty_sets_give_nan() -> None:
    statistics = MetricStatistics(4, topk=5)
    statistics.update(torch.full((2, 4), 0.5), torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bool))
    values = statistics.compute()
    assert tuple(values) == metric_names(5)
    assert math.isnan(values["map"]) and math.isnan(values["map_difficult"]) and values["num_images"] == 2


def test_bins_are_uniform_in_logit_and_open_at_both_ends() -> None:
    logits = torch.tensor([-LOGIT_RANGE - 50, -LOGIT_RANGE + 1e-6, -1e-9, 1e-9, LOGIT_RANGE - 1e-6, 40.0])
    bins = score_bins(torch.sigmoid(logits.double()), 8)
    assert bins.tolist() == [0, 0, 3, 4, 7, 7]
    probabilities = torch.tensor([0.0, 1e-30, 1e-6, 0.5, 1 - 1e-6, 1.0], dtype=torch.float64)
    assert score_bins(probabilities, AP_BINS).diff().ge(0).all()  # the ranking is kept
    # 1e-6 and 1 - 1e-6 sit symmetrically, far from the end bins: a bin uniform in probability would be the first
    # and the last.
    low, high = score_bins(probabilities[2:5:2], AP_BINS).tolist()
    assert 0 < low and high < AP_BINS - 1 and low + high == AP_BINS - 1


def test_auto_evaluates_exactly_up_to_the_limit() -> None:
    assert not binned_evaluation("auto", 40_504, 80)  # COCO's val2014
    assert binned_evaluation("auto", 125_436, 9_605)  # OpenImages' validation set
    limit_images = EXACT_PAIRS_LIMIT // 1000
    assert not binned_evaluation("auto", limit_images, 1000) and binned_evaluation("auto", limit_images + 1, 1000)
    assert binned_evaluation("binned", 1, 1) and not binned_evaluation("exact", 10**6, 10**4)
    with pytest.raises(ValueError, match="--eval-memory"):
        binned_evaluation("fast", 1, 1)
    assert exact_size(125_436, 9_605) == "125,436 images x 9,605 classes x 16 bytes = 19.3 GB"
    assert exact_size(40, 10) == "40 images x 10 classes x 16 bytes = 6.4 kB"
