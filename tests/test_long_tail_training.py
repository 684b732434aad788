"""The long-tail losses end to end: train.py on a long-tailed digits set with the calibration branch and unknown
labels, in one process and in two; the counts and the group columns a run writes."""

import json
import os

import pytest
from conftest import read_rows, run_two_cpu_processes, tiny_train_args

import train
import validate
from udtimm.checkpoint import read_metadata
from udtimm.class_counts import ClassCounts, checkpoint_counts
from udtimm.data import build_dataset
from udtimm.data.base import drop_labels

# 96 training images: VOC-LT's thresholds scaled to them (8.4 and 1.7 positives) would leave the tail empty.
LONG_TAIL = ("--digits-long-tail", "10", "--cal", "--drop-labels", "0.3", "--epochs", "1", "--class-groups", "20", "6")


@pytest.fixture(scope="module")
def long_tail_digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny digits set with its trainval split long-tailed (its own folder: the marker names the ratio)."""
    from udtimm.data.digits import ensure_digits

    root = str(tmp_path_factory.mktemp("data") / "digits-lt")
    ensure_digits(root, num_trainval=96, num_test=40, long_tail=10.0)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["db", "db-focal", "cb-bce", "cb-focal", "two-way"])
def test_every_long_tail_loss_trains_with_the_calibration_branch_and_unknown_labels(loss: str, long_tail_digits: str,
                                                                                   tmp_path) -> None:
    row = train.main(tiny_train_args(long_tail_digits, str(tmp_path), "--experiment", loss, "--loss", loss,
                                     *LONG_TAIL))
    run_dir = tmp_path / loss
    assert row["method"] == f"{loss}+cal+drop30"
    summary = read_rows(str(run_dir / "summary.csv"))[0]
    assert float(summary[f"train_{loss}"]) > 0 and float(summary["train_partial_softmax"]) > 0
    counts = read_rows(str(run_dir / "class_counts.csv"))
    assert [int(line["positives"]) for line in counts][0] > 4 * [int(line["positives"]) for line in counts][-1]
    assert any(line["annotated"] != "96" for line in counts)  # the dropped labels are known in fewer images
    assert {line["group"] for line in counts} == {"head", "medium", "tail"}
    assert all(0 <= row[name] <= 100 for name in ("map_head", "map_medium", "map_tail"))


@pytest.mark.slow
def test_two_processes_count_the_classes_as_one_does_and_validate_repeats_their_metrics(long_tail_digits: str,
                                                                                       tmp_path) -> None:
    result = run_two_cpu_processes("train.py", *tiny_train_args(long_tail_digits, str(tmp_path), "--experiment",
                                                                "ddp", "--loss", "db-focal", *LONG_TAIL))
    assert result.returncode == 0, result.stderr[-3000:]
    best = str(tmp_path / "ddp" / "best.safetensors")
    dataset = drop_labels(build_dataset("digits", long_tail_digits, "trainval", num_trainval=96, num_test=40,
                                        long_tail=10.0), 0.3, 0)
    counts, groups = checkpoint_counts(read_metadata(best))
    assert counts == ClassCounts.of(dataset, "positive")  # every image of the split counted once
    assert json.loads(read_metadata(best)["class_groups"]) == [20.0, 6.0]
    (row,) = read_rows(str(tmp_path / "ddp" / "results.csv"))
    alone = validate.main(["--checkpoint", best, "--data-dir", long_tail_digits, "--digits-trainval", "96",
                           "--digits-test", "40", "--digits-long-tail", "10", "--workers", "0", "--no-progress"])
    for name in ("map", "map_head", "map_medium", "map_tail", "ece"):
        assert float(row[name]) == pytest.approx(alone[name], abs=1e-6), name
    assert os.path.isfile(tmp_path / "ddp" / "class_counts.csv") and groups.shape == (10,)
