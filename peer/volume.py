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

import bisect
import contextlib
import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from crdt.clock import Hlc
from crdt.content import blocks_for
from crdt.merge import Changes, EntryView, Replica
from crdt.ops import (
    BLOCK_SIZE,
    MAX_BLOCKS_PER_WRITE,
    MAX_FILE_SIZE,
    NAME_MAX,
    RDEV_MAX,
    ROOT,
    TRASH,
    XATTR_PREFIX,
    Create,
    Kind,
    Move,
    Op,
    SetAttr,
    Write,
)
from fuse.errors import (
    AccessDenied,
    BadHandle,
    Exists,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoAttribute,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    RangeError,
    ReadOnly,
    Retry,
    TooBig,
    Unsupported,
    VolumeError,
)
from fuse.protocol import Attrs, Caller, FsStats
from peer.blocks import Blocks, MissingBlock
from peer.errors import CorruptBlock
from peer.journal import Journal

log = logging.getLogger(__name__)

ROOT_INODE = 1
# Dirty data kept in memory per file before it is sealed and logged anyway.
DIRTY_LIMIT = 32 * 1024 * 1024
XATTR_VALUE_MAX = 64 * 1024
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# What mknod can make, by the file type bits of its mode. Only the entry
# replicates: FIFO and socket I/O and device access stay in the kernel.
_NODE_KINDS: dict[int, Kind] = {
    stat.S_IFREG: "file",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
}


class IOFailure(VolumeError):
    """Data could not be read (a corrupt or missing block)."""

    errno = errno.EIO


@dataclass(slots=True)
class _Dirty:
    """Unflushed data of one file: whole blocks, over the version `base`."""

    base: Hlc | None
    size: int
    blocks: dict[int, bytearray] = field(default_factory=dict)
    changed: set[int] = field(default_factory=set)
    truncated: bool = False
    holes: set[int] = field(default_factory=set)  # whole blocks punched out (in `changed`)

    def bytes(self) -> int:
        return sum(len(b) for b in self.blocks.values())


@dataclass(slots=True)
class _Handle:
    entry: bytes
    inode: int
    writable: bool
    append: bool


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


def _xattr_key(name: bytes) -> str:
    if not name or len(name) > NAME_MAX:
        raise RangeError() if name else InvalidArgument()
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument() from None
    if text.startswith(("system.", "security.")):
        # ACLs and security labels would be stored but never enforced: refuse
        # them, so tools such as `cp -a` fall back cleanly.
        raise Unsupported()
    return XATTR_PREFIX + text


