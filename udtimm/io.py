"""Crash-safe file writes: a file is replaced by a complete new one or left as it was."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then rename it over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp_path: str) -> None:
        with open(tmp_path, "w") as handle:
            handle.write(text)

    atomic_write(path, write)


def csv_line(values: Sequence[object]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def append_csv_row(path: str, row: Mapping[str, object]) -> None:
    """Append one row (the header first if the file is new) in a single write, so a crash leaves no half row.

    A file written by an older udtimm, whose columns the row only adds to (a new metric), is rewritten first with
    those columns empty in its rows, so that resuming an older run goes on; any other difference is an error
    rather than a silently misaligned table.
    """
    columns = list(row)
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as handle:
            header, *rows = list(csv.reader(handle))
        if header != columns and not set(header) < set(columns):
            raise ValueError(f"{path} has columns {header}, this row has {columns}: use another --results-file")
        if header != columns:
            old = [dict(zip(header, cells, strict=True)) for cells in rows]
            atomic_write_text(path, "".join(csv_line(line) for line in
                                            [columns, *([cells.get(c, "") for c in columns] for cells in old)]))
        text = csv_line([row[c] for c in columns])
    else:
        text = csv_line(columns) + csv_line([row[c] for c in columns])
    with open(path, "a") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def check_writable(directory: str) -> None:
    """Fail at the start, not after the first epoch, when the output directory cannot be written."""
    try:
        # Inside the try: a --output that is a regular file fails here, in makedirs.
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=directory)
    except OSError as err:
        raise OSError(f"output directory {directory} is not writable: {err.strerror}") from err
    os.close(fd)
    os.remove(probe)


def read_text(path: str) -> str:
    with open(path) as handle:
        return handle.read()
