"""train.py end to end on tiny digits: files of docs/design.md#files-on-disk, resume, two processes, bad input."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_DIGITS, read_rows, run_two_cpu_processes, tiny_train_args
from PIL import Image

import train
import validate
from udtimm import Predictor, trainer
from udtimm.checkpoint import read_metadata
from udtimm.config import ConfigError
from udtimm.data.base import DatasetError
from udtimm.ema import EMA_COLUMNS
from udtimm.metrics import METRIC_NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_recording_evaluations(args: list[str]) -> tuple[dict, list[str]]:
    """train.main(args), and the dataset of every evaluation it ran (digits:val, digits:test), in order."""
    evaluated = []

    def recording_predict(model, batches, *args, **kwargs):
        evaluated.append(batches.loader.dataset.name)
        return real(model, batches, *args, **kwargs)

    real = trainer.predict
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "predict", recording_predict)
        return train.main(args), evaluated


@pytest.fixture(scope="module")
def cal_run(tiny_digits: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, list[str]]:
    output = str(tmp_path_factory.mktemp("runs"))
    row, evaluated = run_recording_evaluations(tiny_train_args(tiny_digits, output, "--cal", "--experiment", "cal"))
    return os.path.join(output, "cal"), row, evaluated


@pytest.mark.slow
def test_run_directory_has_every_file_of_the_design(cal_run: tuple[str, dict, list[str]]) -> None:
    run_dir = cal_run[0]
    for name in ("args.yaml", "summary.csv", "results.csv", "best.safetensors", "last.safetensors",
                 "reliability.png", "state/progress.json", "state/optimizer.pt", "state/weights.safetensors"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert not [name for name in os.listdir(run_dir) if name.endswith(".tmp") or name.startswith(".")]


def design_names(start: str, end: str) -> set[str]:
    """The backticked names in docs/design.md between the first `start` and the next `end` that follows it."""
    with open(os.path.join(ROOT, "docs", "design.md")) as handle:
        text = handle.read()
    first = text.index(start)
    return set(re.findall(r"`([\w<>]+)`", text[first:text.index(end, first + len(start))]))


def test_design_md_names_every_column_and_checkpoint_key_a_run_writes(cal_run: tuple[str, dict, list[str]]) -> None:
    run_dir = cal_run[0]
    ema_columns = {f"{name}_ema" for name in EMA_COLUMNS}  # --model-ema only; this run has none
    summary = read_rows(os.path.join(run_dir, "summary.csv"))[0]
    loss_terms = {column for column in summary if column.startswith("train_") and column != "train_loss"}
    documented = design_names("- `summary.csv`:", "\n- `results.csv`:")
    assert documented - {"train_<term>"} - {"raw", "ema"} == set(summary) - loss_terms | ema_columns
    (results,) = read_rows(os.path.join(run_dir, "results.csv"))
    metrics = design_names("The metrics: ", "\n- `results.csv`")
    documented = design_names("- `results.csv`:", "\n- ") | metrics | {f"last_{name}" for name in metrics}
    assert documented - {"raw", "ema", "last_<metric>", "last_"} == set(results)
    documented = design_names("A checkpoint is a safetensors file", "udtimm_version`") | {"udtimm_version"}
    assert documented - {"raw", "ema"} == set(read_metadata(os.path.join(run_dir, "best.safetensors")))


def test_summary_has_one_row_per_epoch_with_loss_terms_and_metrics(cal_run: tuple[str, dict, list[str]]) -> None:
    rows = read_rows(os.path.join(cal_run[0], "summary.csv"))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    for column in ("lr", "train_loss", "train_bce", "train_partial_softmax", "map", "map_difficult", "ece"):
        assert column in rows[0]
    assert all(0 <= float(row["map"]) <= 100 for row in rows)


@pytest.mark.slow
def test_results_row_names_the_splits_and_gives_the_test_metrics_of_best_and_last(
        cal_run: tuple[str, dict, list[str]], tiny_digits: str) -> None:
    """best.safetensors is the epoch of the best val mAP (summary.csv); results.csv reports it, and the last epoch,
    on test, as validate.py measures those checkpoints."""
    run_dir, returned, _ = cal_run
    (row,) = read_rows(os.path.join(run_dir, "results.csv"))
    assert (row["dataset"], row["split"], row["selection_split"], row["model"], row["method"], row["difficult"]) == (
        "digits", "test", "val", "test_resnet", "cal", "positive")
    assert set(METRIC_NAMES) <= set(row) and {f"last_{name}" for name in METRIC_NAMES} <= set(row)
    summary = read_rows(os.path.join(run_dir, "summary.csv"))
    best = max(summary, key=lambda r: float(r["map"]))
    assert float(row["selection_map"]) == pytest.approx(float(best["map"]), abs=1e-9)
    assert int(row["best_epoch"]) == int(best["epoch"]) and int(row["last_epoch"]) == 1
    for checkpoint, prefix in (("best", ""), ("last", "last_")):
        alone = validate.main(["--checkpoint", os.path.join(run_dir, f"{checkpoint}.safetensors"),
                               *validate_flags(tiny_digits)])
        for name in ("map", "map_difficult", "ece"):
            assert float(row[prefix + name]) == pytest.approx(alone[name], abs=1e-6), prefix + name
    assert returned["map"] == pytest.approx(float(row["map"])) and float(row["map"]) != float(best["map"])


@pytest.mark.slow
def test_selection_reads_the_val_split_every_epoch_and_the_test_split_only_at_the_end(
        cal_run: tuple[str, dict, list[str]]) -> None:
    """Without --select-on-test no test image is predicted before the last epoch's val evaluation: the test split
    is evaluated after it, with the last epoch's weights and best.safetensors (once if they are the same)."""
    run_dir, row, evaluated = cal_run
    expected_end = ["digits:test"] if row["best_epoch"] == 1 else ["digits:test"] * 2
    assert evaluated == ["digits:val"] * 2 + expected_end


