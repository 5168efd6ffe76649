"""Key epochs (`peer.epochs`): rotations, boxes, refusals, catch-up, convergence.

Unit tests on keys and entries, then nodes in one process on loopback (real
HTTP, real SQLite, no FUSE); the namespaced version is `scenarios/remove_member.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import aiohttp
import nacl.exceptions
import nacl.public
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdt.clock import Hlc
from crdt.ops import MalformedOp, Member, Rotate, decode_op, encode_op
from peer import epochs, removal, statustext
from peer.errors import CorruptBlock
from peer.identity import NodeIdentity, load_or_create
from peer.keys import VolumeKeys
from peer.net import sync as sync_module
from peer.net import wire
from peer.net.auth import HEADER_EPOCH_REFUSED, HEADER_MAC, sign_request, verify_response, wall_ms
from peer.net.joining import pair_with
from peer.net.pairing import Joiner
from peer.node import Node
from peer.sealing import (
    GENESIS,
    LogEntry,
    SealError,
    entry_hash,
    open_block,
    open_entry,
    seal_block,
    seal_entry,
    unseal,
)
from peer.secret import new_secret
from peer.storage import gc
from tests.peer.test_sync import link, make_node, read_file, running, wait_until, write_file

ROOT = new_secret()


class Replica:
    """One member's keys and log, without a store: enough for the rules."""

    def __init__(self, root: bytes = ROOT, seed: int | None = None) -> None:
        self.identity = (
            NodeIdentity.generate()
            if seed is None
            else NodeIdentity(nacl.signing.SigningKey(bytes([seed + 1]) * 32))
        )
        self.keys = VolumeKeys.from_root(root)
        epochs.bind(self.keys, self.identity)
        self.seq = 0
        self.prev = GENESIS
        self.wall = 1_000

    @property
    def node(self) -> bytes:
        return self.identity.node_id

    def stamp(self) -> Hlc:
        self.wall += 1
        return Hlc(self.wall, 0, self.node)

    def append(self, op_bytes: bytes) -> LogEntry:
        self.seq += 1
        entry = seal_entry(self.keys, self.identity, self.seq, op_bytes, self.prev)
        self.prev = entry_hash(entry)
        return entry

    def rotate(self, removed: set[bytes], members: set[bytes]) -> LogEntry:
        prev = self.keys.current
        op = epochs.make_rotation(prev, self.node, removed, members, self.stamp())
        with self.keys.under(prev):
            entry = self.append(encode_op(op))
        assert epochs.learn(self.keys, entry, op)
        return entry

    def take(self, entries: list[LogEntry]) -> int:
        return epochs.take_entries(self.keys, entries)


def test_epoch_zero_keeps_todays_formats_and_a_rotation_names_its_epoch() -> None:
    a, b = Replica(), Replica()
    before = a.append(b"op")
    assert before.sealed[0] == 1, "epoch 0 entries keep sealed format 1"
    bid, sealed = seal_block(a.keys, b"data")
    assert sealed[0] == 2
    rot = a.rotate(set(), {b.node})
    assert rot.sealed[0] == 1, "a rotation is sealed under the epoch it follows"
    after = a.append(b"later")
    assert after.sealed[0] == 3
    assert after.sealed[1:17] == a.keys.current.id
    bid2, sealed2 = seal_block(a.keys, b"data")
    assert sealed2[0] == 4
    assert bid2 != bid, "a new epoch keys block ids anew"
    assert open_block(a.keys, bid, sealed) == b"data", "old blocks still open"
    assert open_block(a.keys, bid2, sealed2) == b"data"
    assert open_entry(a.keys, before) == b"op"
    # B has not taken the rotation yet: the later entry names an epoch it lacks.
    with pytest.raises(Exception, match="does not hold"):
        open_entry(b.keys, after)
    assert b.take([rot]) == 1
    assert open_entry(b.keys, after) == b"later"
    assert b.keys.current.id == a.keys.current.id


