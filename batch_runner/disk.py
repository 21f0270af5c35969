"""Making what was written reach the disk."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder by its path (a folder: the names created or renamed in it).

    Opened for the call: a descriptor kept across a file deleted and made again would sync
    the old one.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
