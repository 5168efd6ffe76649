"""Key epochs: shutting a machine out of the volume for good.

Invariant: a node holds an epoch's secret only if the epoch's `Rotate`
operation sealed it to this node (or a member handed it over when pairing
this node), and it never writes one down in plaintext: the secrets live in
the log, each in a sealed box to the X25519 key of a member's Ed25519 node
key, and are opened again from there at every start.

Epoch 0's secret is the volume root. `dfs-peer remove NODE` commits, in one
transaction, a `Forget` vote for NODE and a `Rotate`: a fresh random secret
S, its public name `epoch_id(S)`, number = previous + 1, the epoch it
follows, the removed nodes, and S sealed to every remaining member. The
entry is sealed under the epoch it follows (so every member that held that
one, including one offline at the time, can read it) and signed like every
entry. From then on this node seals new entries and blocks and MACs its
requests under the new epoch; readers pick the key by the epoch that sealed
data or a request names (`peer.sealing`, `peer.auth`).

A rotation is taken (`learn`) only if it holds on its own: sealed under the
epoch it names as `prev`, with the next number, made by a member of that
epoch who keeps the new one; for a recipient, its box opens to a secret
whose name is the epoch's id. Anything else is refused with one WARNING line
and changes nothing. What follows from the rotations taken is a function of
their set, whatever order they arrived in:

- removed nodes: the union of every rotation's `removed` (removals are final);
- acceptable epochs: those sealed to none of the removed nodes (epoch 0, held
  by everyone ever, only while nobody is removed); requests under any other
  epoch are refused (401), except `/epochs`, the catch-up path;
- current epoch (what this node writes under): the greatest acceptable epoch
  it holds, epochs ordered by (number, the rotation's stamp);
- two rotations made apart (on a partition) can each keep a node the other
  removed, so neither is acceptable: then the member with the smallest id
  among those the greatest one keeps, less the removed, makes a *merge
  rotation* at once (the others after `MERGE_GRACE_S` if none came): it
  follows the greatest epoch and keeps exactly its members less the removed.
  Merge rotations made with the same knowledge keep the same set, so the
  greatest of them is acceptable; with more knowledge the removed set only
  grows: it ends.

A member that was offline gets a 401 naming the epoch problem when it
returns, asks any member for `/epochs` (the rotation entries, sealed and
signed as in the log), takes them and syncs as usual.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cbor2
import nacl.exceptions
import nacl.public
import nacl.signing

from crdt.clock import Hlc
from crdt.ops import BOX_BYTES, MalformedOp, Op, Rotate, decode_op
from peer.errors import CorruptEntry
from peer.identity import NodeIdentity
from peer.keys import ROOT_BYTES, EpochKeys, VolumeKeys, epoch_id
from peer.sealing import EntryOfUnknownEpoch, LogEntry, open_entry, sealed_epoch

log = logging.getLogger(__name__)

# How long a member waits for the smallest one to make a merge rotation.
MERGE_GRACE_S = 30.0
# The epoch secrets handed over at pairing, sealed to this node's own key.
GRANTED_FILE = "epochs.sealed"


@dataclass(frozen=True, slots=True)
class Rotation:
    """A rotation taken: its op, the entry that carries it, whether this node
    holds its secret."""

    op: Rotate
    entry: LogEntry
    opened: bool

    @property
    def rank(self) -> tuple[int, int, int, bytes]:
        h = self.op.hlc
        return (self.op.number, h.wall_ms, h.counter, h.node)


@dataclass(frozen=True, slots=True)
class Me:
    """This node's X25519 key pair, converted from its Ed25519 node key."""

    node: bytes
    private: nacl.public.PrivateKey


