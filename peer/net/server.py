"""The peer HTTP server: serves this node's log and sealed blocks to peers.

Invariant: no handler runs for a request that does not authenticate (see
`peer.net.auth`): a party without the secret gets a bare 401 for every path,
learns nothing (not even which paths exist) and changes nothing; the one
exception is `/pair/*` while `dfs-peer invite` has an invitation open, which
proves a one-time code instead (`peer.net.invitations`). A request is MAC'd
under the key epoch it names (`peer.epochs`); one under an epoch a removed
node holds gets an authenticated 401 saying so, on every path but
`/epochs`, which hands out the rotations so a member that was away can
catch up (a removed node learns from it only who the members are). Every
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
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import hdrs, web

from peer import epochs
from peer.net import gate, wire
from peer.net.auth import (
    HEADER_EPOCH_REFUSED,
    HEADER_MAC,
    HEADER_SERVER_TIME,
    PROTOCOL,
    AuthFailed,
    ReplayGuard,
    RequestAuth,
    StaleRequest,
    parse_request,
    sign_response,
    verify_body,
    verify_request_head,
    wall_ms,
)
from peer.net.pairing import PATHS as PAIRING_PATHS
from peer.net.serving import Pairing, Serving

log = logging.getLogger("peer.server")

# The long poll's longest wait; clients time out a little after it.
MAX_WATCH_S = 30.0
CBOR = "application/cbor"

SYNC_KEY: web.AppKey[Serving] = web.AppKey("sync")
GUARD_KEY: web.AppKey[ReplayGuard] = web.AppKey("guard", ReplayGuard)
GATE_KEY: web.AppKey[gate.Gate] = web.AppKey("gate", gate.Gate)
BODY_KEY: web.RequestKey[bytes] = web.RequestKey("body", bytes)
PEER_KEY: web.RequestKey[str] = web.RequestKey("peer", str)  # its short id, for metrics
AUTH_KEY: web.RequestKey[RequestAuth] = web.RequestKey("auth", RequestAuth)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


PAIRING_KEY: web.AppKey[Pairing] = web.AppKey("pairing")


def _refuse(request: web.Request, reason: str) -> web.Response:
    sync = request.app[SYNC_KEY]
    sync.note_refused(request.remote or "?", reason)
    resp = web.Response(status=401)
    resp.force_close()  # whatever body follows is never read
    return resp


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Check, in this order and before reading any body byte: a declared
    length within bounds, then the MAC over the head and the declared body
    hash, then the replay window; only then read the body (within
    `gate.BODY_S`) and check it against the hash."""
    pairing = request.app.get(PAIRING_KEY)
    if pairing is not None and request.path in PAIRING_PATHS and pairing.active():
        # The one exchange open to a machine without the secret, and only while
        # an invitation is open: it proves a one-time code instead (peer/net/invitations.py).
        return await pairing.handle(request)
    sync = request.app[SYNC_KEY]
    keys = sync.keys
    length = request.content_length
    if hdrs.TRANSFER_ENCODING in request.headers or (request.body_exists and length is None):
        return _refuse(request, "body without a declared length")
    if length is not None and length > wire.MAX_REQUEST_BYTES:
        return _refuse(request, "body too large")
    try:
        auth = parse_request(request.headers)
        epoch = keys.epoch(auth.epoch or keys.base.id)
        if epoch is None:
            raise AuthFailed(
                "a key epoch this node does not hold (if it was away during a "
                "`dfs-peer remove`, it catches up by itself)"
            )
        key = epoch.peers
        verify_request_head(key, request.method, request.path_qs, auth)
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
    if (the_gate := request.app.get(GATE_KEY)) is not None:
        the_gate.prove(request.protocol)
    try:
        async with asyncio.timeout(gate.BODY_S):
            body = await request.read()
        verify_body(auth, body)
    except TimeoutError:
        log.info("peer %s sent its body too slowly: closing", auth.node[:8])
        return _refuse(request, "body too slow")
    except AuthFailed as exc:
        return _refuse(request, str(exc))
    except web.HTTPRequestEntityTooLarge:
        return _refuse(request, "body too large")

    peer = auth.node[:8]
    if not keys.acceptable(epoch) and request.path != "/epochs":
        # A removed node holds this epoch's key, so anyone could have made
        # this MAC: nothing but the catch-up path answers it.
        log.info(
            "refused peer %s: its request is under key epoch %d, which a removed node holds",
            peer,
            epoch.number,
        )
        extra = "removed" if bytes.fromhex(auth.node) in keys.removed else "stale"
        resp = web.Response(status=401, headers={HEADER_EPOCH_REFUSED: extra})
        resp.headers[HEADER_MAC] = sign_response(key, auth.nonce, 401, b"", extra)
        return resp
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
        request[PEER_KEY] = peer
        sync.metrics.wire_bytes.labels("received").inc(len(body))
        request[AUTH_KEY] = auth
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
    sync.metrics.wire_bytes.labels("sent").inc(len(body_out))
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
        sync.add_inbound(request.remote, int(port), bytes.fromhex(request[AUTH_KEY].node))
    sync.gossip_answered(request[AUTH_KEY].node)
    return _cbor(wire.encode_hello(sync.hello()))


