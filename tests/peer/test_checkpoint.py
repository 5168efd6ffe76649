"""Checkpoints (`peer.storage.checkpoint`, `Journal.fold`): the stable log folded, with real nodes.

Nodes run in one process over real HTTP on loopback (as in test_gc.py). A
collection folds the stable prefix of the log into a checkpoint; a node that
joins late is sent the checkpoint plus the entries after it, and every node,
folded or not, merges what arrives later exactly alike.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdt.clock import Hlc
from crdt.ops import ROOT, Member, Move, Op, SetAttr, encode_op
from peer import sealing
from peer.errors import CorruptEntry
from peer.fs.volume import ROOT_INODE
from peer.identity import NodeIdentity, load_or_create
from peer.keys import VolumeKeys
from peer.net.wire import CBOR_ERRORS
from peer.node import Node
from peer.sealing import GENESIS, LogEntry, entry_hash, seal_entry
from peer.secret import new_secret
from peer.storage import checkpoint, journal
from tests.peer.test_gc import make_node, serving
from tests.peer.test_sync import CALLER, link, read_file, wait_until, write_file

FILES = 20
CHMODS = 600  # per node


def log_size(node: Node) -> tuple[int, int]:
    """(rows, bytes of sealed ops and signatures) of a node's log."""
    rows, size = node.store._conn.execute(
        "SELECT count(*), coalesce(sum(length(sealed) + length(sig)), 0) FROM log"
    ).fetchone()
    return int(rows), int(size)


def state(node: Node) -> object:
    r = node.replica
    return r.snapshot(), sorted(r.members().items()), r.forgotten()


def chmod_many(node: Node, count: int) -> None:
    for i in range(count):
        attrs = node.volume.lookup(ROOT_INODE, b"f%d" % (i % FILES))
        node.volume.setattr(attrs.inode, mode=0o600 + (i % 64))


def stable_everywhere(*nodes: Node) -> bool:
    return all(n.stability.stable_vv() == n.journal.vv for n in nodes) and all(
        n.journal.vv == nodes[0].journal.vv for n in nodes
    )


def entries(node_id: NodeIdentity, keys: VolumeKeys, ops: list[Op]) -> list[LogEntry]:
    """A node's log from seq 1: `ops` sealed, signed and chained."""
    out: list[LogEntry] = []
    prev = GENESIS
    for seq, op in enumerate(ops, start=1):
        out.append(seal_entry(keys, node_id, seq, encode_op(op), prev))
        prev = entry_hash(out[-1])
    return out


