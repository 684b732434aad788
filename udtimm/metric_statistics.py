"""Evaluation in bounded memory: compute_metrics' values from fixed-size per-class sums added batch by batch.

compute_metrics needs every image's scores, targets and flags at once (16 bytes per image and class once
engine.predict has gathered them: 19 GB for OpenImages' 125,000 validation images of 9,600 classes).
MetricStatistics keeps sums whose size depends on the classes only, adds each batch's where it is computed, and
adds up over processes. Everything but AP is computed from them as compute_metrics computes it, equal up to float64
rounding; AP (mAP, Difficult mAP) comes from each class's scores counted in bins, within 0.05 of the exact mAP on
the sets the tests measure (docs/method.md#evaluation-in-bounded-memory). Pure: no accelerate, no files.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from udtimm.metrics import (
    TOPK,
    binned_sums,
    calibration_errors,
    difficult_subset,
    group_means,
    in_column_order,
    mean_over_classes,
    prepare,
    rates_from_counts,
    reliability_from_sums,
    threshold_counts,
)

# --eval-memory: exact keeps every score (engine.predict), binned these statistics (engine.evaluate_streaming), auto
# is exact up to EXACT_PAIRS_LIMIT (image, class) pairs in the evaluated split and binned beyond.
EVAL_MEMORY = ("auto", "exact", "binned")
# 4 GB of scores, targets and flags (16 bytes a pair): VOC, COCO (40,504 x 80) and NUS-WIDE stay exact, so their
# numbers are the published ones; OpenImages (125,436 x 9,605 = 1.2 billion) is binned.
EXACT_PAIRS_LIMIT = 250_000_000
BYTES_PER_PAIR = 16  # engine.predict: logit, probability, target and difficult flag, 4 bytes each

# AP bins are uniform in logit over [-LOGIT_RANGE, LOGIT_RANGE], the ends open. A confident model puts most of a
# class's scores within 1e-3 of 0 or 1: bins uniform in probability tie a rare class's positives with its negatives
# there (4,096 of them lose 0.66 mAP on a 10,000-class set whose positives score around sigmoid(-4) and negatives
# around sigmoid(-12)), while logit bins are as fine at 1e-6 as at 0.5 (0.03 lost on that set). The range stops
# where float32 does: probabilities above sigmoid(16.6) are all 1.0, which neither path can rank.
LOGIT_RANGE = 16.0
# Bin width 32 / 4,096 = 0.008 in logit. Measured binned - exact mAP: -0.025 on digits-like scores (10 classes,
# 1,000 images), -0.0002 and -0.028 on two 10,000-class sets of 300 images (tests/test_metric_statistics.py); the
# gap halves with each doubling of the bins. The histograms take 16 bytes per class and bin (4 int32 counts):
# 630 MB for OpenImages' 9,605 classes.
AP_BINS = 4096
# Classes whose AP is computed at once: bounds compute()'s float64 temporaries to a few MB per class block.
_AP_CLASS_BLOCK = 256


def binned_evaluation(memory: str, images: int, classes: int) -> bool:
    """--eval-memory: whether a split of `images` x `classes` is evaluated from MetricStatistics (binned, or auto
    beyond EXACT_PAIRS_LIMIT pairs) rather than from every score (exact)."""
    if memory not in EVAL_MEMORY:
        raise ValueError(f"--eval-memory is one of {EVAL_MEMORY}, got {memory!r}")
    return memory == "binned" or (memory == "auto" and images * classes > EXACT_PAIRS_LIMIT)


def exact_size(images: int, classes: int) -> str:
    """What engine.predict holds for a split, in words: the pairs and their bytes."""
    size = images * classes * BYTES_PER_PAIR
    unit, scale = next((unit, scale) for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("bytes", 1))
                       if size >= scale or scale == 1)
    return f"{images:,} images x {classes:,} classes x {BYTES_PER_PAIR} bytes = {size / scale:.1f} {unit}"


def score_bins(scores: Tensor, bins: int) -> Tensor:
    """The AP bin of each probability (int64, same shape): uniform in logit over [-LOGIT_RANGE, LOGIT_RANGE], every
    logit beyond an end in the end bin."""
    logits = torch.logit(scores.to(torch.float64)).clamp(-LOGIT_RANGE, LOGIT_RANGE)
    return ((logits + LOGIT_RANGE) * (bins / (2 * LOGIT_RANGE))).floor().long().clamp(0, bins - 1)


def binned_average_precision(positives: Tensor, negatives: Tensor) -> Tensor:
    """Non-interpolated AP of each class (docs/method.md#ap-and-map) from the counts [C, B] of its evaluated positives
    and negatives per bin, bins in increasing score; float64 [C], nan for a class without positive.

    Each bin is one threshold: a bin's positives all get the precision at its lower edge, as average_precision_score
    gives for the scores rounded to their bins (and torchmetrics with `thresholds`)."""
    hits, misses = positives.flip(1).to(torch.float64), negatives.flip(1).to(torch.float64)
    true_positives = hits.cumsum(1)
    precision = true_positives / (true_positives + misses.cumsum(1)).clamp(min=1)
    total = true_positives[:, -1]
    ap = (precision * hits).sum(1) / total.clamp(min=1)
    return torch.where(total > 0, ap, torch.full_like(ap, math.nan))


class MetricStatistics:
    """compute_metrics' statistics of a split, added batch by batch, in memory that does not grow with the images.

    `sums` holds, on `device`: per class, its evaluated positives and negatives counted in `ap_bins` score bins
    (`ap_counts` [set, positive/negative, C, B], the sets being all images and the Difficult subset); true
    positives, predicted and positive pairs at `threshold`, alone and within each image's `topk` (`threshold_counts`
    [2, 3, C]); Eq. 2's pair count, confidence and positive sums per bin (`calibration_bins` [3, C, n_bins]); the
    Brier sum and its pair count; the images. All are sums, so the statistics of disjoint batches add up (`+`, or
    accelerate's reduce of `sums` over processes and `with_sums`). The options are compute_metrics'.
    """

    def __init__(self, num_classes: int, threshold: float = 0.5, topk: int = TOPK, n_bins: int = 15,
                 difficult_as_negative: bool = False, min_positives: int = 1, ap_bins: int = AP_BINS,
                 device: torch.device | str | None = None, class_groups: Tensor | None = None) -> None:
        if ap_bins < 1:
            raise ValueError(f"ap_bins must be at least 1, got {ap_bins}")
        self.num_classes, self.threshold, self.topk, self.n_bins = num_classes, threshold, topk, n_bins
        self.difficult_as_negative, self.min_positives, self.ap_bins = difficult_as_negative, min_positives, ap_bins
        self.class_groups = class_groups
        float64 = {"dtype": torch.float64, "device": device}
        self.sums: dict[str, Tensor] = {
            # int32: exact counts (up to 2^31 images) in half the memory of float64, and integer atomics on a GPU.
            "ap_counts": torch.zeros(2, 2, num_classes, ap_bins, dtype=torch.int32, device=device),
            "threshold_counts": torch.zeros(2, 3, num_classes, **float64),
            "calibration_bins": torch.zeros(3, num_classes, n_bins, **float64),
            "brier": torch.zeros(2, **float64),
            "images": torch.zeros(1, **float64),
        }

    def update(self, scores: Tensor, target: Tensor, difficult: Tensor, counted: Tensor | None = None) -> None:
        """Add a batch: probabilities, targets (-1: unknown) and difficult flags [B, C], as compute_metrics takes
        them; `counted` [B] bool leaves the other images out (a distributed sampler's repeats)."""
        if counted is not None:
            # An unknown label counts in no metric: so neither do the labels of an image left out.
            target = torch.where(counted[:, None], target.to(torch.float64), -1.0)
        subset = difficult_subset(difficult)
        images = len(scores) if counted is None else counted.sum()
        if counted is not None:
            subset &= counted
        s, positive, keep = prepare(scores, target, difficult)
        sums = self.sums
        for row, topk in enumerate((None, self.topk)):
            counts = threshold_counts(scores, target, difficult, self.threshold, topk, self.difficult_as_negative)
            sums["threshold_counts"][row] += torch.stack(counts)
        sums["calibration_bins"] += torch.stack(binned_sums(s, positive, keep, self.n_bins))
        sums["brier"] += torch.stack([((s - positive.to(s.dtype)) ** 2 * keep).sum(), keep.sum()])
        sums["images"] += images
        classes, bins = self.num_classes, self.ap_bins
        # Cell of each pair in ap_counts viewed flat: (set, negative, class, bin); left-out pairs add 0.
        cell = score_bins(s, bins) + bins * (torch.arange(classes, device=s.device) + classes * ~positive)
        added = torch.stack([keep, keep & subset[:, None]]).to(torch.int32)
        cells = torch.stack([cell, cell + 2 * classes * bins])
        sums["ap_counts"].view(-1).index_add_(0, cells.flatten(), added.flatten())

    def with_sums(self, sums: dict[str, Tensor]) -> MetricStatistics:
        """The same options with other sums: e.g. accelerate's reduce of `sums` over processes."""
        other = copy.copy(self)
        other.sums = dict(sums)
        return other

    def __add__(self, other: MetricStatistics) -> MetricStatistics:
        """The statistics of both sets of images."""
        return self.with_sums({name: total + other.sums[name] for name, total in self.sums.items()})

    def average_precision(self, difficult_images: bool = False) -> Tensor:
        """Binned AP of each class [C] (float64, on the sums' device), over all images or the Difficult subset."""
        counts = self.sums["ap_counts"][int(difficult_images)]
        return torch.cat([binned_average_precision(counts[0, start:start + _AP_CLASS_BLOCK],
                                                   counts[1, start:start + _AP_CLASS_BLOCK])
                          for start in range(0, self.num_classes, _AP_CLASS_BLOCK)])

    def compute(self) -> dict[str, float]:
        """compute_metrics' dict (keyed by metric_names(topk)), with AP from the binned counts."""
        # [set, C]: evaluated positives, exact; summed a block of classes at a time, since a sum over the whole
        # [set, C, B] int32 view widens all of it to int64 first (1.3 GB for 10,000 classes).
        counts = self.sums["ap_counts"][:, 0]
        positives = torch.cat([counts[:, start:start + _AP_CLASS_BLOCK].sum(-1)
                               for start in range(0, self.num_classes, _AP_CLASS_BLOCK)], dim=1).cpu()
        ap = self.average_precision().cpu()
        metrics = dict(zip(("map", "num_classes_evaluated", "num_classes_few_positives"),
                           mean_over_classes(ap, positives[0], self.min_positives), strict=True))
        metrics.update(group_means(ap, positives[0], self.class_groups, self.min_positives))
        metrics["map_difficult"] = mean_over_classes(self.average_precision(True).cpu(), positives[1],
                                                     self.min_positives)[0]
        plain, top = self.sums["threshold_counts"].cpu()
        metrics.update(rates_from_counts(*plain))
        metrics.update({f"{name}_top{self.topk}": value for name, value in rates_from_counts(*top).items()})
        bins = self.sums["calibration_bins"].cpu()
        metrics["ece"] = 100.0 * calibration_errors(*bins).nanmean().item()
        metrics["ece_pooled"] = 100.0 * calibration_errors(*bins.sum(1, keepdim=True)).nanmean().item()
        error, pairs = self.sums["brier"].tolist()
        metrics["brier"] = 100.0 * error / pairs if pairs > 0 else math.nan
        metrics["num_images"] = self.sums["images"].item()
        return in_column_order(metrics, self.topk)

    def reliability_bins(self) -> dict[str, Tensor]:
        """metrics.reliability_bins of the split's pairs (pooled Eq. 2 bins, for the reliability diagram)."""
        return reliability_from_sums(*self.sums["calibration_bins"].sum(1).cpu())
