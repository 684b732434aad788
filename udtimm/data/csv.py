"""Custom data as CSV files: `<root>/<split>.csv` listing images (paths relative to root, or absolute) and labels.

Two formats, told apart by the header:

    image,labels[,difficult][,unknown]    class names separated by ";" (empty = none)
    image,<class1>,<class2>,...           one column per class: 1, 0, or -1 / empty for unknown (no difficult flags)

In the first format `difficult` lists the classes present only through difficult objects (docs/method.md); they count
as present whether or not `labels` repeats them. `unknown` lists the classes nobody annotated for the image
(docs/datasets.md#missing-labels); every other class is absent unless listed. The class list is `classes_file`,
else `<root>/classes.txt` (one name per line), else inferred from train.csv (sorted labels, or its class columns in
order) whatever split is loaded, so that every split of one dataset agrees.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pandas as pd

from .base import UNKNOWN, DatasetError, Sample
from .voc import read_classes_file

_LABEL_COLUMNS = ("labels", "difficult", "unknown")  # of the label-list format, in the order they are read
_ONE_HOT_VALUES = {"1": 1.0, "0": 0.0, "-1": UNKNOWN, "": UNKNOWN}  # cell -> target value
_Row = tuple[int, str, np.ndarray, np.ndarray]  # (line in the csv file, image cell, target, difficult)


def load_csv(root: str, split: str, classes_file: str | None = None) -> tuple[list[Sample], list[str]]:
    """Load `<root>/<split>.csv` (see the module docstring for the formats and the class list)."""
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
        rows = _label_list_rows(frame, csv_path, index)
    else:
        rows = _one_hot_rows(frame, csv_path, index)

    samples = []
    first_line: dict[str, int] = {}
    for line, image, target, difficult in rows:
        if not image:
            raise DatasetError(f"{csv_path} line {line}: empty image cell")
        if image in first_line:
            raise DatasetError(f"{csv_path} line {line}: image {image!r} is listed twice (first at line "
                               f"{first_line[image]})")
        first_line[image] = line
        path = os.path.join(root, image)  # an absolute `image` stays as it is
        if not os.path.isfile(path):
            raise DatasetError(f"{csv_path} line {line}: image file {path} does not exist")
        samples.append(Sample(image, path, target, difficult))
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


def _label_list_rows(frame: pd.DataFrame, csv_path: str, index: dict[str, int]) -> Iterator[_Row]:
    """(line, image, target, difficult) per row of the `image,labels[,difficult][,unknown]` format."""
    extra = set(frame.columns) - set(_LABEL_COLUMNS) - {"image"}
    if extra:
        raise DatasetError(f"{csv_path} line 1: unexpected columns {sorted(extra)}; with a 'labels' column the "
                           "header must be image,labels[,difficult][,unknown]")
    cells = [frame[col] if col in frame.columns else [""] * len(frame) for col in _LABEL_COLUMNS]
    for row, (image, *row_cells) in enumerate(zip(frame["image"], *cells, strict=True)):
        line = row + 2  # 1-based, after the header line
        target = np.zeros(len(index), dtype=np.float32)
        difficult = np.zeros(len(index), dtype=bool)
        for col, cell in zip(_LABEL_COLUMNS, row_cells, strict=True):
            for name in _split(cell):
                if name not in index:
                    raise DatasetError(f"{csv_path} line {line}: unknown class {name!r} in column {col!r}; "
                                       f"known classes: {', '.join(index)}")
                if col == "unknown":
                    if target[index[name]] != 0:
                        raise DatasetError(f"{csv_path} line {line}: class {name!r} is listed as unknown and also "
                                           "as present")
                    target[index[name]] = UNKNOWN
                    continue
                target[index[name]] = 1.0
                difficult[index[name]] |= col == "difficult"
        yield line, image, target, difficult


def _one_hot_rows(frame: pd.DataFrame, csv_path: str, index: dict[str, int]) -> Iterator[_Row]:
    """(line, image, target, difficult) per row of the `image,<class>...` 0/1 format."""
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
    targets = np.zeros((len(frame), len(index)), dtype=np.float32)
    targets[:, [index[c] for c in columns]] = values.replace(_ONE_HOT_VALUES).to_numpy(dtype=np.float32)
    no_difficult = np.zeros(len(index), dtype=bool)
    for row, image in enumerate(frame["image"]):
        yield row + 2, image, targets[row].copy(), no_difficult.copy()
