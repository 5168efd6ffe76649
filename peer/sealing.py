"""Sealing: blocks and log entries encrypted, authenticated and signed.

Invariant: nothing sealed here opens unless it is byte for byte what a holder
of the volume secret sealed, under the identity it was sealed for (a block's id,
a log entry's (node, seq)): moving sealed bytes to another id or seq breaks the
MAC. A block opens only if its plaintext hashes to its id, and a log entry only
if its node's Ed25519 signature holds, which anyone can check without the
secret. Failures raise; they are never a warning.

Sealed format, version 1: `0x01 || nonce (24 random bytes) || XChaCha20-Poly1305
ciphertext and tag`, with the identity as associated data. 192-bit random
nonces make reuse negligible without any nonce state to keep or lose.

Each node's log is a hash chain (entry format 2): entry (node, seq) names
`prev`, the hash of the node's entry seq - 1 (32 zero bytes for seq 1), and
its signature covers its hash, `BLAKE2b-256(context || node || seq || prev ||
BLAKE2b-256(sealed))`. So one signed entry vouches for the node's whole log up
to it, and two entries of one node at one seq with different hashes, both
signed, prove that node forked its log. A signed *head* is an entry's header
without the sealed bytes (`Head`): checkable by anyone, 170 bytes. Entries
written before chaining (format 1: `prev` empty, the signature over the
sealed bytes) still open; their hash is computed the same way with an empty
`prev`, so the first chained entry after them binds them too.
Blocks are sealed in version 2, which hides their exact size: `0x02 || nonce
|| ciphertext and tag` of the plaintext padded to a size class (`0x80`, then
zeros up to the class; `padded_size`), with `0x02 || id` as associated data
(so the version byte cannot be switched). The id stays the keyed hash of the
plaintext without padding. Version 1 blocks (written before) still open.

Key epochs (`peer.epochs`): data of epoch 0 (the root's keys) keeps the
formats above. After a rotation, data is sealed under the current epoch's
keys and names it: a log entry as version 3, `0x03 || epoch id (16 bytes) ||
nonce || ciphertext and tag`, a block as version 4, `0x04 || epoch id ||
nonce || ciphertext and tag` of the padded plaintext; the version byte and
the epoch id are in the associated data, so neither can be switched, and the
entry's signature covers them (it covers the sealed bytes' hash). A block's
id is keyed with its epoch's block-id key. A reader opens each under the
keys of the epoch it names, or refuses it (`UnknownEpoch`) if it holds none.

Patches (`Patch`): a small write into a stored block is kept as the bytes it
changed over that block (its *base*), not as the whole block sealed again.
Sealed as `0x05 || base id (32 bytes) || a sealed block (version 2 or 4)`
whose plaintext is the CBOR array `[base, depth, length, [[offset, bytes],
...]]` and whose id is the keyed BLAKE2b of that plaintext personalised
`_PATCH_PERSON`, so no block's plaintext can pass for a patch or the other way
round. The base id in front is a hint for the store (what a patch keeps alive,
`Store.patch_bases`), so it is visible without the secret, as block ids are;
the one inside is authenticated, and a patch whose hint differs does not open.
A patch's depth is its base's plus one (a whole block's is 0), at most
`MAX_PATCH_DEPTH`: a reader checks it at each step, so a chain always ends.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cbor2
import nacl.bindings
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.signing
import nacl.utils

from crdt.ops import BLOCK_SIZE
from peer.errors import CorruptBlock, CorruptEntry
from peer.identity import NodeIdentity
from peer.keys import EPOCH_ID_BYTES, EpochKeys, VolumeKeys

SEAL_VERSION = 1
PADDED_VERSION = 2
EPOCH_ENTRY_VERSION = 3
EPOCH_BLOCK_VERSION = 4
PATCH_VERSION = 5
# How many patches may stand on a whole block (each read of the block opens
# them all), and how many changed bytes a patch may carry before a whole block
# is the cheaper thing to write (and to read).
MAX_PATCH_DEPTH = 4
MAX_PATCH_BYTES = BLOCK_SIZE // 4
_PATCH_PERSON = b"dfs-peer:patch"
# The smallest size class of a padded block; classes double from here up to
# BLOCK_SIZE, so a block's sealed size tells its length only within a factor of 2.
PAD_MIN = 256
NONCE_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
TAG_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
KEY_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES
OVERHEAD = 1 + NONCE_BYTES + TAG_BYTES
BLOCK_ID_BYTES = 32
SIGNATURE_BYTES = 64
NODE_ID_BYTES = 32
# seq is stored as a SQLite INTEGER (signed 64-bit) and signed as 8 bytes.
MAX_SEQ = (1 << 63) - 1

_ENTRY_SIG_CONTEXT = b"dfs-peer:v1:entry"
_CHAIN_SIG_CONTEXT = b"dfs-peer:v2:entry"
_HASH_CONTEXT = b"dfs-peer:v2:entry-hash"
HASH_BYTES = 32
GENESIS = bytes(HASH_BYTES)  # the `prev` of a node's first entry
_CHECK_AAD = b"dfs-peer:v1:check"
_CHECK_PLAINTEXT = b"dfs-peer:v1:the secret opens this volume"


class SealError(Exception):
    """Sealed bytes that do not open: wrong key, wrong identity, or tampered."""


class UnknownEpoch(SealError):
    """Sealed under a key epoch this node does not hold (yet, or ever)."""

    def __init__(self, eid: bytes) -> None:
        super().__init__(f"sealed under key epoch {eid.hex()[:8]}, which this node does not hold")
        self.eid = eid


def _seal_epoch(epoch: EpochKeys, key: bytes, version: int, plaintext: bytes, aad: bytes) -> bytes:
    head = bytes([version]) + epoch.id
    return head + seal(key, plaintext, head + aad)[1:]


def _epoch_of(keys: VolumeKeys, sealed: bytes) -> EpochKeys:
    eid = sealed[1 : 1 + EPOCH_ID_BYTES]
    epoch = keys.epoch(eid)
    if epoch is None:
        raise UnknownEpoch(eid)
    return epoch


def _unseal_epoch(
    keys: VolumeKeys, sealed: bytes, aad: bytes, pick: str
) -> tuple[EpochKeys, bytes]:
    """(epoch, plaintext) of data sealed by `_seal_epoch`; `pick` names the key."""
    if len(sealed) < OVERHEAD + EPOCH_ID_BYTES:
        raise SealError(f"sealed data too short ({len(sealed)} bytes)")
    epoch = _epoch_of(keys, sealed)
    head = sealed[: 1 + EPOCH_ID_BYTES]
    body = sealed[:1] + sealed[1 + EPOCH_ID_BYTES :]
    return epoch, unseal(getattr(epoch, pick), body, head + aad, sealed[0])


def sealed_epoch(keys: VolumeKeys, sealed: bytes) -> bytes:
    """The id of the epoch sealed bytes name (epoch 0's for the older formats)."""
    if sealed[:1] in (bytes([EPOCH_ENTRY_VERSION]), bytes([EPOCH_BLOCK_VERSION])):
        return sealed[1 : 1 + EPOCH_ID_BYTES]
    return keys.base.id


def seal(key: bytes, plaintext: bytes, aad: bytes, version: int = SEAL_VERSION) -> bytes:
    """`plaintext` encrypted and authenticated under `key`, bound to `aad`."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a sealing key is {KEY_BYTES} bytes, not {len(key)}")
    nonce = nacl.utils.random(NONCE_BYTES)
    ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, aad, nonce, key
    )
    return bytes([version]) + nonce + ciphertext


def unseal(key: bytes, sealed: bytes, aad: bytes, version: int = SEAL_VERSION) -> bytes:
    """The plaintext of `sealed`; `SealError` unless key and aad are the sealer's."""
    if len(sealed) < OVERHEAD:
        raise SealError(f"sealed data too short ({len(sealed)} bytes)")
    if sealed[0] != version:
        raise SealError(f"unknown sealed format version {sealed[0]}")
    nonce = sealed[1 : 1 + NONCE_BYTES]
    try:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            sealed[1 + NONCE_BYTES :], aad, nonce, key
        )
    except nacl.exceptions.CryptoError as exc:
        raise SealError("authentication failed") from exc


