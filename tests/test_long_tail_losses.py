"""The long-tail losses (Distribution-Balanced, class-balanced, two-way) against float64 references transcribed from
their official code (values and gradients), their reductions to BCE, and one number worked out by hand each.

The references are loops over samples and classes, written from the official formulas and not from udtimm's
vectorised code; test_losses.py and test_soft_target_losses.py run them on their batches too."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_bf16_computed_in_float32, assert_matches_reference, value_and_grad

from udtimm.losses import (
    apply_label_policies,
    bce_loss,
    class_balanced_loss,
    distribution_balanced_loss,
    two_way_loss,
)

# --- references: float64, hard labels (y > 0.5 a positive), pairs with m False unknown -------------------------


def _log_sigmoid(x):
    # Written per sign so that the float64 reference survives |x| = 100 (DB scales the negatives' logits).
    return -torch.log1p(torch.exp(-x)) if x >= 0 else x - torch.log1p(torch.exp(x))


def _bce(logit, label):
    return -(label * _log_sigmoid(logit) + (1 - label) * _log_sigmoid(-logit))


def _mean(terms, z):
    return sum(terms) / len(terms) if terms else z.sum() * 0


def ref_db(z, y, m, positives, annotated, map_alpha=0.1, map_beta=10.0, map_mu=0.2, neg_scale=2.0, bias_factor=0.05,
           focal_gamma=0.0, focal_scale=1.0):
    """wutong16/DistributionBalancedLoss ResampleLoss (reweight_func='rebalance', logit_reg, focal) pair by pair:
    rebalance_weight, logit_reg_functions and the focal branch, with N_i (annotated) for the official train_num and
    the mean over the counted pairs."""
    n, total = positives.double().tolist(), torch.as_tensor(annotated, dtype=torch.float64).expand(z.shape[1]).tolist()
    terms = []
    for b in range(z.shape[0]):
        # repeat_rate = sum(gt_labels * freq_inv): over the sample's counted positives.
        repeat_rate = sum(1 / n[j] for j in range(z.shape[1]) if m[b, j] and y[b, j] > 0.5)
        for c in range(z.shape[1]):
            if not m[b, c]:
                continue
            if repeat_rate > 0:
                pos_weight = (1 / n[c]) / repeat_rate
                weight = torch.sigmoid(z.new_tensor(map_beta * (pos_weight - map_mu))) + map_alpha
            else:
                weight = z.new_tensor(map_alpha + 1.0)  # sigmoid(+inf) + alpha
            init_bias = -math.log(total[c] / n[c] - 1) * bias_factor / neg_scale
            logit = z[b, c] + init_bias
            if y[b, c] > 0.5:
                label = 1.0
            else:
                logit, label, weight = logit * neg_scale, 0.0, weight / neg_scale
            bce = _bce(logit, label)
            pt = torch.exp(-bce)
            terms.append(focal_scale * (1 - pt) ** focal_gamma * weight * bce)
    return _mean(terms, z)


def ref_cb(z, y, m, positives, beta=0.9999, focal_gamma=0.0):
    """richardaecn/class-balanced-loss CB_loss ('sigmoid' / 'focal'): weights (1 - beta) / (1 - beta^n) scaled to sum
    to the number of classes, the official focal modulator exp(-g y z - g log(1 + e^-z)); the mean over the counted
    pairs."""
    effective_num = [1.0 - beta**n for n in positives.double().tolist()]
    weights = [(1.0 - beta) / e for e in effective_num]
    weights = [w / sum(weights) * len(weights) for w in weights]
    terms = []
    for b in range(z.shape[0]):
        for c in range(z.shape[1]):
            if not m[b, c]:
                continue
            label = float(y[b, c] > 0.5)
            bce = _bce(z[b, c], label)
            modulator = 1.0
            if focal_gamma:
                modulator = torch.exp(-focal_gamma * label * z[b, c] - focal_gamma * torch.log(1 + torch.exp(-z[b, c])))
            terms.append(weights[c] * modulator * bce)
    return _mean(terms, z)


def ref_two_way(z, y, m, positive_temperature=4.0, negative_temperature=1.0, n_inf=-100.0):
    """tk1980/TwoWayMultiLabelLoss utils/criterion.py TwoWayLoss.forward as written (nINF = -100), in float64, with the
    unknown pairs as its y = -1; a mean over no row is 0 here (NaN there). The offset nINF hides a left-out logit
    only while the logits are well within 100 of each other: logits of +-50 need a larger one."""
    tp, tn = positive_temperature, negative_temperature
    x, y = z, torch.where(m, (y > 0.5).to(z.dtype), -1.0)
    class_mask = (y > 0).any(dim=0)
    sample_mask = (y > 0).any(dim=1)
    pmask = y.masked_fill(y <= 0, n_inf).masked_fill(y > 0, 0.0)
    plogit_class = torch.logsumexp(-x / tp + pmask, dim=0).mul(tp)[class_mask]
    plogit_sample = torch.logsumexp(-x / tp + pmask, dim=1).mul(tp)[sample_mask]
    nmask = y.masked_fill(y != 0, n_inf).masked_fill(y == 0, 0.0)
    nlogit_class = torch.logsumexp(x / tn + nmask, dim=0).mul(tn)[class_mask]
    nlogit_sample = torch.logsumexp(x / tn + nmask, dim=1).mul(tn)[sample_mask]
    return _mean(list(F.softplus(nlogit_class + plogit_class)), z) + _mean(
        list(F.softplus(nlogit_sample + plogit_sample)), z)


# --- the losses under test, with the class counts of the batches below -----------------------------------------

POSITIVES = torch.tensor([40.0, 6.0, 1.0, 3.0])
ANNOTATED = torch.tensor([100.0, 100.0, 20.0, 4.0])  # per class (partly unknown labels); n_i <= N_i - 1
COUNTS = {"positives": POSITIVES, "annotated": ANNOTATED}
DB_OTHER = {"map_alpha": 0.3, "map_beta": 4.0, "map_mu": 0.5, "neg_scale": 3.0, "bias_factor": 0.2}


def _losses():
    """name: (udtimm's loss, its reference) with the registered names' settings and some others."""
    db, db_ref = partial(distribution_balanced_loss, **COUNTS), partial(ref_db, **COUNTS)
    cb, cb_ref = partial(class_balanced_loss, positives=POSITIVES), partial(ref_cb, positives=POSITIVES)
    return {
        "db": (db, db_ref),
        "db_focal": (partial(db, focal_gamma=2.0, focal_scale=2.0), partial(db_ref, focal_gamma=2.0, focal_scale=2.0)),
        "db_other_settings": (partial(db, **DB_OTHER, focal_gamma=1.5), partial(db_ref, **DB_OTHER, focal_gamma=1.5)),
        "cb_bce": (cb, cb_ref),
        "cb_focal": (partial(cb, focal_gamma=2.0), partial(cb_ref, focal_gamma=2.0)),
        "cb_focal_beta_0.9": (partial(cb, beta=0.9, focal_gamma=1.0), partial(cb_ref, beta=0.9, focal_gamma=1.0)),
        "two_way": (two_way_loss, ref_two_way),
        "two_way_hot_negatives": (partial(two_way_loss, positive_temperature=1.5, negative_temperature=2.0),
                                  partial(ref_two_way, positive_temperature=1.5, negative_temperature=2.0)),
    }


LOSSES = _losses()

# --- inputs --------------------------------------------------------------------------------------------------------


def _batch():
    """Rows: two positives; none; three positives; one positive; one positive. Class 3 has no positive in the batch.
    Masked: an unknown negative (0, 1); row 2 loses its only negative (a row without negatives); row 3 loses its only
    positive (a sample without a counted positive); an unknown negative (4, 2)."""
    z = torch.tensor(
        [[1.2, -0.7, 0.3, -2.1], [0.4, 1.5, -1.1, 0.8], [-0.9, 0.2, 2.2, -0.5], [1.7, -1.3, -0.4, 0.6],
         [-0.2, 0.9, -1.6, 1.1]],
        dtype=torch.float64,
    )
    y = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.float64)
    m = torch.ones(5, 4, dtype=torch.bool)
    m[0, 1] = m[2, 3] = m[3, 0] = m[4, 2] = False
    return z, y, m


def _cases():
    z, y, m = _batch()
    large = z.sign() * 30
    large[0, 0] = -30  # a positive at -30 beside negatives at +-30
    return {
        "hard": (z, y, None),
        "masked": (z, y, m),
        "large": (large, y, m),
        "large_unmasked": (large, y, None),
        "no_positive": (z, torch.zeros_like(y), m),
    }


def _softplus(x):
    return math.log1p(math.exp(x))


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


# --- against the references ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("name", list(LOSSES))
def test_matches_the_official_formula(name, case):
    assert_matches_reference(*LOSSES[name], *_cases()[case], grad_rtol=1e-5)


@pytest.mark.parametrize("name", list(LOSSES))
def test_bf16_input_is_computed_in_float32(name):
    z, y, m = _batch()
    assert_bf16_computed_in_float32(*LOSSES[name], (z * 3).to(torch.bfloat16), y, m)


@pytest.mark.parametrize("name", list(LOSSES))
def test_an_unknown_pair_changes_nothing(name):
    """Neither its logit nor its stored target moves the loss; DB's repeat rate leaves it out too."""
    fn = LOSSES[name][0]
    z, y, _ = _batch()
    z = z.float()
    difficult = torch.zeros(5, 4, dtype=torch.bool)
    difficult[0, 2] = difficult[2, 3] = difficult[4, 0] = True  # a positive, a negative, a negative
    target, mask = apply_label_policies(y.float(), difficult, "ignore")
    base, grad = value_and_grad(fn, z, target, mask)
    moved, flipped = z.clone(), target.clone()
    moved[0, 2] += 7.0
    moved[2, 3] -= 5.0
    flipped[difficult] = 1 - flipped[difficult]
    assert fn(moved, target, mask).item() == pytest.approx(base.item(), rel=1e-6)
    assert fn(z, flipped, mask).item() == pytest.approx(base.item(), rel=1e-6)
    assert (grad[difficult] == 0).all()


@pytest.mark.parametrize("name", list(LOSSES))
def test_nothing_counted_is_zero_with_a_gradient_path(name):
    fn = LOSSES[name][0]
    z = torch.randn(3, 4, requires_grad=True)
    loss = fn(z, torch.ones(3, 4), torch.zeros(3, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.equal(grad, torch.zeros_like(grad))


# --- Distribution-Balanced -----------------------------------------------------------------------------------------


def test_db_without_rebalancing_or_regularisation_is_bce():
    """neg_scale 1 and bias factor 0 leave the logits as they are; map_beta 0 and map_alpha 0.5 make every weight 1
    (in samples with a counted positive: without one, r = inf and the weight is map_alpha + 1 whatever map_beta)."""
    z, y, m = (t[[0, 2, 4]] for t in _batch())
    plain = distribution_balanced_loss(z.float(), y.float(), m, **COUNTS, map_alpha=0.5, map_beta=0.0, neg_scale=1.0,
                                       bias_factor=0.0)
    torch.testing.assert_close(plain, bce_loss(z.float(), y.float(), m), rtol=1e-6, atol=1e-7)


def test_db_without_regularisation_is_bce_weighted_by_the_rebalancing_map():
    z, y, _ = _batch()
    n = POSITIVES.double()
    weights = torch.empty_like(z)
    for b in range(5):
        repeat_rate = (y[b] / n).sum()
        for c in range(4):
            # Row 1 has no positive: r = inf, sigmoid(inf) = 1.
            r = (1 / n[c]) / repeat_rate if repeat_rate > 0 else math.inf
            weights[b, c] = 0.1 + (1.0 if r == math.inf else _sigmoid(10 * (r - 0.2)))
    expected = F.binary_cross_entropy_with_logits(z, y, weight=weights)
    loss = distribution_balanced_loss(z.float(), y.float(), **COUNTS, neg_scale=1.0, bias_factor=0.0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-7)


def test_db_sample_without_a_counted_positive_weighs_alpha_plus_one():
    """Its only positive unknown: repeat rate 0, r = inf, every weight map_alpha + 1; no inf or NaN, gradients too."""
    z = torch.tensor([[3.0, -1.0, 0.5, 40.0]], requires_grad=True)
    y = torch.tensor([[1.0, 0, 0, 0]])
    m = torch.tensor([[False, True, True, True]])
    loss = distribution_balanced_loss(z, y, m, **COUNTS, neg_scale=1.0, bias_factor=0.0)
    (grad,) = torch.autograd.grad(loss, z)
    expected = 1.1 * F.softplus(z[0, 1:]).mean()
    torch.testing.assert_close(loss, expected)
    assert torch.isfinite(grad).all() and grad[0, 0] == 0


def test_db_by_hand():
    """2 x 3: n = (1, 2, 4) of N = (11, 12, 8) images, so N/n - 1 = (10, 5, 1); the official settings."""
    z = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]])
    y = torch.tensor([[1.0, 0, 1], [0, 0, 0]])
    counts = {"positives": torch.tensor([1.0, 2, 4]), "annotated": torch.tensor([11.0, 12, 8])}
    # Sample 0: repeat rate 1/1 + 1/4 = 1.25, r = (1, 1/2, 1/4) / 1.25 = (0.8, 0.4, 0.2),
    # w = 0.1 + sigmoid(10 (r - 0.2)) = 0.1 + sigmoid(6), 0.1 + sigmoid(2), 0.1 + sigmoid(0) = 0.6.
    # Sample 1 has no positive: w = 0.1 + 1 = 1.1 on all three.
    w0 = [0.1 + _sigmoid(6), 0.1 + _sigmoid(2), 0.6]
    # b = -0.05 log(N/n - 1) / 2 = (-0.025 ln 10, -0.025 ln 5, 0).
    b = [-0.025 * math.log(10), -0.025 * math.log(5), 0.0]
    # Positives: w softplus(-(z + b)); negatives: (w / 2) softplus(2 (z + b)).
    pairs = [
        (w0[0], -(0.5 + b[0]), -(0.5 + b[0])),  # (weight, BCE argument, logit of 1 - pt)
        (w0[1] / 2, 2 * (-1.0 + b[1]), 2 * (-1.0 + b[1])),
        (w0[2], -(2.0 + b[2]), -(2.0 + b[2])),
        (1.1 / 2, 2 * (1.0 + b[0]), 2 * (1.0 + b[0])),
        (1.1 / 2, 2 * b[1], 2 * b[1]),
        (1.1 / 2, 2 * -0.5, 2 * -0.5),
    ]
    expected_db = sum(w * _softplus(a) for w, a, _ in pairs) / 6
    # db-focal: 2 (1 - pt)^2 times each term, 1 - pt = sigmoid of the BCE argument.
    expected_focal = sum(2 * _sigmoid(f) ** 2 * w * _softplus(a) for w, a, f in pairs) / 6
    assert distribution_balanced_loss(z, y, **counts).item() == pytest.approx(expected_db, rel=1e-6)
    focal = distribution_balanced_loss(z, y, **counts, focal_gamma=2.0, focal_scale=2.0)
    assert focal.item() == pytest.approx(expected_focal, rel=1e-6)


