"""Sealing of blocks and log entries, the secret check, and the node identity."""

from __future__ import annotations

import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from peer.errors import CorruptBlock, CorruptEntry, CorruptStore
from peer.identity import KEY_FILE, NodeIdentity, load_or_create
from peer.keys import VolumeKeys
from peer.sealing import (
    OVERHEAD,
    LogEntry,
    SealError,
    block_id,
    check_opens,
    make_check,
    open_block,
    open_entry,
    seal,
    seal_block,
    seal_entry,
    unseal,
    verify_entry,
)

KEYS = VolumeKeys.from_root(b"\x01" * 32)
OTHER_KEYS = VolumeKeys.from_root(b"\x02" * 32)
KEY = KEYS.blocks


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# seal / unseal


def test_seal_round_trips_and_is_versioned() -> None:
    sealed = seal(KEY, b"hello", b"aad")
    assert sealed[0] == 1
    assert len(sealed) == len(b"hello") + OVERHEAD
    assert unseal(KEY, sealed, b"aad") == b"hello"
    assert unseal(KEY, seal(KEY, b"", b""), b"") == b""


def test_every_tampered_byte_is_detected() -> None:
    sealed = seal(KEY, b"some plaintext", b"aad")
    for i in range(len(sealed)):
        with pytest.raises(SealError):
            unseal(KEY, _flip(sealed, i), b"aad")


def test_wrong_aad_or_key_does_not_open() -> None:
    sealed = seal(KEY, b"x", b"entry-1")
    with pytest.raises(SealError):
        unseal(KEY, sealed, b"entry-2")
    with pytest.raises(SealError):
        unseal(KEYS.log, sealed, b"entry-1")


def test_truncated_sealed_bytes_do_not_open() -> None:
    with pytest.raises(SealError):
        unseal(KEY, seal(KEY, b"x", b"")[: OVERHEAD - 1], b"")


def test_nonces_differ_for_the_same_plaintext() -> None:
    a, b = seal(KEY, b"same", b"aad"), seal(KEY, b"same", b"aad")
    assert a != b
    assert a[1:25] != b[1:25]


# blocks


def test_block_round_trips_and_id_is_content_hash() -> None:
    bid, sealed = seal_block(KEYS, b"block data")
    assert len(bid) == 32
    assert bid == block_id(KEYS, b"block data")
    assert open_block(KEYS, bid, sealed) == b"block data"


def test_block_id_is_keyed_by_the_volume() -> None:
    assert block_id(KEYS, b"same") != block_id(OTHER_KEYS, b"same")


def test_block_under_another_id_is_corrupt() -> None:
    bid, sealed = seal_block(KEYS, b"block a")
    other_id, _ = seal_block(KEYS, b"block b")
    with pytest.raises(CorruptBlock):
        open_block(KEYS, other_id, sealed)
    with pytest.raises(CorruptBlock):
        open_block(KEYS, bid, _flip(sealed, len(sealed) - 1))
    with pytest.raises(CorruptBlock):
        open_block(OTHER_KEYS, bid, sealed)


def test_block_sealed_under_a_lying_id_is_corrupt() -> None:
    # A secret holder can seal anything for any id; the hash check catches it.
    lying_id = block_id(KEYS, b"what the id claims")
    sealed = seal(KEYS.blocks, b"something else", lying_id)
    with pytest.raises(CorruptBlock, match="does not match its id"):
        open_block(KEYS, lying_id, sealed)


# log entries


def test_entry_round_trips_and_anyone_can_verify_it() -> None:
    me = NodeIdentity.generate()
    entry = seal_entry(KEYS, me, 7, b"op bytes")
    assert (entry.node, entry.seq, len(entry.sig)) == (me.node_id, 7, 64)
    verify_entry(entry)
    assert open_entry(KEYS, entry) == b"op bytes"


Alter = Callable[[LogEntry], LogEntry]


