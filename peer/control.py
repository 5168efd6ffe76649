"""The local control API: what `dfs-peer status`, `history`, `restore`, `gc`,
`forget` and `invite` ask the running node, over a unix socket in its data dir."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from crdt.merge import Replica
from fuse.errors import NoSpace
from peer import removal, running
from peer.errors import DfsError, StoreFull
from peer.net import invitations
from peer.net.auth import PROTOCOL
from peer.storage import history

if TYPE_CHECKING:
    from peer.node import Node

# Logs under the name its messages had before it left node.py.
log = logging.getLogger("peer.node")

CONTROL_NAME = "control.sock"

NODE_KEY: web.AppKey[Node] = web.AppKey("node")


async def _status(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    return web.json_response(asdict(await node.statistics_async()))


def _refused(exc: DfsError, status: int = 400) -> web.Response:
    return web.json_response({"error": exc.message()}, status=status)


def _asked_path(node: Node, body: Mapping[str, Any]) -> bytes:
    """The volume path a client named (see `history.volume_path`)."""
    return history.volume_path(
        str(body.get("path", "")), str(body.get("cwd", "/")), str(node.config.mountpoint)
    )


async def _past(node: Node, at_ms: int) -> Replica:
    # A full replay of the log: in a thread, so the mount keeps answering.
    return await asyncio.to_thread(history.replica_at, node.store, node.keys, node.identity, at_ms)


async def _history(request: web.Request) -> web.Response:
    """GET /history?path=P&cwd=D[&at_ms=T]: the versions of a file."""
    node = request.app[NODE_KEY]
    query = request.query
    try:
        path = _asked_path(node, query)
        at_ms = int(query["at_ms"]) if "at_ms" in query else None
        past = await _past(node, at_ms) if at_ms is not None else None
        versions = history.history(
            node.replica, path, node.store.has_blocks, past, at_ms, node.collector.kept_versions
        )
    except DfsError as exc:
        return _refused(exc, 404)
    except ValueError:
        return web.json_response({"error": "at_ms must be an integer"}, status=400)
    return web.json_response(
        {"path": history.show_path(path), "versions": [v.to_json() for v in versions]}
    )


async def _restore(request: web.Request) -> web.Response:
    """POST /restore {path, cwd, at_ms}: bring back the content a file had then."""
    node = request.app[NODE_KEY]
    try:
        body = await request.json()
        at_ms = int(body["at_ms"])
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "expected JSON {path, cwd, at_ms}"}, status=400)
    try:
        if node.config.read_only:
            raise history.NodeReadOnly(data_dir=node.config.data_dir)
        path = _asked_path(node, body)
        past = await _past(node, at_ms)
        node.volume.flush_all()  # the restore must see what was written here
        plan = history.plan_restore(node.replica, past, path, at_ms, node.store.has_blocks)
        changes = node.journal.commit(plan.make)
    except DfsError as exc:
        return _refused(exc, 409)
    log.info(
        "restored path=%s version=%s created=%s",
        history.show_path(path),
        plan.version.short() if plan.version else "-",
        plan.created,
    )
    # The kernel caches of this node's own mount must drop the old content too.
    await node._remote_changed(changes)
    return web.json_response(plan.to_json())


async def _gc(request: web.Request) -> web.Response:
    """POST /gc: collect now; what was freed and what holds collection back."""
    node = request.app[NODE_KEY]
    node.volume.flush_all()  # buffered writes pin old versions; publish them first
    try:
        result = await node.collector.collect_async(force=True)
    except (NoSpace, sqlite3.OperationalError) as exc:
        return _refused(StoreFull(detail=str(exc)), 507)
    node.space.room_again()
    return web.json_response(
        {
            **asdict(result),
            "held_back_by": [asdict(m) for m in node.stability.held_back_by()],
            "keep_history_s": node.config.keep_history_s,
        }
    )


async def _on_member(
    request: web.Request, act: Callable[[Node, str], dict[str, Any]]
) -> web.Response:
    """POST {node}: `act` on the member a name or id prefix names."""
    node = request.app[NODE_KEY]
    try:
        body = await request.json()
        text = str(body["node"])
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "expected JSON {node}"}, status=400)
    try:
        done = act(node, text)
    except DfsError as exc:
        return _refused(exc, 409)
    return web.json_response(done)


async def _forget(request: web.Request) -> web.Response:
    """POST /forget {node}: a member is gone for good."""
    return await _on_member(request, lambda node, text: node.forget(text))


async def _remove(request: web.Request) -> web.Response:
    """POST /remove {node}: shut a member out for good (`peer.removal`)."""
    return await _on_member(request, removal.remove)


async def _invite(request: web.Request) -> web.StreamResponse:
    """POST /invite {ttl_s}: open an invitation and stream what happens to it
    (one JSON object a line) until it is used, expires or burns; the caller
    going away cancels it."""
    node = request.app[NODE_KEY]
    registry = node.invitations
    if registry is None:
        return _refused(invitations.NoInvitations(), 409)
    try:
        body = await request.json()
        ttl_s = float(body.get("ttl_s", invitations.DEFAULT_TTL_S))
    except (ValueError, TypeError, AttributeError):
        return web.json_response({"error": "expected JSON {ttl_s}"}, status=400)
    try:
        invitation = registry.open(ttl_s)
    except DfsError as exc:
        return _refused(exc, 409)
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    try:
        await resp.prepare(request)

        async def line(obj: Mapping[str, object]) -> None:
            await resp.write(json.dumps(obj).encode() + b"\n")

        def alive() -> bool:
            return request.transport is not None and not request.transport.is_closing()

        async with _invitation_advert(node, invitation.number) as advertised:
            await line(
                {
                    "event": "open",
                    "code": str(invitation.code),
                    "ttl_s": min(ttl_s, invitations.MAX_TTL_S),
                    "listen": node.sync.listen,
                    "mdns": advertised,
                }
            )
            async for event in registry.events(invitation, alive):
                await line(event.to_json())
    except (ConnectionError, OSError):
        log.info("the inviting command went away: invitation %d cancelled", invitation.number)
    finally:
        registry.close(invitation, invitations.CANCELLED)
    return resp


@contextlib.asynccontextmanager
async def _invitation_advert(node: Node, number: int) -> AsyncIterator[bool]:
    """Advertise invitation `number` by mDNS while the block runs (unless the
    node runs without mDNS); yields whether it is advertised."""
    if not node.config.mdns:
        yield False
        return
    from discovery.invites import advertise_invitation

    async with contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(
                advertise_invitation(
                    number, node.sync.port, PROTOCOL, _advertised(node.config.listen_host)
                )
            )
        except (OSError, TimeoutError) as exc:
            log.warning(
                "cannot advertise the invitation on the LAN (%s): the new machine must "
                "give this node's address with --peer",
                exc,
            )
            yield False
            return
        yield True


def make_control_app(node: Node) -> web.Application:
    """The local control API (a unix socket in the data dir, mode 0600)."""
    app = web.Application()
    app[NODE_KEY] = node
    app.router.add_get("/status", _status)
    app.router.add_get("/history", _history)
    app.router.add_post("/restore", _restore)
    app.router.add_post("/gc", _gc)
    app.router.add_post("/forget", _forget)
    app.router.add_post("/remove", _remove)
    app.router.add_post("/invite", _invite)
    return app


@contextlib.asynccontextmanager
async def control_server(node: Node) -> AsyncIterator[Path]:
    path = node.config.data_dir / CONTROL_NAME
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by a node that died; the data dir lock says it is ours
    runner = web.AppRunner(make_control_app(node), access_log=None)
    await runner.setup()
    site = web.UnixSite(runner, str(path))
    await site.start()
    os.chmod(path, 0o600)
    try:
        with running.registered(node.config.data_dir, node.config.mountpoint):
            yield path
    finally:
        await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def ask_node(
    data_dir: Path,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    body: dict[str, object] | None = None,
    timeout_s: float = 120,
) -> dict[str, Any]:
    """Call the control API of the node running on `data_dir`; a refusal
    becomes `NodeAnswered` with the node's message; OSError if none runs."""
    import aiohttp

    connector = aiohttp.UnixConnector(path=str(data_dir / CONTROL_NAME))
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.request(method, f"http://node{path}", params=params, json=body) as resp,
    ):
        text = await resp.text()
        try:
            data: dict[str, Any] = json.loads(text)
        except ValueError:
            data = {"error": text.strip() or f"HTTP {resp.status}"}
        if resp.status >= 400:
            raise history.NodeAnswered(message=str(data.get("error") or f"HTTP {resp.status}"))
        return data


