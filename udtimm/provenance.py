"""Where a run's code came from: the git commit of this checkout, and whether its tree had uncommitted changes."""

from __future__ import annotations

import hashlib
import os
import subprocess

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
