"""History that thins out with age (`peer.storage.gc.Thinning`): the keep plan with
fake times, then real nodes (collection, and what a fresh peer fetches)."""

from __future__ import annotations

import contextlib
import os
import random
import time
from pathlib import Path

import pytest

from crdt.clock import Hlc
from crdt.merge import Replica
from crdt.ops import ROOT, Create, Member, Write
from peer.identity import load_or_create
from peer.keys import VolumeKeys
from peer.node import Node, NodeConfig
from peer.storage import history
from peer.storage.gc import DEFAULT_TIERS, Thinning, keep_plan
from tests.peer.test_gc import rewrite, serving
from tests.peer.test_history import FakeClock
from tests.peer.test_sync import link, read_file, wait_until, write_file

S = 1000
MINUTE = 60 * S
HOUR = 60 * MINUTE
DAY = 24 * HOUR
WEEK_MS = 7 * DAY
A = b"\x0a" * 16
B = b"\x0b" * 16
FILE = b"\x01" * 16
NOW = 1_800_000_000_000 + 12_345  # not on a bucket boundary


def day_of_versions(
    n: int = 1000, seed: int = 7
) -> tuple[Replica, list[Hlc], dict[Hlc, bytes], list[object]]:
    """`n` versions of one file by node A at random times over the day before
    NOW (a few in the last minute), each writing its own block."""
    rng = random.Random(seed)
    times = sorted({NOW - rng.randrange(1, DAY) for _ in range(n - 10)})
    times += sorted(NOW - rng.randrange(1, MINUTE - S) for _ in range(10))
    times = sorted(set(times))
    ops: list[object] = [
        Member(Hlc(NOW - 2 * DAY, 0, A), "a"),
        Create(Hlc(NOW - 2 * DAY, 1, A), FILE, ROOT, b"f", "file", 0o644, 0, 0),
    ]
    versions: list[Hlc] = []
    blocks: dict[Hlc, bytes] = {}
    base: tuple[Hlc, ...] = ()
    for t in times:
        h = Hlc(t, 0, A)
        blocks[h] = os.urandom(32)
        ops.append(Write(h, FILE, base, 100, ((0, blocks[h]),)))
        versions.append(h)
        base = (h,)
    replica = Replica()
    replica.apply(ops)  # type: ignore[arg-type]
    return replica, versions, blocks, ops


def all_stable(versions: list[Hlc]) -> dict[bytes, Hlc]:
    return {A: max(versions), B: Hlc(NOW, 0, B)}


