"""validate.py's binned evaluation (--eval-memory binned): the exact metrics but AP, in one process and in
two, and the outputs that need every score refused naming their size."""

import csv

import pytest
import torch
from conftest import data_flags, run_two_cpu_processes
from test_validate import assert_same_metrics, reference_predictions, trained_groups

import validate
from udtimm.config import ConfigError
from udtimm.metric_statistics import MetricStatistics
from udtimm.metrics import METRIC_NAMES, compute_metrics

BINNED_AP = ("map", "map_difficult", "map_head", "map_medium", "map_tail")


def binned_reference(scores: torch.Tensor, target: torch.Tensor, difficult: torch.Tensor,
                     groups: torch.Tensor) -> dict[str, float]:
    """The binned metrics of these predictions, at --min-positives 4 with the run's class groups, computed without
    validate.py."""
    statistics = MetricStatistics(scores.shape[1], min_positives=4, class_groups=groups)
    statistics.update(scores, target, difficult)
    return statistics.compute()


@pytest.mark.slow
def test_binned_evaluation_gives_the_exact_metrics_in_one_process_and_in_two(best: str, tiny_digits: str, tmp_path,
                                                                           capsys) -> None:
    """validate.py --eval-memory binned gives MetricStatistics' metrics of engine.predict's scores, which are the
    exact ones but for AP (whose accuracy tests/test_metric_statistics.py measures: this 2-epoch model's scores of a
    class differ by a few bins only, so its binned mAP is far from exact), in one process and in two."""
    _, predictions = reference_predictions(best, tiny_digits)
    keep = predictions.difficult.any(dim=1)
    arguments = (predictions.scores, predictions.target, predictions.difficult)
    groups = trained_groups(best)
    expected = compute_metrics(*arguments, min_positives=4, class_groups=groups)
    assert 0 < expected["num_classes_few_positives"] < 10  # --min-positives 4 leaves some classes out
    flags = ["--checkpoint", best, *data_flags(tiny_digits), "--min-positives", "4"]
    assert_same_metrics(validate.main(flags), expected)
    one = validate.main([*flags, "--eval-memory", "binned"])
    assert "from binned statistics (--eval-memory binned, 4096 AP bins per class)" in capsys.readouterr().out
    assert_same_metrics(one, binned_reference(*arguments, groups))
    assert_same_metrics(one, expected, tuple(name for name in METRIC_NAMES if name not in BINNED_AP))
    # 40 images in batches of 16 over 2 processes: the last step repeats images, which must count once.
    results = str(tmp_path / "two.csv")
    result = run_two_cpu_processes("validate.py", *flags, "--eval-memory", "binned", "-b", "16", "--results-file",
                                   results, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    with open(results, newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert_same_metrics(row, one)
    subset = validate.main([*flags, "--eval-memory", "binned", "--subset", "difficult"])
    assert_same_metrics(subset, binned_reference(*(values[keep] for values in arguments), groups))


def test_binned_evaluation_refuses_the_outputs_that_need_every_score_naming_their_size(best: str,
                                                                                      tiny_digits: str) -> None:
    flags = ["--checkpoint", best, *data_flags(tiny_digits), "--eval-memory", "binned"]
    for extra in (["--save-preds", "p.csv"], ["--per-class"], ["--plots", "plots"], ["--calibrate", "temperature"],
                  ["--tune-thresholds", "f1"]):
        with pytest.raises(ConfigError, match=rf"{extra[0]} needs every image's scores, which --eval-memory binned "
                                              r"does not keep here \(digits:test: 40 images x 10 classes x 16 bytes "
                                              r"= 6\.4 kB\)"):
            validate.main([*flags, *extra])
    for flag in ("--min-positives", "--eval-bins"):
        with pytest.raises(ConfigError, match=f"{flag} must be at least 1, got 0"):
            validate.parse_args([*flags, flag, "0"])
