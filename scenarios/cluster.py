"""N real nodes of one volume on one LAN, and the waits a scenario needs.

A `Cluster` owns a LAN (namespaces on a bridge as root, else loopback), the
volume secret, and every node started through it. Scenarios act through the
mounts with ordinary file calls and wait on conditions with deadlines:
`wait_until`, `wait_connected`, `wait_converged`. A wait that times out raises
`HarnessError` with what differed and the tails of the node logs.

Invariant: leaving the `with Cluster(...)` block, by success, failure or
Ctrl-C, stops and unmounts every node and deletes the LAN. A run that passes
must also leave clean logs: a node that logged a traceback or an ERROR (unless
the scenario said to expect it) or exited non-zero on SIGTERM fails the run.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from scenarios.harness import HarnessError, NodeProcess, new_secret
from scenarios.network import BridgeLan, Host, Lan, LoopbackLan, can_use_namespaces
from scenarios.report import Report, duration
from scenarios.trees import Tree, diff, snapshot

CONVERGE_TIMEOUT_S = 60.0
WAIT_TIMEOUT_S = 30.0
POLL_S = 0.02
LOG_TAIL_LINES = 25
# A node's log is records of `<date> <time> LEVEL logger: message`, each
# followed by any lines it spans (a traceback). A healthy node logs no ERROR or
# CRITICAL record and no traceback; warnings are fine (a peer going away during
# a partition is worth one).
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) ", re.M)
TRACEBACK = "Traceback (most recent call last)"


def make_lan(workdir: Path, loopback: bool = False) -> Lan:
    """Namespaces on a bridge when we can make them (root), else loopback."""
    if not loopback and can_use_namespaces()[0]:
        return BridgeLan(workdir)
    return LoopbackLan()


@dataclass(eq=False)
class ClusterNode:
    """One member of the cluster: its host on the LAN and its process."""

    name: str
    host: Host
    process: NodeProcess
    mdns: bool
    peers: list[ClusterNode] | None  # static --peer; None: all others of the volume
    volume: Path  # the secret file of its volume (a paired node holds that secret too)
    node_id: str = ""
    up: bool = False  # started and not stopped or killed on purpose
    allowed_errors: list[re.Pattern[str]] = field(default_factory=list)

    @property
    def mount(self) -> Path:
        return self.process.mountpoint

    def path(self, rel: str) -> Path:
        return self.process.mountpoint / rel

    def status(self) -> dict[str, Any]:
        return self.process.status()

    def running(self) -> bool:
        return self.process.running()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = self.process.log_text().rstrip("\n").splitlines()[-lines:]
        return "\n".join(f"    {self.name}| {line}" for line in text)


class Cluster:
    """Nodes of one volume on one LAN; a context manager that always tears down."""

    def __init__(self, workdir: Path, report: Report, *, loopback: bool = False) -> None:
        self.workdir = workdir
        self.report = report
        self.nodes: list[ClusterNode] = []
        self._closed = False
        self.lan: Lan = make_lan(workdir, loopback)
        try:
            self.secret_file = self.new_secret_file("volume")
        except BaseException:
            self.lan.close()
            raise

    # --- lifetime ---------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        problems = self.close()
        if exc_type is None and problems:
            raise HarnessError("the scenario passed, but:\n" + "\n".join(problems))

    def close(self) -> list[str]:
        """Stop every node and delete the LAN; return what the nodes did wrong.

        Ctrl-C is ignored meanwhile, so a second one cannot leave a mount or a
        namespace behind.
        """
        if self._closed:
            return []
        self._closed = True
        with _interrupts_ignored():
            died = [
                f"node {n.name} died during the run (exit code {n.process.proc.returncode})"
                for n in self.nodes
                if n.up and n.process.proc is not None and n.process.proc.poll() is not None
            ]
            try:
                codes = self._stop_all(self.nodes)
            finally:
                self.lan.close()
            problems = died + [
                f"node {node.name} exited with {code} on SIGTERM (expected 0)"
                for node, code in codes.items()
                if code not in (0, None)
            ]
        problems.extend(self.log_problems())
        return problems

    def _stop_all(self, nodes: Sequence[ClusterNode]) -> dict[ClusterNode, int | None]:
        """SIGTERM all running nodes at once and wait; return exit codes of those stopped."""
        running = [n for n in nodes if n.running()]
        for node in nodes:
            if not node.running():
                node.process.stop()  # unmounts whatever a dead node left
        if not running:
            return {}
        with ThreadPoolExecutor(len(running)) as pool:
            codes = list(pool.map(lambda n: n.process.stop(), running))
        return dict(zip(running, codes, strict=True))

    def log_problems(self) -> list[str]:
        """Each node's ERROR/CRITICAL records and tracebacks not allowed by the scenario."""
        problems = []
        for node in self.nodes:
            bad = [
                record
                for record in log_records(node.process.log_text())
                if is_bad_record(record) and not any(p.search(record) for p in node.allowed_errors)
            ]
            if bad:
                problems.append(
                    f"node {node.name} logged {len(bad)} error(s) or traceback(s); the first:\n"
                    + "\n".join(f"    {node.name}| {line}" for line in bad[0].splitlines())
                )
        return problems

    # --- nodes ------------------------------------------------------------

    def new_secret_file(self, label: str) -> Path:
        path = self.workdir / f"{label}.secret"
        path.write_text(new_secret() + "\n")
        path.chmod(0o600)
        return path

    @property
    def real_lan(self) -> bool:
        return self.lan.real

    def add(
        self,
        name: str,
        *,
        secret_file: Path | None = None,
        mdns: bool | None = None,
        peers: Iterable[ClusterNode] | None = None,
        paired: bool = False,
    ) -> ClusterNode:
        """Make a node (not started), with an address on the LAN.

        `paired`: the node is given no secret; set `node.process.code` to the
        code of an invitation (`scenarios.invite`) before starting it.

        Discovery, unless `mdns` or `peers` say otherwise: on a real LAN, mDNS
        and no static peers; on loopback, no mDNS and, as static peers, every
        other node with the same secret added by the time this one starts
        (add nodes that start late early on, so the others know them).
        """
        if any(n.name == name for n in self.nodes):
            raise HarnessError(f"two nodes named {name}")
        host = self.lan.add_host(name)
        base = self.workdir / name
        process = NodeProcess(
            secret_file=None if paired else secret_file or self.secret_file,
            data_dir=base / "data",
            mountpoint=base / "mnt",
            name=name,
            prefix=host.command_prefix(),
            log_path=self.workdir / f"{name}.log",
        )
        node = ClusterNode(
            name=name,
            host=host,
            process=process,
            mdns=self.lan.real if mdns is None else mdns,
            peers=None if peers is None and not self.lan.real else list(peers or []),
            volume=secret_file or self.secret_file,
        )
        self.nodes.append(node)
        return node

    def join_args(self, node: ClusterNode) -> list[str]:
        """What `dfs-peer join` needs besides the secret, data dir, name and mountpoint."""
        args = ["--listen", node.host.address]
        if not node.mdns:
            args.append("--no-mdns")
        peers = node.peers
        if peers is None:
            peers = [n for n in self.nodes if n is not node and n.volume == node.volume]
        for peer in peers:
            args += ["--peer", peer.host.address]
        return args

    def start(self, *nodes: ClusterNode, wait: bool = True) -> None:
        """Start the nodes at once and (unless not `wait`) wait until all are
        mounted and answer status."""
        for node in nodes:
            node.process.extra = self.join_args(node)
            node.process.start(wait=False)
            node.up = True
        if wait:
            self.wait_started(*nodes)

    def start_nodes(self, *names: str, **kwargs: Any) -> list[ClusterNode]:
        """Add and start nodes, reporting the step."""
        with self.report.step(f"start {', '.join(names)}") as step:
            nodes = [self.add(name, **kwargs) for name in names]
            self.start(*nodes)
            step.text = f"started and mounted {', '.join(names)}"
        return nodes

    def wait_started(self, *nodes: ClusterNode) -> None:
        """Until the nodes are mounted and answer status; learn their ids."""
        for node in nodes:
            node.process.wait_mounted()
            status = node.status()
            node.node_id = str(status["node_id"])
            if status.get("listen") != node.host.address:
                raise self.failure(
                    f"node {node.name} listens on {status.get('listen')!r}, "
                    f"not on {node.host.address} as told",
                    nodes=[node],
                )

    def stop(self, node: ClusterNode) -> int | None:
        """SIGTERM: flush, unmount and exit 0, as a user stopping the node."""
        node.up = False
        code = node.process.stop()
        if code != 0:
            raise HarnessError(
                f"node {node.name} exited with {code} on SIGTERM (expected 0)\n" + node.log_tail()
            )
        return code

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL, as a crash: nothing is flushed; the dead mount is cleared."""
        node.up = False
        node.process.kill()

    def restart(self, node: ClusterNode) -> None:
        """Start a stopped or killed node again on the same data dir and address."""
        if node.running():
            raise HarnessError(f"node {node.name} is still running")
        self.start(node)

    def cut(self, node: ClusterNode) -> None:
        """Partition `node` from the LAN (its link goes down)."""
        self.lan.cut(node.host)

    def heal(self, node: ClusterNode) -> None:
        self.lan.heal(node.host)

    def allow_errors(self, node: ClusterNode, pattern: str) -> None:
        """Allow `node`'s log records (with any traceback) that `pattern` finds,
        which would otherwise fail the run."""
        node.allowed_errors.append(re.compile(pattern))

    def members(self) -> list[ClusterNode]:
        """The nodes up (started, not stopped) that hold the volume's secret."""
        return [n for n in self.nodes if n.up and n.volume == self.secret_file]

    # --- waiting ----------------------------------------------------------

    def failure(
        self, what: str, detail: str = "", nodes: Sequence[ClusterNode] = ()
    ) -> HarnessError:
        """A HarnessError saying `what`, then `detail`, then the nodes' log tails."""
        shown = list(nodes) or self.nodes
        states = "\n".join(f"  {n.name}: {self.describe_status(n)}" for n in shown)
        tails = "\n".join(f"  log of {n.name} (last lines):\n{n.log_tail()}" for n in shown)
        return HarnessError("\n".join(part for part in (what, detail, states, tails) if part))

    def describe_status(self, node: ClusterNode) -> str:
        """One line of what `node`'s status says about its sync, ids shown as names."""
        if not node.running():
            return "not running"
        try:
            status = node.status()
        except (OSError, HarnessError) as exc:
            return f"status failed: {exc!r}"
        names = {n.node_id: n.name for n in self.nodes if n.node_id}

        def vv(raw: object) -> str:
            items = dict(raw) if isinstance(raw, dict) else {}
            return (
                "{"
                + ", ".join(f"{names.get(k, k[:8])}:{v}" for k, v in sorted(items.items()))
                + "}"
            )

        peers = ", ".join(
            f"{p.get('name')}{'' if p.get('connected') else ' (not connected)'}"
            for p in status.get("peers", [])
        )
        sync = status.get("sync") or {}
        return (
            f"{status.get('operations')} ops, {status.get('blocks')} blocks, holds {vv(status.get('version_vector'))}, "
            f"behind {sync.get('operations_behind')} ops / {sync.get('blocks_missing')} blocks; peers: {peers or 'none'}"
        )

    def check_alive(self, nodes: Sequence[ClusterNode]) -> None:
        for node in nodes:
            if not node.running():
                code = node.process.proc.returncode if node.process.proc else None
                raise self.failure(f"node {node.name} died (exit code {code})", nodes=[node])

    def wait_until(
        self,
        condition: Callable[[], bool],
        what: str,
        timeout: float = WAIT_TIMEOUT_S,
        nodes: Sequence[ClusterNode] = (),
        interval: float = POLL_S,
        detail: Callable[[], str] | None = None,
    ) -> float:
        """Poll `condition` until true; return the seconds it took.

        OSError from the condition (a file not there yet, a mount busy) counts
        as not yet. Fails fast if one of `nodes` dies.
        """
        watched = list(nodes) or [n for n in self.nodes if n.up]
        start = time.monotonic()
        deadline = start + timeout
        last_error: OSError | None = None
        while True:
            try:
                if condition():
                    return time.monotonic() - start
            except OSError as exc:
                last_error = exc
            self.check_alive(watched)
            if time.monotonic() > deadline:
                extra = detail() if detail is not None else ""
                if last_error is not None:
                    extra = f"{extra}\n  last error: {last_error!r}".strip("\n")
                raise self.failure(
                    f"timed out after {duration(timeout)} waiting for {what}", extra, watched
                )
            time.sleep(interval)

    def wait_file(
        self, node: ClusterNode, rel: str, content: bytes, timeout: float = WAIT_TIMEOUT_S
    ) -> float:
        """Until `node`'s mount shows `rel` with exactly `content`."""
        path = node.path(rel)

        def shows() -> bool:
            return path.stat().st_size == len(content) and path.read_bytes() == content

        def what_it_shows() -> str:
            try:
                data = path.read_bytes()
            except OSError as exc:
                return f"  {node.name} shows {rel}: {exc!r}"
            return f"  {node.name} shows {rel} with {len(data)} B: {data[:80]!r}"

        return self.wait_until(
            shows,
            f"{node.name} to show {rel} ({len(content)} B)",
            timeout,
            detail=what_it_shows,
            interval=0.005,
        )

    def wait_gone(self, node: ClusterNode, rel: str, timeout: float = WAIT_TIMEOUT_S) -> float:
        path = node.path(rel)
        return self.wait_until(
            lambda: not path.exists() and not path.is_symlink(),
            f"{rel} to disappear from {node.name}",
            timeout,
            interval=0.005,
        )

    def wait_connected(
        self, nodes: Sequence[ClusterNode] | None = None, timeout: float = WAIT_TIMEOUT_S
    ) -> float:
        """Until each node's status lists every other one as a connected peer."""
        group = list(nodes) if nodes is not None else self.members()
        ids = {n.node_id: n for n in group}

        def connected(node: ClusterNode) -> set[str]:
            peers = node.status().get("peers", [])
            return {str(p["id"]) for p in peers if p.get("connected")}

        def all_connected() -> bool:
            return all(connected(n) >= set(ids) - {n.node_id} for n in group)

        def detail() -> str:
            lines = []
            for n in group:
                try:
                    seen = connected(n)
                except OSError as exc:
                    lines.append(f"  {n.name}: status failed: {exc!r}")
                    continue
                names = sorted(ids[i].name for i in seen if i in ids)
                lines.append(f"  {n.name} is connected to: {', '.join(names) or 'nobody'}")
            return "\n".join(lines)

        return self.wait_until(
            all_connected,
            f"{', '.join(n.name for n in group)} to connect to each other",
            timeout,
            nodes=group,
            interval=0.05,
            detail=detail,
        )

    def version_vectors(self, nodes: Sequence[ClusterNode]) -> dict[str, dict[str, int]]:
        return {n.name: dict(n.status().get("version_vector") or {}) for n in nodes}

    def wait_converged(
        self, nodes: Sequence[ClusterNode] | None = None, timeout: float = CONVERGE_TIMEOUT_S
    ) -> Tree:
        """Until every mount shows the same tree (paths, kinds, modes, sizes,
        contents, link targets) and the nodes hold the same operations; return it.

        Contents are read only once the cheap parts (listing, sizes, version
        vectors) agree, so waiting on large trees stays affordable.
        """
        group = list(nodes) if nodes is not None else self.members()
        if len(group) < 2:
            raise HarnessError("convergence needs at least two nodes")
        last: dict[str, Tree] = {}
        last_vv: dict[str, dict[str, int]] = {}

        def equal(trees: dict[str, Tree] | dict[str, dict[str, int]]) -> bool:
            values = list(trees.values())
            return all(v == values[0] for v in values[1:])

        def converged() -> bool:
            nonlocal last, last_vv
            last = {n.name: snapshot(n.mount, contents=False) for n in group}
            if not equal(last):
                return False
            last_vv = self.version_vectors(group)
            if not equal(last_vv):
                return False
            last = {n.name: snapshot(n.mount, contents=True) for n in group}
            return equal(last)

        def detail() -> str:
            text = diff(last) or "  the trees are equal, but the version vectors differ:"
            if last_vv and not equal(last_vv):
                ids = {n.node_id: n.name for n in self.nodes}
                for name, vv in last_vv.items():
                    shown = {ids.get(k, k[:8]): v for k, v in sorted(vv.items())}
                    text += f"\n  {name} holds {shown}"
            return text

        self.wait_until(
            converged,
            f"the mounts of {', '.join(n.name for n in group)} to converge",
            timeout,
            nodes=group,
            interval=0.05,
            detail=detail,
        )
        return next(iter(last.values()))


def is_bad_record(record: str) -> bool:
    if TRACEBACK in record:
        return True
    match = LOG_RECORD.match(record)
    return match is not None and match["level"] in ("ERROR", "CRITICAL")


def log_records(text: str) -> list[str]:
    """A node log split into records, each with the lines that follow it."""
    starts = [m.start() for m in LOG_RECORD.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    return [text[a:b].rstrip("\n") for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


@contextmanager
def _interrupts_ignored() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM meanwhile (only the main thread can)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
