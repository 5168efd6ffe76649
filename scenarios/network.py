"""The LAN a scenario's nodes share: network namespaces on a bridge, or loopback.

As root, `BridgeLan` gives every node its own network namespace with one veth
(`eth0` inside, the other end on a bridge in the root namespace), so mDNS is
real multicast, a partition is a link taken down, and a node's traffic can be
counted on its own interface. Without root, `LoopbackLan` puts every node on
127.0.0.1 with a port of its own, picked free when the host is added, so every
node's address is known before any starts: no mDNS, no partitions, no counters.

Invariant: whatever a `BridgeLan` creates (namespaces, veths, the bridge) it
deletes in `close()`, and it records itself under `OWNERS` before creating
anything, so a later run removes what a run that was killed outright left
behind (and never what a live parallel run owns). Names carry a random run id
(`dfs-<id>-...`), so parallel runs never clash.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from scenarios.harness import HarnessError, free_port, mount_points, unmount

PORT = 7654
NETNS_DIR = Path("/run/netns")
OWNERS = Path("/run/dfs-scenarios")
# Inside a namespace the node's interface is always called this, as on a host.
IFACE = "eth0"
# mDNS goes to 224.0.0.251; a LAN host's default route covers it. A namespace
# with only a /24 has no route for it, and link down deletes routes, so heal
# adds it again.
MULTICAST_ROUTE = "224.0.0.0/4"


def can_use_namespaces() -> tuple[bool, str]:
    """Whether this process can build a `BridgeLan`, and if not, why."""
    if os.geteuid() != 0:
        return False, "needs root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        return False, "needs `ip` (iproute2) and `nsenter` (util-linux)"
    return True, ""


@dataclass(frozen=True, slots=True)
class Host:
    """Where one node lives on the LAN."""

    name: str
    ip: str
    port: int = PORT
    netns: str | None = None  # None: the root namespace (loopback)
    veth: str | None = None  # the root-namespace end of its link, for counters

    @property
    def address(self) -> str:
        """Where its node listens and its peers reach it."""
        return f"{self.ip}:{self.port}"

    def command_prefix(self) -> list[str]:
        """What to put before a command to run it on this host.

        `nsenter --net` enters only the network namespace, so a FUSE mount the
        node makes stays visible in ours (`ip netns exec` would unshare the
        mount namespace too, and the mount would vanish with the node).
        """
        if self.netns is None:
            return []
        return ["nsenter", f"--net={NETNS_DIR / self.netns}"]


@dataclass(frozen=True, slots=True)
class LinkCounters:
    """Bytes a host received and sent on its link."""

    rx_bytes: int
    tx_bytes: int

    @property
    def total(self) -> int:
        return self.rx_bytes + self.tx_bytes

    def __sub__(self, other: LinkCounters) -> LinkCounters:
        return LinkCounters(self.rx_bytes - other.rx_bytes, self.tx_bytes - other.tx_bytes)


class Lan(Protocol):
    real: bool  # namespaces: mDNS, partitions and byte counters work
    description: str

    def add_host(self, name: str) -> Host: ...
    def cut(self, host: Host) -> None: ...
    def heal(self, host: Host) -> None: ...
    def counters(self, host: Host) -> LinkCounters: ...
    def limit_rate(self, host: Host, mbit: int) -> None: ...
    def close(self) -> None: ...


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise HarnessError(f"`ip {' '.join(args)}` failed: {out.stderr.strip()}")
    return out


class LoopbackLan:
    """Every node on 127.0.0.1 (without root): static peers only."""

    real = False
    description = "loopback (no root: static peers, no mDNS, no partitions)"

    def add_host(self, name: str) -> Host:
        # If another process takes the port first, the node exits saying so,
        # and the scenario fails at its start.
        return Host(name=name, ip="127.0.0.1", port=free_port())

    def cut(self, host: Host) -> None:
        raise HarnessError("partitions need network namespaces (run as root)")

    heal = cut

    def counters(self, host: Host) -> LinkCounters:
        raise HarnessError("per-node byte counters need network namespaces (run as root)")

    def limit_rate(self, host: Host, mbit: int) -> None:
        raise HarnessError("rate limits need network namespaces (run as root)")

    def close(self) -> None:
        pass


class BridgeLan:
    """Namespaces on one bridge, one /24, with addresses .1, .2, ... in order."""

    real = True

    def __init__(self, workdir: Path) -> None:
        ok, why = can_use_namespaces()
        if not ok:
            raise HarnessError(f"cannot build a bridged LAN: {why}")
        remove_stale()
        self.run_id = secrets.token_hex(3)
        self.prefix = f"dfs-{self.run_id}"
        self.bridge = f"{self.prefix}-br"
        self.subnet = f"10.{random.randint(16, 254)}.0"
        self.hosts: list[Host] = []
        self._made: list[tuple[str, str]] = []  # (namespace, veth) to delete
        self.description = (
            f"a network namespace per node on bridge {self.bridge}, {self.subnet}.0/24"
        )
        OWNERS.mkdir(parents=True, exist_ok=True)
        self._owner = OWNERS / self.run_id
        self._owner.write_text(
            json.dumps(
                {"pid": os.getpid(), "start": _start_time(os.getpid()), "workdir": str(workdir)}
            )
        )
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            # Forward every multicast frame: no snooping querier lives here.
            ip("link", "set", self.bridge, "type", "bridge", "mcast_snooping", "0")
            ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    def add_host(self, name: str) -> Host:
        index = len(self._made) + 1
        if index > 250:
            raise HarnessError("a bridged LAN holds at most 250 hosts")
        netns, veth = f"{self.prefix}-n{index}", f"{self.prefix}-{index}"
        address = f"{self.subnet}.{index}"
        self._made.append((netns, veth))  # before creating: close() removes what exists
        ip("netns", "add", netns)
        ip("link", "add", veth, "type", "veth", "peer", "name", IFACE, "netns", netns)
        ip("link", "set", veth, "master", self.bridge, "up")
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "addr", "add", f"{address}/24", "dev", IFACE)
        ip("-n", netns, "link", "set", IFACE, "multicast", "on", "up")
        ip("-n", netns, "route", "replace", MULTICAST_ROUTE, "dev", IFACE)
        host = Host(name=name, ip=address, netns=netns, veth=veth)
        self.hosts.append(host)
        return host

    def cut(self, host: Host) -> None:
        """Partition `host` from everyone: its link goes down."""
        assert host.netns is not None
        ip("-n", host.netns, "link", "set", IFACE, "down")

    def heal(self, host: Host) -> None:
        assert host.netns is not None
        ip("-n", host.netns, "link", "set", IFACE, "up")
        ip("-n", host.netns, "route", "replace", MULTICAST_ROUTE, "dev", IFACE)

    def counters(self, host: Host) -> LinkCounters:
        """What `host` received and sent, read on its link's end in its namespace."""
        assert host.netns is not None
        out = ip("-n", host.netns, "-s", "-j", "link", "show", IFACE)
        stats = json.loads(out.stdout)[0]["stats64"]
        return LinkCounters(rx_bytes=int(stats["rx"]["bytes"]), tx_bytes=int(stats["tx"]["bytes"]))

    def limit_rate(self, host: Host, mbit: int) -> None:
        """Make `host`'s downlink a slow one: the bridge sends it at most `mbit` Mbit/s.

        A token bucket on the root-namespace end of its veth (netem is not in
        every kernel; tbf is). It goes with the link.
        """
        assert host.veth is not None
        rate = ["rate", f"{mbit}mbit", "burst", "256kb", "latency", "100ms"]
        out = subprocess.run(
            ["tc", "qdisc", "replace", "dev", host.veth, "root", "tbf", *rate],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode != 0:
            raise HarnessError(f"cannot limit {host.name}'s link: {out.stderr.strip()}")

    def close(self) -> None:
        """Delete every namespace, veth and the bridge; never raises for what is gone."""
        for netns, veth in self._made:
            ip("link", "del", veth, check=False)
            ip("netns", "del", netns, check=False)
        ip("link", "del", self.bridge, check=False)
        self._made.clear()
        self._owner.unlink(missing_ok=True)


def _start_time(pid: int) -> str:
    """A process's start time (clock ticks since boot), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def remove_stale() -> list[str]:
    """Remove what runs that died without cleaning up left; return what was removed.

    A run is dead when the process recorded in its owner file is gone (or the
    pid now belongs to another process). Its namespaces, links and bridge are
    deleted and any mount left under its work dir is lazily unmounted.
    """
    removed: list[str] = []
    if not OWNERS.is_dir():
        return removed
    for owner in sorted(OWNERS.iterdir()):
        try:
            info = json.loads(owner.read_text())
        except (OSError, ValueError):
            continue
        if info.get("start") and _start_time(int(info["pid"])) == info["start"]:
            continue  # alive
        prefix = f"dfs-{owner.name}"
        if NETNS_DIR.is_dir():
            for ns in sorted(NETNS_DIR.iterdir()):
                if ns.name.startswith(prefix + "-"):
                    ip("netns", "del", ns.name, check=False)
                    removed.append(f"namespace {ns.name}")
        links = json.loads(ip("-j", "link", "show").stdout or "[]")
        for link in links:
            name = str(link.get("ifname", ""))
            if name.startswith(prefix + "-"):
                ip("link", "del", name, check=False)
                removed.append(f"link {name}")
        workdir = str(info.get("workdir", ""))
        if workdir:
            for mount in mount_points():
                if mount.startswith(workdir.rstrip("/") + "/"):
                    unmount(Path(mount))
                    removed.append(f"mount {mount}")
        owner.unlink(missing_ok=True)
    return removed
