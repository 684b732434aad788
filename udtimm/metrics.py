"""Multi-label metrics: AP/mAP, ML-GCN CP/CR/CF1/OP/OR/OF1, ECE (Eq. 2), reliability bins.

Inputs are probabilities ``scores`` [N, C] (the caller applies the sigmoid), a multi-hot
``target`` [N, C] (float or bool; -1 marks an unknown label, docs/datasets.md#missing-labels) and a bool
``difficult`` mask [N, C] (docs/method.md#difficult-labels). Difficult (image, class) pairs are left out of
every metric unless an option says otherwise, so the target value stored at a difficult pair never matters;
unknown pairs are left out of every metric, always. Computed in float64; percentages
are returned as Python floats.
"""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MetricColumn:
    """A column of summary.csv and results.csv, and where else it shows."""

    name: str
    heading: str  # in the report's table
    epoch_table: bool = False  # printed after every epoch
    report: bool = True  # a column of the report's table (the paper's Tables 2-3)
    percent: bool = True  # a percentage (printed with the final results), else a count
    lower_is_better: bool = False
    top_of: str | None = None  # a top-k column: the metric it restricts to each image's k best labels

    def name_at(self, topk: int) -> str:
        """The column's name when the top-k metrics take `topk` labels (`name` is the one at TOPK)."""
        return self.name if self.top_of is None else f"{self.top_of}_top{topk}"


# The paper's top-3 metrics: train.py and distill.py evaluate with k = 3, validate.py --topk takes any k.
TOPK = 3


def _top(metric: str, heading: str) -> MetricColumn:
    return MetricColumn(f"{metric}_top{TOPK}", f"{heading}@{TOPK}", top_of=metric)


# Adding a metric: compute it in compute_metrics and declare its column here; the epoch table, the final
# results, summary.csv, results.csv and udtimm.report read this list.
METRIC_COLUMNS: tuple[MetricColumn, ...] = (
    MetricColumn("map", "mAP", epoch_table=True),
    MetricColumn("cp", "CP"),
    MetricColumn("cr", "CR"),
    MetricColumn("cf1", "CF1", epoch_table=True),
    MetricColumn("op", "OP"),
    MetricColumn("or", "OR"),
    MetricColumn("of1", "OF1", epoch_table=True),
    _top("cp", "CP"),
    _top("cr", "CR"),
    _top("cf1", "CF1"),
    _top("op", "OP"),
    _top("or", "OR"),
    _top("of1", "OF1"),
    MetricColumn("map_difficult", "Difficult mAP", epoch_table=True),
    # By the classes' training positives (udtimm.class_counts): nan where the run knows no counts or a group is empty.
    MetricColumn("map_head", "head mAP"),
    MetricColumn("map_medium", "medium mAP"),
    MetricColumn("map_tail", "tail mAP"),
    MetricColumn("ece", "ECE", epoch_table=True, lower_is_better=True),
    MetricColumn("ece_pooled", "pooled ECE", report=False, lower_is_better=True),
    MetricColumn("brier", "Brier", report=False, lower_is_better=True),
    MetricColumn("num_images", "images", report=False, percent=False),
    MetricColumn("num_classes_evaluated", "classes evaluated", report=False, percent=False),
    MetricColumn("num_classes_few_positives", "classes under --min-positives", report=False, percent=False),
)
METRIC_NAMES: tuple[str, ...] = tuple(column.name for column in METRIC_COLUMNS)


def metric_names(topk: int = TOPK) -> tuple[str, ...]:
    """The keys of compute_metrics(topk=...): METRIC_NAMES with the top-k columns named after k."""
    return tuple(column.name_at(topk) for column in METRIC_COLUMNS)

_NAN = float("nan")


