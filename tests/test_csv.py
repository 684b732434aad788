"""CSV loader: both formats, class lists from file or inferred, errors naming the line."""

import numpy as np
import pytest
import torch
from PIL import Image

from udtimm.data import DatasetError, DataSource, build_dataset
from udtimm.data.base import Label
from udtimm.data.csv import load_csv


@pytest.fixture
def root(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (5, 4)).save(tmp_path / "img" / f"{name}.jpg")
    return tmp_path


def rows(samples, classes):
    dense = [s.dense(len(classes)) for s in samples]
    return [(s.image_id, {classes[i] for i in np.flatnonzero(target)}, {classes[i] for i in np.flatnonzero(difficult)})
            for s, (target, difficult) in zip(samples, dense, strict=True)]


def test_label_list_format_inferred_from_train(root):
    (root / "train.csv").write_text("image,labels,difficult\nimg/a.jpg,dog;cat,\nimg/b.jpg,,bird\n"
                                    "img/c.jpg, cat ; ant ,\n")
    (root / "test.csv").write_text(f"image,labels\n{root}/img/d.jpg,dog\n")  # absolute path
    samples, classes = load_csv(str(root), "train")
    assert classes == ["ant", "bird", "cat", "dog"]  # sorted, difficult-only classes included
    assert rows(samples, classes) == [("img/a.jpg", {"dog", "cat"}, set()), ("img/b.jpg", {"bird"}, {"bird"}),
                                      ("img/c.jpg", {"cat", "ant"}, set())]
    assert samples[0].path == str(root / "img" / "a.jpg")
    test, test_classes = load_csv(str(root), "test")
    assert test_classes == classes  # inferred from train.csv, not from the split being loaded
    assert test[0].path == str(root / "img" / "d.jpg") and test[0].dense(len(classes))[0].tolist() == [0, 0, 0, 1]


def test_label_list_format_with_classes_file(root):
    (root / "classes.txt").write_text("dog\ncat\nfish\n")
    (root / "val.csv").write_text("image,labels,difficult\nimg/a.jpg,cat,dog\nimg/b.jpg,,\n")
    samples, classes = load_csv(str(root), "val")
    assert classes == ["dog", "cat", "fish"]
    assert rows(samples, classes) == [("img/a.jpg", {"cat", "dog"}, {"dog"}), ("img/b.jpg", set(), set())]
    (root / "other.txt").write_text("cat\ndog\n")
    assert load_csv(str(root), "val", classes_file=str(root / "other.txt"))[1] == ["cat", "dog"]


def test_one_hot_format(root):
    (root / "train.csv").write_text("image,sky,sea,sand\nimg/a.jpg,1,0,1\nimg/b.jpg,0,0,0\n")
    (root / "val.csv").write_text("image,sea,sand,sky\nimg/c.jpg,1,0,0\n")  # columns in another order
    samples, classes = load_csv(str(root), "train")
    assert classes == ["sky", "sea", "sand"]  # the train.csv column order
    assert rows(samples, classes) == [("img/a.jpg", {"sky", "sand"}, set()), ("img/b.jpg", set(), set())]
    val = build_dataset("csv", str(root), "test")  # no test.csv: "test" falls back to val.csv
    assert val.name == "csv:val" and val.classes == classes and val.dense_labels()[0].tolist() == [[0, 1, 0]]
    assert build_dataset("csv", str(root), "train").name == "csv:train"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("image,labels\nimg/a.jpg,cat\nimg/b.jpg,cow\n", r"train\.csv line 3: unknown class 'cow' in column 'labels'"),
        ("image,labels,difficult\nimg/a.jpg,cat,cow\n", r"train\.csv line 2: unknown class 'cow' in column 'diff"),
        ("image,labels\nimg/a.jpg,cat\nimg/zzz.jpg,cat\n", r"train\.csv line 3: image file .*img/zzz\.jpg does not"),
        ("image,labels\nimg/a.jpg,cat\n,cat\n", r"train\.csv line 3: empty image cell"),
        ("image,labels\nimg/a.jpg,cat\nimg/b.jpg,\nimg/a.jpg,dog\n",
         r"train\.csv line 4: image 'img/a.jpg' is listed twice \(first at line 2\)"),
        ("image,labels,extra\nimg/a.jpg,cat,1\n", r"train\.csv line 1: unexpected columns \['extra'\]"),
        ("path,labels\nimg/a.jpg,cat\n", r"train\.csv line 1: no 'image' column"),
        ("image,cat,dog\nimg/a.jpg,1,0\nimg/b.jpg,0,2\n", r"train\.csv line 3: column 'dog' is '2', expected 1, 0,"),
        ("image,cat,dog\nimg/a.jpg,1,?\n", r"train\.csv line 2: column 'dog' is '\?', expected 1, 0, or -1"),
        ("image,labels,unknown\nimg/a.jpg,cat,cat\n",
         r"train\.csv line 2: class 'cat' is listed in column 'unknown' and also in column 'labels'"),
        ("image,labels,unknown\nimg/a.jpg,cat,cow\n", r"train\.csv line 2: unknown class 'cow' in column 'unknown'"),
        ("image,cat,cow\nimg/a.jpg,1,0\n", r"train\.csv line 1: .*unknown: \['cow'\]; missing: \['dog'\]"),
        ("image,labels\n", r"train\.csv lists no images"),
    ],
)
def test_errors_name_the_line(root, content, message):
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / "train.csv").write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_csv(str(root), "train")