def test_boxes_open_only_for_recipients(expect_logs: Callable[..., None]) -> None:
    expect_logs("this node was removed from the volume", logger="peer.epochs")
    a, b, c = Replica(), Replica(), Replica()
    rot = a.rotate({c.node}, {b.node, c.node})
    op = decode_op(open_entry(a.keys, rot))
    assert isinstance(op, Rotate)
    assert set(op.members) == {a.node, b.node}
    assert op.removed == (c.node,)
    assert b.take([rot]) == 1
    assert c.take([rot]) == 1
    assert b.keys.epoch(op.epoch) is not None
    assert c.keys.epoch(op.epoch) is None, "the removed node gets no box"
    assert c.keys.me_removed()
    assert not b.keys.me_removed()
    # No box opens under C's key, nor under any key C derives.
    c_private = c.keys.me.private  # type: ignore[attr-defined]
    for box in op.boxes:
        with pytest.raises(nacl.exceptions.CryptoError):
            nacl.public.SealedBox(c_private).decrypt(box)
    # A block written after the rotation opens under none of C's keys.
    bid, sealed = seal_block(a.keys, b"after the rotation")
    with pytest.raises(CorruptBlock):
        open_block(c.keys, bid, sealed)
    for held in c.keys.epochs():
        body = sealed[:1] + sealed[17:]
        with pytest.raises(SealError):
            unseal(held.blocks, body, sealed[:17] + bid, 4)


def _forged(a: Replica, op: Rotate, **change: object) -> tuple[LogEntry, Rotate]:
    bad = dataclasses.replace(op, **change)  # type: ignore[arg-type]
    prev = a.keys.current
    with a.keys.under(prev):
        return a.append(encode_op(bad)), bad


@pytest.mark.parametrize(
    "case",
    ["box of another secret", "wrong number", "maker not kept", "not under prev", "foreign box"],
)
def test_forged_rotations_are_refused_with_a_line_and_change_nothing(
    case: str, expect_logs: Callable[..., None]
) -> None:
    expect_logs("refused key rotation", logger="peer.epochs")
    a, b = Replica(), Replica()
    op = epochs.make_rotation(a.keys.current, a.node, set(), {b.node}, a.stamp())
    i = op.members.index(b.node)
    if case == "box of another secret":
        boxes = list(op.boxes)
        boxes[i] = epochs.seal_secret(b.node, os.urandom(32))
        entry, _ = _forged(a, op, boxes=tuple(boxes))
    elif case == "wrong number":
        entry, _ = _forged(a, op, number=5)
    elif case == "maker not kept":
        entry, _ = _forged(a, op, members=(b.node,), boxes=(op.boxes[i],))
    elif case == "not under prev":
        entry, _ = _forged(a, op, prev=os.urandom(16))
    else:
        boxes = list(op.boxes)
        boxes[i] = epochs.seal_secret(a.node, os.urandom(32))  # sealed to someone else
        entry, _ = _forged(a, op, boxes=tuple(boxes))
    before = (b.keys.current, dict(b.keys.rotations), set(b.keys.removed))
    assert b.take([entry]) == 0
    assert (b.keys.current, dict(b.keys.rotations), set(b.keys.removed)) == before


def test_a_rotation_from_an_outsider_or_unsigned_is_refused(
    expect_logs: Callable[..., None],
) -> None:
    expect_logs("refused a rotation entry", logger="peer.epochs")
    a, b = Replica(), Replica()
    outsider = Replica(new_secret())
    entry = outsider.rotate(set(), {b.node})
    assert b.take([entry]) == 0, "sealed under another volume's keys"
    rot = a.rotate(set(), {b.node})
    tampered = dataclasses.replace(rot, sig=bytes(64))
    assert b.take([tampered]) == 0
    assert b.keys.current is b.keys.base