async def query_status(data_dir: Path) -> dict[str, Any]:
    """Ask the node running on `data_dir` for its status."""
    return await ask_node(data_dir, "GET", "/status", timeout_s=10)


async def stream_node(
    data_dir: Path, path: str, body: dict[str, object]
) -> AsyncIterator[dict[str, Any]]:
    """POST to the control API of the node on `data_dir` and yield each JSON
    line it streams back; a refusal becomes `NodeAnswered`; OSError if none runs."""
    import aiohttp

    connector = aiohttp.UnixConnector(path=str(data_dir / CONTROL_NAME))
    # No total timeout: an invitation waits up to 10 minutes. The node writes
    # within POLL_S of anything happening, and closes the stream at the end.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.post(f"http://node{path}", json=body) as resp,
    ):
        if resp.status >= 400:
            text = await resp.text()
            try:
                message = str(json.loads(text).get("error") or f"HTTP {resp.status}")
            except (ValueError, AttributeError):
                message = text.strip() or f"HTTP {resp.status}"
            raise history.NodeAnswered(message=message)
        async for raw in resp.content:
            if raw.strip():
                yield json.loads(raw)


def _advertised(host: str) -> list[str] | None:
    """The address to advertise: the one we listen on if it is one IP address;
    None (every address of this host) for a wildcard or a host name."""
    with contextlib.suppress(ValueError):
        if not ipaddress.ip_address(host).is_unspecified:
            return [host]
    return None
