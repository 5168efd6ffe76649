"""POSIX meaning on top of the merged state: what the FUSE adapter talks to.

Invariant: every change a caller makes becomes operations in the local log
before the call returns, except file data, which is buffered per file (shared
by every handle on this node, so every local reader sees it at once) and
becomes one `Write` operation on flush, fsync, release, or when the buffer
passes `DIRTY_LIMIT`. A buffer remembers the version it started from, so a
write racing a remote one forks the file (a conflict copy) instead of mixing
blocks of two versions. An inode number, once given to an entry, stays its.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from crdt.merge import Changes, Replica
from crdt.ops import BLOCK_SIZE, NAME_MAX, ROOT
from fuse.errors import ReadOnly
from fuse.protocol import Attrs, FsStats
from peer.fs.attributes import Attributes
from peer.fs.directories import Directories, _DirHandle
from peer.fs.files import Files, _Dirty, _Handle
from peer.fs.inodes import ROOT_INODE, Inodes
from peer.storage.blocks import Blocks
from peer.storage.journal import Journal


class Volume(Inodes, Attributes, Directories, Files):
    """The volume as a POSIX file system (implements `fuse.protocol.Volume`)."""

    def __init__(
        self,
        journal: Journal,
        blocks: Blocks,
        *,
        read_only: bool = False,
        data_dir: Path | None = None,
        now_ns: Callable[[], int] | None = None,
    ) -> None:
        self.journal = journal
        self.replica: Replica = journal.replica
        self.store = journal.store
        self.blocks = blocks
        self.read_only = read_only
        self._data_dir = data_dir
        self._inodes: dict[bytes, int] = journal.store.load_inodes()
        self._inodes[ROOT] = ROOT_INODE
        self._entries: dict[int, bytes] = {i: e for e, i in self._inodes.items()}
        self._lookups: dict[int, int] = {}
        self._handles: dict[int, _Handle] = {}
        self._dir_handles: dict[int, _DirHandle] = {}
        # Directory rows whose attributes readdir built (a page costs its rows).
        self.readdir_rows_built = 0
        self._open_count: dict[bytes, int] = {}
        self._next_fh = 1
        self._dirty: dict[bytes, _Dirty] = {}
        # Files whose buffered writes were dropped for lack of space: their
        # writes fail until the last handle closes, so no later write builds
        # on a hole where the failed data was.
        self._failed: set[bytes] = set()
        self._last: dict[bytes, Attrs] = {}
        # What the kernel may have cached: {parent inode: {name: inode}}, from
        # our lookup/create replies, so a remote change invalidates exactly the
        # names whose meaning changed.
        self._kernel_names: dict[int, dict[bytes, int]] = {}
        # Asks peers for a block this node lost or found damaged (set by sync).
        self.refetch: Callable[[bytes], Awaitable[bool]] | None = None

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnly()

    # -- changes made by peers ---------------------------------------------------------
    def remote_changed(self, changes: Changes) -> tuple[list[int], list[tuple[int, bytes]]]:
        """What the kernel must forget after peers' operations made `changes`:
        (inodes whose attributes or data changed, (parent inode, name) pairs
        whose target changed or went away)."""
        inodes: set[int] = set()
        names: list[tuple[int, bytes]] = []
        for d in changes.dirs:
            parent = self._inodes.get(d)
            if parent is None:
                continue
            inodes.add(parent)
            known = self._kernel_names.get(parent)
            if not known:
                continue
            alive = self.replica.entry(d) is not None
            for name, inode in list(known.items()):
                now = self.replica.lookup(d, name) if alive else None
                if now is None or self._inodes.get(now) != inode:
                    names.append((parent, name))
                    del known[name]
        for e in changes.entries:
            known_inode = self._inodes.get(e)
            if known_inode is not None and (known_inode in self._lookups or e in self._open_count):
                inodes.add(known_inode)
        return sorted(inodes), names

    def local_changed(self, changes: Changes) -> list[tuple[int, bytes]]:
        """The (parent inode, name) pairs the kernel must forget after a local
        commit made `changes`: names it holds that now mean another entry or
        none (a sibling's `~hex` suffix came or went). The names the operation
        itself changed the kernel updates on its own; the volume already
        recorded them (`_kernel_names`), so they do not show up here."""
        names: list[tuple[int, bytes]] = []
        for d, name in changes.names:
            parent = self._inodes.get(d)
            known = self._kernel_names.get(parent) if parent is not None else None
            if not known or name not in known:
                continue
            now = self.replica.lookup(d, name) if self.replica.entry(d) is not None else None
            if now is None or self._inodes.get(now) != known[name]:
                assert parent is not None
                names.append((parent, name))
                del known[name]
        return names

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        for inode, n in items:
            left = self._lookups.get(inode, 0) - n
            if left > 0:
                self._lookups[inode] = left
            else:
                self._lookups.pop(inode, None)
                entry = self._entries.get(inode)
                if entry is not None and entry not in self._open_count:
                    self._last.pop(entry, None)

    def getattr(self, inode: int) -> Attrs:
        return self._attrs_of(self.entry_of(inode))

    # -- file system -------------------------------------------------------------------------
    def statfs(self) -> FsStats:
        where = str(self._data_dir) if self._data_dir is not None else "/"
        st = os.statvfs(where)
        _, entries = self.replica.counts()
        scale = max(1, st.f_frsize) / BLOCK_SIZE
        return FsStats(
            block_size=BLOCK_SIZE,
            blocks=int(st.f_blocks * scale),
            blocks_free=int(st.f_bfree * scale),
            blocks_avail=int(st.f_bavail * scale),
            files=entries + st.f_ffree,
            files_free=st.f_ffree,
            name_max=NAME_MAX,
        )