def bind(keys: VolumeKeys, identity: NodeIdentity, data_dir: Path | None = None) -> None:
    """Let `keys` open boxes sealed to `identity`, and take the epoch secrets
    handed over at pairing (in `data_dir`, sealed to this node)."""
    me = Me(identity.node_id, identity.signing_key.to_curve25519_private_key())
    keys.me = me
    if data_dir is None:
        return
    path = data_dir / GRANTED_FILE
    if not path.exists():
        return
    try:
        plain = nacl.public.SealedBox(me.private).decrypt(path.read_bytes())
        secrets = cbor2.loads(plain)
    except (nacl.exceptions.CryptoError, ValueError, cbor2.CBORDecodeError) as exc:
        log.error("%s does not open with this node's key (%s): ignored", path, exc)
        return
    for secret in secrets if isinstance(secrets, list) else []:
        if isinstance(secret, bytes) and len(secret) == ROOT_BYTES:
            keys.granted[epoch_id(secret)] = secret


def store_granted(data_dir: Path, identity: NodeIdentity, secrets: list[bytes]) -> None:
    """Keep the epoch secrets a pairing handed over, sealed to this node's key (0600)."""
    if not secrets:
        return
    public = identity.signing_key.verify_key.to_curve25519_public_key()
    sealed = nacl.public.SealedBox(public).encrypt(cbor2.dumps(secrets))
    path = data_dir / GRANTED_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, sealed)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def secrets_to_hand_over(keys: VolumeKeys) -> list[bytes]:
    """Every epoch secret held but the root (which pairing sends anyway)."""
    return [e.secret for e in keys.epochs() if e is not keys.base and e.secret]


def seal_secret(member: bytes, secret: bytes) -> bytes:
    """`secret` sealed to the X25519 key converted from `member`'s node id."""
    public = nacl.signing.VerifyKey(member).to_curve25519_public_key()
    return nacl.public.SealedBox(public).encrypt(secret)


def make_rotation(
    prev: EpochKeys, me: bytes, removed: set[bytes], members: set[bytes], stamp: Hlc
) -> Rotate:
    """A `Rotate` following epoch `prev`: a fresh secret sealed to `members`
    (this node `me` included), shutting out `removed`. Its entry must be
    sealed under `prev` (`VolumeKeys.under`)."""
    keep = sorted((members | {me}) - removed)
    secret = os.urandom(ROOT_BYTES)
    return Rotate(
        stamp,
        epoch_id(secret),
        prev.number + 1,
        prev.id,
        tuple(sorted(removed)),
        tuple(keep),
        tuple(seal_secret(m, secret) for m in keep),
    )


def _refuse(entry: LogEntry, op: Rotate, why: str) -> bool:
    log.warning(
        "refused key rotation %s by node %s (entry %s/%d): %s; keys unchanged",
        op.epoch.hex()[:8],
        entry.node.hex()[:8],
        entry.node.hex()[:8],
        entry.seq,
        why,
    )
    return False


def learn(keys: VolumeKeys, entry: LogEntry, op: Op) -> bool:
    """Take the rotation `op` carried by `entry` (opened already); True if
    this node's keys changed. A rotation that does not hold changes nothing."""
    if not isinstance(op, Rotate) or op.epoch in keys.rotations:
        return False
    me = keys.me if isinstance(keys.me, Me) else None
    if op.hlc.node != entry.node:
        return _refuse(entry, op, "made by another node than its entry's")
    prev = keys.epoch(op.prev)
    if prev is None or sealed_epoch(keys, entry.sealed) != op.prev:
        return _refuse(entry, op, "not sealed under the epoch it follows")
    if op.number != prev.number + 1:
        return _refuse(entry, op, f"number {op.number} does not follow {prev.number}")
    rotator = entry.node
    if prev.members is not None and rotator not in prev.members:
        return _refuse(entry, op, "its maker was no member of the epoch it follows")
    if rotator not in op.members:
        return _refuse(entry, op, "its maker does not keep the new epoch")
    secret = None
    if me is not None and me.node in op.members:
        box = op.boxes[op.members.index(me.node)]
        try:
            secret = nacl.public.SealedBox(me.private).decrypt(box)
        except nacl.exceptions.CryptoError:
            return _refuse(entry, op, "this node's box does not open")
    elif op.epoch in keys.granted:
        secret = keys.granted[op.epoch]
    if secret is not None and (len(secret) != ROOT_BYTES or epoch_id(secret) != op.epoch):
        return _refuse(entry, op, "the secret in this node's box is not the epoch's")
    rotation = Rotation(op, entry, secret is not None)
    keys.rotations[op.epoch] = rotation
    keys.removed |= set(op.removed)
    if secret is not None:
        keys.add(EpochKeys.derive(secret, op.number, frozenset(op.members), rotation.rank))
    else:
        keys.current = keys.choose_current()
    who = ", ".join(n.hex()[:8] for n in op.removed) or "nobody"
    if me is not None and me.node in op.removed:
        log.warning(
            "this node was removed from the volume by node %s (key epoch %d): "
            "members no longer answer it; what it held until then stays readable here",
            rotator.hex()[:8],
            op.number,
        )
    else:
        log.info(
            "key epoch %d (%s) by node %s: removed %s; %s",
            op.number,
            op.epoch.hex()[:8],
            rotator.hex()[:8],
            who,
            "writing under it" if keys.current.id == op.epoch else "not current here",
        )
    return True


