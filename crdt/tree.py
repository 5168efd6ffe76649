"""The replicated tree: moves applied in clock order, after Kleppmann et al. (2021).

Invariant: `Tree` always equals the result of applying every move it holds in
increasing `Hlc` order to an empty tree, skipping each move that would make an
entry its own ancestor. Moves that arrive late are placed by undoing the later
ones, applying the late move, and redoing them (`apply`). Hence any two trees
holding the same set of moves are equal, whatever order the moves came in, and
the parent relation is always a forest without cycles.

The functions mirror the paper's Isabelle theory: `do_op` records the old place
in a `LogMove` (and skips cycles), `undo_op` restores it, `redo_op` re-applies.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter

from crdt.clock import Hlc
from crdt.ops import ROOT, TRASH


@dataclass(frozen=True, slots=True, order=True)
class TreeMove:
    """Put `child` in `parent` under `name` (creation is the first move of a child)."""

    hlc: Hlc
    child: bytes
    parent: bytes
    name: bytes


@dataclass(frozen=True, slots=True)
class Place:
    """Where a child is, and the stamp of the move that put it there."""

    parent: bytes
    name: bytes
    hlc: Hlc


@dataclass(frozen=True, slots=True)
class LogMove:
    """A move as applied: the child's place before it, and whether it was skipped."""

    move: TreeMove
    old: Place | None
    applied: bool


# The order of `TreeMove` as a key, compared in C: sorting a batch of moves
# with the dataclass's own `__lt__` cost a million Python calls per 100,000
# files replayed.
_MOVE_ORDER = attrgetter("hlc", "child", "parent", "name")


class Tree:
    """Mutable move-op tree; see the module docstring for its invariant."""

    def __init__(self) -> None:
        self.places: dict[bytes, Place] = {}
        # Each directory's children as the keys of a dict: a third smaller
        # than a set of the same size (4.7 vs 8.4 KB for 100).
        self.children: dict[bytes, dict[bytes, None]] = {}
        self.log: list[LogMove] = []
        # Stamps of the applied moves that brought a child into or took one out
        # of each directory (its mtime follows them), with their maximum.
        self.events: dict[bytes, set[Hlc]] = {}
        self._latest: dict[bytes, Hlc] = {}

    # -- queries -----------------------------------------------------------
    def parent(self, child: bytes) -> bytes | None:
        place = self.places.get(child)
        return place.parent if place is not None else None

    def is_ancestor(self, ancestor: bytes, node: bytes) -> bool:
        """True if `ancestor` is a strict ancestor of `node`."""
        place = self.places.get(node)
        steps = 0
        while place is not None:
            if place.parent == ancestor:
                return True
            place = self.places.get(place.parent)
            steps += 1
            if steps > len(self.places):  # impossible while the invariant holds
                raise AssertionError("cycle in tree")
        return False

    def last_move(self) -> Hlc | None:
        return self.log[-1].move.hlc if self.log else None

    # -- the three primitives ---------------------------------------------
    def do_op(self, move: TreeMove) -> LogMove:
        old = self.places.get(move.child)
        skip = (
            move.child in (ROOT, TRASH)
            or move.child == move.parent
            or self.is_ancestor(move.child, move.parent)
        )
        if skip:
            return LogMove(move, old, applied=False)
        if old is not None:
            self.children[old.parent].pop(move.child, None)
            self._add_event(old.parent, move.hlc)
        self.places[move.child] = Place(move.parent, move.name, move.hlc)
        self.children.setdefault(move.parent, {})[move.child] = None
        self._add_event(move.parent, move.hlc)
        return LogMove(move, old, applied=True)

    def _add_event(self, parent: bytes, hlc: Hlc) -> None:
        self.events.setdefault(parent, set()).add(hlc)
        latest = self._latest.get(parent)
        if latest is None or hlc > latest:
            self._latest[parent] = hlc

    def _drop_event(self, parent: bytes, hlc: Hlc) -> None:
        events = self.events.get(parent)
        if events is None:
            return
        events.discard(hlc)
        if self._latest.get(parent) == hlc:
            if events:
                self._latest[parent] = max(events)
            else:
                del self._latest[parent]

    def latest_event(self, parent: bytes) -> Hlc | None:
        """The newest applied move into or out of `parent`."""
        return self._latest.get(parent)

    def undo_op(self, entry: LogMove) -> None:
        if not entry.applied:
            return
        move = entry.move
        self.children[move.parent].pop(move.child, None)
        self._drop_event(move.parent, move.hlc)
        if entry.old is None:
            del self.places[move.child]
        else:
            self.places[move.child] = entry.old
            self.children.setdefault(entry.old.parent, {})[move.child] = None
            self._drop_event(entry.old.parent, move.hlc)

    def redo_op(self, entry: LogMove) -> LogMove:
        return self.do_op(entry.move)

    # -- applying a batch ------------------------------------------------------
    def apply(self, moves: Iterable[TreeMove]) -> set[bytes]:
        """Apply moves (any order, duplicates ignored); return every id whose
        place changed or that gained or lost a child."""
        batch = sorted(set(moves), key=_MOVE_ORDER)
        if not batch:
            return set()
        touched: set[bytes] = set()
        start = len(self.log)
        if self.log and batch[0].hlc <= self.log[-1].move.hlc:
            start = bisect.bisect_left(self.log, batch[0].hlc, key=lambda e: e.move.hlc)
        undone = self.log[start:]
        del self.log[start:]
        for entry in reversed(undone):
            self.undo_op(entry)
            self._touch(entry, touched)
        pending: Iterable[TreeMove] = batch
        if undone:
            # Both runs are already in order: merge them rather than sort again.
            known = {e.move.hlc for e in undone}
            pending = heapq.merge(
                [e.move for e in undone], [m for m in batch if m.hlc not in known], key=_MOVE_ORDER
            )
        last: Hlc | None = None
        for move in pending:
            if move.hlc == last:
                continue  # the same stamp twice is the same operation
            last = move.hlc
            entry = self.do_op(move)
            self.log.append(entry)
            self._touch(entry, touched)
        return touched

    @staticmethod
    def _touch(entry: LogMove, touched: set[bytes]) -> None:
        if entry.applied:
            touched.add(entry.move.child)
            touched.add(entry.move.parent)
            if entry.old is not None:
                touched.add(entry.old.parent)

    def contains(self, hlc: Hlc) -> bool:
        i = bisect.bisect_left(self.log, hlc, key=lambda e: e.move.hlc)
        return i < len(self.log) and self.log[i].move.hlc == hlc

    def logged(self, hlc: Hlc) -> LogMove | None:
        """The log entry of the move stamped `hlc`, if held."""
        i = bisect.bisect_left(self.log, hlc, key=lambda e: e.move.hlc)
        return self.log[i] if i < len(self.log) and self.log[i].move.hlc == hlc else None

    def current(self, child: bytes) -> LogMove | None:
        """The applied log entry that put `child` where it is now."""
        place = self.places.get(child)
        if place is None:
            return None
        entry = self.logged(place.hlc)
        assert entry is not None and entry.applied
        return entry
