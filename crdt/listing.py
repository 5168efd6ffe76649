"""Rule 2: one directory's listing, kept up to date child by child, and the
names it shows for entries that share a name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from crdt.clock import Hlc
from crdt.copies import _Copy
from crdt.names import _suffixed, conflict_name
from crdt.ops import ENTRY_ID_BYTES, ROOT, TRASH, Kind
from crdt.tree import Place, Tree

if TYPE_CHECKING:
    from crdt.merge import _Info


@dataclass(slots=True)
class _Listing:
    """One directory's entries, kept up to date child by child.

    `groups` holds, per name, every entry placed under it as (placed stamp,
    id), each once; rule 2 turns a group into shown names, so a change to one
    child only renames within its group. A group is a tuple, not a set: almost
    every group has one member, and a tuple of one is a fifth of a set's size.
    """

    groups: dict[bytes, tuple[tuple[Hlc, bytes], ...]] = field(default_factory=dict)
    by_name: dict[bytes, bytes] = field(default_factory=dict)
    names: dict[bytes, bytes] = field(default_factory=dict)  # child id -> shown name
    raw: dict[bytes, bytes] = field(default_factory=dict)  # child id -> its name
    # name -> the groups that gave up a suffixed name because a group of that
    # name exists: renamed again when it goes, so names never depend on what
    # was listed before (a fresh replica never saw it).
    avoided: dict[bytes, set[bytes]] = field(default_factory=dict)
    subdirs: int = 0


class Listings:
    """`Replica`'s listings (rule 2); see `crdt.merge`."""

    if TYPE_CHECKING:
        _copies: dict[bytes, _Copy]
        _copies_of: dict[bytes, tuple[bytes, ...]]
        _detached: set[bytes]
        _info: dict[bytes, _Info]
        _listed_in: dict[bytes, bytes]
        _lists: dict[bytes, _Listing]
        _members: dict[bytes, tuple[Hlc, str]]
        _names_changed: set[tuple[bytes, bytes]]
        _raced: set[tuple[bytes, bytes]]
        _revived: dict[bytes, Place]
        tree: Tree

        def _content_stamp(self, entry: bytes) -> Hlc: ...
        def _eff_place(self, entry: bytes) -> Place | None: ...
        def _is_file(self, entry: bytes) -> bool: ...
        def kind(self, entry: bytes) -> Kind | None: ...

    # -- listings ----------------------------------------------------------------
    def _wanted(self, child: bytes) -> tuple[bytes, bytes, Hlc] | None:
        """Where `child` (an entry or a conflict copy) belongs: (dir, name, stamp)."""
        copy = self._copies.get(child)
        if copy is not None:
            file_place = self._wanted(copy.file)
            if file_place is None:
                return None
            v = copy.version
            node_name = self._members.get(v.node, (v, v.node[:4].hex()))[1]
            return file_place[0], conflict_name(file_place[1], node_name, v), v
        if child not in self._info:
            return None
        place = self._eff_place(child)
        if place is None or place.parent == TRASH:
            return None
        return place.parent, place.name, place.hlc

    def _relist(self, children: set[bytes]) -> set[bytes]:
        """Bring every listing up to date for `children` (and their conflict copies);
        return the directories whose listing changed."""
        todo = set(children)
        for child in children:
            todo.update(self._copies_of.get(child, ()))
        dirty: set[tuple[bytes, bytes]] = set()
        recheck: set[tuple[bytes, bytes]] = set()  # names may change, members did not
        for child in todo:
            if child in (ROOT, TRASH):
                continue
            want = self._wanted(child)
            where = self._listed_in.get(child)
            if where is not None:
                listing = self._lists[where]
                raw = listing.raw[child]
                if want is not None and want[0] == where and want[1] == raw:
                    group = listing.groups[raw]
                    if (want[2], child) in group:
                        if len(group) > 1:
                            # who keeps the name may follow content (`_racing`)
                            recheck.add((where, raw))
                        continue
                self._unlist(child, where, dirty)
            if want is not None:
                parent, name, hlc = want
                listing = self._lists.setdefault(parent, _Listing())
                # not in the group: `_unlist` took it out, or it was nowhere
                listing.groups[name] = (*listing.groups.get(name, ()), (hlc, child))
                listing.raw[child] = name
                self._listed_in[child] = parent
                if self.kind(child) == "dir":
                    listing.subdirs += 1
                dirty.add((parent, name))
                owner = listing.by_name.get(name)
                if owner is not None and listing.raw.get(owner) != name:
                    dirty.add((parent, listing.raw[owner]))  # a suffix now taken
        changed = {parent for parent, _ in dirty}
        for parent, name in dirty:
            self._rename_group(parent, name)
        for parent, name in recheck - dirty:
            if self._rename_group(parent, name):
                changed.add(parent)
        return changed

    def _unlist(self, child: bytes, where: bytes, dirty: set[tuple[bytes, bytes]]) -> None:
        listing = self._lists[where]
        raw = listing.raw.pop(child)
        group = tuple(m for m in listing.groups[raw] if m[1] != child)
        if group:
            listing.groups[raw] = group
        else:
            del listing.groups[raw]
            for other in listing.avoided.pop(raw, ()):
                dirty.add((where, other))
        shown = listing.names.pop(child, None)
        if shown is not None:
            self._names_changed.add((where, shown))
            if listing.by_name.get(shown) == child:
                del listing.by_name[shown]
        del self._listed_in[child]
        if self.kind(child) == "dir":
            listing.subdirs -= 1
        dirty.add((where, raw))

    def _rename_group(self, parent: bytes, name: bytes) -> bool:
        """Rule 2 for one group: the newest keeps the name, the others get a
        suffix; files that race (`_racing`) are named as rule 3 names content
        heads. Returns whether any shown name changed."""
        listing = self._lists.get(parent)
        if listing is None:
            return False
        group = listing.groups.get(name, ())
        before = {child: listing.names.get(child) for _, child in group}
        for _, child in group:
            shown = listing.names.pop(child, None)
            if shown is not None and listing.by_name.get(shown) == child:
                del listing.by_name[shown]
        ordered = [child for _, child in sorted(group, reverse=True)]
        racing = self._racing(group) if len(group) > 1 else set()
        if racing:
            self._raced.add((parent, name))
            best = max(racing, key=lambda c: (self._content_stamp(c), c))
            slot = next(i for i, c in enumerate(ordered) if c in racing)
            ordered = [c for c in ordered if c not in racing]
            ordered.insert(slot, best)
        else:
            self._raced.discard((parent, name))
        used: set[bytes] = set()
        shown_as: dict[bytes, bytes] = {}
        for child in ordered:
            shown = name
            if shown in used:
                shown = self._free_name(listing, name, name, child, used)
            used.add(shown)
            shown_as[child] = shown
        for child in sorted(racing.difference(ordered)):
            v = self._content_stamp(child)
            node_name = self._members.get(v.node, (v, v.node[:4].hex()))[1]
            shown = conflict_name(name, node_name, v)
            if shown in listing.groups:
                listing.avoided.setdefault(shown, set()).add(name)
            if shown in used or shown in listing.groups:
                shown = self._free_name(listing, name, shown, child, used)
            used.add(shown)
            shown_as[child] = shown
        for child, shown in shown_as.items():
            listing.by_name[shown] = child
            listing.names[child] = shown
            old = before.get(child)
            if old != shown:
                self._names_changed.add((parent, shown))
                if old is not None:
                    self._names_changed.add((parent, old))
        return shown_as != before

    @staticmethod
    def _free_name(
        listing: _Listing, group: bytes, name: bytes, child: bytes, used: set[bytes]
    ) -> bytes:
        """`name` with a suffix from `child`'s id that neither its group
        (`group`, whose shown names are `used`) nor another group's name takes."""
        shown = name
        for length in (4, 8, ENTRY_ID_BYTES):
            shown = _suffixed(name, child, length)
            if shown in listing.groups:
                listing.avoided.setdefault(shown, set()).add(group)
            elif shown not in used:
                break
        return shown

    def _racing(self, group: tuple[tuple[Hlc, bytes], ...]) -> set[bytes]:
        """The files of a name group that race as two writes to one file do.

        A file that rule 4 brings back (its delete did not see a write) to a
        name that a file placed there after that delete now holds (a rename
        over it, as an editor saves, or a new file made in its place) is not a
        second file under a suffix: both are versions of what the name holds.
        Then the newest content keeps the name and the other shows as a
        conflict copy `<stem>.conflict-<node>-<time><ext>` named after its
        content's writer and time, as rule 3 shows the heads of one file.
        """
        racing: set[bytes] = set()
        for _, child in group:
            if child not in self._revived or child in self._detached or not self._is_file(child):
                continue
            deleted = self.tree.places.get(child)
            if deleted is None or deleted.parent != TRASH:
                continue
            later = [
                c
                for h, c in group
                if h > deleted.hlc and c not in self._revived and self._is_file(c)
            ]
            if later:
                racing.add(child)
                racing.update(later)
        return racing
