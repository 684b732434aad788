"""Every loss against a slow float64 reference written from its equation: values and gradients."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_bf16_computed_in_float32, assert_matches_reference, value_and_grad
from test_long_tail_losses import ref_cb, ref_db, ref_two_way

from udtimm.losses import (
    DIFFICULT_POLICIES,
    UNKNOWN_POLICIES,
    apply_label_policies,
    asymmetric_loss,
    bce_loss,
    class_balanced_loss,
    distribution_balanced_loss,
    label_smoothing_loss,
    one_over_k_loss,
    partial_softmax_loss,
    temperature_bce_loss,
    two_way_loss,
)

# --- references: explicit loops over samples, classes and positives, float64 ------------------------------------


def _log_sigmoid(x):
    # log(1 / (1 + e^-x)), written per sign so that the float64 reference itself survives |x| = 50.
    return -torch.log1p(torch.exp(-x)) if x >= 0 else x - torch.log1p(torch.exp(x))


def _pairs(z, y, m):
    """Per sample: the counted positive and negative class indices."""
    rows = []
    for b in range(z.shape[0]):
        pos = [c for c in range(z.shape[1]) if m[b, c] and y[b, c] > 0.5]
        neg = [c for c in range(z.shape[1]) if m[b, c] and y[b, c] <= 0.5]
        rows.append((pos, neg))
    return rows


def _mean(terms, z):
    return sum(terms) / len(terms) if terms else z.sum() * 0


def ref_bce(z, y, m):
    terms = []
    for b in range(z.shape[0]):
        for c in range(z.shape[1]):
            if m[b, c]:
                terms.append(-(y[b, c] * _log_sigmoid(z[b, c]) + (1 - y[b, c]) * _log_sigmoid(-z[b, c])))
    return _mean(terms, z)


def ref_partial_softmax(z, y, m):
    per_sample = []
    for b, (pos, neg) in enumerate(_pairs(z, y, m)):
        if not pos:
            continue
        log_f = []
        for i in pos:
            denominator = torch.exp(z[b, i]) + sum((torch.exp(z[b, j]) for j in neg), z.new_zeros(()))
            log_f.append(torch.log(torch.exp(z[b, i]) / denominator))
        per_sample.append(-sum(log_f) / len(pos))
    return _mean(per_sample, z)


def ref_temperature(z, y, m, temperature=3.0):
    return ref_bce(z / temperature, y, m)


def ref_binary_kl(t, s):
    """KL(Bernoulli(sigmoid(t)) || Bernoulli(sigmoid(s))), 1 - sigmoid(x) written as sigmoid(-x)."""
    p = torch.exp(_log_sigmoid(t))
    return p * (_log_sigmoid(t) - _log_sigmoid(s)) + (1 - p) * (_log_sigmoid(-t) - _log_sigmoid(-s))


def ref_label_smoothing(z, y, m, margin=9.0):
    terms = []
    for b in range(z.shape[0]):
        for c in range(z.shape[1]):
            if m[b, c]:
                soft = z.new_tensor(margin if y[b, c] > 0.5 else -margin)
                terms.append(ref_binary_kl(soft, z[b, c]))
    return _mean(terms, z)


def ref_one_over_k(z, y, m):
    per_sample = []
    for b, (pos, neg) in enumerate(_pairs(z, y, m)):
        if not pos:
            continue
        denominator = sum(torch.exp(z[b, j]) for j in pos + neg)
        per_sample.append(-sum((1 / len(pos)) * torch.log(torch.exp(z[b, i]) / denominator) for i in pos))
    return _mean(per_sample, z)


def ref_asl(z, y, m, gamma_neg=4.0, gamma_pos=0.0, clip=0.05):
    """ASL: -(1-p)^g+ log p on positives, -p_m^g- log(1-p_m) on negatives, p_m = max(p - m, 0); mean of pairs."""
    terms = []
    for b in range(z.shape[0]):
        for c in range(z.shape[1]):
            if not m[b, c]:
                continue
            log_p, log_one_minus_p = _log_sigmoid(z[b, c]), _log_sigmoid(-z[b, c])
            if y[b, c] > 0.5:
                terms.append(-torch.exp(log_one_minus_p) ** gamma_pos * log_p)
            else:
                p_m = torch.clamp(torch.exp(log_p) - clip, min=0.0)
                log_one_minus_p_m = torch.log(1 - p_m) if clip > 0 else log_one_minus_p
                terms.append(-p_m**gamma_neg * log_one_minus_p_m)
    return _mean(terms, z)


def asl_focal(z, y, m=None):
    """ASL with other parameters: focusing on both sides, no shifting."""
    return asymmetric_loss(z, y, m, gamma_neg=2.0, gamma_pos=1.0, clip=0.0)


def ref_asl_focal(z, y, m):
    return ref_asl(z, y, m, gamma_neg=2.0, gamma_pos=1.0, clip=0.0)


# The long-tail losses' training counts for the 5 classes of the batches below (test_long_tail_losses.py has the
# references): a head class, a rare one, a class seen once, one nearly everywhere.
CLASS_COUNTS = {"positives": torch.tensor([50.0, 5.0, 1.0, 20.0, 99.0]), "annotated": torch.full((5,), 100.0)}
DB_FOCAL = {"focal_gamma": 2.0, "focal_scale": 2.0}  # the registered db-focal's settings

LABEL_LOSSES = {
    "bce": (bce_loss, ref_bce),
    "partial_softmax": (partial_softmax_loss, ref_partial_softmax),
    "temperature": (temperature_bce_loss, ref_temperature),
    "label_smoothing": (label_smoothing_loss, ref_label_smoothing),
    "one_over_k": (one_over_k_loss, ref_one_over_k),
    "asl": (asymmetric_loss, ref_asl),
    "asl_focal": (asl_focal, ref_asl_focal),
    "db": (partial(distribution_balanced_loss, **CLASS_COUNTS), partial(ref_db, **CLASS_COUNTS)),
    "db_focal": (partial(distribution_balanced_loss, **CLASS_COUNTS, **DB_FOCAL),
                 partial(ref_db, **CLASS_COUNTS, **DB_FOCAL)),
    "cb_bce": (partial(class_balanced_loss, positives=CLASS_COUNTS["positives"]),
               partial(ref_cb, positives=CLASS_COUNTS["positives"])),
    "cb_focal": (partial(class_balanced_loss, positives=CLASS_COUNTS["positives"], focal_gamma=2.0),
                 partial(ref_cb, positives=CLASS_COUNTS["positives"], focal_gamma=2.0)),
    # Logits of +-50 are 100 apart: the official offset of -100 no longer hides the left-out pairs.
    "two_way": (two_way_loss, partial(ref_two_way, n_inf=-1e4)),
}

# --- inputs --------------------------------------------------------------------------------------------------------


def _edge_batch(seed=0, scale=2.0):
    """Rows: mixed; no positive; all positive; one positive with negatives masked; no negative left; all masked."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64) * scale
    y = torch.tensor(
        [[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 0, 1]],
        dtype=torch.float64,
    )
    m = torch.ones(6, 5, dtype=torch.bool)
    m[3, [0, 4]] = False
    m[4, [1, 2, 4]] = False
    m[5] = False
    return z, y, m


