"""Multi-label datasets: VOC2007, COCO2014, OpenImages, CSV files, Hugging Face datasets, the embedded `digits` and
WebDataset shards of any of them (file names in, samples out)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from . import hf
from .base import CorruptImageError, DatasetError, MultiLabelDataset, Sample, check_unique_ids, hold_out, read_image
from .coco import load_coco
from .csv import load_csv
from .openimages import load_openimages
from .voc import VOC_CLASSES, load_voc
from .wds import find_info, load_shards, load_split

__all__ = [
    "DATASETS", "HOLDOUT", "VOC_CLASSES", "CorruptImageError", "DataSource", "DatasetError", "DatasetSpec",
    "MultiLabelDataset", "Sample", "build_dataset", "check_unique_ids", "default_data_dir", "hold_out", "load_coco",
    "load_csv", "load_voc", "read_image",
]  # fmt: skip

SplitLoader = Callable[..., tuple[list[Sample], list[str]]]
# The default digits set, named once: ensure_digits, its cache folder and the --digits-* flags default to it. Any
# other seed makes a pretraining set whose glyphs are all trainval glyphs of this one.
DIGITS_TRAINVAL, DIGITS_TEST, DIGITS_SEED = 3000, 1000, 0
# The selection split that is a seeded part of the train split, left out of training (loaders.load_datasets).
HOLDOUT = "holdout"


@dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset: `load(root, own_split, **options)` gives (samples, class names); `splits` maps the
    generic split names ("train", "test") to the dataset's own; any other name is passed through unchanged."""

    load: SplitLoader
    splits: dict[str, str]
    default_root: Callable[..., str] | None = None  # where it lives without --data-dir, given the options
    selection: str = HOLDOUT  # the split that chooses best.safetensors unless --val-split names one
    unlisted: str = "absent"  # what a class that a sample does not list is, unless the options say (csv)

    def own_split(self, root: str, split: str) -> str:
        return self.splits.get(split, split)

    def selection_split(self, root: str | None) -> str:
        """The default --val-split: a split that training does not see and the test split does not hold."""
        return self.selection

    def build(self, root: str, own_split: str, transform: Callable[[Tensor], Tensor] | None, name: str,
              **options: Any) -> MultiLabelDataset:
        """The split `own_split` at `root` as a dataset named `name`."""
        samples, classes = self.load(root, own_split, **options)
        return MultiLabelDataset(samples, classes, transform, name=name,
                                 unlisted=options.get("unlisted", self.unlisted))

    def source_dataset(self, root: str | None) -> str | None:
        """The registered dataset these images were converted from, whose per-dataset defaults apply (wds); None for
        a dataset of its own."""
        return None


@dataclass(frozen=True)
class CsvSpec(DatasetSpec):
    def own_split(self, root: str, split: str) -> str:
        # "test" reads test.csv, or val.csv when there is no test.csv.
        if split == "test" and not os.path.isfile(os.path.join(root, "test.csv")):
            return "val"
        return super().own_split(root, split)

    def selection_split(self, root: str | None) -> str:
        # val.csv chooses only beside a test.csv: without one it is the test split that reports.
        has = [root is not None and os.path.isfile(os.path.join(root, f"{name}.csv")) for name in ("val", "test")]
        return "val" if all(has) else HOLDOUT


@dataclass(frozen=True)
class ShardSpec(DatasetSpec):
    """--dataset wds: shards written by python -m udtimm.data.shards, whose _info.json gives the split names, the
    selection split, the unlisted state and the defaults of the dataset they were converted from."""

    def own_split(self, root: str, split: str) -> str:
        info = find_info(root)
        return info["aliases"].get(split, split) if info else split

    def selection_split(self, root: str | None) -> str:
        info = find_info(root)
        return info["selection"] if info else self.selection

    def build(self, root: str, own_split: str, transform: Callable[[Tensor], Tensor] | None, name: str,
              **options: Any) -> MultiLabelDataset:
        return load_split(root, own_split, transform, name)

    def source_dataset(self, root: str | None) -> str | None:
        info = find_info(root)
        return info["source"]["dataset"] if info else None


