"""Measured speeds this machine's runs reuse, kept in the runs folder's calibration.json: one place reads and writes it.

Training throughput per arch (the plan), batched-model and stacked-scoring choices (packs, the attack stage), scoring
throughput (the plan's attack row): each measured once on a few steps, then read back by every later run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xfer import jsonfile

FILE = "calibration.json"


def path() -> Path:
    """The runs folder's calibration file."""
    from xfer import server

    return server.runs_dir() / FILE


def read(where: Path | None) -> dict[str, Any]:
    """Every measurement kept in `where` ({} when there is none, or the file is unreadable)."""
    return jsonfile.read_dict(where)


def remember(where: Path, key: str, entry: dict[str, Any]) -> None:
    """Add one measurement, atomically: read again just before writing (another process may have added its own),
    then replace the file whole."""
    jsonfile.update(where, key, entry)


__all__ = ["FILE", "path", "read", "remember"]
