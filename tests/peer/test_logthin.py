"""What a fresh peer receives for a long run of small writes: the log's share.

Thinning (`peer.storage.gc.Thinning`) leaves a fresh peer the blocks of the versions
kept, but every write's log entry still travels: each must, for the peer to
check every node's chain and signatures and to know nothing was hidden. What
shrinks is the entry itself (operation format 2, `crdt.ops.COMPACT_VERSION`:
the op's node is its entry's). A checkpoint that keeps only a superseded
write's digest, which the hash chain would verify, is refused: the receiver
cannot tell it from a hidden create, delete or newest write.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import cbor2
import pytest

from crdt import ops
from crdt.clock import Hlc
from crdt.ops import ROOT, Create, Member, Move, Op, Write, decode_op
from peer.errors import CorruptEntry
from peer.identity import NodeIdentity, load_or_create
from peer.keys import VolumeKeys
from peer.net import wire
from peer.node import Node
from peer.sealing import (
    GENESIS,
    Head,
    LogEntry,
    entry_hash,
    head_of,
    open_entry,
    seal_entry,
    sign_legacy_entry,
    verify_entry,
    verify_head,
)
from peer.storage import checkpoint, journal
from tests.peer.test_checkpoint import forged, state
from tests.peer.test_gc import make_node, rewrite, serving
from tests.peer.test_sync import link, read_file, wait_until, write_file

F = b"\x05" * ops.ENTRY_ID_BYTES
BID = b"\x0b" * ops.BLOCK_ID_BYTES


def chained(identity: NodeIdentity, keys: VolumeKeys, log: list[Op]) -> list[LogEntry]:
    """A node's log from seq 1, its ops in format 2, sealed, signed and chained."""
    out: list[LogEntry] = []
    prev = GENESIS
    for seq, op in enumerate(log, start=1):
        out.append(seal_entry(keys, identity, seq, ops.encode_op(op, compact=True), prev))
        prev = entry_hash(out[-1])
    return out


