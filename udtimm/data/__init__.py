"""Multi-label datasets: VOC2007, COCO2014, CSV files and the embedded `digits` (file names in, samples out)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import Tensor

from .base import CorruptImageError, DatasetError, MultiLabelDataset, Sample, check_unique_ids, read_image
from .coco import load_coco
from .csv import load_csv
from .voc import VOC_CLASSES, load_voc

__all__ = [
    "DATASETS", "VOC_CLASSES", "CorruptImageError", "DatasetError", "MultiLabelDataset", "Sample",
    "build_dataset", "check_unique_ids", "default_data_dir", "load_coco", "load_csv", "load_voc", "read_image",
]  # fmt: skip

DATASETS: tuple[str, ...] = ("digits", "voc2007", "coco2014", "csv")

# Generic split names -> each dataset's own; any other name is passed through as the dataset's own split name.
_SPLITS = {
    "digits": {"train": "trainval", "test": "test"},
    "voc2007": {"train": "trainval", "test": "test"},
    "coco2014": {"train": "train2014", "test": "val2014", "val": "val2014"},
    "csv": {"train": "train"},  # "test": test.csv, or val.csv when there is no test.csv (see resolve_split)
}


def default_data_dir(name: str, num_trainval: int = 3000, num_test: int = 1000, seed: int = 0) -> str | None:
    """Where `name` lives when no --data-dir is given: only `digits` has a default (under $UDTIMM_CACHE).

    A digits set of another size or seed gets its own folder, so it never clashes with the default one.
    """
    if name != "digits":
        return None
    cache = os.environ.get("UDTIMM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "udtimm")
    if (num_trainval, num_test, seed) == (3000, 1000, 0):
        return os.path.join(cache, "digits")
    return os.path.join(cache, f"digits-{num_trainval}-{num_test}" + (f"-seed{seed}" if seed else ""))


def resolve_split(name: str, root: str, split: str) -> str:
    """The dataset's own split name for a generic one ("train", "test") or for its own name."""
    if name == "csv" and split == "test" and not os.path.isfile(os.path.join(root, "test.csv")):
        return "val"
    return _SPLITS[name].get(split, split)


def build_dataset(
    name: str, root: str | None, split: str, transform: Callable[[Tensor], Tensor] | None = None, **options: Any
) -> MultiLabelDataset:
    """Load split `split` ("train", "test" or a dataset-specific name) of dataset `name` from `root`.

    `root=None` uses default_data_dir(name); `digits` is generated there on first use. `options` go to the
    dataset's loader: ensure_digits's parameters for digits (num_trainval, ...), load_voc's `classes`, load_csv's
    `classes_file`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if root is None and name == "digits":
        root = default_data_dir(name, options.get("num_trainval", 3000), options.get("num_test", 1000),
                                options.get("seed", 0))
    if root is None:
        raise ValueError(f"dataset {name!r} needs a data directory (--data-dir)")
    own_split = resolve_split(name, root, split)
    if name == "digits":
        from .digits import ensure_digits  # imported here so that `python -m udtimm.data.digits` runs cleanly

        samples, classes = load_voc(ensure_digits(root, **options, with_val=own_split == "val"), own_split)
    elif name == "voc2007":
        samples, classes = load_voc(root, own_split, **options)
    elif name == "coco2014":
        samples, classes = load_coco(root, own_split, **options)
    else:
        samples, classes = load_csv(root, own_split, **options)
    return MultiLabelDataset(samples, classes, transform, name=f"{name}:{own_split}")
