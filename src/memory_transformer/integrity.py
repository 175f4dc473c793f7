"""Integrity of saved folders: the COMPLETE marker that a folder written atomically ends with records the sha256
of every file in it, and `verify_folder` checks them before anything is loaded (a flipped byte is an error
naming the file, not a silently different model)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from memory_transformer.config import ConfigError

COMPLETE = "COMPLETE"


def checksums(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_folder(folder: Path) -> None:
    """Check every file listed in the folder's COMPLETE marker against its sha256. A folder without a marker,
    or with one written before checksums were recorded, passes unchecked."""
    folder = Path(folder)
    marker = folder / COMPLETE
    sums = json.loads(marker.read_text()).get("sha256", {}) if marker.is_file() else {}
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            raise ConfigError("", f"{path}: missing (listed in {marker}); the checkpoint is damaged")
        if sha256(path) != expected:
            raise ConfigError("", f"{path}: checksum mismatch (sha256 differs from {marker}); the file is corrupt")
