"""Custom data as CSV files: `<root>/<split>.csv` listing images (paths relative to root, or absolute) and labels.

Two formats, told apart by the header:

    image,labels[,difficult][,unknown][,negatives]    class names separated by ";" (empty = none)
    image,<class1>,<class2>,...                       one column per class: 1, 0, or -1 / empty for unknown (no
                                                      difficult flags)

In the first format `difficult` lists the classes present only through difficult objects (docs/method.md); they count
as present whether or not `labels` repeats them. `unknown` lists the classes nobody annotated for the image
(docs/datasets.md#missing-labels), `negatives` those verified absent. A class in no column is absent, or unknown with
`unlisted="unknown"` (--csv-unlisted unknown: OpenImages-style data, where most labels were never checked).

The class list is `classes_file`, else `<root>/classes.txt` (one name per line), else inferred from train.csv (sorted
labels, or its class columns in order) whatever split is loaded, so that every split of one dataset agrees.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd

from .base import UNKNOWN, UNLISTED_STATES, DatasetError, Label, Sample, labels_from_dense, make_labels
from .voc import read_classes_file

# The label-list format's columns and the state each gives its classes, in the order they are read.
_LABEL_COLUMNS = {"labels": Label.PRESENT, "difficult": Label.DIFFICULT, "unknown": Label.UNKNOWN,
                  "negatives": Label.ABSENT}
_ONE_HOT_VALUES = {"1": 1.0, "0": 0.0, "-1": UNKNOWN, "": UNKNOWN}  # cell -> target value
_ONE_HOT_CHUNK = 4096  # rows made dense at a time: a one-hot file's dense targets are never all held at once
_Row = tuple[int, str, np.ndarray]  # (line in the csv file, image cell, labels)


def load_csv(root: str, split: str, classes_file: str | None = None, unlisted: str = "absent",
             ) -> tuple[list[Sample], list[str]]:
    """Load `<root>/<split>.csv` (see the module docstring for the formats, the class list and `unlisted`)."""
    if unlisted not in UNLISTED_STATES:
        raise ValueError(f"unlisted must be one of {', '.join(UNLISTED_STATES)}, got {unlisted!r}")
    root = os.path.abspath(os.path.expanduser(root))
    csv_path = os.path.join(root, f"{split}.csv")
    if not os.path.isfile(csv_path):
        available = sorted(f[:-4] for f in os.listdir(root) if f.endswith(".csv")) if os.path.isdir(root) else []
        raise DatasetError(f"{csv_path} does not exist; available splits in {root}: {', '.join(available) or 'none'}")
    frame = _read(csv_path)
    if frame.empty:
        raise DatasetError(f"{csv_path} lists no images")
    classes = _class_list(root, classes_file)
    if classes is None:
        train_path = os.path.join(root, "train.csv")
        source = train_path if os.path.isfile(train_path) else csv_path
        classes = _infer_classes(_read(source))
        if not classes:
            raise DatasetError(f"{source}: no class names to infer the class list from; add {root}/classes.txt")

    index = {c: i for i, c in enumerate(classes)}
    if "labels" in frame.columns:
        rows = _label_list_rows(frame, csv_path, index, unlisted)
    elif unlisted != "absent":
        raise DatasetError(f"{csv_path}: --csv-unlisted {unlisted} is for the label-list format (image,labels,...); "
                           "a one-hot file lists every class (an empty cell or -1 is unknown)")
    else:
        rows = _one_hot_rows(frame, csv_path, index)

    samples = []
    first_line: dict[str, int] = {}
    for line, image, labels in rows:
        if not image:
            raise DatasetError(f"{csv_path} line {line}: empty image cell")
        if image in first_line:
            raise DatasetError(f"{csv_path} line {line}: image {image!r} is listed twice (first at line "
                               f"{first_line[image]})")
        first_line[image] = line
        path = os.path.join(root, image)  # an absolute `image` stays as it is
        if not os.path.isfile(path):
            raise DatasetError(f"{csv_path} line {line}: image file {path} does not exist")
        samples.append(Sample(image, path, labels))
    return samples, classes


def _read(csv_path: str) -> pd.DataFrame:
    """All cells as stripped strings ('' for empty), with an `image` column."""
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DatasetError(f"{csv_path}: cannot parse as CSV: {e}") from e
    frame.columns = [str(c).strip() for c in frame.columns]
    if "image" not in frame.columns:
        raise DatasetError(f"{csv_path} line 1: no 'image' column (header: {', '.join(frame.columns)})")
    return frame.apply(lambda col: col.str.strip())


def _class_list(root: str, classes_file: str | None) -> list[str] | None:
    if classes_file is not None:
        return read_classes_file(classes_file)
    default = os.path.join(root, "classes.txt")
    return read_classes_file(default) if os.path.isfile(default) else None


def _infer_classes(frame: pd.DataFrame) -> list[str]:
    if "labels" in frame.columns:
        names = {name for col in _LABEL_COLUMNS if col in frame.columns for cell in frame[col] for name in _split(cell)}
        return sorted(names)
    return [c for c in frame.columns if c != "image"]


def _split(cell: str) -> list[str]:
    return [name.strip() for name in cell.split(";") if name.strip()]


def _label_list_rows(frame: pd.DataFrame, csv_path: str, index: dict[str, int], unlisted: str) -> Iterator[_Row]:
    """(line, image, labels) per row of the `image,labels[,difficult][,unknown][,negatives]` format."""
    extra = set(frame.columns) - set(_LABEL_COLUMNS) - {"image"}
    if extra:
        raise DatasetError(f"{csv_path} line 1: unexpected columns {sorted(extra)}; with a 'labels' column the "
                           f"header must be image,{','.join(_LABEL_COLUMNS)} (all but labels optional)")
    columns = [col for col in _LABEL_COLUMNS if col in frame.columns]
    for row, (image, *row_cells) in enumerate(zip(frame["image"], *(frame[col] for col in columns), strict=True)):
        line = row + 2  # 1-based, after the header line
        cells = [(col, _LABEL_COLUMNS[col], _split(cell)) for col, cell in zip(columns, row_cells, strict=True)]
        yield line, image, row_labels(cells, index, unlisted, f"{csv_path} line {line}")


def row_labels(cells: Iterable[tuple[str, Label, Iterable[str]]], index: dict[str, int], unlisted: str,
               where: str) -> np.ndarray:
    """One image's labels from (column, the state it gives, the class names it lists) in reading order: present
    and difficult agree (difficult wins), any other two states of a class are refused; DatasetError naming `where`
    and the column, as is an unknown class. Shared by the label-list CSV format and --dataset hf."""
    states: dict[int, int] = {}
    column_of: dict[int, str] = {}  # the column that gave each class its state, to name it in a conflict
    present = {Label.PRESENT, Label.DIFFICULT}
    for col, state, names in cells:
        for name in names:
            if name not in index:
                raise DatasetError(f"{where}: unknown class {name!r} in column {col!r}; known classes: "
                                   f"{', '.join(index)}")
            previous = states.get(index[name], state)
            if previous != state and not {previous, state} <= present:
                raise DatasetError(f"{where}: class {name!r} is listed in column {col!r} and also in column "
                                   f"{column_of[index[name]]!r}")
            merged = Label.DIFFICULT if Label.DIFFICULT in (previous, state) else state
            if states.get(index[name]) != merged:
                column_of[index[name]] = col
            states[index[name]] = merged
    unlisted_state = UNLISTED_STATES[unlisted]
    return make_labels({c: state for c, state in states.items() if state != unlisted_state})


def _one_hot_rows(frame: pd.DataFrame, csv_path: str, index: dict[str, int]) -> Iterator[_Row]:
    """(line, image, labels) per row of the `image,<class>...` 0/1 format."""
    columns = [c for c in frame.columns if c != "image"]
    unknown = [c for c in columns if c not in index]
    missing = [c for c in index if c not in columns]
    if unknown or missing:
        raise DatasetError(f"{csv_path} line 1: class columns do not match the class list "
                           f"(unknown: {unknown or 'none'}; missing: {missing or 'none'})")
    values = frame[columns]
    bad = ~values.isin(list(_ONE_HOT_VALUES))
    if bad.to_numpy().any():
        row, col = np.argwhere(bad.to_numpy())[0]
        raise DatasetError(f"{csv_path} line {row + 2}: column {columns[col]!r} is {values.iat[row, col]!r}, "
                           "expected 1, 0, or -1 or an empty cell for unknown")
    order = [index[c] for c in columns]
    no_difficult = np.zeros(len(index), dtype=bool)
    target = np.empty(len(index), dtype=np.float32)
    for start in range(0, len(frame), _ONE_HOT_CHUNK):
        chunk = values.iloc[start:start + _ONE_HOT_CHUNK].replace(_ONE_HOT_VALUES).to_numpy(dtype=np.float32)
        for row, (image, cells) in enumerate(zip(frame["image"][start:start + len(chunk)], chunk, strict=True)):
            target[order] = cells
            yield start + row + 2, image, labels_from_dense(target, no_difficult)