@pytest.mark.slow
def test_select_on_test_chooses_on_the_test_split_every_epoch_and_says_so(tiny_digits: str, tmp_path) -> None:
    row, evaluated = run_recording_evaluations(tiny_train_args(tiny_digits, str(tmp_path), "--select-on-test",
                                                               "--experiment", "paper"))
    assert set(evaluated) == {"digits:test"} and len(evaluated) in (3, 4)
    (written,) = read_rows(str(tmp_path / "paper" / "results.csv"))
    assert (written["split"], written["selection_split"]) == ("test", "test")
    summary = read_rows(str(tmp_path / "paper" / "summary.csv"))
    assert float(written["map"]) == pytest.approx(max(float(r["map"]) for r in summary), abs=1e-6) == row["map"]


def test_checkpoint_metadata_rebuilds_the_model(cal_run: tuple[str, dict, list[str]]) -> None:
    metadata = read_metadata(os.path.join(cal_run[0], "best.safetensors"))
    assert metadata["model"] == "test_resnet" and metadata["cal"] == "true" and metadata["img_size"] == "32"
    assert json.loads(metadata["class_names"])[:3] == ["zero", "one", "two"]
    assert metadata["dataset"] == "digits" and len(json.loads(metadata["mean"])) == 3


def test_args_yaml_is_a_config_that_reruns_the_same_experiment(cal_run: tuple[str, dict, list[str]]) -> None:
    path = os.path.join(cal_run[0], "args.yaml")
    saved = yaml.safe_load(open(path))
    assert saved["cal"] is True and saved["model"] == "test_resnet" and saved["img_size"] == 32
    again = train.parse_args(["-c", path])
    assert {key: getattr(again, key) for key in saved} == saved


