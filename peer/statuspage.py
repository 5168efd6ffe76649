"""The node's status page and metrics, on 127.0.0.1 only, behind a token.

Invariant: the listener is bound to the loopback address, and every request
must carry the token kept in the data dir (`page.token`, mode 0600), as
`?token=`, as a bearer token, or as the cookie the page sets after a first
visit with `?token=`; anything else gets 403. A Host header other than
127.0.0.1 or localhost is refused too, so a web page elsewhere cannot reach
the listener through DNS rebinding. Read-only: nothing here changes the node.

Routes: `/` the page (with `/page.js`; it polls `/api/status` every two seconds), `/api/status`
(what `status --json` prints), `/api/history?path=P` (a file's versions) and
`/metrics` (Prometheus text format, see `peer.metrics`).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from peer.errors import DfsError, ListenFailed, PagePortInUse
from peer.storage import history

if TYPE_CHECKING:
    from peer.node import Node

log = logging.getLogger(__name__)

TOKEN_NAME = "page.token"
COOKIE = "dfs_peer_page"
HOST = "127.0.0.1"

NODE_KEY: web.AppKey[Node] = web.AppKey("node")
TOKEN_KEY: web.AppKey[str] = web.AppKey("token", str)


def load_or_create_token(data_dir: Path) -> str:
    """The page token of `data_dir`, made (0600) the first time."""
    path = data_dir / TOKEN_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    token = secrets.token_urlsafe(24)
    try:
        os.write(fd, token.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return token


def read_token(data_dir: Path) -> str | None:
    try:
        return (data_dir / TOKEN_NAME).read_text().strip() or None
    except OSError:
        return None


def bind_local(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:`port` (0: any free port), or the
    one-line error a user sees if it cannot be had."""
    address = f"{HOST}:{port}"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == 98:  # EADDRINUSE
            raise PagePortInUse(address=address) from None
        raise ListenFailed(address=address, detail=exc.strerror or str(exc)) from None
    return sock


def _allowed(request: web.Request) -> bool:
    host = request.host.rsplit(":", 1)[0] if request.host else ""
    if host not in (HOST, "localhost"):
        return False
    token = request.app[TOKEN_KEY]
    given = request.query.get("token") or request.cookies.get(COOKIE, "")
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        given = auth[len("Bearer ") :].strip()
    return hmac.compare_digest(given.encode(), token.encode())


@web.middleware
async def _guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if not _allowed(request):
        return web.Response(
            status=403,
            text="403: this page needs its token: run `dfs-peer open` on this machine\n",
        )
    response = await handler(request)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


async def _page(request: web.Request) -> web.StreamResponse:
    if "token" in request.query:
        # Keep the token out of the address bar and history: a cookie from now on.
        response = web.HTTPFound("/")
        response.set_cookie(
            COOKIE, request.app[TOKEN_KEY], httponly=True, samesite="Strict", path="/"
        )
        raise response
    html = (resources.files("peer") / "statuspage.html").read_text()
    return web.Response(
        text=html,
        content_type="text/html",
        headers={"Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'"},
    )


async def _script(request: web.Request) -> web.Response:
    js = (resources.files("peer") / "statuspage.js").read_text()
    return web.Response(text=js, content_type="text/javascript")


async def _status(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    return web.json_response(asdict(await node.statistics_async()))


async def _history(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    try:
        path = history.volume_path(request.query.get("path", ""), "/", str(node.config.mountpoint))
        versions = history.history(node.replica, path, node.store.has_blocks)
    except DfsError as exc:
        return web.json_response({"error": exc.message()}, status=404)
    return web.json_response(
        {"path": history.show_path(path), "versions": [v.to_json() for v in versions]}
    )


async def _metrics(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    return web.Response(
        body=node.metrics.exposition(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


def make_page_app(node: Node, token: str) -> web.Application:
    app = web.Application(middlewares=[_guard])
    app[NODE_KEY] = node
    app[TOKEN_KEY] = token
    app.router.add_get("/", _page)
    app.router.add_get("/page.js", _script)
    app.router.add_get("/api/status", _status)
    app.router.add_get("/api/history", _history)
    app.router.add_get("/metrics", _metrics)
    return app


@contextlib.asynccontextmanager
async def page_server(node: Node, sock: socket.socket) -> AsyncIterator[str]:
    """Serve the page on `sock` (bound by `bind_local`); yields its address."""
    token = load_or_create_token(node.config.data_dir)
    runner = web.AppRunner(
        make_page_app(node, token), access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        port = sock.getsockname()[1]
        url = f"http://{HOST}:{port}/"
        node.page_url = url
        log.info("status page: url=%s (dfs-peer open adds its token)", url)
        yield url
    finally:
        node.page_url = ""
        await runner.cleanup()
