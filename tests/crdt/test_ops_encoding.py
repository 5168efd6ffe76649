"""Operation encoding (`crdt.ops`): every valid op survives a round trip as the
one canonical byte string, and `decode_op` accepts nothing else, failing only
with `MalformedOp` whatever bytes a peer sends."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from crdt.clock import Hlc
from crdt.ops import (
    ATTR_KEYS,
    BLOCK_ID_BYTES,
    COMPACT_VERSION,
    ENTRY_ID_BYTES,
    FORMAT_VERSION,
    KINDS,
    MAX_BLOCKS_PER_WRITE,
    MAX_FILE_SIZE,
    NAME_MAX,
    NODE_ID_BYTES,
    RDEV_MAX,
    ROOT,
    TRASH,
    XATTR_PREFIX,
    Create,
    Forget,
    MalformedOp,
    Member,
    Move,
    Op,
    SetAttr,
    Write,
    decode_op,
    encode_op,
)

I64 = (-(1 << 63), (1 << 63) - 1)

hlcs = st.builds(
    Hlc,
    st.integers(0, I64[1]),
    st.integers(0, 0xFFFF_FFFF),
    st.binary(min_size=NODE_ID_BYTES, max_size=NODE_ID_BYTES),
)
entry_ids = st.one_of(
    st.just(ROOT), st.just(TRASH), st.binary(min_size=ENTRY_ID_BYTES, max_size=ENTRY_ID_BYTES)
)
names = st.binary(min_size=1, max_size=NAME_MAX).filter(
    lambda n: b"/" not in n and b"\x00" not in n and n not in (b".", b"..")
)
block_ids = st.binary(min_size=BLOCK_ID_BYTES, max_size=BLOCK_ID_BYTES)

members = st.builds(Member, hlcs, st.text(max_size=64))
forgets = st.builds(
    Forget, hlcs, st.binary(min_size=NODE_ID_BYTES, max_size=NODE_ID_BYTES), st.integers(0, I64[1])
)
creates = st.builds(
    Create,
    hlcs,
    entry_ids,
    entry_ids,
    names,
    st.sampled_from(KINDS),
    st.integers(0, 0o7777),
    st.integers(0, 0xFFFF_FFFF),
    st.integers(0, 0xFFFF_FFFF),
    st.binary(max_size=4096),
    st.one_of(st.just(0), st.integers(0, RDEV_MAX)),
)
moves = st.builds(Move, hlcs, entry_ids, entry_ids, names, st.lists(hlcs, max_size=4).map(tuple))
set_attrs = st.one_of(
    st.builds(SetAttr, hlcs, entry_ids, st.sampled_from(ATTR_KEYS), st.integers(*I64)),
    st.builds(
        SetAttr,
        hlcs,
        entry_ids,
        st.text(max_size=NAME_MAX).map(lambda n: XATTR_PREFIX + n),
        st.none() | st.binary(max_size=300),
    ),
)
writes = st.builds(
    Write,
    hlcs,
    entry_ids,
    st.lists(hlcs, max_size=3).map(tuple),
    st.integers(0, MAX_FILE_SIZE),
    st.lists(st.tuples(st.integers(0, 1 << 40), st.none() | block_ids), max_size=6).map(tuple),
)
ops = st.one_of(members, creates, moves, set_attrs, writes, forgets)

H = Hlc(1_704_164_645_000, 3, b"\x07" * NODE_ID_BYTES)
E = b"\x01" * ENTRY_ID_BYTES
SAMPLES: list[Op] = [
    Member(H, "alice"),
    Create(H, E, ROOT, b"notes.txt", "file", 0o644, 1000, 1000),
    Create(H, E, ROOT, b"link", "symlink", 0o777, 0, 0, b"../target"),
    Create(H, E, ROOT, b"fifo", "fifo", 0o644, 0, 0),
    Create(H, E, ROOT, b"null", "chardev", 0o666, 0, 0, b"", (1 << 8) | 3),
    Move(H, E, TRASH, b"notes.txt", (H,)),
    SetAttr(H, E, "mode", 0o600),
    SetAttr(H, E, "xattr:user.tag", b"blue"),
    SetAttr(H, E, "xattr:user.tag", None),
    Write(H, E, (H,), 5, ((0, b"\x02" * BLOCK_ID_BYTES), (1, None))),
    Forget(H, b"\x09" * NODE_ID_BYTES, 42),
]


def fields(data: bytes) -> list[Any]:
    decoded = cbor2.loads(data)
    assert isinstance(decoded, list)
    return decoded


def reencoded(items: list[Any]) -> bytes:
    return cbor2.dumps(items, canonical=True)


# --- round trips -------------------------------------------------------------------------------


@given(ops)
def test_every_op_round_trips(op: Op) -> None:
    data = encode_op(op)
    assert decode_op(data) == op
    assert encode_op(decode_op(data)) == data


@given(ops)
def test_encoding_is_canonical_cbor(op: Op) -> None:
    data = encode_op(op)
    items = fields(data)
    assert reencoded(items) == data
    assert items[0] == FORMAT_VERSION


@pytest.mark.parametrize("op", SAMPLES, ids=lambda op: type(op).__name__)
def test_each_op_type_round_trips(op: Op) -> None:
    assert decode_op(encode_op(op)) == op


def test_equal_ops_have_equal_bytes_and_different_ops_do_not() -> None:
    encoded = [encode_op(op) for op in SAMPLES]
    assert len(set(encoded)) == len(SAMPLES)
    assert [encode_op(op) for op in SAMPLES] == encoded


# --- what decode_op refuses ---------------------------------------------------------------------


def assert_malformed(data: bytes) -> None:
    with pytest.raises(MalformedOp):
        decode_op(data)


@given(ops, st.data())
def test_truncated_bytes_are_malformed(op: Op, data: st.DataObject) -> None:
    encoded = encode_op(op)
    cut = data.draw(st.integers(0, len(encoded) - 1), label="cut")
    assert_malformed(encoded[:cut])


@given(ops, st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_malformed(op: Op, tail: bytes) -> None:
    assert_malformed(encode_op(op) + tail)


@pytest.mark.parametrize("op", SAMPLES, ids=lambda op: type(op).__name__)
def test_non_canonical_encodings_are_malformed(op: Op) -> None:
    data = encode_op(op)
    items = fields(data)
    header, rest = data[0], data[1:]
    assert 0x80 <= header < 0x98, "a short array header, as canonical CBOR writes it"
    assert_malformed(bytes([0x98, header - 0x80]) + rest)  # the same length, longer header
    assert_malformed(b"\x9f" + rest + b"\xff")  # indefinite length
    assert_malformed(reencoded(items)[:1] + b"\x18\x01" + reencoded(items)[2:])  # 1 as 2 bytes
    assert_malformed(cbor2.dumps(dict(enumerate(items)), canonical=True))
    assert_malformed(cbor2.dumps(tuple(items), canonical=False, value_sharing=True))


@pytest.mark.parametrize("version", [0, 2, -1, "1", 1.0, None, True])
def test_unknown_format_versions_are_malformed(version: object) -> None:
    for op in SAMPLES:
        items = fields(encode_op(op))
        assert_malformed(reencoded([version, *items[1:]]))


@pytest.mark.parametrize(
    "name",
    [b"", b".", b"..", b"a/b", b"/", b"nul\x00", b"x" * (NAME_MAX + 1), "text"],
    ids=repr,
)
def test_bad_names_are_malformed(name: Any) -> None:
    assert_malformed(encode_op(Create(H, E, ROOT, name, "file", 0o644, 0, 0)))
    assert_malformed(encode_op(Move(H, E, ROOT, name)))


def test_longest_name_is_accepted() -> None:
    op = Move(H, E, ROOT, b"x" * NAME_MAX)
    assert decode_op(encode_op(op)) == op


BAD_OPS: list[Any] = [
    Create(H, E, ROOT, b"a", "door", 0o644, 0, 0),  # type: ignore[arg-type]
    Create(H, E, ROOT, b"a", "chardev", 0o644, 0, 0, b"", RDEV_MAX + 1),
    Create(H, E, ROOT, b"a", "blockdev", 0o644, 0, 0, b"", -1),
    Create(H, E, ROOT, b"a", "file", 0o10000, 0, 0),
    Create(H, E, ROOT, b"a", "file", -1, 0, 0),
    Create(H, E, ROOT, b"a", "file", 0o644, 1 << 32, 0),
    Create(H, E, ROOT, b"a", "file", 0o644, True, 0),
    Create(H, b"short", ROOT, b"a", "file", 0o644, 0, 0),
    Create(H, E, ROOT + b"\x00", b"a", "file", 0o644, 0, 0),
    Create(H, E, ROOT, b"a", "symlink", 0o777, 0, 0, b"t" * 4097),
    Create(Hlc(-1, 0, H.node), E, ROOT, b"a", "file", 0o644, 0, 0),
    Create(Hlc(1, 1 << 32, H.node), E, ROOT, b"a", "file", 0o644, 0, 0),
    Create(Hlc(1, 0, b"short"), E, ROOT, b"a", "file", 0o644, 0, 0),
    Member(H, "x" * 65),
    SetAttr(H, E, "colour", 1),
    SetAttr(H, E, "mode", None),
    SetAttr(H, E, "mode", b"\x01"),
    SetAttr(H, E, "mtime_ns", 1 << 63),
    SetAttr(H, E, "xattr:" + "n" * (NAME_MAX + 1), b""),
    SetAttr(H, E, "xattr:user.big", b"v" * 65537),
    SetAttr(H, E, "xattr:user.int", 5),
    Write(H, E, (), MAX_FILE_SIZE + 1, ()),
    Write(H, E, (), -1, ()),
    Write(H, E, (), 0, ((0, b"short"),)),
    Write(H, E, (), 0, ((-1, None),)),
    Write(H, E, (), 0, ((1 << 41, None),)),
    Write(H, E, (), 0, ((0, None),) * (MAX_BLOCKS_PER_WRITE + 1)),
    Move(H, E, ROOT, b"a", (H,) * 1025),
    Forget(H, b"short", 1),
    Forget(H, H.node, -1),
    Forget(H, H.node, 1 << 63),
    Forget(H, H.node, True),
]


@pytest.mark.parametrize("op", BAD_OPS, ids=repr)
def test_out_of_range_fields_are_malformed(op: Any) -> None:
    assert_malformed(encode_op(op))


@pytest.mark.parametrize(
    "items",
    [
        [],
        [FORMAT_VERSION],
        [FORMAT_VERSION, 1],
        [FORMAT_VERSION, 9, [1, 0, H.node]],  # unknown operation
        [FORMAT_VERSION, 0, [1, 0, H.node]],  # a Member without its name
        [FORMAT_VERSION, 0, [1, 0, H.node], "a", "b"],  # one field too many
        [FORMAT_VERSION, 5, [1, 0, H.node], H.node],  # a Forget without its cut
        [FORMAT_VERSION, 2, [1, 0, H.node], E, ROOT, b"a", [[1, 0]]],  # short stamp in seen
        [FORMAT_VERSION, 4, [1, 0, H.node], E, [], 0, [[0]]],  # block entry without id
        [FORMAT_VERSION, 4, [1, 0, H.node], E, [], 0, {}],  # block map not a list
        [FORMAT_VERSION, 1.5, [1, 0, H.node], "x"],
        {"v": FORMAT_VERSION},
        "an operation",
    ],
    ids=repr,
)
def test_wrong_shapes_are_malformed(items: Any) -> None:
    assert_malformed(reencoded(items))


# --- fuzz: only MalformedOp may escape -----------------------------------------------------------

cbor_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 64) + 1, (1 << 64) - 1),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=40),
    st.sampled_from([FORMAT_VERSION, 0, 1, 2, 3, 4, 0o644, b"\x00" * 16, H.node, "file", "mode"]),
)
cbor_values = st.recursive(
    cbor_leaves,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=20,
)
near_ops = st.builds(
    lambda tag, stamp, body: [FORMAT_VERSION, tag, stamp, *body],
    st.integers(-1, 6),
    st.one_of(st.builds(lambda h: [h.wall_ms, h.counter, h.node], hlcs), cbor_values),
    st.lists(cbor_values, max_size=9),
)


def decode_or_malformed(data: bytes) -> None:
    try:
        op = decode_op(data)
    except MalformedOp:
        return
    assert encode_op(op) == data  # anything accepted is the canonical form of an op


@given(st.binary(max_size=200))
@example(b"")
@example(b"\xff")
@example(b"\x9f" * 10_000)  # nesting deep enough to exhaust the recursion limit
@example(b"\x5b" + b"\xff" * 8)  # a byte string claiming 2**64 - 1 bytes
@example(b"\xd9\xd9\xf7\x83\x01\x00\x80")  # a self-described CBOR tag
@example(b"\xc1\x1a\x00\x00\x00\x00")  # a datetime tag
def test_decode_of_any_bytes_only_raises_malformed(data: bytes) -> None:
    decode_or_malformed(data)


@given(cbor_values | near_ops)
def test_decode_of_any_cbor_value_only_raises_malformed(value: Any) -> None:
    decode_or_malformed(cbor2.dumps(value, canonical=True))


@given(ops, st.data())
def test_decode_of_a_corrupted_op_only_raises_malformed(op: Op, data: st.DataObject) -> None:
    encoded = bytearray(encode_op(op))
    for _ in range(data.draw(st.integers(1, 3), label="flips")):
        at = data.draw(st.integers(0, len(encoded) - 1), label="at")
        encoded[at] = data.draw(st.integers(0, 255), label="byte")
    decode_or_malformed(bytes(encoded))


def test_a_create_stored_before_rdev_existed_still_decodes() -> None:
    # The eight fields every Create had before special files: bytes in old stores.
    old = reencoded(
        [FORMAT_VERSION, 1, [H.wall_ms, H.counter, H.node], E, ROOT, b"a", "file", 420, 1, 2, b""]
    )
    assert decode_op(old) == Create(H, E, ROOT, b"a", "file", 0o644, 1, 2)
    assert encode_op(decode_op(old)) == old


def test_rdev_is_encoded_only_for_special_kinds() -> None:
    assert len(fields(encode_op(Create(H, E, ROOT, b"a", "file", 0o644, 0, 0)))) == 11
    assert len(fields(encode_op(Create(H, E, ROOT, b"p", "fifo", 0o644, 0, 0)))) == 12
    padded = [*fields(encode_op(Create(H, E, ROOT, b"a", "file", 0o644, 0, 0))), 0]
    with pytest.raises(MalformedOp):
        decode_op(reencoded(padded))  # an rdev of 0 on a file is not canonical


# --- format 2: the op's node is its log entry's -------------------------------------------------


@given(ops)
def test_every_op_round_trips_in_format_2_given_its_node(op: Op) -> None:
    data = encode_op(op, compact=True)
    assert fields(data)[0] == COMPACT_VERSION
    assert reencoded(fields(data)) == data
    assert decode_op(data, node=op.hlc.node) == op
    assert encode_op(decode_op(data, node=op.hlc.node), compact=True) == data
    assert len(data) <= len(encode_op(op)) - NODE_ID_BYTES


@pytest.mark.parametrize("op", SAMPLES, ids=lambda op: type(op).__name__)
def test_format_2_decodes_only_with_a_node(op: Op) -> None:
    data = encode_op(op, compact=True)
    assert_malformed(data)
    with pytest.raises(MalformedOp):
        decode_op(data, node=b"short")
    other = b"\x08" * NODE_ID_BYTES
    assert decode_op(data, node=other).hlc.node == other  # the entry's node, whatever it is


def test_format_2_writes_the_op_s_own_stamps_short_and_refuses_them_long() -> None:
    own, other = H.node, b"\x09" * NODE_ID_BYTES
    op = Write(H, E, (Hlc(5, 1, own), Hlc(6, 0, other)), 9, ())
    items = fields(encode_op(op, compact=True))
    assert items[2] == [H.wall_ms, H.counter]
    assert items[4] == [[5, 1], [6, 0, other]]
    assert len(encode_op(op, compact=True)) == len(encode_op(op)) - 2 * (NODE_ID_BYTES + 2)
    long = [*items[:4], [[5, 1, own], [6, 0, other]], *items[5:]]
    with pytest.raises(MalformedOp):
        decode_op(reencoded(long), node=own)  # the same op, not canonical
    with pytest.raises(MalformedOp):
        decode_op(reencoded([*items[:2], [H.wall_ms, H.counter, own], *items[3:]]), node=own)
    assert_malformed(reencoded([FORMAT_VERSION, *items[1:]]))  # format 1 needs the node


@given(cbor_values | near_ops)
def test_decode_of_any_cbor_value_with_a_node_only_raises_malformed(value: Any) -> None:
    candidates = [value]
    if isinstance(value, list) and len(value) >= 3:
        stamp = value[2][:2] if isinstance(value[2], list) else value[2]
        candidates.append([COMPACT_VERSION, value[1], stamp, *value[3:]])
    for candidate in candidates:
        data = cbor2.dumps(candidate, canonical=True)
        try:
            op = decode_op(data, node=H.node)
        except MalformedOp:
            continue
        compact = type(candidate[0]) is int and candidate[0] == COMPACT_VERSION
        assert encode_op(op, compact=compact) == data