@dataclass(frozen=True)
class HfSpec(DatasetSpec):
    """--dataset hf: a Hugging Face dataset (docs/datasets.md#hf-datasets), read by its own split names (val reads
    validation where the dataset has no val), which chooses on that split when it has one."""

    def own_split(self, root: str, split: str) -> str:
        return hf.own_split(root, split)

    def selection_split(self, root: str | None) -> str:
        names = hf.split_names(root) if root is not None else []
        return "val" if "val" in names or hf.ALIASES["val"] in names else self.selection

    def build(self, root: str, own_split: str, transform: Callable[[Tensor], Tensor] | None, name: str,
              **options: Any) -> MultiLabelDataset:
        return hf.load_split(root, own_split, transform, name, **options)


def digits_cache_dir(num_trainval: int = DIGITS_TRAINVAL, num_test: int = DIGITS_TEST, seed: int = DIGITS_SEED,
                     ambiguous: bool = False, long_tail: float | None = None, **_: Any) -> str:
    """The digits folder under $UDTIMM_CACHE; a set of another size, seed or kind gets its own, never clashing."""
    cache = os.environ.get("UDTIMM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "udtimm")
    name = "digits"
    if (num_trainval, num_test, seed) != (DIGITS_TRAINVAL, DIGITS_TEST, DIGITS_SEED):
        name += f"-{num_trainval}-{num_test}" + (f"-seed{seed}" if seed else "")
    if long_tail is not None:
        name += "-lt" + repr(float(long_tail)).removesuffix(".0")  # exact: two ratios never share a folder
    return os.path.join(cache, name + ("-ambiguous" if ambiguous else ""))


def load_digits(root: str, split: str, **options: Any) -> tuple[list[Sample], list[str]]:
    """The embedded digits set in VOC layout, generated in `root` first (ensure_digits's options)."""
    from .digits import ensure_digits  # imported here so that `python -m udtimm.data.digits` runs cleanly

    return load_voc(ensure_digits(root, **options, with_val=split == "val"), split)


# Adding a dataset: its loader in a module of this package, and one line here.
DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(load_digits, {"train": "trainval", "test": "test"}, default_root=digits_cache_dir,
                          selection="val"),
    "voc2007": DatasetSpec(load_voc, {"train": "trainval", "test": "test"}),
    "coco2014": DatasetSpec(load_coco, {"train": "train2014", "test": "val2014", "val": "val2014"}),
    "csv": CsvSpec(load_csv, {"train": "train"}),
    "openimages": DatasetSpec(load_openimages, {"train": "train", "val": "validation", "test": "test"},
                              selection="val", unlisted="unknown"),
    "hf": HfSpec(hf.load_hf, {}),
    "wds": ShardSpec(load_shards, {}),
}


def default_data_dir(name: str, num_trainval: int = DIGITS_TRAINVAL, num_test: int = DIGITS_TEST,
                     seed: int = DIGITS_SEED, ambiguous: bool = False, long_tail: float | None = None) -> str | None:
    """Where `name` lives when no --data-dir is given, or None when it has no default (only digits has one)."""
    spec = DATASETS[name]
    return spec.default_root(num_trainval, num_test, seed, ambiguous, long_tail) if spec.default_root else None


def build_dataset(
    name: str, root: str | None, split: str, transform: Callable[[Tensor], Tensor] | None = None, **options: Any
) -> MultiLabelDataset:
    """Load split `split` ("train", "test" or a dataset-specific name) of dataset `name` from `root`.

    `root=None` uses the dataset's default folder; `digits` is generated there on first use. `options` go to the
    dataset's loader: ensure_digits's parameters for digits (num_trainval, ...), load_voc's `classes`, load_csv's
    `classes_file`, hf.OPTIONS for hf.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    if root is None and spec.default_root is not None:
        root = spec.default_root(**options)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a data directory (--data-dir)")
    own_split = spec.own_split(root, split)
    return spec.build(root, own_split, transform, f"{name}:{own_split}", **options)


@dataclass(frozen=True)
class DataSource:
    """A dataset to read splits of: its name, its root (None: the default folder) and its loader's options."""

    name: str
    root: str | None = None
    options: dict = field(default_factory=dict)

    def load(self, split: str) -> MultiLabelDataset:
        return build_dataset(self.name, self.root, split, **self.options)