def prepare(scores: Tensor, target: Tensor, difficult: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Scores as float64, target as bool (positive), and the bool mask of evaluated (known, non-difficult) pairs."""
    if difficult is None:
        difficult = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if target.shape != scores.shape or difficult.shape != scores.shape:
        raise ValueError(
            f"shape mismatch: scores {tuple(scores.shape)}, target {tuple(target.shape)}, "
            f"difficult {tuple(difficult.shape)}"
        )
    # Thresholding at 0.5 reads float and bool multi-hot targets alike.
    positive = target.to(torch.float64) > 0.5
    return scores.to(torch.float64), positive, evaluated_pairs(target, difficult)


def known_pairs(target: Tensor) -> Tensor:
    """Bool [N, C]: the annotated pairs (an unknown label is stored as a negative target, -1)."""
    return target.to(torch.float64) >= 0


def evaluated_pairs(target: Tensor, difficult: Tensor) -> Tensor:
    """Bool [N, C]: the pairs that metrics count, known and not difficult."""
    return known_pairs(target) & ~difficult.to(torch.bool)


def _ap_columns(scores: Tensor, positive: Tensor, keep: Tensor) -> Tensor:
    """Non-interpolated AP of each column of [N, C]; nan where a column has no kept positive."""
    # Stable sort: tied scores keep their input order (lower image index ranks first).
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices
    hit = (positive & keep).gather(0, order).to(torch.float64)
    # Left-out pairs add to neither cumulative count, which removes them from the ranking.
    rank = keep.gather(0, order).to(torch.float64).cumsum(0)
    # clamp: leading left-out rows have rank 0 and would turn 0 * (0 / 0) into nan.
    precision = hit.cumsum(0) / rank.clamp(min=1)
    n_pos = hit.sum(0)
    ap = (precision * hit).sum(0) / n_pos.clamp(min=1)
    return torch.where(n_pos > 0, ap, torch.full_like(ap, _NAN))


def average_precision(scores: Tensor, target: Tensor, ignore: Tensor | None = None) -> float:
    """Non-interpolated AP of one class (docs/method.md#ap-and-map); ``ignore`` pairs are removed first."""
    if scores.dim() != 1:
        raise ValueError(f"average_precision expects 1-D scores, got {tuple(scores.shape)}")
    s, positive, keep = prepare(scores, target, ignore)
    return _ap_columns(s[:, None], positive[:, None], keep[:, None]).item()


def per_class_average_precision(scores: Tensor, target: Tensor, difficult: Tensor) -> Tensor:
    """Per-class non-interpolated AP (docs/method.md#ap-and-map), [C] float64, nan for classes without positive."""
    return _ap_columns(*prepare(scores, target, difficult))


def mean_average_precision(scores: Tensor, target: Tensor, difficult: Tensor, min_positives: int = 1) -> float:
    """mAP in percent (docs/method.md#ap-and-map) over classes with at least `min_positives` non-difficult
    positives; nan if none."""
    s, positive, keep = prepare(scores, target, difficult)
    return mean_over_classes(_ap_columns(s, positive, keep), (positive & keep).sum(0), min_positives)[0]


def mean_over_classes(ap: Tensor, positives: Tensor, min_positives: int = 1) -> tuple[float, int, int]:
    """mAP in percent over the classes with at least `min_positives` evaluated positives (docs/method.md#ap-and-map,
    --min-positives), the number of those classes, and the number left out for having some but fewer."""
    counted = positives >= max(min_positives, 1)  # a class without positive has no AP, whatever the minimum
    few = (positives > 0) & ~counted
    return 100.0 * ap[counted].mean().item(), int(counted.sum()), int(few.sum())


GROUP_COLUMNS = ("map_head", "map_medium", "map_tail")  # the order of udtimm.class_counts.CLASS_GROUPS


def group_means(ap: Tensor, positives: Tensor, groups: Tensor | None, min_positives: int = 1) -> dict[str, float]:
    """mAP in percent of each class group (`groups` [C]: index in GROUP_COLUMNS, from the training counts), as
    mean_over_classes; all nan without groups."""
    if groups is None:
        return dict.fromkeys(GROUP_COLUMNS, _NAN)
    groups = groups.to(ap.device)
    return {name: mean_over_classes(ap[groups == index], positives[groups == index], min_positives)[0]
            for index, name in enumerate(GROUP_COLUMNS)}


def _f1(precision: float, recall: float) -> float:
    """Harmonic mean; 0 when both are 0 instead of 0 / 0."""
    if precision + recall == 0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def predicted_labels(scores: Tensor, threshold: float | Tensor = 0.5, topk: int | None = None) -> Tensor:
    """[N, C] bool: probability >= threshold (one, or one per class [C]) and, with topk, among the image's topk
    highest (docs/method.md#top-3)."""
    predicted = scores >= threshold
    if topk is not None:
        # The stable sort breaks ties by class index, so at most topk classes per image are predicted.
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        in_topk = torch.zeros_like(predicted)
        in_topk.scatter_(1, order[:, :topk], True)
        predicted &= in_topk
    return predicted


def threshold_counts(scores: Tensor, target: Tensor, difficult: Tensor, threshold: float | Tensor = 0.5,
                     topk: int | None = None, difficult_as_negative: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Per class [C] (float64): true positives, predicted and positive pairs at `threshold` (docs/method.md#metrics)."""
    s, positive, keep = prepare(scores, target, difficult)
    # Ranked over all classes, difficult ones included: a classifier's top-k cannot know which labels are difficult.
    predicted = predicted_labels(s, threshold, topk)
    if difficult_as_negative:
        positive = positive & keep
        keep = known_pairs(target)
    predicted &= keep
    positive = positive & keep
    return tuple(counts.sum(0).to(torch.float64) for counts in (predicted & positive, predicted, positive))


def threshold_metrics(
    scores: Tensor,
    target: Tensor,
    difficult: Tensor,
    threshold: float | Tensor = 0.5,
    topk: int | None = None,
    difficult_as_negative: bool = False,
) -> dict[str, float]:
    """ML-GCN CP/CR/CF1/OP/OR/OF1 in percent (docs/method.md#cp-cr-cf1-op-or-of1), optionally top-k; one threshold
    or one per class."""
    return rates_from_counts(*threshold_counts(scores, target, difficult, threshold, topk, difficult_as_negative))


def rates_from_counts(tp: Tensor, n_predicted: Tensor, n_positive: Tensor) -> dict[str, float]:
    """ML-GCN CP/CR/CF1/OP/OR/OF1 in percent (docs/method.md#cp-cr-cf1-op-or-of1) from threshold_counts' per-class
    counts."""
    class_precision = torch.where(n_predicted > 0, tp / n_predicted.clamp(min=1), 0.0)
    cp = class_precision.mean().item()
    # A class without positives has no recall: it is skipped, not counted as 0 (ML-GCN's
    # code divided by zero there); CR is nan when no class has a positive.
    has_positive = n_positive > 0
    cr = (tp[has_positive] / n_positive[has_positive]).mean().item()
    total_tp = tp.sum().item()
    total_predicted = n_predicted.sum().item()
    total_positive = n_positive.sum().item()
    op = total_tp / total_predicted if total_predicted > 0 else 0.0
    or_ = total_tp / total_positive if total_positive > 0 else _NAN
    return {
        "cp": 100.0 * cp,
        "cr": 100.0 * cr,
        "cf1": 100.0 * _f1(cp, cr),
        "op": 100.0 * op,
        "or": 100.0 * or_,
        "of1": 100.0 * _f1(op, or_),
    }


def binned_sums(probs: Tensor, positive: Tensor, keep: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per column of [N, C] and per bin: pair count, sum of probabilities, sum of positives."""
    n_columns = probs.shape[1]
    # Bins [i/n, (i+1)/n) with the last one closed, so a probability of exactly 1 is counted.
    bin_index = (probs * n_bins).floor().long().clamp(0, n_bins - 1)
    cell = (bin_index + n_bins * torch.arange(n_columns, device=probs.device)).flatten()
    # Left-out pairs are weighted by 0 rather than masked out: boolean indexing is slower.
    weight = keep.to(torch.float64)
    sums = []
    for values in (weight, probs * weight, (positive & keep).to(torch.float64)):
        total = torch.zeros(n_columns * n_bins, dtype=torch.float64, device=probs.device)
        sums.append(total.index_add_(0, cell, values.flatten()).view(n_columns, n_bins))
    return sums[0], sums[1], sums[2]


def expected_calibration_error(
    probs: Tensor,
    target: Tensor,
    difficult: Tensor | None = None,
    n_bins: int = 15,
    classwise: bool = True,
) -> float:
    """Eq. 2 ECE in percent: classwise mean of per-class ECE, or one pooled histogram."""
    p, positive, keep = prepare(probs, target, difficult)
    if not classwise:
        p, positive, keep = p.reshape(-1, 1), positive.reshape(-1, 1), keep.reshape(-1, 1)
    return 100.0 * _column_calibration_errors(p, positive, keep, n_bins).nanmean().item()


def per_class_calibration_error(probs: Tensor, target: Tensor, difficult: Tensor | None = None,
                                n_bins: int = 15) -> Tensor:
    """Eq. 2 ECE of each class, [C] float64 fractions (not percent); nan for a class without evaluated pair."""
    return _column_calibration_errors(*prepare(probs, target, difficult), n_bins)


def _column_calibration_errors(p: Tensor, positive: Tensor, keep: Tensor, n_bins: int) -> Tensor:
    return calibration_errors(*binned_sums(p, positive, keep, n_bins))


def calibration_errors(count: Tensor, confidence_sum: Tensor, positive_sum: Tensor) -> Tensor:
    """Eq. 2 ECE of each row of binned_sums' [C, bins] sums, as fractions; nan for a row without pair."""
    # (n_b / n) * |acc_b - conf_b| = |positives_b - sum of probs_b| / n, and empty bins give 0.
    n = count.sum(1)
    gap = (positive_sum - confidence_sum).abs().sum(1)
    return torch.where(n > 0, gap / n.clamp(min=1), torch.full_like(gap, _NAN))


def brier_score(probs: Tensor, target: Tensor, difficult: Tensor | None = None) -> float:
    """Brier score in percent: the mean of (p - y)^2 over the (image, class) pairs that are not difficult."""
    p, positive, keep = prepare(probs, target, difficult)
    return 100.0 * ((p - positive.to(p.dtype)) ** 2)[keep].mean().item()


def reliability_bins(
    probs: Tensor, target: Tensor, difficult: Tensor | None = None, n_bins: int = 15
) -> dict[str, Tensor]:
    """Pooled Eq. 2 bins for the reliability diagram (paper Fig. 3); nan in empty bins."""
    p, positive, keep = prepare(probs, target, difficult)
    count, confidence_sum, positive_sum = binned_sums(
        p.reshape(-1, 1), positive.reshape(-1, 1), keep.reshape(-1, 1), n_bins
    )
    return reliability_from_sums(count[0], confidence_sum[0], positive_sum[0])


def reliability_from_sums(count: Tensor, confidence_sum: Tensor, positive_sum: Tensor) -> dict[str, Tensor]:
    """Pooled Eq. 2 bins for the reliability diagram from one row of binned_sums' sums; nan in empty bins."""
    n_bins = len(count)
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=count.device)
    empty = torch.full_like(count, _NAN)
    return {
        "lower": edges[:-1],
        "upper": edges[1:],
        "confidence": torch.where(count > 0, confidence_sum / count.clamp(min=1), empty),
        "accuracy": torch.where(count > 0, positive_sum / count.clamp(min=1), empty),
        "count": count.long(),
    }


def difficult_subset(difficult: Tensor) -> Tensor:
    """[N] bool: images with at least one difficult class (the VOC "Difficult" subset, Table 2)."""
    return difficult.to(torch.bool).any(dim=1)


def compute_metrics(
    scores: Tensor,
    target: Tensor,
    difficult: Tensor,
    threshold: float = 0.5,
    topk: int = TOPK,
    n_bins: int = 15,
    difficult_as_negative: bool = False,
    min_positives: int = 1,
    class_groups: Tensor | None = None,
) -> dict[str, float]:
    """All evaluation metrics (docs/method.md#metrics, Eq. 2, Table 2) as one flat dict keyed by
    metric_names(topk); `class_groups` [C] (udtimm.class_counts.class_groups) gives the head/medium/tail mAPs."""
    s, positive, keep = prepare(scores, target, difficult)
    ap, positives = _ap_columns(s, positive, keep), (positive & keep).sum(0)
    metrics = dict(zip(("map", "num_classes_evaluated", "num_classes_few_positives"),
                       mean_over_classes(ap, positives, min_positives), strict=True))
    metrics.update(group_means(ap, positives, class_groups, min_positives))
    metrics.update(threshold_metrics(scores, target, difficult, threshold, difficult_as_negative=difficult_as_negative))
    top = threshold_metrics(scores, target, difficult, threshold, topk, difficult_as_negative)
    metrics.update({f"{name}_top{topk}": value for name, value in top.items()})
    metrics["ece"] = expected_calibration_error(scores, target, difficult, n_bins, True)
    metrics["ece_pooled"] = expected_calibration_error(scores, target, difficult, n_bins, False)
    metrics["brier"] = brier_score(scores, target, difficult)
    subset = difficult_subset(difficult)
    # An empty subset gives no AP for any class, hence nan.
    metrics["map_difficult"] = mean_average_precision(scores[subset], target[subset], difficult[subset], min_positives)
    metrics["num_images"] = float(scores.shape[0])
    return in_column_order(metrics, topk)


def in_column_order(metrics: dict[str, float], topk: int) -> dict[str, float]:
    """compute_metrics' dict: the values keyed and ordered by metric_names(topk), the counts as floats."""
    return {name: float(metrics[name]) for name in metric_names(topk)}
