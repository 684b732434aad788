"""OpenImages V6/V7 image-level labels, read from the official files as downloaded (docs/datasets.md#openimages).

Each image lists a few human-verified labels: Confidence 1 is present, 0 verified absent; every other class is
unknown (the dataset's unlisted state). Machine-generated labels are read only when asked (`machine_labels`).
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Callable

import numpy as np
import pandas as pd

from .base import LABELS_DTYPE, DatasetError, Label, Sample

OPENIMAGES_LAYOUT = """\
  <data-dir>/
    oidv7-class-descriptions.csv                    (LabelName,DisplayName; V6: oidv6-class-descriptions.csv)
    oidv7-classes-trainable.txt                     (optional: the class ids trained on, one per line)
    oidv7-{train,val,test}-annotations-human-imagelabels.csv
                                                    (ImageID,Source,LabelName,Confidence; V6: oidv6-train-...,
                                                    validation-..., test-...)
    oidv7-train-annotations-machine-imagelabels.csv (optional, read with --oi-machine-labels)
    train/<ImageID>.jpg or train_0/ ... train_f/<ImageID>.jpg
    validation/<ImageID>.jpg
    test/<ImageID>.jpg"""

# The names each split's label files go by in V7 ("val") and V6 ("validation").
_LABEL_FILE_SPLITS = {"train": ("train",), "validation": ("val", "validation"), "test": ("test",)}


def load_openimages(root: str, split: str, machine_labels: float | None = None) -> tuple[list[Sample], list[str]]:
    """The images of `split` (train, validation, test) that have a label, with their verified labels.

    Classes: the trainable list when there is one, else every class described, named by DisplayName (a repeated
    name gets its class id added). With `machine_labels`, a machine-generated label of at least that confidence
    counts as present where no human verified the class.
    """
    root = os.path.abspath(os.path.expanduser(root))
    if split not in _LABEL_FILE_SPLITS:
        raise DatasetError(f"OpenImages has no split {split!r}; choose one of {', '.join(_LABEL_FILE_SPLITS)}")
    described = _descriptions(root)
    mids, classes = _class_list(root, described)
    index = {mid: i for i, mid in enumerate(mids)}
    frames = [_read_labels(_label_file(root, split, "human"), index, described, human=True)]
    if machine_labels is not None:
        machine = _read_labels(_label_file(root, split, "machine"), index, described, human=False)
        frames.append(machine[machine["confidence"] >= machine_labels].assign(confidence=1.0))
    return _samples(pd.concat(frames, ignore_index=True), _image_locator(root, split)), classes


def _class_list(root: str, names: dict[str, str]) -> tuple[list[str], list[str]]:
    """(class ids, display names), in the trainable list's order or else the descriptions'."""
    trainable = _optional_file(root, "*classes-trainable.txt")
    if trainable is None:
        mids = list(names)
    else:
        with open(trainable, encoding="utf-8") as f:
            mids = [line.strip() for line in f if line.strip()]
        missing = [mid for mid in mids if mid not in names]
        if missing:
            raise DatasetError(f"{trainable}: class id {missing[0]!r} has no description in "
                               f"{_optional_file(root, '*class-descriptions.csv')}")
    display = [names[mid] for mid in mids]
    counts = pd.Series(display).value_counts()
    return mids, [f"{name} ({mid})" if counts[name] > 1 else name for mid, name in zip(mids, display, strict=True)]


def _descriptions(root: str) -> dict[str, str]:
    """{class id: DisplayName} of the class descriptions file (with or without its header line)."""
    path = _optional_file(root, "*class-descriptions.csv")
    if path is None:
        raise DatasetError(f"{root} has no class descriptions file (*class-descriptions.csv); expected this "
                           f"layout:\n{OPENIMAGES_LAYOUT}")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    header = 1 if rows and rows[0] == ["LabelName", "DisplayName"] else 0
    names: dict[str, str] = {}
    for line, row in enumerate(rows[header:], start=1 + header):
        if len(row) != 2 or not row[0]:
            raise DatasetError(f"{path} line {line}: expected LabelName,DisplayName, got {row}")
        names[row[0]] = row[1]
    return names


def _optional_file(root: str, pattern: str) -> str | None:
    found = sorted(glob.glob(os.path.join(root, pattern)))
    if len(found) > 1:
        raise DatasetError(f"{root}: several files match {pattern}: {', '.join(map(os.path.basename, found))}; "
                           "keep one version's files in a folder")
    return found[0] if found else None


def _label_file(root: str, split: str, kind: str) -> str:
    names = [f"{name}-annotations-{kind}-imagelabels.csv" for name in _LABEL_FILE_SPLITS[split]]
    found = sorted({path for name in names for path in glob.glob(os.path.join(root, "*" + name))})
    if len(found) != 1:
        what = "several" if found else "no"
        raise DatasetError(f"{root}: {what} {kind}-verified label file(s) for split {split} "
                           f"({', '.join(map(os.path.basename, found)) or ' or '.join('*' + n for n in names)}); "
                           f"expected this layout:\n{OPENIMAGES_LAYOUT}")
    return found[0]


def _read_labels(path: str, index: dict[str, int], described: dict[str, str], human: bool) -> pd.DataFrame:
    """(image, class index, confidence) of the trained classes; a bad row raises DatasetError naming its line."""
    try:
        frame = pd.read_csv(path, usecols=["ImageID", "LabelName", "Confidence"], dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as e:
        raise DatasetError(f"{path}: not an OpenImages image-level label file (ImageID,Source,LabelName,"
                           f"Confidence): {e}") from e
    unknown = ~frame["LabelName"].isin(described)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DatasetError(f"{path} line {row + 2}: class id {frame['LabelName'].iat[row]!r} is not in the class "
                           "descriptions")
    confidence = pd.to_numeric(frame["Confidence"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isin(confidence, (0.0, 1.0)) if human else ~((confidence >= 0) & (confidence <= 1))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        expected = "0 (verified absent) or 1 (present)" if human else "a number in [0, 1]"
        raise DatasetError(f"{path} line {row + 2}: Confidence is {frame['Confidence'].iat[row]!r}, expected "
                           f"{expected}")
    trained = frame["LabelName"].map(index)
    keep = trained.notna().to_numpy()  # a described class left out of the trainable list
    return pd.DataFrame({"image": frame["ImageID"].to_numpy()[keep], "class_id": trained[keep].astype(np.int32),
                         "confidence": confidence[keep], "line": np.flatnonzero(keep) + 2, "file": path})


def _image_locator(root: str, split: str) -> Callable[[str], str]:
    """ImageID -> its file: in `root/<split>/`, or in the official `root/<split>_0/` ... `<split>_f/` folders by the
    id's first hex digit."""
    folder = os.path.join(root, split)
    if os.path.isdir(folder):
        return lambda image_id: os.path.join(folder, f"{image_id}.jpg")
    if os.path.isdir(f"{folder}_0"):
        return lambda image_id: os.path.join(f"{folder}_{image_id[0]}", f"{image_id}.jpg")
    raise DatasetError(f"{root} has no {split}/ (nor {split}_0/ ... {split}_f/) image folder; expected this "
                       f"layout:\n{OPENIMAGES_LAYOUT}")


def _samples(labels: pd.DataFrame, image_path: Callable[[str], str]) -> list[Sample]:
    """One sample per image, in ImageID order. Where a pair is listed present and absent (by several sources, or
    a machine label beside a human negative), present wins; every label is a view into one array, so a sample
    costs its labels and a small array header."""
    labels = labels.sort_values(["image", "class_id", "confidence"], kind="stable")
    last = ~labels.duplicated(["image", "class_id"], keep="last").to_numpy()  # the highest confidence of a pair
    labels = labels[last]
    packed = np.empty(len(labels), dtype=LABELS_DTYPE)
    packed["class_id"] = labels["class_id"].to_numpy()
    packed["state"] = np.where(labels["confidence"].to_numpy() >= 0.5, Label.PRESENT, Label.ABSENT)
    images = labels["image"].to_numpy()
    starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]]) if len(images) else np.zeros(0, dtype=int)
    ends = np.r_[starts[1:], len(images)]
    samples = []
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        image_id = images[start]
        path = image_path(image_id)
        if not os.path.isfile(path):
            row = labels.iloc[start]
            raise DatasetError(f"{row['file']} line {row['line']}: image file {path} does not exist")
        samples.append(Sample(image_id, path, packed[start:end]))
    return samples
