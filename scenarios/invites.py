"""Pairing as scenarios and tests drive it: `dfs-peer invite`, one-off joins by
code, and two tools run on a host of the LAN (`python -m scenarios.invites`):

    relay LISTEN TARGET CAPTURE   forward TCP from LISTEN to TARGET, appending
                                  every byte both ways to CAPTURE (an eavesdropper)
    guess TARGET NUMBER COUNT     try COUNT random codes of invitation NUMBER at
                                  TARGET; print how each attempt ended, as JSON

Invariant: every process started here is stopped by `close()` or by its
context manager, and dies with the process that started it.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import TracebackType

from scenarios.cluster import Cluster, ClusterNode
from scenarios.harness import HarnessError, _die_with_parent, dfs_peer_command, wait_for

REPO = Path(__file__).resolve().parents[1]
CODE_LINE = re.compile(r"invitation code: (\S+)")
JOIN_TIMEOUT_S = 90.0


class _Lines:
    """A child's output, read line by line on a thread as it comes."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line.rstrip("\n"))

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _reap(proc: subprocess.Popen[str], *readers: _Lines) -> None:
    """Stop `proc` if it still runs, read what it printed, close its pipes."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for reader in readers:
        reader.join(5)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class Invite:
    """`dfs-peer invite` on a member, read as it prints."""

    def __init__(self, member: ClusterNode, ttl: str = "10m") -> None:
        self.member = member
        self.proc = subprocess.Popen(
            [
                *dfs_peer_command(),
                "invite",
                "--data-dir",
                str(member.process.data_dir),
                "--ttl",
                ttl,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_die_with_parent,
        )
        self.out = _Lines(self.proc.stdout)
        self.err = _Lines(self.proc.stderr)

    def __enter__(self) -> Invite:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def code(self, timeout: float = 30.0) -> str:
        """The code it printed."""
        found: list[str] = []

        def printed() -> bool:
            if self.proc.poll() is not None and not found:
                self.out.join(2)
            for line in self.out.lines:
                if m := CODE_LINE.search(line):
                    found.append(m[1])
                    return True
            if self.proc.poll() is not None:
                self.err.join(2)
                raise HarnessError(
                    f"`dfs-peer invite` exited {self.proc.returncode}: {self.output()}"
                )
            return False

        wait_for(printed, timeout, "`dfs-peer invite` to print a code")
        return found[0]

    def wait_printed(self, pattern: str, timeout: float = 30.0) -> str:
        """Until a line it printed (stdout or stderr) matches `pattern`; that line."""
        regex = re.compile(pattern)
        hit: list[str] = []

        def printed() -> bool:
            hit.extend(line for line in [*self.out.lines, *self.err.lines] if regex.search(line))
            return bool(hit)

        try:
            wait_for(printed, timeout, f"`dfs-peer invite` to print {pattern!r}")
        except HarnessError as exc:
            raise HarnessError(f"{exc}; it printed:\n{self.output()}") from None
        return hit[0]

    def wait(self, timeout: float = 60.0) -> int:
        """Its exit code, once it has exited."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(
                f"`dfs-peer invite` still runs; it printed:\n{self.output()}"
            ) from None
        self.out.join(5)
        self.err.join(5)
        return code

    def output(self) -> str:
        return "\n".join(f"    invite| {line}" for line in [*self.out.lines, *self.err.lines])

    def close(self) -> None:
        _reap(self.proc, self.out, self.err)


def try_join(
    c: Cluster, joiner: ClusterNode, code: str, inviter: str, timeout: float = JOIN_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """`dfs-peer join --code CODE --peer INVITER` on `joiner`'s host, expected
    to fail before it mounts (a wrong, used or expired code); its result."""
    cmd = [
        *joiner.host.command_prefix(),
        *dfs_peer_command(),
        "join",
        "--code",
        code,
        "--peer",
        inviter,
        "--no-mdns",
        "--data-dir",
        str(joiner.process.data_dir),
        "--name",
        joiner.name,
        "--listen",
        joiner.host.address,
        str(joiner.mount),
    ]
    joiner.mount.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise HarnessError(
            f"`dfs-peer join --code` on {joiner.name} still runs after {timeout:.0f}s"
        ) from None
    if out.returncode == 0:
        raise HarnessError(
            f"`dfs-peer join --code {code}` on {joiner.name} succeeded:\n{out.stdout}"
        )
    return out


class Tool:
    """`python -m scenarios.invites ...` on a host of the LAN."""

    def __init__(self, host_prefix: list[str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [*host_prefix, sys.executable, "-m", "scenarios.invites", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_die_with_parent,
        )
        self.out = _Lines(self.proc.stdout)
        self.err = _Lines(self.proc.stderr)

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                self.err.join(2)
                raise HarnessError(f"tool exited {self.proc.returncode}: {self.err.text}")
            return "ready" in self.out.lines

        wait_for(ready, timeout, "the tool to be ready")

    def result(self, timeout: float = 120.0) -> dict[str, int]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise HarnessError("the tool did not finish in time") from None
        self.out.join(5)
        self.err.join(5)
        if self.proc.returncode != 0:
            raise HarnessError(f"tool exited {self.proc.returncode}: {self.err.text}")
        parsed: dict[str, int] = json.loads(self.out.lines[-1])
        return parsed

    def close(self) -> None:
        _reap(self.proc, self.out, self.err)


# --- the tools ------------------------------------------------------------------


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _relay(listen: str, target: str, capture: Path) -> None:
    lhost, lport = _hostport(listen)
    thost, tport = _hostport(target)
    out = capture.open("ab", buffering=0)

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                out.write(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(thost, tport)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    server = await asyncio.start_server(serve, lhost, lport)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def _guess(target: str, number: int, count: int) -> dict[str, int]:
    from peer.identity import NodeIdentity
    from peer.net import pairing
    from peer.net.joining import _NotHere, pair_with

    host, port = _hostport(target)
    me = pairing.Joiner("guesser", NodeIdentity.generate().node_id)
    outcomes: Counter[str] = Counter()
    for _ in range(count):
        code = pairing.new_code(number)
        try:
            await pair_with(code, host, port, me)
            outcomes["paired"] += 1
        except pairing.WrongCode:
            outcomes["wrong"] += 1
        except pairing.CodeBurnt:
            outcomes["burnt"] += 1
        except pairing.InviterBusy:
            outcomes["busy"] += 1
        except _NotHere:
            outcomes["not-here"] += 1
        except pairing.DfsError as exc:
            outcomes[type(exc).__name__] += 1
    return dict(outcomes)


def main(argv: list[str]) -> int:
    if argv[:1] == ["relay"] and len(argv) == 4:
        asyncio.run(_relay(argv[1], argv[2], Path(argv[3])))
        return 0
    if argv[:1] == ["guess"] and len(argv) == 4:
        started = time.monotonic()
        result = asyncio.run(_guess(argv[1], int(argv[2]), int(argv[3])))
        result["seconds"] = round(time.monotonic() - started)
        print(json.dumps(result), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
