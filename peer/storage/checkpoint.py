"""Checkpoints: the stable prefix of the log folded into one blob.

Invariant: every operation a checkpoint holds is verifiable against its origin
node's signature, as a log entry is. Format 2 (`FORMAT_VERSION`) holds, for
each covered node, its log entries 1..covers[node] exactly as they were
sealed; the last of them (the node's signed head at the covered seq) keeps its
signature, and the others are bound to it by the hash chain (each entry's hash
is named by the next one, see `peer.sealing`), so a node's whole folded log
costs one signature check and a hash per entry. Entries written before logs
were chained (format 1) keep their own signatures. `verify_logs` is that
check, apart from the folding (`Journal.fold`) on purpose: whoever changes how
folds are made must not weaken it.

So a checkpoint cannot claim a node's entries it does not hold (it would need
the node's signature at the covered seq), nor leave any of them out, nor put
anything else in. Nothing is compacted away: which ops a later one overrides
cannot be checked without the ops, so a receiver could not tell a legitimate
drop from a hidden one.

Envelope: canonical CBOR `[folder, body, sig]`, `sig` the folder's Ed25519
signature over `body` (so a forged checkpoint names who made it); `body` is
canonical CBOR `{"v": 2, "logs": {node: [[sealed, sig], ...]}}`, with `sig`
empty for a chained entry that is not its node's last, and for a format-1
entry a three-item `[sealed, sig, 1]`. Entries are sealed as in the log (the
op under the log key, bound to its (node, seq)), so the body needs no seal of
its own.

Format 1 (`{"v": 1, "covers", "ops"}` sealed and signed by the folder, ops
compacted) is what nodes folded before: still replayed from this node's own
store, never accepted from a peer (nothing in it proves the ops' origins).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
import nacl.exceptions
import nacl.signing

from crdt.ops import MalformedOp, Op, Rotate, decode_op
from peer import epochs
from peer.errors import CorruptEntry
from peer.identity import NodeIdentity
from peer.keys import VolumeKeys

# Bounded so a checkpoint fits one log response beside a batch of entries
# (`wire.MAX_CHECKPOINT_BYTES`); a node whose checkpoint would grow past it
# stops folding (its log keeps the rest).
from peer.net.wire import CBOR_ERRORS, MAX_CHECKPOINT_BYTES, MAX_SEALED_BYTES
from peer.pacing import pace
from peer.sealing import (
    GENESIS,
    MAX_SEQ,
    NODE_ID_BYTES,
    SIGNATURE_BYTES,
    Head,
    LogEntry,
    SealError,
    entry_hash,
    head_of,
    open_entry,
    sealed_epoch,
    unseal,
    verify_entry,
)

FORMAT_VERSION = 2
MAX_COVERS_NODES = 100_000

_AAD = b"dfs-peer:v1:checkpoint"
_SIG_CONTEXT = b"dfs-peer:v1:checkpoint-sig"
_SIG_CONTEXT_V2 = b"dfs-peer:v2:checkpoint"


class CheckpointTooLarge(Exception):
    """A checkpoint that would not fit `MAX_CHECKPOINT_BYTES`."""


class ForgedCheckpoint(CorruptEntry):
    """A checkpoint its folder signed whose logs do not check: the folder lied."""

    def __init__(self, folder: bytes, detail: str) -> None:
        super().__init__(f"checkpoint of {folder.hex()[:8]}: {detail}")
        self.folder = folder
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The folded prefix: `covers` {node: last seq folded}, its ops, and (format
    2) the entries they came from, node by node, seq 1 first."""

    covers: dict[bytes, int]
    ops: tuple[Op, ...]
    logs: dict[bytes, tuple[LogEntry, ...]] = field(default_factory=dict)
    folder: bytes = b""
    version: int = FORMAT_VERSION
    # The bytes it was opened from, verified (a peer's, format 2): a node
    # that adopts exactly these logs stores them as they came.
    blob: bytes = field(default=b"", repr=False)

    def heads(self) -> dict[bytes, Head]:
        """Each covered node's signed head at the covered seq (format 2)."""
        return {n: head_of(entries[-1]) for n, entries in self.logs.items() if entries}


def covered(theirs: dict[bytes, int], covers: dict[bytes, int]) -> bool:
    """Whether a vector holds everything a checkpoint covers."""
    return all(theirs.get(n, 0) >= s for n, s in covers.items())


