"""Encrypted blocks: sealing on the way in, verifying on the way out, and a cache.

Invariant: a plaintext handed out by `Blocks.get` always hashes (keyed) to the
id it was asked for. Ids are content hashes, so a cached block can never be
stale: the cache needs no invalidation, only a bound.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from peer.errors import CorruptBlock
from peer.keys import VolumeKeys
from peer.sealing import (
    MAX_PATCH_DEPTH,
    PATCH_VERSION,
    Patch,
    open_sealed,
    seal_block,
    seal_patch,
    whole_block_length,
)
from peer.storage.store import Store

log = logging.getLogger("peer.blocks")

# 64 MiB of decrypted blocks: enough to keep the working set of a few large
# sequential readers plus many small files, small next to the node's memory.
CACHE_BYTES = 64 * 1024 * 1024


# Blocks whose shape is remembered (`Blocks.shape`), ~100 bytes each for a
# whole block, a few hundred for a patch: a few MiB at most.
_SHAPES_KEPT = 1 << 15
# What `Blocks` remembers of a block: its length for a whole one, (depth,
# base, length, spans written) for a patch.
_Known = int | tuple[int, bytes, int, tuple[tuple[int, int], ...]]


@dataclass(frozen=True, slots=True)
class Shape:
    """A block as a whole block (`root`) with `spans` ([start, end) ranges)
    written over it (none: it is that whole block), `length` bytes long."""

    root: bytes
    length: int
    spans: tuple[tuple[int, int], ...]


# From this many blocks on, `Blocks.seal` uses the thread pool.
_PARALLEL_MIN = 4
_pool: ThreadPoolExecutor | None = None


def _sealers() -> ThreadPoolExecutor:
    """The threads that seal many blocks at once, one per core, made at first use."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(
            max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="seal"
        )
    return _pool


class MissingBlock(Exception):
    """A block the merged state references is not in the local store (yet)."""


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    entries: int
    bytes: int
    hits: int
    misses: int


