"""--dataset hf: a Hugging Face `datasets` dataset with an image column and a labels column
(docs/datasets.md#hf-datasets): a folder written by `save_to_disk`, a folder or file of Parquet files, or a Hub name.

Loading reads the label columns alone, into Samples; an image's bytes are read by its row when a batch needs it and
decoded as an image file is (decode_file), so a folder's images converted to a dataset give the same pixels.
`datasets` is imported when a dataset is opened: the rest of udtimm never needs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchvision.io import read_file

from udtimm.errors import ConfigError

from .base import (
    UNLISTED_STATES,
    CorruptImageError,
    DatasetError,
    EncodedImage,
    Label,
    MultiLabelDataset,
    Sample,
    check_unique_ids,
    decode_file,
)
from .csv import row_labels
from .voc import read_classes_file

# The loader's options and their defaults: each is the flag --hf-<option> (dashes for underscores), and goes into
# the data source's options only when it differs from its default (data_flags.data_source).
OPTIONS: dict[str, str | None] = {
    "image_column": "image", "labels_column": "labels", "difficult_column": None, "unknown_column": None,
    "negatives_column": None, "classes": None, "unlisted": "absent",
}  # fmt: skip
# The label columns in reading order and the state each gives the classes it names, as the CSV label-list format's.
# All but labels are optional: one is read when its flag names it, or when the dataset has a column of its name.
STATE_COLUMNS = {"labels": Label.PRESENT, "difficult": Label.DIFFICULT, "unknown": Label.UNKNOWN,
                 "negatives": Label.ABSENT}
ID_COLUMN = "id"  # an image's id where the dataset has this column, else its row number
# A generic split name read as another where the dataset lacks it: Hub sets call their selection split validation.
ALIASES = {"val": "validation"}
BYTES_OR_PATHS = ("binary", "large_binary", "string", "large_string")  # Value dtypes an image column may have
SAVED_DICT = "dataset_dict.json"  # what save_to_disk writes into a DatasetDict's folder
SAVED_DATASET = "state.json"  # ... and into a single Dataset's


def import_datasets() -> Any:
    """The `datasets` package; ConfigError saying how to install it when it is missing."""
    try:  # an optional dependency: only --dataset hf needs it
        import datasets
    except ImportError as err:
        raise ConfigError("--dataset hf reads Hugging Face datasets with the datasets package, which is not "
                          "installed: pip install 'datasets>=4.0'") from err
    return datasets


def source_name(root: str) -> str:
    """How errors and sample paths name `root`: its absolute path when it is a local one, else the Hub name."""
    path = os.path.abspath(os.path.expanduser(root))
    return path if os.path.exists(path) else root


def open_splits(root: str) -> dict[str, Any]:
    """{split name: datasets.Dataset} of `root`: a save_to_disk folder of a DatasetDict, a folder or file of Parquet
    files (split names from the file names, as datasets reads them), else a Hub name; DatasetError naming it."""
    datasets = import_datasets()
    path = source_name(root)
    if os.path.isfile(os.path.join(path, SAVED_DATASET)) and not os.path.isfile(os.path.join(path, SAVED_DICT)):
        raise DatasetError(f"{path}: save_to_disk wrote one Dataset here, without split names: save a "
                           "DatasetDict({'train': ..., 'test': ...}) instead")
    try:
        if os.path.isfile(os.path.join(path, SAVED_DICT)):
            return dict(datasets.load_from_disk(path))
        if os.path.isdir(path):
            return dict(datasets.load_dataset("parquet", data_dir=path))
        if os.path.isfile(path):
            return dict(datasets.load_dataset("parquet", data_files=path))
        return dict(datasets.load_dataset(root))
    except Exception as err:  # datasets raises whatever its builders, pyarrow, fsspec and the Hub client meet
        kind = "" if os.path.exists(path) else " (no local folder or file of that name: read as a Hub name)"
        raise DatasetError(f"--data-dir {path}{kind}: cannot open it as a Hugging Face dataset "
                           f"({type(err).__name__}: {err})") from err


def own_split(root: str, split: str) -> str:
    """The dataset's name of `split`: as given, or its alias (val: validation) where the dataset has only that."""
    alias = ALIASES.get(split)
    if alias is None:
        return split
    names = open_splits(root)
    return alias if split not in names and alias in names else split


def split_names(root: str) -> list[str]:
    """The names of the dataset's splits."""
    return list(open_splits(root))


