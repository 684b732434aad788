"""The dataset registry (udtimm/data/__init__.py): one entry per dataset, read by --dataset and build_dataset."""

import numpy as np
import pytest

import train
import validate
from udtimm.data import DATASETS, DatasetSpec, DataSource, Sample, build_dataset


def test_every_registered_dataset_is_a_choice_of_the_scripts() -> None:
    for name in DATASETS:
        assert train.parse_args(["--dataset", name]).dataset == name
        assert validate.parse_args(["--checkpoint", "x.safetensors", "--dataset", name]).dataset == name


def test_a_dataset_registered_in_one_line_is_loaded_by_name(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    def load_toy(root: str, split: str, size: int = 2) -> tuple[list[Sample], list[str]]:
        samples = [Sample.from_dense(f"{split}{i}", f"{root}/{i}.jpg", np.array([1, 0], np.float32), np.zeros(2, bool))
                   for i in range(size)]
        return samples, ["cat", "dog"]

    monkeypatch.setitem(DATASETS, "toy", DatasetSpec(load_toy, {"train": "trainval"}))
    dataset = DataSource("toy", str(tmp_path), {"size": 3}).load("train")
    assert dataset.name == "toy:trainval" and len(dataset) == 3 and dataset.classes == ["cat", "dog"]
    assert build_dataset("toy", str(tmp_path), "val").name == "toy:val"  # other names pass through
    with pytest.raises(ValueError, match="needs a data directory"):
        build_dataset("toy", None, "train")