async def log_suffix(request: web.Request) -> web.Response:
    sync = request.app[SYNC_KEY]
    req = wire.decode_log_request(request[BODY_KEY])
    ours = dict(sync.journal.vv)

    def answer() -> tuple[bytes, int]:
        # Reads only the store (a few MiB of it): a worker thread, not the loop.
        found = sync.entries_for(req.vv, req.max_bytes, ours)
        return wire.encode_log_response(found), len(found.entries)

    body, sent = await asyncio.to_thread(answer)
    sync.metrics.ops_sent.labels(request[PEER_KEY]).inc(sent)
    return _cbor(body)


async def blocks(request: web.Request) -> web.Response:
    sync = request.app[SYNC_KEY]
    req = wire.decode_blocks_request(request[BODY_KEY])
    found = await asyncio.to_thread(sync.sealed_blocks, req.ids)
    sync.metrics.blocks_sent.labels(request[PEER_KEY]).inc(len(found))
    return _cbor(wire.encode_blocks_response(wire.BlocksResponse(found)))


async def epoch_rotations(request: web.Request) -> web.Response:
    """Every key rotation this node took, as the log entries that carry them
    (sealed under the epochs they follow, signed): the catch-up path."""
    sync = request.app[SYNC_KEY]
    entries = epochs.rotation_entries(sync.keys)
    return _cbor(wire.encode_log_response(wire.LogResponse(entries, False)))


async def watch(request: web.Request) -> web.Response:
    """Long poll: answers when this node's log differs from `since`, or after `wait` s."""
    sync = request.app[SYNC_KEY]
    since = request.query.get("since", "")
    try:
        wait = float(request.query.get("wait", "20"))
    except ValueError:
        raise wire.BadMessage("bad wait") from None
    if not math.isfinite(wait) or wait < 0:
        raise wire.BadMessage("bad wait")
    wait = min(wait, MAX_WATCH_S)
    caller = request[AUTH_KEY].node
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            await sync.wait_log_differs(since, caller)
    if sync.closing:  # woken to let the server stop: the store may be closing too
        raise web.HTTPServiceUnavailable()
    sync.gossip_answered(caller)
    return _cbor(sync.watch_answer())


def make_peer_app(sync: Serving) -> web.Application:
    app = web.Application(middlewares=[authenticate], client_max_size=wire.MAX_REQUEST_BYTES)
    app[SYNC_KEY] = sync
    app[GUARD_KEY] = ReplayGuard()
    if sync.pairing is not None:
        app[PAIRING_KEY] = sync.pairing
    app.router.add_get("/hello", hello)
    app.router.add_post("/log", log_suffix)
    app.router.add_post("/blocks", blocks)
    app.router.add_get("/watch", watch)
    app.router.add_get("/epochs", epoch_rotations)
    return app


@contextlib.asynccontextmanager
async def serving(
    sync: Serving, host: str, port: int, sock: socket.socket | None = None
) -> AsyncIterator[int]:
    """Serve peers on host:port (or on `sock`, bound there already) behind the
    gate; yields the bound port.

    Raises OSError (e.g. EADDRINUSE) before anything starts if the port
    cannot be bound."""
    app = make_peer_app(sync)
    the_gate = gate.Gate(sync.strangers, max_connections=gate.connection_cap())
    app[GATE_KEY] = the_gate
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=2.0,
        keepalive_timeout=gate.IDLE_S,
        lingering_time=1.0,
        logger=gate.ServerLog(sync.strangers),
    )
    await runner.setup()
    loop = asyncio.get_running_loop()
    restore = gate.quiet_accept_errors(loop, sync.strangers)
    try:
        the_gate.make_inner = runner.server
        if sock is not None:
            server = await loop.create_server(the_gate.protocol, sock=sock, backlog=128)
        else:
            server = await loop.create_server(
                the_gate.protocol, host, port, reuse_address=True, backlog=128
            )
        try:
            sock = server.sockets[0]
            bound = sock.getsockname()[1] if sock.family != socket.AF_UNIX else port
            yield int(bound)
        finally:
            server.close()
    finally:
        await runner.cleanup()
        restore()
