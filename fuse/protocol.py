"""What the FUSE adapter needs from a volume, and the values that cross that line.

Invariant: everything here is plain data or a structural type; a volume
implements `Volume` without importing pyfuse3, and the adapter knows nothing
about how the volume stores its tree. Inode numbers are ints; an inode number,
once given to an entry, stays that entry's. The root directory is inode 1
(`pyfuse3.ROOT_INODE`). Names, symlink targets and xattr names are bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple, Protocol

ROOT_INODE: Final = 1
"""The root directory's inode number (FUSE_ROOT_ID, equal to `pyfuse3.ROOT_INODE`)."""

Kind = Literal["file", "dir", "symlink", "fifo", "socket", "chardev", "blockdev"]


class Attrs(NamedTuple):
    """The attributes of one inode, as `stat` shows them.

    `mode` holds permission bits only (`0o7777`); the file type is `kind`.
    Timestamps are nanoseconds since the epoch. `rdev` is the device number
    of a character or block device node, else 0.

    A named tuple rather than a frozen dataclass (like `crdt.clock.Hlc`): the
    same fields and immutability, built in C. A listing builds one per row;
    the frozen dataclass's `__init__` cost ~2.5 µs of a row's ~25 µs.
    """

    inode: int
    kind: Kind
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a request (from the FUSE request context).

    New entries take `uid`/`gid`; `umask` is the caller's umask.
    """

    uid: int
    gid: int
    pid: int
    umask: int


@dataclass(frozen=True, slots=True)
class FsStats:
    """What `statvfs` reports; `blocks*` count units of `block_size` bytes."""

    block_size: int
    blocks: int
    blocks_free: int
    blocks_avail: int
    files: int
    files_free: int
    name_max: int


class Volume(Protocol):
    """A POSIX file system the adapter can serve; every method is synchronous.

    Methods raise `fuse.errors.VolumeError` subclasses for refusals (the adapter
    turns them into errno replies); any other exception is a bug, logged with
    its traceback and answered with EIO.

    Lookup counts: `lookup`, `mkdir`, `mknod`, `symlink`, `link` and `create`
    each count one lookup of the inode they return; the adapter calls
    `note_lookup` once for every entry the kernel accepted from `readdir`;
    `forget` takes counts back. An inode that is unlinked must stay readable
    (`getattr`, open handles) until its count reaches zero and it is released.

    Permissions are checked by the kernel (`default_permissions`), not here.
    Names longer than 255 bytes must raise `NameTooLong`: FUSE itself lets
    names of up to 1024 bytes through.
    """

    read_only: bool

    def lookup(self, parent: int, name: bytes) -> Attrs:
        """The entry `name` in directory `parent`; counts one lookup.

        `name` may be `b"."` or `b".."` (pyfuse3 announces export support, so
        the kernel may ask for them, e.g. for NFS export).
        """
        ...

    def note_lookup(self, inode: int) -> None:
        """Count one more lookup of `inode` (an entry `readdir` handed over)."""
        ...

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        """Take back `nlookup` lookups for each `(inode, nlookup)`."""
        ...

    def getattr(self, inode: int) -> Attrs: ...

    def setattr(
        self,
        inode: int,
        *,
        mode: int | None,
        uid: int | None,
        gid: int | None,
        size: int | None,
        atime_ns: int | None,
        mtime_ns: int | None,
        fh: int | None,
        caller: Caller,
    ) -> Attrs:
        """Change the attributes that are not None and return them all.

        `mode` is permission bits only. `size` truncates or extends (a hole,
        never an allocation). `atime_ns`/`mtime_ns` are already resolved:
        pyfuse3 turns UTIME_NOW into the current time. `fh` is set when the
        call came through an open file (`ftruncate`, `fchmod`).
        """
        ...

    def readlink(self, inode: int) -> bytes: ...

    def opendir(self, inode: int, caller: Caller) -> int:
        """A handle for reading directory `inode` (it may simply be `inode`)."""
        ...

    def readdir(self, fh: int, after: int) -> Iterable[tuple[bytes, Attrs]]:
        """Entries of the directory opened as `fh` whose inode is > `after`.

        Without `.` and `..`, sorted by inode: the inode is the stable position
        (`next_id`) the kernel hands back as `after`, so entries added or removed
        meanwhile never make another one be skipped or listed twice. May be a
        lazy iterable: the adapter stops consuming when the kernel's buffer is
        full.
        """
        ...

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attrs:
        """Create a directory; counts one lookup.

        `mode` is as the kernel sent it: `S_IFDIR | perm`, with the caller's
        umask already applied by the kernel (`caller.umask` says which): keep
        `mode & 0o7777`.
        """
        ...

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Attrs:
        """Create a regular file, FIFO, socket or device node (`mode` includes
        the file type; `rdev` is a device node's number). Counts one lookup.

        Only the entry replicates: FIFO and socket I/O and device access are
        the kernel's, and never reach the volume."""
        ...

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Attrs:
        """Create a symbolic link; counts one lookup."""
        ...

    def link(self, inode: int, new_parent: int, new_name: bytes) -> Attrs:
        """Hard link; dfs-peer refuses (`NotPermitted`), after `Exists` for a
        name that is taken (POSIX orders the errors so)."""
        ...

    def unlink(self, parent: int, name: bytes) -> None: ...

    def rmdir(self, parent: int, name: bytes) -> None: ...

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        """Rename; `flags` is 0, RENAME_NOREPLACE (1) or RENAME_EXCHANGE (2)."""
        ...

    def create(
        self, parent: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[int, Attrs]:
        """Create and open a regular file: `(fh, attrs)`; counts one lookup.

        `mode` is as the kernel sent it (`S_IFREG | perm`, umask applied).
        """
        ...

    def open(self, inode: int, flags: int, caller: Caller) -> int:
        """Open a file; `flags` as in open(2) without O_CREAT/O_EXCL/O_NOCTTY.

        O_TRUNC does arrive (the kernel negotiates atomic O_TRUNC and then sends
        no setattr): the volume truncates the file, setting mtime and ctime."""
        ...

    async def load_for_read(self, fh: int, offset: int, size: int) -> None:
        """Make what `read` of this range needs quick to get (may do nothing)."""

    def read(self, fh: int, offset: int, size: int) -> bytes:
        """Up to `size` bytes; fewer only at end of file. May raise
        `fuse.errors.Retry` when the data can arrive later (the adapter then
        waits once and asks again)."""
        ...

    def write(self, fh: int, offset: int, data: bytes) -> int:
        """Write all of `data` and return `len(data)` (no direct_io)."""
        ...

    def fallocate(self, inode: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on a regular file: mode 0, FALLOC_FL_KEEP_SIZE (1),
        FALLOC_FL_PUNCH_HOLE (2, with KEEP_SIZE) and FALLOC_FL_ZERO_RANGE
        (0x10); others raise `Unsupported`. Nothing is reserved: the size grows
        (unless KEEP_SIZE) and punched or zeroed ranges read as zeros."""
        ...

    def flush(self, fh: int) -> None:
        """A close() of a descriptor of `fh`; may come several times per handle."""
        ...

    def fsync(self, fh: int, datasync: bool) -> None: ...

    def release(self, fh: int) -> None:
        """The last descriptor of `fh` is closed; `fh` will not be used again."""
        ...

    def releasedir(self, fh: int) -> None: ...

    def fsyncdir(self, fh: int, datasync: bool) -> None: ...

    def statfs(self) -> FsStats: ...

    def getxattr(self, inode: int, name: bytes) -> bytes:
        """The value, or `NoAttribute` (ENODATA, which is ENOATTR on Linux)."""
        ...

    def setxattr(self, inode: int, name: bytes, value: bytes, flags: int) -> None:
        """Set an attribute, honouring XATTR_CREATE (1) / XATTR_REPLACE (2).

        Through the adapter `flags` is always 0: pyfuse3 does not pass the
        flags on but checks them itself, with `getxattr`, just before calling
        (in the same event-loop step, so nothing runs in between).
        """
        ...

    def listxattr(self, inode: int) -> Sequence[bytes]: ...

    def removexattr(self, inode: int, name: bytes) -> None:
        """Remove an attribute, or `NoAttribute`."""
        ...
