"""The peer protocol's messages: CBOR bodies, checked field by field.

Invariant: `decode_*` either returns a well-typed message whose sizes are within
the protocol's limits or raises `BadMessage`; nothing a peer sends can reach the
store or the merge as anything but these dataclasses. Sealed log entries and
blocks travel exactly as stored (nothing is re-encrypted on the way); their
authenticity is checked by the receiver (signature, MAC, block id), not here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import cbor2

from peer.sealing import (
    BLOCK_ID_BYTES,
    HASH_BYTES,
    MAX_SEQ,
    NODE_ID_BYTES,
    SIGNATURE_BYTES,
    Head,
    LogEntry,
    entry_hash,
)

# A request body is small (a version vector or a list of block ids).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
# A response is bounded by what the server packs into it (`LOG_BATCH_BYTES`,
# `BLOCKS_PER_REQUEST` blocks) plus framing.
MAX_RESPONSE_BYTES = 48 * 1024 * 1024
LOG_BATCH_BYTES = 4 * 1024 * 1024
BLOCKS_PER_REQUEST = 64
MAX_SEALED_BYTES = 1024 * 1024
MAX_CHECKPOINT_BYTES = 32 * 1024 * 1024  # a sealed checkpoint (`peer.storage.checkpoint`)
MAX_NAME = 256
MAX_VV_NODES = 100_000
# Signed heads a hello or watch answer carries (one per node), and fork proofs.
MAX_HEADS = MAX_VV_NODES
MAX_PROOFS = 1024
# Gossip: the vectors a node passes on of other members, and how many
# (node, seq) pairs all of them may hold together.
MAX_KNOWN_NODES = 1024
MAX_KNOWN_PAIRS = 200_000
MAX_TIME_MS = 2**53

VersionVector = dict[bytes, int]
# node -> (its version vector, when that was learnt from the node itself, unix ms)
Gossip = dict[bytes, tuple[VersionVector, int]]


class BadMessage(Exception):
    """A body that is not a well-formed message of the protocol."""


Proof = tuple[Head, Head]


@dataclass(frozen=True, slots=True)
class Hello:
    protocol: int
    node: bytes
    name: str
    vv: VersionVector
    known: Gossip = field(default_factory=dict)
    # The sender's newest signed head of each node it holds (`peer.storage.chain`),
    # and the fork proofs it keeps.
    heads: list[Head] = field(default_factory=list)
    forks: list[Proof] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Watch:
    """A long poll's answer: the peer's vector, the vectors it knows of, its
    heads and fork proofs (as in `Hello`)."""

    vv: VersionVector
    known: Gossip = field(default_factory=dict)
    heads: list[Head] = field(default_factory=list)
    forks: list[Proof] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LogRequest:
    vv: VersionVector
    max_bytes: int


@dataclass(frozen=True, slots=True)
class LogResponse:
    entries: list[LogEntry]
    more: bool
    # The sender's sealed checkpoint (`peer.storage.checkpoint`), sent first when the
    # caller's vector does not cover it; `entries` then follow its `covers`.
    checkpoint: bytes | None = None


@dataclass(frozen=True, slots=True)
class BlocksRequest:
    ids: list[bytes]


@dataclass(frozen=True, slots=True)
class BlocksResponse:
    blocks: list[tuple[bytes, bytes]]


def encode(obj: object) -> bytes:
    return cbor2.dumps(obj, canonical=True)


# What `cbor2.loads` raises on hostile bytes (deep nesting, huge lengths included).
CBOR_ERRORS = (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError, MemoryError)


def _load(body: bytes) -> Any:
    try:
        return cbor2.loads(body)
    except CBOR_ERRORS as exc:
        raise BadMessage(f"not CBOR: {exc}") from None


def _map(obj: Any, keys: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict) or not keys <= set(obj):
        raise BadMessage(f"expected a map with {sorted(keys)}")
    return obj


def _bytes(obj: Any, size: int | None = None, limit: int = MAX_SEALED_BYTES) -> bytes:
    if not isinstance(obj, bytes) or (size is not None and len(obj) != size) or len(obj) > limit:
        raise BadMessage("malformed byte string")
    return obj


def _int(obj: Any, low: int = 0, high: int = MAX_SEQ) -> int:
    if not isinstance(obj, int) or isinstance(obj, bool) or not low <= obj <= high:
        raise BadMessage("integer out of range")
    return obj


def _vv(obj: Any) -> VersionVector:
    if not isinstance(obj, dict) or len(obj) > MAX_VV_NODES:
        raise BadMessage("malformed version vector")
    return {_bytes(k, NODE_ID_BYTES): _int(v) for k, v in obj.items()}


def _known(obj: Any) -> Gossip:
    """Optional gossip (older peers send none): bounded in nodes and pairs."""
    if obj is None:
        return {}
    if not isinstance(obj, dict) or len(obj) > MAX_KNOWN_NODES:
        raise BadMessage("malformed gossip")
    out: Gossip = {}
    pairs = 0
    for node, item in obj.items():
        if not isinstance(item, list) or len(item) != 2:
            raise BadMessage("malformed gossip entry")
        if isinstance(item[0], dict):
            pairs += len(item[0])
        if pairs > MAX_KNOWN_PAIRS:
            raise BadMessage("gossip too large")
        out[_bytes(node, NODE_ID_BYTES)] = (_vv(item[0]), _int(item[1], 0, MAX_TIME_MS))
    return out


def _known_out(known: Gossip) -> dict[bytes, list[Any]]:
    return {node: [vv, seen] for node, (vv, seen) in known.items()}


def _head_out(h: Head) -> list[Any]:
    return [h.node, h.seq, h.prev, h.body, h.sig]


def _head(obj: Any) -> Head:
    if not isinstance(obj, list) or len(obj) != 5:
        raise BadMessage("malformed head")
    node, seq, prev, body, sig = obj
    prev = _bytes(prev)
    if len(prev) not in (0, HASH_BYTES):
        raise BadMessage("malformed head")
    return Head(
        _bytes(node, NODE_ID_BYTES),
        _int(seq, 1),
        prev,
        _bytes(body, HASH_BYTES) if prev else _bytes(body),
        _bytes(sig, SIGNATURE_BYTES),
    )


def _heads(obj: Any) -> list[Head]:
    if obj is None:
        return []
    if not isinstance(obj, list) or len(obj) > MAX_HEADS:
        raise BadMessage("malformed heads")
    return [_head(item) for item in obj]


def _forks(obj: Any) -> list[Proof]:
    if obj is None:
        return []
    if not isinstance(obj, list) or len(obj) > MAX_PROOFS:
        raise BadMessage("malformed fork proofs")
    out = []
    for item in obj:
        if not isinstance(item, list) or len(item) != 2:
            raise BadMessage("malformed fork proof")
        out.append((_head(item[0]), _head(item[1])))
    return out


def _chain_out(heads: list[Head], forks: list[Proof]) -> dict[str, Any]:
    return {
        "heads": [_head_out(h) for h in heads],
        "forks": [[_head_out(a), _head_out(b)] for a, b in forks],
    }


# -- hello -------------------------------------------------------------------------


def encode_hello(hello: Hello) -> bytes:
    return encode(
        {
            "v": hello.protocol,
            "node": hello.node,
            "name": hello.name,
            "vv": hello.vv,
            "known": _known_out(hello.known),
            **_chain_out(hello.heads, hello.forks),
        }
    )


def decode_hello(body: bytes) -> Hello:
    m = _map(_load(body), {"v", "node", "name", "vv"})
    name = m["name"]
    if not isinstance(name, str) or len(name) > MAX_NAME:
        raise BadMessage("malformed name")
    return Hello(
        _int(m["v"]),
        _bytes(m["node"], NODE_ID_BYTES),
        name,
        _vv(m["vv"]),
        _known(m.get("known")),
        _heads(m.get("heads")),
        _forks(m.get("forks")),
    )


# -- log ---------------------------------------------------------------------------


def encode_log_request(req: LogRequest) -> bytes:
    return encode({"vv": req.vv, "max_bytes": req.max_bytes})


def decode_log_request(body: bytes) -> LogRequest:
    m = _map(_load(body), {"vv", "max_bytes"})
    return LogRequest(_vv(m["vv"]), _int(m["max_bytes"], 1, MAX_RESPONSE_BYTES))


def _entries_out(entries: list[LogEntry]) -> list[list[Any]]:
    """Entries as `[node, seq, sealed, sig, prev]`, or `[sealed, sig]` for a
    chained entry that follows its node's previous one in the list: its node,
    seq and `prev` are then the receiver's to fill in (68 bytes an entry)."""
    out: list[list[Any]] = []
    before: LogEntry | None = None
    for e in entries:
        if (
            before is not None
            and e.chained
            and e.node == before.node
            and e.seq == before.seq + 1
            and e.prev == entry_hash(before)
        ):
            out.append([e.sealed, e.sig])
        else:
            out.append([e.node, e.seq, e.sealed, e.sig, e.prev])
        before = e
    return out


