"""Rule 4: a deleted entry comes back where it was if it holds something the
delete did not see; an entry cut off from ROOT by no delete comes back too."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from crdt.content import Contents
from crdt.ops import ROOT, TRASH
from crdt.tree import Place, Tree

if TYPE_CHECKING:
    from crdt.merge import _Info


class Revival:
    """`Replica`'s revivals (rule 4); see `crdt.merge`."""

    if TYPE_CHECKING:
        _detached: set[bytes]
        _info: dict[bytes, _Info]
        _revived: dict[bytes, Place]
        _revived_into: dict[bytes, set[bytes]]
        _seeds: set[bytes]
        contents: Contents
        revival_checks: int
        tree: Tree

        def _eff_is_ancestor(self, ancestor: bytes, node: bytes) -> bool: ...
        def _eff_place(self, entry: bytes) -> Place | None: ...

    def _is_detached(self, entry: bytes) -> bool:
        """True for a created entry that the tree cuts off from ROOT without a
        delete: one with no place at all (its `Create` and every move of it
        were skipped as cycles: a move into it that sorts before its creation,
        made by a node whose clock could not follow the creator's ahead of
        MAX_FORWARD_MS, can put its own ancestors below it), or one placed in
        a file or symlink (only a faulty peer makes such ops)."""
        if entry in (ROOT, TRASH) or entry not in self._info:
            return False
        place = self.tree.places.get(entry)
        if place is None:
            return True
        parent = self._info.get(place.parent)
        return parent is not None and parent.kind != "dir"

    def _update_detached(self, touched: set[bytes], created: set[bytes]) -> None:
        """Keep `_detached` up to date: it changes only for an entry whose place
        changed or that was created, or a child of one created (its kind)."""
        todo = touched | created
        for entry in created:
            todo.update(self.tree.children.get(entry, ()))
        for entry in todo:
            if self._is_detached(entry):
                self._detached.add(entry)
            else:
                self._detached.discard(entry)

    def _update_seeds(self, changed: set[bytes]) -> bool:
        """Bring `_seeds` up to date for `changed` entries (and the directories
        that hold them: a child's creation makes its directory hold something
        live); True if the set changed."""
        todo = set(changed)
        for entry in changed:
            place = self.tree.places.get(entry)
            if place is not None:
                todo.add(place.parent)
        before = len(self._seeds)
        moved = False
        for entry in todo:
            if entry in (ROOT, TRASH):
                continue
            self.revival_checks += 1
            place = self.tree.places.get(entry)
            if place is not None and place.parent == TRASH and self._holds_live(entry):
                if entry not in self._seeds:
                    self._seeds.add(entry)
                    moved = True
            elif entry in self._seeds:
                self._seeds.discard(entry)
                moved = True
        return moved or len(self._seeds) != before

    def _holds_live(self, entry: bytes) -> bool:
        """A deleted entry that rule 4 brings back: a file with a live head,
        or a directory with a child."""
        return bool(self.contents.live_heads(entry)) or self._has_live_child(entry)

    def _in_trash(self, entry: bytes) -> bool:
        """True if the tree (before revivals) puts `entry` under TRASH."""
        place = self.tree.places.get(entry)
        steps = 0
        while place is not None and steps <= len(self.tree.places):
            if place.parent == TRASH:
                return True
            place = self.tree.places.get(place.parent)
            steps += 1
        return False

    def _trash_relevant(self, ids: set[bytes]) -> bool:
        if self._revived or self._detached:
            return True
        return any(self._in_trash(i) for i in ids if i not in (ROOT, TRASH))

    def _revive(self) -> None:
        """Recompute which deleted entries come back (rule 4), deterministically.

        Detached entries (`_is_detached`) come back first, whatever they hold:
        no delete removed them, so what they hold must stay reachable.
        """
        self._revived = {}
        self._revived_into = {}
        queue = deque(sorted(self._detached))
        queue += sorted(self._seeds)
        seen: set[bytes] = set()
        while queue:
            entry = queue.popleft()
            if entry in seen:
                continue
            seen.add(entry)
            self.revival_checks += 1
            old: Place | None
            if entry in self._detached:
                old = self._place_of_detached(entry)
            else:
                old = self._place_before_trash(entry)
            if old is None:
                place = self.tree.places[entry]
                old = Place(ROOT, place.name, place.hlc)
            if self._eff_is_ancestor(entry, old.parent):
                old = Place(ROOT, old.name, old.hlc)
            self._revived[entry] = old
            self._revived_into.setdefault(old.parent, set()).add(entry)
            # the directory it returns to must itself be live
            holder = self._trash_holder(old.parent)
            if holder is not None and holder not in self._revived:
                queue.append(holder)

    def _place_of_detached(self, entry: bytes) -> Place:
        """Where a detached entry comes back: where its first `Create` put it
        if that is a directory outside its own subtree and the trash, else ROOT."""
        place = self.tree.places.get(entry)
        if place is None:
            info = self._info[entry]
            logged = self.tree.logged(info.hlc)
            name = logged.move.name if logged is not None else entry.hex().encode()
            place = Place(logged.move.parent if logged is not None else ROOT, name, info.hlc)
        parent = self._info.get(place.parent)
        if place.parent == TRASH or (parent is not None and parent.kind != "dir"):
            return Place(ROOT, place.name, place.hlc)
        return place

    def _place_before_trash(self, entry: bytes) -> Place | None:
        """Where `entry` was before the moves that keep it in TRASH: a file
        deleted, brought back by rule 4 (still in TRASH in the tree) and deleted
        again returns to where it was shown, not to ROOT."""
        logged = self.tree.current(entry)
        old = logged.old if logged is not None else None
        while old is not None and old.parent == TRASH:
            logged = self.tree.logged(old.hlc)
            old = logged.old if logged is not None else None
        return old

    def _has_live_child(self, entry: bytes) -> bool:
        return any(c in self._info for c in self.tree.children.get(entry, ()))

    def _trash_holder(self, entry: bytes) -> bytes | None:
        """The direct child of TRASH that (effectively) holds `entry`, if any."""
        cur = entry
        steps = 0
        while steps <= len(self.tree.places) + 1:
            if cur in (ROOT, TRASH) or (cur in self._detached and cur not in self._revived):
                return None  # a detached entry comes back anyway
            place = self._eff_place(cur)
            if place is None:
                return None
            if place.parent == TRASH:
                return cur
            cur = place.parent
            steps += 1
        return None
