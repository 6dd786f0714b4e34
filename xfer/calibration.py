"""Measured speeds this machine's runs reuse, kept in the runs folder's calibration.json: one place reads and writes it.

Training throughput per arch (the plan), batched-model and stacked-scoring choices (packs, the attack stage), scoring
throughput (the plan's attack row): each measured once on a few steps, then read back by every later run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FILE = "calibration.json"


def path() -> Path:
    """The runs folder's calibration file."""
    from xfer import server

    return server.runs_dir() / FILE


def read(where: Path | None) -> dict[str, Any]:
    """Every measurement kept in `where` ({} when there is none, or the file is unreadable)."""
    if where is None:
        return {}
    try:
        known = json.loads(Path(where).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return known if isinstance(known, dict) else {}


def remember(where: Path, key: str, entry: dict[str, Any]) -> None:
    """Add one measurement, atomically: read again just before writing (another process may have added its own),
    then replace the file whole."""
    where = Path(where)
    known = read(where)
    known[key] = entry
    where.parent.mkdir(parents=True, exist_ok=True)
    partial = where.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps(known, indent=2, sort_keys=True))
    partial.replace(where)


__all__ = ["FILE", "path", "read", "remember"]