class Volume:
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

    # -- inode table -------------------------------------------------------------
    def inode_of(self, entry: bytes) -> int:
        inode = self._inodes.get(entry)
        if inode is None:
            with self.store.transaction():
                inode = self.store.inode_of(entry)
            self._inodes[entry] = inode
            self._entries[inode] = entry
        return inode

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

    def _attrs(self, view: EntryView) -> Attrs:
        inode = self.inode_of(view.id)
        size = view.size
        dirty = self._dirty.get(view.id)
        if dirty is not None:
            size = dirty.size
        nlink = 1
        if view.kind == "dir":
            nlink = 2 + self.replica.subdirs(view.id)
        attrs = Attrs(
            inode=inode,
            kind=view.kind,
            mode=view.mode,
            nlink=nlink,
            uid=view.uid,
            gid=view.gid,
            size=size,
            atime_ns=view.atime_ns,
            mtime_ns=view.mtime_ns,
            ctime_ns=view.ctime_ns,
            rdev=view.rdev,
        )
        self._last[view.id] = attrs
        return attrs

    def _attrs_of(self, entry: bytes) -> Attrs:
        view = self.replica.entry(entry)
        if view is not None:
            return self._attrs(view)
        last = self._last.get(entry)
        if last is None or (entry not in self._open_count and not self._lookups.get(last.inode)):
            raise NotFound()
        # Deleted but still open or known to the kernel: nlink 0, like POSIX,
        # and the content the delete hid (a tombstone shows its base's) or
        # what was written through a handle since, until the last close.
        size = self._size(entry) if last.kind == "file" else last.size
        return Attrs(
            last.inode,
            last.kind,
            last.mode,
            0,
            last.uid,
            last.gid,
            size,
            last.atime_ns,
            last.mtime_ns,
            last.ctime_ns,
            last.rdev,
        )

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnly()

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

    # -- attributes --------------------------------------------------------------------
    def setattr(
        self,
        inode: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        fh: int | None = None,
        caller: Caller | None = None,
    ) -> Attrs:
        entry = self.entry_of(inode)
        self._writable()
        if self.replica.conflict_source(entry) is not None and (
            size is not None or mode is not None or uid is not None or gid is not None
        ):
            raise AccessDenied()
        if size is not None:
            if self.replica.kind(entry) == "dir":
                raise IsADirectory()
            if self.replica.kind(entry) != "file":
                raise InvalidArgument()
            self._truncate(entry, size)
        sets: list[tuple[str, int]] = []
        if mode is not None:
            sets.append(("mode", mode & 0o7777))
        if uid is not None:
            sets.append(("uid", uid))
        if gid is not None:
            sets.append(("gid", gid))
        if mtime_ns is not None:
            sets.append(("mtime_ns", mtime_ns))
        if atime_ns is not None:
            # Kept only when set on purpose: reads never set it (as with noatime).
            sets.append(("atime_ns", atime_ns))
        if sets:
            if entry in self._dirty and mtime_ns is not None:
                self._flush(entry)  # the explicit mtime must not be overtaken by the write
            self.journal.commit(lambda stamp: [SetAttr(stamp(), entry, k, v) for k, v in sets])
        return self._attrs_of(entry)

    def readlink(self, inode: int) -> bytes:
        view = self._view(self.entry_of(inode))
        if view.kind != "symlink":
            raise InvalidArgument()
        return view.target

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
            ]
        )
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

    # -- files ---------------------------------------------------------------------------
    def create(
        self, parent: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[int, Attrs]:
        attrs = self._new_entry(parent, name, "file", mode, caller)
        return self._open_handle(self.entry_of(attrs.inode), attrs.inode, flags), attrs

    def open(self, inode: int, flags: int, caller: Caller) -> int:
        entry = self.entry_of(inode)
        view = self._view(entry)
        if view.kind == "dir":
            raise IsADirectory()
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            self._writable()
            if view.conflict_of is not None:
                raise AccessDenied()  # conflict copies are read-only: rename to keep one
        if flags & os.O_TRUNC and view.kind == "file":
            # The kernel negotiates atomic O_TRUNC and sends no setattr: the
            # truncate is ours. Like Linux, it sets mtime and ctime even when
            # the file was empty already (a new version is a new mtime).
            self._truncate(entry, 0)
        return self._open_handle(entry, inode, flags)

    def _open_handle(self, entry: bytes, inode: int, flags: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        self._handles[fh] = _Handle(entry, inode, writable, bool(flags & os.O_APPEND))
        self._open_count[entry] = self._open_count.get(entry, 0) + 1
        return fh

    def _handle(self, fh: int) -> _Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise BadHandle()
        return handle

    def _version(self, entry: bytes) -> Hlc | None:
        source = self.replica.conflict_source(entry)
        if source is not None:
            return source[1]
        return self.replica.contents.shown(entry)

    def _size(self, entry: bytes) -> int:
        dirty = self._dirty.get(entry)
        if dirty is not None:
            return dirty.size
        version = self._version(entry)
        return self.replica.version_size(version) if version is not None else 0

    def _stored_block(self, version: Hlc | None, index: int) -> bytes:
        if version is None:
            return b""
        bid = self.replica.block_map(version).get(index)
        if bid is None:
            return b""
        try:
            return self.blocks.get(bid)
        except (MissingBlock, CorruptBlock) as exc:
            refetch = self.refetch
            if refetch is not None:
                log.warning("block %d unreadable here (%s): asking peers for it", index, exc)
                raise Retry(lambda: refetch(bid)) from exc
            log.error("cannot read block %d: %s", index, exc)
            raise IOFailure() from exc

    def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handle(fh)
        entry = handle.entry
        dirty = self._dirty.get(entry)
        file_size = self._size(entry)
        end = min(offset + size, file_size)
        if offset >= end:
            return b""
        version = dirty.base if dirty is not None else self._version(entry)
        out = bytearray()
        pos = offset
        while pos < end:
            index, skip = divmod(pos, BLOCK_SIZE)
            take = min(BLOCK_SIZE - skip, end - pos)
            data: bytes | bytearray
            if dirty is not None and index in dirty.blocks:
                data = dirty.blocks[index]
            elif dirty is not None and (
                index in dirty.holes or (dirty.truncated and index >= blocks_for(dirty.size))
            ):
                data = b""
            else:
                data = self._stored_block(version, index)
            piece = data[skip : skip + take]
            out += piece
            if len(piece) < take:
                out += bytes(take - len(piece))  # a hole or the zeroed tail of a block
            pos += take
        return bytes(out)

    def _dirty_for(self, entry: bytes) -> _Dirty:
        dirty = self._dirty.get(entry)
        if dirty is None:
            version = self._version(entry)
            size = self.replica.version_size(version) if version is not None else 0
            dirty = _Dirty(version, size)
            self._dirty[entry] = dirty
        return dirty

    def _load_block(self, dirty: _Dirty, index: int) -> bytearray:
        block = dirty.blocks.get(index)
        if block is None:
            if index in dirty.holes or (dirty.truncated and index >= blocks_for(dirty.size)):
                dirty.holes.discard(index)  # written into: a block of data again
                block = bytearray()
            else:
                block = bytearray(self._stored_block(dirty.base, index))
            # bytes past the file's end inside the last block read as zeros
            limit = max(0, dirty.size - index * BLOCK_SIZE)
            del block[limit:]
            dirty.blocks[index] = block
        return block

    def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._handle(fh)
        if not handle.writable:
            raise BadHandle()
        self._writable()
        entry = handle.entry
        if entry in self._failed:
            raise NoSpace()
        dirty = self._dirty_for(entry)
        if handle.append:
            offset = dirty.size
        end = offset + len(data)
        if end > MAX_FILE_SIZE:
            raise TooBig()
        pos = 0
        while pos < len(data):
            index, skip = divmod(offset + pos, BLOCK_SIZE)
            take = min(BLOCK_SIZE - skip, len(data) - pos)
            block = self._load_block(dirty, index)
            if len(block) < skip:
                block.extend(bytes(skip - len(block)))
            block[skip : skip + take] = data[pos : pos + take]
            dirty.changed.add(index)
            pos += take
        dirty.size = max(dirty.size, end)
        if dirty.bytes() > DIRTY_LIMIT:
            self._flush(entry)
        return len(data)

    def _truncate(self, entry: bytes, size: int) -> None:
        if size > MAX_FILE_SIZE:
            raise TooBig()
        dirty = self._dirty_for(entry)
        if size < dirty.size:
            keep = blocks_for(size)
            for index in [i for i in dirty.blocks if i >= keep]:
                del dirty.blocks[index]
                dirty.changed.discard(index)
            dirty.changed -= {i for i in dirty.holes if i >= keep}
            dirty.holes = {i for i in dirty.holes if i < keep}
            dirty.truncated = True
            if size % BLOCK_SIZE:
                last = size // BLOCK_SIZE
                block = self._load_block(dirty, last)
                del block[size - last * BLOCK_SIZE :]
                dirty.changed.add(last)
        dirty.size = size
        self._flush(entry, force=True)

    def fallocate(self, inode: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2): mode 0 and FALLOC_FL_KEEP_SIZE reserve (nothing to
        reserve here: the size grows, unless KEEP_SIZE, and the new range reads
        as zeros); FALLOC_FL_PUNCH_HOLE (with KEEP_SIZE) and
        FALLOC_FL_ZERO_RANGE make a range read as zeros, whole blocks becoming
        holes. One new version, like a truncate. Other modes: `Unsupported`."""
        self._writable()
        entry = self.entry_of(inode)
        kind = self._view(entry).kind
        if kind == "dir":
            raise IsADirectory()
        if kind != "file" or self.replica.conflict_source(entry) is not None:
            raise AccessDenied() if kind == "file" else InvalidArgument()
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise Unsupported()
        punch, zero = bool(mode & FALLOC_FL_PUNCH_HOLE), bool(mode & FALLOC_FL_ZERO_RANGE)
        if (punch and zero) or (punch and not mode & FALLOC_FL_KEEP_SIZE):
            raise Unsupported()  # what Linux answers for these combinations
        if offset < 0 or length <= 0:
            raise InvalidArgument()
        end = offset + length
        if end > MAX_FILE_SIZE:
            raise TooBig()
        dirty = self._dirty_for(entry)
        size = dirty.size
        if punch or zero:
            self._zero(dirty, offset, min(end, size))
        if not mode & FALLOC_FL_KEEP_SIZE and end > size:
            dirty.size = end
        self._flush(entry, force=True)

    def _zero(self, dirty: _Dirty, start: int, end: int) -> None:
        """Make [start, end) of a file read as zeros; whole blocks become holes."""
        for index in range(start // BLOCK_SIZE, blocks_for(end)):
            first = index * BLOCK_SIZE
            lo, hi = max(start, first), min(end, first + BLOCK_SIZE, dirty.size)
            if lo >= hi:
                continue
            if lo == first and hi == min(first + BLOCK_SIZE, dirty.size):
                dirty.blocks.pop(index, None)
                dirty.holes.add(index)
            else:
                block = self._load_block(dirty, index)
                cut = min(hi - first, len(block))
                block[lo - first : cut] = bytes(max(0, cut - (lo - first)))
            dirty.changed.add(index)

    def _flush(self, entry: bytes, force: bool = False) -> None:
        dirty = self._dirty.get(entry)
        if dirty is None:
            return
        if not dirty.changed and not force and dirty.size == self._size_of_base(dirty):
            del self._dirty[entry]
            return
        indexes = sorted(dirty.changed - dirty.holes)
        sealed = self.blocks.seal(bytes(dirty.blocks[i]) for i in indexes)
        pairs: list[tuple[int, bytes | None]] = [
            (i, bid) for i, (bid, _) in zip(indexes, sealed, strict=True)
        ]
        pairs = sorted(pairs + [(i, None) for i in dirty.holes])

        def make(stamp: Callable[[], Hlc]) -> list[Op]:
            ops: list[Op] = []
            base = (dirty.base,) if dirty.base is not None else ()
            for start in range(0, max(len(pairs), 1), MAX_BLOCKS_PER_WRITE):
                chunk = tuple(pairs[start : start + MAX_BLOCKS_PER_WRITE])
                w = Write(stamp(), entry, base, dirty.size, tuple((i, b) for i, b in chunk))
                ops.append(w)
                base = (w.hlc,)
            return ops

        try:
            self.journal.commit(make, blocks=sealed)
        except NoSpace:
            # The write failed (ENOSPC to the caller): it must never show up
            # later, and a full disk must not make buffers grow without bound.
            del self._dirty[entry]
            if self._open_count.get(entry):
                self._failed.add(entry)
            raise
        del self._dirty[entry]

    def _size_of_base(self, dirty: _Dirty) -> int:
        return self.replica.version_size(dirty.base) if dirty.base is not None else 0

    def flush(self, fh: int) -> None:
        self._flush(self._handle(fh).entry)

    def fsync(self, fh: int, datasync: bool) -> None:
        self._flush(self._handle(fh).entry)
        self.store.sync()

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            raise BadHandle()
        left = self._open_count.get(handle.entry, 1) - 1
        if left > 0:
            self._open_count[handle.entry] = left
            return
        del self._open_count[handle.entry]
        self._failed.discard(handle.entry)
        self._flush(handle.entry)

    def buffered_bases(self) -> list[Hlc | None]:
        """The versions that writes buffered here build on (collection keeps them)."""
        return [dirty.base for dirty in self._dirty.values()]

    def open_versions(self) -> list[Hlc]:
        """The versions open handles read (collection keeps them): a file
        deleted while open reads the content its delete hid until the last close."""
        versions = (self._version(entry) for entry in self._open_count)
        return [v for v in versions if v is not None]

    def flush_all(self) -> tuple[int, int]:
        """Flush every buffered file (shutdown, gc). Returns (files, bytes)
        whose buffered writes could not be flushed for lack of space (and
        were dropped); the others are flushed."""
        lost = lost_bytes = 0
        for entry in list(self._dirty):
            size = self._dirty[entry].bytes()
            try:
                self._flush(entry)
            except NoSpace:
                lost += 1
                lost_bytes += size
        return lost, lost_bytes

    # -- extended attributes ---------------------------------------------------------------
    def getxattr(self, inode: int, name: bytes) -> bytes:
        entry = self.entry_of(inode)
        self._view(entry)
        value = self.replica.xattrs(entry).get(_xattr_key(name)[len(XATTR_PREFIX) :])
        if value is None:
            raise NoAttribute()
        return value

    def setxattr(self, inode: int, name: bytes, value: bytes, flags: int) -> None:
        self._writable()
        entry = self.entry_of(inode)
        self._view(entry)
        key = _xattr_key(name)
        if len(value) > XATTR_VALUE_MAX:
            raise TooBig()
        present = key[len(XATTR_PREFIX) :] in self.replica.xattrs(entry)
        if flags & XATTR_CREATE and present:
            raise Exists()
        if flags & XATTR_REPLACE and not present:
            raise NoAttribute()
        self.journal.commit(lambda stamp: [SetAttr(stamp(), entry, key, bytes(value))])

    def listxattr(self, inode: int) -> Sequence[bytes]:
        entry = self.entry_of(inode)
        self._view(entry)
        return [k.encode() for k in sorted(self.replica.xattrs(entry))]

    def removexattr(self, inode: int, name: bytes) -> None:
        self._writable()
        entry = self.entry_of(inode)
        self._view(entry)
        key = _xattr_key(name)
        if key[len(XATTR_PREFIX) :] not in self.replica.xattrs(entry):
            raise NoAttribute()
        self.journal.commit(lambda stamp: [SetAttr(stamp(), entry, key, None)])

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
