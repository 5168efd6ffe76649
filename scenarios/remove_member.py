"""A machine removed for good is shut out; a member away at the time catches up.

A, B and C share a volume on a LAN of network namespaces (no mDNS: static
peers). An eavesdropper records every frame on B's link (a raw socket on
its end of the veth; TCP streams put back together): what B pulls from A,
blocks included. All three converge on a few files. B is
cut off the LAN and writes a file while away. `dfs-peer remove C` on A
refuses A itself and an unknown name with one line each, then removes C:
A writes new files under the new key epoch. Expected: C learns it was
removed and shows none of the new files; A refuses C's requests (an
authenticated 401 naming the key epoch). B comes back, is refused under
its old epoch, catches up on the rotation from A and converges with A (B's
file written while away included); B then refuses C too. The sealed blocks
written after the rotation are in the capture, and none opens under any key
C holds (the root and whatever C's own log lets it open).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from pathlib import Path

from peer import epochs
from peer.errors import CorruptBlock
from peer.identity import load_or_create
from peer.keys import VolumeKeys
from peer.node import DB_NAME
from peer.sealing import EPOCH_BLOCK_VERSION, LogEntry, open_block
from peer.secret import parse_secret
from scenarios.cluster import Cluster, ClusterNode
from scenarios.gc_safety import cli
from scenarios.harness import HarnessError
from scenarios.workload import write_file

NEEDS_REAL_LAN = True
# Small files: each sealed block fits in one read of the relay, so the
# capture holds it whole.
NEW_FILES = 8


class Sniffer:
    """Every frame on a root-namespace interface, recorded by a thread."""

    def __init__(self, iface: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self.sock.bind((iface, 0))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(1 << 18))
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def streams(self) -> bytes:
        """The TCP payload of every connection seen, each direction in order."""
        flows: dict[tuple[bytes, int, bytes, int], dict[int, bytes]] = {}
        for f in self.frames:
            if len(f) < 34 or f[12:14] != b"\x08\x00" or f[23] != 6:  # IPv4, TCP
                continue
            ip = f[14:]
            ihl = (ip[0] & 15) * 4
            tcp = ip[ihl : int.from_bytes(ip[2:4], "big")]
            if len(tcp) < 20:
                continue
            payload = tcp[(tcp[12] >> 4) * 4 :]
            if payload:
                flow = (
                    ip[12:16],
                    int.from_bytes(tcp[0:2], "big"),
                    ip[16:20],
                    int.from_bytes(tcp[2:4], "big"),
                )
                flows.setdefault(flow, {}).setdefault(int.from_bytes(tcp[4:8], "big"), payload)
        out = []
        for segments in flows.values():
            buf = bytearray()
            end = None
            for seq in sorted(segments):
                data = segments[seq]
                if end is not None and seq < end:
                    data = data[end - seq :]  # a retransmission overlaps what came
                buf += data
                end = max(end or 0, seq + len(segments[seq]))
            out.append(bytes(buf))
        return b"\n--\n".join(out)


def _logged(node: ClusterNode, text: str) -> bool:
    return text in node.process.log_text()


def _one_line(done: object) -> str:
    stderr = str(getattr(done, "stderr", "")).strip()
    lines = stderr.splitlines()
    if getattr(done, "returncode", 0) == 0 or len(lines) != 1:
        raise HarnessError(f"expected a one-line refusal, got {done!r}")
    return lines[0]


def _store_blocks(node: ClusterNode) -> list[tuple[bytes, bytes]]:
    db = node.process.data_dir / DB_NAME
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [(bytes(i), bytes(s)) for i, s in conn.execute("SELECT id, sealed FROM blocks")]
    finally:
        conn.close()


def _keys_of(node: ClusterNode, secret_file: Path) -> VolumeKeys:
    """Every key `node` holds: the root's, and any epoch its own log opens to it."""
    keys = VolumeKeys.from_root(parse_secret(secret_file.read_text().strip()))
    identity = load_or_create(node.process.data_dir)
    epochs.bind(keys, identity, node.process.data_dir)
    db = node.process.data_dir / DB_NAME
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT node, seq, sealed, sig, prev FROM log").fetchall()
    finally:
        conn.close()
    entries = [LogEntry(bytes(n), s, bytes(x), bytes(g), bytes(p or b"")) for n, s, x, g, p in rows]
    epochs.take_entries(keys, entries)
    return keys


