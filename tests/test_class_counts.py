"""udtimm/class_counts.py: the training split's class counts, their fallback, the head/medium/tail groups, and the
run's class_counts.csv checked on resume."""

import json

import numpy as np
import pytest
import torch

from udtimm.class_counts import (
    ClassCounts,
    check_same_counts,
    checkpoint_counts,
    class_groups,
    counts_table,
    group_thresholds,
)
from udtimm.data.base import UNKNOWN, MultiLabelDataset, Sample, labels_from_dense
from udtimm.errors import ConfigError

# Five images, three classes; per class (present, difficult, absent, unknown):
# c0 (3, 1, 1, 0), c1 (0, 0, 3, 2), c2 (1, 0, 0, 4).
TARGET = np.array([[1, 0, 1], [1, UNKNOWN, UNKNOWN], [1, 0, UNKNOWN], [1, UNKNOWN, UNKNOWN], [0, 0, UNKNOWN]],
                  dtype=np.float32)
DIFFICULT = np.zeros((5, 3), dtype=np.bool_)
DIFFICULT[3, 0] = True


@pytest.fixture(params=["absent", "unknown"])
def dataset(request) -> MultiLabelDataset:
    """The same labels stored either way a dataset can make of an unlisted class."""
    samples = [Sample(f"{index}", f"/x/{index}.jpg", labels_from_dense(TARGET[index], DIFFICULT[index], request.param))
               for index in range(5)]
    return MultiLabelDataset(samples, ["c0", "c1", "c2"], unlisted=request.param)


@pytest.mark.parametrize(("difficult", "positives", "annotated"), [
    ("positive", (4, 0, 1), (5, 3, 1)),
    ("ignore", (3, 0, 1), (4, 3, 1)),
    ("negative", (3, 0, 1), (5, 3, 1)),
])
def test_counts_leave_unknown_labels_out_and_read_difficult_ones_as_training_does(dataset, difficult, positives,
                                                                                   annotated) -> None:
    counts = ClassCounts.of(dataset, difficult)
    assert (counts.positives, counts.annotated, counts.images) == (positives, annotated, 5)


def test_fallback_keeps_every_class_between_one_positive_and_one_negative() -> None:
    positives, annotated = ClassCounts((0, 5, 40, 3, 0), (40, 40, 40, 1, 0), 40).loss_tensors()
    assert positives.tolist() == [1.0, 5.0, 39.0, 1.0, 1.0] and annotated.tolist() == [40.0, 40.0, 40.0, 2.0, 2.0]
    assert torch.isfinite(1 / positives).all() and torch.isfinite(torch.log(annotated / positives - 1)).all()


def test_json_round_trip_and_the_checkpoint_groups() -> None:
    counts = ClassCounts((500, 50, 5), (1000, 1000, 900), 1142)
    assert ClassCounts.from_json(counts.to_json()) == counts
    metadata = {"class_counts": counts.to_json(), "class_groups": json.dumps([100.0, 20.0])}
    found, groups = checkpoint_counts(metadata)
    assert found == counts and groups.tolist() == [0, 1, 2]
    assert checkpoint_counts(metadata, (600.0, 1.0))[1].tolist() == [1, 1, 1]  # validate.py --class-groups
    assert checkpoint_counts({}) is None  # a checkpoint from before the counts


def test_voc_lt_thresholds_scale_with_the_training_images_and_a_given_pair_is_used_as_it_is() -> None:
    assert group_thresholds(ClassCounts((1,), (1,), 1142)) == pytest.approx((100.0, 20.0))
    assert group_thresholds(ClassCounts((1,), (1,), 1500)) == pytest.approx((131.35, 26.27), abs=0.01)
    assert group_thresholds(ClassCounts((1,), (1,), 10), (8, 2)) == (8.0, 2.0)
    with pytest.raises(ConfigError, match="--class-groups 2 8: the head threshold is below the tail threshold"):
        group_thresholds(ClassCounts((1,), (1,), 10), (2, 8))
    counts = ClassCounts((101, 100, 20, 19), (200,) * 4, 1142)
    assert class_groups(counts, (100.0, 20.0)).tolist() == [0, 1, 1, 2]  # VOC-LT: more than 100, fewer than 20


def test_a_resume_whose_training_split_changed_is_refused_naming_the_class(tmp_path) -> None:
    path = tmp_path / "class_counts.csv"
    counts = ClassCounts((3, 1), (5, 5), 5)
    path.write_text(counts_table(["a, the first", "b"], counts, torch.tensor([0, 2])))
    assert path.read_text().splitlines() == ["class,positives,annotated,group", '"a, the first",3,5,head', "b,1,5,tail"]
    check_same_counts(str(path), ["a, the first", "b"], counts)
    with pytest.raises(ConfigError, match="class 'b' had 1 positives of 5 annotated training images when the run "
                                          "started, 2 of 5 now"):
        check_same_counts(str(path), ["a, the first", "b"], ClassCounts((3, 2), (5, 5), 5))
    with pytest.raises(ConfigError, match="other classes"):
        check_same_counts(str(path), ["a", "b"], counts)
