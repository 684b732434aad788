"""Where a run came from: the git commit of this checkout (and whether its tree had uncommitted changes), and the
data a checkpoint was trained on."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

from udtimm.data import DataSource
from udtimm.settings import DataSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNKNOWN = "unknown"  # not a git checkout (an installed copy), or no git on the machine


def _git(*arguments: str) -> str | None:
    try:
        done = subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def source_state() -> dict[str, str]:
    """results.csv's `commit` (HEAD of udtimm's checkout) and `dirty` ("yes" when a tracked or new, unignored
    file differs from it, so the commit alone does not say what ran; "no"; or "unknown")."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": UNKNOWN, "dirty": UNKNOWN}
    status = _git("status", "--porcelain")
    dirty = UNKNOWN if status is None else ("yes" if status.strip() else "no")
    return {"commit": commit.strip(), "dirty": dirty}


def file_sha256(path: str) -> str:
    """The hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance_record(data: DataSettings) -> dict[str, object]:
    """The checkpoint's `provenance` entry: the data it was trained on (the dataset with its options, the training
    split and the held-out images, the labels hidden) and the code (commit, dirty)."""
    return {"dataset": data.source.name, "options": data.source.options, "files": label_files(data.source),
            "train_split": data.train_split, "val_split": data.val_split,
            "holdout_fraction": data.holdout_fraction, "holdout_seed": data.holdout_seed,
            "drop_labels": data.drop_labels, "drop_labels_seed": data.drop_labels_seed, **source_state()}


def label_files(source: DataSource) -> dict[str, str]:
    """The sha256 of a CSV set's label files (`<root>/*.csv`, classes.txt) by name: a set edited after training
    evaluates as another one. Other formats: {} (their annotations are releases that do not change)."""
    if source.name != "csv" or not source.root or not os.path.isdir(source.root):
        return {}
    return {name: file_sha256(os.path.join(source.root, name)) for name in sorted(os.listdir(source.root))
            if name.endswith(".csv") or name == "classes.txt"}


def data_variant_mismatch(checkpoint: str, metadata: dict[str, str], source: DataSource) -> str | None:
    """A line naming both when `source` is the checkpoint's dataset with other options than it was trained on
    (digits without --digits-ambiguous, say); None when they agree or the checkpoint predates the record."""
    if "provenance" not in metadata:
        return None
    trained = json.loads(metadata["provenance"])
    if trained["dataset"] != source.name:
        return None
    now = label_files(source)
    edited = sorted(name for name, digest in trained.get("files", {}).items() if name in now and now[name] != digest)
    if edited:
        return f"{checkpoint} was trained on other contents of {', '.join(edited)} (their sha256 changed since)"
    if trained["options"] == source.options:
        return None
    differ = sorted(key for key in {**trained["options"], **source.options}
                    if trained["options"].get(key) != source.options.get(key))
    return (f"{checkpoint} was trained on {source.name} with " + ", ".join(
        f"{key}={trained['options'].get(key)!r}" for key in differ) + "; evaluated here with " + ", ".join(
        f"{key}={source.options.get(key)!r}" for key in differ) + " (another variant of the data)")
