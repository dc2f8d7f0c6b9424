"""Errors that are the user's to fix: the command line shows them as one line and exits with 2."""

from __future__ import annotations

import os
from pathlib import Path


class UsageError(Exception):
    """Bad input (a config, a path, a model folder, a data source); the message says how to fix it."""


class DataError(UsageError):
    """A data source that yields no usable clip."""


class ModelFolderError(UsageError):
    """A folder that is not a saved vidmoe model."""


def check_writable_dir(path: str | Path, what: str) -> None:
    """UsageError unless ``path`` is, or can be created as, a folder we may write to (creates nothing).

    Commands call it before their slow part, so a bad output path fails at once, not after the work.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot write {what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {what} {path}: no write permission in {existing}")
