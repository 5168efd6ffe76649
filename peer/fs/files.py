"""Files: open handles, reads, and the write buffers that become one `Write`
operation on flush, fsync, release, or past `DIRTY_LIMIT`."""

from __future__ import annotations

import asyncio
import bisect
import errno
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from crdt.clock import Hlc
from crdt.content import blocks_for
from crdt.merge import EntryView, Replica
from crdt.ops import BLOCK_SIZE, MAX_BLOCKS_PER_WRITE, MAX_FILE_SIZE, Kind, Op, Write
from fuse.errors import (
    AccessDenied,
    BadHandle,
    InvalidArgument,
    IsADirectory,
    NoSpace,
    Retry,
    TooBig,
    Unsupported,
    VolumeError,
)
from fuse.protocol import Attrs, Caller
from peer.errors import CorruptBlock
from peer.sealing import MAX_PATCH_BYTES, MAX_PATCH_DEPTH, Patch
from peer.storage.blocks import (
    Blocks,
    MissingBlock,
    Shape,
    clip_spans,
    merge_spans,
    openers,
)
from peer.storage.journal import Journal
from peer.storage.store import Store

# What `Journal.commit` takes: a maker of ops, given the stamp to give each.
MakeOps = Callable[[Callable[[], Hlc]], list[Op]]

# Logs under the name its messages had before it left volume.py.
log = logging.getLogger("peer.volume")

# Dirty data kept in memory per file before it is sealed and logged anyway.
DIRTY_LIMIT = 32 * 1024 * 1024
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


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
    # Blocks read from a stored block and only written into since: {index:
    # (the whole block under it, the [start, end) ranges that differ from that
    # one)}, flushed as a patch (`_patch_of`) when few bytes differ.
    patchable: dict[int, tuple[bytes, list[tuple[int, int]]]] = field(default_factory=dict)
    # Blocks written into but not read (`_Sparse`): a write inside a stored
    # block does not open it, unless a read, a truncate or a flush as a whole
    # block needs its bytes (`Files._materialize`).
    sparse: dict[int, _Sparse] = field(default_factory=dict)

    def bytes(self) -> int:
        return sum(len(b) for b in self.blocks.values()) + sum(
            sparse.written for sparse in self.sparse.values()
        )


@dataclass(slots=True)
class _Sparse:
    """Writes inside block `bid` (a whole block or a patch over `shape.root`)
    of `length` bytes as read, kept without opening it."""

    bid: bytes
    shape: Shape
    length: int
    writes: list[tuple[int, bytes]] = field(default_factory=list)
    written: int = 0

    def spans(self) -> list[tuple[int, int]]:
        """[start, end) of each write, in the order written."""
        return [(o, o + len(d)) for o, d in self.writes]


@dataclass(slots=True)
class _Handle:
    entry: bytes
    inode: int
    writable: bool
    append: bool