def encode_log_response(resp: LogResponse) -> bytes:
    body: dict[str, Any] = {"entries": _entries_out(resp.entries), "more": resp.more}
    if resp.checkpoint is not None:
        body["checkpoint"] = resp.checkpoint
    return encode(body)


def decode_log_response(body: bytes) -> LogResponse:
    m = _map(_load(body), {"entries", "more"})
    raw = m["entries"]
    if not isinstance(raw, list) or not isinstance(m["more"], bool):
        raise BadMessage("malformed log response")
    entries: list[LogEntry] = []
    for item in raw:
        if isinstance(item, list) and len(item) == 2 and entries:
            # The next entry of the previous one's node, chained onto it: the
            # signature (over the hash, which covers node, seq and prev) checks
            # what is filled in here.
            before = entries[-1]
            if before.seq >= MAX_SEQ:
                raise BadMessage("malformed log entry")
            sealed, sig = item
            entries.append(
                LogEntry(
                    before.node,
                    before.seq + 1,
                    _bytes(sealed),
                    _bytes(sig, SIGNATURE_BYTES),
                    entry_hash(before),
                )
            )
            continue
        if not isinstance(item, list) or len(item) != 5:
            raise BadMessage("malformed log entry")
        node, seq, sealed, sig, prev = item
        prev = _bytes(prev)
        if len(prev) not in (0, HASH_BYTES):
            raise BadMessage("malformed log entry")
        entries.append(
            LogEntry(
                _bytes(node, NODE_ID_BYTES),
                _int(seq, 1),
                _bytes(sealed),
                _bytes(sig, SIGNATURE_BYTES),
                prev,
            )
        )
    checkpoint = m.get("checkpoint")
    if checkpoint is not None:
        checkpoint = _bytes(checkpoint, limit=MAX_CHECKPOINT_BYTES)
    return LogResponse(entries, m["more"], checkpoint)


