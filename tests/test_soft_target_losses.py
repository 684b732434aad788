"""Every label loss with soft targets (Mixup and CutMix, docs/method.md#mixup-and-cutmix) against a slow float64
reference written from its equation with a target y in [0, 1]: values and gradients. The hard targets 0 and 1 are
tests/test_losses.py's."""

import math
from functools import partial

import pytest
import torch
from conftest import assert_matches_reference
from test_losses import (
    CLASS_COUNTS,
    DB_FOCAL,
    LABEL_LOSSES,
    _edge_batch,
    _log_sigmoid,
    _mean,
    ref_bce,
    ref_temperature,
)

from udtimm.losses import partial_softmax_loss
from udtimm.mixing import Mix
from udtimm.objectives import CLASSIFICATION_LOSSES

# --- references: loops over samples and classes, float64; ref_bce and ref_temperature (test_losses.py) are written
# with y already ---------------------------------------------------------------------------------------------------


def _counted(m):
    return [(b, c) for b in range(m.shape[0]) for c in range(m.shape[1]) if m[b, c]]


def ref_label_smoothing(z, y, m, margin=9.0):
    """KL(q || sigmoid(z)) with q = sigmoid(-margin) + y (sigmoid(margin) - sigmoid(-margin))."""
    low, high = 1 / (1 + math.exp(margin)), 1 / (1 + math.exp(-margin))
    terms = []
    for b, c in _counted(m):
        q = low + y[b, c] * (high - low)
        terms.append(q * (torch.log(q) - _log_sigmoid(z[b, c])) + (1 - q) * (torch.log(1 - q) - _log_sigmoid(-z[b, c])))
    return _mean(terms, z)


def ref_asl(z, y, m, gamma_neg=4.0, gamma_pos=0.0, clip=0.05):
    """-y (1-p)^g+ log p - (1-y) p_m^g- log(1-p_m), p_m = max(p - m, 0)."""
    terms = []
    for b, c in _counted(m):
        p, one_minus_p = torch.exp(_log_sigmoid(z[b, c])), torch.exp(_log_sigmoid(-z[b, c]))
        p_m = torch.clamp(p - clip, min=0.0)
        log_one_minus_p_m = torch.log(1 - p_m) if clip > 0 else _log_sigmoid(-z[b, c])
        terms.append(-y[b, c] * one_minus_p**gamma_pos * _log_sigmoid(z[b, c])
                     - (1 - y[b, c]) * p_m**gamma_neg * log_one_minus_p_m)
    return _mean(terms, z)


def _positives_and_negatives(y, m, b):
    """Sample b's counted positives (y > 0) and negatives (y = 0)."""
    counted = [c for c in range(y.shape[1]) if m[b, c]]
    return [c for c in counted if y[b, c] > 0], [c for c in counted if y[b, c] == 0]


def ref_partial_softmax(z, y, m):
    """Eq. 10-11: -sum over positives of y_i log f_i / max(1, sum of y_i), f_i against the negatives only."""
    per_sample = []
    for b in range(z.shape[0]):
        pos, neg = _positives_and_negatives(y, m, b)
        if pos:
            negatives = sum((torch.exp(z[b, j]) for j in neg), z.new_zeros(()))
            nll = [-y[b, i] * torch.log(torch.exp(z[b, i]) / (torch.exp(z[b, i]) + negatives)) for i in pos]
            per_sample.append(sum(nll) / max(1.0, sum(y[b, i] for i in pos)))
    return _mean(per_sample, z)


def ref_one_over_k(z, y, m):
    """Cross-entropy of the softmax over the counted classes towards y_i / max(1, sum of y_i) on the positives."""
    per_sample = []
    for b in range(z.shape[0]):
        pos, neg = _positives_and_negatives(y, m, b)
        if pos:
            denominator = sum(torch.exp(z[b, j]) for j in pos + neg)
            total = max(1.0, sum(y[b, i] for i in pos))
            per_sample.append(-sum(y[b, i] / total * torch.log(torch.exp(z[b, i]) / denominator) for i in pos))
    return _mean(per_sample, z)


