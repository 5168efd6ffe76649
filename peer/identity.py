"""This node's identity: an Ed25519 key pair kept in the data dir.

Invariant: `node.key` holds exactly the 32-byte seed of the signing key, is
readable by its owner only (0600 from the moment it exists), and once written
is never replaced: it is created under a temporary name, fsync'd, then linked
into place, which fails rather than overwrites if another start won the race.
The node id (the verify key) therefore never changes for a data dir.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import nacl.signing

from peer.errors import CorruptStore

KEY_FILE = "node.key"
SEED_BYTES = 32


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """The key pair a node signs its log entries with."""

    signing_key: nacl.signing.SigningKey = field(repr=False)

    @property
    def node_id(self) -> bytes:
        """The 32-byte Ed25519 verify key: the node's id on the volume."""
        return bytes(self.signing_key.verify_key)

    @property
    def short(self) -> str:
        """The first 8 hex chars of the node id, for display and logs."""
        return self.node_id.hex()[:8]

    def sign(self, data: bytes) -> bytes:
        """The detached 64-byte signature of `data`."""
        return self.signing_key.sign(data).signature

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(nacl.signing.SigningKey.generate())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load(path: Path) -> NodeIdentity:
    seed = path.read_bytes()
    if len(seed) != SEED_BYTES:
        raise CorruptStore(
            path=path,
            detail=f"the node key is {len(seed)} bytes, not {SEED_BYTES}",
        )
    return NodeIdentity(nacl.signing.SigningKey(seed))


def _create(path: Path, identity: NodeIdentity) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, bytes(identity.signing_key))
            os.fsync(fd)
        finally:
            os.close(fd)
        # link(), unlike rename(), refuses to replace an existing node.key.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def load_or_create(data_dir: Path, new: NodeIdentity | None = None) -> NodeIdentity:
    """This node's identity, made on first start in `data_dir` (as `new`, if
    given: pairing names the node before its data dir exists)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / KEY_FILE
    if not path.exists():
        _create(path, new or NodeIdentity.generate())
    return _load(path)
