"""Open pairing invitations on the LAN: advertise one, find one by its number.

A node with an open invitation (`dfs-peer invite`) advertises a service of its
own type, `_dfs-pair._tcp`, whose TXT record holds only the protocol version
and the invitation's number, and whose port is the node's peer port. Not the
volume tag, not the node id, not its name: a machine without the secret
learns that some host has invitation 7 open, which the code's number says
anyway, and nothing about which volume it is for. (The host's address is the
one its regular `_dfs-peer._tcp` advert shows, so someone on the LAN can tell
which node invites; that much the regular advert already gives away.)

Invariant: like `discovery.peers`, this knows nothing of pairing itself: it
yields addresses. Every zeroconf instance it opens it closes, on every way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Sequence

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from discovery.interfaces import host_ipv4_addresses
from discovery.peers import REGISTER_TIMEOUT_S, RESOLVE_TIMEOUT_MS

_log = logging.getLogger(__name__)

INVITE_SERVICE_TYPE = "_dfs-pair._tcp.local."
# After the first match, how long to keep listening for another host with the
# same number (two volumes' members inviting at once): each is then tried.
GRACE_S = 0.5


@contextlib.asynccontextmanager
async def advertise_invitation(
    number: int, port: int, protocol: int, addresses: Sequence[str] | None = None
) -> AsyncIterator[None]:
    """Advertise invitation `number` at `port` while the block runs.

    `addresses`: the IP literals to advertise (and send on); None for all of
    this host's. Raises OSError if the mDNS sockets cannot be opened.
    """
    advertised = list(addresses) if addresses else host_ipv4_addresses()
    interfaces: list[str] | InterfaceChoice = list(addresses) if addresses else InterfaceChoice.All
    aiozc = AsyncZeroconf(interfaces=interfaces)
    # A random instance and host name: nothing in them ties the advert to a node.
    token = secrets.token_hex(4)
    info = AsyncServiceInfo(
        INVITE_SERVICE_TYPE,
        f"invitation {number} {token}.{INVITE_SERVICE_TYPE}",
        port=port,
        properties={"v": str(protocol), "n": str(number)},
        server=f"dfs-pair-{token}.local.",
        parsed_addresses=advertised,
    )
    registered = False
    try:
        async with asyncio.timeout(REGISTER_TIMEOUT_S):
            await (await aiozc.async_register_service(info, allow_name_change=True))
        registered = True
        _log.info("advertising invitation number=%d port=%d", number, port)
        yield
    finally:
        try:
            if registered:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await (await aiozc.async_unregister_service(info))
        finally:
            await aiozc.async_close()


async def find_invitation(number: int, protocol: int, timeout_s: float) -> list[tuple[str, int]]:
    """The (host, port) of every host on the LAN advertising invitation
    `number` in our protocol, found within `timeout_s`; empty if none."""
    found: list[tuple[str, int]] = []
    first = asyncio.Event()
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    aiozc = AsyncZeroconf(interfaces=InterfaceChoice.All)

    async def resolve(name: str, zc: Zeroconf) -> None:
        info = AsyncServiceInfo(INVITE_SERVICE_TYPE, name)
        try:
            if not await info.async_request(zc, RESOLVE_TIMEOUT_MS):
                return
        except Exception:
            _log.exception("resolving an mDNS service failed service=%r", name)
            return
        props = info.properties
        if props.get(b"v") != str(protocol).encode() or props.get(b"n") != str(number).encode():
            return
        port = info.port
        if port is None or not 1 <= port <= 65535:
            return
        for host in info.parsed_scoped_addresses(IPVersion.V4Only):
            if (host, port) not in found:
                found.append((host, port))
                first.set()

    def changed(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # zeroconf's callback: only enqueue (see discovery.peers).
        if state_change is not ServiceStateChange.Removed:
            loop.call_soon_threadsafe(start_resolving, name)

    def start_resolving(name: str) -> None:
        task = asyncio.ensure_future(resolve(name, aiozc.zeroconf))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    browser = AsyncServiceBrowser(aiozc.zeroconf, INVITE_SERVICE_TYPE, handlers=[changed])
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await first.wait()
            await asyncio.sleep(GRACE_S)
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await browser.async_cancel()
        await aiozc.async_close()
    return list(found)
