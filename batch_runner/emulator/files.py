"""The input/output/temp folders and the real server's file naming rules."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

FOLDER_TYPES = ("input", "temp", "output")
_ANNOTATION = re.compile(r"^(?P<name>.*) \[(?P<kind>input|output|temp)\]$")


class UnsafePath(Exception):
    """A name or subfolder that points outside its folder."""


def inside(base: Path, candidate: Path) -> bool:
    base_abs = os.path.abspath(base)
    return os.path.commonpath((base_abs, os.path.abspath(candidate))) == base_abs


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Folders:
    root: Path
    # Next counter per (folder, prefix), learnt by one scan per prefix so that saving stays
    # O(1) however many files the folder holds.
    _counters: dict[tuple[Path, str], int] = field(default_factory=dict)
    # Content hash per path with the (size, mtime) it was computed for, so that LoadImage's
    # cache key does not re-read unchanged files.
    _hashes: dict[str, tuple[int, int, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind in FOLDER_TYPES:
            self.dir(kind).mkdir(parents=True, exist_ok=True)

    def dir(self, kind: str) -> Path:
        return self.root / kind

    def forget_counters(self) -> None:
        """A restarted server rescans the folders."""
        self._counters.clear()
        self._hashes.clear()

    def resolve_annotated(self, name: str) -> Path:
        """LoadImage's name forms: bare, `sub/name`, optionally suffixed ` [input|temp|output]`."""
        kind = "input"
        match = _ANNOTATION.match(name)
        if match:
            name, kind = match["name"], match["kind"]
        base = self.dir(kind)
        path = base / name
        if not inside(base, path):
            raise UnsafePath(name)
        return path

    def content_hash(self, path: Path) -> str:
        stat = path.stat()
        known = self._hashes.get(str(path))
        if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
            return known[2]
        digest = sha256_file(path)
        if len(self._hashes) > 4096:
            self._hashes.clear()
        self._hashes[str(path)] = (stat.st_size, stat.st_mtime_ns, digest)
        return digest

    def store_upload(
        self, data: bytes, filename: str, subfolder: str, kind: str, overwrite: bool
    ) -> str:
        """Store an upload under the real server's naming rules; returns the stored name."""
        base = self.dir(kind)
        folder = base / os.path.normpath(subfolder) if subfolder else base
        target = folder / filename
        if not inside(base, folder) or not inside(base, target):
            raise UnsafePath(filename)
        if "/" in filename or "\\" in filename:
            raise ValueError(f"file name with a folder part: {filename!r}")
        folder.mkdir(parents=True, exist_ok=True)
        if not overwrite:
            stem, ext = os.path.splitext(filename)
            digest = hashlib.sha256(data).hexdigest()
            number = 1
            while target.exists():
                if sha256_file(target) == digest:
                    return target.name
                target = folder / f"{stem} ({number}){ext}"
                number += 1
        target.write_bytes(data)
        # A rewrite within one mtime tick must not keep serving the old hash.
        self._hashes.pop(str(target), None)
        return target.name

    def output_path(self, filename_prefix: str, extension: str) -> tuple[Path, str, str]:
        """Next `<prefix>_<counter:05>_.<ext>` for a save node: (path, file name, subfolder)."""
        base = self.dir("output")
        subfolder, prefix = os.path.split(os.path.normpath(filename_prefix))
        folder = base / subfolder
        if not inside(base, folder):
            raise UnsafePath("Saving image outside the output folder is not allowed.")
        folder.mkdir(parents=True, exist_ok=True)
        key = (folder, prefix)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._scan_counter(folder, prefix) + 1
        self._counters[key] = counter + 1
        name = f"{prefix}_{counter:05}_.{extension}"
        return folder / name, name, subfolder

    @staticmethod
    def _scan_counter(folder: Path, prefix: str) -> int:
        pattern = re.compile(re.escape(prefix) + r"_(\d+)_")
        highest = 0
        for entry in folder.iterdir():
            match = pattern.match(entry.name)
            if match:
                highest = max(highest, int(match.group(1)))
        return highest
