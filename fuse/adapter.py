"""pyfuse3 `Operations` over a `Volume`: arguments in, one volume call, errno out.

Invariant: every handler is wrapped by `fuse.errors.translate` (`forget` by
`swallow`), so only `FUSEError` ever reaches pyfuse3; file-system meaning lives
in the volume, where it is tested without a mount. The adapter keeps no state
about the tree; lookup counts live in the volume (the adapter reports the ones
`readdir` hands over).

Caching: entries and attributes are cached by the kernel for `entry_timeout` /
`attr_timeout` seconds (300 by default: metadata calls are then answered by the
kernel, without a round trip). What peers change must therefore be invalidated
explicitly, with `invalidate`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import stat
from collections.abc import Callable, Iterable, Sequence
from functools import partial

import pyfuse3
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    InodeT,
    ModeT,
    ReaddirToken,
    RequestContext,
    SetattrFields,
    StatvfsData,
    XAttrNameT,
)

from fuse.errors import Retry, swallow, translate
from fuse.mount import notify_kernel
from fuse.protocol import ROOT_INODE, Attrs, Caller, Volume

log = logging.getLogger(__name__)

# The kernel reports this as st_blksize: the volume's block size, so tools that
# size their I/O by it (cp, dd) write whole blocks.
BLOCK_SIZE = 128 * 1024
DEFAULT_TIMEOUT_S = 300.0

# The kernel holds nothing for it (ENOENT), or the mount has just gone away
# (ENOTCONN, ENODEV: unmounted while the notification was on its way).
_NOTHING_TO_INVALIDATE = frozenset({errno.ENOENT, errno.ENOTCONN, errno.ENODEV})
_TYPE_BITS = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
    "chardev": stat.S_IFCHR,
    "blockdev": stat.S_IFBLK,
}

assert ROOT_INODE == pyfuse3.ROOT_INODE


def caller_of(ctx: RequestContext) -> Caller:
    return Caller(uid=ctx.uid, gid=ctx.gid, pid=ctx.pid, umask=ctx.umask)


class FuseOperations(pyfuse3.Operations):
    """The FUSE request handlers of a dfs-peer mount, delegating to `volume`.

    `keep_cache=False` (the default) makes the kernel drop an inode's page cache
    on every open, so a file opened after a peer changed it reads the new data
    even if nobody invalidated it; once every remote write calls `invalidate`,
    `keep_cache=True` saves those re-reads.
    """

    def __init__(
        self,
        volume: Volume,
        *,
        entry_timeout: float = DEFAULT_TIMEOUT_S,
        attr_timeout: float = DEFAULT_TIMEOUT_S,
        keep_cache: bool = False,
    ) -> None:
        super().__init__()
        self.volume = volume
        # Told every request's handler name and seconds (see `fuse.errors.translate`).
        self.on_request: Callable[[str, float], None] | None = None
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.keep_cache = keep_cache

    # -- conversions ---------------------------------------------------------------
    def entry(self, attrs: Attrs) -> EntryAttributes:
        """`attrs` as pyfuse3 wants them, with this mount's cache timeouts."""
        entry = EntryAttributes()
        entry.st_ino = attrs.inode
        entry.generation = 0  # inode numbers are never reused
        entry.entry_timeout = self.entry_timeout
        entry.attr_timeout = self.attr_timeout
        entry.st_mode = _TYPE_BITS[attrs.kind] | (attrs.mode & 0o7777)
        entry.st_nlink = attrs.nlink
        entry.st_uid = attrs.uid
        entry.st_gid = attrs.gid
        entry.st_rdev = attrs.rdev
        entry.st_size = attrs.size
        entry.st_blksize = BLOCK_SIZE
        entry.st_blocks = (attrs.size + 511) // 512
        entry.st_atime_ns = attrs.atime_ns
        entry.st_mtime_ns = attrs.mtime_ns
        entry.st_ctime_ns = attrs.ctime_ns
        return entry

    def file_info(self, fh: int) -> FileInfo:
        return FileInfo(fh=fh, direct_io=False, keep_cache=self.keep_cache, nonseekable=False)

    # -- cache invalidation (not a handler) ------------------------------------------
    async def invalidate(
        self, inodes: Iterable[int] = (), entries: Iterable[tuple[int, bytes]] = ()
    ) -> None:
        """Make the kernel forget what it cached for what peers changed.

        `inodes`: attributes and data of these inodes; `entries`: the
        `(parent inode, name)` pairs whose meaning changed (created, removed or
        renamed away). Returns once the kernel has dropped them. Does nothing
        when nothing is mounted.

        Call it from the event loop, never from inside a request handler: the
        kernel makes an entry invalidation wait until a related request has
        been answered, so awaiting it in a handler can deadlock. The calls run
        in a worker thread (`invalidate_entry` and `invalidate_inode` block),
        not in pyfuse3's `invalidate_entry_async` thread, which cannot be
        waited for and may use the session after unmount freed it (a crash;
        the same bug as python-llfuse#100); `fuse.mount.notify_kernel` keeps
        the session alive while they run.
        """
        pending_entries = list(entries)
        pending_inodes = list(inodes)
        if pending_entries or pending_inodes:
            await asyncio.to_thread(_invalidate, pending_inodes, pending_entries)

    # -- lookups -------------------------------------------------------------------
    @translate
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        return self.entry(self.volume.lookup(parent_inode, name))

    @swallow
    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        self.volume.forget(inode_list)

    # -- attributes ----------------------------------------------------------------
    @translate
    async def getattr(self, inode: InodeT, ctx: RequestContext) -> EntryAttributes:
        return self.entry(self.volume.getattr(inode))

    @translate
    async def setattr(
        self,
        inode: InodeT,
        attr: EntryAttributes,
        fields: SetattrFields,
        fh: FileHandleT | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        # pyfuse3 has already turned UTIME_NOW into the current time in `attr`.
        # `update_ctime` is ignored: the volume sets ctime on every change.
        attrs = self.volume.setattr(
            inode,
            mode=stat.S_IMODE(attr.st_mode) if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            fh=fh,
            caller=caller_of(ctx),
        )
        return self.entry(attrs)

    @translate
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        return self.volume.readlink(inode)

    # -- directories ---------------------------------------------------------------
    @translate
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        return self.volume.opendir(inode, caller_of(ctx))

    @translate
    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        # pyfuse3 serves READDIRPLUS only: each entry readdir_reply accepts (True)
        # hands the kernel an inode, i.e. counts one lookup the kernel will
        # forget later; a refused one (False) counts nothing and ends this reply.
        # Counted only once the reply is complete: if the listing fails half-way,
        # pyfuse3 sends the error instead and the kernel never sees those entries.
        accepted = []
        for name, attrs in self.volume.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self.entry(attrs), attrs.inode):
                break
            accepted.append(attrs.inode)
        for inode in accepted:
            self.volume.note_lookup(inode)

    @translate
    async def releasedir(self, fh: FileHandleT) -> None:
        self.volume.releasedir(fh)

    @translate
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        self.volume.fsyncdir(fh, datasync)

    @translate
    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: RequestContext
    ) -> EntryAttributes:
        return self.entry(self.volume.mkdir(parent_inode, name, mode, caller_of(ctx)))

    @translate
    async def mknod(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        return self.entry(self.volume.mknod(parent_inode, name, mode, rdev, caller_of(ctx)))

    @translate
    async def symlink(
        self, parent_inode: InodeT, name: FileNameT, target: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        return self.entry(self.volume.symlink(parent_inode, name, target, caller_of(ctx)))

    @translate
    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        return self.entry(self.volume.link(inode, new_parent_inode, new_name))

    @translate
    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        self.volume.unlink(parent_inode, name)

    @translate
    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        self.volume.rmdir(parent_inode, name)

    @translate
    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: FileNameT,
        parent_inode_new: InodeT,
        name_new: FileNameT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> None:
        self.volume.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # -- files ---------------------------------------------------------------------
    @translate
    async def create(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        fh, attrs = self.volume.create(parent_inode, name, mode, flags, caller_of(ctx))
        return self.file_info(fh), self.entry(attrs)

    @translate
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        return self.file_info(self.volume.open(inode, flags, caller_of(ctx)))

    @translate
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        await self.volume.load_for_read(fh, off, size)
        try:
            return self.volume.read(fh, off, size)
        except Retry as retry:
            if not await retry.wait():
                raise
            return self.volume.read(fh, off, size)

    @translate
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        return self.volume.write(fh, off, buf)

    @translate
    async def fallocate(self, inode: int, mode: int, offset: int, length: int) -> None:
        """Not a pyfuse3 handler (pyfuse3 has none): `fuse.fallocate` routes
        FUSE_FALLOCATE here. It must never wait: it runs to its end at once."""
        self.volume.fallocate(inode, mode, offset, length)

    @translate
    async def flush(self, fh: FileHandleT) -> None:
        self.volume.flush(fh)

    @translate
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        self.volume.fsync(fh, datasync)

    @translate
    async def release(self, fh: FileHandleT) -> None:
        self.volume.release(fh)

    # -- file system ---------------------------------------------------------------
    @translate
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        stats = self.volume.statfs()
        data = StatvfsData()
        data.f_bsize = stats.block_size
        data.f_frsize = stats.block_size
        data.f_blocks = stats.blocks
        data.f_bfree = stats.blocks_free
        data.f_bavail = stats.blocks_avail
        data.f_files = stats.files
        data.f_ffree = stats.files_free
        data.f_favail = stats.files_free
        data.f_namemax = stats.name_max
        return data

    # -- extended attributes -------------------------------------------------------
    @translate
    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> bytes:
        return self.volume.getxattr(inode, name)

    @translate
    async def setxattr(
        self, inode: InodeT, name: XAttrNameT, value: bytes, ctx: RequestContext
    ) -> None:
        # pyfuse3 does not pass XATTR_CREATE/XATTR_REPLACE on: it checks them
        # itself with getxattr right before this call, so the volume sees 0.
        self.volume.setxattr(inode, name, value, 0)

    @translate
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[XAttrNameT]:
        return self.volume.listxattr(inode)

    @translate
    async def removexattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> None:
        self.volume.removexattr(inode, name)


def _invalidate(inodes: Sequence[int], entries: Sequence[tuple[int, bytes]]) -> None:
    """Runs in a worker thread: both invalidations may block."""
    for parent, name in entries:
        if not _notify(partial(pyfuse3.invalidate_entry, parent, name), f"entry={parent}/{name!r}"):
            return
    for inode in inodes:
        if not _notify(partial(pyfuse3.invalidate_inode, inode), f"inode={inode}"):
            return


def _notify(send: Callable[[], None], what: str) -> bool:
    """One notification; False once nothing is mounted any more."""
    try:
        return notify_kernel(send)
    except OSError as exc:
        if exc.errno in _NOTHING_TO_INVALIDATE:
            log.debug("nothing to invalidate: %s error=%s", what, exc)
        else:
            log.warning("cannot invalidate: %s error=%s", what, exc)
        return True
