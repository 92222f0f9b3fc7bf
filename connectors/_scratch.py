"""Throw-away copies of a connector's bookkeeping files (``ScratchCopyable``)."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from pathlib import Path

__all__ = ["copy_file"]


def copy_file(original: Path, copy: Path) -> None:
    """Copy a file; a SQLite database through the backup API (consistent while in use).

    The original is only read (a database is opened read-only); a database the backup
    API cannot read is copied file by file, with its ``-wal`` and ``-shm`` companions.
    """
    if original.suffix != ".db":
        shutil.copy2(original, copy)
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{original}?mode=ro", uri=True)) as src, \
                contextlib.closing(sqlite3.connect(copy)) as dst:
            src.backup(dst)
    except sqlite3.Error:
        for suffix in ("", "-wal", "-shm"):
            part = original.with_name(original.name + suffix)
            if part.exists():
                shutil.copy2(part, copy.with_name(copy.name + suffix))