def test_config_file_sets_defaults_and_flags_win(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: test_resnet\nlr: 0.5\ncal: true\n")
    args = train.parse_args(["-c", str(path), "--lr", "0.25"])
    assert (args.model, args.lr, args.cal) == ("test_resnet", 0.25, True)
    path.write_text("modle: resnet18\n")
    with pytest.raises(ConfigError, match="modle"):
        train.parse_args(["-c", str(path)])


@pytest.mark.slow
def test_resume_with_more_epochs_and_new_rates_trains_at_the_long_schedules_rates(tiny_digits: str, tmp_path) -> None:
    """A 1-epoch run resumed with --epochs 3 and new rates and warm-up: its epochs 1 and 2 start at the rates of a
    run that had the 3-epoch schedule from the start (summary.csv's lr column), epoch 0 keeps its own rate, and
    args.yaml keeps the new flags for a later --resume. A fixed setting is refused, naming its flag."""
    long_schedule = ("--epochs", "3", "--lr", "4e-3", "--min-lr", "1e-4", "--warmup-epochs", "2", "--warmup-lr", "1e-4")
    train.main(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "long", *long_schedule))
    train.main(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "r", "--epochs", "1"))
    run_dir = str(tmp_path / "r")
    train.main(["--resume", run_dir, "--no-progress", *long_schedule])
    resumed = read_rows(os.path.join(run_dir, "summary.csv"))
    long = read_rows(str(tmp_path / "long" / "summary.csv"))
    assert [row["epoch"] for row in resumed] == ["0", "1", "2"]
    # Both runs compute each rate with the same float64 arithmetic from the same step count: a few ulps at most.
    assert [float(row["lr"]) for row in resumed[1:]] == pytest.approx([float(row["lr"]) for row in long[1:]],
                                                                      rel=1e-15, abs=0)
    assert float(resumed[0]["lr"]) == pytest.approx(2e-3, rel=1e-15, abs=0)  # no warm-up: --lr's default
    assert len({float(row["lr"]) for row in resumed}) == 3
    saved = yaml.safe_load(open(os.path.join(run_dir, "args.yaml")))
    assert (saved["epochs"], saved["lr"], saved["warmup_epochs"]) == (3, 4e-3, 2)
    assert [row["epochs"] for row in read_rows(os.path.join(run_dir, "results.csv"))] == ["1", "3"]
    for flag, value in (("--model", "resnet18"), ("--sched", "step"), ("--opt", "sgd")):
        with pytest.raises(ConfigError, match=f"{flag}: the run has"):
            train.main(["--resume", run_dir, flag, value])


@pytest.mark.slow
def test_existing_run_directory_is_not_overwritten(cal_run: tuple[str, dict, list[str]]) -> None:
    run_dir = cal_run[0]
    with pytest.raises(ConfigError, match="--resume"):
        train.main(["--output", os.path.dirname(run_dir), "--experiment", "cal", "--model", "test_resnet"])


def test_missing_voc_directory_shows_the_expected_layout(tmp_path) -> None:
    with pytest.raises(DatasetError, match="JPEGImages"):
        train.main(["--dataset", "voc2007", "--data-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path)])


@pytest.mark.slow
def test_unknown_model_is_a_clean_error_from_the_command_line(tiny_digits: str, tmp_path) -> None:
    args = tiny_train_args(tiny_digits, str(tmp_path), "--model", "resnet181")
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "resnet18" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_sixteen_bit_png_bmp_and_tiff_train_and_predict(tmp_path) -> None:
    """A CSV set of the formats users' scans come in (docs/datasets.md#image-files): one epoch, then predictions."""
    rng = np.random.default_rng(0)
    names, expected = [], []
    for i in range(9):
        name = f"scan{i}" + (".png", ".bmp", ".tif")[i % 3]
        if name.endswith(".png"):  # 16-bit grayscale, read as its high bytes on three channels
            pixels = rng.integers(0, 65536, (40, 36), dtype=np.uint16)
            expected.append(torch.from_numpy((pixels >> 8).astype(np.uint8)).expand(3, -1, -1))
        else:
            pixels = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
            expected.append(torch.from_numpy(pixels).permute(2, 0, 1))
        Image.fromarray(pixels).save(tmp_path / name)
        names.append(name)
    listing = "image,labels\n" + "".join(f"{name},{('cat', 'dog', 'cat;dog')[i % 3]}\n" for i, name in enumerate(names))
    for split in ("train", "test"):
        (tmp_path / f"{split}.csv").write_text(listing)
    output = tmp_path / "runs"
    train.main(["--dataset", "csv", "--data-dir", str(tmp_path), "--model", "test_resnet", "--img-size", "32", "-b",
                "4", "--epochs", "1", "--workers", "0", "--warmup-epochs", "0", "--output", str(output),
                "--no-progress", "--experiment", "formats"])
    (row,) = read_rows(str(output / "formats" / "results.csv"))
    assert float(row["num_images"]) == 9
    predictor = Predictor.from_checkpoint(str(output / "formats" / "best.safetensors"))
    paths = [str(tmp_path / name) for name in names]
    table = predictor.predict(paths, batch_size=9)
    assert table["image"].tolist() == paths
    by_hand = predictor.predict(torch.stack(expected), batch_size=9)
    torch.testing.assert_close(torch.tensor(table[predictor.class_names].to_numpy()),
                               torch.tensor(by_hand[predictor.class_names].to_numpy()))  # float32's tolerance


@pytest.mark.slow
def test_two_cpu_processes_write_one_consistent_run(tiny_digits: str, tmp_path) -> None:
    result = run_two_cpu_processes("train.py", *tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "ddp",
                                                                "--cal", "--model-ema"))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "ddp"
    assert "2 process(es)" in result.stdout
    summary = read_rows(str(run_dir / "summary.csv"))
    assert [row["epoch"] for row in summary] == ["0", "1"]
    (row,) = read_rows(str(run_dir / "results.csv"))
    assert float(row["num_images"]) == 40  # every test image once: no duplicates from the padded last batch
    assert read_metadata(str(run_dir / "best.safetensors"))["cal"] == "true"
    # The raw and EMA weights of the last epoch, evaluated by one process, score what the two processes measured
    # with them: both processes evaluated the main process's weights (and BatchNorm statistics), the ones saved.
    for weights, suffix in (("weights", ""), ("ema", "_ema")):
        alone = validate.main(["--checkpoint", str(run_dir / "state" / f"{weights}.safetensors"),
                               *validate_flags(tiny_digits, "val")])
        for name in ("map", "map_difficult", "ece"):
            assert float(summary[-1][name + suffix]) == pytest.approx(alone[name], abs=1e-6), name + suffix


@pytest.mark.slow
def test_two_cpu_processes_train_a_spatial_head_that_validate_and_predictor_rebuild(tiny_digits: str,
                                                                                    tmp_path) -> None:
    """ML-Decoder (a buffer of fixed queries, dropout) under DDP: validate.py, in one process, rebuilds the head from
    the checkpoint alone and measures what the two processes did; Predictor rebuilds it too."""
    flags = ("--head", "ml-decoder", "--head-kwargs", "embed_dim=16", "num_heads=2", "ff_dim=32", "--cal",
             "--epochs", "1")
    result = run_two_cpu_processes("train.py", *tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "ddp",
                                                                *flags))
    assert result.returncode == 0, result.stderr[-3000:]
    best = str(tmp_path / "ddp" / "best.safetensors")
    (row,) = read_rows(str(tmp_path / "ddp" / "results.csv"))
    assert row["method"] == "cal+ml-decoder" and read_metadata(best)["head"] == "ml-decoder"
    alone = validate.main(["--checkpoint", best, *validate_flags(tiny_digits)])
    for name in ("map", "map_difficult", "ece"):
        assert float(row[name]) == pytest.approx(alone[name], abs=1e-6), name
    predictor = Predictor.from_checkpoint(best)
    assert predictor.predict(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 2 + len(predictor.class_names))


