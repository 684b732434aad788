"""Training losses: Eq. 3, 10-14, 17, the Table 5 baselines (docs/method.md), the asymmetric loss (ASL) and the
long-tail losses (Distribution-Balanced, class-balanced, two-way).

Every function takes logits [B, C] (any float dtype; computed in float32 so that bf16 autocast outputs do not
lose the small differences the losses are made of) and, where labels enter, a float `target` [B, C] in [0, 1]
(multi-hot, or soft after Mixup/CutMix: docs/method.md#mixup-and-cutmix) with an optional bool `mask` [B, C] that is
True where the (sample, class) pair counts. `apply_label_policies` turns the dataset's difficult flags and unknown
labels into that pair. Masked pairs are neither positives nor negatives in any term.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DIFFICULT_POLICIES = ("positive", "ignore", "negative")
UNKNOWN_POLICIES = ("ignore", "negative")  # --unknown: what a label nobody annotated (target -1) becomes

# Stands in for -inf in masked logsumexp/softmax: exp() of it is exactly 0 like -inf, but it stays finite,
# so rows with nothing left (a sample without negatives) give finite values and zero, not NaN, gradients.
_MASKED_LOGIT = torch.finfo(torch.float32).min


def apply_label_policies(target: Tensor, difficult: Tensor, policy: str,
                         unknown: str = "ignore") -> tuple[Tensor, Tensor]:
    """(target float [B, C] of 0 and 1, mask bool [B, C]) for one `--difficult` policy (docs/method.md#difficult-labels)
    and one `--unknown` policy for the pairs stored as -1 (docs/datasets.md#missing-labels)."""
    if policy not in DIFFICULT_POLICIES:
        raise ValueError(f"unknown difficult policy {policy!r}; expected one of {', '.join(DIFFICULT_POLICIES)}")
    if unknown not in UNKNOWN_POLICIES:
        raise ValueError(f"unknown --unknown policy {unknown!r}; expected one of {', '.join(UNKNOWN_POLICIES)}")
    target = target.float()
    difficult = difficult.bool()
    not_annotated = target < 0
    mask = torch.ones_like(difficult)
    if policy == "positive":
        # A difficult class is present in the image, whatever the loader stored there.
        target = target.masked_fill(difficult, 1.0)
    elif policy == "negative":
        target = target.masked_fill(difficult, 0.0)
    else:
        mask = ~difficult
    target = target.masked_fill(not_annotated, 0.0)
    if unknown == "ignore":
        mask = mask & ~not_annotated
    return target, mask


def _split(logits: Tensor, target: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Float32 logits and the bool masks of the counted positive pairs (target > 0: a soft target is a positive) and
    negative pairs (target 0)."""
    z = logits.float()
    present = target > 0
    if mask is None:
        return z, present, ~present
    mask = mask.bool()
    return z, present & mask, ~present & mask


def _positive_weights(target: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """Each pair's weight as a positive (its target y_i; 0 off the positives) and the divisor of a sample's sum over
    them, max(1, sum of y_i): |positives| for hard targets; a sample holding less than one whole positive is not
    scaled back up (docs/method.md#mixup-and-cutmix)."""
    weights = torch.where(positive, target.float(), 0.0)
    return weights, weights.sum(dim=1).clamp_min(1.0)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of `values` over the True entries of `mask`; 0 (still attached to the graph) when there are none."""
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def _binary_kl(target_logits: Tensor, logits: Tensor) -> Tensor:
    """Elementwise KL(Bernoulli(sigmoid(target_logits)) || Bernoulli(sigmoid(logits))), safe for large logits."""
    p = torch.sigmoid(target_logits)
    # log(1 - sigmoid(x)) = logsigmoid(-x) keeps both log terms finite where sigmoid saturates to 0 or 1.
    return p * (F.logsigmoid(target_logits) - F.logsigmoid(logits)) + (1 - p) * (
        F.logsigmoid(-target_logits) - F.logsigmoid(-logits)
    )


def bce_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Eq. 3: binary cross-entropy with logits, mean over the counted (sample, class) pairs."""
    values = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return _masked_mean(values, mask)


def partial_softmax_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Eq. 10-11 (PAL-N): -mean over positives of log f_i, f_i = softmax of z_i against the negatives only; a soft
    positive weighs its target y_i (docs/method.md#mixup-and-cutmix)."""
    z, positive, negative = _split(logits, target, mask)
    lse_neg = torch.logsumexp(z.masked_fill(~negative, _MASKED_LOGIT), dim=1, keepdim=True)
    # -log f_i = log(1 + exp(lse_neg - z_i)); without negatives lse_neg is _MASKED_LOGIT and the term is 0 (f_i = 1).
    nll = F.softplus(lse_neg - z)
    weights, divisor = _positive_weights(target, positive)
    per_sample = (nll * weights).sum(dim=1) / divisor
    return _masked_mean(per_sample, positive.any(dim=1))


def temperature_bce_loss(
    logits: Tensor, target: Tensor, mask: Tensor | None = None, temperature: float = 3.0
) -> Tensor:
    """Table 5 baseline: Eq. 3 on sigmoid(z / T)."""
    return bce_loss(logits.float() / temperature, target, mask)


def label_smoothing_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None, margin: float = 9.0) -> Tensor:
    """Table 5 baseline: binary KL to the smoothed targets q = sigmoid(+-margin) of 1 and 0, q linear in between for a
    soft target y (the Mixup of the two images' smoothed targets); mean over the counted pairs."""
    low = 1 / (1 + math.exp(margin))  # sigmoid(-margin); sigmoid(margin) = 1 - low
    y = target.float()
    # logit(q) = log q - log(1 - q), with q = low + y (1 - 2 low) and 1 - q = low + (1 - y)(1 - 2 low): neither log
    # loses q's small distance to 0 or 1.
    soft_logits = torch.log(low + y * (1 - 2 * low)) - torch.log(low + (1 - y) * (1 - 2 * low))
    return _masked_mean(_binary_kl(soft_logits, logits.float()), mask)


def one_over_k_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Table 5 baseline [28]: softmax cross-entropy towards 1/k on each of a sample's k positives; y_i / max(1, sum of
    y) on soft positives (docs/method.md#mixup-and-cutmix)."""
    z, positive, negative = _split(logits, target, mask)
    # Masked pairs leave the softmax entirely, like they leave every other term.
    log_p = torch.log_softmax(z.masked_fill(~(positive | negative), _MASKED_LOGIT), dim=1)
    weights, divisor = _positive_weights(target, positive)
    per_sample = -(log_p * weights).sum(dim=1) / divisor
    return _masked_mean(per_sample, positive.any(dim=1))


def asymmetric_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None, gamma_neg: float = 4.0,
                    gamma_pos: float = 0.0, clip: float = 0.05) -> Tensor:
    """ASL (Ben-Baruch et al. 2021): -y (1-p)^g+ log p - (1-y) p_m^g- log(1-p_m), p_m = max(p-m, 0); mean."""
    z, y = logits.float(), target.float()
    # 1 - p as sigmoid(-z) and log p as logsigmoid(z): exact where p rounds to 0 or 1 in float32.
    one_minus_p = torch.sigmoid(-z)
    positive_term = one_minus_p.pow(gamma_pos) * F.logsigmoid(z)
    # Probability shifting: 1 - p_m = min(1 - p + m, 1), at least m, so its log stays finite.
    one_minus_shifted = (one_minus_p + clip).clamp(max=1.0) if clip > 0 else one_minus_p
    log_one_minus_shifted = torch.log(one_minus_shifted) if clip > 0 else F.logsigmoid(-z)
    negative_term = (1 - one_minus_shifted).pow(gamma_neg) * log_one_minus_shifted
    # y * a + (1 - y) * b is exactly a or b for the targets 1 and 0, and linear in between (soft targets).
    values = -(y * positive_term + (1 - y) * negative_term)
    return _masked_mean(values, mask)


def _per_class(counts: Tensor | float, like: Tensor) -> Tensor:
    """Per-class training counts as float32 on the logits' device."""
    return torch.as_tensor(counts, dtype=torch.float32, device=like.device)


def distribution_balanced_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None, *, positives: Tensor,
                               annotated: Tensor, map_alpha: float = 0.1, map_beta: float = 10.0,
                               map_mu: float = 0.2, neg_scale: float = 2.0, bias_factor: float = 0.05,
                               focal_gamma: float = 0.0, focal_scale: float = 1.0) -> Tensor:
    """Distribution-Balanced loss (Wu et al., ECCV 2020): re-balanced weights, negative-tolerant regularisation."""
    z, y = logits.float(), target.float()
    n, total = _per_class(positives, z), _per_class(annotated, z)
    counted_y = y if mask is None else torch.where(mask.bool(), y, 0.0)
    # y-weighted like the official gt_labels * freq_inv: a soft positive repeats its image in part.
    repeat_rate = (counted_y / n).sum(dim=1, keepdim=True)
    has_positive = repeat_rate > 0
    ratio = (1 / n) / torch.where(has_positive, repeat_rate, 1.0)
    # Without a counted positive r = inf, where the map's sigmoid is 1.
    weight = map_alpha + torch.where(has_positive, torch.sigmoid(map_beta * (ratio - map_mu)), 1.0)
    # log(N_i / n_i - 1) as a difference of logs: no cancellation when n_i is close to N_i.
    bias = -bias_factor * (torch.log(total - n) - torch.log(n)) / neg_scale
    shifted = z + bias
    positive_term = weight * F.softplus(-shifted)  # BCE(z', 1)
    negative_term = (weight / neg_scale) * F.softplus(neg_scale * shifted)  # BCE(lambda z', 0)
    if focal_gamma:
        # 1 - pt as a sigmoid, not 1 - exp(-BCE): exact where pt rounds to 1.
        positive_term = positive_term * torch.sigmoid(-shifted).pow(focal_gamma)
        negative_term = negative_term * torch.sigmoid(neg_scale * shifted).pow(focal_gamma)
    values = focal_scale * (y * positive_term + (1 - y) * negative_term)
    return _masked_mean(values, mask)


def class_balanced_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None, *, positives: Tensor,
                        beta: float = 0.9999, focal_gamma: float = 0.0) -> Tensor:
    """Class-balanced loss (Cui et al., CVPR 2019): BCE or sigmoid focal loss weighted by 1 / effective number."""
    z, y = logits.float(), target.float()
    log_beta = math.log(beta) if beta > 0 else -math.inf
    # (1 - beta) / (1 - beta^n): the factor 1 - beta cancels in the normalisation; expm1 keeps 1 - beta^n exact
    # for beta near 1, where it is a small difference of two numbers near 1.
    inverse_effective = -1 / torch.expm1(_per_class(positives, z) * log_beta)
    # Normalised to average 1 over the classes (the official code: they sum to the number of classes).
    weight = inverse_effective / inverse_effective.mean()
    positive_term, negative_term = F.softplus(-z), F.softplus(z)  # -log p, -log(1 - p)
    if focal_gamma:
        positive_term = positive_term * torch.sigmoid(-z).pow(focal_gamma)
        negative_term = negative_term * torch.sigmoid(z).pow(focal_gamma)
    values = weight * (y * positive_term + (1 - y) * negative_term)
    return _masked_mean(values, mask)


def _tempered_logsumexp(values: Tensor, keep: Tensor, temperature: float, dim: int) -> tuple[Tensor, Tensor]:
    """T * logsumexp of the kept `values` along `dim` (0 where none is kept), and whether any is kept there."""
    kept = keep.any(dim=dim)
    lse = torch.logsumexp(values.masked_fill(~keep, _MASKED_LOGIT), dim=dim)
    # T * _MASKED_LOGIT would overflow to -inf for T > 1.
    return lse.masked_fill(~kept, 0.0) * temperature, kept


def two_way_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None, positive_temperature: float = 4.0,
                 negative_temperature: float = 1.0) -> Tensor:
    """Two-way multi-label loss (Kobayashi, CVPR 2023): softplus of negatives vs positives, per sample and per class."""
    z, positive, negative = _split(logits, target, mask)
    # A soft positive weighs y in its logsumexp; log(1) = 0 off the positives keeps log(0) out of the graph.
    log_weight = torch.log(torch.where(positive, target.float(), 1.0))
    positive_logits = -z / positive_temperature + log_weight
    negative_logits = z / negative_temperature
    loss = z.new_zeros(())
    for dim in (1, 0):  # 1: each sample over its classes; 0: each class over the batch
        negatives, has_negative = _tempered_logsumexp(negative_logits, negative, negative_temperature, dim)
        positives, has_positive = _tempered_logsumexp(positive_logits, positive, positive_temperature, dim)
        # No negative: softplus(-inf) = 0; _MASKED_LOGIT gives that 0 and a zero gradient without an inf.
        terms = F.softplus(torch.where(has_negative, negatives + positives, _MASKED_LOGIT))
        loss = loss + _masked_mean(terms, has_positive)
    return loss