# --- class-balanced ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 1e-9])
def test_cb_with_beta_to_zero_is_bce(beta):
    """beta -> 0: 1 - beta^n -> 1 for every class, all weights equal, normalised to 1."""
    z, y, m = _batch()
    for focal_gamma, reference in ((0.0, bce_loss(z.float(), y.float(), m)), (2.0, None)):
        loss = class_balanced_loss(z.float(), y.float(), m, positives=POSITIVES, beta=beta, focal_gamma=focal_gamma)
        if reference is None:  # the unweighted sigmoid focal loss
            reference = ref_cb(z, y, m, torch.ones(4), beta=0.5, focal_gamma=2.0)
        torch.testing.assert_close(loss.double(), reference.double(), rtol=1e-6, atol=1e-7)


def test_cb_focal_with_gamma_zero_is_cb_bce():
    z, y, m = _batch()
    cb_bce = class_balanced_loss(z.float(), y.float(), m, positives=POSITIVES)
    assert torch.equal(class_balanced_loss(z.float(), y.float(), m, positives=POSITIVES, focal_gamma=0.0), cb_bce)
    # The focal factor itself tends to 1.
    nearly = class_balanced_loss(z.float(), y.float(), m, positives=POSITIVES, focal_gamma=1e-7)
    torch.testing.assert_close(nearly, cb_bce, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.9999, 0.999999])
