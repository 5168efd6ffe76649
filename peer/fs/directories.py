"""Directories: listing them, and making, linking, removing and renaming
entries in them."""

from __future__ import annotations

import bisect
import contextlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from crdt.clock import Hlc
from crdt.merge import EntryView, Replica
from crdt.ops import (
    MAX_BLOCKS_PER_WRITE,
    NAME_MAX,
    RDEV_MAX,
    ROOT,
    TRASH,
    Create,
    Kind,
    Move,
    Op,
    Write,
)
from fuse.errors import (
    BadHandle,
    Exists,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
)
from fuse.protocol import Attrs, Caller
from peer.fs.files import MakeOps, _Dirty
from peer.storage.journal import Journal
from peer.storage.store import Store

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

# What mknod can make, by the file type bits of its mode. Only the entry
# replicates: FIFO and socket I/O and device access stay in the kernel.
_NODE_KINDS: dict[int, Kind] = {
    stat.S_IFREG: "file",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
}


@dataclass(slots=True)
class _DirHandle:
    """An open directory: its listing, sorted by inode (the stable `next_id`),
    snapshot at the first `readdir` (and again at a rewind), so each page
    starts where the last one stopped instead of building the whole listing."""

    inode: int
    rows: list[tuple[int, bytes, bytes]] | None = None  # (inode, name, entry)


def _new_id() -> bytes:
    return os.urandom(16)


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong()
    if not name or b"/" in name or b"\x00" in name or name in (b".", b".."):
        raise InvalidArgument()