@pytest.mark.parametrize(
    "alter",
    [
        pytest.param(lambda e: replace(e, sealed=_flip(e.sealed, 5)), id="sealed"),
        pytest.param(lambda e: replace(e, sig=_flip(e.sig, 5)), id="sig"),
    ],
)
def test_altered_entry_is_corrupt(alter: Alter) -> None:
    altered = alter(seal_entry(KEYS, NodeIdentity.generate(), 1, b"op"))
    with pytest.raises(CorruptEntry):
        verify_entry(altered)
    with pytest.raises(CorruptEntry):
        open_entry(KEYS, altered)


def test_entry_moved_to_another_seq_is_corrupt() -> None:
    entry = seal_entry(KEYS, NodeIdentity.generate(), 1, b"op")
    with pytest.raises(CorruptEntry):
        verify_entry(replace(entry, seq=2))


def test_entry_forged_by_another_node_is_corrupt() -> None:
    victim, forger = NodeIdentity.generate(), NodeIdentity.generate()
    forged = seal_entry(KEYS, forger, 1, b"evil")
    claimed = replace(forged, node=victim.node_id)
    with pytest.raises(CorruptEntry, match="bad signature"):
        verify_entry(claimed)


def test_entry_re_signed_by_its_node_but_sealed_for_another_identity_is_corrupt() -> None:
    # The signature holds, but the MAC binds the op to (node, seq).
    me = NodeIdentity.generate()
    original = seal_entry(KEYS, me, 1, b"op")
    sig = me.sign(b"dfs-peer:v1:entry" + me.node_id + (2).to_bytes(8, "big") + original.sealed)
    moved = LogEntry(me.node_id, 2, original.sealed, sig)
    verify_entry(moved)
    with pytest.raises(CorruptEntry):
        open_entry(KEYS, moved)


def test_entry_under_another_volume_does_not_open() -> None:
    entry = seal_entry(KEYS, NodeIdentity.generate(), 1, b"op")
    verify_entry(entry)
    with pytest.raises(CorruptEntry):
        open_entry(OTHER_KEYS, entry)


@pytest.mark.parametrize(
    "alter",
    [
        pytest.param(lambda e: replace(e, node=b"short"), id="short-node"),
        pytest.param(lambda e: replace(e, sig=b"\x00" * 10), id="short-sig"),
        pytest.param(lambda e: replace(e, seq=0), id="seq-0"),
        pytest.param(lambda e: replace(e, seq=-1), id="seq-negative"),
        pytest.param(lambda e: replace(e, seq=1 << 64), id="seq-too-big"),
    ],
)
def test_malformed_entry_is_corrupt_not_a_crash(alter: Alter) -> None:
    entry = seal_entry(KEYS, NodeIdentity.generate(), 1, b"op")
    with pytest.raises(CorruptEntry):
        verify_entry(alter(entry))


# secret check


def test_check_opens_only_with_the_same_secret() -> None:
    check = make_check(KEYS)
    assert check_opens(KEYS, check)
    assert check_opens(VolumeKeys.from_root(b"\x01" * 32), check)
    assert not check_opens(OTHER_KEYS, check)
    assert not check_opens(KEYS, b"garbage")


# identity


def test_identity_file_is_private_and_reloads_the_same_node(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = load_or_create(data_dir)
    key_file = data_dir / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_bytes() == bytes(first.signing_key)
    assert len(first.node_id) == 32
    assert first.short == first.node_id.hex()[:8]
    again = load_or_create(data_dir)
    assert again.node_id == first.node_id
    assert [p.name for p in data_dir.iterdir()] == [KEY_FILE]


def test_identity_file_of_wrong_size_is_refused(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_bytes(b"\x00" * 31)
    with pytest.raises(CorruptStore, match="31 bytes"):
        load_or_create(tmp_path)


def test_identity_signature_verifies_with_node_id() -> None:
    import nacl.signing

    me = NodeIdentity.generate()
    sig = me.sign(b"data")
    assert len(sig) == 64
    nacl.signing.VerifyKey(me.node_id).verify(b"data", sig)
    assert bytes(me.signing_key).hex() not in repr(me)
