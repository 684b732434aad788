"""The training split's class counts (docs/recipe.md#long-tailed-labels): what the re-balanced losses weigh by, and
the head / medium / tail groups that the metrics report."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from udtimm.data.base import Label, MultiLabelDataset, label_counts
from udtimm.errors import ConfigError
from udtimm.io import csv_line

CLASS_GROUPS = ("head", "medium", "tail")
# VOC-LT (Wu et al., ECCV 2020): 1,142 training images; head classes have more than 100 of them, tail classes fewer
# than 20. Scaled by the training split's size, they give any split the same shares of its images.
VOC_LT_IMAGES, VOC_LT_HEAD, VOC_LT_TAIL = 1142, 100, 20


@dataclass(frozen=True)
class ClassCounts:
    """Per class, the training images where it is a positive and those where it is known at all (positive or
    absent); unknown labels count in neither."""

    positives: tuple[int, ...]
    annotated: tuple[int, ...]
    images: int  # the training split's images

    @classmethod
    def of(cls, dataset: MultiLabelDataset, difficult: str) -> ClassCounts:
        """The counts of `dataset` with difficult labels as --difficult trains them (positive, ignore, negative)."""
        counts = label_counts(dataset)
        difficult_counts = counts[:, Label.DIFFICULT]
        positives = counts[:, Label.PRESENT] + (difficult_counts if difficult == "positive" else 0)
        annotated = counts[:, Label.PRESENT] + counts[:, Label.ABSENT] + (0 if difficult == "ignore"
                                                                           else difficult_counts)
        return cls(tuple(positives.tolist()), tuple(annotated.tolist()), len(dataset))

    def loss_tensors(self) -> tuple[Tensor, Tensor]:
        """(n_i, N_i) as float32 [C] for the re-balanced losses, with the fallback that keeps their 1 / n_i and
        log(N_i / n_i - 1) finite: N_i at least 2, and n_i between 1 and N_i - 1 (a class never positive in training
        counts as positive once; one positive everywhere, as absent once)."""
        annotated = np.maximum(np.asarray(self.annotated, dtype=np.float64), 2.0)
        positives = np.clip(np.asarray(self.positives, dtype=np.float64), 1.0, annotated - 1.0)
        return torch.from_numpy(positives).float(), torch.from_numpy(annotated).float()

    def to_json(self) -> str:
        return json.dumps({"positives": list(self.positives), "annotated": list(self.annotated),
                           "images": self.images})

    @classmethod
    def from_json(cls, text: str) -> ClassCounts:
        values = json.loads(text)
        return cls(tuple(values["positives"]), tuple(values["annotated"]), int(values["images"]))


def group_thresholds(counts: ClassCounts, given: tuple[float, float] | None = None) -> tuple[float, float]:
    """(head above, tail below): a class with more training positives than the first is a head class, one with fewer
    than the second a tail class. `given` (--class-groups) as it is, else VOC-LT's scaled to the split."""
    if given is not None:
        head, tail = given
        if tail > head:
            raise ConfigError(f"--class-groups {head:g} {tail:g}: the head threshold is below the tail threshold")
        return float(head), float(tail)
    scale = counts.images / VOC_LT_IMAGES
    return VOC_LT_HEAD * scale, VOC_LT_TAIL * scale


def class_groups(counts: ClassCounts, thresholds: tuple[float, float]) -> Tensor:
    """int64 [C]: each class's index in CLASS_GROUPS by its training positives."""
    head, tail = thresholds
    positives = torch.tensor(counts.positives, dtype=torch.float64)
    return torch.where(positives > head, 0, torch.where(positives < tail, 2, 1))


def counts_table(classes: list[str], counts: ClassCounts, groups: Tensor) -> str:
    """class_counts.csv of a run: each class's training positives, annotated images and group."""
    rows = [("class", "positives", "annotated", "group")]
    rows += [(name, positives, annotated, CLASS_GROUPS[group]) for name, positives, annotated, group
             in zip(classes, counts.positives, counts.annotated, groups.tolist(), strict=True)]
    return "".join(csv_line(row) for row in rows)


def check_same_counts(path: str, classes: list[str], counts: ClassCounts) -> None:
    """Before a resumed run trains: its training split still has the class counts its run started with (the
    re-balanced losses weigh by them), else a ConfigError naming the first class that changed."""
    import pandas as pd  # only a resume reads the table back

    saved = pd.read_csv(path, keep_default_na=False)
    if list(saved["class"].astype(str)) != list(classes):
        raise ConfigError(f"{path}: the run started on other classes than the training split has now")
    for name, before, now, annotated_before, annotated_now in zip(
            classes, saved["positives"], counts.positives, saved["annotated"], counts.annotated, strict=True):
        if (before, annotated_before) != (now, annotated_now):
            raise ConfigError(f"{path}: class {name!r} had {before} positives of {annotated_before} annotated "
                              f"training images when the run started, {now} of {annotated_now} now: the training "
                              "split changed; resume on the same data, or start a new run")


def checkpoint_counts(metadata: Mapping[str, str], given: tuple[float, float] | None = None,
                      ) -> tuple[ClassCounts, Tensor] | None:
    """The class counts a checkpoint was trained with and each class's group, by `given` thresholds (validate.py
    --class-groups) or the run's; None for a checkpoint saved before runs recorded them."""
    if "class_counts" not in metadata:
        return None
    counts = ClassCounts.from_json(metadata["class_counts"])
    saved = tuple(json.loads(metadata["class_groups"])) if "class_groups" in metadata else None
    return counts, class_groups(counts, group_thresholds(counts, given or saved))
