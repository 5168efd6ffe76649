"""Real `dfs-peer join` processes with their own data dirs and mounts.

Invariant: a `NodeProcess` that was started is always stopped and unmounted by
`stop()` (also when the node died or hangs): `fusermount3 -u -z`, then
SIGTERM, then SIGKILL, after pyfuse3's own test harness. A node also gets
SIGTERM if the process that started it dies, so a harness killed outright
leaves no node behind. Waiting is always on a condition with a deadline, never
a bare sleep.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MOUNT_TIMEOUT_S = 30.0
# What a node prints once its mount answers (`peer.node`'s ready line).
READY_MARK = "Ctrl-C to stop"
STOP_TIMEOUT_S = 20.0
STATUS_TIMEOUT_S = 10.0
# The node's local control socket in its data dir, and what `dfs-peer status`
# asks it; asked directly here, because starting the CLI costs ~0.3 s a query.
CONTROL_SOCKET = "control.sock"
STATUS_PATH = "/status"

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


class HarnessError(AssertionError):
    """A node did not do what the scenario needed (it died, or never mounted)."""


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> float:
    """Poll `condition` until true and return the seconds it took, or raise
    HarnessError naming `what`."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free just now.

    Chosen before a node starts (rather than `--listen 127.0.0.1:0`) so that
    nodes started earlier can be given it as a static peer. Another process
    could take it before the node binds it; the node then exits saying so.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mount_points() -> list[str]:
    """Every mount point now in /proc/mounts."""
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f]


def is_mounted(path: Path) -> bool:
    return os.path.realpath(path) in mount_points()


def unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False, capture_output=True)


def dfs_peer_command() -> list[str]:
    """How to run the CLI: the installed script beside this Python, or the module."""
    script = Path(sys.executable).with_name("dfs-peer")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "peer.cli"]


def new_secret() -> str:
    out = subprocess.run([*dfs_peer_command(), "init"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the thread that started it ends,
    and let Ctrl-C (SIGINT) act on it as it would in a terminal.

    So a harness killed outright (SIGKILL, OOM) does not leave nodes running
    and mounted; they unmount themselves on SIGTERM. A harness started in the
    background by a shell (`make test &`, a CI runner) ignores SIGINT, and an
    ignored signal stays ignored across exec: a test that sends Ctrl-C would
    then wait for nothing.
    """
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("node", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def query_status(data_dir: Path, timeout: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
    """What `dfs-peer status --json --data-dir D` prints, asked over the control socket.

    Raises OSError if no node answers there.
    """
    conn = _UnixHTTPConnection(data_dir / CONTROL_SOCKET, timeout)
    try:
        conn.request("GET", STATUS_PATH)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise HarnessError(f"status of the node in {data_dir}: HTTP {resp.status} {body[:200]!r}")
    data: dict[str, Any] = json.loads(body)
    return data


@dataclass
class NodeProcess:
    """One `dfs-peer join` process.

    With `code`, its first start pairs by that one-time code (`join --code`);
    with neither `code` nor `secret_file`, it uses the secret pairing stored in
    its data dir."""

    secret_file: Path | None
    data_dir: Path
    mountpoint: Path
    name: str = "node"
    extra: list[str] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)  # e.g. nsenter into a netns
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    code: str | None = None
    _ready_lines: int = field(default=0, repr=False)  # in the log before this start

    def start(self, wait: bool = True) -> NodeProcess:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if self.log_path is None:
            self.log_path = self.data_dir.parent / f"{self.name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.code is not None:
            secret = ["--code", self.code]
            self.code = None  # one use: later starts use the secret it stored
        elif self.secret_file is not None:
            secret = ["--secret-file", str(self.secret_file)]
        else:
            secret = []
        cmd = [
            *self.prefix,
            *dfs_peer_command(),
            "join",
            *secret,
            "--data-dir",
            str(self.data_dir),
            "--name",
            self.name,
            *self.extra,
            str(self.mountpoint),
        ]
        self._ready_lines = self.log_text().count(READY_MARK)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        finally:
            log.close()
        if wait:
            self.wait_mounted()
        return self

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def wait_mounted(self, timeout: float = MOUNT_TIMEOUT_S) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise HarnessError(
                    f"node {self.name} exited with {self.proc.returncode} before mounting:\n"
                    + self.log_text()[-4000:]
                )
            # Mounted, and the node says so: it says it once the mount answers
            # and is tuned (read-ahead), so a benchmark's first read is not
            # one the node has not finished mounting for.
            return (
                is_mounted(self.mountpoint)
                and self.log_text().count(READY_MARK) > self._ready_lines
            )

        wait_for(ready, timeout, f"node {self.name} to mount {self.mountpoint}")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the node (by `sig`), always leaving nothing mounted; return its exit code."""
        code: int | None = None
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    code = self.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    unmount(self.mountpoint)
                    self.proc.terminate()
                    try:
                        self.proc.wait(5)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait(5)
            elif self.proc is not None:
                code = self.proc.returncode
        finally:
            unmount(self.mountpoint)
        return code

    def kill(self) -> None:
        """SIGKILL, as a crash would; then clear the dead mount."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        wait_for(lambda: self._unmount_dead(), 10, f"dead mount of {self.name} to go")

    def _unmount_dead(self) -> bool:
        unmount(self.mountpoint)
        return not is_mounted(self.mountpoint)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self, timeout: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
        """The running node's status (see `query_status`)."""
        return query_status(self.data_dir, timeout)