# Blocks


def block_id(keys: VolumeKeys | EpochKeys, plaintext: bytes) -> bytes:
    """The content id of a block: keyed BLAKE2b-256, opaque without the secret
    (under the current epoch's key, or `keys`' if an epoch is given)."""
    return nacl.hash.blake2b(
        plaintext,
        digest_size=BLOCK_ID_BYTES,
        key=keys.block_ids,
        encoder=nacl.encoding.RawEncoder,
    )


@dataclass(frozen=True, slots=True)
class Patch:
    """The bytes a small write changed in block `base` (see the module's
    docstring): the block it makes is `base`'s plaintext cut or zero-padded
    to `length`, with each `(offset, data)` of `ranges` written over it."""

    base: bytes
    depth: int
    length: int
    ranges: tuple[tuple[int, bytes], ...]

    def apply(self, base: bytes) -> bytes:
        out = bytearray(base[: self.length])
        if len(out) < self.length:
            out.extend(bytes(self.length - len(out)))
        for offset, data in self.ranges:
            out[offset : offset + len(data)] = data
        return bytes(out)

    def changed(self) -> int:
        return sum(len(data) for _, data in self.ranges)


def patch_id(keys: VolumeKeys | EpochKeys, plaintext: bytes) -> bytes:
    """The id of a patch: like a block's, personalised (a different function)."""
    return nacl.hash.blake2b(
        plaintext,
        digest_size=BLOCK_ID_BYTES,
        key=keys.block_ids,
        person=_PATCH_PERSON,
        encoder=nacl.encoding.RawEncoder,
    )


