"""The hash chain of each node's log (`peer.sealing`, `peer.storage.chain`) and the
upgrade of stores written before it."""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from crdt.clock import Hlc
from crdt.ops import ROOT, Create, Forget, Member
from peer.identity import NodeIdentity, load_or_create
from peer.keys import VolumeKeys
from peer.node import DB_NAME
from peer.sealing import (
    GENESIS,
    entry_hash,
    head_of,
    open_entry,
    sign_legacy_entry,
    verify_entry,
)
from peer.storage import chain, checkpoint
from peer.storage.store import Store
from tests.peer.hostile import chain_of
from tests.peer.test_gc import make_node, serving
from tests.peer.test_sync import link, read_file, wait_until, write_file


def members(identity: NodeIdentity, keys: VolumeKeys, count: int) -> list[Member]:
    return [Member(Hlc(1000 + i, 0, identity.node_id), f"n{i}") for i in range(count)]


def test_each_entry_names_the_hash_of_the_one_before_and_signs_it(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    me = load_or_create(tmp_path / "me")
    log = chain_of(me, keys, members(me, keys, 3))
    assert log[0].prev == GENESIS
    assert [e.prev for e in log[1:]] == [entry_hash(e) for e in log[:-1]]
    for e in log:
        verify_entry(e)
    # A link changed is a signature that no longer holds.
    with pytest.raises(Exception, match="bad signature"):
        verify_entry(replace(log[2], prev=entry_hash(log[0])))
    assert chain.links(head_of(log[1]), log[2])
    assert not chain.links(head_of(log[0]), log[2])


def test_a_fork_is_proven_only_by_two_signatures_of_the_node(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    me, other = load_or_create(tmp_path / "me"), load_or_create(tmp_path / "other")
    ops = members(me, keys, 3)
    one = chain_of(me, keys, ops[:2])
    two = [one[0], *chain_of(me, keys, [ops[2]], first=2, prev=one[0].prev)]
    same_seq = chain.proof(head_of(one[1]), head_of(two[1]), "here")
    assert same_seq is not None
    assert (same_seq.node, same_seq.seq, same_seq.kind) == (me.node_id, 2, "fork")
    # entry 2 of a third branch chains onto an entry 1 other than the one held
    three = chain_of(me, keys, [Member(Hlc(5, 0, me.node_id), "x"), ops[1]])
    assert chain.proof(head_of(one[0]), head_of(three[1]), "here") is not None
    assert chain.proof(head_of(one[0]), head_of(one[1]), "here") is None  # consistent
    # Another node cannot frame `me`: its "entry" of me does not verify.
    framed = replace(head_of(two[1]), sig=other.sign(b"anything"))
    assert chain.proof(head_of(one[1]), framed, "here") is None
    assert chain.fork_cuts([same_seq]) == {me.node_id: 1}


def _unchain(data_dir: Path, keys: VolumeKeys) -> None:
    """Make the store in `data_dir` what a node wrote before chaining: schema
    2 (no `prev` column, no evidence table), every entry format 1."""
    identity = load_or_create(data_dir)
    with Store.open(data_dir / DB_NAME) as store:
        entries = list(store.iter_log())
    conn = sqlite3.connect(data_dir / DB_NAME, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("DROP TABLE log")
    conn.execute("DROP TABLE evidence")
    conn.execute(
        "CREATE TABLE log (node BLOB NOT NULL, seq INTEGER NOT NULL, sealed BLOB NOT NULL,"
        " sig BLOB NOT NULL, PRIMARY KEY (node, seq)) WITHOUT ROWID"
    )
    for e in entries:
        legacy = sign_legacy_entry(keys, identity, e.seq, open_entry(keys, e))
        conn.execute(
            "INSERT INTO log VALUES (?, ?, ?, ?)", (e.node, e.seq, legacy.sealed, legacy.sig)
        )
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (b"2",))
    conn.execute("COMMIT")
    conn.close()


@pytest.mark.asyncio
async def test_a_store_written_before_chaining_opens_goes_on_and_syncs(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    old = make_node(tmp_path, "old", keys)
    write_file(old, b"before.txt", b"written before the upgrade")
    old.close()
    _unchain(tmp_path / "old-data", keys)

    old = make_node(tmp_path, "old", keys)  # the same data dir, migrated
    assert read_file(old, b"before.txt") == b"written before the upgrade"
    own = old.identity.node_id
    last_legacy = old.store.entry_at(own, old.journal.vv[own])
    assert last_legacy is not None
    assert not last_legacy.chained
    write_file(old, b"after.txt", b"written after")
    first_chained = old.store.entry_at(own, last_legacy.seq + 1)
    assert first_chained is not None
    assert first_chained.prev == entry_hash(last_legacy)  # the chain binds what came before

    new = make_node(tmp_path, "new", keys)
    async with contextlib.AsyncExitStack() as stack:
        so = await stack.enter_async_context(serving(old))
        sn = await stack.enter_async_context(serving(new))
        link(so, sn)
        await wait_until(
            lambda: (
                read_file(new, b"before.txt") == b"written before the upgrade"
                and read_file(new, b"after.txt") == b"written after"
            ),
            "the new node to take both the old and the chained entries",
        )
        assert new.store.evidence() == []
        assert old.store.evidence() == []


def test_a_checkpoint_brings_nothing_back_past_a_cut(tmp_path: Path, keys: VolumeKeys) -> None:
    """A peer that folded a node's entries before it learnt that the node was
    cut (forgotten, or caught forking) cannot bring them back through its
    checkpoint: they are left out of what is merged."""
    a = make_node(tmp_path, "a", keys)
    m = load_or_create(tmp_path / "m")
    log = chain_of(
        m,
        keys,
        [
            Member(Hlc(1000, 0, m.node_id), "m"),
            Create(Hlc(1000, 1, m.node_id), b"1" * 16, ROOT, b"one", "dir", 0o755, 0, 0),
        ],
    )
    try:
        a.journal.merge_remote(log[:1])
        a.journal.commit(lambda stamp: [Forget(stamp(), m.node_id, 1)])  # of two: honoured
        assert a.replica.forgotten() == {m.node_id: 1}
        folded = checkpoint.seal_checkpoint(m, {m.node_id: log})
        a.journal.adopt_checkpoint(checkpoint.open_checkpoint(keys, folded))
        assert a.journal.vv[m.node_id] == 1
        assert a.replica.lookup(ROOT, b"one") is None
        assert a.store.covers() == {m.node_id: 1}
    finally:
        a.close()