def seal_checkpoint(identity: NodeIdentity, logs: Mapping[bytes, Sequence[LogEntry]]) -> bytes:
    """The stored and sent form of the logs `logs` (each node's entries from
    seq 1 on, as held: signed), made and signed by `identity`."""
    body_logs: dict[bytes, list[list[Any]]] = {}
    for node, entries in logs.items():
        items: list[list[Any]] = []
        for i, e in enumerate(entries):
            pace()
            if e.node != node or e.seq != i + 1:
                raise ValueError(f"checkpoint log of {node.hex()[:8]} is not 1, 2, 3...")
            if not e.chained:
                items.append([e.sealed, e.sig, 1])
            elif i == len(entries) - 1:
                items.append([e.sealed, e.sig])
            else:
                items.append([e.sealed, b""])
        if items:
            body_logs[node] = items
    body = _encode_body({"v": FORMAT_VERSION, "logs": body_logs})
    folder = identity.node_id
    sig = identity.sign(_SIG_CONTEXT_V2 + folder + body)
    blob = cbor2.dumps([folder, body, sig], canonical=True)
    if len(blob) > MAX_CHECKPOINT_BYTES:
        raise CheckpointTooLarge(f"{len(blob)} bytes")
    return blob


def _fail(detail: str) -> CorruptEntry:
    return CorruptEntry(f"checkpoint: {detail}")


def open_checkpoint(keys: VolumeKeys, blob: bytes, *, stored_here: bool = False) -> Checkpoint:
    """Verify and decode a checkpoint; `CorruptEntry` on any failure
    (`ForgedCheckpoint` if its folder signed logs that do not check).

    `stored_here`: the blob comes from this node's store, where it was checked
    when it entered: signatures are not checked again and ops are decoded
    without re-encoding each one to check canonical form (as replay does for
    log entries); every entry's MAC still is. Only a stored checkpoint may be
    of format 1."""
    folder, version, body = _open_envelope(keys, blob, stored_here)
    if version == 1:
        covers, raw_ops = body
        ops = tuple(_decode_v1_ops(raw_ops, covers))
        return Checkpoint(covers, ops, {}, folder, 1)
    logs = body if stored_here else verify_logs(folder, body)
    ops = tuple(_open_ops(keys, logs, stored_here))
    covers = {n: len(entries) for n, entries in logs.items()}
    return Checkpoint(covers, ops, {n: tuple(e) for n, e in logs.items()}, folder, blob=blob)


def iter_checkpoint_ops(keys: VolumeKeys, blob: bytes) -> Iterator[Op]:
    """The ops of a checkpoint from this node's store, decoded one at a time
    (replay applies them in chunks: all 200,000 of a large volume decoded at
    once would raise the node's resident memory for good)."""
    _folder, version, body = _open_envelope(keys, blob, True)
    if version == 1:
        covers, raw_ops = body
        return _decode_v1_ops(raw_ops, covers)
    return _open_ops(keys, body, True)


def stored_logs(keys: VolumeKeys, blob: bytes) -> tuple[int, dict[bytes, list[LogEntry]]]:
    """(format, logs) of a checkpoint from this node's store, without opening
    any entry (what a new fold or a merge of checkpoints needs); format 1 has
    no logs."""
    _folder, version, body = _open_envelope(keys, blob, True)
    return version, ({} if version == 1 else body)


def verify_logs(folder: bytes, logs: dict[bytes, list[LogEntry]]) -> dict[bytes, list[LogEntry]]:
    """Check that every entry of `logs` is its node's: each chain of entries
    links up (`prev` is the previous entry's hash) to an entry its node signed,
    and every format-1 entry carries its own good signature. `ForgedCheckpoint`
    (naming `folder`) if not. Returns `logs`."""
    for node, entries in logs.items():
        where = node.hex()[:8]
        for i, e in enumerate(entries):
            pace()
            if not e.chained or e.sig:
                try:
                    verify_entry(e)
                except CorruptEntry as exc:
                    raise ForgedCheckpoint(folder, f"entry {where}/{e.seq}: {exc}") from None
            elif i == len(entries) - 1:
                raise ForgedCheckpoint(folder, f"the log of {where} ends unsigned at {e.seq}")
        # Chained entries with no signature of their own are bound by the next
        # entry's `prev`, which `_parse_logs` filled in from their hashes: the
        # next signed entry signed them. A format-1 entry after a chained one
        # is no entry its node ever wrote.
        for before, after in itertools.pairwise(entries):
            if before.chained and not after.chained:
                raise ForgedCheckpoint(folder, f"{where}/{after.seq} unchains the log")
    return logs


