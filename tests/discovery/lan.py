"""A throwaway LAN for discovery tests: a bridge in the root namespace and a few
network namespaces plugged into it, each running discovery nodes as subprocesses.

Everything it makes is named `dfsdisc-<suffix>...` (the veths `dfsdisc<suffix><n>`,
for the 15-byte interface name limit), and `Lan.close()` removes all of it and
ends every process it started, whatever state the test left things in.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SUBNET = "10.231.0"
Event = dict[str, Any]


def why_no_namespaces() -> str | None:
    """Why these tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


@dataclass(frozen=True)
class Host:
    """One namespace on the LAN, with one veth called eth0 at `address`."""

    netns: str
    veth: str
    address: str


class Node:
    """A discovery program running in a namespace; collects its JSON events."""

    def __init__(self, host: Host, config: dict[str, Any], stderr_dir: Path) -> None:
        self.host = host
        self.config = config
        self.label = config.get("name", host.netns)
        self.events: list[Event] = []
        self._changed = threading.Condition()
        self._stderr_path = stderr_dir / f"{self.label}-{secrets.token_hex(2)}.stderr"
        with self._stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    host.netns,
                    sys.executable,
                    "-m",
                    "tests.discovery.node_main",
                    json.dumps(config),
                ],
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self._reader = threading.Thread(target=self._read, name=f"read-{self.label}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "garbage", "line": line}
            event["t"] = time.monotonic()
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self.events.append({"event": "exited", "t": time.monotonic()})
            self._changed.notify_all()

    def of(self, kind: str, **fields: Any) -> list[Event]:
        """The events of `kind` whose fields include `fields`."""
        with self._changed:  # reentrant: `_wait` calls this holding it
            return [
                e
                for e in self.events
                if e["event"] == kind and all(e.get(k) == v for k, v in fields.items())
            ]

    def wait_for(self, kind: str, timeout: float, *, count: int = 1, **fields: Any) -> Event:
        """The `count`th event of `kind` with `fields`, waiting up to `timeout` s."""
        return self._wait(
            f"{kind} {fields}" + (f" x{count}" if count > 1 else ""),
            timeout,
            lambda: found[count - 1] if len(found := self.of(kind, **fields)) >= count else None,
        )

    def wait_for_log(self, pattern: str, timeout: float, level: str | None = None) -> Event:
        """The first log record whose message matches `pattern` (a regex)."""
        regex = re.compile(pattern)

        def match() -> Event | None:
            return next(
                (
                    e
                    for e in self.of("log")
                    if regex.search(e["message"]) and level in (None, e["level"])
                ),
                None,
            )

        return self._wait(f"log {pattern!r}", timeout, match)

    def _wait(self, what: str, timeout: float, match: Callable[[], Event | None]) -> Event:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if (found := match()) is not None:
                    return found
                if self.events and self.events[-1]["event"] == "exited":
                    raise AssertionError(f"{self.label} exited before {what}\n{self.describe()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.label}: no {what} within {timeout} s\n{self.describe()}"
                    )
                self._changed.wait(remaining)

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        """Close stdin (the program closes discovery and exits), then
        terminate, then kill: whatever happens, the process is gone after."""
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.close()
                self.process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.process.terminate()
                try:
                    self.process.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        self._reader.join(timeout=5)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None and not self._reader.is_alive():
                pipe.close()

    def stderr(self) -> str:
        return self._stderr_path.read_text(errors="replace")

    def describe(self) -> str:
        with self._changed:
            lines = [
                json.dumps(e) for e in self.events if e["event"] != "log" or e["level"] != "DEBUG"
            ]
        return (
            f"--- {self.label} events (debug logs left out):\n"
            + "\n".join(lines)
            + f"\n--- {self.label} stderr:\n{self.stderr()}"
        )

    def bad_logs(self, allowed: list[re.Pattern[str]]) -> list[str]:
        """WARNING-or-worse logs (and stderr output) not matching `allowed`."""
        found = [
            f"{self.label}: {e['level']} {e['logger']}: {e['message']}\n{e.get('exc') or ''}"
            for e in self.of("log")
            if e["level"] not in ("DEBUG", "INFO")
            and not any(p.search(e["message"]) for p in allowed)
        ]
        if stderr := self.stderr().strip():
            found.append(f"{self.label} wrote to stderr:\n{stderr}")
        return found


@dataclass
class Lan:
    """The bridge, the namespaces on it, and the nodes started so far."""

    suffix: str
    bridge: str
    hosts: list[Host]
    stderr_dir: Path
    nodes: list[Node] = field(default_factory=list)
    allowed_logs: list[re.Pattern[str]] = field(default_factory=list)

    def start(self, host: int, **config: Any) -> Node:
        """Run a discovery program on host number `host`."""
        node = Node(self.hosts[host], config, self.stderr_dir)
        self.nodes.append(node)
        return node

    def add_side_interface(self, host: int, address: str) -> None:
        """Give host `host` a second interface, `side0`, not on the bridge: one
        end of a veth pair that stays inside the namespace (no `dummy` module
        needed)."""
        netns = self.hosts[host].netns
        ip("-n", netns, "link", "add", "side0", "type", "veth", "peer", "name", "side1")
        ip("-n", netns, "addr", "add", f"{address}/24", "dev", "side0")
        ip("-n", netns, "link", "set", "side1", "up")
        ip("-n", netns, "link", "set", "side0", "up")

    def allow_log(self, pattern: str) -> None:
        """A WARNING-or-worse log line a node may write (the test caused it)."""
        self.allowed_logs.append(re.compile(pattern))

    def udp_datagrams_sent(self, host: int) -> int:
        """Udp OutDatagrams in host `host`'s namespace: /proc/net is per namespace."""
        result = subprocess.run(
            ["ip", "netns", "exec", self.hosts[host].netns, "cat", "/proc/net/snmp"],
            capture_output=True,
            text=True,
            check=True,
        )
        header, values = (
            line.split()[1:] for line in result.stdout.splitlines() if line.startswith("Udp:")
        )
        return int(dict(zip(header, values, strict=True))["OutDatagrams"])


@contextmanager
def make_lan(hosts: int, *, check_logs: Callable[[list[str]], None]) -> Iterator[Lan]:
    """A bridge with `hosts` namespaces at 10.231.0.1, .2, ...; removed on exit.

    After the test, every node is stopped and `check_logs` gets the
    unexpected warnings and errors the nodes logged (an empty list if none).
    """
    suffix = secrets.token_hex(3)[:5]
    bridge = f"dfsdisc-{suffix}"
    made: list[Host] = []
    with tempfile.TemporaryDirectory(prefix=f"dfsdisc-{suffix}-") as stderr_dir:
        lan = Lan(suffix, bridge, made, Path(stderr_dir))
        try:
            ip("link", "add", "name", bridge, "type", "bridge")
            ip("link", "set", bridge, "up")
            for n in range(hosts):
                host = Host(f"dfsdisc-{suffix}-{n}", f"dfsdisc{suffix}{n}", f"{SUBNET}.{n + 1}")
                ip("netns", "add", host.netns)
                made.append(host)
                ip(
                    "link",
                    "add",
                    host.veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    host.netns,
                )
                ip("link", "set", host.veth, "master", bridge, "up")
                ip("-n", host.netns, "link", "set", "lo", "up")
                ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
                ip("-n", host.netns, "link", "set", "eth0", "multicast", "on", "up")
            yield lan
            problems: list[str] = []
            for node in lan.nodes:
                node.stop()
                problems.extend(node.bad_logs(lan.allowed_logs))
            check_logs(problems)
        finally:
            for node in lan.nodes:
                node.stop()
            for host in made:
                ip("netns", "del", host.netns, check=False)
                ip("link", "del", host.veth, check=False)  # gone with the namespace, normally
            ip("link", "del", bridge, check=False)


def leftovers(suffix: str) -> list[str]:
    """Namespaces and links of ours still present: what a cleanup missed."""
    names = ip("netns", "list").stdout + ip("-o", "link").stdout
    return sorted(set(re.findall(rf"dfsdisc-?{suffix}[-\w]*", names)))
