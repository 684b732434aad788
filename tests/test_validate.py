"""validate.py end to end on a tiny trained model: train.py's numbers, the difficult subset, output files, the
per-class table, two processes, bad checkpoints (tuning: test_validate_tuning.py; binned: test_validate_binned.py)."""

import csv
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from conftest import TINY_DIGITS, data_flags, run_two_cpu_processes
from PIL import Image
from safetensors.torch import save_file
from sklearn.metrics import average_precision_score, precision_recall_fscore_support

import validate
from udtimm import Predictor, checkpoint, predictions
from udtimm.class_counts import checkpoint_counts
from udtimm.config import ConfigError
from udtimm.data import build_dataset, load_voc
from udtimm.data.loader import make_loader
from udtimm.data.transforms import eval_transform
from udtimm.engine import predict
from udtimm.metrics import METRIC_NAMES, compute_metrics, metric_names
from udtimm.predictions import PER_CLASS_COLUMNS
from udtimm.tuning import tuning_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_same_metrics(found: dict[str, object], expected: dict[str, object],
                        names: tuple[str, ...] = METRIC_NAMES) -> None:
    # CPU convolutions may round differently for another batch size (float32 noise, ~1e-8 of a percent);
    # any real difference (a lost or repeated image) moves a metric by far more than 1e-6 percent.
    for name in names:
        assert float(found[name]) == pytest.approx(float(expected[name]), rel=0, abs=1e-6, nan_ok=True), name


def reference_predictions(best: str, data_dir: str, split: str = "test"):
    """The split and engine.predict's output on it, built without validate.py."""
    model, metadata = checkpoint.model_from_checkpoint(best)
    dataset = build_dataset("digits", data_dir, split, **TINY_DIGITS)
    dataset.transform = eval_transform(32, json.loads(metadata["mean"]), json.loads(metadata["std"]))
    return dataset, predict(model, make_loader(dataset, 64, False, 0), Accelerator(), show_progress=False)


def trained_groups(best: str) -> torch.Tensor:
    """The class groups of the checkpoint's run, from the counts it recorded."""
    return checkpoint_counts(checkpoint.read_metadata(best))[1]