def _cases():
    z, y, m = _edge_batch()
    big = z.sign() * 50
    big[0, 0] = -50  # a positive at -50 and its negatives at +-50
    return {
        "random": (z, y, None),
        "masked": (z, y, m),
        "large": (big, y, m),
        "large_unmasked": (big, y, None),
        "no_positive_anywhere": (z, torch.zeros_like(y), None),
        "all_positive": (z, torch.ones_like(y), None),
    }


# --- tests ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("name", list(LABEL_LOSSES))
def test_label_loss_matches_reference(name, case):
    fn, ref = LABEL_LOSSES[name]
    assert_matches_reference(fn, ref, *_cases()[case])


@pytest.mark.parametrize("name", list(LABEL_LOSSES))
def test_label_loss_bf16_input_computed_in_float32(name):
    z, y, m = _edge_batch(seed=1)
    assert_bf16_computed_in_float32(*LABEL_LOSSES[name], z.to(torch.bfloat16), y, m)


def test_asl_without_focusing_or_shifting_is_bce():
    z, y, m = _edge_batch(seed=2)
    torch.testing.assert_close(asymmetric_loss(z.float(), y.float(), m, gamma_neg=0, gamma_pos=0, clip=0),
                               bce_loss(z.float(), y.float(), m))


def test_asl_shifting_discards_negatives_below_the_margin():
    """p <= m gives p_m = 0: such a negative adds nothing, not even a gradient (ASL's mislabeled-negative rejection)."""
    z = torch.tensor([[math.log(0.04 / 0.96), math.log(0.3 / 0.7)]], requires_grad=True)
    loss = asymmetric_loss(z, torch.zeros(1, 2), gamma_neg=4, clip=0.05)
    (grad,) = torch.autograd.grad(loss, z)
    assert grad[0, 0] == 0 and grad[0, 1] > 0
    assert loss.item() == pytest.approx(-(0.25**4) * math.log(0.75) / 2, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_asl_under_autocast_is_computed_in_float32(dtype):
    """Logits from a fp16/bf16 autocast region: the loss and its terms are float32 (p^4 of small p underflows fp16)."""
    z, y, m = _edge_batch(seed=4)
    with torch.autocast("cpu", dtype=dtype):
        logits = torch.nn.functional.linear(z.float(), torch.eye(5))
        loss = asymmetric_loss(logits, y.float(), m)
    assert logits.dtype == dtype and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_asl(logits.double(), y, m), rtol=1e-5, atol=1e-6)