def ref_db(z, y, m, positives, annotated, map_alpha=0.1, map_beta=10.0, map_mu=0.2, neg_scale=2.0, bias_factor=0.05,
           focal_gamma=0.0, focal_scale=1.0):
    """Distribution-Balanced: y times a positive's focal_scale (1 - pt)^g w BCE(z + b, 1) plus 1 - y times a negative's
    focal_scale (1 - pt)^g w / neg_scale BCE(neg_scale (z + b), 0); the repeat rate sums y_j / n_j over the counted
    classes, w = map_alpha + 1 where it is 0."""
    n = positives.tolist()
    total = annotated.tolist()
    terms = []
    for b, c in _counted(m):
        repeat_rate = sum(y[b, j] / n[j] for j in range(z.shape[1]) if m[b, j])
        mapped = torch.sigmoid(map_beta * ((1 / n[c]) / repeat_rate - map_mu)) if repeat_rate > 0 else 1.0
        w = map_alpha + mapped
        shifted = z[b, c] - bias_factor * math.log(total[c] / n[c] - 1) / neg_scale
        positive_nll, negative_nll = -_log_sigmoid(shifted), -_log_sigmoid(-neg_scale * shifted)
        positive = (1 - torch.exp(-positive_nll)) ** focal_gamma * w * positive_nll
        negative = (1 - torch.exp(-negative_nll)) ** focal_gamma * w / neg_scale * negative_nll
        terms.append(focal_scale * (y[b, c] * positive + (1 - y[b, c]) * negative))
    return _mean(terms, z)


def ref_cb(z, y, m, positives, beta=0.9999, focal_gamma=0.0):
    """Class-balanced: w_c = (1 - beta) / (1 - beta^n_c), scaled to average 1, times y (1 - p)^g (-log p) +
    (1 - y) p^g (-log(1 - p))."""
    raw = [(1 - beta) / (1 - beta**n) for n in positives.tolist()]
    weights = [w * len(raw) / sum(raw) for w in raw]
    terms = []
    for b, c in _counted(m):
        log_p, log_one_minus_p = _log_sigmoid(z[b, c]), _log_sigmoid(-z[b, c])
        positive = -torch.exp(log_one_minus_p) ** focal_gamma * log_p
        negative = -torch.exp(log_p) ** focal_gamma * log_one_minus_p
        terms.append(weights[c] * (y[b, c] * positive + (1 - y[b, c]) * negative))
    return _mean(terms, z)


def ref_two_way(z, y, m, positive_temperature=4.0, negative_temperature=1.0):
    """Two-way: per sample with a positive, softplus(Tn log sum_neg e^(z/Tn) + Tp log sum_pos y e^(-z/Tp)), 0 without
    negatives, averaged; plus the same per class over the batch."""
    tp, tn = positive_temperature, negative_temperature

    def term(logits, targets, counted):
        pos = [i for i in range(len(logits)) if counted[i] and targets[i] > 0]
        neg = [i for i in range(len(logits)) if counted[i] and targets[i] == 0]
        if not neg:
            return logits.sum() * 0  # softplus(-inf)
        negatives = tn * torch.log(sum(torch.exp(logits[j] / tn) for j in neg))
        positives = tp * torch.log(sum(targets[i] * torch.exp(-logits[i] / tp) for i in pos))
        return torch.log1p(torch.exp(negatives + positives))

    samples = [term(z[b], y[b], m[b]) for b in range(z.shape[0])
               if any(y[b, c] > 0 and m[b, c] for c in range(z.shape[1]))]
    classes = [term(z[:, c], y[:, c], m[:, c]) for c in range(z.shape[1])
               if any(y[b, c] > 0 and m[b, c] for b in range(z.shape[0]))]
    return _mean(samples, z) + _mean(classes, z)


