"""A member that lies: a peer server that answers what a test scripts.

It holds the volume's secret and a node identity of its own, authenticates
requests and signs responses with the project's own code (`peer.net.auth`,
`peer.net.wire`), and signs whatever log entries and checkpoints a test makes it
(`peer.sealing`, `peer.storage.checkpoint`): the protocol a real node speaks, with
content no honest node would send. It answers each asking node with the log
the test gave for that node (`logs_for`), which is how it equivocates.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from crdt.ops import Op, encode_op
from peer.identity import NodeIdentity
from peer.keys import VolumeKeys
from peer.net import wire
from peer.net.auth import (
    HEADER_MAC,
    PROTOCOL,
    AuthFailed,
    parse_request,
    sign_response,
    verify_request,
)
from peer.sealing import GENESIS, Head, LogEntry, entry_hash, head_of, seal_entry


def chain_of(
    identity: NodeIdentity,
    keys: VolumeKeys,
    ops: Sequence[Op],
    first: int = 1,
    prev: bytes = GENESIS,
) -> list[LogEntry]:
    """`ops` as `identity`'s log entries from seq `first` on, signed and chained."""
    out: list[LogEntry] = []
    for seq, op in enumerate(ops, start=first):
        out.append(seal_entry(keys, identity, seq, encode_op(op), prev))
        prev = entry_hash(out[-1])
    return out


@dataclass(eq=False)
class HostilePeer:
    keys: VolumeKeys
    identity: NodeIdentity
    name: str = "mallory"
    # The log every asking node is sent, unless `logs_for` has one for it.
    log: list[LogEntry] = field(default_factory=list)
    logs_for: dict[bytes, list[LogEntry]] = field(default_factory=dict)
    checkpoint: bytes | None = None
    blocks: dict[bytes, bytes] = field(default_factory=dict)
    port: int = 0
    asked: set[bytes] = field(default_factory=set)

    def _log(self, asker: bytes) -> list[LogEntry]:
        return self.logs_for.get(asker, self.log)

    def _vv(self, asker: bytes) -> dict[bytes, int]:
        vv: dict[bytes, int] = {}
        for e in self._log(asker):
            vv[e.node] = max(vv.get(e.node, 0), e.seq)
        return vv

    def _heads(self, asker: bytes) -> list[Head]:
        top: dict[bytes, LogEntry] = {}
        for e in self._log(asker):
            if e.node not in top or e.seq > top[e.node].seq:
                top[e.node] = e
        return [head_of(e) for e in top.values()]

    async def _handle(self, request: web.Request) -> web.Response:
        key = self.keys.peers
        try:
            auth = parse_request(request.headers)
            body = await request.read()
            verify_request(key, request.method, request.path_qs, auth, body)
        except AuthFailed:
            return web.Response(status=401)
        asker = bytes.fromhex(auth.node)
        self.asked.add(asker)
        if request.path == "/hello":
            out = wire.encode_hello(
                wire.Hello(
                    PROTOCOL,
                    self.identity.node_id,
                    self.name,
                    self._vv(asker),
                    heads=self._heads(asker),
                )
            )
        elif request.path == "/log":
            theirs = wire.decode_log_request(body).vv
            entries = [e for e in self._log(asker) if e.seq > theirs.get(e.node, 0)]
            out = wire.encode_log_response(wire.LogResponse(entries, False, self.checkpoint))
        elif request.path == "/blocks":
            ids = wire.decode_blocks_request(body).ids
            found = [(bid, self.blocks[bid]) for bid in ids if bid in self.blocks]
            out = wire.encode_blocks_response(wire.BlocksResponse(found))
        elif request.path == "/watch":
            await asyncio.sleep(0.3)  # a long poll that has nothing new, briefly
            out = wire.encode_vv(self._vv(asker), heads=self._heads(asker))
        else:
            return web.Response(status=404)
        resp = web.Response(body=out, content_type="application/cbor")
        resp.headers[HEADER_MAC] = sign_response(key, auth.nonce, 200, out)
        return resp

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[HostilePeer]:
        app = web.Application(client_max_size=wire.MAX_REQUEST_BYTES)
        app.router.add_route("*", "/{path:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(runner.addresses[0][1])
        try:
            yield self
        finally:
            await runner.cleanup()