def test_unknown_labels_in_both_formats(root):
    (root / "classes.txt").write_text("cat\ndog\nfish\n")
    (root / "train.csv").write_text("image,cat,dog,fish\nimg/a.jpg,1,,0\nimg/b.jpg,-1,0,1\n")
    (root / "test.csv").write_text("image,labels,unknown\nimg/a.jpg,dog,cat;fish\nimg/b.jpg,,\n")
    train, _ = load_csv(str(root), "train")
    assert [s.dense(3)[0].tolist() for s in train] == [[1, -1, 0], [-1, 0, 1]]
    test, _ = load_csv(str(root), "test")
    assert [s.dense(3)[0].tolist() for s in test] == [[-1, 1, -1], [0, 0, 0]]
    assert not any(s.dense(3)[1].any() for s in (*train, *test))  # unknown is a state of its own, not difficult


def test_negatives_column_lists_verified_absent_classes(root):
    (root / "train.csv").write_text("image,labels,difficult,unknown,negatives\n"
                                    "img/a.jpg,cat,,dog,fish\nimg/b.jpg,dog,bird;dog,,cat;cat\nimg/c.jpg,,,,\n")
    samples, classes = load_csv(str(root), "train")
    assert classes == ["bird", "cat", "dog", "fish"]  # a class named only in negatives is inferred too
    dense = [s.dense(len(classes)) for s in samples]
    assert [target.tolist() for target, _ in dense] == [[0, 1, -1, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    # A class in labels and difficult is present through difficult objects only: no conflict.
    assert [difficult.tolist() for _, difficult in dense] == [[False] * 4, [True, False, True, False], [False] * 4]
    # Where an unlisted class is absent, a verified negative is the unlisted state: not stored.
    assert [s.labels["class_id"].tolist() for s in samples] == [[1, 2], [0, 2], []]


def test_unlisted_unknown_makes_the_classes_of_no_column_unknown(root):
    (root / "classes.txt").write_text("cat\ndog\nfish\nbird\n")
    # The header's columns in another order than the docstring's: they are named, not placed.
    (root / "train.csv").write_text("image,negatives,labels,unknown,difficult\n"
                                    "img/a.jpg,dog,cat,,\nimg/b.jpg,cat;fish,,bird,dog\nimg/c.jpg,,,,\n")
    samples, classes = load_csv(str(root), "train", unlisted="unknown")
    assert classes == ["cat", "dog", "fish", "bird"]
    dense = [s.dense(len(classes), "unknown") for s in samples]
    assert [target.tolist() for target, _ in dense] == [[1, 0, -1, -1], [0, 1, 0, -1], [-1, -1, -1, -1]]
    assert [difficult.tolist() for _, difficult in dense] == [[False] * 4, [False, True, False, False], [False] * 4]
    # Only the known labels are stored: an unknown one is the unlisted state.
    assert [s.labels["class_id"].tolist() for s in samples] == [[0, 1], [0, 1, 2], []]
    assert samples[1].labels["state"].tolist() == [Label.ABSENT, Label.DIFFICULT, Label.ABSENT]
    # Read as usual, the same file's unlisted classes are absent and its unknown column still unknown.
    absent, _ = load_csv(str(root), "train")
    assert [s.dense(len(classes))[0].tolist() for s in absent] == [[1, 0, 0, 0], [0, 1, 0, -1], [0, 0, 0, 0]]


def test_build_dataset_with_unlisted_unknown_gives_unknown_targets(root):
    (root / "classes.txt").write_text("cat\ndog\nfish\n")
    (root / "train.csv").write_text("image,labels,negatives\nimg/a.jpg,cat,fish\nimg/b.jpg,dog,\n")
    dataset = build_dataset("csv", str(root), "train", unlisted="unknown")
    assert dataset.unlisted == "unknown" and dataset.name == "csv:train" and len(dataset) == 2
    image, target, difficult, index = dataset[0]
    assert target.dtype == torch.float32 and target.tolist() == [1, -1, 0] and not difficult.any() and index == 0
    assert dataset[1][1].tolist() == [-1, 1, -1]
    targets, difficult = dataset.dense_labels()
    assert targets.tolist() == [[1, -1, 0], [-1, 1, -1]] and not difficult.any()
    assert DataSource("csv", str(root), {"unlisted": "unknown"}).load("train").dense_labels()[0].equal(targets)
    default = build_dataset("csv", str(root), "train")
    assert default.unlisted == "absent" and default[0][1].tolist() == [1, 0, 0]
    assert default.dense_labels()[0].tolist() == [[1, 0, 0], [0, 1, 0]]


@pytest.mark.parametrize("unlisted", ["absent", "unknown"])
@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("img/a.jpg,cat,,,cat\n", r"train\.csv line 2: class 'cat' is listed in column 'negatives' and also in "
                                  r"column 'labels'"),
        ("img/a.jpg,dog,,,\nimg/b.jpg,,cat,,dog;cat\n",
         r"train\.csv line 3: class 'cat' is listed in column 'negatives' and also in column 'difficult'"),
        ("img/a.jpg,,,cat,cat\n", r"train\.csv line 2: class 'cat' is listed in column 'negatives' and also in "
                                  r"column 'unknown'"),
        ("img/a.jpg,,dog,dog,\n", r"train\.csv line 2: class 'dog' is listed in column 'unknown' and also in "
                                  r"column 'difficult'"),
    ],
)
def test_a_class_in_conflicting_columns_names_the_line_and_both(root, rows, message, unlisted):
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / "train.csv").write_text("image,labels,difficult,unknown,negatives\n" + rows)
    with pytest.raises(DatasetError, match=message):
        load_csv(str(root), "train", unlisted=unlisted)


def test_unlisted_unknown_is_refused_for_a_one_hot_file(root):
    (root / "train.csv").write_text("image,cat,dog\nimg/a.jpg,1,0\n")
    with pytest.raises(DatasetError, match=r"train\.csv: --csv-unlisted unknown is for the label-list format"):
        load_csv(str(root), "train", unlisted="unknown")
    with pytest.raises(DatasetError, match="--csv-unlisted"):
        build_dataset("csv", str(root), "train", unlisted="unknown")
    assert load_csv(str(root), "train")[0][0].dense(2)[0].tolist() == [1, 0]  # read as usual, it loads


def test_missing_split_and_no_classes(root):
    (root / "train.csv").write_text("image,labels\nimg/a.jpg,\n")
    with pytest.raises(DatasetError, match=r"test\.csv does not exist; available splits in .*: train$"):
        load_csv(str(root), "test")
    with pytest.raises(DatasetError, match=r"train\.csv: no class names .*classes\.txt"):
        load_csv(str(root), "train")
