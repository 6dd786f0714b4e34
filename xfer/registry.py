"""One named table of plug-ins, as timm keeps its models: datasets (`xfer.data`), architectures (`xfer.models`) and
attacks (`xfer.attack`) are each a `Registry` their decorators fill, so a name taken twice and an unknown name are
refused the same way, in words that list the known names."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from xfer.errors import XferError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name. `kind` names an entry in messages ("architecture"); `plural` the known ones; `entry` what a
    caller registers ("the architecture", "the loader"); `short` the kind in "NAME is taken" (default `kind`)."""

    def __init__(self, kind: str, plural: str, entry: str, short: str | None = None) -> None:
        self.kind, self.plural, self.entry, self.short = kind, plural, entry, short or kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, value: T) -> None:
        """Register `value` under `name`; a name already taken is refused (two plug-ins would shadow each other)."""
        if name in self._entries:
            self.refuse_taken(name)
        self._entries[name] = value

    def refuse_taken(self, name: str) -> None:
        raise XferError(f"{self.short} name {name!r} is already taken; register {self.entry} under another name.")

    def get(self, name: str, known: list[str] | None = None, also: str = "") -> T:
        """The entry of `name`; an unknown name is refused listing `known` (default: the registered names) and
        `also`, what else the caller accepts."""
        if name not in self._entries:
            listed = ", ".join(known if known is not None else self.names())
            raise XferError(f"unknown {self.kind} {name!r}; known {self.plural} are {listed}{also}.")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


__all__ = ["Registry"]
