"""Operations of the volume log and their canonical CBOR encoding.

Invariant: `decode_op(encode_op(op)) == op` for every valid op, and `decode_op`
accepts nothing else: any byte string that is not a well-formed operation of a
known format version raises `MalformedOp`, never another exception. (With
`check_canonical=False`, for bytes already checked once, a non-canonical
encoding of a valid operation would pass; nothing else would.) Each
operation carries its own `Hlc`, which is also its identity (a content version's
id is the stamp of the `Write` or deleting `Move` that made it).

Two formats: 1 (`FORMAT_VERSION`) names every stamp's node in full; 2
(`COMPACT_VERSION`, what nodes write into their logs) leaves out the op's own
node, which is its log entry's (the entry's seal and signature bind it), and
writes a stamp of that same node inside the op (a `Write`'s bases, a `Move`'s
seen versions) as `[wall, counter]`: 68 of a small write's ~190 bytes. Its
bytes decode only given that node (`decode_op(data, node=...)`), and the
canonical check refuses a stamp of the op's node written in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import cbor2

from crdt.clock import Hlc

FORMAT_VERSION = 1
COMPACT_VERSION = 2

ENTRY_ID_BYTES = 16
NODE_ID_BYTES = 32
BLOCK_ID_BYTES = 32
NAME_MAX = 255
# A write op may describe at most this many blocks; larger flushes are split.
MAX_BLOCKS_PER_WRITE = 4096
MAX_FILE_SIZE = 1 << 50
# Files are split at fixed offsets into blocks of this size (a protocol constant).
BLOCK_SIZE = 128 * 1024

ROOT = b"\x00" * ENTRY_ID_BYTES
TRASH = b"\xff" * ENTRY_ID_BYTES

Kind = Literal["file", "dir", "symlink", "fifo", "socket", "chardev", "blockdev"]
KINDS: tuple[Kind, ...] = ("file", "dir", "symlink", "fifo", "socket", "chardev", "blockdev")
# Kinds whose Create carries `rdev` in the encoding (added after the first
# three, so a Create of those keeps the eight fields it always had).
SPECIAL_KINDS: frozenset[Kind] = frozenset({"fifo", "socket", "chardev", "blockdev"})
RDEV_MAX = 0xFFFF_FFFF  # FUSE carries a 32-bit device number

# Attribute keys; "xattr:<name>" carries extended attributes. "atime_ns" is
# set only on purpose (utimensat): reads never change it, as with noatime.
ATTR_KEYS = ("mode", "uid", "gid", "mtime_ns", "atime_ns")
XATTR_PREFIX = "xattr:"


class MalformedOp(ValueError):
    """Bytes that do not encode a valid operation."""


@dataclass(frozen=True, slots=True)
class Member:
    """A node announces itself (its display name) as a member of the volume."""

    hlc: Hlc
    name: str


@dataclass(frozen=True, slots=True)
class Forget:
    """A vote that node `node` is gone for good: once it counts, `node` no
    longer holds back causal stability. It counts when `node` itself cast it,
    or when more than half of the other members did (`Replica.forgotten`).

    `upto` is the highest seq of `node`'s log the voting node knew of (its
    own and every version vector it had heard of). Entries of `node` beyond
    the greatest `upto` of the votes that count are refused by every node: a
    forgotten node that comes back must join again under a new id (a fresh
    data dir), because what it writes may build on history the others have
    already collected. See `peer.storage.gc`.
    """

    hlc: Hlc
    node: bytes
    upto: int


@dataclass(frozen=True, slots=True)
class Create:
    """A new entry `entry` of `kind` named `name` in directory `parent`.

    `rdev` is the device number of a character or block device node (0 for
    every other kind). Only special kinds (or a non-zero `rdev`) encode it, as
    a ninth field, so Creates stored before it existed decode unchanged.
    """

    hlc: Hlc
    entry: bytes
    parent: bytes
    name: bytes
    kind: Kind
    mode: int
    uid: int
    gid: int
    target: bytes = b""  # symlink target; empty for other kinds
    rdev: int = 0


@dataclass(frozen=True, slots=True)
class Move:
    """Rename/move `entry` to (`parent`, `name`).

    A delete is a move into TRASH; `seen` then lists the content versions of the
    file the deleting node had (empty for directories and symlinks).
    """

    hlc: Hlc
    entry: bytes
    parent: bytes
    name: bytes
    seen: tuple[Hlc, ...] = ()


@dataclass(frozen=True, slots=True)
class SetAttr:
    """Set attribute `key` of `entry`; `value` None removes it (xattrs only)."""

    hlc: Hlc
    entry: bytes
    key: str
    value: int | bytes | None


@dataclass(frozen=True, slots=True)
class Write:
    """A new content version of file `entry`.

    Its block map is the map of `bases[0]` (empty when there is no base) with
    `blocks` applied (index -> block id, or None for a hole), cut to `size`.
    Further bases are versions this one supersedes without taking content from
    them: that is how a conflict is resolved.
    """

    hlc: Hlc
    entry: bytes
    bases: tuple[Hlc, ...]
    size: int
    blocks: tuple[tuple[int, bytes | None], ...]


Op = Member | Create | Move | SetAttr | Write | Forget

_TAGS: dict[type[Any], int] = {Member: 0, Create: 1, Move: 2, SetAttr: 3, Write: 4, Forget: 5}


def _hlc_out(h: Hlc, own: bytes | None = None) -> list[Any]:
    if h.node == own:
        return [h.wall_ms, h.counter]
    return [h.wall_ms, h.counter, h.node]


def encode_op(op: Op, *, compact: bool = False) -> bytes:
    """Canonical CBOR for `op` (the bytes that are sealed and signed): format
    1, or with `compact` format 2 (the op's node left to its log entry)."""
    own = op.hlc.node if compact else None
    body: list[Any]
    if isinstance(op, Member):
        body = [op.name]
    elif isinstance(op, Create):
        body = [op.entry, op.parent, op.name, op.kind, op.mode, op.uid, op.gid, op.target]
        if op.kind in SPECIAL_KINDS or op.rdev:
            body.append(op.rdev)
    elif isinstance(op, Move):
        body = [op.entry, op.parent, op.name, [_hlc_out(h, own) for h in op.seen]]
    elif isinstance(op, SetAttr):
        body = [op.entry, op.key, op.value]
    elif isinstance(op, Forget):
        body = [op.node, op.upto]
    else:
        body = [
            op.entry,
            [_hlc_out(h, own) for h in op.bases],
            op.size,
            [[i, b] for i, b in op.blocks],
        ]
    if compact:
        head = [COMPACT_VERSION, _TAGS[type(op)], [op.hlc.wall_ms, op.hlc.counter]]
    else:
        head = [FORMAT_VERSION, _TAGS[type(op)], _hlc_out(op.hlc)]
    return cbor2.dumps([*head, *body], canonical=True)


def _int(v: Any, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise MalformedOp(f"integer out of range: {v!r}")
    return v


def _bytes(v: Any, n: int | None = None, max_len: int = 4096) -> bytes:
    if type(v) is not bytes or (n is not None and len(v) != n) or len(v) > max_len:
        raise MalformedOp("bad byte string")
    return v


# Ids, names and numbers seen lately while decoding, so the many operations
# that name one node, directory or file (a log holds a file's Create and
# Write side by side), or one name, mode or millisecond, share one object
# rather than each holding its own copy: 0.4 KB per file of a replica of
# 100,000 files. Bounded and emptied when full: a cache, never state.
_SHARED: dict[Any, Any] = {}
_SHARED_MAX = 4096

_Shareable = TypeVar("_Shareable", bytes, int)


def _share(v: _Shareable) -> _Shareable:
    shared = _SHARED.get(v)
    if shared is None:
        if len(_SHARED) >= _SHARED_MAX:
            _SHARED.clear()
        _SHARED[v] = shared = v
    return cast("_Shareable", shared)


def _hlc_in(v: Any, own: bytes | None = None) -> Hlc:
    """A stamp; `[wall, counter]` (format 2 only: `own` given) is one of `own`."""
    if type(v) is not list or len(v) != 3:
        if own is None or type(v) is not list or len(v) != 2:
            raise MalformedOp("bad clock")
        v = [*v, own]
    wall, counter, node = v
    if type(wall) is not int or not 0 <= wall <= (1 << 63) - 1:
        raise MalformedOp(f"integer out of range: {wall!r}")
    if type(counter) is not int or not 0 <= counter <= 0xFFFF_FFFF:
        raise MalformedOp(f"integer out of range: {counter!r}")
    if type(node) is not bytes or len(node) != NODE_ID_BYTES:
        raise MalformedOp("bad byte string")
    return Hlc(_share(wall), counter, _share(node))


def _name(v: Any) -> bytes:
    name = _bytes(v, max_len=NAME_MAX)
    if not name or b"/" in name or b"\x00" in name or name in (b".", b".."):
        raise MalformedOp("bad name")
    return _share(name)


def _hlcs(v: Any, own: bytes | None) -> tuple[Hlc, ...]:
    if type(v) is not list or len(v) > 1024:
        raise MalformedOp("bad version list")
    return tuple(_hlc_in(x, own) for x in v)


def decode_op(data: bytes, *, node: bytes | None = None, check_canonical: bool = True) -> Op:
    """Parse and validate canonical CBOR; raise MalformedOp on anything else.

    `node` is the node whose log entry held `data`: format 2 leaves it out,
    so without it only format 1 decodes. `check_canonical=False` skips only
    the final check that `data` is the canonical encoding (a re-encode: a
    third of the cost), for bytes that passed it when they entered this
    node's store and are authenticated since.
    """
    try:
        v = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types on garbage
        raise MalformedOp(f"not CBOR: {exc}") from None
    if type(v) is not list or len(v) < 3:
        raise MalformedOp("not an operation")
    compact = v[0] == COMPACT_VERSION and type(v[0]) is int
    if compact and node is None:
        raise MalformedOp("an operation of format 2 decodes only with its entry's node")
    if v[0] != FORMAT_VERSION and not compact:
        raise MalformedOp(f"unknown operation format {v[0]!r}")
    if compact:
        if type(v[2]) is not list or len(v[2]) != 2:
            raise MalformedOp("bad clock")
        own = _bytes(node, NODE_ID_BYTES)
        hlc = _hlc_in(v[2], own)
    else:
        own = None
        hlc = _hlc_in(v[2])
    tag, body = v[1], v[3:]
    op: Op
    try:
        if tag == 0 and len(body) == 1:
            if type(body[0]) is not str or len(body[0]) > 64:
                raise MalformedOp("bad member name")
            op = Member(hlc, body[0])
        elif tag == 1 and len(body) in (8, 9):
            entry, parent, name, kind, mode, uid, gid, target = body[:8]
            rdev = _int(body[8], hi=RDEV_MAX) if len(body) == 9 else 0
            if kind not in KINDS:
                raise MalformedOp("bad kind")
            op = Create(
                hlc,
                _share(_bytes(entry, ENTRY_ID_BYTES)),
                _share(_bytes(parent, ENTRY_ID_BYTES)),
                _name(name),
                kind,
                _share(_int(mode, hi=0o7777)),
                _share(_int(uid, hi=0xFFFF_FFFF)),
                _share(_int(gid, hi=0xFFFF_FFFF)),
                _bytes(target),
                _share(rdev),
            )
        elif tag == 2 and len(body) == 4:
            entry, parent, name, seen = body
            op = Move(
                hlc,
                _share(_bytes(entry, ENTRY_ID_BYTES)),
                _share(_bytes(parent, ENTRY_ID_BYTES)),
                _name(name),
                _hlcs(seen, own),
            )
        elif tag == 3 and len(body) == 3:
            entry, key, value = body
            if type(key) is not str or not (key in ATTR_KEYS or key.startswith(XATTR_PREFIX)):
                raise MalformedOp("bad attribute key")
            if key.startswith(XATTR_PREFIX):
                if len(key) > len(XATTR_PREFIX) + NAME_MAX:
                    raise MalformedOp("bad xattr name")
                if value is not None:
                    value = _bytes(value, max_len=65536)
            else:
                value = _int(value, lo=-(1 << 63))
            op = SetAttr(hlc, _share(_bytes(entry, ENTRY_ID_BYTES)), key, value)
        elif tag == 4 and len(body) == 4:
            entry, bases, size, blocks = body
            if type(blocks) is not list or len(blocks) > MAX_BLOCKS_PER_WRITE:
                raise MalformedOp("bad block list")
            parsed: list[tuple[int, bytes | None]] = []
            for item in blocks:
                if type(item) is not list or len(item) != 2:
                    raise MalformedOp("bad block entry")
                bid = None if item[1] is None else _bytes(item[1], BLOCK_ID_BYTES)
                parsed.append((_int(item[0], hi=1 << 40), bid))
            op = Write(
                hlc,
                _share(_bytes(entry, ENTRY_ID_BYTES)),
                _hlcs(bases, own),
                _int(size, hi=MAX_FILE_SIZE),
                tuple(parsed),
            )
        elif tag == 5 and len(body) == 2:
            op = Forget(hlc, _bytes(body[0], NODE_ID_BYTES), _int(body[1]))
        else:
            raise MalformedOp(f"unknown operation {tag!r}")
    except (TypeError, ValueError) as exc:
        if isinstance(exc, MalformedOp):
            raise
        raise MalformedOp(str(exc)) from None
    if check_canonical and encode_op(op, compact=compact) != data:
        raise MalformedOp("not canonical")
    return op
