"""Rule 3: a file with several live content heads shows the newest; each
other head appears beside it as a conflict copy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from crdt.clock import Hlc
from crdt.content import Contents
from crdt.names import conflict_copy_id


@dataclass(frozen=True, slots=True)
class _Copy:
    file: bytes
    version: Hlc


class Copies:
    """`Replica`'s conflict copies (rule 3); see `crdt.merge`."""

    if TYPE_CHECKING:
        _copies: dict[bytes, _Copy]
        _copies_of: dict[bytes, tuple[bytes, ...]]
        contents: Contents

    def _refresh_copies(self, file: bytes) -> tuple[bytes, ...]:
        """Recompute a file's conflict copies; return the old and new copy ids."""
        old = self._copies_of.pop(file, ())
        for cid in old:
            self._copies.pop(cid, None)
        live = self.contents.live_heads(file)
        new: tuple[bytes, ...] = ()
        if len(live) > 1:
            new = tuple(conflict_copy_id(file, v) for v in live[1:])
            for cid, v in zip(new, live[1:], strict=True):
                self._copies[cid] = _Copy(file, v)
            self._copies_of[file] = new
        return old + new

    def conflict_source(self, entry: bytes) -> tuple[bytes, Hlc] | None:
        copy = self._copies.get(entry)
        return (copy.file, copy.version) if copy is not None else None

    def conflict_copies(self) -> dict[bytes, tuple[bytes, Hlc]]:
        """Every conflict copy shown now -> (its file, the version it shows)."""
        return {copy: (c.file, c.version) for copy, c in self._copies.items()}