# Every loss of test_losses.py, with its reference for soft targets.
SOFT_REFERENCES = {
    "bce": ref_bce, "temperature": ref_temperature, "label_smoothing": ref_label_smoothing, "asl": ref_asl,
    "asl_focal": partial(ref_asl, gamma_neg=2.0, gamma_pos=1.0, clip=0.0), "partial_softmax": ref_partial_softmax,
    "one_over_k": ref_one_over_k, "db": partial(ref_db, **CLASS_COUNTS),
    "db_focal": partial(ref_db, **CLASS_COUNTS, **DB_FOCAL),
    "cb_bce": partial(ref_cb, positives=CLASS_COUNTS["positives"]),
    "cb_focal": partial(ref_cb, positives=CLASS_COUNTS["positives"], focal_gamma=2.0), "two_way": ref_two_way,
}
SOFT_LOSSES = {name: (LABEL_LOSSES[name][0], ref) for name, ref in SOFT_REFERENCES.items()}


def _soft_cases():
    """Mixup (lam 0.3) of test_losses.py's edge rows with their masks, random soft targets with zeros and ones,
    and logits of +-50."""
    z, y, m = _edge_batch(seed=5)
    mixed, mixed_mask = Mix(0.3).labels(y, m)
    g = torch.Generator().manual_seed(6)
    soft = torch.rand(6, 5, generator=g, dtype=torch.float64) * (torch.rand(6, 5, generator=g) < 0.6)
    soft[0, 0], soft[1, 1] = 1.0, 0.0
    return {
        "mixup_of_edge_rows": (z, mixed, mixed_mask),
        "random_soft": (z, soft, None),
        "large_logits": (z.sign() * 50, mixed, mixed_mask),
    }


def test_every_label_loss_has_a_soft_target_reference():
    """Every loss --loss can choose, and PAL-N, is checked below with soft targets."""
    assert set(SOFT_REFERENCES) == set(LABEL_LOSSES)
    assert {name.replace("-", "_") for name in CLASSIFICATION_LOSSES} | {"partial_softmax"} <= set(SOFT_REFERENCES)


@pytest.mark.parametrize("case", list(_soft_cases()))
@pytest.mark.parametrize("name", list(SOFT_LOSSES))
def test_soft_target_loss_matches_reference(name, case):
    assert_matches_reference(*SOFT_LOSSES[name], *_soft_cases()[case])


@pytest.mark.parametrize("name", ["bce", "temperature", "asl", "one_over_k"])
def test_loss_of_mixed_targets_is_the_mixup_of_the_two_images_losses(name):
    """Zhang et al.'s mixed loss lam L(y_i) + (1 - lam) L(y_j): exactly, for the losses linear in y, and for 1/k when
    the two images have as many positives (its divisor is then theirs)."""
    fn = SOFT_LOSSES[name][0]
    z = torch.randn(4, 5, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 0, 0, 1], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0]])
    mixed, _ = Mix(0.3).labels(y, torch.ones_like(y, dtype=torch.bool))
    # Both sides on the mixed images' logits z; every row counts, so the batch means agree as the rows' do.
    torch.testing.assert_close(fn(z, mixed), 0.3 * fn(z, y) + 0.7 * fn(z, y.flip(0)), rtol=1e-5, atol=1e-6)


def test_a_partial_positive_alone_weighs_its_target_in_pal_n():
    """A class of one image only, mixed with an image without positives: lam times its Eq. 11 term, not normalised
    back to a whole positive; two soft positives that sum past 1 are their weighted mean."""
    z = torch.tensor([[1.5, -0.5, 0.2, 0.7]])
    whole = partial_softmax_loss(z, torch.tensor([[1.0, 0, 0, 0]]))
    torch.testing.assert_close(partial_softmax_loss(z, torch.tensor([[0.3, 0, 0, 0]])), 0.3 * whole)
    two = partial_softmax_loss(z, torch.tensor([[0.7, 0, 0, 0.6]]))
    # Each positive's Eq. 11 term against the same negatives, 1 and 2 (the other positive is none of them).
    first = partial_softmax_loss(z, torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[True, True, True, False]]))
    last = partial_softmax_loss(z, torch.tensor([[0.0, 0, 0, 1]]), torch.tensor([[False, True, True, True]]))
    torch.testing.assert_close(two, (0.7 * first + 0.6 * last) / 1.3)