def binary_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 3.0) -> Tensor:
    """Eq. 13: per-class KL(sigmoid(t/T) || sigmoid(s/T)), mean over classes and samples, times T^2."""
    t = teacher_logits.detach().float() / temperature
    s = student_logits.float() / temperature
    return _binary_kl(t, s).mean() * temperature**2


def softmax_kd_loss(student_cal_logits: Tensor, teacher_cal_logits: Tensor, temperature: float = 3.0) -> Tensor:
    """Eq. 14: KL(softmax(c_t/T) || softmax(c_s/T)) over the calibration logits, batch mean, times T^2."""
    log_t = torch.log_softmax(teacher_cal_logits.detach().float() / temperature, dim=1)
    log_s = torch.log_softmax(student_cal_logits.float() / temperature, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1).mean() * temperature**2


ATTENTION_DISTANCES = ("squared", "norm")


def attention_distillation_loss(student_maps: Tensor, teacher_maps: Tensor, distance: str = "squared") -> Tensor:
    """Eq. 17: mean over samples of ||A_T - A_S|| ("norm", as written) or its square, L2-normalised maps [B, H, W]."""
    teacher = teacher_maps.detach().float()
    student = student_maps.float()
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student[:, None], size=teacher.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    # Teacher and student have different channel counts, so only the shape of the maps is comparable.
    teacher = F.normalize(teacher.flatten(1), dim=1)
    student = F.normalize(student.flatten(1), dim=1)
    squared = (teacher - student).pow(2).sum(dim=1)
    if distance == "squared":
        return squared.mean()
    if distance != "norm":
        raise ValueError(f"unknown attention distance {distance!r}; choose one of {', '.join(ATTENTION_DISTANCES)}")
    # The norm's gradient is undefined at equal maps; the floor makes it 0 there instead of NaN.
    return squared.clamp_min(1e-12).sqrt().mean()