class Files:
    """`Volume`'s files and write buffers; see `peer.fs.volume`."""

    if TYPE_CHECKING:
        _dirty: dict[bytes, _Dirty]
        _failed: set[bytes]
        _handles: dict[int, _Handle]
        _next_fh: int
        _open_count: dict[bytes, int]
        blocks: Blocks
        journal: Journal
        refetch: Callable[[bytes], Awaitable[bool]] | None
        replica: Replica
        store: Store

        def _new_entry(
            self,
            parent: int,
            name: bytes,
            kind: Kind,
            mode: int,
            caller: Caller,
            target: bytes = b"",
            rdev: int = 0,
        ) -> Attrs: ...
        def _view(self, entry: bytes) -> EntryView: ...
        def _writable(self) -> None: ...
        def entry_of(self, inode: int) -> bytes: ...

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
                # (For a patch whose base is the one lost, fetching the patch
                # fetches the base too: `Fetching._fetch`.)
                log.warning("block %d unreadable here (%s): asking peers for it", index, exc)
                raise Retry(lambda: refetch(bid)) from exc
            log.error("cannot read block %d: %s", index, exc)
            raise IOFailure() from exc

    def blocks_to_open(self, fh: int, offset: int, size: int) -> list[bytes]:
        """The stored blocks `read` of this range would open that are not in
        the plaintext cache: opened first in a worker thread (`open_stored`),
        they make the read itself a copy from the cache."""
        handle = self._handles.get(fh)
        if handle is None:
            return []
        entry = handle.entry
        dirty = self._dirty.get(entry)
        end = min(offset + size, self._size(entry))
        version = dirty.base if dirty is not None else self._version(entry)
        if offset >= end or version is None:
            return []
        block_map = self.replica.block_map(version)
        out = []
        for index in range(offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1):
            if dirty is not None and index in dirty.blocks:
                continue
            bid = block_map.get(index)
            if bid is not None and not self.blocks.cached(bid):
                out.append(bid)
        return out

    async def load_for_read(self, fh: int, offset: int, size: int) -> None:
        """Decrypt and check the blocks a read needs on an opener thread
        (`peer.storage.blocks.openers`), so the loop takes the next request
        meanwhile (the kernel sends reads ahead); `read` then sees the state
        of then and copies from the cache."""
        opening = self.blocks_to_open(fh, offset, size)
        if opening:
            loop = asyncio.get_running_loop()
            opened = await loop.run_in_executor(openers(), self.blocks.open_stored, opening)
            for bid, data in opened.items():
                self.blocks.cache.put(bid, data)

    def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handle(fh)
        entry = handle.entry
        dirty = self._dirty.get(entry)
        file_size = self._size(entry)
        end = min(offset + size, file_size)
        if offset >= end:
            return b""
        version = dirty.base if dirty is not None else self._version(entry)
        out: list[bytes | bytearray] = []  # joined once: a 1 MiB read is 8 blocks
        pos = offset
        while pos < end:
            index, skip = divmod(pos, BLOCK_SIZE)
            take = min(BLOCK_SIZE - skip, end - pos)
            data: bytes | bytearray
            if dirty is not None and index in dirty.sparse:
                data = self._materialize(dirty, index)
            elif dirty is not None and index in dirty.blocks:
                data = dirty.blocks[index]
            elif dirty is not None and (
                index in dirty.holes or (dirty.truncated and index >= blocks_for(dirty.size))
            ):
                data = b""
            else:
                data = self._stored_block(version, index)
            piece = data[skip : skip + take]  # a whole block's bytes: no copy
            out.append(piece)
            if len(piece) < take:
                out.append(bytes(take - len(piece)))  # a hole or the zeroed tail of a block
            pos += take
        return out[0] if len(out) == 1 and isinstance(out[0], bytes) else b"".join(out)

    def _dirty_for(self, entry: bytes) -> _Dirty:
        dirty = self._dirty.get(entry)
        if dirty is None:
            version = self._version(entry)
            size = self.replica.version_size(version) if version is not None else 0
            dirty = _Dirty(version, size)
            self._dirty[entry] = dirty
        return dirty

    def _load_block(self, dirty: _Dirty, index: int) -> bytearray:
        if index in dirty.sparse:
            return self._materialize(dirty, index)
        block = dirty.blocks.get(index)
        if block is None:
            if index in dirty.holes or (dirty.truncated and index >= blocks_for(dirty.size)):
                dirty.holes.discard(index)  # written into: a block of data again
                block = bytearray()
            else:
                block = bytearray(self._stored_block(dirty.base, index))
                bid = self.replica.block_map(dirty.base).get(index) if dirty.base else None
                shape = self.blocks.shape(bid) if bid is not None else None
                if shape is not None:
                    dirty.patchable[index] = (shape.root, list(shape.spans))
            # bytes past the file's end inside the last block read as zeros
            limit = max(0, dirty.size - index * BLOCK_SIZE)
            del block[limit:]
            dirty.blocks[index] = block
        return block

    def _sparse_for(self, dirty: _Dirty, index: int, skip: int, take: int) -> _Sparse | None:
        """Where a write of [skip, skip + take) into block `index` can go
        without opening the block: a block not read or written yet, stored and
        known here (`Blocks.shape`), that the write stays inside; else None."""
        sparse = dirty.sparse.get(index)
        if sparse is None:
            if index in dirty.blocks or dirty.base is None or index in dirty.holes:
                return None
            if dirty.truncated and index >= blocks_for(dirty.size):
                return None
            bid = self.replica.block_map(dirty.base).get(index)
            shape = self.blocks.shape(bid) if bid is not None else None
            if bid is None or shape is None:
                return None
            length = min(shape.length, max(0, dirty.size - index * BLOCK_SIZE))
            if skip + take > length:
                return None
            sparse = dirty.sparse[index] = _Sparse(bid, shape, length)
        elif skip + take > sparse.length:
            return None
        return sparse

    def _materialize(self, dirty: _Dirty, index: int) -> bytearray:
        """Block `index` read and its sparse writes applied: a whole dirty block
        from now on (still flushed as a patch if few bytes differ)."""
        sparse = dirty.sparse[index]
        if merge_spans(sparse.spans()) == [(0, sparse.length)]:
            block = bytearray(sparse.length)  # all of it written over: nothing to read
        else:
            block = bytearray(self._stored_block(dirty.base, index))
            del block[sparse.length :]
        for offset, data in sparse.writes:
            block[offset : offset + len(data)] = data
        del dirty.sparse[index]
        dirty.patchable[index] = (sparse.shape.root, list(sparse.shape.spans) + sparse.spans())
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
            sparse = self._sparse_for(dirty, index, skip, take)
            if sparse is not None:
                sparse.writes.append((skip, bytes(data[pos : pos + take])))
                sparse.written += take
                dirty.changed.add(index)
                pos += take
                continue
            block = self._load_block(dirty, index)
            if len(block) < skip:
                block.extend(bytes(skip - len(block)))
            block[skip : skip + take] = data[pos : pos + take]
            dirty.changed.add(index)
            patchable = dirty.patchable.get(index)
            if patchable is not None:
                patchable[1].append((skip, skip + take))
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
            for index in [i for i in dirty.sparse if i >= keep]:
                del dirty.sparse[index]
                dirty.changed.discard(index)
            for index in [i for i in dirty.blocks if i >= keep]:
                del dirty.blocks[index]
                dirty.changed.discard(index)
                dirty.patchable.pop(index, None)
            dirty.changed -= {i for i in dirty.holes if i >= keep}
            dirty.holes = {i for i in dirty.holes if i < keep}
            dirty.truncated = True
            if size % BLOCK_SIZE:
                last = size // BLOCK_SIZE
                block = self._load_block(dirty, last)
                del block[size - last * BLOCK_SIZE :]
                dirty.changed.add(last)
                dirty.patchable.pop(last, None)
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
                dirty.sparse.pop(index, None)
                dirty.holes.add(index)
            else:
                block = self._load_block(dirty, index)
                cut = min(hi - first, len(block))
                block[lo - first : cut] = bytes(max(0, cut - (lo - first)))
            dirty.changed.add(index)
            dirty.patchable.pop(index, None)

    def _flush(self, entry: bytes, force: bool = False, then: MakeOps | None = None) -> None:
        """Commit what is buffered for `entry`; with `then`, the ops it makes
        go in the same commit, stamped after the write (one transaction)."""
        dirty = self._dirty.get(entry)
        if dirty is None or (
            not dirty.changed and not force and dirty.size == self._size_of_base(dirty)
        ):
            self._dirty.pop(entry, None)
            if then is not None:
                self.journal.commit(then)
            return
        whole: list[int] = []
        patches: list[tuple[int, Patch]] = []
        for i in sorted(dirty.changed - dirty.holes):
            if i in dirty.sparse:
                patch = self._sparse_patch(dirty.sparse[i])
                if patch is not None:
                    patches.append((i, patch))
                    continue
                self._materialize(dirty, i)
            patch = self._patch_of(dirty, i)
            if patch is None:
                whole.append(i)
            else:
                patches.append((i, patch))
        sealed = self.blocks.seal(bytes(dirty.blocks[i]) for i in whole)
        pairs: list[tuple[int, bytes | None]] = [
            (i, bid) for i, (bid, _) in zip(whole, sealed, strict=True)
        ]
        for i, patch in patches:
            block = dirty.blocks.get(i)
            pid, sealed_patch = self.blocks.seal_patch(
                patch, bytes(block) if block is not None else None
            )
            pairs.append((i, pid))
            sealed.append((pid, sealed_patch))
        pairs = sorted(pairs + [(i, None) for i in dirty.holes])

        def make(stamp: Callable[[], Hlc]) -> list[Op]:
            ops: list[Op] = []
            base = (dirty.base,) if dirty.base is not None else ()
            for start in range(0, max(len(pairs), 1), MAX_BLOCKS_PER_WRITE):
                chunk = tuple(pairs[start : start + MAX_BLOCKS_PER_WRITE])
                w = Write(stamp(), entry, base, dirty.size, tuple((i, b) for i, b in chunk))
                ops.append(w)
                base = (w.hlc,)
            return ops + then(stamp) if then is not None else ops

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

    def _patch_of(self, dirty: _Dirty, index: int) -> Patch | None:
        """A patch for block `index` if it was only written into since it was
        read from a stored block, and differs in few bytes (at most
        `MAX_PATCH_BYTES`, and less than half) from the whole block under it;
        else None (the whole block is sealed). The block was read whole, so the
        patch is over that whole block with the changes of every patch it stood
        on too: one patch instead of a chain."""
        patchable = dirty.patchable.get(index)
        if patchable is None:
            return None
        base, written = patchable
        block = dirty.blocks[index]
        return _patch_over(base, block, written, len(block))

    def _sparse_patch(self, sparse: _Sparse) -> Patch | None:
        """`_patch_of` for a block written without being read, made without
        reading it: a patch of just these writes over the block as it was
        (whole, or a patch itself), so a 4 KiB write seals ~8 KiB and reads
        nothing. Once `MAX_PATCH_DEPTH` patches stand on the whole block, one
        patch over it takes every change of the chain (its patches are read, a
        few KiB each, not the whole block). None if too much of the block
        differs from its whole block, or the chain does not open: then the
        block is read and sealed as it is."""
        shape = sparse.shape
        written = merge_spans(sparse.spans())
        if written == [(0, sparse.length)]:
            return None  # written over whole: sealed whole, nothing read
        changed = merge_spans(clip_spans(shape.spans, sparse.length) + written)
        if not _small(changed, sparse.length):
            return None
        if shape.depth < MAX_PATCH_DEPTH:
            ranges = _ranges(sparse.writes, written)
            return Patch(sparse.bid, shape.depth + 1, sparse.length, ranges)
        chain = self.blocks.chain(sparse.bid)
        if chain is None:
            return None
        buf = bytearray(sparse.length)
        for offset, data in [r for p in chain for r in p.ranges] + sparse.writes:
            piece = data[: max(0, sparse.length - offset)]
            buf[offset : offset + len(piece)] = piece
        return _patch_over(shape.root, buf, changed, sparse.length)

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