def seal_patch(keys: VolumeKeys, patch: Patch) -> tuple[bytes, bytes]:
    """(id, sealed) of a patch, under the current epoch."""
    plaintext = cbor2.dumps(
        [patch.base, patch.depth, patch.length, [list(r) for r in patch.ranges]]
    )
    epoch = keys.current
    pid = patch_id(epoch, plaintext)
    return pid, bytes([PATCH_VERSION]) + patch.base + _seal_padded(keys, pid, plaintext)


def whole_block_length(sealed_length: int, version: int) -> int | None:
    """BLOCK_SIZE if a block sealed in `version` that long holds a full block
    (a full block is padded by its marker byte only), else None (shorter
    blocks hide their length in their size class; a patch is not a block)."""
    overhead = {
        SEAL_VERSION: OVERHEAD,
        PADDED_VERSION: OVERHEAD + 1,
        EPOCH_BLOCK_VERSION: OVERHEAD + EPOCH_ID_BYTES + 1,
    }.get(version)
    if overhead is not None and sealed_length - overhead == BLOCK_SIZE:
        return BLOCK_SIZE
    return None


def patch_base(sealed: bytes) -> bytes | None:
    """The base a sealed patch names in front (unchecked), or None for a block."""
    if sealed[:1] == bytes([PATCH_VERSION]) and len(sealed) > 1 + BLOCK_ID_BYTES:
        return sealed[1 : 1 + BLOCK_ID_BYTES]
    return None


def _patch_of(plaintext: bytes, hint: bytes) -> Patch:
    """The patch `plaintext` encodes; `SealError` if it is not a well-formed one."""
    try:
        base, depth, length, ranges = cbor2.loads(plaintext)
        parsed = tuple((o, d) for o, d in ranges)
    except (cbor2.CBORDecodeError, ValueError, TypeError) as exc:
        raise SealError(f"malformed patch ({exc})") from exc
    if not all(type(o) is int and isinstance(d, bytes) for o, d in parsed):
        raise SealError("a patch range is not an offset and bytes")
    if not (isinstance(base, bytes) and base == hint):
        raise SealError("the patch names another base than its header")
    if not (isinstance(depth, int) and 1 <= depth <= MAX_PATCH_DEPTH):
        raise SealError(f"patch depth {depth!r} out of range")
    if not (isinstance(length, int) and 0 <= length <= BLOCK_SIZE):
        raise SealError(f"patch length {length!r} out of range")
    if any(o < 0 or o + len(d) > length for o, d in parsed):
        raise SealError("a patch range lies outside the block")
    return Patch(base, depth, length, parsed)