def _open_envelope(keys: VolumeKeys, blob: bytes, stored_here: bool) -> tuple[bytes, int, Any]:
    """(folder, format, body): the body is (covers, raw ops) for format 1, the
    parsed logs for format 2."""
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
    if not stored_here or sealed[:1] != b"\x01":
        # Format 2's body is CBOR (a map: 0xa_), format 1's a sealed blob (0x01).
        try:
            nacl.signing.VerifyKey(node).verify(_SIG_CONTEXT_V2 + node + sealed, sig)
        except nacl.exceptions.CryptoError as exc:  # BadSignatureError is one
            if sealed[:1] == b"\x01":
                raise _fail(
                    "it was folded before checkpoints could be checked (format 1): "
                    "a node takes such a checkpoint only from its own store"
                ) from None
            raise _fail(f"bad signature ({exc})") from exc
        body = _decode_body(sealed)
        if not stored_here and _encode_body(body) != sealed:
            raise _fail("not canonical")
        if not isinstance(body, dict) or set(body) != {"v", "logs"} or body["v"] != FORMAT_VERSION:
            raise _fail(f"unknown format {body.get('v') if isinstance(body, dict) else None!r}")
        return node, FORMAT_VERSION, _parse_logs(body["logs"])
    return node, 1, _open_v1_body(keys, node, sealed, sig)


def _parse_logs(raw: Any) -> dict[bytes, list[LogEntry]]:
    """The entries of a format-2 body, each with its `prev` filled in from the
    hash of the one before (so the chain can be checked)."""
    if not isinstance(raw, dict) or len(raw) > MAX_COVERS_NODES:
        raise _fail("malformed logs")
    logs: dict[bytes, list[LogEntry]] = {}
    for node, items in raw.items():
        if not isinstance(node, bytes) or len(node) != NODE_ID_BYTES:
            raise _fail("malformed logs")
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_SEQ:
            raise _fail("malformed logs")
        entries: list[LogEntry] = []
        prev = GENESIS
        for seq, item in enumerate(items, start=1):
            pace()
            if not isinstance(item, list) or len(item) not in (2, 3):
                raise _fail("malformed log entry")
            sealed, sig = item[0], item[1]
            legacy = len(item) == 3
            if legacy and item[2] != 1:
                raise _fail("malformed log entry")
            if not (
                isinstance(sealed, bytes)
                and len(sealed) <= MAX_SEALED_BYTES
                and isinstance(sig, bytes)
                and len(sig) in ((SIGNATURE_BYTES,) if legacy else (0, SIGNATURE_BYTES))
            ):
                raise _fail("malformed log entry")
            e = LogEntry(node, seq, sealed, sig, b"" if legacy else prev)
            entries.append(e)
            prev = entry_hash(e)
        logs[node] = entries
    return logs


def _take_rotations(keys: VolumeKeys, logs: dict[bytes, list[LogEntry]]) -> None:
    """Take the key rotations among `logs` first if some entry names an
    epoch not held yet (each node's ops must come out in seq order)."""

    def unknown() -> int:
        count = 0
        for entries in logs.values():
            for e in entries:
                pace()
                count += keys.epoch(sealed_epoch(keys, e.sealed)) is None
        return count

    missing = unknown()
    while missing:
        for entries in logs.values():
            for e in entries:
                if keys.epoch(sealed_epoch(keys, e.sealed)) is None:
                    continue
                try:
                    op = decode_op(open_entry(keys, e, check_signature=False), node=e.node)
                except (MalformedOp, CorruptEntry):
                    continue  # refused below, with its reason
                if isinstance(op, Rotate) and op.hlc.node == e.node:
                    epochs.learn(keys, e, op)
        now = unknown()
        if now == missing:
            return
        missing = now


def _open_ops(
    keys: VolumeKeys, logs: dict[bytes, list[LogEntry]], stored_here: bool
) -> Iterator[Op]:
    _take_rotations(keys, logs)
    for entries in logs.values():
        for e in entries:
            pace()
            try:
                op = decode_op(
                    open_entry(keys, e, check_signature=False),
                    node=e.node,
                    check_canonical=not stored_here,
                )
            except (MalformedOp, CorruptEntry) as exc:
                raise _fail(f"entry {e.node.hex()[:8]}/{e.seq}: {exc}") from exc
            if op.hlc.node != e.node:
                raise _fail(f"entry {e.node.hex()[:8]}/{e.seq} claims another node")
            if isinstance(op, Rotate):
                epochs.learn(keys, e, op)
            yield op


def _open_v1_body(
    keys: VolumeKeys, node: bytes, sealed: bytes, sig: bytes
) -> tuple[dict[bytes, int], list[bytes]]:
    try:
        nacl.signing.VerifyKey(node).verify(_SIG_CONTEXT + node + sealed, sig)
    except nacl.exceptions.CryptoError as exc:  # BadSignatureError is one
        raise _fail(f"bad signature ({exc})") from exc
    try:
        plain = unseal(keys.base.log, sealed, _AAD + node)
    except SealError as exc:
        raise _fail(str(exc)) from exc
    body = _cbor(plain)
    if not isinstance(body, dict) or set(body) != {"v", "covers", "ops"} or body["v"] != 1:
        raise _fail("malformed body")
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