def test_partial_softmax_hand_example():
    # Positives 0 and 1 each compete with the negative 2 only, never with each other (the paper code's full softmax).
    z = torch.tensor([[2.0, 1.0, 0.0]])
    loss = partial_softmax_loss(z, torch.tensor([[1.0, 1.0, 0.0]]))
    expected = -(math.log(math.e**2 / (math.e**2 + 1)) + math.log(math.e / (math.e + 1))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_partial_softmax_normalises_each_sample_by_its_own_positives():
    # The paper's code divided the batch by the positive count of its last image.
    z = torch.randn(2, 6)
    y = torch.tensor([[1.0, 1, 1, 0, 0, 0], [1.0, 0, 0, 0, 0, 0]])
    per_sample = [partial_softmax_loss(z[i : i + 1], y[i : i + 1]) for i in range(2)]
    assert partial_softmax_loss(z, y).item() == pytest.approx(sum(per_sample).item() / 2, rel=1e-6)


@pytest.mark.parametrize("fn", [partial_softmax_loss, one_over_k_loss])
def test_no_positive_anywhere_is_zero_with_a_gradient_path(fn):
    z = torch.randn(4, 7, requires_grad=True)
    loss = fn(z, torch.zeros(4, 7))
    assert loss.item() == 0.0 and loss.requires_grad
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_partial_softmax_without_negatives_is_zero():
    z = torch.randn(3, 4, requires_grad=True)
    loss = partial_softmax_loss(z, torch.ones(3, 4))
    (grad,) = torch.autograd.grad(loss, z)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_partial_softmax_at_10k_classes_matches_eq11_per_sample():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 10_000, generator=g, dtype=torch.float64)
    y = (torch.rand(64, 10_000, generator=g) < 0.001).double()
    y[0] = 0  # one sample without positives: left out of the mean
    loss, grad = value_and_grad(partial_softmax_loss, z.float(), y.float())
    # Eq. 11 per sample, one logsumexp over each positive with all the sample's negatives, in float64.
    zr = z.clone().requires_grad_(True)
    per_sample = []
    for b in range(64):
        pos, neg = y[b].bool(), ~y[b].bool()
        if pos.any():
            negatives = torch.logsumexp(zr[b, neg], dim=0).expand(int(pos.sum()))
            per_sample.append(-(zr[b, pos] - torch.logaddexp(zr[b, pos], negatives)).mean())
    reference = torch.stack(per_sample).mean()
    (ref_grad,) = torch.autograd.grad(reference, zr)
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


