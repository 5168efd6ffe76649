"""A peer's address as this node calls it: signed requests, verified answers,
a clock offset learnt from a stale reply."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import aiohttp

from peer import epochs
from peer.net import wire
from peer.net.auth import (
    HEADER_EPOCH_REFUSED,
    HEADER_MAC,
    HEADER_SERVER_TIME,
    sign_request,
    verify_response,
    wall_ms,
)

if TYPE_CHECKING:
    from peer.net.sync import Sync

# Logs under the name its messages had before it left sync.py.
log = logging.getLogger("peer.sync")


REQUEST_TIMEOUT_S = 30.0
# A /log answer larger than this is decoded in a worker thread.
DECODE_ON_LOOP_BYTES = 1 << 20

CONNECT_TIMEOUT_S = 3.0


class PeerError(Exception):
    """A peer answered, but not with what the protocol promises."""


class EpochRefused(PeerError):
    """The peer no longer takes requests under this node's key epoch, and
    `/epochs` brought no later one this node holds: it was removed."""


class ProtocolMismatch(PeerError):
    """The peer speaks another protocol version."""


class SelfConnection(PeerError):
    """The address is this node's own."""


class PeerClient:
    """Authenticated requests to one peer address."""

    def __init__(self, session: aiohttp.ClientSession, host: str, port: int, sync: Sync) -> None:
        self.session = session
        self.sync = sync
        shown = f"[{host}]" if ":" in host else host
        self.base = f"http://{shown}:{port}"
        self.offset_ms = 0  # the peer's clock minus ours, learnt from a stale reply

    async def call(
        self, method: str, path: str, body: bytes = b"", limit_s: float = REQUEST_TIMEOUT_S
    ) -> bytes:
        keys = self.sync.keys
        node = self.sync.identity.node_id.hex()
        for _ in range(3):
            epoch = keys.current
            auth = sign_request(
                epoch.peers,
                method,
                path,
                node,
                body,
                time_ms=wall_ms() + self.offset_ms,
                epoch=b"" if epoch is keys.base else epoch.id,
            )
            client_timeout = aiohttp.ClientTimeout(total=limit_s, sock_connect=CONNECT_TIMEOUT_S)
            self.sync.metrics.wire_bytes.labels("sent").inc(len(body))
            async with self.session.request(
                method, self.base + path, data=body, headers=auth.headers(), timeout=client_timeout
            ) as resp:
                if (resp.content_length or 0) > wire.MAX_RESPONSE_BYTES:
                    raise PeerError(f"response too large ({resp.content_length} bytes)")
                parts = []
                size = 0
                async for part in resp.content.iter_chunked(1 << 20):
                    size += len(part)
                    if size > wire.MAX_RESPONSE_BYTES:
                        raise PeerError("response too large")
                    parts.append(part)
                data = b"".join(parts)
                refused = resp.headers.get(HEADER_EPOCH_REFUSED, "")
                extra = refused or resp.headers.get(HEADER_SERVER_TIME, "")
                verify_response(
                    epoch.peers, auth.nonce, resp.status, data, resp.headers.get(HEADER_MAC), extra
                )
                if resp.status == 401 and refused:
                    if path != "/epochs" and await self.catch_up():
                        continue
                    if refused == "removed" or keys.me_removed():
                        raise EpochRefused("this node was removed from the volume")
                    raise EpochRefused(
                        f"the peer refuses key epoch {epoch.number} and knows no later one "
                        "sealed to this node"
                    )
                if resp.status == 401 and extra:
                    self.offset_ms = int(extra) - wall_ms()
                    log.info(
                        "peer clock differs: address=%s offset_ms=%d", self.base, self.offset_ms
                    )
                    continue
                if resp.status == 409:
                    message = wire.decode_error(data)
                    if message == "self":
                        raise SelfConnection(self.base)
                    raise ProtocolMismatch(message)
                if resp.status != 200:
                    raise PeerError(f"HTTP {resp.status}: {wire.decode_error(data)}")
                self.sync.bytes_in += len(data)
                self.sync.metrics.wire_bytes.labels("received").inc(len(data))
                return data
        raise PeerError("clock skew could not be corrected")

    async def catch_up(self) -> bool:
        """Ask the peer for the key rotations it took and take those that
        hold (`peer.epochs`); True if this node's current epoch changed."""
        keys = self.sync.keys
        before = keys.current.id
        resp = wire.decode_log_response(await self.call("GET", "/epochs"))
        taken = await asyncio.to_thread(epochs.take_entries, keys, resp.entries)
        log.info(
            "caught up on key epochs from %s: %d rotation(s) new; current epoch %d",
            self.base,
            taken,
            keys.current.number,
        )
        return keys.current.id != before

    async def hello(self) -> wire.Hello:
        port = self.sync.port
        path = f"/hello?port={port}" if port else "/hello"
        return wire.decode_hello(await self.call("GET", path))

    async def log(self, vv: dict[bytes, int]) -> wire.LogResponse:
        body = wire.encode_log_request(wire.LogRequest(vv, wire.LOG_BATCH_BYTES))
        answer = await self.call("POST", "/log", body)
        if len(answer) > DECODE_ON_LOOP_BYTES:
            # A checkpoint (the whole volume) or a full batch: decoding it took
            # ~50 ms of the loop at 100,000 files, while FUSE requests waited.
            return await asyncio.to_thread(wire.decode_log_response, answer)
        return wire.decode_log_response(answer)

    async def blocks(self, ids: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
        body = wire.encode_blocks_request(wire.BlocksRequest(list(ids)))
        return wire.decode_blocks_response(await self.call("POST", "/blocks", body)).blocks

    async def watch(self, since: str, wait: float) -> wire.Watch:
        path = f"/watch?since={since}&wait={wait:g}"
        return wire.decode_watch(await self.call("GET", path, limit_s=wait + 10))