def test_an_offline_member_catches_up_through_a_chain_of_rotations() -> None:
    a, b, c, d = Replica(), Replica(), Replica(), Replica()
    r1 = a.rotate({c.node}, {b.node, c.node, d.node})
    r2 = a.rotate({d.node}, {b.node, d.node})
    # B was away for both: it gets them in any order.
    assert b.take([r2, r1]) == 2
    assert b.keys.current.id == a.keys.current.id
    assert b.keys.removed == {c.node, d.node}
    assert not b.keys.acceptable(b.keys.base)


# -- concurrent rotations converge -------------------------------------------------


def _settle(replicas: list[Replica], log: list[LogEntry]) -> None:
    """Everyone gets every entry; merge rotations are made until none is due."""
    for _ in range(10):
        for r in replicas:
            r.take(list(log))
        made = False
        for r in sorted(replicas, key=lambda r: r.node):
            due = epochs.merge_rotation_due(r.keys, r.node)
            if due == 0.0:
                target = epochs.merge_target(r.keys)
                assert target is not None
                prev, removed, members = target
                op = epochs.make_rotation(prev, r.node, removed, members, r.stamp())
                with r.keys.under(prev):
                    entry = r.append(encode_op(op))
                epochs.learn(r.keys, entry, op)
                log.append(entry)
                made = True
                break  # the others see it before deciding
        if not made:
            return
    raise AssertionError("merge rotations did not settle")


def test_two_removals_made_apart_end_in_one_merge_rotation(
    expect_logs: Callable[..., None],
) -> None:
    expect_logs("this node was removed", logger="peer.epochs")
    a, b, c, d, e = (Replica(seed=i) for i in range(5))
    every = {r.node for r in (a, b, c, d, e)}
    r1 = a.rotate({c.node}, every)  # A, apart with E, removes C
    e.take([r1])
    r2 = b.rotate({d.node}, every)  # B, apart with C and D, removes D
    c.take([r2])
    d.take([r2])
    log = [r1, r2]
    a.take([r2])  # the partition heals
    assert a.keys.removed == {c.node, d.node}
    assert not a.keys.acceptable(a.keys.current), "neither branch is acceptable"
    assert epochs.merge_rotation_due(a.keys, a.node) is not None
    _settle([a, b, c, d, e], log)
    assert len(log) == 3, "exactly one merge rotation"
    merged = decode_op(open_entry(a.keys, log[2]))
    assert isinstance(merged, Rotate)
    assert merged.number == 2
    assert set(merged.members) == {a.node, b.node, e.node}
    for r in (a, b, e):
        assert r.keys.current.id == merged.epoch
        assert r.keys.acceptable(r.keys.current)
    for r in (c, d):
        assert r.keys.epoch(merged.epoch) is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_rotations_made_apart_converge(data: st.DataObject) -> None:
    quiet = logging.getLogger("peer.epochs")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # many removals by design
    try:
        _rotations_made_apart_converge(data)
    finally:
        quiet.setLevel(level)


