"""Small JSON files that several processes read and write: the one way xfer reads and replaces them.

A reader never sees half a file: a writer writes a sibling named for its process, then renames it over the file
(atomic on one file system). A file that is missing or unreadable reads as `default`, since each of these files
is a cache or a pointer that its writer can make again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read(path: Path | str | None, default: Any = None) -> Any:
    """The file's JSON value; `default` when there is no path, no file, or no valid JSON in it."""
    if path is None:
        return default
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return default


def read_dict(path: Path | str | None) -> dict[str, Any]:
    """The file's JSON object ({} when it is missing, unreadable or not an object)."""
    value = read(path, {})
    return value if isinstance(value, dict) else {}


def write(path: Path | str, value: Any, indent: int = 2, sort_keys: bool = False) -> None:
    """Replace the file with `value`, whole: a process-named sibling, then a rename; its folder is made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(value, indent=indent, sort_keys=sort_keys))
    partial.replace(path)


def update(path: Path | str, key: str, entry: Any, indent: int = 2) -> dict[str, Any]:
    """Add or replace one entry of a JSON object file: read again just before writing (another process may have
    added its own), then replace the file whole. Returns the object written."""
    known = read_dict(path)
    known[key] = entry
    write(path, known, indent=indent, sort_keys=True)
    return known


__all__ = ["read", "read_dict", "write", "update"]
