"""What this node serves its peers: hello, log entries past their vector,
sealed blocks, and the long poll's answer (the routes are in `peer.net.server`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from peer.identity import NodeIdentity
from peer.keys import VolumeKeys
from peer.metrics import Metrics
from peer.net import wire
from peer.net.auth import PROTOCOL
from peer.net.gate import Summary
from peer.sealing import LogEntry
from peer.storage.checkpoint import covered
from peer.storage.journal import Journal
from peer.storage.store import Store


class Pairing(Protocol):
    """The endpoint of pairing by a one-time code (`peer.net.invitations`)."""

    def active(self) -> bool:
        """Whether an invitation is open (or closed lately, to say so)."""
        ...

    async def handle(self, request: web.Request) -> web.Response: ...


# How many callers' gossip versions are kept (a member can name any node id).
MAX_CALLERS_REMEMBERED = 1024


class Serving:
    """`Sync`'s serving side; see `peer.net.sync`."""

    if TYPE_CHECKING:
        _closing: bool
        _gossip_version: int
        _gossip_answered: dict[str, int]
        _grew: asyncio.Event
        identity: NodeIdentity
        journal: Journal
        name: str
        refused: int
        store: Store
        strangers: Summary
        keys: VolumeKeys
        metrics: Metrics
        pairing: Pairing | None

        def add_inbound(self, host: str, port: int, node: bytes) -> None: ...
        def gossip(self) -> wire.Gossip: ...

    # -- serving -------------------------------------------------------------------
    def hello(self) -> wire.Hello:
        return wire.Hello(
            PROTOCOL,
            self.identity.node_id,
            self.name,
            dict(self.journal.vv),
            self.gossip(),
            list(self.journal.heads().values()),
            self.journal.proofs(),
        )

    def watch_answer(self) -> bytes:
        """What a long poll answers: our vector, gossip, heads and fork proofs."""
        journal = self.journal
        return wire.encode_vv(
            journal.vv, self.gossip(), list(journal.heads().values()), journal.proofs()
        )

    def entries_for(
        self, theirs: dict[bytes, int], max_bytes: int, ours: dict[bytes, int] | None = None
    ) -> wire.LogResponse:
        """Entries we hold past `theirs`, node by node, up to about `max_bytes`;
        first our checkpoint if `theirs` does not cover it, and then only the
        entries after it (what it folds is no longer in our log). With `ours`
        (a copy of our vector) it reads only the store: safe in a worker thread."""
        while True:
            covers = self.store.covers()
            resp = self._entries_for(theirs, max_bytes, ours, covers)
            if self.store.covers() == covers:
                return resp  # no fold dropped entries while we read them

    def _entries_for(
        self,
        theirs: dict[bytes, int],
        max_bytes: int,
        ours: dict[bytes, int] | None,
        covers: dict[bytes, int],
    ) -> wire.LogResponse:
        out: list[LogEntry] = []
        size = 0
        more = False
        own = self.identity.node_id
        checkpoint = None
        if not covered(theirs, covers):
            checkpoint = self.store.get_checkpoint()
            size = len(checkpoint) if checkpoint is not None else 0
        for node, seq in sorted((self.journal.vv if ours is None else ours).items()):
            after = max(theirs.get(node, 0), covers.get(node, 0))
            while after < seq:
                if size >= max_bytes:
                    more = True
                    break
                chunk = self.store.log_after(node, after, 512)
                if not chunk:
                    break
                for entry in chunk:
                    out.append(entry)
                    size += len(entry.sealed) + 120
                    after = entry.seq
                    if size >= max_bytes:
                        break
            if more:
                break
        if any(e.node == own for e in out):
            self.store.sync()  # never serve an own entry a crash could take back
        return wire.LogResponse(out, more or size >= max_bytes, checkpoint)

    def sealed_blocks(self, ids: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
        out = []
        for bid in ids:
            sealed = self.store.get_block(bid)
            if sealed is not None:
                out.append((bid, sealed))
        return out

    def _log_grew(self) -> None:
        self._grew.set()
        self._grew = asyncio.Event()

    @property
    def closing(self) -> bool:
        """True once the node stops serving (long polls are woken to end)."""
        return self._closing

    def gossip_answered(self, caller: str) -> None:
        """`caller` (a node id, hex) now holds our gossip as it stands."""
        answered = self._gossip_answered
        answered.pop(caller, None)
        while len(answered) >= MAX_CALLERS_REMEMBERED:  # ids are the caller's word
            del answered[next(iter(answered))]  # the longest silent: one early answer
        answered[caller] = self._gossip_version

    async def wait_log_differs(self, since: str, caller: str | None = None) -> None:
        """Until our log differs from `since`, or we hold gossip (some member's
        vector grew: news for the peer's causal stability) that `caller` was
        not answered with. Gossip learnt between two of its long polls counts:
        the next poll answers at once instead of after its whole wait."""
        gossip = self._gossip_version
        if caller is not None:
            gossip = self._gossip_answered.get(caller, gossip)
        while (
            wire.vv_digest(self.journal.vv) == since
            and self._gossip_version == gossip
            and not self._closing
        ):
            await self._grew.wait()

    def note_refused(self, remote: str, reason: str) -> None:
        self.refused += 1
        self.strangers.note(
            "refused",
            "refused a peer request: from=%s reason=%s (it does not share this "
            "volume's secret, or is not a dfs-peer node)",
            remote,
            reason,
        )
