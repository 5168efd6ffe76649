"""Encrypted blocks: sealing on the way in, verifying on the way out, and a cache.

Invariant: a plaintext handed out by `Blocks.get` always hashes (keyed) to the
id it was asked for. Ids are content hashes, so a cached block can never be
stale: the cache needs no invalidation, only a bound.
"""

from __future__ import annotations

import logging
import os
import sqlite3
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
# Bytes of patch ranges `Blocks.patch` keeps opened (a patch is ~4-32 KiB).
_PATCHES_KEPT = 4 * 1024 * 1024
# What `Blocks` remembers of a block: its length for a whole one, (depth,
# base, root, length, spans written over the root) for a patch.
_Known = int | tuple[int, bytes, bytes, int, tuple[tuple[int, int], ...]]


@dataclass(frozen=True, slots=True)
class Shape:
    """A block as a whole block (`root`) with `spans` ([start, end) ranges,
    sorted and apart) written over it by the `depth` patches it stands on
    (none: it is that whole block), `length` bytes long."""

    root: bytes
    length: int
    spans: tuple[tuple[int, int], ...]
    depth: int = 0


def merge_spans(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) spans sorted, overlapping or touching ones joined, empty ones dropped."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def clip_spans(spans: Iterable[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """`spans` cut at `length` (a shorter block keeps only what is inside it)."""
    return [(start, min(end, length)) for start, end in spans if start < length]


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


_opener: ThreadPoolExecutor | None = None
# Threads that open stored blocks for reads, each on a connection of its own.
_OPENERS = 2


def openers() -> ThreadPoolExecutor:
    """The threads that open stored blocks for reads (`open_stored`), made at
    first use. Two, each reading the store on a connection of its own
    (`Store.read_block`): the kernel sends a sequential read's requests five
    to eight at a time, and SQLite's reads and libsodium's decryption let go
    of the GIL, so both open blocks at once while the loop answers. Measured
    on two cores (256 MiB read after a remount): one thread on the store's
    shared connection 250-314 MB/s; two on their own 326-470 MB/s with the
    read's pieces joined once. Asyncio's default pool (six threads) on the
    shared connection was slower than one: they took turns at its lock."""
    global _opener
    if _opener is None:
        _opener = ThreadPoolExecutor(max_workers=_OPENERS, thread_name_prefix="open")
    return _opener


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
        # Patches opened or sealed here lately, by id (`patch`), within
        # `_PATCHES_KEPT` bytes of ranges: the next small writes into their
        # blocks stack on them and, at the end of a chain, take their ranges.
        self._patches: OrderedDict[bytes, Patch] = OrderedDict()
        self._patch_bytes = 0

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
        self._keep_patch(pid, patch)
        return pid, sealed

    def shape(self, bid: bytes) -> Shape | None:
        """What `bid` is, if known here (sealed or read since the node started,
        or learnt from the store): a whole block, or a patch standing on one
        through at most `MAX_PATCH_DEPTH` patches; None if not known or not
        sound (then the block is read in full, which says what is wrong)."""
        shape = self._shapes.get(bid)
        if shape is None:
            shape = self._learn_shape(bid, MAX_PATCH_DEPTH + 1)
            if shape is None:
                return None
        if isinstance(shape, int):
            return Shape(bid, shape, ())
        depth, _base, root, length, spans = shape
        return Shape(root, length, spans, depth)

    def _learn_shape(self, bid: bytes, below: int) -> _Known | None:
        """What `bid` is, without opening a whole block: a full one shows in
        its sealed length (a database's pages, a disk image's blocks after a
        restart); a patch is opened (a few KiB), and so is each patch under it,
        each one less deep than the one above (`below`), as a read checks. None
        if neither, or if the chain is not sound."""
        header = self._store.block_header(bid)
        if header is None:
            return None
        length, version = header
        if version == PATCH_VERSION:
            patch = self.patch(bid)
            if patch is None or patch.depth >= below:
                return None
            if patch.depth > 1 and patch.base not in self._shapes:
                self._learn_shape(patch.base, patch.depth)
            self._note(bid, patch, patch.length)  # (not noted if its base is not sound)
        else:
            full = whole_block_length(length, version)
            if full is None:
                return None
            self._note(bid, None, full)
        return self._shapes.get(bid)

    def chain(self, bid: bytes) -> list[Patch] | None:
        """The patches `bid` stands on, from the one over the whole block up
        to `bid` itself, opened (each a few KiB; the whole block is not read);
        None unless `bid` is a patch whose chain is sound: each one deeper by
        one than its base and no longer than it."""
        out: list[Patch] = []
        cur = bid
        for _ in range(MAX_PATCH_DEPTH):
            patch = self.patch(cur)
            if patch is None:
                return None
            if out and (patch.depth != out[-1].depth - 1 or patch.length < out[-1].length):
                return None
            out.append(patch)
            if patch.depth == 1:
                return out[::-1]
            cur = patch.base
        return None

    def patch(self, bid: bytes) -> Patch | None:
        """The patch `bid` is, opened (not applied); None if it is not one or
        does not open (a read of its block then says what is wrong). Ids are
        content hashes, so one kept from earlier is never stale."""
        kept = self._patches.get(bid)
        if kept is not None:
            self._patches.move_to_end(bid)
            return kept
        sealed = self._store.get_block(bid)
        if sealed is None:
            return None
        try:
            opened = open_sealed(self._keys, bid, sealed, check_id=False)
        except CorruptBlock:
            return None
        if not isinstance(opened, Patch):
            return None
        self._keep_patch(bid, opened)
        return opened

    def _keep_patch(self, bid: bytes, patch: Patch) -> None:
        if bid in self._patches:
            return
        self._patches[bid] = patch
        self._patch_bytes += patch.changed()
        while self._patch_bytes > _PATCHES_KEPT:
            _, old = self._patches.popitem(last=False)
            self._patch_bytes -= old.changed()

    def _note(self, bid: bytes, patch: Patch | None, length: int) -> None:
        if len(self._shapes) >= _SHAPES_KEPT:
            self._shapes.clear()  # forgotten ones are learnt again when read
        if patch is None:
            self._shapes[bid] = length
            return
        root, under = patch.base, []
        if patch.depth > 1:
            base = self._shapes.get(patch.base)
            if not isinstance(base, tuple) or base[0] != patch.depth - 1:
                return  # its base is not known here: `shape` learns both when asked
            root, under = base[2], clip_spans(base[4], length)
        spans = merge_spans(under + [(o, o + len(d)) for o, d in patch.ranges])
        self._shapes[bid] = (patch.depth, patch.base, root, length, tuple(spans))

    def cached(self, bid: bytes) -> bool:
        """Whether `bid`'s plaintext is in the cache (no hit or miss counted)."""
        return self.cache.holds(bid)

    def open_stored(self, ids: Iterable[bytes]) -> dict[bytes, bytes]:
        """The plaintexts of those of `ids` the store holds and that open; the
        rest are left to `get`, which says what is wrong. Reads and opens only:
        the opener threads (`openers`) run it beside the loop (SQLite and
        libsodium let go of the GIL), so a read uses both cores."""
        out: dict[bytes, bytes] = {}
        for bid in ids:
            try:
                out[bid] = self._open(bid, MAX_PATCH_DEPTH + 1, cache=False)[0]
            except (MissingBlock, CorruptBlock, sqlite3.Error):
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
        `cache=False` (on an opener thread): the cache, the loop's, is not
        touched, and the store is read on the thread's own connection."""
        shape = self._shapes.get(bid)
        if shape is not None and cache:
            cached = self.cache.get(bid)
            if cached is not None:
                return cached, 0 if isinstance(shape, int) else shape[0]
        sealed = self._store.get_block(bid) if cache else self._store.read_block(bid)
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
