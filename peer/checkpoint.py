"""Checkpoints: the stable prefix of the log folded into a compacted set of ops.

Invariant: a checkpoint opens only if a holder of the volume secret sealed it
(XChaCha20-Poly1305 under the log key, bound to the producing node's id) and
that node's Ed25519 signature over the sealed bytes holds; its plaintext is a
canonical CBOR map `{"v": 1, "covers": {node: seq}, "ops": [op bytes...]}`,
decoded strictly (every op by `crdt.ops.decode_op`, every op's node among
`covers`). `ops` are `crdt.compact.compact` of every operation of entries
(n, s) with s <= covers[n], so merging them merges exactly what those entries
would (the ops keep their stamps: `--at` filters them as it filters the log).

Note what a checkpoint does not prove: the origin of each op in it. A log
entry is signed by the node that wrote it; an op in a checkpoint is vouched
for by the checkpoint's producer, a secret holder.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cbor2
import nacl.exceptions
import nacl.signing

from crdt.ops import MalformedOp, Op, decode_op, encode_op
from peer.errors import CorruptEntry
from peer.identity import NodeIdentity
from peer.keys import VolumeKeys
from peer.sealing import MAX_SEQ, NODE_ID_BYTES, SIGNATURE_BYTES, SealError, seal, unseal

# Bounded so a checkpoint fits one log response beside a batch of entries
# (`wire.MAX_CHECKPOINT_BYTES`); a node whose checkpoint would grow past it
# stops folding (its log keeps the rest).
from peer.wire import CBOR_ERRORS, MAX_CHECKPOINT_BYTES

FORMAT_VERSION = 1
MAX_COVERS_NODES = 100_000

_AAD = b"dfs-peer:v1:checkpoint"
_SIG_CONTEXT = b"dfs-peer:v1:checkpoint-sig"


class CheckpointTooLarge(Exception):
    """A checkpoint that would not fit `MAX_CHECKPOINT_BYTES`."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The folded prefix: `covers` {node: last seq folded} and its compacted ops."""

    covers: dict[bytes, int]
    ops: tuple[Op, ...]


def covered(theirs: dict[bytes, int], covers: dict[bytes, int]) -> bool:
    """Whether a vector holds everything a checkpoint covers."""
    return all(theirs.get(n, 0) >= s for n, s in covers.items())


def seal_checkpoint(keys: VolumeKeys, identity: NodeIdentity, cp: Checkpoint) -> bytes:
    """The stored and sent form: canonical CBOR [node, sealed, sig]."""
    plain = cbor2.dumps(
        {"v": FORMAT_VERSION, "covers": dict(cp.covers), "ops": [encode_op(op) for op in cp.ops]},
        canonical=True,
    )
    node = identity.node_id
    sealed = seal(keys.log, plain, _AAD + node)
    blob = cbor2.dumps([node, sealed, identity.sign(_SIG_CONTEXT + node + sealed)], canonical=True)
    if len(blob) > MAX_CHECKPOINT_BYTES:
        raise CheckpointTooLarge(f"{len(blob)} bytes")
    return blob


def _fail(detail: str) -> CorruptEntry:
    return CorruptEntry(f"checkpoint: {detail}")


def open_checkpoint(keys: VolumeKeys, blob: bytes, *, stored_here: bool = False) -> Checkpoint:
    """Verify and decode a checkpoint; `CorruptEntry` on any failure.

    `stored_here`: the blob comes from this node's store, where it was checked
    when it entered; its ops are then decoded without re-encoding each one to
    check canonical form (as replay does for log entries). Signature and MAC
    are always checked."""
    covers, raw_ops = _open_body(keys, blob, stored_here)
    return Checkpoint(covers, tuple(_decode_ops(raw_ops, covers, stored_here)))


def iter_checkpoint_ops(keys: VolumeKeys, blob: bytes) -> Iterator[Op]:
    """The ops of a checkpoint from this node's store, decoded one at a time
    (replay applies them in chunks: all 200,000 of a large volume decoded at
    once would raise the node's resident memory for good)."""
    covers, raw_ops = _open_body(keys, blob, True)
    return _decode_ops(raw_ops, covers, True)


def _open_body(
    keys: VolumeKeys, blob: bytes, stored_here: bool
) -> tuple[dict[bytes, int], list[bytes]]:
    if len(blob) > MAX_CHECKPOINT_BYTES:
        raise _fail("too large")
    outer = _cbor(blob)
    if not isinstance(outer, list) or len(outer) != 3:
        raise _fail("malformed envelope")
    node, sealed, sig = outer
    if not (
        isinstance(node, bytes)
        and len(node) == NODE_ID_BYTES
        and isinstance(sealed, bytes)
        and isinstance(sig, bytes)
        and len(sig) == SIGNATURE_BYTES
    ):
        raise _fail("malformed envelope")
    try:
        nacl.signing.VerifyKey(node).verify(_SIG_CONTEXT + node + sealed, sig)
    except nacl.exceptions.CryptoError as exc:  # BadSignatureError is one
        raise _fail(f"bad signature ({exc})") from exc
    try:
        plain = unseal(keys.log, sealed, _AAD + node)
    except SealError as exc:
        raise _fail(str(exc)) from exc
    body = _cbor(plain)
    if not stored_here and cbor2.dumps(body, canonical=True) != plain:
        raise _fail("not canonical")
    if not isinstance(body, dict) or set(body) != {"v", "covers", "ops"}:
        raise _fail("malformed body")
    if body["v"] != FORMAT_VERSION:
        raise _fail(f"unknown format version {body['v']!r}")
    raw_covers, raw_ops = body["covers"], body["ops"]
    if not isinstance(raw_covers, dict) or len(raw_covers) > MAX_COVERS_NODES:
        raise _fail("malformed covers")
    covers: dict[bytes, int] = {}
    for n, s in raw_covers.items():
        if not isinstance(n, bytes) or len(n) != NODE_ID_BYTES:
            raise _fail("malformed covers")
        if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= MAX_SEQ:
            raise _fail("malformed covers")
        covers[n] = s
    if not isinstance(raw_ops, list) or not all(isinstance(item, bytes) for item in raw_ops):
        raise _fail("malformed ops")
    return covers, raw_ops


def _decode_ops(raw_ops: list[bytes], covers: dict[bytes, int], stored_here: bool) -> Iterator[Op]:
    for item in raw_ops:
        try:
            op = decode_op(item, check_canonical=not stored_here)
        except MalformedOp as exc:
            raise _fail(str(exc)) from exc
        if op.hlc.node not in covers:
            raise _fail("an op of a node it does not cover")
        yield op


def _cbor(data: bytes) -> Any:
    try:
        return cbor2.loads(data)
    except CBOR_ERRORS as exc:
        raise _fail(f"not CBOR: {exc}") from None
