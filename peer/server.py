"""The peer HTTP server: serves this node's log and sealed blocks to peers.

Invariant: no handler runs for a request that does not authenticate (see
`peer.auth`): a party without the secret gets a bare 401 for every path,
learns nothing (not even which paths exist) and changes nothing. Every
response to an authenticated request carries a MAC bound to that request.
Serving is read-only: peers pull from us; nothing a peer sends is written to
the store by this server. Our own log entries are made durable (`Store.sync`)
before they are served, so an entry a peer holds can never be lost here and
its seq reused for another operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from peer import wire
from peer.auth import (
    HEADER_MAC,
    HEADER_SERVER_TIME,
    PROTOCOL,
    AuthFailed,
    ReplayGuard,
    StaleRequest,
    parse_request,
    sign_response,
    verify_request,
    wall_ms,
)

if TYPE_CHECKING:
    from peer.sync import Sync

log = logging.getLogger(__name__)

# The long poll's longest wait; clients time out a little after it.
MAX_WATCH_S = 30.0
CBOR = "application/cbor"

SYNC_KEY: web.AppKey[Sync] = web.AppKey("sync")
GUARD_KEY: web.AppKey[ReplayGuard] = web.AppKey("guard", ReplayGuard)
BODY_KEY: web.RequestKey[bytes] = web.RequestKey("body", bytes)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _refuse(request: web.Request, reason: str) -> web.Response:
    sync = request.app[SYNC_KEY]
    sync.note_refused(request.remote or "?", reason)
    return web.Response(status=401)


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    sync = request.app[SYNC_KEY]
    key = sync.keys.peers
    if request.content_length is not None and request.content_length > wire.MAX_REQUEST_BYTES:
        return _refuse(request, "body too large")
    try:
        auth = parse_request(request.headers)
        body = await request.read()
        verify_request(key, request.method, request.path_qs, auth, body)
        request.app[GUARD_KEY].check(auth, wall_ms())
    except StaleRequest as stale:
        # Authenticated but outside the window: tell the (genuine) peer our
        # time, authenticated, so it can correct for clock skew and retry.
        extra = str(stale.server_ms)
        resp = web.Response(status=401, headers={HEADER_SERVER_TIME: extra})
        resp.headers[HEADER_MAC] = sign_response(key, auth.nonce, 401, b"", extra)
        return resp
    except AuthFailed as exc:
        return _refuse(request, str(exc))
    except web.HTTPRequestEntityTooLarge:
        return _refuse(request, "body too large")

    peer = auth.node[:8]
    if auth.protocol != PROTOCOL:
        log.warning(
            "peer %s speaks protocol %d, this node %d: upgrade the older one",
            peer,
            auth.protocol,
            PROTOCOL,
        )
        message = f"protocol mismatch: this node speaks {PROTOCOL}, you {auth.protocol}"
        resp = web.Response(status=409, body=wire.encode_error(message), content_type=CBOR)
    elif bytes.fromhex(auth.node) == sync.identity.node_id:
        resp = web.Response(status=409, body=wire.encode_error("self"), content_type=CBOR)
    else:
        request[BODY_KEY] = body
        try:
            result = await handler(request)
            if not isinstance(result, web.Response):
                raise web.HTTPInternalServerError()
            resp = result
        except wire.BadMessage as exc:
            log.info("malformed request from peer %s: %s", peer, exc)
            resp = web.Response(status=400, body=wire.encode_error(str(exc)), content_type=CBOR)
        except web.HTTPException as exc:
            resp = web.Response(status=exc.status, body=wire.encode_error(exc.reason))
        except Exception:
            log.exception("error serving a peer: path=%s peer=%s", request.path, peer)
            resp = web.Response(status=500, body=wire.encode_error("internal error"))
    body_out = resp.body if isinstance(resp.body, bytes) else b""
    resp.headers[HEADER_MAC] = sign_response(key, auth.nonce, resp.status, body_out)
    return resp


def _cbor(body: bytes) -> web.Response:
    return web.Response(body=body, content_type=CBOR)


async def hello(request: web.Request) -> web.Response:
    """Who we are and what we hold. `?port=N` (authenticated with the rest of
    the request) is where the caller serves peers: we sync back with it, so a
    `--peer` given on one side only still syncs both ways."""
    sync = request.app[SYNC_KEY]
    port = request.query.get("port", "")
    if port.isdigit() and 0 < int(port) < 65536 and request.remote:
        sync.add_peer(request.remote, int(port), "inbound")
    return _cbor(wire.encode_hello(sync.hello()))


async def log_suffix(request: web.Request) -> web.Response:
    sync = request.app[SYNC_KEY]
    req = wire.decode_log_request(request[BODY_KEY])
    ours = dict(sync.journal.vv)

    def answer() -> bytes:
        # Reads only the store (a few MiB of it): a worker thread, not the loop.
        return wire.encode_log_response(sync.entries_for(req.vv, req.max_bytes, ours))

    return _cbor(await asyncio.to_thread(answer))


async def blocks(request: web.Request) -> web.Response:
    sync = request.app[SYNC_KEY]
    req = wire.decode_blocks_request(request[BODY_KEY])
    found = await asyncio.to_thread(sync.sealed_blocks, req.ids)
    return _cbor(wire.encode_blocks_response(wire.BlocksResponse(found)))


async def watch(request: web.Request) -> web.Response:
    """Long poll: answers when this node's log differs from `since`, or after `wait` s."""
    sync = request.app[SYNC_KEY]
    since = request.query.get("since", "")
    try:
        wait = min(max(float(request.query.get("wait", "20")), 0.0), MAX_WATCH_S)
    except ValueError:
        raise wire.BadMessage("bad wait") from None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            await sync.wait_log_differs(since)
    return _cbor(wire.encode_vv(sync.journal.vv, sync.gossip()))


def make_peer_app(sync: Sync) -> web.Application:
    app = web.Application(middlewares=[authenticate], client_max_size=wire.MAX_REQUEST_BYTES)
    app[SYNC_KEY] = sync
    app[GUARD_KEY] = ReplayGuard()
    app.router.add_get("/hello", hello)
    app.router.add_post("/log", log_suffix)
    app.router.add_post("/blocks", blocks)
    app.router.add_get("/watch", watch)
    return app