def take_entries(keys: VolumeKeys, entries: list[LogEntry]) -> int:
    """Take the rotations among entries a peer sent (`/epochs`): each must be
    signed by its node and open under an epoch held (possibly one an earlier
    of them made); others are skipped. Returns how many were taken."""
    taken = 0
    waiting = list(entries)
    while waiting:
        left = []
        for entry in waiting:
            try:
                op = decode_op(open_entry(keys, entry), node=entry.node)
            except EntryOfUnknownEpoch:
                left.append(entry)
                continue
            except (CorruptEntry, MalformedOp) as exc:
                log.warning("refused a rotation entry from a peer: %s", exc)
                continue
            if isinstance(op, Rotate) and op.hlc.node == entry.node and learn(keys, entry, op):
                taken += 1
        if len(left) == len(waiting):
            break
        waiting = left
    return taken


def describe(keys: VolumeKeys, names: dict[bytes, str]) -> dict[str, object]:
    """What `status` shows of the keys: the current epoch, who was removed."""
    return {
        "epoch": keys.current.number,
        "epoch_id": keys.current.id.hex(),
        "epochs_held": len(keys.epochs()),
        "removed": [{"id": n.hex(), "name": names.get(n, "?")} for n in sorted(keys.removed)],
        "removed_here": keys.me_removed(),
    }


def rotation_entries(keys: VolumeKeys) -> list[LogEntry]:
    """The entries of every rotation taken, oldest epoch first (`/epochs`)."""
    rotations = [r for r in keys.rotations.values() if isinstance(r, Rotation)]
    return [r.entry for r in sorted(rotations, key=lambda r: r.rank)]


def merge_rotation_due(keys: VolumeKeys, me: bytes) -> float | None:
    """Seconds until this node should make a merge rotation (see the module
    docstring), or None if none is needed from it."""
    rotations = [r for r in keys.rotations.values() if isinstance(r, Rotation)]
    if not rotations:
        return None
    top = max(rotations, key=lambda r: r.rank)
    keep = set(top.op.members) - keys.removed
    if keep == set(top.op.members) or me not in keep or not top.opened:
        return None
    return 0.0 if me == min(keep) else MERGE_GRACE_S


def merge_target(keys: VolumeKeys) -> tuple[EpochKeys, set[bytes], set[bytes]] | None:
    """(epoch to follow, nodes to remove, members) of the merge rotation
    this node would make now: it follows the greatest epoch."""
    rotations = [r for r in keys.rotations.values() if isinstance(r, Rotation)]
    if not rotations:
        return None
    top = max(rotations, key=lambda r: r.rank)
    held = keys.epoch(top.op.epoch)
    if held is None:
        return None
    return held, set(top.op.members) & keys.removed, set(top.op.members)


__all__ = [
    "BOX_BYTES",
    "GRANTED_FILE",
    "MERGE_GRACE_S",
    "Rotation",
    "bind",
    "learn",
    "make_rotation",
    "merge_rotation_due",
    "merge_target",
    "rotation_entries",
    "seal_secret",
    "secrets_to_hand_over",
    "store_granted",
]