def test_cb_weights_are_stable_for_beta_near_one_and_wide_counts(beta):
    """1 - beta^n for n from 1 (about 1 - beta, a difference of two numbers near 1 in float32) to 10^7 (about 1)."""
    positives = torch.tensor([1.0, 7.0, 1e4, 1e7])
    z, y, m = _batch()
    loss = class_balanced_loss(z.float(), y.float(), m, positives=positives, beta=beta)
    torch.testing.assert_close(loss.double(), ref_cb(z, y, m, positives, beta=beta), rtol=1e-5, atol=1e-6)


def test_cb_by_hand():
    """2 x 3: n = (1, 2, 4), beta = 1/2."""
    # 1 / (1 - beta^n) = (2, 4/3, 16/15), sum 4.4: the weights 3 / 4.4 times them are (15, 10, 8) / 11.
    # Logits 0, ln 3 and -ln 3 give BCE ln 2 and ln 4 (softplus(ln 3) = ln 4):
    # (0,0) +, z 0: ln 2; (0,1) -, z ln 3: ln 4; (0,2) +, z -ln 3: ln 4;
    # (1,0) -, z ln 3: ln 4; (1,1) +, z 0: ln 2; (1,2) -, z ln 3: ln 4.
    # cb-bce = (15 ln2 + 10 ln4 + 8 ln4 + 15 ln4 + 10 ln2 + 8 ln4) / (11 * 6) = (25 + 2 * 41) ln 2 / 66 = 107 ln 2 / 66.
    # cb-focal, gamma 2: (1 - p)^2 on positives, p^2 on negatives: 1/4 at z = 0, 9/16 on every ln 4 pair:
    # ((15 + 10) / 4 ln 2 + 9/16 * 2 ln 2 * (10 + 8 + 15 + 8)) / 66 = (25/4 + 369/8) ln 2 / 66 = 419 ln 2 / 528.
    ln3 = math.log(3)
    z = torch.tensor([[0.0, ln3, -ln3], [ln3, 0.0, ln3]])
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    positives = torch.tensor([1.0, 2, 4])
    cb_bce = class_balanced_loss(z, y, positives=positives, beta=0.5)
    assert cb_bce.item() == pytest.approx(107 * math.log(2) / 66, rel=1e-6)
    cb_focal = class_balanced_loss(z, y, positives=positives, beta=0.5, focal_gamma=2.0)
    assert cb_focal.item() == pytest.approx(419 * math.log(2) / 528, rel=1e-6)