def test_a_day_of_versions_thins_to_one_per_bucket_in_the_right_places() -> None:
    replica, versions, blocks, _ = day_of_versions()
    assert len(versions) > 990
    plan = keep_plan(replica, all_stable(versions), NOW, WEEK_MS, thinning=Thinning())
    kept = plan.kept
    assert len(kept) <= 60 + 120 + 24 + 1
    assert versions[-1] in kept  # the head
    by_bucket: dict[tuple[int, int], list[Hlc]] = {}
    for h in versions:
        age = NOW - h.wall_ms
        if age < MINUTE:
            assert h in kept, "every version of the last minute"
            continue
        every = 30 * S if age < HOUR else HOUR
        by_bucket.setdefault((every, h.wall_ms // every), []).append(h)
    for (every, bucket), members in by_bucket.items():
        newest = max(members)
        in_minute = any(NOW - h.wall_ms < MINUTE for h in versions if h.wall_ms // every == bucket)
        if not in_minute:
            assert newest in kept, "the newest of each bucket stays"
        assert all(h not in kept for h in members if h != newest), "one per bucket"
    # Only the kept versions' blocks stay.
    assert plan.blocks == {blocks[h] for h in kept}
    assert plan.versions_thinned == len(versions) - len(kept)
    # Per hour of the day before the last hour: one version (the hours are full).
    assert sum(1 for h in kept if NOW - h.wall_ms >= HOUR) in (23, 24, 25)


def test_nothing_thins_before_what_superseded_it_is_stable() -> None:
    replica, versions, _, _ = day_of_versions()
    plan = keep_plan(replica, {}, NOW, WEEK_MS, thinning=Thinning())
    assert plan.kept == set(versions)
    # Stable up to the middle: the older half thins, the newer half stays.
    middle = versions[len(versions) // 2]
    plan = keep_plan(replica, {A: middle}, NOW, WEEK_MS, thinning=Thinning())
    newer = {h for h in versions if h >= middle}
    assert newer <= plan.kept
    assert len(plan.kept - newer) < 30


def test_the_kept_versions_are_the_same_on_every_node_and_open_handles_pin() -> None:
    replica, versions, _, ops = day_of_versions()
    shuffled = list(ops[2:])
    random.Random(3).shuffle(shuffled)
    other = Replica()
    other.apply([*ops[:2], *shuffled])  # type: ignore[list-item]
    stable = all_stable(versions)
    one = keep_plan(replica, stable, NOW, WEEK_MS, thinning=Thinning()).kept
    two = keep_plan(other, stable, NOW, WEEK_MS, thinning=Thinning()).kept
    assert one == two
    dropped = next(h for h in versions if h not in one)
    pinned = keep_plan(replica, stable, NOW, WEEK_MS, [dropped], Thinning()).kept
    assert pinned == one | {dropped}
    # No thinning: every version within the retention; none past it.
    assert keep_plan(replica, stable, NOW, WEEK_MS).kept == set(versions)
    assert keep_plan(replica, stable, NOW + 2 * WEEK_MS, WEEK_MS).kept == {versions[-1]}


def test_the_collector_wakes_when_a_kept_version_moves_to_a_coarser_tier() -> None:
    replica, versions, _, _ = day_of_versions()
    plan = keep_plan(replica, all_stable(versions), NOW, WEEK_MS, thinning=Thinning())
    young = [h for h in plan.kept if NOW - h.wall_ms < MINUTE and h != versions[-1]]
    assert young
    assert plan.next_expiry_ms == min(h.wall_ms + MINUTE for h in young)
    assert plan.next_expiry_ms is not None
    assert plan.next_expiry_ms > NOW
    # Following the wake-ups, each plan keeps a subset of the one before,
    # until the last minute's versions are one per 30 s bucket.
    at = plan.next_expiry_ms
    while at <= NOW + MINUTE:
        later = keep_plan(replica, all_stable(versions), at, WEEK_MS, thinning=Thinning())
        assert later.kept <= plan.kept
        assert later.next_expiry_ms is not None
        assert later.next_expiry_ms > at
        plan, at = later, later.next_expiry_ms
    buckets = {h.wall_ms // (30 * S) for h in young}
    assert len([h for h in plan.kept if h in young]) <= len(buckets) < len(young)


def test_conflict_copies_stay_and_history_kept_is_what_the_plan_keeps() -> None:
    replica, versions, _, _ = day_of_versions()
    # B wrote on an old version concurrently: a second head, kept.
    old = versions[100]
    theirs = Hlc(NOW - 5 * S, 0, B)
    replica.apply([Write(theirs, FILE, (old,), 7, ((0, b"\x0b" * 32),))])
    stable = {A: max(versions), B: theirs}
    plan = keep_plan(replica, stable, NOW, WEEK_MS, thinning=Thinning())
    assert {theirs, versions[-1]} <= plan.kept
    heads = set(replica.contents.heads(FILE))
    fetched = Thinning().history_kept(replica.contents, FILE, NOW, WEEK_MS)
    assert fetched == plan.kept - heads
    assert Thinning().history_kept(replica.contents, FILE, NOW, 0) == set()


def test_history_marks_only_kept_versions_available() -> None:
    replica, versions, _, _ = day_of_versions()
    kept = keep_plan(replica, all_stable(versions), NOW, WEEK_MS, thinning=Thinning()).kept
    listed = history.file_versions(replica, FILE, lambda ids: set(), lambda entry: kept)
    shown = history.file_versions(replica, FILE, lambda ids: set(ids), lambda entry: kept)
    assert not any(v.available for v in listed)
    assert sum(v.available for v in shown) == len(kept)
    assert [v.available for v in shown] == [h in kept for h in sorted(versions)]


def test_thin_history_option_parses_and_refuses_nonsense() -> None:
    assert history.parse_thinning(history.DEFAULT_THIN_HISTORY) == DEFAULT_TIERS
    assert history.parse_thinning("off") == ()
    assert history.parse_thinning("10m:0, 2d:1h") == ((600_000, 0), (2 * DAY, HOUR))
    for bad in ("", "1h", "1h:30s,1m:0", "1m:0,1h:7s,1d:1h", "1h:x", "0:0"):
        with pytest.raises(history.BadThinning):
            history.parse_thinning(bad)


# -- real nodes -----------------------------------------------------------------------------


def make_node(tmp: Path, name: str, keys: VolumeKeys, clock: FakeClock | None = None) -> Node:
    data = tmp / f"{name}-data"
    data.mkdir()
    config = NodeConfig(mountpoint=tmp / f"{name}-mnt", data_dir=data, name=name, mdns=False)
    node = Node(config, keys, load_or_create(data))
    if clock is not None:  # before the first stamp: an HLC never goes back
        node.journal._now = clock
    node.start()
    return node


@pytest.mark.asyncio
async def test_a_day_of_rewrites_keeps_only_the_thinned_versions_and_a_fresh_peer_fetches_only_those(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    """1,000 versions of one file written over the day before now (A's clock
    runs fast): A's collection keeps the bucket versions' blocks only, and a
    fresh peer D that joins before that collection fetches only theirs."""
    now = time.time_ns() // 1_000_000
    start = now - DAY + 2 * MINUTE
    clock = FakeClock(start)
    a = make_node(tmp_path, "a", keys, clock)
    async with contextlib.AsyncExitStack() as stack:
        sa = await stack.enter_async_context(serving(a))
        write_file(a, b"f", os.urandom(1000))
        for i in range(1, 1000):
            clock.ms = start + i * (DAY - 3 * MINUTE) // 1000
            rewrite(a, b"f", os.urandom(1000))
        clock.ms = time.time_ns() // 1_000_000
        latest = os.urandom(1000)
        rewrite(a, b"f", latest)
        assert a.store.stats().blocks == 1001

        d = make_node(tmp_path, "d", keys)
        sd = await stack.enter_async_context(serving(d))
        link(sd, sa)
        # (Not read before: a head of a piece merged before the last is history
        # D does not keep, its block not fetched; reading it asks peers.)
        await wait_until(lambda: a.journal.vv == d.journal.vv, "D to hold every op")
        assert read_file(d, b"f") == latest
        # Once D holds A's ops they are stable: A keeps the bucket versions only.
        await wait_until(lambda: a.stability.stable_vv() == a.journal.vv, "A to see D hold its ops")
        entry = a.replica.lookup(ROOT, b"f")
        assert entry is not None
        kept = a.collector.kept_versions(entry)
        assert len(kept) <= 60 + 120 + 24 + 1
        # D fetched the kept versions' blocks (a version or two more where a
        # pull page ended inside a bucket), not the thousand.
        assert len(kept) <= d.sync.blocks_in <= len(kept) + 10
        assert d.store.stats().blocks == d.sync.blocks_in
        result = a.collector.collect()
        assert result.versions_thinned > 700
        assert a.store.stats().blocks == result.versions_kept == len(kept)
        listed = history.history(
            a.replica, b"f", a.store.has_blocks, kept=a.collector.kept_versions
        )
        assert sum(v.available for v in listed) == len(kept)
        assert len(listed) == 1001