def padded_size(length: int) -> int:
    """The size class a block of `length` bytes is sealed at: the smallest
    power of two, at least `PAD_MIN`, with room for the `0x80` marker; a
    full block takes just the marker."""
    want = length + 1
    size = PAD_MIN
    while size < want:
        size *= 2
    return size if size <= BLOCK_SIZE else want


def seal_block(keys: VolumeKeys, plaintext: bytes) -> tuple[bytes, bytes]:
    """(id, sealed) for a block's plaintext, padded to its size class, under
    the current epoch."""
    bid = block_id(keys.current, plaintext)
    return bid, _seal_padded(keys, bid, plaintext)


def _seal_padded(keys: VolumeKeys, bid: bytes, plaintext: bytes) -> bytes:
    epoch = keys.current
    pad = padded_size(len(plaintext)) - len(plaintext) - 1
    padded = plaintext + b"\x80" + bytes(pad)
    if epoch is keys.base:
        return seal(epoch.blocks, padded, bytes([PADDED_VERSION]) + bid, PADDED_VERSION)
    return _seal_epoch(epoch, epoch.blocks, EPOCH_BLOCK_VERSION, padded, bid)


def open_sealed(
    keys: VolumeKeys, bid: bytes, sealed: bytes, *, check_id: bool = True
) -> bytes | Patch:
    """What `bid` holds: a block's plaintext, or a `Patch` over another block
    (`peer.storage.blocks` applies it); `CorruptBlock` unless it is exactly that."""
    if sealed[:1] != bytes([PATCH_VERSION]):
        return open_block(keys, bid, sealed, check_id=check_id)
    hint = sealed[1 : 1 + BLOCK_ID_BYTES]
    try:
        epoch, plaintext = _open_padded(keys, bid, sealed[1 + BLOCK_ID_BYTES :])
        patch = _patch_of(plaintext, hint)
    except SealError as exc:
        raise CorruptBlock(f"patch {bid.hex()}: {exc}") from exc
    if check_id and patch_id(epoch, plaintext) != bid:
        raise CorruptBlock(f"patch {bid.hex()}: content does not match its id")
    return patch


def _open_padded(keys: VolumeKeys, bid: bytes, sealed: bytes) -> tuple[EpochKeys, bytes]:
    """(epoch, plaintext) of a padded block (version 2 or 4); `SealError` if not."""
    epoch = keys.base
    if sealed[:1] == bytes([PADDED_VERSION]):
        padded = unseal(epoch.blocks, sealed, bytes([PADDED_VERSION]) + bid, PADDED_VERSION)
    elif sealed[:1] == bytes([EPOCH_BLOCK_VERSION]):
        epoch, padded = _unseal_epoch(keys, sealed, bid, "blocks")
    else:
        raise SealError(f"unknown sealed format version {sealed[:1].hex()}")
    body = padded.rstrip(b"\0")
    if not body.endswith(b"\x80"):
        raise SealError("bad padding")
    return epoch, body[:-1]


