"""Block fetching: the blocks merged operations need, from the peers that may
have them; blocks no peer had are asked for again later (`wanted`), and a
block found lost or damaged is fetched anew (`refetch`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import aiohttp

from crdt.ops import BLOCK_SIZE
from peer.errors import CorruptBlock
from peer.keys import VolumeKeys
from peer.metrics import Metrics
from peer.net import wire
from peer.net.auth import AuthFailed
from peer.net.client import PeerError
from peer.sealing import MAX_PATCH_DEPTH, open_sealed, patch_base
from peer.storage.store import Store

if TYPE_CHECKING:
    from peer.net.sync import Link
    from peer.storage.journal import Journal

# Logs under the name its messages had before it left sync.py.
log = logging.getLogger("peer.sync")

# Blocks asked per request (at most the protocol's `wire.BLOCKS_PER_REQUEST`,
# 64) and requests in flight at once. 16 blocks (2 MiB answers): each answer is
# held a few times over while it is read, checked and decoded, so 64-block
# answers made a 208 MiB catch-up peak at 109-112 MiB resident, 16-block ones
# at 75-77 MiB, for the same CPU.
FETCH_BLOCKS = 16
FETCH_CONCURRENCY = 4

REPAIR_TIMEOUT_S = 10.0

# A block the merged state needs that no peer had when its operations merged
# is asked for again after this long, doubling per failed try up to the cap,
# and at once whenever a peer connects.
WANTED_RETRY_MIN_S = 1.0

WANTED_RETRY_MAX_S = 300.0


class MissingBlocks(PeerError):
    """No connected peer could provide some blocks the merged state needs."""


class Fetching:
    """`Sync`'s block fetching; see `peer.net.sync`."""

    if TYPE_CHECKING:
        _inflight: dict[bytes, asyncio.Future[bytes | None]]
        _missing_blocks: int
        _missing_bytes: int
        _want_next: dict[bytes, tuple[float, float]]
        _want_wake: asyncio.Event
        blocks_in: int
        journal: Journal
        keys: VolumeKeys
        links: dict[tuple[str, int], Link]
        metrics: Metrics
        store: Store

    # -- blocks ----------------------------------------------------------------------
    def _sources(self, prefer: Link | None) -> list[Link]:
        others = [
            link
            for link in self.links.values()
            if link.connected and link is not prefer and link.client is not None
        ]
        random.shuffle(others)
        return ([prefer] if prefer is not None and prefer.client is not None else []) + others

    async def fetch(
        self, ids: Sequence[bytes], prefer: Link | None, optional: Sequence[bytes] = ()
    ) -> list[tuple[bytes, bytes]]:
        """Sealed blocks for `ids` and `optional`, each verified, from `prefer`
        first, then any other connected peer. `MissingBlocks` if some of `ids`
        cannot be had; `optional` ones no peer has are skipped."""
        got, missing = await self._fetch(ids, prefer, optional)
        if missing:
            raise MissingBlocks(f"{len(missing)} block(s) not available from any peer")
        return got

    async def _fetch(
        self,
        ids: Sequence[bytes],
        prefer: Link | None,
        optional: Sequence[bytes] = (),
        *,
        store: bool = False,
    ) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
        """As `fetch`, but the blocks of `ids` no peer had are returned, not raised.
        With `store`, each reply's blocks are stored as they arrive (the caller
        holds collection off) and the pairs returned carry no bytes.

        A patch (`peer.sealing.Patch`) is of no use without the block it is
        written over: the bases of the patches fetched that are not held here
        are fetched too, as required as the patch was, chain by chain."""
        got: list[tuple[bytes, bytes]] = []
        missing: list[bytes] = []
        for _ in range(MAX_PATCH_DEPTH + 1):
            bases: dict[bytes, bool] = {}  # base -> whether a required patch needs it
            more, lacking = await self._fetch_once(ids, prefer, optional, bases, store=store)
            got += more
            missing += lacking
            held = {bid for bid, _ in got} | self.store.has_blocks(bases)
            ids = [b for b, needed in bases.items() if needed and b not in held]
            optional = [b for b, needed in bases.items() if not needed and b not in held]
            if not ids and not optional:
                break
        return got, missing

    async def _fetch_once(
        self,
        ids: Sequence[bytes],
        prefer: Link | None,
        optional: Sequence[bytes],
        bases: dict[bytes, bool],
        *,
        store: bool,
    ) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
        """One round of `_fetch`; the bases of the patches it got go in `bases`."""
        required = list(ids)
        asked = set(required)
        ids = required + [b for b in optional if b not in asked]
        if not ids:
            return [], []
        got: dict[bytes, bytes] = {}
        per = _per_request()
        chunks = [list(ids[i : i + per]) for i in range(0, len(ids), per)]
        gate = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def one(chunk: list[bytes]) -> None:
            async with gate:
                want = chunk
                for link in self._sources(prefer):
                    assert link.client is not None
                    try:
                        pairs = await link.client.blocks(want)
                    except (
                        aiohttp.ClientError,
                        TimeoutError,
                        OSError,
                        PeerError,
                        AuthFailed,
                    ) as exc:
                        log.info("cannot fetch blocks: from=%s reason=%s", link.address, exc)
                        continue
                    except wire.BadMessage as exc:
                        log.warning("bad blocks reply: from=%s reason=%s", link.address, exc)
                        continue
                    verified = await asyncio.to_thread(self._verify, pairs, set(want), link)
                    for bid, sealed in verified.items():
                        base = patch_base(sealed)
                        if base is not None:
                            bases[base] = bases.get(base, False) or bid in asked
                    if store:
                        # On a worker thread: the commit writes a reply's blocks
                        # (up to 8 MiB) with the GIL let go, and the loop takes
                        # the next replies meanwhile (it was ~40% of its time).
                        await asyncio.to_thread(self.journal.store_blocks, list(verified.items()))
                        verified = dict.fromkeys(verified, b"")
                    got.update(verified)
                    self.metrics.blocks_received.labels(link.label).inc(len(verified))
                    self._missing_blocks = max(0, self._missing_blocks - len(verified))
                    self._missing_bytes = max(0, self._missing_bytes - BLOCK_SIZE * len(verified))
                    want = [b for b in want if b not in got]
                    if not want:
                        return

        async with asyncio.TaskGroup() as group:
            for chunk in chunks:
                group.create_task(one(chunk))
        missing = [b for b in required if b not in got]
        skipped = len(ids) - len(got) - len(missing)
        if skipped:
            log.debug("skipped blocks no peer keeps any more (history): count=%d", skipped)
        return list(got.items()), missing

    # -- wanted blocks ---------------------------------------------------------------
    def _now_wanted(self, lost: Sequence[bytes], link: Link) -> None:
        """Say so when operations merged without blocks no peer had."""
        if not lost:
            return
        log.warning(
            "merged operations without %d block(s) that no peer has: reads of the data "
            "they hold fail (EIO) until a peer has them; asking again in the background "
            "(from=%s wanted=%d)",
            len(lost),
            link.address,
            len(self.store.wanted_blocks()),
        )
        self._want_wake.set()

    async def _retry_wanted(self) -> None:
        """Ask peers for wanted blocks, with backoff per block, for as long as
        the node runs; at once whenever a peer connects or blocks become wanted."""
        while True:
            self._want_wake.clear()
            wanted = self.store.wanted_blocks()
            now = time.monotonic()
            for bid in set(self._want_next) - set(wanted):
                del self._want_next[bid]
            timeout: float | None = None
            if wanted and any(link.connected for link in self.links.values()):
                due = [b for b in wanted if self._want_next.get(b, (0.0, 0.0))[0] <= now]
                if due:
                    try:
                        await self._ask_wanted(due[: _per_request() * FETCH_CONCURRENCY])
                    except Exception:
                        # A bug, or a store we cannot write (a full disk): the
                        # node goes on, and this loop tries again later.
                        log.exception("asking peers for wanted blocks failed")
                        await asyncio.sleep(WANTED_RETRY_MAX_S)
                    continue
                timeout = max(0.0, min(self._want_next[b][0] for b in wanted) - now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._want_wake.wait()

    async def _ask_wanted(self, due: list[bytes]) -> None:
        held = self.store.has_blocks(due)
        got, missing = await self._fetch([b for b in due if b not in held], prefer=None)
        arrived = held | {bid for bid, _ in got}
        with self.store.transaction():
            self.store.put_blocks(got)
            self.store.unwant_blocks(arrived)
        now = time.monotonic()
        for bid in missing:
            delay = self._want_next.get(bid, (0.0, 0.0))[1]
            delay = min(max(delay * 2, WANTED_RETRY_MIN_S), WANTED_RETRY_MAX_S)
            self._want_next[bid] = (now + delay * random.uniform(0.8, 1.2), delay)
        if got:
            self.blocks_in += len(got)
            log.info(
                "wanted blocks arrived: count=%d still_wanted=%d",
                len(got),
                len(self.store.wanted_blocks()),
            )

    def _verify(
        self, pairs: list[tuple[bytes, bytes]], wanted: set[bytes], link: Link
    ) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for bid, sealed in pairs:
            if bid not in wanted:
                continue
            try:
                open_sealed(self.keys, bid, sealed)
            except CorruptBlock as exc:
                log.warning("peer sent a corrupt block: from=%s error=%s", link.address, exc)
                continue
            out[bid] = sealed
        return out

    async def refetch(self, bid: bytes) -> bool:
        """Get a block this node lost or found damaged from a peer; True once stored."""
        future = self._inflight.get(bid)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._inflight[bid] = future
            try:
                async with asyncio.timeout(REPAIR_TIMEOUT_S):
                    pairs = await self.fetch([bid], prefer=None)
                with self.store.transaction():
                    self.store.put_blocks(pairs)
                    self.store.unwant_blocks([bid])
                log.info("block repaired from a peer: id=%s", bid.hex()[:8])
                future.set_result(pairs[0][1])
            except (MissingBlocks, TimeoutError) as exc:
                # A wanted block was said to be missing when it merged.
                level = logging.INFO if bid in self.store.wanted_blocks() else logging.ERROR
                log.log(level, "cannot repair block: id=%s reason=%s", bid.hex()[:8], exc)
                future.set_result(None)
            finally:
                del self._inflight[bid]
        return (await future) is not None


def _per_request() -> int:
    return min(FETCH_BLOCKS, wire.BLOCKS_PER_REQUEST)
