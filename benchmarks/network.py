"""Network benchmark: real nodes on a bridged LAN (as root), figures beside targets.

Prints, in one run:

1. propagation latency of a small append on A until B's mount shows it
   (p50 and max over `--trials`), from the append's close() on A to the moment
   B's mount shows the new size and content (polled every 0.5 ms);
2. the time a fresh node takes to sync a corpus of 2,000 x 4 KiB files plus
   8 x 25 MiB files: until its status says it holds everything, and until its
   mount is verified byte for byte;
3. the bytes on B's link for a 4 KiB overwrite in the middle of a 100 MiB
   file, B having one peer (A, static, mDNS off), next to the bytes the same
   link carried while idle for as long, and the 128 KiB block size.

Targets: p50 latency under 200 ms; the overwrite moves under three blocks'
worth (384 KiB). A benchmark never gates CI: it prints and exits 0 unless
something broke.

    python -m benchmarks.network [--trials 30] [--small-files 2000] [--large-files 8]
                                 [--large-mib 25] [--big-mib 100] [--loopback]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scenarios.cluster import Cluster, ClusterNode
from scenarios.network import LinkCounters
from scenarios.report import Report, duration
from scenarios.trees import human_bytes
from scenarios.workload import make_corpus, payload, write_file, write_large

BLOCK_SIZE = 128 * 1024  # crdt.ops.BLOCK_SIZE; printed for comparison
LATENCY_TARGET_S = 0.200
OVERWRITE_TARGET = 3 * BLOCK_SIZE
OVERWRITE_SIZE = 4096
POLL_S = 0.0005
SETTLE_S = 0.5  # the link counts as quiet after this long without a byte
IDLE_WINDOW_S = 3.0


def holds_all_of(s: dict[str, Any], ref: dict[str, Any]) -> bool:
    """Whether the node whose `status` is `s` holds every operation and block
    of the one whose status is `ref`, with nothing left to fetch."""
    sync = s.get("sync") or {}
    ours, theirs = s.get("version_vector") or {}, ref.get("version_vector") or {}
    return bool(
        all(ours.get(node, 0) >= seq for node, seq in theirs.items())
        and int(s["blocks"]) >= int(ref["blocks"])
        and not sync.get("blocks_missing")
        and not sync.get("operations_behind")
    )


def verdict(ok: bool) -> str:
    return "meets the target" if ok else "MISSES the target"


def quiet_pair(c: Cluster) -> tuple[ClusterNode, ClusterNode]:
    """A and B, each the other's only (static) peer, mDNS off: no LAN chatter."""
    a = c.add("A", mdns=False, peers=[])
    b = c.add("B", mdns=False, peers=[a])
    a.peers = [b]
    c.start(a, b)
    c.wait_connected([a, b])
    return a, b


def latency(c: Cluster, a: ClusterNode, b: ClusterNode, trials: int) -> list[float]:
    """Seconds from each append's close() on A until B's mount shows it."""
    rel = "latency.log"
    write_file(a.path(rel), b"")
    c.wait_file(b, rel, b"")
    expected = b""
    src, dst = a.path(rel), b.path(rel)
    times = []
    for i in range(trials):
        line = f"append {i:04d} from A\n".encode()
        expected += line
        with open(src, "ab") as f:
            f.write(line)
        t0 = time.perf_counter()
        deadline = t0 + 10
        while True:
            try:
                if os.stat(dst).st_size == len(expected) and dst.read_bytes() == expected:
                    break
            except OSError:
                pass
            if time.perf_counter() > deadline:
                raise c.failure(f"B did not show append {i} within 10 s", nodes=[a, b])
            time.sleep(POLL_S)
        times.append(time.perf_counter() - t0)
        time.sleep(0.02)  # let the next append be a separate push, not a batch
    return times


def wait_quiet(c: Cluster, b: ClusterNode, limit: float = 5.0) -> LinkCounters:
    """B's link counters once no byte has moved for SETTLE_S (or after `limit`)."""
    last = c.lan.counters(b.host)
    quiet_since = time.monotonic()
    end = quiet_since + limit
    while time.monotonic() < end:
        time.sleep(0.05)
        now = c.lan.counters(b.host)
        if now.total != last.total:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= SETTLE_S:
            break
    return last