def load_split(root: str, split: str, transform: Callable[[Tensor], Tensor] | None = None, name: str = "",
               **options: Any) -> HfDataset:
    """Split `split` (its own name) of the dataset at `root`, its labels read and its images left in the dataset's
    Arrow files; `options` are OPTIONS' (docs/datasets.md#hf-datasets)."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown --dataset hf options {sorted(unknown)}; known: {', '.join(OPTIONS)}")
    options = {**OPTIONS, **options}
    if options["unlisted"] not in UNLISTED_STATES:
        raise ValueError(f"unlisted must be one of {', '.join(UNLISTED_STATES)}, got {options['unlisted']!r}")
    source, splits = source_name(root), open_splits(root)
    if split not in splits:
        raise DatasetError(f"{source} has no split {split!r} (it has {', '.join(sorted(splits)) or 'none'})")
    dataset, where = splits[split], f"{source}:{split}"
    image_column = options["image_column"]
    require_column(dataset, where, image_column, "--hf-image-column")
    columns = state_columns(dataset, where, options)
    train = "train" if "train" in splits else split  # whose class names every split has, when they are inferred
    classes, ids_index_classes = class_list(splits[train], f"{source}:{train}", columns, options["classes"])
    index = {name: number for number, name in enumerate(classes)}
    id_names = {column: class_label_names(dataset.features[column]) or (classes if ids_index_classes else None)
                for column in columns}
    has_ids = ID_COLUMN in dataset.column_names
    # The Arrow format gives the stored values (class ids as ints) and reads no other column, images included.
    table = dataset.select_columns([*([ID_COLUMN] if has_ids else []), *columns]).with_format("arrow")[:]
    cells = [table.column(column).to_pylist() for column in columns]
    ids = table.column(ID_COLUMN).to_pylist() if has_ids else range(len(dataset))
    samples = []
    for row, (image_id, *row_cells) in enumerate(zip(ids, *cells, strict=True)):
        path = f"{where}#{row}"
        named = [(column, state, cell_names(cell, id_names[column], column, path))
                 for (column, state), cell in zip(columns.items(), row_cells, strict=True)]
        samples.append(Sample(str(image_id), path, row_labels(named, index, options["unlisted"], path)))
    check_unique_ids(samples, f"{where}, column {ID_COLUMN!r}" if has_ids else where)
    return HfDataset(samples, classes, transform, name or f"hf:{split}", options["unlisted"],
                     images=image_table(dataset, image_column, where), image_column=image_column)


def load_hf(root: str, split: str, **options: Any) -> tuple[list[Sample], list[str]]:
    """The registry's loader: the samples and classes of load_split."""
    dataset = load_split(root, split, **options)
    return dataset.samples, dataset.classes


def require_column(dataset: Any, where: str, column: str, flag: str) -> None:
    """DatasetError naming the split, the column and its flag when the split lacks the column."""
    if column not in dataset.column_names:
        raise DatasetError(f"{where}: no column {column!r} ({flag}); its columns: {', '.join(dataset.column_names)}")


def state_columns(dataset: Any, where: str, options: dict[str, Any]) -> dict[str, Label]:
    """{column: the state it gives} of the label columns to read, in reading order: the labels column, and each
    other one that its flag names or that the dataset has under its default name."""
    columns = {}
    for role, state in STATE_COLUMNS.items():
        column, flag = options[f"{role}_column"], f"--hf-{role}-column"
        if column is None and role != "labels" and role in dataset.column_names and role not in columns:
            column = role
        if column is not None:
            require_column(dataset, where, column, flag)
            if column in columns:
                raise DatasetError(f"{where}: column {column!r} is given two roles ({flag} and another --hf-*-column)")
            columns[column] = state
    return columns


def class_label_names(feature: Any) -> list[str] | None:
    """The class names of a ClassLabel feature, or of a list of ClassLabel; None for any other feature."""
    datasets = import_datasets()
    inner = getattr(feature, "feature", feature)  # List / Sequence / LargeList hold their items' feature here
    return list(inner.names) if isinstance(inner, datasets.ClassLabel) else None


