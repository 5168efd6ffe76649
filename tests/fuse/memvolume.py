"""An in-memory `fuse.protocol.Volume` (a test double of the volume only), and a
runner that mounts it in a child process for the adapter's tests.

The double keeps real lookup counts: a `forget` that takes back more than was
counted raises `LookupCountError`, which the adapter logs, so a test that
checks the child's log catches a miscounting adapter. `fail()` makes a chosen
method raise `RuntimeError` (the bug the adapter must survive).

Runner: `python -m tests.fuse.memvolume MOUNTPOINT` mounts a fresh volume,
prints `ready`, then reads one command per line on stdin and answers each with
one line, `ok [json]` or `error <message>`:

    fail METHOD [NAME]    METHOD raises RuntimeError (only for NAME, if given)
    heal                  no more failures
    populate DIR N        DIR with N files, made behind the kernel's back
    lookups DIR           {name: lookup count} for the entries of DIR
    nodes                 how many inodes the volume holds (unlinked ones stay
                          until the kernel forgets them and they are closed)
    remote-write PATH TEXT [quiet]   replace a file's content as a peer would,
                          then invalidate its inode (unless `quiet`)
    remote-unlink PATH [quiet]       remove a file as a peer would, then
                          invalidate its entry (unless `quiet`)
    imported MODULE       whether MODULE is in the runner's `sys.modules`

It logs to stderr at INFO. SIGTERM cancels `serve`, SIGINT calls
`fuse.mount.terminate()`; either way `serve` unmounts and the runner exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import random
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fuse.errors import (
    BadHandle,
    Exists,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoAttribute,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    Unsupported,
)
from fuse.protocol import ROOT_INODE, Attrs, Caller, FsStats, Kind

log = logging.getLogger(__name__)

NAME_MAX = 255
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2

F = TypeVar("F", bound=Callable[..., Any])


class LookupCountError(Exception):
    """The kernel forgot more lookups than the volume counted: an adapter bug."""


@dataclass(slots=True)
class Node:
    inode: int
    kind: Kind
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    parent: int
    data: bytearray = field(default_factory=bytearray)
    target: bytes = b""
    rdev: int = 0
    children: dict[bytes, int] = field(default_factory=dict)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    lookups: int = 0
    open_handles: int = 0
    linked: bool = True


def _failable(method: F) -> F:
    """Raise RuntimeError if `fail()` chose this method (and one of its name args)."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: MemVolume, *args: Any, **kwargs: Any) -> Any:
        if name in self.failing:
            trigger = self.failing[name]
            if trigger is None or trigger in args:
                raise RuntimeError(f"injected failure in {name}")
        return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class MemVolume:
    """A small POSIX tree in memory: files, directories, symlinks, xattrs."""

    read_only = False

    def __init__(self) -> None:
        now = time.time_ns()
        root = Node(ROOT_INODE, "dir", 0o755, 0, 0, now, now, now, parent=ROOT_INODE)
        self.nodes: dict[int, Node] = {ROOT_INODE: root}
        self.handles: dict[int, int] = {}  # fh -> inode (files and directories)
        self.failing: dict[str, bytes | None] = {}
        self._next_inode = ROOT_INODE + 1
        self._next_fh = 1

    # -- test controls -------------------------------------------------------------
    def fail(self, method: str, name: bytes | None = None) -> None:
        """From now on `method` raises RuntimeError (only when passed `name`, if given)."""
        self.failing[method] = name

    def heal(self) -> None:
        self.failing.clear()

    def resolve(self, path: str) -> Node:
        node = self.nodes[ROOT_INODE]
        for part in path.strip("/").split("/"):
            if part:
                node = self.nodes[node.children[os.fsencode(part)]]
        return node

    def populate(self, path: str, count: int) -> None:
        """Make `path` a directory of `count` files, named in an order unlike their inodes."""
        parent = self.resolve(os.path.dirname(path) or "/")
        directory = self._add(parent, os.fsencode(os.path.basename(path)), "dir", 0o755, 0, 0)
        names = [f"f{i:05d}".encode() for i in range(count)]
        random.Random(count).shuffle(names)
        for name in names:
            self._add(directory, name, "file", 0o644, 0, 0)

    def remote_write(self, path: str, data: bytes) -> int:
        """Replace a file's content as a peer's write would; returns its inode."""
        node = self.resolve(path)
        node.data[:] = data
        node.mtime_ns = node.ctime_ns = time.time_ns()
        return node.inode

    def remote_unlink(self, path: str) -> tuple[int, bytes]:
        """Remove a file as a peer would; returns (parent inode, name)."""
        parent = self.resolve(os.path.dirname(path) or "/")
        name = os.fsencode(os.path.basename(path))
        self._detach(parent, name)
        return parent.inode, name

    # -- helpers -------------------------------------------------------------------
    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise NotFound()
        return node

    def _dir(self, inode: int) -> Node:
        node = self._node(inode)
        if node.kind != "dir":
            raise NotADirectory()
        return node

    def _child(self, parent: Node, name: bytes) -> Node:
        inode = parent.children.get(name)
        if inode is None:
            raise NotFound()
        return self.nodes[inode]

    def _attrs(self, node: Node) -> Attrs:
        if node.kind == "dir":
            nlink = 2 + sum(1 for i in node.children.values() if self.nodes[i].kind == "dir")
            size = 4096
        else:
            nlink = 1 if node.linked else 0
            size = len(node.target) if node.kind == "symlink" else len(node.data)
        return Attrs(
            inode=node.inode,
            kind=node.kind,
            mode=node.mode,
            nlink=nlink,
            uid=node.uid,
            gid=node.gid,
            size=size,
            atime_ns=node.atime_ns,
            mtime_ns=node.mtime_ns,
            ctime_ns=node.ctime_ns,
            rdev=node.rdev,
        )

    def _touch(self, node: Node) -> None:
        node.mtime_ns = node.ctime_ns = time.time_ns()

    def _add(self, parent: Node, name: bytes, kind: Kind, mode: int, uid: int, gid: int) -> Node:
        if len(name) > NAME_MAX:
            raise NameTooLong()
        if name in parent.children or name in (b".", b".."):
            raise Exists()
        now = time.time_ns()
        node = Node(
            self._next_inode, kind, mode & 0o7777, uid, gid, now, now, now, parent=parent.inode
        )
        self._next_inode += 1
        self.nodes[node.inode] = node
        parent.children[name] = node.inode
        self._touch(parent)
        return node

    def _new(self, parent: int, name: bytes, kind: Kind, mode: int, caller: Caller) -> Node:
        node = self._add(
            self._dir(parent), name, kind, mode & ~caller.umask, caller.uid, caller.gid
        )
        node.lookups += 1
        return node

    def _detach(self, parent: Node, name: bytes) -> None:
        node = self._child(parent, name)
        del parent.children[name]
        node.linked = False
        self._touch(parent)
        node.ctime_ns = time.time_ns()
        self._collect(node)

    def _collect(self, node: Node) -> None:
        """Drop a node nobody can reach any more: unlinked, forgotten, closed."""
        if not node.linked and node.lookups == 0 and node.open_handles == 0:
            del self.nodes[node.inode]

    def _handle(self, fh: int) -> Node:
        inode = self.handles.get(fh)
        if inode is None:
            raise BadHandle()
        return self.nodes[inode]

    def _open_handle(self, node: Node) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = node.inode
        node.open_handles += 1
        return fh

    def _close_handle(self, fh: int) -> None:
        node = self._handle(fh)
        del self.handles[fh]
        node.open_handles -= 1
        self._collect(node)

    # -- the Volume protocol -------------------------------------------------------
    @_failable
    def lookup(self, parent: int, name: bytes) -> Attrs:
        if len(name) > NAME_MAX:
            raise NameTooLong()
        directory = self._dir(parent)
        if name == b".":
            node = directory
        elif name == b"..":
            node = self.nodes[directory.parent]
        else:
            node = self._child(directory, name)
        node.lookups += 1
        return self._attrs(node)

    @_failable
    def note_lookup(self, inode: int) -> None:
        self._node(inode).lookups += 1

    @_failable
    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        for inode, nlookup in items:
            node = self.nodes.get(inode)
            if node is None or node.lookups < nlookup:
                raise LookupCountError(
                    f"forget({inode}, {nlookup}) but counted {node.lookups if node else None}"
                )
            node.lookups -= nlookup
            self._collect(node)

    @_failable
    def getattr(self, inode: int) -> Attrs:
        return self._attrs(self._node(inode))

    @_failable
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
        node = self._node(inode)
        if size is not None:
            if node.kind != "file":
                raise IsADirectory() if node.kind == "dir" else InvalidArgument()
            if size > len(node.data):
                node.data.extend(bytes(size - len(node.data)))
            else:
                del node.data[size:]
            node.mtime_ns = time.time_ns()
        if mode is not None:
            node.mode = mode & 0o7777
        if uid is not None:
            node.uid = uid
        if gid is not None:
            node.gid = gid
        if atime_ns is not None:
            node.atime_ns = atime_ns
        if mtime_ns is not None:
            node.mtime_ns = mtime_ns
        node.ctime_ns = time.time_ns()
        return self._attrs(node)

    @_failable
    def readlink(self, inode: int) -> bytes:
        node = self._node(inode)
        if node.kind != "symlink":
            raise InvalidArgument()
        return node.target

    @_failable
    def opendir(self, inode: int, caller: Caller) -> int:
        return self._open_handle(self._dir(inode))

    @_failable
    def readdir(self, fh: int, after: int) -> Iterator[tuple[bytes, Attrs]]:
        directory = self._handle(fh)
        entries = sorted((i, n) for n, i in directory.children.items() if i > after)
        # A generator: the adapter stops when the kernel's buffer is full.
        return ((name, self._attrs(self.nodes[inode])) for inode, name in entries)

    @_failable
    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attrs:
        return self._attrs(self._new(parent, name, "dir", mode, caller))

    @_failable
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Attrs:
        kinds: dict[int, Kind] = {
            stat.S_IFREG: "file",
            stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "socket",
            stat.S_IFCHR: "chardev",
            stat.S_IFBLK: "blockdev",
        }
        kind = kinds.get(stat.S_IFMT(mode))
        if kind is None:
            raise InvalidArgument()
        node = self._new(parent, name, kind, mode, caller)
        if kind in ("chardev", "blockdev"):
            node.rdev = rdev
        return self._attrs(node)

    @_failable
    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Attrs:
        node = self._new(parent, name, "symlink", 0o777, caller)
        node.mode = 0o777
        node.target = target
        return self._attrs(node)

    @_failable
    def link(self, inode: int, new_parent: int, new_name: bytes) -> Attrs:
        if new_name in self._dir(new_parent).children:
            raise Exists()
        raise NotPermitted()

    @_failable
    def unlink(self, parent: int, name: bytes) -> None:
        directory = self._dir(parent)
        if self._child(directory, name).kind == "dir":
            raise IsADirectory()
        self._detach(directory, name)

    @_failable
    def rmdir(self, parent: int, name: bytes) -> None:
        directory = self._dir(parent)
        node = self._child(directory, name)
        if node.kind != "dir":
            raise NotADirectory()
        if node.children:
            raise NotEmpty()
        self._detach(directory, name)

    @_failable
    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        source_dir, target_dir = self._dir(old_parent), self._dir(new_parent)
        node = self._child(source_dir, old_name)
        if len(new_name) > NAME_MAX:
            raise NameTooLong()
        ancestor = target_dir
        while node.kind == "dir":
            if ancestor.inode == node.inode:
                raise InvalidArgument()  # a directory moved into itself
            if ancestor.inode == ROOT_INODE:
                break
            ancestor = self.nodes[ancestor.parent]
        existing_inode = target_dir.children.get(new_name)
        if flags & RENAME_EXCHANGE:
            if existing_inode is None:
                raise NotFound()
            source_dir.children[old_name], target_dir.children[new_name] = (
                existing_inode,
                node.inode,
            )
            self.nodes[existing_inode].parent, node.parent = source_dir.inode, target_dir.inode
        else:
            if existing_inode is not None:
                if existing_inode == node.inode:
                    return
                if flags & RENAME_NOREPLACE:
                    raise Exists()
                existing = self.nodes[existing_inode]
                if existing.kind == "dir":
                    if node.kind != "dir":
                        raise IsADirectory()
                    if existing.children:
                        raise NotEmpty()
                elif node.kind == "dir":
                    raise NotADirectory()
                self._detach(target_dir, new_name)
            del source_dir.children[old_name]
            target_dir.children[new_name] = node.inode
            node.parent = target_dir.inode
        self._touch(source_dir)
        self._touch(target_dir)
        node.ctime_ns = time.time_ns()

    @_failable
    def create(
        self, parent: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[int, Attrs]:
        node = self._new(parent, name, "file", mode, caller)
        return self._open_handle(node), self._attrs(node)

    @_failable
    def open(self, inode: int, flags: int, caller: Caller) -> int:
        node = self._node(inode)
        if node.kind == "dir":
            raise IsADirectory()
        if flags & os.O_TRUNC and node.kind == "file":
            del node.data[:]
            self._touch(node)
        return self._open_handle(node)

    @_failable
    def fallocate(self, inode: int, mode: int, offset: int, length: int) -> None:
        node = self._node(inode)
        if mode & ~(0x01 | 0x02 | 0x10):
            raise Unsupported()
        end = offset + length
        if mode & (0x02 | 0x10):
            stop = min(end, len(node.data))
            node.data[offset:stop] = bytes(max(0, stop - offset))
        if not mode & 0x01 and end > len(node.data):
            node.data.extend(bytes(end - len(node.data)))
        self._touch(node)

    async def load_for_read(self, fh: int, offset: int, size: int) -> None:
        """Nothing to load: the data is in memory."""

    @_failable
    def read(self, fh: int, offset: int, size: int) -> bytes:
        return bytes(self._handle(fh).data[offset : offset + size])

    @_failable
    def write(self, fh: int, offset: int, data: bytes) -> int:
        node = self._handle(fh)
        if offset > len(node.data):
            node.data.extend(bytes(offset - len(node.data)))
        node.data[offset : offset + len(data)] = data
        self._touch(node)
        return len(data)

    @_failable
    def flush(self, fh: int) -> None:
        self._handle(fh)

    @_failable
    def fsync(self, fh: int, datasync: bool) -> None:
        self._handle(fh)

    @_failable
    def release(self, fh: int) -> None:
        self._close_handle(fh)

    @_failable
    def releasedir(self, fh: int) -> None:
        self._close_handle(fh)

    @_failable
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        self._handle(fh)

    @_failable
    def statfs(self) -> FsStats:
        used = sum(len(n.data) for n in self.nodes.values()) // 4096
        return FsStats(
            block_size=4096,
            blocks=1 << 20,
            blocks_free=(1 << 20) - used,
            blocks_avail=(1 << 20) - used,
            files=1 << 20,
            files_free=(1 << 20) - len(self.nodes),
            name_max=NAME_MAX,
        )

    @_failable
    def getxattr(self, inode: int, name: bytes) -> bytes:
        value = self._node(inode).xattrs.get(name)
        if value is None:
            raise NoAttribute()
        return value

    @_failable
    def setxattr(self, inode: int, name: bytes, value: bytes, flags: int) -> None:
        node = self._node(inode)
        if flags & XATTR_CREATE and name in node.xattrs:
            raise Exists()
        if flags & XATTR_REPLACE and name not in node.xattrs:
            raise NoAttribute()
        node.xattrs[name] = value
        node.ctime_ns = time.time_ns()

    @_failable
    def listxattr(self, inode: int) -> Sequence[bytes]:
        return sorted(self._node(inode).xattrs)

    @_failable
    def removexattr(self, inode: int, name: bytes) -> None:
        if self._node(inode).xattrs.pop(name, None) is None:
            raise NoAttribute()


# -- the runner ------------------------------------------------------------------------
async def _command(line: str, volume: MemVolume, operations: Any) -> object:
    """Carry out one control command; returns what `ok` reports."""
    words = line.split()
    match words:
        case ["fail", method]:
            volume.fail(method)
        case ["fail", method, name]:
            volume.fail(method, os.fsencode(name))
        case ["heal"]:
            volume.heal()
        case ["populate", path, count]:
            volume.populate(path, int(count))
        case ["lookups", path]:
            directory = volume.resolve(path)
            return {
                os.fsdecode(name): volume.nodes[i].lookups for name, i in directory.children.items()
            }
        case ["nodes"]:
            return len(volume.nodes)
        case ["imported", module]:
            return module in sys.modules
        case ["remote-write", path, text, *rest]:
            inode = volume.remote_write(path, text.encode())
            if rest != ["quiet"]:
                await operations.invalidate(inodes=[inode])
            return inode
        case ["remote-unlink", path, *rest]:
            entry = volume.remote_unlink(path)
            if rest != ["quiet"]:
                await operations.invalidate(entries=[entry])
        case _:
            raise ValueError(f"unknown command: {line!r}")
    return None


async def _control(volume: MemVolume, operations: Any) -> None:
    """Answer commands from stdin, one line each, until stdin closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    try:
        while line := (await reader.readline()).decode():
            try:
                result = await _command(line, volume, operations)
            except Exception as exc:
                print(f"error {type(exc).__name__}: {exc}", flush=True)
            else:
                print(f"ok {json.dumps(result)}", flush=True)
    finally:
        transport.close()


async def _run(mountpoint: str, *, debug_fuse: bool) -> None:
    from fuse.adapter import FuseOperations
    from fuse.mount import serve, terminate

    volume = MemVolume()
    operations = FuseOperations(volume)
    loop = asyncio.get_running_loop()
    async with asyncio.TaskGroup() as tasks:
        serving = tasks.create_task(
            serve(
                operations,
                mountpoint,
                read_only=False,
                debug_fuse=debug_fuse,
                ready=lambda: print("ready", flush=True),
            )
        )
        control = tasks.create_task(_control(volume, operations))
        # Both ways to stop: cancelling serve, and terminate() (what peer.node does).
        loop.add_signal_handler(signal.SIGTERM, serving.cancel)
        loop.add_signal_handler(signal.SIGINT, terminate)
        await asyncio.wait({serving})
        control.cancel()
    log.info("runner done")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--debug-fuse", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(_run(args.mountpoint, debug_fuse=args.debug_fuse))


if __name__ == "__main__":
    main()