def test_a_checkpoint_that_keeps_only_digests_of_writes_is_refused(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    """The hash chain names each entry by the digest of its sealed bytes, so
    a checkpoint holding a digest in place of an entry would still chain up
    to its node's signature. It is refused: the digest of a superseded write
    and the digest of a create, a delete or the newest write look alike."""
    member = load_or_create(tmp_path / "member")
    victim = load_or_create(tmp_path / "victim")
    v = victim.node_id

    def h(i: int) -> Hlc:
        return Hlc(1_000 + i, 0, v)

    log: list[Op] = [
        Member(h(0), "victim"),
        Create(h(1), F, ROOT, b"f", "file", 0o644, 0, 0),
        Write(h(2), F, (), 5, ((0, BID),)),
        Write(h(3), F, (h(2),), 6, ((0, BID),)),  # superseded by the next
        Write(h(4), F, (h(3),), 7, ((0, BID),)),
        Move(h(5), F, ops.TRASH, b"f", (h(4),)),  # the file deleted
    ]
    entries = chained(victim, keys, log)
    # The chain allows it: rebuilt from the digests alone (no sealed bytes),
    # it reaches the hash the victim signed at its last entry.
    prev = GENESIS
    for e in entries:
        prev = Head(v, e.seq, prev, head_of(e).body, e.sig).hash
    last = entries[-1]
    assert prev == entry_hash(last)
    verify_head(Head(v, last.seq, last.prev, head_of(last).body, last.sig))

    full = [[e.sealed, b""] for e in entries[:-1]] + [[last.sealed, last.sig]]
    good = forged(member, {v: full})
    assert len(checkpoint.open_checkpoint(keys, good).ops) == len(log)
    for hidden in (1, 3, 5):  # the create, a superseded write, the delete
        digest = head_of(entries[hidden]).body
        for item in ([digest, b""], [digest, b"", 2], [digest]):
            thinned = [*full[:hidden], item, *full[hidden + 1 :]]
            for folder in (member, victim):  # nor may the node thin its own log
                with pytest.raises(CorruptEntry, match="checkpoint"):
                    checkpoint.open_checkpoint(keys, forged(folder, {v: thinned}))


def test_compact_entries_bind_the_op_to_the_entry_s_node(tmp_path: Path, keys: VolumeKeys) -> None:
    """An op of format 2 names no node: its entry's does (the seal binds it
    to (node, seq), the signature to the node's key). Moved to another
    node's log it would not open; decoded without its node it is malformed."""
    a = load_or_create(tmp_path / "a")
    b = load_or_create(tmp_path / "b")
    op = Write(Hlc(5, 0, a.node_id), F, (Hlc(4, 0, a.node_id), Hlc(3, 1, b.node_id)), 9, ())
    (e,) = chained(a, keys, [op])
    data = open_entry(keys, e)
    assert decode_op(data, node=a.node_id) == op
    assert len(data) <= len(ops.encode_op(op)) - 2 * ops.NODE_ID_BYTES
    with pytest.raises(ops.MalformedOp):
        decode_op(data)
    moved = LogEntry(b.node_id, e.seq, e.sealed, e.sig, e.prev)
    with pytest.raises(CorruptEntry):
        open_entry(keys, moved, check_signature=False)


@pytest.mark.asyncio
async def test_logs_of_both_op_formats_converge_and_a_rewrite_costs_a_fresh_peer_less(
    tmp_path: Path, keys: VolumeKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose log holds ops of format 1 (written before) and format 2
    folds them into one checkpoint; a peer that held the old ones, the node
    itself after a restart and a fresh peer all end with the same state, and
    the fresh peer receives each later small rewrite's entry in at most 160
    bytes (format 1: ~200)."""
    monkeypatch.setattr(journal, "FOLD_MIN_ENTRIES", 1)
    old_encode = journal.encode_op
    monkeypatch.setattr(journal, "encode_op", lambda op, compact=False: old_encode(op))
    a = make_node(tmp_path, "a", keys)
    b = make_node(tmp_path, "b", keys)
    async with contextlib.AsyncExitStack() as stack:
        sa = await stack.enter_async_context(serving(a))
        sb = await stack.enter_async_context(serving(b))
        link(sa, sb)
        write_file(a, b"f", os.urandom(1000))
        write_file(b, b"g", os.urandom(1000))
        await wait_until(lambda: a.journal.vv == b.journal.vv, "B to hold A's format-1 ops")
        monkeypatch.setattr(journal, "encode_op", old_encode)
        rewrites = 200
        for _ in range(rewrites):
            rewrite(a, b"f", os.urandom(1000))
        latest = os.urandom(1000)
        rewrite(a, b"f", latest)
        rewrite(b, b"g", latest)
        await wait_until(lambda: a.journal.vv == b.journal.vv, "B to hold A's rewrites")
        assert read_file(b, b"f") == latest
        raw_first = [cbor2.loads(open_entry(keys, e))[0] for e in a.store.iter_log()]
        assert set(raw_first) == {ops.FORMAT_VERSION, ops.COMPACT_VERSION}
        await wait_until(
            lambda: a.stability.stable_vv() == a.journal.vv, "A's log to be stable", 20
        )
        a.collector.collect()
        assert a.store.covers() == a.journal.vv
        held = sum(a.journal.vv.values())

        c = make_node(tmp_path, "c", keys)
        sc = await stack.enter_async_context(serving(c))
        link(sc, sa)
        # (The vector is complete before the checkpoint's last piece is merged.)
        await wait_until(
            lambda: c.sync.ops_in == held and state(c) == state(a),
            "C to merge every op",
        )
        assert read_file(c, b"f") == latest == read_file(c, b"g")
        assert state(c) == state(a) == state(b)
        blocks = sum(len(s) for s in (c.store.get_block(bid) for bid in c.store.block_ids()) if s)
        per_op = (c.sync.bytes_in - blocks) / c.sync.ops_in
        print(f"fresh peer: {c.sync.ops_in} ops, {per_op:.0f} log bytes per op on the wire")
        assert c.sync.ops_in > rewrites
        assert per_op <= 160, per_op

    again = Node(a.config, keys, load_or_create(a.config.data_dir))
    again.start()
    try:
        assert state(again) == state(c)
    finally:
        again.close()


def test_a_log_response_names_node_seq_and_prev_once_per_run_of_a_node(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    """In a log response, an entry right after its node's previous one
    travels as [sealed, sig]: the receiver fills in node, seq and `prev`, and
    the signature checks them, so a sender cannot make an entry say more."""
    a = load_or_create(tmp_path / "a")
    b = load_or_create(tmp_path / "b")
    log_a = chained(a, keys, [Member(Hlc(1, i, a.node_id), f"a{i}") for i in range(4)])
    log_b = chained(b, keys, [Member(Hlc(1, i, b.node_id), f"b{i}") for i in range(2)])
    legacy = sign_legacy_entry(keys, a, 1, ops.encode_op(Member(Hlc(0, 0, a.node_id), "old")))
    sent = [*log_a[1:], *log_b, log_a[0], legacy]
    body = wire.encode_log_response(wire.LogResponse(sent, False))
    items = cbor2.loads(body)["entries"]
    assert [len(i) for i in items] == [5, 2, 2, 5, 2, 5, 5]
    got = wire.decode_log_response(body).entries
    assert got == sent
    full = wire.encode(
        {"entries": [[e.node, e.seq, e.sealed, e.sig, e.prev] for e in sent], "more": False}
    )
    assert len(full) - len(body) >= 3 * 2 * (ops.NODE_ID_BYTES + 2)

    # A short item after another node's entry, or with its bytes changed,
    # makes an entry whose signature does not hold.
    swapped = [items[0], items[3], items[1]]
    tampered = [items[0], [items[1][0][:-1] + bytes([items[1][0][-1] ^ 1]), items[1][1]]]
    for bad in (swapped, tampered):
        entries = wire.decode_log_response(cbor2.dumps({"entries": bad, "more": False})).entries
        verify_entry(entries[0])
        with pytest.raises(CorruptEntry):
            verify_entry(entries[-1])
    with pytest.raises(wire.BadMessage):
        wire.decode_log_response(cbor2.dumps({"entries": [items[1]], "more": False}))
