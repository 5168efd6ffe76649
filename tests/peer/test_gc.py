"""Causal stability, block collection and `forget` (`peer.storage.gc`), with real nodes.

Nodes run in one process over real HTTP on loopback (as in test_sync.py), each
with its own SQLite store; collections are run by hand (`Collector.collect`),
as `dfs-peer gc` runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from crdt.ops import ROOT, Forget
from peer.fs.volume import ROOT_INODE
from peer.identity import load_or_create
from peer.keys import VolumeKeys
from peer.net import wire
from peer.net.client import PeerClient
from peer.net.sync import Sync
from peer.node import Node, NodeConfig
from peer.storage import gc
from peer.storage.gc import AmbiguousMember, CannotForgetSelf, NoSuchMember
from peer.storage.store import SCHEMA_VERSION, Store
from tests.peer.test_sync import CALLER, link, read_file, wait_until, write_file

MiB = 1 << 20


def make_node(tmp: Path, name: str, keys: VolumeKeys, keep_history_s: float = 0.0) -> Node:
    data = tmp / f"{name}-data"
    data.mkdir(exist_ok=True)
    config = NodeConfig(
        mountpoint=tmp / f"{name}-mnt",
        data_dir=data,
        name=name,
        mdns=False,
        keep_history_s=keep_history_s,
    )
    node = Node(config, keys, load_or_create(data))
    node.start()
    return node


@contextlib.asynccontextmanager
async def serving(node: Node, port: int = 0) -> AsyncIterator[Sync]:
    try:
        async with node.sync.running("127.0.0.1", port) as sync:
            yield sync
    finally:
        node.close()


def current_blocks(node: Node, name: bytes) -> set[bytes]:
    entry = node.replica.lookup(ROOT, name)
    assert entry is not None
    view = node.replica.entry(entry)
    assert view is not None
    assert view.version is not None
    return set(node.replica.block_map(view.version).values())


def rewrite(node: Node, name: bytes, data: bytes, offset: int = 0) -> None:
    """Write `data` over an existing file at `offset`, in place, and close it
    (a new version)."""
    vol = node.volume
    attrs = vol.lookup(ROOT_INODE, name)
    fh = vol.open(attrs.inode, os.O_RDWR, CALLER)
    vol.write(fh, offset, data)
    vol.release(fh)


# -- one node ----------------------------------------------------------------------------


def test_collection_frees_superseded_blocks_and_the_store_file_shrinks(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    a = make_node(tmp_path, "a", keys)
    try:
        data = os.urandom(4 * MiB)
        write_file(a, b"big.bin", data)
        for _ in range(4):
            data = os.urandom(4 * MiB)
            rewrite(a, b"big.bin", data)
        before = a.store.stats()
        result = a.collector.collect()
        after = a.store.stats()
        assert result.blocks_freed == 4 * 32, result
        assert result.bytes_freed > 16 * MiB
        assert after.blocks == 32
        assert read_file(a, b"big.bin") == data
        assert before.db_bytes - after.db_bytes > 15 * MiB, (before, after)
        assert result.store_bytes_after == after.db_bytes
        # Nothing changed since: a periodic run is skipped, an explicit one frees nothing.
        assert a.collector.collect(force=False) is result
        assert a.collector.collect().blocks_freed == 0
    finally:
        a.close()


def test_a_collection_with_nothing_to_free_still_leaves_the_store_at_its_size(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    """The write-ahead log keeps up to 4 MiB after SQLite's own checkpoints; a
    collection (`dfs-peer gc`) that frees nothing truncates it all the same,
    so the store it reports is the data, not the last burst of writes."""
    a = make_node(tmp_path, "a", keys)
    try:
        for i in range(4):  # a node that keeps no history of files never rewritten
            write_file(a, f"f{i}".encode(), os.urandom(2 * MiB))
        wal = Path(f"{a.store.path}-wal")
        assert wal.stat().st_size > MiB, wal.stat().st_size
        result = a.collector.collect()
        assert result.blocks_freed == 0
        assert wal.stat().st_size == 0
        assert result.store_bytes_after == a.store.stats().db_bytes
    finally:
        a.close()


def test_history_within_the_retention_is_kept(tmp_path: Path, keys: VolumeKeys) -> None:
    a = make_node(tmp_path, "a", keys, keep_history_s=3600)
    try:
        write_file(a, b"f", os.urandom(300_000))
        rewrite(a, b"f", os.urandom(300_000))
        result = a.collector.collect()
        assert result.blocks_freed == 0
        assert result.versions_in_retention == 1
        assert a.store.stats().blocks == 6
        # An hour later the old version goes.
        a.collector._now = lambda: a.stability._now() + 3_601_000
        later = a.collector.collect(force=False)
        assert later.blocks_freed == 3
    finally:
        a.close()


def test_a_write_still_buffered_keeps_its_base(tmp_path: Path, keys: VolumeKeys) -> None:
    a = make_node(tmp_path, "a", keys)
    try:
        first = os.urandom(300_000)
        write_file(a, b"f", first)
        attrs = a.volume.lookup(ROOT_INODE, b"f")
        fh = a.volume.open(attrs.inode, os.O_RDWR, CALLER)
        a.volume.write(fh, 0, b"x")  # block 0 buffered; blocks 1, 2 still the old version's
        assert a.collector.collect().blocks_freed == 0
        a.volume.release(fh)
        assert read_file(a, b"f") == b"x" + first[1:]
        # Block 0 is now a patch over the old block 0, which it keeps alive.
        assert a.collector.collect().blocks_freed == 0
        assert a.store.stats().blocks == 4
    finally:
        a.close()


def test_a_deleted_file_still_open_keeps_its_blocks(tmp_path: Path, keys: VolumeKeys) -> None:
    a = make_node(tmp_path, "a", keys)
    try:
        data = os.urandom(300_000)
        write_file(a, b"f", data)
        attrs = a.volume.lookup(ROOT_INODE, b"f")
        fh = a.volume.open(attrs.inode, os.O_RDONLY, CALLER)
        a.volume.unlink(ROOT_INODE, b"f")
        assert a.collector.collect().blocks_freed == 0
        assert a.volume.read(fh, 0, len(data)) == data
        a.volume.release(fh)
        assert a.collector.collect().blocks_freed == 3  # the last close lets them go
    finally:
        a.close()


def test_a_store_of_schema_1_is_migrated_to_incremental_vacuum(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    Store.open(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA auto_vacuum = NONE")
    conn.execute("VACUUM")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (b"1",))
    assert conn.execute("PRAGMA auto_vacuum").fetchone() == (0,)
    conn.close()
    with Store.open(path) as store:
        assert store._conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION).encode()


# -- the wire --------------------------------------------------------------------------------


def test_gossip_round_trips_and_is_optional_and_bounded() -> None:
    n1, n2 = b"\x01" * 32, b"\x02" * 32
    hello = wire.Hello(1, n1, "a", {n1: 3}, {n2: ({n1: 2, n2: 5}, 1_700_000_000_000)})
    assert wire.decode_hello(wire.encode_hello(hello)) == hello
    old = wire.encode({"v": 1, "node": n1, "name": "a", "vv": {n1: 3}})
    assert wire.decode_hello(old).known == {}
    watch = wire.decode_watch(wire.encode_vv({n1: 3}, {n2: ({n2: 1}, 5)}))
    assert watch == wire.Watch({n1: 3}, {n2: ({n2: 1}, 5)})
    for bad in (
        {n2: [{n1: 1}]},
        {n2: [{n1: -1}, 5]},
        {n2: [{n1: 1}, -5]},
        {b"short": [{}, 1]},
        {bytes([i % 256, i // 256]) * 16: [{}, 1] for i in range(wire.MAX_KNOWN_NODES + 1)},
    ):
        with pytest.raises(wire.BadMessage):
            wire.decode_watch(wire.encode({"vv": {}, "known": bad}))


# -- several nodes -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_gossip_learnt_between_two_long_polls_is_answered_at_once(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    """B learns a member's vector after answering A's long poll and before A's
    next one arrives: that next poll answers at once with it, not after the
    poll's whole wait (A would hold collection back for nothing)."""
    a, b = make_node(tmp_path, "a", keys), make_node(tmp_path, "b", keys)
    c_id = os.urandom(32)
    async with (
        contextlib.AsyncExitStack() as stack,
        aiohttp.ClientSession() as session,
    ):
        stack.callback(a.close)  # A only calls (no port: B does not call back)
        sb = await stack.enter_async_context(serving(b))
        client = PeerClient(session, "127.0.0.1", sb.port, a.sync)
        hello = await client.hello()
        since = wire.vv_digest(hello.vv)
        await client.watch(since, 0.2)  # answered: A holds B's gossip as of now
        b.stability.learn(c_id, {c_id: 5})  # the gap between two polls
        started = time.monotonic()
        watched = await client.watch(since, 8)
        waited = time.monotonic() - started
        assert watched.known[c_id][0] == {c_id: 5}
        assert waited < 4, f"the poll waited {waited:.1f}s with news in hand"


