"""10,000 classes through every training path: train.py with the calibration branch (PAL-N) and each head, distill.py
(UD with attention), validate.py with tuned thresholds, a calibration and the binned evaluation, on an
OpenImages-shaped CSV set (verified positives and negatives, every other label unknown)."""

import csv
import os

import numpy as np
import pytest
from conftest import OPENIMAGES_CLASSES
from PIL import Image

import distill
import train
import validate

IMAGES = {"train": 24, "val": 16, "test": 16}


@pytest.fixture(scope="module")
def many_classes_set(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A label-list CSV set of OPENIMAGES_CLASSES classes, 8 verified positives and 20 verified negatives per image
    (drawn so that the first classes are frequent), images of 16 px whose colour follows the first positive."""
    root = tmp_path_factory.mktemp("many_classes")
    names = [f"c{index:05d}" for index in range(OPENIMAGES_CLASSES)]
    (root / "classes.txt").write_text("".join(name + "\n" for name in names))
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, OPENIMAGES_CLASSES + 1)
    for split, count in IMAGES.items():
        rows = [["image", "labels", "negatives"]]
        for index in range(count):
            drawn = rng.choice(OPENIMAGES_CLASSES, size=28, replace=False, p=weights / weights.sum())
            name = f"{split}{index}.png"
            Image.new("RGB", (16, 16), (int(drawn[0]) % 256, 80, 160)).save(root / name)
            rows.append([name, ";".join(names[c] for c in sorted(drawn[:8])),
                         ";".join(names[c] for c in sorted(drawn[8:]))])
        with open(root / f"{split}.csv", "w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    return str(root)


def run_args(data_dir: str, output: str, experiment: str, *extra: str) -> list[str]:
    return ["--dataset", "csv", "--data-dir", data_dir, "--csv-unlisted", "unknown", "--model", "test_resnet",
            "--img-size", "16", "-b", "8", "--epochs", "1", "--workers", "0", "--warmup-epochs", "0",
            "--output", output, "--experiment", experiment, "--no-progress", *extra]


@pytest.fixture(scope="module")
def teacher(many_classes_set: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    output = str(tmp_path_factory.mktemp("runs"))
    row = train.main(run_args(many_classes_set, output, "teacher", "--cal"))
    assert row["selection_split"] == "val" and row["num_classes_evaluated"] > 0
    return os.path.join(output, "teacher", "best.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("head", ["ml-decoder", "csra"])
def test_train_py_with_the_calibration_branch_and_a_spatial_head(many_classes_set: str, head: str, tmp_path) -> None:
    row = train.main(run_args(many_classes_set, str(tmp_path), head, "--cal", "--head", head))
    assert row["method"] == f"cal+{head}" and 0 <= row["map"] <= 100


@pytest.mark.slow
def test_distill_py_ud_with_attention_from_a_calibrated_teacher(many_classes_set: str, teacher: str,
                                                               tmp_path) -> None:
    row = distill.main(run_args(many_classes_set, str(tmp_path), "ud", "--teacher-ckpt", teacher, "--method", "ud",
                                "--att-weight", "0.5"))
    assert row["method"].startswith("ud") and 0 <= row["map"] <= 100


@pytest.mark.slow
def test_binned_evaluation_agrees_with_exact_and_validate_tunes_and_calibrates(many_classes_set: str, teacher: str,
                                                                              tmp_path) -> None:
    data = ["--dataset", "csv", "--data-dir", many_classes_set, "--csv-unlisted", "unknown",
            "--workers", "0", "--no-progress"]
    exact = validate.main(["--checkpoint", teacher, *data, "--eval-memory", "exact"])
    binned = validate.main(["--checkpoint", teacher, *data, "--eval-memory", "binned"])
    assert binned["num_classes_evaluated"] == exact["num_classes_evaluated"] > 0
    assert binned["cf1"] == pytest.approx(exact["cf1"], abs=1e-9)
    tuned = validate.main(["--checkpoint", teacher, *data, "--tune-thresholds", "f1", "--calibrate", "temperature",
                           "--tune-split", "val"])
    assert tuned["map"] == pytest.approx(exact["map"], abs=1e-9)  # neither changes the ranking