@pytest.mark.asyncio
async def test_fold_restart_late_joiner_and_late_old_ops(tmp_path: Path, keys: VolumeKeys) -> None:
    a, b = make_node(tmp_path, "a", keys), make_node(tmp_path, "b", keys)
    async with contextlib.AsyncExitStack() as stack:
        sa = await stack.enter_async_context(serving(a))
        sb = await stack.enter_async_context(serving(b))
        link(sa, sb)
        d1 = a.volume.mkdir(ROOT_INODE, b"d1", 0o755, CALLER).inode
        d2 = a.volume.mkdir(ROOT_INODE, b"d2", 0o755, CALLER).inode
        made = a.replica.tree.places[a.store.entry_of(d2) or b""].hlc.wall_ms
        # The move below stamped at least 2 ms after the mkdirs (room for an older op).
        await wait_until(lambda: time.time_ns() // 1_000_000 > made + 1, "the clock to move on")
        a.volume.rename(ROOT_INODE, b"d1", d2, b"d1", 0)
        for i in range(FILES):
            write_file(a, b"f%d" % i, os.urandom(1000 + i))
        await wait_until(lambda: read_file(b, b"f%d" % (FILES - 1)) is not None, "B to have f*")
        chmod_many(a, CHMODS)
        chmod_many(b, CHMODS)
        await wait_until(lambda: stable_everywhere(a, b), "A and B to be stable", 20)
        assert state(a) == state(b)

        # -- A folds -------------------------------------------------------------------------
        rows_before, bytes_before = log_size(a)
        result = a.collector.collect()
        rows_after, bytes_after = log_size(a)
        sealed = a.store.get_checkpoint()
        assert sealed is not None
        assert result.log_entries_folded == rows_before - rows_after > 2 * CHMODS
        assert rows_after < rows_before // 10, (rows_before, rows_after)
        # Every folded entry stays, checkable against its node's signature;
        # only the signatures the hash chain makes redundant go.
        assert len(sealed) < (bytes_before - bytes_after) * 3 // 4, (len(sealed), bytes_before)
        assert a.store.covers() == a.journal.vv == a.store.version_vector()
        cp = checkpoint.open_checkpoint(keys, sealed)
        assert len(cp.ops) == sum(cp.covers.values()) == result.log_entries_folded
        print(
            f"fold: log rows {rows_before} -> {rows_after}, log bytes {bytes_before} -> "
            f"{bytes_after}, checkpoint {len(sealed)} bytes, {len(cp.ops)} ops"
        )
        expected = state(a)

        # A restarts (on the same data dir) to the identical tree and goes on writing.
        port = sa.port
        await stack.aclose()
    a, b = make_node(tmp_path, "a", keys), make_node(tmp_path, "b", keys)
    assert state(a) == expected
    assert a.journal.vv == a.store.covers()
    async with contextlib.AsyncExitStack() as stack:
        sa = await stack.enter_async_context(serving(a, port))
        sb = await stack.enter_async_context(serving(b))
        link(sa, sb)
        write_file(a, b"after-fold", b"new")  # seq covers + 1: the log goes on
        await wait_until(lambda: read_file(b, b"after-fold") == b"new", "B to get it")
        assert 0 < log_size(a)[0] <= 3  # its create and write, after the checkpoint

        # -- a late joiner -------------------------------------------------------------------
        c = make_node(tmp_path, "c", keys)
        sc = await stack.enter_async_context(serving(c))
        sc.add_peer("127.0.0.1", sa.port, "static")  # only A: it gets A's checkpoint
        await wait_until(lambda: state(c) == state(a) == state(b), "C to converge", 20)
        history = sum(b.journal.vv.values())
        got = log_size(c)[0]
        assert c.store.covers() == a.store.covers()
        # C held nothing it covers: it keeps A's checkpoint as it came, not
        # re-encoded and re-signed (seconds of CPU for a large volume).
        assert c.store.get_checkpoint() == a.store.get_checkpoint()
        assert got < history // 10, (got, history)
        print(f"late joiner: checkpoint + {got} entries, full history {history} entries")
        assert read_file(c, b"f3") == read_file(a, b"f3")

        # -- an op from a new node with an old stamp: merged alike, folded or not -----------
        x = load_or_create(tmp_path / "x")
        d1_id, d2_id = a.store.entry_of(d1), a.store.entry_of(d2)
        assert d1_id is not None
        assert d2_id is not None
        moved = a.replica.tree.places[d1_id].hlc  # A's move of d1 into d2, folded
        old = Hlc(moved.wall_ms - 1, 0, x.node_id)
        f0 = a.replica.lookup(ROOT, b"f0")
        assert f0 is not None
        late = entries(
            x,
            keys,
            [
                Member(Hlc(old.wall_ms, 0, x.node_id), "x"),
                # d2 into d1 before d1 into d2: A's move would now make a cycle and is skipped
                Move(Hlc(old.wall_ms, 1, x.node_id), d2_id, d1_id, b"d2"),
                SetAttr(Hlc(old.wall_ms, 2, x.node_id), f0, "mode", 0o777),
            ],
        )
        for node in (a, b):  # A folded, B never did
            node.journal.merge_remote(late)
        assert state(a) == state(b)
        assert a.replica.tree.places[d2_id].parent == d1_id
        await wait_until(lambda: state(c) == state(a), "C to merge them too", 20)
        assert state(c) == state(b)


def forged(folder: NodeIdentity, logs: dict[bytes, list[list[bytes]]]) -> bytes:
    """A checkpoint of raw `logs` items, signed by `folder` as a member would."""
    body = cbor2.dumps({"v": 2, "logs": logs}, canonical=True)
    sig = folder.sign(b"dfs-peer:v2:checkpoint" + folder.node_id + body)
    return cbor2.dumps([folder.node_id, body, sig], canonical=True)


def test_a_tampered_or_forged_checkpoint_is_refused(tmp_path: Path, keys: VolumeKeys) -> None:
    me = load_or_create(tmp_path / "me")
    victim = load_or_create(tmp_path / "victim")
    mine = entries(me, keys, [Member(Hlc(1, 0, me.node_id), "me")])
    theirs = entries(
        victim,
        keys,
        [Member(Hlc(1, i, victim.node_id), f"v{i}") for i in range(3)],
    )
    blob = checkpoint.seal_checkpoint(me, {me.node_id: mine, victim.node_id: theirs})
    cp = checkpoint.open_checkpoint(keys, blob)
    assert cp.covers == {me.node_id: 1, victim.node_id: 3}
    assert len(cp.ops) == 4
    assert cp.folder == me.node_id
    folder, body, sig = cbor2.loads(blob)
    flipped = bytearray(body)
    flipped[-1] ^= 1
    raw = cbor2.loads(body)["logs"]
    v = victim.node_id
    mine_as_victims = [[e.sealed, e.sig] for e in mine]
    other_op = encode_op(Member(Hlc(1, 1, v), "forged"))
    swapped = sealing.seal(keys.log, other_op, v + (2).to_bytes(8, "big"))
    forgeries = {
        # covers the victim's entries without the victim's signature
        "claims a node's entries": forged(me, {v: mine_as_victims}),
        "leaves one out": forged(me, {v: [raw[v][0], raw[v][2]]}),
        "cuts the signed head": forged(me, {v: raw[v][:2]}),
        # a member can seal an op as the victim's (it has the secret), not sign it
        "swaps one": forged(me, {v: [raw[v][0], [swapped, b""], raw[v][2]]}),
    }
    for what, bad in forgeries.items():
        with pytest.raises(checkpoint.ForgedCheckpoint, match=me.node_id.hex()[:8]):
            checkpoint.open_checkpoint(keys, bad)
        assert what
    tampered = {
        "flipped byte": cbor2.dumps([folder, bytes(flipped), sig]),
        "bad signature": cbor2.dumps([folder, body, bytes(64)]),
        "wrong key": checkpoint.seal_checkpoint(
            me, {me.node_id: entries(me, VolumeKeys.from_root(new_secret()), [cp.ops[0]])}
        ),
        "not cbor": b"\xff" + blob,
    }
    for what, bad in tampered.items():
        with pytest.raises(CorruptEntry, match="checkpoint"):
            checkpoint.open_checkpoint(keys, bad)
        assert what


@pytest.mark.asyncio
async def test_a_peer_serving_a_tampered_checkpoint_changes_nothing(
    tmp_path: Path, keys: VolumeKeys, monkeypatch: pytest.MonkeyPatch, expect_logs: object
) -> None:
    expect_logs(r"peer sent bad data: checkpoint", logger="peer.sync")  # type: ignore[operator]
    monkeypatch.setattr(journal, "FOLD_MIN_ENTRIES", 1)
    a = make_node(tmp_path, "a", keys)
    write_file(a, b"f", b"data")
    a.collector.collect()
    sealed = a.store.get_checkpoint()
    assert sealed is not None
    node, inner, sig = cbor2.loads(sealed)
    flipped = bytearray(inner)
    flipped[-1] ^= 1
    monkeypatch.setattr(a.store, "get_checkpoint", lambda: cbor2.dumps([node, bytes(flipped), sig]))
    c = make_node(tmp_path, "c", keys)
    before = (state(c), dict(c.journal.vv), log_size(c))
    async with contextlib.AsyncExitStack() as stack:
        sa = await stack.enter_async_context(serving(a))
        sc = await stack.enter_async_context(serving(c))
        sc.add_peer("127.0.0.1", sa.port, "static")
        await wait_until(
            lambda: any("checkpoint" in (lk.last_error or "") for lk in c.sync.links.values()),
            "C to refuse A's checkpoint",
        )
        assert (state(c), dict(c.journal.vv), log_size(c)) == before
        assert c.store.get_checkpoint() is None


# -- the body, coded an entry at a time -------------------------------------------

_plain = st.recursive(
    st.integers(0, 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.binary(max_size=8) | st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=30,
)
_bodies = st.fixed_dictionaries(
    {
        "v": st.integers(0, 300),
        "logs": st.dictionaries(
            st.binary(min_size=1, max_size=33),
            st.lists(
                st.lists(st.binary(max_size=70), min_size=2, max_size=2)
                | st.tuples(st.binary(max_size=20), st.binary(max_size=5), st.just(1)).map(list),
                max_size=30,
            ),
            max_size=4,
        ),
    }
)


@given(_bodies)
def test_a_body_coded_in_pieces_is_the_bytes_and_values_cbor2_gives(body: dict[str, Any]) -> None:
    data = cbor2.dumps(body, canonical=True)
    assert checkpoint._encode_body(body) == data
    assert checkpoint._decode_body(data) == cbor2.loads(data)


@given(_plain | st.binary(max_size=60))
def test_any_cbor_decodes_in_pieces_as_cbor2_decodes_it(value: Any) -> None:
    # Valid CBOR of any shape, or any bytes at all: the same value, or the same refusal.
    data = value if isinstance(value, bytes) and value[:1] == b"\xff" else cbor2.dumps(value)
    for raw in (data, data[:-1], data + b"\x00", bytes([0x9F]) + data + b"\xff"):
        try:
            expected: Any = cbor2.loads(raw)
        except CBOR_ERRORS:  # what cbor2 refuses, _decode_body refuses
            with pytest.raises(CorruptEntry):
                checkpoint._decode_body(raw)
            continue
        assert checkpoint._decode_body(raw) == expected
