"""Discovery: the peers this node knows of, from mDNS, `--peer` and remembered addresses.

Invariants:
- Every callback runs on the event loop that called `start()`, one at a time,
  and an exception from one is logged, never let out (least of all into
  zeroconf's record processing, which it would break for every service).
- `on_found` and `on_lost` pair up: an address is reported lost only after it
  was reported found, and `peers()` is exactly the found-and-not-lost set.
- Only services with our volume tag, another node id and a well-formed TXT
  record are reported; one with another protocol version goes to
  `on_incompatible` instead of `on_found`.
- zeroconf is closed on every way out of `start()` and `close()`, and `close()`
  says goodbye first, so other nodes drop this one at once.

It knows nothing of sync: it yields addresses; who to talk to is the caller's call.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Literal, Self

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from discovery.address import PeerAddress, Source
from discovery.interfaces import host_ipv4_addresses
from discovery.txt import (
    SERVICE_TYPE,
    Advert,
    MalformedTxt,
    check_hex,
    decode_txt,
    encode_txt,
    instance_name,
    server_name,
)

_log = logging.getLogger(__name__)

# How long one resolution (SRV, TXT and address records of a service we saw)
# may take. zeroconf's own default; a LAN answers in well under a second, and a
# service that does not answer is tried again when its records next change.
RESOLVE_TIMEOUT_MS = 3000
# Registering probes the name three times, 250 ms apart (RFC 6762 §8.1), and
# again under a new name if another node holds it; this only bounds it.
REGISTER_TIMEOUT_S = 10.0
# Saying goodbye is three multicast sends 125 ms apart; this only bounds it.
GOODBYE_TIMEOUT_S = 2.0

FoundCallback = Callable[[PeerAddress], None]
IncompatibleCallback = Callable[[PeerAddress, int], None]


class Discovery:
    """Advertise this node on the LAN, browse for nodes of the same volume, and
    keep the set of known peer addresses current.

    `static` (from `--peer`) and `remembered` (what the caller saved from
    earlier `on_found` reports) are reported by `start()` at once and never
    lost. With `mdns=False` nothing touches the network at all.
    """

    def __init__(
        self,
        *,
        volume_tag: str,
        node_id: str,
        name: str,
        port: int,
        protocol: int,
        static: Sequence[tuple[str, int]] = (),
        remembered: Sequence[tuple[str, int]] = (),
        mdns: bool = True,
        addresses: Sequence[str] | None = None,
        on_found: FoundCallback | None = None,
        on_lost: FoundCallback | None = None,
        on_incompatible: IncompatibleCallback | None = None,
    ) -> None:
        if not 1 <= port <= 65535:
            raise ValueError(f"port must be from 1 to 65535, not {port}")
        if protocol < 0:
            raise ValueError(f"protocol version must not be negative, not {protocol}")
        self._advert = Advert(
            version=protocol,
            tag=check_hex("volume_tag", volume_tag),
            node_id=check_hex("node_id", node_id),
            name=name,
        )
        self._port = port
        self._mdns = mdns
        self._addresses = _advertised_addresses(addresses)
        self._fixed = _fixed_peers(static, remembered)
        self._on_found = on_found
        self._on_lost = on_lost
        self._on_incompatible = on_incompatible

        self._state: Literal["new", "started", "closed"] = "new"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._registered = False
        # Per service, keyed by lowercased instance name (DNS names are
        # case-insensitive): what we reported, what we resolve right now, and
        # why we ignore it (so each reason is logged once, not per refresh).
        self._services: dict[str, tuple[PeerAddress, ...]] = {}
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._ignored: dict[str, str] = {}
        self._incompatible: dict[str, int] = {}
        self._tasks: set[asyncio.Future[Any]] = set()

    # --- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Report the static and remembered peers, then (with mDNS) browse and
        register our service; returns once the service is registered (about
        1.2 s of probing the name on the network).

        Raises OSError if the mDNS sockets cannot be opened, e.g. when an
        address in `addresses` is on no interface of this machine (ENODEV);
        everything is closed again by then.
        """
        if self._state != "new":
            raise RuntimeError(f"Discovery.start() called on a {self._state} Discovery")
        self._state = "started"
        self._loop = asyncio.get_running_loop()
        for peer in self._fixed:
            self._emit_found(peer)
        if not self._mdns:
            _log.info("mdns=off static=%d remembered=%d", *self._fixed_counts())
            return
        try:
            await self._start_mdns()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Unregister our service (other nodes see it go at once), stop browsing
        and close zeroconf. No callback runs once this has begun. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        tasks: list[asyncio.Future[Any]] = [*self._resolving.values(), *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._resolving.clear()
        self._tasks.clear()
        self._services.clear()
        await self._close_mdns()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def peers(self) -> list[PeerAddress]:
        """The addresses reported by `on_found` and not since by `on_lost`:
        static, then remembered, then mDNS ones in the order found. Empty before
        `start()` and after `close()`.

        One node may appear more than once: under each address it advertises,
        and also as a static or remembered address; `node_id` tells them apart.
        """
        if self._state != "started":
            return []
        return [*self._fixed, *(peer for found in self._services.values() for peer in found)]

    # --- mDNS --------------------------------------------------------------

    async def _start_mdns(self) -> None:
        if self._addresses is None:
            advertised = host_ipv4_addresses()
            interfaces: list[str] | InterfaceChoice = InterfaceChoice.All
        else:
            advertised = list(self._addresses)
            interfaces = list(self._addresses)
        if not advertised:
            _log.warning(
                "this machine has no IPv4 address besides loopback: other nodes cannot find it by mDNS"
            )
        # Created here, inside the running loop, zeroconf runs on this loop
        # (not a thread of its own): its handlers, and so ours, run here too.
        try:
            self._aiozc = AsyncZeroconf(interfaces=interfaces)
        except OSError as e:
            where = "any interface" if self._addresses is None else ", ".join(self._addresses)
            raise OSError(e.errno, f"cannot start mDNS on {where}: {e.strerror}") from e
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            instance_name(self._advert.name, self._advert.node_id),
            port=self._port,
            properties=encode_txt(self._advert),
            server=server_name(self._advert.node_id),
            parsed_addresses=advertised,
        )
        # Browse before registering so nothing announced meanwhile is missed.
        self._browser = AsyncServiceBrowser(
            self._aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_service_state_change]
        )
        wanted = self._info.name
        async with asyncio.timeout(REGISTER_TIMEOUT_S):
            announced = await self._aiozc.async_register_service(self._info, allow_name_change=True)
        self._registered = True
        self._keep(asyncio.ensure_future(announced))
        if self._info.name != wanted:
            _log.info("service name taken, renamed wanted=%r got=%r", wanted, self._info.name)
        _log.info(
            "mdns=on service=%r addresses=%s port=%d static=%d remembered=%d",
            self._info.name,
            ",".join(advertised) or "-",
            self._port,
            *self._fixed_counts(),
        )

    async def _close_mdns(self) -> None:
        aiozc, browser, info = self._aiozc, self._browser, self._info
        self._aiozc = self._browser = self._info = None
        if aiozc is None:
            return
        try:
            if browser is not None:
                await browser.async_cancel()
            if info is not None and self._registered:
                self._registered = False
                async with asyncio.timeout(GOODBYE_TIMEOUT_S):
                    await (await aiozc.async_unregister_service(info))
        finally:
            await aiozc.async_close()

    def _on_service_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        # Called from inside zeroconf's record processing: only enqueue, and
        # never raise, or zeroconf would stop processing the batch.
        try:
            if self._state == "started" and self._loop is not None:
                self._loop.call_soon_threadsafe(self._service_changed, name, state_change)
        except Exception:
            _log.exception("could not queue an mDNS event service=%r", name)

    def _service_changed(self, name: str, change: ServiceStateChange) -> None:
        if self._state != "started" or self._aiozc is None:
            return
        key = name.lower()
        if self._info is not None and key == self._info.key:
            return  # our own service
        previous = self._resolving.pop(key, None)
        if previous is not None:
            previous.cancel()  # superseded by what just changed
        if change is ServiceStateChange.Removed:
            self._ignored.pop(key, None)
            self._incompatible.pop(key, None)
            self._set_service(key, ())
            return
        task = asyncio.create_task(self._resolve(key, name, self._aiozc.zeroconf))
        self._resolving[key] = task
        task.add_done_callback(lambda done: self._resolved(key, done))

    def _resolved(self, key: str, task: asyncio.Task[None]) -> None:
        if self._resolving.get(key) is task:
            del self._resolving[key]

    async def _resolve(self, key: str, name: str, zc: Zeroconf) -> None:
        try:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(zc, RESOLVE_TIMEOUT_MS):
                _log.debug("service did not resolve service=%r", name)
                return
            if self._state == "started":
                self._set_service(key, self._read_service(key, info))
        except Exception:
            _log.exception("resolving an mDNS service failed service=%r", name)

    def _read_service(self, key: str, info: AsyncServiceInfo) -> tuple[PeerAddress, ...]:
        """The addresses a resolved service stands for; empty if we ignore it."""
        try:
            advert = decode_txt(info.properties)
        except MalformedTxt as e:
            return self._ignore(key, info.name, f"malformed TXT: {e}")
        if advert.node_id == self._advert.node_id:
            return ()  # ourselves, under an older or renamed registration
        if advert.tag != self._advert.tag:
            return self._ignore(key, info.name, "another volume")
        port = info.port
        if port is None or not 1 <= port <= 65535:
            return self._ignore(key, info.name, f"bad port {port}")
        hosts = [host for host in info.parsed_scoped_addresses(IPVersion.All) if _dialable(host)]
        if not hosts:
            return self._ignore(key, info.name, "no usable address")
        self._ignored.pop(key, None)
        peers = tuple(PeerAddress(host, port, advert.node_id, "mdns") for host in hosts)
        if advert.version != self._advert.version:
            if self._incompatible.get(key) != advert.version:
                self._incompatible[key] = advert.version
                self._report_incompatible(peers[0], advert.version)
            return ()
        self._incompatible.pop(key, None)
        return peers

    def _ignore(self, key: str, name: str, reason: str) -> tuple[PeerAddress, ...]:
        if self._ignored.get(key) != reason:
            self._ignored[key] = reason
            _log.debug("ignoring service=%r reason=%r", name, reason)
        return ()

    def _report_incompatible(self, peer: PeerAddress, version: int) -> None:
        if self._on_incompatible is not None:
            _log.debug(
                "incompatible node=%s version=%d ours=%d",
                _short(peer.node_id),
                version,
                self._advert.version,
            )
            self._emit(self._on_incompatible, peer, version)
        else:
            _log.warning(
                "node %s at %s speaks protocol version %d, this node %d: "
                "the two cannot sync until both run the same version",
                _short(peer.node_id),
                peer.host,
                version,
                self._advert.version,
            )

    def _set_service(self, key: str, new: tuple[PeerAddress, ...]) -> None:
        old = self._services.pop(key, ())
        if new:
            self._services[key] = new
        for peer in old:
            if peer not in new:
                _log.debug(
                    "lost node=%s host=%s port=%d", _short(peer.node_id), peer.host, peer.port
                )
                self._emit(self._on_lost, peer)
        for peer in new:
            if peer not in old:
                self._emit_found(peer)

    # --- helpers -----------------------------------------------------------

    def _emit_found(self, peer: PeerAddress) -> None:
        _log.debug(
            "found node=%s host=%s port=%d source=%s",
            _short(peer.node_id),
            peer.host,
            peer.port,
            peer.source,
        )
        self._emit(self._on_found, peer)

    def _emit(self, callback: Callable[..., None] | None, *args: object) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            _log.exception("a discovery callback failed callback=%r", callback)

    def _keep(self, future: asyncio.Future[Any]) -> None:
        """Hold a strong reference until done: the loop keeps only weak ones."""
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)

    def _fixed_counts(self) -> tuple[int, int]:
        static = sum(peer.source == "static" for peer in self._fixed)
        return static, len(self._fixed) - static