class Directories:
    """`Volume`'s directories; see `peer.fs.volume`."""

    if TYPE_CHECKING:
        _dir_handles: dict[int, _DirHandle]
        _dirty: dict[bytes, _Dirty]
        _kernel_names: dict[int, dict[bytes, int]]
        _next_fh: int
        journal: Journal
        readdir_rows_built: int
        replica: Replica
        store: Store

        def _attrs(self, view: EntryView) -> Attrs: ...
        def _dir(self, inode: int) -> EntryView: ...
        def _flush(
            self, entry: bytes, force: bool = False, then: MakeOps | None = None
        ) -> None: ...
        def _remember_inode(self, entry: bytes, inode: int) -> None: ...
        def _view(self, entry: bytes) -> EntryView: ...
        def _writable(self) -> None: ...
        def entry_of(self, inode: int) -> bytes: ...
        def inode_of(self, entry: bytes) -> int: ...
        def inodes_of(self, entries: Iterable[bytes]) -> list[int]: ...
        def note_lookup(self, inode: int) -> None: ...

    # -- directories ---------------------------------------------------------------------
    def opendir(self, inode: int, caller: Caller) -> int:
        self._dir(inode)
        fh = self._next_fh
        self._next_fh += 1
        self._dir_handles[fh] = _DirHandle(inode)
        return fh

    def readdir(self, fh: int, after: int) -> Iterator[tuple[bytes, Attrs]]:
        """The rows after inode `after`, built one by one as the caller takes
        them (the adapter stops when the kernel's buffer is full)."""
        handle = self._dir_handles.get(fh)
        if handle is None:
            raise BadHandle()
        view = self._dir(handle.inode)
        if handle.rows is None or after == 0:
            listing = self.replica.listing(view.id)
            inodes = self.inodes_of(child for _, child in listing)
            handle.rows = sorted(
                (i, name, child) for i, (name, child) in zip(inodes, listing, strict=True)
            )
        start = bisect.bisect_right(handle.rows, after, key=lambda row: row[0])
        return self._dir_rows(handle.inode, view.id, handle.rows, start)

    def _dir_rows(
        self, inode: int, dir_id: bytes, rows: list[tuple[int, bytes, bytes]], start: int
    ) -> Iterator[tuple[bytes, Attrs]]:
        # READDIRPLUS hands the kernel a dentry for each name: remember them
        # as lookups, so a remote change can invalidate them.
        known = self._kernel_names.setdefault(inode, {})
        for index in range(start, len(rows)):
            _, name, child = rows[index]
            # `_dir` found the directory visible for this page
            child_view = self.replica.listed_entry(dir_id, child)
            if child_view is None:
                continue  # gone since the snapshot
            self.readdir_rows_built += 1
            attrs = self._attrs(child_view)
            known[name] = attrs.inode
            yield name, attrs

    def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.store.sync()

    def _new_entry(
        self,
        parent: int,
        name: bytes,
        kind: Kind,
        mode: int,
        caller: Caller,
        target: bytes = b"",
        rdev: int = 0,
    ) -> Attrs:
        self._writable()
        _check_name(name)
        dir_view = self._dir(parent)
        if self.replica.lookup(dir_view.id, name) is not None:
            raise Exists()
        entry = _new_id()
        # The inode number is allocated in the create's own transaction: one
        # commit per new entry, not two.
        inode: list[int] = []
        self.journal.commit(
            lambda stamp: [
                Create(
                    stamp(),
                    entry,
                    dir_view.id,
                    name,
                    kind,
                    mode & 0o7777,
                    caller.uid,
                    caller.gid,
                    target,
                    rdev,
                )
            ],
            within=lambda: inode.append(self.store.inode_of(entry)),
        )
        self._remember_inode(entry, inode[-1])
        attrs = self._attrs(self._view(entry))
        self.note_lookup(attrs.inode)
        self._kernel_names.setdefault(parent, {})[name] = attrs.inode
        return attrs

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attrs:
        return self._new_entry(parent, name, "dir", mode, caller)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Attrs:
        kind = _NODE_KINDS.get(stat.S_IFMT(mode))
        if kind is None:
            raise InvalidArgument()
        if kind not in ("chardev", "blockdev"):
            rdev = 0
        elif not 0 <= rdev <= RDEV_MAX:
            raise InvalidArgument()
        return self._new_entry(parent, name, kind, mode, caller, rdev=rdev)

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Attrs:
        if len(target) > 4095 or not target:
            raise NameTooLong() if target else NotFound()
        return self._new_entry(parent, name, "symlink", 0o777, caller, target)

    def link(self, inode: int, new_parent: int, new_name: bytes) -> Attrs:
        self._writable()
        self._view(self.entry_of(inode))
        _check_name(new_name)
        if self.replica.lookup(self._dir(new_parent).id, new_name) is not None:
            raise Exists()  # POSIX: EEXIST comes before any other refusal
        # Hard links would need one entry in two places; the tree allows one.
        raise NotPermitted()

    def _child(self, parent: int, name: bytes) -> EntryView:
        _check_name(name)
        dir_view = self._dir(parent)
        child = self.replica.lookup(dir_view.id, name)
        if child is None:
            raise NotFound()
        return self._view(child)

    def _delete_ops(self, view: EntryView, stamp: Callable[[], Hlc]) -> list[Op]:
        """Operations that remove `view` (a conflict copy is resolved instead)."""
        source = self.replica.conflict_source(view.id)
        if source is not None:
            file, version = source
            return [self._resolve(file, version, stamp)]
        seen = self.replica.heads(view.id) if view.kind == "file" else ()
        return [Move(stamp(), view.id, TRASH, view.name, seen)]

    def _resolve(self, file: bytes, loser: Hlc, stamp: Callable[[], Hlc]) -> Write:
        winner = self.replica.contents.shown(file)
        assert winner is not None
        size = self.replica.version_size(winner)
        return Write(stamp(), file, (winner, loser), size, ())

    def unlink(self, parent: int, name: bytes) -> None:
        self._writable()
        view = self._child(parent, name)
        if view.kind == "dir":
            raise IsADirectory()
        if view.id in self._dirty:
            with contextlib.suppress(NoSpace):  # a full disk drops the buffer; delete anyway
                self._flush(view.id)  # the delete must see what was written
        view = self._view(view.id)
        with self._kernel_update(((parent, name, None),)):
            self.journal.commit(lambda stamp: self._delete_ops(view, stamp), freeing=True)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._writable()
        view = self._child(parent, name)
        if view.kind != "dir":
            raise NotADirectory()
        if self.replica.listing(view.id):
            raise NotEmpty()
        with self._kernel_update(((parent, name, None),)):
            self.journal.commit(lambda stamp: self._delete_ops(view, stamp), freeing=True)

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        self._writable()
        if flags & RENAME_EXCHANGE:
            raise InvalidArgument()  # not supported: documented in the README
        if flags & ~RENAME_NOREPLACE:
            raise InvalidArgument()
        source = self._child(old_parent, old_name)
        _check_name(new_name)
        target_dir = self._dir(new_parent)
        existing_id = self.replica.lookup(target_dir.id, new_name)
        existing = self._view(existing_id) if existing_id is not None else None
        if existing is not None and existing.id == source.id:
            return
        if existing is not None and flags & RENAME_NOREPLACE:
            raise Exists()
        if source.kind == "dir":
            if target_dir.id == source.id or self._is_ancestor(source.id, target_dir.id):
                raise InvalidArgument()
            if existing is not None:
                if existing.kind != "dir":
                    raise NotADirectory()
                if self.replica.listing(existing.id):
                    raise NotEmpty()
        elif existing is not None and existing.kind == "dir":
            raise IsADirectory()
        for entry in (source.id, existing.id if existing else None):
            if entry is not None and entry in self._dirty:
                self._flush(entry)
        if existing is not None:
            existing = self._view(existing.id)
        conflict = self.replica.conflict_source(source.id)

        def make(stamp: Callable[[], Hlc]) -> list[Op]:
            ops: list[Op] = []
            if existing is not None:
                ops.extend(self._delete_ops(existing, stamp))
            if conflict is None:
                ops.append(Move(stamp(), source.id, target_dir.id, new_name))
            else:
                ops.extend(self._adopt_copy(source, conflict, target_dir.id, new_name, stamp))
            return ops

        # The kernel moves its entry to the new name (a conflict copy's rename
        # makes a new entry there: the commit's own changes then invalidate it).
        moved = self.inode_of(source.id)
        with self._kernel_update(((old_parent, old_name, None), (new_parent, new_name, moved))):
            self.journal.commit(make)

    @contextlib.contextmanager
    def _kernel_update(self, names: Sequence[tuple[int, bytes, int | None]]) -> Iterator[None]:
        """Record the (parent, name) -> inode (None: gone) the kernel holds once
        the operation in the block succeeds, before it commits, so the
        commit's changes invalidate only what the kernel cannot know; put the
        old ones back if it fails."""
        saved = [(p, n, self._kernel_names.get(p, {}).get(n)) for p, n, _ in names]
        for parent, name, inode in names:
            self._set_kernel_name(parent, name, inode)
        try:
            yield
        except BaseException:
            for parent, name, inode in saved:
                self._set_kernel_name(parent, name, inode)
            raise

    def _set_kernel_name(self, parent: int, name: bytes, inode: int | None) -> None:
        if inode is None:
            self._kernel_names.get(parent, {}).pop(name, None)
        else:
            self._kernel_names.setdefault(parent, {})[name] = inode

    def _adopt_copy(
        self,
        copy: EntryView,
        conflict: tuple[bytes, Hlc],
        parent: bytes,
        name: bytes,
        stamp: Callable[[], Hlc],
    ) -> list[Op]:
        """Renaming a conflict copy makes it a file of its own and resolves it."""
        file, version = conflict
        entry = _new_id()
        ops: list[Op] = [
            Create(stamp(), entry, parent, name, "file", copy.mode, copy.uid, copy.gid, b"")
        ]
        items = sorted(self.replica.block_map(version).items())
        size = self.replica.version_size(version)
        base: tuple[Hlc, ...] = ()
        for start in range(0, max(len(items), 1), MAX_BLOCKS_PER_WRITE):
            chunk = tuple((i, b) for i, b in items[start : start + MAX_BLOCKS_PER_WRITE])
            w = Write(stamp(), entry, base, size, chunk)
            ops.append(w)
            base = (w.hlc,)
        ops.append(self._resolve(file, version, stamp))
        return ops

    def _is_ancestor(self, ancestor: bytes, entry: bytes) -> bool:
        cur = entry
        while cur != ROOT:
            view = self.replica.entry(cur)
            if view is None:
                return False
            if view.parent == ancestor:
                return True
            cur = view.parent
        return False
