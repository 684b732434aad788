"""Per-class thresholds: the choice against a brute-force search with scikit-learn, the summary table (the
file that keeps them: tests/test_tuning.py)."""

import numpy as np
import pytest
import torch
from conftest import OPENIMAGES_CLASSES
from sklearn.metrics import f1_score, precision_recall_fscore_support, precision_score, recall_score

from udtimm import thresholds
from udtimm.config import ConfigError
from udtimm.predictions import Predictions
from udtimm.thresholds import ThresholdObjective, parse_objective, tune_thresholds

CLASSES = ["a", "b", "c", "d", "e"]


def make_data(n: int = 90, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores that carry some signal, rounded so that many images tie; a few difficult pairs."""
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, len(CLASSES), generator=g) < 0.35).float()
    scores = (0.35 * target + 0.65 * torch.rand(n, len(CLASSES), generator=g)).mul(20).round().div(20)
    difficult = torch.rand(n, len(CLASSES), generator=g) < 0.1
    return scores.float(), target, difficult


def candidates(scores: np.ndarray) -> list[float]:
    """Every threshold that predicts a different set: each distinct score, and one above them all."""
    return [*np.unique(scores).tolist(), float(scores.max()) + 1]


def kept_class(scores, target, difficult, c) -> tuple[np.ndarray, np.ndarray]:
    keep = ~difficult[:, c].numpy()
    return scores[:, c].double().numpy()[keep], (target[:, c].numpy() > 0.5)[keep]


def test_f1_thresholds_reach_the_brute_force_maximum() -> None:
    scores, target, difficult = make_data()
    result = tune_thresholds(scores, target, difficult, ThresholdObjective("f1"))
    assert result.tuned.all() and result.reached.all()
    for c in range(len(CLASSES)):
        s, y = kept_class(scores, target, difficult, c)
        best = max(f1_score(y, s >= t, zero_division=0) for t in candidates(s))
        chosen = result.values[c].item()
        assert f1_score(y, s >= chosen, zero_division=0) == pytest.approx(best, abs=1e-12), CLASSES[c]
        # Strictly between two scores (or at the lowest one): new images at either score are decided as here.
        assert chosen not in s.tolist() or chosen == s.min()


def test_difficult_pairs_do_not_count_when_choosing() -> None:
    scores, target, difficult = make_data(seed=1)
    plain = tune_thresholds(scores, target, difficult, ThresholdObjective("f1"))
    # What is stored at a difficult pair must not matter.
    flipped = target.clone()
    flipped[difficult] = 1 - flipped[difficult]
    assert torch.equal(tune_thresholds(scores, flipped, difficult, ThresholdObjective("f1")).values, plain.values)


@pytest.mark.parametrize("wanted", [0.6, 0.8])
def test_precision_thresholds_give_the_most_recall_at_that_precision(wanted: float) -> None:
    scores, target, difficult = make_data(seed=2)
    result = tune_thresholds(scores, target, difficult, ThresholdObjective("precision", wanted))
    for c in range(len(CLASSES)):
        s, y = kept_class(scores, target, difficult, c)
        found = precision_recall_fscore_support(y, s >= result.values[c].item(), average="binary", zero_division=0)
        searched = [precision_recall_fscore_support(y, s >= t, average="binary", zero_division=0)[:2]
                    for t in candidates(s)]
        reachable = [recall for precision, recall in searched if precision >= wanted]
        assert bool(result.reached[c]) == bool(reachable)
        if reachable:
            assert found[0] >= wanted and found[1] == max(reachable)
        else:  # the best precision there is, with the most recall
            best = max(precision for precision, _ in searched)
            assert found[:2] == pytest.approx((best, max(r for p, r in searched if p == best)))


def test_unreachable_precision_and_classes_without_positive() -> None:
    scores, target, difficult = make_data(seed=3)
    target[:, 1] = 0  # no positive: the default stays
    scores[:, 2] = 0.5  # all tied: the only threshold predicts every image, precision = the positive rate
    result = tune_thresholds(scores, target, difficult, ThresholdObjective("precision", 1.0), default=0.7)
    assert not result.tuned[1] and result.values[1] == 0.7
    assert not result.reached[2] and result.values[2] == 0.5
    table = thresholds.summary_table(Predictions(scores, target, difficult, torch.arange(len(scores))), CLASSES,
                                     result, ThresholdObjective("precision", 1.0))
    assert "no positive: default kept" in table and "precision@1 not reached" in table


def test_summary_table_matches_sklearn() -> None:
    scores, target, difficult = make_data(seed=4)
    result = tune_thresholds(scores, target, difficult, ThresholdObjective("f1"))
    predictions = Predictions(scores, target, difficult, torch.arange(len(scores)))
    rows = [line.split() for line in
            thresholds.summary_table(predictions, CLASSES, result, ThresholdObjective("f1")).splitlines()[2:]]
    for c, row in enumerate(rows):
        s, y = kept_class(scores, target, difficult, c)
        predicted = s >= result.values[c].item()
        assert row[0] == CLASSES[c] and float(row[1]) == pytest.approx(result.values[c].item(), abs=5e-5)
        assert int(row[2]) == y.sum()
        expected = [precision_score(y, predicted, zero_division=0), recall_score(y, predicted), f1_score(y, predicted)]
        assert [float(v) for v in row[3:6]] == pytest.approx([100 * v for v in expected], abs=0.006)


def test_objectives_are_parsed_or_refused() -> None:
    assert parse_objective("f1") == ThresholdObjective("f1")
    assert parse_objective("precision@0.9") == ThresholdObjective("precision", 0.9)
    assert str(parse_objective("precision@0.9")) == "precision@0.9"
    for bad in ("f2", "precision@", "precision@1.5", "precision@0", "recall@0.9", "precision@x"):
        with pytest.raises(ConfigError, match="--tune-thresholds"):
            parse_objective(bad)


@pytest.mark.slow
def test_ten_thousand_classes_are_tuned_and_summarised() -> None:
    names = [f"class{index:05d}" for index in range(OPENIMAGES_CLASSES)]
    g = torch.Generator().manual_seed(7)
    num_images = 60
    # OpenImages' long tail: from classes without a positive to classes on a third of the images.
    target = (torch.rand(num_images, len(names), generator=g) < torch.logspace(-2.5, -0.5, len(names))).float()
    scores = (0.3 * target + 0.7 * torch.rand(target.shape, generator=g)).mul(50).round().div(50)
    difficult = torch.rand(target.shape, generator=g) < 0.01
    objective = ThresholdObjective("f1")
    result = tune_thresholds(scores, target, difficult, objective)
    for c in (0, 4_321, 9_999):  # each class as if tuned alone
        alone = tune_thresholds(scores[:, [c]], target[:, [c]], difficult[:, [c]], objective)
        assert alone.values.item() == result.values[c].item()

    table = thresholds.summary_table(Predictions(scores, target, difficult, torch.arange(num_images)), names,
                                     result, objective, rows=5).splitlines()
    assert len(table) < 50 and table[0].startswith(f"{OPENIMAGES_CLASSES} classes, summarised")
    assert f"{int((~result.tuned).sum())} classes: no positive: default kept" in table
    # F1 at each tuned threshold, written apart from udtimm: the worst five named.
    keep, positive = ~difficult.numpy(), target.numpy() > 0.5
    predicted = (scores.double().numpy() >= result.values.numpy()) & keep
    tp, n_positive = (predicted & positive).sum(0), (positive & keep).sum(0)
    with np.errstate(invalid="ignore"):
        f1 = np.where(n_positive > 0, 2 * tp / (predicted.sum(0) + n_positive), np.nan)
    order = np.argsort(np.where(np.isnan(f1), np.inf, f1), kind="stable")[:5]
    start = table.index("worst 5 by f1:") + 3
    assert [line.split()[0] for line in table[start:start + 5]] == [names[c] for c in order]
