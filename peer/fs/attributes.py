"""Attributes: what stat shows, chmod/chown/utimens/truncate, symlink targets
and extended attributes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from crdt.clock import Hlc
from crdt.merge import EntryView, Replica
from crdt.ops import NAME_MAX, XATTR_PREFIX, Op, SetAttr
from fuse.errors import (
    AccessDenied,
    Exists,
    InvalidArgument,
    IsADirectory,
    NoAttribute,
    NotFound,
    RangeError,
    TooBig,
    Unsupported,
)
from fuse.protocol import Attrs, Caller
from peer.fs.files import MakeOps, _Dirty
from peer.storage.journal import Journal

XATTR_VALUE_MAX = 64 * 1024
XATTR_CREATE = 1
XATTR_REPLACE = 2


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


class Attributes:
    """`Volume`'s attributes and extended attributes; see `peer.fs.volume`."""

    if TYPE_CHECKING:
        _dirty: dict[bytes, _Dirty]
        _last: dict[bytes, Attrs]
        _lookups: dict[int, int]
        _open_count: dict[bytes, int]
        journal: Journal
        replica: Replica

        def _flush(
            self, entry: bytes, force: bool = False, then: MakeOps | None = None
        ) -> None: ...
        def _size(self, entry: bytes) -> int: ...
        def _truncate(self, entry: bytes, size: int) -> None: ...
        def _view(self, entry: bytes) -> EntryView: ...
        def _visible_entry_of(self, inode: int) -> bytes: ...
        def _writable(self) -> None: ...
        def entry_of(self, inode: int) -> bytes: ...
        def inode_of(self, entry: bytes) -> int: ...

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

            def make(stamp: Callable[[], Hlc]) -> list[Op]:
                return [SetAttr(stamp(), entry, k, v) for k, v in sets]

            if entry in self._dirty and mtime_ns is not None:
                # The explicit mtime must not be overtaken by the buffered
                # write: both in one commit, the mtime stamped after it.
                self._flush(entry, then=make)
            else:
                self.journal.commit(make)
        return self._attrs_of(entry)

    def readlink(self, inode: int) -> bytes:
        view = self._view(self.entry_of(inode))
        if view.kind != "symlink":
            raise InvalidArgument()
        return view.target

    # -- extended attributes ---------------------------------------------------------------
    def getxattr(self, inode: int, name: bytes) -> bytes:
        entry = self._visible_entry_of(inode)
        value = self.replica.xattrs(entry).get(_xattr_key(name)[len(XATTR_PREFIX) :])
        if value is None:
            raise NoAttribute()
        return value

    def setxattr(self, inode: int, name: bytes, value: bytes, flags: int) -> None:
        self._writable()
        entry = self._visible_entry_of(inode)
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
        entry = self._visible_entry_of(inode)
        return [k.encode() for k in sorted(self.replica.xattrs(entry))]

    def removexattr(self, inode: int, name: bytes) -> None:
        self._writable()
        entry = self._visible_entry_of(inode)
        key = _xattr_key(name)
        if key[len(XATTR_PREFIX) :] not in self.replica.xattrs(entry):
            raise NoAttribute()
        self.journal.commit(lambda stamp: [SetAttr(stamp(), entry, key, None)])