def open_block(keys: VolumeKeys, bid: bytes, sealed: bytes, *, check_id: bool = True) -> bytes:
    """The plaintext of block `bid`; `CorruptBlock` unless it is exactly that block
    (a patch is not: see `open_sealed`).

    `check_id=False` (a block read back from this node's store): the content
    hash is not computed again. Every block was checked when it entered the
    store (sealed here from its plaintext, or opened in full when a peer sent
    it, `peer.net.fetching`), and the MAC, which binds the bytes to `bid`,
    is still checked: it catches any change on disk by anyone without the
    secret. The hash was 55% of a read's CPU."""
    epoch = keys.base
    try:
        if sealed[:1] in (bytes([PADDED_VERSION]), bytes([EPOCH_BLOCK_VERSION])):
            epoch, plaintext = _open_padded(keys, bid, sealed)
        else:
            plaintext = unseal(epoch.blocks, sealed, bid)
    except SealError as exc:
        raise CorruptBlock(f"block {bid.hex()}: {exc}") from exc
    # The MAC proves a secret holder sealed it for this id; the hash proves the
    # content is really the one the id names (a buggy or hostile peer with the
    # secret could otherwise seal anything under any id).
    if check_id and block_id(epoch, plaintext) != bid:
        raise CorruptBlock(f"block {bid.hex()}: content does not match its id")
    return plaintext


# Log entries


@dataclass(frozen=True, slots=True)
class LogEntry:
    """Entry `seq` of `node`'s log: a sealed operation and the node's signature.

    `prev` is the hash of the node's entry `seq - 1` (`GENESIS` for seq 1);
    empty for an entry written before logs were chained (format 1)."""

    node: bytes
    seq: int
    sealed: bytes
    sig: bytes
    prev: bytes = b""

    @property
    def chained(self) -> bool:
        return bool(self.prev)


@dataclass(frozen=True, slots=True)
class Head:
    """A signed statement of `node`: its entry `seq` has hash `hash`.

    For a chained entry it travels as (node, seq, prev, digest of the sealed
    bytes, signature); for a format-1 entry the sealed bytes themselves stand
    in for the digest (its signature covers them)."""

    node: bytes
    seq: int
    prev: bytes
    body: bytes  # digest of the sealed op (chained), or the sealed op (format 1)
    sig: bytes

    @property
    def hash(self) -> bytes:
        digest = self.body if self.prev else _digest(self.body)
        return _chain_hash(self.node, self.seq, self.prev, digest)


def _seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def _digest(data: bytes) -> bytes:
    # hashlib's BLAKE2b, the same function as nacl.hash.blake2b without a key:
    # PyNaCl's argument checks cost ~100 us a call, a checkpoint hashes every
    # entry twice (measured: 4.4 of 22 s of a 5,000-entry fold and open).
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()


def _chain_hash(node: bytes, seq: int, prev: bytes, digest: bytes) -> bytes:
    return _digest(_HASH_CONTEXT + node + _seq_bytes(seq) + prev + digest)


def entry_hash(entry: LogEntry) -> bytes:
    """The chain hash of an entry (what the next entry of its node names as `prev`)."""
    return _chain_hash(entry.node, entry.seq, entry.prev, _digest(entry.sealed))


def head_of(entry: LogEntry) -> Head:
    """The signed head an entry makes (checked by `verify_head` as the entry was)."""
    body = _digest(entry.sealed) if entry.chained else entry.sealed
    return Head(entry.node, entry.seq, entry.prev, body, entry.sig)


def _entry_aad(node: bytes, seq: int) -> bytes:
    return node + _seq_bytes(seq)


def _signed_bytes(node: bytes, seq: int, sealed: bytes) -> bytes:
    return _ENTRY_SIG_CONTEXT + node + _seq_bytes(seq) + sealed


def seal_entry(
    keys: VolumeKeys, identity: NodeIdentity, seq: int, op_bytes: bytes, prev: bytes = GENESIS
) -> LogEntry:
    """Entry `seq` of this node's log, holding the encoded operation `op_bytes`,
    chained to `prev` (the hash of entry seq - 1; `GENESIS` for seq 1)."""
    if not 1 <= seq <= MAX_SEQ:
        raise ValueError(f"log seq out of range: {seq}")
    if len(prev) != HASH_BYTES:
        raise ValueError(f"prev is {len(prev)} bytes, not {HASH_BYTES}")
    node = identity.node_id
    epoch = keys.current
    if epoch is keys.base:
        sealed = seal(epoch.log, op_bytes, _entry_aad(node, seq))
    else:
        sealed = _seal_epoch(epoch, epoch.log, EPOCH_ENTRY_VERSION, op_bytes, _entry_aad(node, seq))
    digest = _chain_hash(node, seq, prev, _digest(sealed))
    return LogEntry(node, seq, sealed, identity.sign(_CHAIN_SIG_CONTEXT + digest), prev)