def _small(spans: list[tuple[int, int]], length: int) -> bool:
    """Whether changes at `spans` (merged) to a block of `length` bytes are
    few enough for a patch: at most `MAX_PATCH_BYTES` and under half the
    block (else the block itself is as small, and sealed whole it lets what
    it stood on go)."""
    changed = sum(end - start for start, end in spans)
    return changed <= MAX_PATCH_BYTES and 2 * changed <= length


def _patch_over(
    root: bytes, content: bytes | bytearray, spans: list[tuple[int, int]], length: int
) -> Patch | None:
    """A patch over whole block `root` carrying `content`'s bytes at `spans`
    for a block of `length` bytes; None if they are not `_small`."""
    merged = merge_spans(spans)
    if not _small(merged, length):
        return None
    return Patch(
        root, 1, length, tuple((start, bytes(content[start:end])) for start, end in merged)
    )


def _ranges(
    writes: list[tuple[int, bytes]], merged: list[tuple[int, int]]
) -> tuple[tuple[int, bytes], ...]:
    """The ranges a patch carries for `writes` ((offset, bytes), later ones
    over earlier ones): one per run of touching writes (`merged`, their
    spans merged), in order."""
    starts = [start for start, _ in merged]
    runs = [bytearray(end - start) for start, end in merged]
    for offset, data in writes:
        k = bisect.bisect_right(starts, offset) - 1
        at = offset - starts[k]
        runs[k][at : at + len(data)] = data
    return tuple((start, bytes(run)) for start, run in zip(starts, runs, strict=True))