def overwrite_bytes(
    c: Cluster, a: ClusterNode, b: ClusterNode, big_mib: int
) -> tuple[LinkCounters, LinkCounters, float, float]:
    """(traffic for the overwrite, idle traffic over as long, seconds to show, seconds measured)."""
    size = big_mib << 20
    write_large(a.path("big.bin"), size, seed="big")
    c.wait_converged([a, b], timeout=300)

    # Idle traffic first, over the time the overwrite will be given.
    window = IDLE_WINDOW_S
    before_idle = wait_quiet(c, b)
    time.sleep(window)
    idle = c.lan.counters(b.host) - before_idle

    offset = size // 2 + BLOCK_SIZE // 3  # inside one block, away from its edges
    new = payload("overwrite", OVERWRITE_SIZE)
    before = wait_quiet(c, b)
    t0 = time.monotonic()
    with open(a.path("big.bin"), "r+b") as f:
        f.seek(offset)
        f.write(new)

    def shows() -> bool:
        with open(b.path("big.bin"), "rb") as f:
            f.seek(offset)
            return f.read(OVERWRITE_SIZE) == new

    seen = c.wait_until(shows, "B to show the 4 KiB overwrite", timeout=30, nodes=[a, b])
    while time.monotonic() - t0 < window:
        time.sleep(0.05)
    after = wait_quiet(c, b)
    measured = time.monotonic() - t0
    return after - before, idle, seen, measured


def fresh_sync(
    c: Cluster, small_files: int, large_files: int, large_mib: int, report: Report
) -> None:
    a = c.add("A", mdns=False, peers=[])
    # Added now, so that A knows F's address as F knows A's.
    fresh = c.add("F", mdns=False, peers=[a])
    a.peers = [fresh]
    c.start(a)
    with report.step("corpus written on A") as step:
        corpus = make_corpus(a.mount, small_files, dirs=8, size=4096, seed=1)
        os.mkdir(a.path("large"))
        for i in range(large_files):
            write_large(a.path(f"large/{i}.bin"), large_mib << 20, seed=f"large-{i}")
        total = corpus.bytes + large_files * (large_mib << 20)
        a_status = a.status()
        step.text = (
            f"corpus written on A: {small_files:,} x {human_bytes(4096)} + {large_files} x "
            f"{large_mib} MiB = {human_bytes(total)} ({a_status['blocks']} blocks)"
        )
    started = time.monotonic()
    c.start(fresh, wait=False)

    def holds_everything() -> bool:
        return holds_all_of(fresh.status(), a.status())

    c.wait_until(holds_everything, "the fresh node F to hold everything", 600, [a, fresh], 0.02)
    held = time.monotonic() - started
    report.timed("fresh node F holds every operation and block (status), from its start", held)
    c.wait_started(fresh)
    c.wait_converged([a, fresh], timeout=600)
    verified = time.monotonic() - started
    report.timed(
        "F's mount verified identical to A's (every byte hashed), from its start", verified
    )
    report.note(f"sync rate: {human_bytes(total / held)}/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--small-files", type=int, default=2000)
    p.add_argument("--large-files", type=int, default=8)
    p.add_argument("--large-mib", type=int, default=25)
    p.add_argument("--big-mib", type=int, default=100)
    p.add_argument("--loopback", action="store_true", help="loopback even as root (no byte counts)")
    args = p.parse_args(argv)
    if args.trials < 20:
        p.error("--trials must be at least 20")

    workdir = Path(tempfile.mkdtemp(prefix="dfs-bench-network-"))
    ok = False
    try:
        report = Report("dfs-peer network benchmark")
        for part in ("pair", "fresh"):
            (workdir / part).mkdir()
        with Cluster(workdir / "pair", report, loopback=args.loopback) as c:
            report.note(f"LAN: {c.lan.description}")
            with report.step("A and B started, each the other's only peer, mDNS off"):
                a, b = quiet_pair(c)

            with report.step(f"{args.trials} appends on A, each polled on B"):
                times = latency(c, a, b, args.trials)
            p50 = statistics.median(times)
            report.note(
                f"propagation of a small append A -> B: p50 {duration(p50)}, max {duration(max(times))}, "
                f"min {duration(min(times))}  (target: p50 < {duration(LATENCY_TARGET_S)}: "
                f"{verdict(p50 < LATENCY_TARGET_S)})"
            )

            if c.real_lan:
                with report.step(f"4 KiB overwrite in the middle of a {args.big_mib} MiB file"):
                    moved, idle, seen, measured = overwrite_bytes(c, a, b, args.big_mib)
                report.note(
                    f"B's link carried {human_bytes(moved.total)} (received {human_bytes(moved.rx_bytes)}, "
                    f"sent {human_bytes(moved.tx_bytes)}) over {duration(measured)}; B showed the change after "
                    f"{duration(seen)}"
                )
                report.note(
                    f"idle over {duration(IDLE_WINDOW_S)}: {human_bytes(idle.total)}; block size "
                    f"{human_bytes(BLOCK_SIZE)}; target < {human_bytes(OVERWRITE_TARGET)} (3 blocks): "
                    f"{verdict(moved.total < OVERWRITE_TARGET)}"
                )
            else:
                report.note("bytes on the wire: n/a (needs root: per-node links in namespaces)")

        with Cluster(workdir / "fresh", report, loopback=args.loopback) as c:
            fresh_sync(c, args.small_files, args.large_files, args.large_mib, report)
        ok = True
    finally:
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"node logs and data kept in {workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
