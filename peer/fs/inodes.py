"""The inode table: the inode number each entry has for good, and lookups by
name (what the kernel may have cached)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from crdt.merge import EntryView, Replica
from crdt.ops import NAME_MAX
from fuse.errors import NameTooLong, NotADirectory, NotFound
from fuse.protocol import Attrs
from peer.storage.store import Store

ROOT_INODE = 1


class Inodes:
    """`Volume`'s inode table and lookups; see `peer.fs.volume`."""

    if TYPE_CHECKING:
        _entries: dict[int, bytes]
        _inodes: dict[bytes, int]
        _kernel_names: dict[int, dict[bytes, int]]
        _lookups: dict[int, int]
        replica: Replica
        store: Store

        def _attrs(self, view: EntryView) -> Attrs: ...

    # -- inode table -------------------------------------------------------------
    def inode_of(self, entry: bytes) -> int:
        inode = self._inodes.get(entry)
        if inode is None:
            with self.store.transaction():
                inode = self.store.inode_of(entry)
            self._remember_inode(entry, inode)
        return inode

    def _remember_inode(self, entry: bytes, inode: int) -> None:
        """Cache a number the store allocated (in a transaction that committed)."""
        self._inodes[entry] = inode
        self._entries[inode] = entry

    def inodes_of(self, entries: Iterable[bytes]) -> list[int]:
        """`inode_of` for many entries, allocating the new ones in one transaction."""
        entries = list(entries)
        missing = [e for e in entries if e not in self._inodes]
        if missing:
            for entry, inode in self.store.inodes_of(missing).items():
                self._inodes[entry] = inode
                self._entries[inode] = entry
        return [self._inodes[e] for e in entries]

    def entry_of(self, inode: int) -> bytes:
        entry = self._entries.get(inode)
        if entry is None:
            raise NotFound()
        return entry

    def _visible_entry_of(self, inode: int) -> bytes:
        """`entry_of`, and `NotFound` unless that entry is visible: what `_view`
        checks, without building the view (the xattr calls need only this, and
        the kernel asks for `security.capability` before every write)."""
        entry = self.entry_of(inode)
        if not self.replica.visible(entry):
            raise NotFound()
        return entry

    def _view(self, entry: bytes) -> EntryView:
        view = self.replica.entry(entry)
        if view is None:
            raise NotFound()
        return view

    def _dir(self, inode: int) -> EntryView:
        view = self._view(self.entry_of(inode))
        if view.kind != "dir":
            raise NotADirectory()
        return view

    # -- lookups ---------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> Attrs:
        if len(name) > NAME_MAX:
            raise NameTooLong()
        dir_view = self._dir(parent)
        if name == b".":
            child = dir_view.id
        elif name == b"..":
            child = dir_view.parent
        else:
            found = self.replica.lookup(dir_view.id, name)
            if found is None:
                raise NotFound()
            child = found
        attrs = self._attrs(self._view(child))
        self.note_lookup(attrs.inode)
        if name not in (b".", b".."):
            self._kernel_names.setdefault(parent, {})[name] = attrs.inode
        return attrs

    def note_lookup(self, inode: int) -> None:
        self._lookups[inode] = self._lookups.get(inode, 0) + 1
