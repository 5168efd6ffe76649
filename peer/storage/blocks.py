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
from peer.sealing import open_block, seal_block
from peer.storage.store import Store

log = logging.getLogger("peer.blocks")

# 64 MiB of decrypted blocks: enough to keep the working set of a few large
# sequential readers plus many small files, small next to the node's memory.
CACHE_BYTES = 64 * 1024 * 1024


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
        return out

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
            sealed = self._store.get_block(bid)
            if sealed is None:
                continue
            try:
                out[bid] = open_block(self._keys, bid, sealed, check_id=False)
            except CorruptBlock:
                continue
        return out

    def get(self, bid: bytes) -> bytes:
        data = self.cache.get(bid)
        if data is not None:
            return data
        sealed = self._store.get_block(bid)
        if sealed is None:
            raise MissingBlock(bid.hex())
        try:
            data = open_block(self._keys, bid, sealed, check_id=False)  # (checked on entry)
        except CorruptBlock:
            log.error("corrupt block id=%s: removed from the store", bid[:8].hex())
            with self._store.transaction():
                self._store.delete_block(bid)
            raise
        self.cache.put(bid, data)
        return data