def _advertised_addresses(addresses: Sequence[str] | None) -> list[str] | None:
    """The IP literals to advertise and bind to; None means all of this host's.

    An unspecified address (`--listen 0.0.0.0:PORT`) means every interface too.
    A scope (`%eth0`) is dropped: address records carry none.
    """
    if addresses is None:
        return None
    if isinstance(addresses, str):
        raise TypeError("addresses must be a sequence of IP addresses, not one string")
    result: list[str] = []
    for text in addresses:
        try:
            address = ipaddress.ip_address(text.partition("%")[0])
        except ValueError:
            raise ValueError(f"addresses must be IP addresses, not {text!r}") from None
        if address.is_unspecified:
            return None
        if str(address) not in result:
            result.append(str(address))
    if not result:
        raise ValueError("addresses is empty (pass None to advertise all of this host's addresses)")
    return result


def _fixed_peers(
    static: Sequence[tuple[str, int]], remembered: Sequence[tuple[str, int]]
) -> tuple[PeerAddress, ...]:
    """Static then remembered peers, each address once (static wins)."""
    seen: set[tuple[str, int]] = set()
    peers: list[PeerAddress] = []
    sources: list[tuple[Source, Sequence[tuple[str, int]]]] = [
        ("static", static),
        ("remembered", remembered),
    ]
    for source, entries in sources:
        for host, port in entries:
            if not host or not 1 <= port <= 65535:
                raise ValueError(f"{source} peer address {host!r} port {port} is not valid")
            normal = _normal_host(host)
            if (normal, port) not in seen:
                seen.add((normal, port))
                peers.append(PeerAddress(normal, port, None, source))
    return tuple(peers)


def _normal_host(host: str) -> str:
    """One spelling per address, so '::1' and '0::1' are the same peer."""
    address, percent, scope = host.partition("%")
    try:
        return str(ipaddress.ip_address(address)) + percent + scope
    except ValueError:
        return host.lower().removesuffix(".")


def _dialable(host: str) -> bool:
    """Whether an advertised address is worth reporting (not loopback,
    multicast or unspecified; link-local IPv6 only with its scope)."""
    address, _, scope = host.partition("%")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.is_loopback or ip.is_multicast or ip.is_unspecified:
        return False
    return not (ip.version == 6 and ip.is_link_local and not scope)


def _short(node_id: str | None) -> str:
    return node_id[:8] if node_id else "-"