# --- two-way -------------------------------------------------------------------------------------------------------


def test_two_way_by_hand():
    """2 x 3, Tp = 4, Tn = 1: softplus(Tn log sum_neg e^(z/Tn) + Tp log sum_pos e^(-z/Tp)) per sample and per class."""
    z = torch.tensor([[2.0, -1.0, 0.0], [1.0, 0.5, -3.0]])
    y = torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    # Sample 0: negatives (-1, 0), positive 2: softplus(ln(e^-1 + 1) - 2).
    # Sample 1: negative 1, positives (0.5, -3): softplus(1 + 4 ln(e^(-1/8) + e^(3/4))).
    samples = _softplus(math.log(math.exp(-1) + 1) - 2) + _softplus(1 + 4 * math.log(math.exp(-1 / 8) + math.exp(0.75)))
    # Class 0: positive 2, negative 1: softplus(1 - 2); class 1: positive 0.5, negative -1: softplus(-1 - 0.5);
    # class 2: positive -3, negative 0: softplus(0 + 3).
    classes = _softplus(-1) + _softplus(-1.5) + _softplus(3)
    assert two_way_loss(z, y).item() == pytest.approx(samples / 2 + classes / 3, rel=1e-6)


def test_two_way_soft_positive_weighs_its_target_inside_the_logsumexp():
    """One sample: positives a (y = 0.3) and b (y = 1), negative c. Each class has one sample: no negatives (a zero
    term) or no positive (left out), so only the sample-wise term is left."""
    a, b, c = 0.7, -0.4, 1.3
    z = torch.tensor([[a, b, c]])
    expected = _softplus(c + 4 * math.log(0.3 * math.exp(-a / 4) + math.exp(-b / 4)))
    assert two_way_loss(z, torch.tensor([[0.3, 1.0, 0.0]])).item() == pytest.approx(expected, rel=1e-6)


def test_two_way_without_negatives_is_zero_with_finite_gradients():
    z = torch.tensor([[30.0, -30.0, 0.5], [-2.0, 1.0, 3.0]], requires_grad=True)
    for temperatures in ((4.0, 1.0), (0.5, 3.0)):
        loss = two_way_loss(z, torch.ones(2, 3), None, *temperatures)
        (grad,) = torch.autograd.grad(loss, z)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_two_way_row_without_negatives_adds_nothing():
    """A sample whose classes are all positive: its sample-wise term is 0 (still counted in the mean); its positives
    take part in the class-wise terms."""
    z = torch.tensor([[0.3, -1.2, 2.0], [1.1, 0.4, -0.6]])
    y = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    sample_1 = _softplus(math.log(math.exp(0.4) + math.exp(-0.6)) - 1.1)
    # Class 0 has no negative; classes 1 and 2: positive of sample 0 against the negative of sample 1.
    classes = 0 + _softplus(0.4 + 1.2) + _softplus(-0.6 - 2.0)
    assert two_way_loss(z, y).item() == pytest.approx((0 + sample_1) / 2 + classes / 3, rel=1e-6)
