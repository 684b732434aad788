import csv

import pytest

from udtimm.config import ConfigError
from udtimm.io import append_csv_row
from udtimm.trainer import check_summary_columns, truncate_summary


def test_truncate_summary_keeps_the_header_and_epochs_up_to_the_resumed_one(tmp_path) -> None:
    path = str(tmp_path / "summary.csv")
    for epoch in range(4):
        append_csv_row(path, {"epoch": epoch, "map": epoch * 10.0})
    truncate_summary(path, 1)
    rows = list(csv.DictReader(open(path)))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert open(path).read().count("epoch,map") == 1


def test_a_resume_whose_objective_writes_other_loss_terms_is_refused_before_training(tmp_path) -> None:
    path = str(tmp_path / "summary.csv")
    check_summary_columns(path, ("kd",))  # no summary yet: nothing to compare
    append_csv_row(path, {"epoch": 0, "lr": 0.1, "train_loss": 1.0, "train_kd": 0.5, "train_kd_cal": 0.5, "map": 50.0})
    check_summary_columns(path, ("kd", "kd_cal"))
    with pytest.raises(ConfigError, match=r"has the loss terms \['train_kd', 'train_kd_cal'\], this run's objective "
                                          r"writes \['train_kd', 'train_kd_cal', 'train_attention'\]"):
        check_summary_columns(path, ("kd", "kd_cal", "attention"))