class BlockCache:
    """A bounded LRU of decrypted blocks keyed by block id."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self._limit = limit
        self._data: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0

    def get(self, bid: bytes) -> bytes | None:
        data = self._data.get(bid)
        if data is None:
            self._misses += 1
            return None
        self._hits += 1
        self._data.move_to_end(bid)
        return data

    def holds(self, bid: bytes) -> bool:
        return bid in self._data

    def put(self, bid: bytes, data: bytes) -> None:
        if bid in self._data or len(data) > self._limit:
            return
        self._data[bid] = data
        self._bytes += len(data)
        while self._bytes > self._limit:
            _, old = self._data.popitem(last=False)
            self._bytes -= len(old)

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(len(self._data), self._bytes, self._hits, self._misses)


class Blocks:
    """The node's block store: sealed blocks in SQLite, plaintext in a cache."""

    def __init__(self, store: Store, keys: VolumeKeys, cache: BlockCache | None = None) -> None:
        self._store = store
        self._keys = keys
        self.cache = cache if cache is not None else BlockCache()
        # bid -> what is known of it (`_Known`): see `shape`.
        self._shapes: dict[bytes, _Known] = {}

    def seal(self, plaintexts: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
        """(id, sealed) for each plaintext; the plaintexts enter the cache.

        Many blocks are sealed and hashed on all cores: PyNaCl's calls release
        the GIL (one thread alone seals ~170 MB/s on the test machine)."""
        data = list(plaintexts)
        if len(data) < _PARALLEL_MIN:
            out = [seal_block(self._keys, d) for d in data]
        else:
            out = list(_sealers().map(partial(seal_block, self._keys), data))
        for d, (bid, _) in zip(data, out, strict=True):
            self.cache.put(bid, d)
            self._note(bid, None, len(d))
        return out

    def seal_patch(self, patch: Patch, plaintext: bytes | None) -> tuple[bytes, bytes]:
        """(id, sealed) of `patch`, whose block reads `plaintext` (cached, if given)."""
        pid, sealed = seal_patch(self._keys, patch)
        if plaintext is not None:
            self.cache.put(pid, plaintext)
        self._note(pid, patch, patch.length)
        return pid, sealed

    def shape(self, bid: bytes) -> Shape | None:
        """What `bid` is, if known here (sealed or read since the node started)
        and a whole block or a patch over one; None otherwise (deeper, or not
        known). A new patch is made over that whole block with the ranges of
        both, so chains do not grow."""
        shape = self._shapes.get(bid)
        if shape is None:
            shape = self._learn_shape(bid)
            if shape is None:
                return None
        if isinstance(shape, int):
            return Shape(bid, shape, ())
        depth, base, length, spans = shape
        return Shape(base, length, spans) if depth == 1 else None

    def _learn_shape(self, bid: bytes) -> _Known | None:
        """What `bid` is, without opening a whole block: a full one shows in
        its sealed length (a database's pages, a disk image's blocks after a
        restart); a patch is opened (a few KiB). None if neither."""
        header = self._store.block_header(bid)
        if header is None:
            return None
        length, version = header
        if version == PATCH_VERSION:
            patch = self.patch(bid)
            if patch is None:
                return None
            self._note(bid, patch, patch.length)
        else:
            full = whole_block_length(length, version)
            if full is None:
                return None
            self._note(bid, None, full)
        return self._shapes.get(bid)

    def patch(self, bid: bytes) -> Patch | None:
        """The patch `bid` is, opened (not applied); None if it is not one or
        does not open (a read of its block then says what is wrong)."""
        sealed = self._store.get_block(bid)
        if sealed is None:
            return None
        try:
            opened = open_sealed(self._keys, bid, sealed, check_id=False)
        except CorruptBlock:
            return None
        return opened if isinstance(opened, Patch) else None

    def _note(self, bid: bytes, patch: Patch | None, length: int) -> None:
        if len(self._shapes) >= _SHAPES_KEPT:
            self._shapes.clear()  # forgotten ones are learnt again when read
        if patch is None:
            self._shapes[bid] = length
        else:
            spans = tuple((o, o + len(d)) for o, d in patch.ranges)
            self._shapes[bid] = (patch.depth, patch.base, patch.length, spans)

    def cached(self, bid: bytes) -> bool:
        """Whether `bid`'s plaintext is in the cache (no hit or miss counted)."""
        return self.cache.holds(bid)

    def open_stored(self, ids: Iterable[bytes]) -> dict[bytes, bytes]:
        """The plaintexts of those of `ids` the store holds and that open; the
        rest are left to `get`, which says what is wrong. Reads and opens only:
        a worker thread runs it (SQLite, libsodium and BLAKE2b let go of the
        GIL), so reads of several blocks use more than one core."""
        out: dict[bytes, bytes] = {}
        for bid in ids:
            try:
                out[bid] = self._open(bid, MAX_PATCH_DEPTH + 1, cache=False)[0]
            except (MissingBlock, CorruptBlock):
                continue
        return out

    def get(self, bid: bytes) -> bytes:
        data = self.cache.get(bid)
        if data is not None:
            return data
        try:
            data = self._open(bid, MAX_PATCH_DEPTH + 1)[0]
        except CorruptBlock as exc:
            bad = exc.bid or bid
            log.error("corrupt block id=%s: removed from the store", bad[:8].hex())
            with self._store.transaction():
                self._store.delete_block(bad)
            raise
        self.cache.put(bid, data)
        return data

    def _open(self, bid: bytes, below: int, cache: bool = True) -> tuple[bytes, int]:
        """(plaintext, depth) of `bid`, a block or a patch (applied to its base,
        opened the same way); a patch must stand below `below` patches, so a
        chain, even a forged circular one, ends within `MAX_PATCH_DEPTH` steps.
        `cache=False` (on a worker thread): the cache, the loop's, is not touched."""
        shape = self._shapes.get(bid)
        if shape is not None and cache:
            cached = self.cache.get(bid)
            if cached is not None:
                return cached, 0 if isinstance(shape, int) else shape[0]
        sealed = self._store.get_block(bid)
        if sealed is None:
            raise MissingBlock(bid.hex())
        try:
            # The id is not hashed again: every block and patch was checked when
            # it entered the store (sealed here from its plaintext, or opened in
            # full when a peer sent it); the MAC still catches any change on disk.
            opened = open_sealed(self._keys, bid, sealed, check_id=False)
        except CorruptBlock as exc:
            raise CorruptBlock(str(exc), bid) from exc
        if isinstance(opened, bytes):
            self._note(bid, None, len(opened))
            return opened, 0
        if opened.depth >= below:
            raise CorruptBlock(f"patch {bid.hex()}: depth {opened.depth} in a chain", bid)
        base, base_depth = self._open(opened.base, opened.depth, cache)
        if base_depth != opened.depth - 1:
            raise CorruptBlock(f"patch {bid.hex()}: its base is at depth {base_depth}", bid)
        data = opened.apply(base)
        self._note(bid, opened, opened.length)
        if cache:
            self.cache.put(bid, data)
        return data, opened.depth