def test_checkpoint_alone_reproduces_the_results_of_train(best: str, single_process: dict[str, float]) -> None:
    with open(os.path.join(os.path.dirname(best), "results.csv"), newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert_same_metrics(single_process, row)
    assert single_process["num_images"] == TINY_DIGITS["num_test"]


@pytest.mark.slow
def test_torchcompile_gives_the_metrics_of_the_eager_model(best: str, tiny_digits: str,
                                                          single_process: dict[str, float]) -> None:
    compiled = validate.main(["--checkpoint", best, *data_flags(tiny_digits), "--torchcompile"])
    for name in METRIC_NAMES:  # inductor fuses and reorders float32 arithmetic: scores move by ~1e-7
        assert compiled[name] == pytest.approx(single_process[name], rel=0, abs=1e-3, nan_ok=True), name


def test_difficult_subset_matches_metrics_on_the_subset(best: str, tiny_digits: str, capsys) -> None:
    found = validate.main(["--checkpoint", best, "--subset", "difficult", *data_flags(tiny_digits)])
    dataset, predictions = reference_predictions(best, tiny_digits)
    targets, difficult = dataset.dense_labels()
    keep = difficult.any(dim=1)
    assert 0 < keep.sum() < len(dataset)
    expected = compute_metrics(predictions.scores[keep], targets[keep], difficult[keep],
                               class_groups=trained_groups(best))
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
    # An image through Predictor (predict.py's path) gets the score validate.py gives it.
    labelled = Predictor.from_checkpoint(best).predict([sample.path for sample in dataset.samples], batch_size=7)
    torch.testing.assert_close(torch.tensor(labelled[dataset.classes].to_numpy()),
                               torch.tensor(table[dataset.classes].to_numpy(), dtype=torch.float32), rtol=0, atol=1e-6)

    with Image.open(os.path.join(plots, "reliability.png")) as image:
        assert image.format == "PNG" and image.size == (500, 500)


def test_topk_names_the_columns_after_k(best: str, tiny_digits: str, tmp_path, capsys) -> None:
    results = str(tmp_path / "r.csv")
    found = validate.main(["--checkpoint", best, *data_flags(tiny_digits), "--topk", "5", "--results-file", results])
    with open(results, newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert list(row)[8:] == list(found) == list(metric_names(5))
    dataset, predictions = reference_predictions(best, tiny_digits)
    expected = compute_metrics(predictions.scores, *dataset.dense_labels(), topk=5, class_groups=trained_groups(best))
    assert_same_metrics(row, expected, metric_names(5))
    assert "of1_top5" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--topk must be at least 1, got 0"):
        validate.parse_args(["--checkpoint", best, "--topk", "0"])


def test_class_groups_come_from_the_run_unless_given(best: str, single_process: dict[str, float],
                                                     tiny_digits: str) -> None:
    assert single_process["map_head"] == pytest.approx(single_process["map"])  # a balanced set: every class is head
    everything_medium = validate.main(["--checkpoint", best, *data_flags(tiny_digits), "--class-groups", "1e9", "0"])
    assert everything_medium["map_medium"] == pytest.approx(single_process["map"])
    assert np.isnan(everything_medium["map_head"]) and np.isnan(everything_medium["map_tail"])


def test_a_checkpoint_without_class_counts_leaves_the_group_columns_empty_and_says_so(best: str, tiny_digits: str,
                                                                                       tmp_path, capsys) -> None:
    tensors, metadata = checkpoint.load_checkpoint(best)
    older = str(tmp_path / "older.safetensors")
    save_file(tensors, older, metadata={key: value for key, value in metadata.items()
                                        if key not in ("class_counts", "class_groups")})
    found = validate.main(["--checkpoint", older, *data_flags(tiny_digits), "--class-groups", "10", "2"])
    assert all(np.isnan(found[name]) for name in ("map_head", "map_medium", "map_tail")) and found["map"] > 0
    assert "warning: --class-groups does nothing" in capsys.readouterr().out


def test_per_class_table_is_printed_and_written_beside_the_checkpoint(best: str, tiny_digits: str, tmp_path,
                                                                       capsys) -> None:
    checkpoint_copy = str(tmp_path / "best.safetensors")
    shutil.copy(best, checkpoint_copy)
    validate.main(["--checkpoint", checkpoint_copy, *data_flags(tiny_digits), "--per-class"])
    path = tmp_path / "best-per-class-test.csv"
    table = pd.read_csv(path)
    dataset, predictions = reference_predictions(best, tiny_digits)
    assert table["class"].tolist() == dataset.classes
    assert list(table.columns) == [*PER_CLASS_COLUMNS, "train_positives", "group"]
    counts = pd.read_csv(os.path.join(os.path.dirname(best), "class_counts.csv"), keep_default_na=False)
    assert table[["train_positives", "group"]].values.tolist() == counts[["positives", "group"]].values.tolist()
    targets, difficult = dataset.dense_labels()
    keep = ~difficult
    for c in range(len(dataset.classes)):  # every class, not only those of the difficult subset
        y, s = targets[keep[:, c], c].numpy() > 0.5, predictions.scores[keep[:, c], c].numpy()
        assert table["ap"][c] == pytest.approx(100 * average_precision_score(y, s), abs=1e-6)
        p, r, f1, _ = precision_recall_fscore_support(y, s >= 0.5, average="binary", zero_division=0)
        assert table[["precision", "recall", "f1"]].iloc[c].tolist() == pytest.approx([100 * p, 100 * r, 100 * f1])
        assert table["positives"][c] == y.sum() and table["difficult"][c] == (~keep[:, c]).sum()
    printed = capsys.readouterr().out
    assert f"per-class table: {path}" in printed and all(name in printed for name in dataset.classes)
    validate.main(["--checkpoint", checkpoint_copy, *data_flags(tiny_digits), "--subset", "difficult",
                   "--per-class", str(tmp_path / "mine.csv")])
    assert len(pd.read_csv(tmp_path / "mine.csv")) == len(dataset.classes)


def test_per_class_tables_of_many_classes_print_a_summary_unless_every_row_is_asked_for(
        best: str, tiny_digits: str, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(predictions, "MANY_CLASSES", 4)  # the digits' 10 classes stand for OpenImages' 10,000
    checkpoint_copy = str(tmp_path / "best.safetensors")
    shutil.copy(best, checkpoint_copy)
    flags = ["--checkpoint", checkpoint_copy, *data_flags(tiny_digits), "--per-class", str(tmp_path / "table.csv")]
    validate.main([*flags, "--per-class-rows", "3", "--tune-thresholds", "f1", "--calibrate", "per-class"])
    printed = capsys.readouterr().out
    assert printed.count("10 classes, summarised (validate.py --per-class-rows all prints every row)") == 3
    for rank_by in ("ap", "f1", "BCE after"):  # the per-class table, the thresholds, the temperatures
        assert f"worst 3 by {rank_by}:" in printed and f"best 3 by {rank_by}:" in printed
    assert "ap by evaluated positives (quantile bands):" in printed
    table = pd.read_csv(tmp_path / "table.csv")
    assert len(table) == 10  # the CSV keeps every row
    worst = table.sort_values("ap", kind="stable")["class"].head(3).tolist()
    lines = printed.splitlines()
    start = lines.index("worst 3 by ap:") + 3
    assert [line.split()[0] for line in lines[start:start + 3]] == worst

    validate.main([*flags, "--per-class-rows", "all"])
    printed = capsys.readouterr().out
    assert "summarised" not in printed and all(f"\n{name} " in printed for name in table["class"])
    with pytest.raises(SystemExit):
        validate.parse_args(["--checkpoint", checkpoint_copy, "--per-class-rows", "0"])
    assert "--per-class-rows: expected a number of rows (at least 1) or all, got '0'" in capsys.readouterr().err


def tuning_run(best: str, tiny_digits: str, tmp_path) -> tuple[str, dict[str, float]]:
    """validate.py --tune-thresholds f1 on a copy of the checkpoint: (the copy, the returned metrics)."""
    checkpoint_copy = str(tmp_path / "best.safetensors")
    shutil.copy(best, checkpoint_copy)
    found = validate.main(["--checkpoint", checkpoint_copy, *data_flags(tiny_digits), "--tune-thresholds", "f1"])
    return checkpoint_copy, found


@pytest.mark.slow
def test_two_processes_give_the_single_process_metrics(best: str, tiny_digits: str, tmp_path,
                                                       single_process: dict[str, float]) -> None:
    # 40 images in batches of 16 over 2 processes: the second process's last batch is padded with repeats.
    assert TINY_DIGITS["num_test"] % (16 * 2) != 0
    # 20 val images (thresholds tuned on them) over 2 processes, batches of 16: repeats there too.
    results, one_process_dir = str(tmp_path / "r2.csv"), tmp_path / "one"
    one_process_dir.mkdir()
    one_process_copy, _ = tuning_run(best, tiny_digits, one_process_dir)
    checkpoint_copy = str(tmp_path / "best.safetensors")
    shutil.copy(best, checkpoint_copy)
    result = run_two_cpu_processes("validate.py", "--checkpoint", checkpoint_copy, *data_flags(tiny_digits), "-b",
                                   "16", "--results-file", results, "--tune-thresholds", "f1", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    with open(results, newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert_same_metrics(row, single_process)
    stored = [json.loads(open(tuning_path(path)).read())["thresholds"] for path in (checkpoint_copy,
                                                                                        one_process_copy)]
    assert stored[0] == pytest.approx(stored[1], abs=1e-6)


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


@pytest.mark.slow
def test_unknown_labels_give_the_same_metrics_in_two_processes_as_in_one(best: str, tiny_digits: str,
                                                                          tmp_path) -> None:
    """The digits test images relabelled as a CSV set with a third of the labels unknown (empty cells)."""
    samples, classes = load_voc(tiny_digits, "test")
    rng = np.random.default_rng(4)
    rows = ["image," + ",".join(classes)]
    for sample in samples:
        cells = ["" if rng.random() < 1 / 3 else str(int(value)) for value in sample.dense(len(classes))[0]]
        rows.append(",".join([sample.path, *cells]))
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    flags = ["--checkpoint", best, "--dataset", "csv", "--data-dir", str(tmp_path), "-b", "16", "--workers", "0",
             "--no-progress"]
    one = validate.main(flags)
    full = validate.main(["--checkpoint", best, *data_flags(tiny_digits)])
    assert one["map"] != pytest.approx(full["map"])  # the unknown pairs are left out
    results = str(tmp_path / "two.csv")
    result = run_two_cpu_processes("validate.py", *flags, "--results-file", results, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(results, newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert_same_metrics(row, one)


def test_a_threshold_outside_0_1_is_refused_and_a_lone_tune_split_says_it_does_nothing(capsys) -> None:
    with pytest.raises(ConfigError, match=r"--threshold must lie in \[0, 1\], got 1.5"):
        validate.parse_args(["--checkpoint", "c.safetensors", "--threshold", "1.5"])
    validate.parse_args(["--checkpoint", "c.safetensors", "--tune-split", "trainval"])
    assert capsys.readouterr().err == ("warning: --tune-split trainval does nothing without --calibrate or "
                                       "--tune-thresholds\n")
    validate.parse_args(["--checkpoint", "c.safetensors", "--tune-split", "val", "--calibrate", "per-class"])
    assert capsys.readouterr().err == ""
