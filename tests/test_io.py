import csv
import os

import pytest

from udtimm.io import append_csv_row, atomic_write_text, check_writable


def test_atomic_write_replaces_whole_file(tmp_path) -> None:
    path = str(tmp_path / "a.txt")
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert open(path).read() == "two" and os.listdir(tmp_path) == ["a.txt"]


def test_atomically_written_files_get_the_usual_permissions(tmp_path) -> None:
    path = str(tmp_path / "a.txt")
    atomic_write_text(path, "x")
    plain = str(tmp_path / "b.txt")
    open(plain, "w").close()
    assert os.stat(path).st_mode & 0o777 == os.stat(plain).st_mode & 0o777


def test_append_csv_row_writes_header_once(tmp_path) -> None:
    path = str(tmp_path / "r.csv")
    append_csv_row(path, {"a": 1, "b": "x,y"})
    append_csv_row(path, {"a": 2, "b": "z"})
    rows = list(csv.DictReader(open(path)))
    assert rows == [{"a": "1", "b": "x,y"}, {"a": "2", "b": "z"}]


def test_append_csv_row_adds_a_new_column_to_an_older_file(tmp_path) -> None:
    path = str(tmp_path / "summary.csv")
    append_csv_row(path, {"epoch": 0, "map": 50.0})
    append_csv_row(path, {"epoch": 1, "map": 60.0, "num_classes_few_positives": 0})  # a column added since
    assert (tmp_path / "summary.csv").read_text() == \
        "epoch,map,num_classes_few_positives\n0,50.0,\n1,60.0,0\n"


def test_append_csv_row_refuses_other_columns(tmp_path) -> None:
    path = str(tmp_path / "r.csv")
    append_csv_row(path, {"a": 1})
    with pytest.raises(ValueError, match="columns"):
        append_csv_row(path, {"b": 1})


def test_unwritable_output_directory_is_reported_before_any_work(tmp_path, monkeypatch) -> None:
    # Tests run as root, which ignores permission bits, so the refusal is simulated where it happens.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("udtimm.io.tempfile.mkstemp", refuse)
    with pytest.raises(OSError, match="not writable"):
        check_writable(str(tmp_path / "run"))


def test_output_path_that_is_a_file_is_reported(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        check_writable(str(blocker / "run"))
