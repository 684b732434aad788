import csv

from udtimm.io import append_csv_row
from udtimm.trainer import truncate_summary


def test_truncate_summary_keeps_the_header_and_epochs_up_to_the_resumed_one(tmp_path) -> None:
    path = str(tmp_path / "summary.csv")
    for epoch in range(4):
        append_csv_row(path, {"epoch": epoch, "map": epoch * 10.0})
    truncate_summary(path, 1)
    rows = list(csv.DictReader(open(path)))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert open(path).read().count("epoch,map") == 1
