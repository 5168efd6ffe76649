"""Keys derived from the volume root, one per purpose.

Invariant: a key is a pure function of (root, purpose), so every node with the
secret derives the same keys, and keys for different purposes (or different
volumes) are unrelated: learning one (the public volume tag, say) reveals
nothing about the root or the others. BLAKE2b in keyed mode is the KDF, with a
versioned personalization so a future format can change every key at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import nacl.encoding
import nacl.hash

ROOT_BYTES = 32
KEY_BYTES = 32
_PERSON = b"dfs-peer:v1"

PURPOSE_BLOCKS = b"blocks"
PURPOSE_LOG = b"log"
PURPOSE_BLOCK_IDS = b"block-ids"
PURPOSE_PEERS = b"peers"
PURPOSE_TAG = b"tag"


def derive_key(root: bytes, purpose: bytes) -> bytes:
    """The 32-byte key for `purpose` under the volume root `root`."""
    if len(root) != ROOT_BYTES:
        raise ValueError(f"a volume root is {ROOT_BYTES} bytes, not {len(root)}")
    return nacl.hash.blake2b(
        purpose,
        digest_size=KEY_BYTES,
        key=root,
        person=_PERSON,
        encoder=nacl.encoding.RawEncoder,
    )


EPOCH_ID_BYTES = 16
PURPOSE_EPOCH_ID = b"epoch-id"


def epoch_id(secret: bytes) -> bytes:
    """The public name of the epoch whose secret is `secret` (16 bytes).

    A keyed hash of the secret like every other key: it names the epoch in
    sealed data and requests, and anyone handed a secret can check it is the
    one a name stands for; it tells nothing about the secret."""
    return derive_key(secret, PURPOSE_EPOCH_ID)[:EPOCH_ID_BYTES]


@dataclass(frozen=True, slots=True)
class EpochKeys:
    """The keys of one key epoch (`peer.epochs`): epoch 0's secret is the
    volume root; each rotation makes a later one with a fresh secret.

    `members`: the nodes the epoch's secret was sealed to (None for epoch 0,
    which every node ever paired or given the secret holds). `rank` orders
    epochs: (number, the rotation's stamp as (wall_ms, counter, node))."""

    id: bytes
    number: int
    blocks: bytes = field(repr=False)
    log: bytes = field(repr=False)
    block_ids: bytes = field(repr=False)
    peers: bytes = field(repr=False)
    secret: bytes = field(repr=False, default=b"")
    members: frozenset[bytes] | None = None
    rank: tuple[int, int, int, bytes] = (0, 0, 0, b"")

    @classmethod
    def derive(
        cls,
        secret: bytes,
        number: int = 0,
        members: frozenset[bytes] | None = None,
        rank: tuple[int, int, int, bytes] = (0, 0, 0, b""),
    ) -> EpochKeys:
        return cls(
            id=epoch_id(secret),
            number=number,
            blocks=derive_key(secret, PURPOSE_BLOCKS),
            log=derive_key(secret, PURPOSE_LOG),
            block_ids=derive_key(secret, PURPOSE_BLOCK_IDS),
            peers=derive_key(secret, PURPOSE_PEERS),
            secret=secret,
            members=members,
            rank=rank,
        )


class VolumeKeys:
    """Every key of one volume, epoch by epoch. Kept out of repr so logs never
    show a key.

    `blocks`, `log`, `block_ids` and `peers` are the *current* epoch's (what
    this node writes and signs requests with); `epoch(id)` finds the keys
    sealed data or a request names; `base` is epoch 0 (the root's). The tag is
    the root's for good: it names the volume. Which epochs exist, which is
    current and which are acceptable is decided by `peer.epochs`."""

    __slots__ = ("_epochs", "base", "current", "granted", "me", "removed", "rotations", "tag")

    def __init__(self, base: EpochKeys, tag: bytes) -> None:
        self.base = base
        self.current = base
        self.tag = tag
        self._epochs: dict[bytes, EpochKeys] = {base.id: base}
        # Nodes removed by a rotation this node took (a union: removals are final).
        self.removed: set[bytes] = set()
        # Every valid rotation known, opened or not: epoch id -> its record
        # (`peer.epochs.Rotation`).
        self.rotations: dict[bytes, object] = {}
        # Epoch secrets handed over when this node was paired: id -> secret.
        self.granted: dict[bytes, bytes] = {}
        # This node's X25519 key pair, to open boxes (`peer.epochs.bind`).
        self.me: object = None

    def __eq__(self, other: object) -> bool:
        """The same volume's keys, with the same epochs held."""
        if not isinstance(other, VolumeKeys):
            return NotImplemented
        return (
            self.base == other.base
            and self.tag == other.tag
            and self._epochs.keys() == other._epochs.keys()
        )

    __hash__ = None  # type: ignore[assignment]  # mutable: epochs are taken as they come

    def __repr__(self) -> str:
        return f"VolumeKeys(tag={self.tag_hex}, epochs={len(self._epochs)})"

    @classmethod
    def from_root(cls, root: bytes) -> VolumeKeys:
        return cls(EpochKeys.derive(root), derive_key(root, PURPOSE_TAG))

    @property
    def blocks(self) -> bytes:
        return self.current.blocks

    @property
    def log(self) -> bytes:
        return self.current.log

    @property
    def block_ids(self) -> bytes:
        return self.current.block_ids

    @property
    def peers(self) -> bytes:
        return self.current.peers

    def epoch(self, eid: bytes) -> EpochKeys | None:
        """The keys of epoch `eid` if this node holds them."""
        return self._epochs.get(eid)

    def epochs(self) -> list[EpochKeys]:
        """Every epoch held, oldest first."""
        return sorted(self._epochs.values(), key=lambda e: e.rank)

    def add(self, epoch: EpochKeys) -> None:
        self._epochs[epoch.id] = epoch
        self.current = self.choose_current()

    def acceptable(self, epoch: EpochKeys) -> bool:
        """Whether requests under `epoch` are taken: its secret went to no
        node removed since (a shared key lets any holder speak for anyone)."""
        if epoch.members is None:
            return not self.removed
        return not (epoch.members & self.removed)

    def choose_current(self) -> EpochKeys:
        """The greatest acceptable epoch held (the greatest held if none is)."""
        held = self.epochs()
        ok = [e for e in held if self.acceptable(e)]
        return (ok or held)[-1]

    def me_removed(self) -> bool:
        """Whether a rotation taken here removed this node itself."""
        node = getattr(self.me, "node", None)
        return node is not None and node in self.removed

    @contextlib.contextmanager
    def under(self, epoch: EpochKeys) -> Iterator[None]:
        """Write under `epoch` for a while (a rotation is sealed under the
        epoch it follows)."""
        self.current = epoch
        try:
            yield
        finally:
            self.current = self.choose_current()

    @property
    def tag_hex(self) -> str:
        """The public volume tag (16 hex chars): data dir names and mDNS TXT."""
        return self.tag.hex()[:16]