@pytest.mark.asyncio
async def test_an_absent_member_holds_back_collection_and_converges_with_no_missing_block(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    """gc_safety in miniature: C goes away; A and B overwrite and collect;
    nothing C still shows is deleted; C comes back and converges."""
    a, b, c = (make_node(tmp_path, n, keys) for n in ("a", "b", "c"))
    async with contextlib.AsyncExitStack() as stack:
        sa = await stack.enter_async_context(serving(a))
        sb = await stack.enter_async_context(serving(b))
        c_stack = contextlib.AsyncExitStack()
        sc = await c_stack.enter_async_context(serving(c))
        c_port = sc.port
        # A and C only ever talk to B: they learn of each other by gossip.
        link(sa, sb)
        link(sc, sb)
        first = os.urandom(1 * MiB)
        write_file(a, b"f", first)
        await wait_until(lambda: read_file(c, b"f") == first, "C to have the file")
        await wait_until(
            lambda: a.stability.vv_of(c.identity.node_id) == c.journal.vv,
            "A to learn C's vector through B",
        )
        c_needs = current_blocks(c, b"f")
        await c_stack.aclose()  # C goes away

        for _ in range(5):
            rewrite(a, b"f", os.urandom(1 * MiB))
        latest = os.urandom(1 * MiB)
        rewrite(a, b"f", latest)
        await wait_until(lambda: read_file(b, b"f") == latest, "B to have the latest")
        await wait_until(
            lambda: all([m.name for m in n.stability.held_back_by()] == ["c"] for n in (a, b)),
            "A and B to know that only C is behind",
        )
        for node in (a, b):
            result = node.collector.collect()
            assert result.blocks_freed == 0, f"{node.config.name} freed while C is away"
            assert result.versions_unstable == 6
            held = [m.name for m in node.stability.held_back_by()]
            assert held == ["c"], held
            assert node.store.has_blocks(c_needs) == c_needs
        status = a.collector.status()
        assert [m["name"] for m in status["held_back_by"]] == ["c"]
        assert status["operations_not_stable"] > 0

        c = make_node(tmp_path, "c", keys)  # back, on the same data dir and port
        sc = await stack.enter_async_context(serving(c, c_port))
        sc.add_peer("127.0.0.1", sb.port, "static")
        await wait_until(lambda: read_file(c, b"f") == latest, "C to converge", 20)
        assert c.store.has_blocks(current_blocks(c, b"f")) == current_blocks(c, b"f")
        await wait_until(
            lambda: all(not n.stability.held_back_by() for n in (a, b, c)),
            "every node to know the others caught up",
            20,
        )
        for node in (a, b, c):
            node.collector.collect()
            assert node.store.stats().blocks == 8, node.config.name
            assert read_file(node, b"f") == latest


@pytest.mark.asyncio
async def test_a_late_joiner_needs_no_collected_block(tmp_path: Path, keys: VolumeKeys) -> None:
    a = make_node(tmp_path, "a", keys)
    async with contextlib.AsyncExitStack() as stack:
        sa = await stack.enter_async_context(serving(a))
        write_file(a, b"f", os.urandom(500_000))
        for _ in range(3):
            rewrite(a, b"f", os.urandom(500_000))
        latest = os.urandom(500_000)
        rewrite(a, b"f", latest)
        assert a.collector.collect().blocks_freed == 16
        d = make_node(tmp_path, "d", keys)
        sd = await stack.enter_async_context(serving(d))
        link(sd, sa)
        await wait_until(lambda: read_file(d, b"f") == latest, "D to converge")
        assert d.store.stats().blocks == 4


@pytest.mark.asyncio
async def test_forget_unblocks_collection_and_refuses_later_writes(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None]
) -> None:
    a, b = make_node(tmp_path, "a", keys), make_node(tmp_path, "b", keys)
    async with contextlib.AsyncExitStack() as stack:
        sa = await stack.enter_async_context(serving(a))
        b_stack = contextlib.AsyncExitStack()
        sb = await b_stack.enter_async_context(serving(b))
        b_port = sb.port
        link(sa, sb)
        write_file(b, b"from-b", b"hello")
        await wait_until(lambda: read_file(a, b"from-b") == b"hello", "A to see B's file")
        await b_stack.aclose()  # B is gone

        write_file(a, b"f", os.urandom(300_000))
        rewrite(a, b"f", os.urandom(300_000))
        assert a.collector.collect().blocks_freed == 0
        with pytest.raises(CannotForgetSelf):
            a.forget("a")
        with pytest.raises(NoSuchMember):
            a.forget("nobody")
        with pytest.raises(NoSuchMember):
            a.forget("")
        for fake in (b"\xab\x01" * 16, b"\xab\x02" * 16):  # heard of through gossip
            a.stability.learn(fake, {fake: 1})
        with pytest.raises(AmbiguousMember):
            a.forget("ab")
        done = a.forget(b.identity.node_id.hex()[:6])
        assert done["name"] == "b"
        assert done["upto"] == a.journal.vv[b.identity.node_id]
        assert a.collector.collect().blocks_freed == 3
        assert [m.name for m in a.stability.held_back_by()] == []
        assert [m["forgotten"] for m in a.collector.status()["members"]] == [False, True]

        # B comes back on its old data dir: it learns it was forgotten, and what
        # it writes now is refused.
        b = make_node(tmp_path, "b", keys)
        sb = await stack.enter_async_context(serving(b, b_port))
        sb.add_peer("127.0.0.1", sa.port, "static")
        await wait_until(
            lambda: b.identity.node_id in b.replica.forgotten(), "B to learn it was forgotten"
        )
        write_file(b, b"late", b"refused")
        await wait_until(
            lambda: any(p.connected for p in sa.statistics().peers), "A to reach B again"
        )
        await wait_until(lambda: a.sync.statistics().operations_behind == 0, "A to settle")
        assert read_file(a, b"late") is None
        assert a.journal.vv[b.identity.node_id] == done["upto"]