def _rotations_made_apart_converge(data: st.DataObject) -> None:
    n = data.draw(st.integers(3, 5), label="members")
    replicas = [Replica(seed=i) for i in range(n)]  # the same draws each run
    every = {r.node for r in replicas}
    known: list[list[LogEntry]] = [[] for _ in replicas]
    for _ in range(data.draw(st.integers(1, 6), label="steps")):
        kind = data.draw(st.sampled_from(["rotate", "exchange"]))
        i = data.draw(st.integers(0, n - 1))
        r = replicas[i]
        if kind == "rotate":
            if r.keys.me_removed():
                continue
            others = sorted(every - {r.node} - r.keys.removed)
            if len(others) < 2:
                continue
            victim = data.draw(st.sampled_from(others))
            entry = r.rotate({victim}, every - r.keys.removed)
            known[i].append(entry)
        else:  # a partition heals between i and j for a moment
            j = data.draw(st.integers(0, n - 1))
            both = known[i] + [e for e in known[j] if e not in known[i]]
            known[i], known[j] = list(both), list(both)
            replicas[i].take(both)
            replicas[j].take(both)
    everything: list[LogEntry] = []
    for k in known:
        everything += [e for e in k if e not in everything]
    _settle(replicas, everything)
    removed = set().union(*(r.keys.removed for r in replicas))
    staying = [r for r in replicas if r.node not in removed]
    # (A removed node cannot read rotations sealed under epochs it never held.)
    assert all(r.keys.removed == removed for r in staying), "removals are a union"
    if staying and len(removed) > 0:
        current = {r.keys.current.id for r in staying}
        assert len(current) == 1, "every remaining member writes under one epoch"
        epoch = staying[0].keys.current
        assert staying[0].keys.acceptable(epoch)
        assert epoch.members is not None
        assert not (epoch.members & removed)
        for r in replicas:
            if r.node in removed:
                assert r.keys.epoch(epoch.id) is None, "no removed node holds it"


# -- nodes on loopback --------------------------------------------------------------


def node_keys() -> VolumeKeys:
    return VolumeKeys.from_root(ROOT)


@pytest.mark.asyncio
async def test_remove_shuts_the_node_out_and_an_offline_member_catches_up(
    tmp_path: Path, expect_logs: Callable[..., None]
) -> None:
    expect_logs("refused", logger="peer.sync")
    expect_logs("this node was removed", logger="peer.epochs")
    expect_logs("a key epoch this node does not hold", logger="peer.sync")
    a = make_node(tmp_path, "a", node_keys())
    b = make_node(tmp_path, "b", node_keys())
    c = make_node(tmp_path, "c", node_keys())
    async with running(a, b, c) as (sa, sb, sc):
        link(sa, sb)
        link(sa, sc)
        write_file(a, b"before.txt", b"everyone reads this")
        await wait_until(
            lambda: (
                read_file(b, b"before.txt") is not None and read_file(c, b"before.txt") is not None
            ),
            "B and C to sync",
        )
        await wait_until(
            lambda: len(a.replica.members()) == 3, "A to know every member", limit_s=20
        )
    # B goes away; A removes C.
    a = make_node_again(tmp_path, "a")
    c = make_node_again(tmp_path, "c")
    async with running(a, c) as (sa, sc):
        link(sa, sc)
        done = removal.remove(a, "c")
        assert done["epoch"] == 1
        assert done["members"] == 2
        shown = asdict(a.statistics())
        assert shown["keys"]["epoch"] == 1
        assert shown["keys"]["removed"] == [{"id": c.identity.node_id.hex(), "name": "c"}]
        assert "epoch 1 (" in statustext.render(shown, time.time())
        assert "removed: c (" in statustext.render(shown, time.time())
        payload = os.urandom(70_000)
        write_file(a, b"after.bin", payload)
        await wait_until(lambda: c.keys.me_removed(), "C to learn it was removed", limit_s=20)
        told = statustext.render(asdict(c.statistics()), time.time())
        assert "this node was removed from the volume" in told
        assert read_file(c, b"after.bin") is None
        # C's requests are refused everywhere but /epochs.
        async with aiohttp.ClientSession() as session:
            for method, path in (("GET", "/hello"), ("POST", "/log"), ("GET", "/watch")):
                auth = sign_request(
                    c.keys.current.peers,
                    method,
                    path,
                    c.identity.node_id.hex(),
                    b"",
                    time_ms=wall_ms(),
                )
                async with session.request(
                    method, f"http://127.0.0.1:{sa.port}{path}", headers=auth.headers()
                ) as resp:
                    assert resp.status == 401
                    assert resp.headers[HEADER_EPOCH_REFUSED] == "removed"
                    verify_response(
                        c.keys.current.peers,
                        auth.nonce,
                        401,
                        await resp.read(),
                        resp.headers.get(HEADER_MAC),
                        "removed",
                    )
            # ...but the catch-up path answers, with the rotation C cannot open.
            auth = sign_request(
                c.keys.current.peers,
                "GET",
                "/epochs",
                c.identity.node_id.hex(),
                b"",
                time_ms=wall_ms(),
            )
            async with session.get(
                f"http://127.0.0.1:{sa.port}/epochs", headers=auth.headers()
            ) as resp:
                assert resp.status == 200
                got = wire.decode_log_response(await resp.read())
            assert len(got.entries) == 1
            assert epochs.take_entries(c.keys, got.entries) == 0, "taken already, no box"
            assert c.keys.current is c.keys.base
    b = make_node_again(tmp_path, "b")
    a = make_node_again(tmp_path, "a")
    async with running(a, b) as (sa, sb):
        write_file(b, b"offline.txt", b"written while away")
        link(sb, sa)
        await wait_until(lambda: read_file(b, b"after.bin") == payload, "B to catch up", 30)
        await wait_until(
            lambda: read_file(a, b"offline.txt") == b"written while away", "A to get B's", 30
        )
        assert b.keys.current.id == a.keys.current.id
        assert b.keys.current.number == 1
        # A's vote alone forgets no one in a team of three; B adds its own
        # once it took the rotation, and C stops holding collection back.
        c_id = c.identity.node_id
        assert c_id not in a.replica.forgotten()
        assert removal.vote_forget_removed(b) == [c_id]
        assert removal.vote_forget_removed(b) == [], "one vote each"
        await wait_until(lambda: c_id in a.replica.forgotten(), "A to count B's vote", 30)


