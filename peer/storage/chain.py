"""Each node's log as a hash chain: what a member that lies leaves behind.

Invariant: a node keeps as evidence only what its subject signed itself: two
signed heads (`peer.sealing.Head`) of one node that cannot both be true,
either two different entries at one seq, or an entry whose `prev` names
another entry at the seq before than the one held. Anyone can check such a
proof (`proof`), so proofs travel (`/hello`, `/watch`) and every node that
learns of one acts alike: it takes the forked node's entries only up to the
seq before the fork (`fork_cuts`), drops what it held beyond (as for a
forgotten node), and shows the evidence in `status`. Without this, two nodes
that were sent different entries for the same (node, seq) would keep them for
good with equal version vectors.

What a node had already folded into its checkpoint before it learnt of a fork
stays there (a checkpoint is not rewritten); the evidence still shows.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import cbor2

from peer.errors import CorruptEntry
from peer.sealing import GENESIS, HASH_BYTES, Head, LogEntry, head_of, verify_head
from peer.storage.store import Evidence, Store

FORK = "fork"
FORGED_CHECKPOINT = "forged checkpoint"
FORK_KINDS = (FORK,)
_HEADS_META = "checkpoint_heads"

__all__ = ["Forked", "head_of", "links", "proof"]


class Forked(CorruptEntry):
    """Entries of `node` that contradict what this node holds (kept as evidence)."""

    def __init__(self, node: bytes, seq: int) -> None:
        super().__init__(f"node {node.hex()[:8]} forked its log at seq {seq}")
        self.node = node
        self.seq = seq


def links(before: Head | None, entry: LogEntry) -> bool:
    """Whether `entry` can follow `before` (its node's entry at seq - 1, None
    if unknown here) in one log."""
    if entry.seq == 1:
        return not entry.chained or entry.prev == GENESIS
    if before is None:
        return True  # nothing to compare with (folded before chaining)
    if entry.chained:
        return entry.prev == before.hash
    return not before.prev  # a node never goes back to unchained entries


def proof(a: Head, b: Head, source: str) -> Evidence | None:
    """Evidence that `a` and `b` (one node's) contradict each other, or None
    if they do not, or if either is not its node's signature."""
    if a.node != b.node:
        return None
    if a.seq == b.seq and a.hash != b.hash:
        seq, detail = a.seq, "two different entries at one seq"
    elif b.seq == a.seq + 1 and b.prev and b.prev != a.hash:
        seq, detail = a.seq, f"entry {b.seq} chains onto another entry {a.seq}"
    elif b.seq == a.seq + 1 and not b.prev and a.prev:
        seq, detail = b.seq, f"entry {b.seq} is unchained after a chained one"
    else:
        return None
    try:
        verify_head(a)
        verify_head(b)
    except CorruptEntry:
        return None
    now = time.time_ns() // 1_000_000
    return Evidence(a.node, seq, FORK, detail, source, now, encode_head(a), encode_head(b))


def fork_cuts(evidence: Iterable[Evidence]) -> dict[bytes, int]:
    """Node -> the last seq still taken from it: the seq before its lowest fork."""
    cuts: dict[bytes, int] = {}
    for ev in evidence:
        if ev.kind in FORK_KINDS:
            cuts[ev.node] = min(ev.seq - 1, cuts.get(ev.node, ev.seq - 1))
    return cuts


def fork_proofs(evidence: Iterable[Evidence]) -> list[tuple[Head, Head]]:
    out = []
    for ev in evidence:
        if ev.kind in FORK_KINDS:
            a, b = decode_head(ev.a), decode_head(ev.b)
            if a is not None and b is not None:
                out.append((a, b))
    return out


def forged_checkpoint(folder: bytes, detail: str, source: str, blob: bytes) -> Evidence:
    """A checkpoint `folder` signed whose logs do not check (`ForgedCheckpoint`)."""
    now = time.time_ns() // 1_000_000
    # The blob itself is the proof (its envelope is the folder's signature).
    return Evidence(folder, 0, FORGED_CHECKPOINT, detail, source, now, blob, b"")


# -- heads on the wire and in the store ---------------------------------------------------


def head_out(head: Head) -> list[Any]:
    return [head.node, head.seq, head.prev, head.body, head.sig]


def head_in(item: Any) -> Head | None:
    """A head from its CBOR form, or None if malformed (not yet verified)."""
    if not isinstance(item, list) or len(item) != 5:
        return None
    node, seq, prev, body, sig = item
    if not (
        isinstance(node, bytes)
        and isinstance(seq, int)
        and not isinstance(seq, bool)
        and seq >= 1
        and isinstance(prev, bytes)
        and len(prev) in (0, HASH_BYTES)
        and isinstance(body, bytes)
        and isinstance(sig, bytes)
    ):
        return None
    return Head(node, seq, prev, body, sig)


def encode_head(head: Head) -> bytes:
    return cbor2.dumps(head_out(head), canonical=True)


def decode_head(data: bytes) -> Head | None:
    try:
        return head_in(cbor2.loads(data))
    except (cbor2.CBORDecodeError, ValueError, TypeError):
        return None


def store_heads(store: Store, heads: dict[bytes, Head]) -> None:
    """Keep the checkpoint's heads (inside the caller's transaction)."""
    store.set_meta(_HEADS_META, cbor2.dumps([head_out(h) for h in heads.values()], canonical=True))


def load_heads(store: Store) -> dict[bytes, Head]:
    """The signed heads of the checkpoint's covers, node by node."""
    raw = store.get_meta(_HEADS_META)
    if raw is None:
        return {}
    out = {}
    for item in cbor2.loads(raw):
        head = head_in(item)
        if head is not None:
            out[head.node] = head
    return out