def test_apply_label_policies():
    target = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    difficult = torch.tensor([[False, False, True, False]])
    loose = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # a loader that stored 0 at the difficult pair
    t, m = apply_label_policies(loose, difficult, "positive")
    assert t.tolist() == [[1, 0, 1, 0]] and m.all()
    t, m = apply_label_policies(target, difficult, "negative")
    assert t.tolist() == [[1, 0, 0, 0]] and m.all()
    t, m = apply_label_policies(target, difficult, "ignore")
    assert t.tolist() == target.tolist() and m.tolist() == [[True, True, False, True]]
    assert t.dtype == torch.float32 and m.dtype == torch.bool
    assert DIFFICULT_POLICIES == ("positive", "ignore", "negative")
    with pytest.raises(ValueError, match="ignore"):
        apply_label_policies(target, difficult, "drop")


def test_apply_label_policies_with_unknown_labels():
    target = torch.tensor([[1.0, -1.0, 1.0, 0.0]])
    difficult = torch.tensor([[False, False, True, False]])
    t, m = apply_label_policies(target, difficult, "positive", "ignore")
    assert t.tolist() == [[1, 0, 1, 0]] and m.tolist() == [[True, False, True, True]]
    t, m = apply_label_policies(target, difficult, "ignore", "negative")
    assert t.tolist() == [[1, 0, 1, 0]] and m.tolist() == [[True, True, False, True]]
    assert UNKNOWN_POLICIES == ("ignore", "negative")
    with pytest.raises(ValueError, match="--unknown policy 'teacher'"):
        apply_label_policies(target, difficult, "positive", "teacher")


def test_unknown_labels_in_bce_and_partial_softmax_by_hand():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.2, -0.4]])
    target = torch.tensor([[1.0, -1.0, 0.0], [-1.0, -1.0, -1.0]])  # the second image: nothing annotated
    no_difficult = torch.zeros(2, 3, dtype=torch.bool)
    ignored = apply_label_policies(target, no_difficult, "positive", "ignore")
    softplus = F.softplus
    # ignore: two pairs count; the image without a known label adds nothing.
    assert bce_loss(z, *ignored).item() == pytest.approx(((softplus(-z[0, 0]) + softplus(z[0, 2])) / 2).item())
    assert partial_softmax_loss(z, *ignored).item() == pytest.approx(softplus(z[0, 2] - z[0, 0]).item())
    # negative: every pair counts, the unknown ones as absent.
    negative = apply_label_policies(target, no_difficult, "positive", "negative")
    expected = (softplus(-z[0, 0]) + softplus(z[0, 1]) + softplus(z[0, 2]) + softplus(z[1]).sum()) / 6
    assert bce_loss(z, *negative).item() == pytest.approx(expected.item())
    assert partial_softmax_loss(z, *negative).item() == pytest.approx(
        softplus(torch.logsumexp(z[0, 1:], 0) - z[0, 0]).item())
    # A batch of nothing but unknown labels: a zero loss, not NaN.
    empty = apply_label_policies(torch.full((2, 3), -1.0), no_difficult, "positive", "ignore")
    for loss in (bce_loss, partial_softmax_loss, asymmetric_loss, one_over_k_loss):
        assert loss(z, *empty).item() == 0.0


@pytest.mark.parametrize(
    "name", ["bce", "partial_softmax", "temperature", "label_smoothing", "one_over_k", "asl"]
)
def test_ignored_pair_changes_nothing(name):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 6, generator=g)
    target = torch.tensor([[1.0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 1]])
    difficult = torch.zeros(3, 6, dtype=torch.bool)
    difficult[0, 2] = difficult[1, 3] = True  # one difficult positive, one difficult (stored) negative
    target, mask = apply_label_policies(target, difficult, "ignore")

    def loss_of(logits):
        return LABEL_LOSSES[name][0](logits, target, mask)

    base, grad = value_and_grad(loss_of, z)
    moved = z.clone()
    moved[0, 2] += 7.0
    moved[1, 3] -= 5.0
    assert loss_of(moved).item() == pytest.approx(base.item(), rel=1e-6)
    assert grad[0, 2] == 0 and grad[1, 3] == 0