@pytest.mark.asyncio
async def test_a_catch_up_opened_an_entry_at_a_time_takes_the_rotation_on_its_way(
    tmp_path: Path, expect_logs: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same story with every pulled entry opened as a piece of its own
    (`peer.net.sync.OPEN_PIECE`): the entries after the rotation open once
    the piece before took it, and the rest of the batch as usual."""
    monkeypatch.setattr(sync_module, "OPEN_PIECE", 1)
    await test_remove_shuts_the_node_out_and_an_offline_member_catches_up(tmp_path, expect_logs)


def make_node_again(tmp: Path, name: str) -> Node:
    from peer.node import NodeConfig

    data = tmp / f"{name}-data"
    config = NodeConfig(mountpoint=tmp / f"{name}-mnt", data_dir=data, name=name, mdns=False)
    node = Node(config, node_keys(), load_or_create(data))
    node.start()
    return node


@pytest.mark.asyncio
async def test_a_machine_paired_after_a_rotation_reads_all_history(
    tmp_path: Path, expect_logs: Callable[..., None]
) -> None:
    expect_logs("a key epoch this node does not hold", logger="peer.sync")
    a = make_node(tmp_path, "a", node_keys())
    c = make_node(tmp_path, "c", node_keys())
    async with running(a, c) as (sa, sc):
        link(sa, sc)
        write_file(a, b"before.txt", b"epoch 0")
        await wait_until(lambda: len(a.replica.members()) == 2, "A to know C")
    a = make_node_again(tmp_path, "a")
    removal.remove(a, "c")
    write_file(a, b"after.txt", b"epoch 1")
    a.allow_invitations(ROOT)
    assert a.invitations is not None
    async with running(a) as (sa,):
        invitation = a.invitations.open()
        me = NodeIdentity.generate()
        paired = await pair_with(invitation.code, "127.0.0.1", sa.port, Joiner("d", me.node_id))
        assert paired.root == ROOT
        assert len(paired.epochs) == 1
        data = tmp_path / "d-data"
        data.mkdir()
        load_or_create(data, me)
        epochs.store_granted(data, me, list(paired.epochs))
        assert (data / epochs.GRANTED_FILE).stat().st_mode & 0o777 == 0o600
        assert paired.epochs[0] not in (data / epochs.GRANTED_FILE).read_bytes()
        d = make_node_again(tmp_path, "d")
        async with running(d) as (sd,):
            link(sd, sa)
            await wait_until(lambda: read_file(d, b"after.txt") == b"epoch 1", "D to read")
            assert read_file(d, b"before.txt") == b"epoch 0"
            assert d.keys.current.id == a.keys.current.id
    d = make_node_again(tmp_path, "d")  # again from its own log and granted file
    assert read_file(d, b"after.txt") == b"epoch 1"
    assert d.keys.current.number == 1
    d.close()


def test_remove_names_a_member_or_says_in_one_line_why_not(tmp_path: Path) -> None:
    # Not a hex digit: "a" once met the id prefix below and named this node.
    a = make_node(tmp_path, "here", node_keys())
    try:
        # Two members whose ids start alike, and one called "laptop".
        others: list[NodeIdentity] = []
        while len({i.node_id.hex()[0] for i in others}) == len(others):
            others.append(NodeIdentity.generate())
        first = others[-1].node_id.hex()[0]
        alike = [i for i in others if i.node_id.hex()[0] == first]
        for n, identity in enumerate(others):
            stamp = Hlc(1000 + n, 0, identity.node_id)
            a.replica.apply([Member(stamp, "laptop" if identity is alike[0] else f"m{n}")])
        with pytest.raises(removal.CannotRemoveSelf, match="this node itself") as own:
            removal.resolve(a, "here")
        with pytest.raises(gc.NoSuchMember, match="no member of this volume is called"):
            removal.resolve(a, "nobody")
        with pytest.raises(gc.AmbiguousMember, match="could be any of") as amb:
            removal.resolve(a, first)
        for exc in (own.value, amb.value):
            assert "\n" not in exc.message()
        assert removal.resolve(a, "laptop") == alike[0].node_id
        assert removal.resolve(a, alike[1].node_id.hex()[:10]) == alike[1].node_id
        done = removal.remove(a, "laptop")
        assert done["name"] == "laptop"
        with pytest.raises(removal.AlreadyRemoved, match="already removed"):
            removal.resolve(a, "laptop")
    finally:
        a.close()


def test_a_rotate_op_round_trips_and_malformed_ones_are_refused() -> None:
    a, b = Replica(), Replica()
    op = epochs.make_rotation(a.keys.current, a.node, {bytes(32)}, {b.node}, a.stamp())
    assert decode_op(encode_op(op)) == op
    bad = [
        dataclasses.replace(op, members=tuple(reversed(op.members))),  # not sorted
        dataclasses.replace(op, boxes=op.boxes[:1]),  # one box short
        dataclasses.replace(op, removed=(a.node,)),  # removes a member it keeps
        dataclasses.replace(op, epoch=b"short"),
        dataclasses.replace(op, number=0),
        dataclasses.replace(op, boxes=(b"x" * 79, op.boxes[1])),
    ]
    for op_bad in bad:
        with pytest.raises(MalformedOp):
            decode_op(encode_op(op_bad))


def test_stored_entries_of_an_epoch_not_held_are_left_out_not_fatal(
    tmp_path: Path, expect_logs: Callable[..., None]
) -> None:
    expect_logs("under a key epoch this node does not hold", logger="peer.journal")
    a = make_node(tmp_path, "a", node_keys())
    other, third = Replica(), Replica()
    rot = other.rotate(set(), {third.node})  # not sealed to A
    later = other.append(encode_op(Member(other.stamp(), "other")))
    with a.store.transaction():
        a.store.append_log([rot, later])
    a.close()
    a = make_node_again(tmp_path, "a")  # replays: the rotation opens, the entry after it not
    try:
        assert a.keys.current is a.keys.base
        assert other.node not in a.replica.members()
    finally:
        a.close()