def class_list(train: Any, where: str, columns: dict[str, Label], classes_file: str | None) -> tuple[list[str], bool]:
    """(the class names, whether a class id indexes them): the --hf-classes file, else the labels column's ClassLabel
    names, else the sorted names that the label columns of the train split (`train`, named `where`) hold, whatever
    split is loaded, so that every split agrees."""
    if classes_file is not None:
        return read_classes_file(classes_file), True
    labels_column = next(iter(columns))
    named = class_label_names(train.features[labels_column]) if labels_column in train.column_names else None
    if named is not None:
        return named, True
    present = [column for column in columns if column in train.column_names]
    table = train.select_columns(present).with_format("arrow")[:]
    names = set()
    for column in present:
        id_names = class_label_names(train.features[column])
        for row, cell in enumerate(table.column(column).to_pylist()):
            names.update(cell_names(cell, id_names, column, f"{where}#{row}"))
    if not names:
        raise DatasetError(f"{where}: no class names to infer the class list from; give --hf-classes FILE")
    return sorted(names), False


def cell_names(cell: Any, id_names: list[str] | None, column: str, where: str) -> list[str]:
    """The class names of one label cell: a list of class names or ids, one of them, or None (none)."""
    items = [] if cell is None else cell if isinstance(cell, list) else [cell]
    names = []
    for item in items:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            if id_names is None:
                raise DatasetError(f"{where}: class id {item} in column {column!r}, which has no ClassLabel names: "
                                   "give them with --hf-classes FILE (one class name per line, in id order)")
            if not 0 <= item < len(id_names):
                raise DatasetError(f"{where}: class id {item} in column {column!r}, expected 0 to "
                                   f"{len(id_names) - 1} ({len(id_names)} classes)")
            names.append(id_names[item])
        else:
            raise DatasetError(f"{where}: column {column!r} holds {item!r}: expected class names or class ids")
    return names


def image_table(dataset: Any, column: str, where: str) -> Any:
    """The split's image column alone, read as {"bytes", "path"} without decoding: an Image feature, or what datasets
    casts to one without encoding anything (a {bytes, path} struct, image file bytes, file paths)."""
    datasets = import_datasets()
    feature = dataset.features[column]
    # Arrays would cast too, but by encoding every image as PNG while loading.
    if not (isinstance(feature, datasets.Image) or isinstance(feature, dict) and set(feature) == {"bytes", "path"}
            or isinstance(feature, datasets.Value) and feature.dtype in BYTES_OR_PATHS):
        raise DatasetError(f"{where}: column {column!r} (--hf-image-column) is {feature}, not images (a datasets "
                           "Image feature, a {bytes, path} struct, image file bytes or file paths)")
    return dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))


class HfDataset(MultiLabelDataset):
    """A split of a Hugging Face dataset (docs/datasets.md#hf-datasets): a sample's path is `<data-dir>:<split>#<row>`,
    and its image the row's image bytes. `images` is a memory-mapped datasets.Dataset, which pickles by reference to
    its Arrow files: DataLoader workers map the files themselves, and no image is copied."""

    def __init__(self, samples: list[Sample], classes: list[str], transform: Callable[[Tensor], Tensor] | None = None,
                 name: str = "", unlisted: str = "absent", *, images: Any, image_column: str) -> None:
        super().__init__(samples, classes, transform, name, unlisted)
        self.images = images
        self.image_column = image_column

    def read(self, sample: Sample) -> Tensor | EncodedImage:
        """The row's image, decoded, or its encoded bytes with --gpu-decode; errors name `<data-dir>:<split>#<row>`."""
        data = self.image_bytes(sample.path)
        return EncodedImage(data, sample.path) if self.encoded else decode_file(data, sample.path)

    def image_bytes(self, path: str) -> Tensor:
        """The image file (1-D uint8) of the row `<data-dir>:<split>#<row>`: its bytes, or the file its path names."""
        image = self.images[int(path.rpartition("#")[2])][self.image_column] or {}
        if image.get("bytes") is None and image.get("path"):
            try:  # an Image feature made from local files keeps their paths only
                return read_file(image["path"])
            except Exception as err:  # torchvision raises bare RuntimeErrors for missing or unreadable files
                raise CorruptImageError(f"cannot read image {path} (file {image['path']}): {err}") from err
        if not image.get("bytes"):
            raise CorruptImageError(f"cannot read image {path}: the row has no image bytes")
        return torch.frombuffer(bytearray(image["bytes"]), dtype=torch.uint8)

    def __repr__(self) -> str:
        return f"HfDataset({self.name!r}, {len(self)} images, {len(self.classes)} classes)"