@pytest.mark.asyncio
async def test_entries_merged_before_the_forget_arrived_are_dropped(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None]
) -> None:
    """Two nodes end with the same operations even if one merged a forgotten
    node's writes that the forgetting node never saw."""
    expect_logs("dropped 2 operation", logger="peer.journal")
    a, c = make_node(tmp_path, "a", keys), make_node(tmp_path, "c", keys)
    c_id = c.identity.node_id
    try:
        write_file(c, b"x", b"1")
        entries = list(c.store.iter_log())
        blocks = [(bid, c.store.get_block(bid) or b"") for bid in c.store.block_ids()]
        a.journal.merge_remote(entries, blocks=blocks)
        assert read_file(a, b"x") == b"1"
        # Forgotten after its Member op (seq 1), before its write (seq 2).
        a.journal.commit(lambda stamp: [Forget(stamp(), c_id, 1)])
        assert a.journal.vv[c_id] == 1
        assert read_file(a, b"x") is None
        assert a.replica.members()[c_id] == "c"
        assert not a.journal.accepts(c_id, 2)
    finally:
        a.close()
        c.close()


@pytest.mark.asyncio
async def test_a_collection_while_a_checkpoint_merges_keeps_the_blocks_it_brought(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    # A fresh node stores a checkpoint's blocks, then merges its operations a
    # piece at a time (the loop runs in between); a collection in between saw
    # the blocks of the pieces not merged yet as referenced by nothing and
    # deleted them: the node said it was up to date while it lacked them.
    from tests.peer.test_sync import running

    full = make_node(tmp_path, "full", keys)
    contents = {f"f{i:04d}".encode(): os.urandom(1000) for i in range(600)}
    for name, data in contents.items():
        write_file(full, name, data)
    full.collector.collect()  # alone: folds all of it into a checkpoint
    assert full.store.get_checkpoint() is not None
    fresh = make_node(tmp_path, "fresh", keys)
    total = full.replica.counts()[0]
    collected_while_merging = 0

    async def collect_between_pieces() -> None:
        nonlocal collected_while_merging
        while True:
            await asyncio.sleep(0)
            if 0 < fresh.replica.counts()[0] < total:
                fresh.collector.collect()
                collected_while_merging += 1

    async with running(full, fresh) as (a, b):
        collector = asyncio.create_task(collect_between_pieces())
        try:
            link(a, b)
            await wait_until(
                lambda: fresh.replica.counts()[0] >= total, "the fresh node to merge", 60
            )
        finally:
            collector.cancel()
        wanted = set().union(*(current_blocks(full, name) for name in contents))
        held = fresh.store.has_blocks(wanted)
    assert collected_while_merging, "no collection ran while the checkpoint merged"
    assert held == wanted, f"the fresh node lost {len(wanted - held)} of {len(wanted)} blocks"


@pytest.mark.asyncio
async def test_periodic_collection_waits_for_a_burst_of_local_writes_to_end(
    tmp_path: Path, keys: VolumeKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A collection walks the whole volume: run every BIG_MERGE_OPS new ops, it
    # took 9-13% of the node's time while a program created files.
    monkeypatch.setattr(gc, "CHECK_EVERY_S", 0.25)
    monkeypatch.setattr(gc, "BIG_MERGE_OPS", 20)
    node = make_node(tmp_path, "a", keys)
    periodic = asyncio.create_task(node.collector.run_periodically())
    try:
        burst_end = asyncio.get_running_loop().time() + 2.0
        i = 0
        while asyncio.get_running_loop().time() < burst_end:
            write_file(node, f"f{i:05d}".encode(), b"x")
            i += 1
            await asyncio.sleep(0.005)
        assert i > 100
        assert node.collector.runs == 0, f"{node.collector.runs} collections during the burst"
        await wait_until(lambda: node.collector.runs > 0, "a collection once the burst ended", 5)
    finally:
        periodic.cancel()
        node.close()