# -- blocks ------------------------------------------------------------------------


def encode_blocks_request(req: BlocksRequest) -> bytes:
    return encode({"ids": req.ids})


def decode_blocks_request(body: bytes) -> BlocksRequest:
    m = _map(_load(body), {"ids"})
    ids = m["ids"]
    if not isinstance(ids, list) or len(ids) > BLOCKS_PER_REQUEST:
        raise BadMessage("malformed block id list")
    return BlocksRequest([_bytes(i, BLOCK_ID_BYTES) for i in ids])


def encode_blocks_response(resp: BlocksResponse) -> bytes:
    return encode({"blocks": [[bid, sealed] for bid, sealed in resp.blocks]})


def decode_blocks_response(body: bytes) -> BlocksResponse:
    m = _map(_load(body), {"blocks"})
    raw = m["blocks"]
    if not isinstance(raw, list) or len(raw) > BLOCKS_PER_REQUEST:
        raise BadMessage("malformed block list")
    out = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 2:
            raise BadMessage("malformed block")
        out.append((_bytes(item[0], BLOCK_ID_BYTES), _bytes(item[1])))
    return BlocksResponse(out)


# -- watch -------------------------------------------------------------------------


def encode_vv(
    vv: VersionVector,
    known: Gossip | None = None,
    heads: list[Head] | None = None,
    forks: list[Proof] | None = None,
) -> bytes:
    return encode(
        {"vv": vv, "known": _known_out(known or {}), **_chain_out(heads or [], forks or [])}
    )


def decode_vv(body: bytes) -> VersionVector:
    return decode_watch(body).vv


def decode_watch(body: bytes) -> Watch:
    m = _map(_load(body), {"vv"})
    return Watch(
        _vv(m["vv"]), _known(m.get("known")), _heads(m.get("heads")), _forks(m.get("forks"))
    )


def vv_digest(vv: VersionVector) -> str:
    """A short stable name of a version vector (the long poll's `since`)."""
    return hashlib.blake2b(encode(vv), digest_size=16).hexdigest()


def encode_error(message: str) -> bytes:
    return encode({"error": message})


def decode_error(body: bytes) -> str:
    try:
        m = _map(_load(body), {"error"})
    except BadMessage:
        return "(no message)"
    return str(m["error"])[:500]