def run(c: Cluster) -> None:
    a = c.add("A", mdns=False)
    b = c.add("B", mdns=False)
    nc = c.add("C", mdns=False)
    a.peers, b.peers, nc.peers = [b, nc], [a, nc], [a, b]
    for n in (a, b, nc):
        # A removed node's refusals, and the key epoch it lacks, are logged on purpose.
        c.allow_errors(n, r"removed|key epoch|refus|401")
    assert b.host.veth is not None
    sniffer = Sniffer(b.host.veth)
    try:
        with c.report.step("start A, B and C; an eavesdropper records B's link"):
            c.start(a, b, nc)
            c.wait_connected([a, b, nc])
        with c.report.step("A, B and C converged on a few files"):
            for i in range(3):
                write_file(a.path(f"before-{i}.txt"), f"shared before the removal {i}\n".encode())
            c.wait_converged([a, b, nc])

        with c.report.step("B is cut off the LAN and writes a file while away"):
            c.cut(b)
            write_file(b.path("while-away.txt"), b"B wrote this while away\n")

        with c.report.step(
            "remove refuses this node itself and unknown names, in one line"
        ) as step:
            own = _one_line(cli(a, "remove", "A"))
            unknown = _one_line(cli(a, "remove", "nobody"))
            assert own.startswith("dfs-peer: "), own
            assert "itself" in own, own
            assert unknown.startswith("dfs-peer: "), unknown
            step.text = f"remove refused: {own!r}; {unknown!r}"

        with c.report.step("dfs-peer remove C on A") as step:
            t0 = time.monotonic()
            done = cli(a, "remove", "C")
            took = time.monotonic() - t0
            assert done.returncode == 0, f"remove C failed: {done.stderr}"
            assert "removed C" in done.stdout, done.stdout
            c.report.figure("remove_command_s", round(took, 2))
            step.text = f"on A: {done.stdout.strip()} ({took:.2f} s, process start included)"

        new = {f"after-{i}.txt": os.urandom(1500).hex().encode() for i in range(NEW_FILES)}
        with c.report.step("A writes new files under the new key epoch"):
            for name, data in new.items():
                write_file(a.path(name), data)

        with c.report.step("C learns it was removed; A refuses C with a 401") as step:
            t0 = time.monotonic()
            c.wait_until(
                lambda: _logged(nc, "this node was removed from the volume"),
                "C to learn it was removed",
                timeout=60,
                nodes=[a, nc],
            )
            c.report.figure("removed_node_told_s", round(time.monotonic() - t0, 2))
            c.wait_until(
                lambda: _logged(a, f"refused peer {nc.node_id[:8]}"),
                "A to refuse C",
                timeout=60,
                nodes=[a, nc],
            )
            step.text = "C logged that it was removed; A logged its refusals of C's requests"

        with c.report.step("B comes back, catches up on the rotation, converges") as step:
            t0 = time.monotonic()
            c.heal(b)
            for name, data in new.items():
                c.wait_file(b, name, data, timeout=120)
            c.wait_file(a, "while-away.txt", b"B wrote this while away\n", timeout=120)
            tree = c.wait_converged([a, b], timeout=120)
            took = time.monotonic() - t0
            c.report.figure("offline_member_caught_up_s", round(took, 2))
            assert _logged(b, "caught up on key epochs"), "B did not catch up by /epochs"
            assert b.status()["keys"]["epoch"] == 1, b.status()["keys"]
            assert nc.status()["keys"]["removed_here"], nc.status()["keys"]
            assert set(new) <= set(tree)
            assert "while-away.txt" in tree
            step.text = (
                f"B caught up on the rotation and converged with A in {took:.1f} s "
                f"({len(tree)} entries)"
            )

        with c.report.step("C shows none of the new files; B refuses C too") as step:
            c.wait_until(
                lambda: _logged(b, f"refused peer {nc.node_id[:8]}"),
                "B to refuse C",
                timeout=90,
                nodes=[b, nc],
            )
            shown = set(os.listdir(nc.mount))
            assert not (shown & set(new)), f"C shows files written after its removal: {shown}"
            assert {f"before-{i}.txt" for i in range(3)} <= shown, shown
            step.text = f"C still shows what it held ({len(shown)} names), nothing newer"
    finally:
        sniffer.close()

    with c.report.step("blocks written after the rotation do not open under C's keys") as step:
        recorded = sniffer.streams()
        later = [(bid, s) for bid, s in _store_blocks(a) if s[:1] == bytes([EPOCH_BLOCK_VERSION])]
        assert len(later) >= NEW_FILES, f"A holds {len(later)} blocks of the new epoch"
        seen = [(bid, s) for bid, s in later if s in recorded]
        assert len(seen) >= NEW_FILES, (
            f"the capture holds {len(seen)} of the {len(later)} new sealed blocks whole"
        )
        keys = _keys_of(nc, nc.volume)
        held = [e.id for e in keys.epochs()]
        for bid, sealed in seen:
            assert sealed[1:17] not in held, "C holds the key epoch of a new block"
            try:
                open_block(keys, bid, sealed)
            except CorruptBlock:
                continue
            raise AssertionError(f"block {bid.hex()[:8]} from the capture opened under C's keys")
        for data in new.values():
            assert data not in recorded, "a new file's content is in the capture in plaintext"
        c.report.figure("captured_new_blocks", len(seen))
        step.text = (
            f"{len(seen)} sealed blocks of the new epoch are in the capture of B's link "
            f"({len(sniffer.frames)} frames, {len(recorded)} bytes of TCP payload); none opens under the {len(held)} key epoch(s) C holds"
        )