def sign_legacy_entry(
    keys: VolumeKeys, identity: NodeIdentity, seq: int, op_bytes: bytes
) -> LogEntry:
    """A format-1 (unchained) entry, as nodes wrote them before: for tests of
    stores and peers that still hold such entries."""
    node = identity.node_id
    sealed = seal(keys.base.log, op_bytes, _entry_aad(node, seq))
    return LogEntry(node, seq, sealed, identity.sign(_signed_bytes(node, seq, sealed)))


def verify_entry(entry: LogEntry) -> None:
    """Check an entry's origin and integrity (no secret needed); `CorruptEntry` if not."""
    verify_head(head_of(entry))


def verify_head(head: Head) -> None:
    """Check that `head.node` signed `head` (no secret needed); `CorruptEntry` if not."""
    if len(head.node) != NODE_ID_BYTES:
        raise CorruptEntry(f"node id is {len(head.node)} bytes")
    if not 1 <= head.seq <= MAX_SEQ:
        raise CorruptEntry(f"seq out of range: {head.seq}")
    if len(head.sig) != SIGNATURE_BYTES:
        raise CorruptEntry(f"signature is {len(head.sig)} bytes")
    where = f"{head.node.hex()[:8]}/{head.seq}"
    if head.prev and (len(head.prev) != HASH_BYTES or len(head.body) != HASH_BYTES):
        raise CorruptEntry(f"entry {where}: malformed chain link")
    if head.prev:
        signed = _CHAIN_SIG_CONTEXT + head.hash
    else:
        signed = _signed_bytes(head.node, head.seq, head.body)
    try:
        verify_key = nacl.signing.VerifyKey(head.node)
        verify_key.verify(signed, head.sig)
    except nacl.exceptions.BadSignatureError as exc:
        raise CorruptEntry(f"entry {where}: bad signature") from exc
    except nacl.exceptions.CryptoError as exc:
        raise CorruptEntry(f"entry {where}: {exc}") from exc


class EntryOfUnknownEpoch(CorruptEntry):
    """An entry sealed under a key epoch this node does not hold: not (yet)
    readable here, rather than damaged (`peer.epochs`)."""

    def __init__(self, message: str, eid: bytes) -> None:
        super().__init__(message)
        self.eid = eid


def open_entry(keys: VolumeKeys, entry: LogEntry, *, check_signature: bool = True) -> bytes:
    """The operation bytes of a verified entry; `CorruptEntry` on any failure.

    `check_signature=False` skips only the Ed25519 check (1.3 of 3.2 s of a
    10,000-file restart), for entries whose signature was checked when they
    entered this node's store; the AEAD tag is always checked."""
    if check_signature:
        verify_entry(entry)
    aad = _entry_aad(entry.node, entry.seq)
    where = f"{entry.node.hex()[:8]}/{entry.seq}"
    try:
        if entry.sealed[:1] == bytes([EPOCH_ENTRY_VERSION]):
            return _unseal_epoch(keys, entry.sealed, aad, "log")[1]
        return unseal(keys.base.log, entry.sealed, aad)
    except UnknownEpoch as exc:
        raise EntryOfUnknownEpoch(f"entry {where}: {exc}", exc.eid) from exc
    except SealError as exc:
        raise CorruptEntry(f"entry {where}: {exc}") from exc


# Secret check


def make_check(keys: VolumeKeys) -> bytes:
    """A sealed known text, stored with a volume so a wrong secret shows at start."""
    return seal(keys.base.log, _CHECK_PLAINTEXT, _CHECK_AAD)


def check_opens(keys: VolumeKeys, sealed: bytes) -> bool:
    """Whether `keys` open a volume's check, i.e. they come from its secret."""
    try:
        return unseal(keys.base.log, sealed, _CHECK_AAD) == _CHECK_PLAINTEXT
    except SealError:
        return False