def _decode_v1_ops(raw_ops: list[bytes], covers: dict[bytes, int]) -> Iterator[Op]:
    for item in raw_ops:
        try:
            op = decode_op(item, check_canonical=False)
        except MalformedOp as exc:
            raise _fail(str(exc)) from exc
        if op.hlc.node not in covers:
            raise _fail("an op of a node it does not cover")
        yield op


# A checkpoint body holds ~150 bytes an entry: 15 MB for 100,000 files. One
# `cbor2` call over all of it holds the GIL throughout (0.17 s to decode, 0.09
# s to encode here), and the worker threads that fold and adopt checkpoints
# would stop the loop that answers FUSE as long. The body is therefore coded
# an entry at a time, the same bytes and values as `cbor2` (canonical form).


def _head(major: int, value: int) -> bytes:
    """The shortest CBOR head of `major` with `value` (canonical)."""
    if value < 24:
        return bytes([major << 5 | value])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * size):
            return bytes([major << 5 | info]) + value.to_bytes(size, "big")
    raise ValueError("too large for CBOR")


def _canonical_order(keys: Sequence[Any]) -> list[Any]:
    """`keys` in the order canonical `cbor2` writes a map's keys."""
    return list(_cbor(cbor2.dumps(dict.fromkeys(keys, 0), canonical=True)))


def _encode_body(body: Any) -> bytes:
    """`cbor2.dumps(body, canonical=True)`, a log entry at a time; `body` as
    `seal_checkpoint` makes it (anything else: `cbor2` in one call)."""
    logs = body.get("logs") if isinstance(body, dict) else None
    if not isinstance(logs, dict) or set(body) != {"v", "logs"}:
        return cbor2.dumps(body, canonical=True)
    parts = [_head(5, 2)]
    for key in _canonical_order(list(body)):
        parts.append(cbor2.dumps(key, canonical=True))
        if key != "logs":
            parts.append(cbor2.dumps(body[key], canonical=True))
            continue
        parts.append(_head(5, len(logs)))
        for node in _canonical_order(list(logs)):
            parts.append(cbor2.dumps(node, canonical=True))
            items = logs[node]
            if not isinstance(items, list):
                parts.append(cbor2.dumps(items, canonical=True))
                continue
            parts.append(_head(4, len(items)))
            for item in items:
                pace()
                parts.append(cbor2.dumps(item, canonical=True))
    return b"".join(parts)


class _NotPlain(Exception):
    """CBOR outside what `_decode_body` reads itself (`cbor2` then decodes it)."""


def _decode_body(data: bytes) -> Any:
    """`cbor2.loads(data)` for a checkpoint body, in steps that let other
    threads run: plain unsigned ints, byte and text strings, arrays and maps
    of definite length; anything else is left to `cbor2` in one call."""
    try:
        value, end = _item(data, 0)
    except (_NotPlain, IndexError, UnicodeDecodeError, RecursionError):
        return _cbor(data)
    if end != len(data):
        return _cbor(data)  # (trailing bytes: cbor2 says what is wrong)
    return value


def _item(data: bytes, pos: int) -> tuple[Any, int]:
    first = data[pos]
    major, info = first >> 5, first & 0x1F
    pos += 1
    if info < 24:
        value = info
    elif info <= 27:
        size = 1 << (info - 24)
        value = int.from_bytes(data[pos : pos + size], "big")
        if pos + size > len(data):
            raise _NotPlain()
        pos += size
    else:
        raise _NotPlain()  # indefinite lengths, reserved values
    if major == 0:
        return value, pos
    if major in (2, 3):
        end = pos + value
        if end > len(data):
            raise _NotPlain()
        raw = data[pos:end]
        return (raw if major == 2 else raw.decode("utf-8")), end
    if major == 4:
        items = []
        for _ in range(value):
            pace()
            item, pos = _item(data, pos)
            items.append(item)
        return items, pos
    if major == 5:
        out: dict[Any, Any] = {}
        for _ in range(value):
            key, pos = _item(data, pos)
            if isinstance(key, list | dict):
                raise _NotPlain()  # unhashable: cbor2 makes them immutable
            out[key], pos = _item(data, pos)
        return out, pos
    raise _NotPlain()  # negative ints, tags, floats, simple values


def _cbor(data: bytes) -> Any:
    try:
        return cbor2.loads(data)
    except CBOR_ERRORS as exc:
        raise _fail(f"not CBOR: {exc}") from None
