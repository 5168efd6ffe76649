"""The names the tree shows beside an entry's own: the `~hex` suffix that
tells apart live entries sharing a name (rule 2), and conflict copy names and
ids (rule 3)."""

from __future__ import annotations

import hashlib
import time

from crdt.clock import Hlc
from crdt.ops import ENTRY_ID_BYTES, NAME_MAX


def conflict_copy_id(file: bytes, version: Hlc) -> bytes:
    """The deterministic id of the conflict copy of `file` showing `version`."""
    h = hashlib.blake2b(digest_size=ENTRY_ID_BYTES, person=b"dfs-peer:copy")
    h.update(file)
    h.update(version.wall_ms.to_bytes(8, "big") + version.counter.to_bytes(4, "big"))
    h.update(version.node)
    return h.digest()


def _split_ext(name: bytes) -> tuple[bytes, bytes]:
    dot = name.rfind(b".")
    if dot <= 0:
        return name, b""
    return name[:dot], name[dot:]


def _fit(stem: bytes, marker: bytes, ext: bytes) -> bytes:
    """`stem + marker + ext` in at most NAME_MAX bytes: the stem gives way
    first, then the extension (long when a name's last dot comes early), never
    the marker that makes the name unique."""
    ext = ext[: max(0, NAME_MAX - 1 - len(marker))]
    return stem[: max(1, NAME_MAX - len(marker) - len(ext))] + marker + ext


def conflict_name(name: bytes, node_name: str, version: Hlc) -> bytes:
    """`<stem>.conflict-<node name>-<UTC yyyymmdd-HHMMSS><ext>`."""
    stem, ext = _split_ext(name)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in node_name)[:32] or "node"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(version.wall_ms // 1000))
    return _fit(stem, f".conflict-{safe}-{stamp}".encode(), ext)


def _suffixed(name: bytes, entry: bytes, length: int) -> bytes:
    stem, ext = _split_ext(name)
    return _fit(stem, b"~" + entry[:length].hex().encode(), ext)