def validate_flags(data_dir: str, split: str = "test") -> list[str]:
    return ["--data-dir", data_dir, "--digits-trainval", str(TINY_DIGITS["num_trainval"]), "--digits-test",
            str(TINY_DIGITS["num_test"]), "--workers", "0", "--no-progress", "--split", split]


@pytest.fixture(scope="module")
def ema_run(tiny_digits: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    output = str(tmp_path_factory.mktemp("runs"))
    row = train.main(tiny_train_args(tiny_digits, output, "--model-ema", "--experiment", "ema"))
    return os.path.join(output, "ema"), row


@pytest.mark.slow
def test_model_ema_evaluates_both_weights_and_keeps_the_better_as_best(ema_run: tuple[str, dict],
                                                                         tiny_digits: str) -> None:
    run_dir, returned = ema_run
    summary = read_rows(os.path.join(run_dir, "summary.csv"))
    # The first epoch that reached the highest mAP of either weights; the raw weights win a tie.
    value, epoch, weights = max(((float(row[column]), -int(row["epoch"]), weights) for row in summary
                                 for column, weights in (("map", "raw"), ("map_ema", "ema"))),
                                key=lambda candidate: (candidate[0], candidate[1], candidate[2] == "raw"))
    metadata = read_metadata(os.path.join(run_dir, "best.safetensors"))
    assert (metadata["weights"], int(metadata["epoch"])) == (weights, -epoch)
    assert float(metadata["metric_value"]) == pytest.approx(value, abs=1e-9)
    (row,) = read_rows(os.path.join(run_dir, "results.csv"))
    assert row["method"] == "baseline+ema" and row["best_weights"] == weights == returned["best_weights"]
    assert float(row["selection_map"]) == pytest.approx(value, abs=1e-9)  # summary.csv's val mAP of the chosen
    # state/ holds the EMA weights of the last epoch, whose metrics are the last row's *_ema columns.
    ema = os.path.join(run_dir, "state", "ema.safetensors")
    assert read_metadata(ema)["weights"] == "ema"
    ema_alone = validate.main(["--checkpoint", ema, *validate_flags(tiny_digits, "val")])
    for name in ("map", "map_difficult", "ece"):
        assert float(summary[-1][f"{name}_ema"]) == pytest.approx(ema_alone[name], abs=1e-6), name
    assert float(summary[-1]["map_ema"]) != float(summary[-1]["map"])  # other weights than the raw ones


@pytest.mark.slow
def test_best_checkpoint_holds_the_ema_weights_when_they_are_better(tiny_digits: str, tmp_path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = trainer.evaluate_ema
    monkeypatch.setattr(trainer, "evaluate_ema", lambda *args: {**real(*args), "map": 101.0})
    row = train.main(tiny_train_args(tiny_digits, str(tmp_path), "--model-ema", "--experiment", "e", "--epochs",
                                     "1"))
    run_dir = tmp_path / "e"
    assert os.path.samefile(run_dir / "best.safetensors", run_dir / "state" / "ema.safetensors")
    assert read_metadata(str(run_dir / "best.safetensors"))["weights"] == "ema" and row["best_weights"] == "ema"
    assert row["map"] < 100  # the final metrics are measured on best.safetensors, not taken from the epoch


@pytest.mark.slow
def test_a_csv_set_with_unknown_labels_trains_and_reports_a_class_nobody_annotated(tmp_path, capsys) -> None:
    rng = np.random.default_rng(1)
    for index in range(12):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / f"{index}.png")
    (tmp_path / "classes.txt").write_text("cat\ndog\nfish\n")
    # fish is never annotated in train.csv; every third image has no known label at all.
    train_rows = "".join(f"{i}.png,{'' if i % 3 == 0 else i % 2},{'' if i % 3 == 0 else 1 - i % 2},\n"
                         for i in range(12))
    (tmp_path / "train.csv").write_text("image,cat,dog,fish\n" + train_rows)
    (tmp_path / "test.csv").write_text("image,labels,unknown\n" + "".join(
        f"{i}.png,{('cat', 'dog', 'fish')[i % 3]},{'dog' if i % 3 == 0 else ''}\n" for i in range(12)))
    output = tmp_path / "runs"
    for unknown in ("ignore", "negative"):
        train.main(["--dataset", "csv", "--data-dir", str(tmp_path), "--model", "test_resnet", "--img-size", "32",
                    "-b", "4", "--epochs", "1", "--workers", "0", "--warmup-epochs", "0", "--cal", "--output",
                    str(output), "--no-progress", "--experiment", unknown, "--unknown", unknown,
                    "--val-split", "holdout", "--holdout-fraction", "0.25"])
        printed = capsys.readouterr().out
        assert f"no training image has a known label of class(es) fish: --unknown {unknown}" in printed
        (summary,) = read_rows(str(output / unknown / "summary.csv"))
        assert np.isfinite(float(summary["train_loss"]))
        (row,) = read_rows(str(output / unknown / "results.csv"))
        assert float(row["num_images"]) == 12 and np.isfinite(float(row["map"]))
        assert yaml.safe_load((output / unknown / "args.yaml").read_text())["unknown"] == unknown


@pytest.mark.slow
def test_binned_evaluation_chooses_and_reports_from_statistics(tiny_digits: str, tmp_path) -> None:
    """--eval-memory binned: every epoch and the final results from MetricStatistics (reliability.png from its
    bins), the flags kept in args.yaml, and the numbers those of validate.py's binned evaluation."""
    flags = ["--eval-memory", "binned", "--min-positives", "3"]
    row = train.main(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "binned", "--epochs", "1", *flags))
    run_dir = tmp_path / "binned"
    saved = yaml.safe_load((run_dir / "args.yaml").read_text())
    assert (saved["eval_memory"], saved["eval_bins"], saved["min_positives"]) == ("binned", 4096, 3)
    assert (run_dir / "reliability.png").stat().st_size > 0
    (summary,) = read_rows(str(run_dir / "summary.csv"))
    assert float(summary["map"]) == pytest.approx(row["selection_map"])
    alone = validate.main(["--checkpoint", str(run_dir / "best.safetensors"), *validate_flags(tiny_digits), "-b",
                           "16", *flags])
    for name in METRIC_NAMES:
        assert float(row[name]) == pytest.approx(alone[name], rel=0, abs=1e-6, nan_ok=True), name
    assert row["num_classes_few_positives"] > 0 and row["num_images"] == TINY_DIGITS["num_test"]
