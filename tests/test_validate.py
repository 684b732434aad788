"""validate.py end to end on a tiny trained model: train.py's numbers, the difficult subset, output files,
--images, two processes, bad checkpoints."""

import csv
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from conftest import TINY_DIGITS, run_two_cpu_processes, tiny_train_args
from PIL import Image
from safetensors.torch import save_file

import train
import validate
from udtimm import checkpoint
from udtimm.config import ConfigError
from udtimm.data import build_dataset
from udtimm.data.base import CorruptImageError
from udtimm.data.loader import make_loader
from udtimm.data.transforms import eval_transform
from udtimm.engine import predict
from udtimm.metrics import METRIC_NAMES, compute_metrics, predicted_labels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def best(tiny_digits: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    output = str(tmp_path_factory.mktemp("runs"))
    train.main(tiny_train_args(tiny_digits, output, "--experiment", "v"))
    return os.path.join(output, "v", "best.safetensors")


@pytest.fixture(scope="module")
def single_process(best: str, tiny_digits: str) -> dict[str, float]:
    return validate.main(["--checkpoint", best, *data_flags(tiny_digits)])


def data_flags(data_dir: str) -> list[str]:
    """Where the tiny set is; everything else comes from the checkpoint."""
    return ["--data-dir", data_dir, "--digits-trainval", str(TINY_DIGITS["num_trainval"]),
            "--digits-test", str(TINY_DIGITS["num_test"]), "--workers", "0", "--no-progress"]


def assert_same_metrics(found: dict[str, object], expected: dict[str, object]) -> None:
    # CPU convolutions may round differently for another batch size (float32 noise, ~1e-8 of a percent);
    # any real difference (a lost or repeated image) moves a metric by far more than 1e-6 percent.
    for name in METRIC_NAMES:
        assert float(found[name]) == pytest.approx(float(expected[name]), rel=0, abs=1e-6, nan_ok=True), name


def reference_predictions(best: str, data_dir: str):
    """The test split and engine.predict's output on it, built without validate.py."""
    model, metadata = checkpoint.model_from_checkpoint(best)
    dataset = build_dataset("digits", data_dir, "test", **TINY_DIGITS)
    dataset.transform = eval_transform(32, json.loads(metadata["mean"]), json.loads(metadata["std"]))
    return dataset, predict(model, make_loader(dataset, 64, False, 0), Accelerator(), show_progress=False)


def test_checkpoint_alone_reproduces_the_results_of_train(best: str, single_process: dict[str, float]) -> None:
    with open(os.path.join(os.path.dirname(best), "results.csv"), newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert_same_metrics(single_process, row)
    assert single_process["num_images"] == TINY_DIGITS["num_test"]


def test_torchcompile_gives_the_metrics_of_the_eager_model(best: str, tiny_digits: str,
                                                          single_process: dict[str, float]) -> None:
    compiled = validate.main(["--checkpoint", best, *data_flags(tiny_digits), "--torchcompile"])
    for name in METRIC_NAMES:  # inductor fuses and reorders float32 arithmetic: scores move by ~1e-7
        assert compiled[name] == pytest.approx(single_process[name], rel=0, abs=1e-3, nan_ok=True), name


def test_difficult_subset_matches_metrics_on_the_subset(best: str, tiny_digits: str, capsys) -> None:
    found = validate.main(["--checkpoint", best, "--subset", "difficult", *data_flags(tiny_digits)])
    dataset, predictions = reference_predictions(best, tiny_digits)
    keep = dataset.difficult_masks().any(dim=1)
    assert 0 < keep.sum() < len(dataset)
    expected = compute_metrics(predictions.scores[keep], dataset.targets()[keep], dataset.difficult_masks()[keep])
    assert_same_metrics(found, expected)
    printed = capsys.readouterr().out
    assert "positives" in printed and all(name in printed for name in dataset.classes)


def test_results_file_predictions_and_plots(best: str, tiny_digits: str, tmp_path) -> None:
    results, preds, plots = str(tmp_path / "r.csv"), str(tmp_path / "p.csv"), str(tmp_path / "plots")
    flags = ["--checkpoint", best, *data_flags(tiny_digits), "--results-file", results]
    validate.main(flags)
    validate.main([*flags, "--save-preds", preds, "--plots", plots])
    with open(results, newline="") as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 3 and rows[0][:8] == ["dataset", "split", "subset", "model", "method", "teacher",
                                              "checkpoint", "eval_difficult"]
    assert rows[0][8:] == list(METRIC_NAMES) and rows[1][:5] == ["digits", "test", "all", "test_resnet", "baseline"]

    dataset, predictions = reference_predictions(best, tiny_digits)
    table = pd.read_csv(preds, dtype={"image_id": str}, keep_default_na=False)
    assert list(table.columns) == ["image_id", *dataset.classes, "labels"]
    assert table["image_id"].tolist() == [dataset.samples[i].image_id for i in predictions.indices.tolist()]
    assert torch.equal(torch.tensor(table[dataset.classes].to_numpy(), dtype=torch.float32), predictions.scores)
    first_labels = [name for name, t in zip(dataset.classes, predictions.target[0].tolist(), strict=True) if t]
    assert table["labels"][0] == ";".join(first_labels)

    with Image.open(os.path.join(plots, "reliability.png")) as image:
        assert image.format == "PNG" and image.size == (500, 500)


@pytest.fixture
def image_folder(tiny_digits: str, tmp_path) -> str:
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    source = os.path.join(tiny_digits, "VOC2007", "JPEGImages")
    for name, target in zip(sorted(os.listdir(source))[:3], ("a.jpg", "b.jpg", "more/c.jpg"), strict=True):
        shutil.copy(os.path.join(source, name), folder / target)
    return str(folder)


def read_image_predictions(path: str, classes: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    table = pd.read_csv(path, keep_default_na=False)
    assert list(table.columns) == ["image", "labels", *classes]
    return table, table[classes].to_numpy(dtype=np.float32)


def test_images_folder_is_labelled_by_threshold_or_topk(best: str, image_folder: str, tmp_path) -> None:
    classes = checkpoint.class_names(checkpoint.read_metadata(best))
    out = str(tmp_path / "out.csv")
    common = ["--checkpoint", best, "--images", image_folder, "--out-csv", out, "--workers", "0", "--no-progress"]
    for selection, topk in ((["--threshold", "0.48"], None), (["--topk", "2", "--threshold", "0"], 2)):
        assert validate.main([*common, *selection]) == {"num_images": 3}
        table, probs = read_image_predictions(out, classes)
        names = ("a.jpg", "b.jpg", "more/c.jpg")
        assert table["image"].tolist() == [os.path.join(image_folder, name) for name in names]
        assert ((probs >= 0) & (probs <= 1)).all()
        expected = predicted_labels(torch.from_numpy(probs), float(selection[-1]), topk)
        assert table["labels"].tolist() == [";".join(c for c, on in zip(classes, row, strict=True) if on)
                                            for row in expected.tolist()]
    assert all(len(labels.split(";")) == 2 for labels in table["labels"])


def test_unreadable_image_is_named(best: str, image_folder: str, tmp_path) -> None:
    with open(os.path.join(image_folder, "more", "broken.jpg"), "wb") as handle:
        handle.write(b"\xff\xd8 not really a jpeg")
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        validate.main(["--checkpoint", best, "--images", image_folder, "--out-csv", str(tmp_path / "o.csv"),
                       "--workers", "0", "--no-progress"])


def test_images_refuse_options_that_need_annotations(best: str, image_folder: str) -> None:
    with pytest.raises(ConfigError, match="--subset, --results-file"):
        validate.main(["--checkpoint", best, "--images", image_folder, "--subset", "difficult",
                       "--results-file", "r.csv"])


def test_two_processes_give_the_single_process_metrics(best: str, tiny_digits: str, tmp_path,
                                                       single_process: dict[str, float]) -> None:
    # 40 images in batches of 16 over 2 processes: the second process's last batch is padded with repeats.
    assert TINY_DIGITS["num_test"] % (16 * 2) != 0
    results = str(tmp_path / "r2.csv")
    result = run_two_cpu_processes("validate.py", "--checkpoint", best, *data_flags(tiny_digits), "-b", "16",
                                   "--results-file", results, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    with open(results, newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert_same_metrics(row, single_process)


def test_checkpoint_of_other_classes_is_refused_naming_them(best: str, tiny_digits: str, tmp_path) -> None:
    model, metadata = checkpoint.model_from_checkpoint(best)
    classes = checkpoint.class_names(metadata)
    other = str(tmp_path / "other.safetensors")
    checkpoint.save_checkpoint(other, model, {**metadata, "class_names": json.dumps([*classes[:-1], "ten"])})
    with pytest.raises(checkpoint.CheckpointError, match=r"only in the checkpoint: \['ten'\].*\['nine'\]"):
        validate.main(["--checkpoint", other, *data_flags(tiny_digits)])


def test_unusable_checkpoints_are_clear_errors(best: str, tmp_path) -> None:
    truncated = str(tmp_path / "truncated.safetensors")
    with open(best, "rb") as source, open(truncated, "wb") as target:
        target.write(source.read()[: os.path.getsize(best) // 2])
    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"weight": torch.zeros(2)}, foreign)
    for path, message in ((truncated, "truncated or corrupt"), (foreign, "not written by udtimm"),
                          (str(tmp_path / "missing.safetensors"), "does not exist")):
        with pytest.raises(checkpoint.CheckpointError, match=message):
            validate.main(["--checkpoint", path])
