"""udtimm.data.openimages: the official OpenImages files read as they are downloaded, verified negatives and unknown
labels kept apart, bad rows named by file and line."""

import csv
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_DIGITS, tiny_train_args

from udtimm.data import build_dataset
from udtimm.data.base import Label
from udtimm.errors import DatasetError

HUMAN = "oidv7-{split}-annotations-human-imagelabels.csv"
OFFICIAL_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def mid(class_name: str) -> str:
    return f"/m/0{class_name}"


def write_rows(path: str, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])


def write_openimages(digits_root: str, root: str) -> dict[str, dict[str, dict[str, float]]]:
    """The tiny digits set in the official OpenImages layout: hex ImageIDs, train images in train_0 ... train_f,
    validation and test in flat folders, every present digit verified (Confidence 1), the next digit verified
    absent (0), the rest unlabelled, and one described class left out of the trainable list. Returns, by split,
    ImageID -> {class name: confidence}."""
    os.makedirs(root)
    splits = {"train": "trainval", "validation": "val", "test": "test"}
    written: dict[str, dict[str, dict[str, float]]] = {}
    classes: list[str] = []
    for number, (official, digits_split) in enumerate(splits.items()):
        dataset = build_dataset("digits", digits_root, digits_split, **TINY_DIGITS)
        classes = dataset.classes
        rows, written[official] = [], {}
        for i, sample in enumerate(dataset.samples):
            image_id = f"{number:x}{i:015x}"[::-1]  # the first hex digit varies, as in the official ids
            folder = os.path.join(root, f"{official}_{image_id[0]}" if official == "train" else official)
            os.makedirs(folder, exist_ok=True)
            shutil.copy(sample.path, os.path.join(folder, f"{image_id}.jpg"))
            target, _ = sample.dense(len(classes))
            present = [classes[c] for c in np.flatnonzero(target == 1)]
            absent = classes[(classes.index(present[-1]) + 1) % len(classes)] if present else classes[0]
            labels = {**{name: 1.0 for name in present}, **({absent: 0.0} if absent not in present else {})}
            written[official][image_id] = labels
            rows += [[image_id, "verification", mid(name), int(value)] for name, value in labels.items()]
        write_rows(os.path.join(root, HUMAN.format(split=OFFICIAL_SPLITS[official])),
                   ["ImageID", "Source", "LabelName", "Confidence"], rows)
    write_rows(os.path.join(root, "oidv7-class-descriptions.csv"), ["LabelName", "DisplayName"],
               [[mid(name), name] for name in [*classes, "unused"]])
    with open(os.path.join(root, "oidv7-classes-trainable.txt"), "w", encoding="utf-8") as f:
        f.write("".join(f"{mid(name)}\n" for name in classes))
    return written


@pytest.fixture(scope="module")
def openimages(tiny_digits: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("oi") / "openimages")
    return root, write_openimages(tiny_digits, root)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_verified_labels_are_kept_and_every_other_class_is_unknown(openimages: tuple[str, dict], tiny_digits: str,
                                                                    split: str) -> None:
    root, written = openimages
    dataset = build_dataset("openimages", root, split)
    official = {"val": "validation"}.get(split, split)
    assert dataset.unlisted == "unknown"
    assert dataset.classes == build_dataset("digits", tiny_digits, "test", **TINY_DIGITS).classes
    assert [s.image_id for s in dataset.samples] == sorted(written[official])
    for index, sample in enumerate(dataset.samples):
        _, target, difficult, _ = dataset[index]
        expected = torch.full((len(dataset.classes),), -1.0)
        for name, confidence in written[official][sample.image_id].items():
            expected[dataset.classes.index(name)] = confidence
        assert torch.equal(target, expected) and not difficult.any()
        assert os.path.isfile(sample.path)
    assert "unused" not in dataset.classes  # described but not trainable


