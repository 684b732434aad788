"""CSV loader: both formats, class lists from file or inferred, errors naming the line."""

import numpy as np
import pytest
from PIL import Image

from udtimm.data import DatasetError, build_dataset
from udtimm.data.csv import load_csv


@pytest.fixture
def root(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (5, 4)).save(tmp_path / "img" / f"{name}.jpg")
    return tmp_path


def rows(samples, classes):
    return [(s.image_id, {classes[i] for i in np.flatnonzero(s.target)},
             {classes[i] for i in np.flatnonzero(s.difficult)}) for s in samples]


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
    assert test[0].path == str(root / "img" / "d.jpg") and test[0].target.tolist() == [0, 0, 0, 1]


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
    assert val.name == "csv:val" and val.classes == classes and val.targets().tolist() == [[0, 1, 0]]
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
        ("image,labels,unknown\nimg/a.jpg,cat,cat\n", r"train\.csv line 2: class 'cat' is listed as unknown and also"),
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
    assert [s.target.tolist() for s in train] == [[1, -1, 0], [-1, 0, 1]]
    test, _ = load_csv(str(root), "test")
    assert [s.target.tolist() for s in test] == [[-1, 1, -1], [0, 0, 0]]
    assert not any(s.difficult.any() for s in (*train, *test))  # unknown is a state of its own, not difficult


def test_missing_split_and_no_classes(root):
    (root / "train.csv").write_text("image,labels\nimg/a.jpg,\n")
    with pytest.raises(DatasetError, match=r"test\.csv does not exist; available splits in .*: train$"):
        load_csv(str(root), "test")
    with pytest.raises(DatasetError, match=r"train\.csv: no class names .*classes\.txt"):
        load_csv(str(root), "train")
