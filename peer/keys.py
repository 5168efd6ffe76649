"""Keys derived from the volume root, one per purpose.

Invariant: a key is a pure function of (root, purpose), so every node with the
secret derives the same keys, and keys for different purposes (or different
volumes) are unrelated: learning one (the public volume tag, say) reveals
nothing about the root or the others. BLAKE2b in keyed mode is the KDF, with a
versioned personalization so a future format can change every key at once.
"""

from __future__ import annotations

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


@dataclass(frozen=True, slots=True)
class VolumeKeys:
    """Every key of one volume. Kept out of repr so logs never show a key."""

    blocks: bytes = field(repr=False)
    log: bytes = field(repr=False)
    block_ids: bytes = field(repr=False)
    peers: bytes = field(repr=False)
    tag: bytes = field(repr=False)

    @classmethod
    def from_root(cls, root: bytes) -> VolumeKeys:
        return cls(
            blocks=derive_key(root, PURPOSE_BLOCKS),
            log=derive_key(root, PURPOSE_LOG),
            block_ids=derive_key(root, PURPOSE_BLOCK_IDS),
            peers=derive_key(root, PURPOSE_PEERS),
            tag=derive_key(root, PURPOSE_TAG),
        )

    @property
    def tag_hex(self) -> str:
        """The public volume tag (16 hex chars): data dir names and mDNS TXT."""
        return self.tag.hex()[:16]