def test_machine_labels_are_off_by_default_and_count_above_their_confidence(openimages: tuple[str, dict],
                                                                            tmp_path) -> None:
    root, written = openimages
    copy = str(tmp_path / "oi")
    shutil.copytree(root, copy)
    names = build_dataset("openimages", copy, "val").classes
    # Two images, each with a class nobody verified for it: one machine label above 0.5, one below.
    picks = [(image_id, next(name for name in names if name not in labels))
             for image_id, labels in sorted(written["validation"].items())[:2]]
    write_rows(os.path.join(copy, "oidv7-val-annotations-machine-imagelabels.csv"),
               ["ImageID", "Source", "LabelName", "Confidence"],
               [[image_id, "machine", mid(name), confidence]
                for (image_id, name), confidence in zip(picks, (0.9, 0.3), strict=True)])
    for machine, expected in ((None, [-1.0, -1.0]), (0.5, [1.0, -1.0]), (0.2, [1.0, 1.0])):
        dataset = build_dataset("openimages", copy, "val", **({} if machine is None else {"machine_labels": machine}))
        rows = {s.image_id: s.dense(len(names), "unknown")[0] for s in dataset.samples}
        assert [rows[image_id][names.index(name)] for image_id, name in picks] == expected


@pytest.mark.parametrize(("edit", "message"), [
    (lambda rows: rows.insert(0, ["ffff", "verification", "/m/0nope", "1"]), r"line 2: class id '/m/0nope' is not"),
    (lambda rows: rows[0].__setitem__(3, "0.5"), r"line 2: Confidence is '0.5', expected 0 \(verified absent\)"),
    (lambda rows: rows[0].__setitem__(0, "0123456789abcdef"), r"line 2: image file .*0123456789abcdef.jpg does not"),
])
def test_a_bad_row_is_named_by_file_and_line(openimages: tuple[str, dict], tmp_path, edit, message) -> None:
    root, _ = openimages
    copy = str(tmp_path / "oi")
    shutil.copytree(root, copy)
    path = os.path.join(copy, HUMAN.format(split="test"))
    with open(path, encoding="utf-8", newline="") as f:
        header, *rows = list(csv.reader(f))
    edit(rows)
    write_rows(path, header, rows)
    with pytest.raises(DatasetError, match=r"oidv7-test-annotations-human-imagelabels\.csv " + message):
        build_dataset("openimages", copy, "test")


def test_a_missing_file_shows_the_layout(tmp_path) -> None:
    (tmp_path / "oidv7-class-descriptions.csv").write_text("LabelName,DisplayName\n/m/01,cat\n")
    with pytest.raises(DatasetError, match=r"no human-verified label file\(s\) for split test.*\n.*<data-dir>/"):
        build_dataset("openimages", str(tmp_path), "test")


def test_a_repeated_display_name_gets_its_class_id(openimages: tuple[str, dict], tmp_path) -> None:
    root, _ = openimages
    copy = str(tmp_path / "oi")
    shutil.copytree(root, copy)
    descriptions = os.path.join(copy, "oidv7-class-descriptions.csv")
    with open(descriptions, encoding="utf-8") as f:
        text = f.read()
    with open(descriptions, "w", encoding="utf-8") as f:
        f.write(text.replace(f"{mid('one')},one", f"{mid('one')},zero"))
    assert build_dataset("openimages", copy, "test").classes[:3] == [f"zero ({mid('zero')})", f"zero ({mid('one')})",
                                                                     "two"]


def test_the_labels_take_memory_by_label_not_by_class(openimages: tuple[str, dict]) -> None:
    root, written = openimages
    dataset = build_dataset("openimages", root, "train")
    assert all(len(s.labels) == len(written["train"][s.image_id]) for s in dataset.samples)
    assert {int(state) for s in dataset.samples for state in s.labels["state"]} == {Label.PRESENT, Label.ABSENT}


@pytest.mark.slow
def test_train_py_trains_from_the_official_layout(openimages: tuple[str, dict], tmp_path) -> None:
    import train

    args = tiny_train_args("unused", str(tmp_path), "--experiment", "oi", "--cal")
    args[args.index("digits")] = "openimages"
    args[args.index("unused")] = openimages[0]
    train.main(args)
    with open(tmp_path / "oi" / "results.csv", encoding="utf-8") as f:
        row = next(csv.DictReader(f))
    assert row["selection_split"] == "val" and 0 <= float(row["map"]) <= 100
