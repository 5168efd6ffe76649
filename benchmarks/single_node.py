"""Single-node benchmark: the mount beside a tmpfs directory, in one run.

Prints sequential write and read MB/s of a 256 MiB file (the read after a
remount, so it is not served by the kernel's page cache) and the time to create
and then stat 5,000 small files, on the dfs-peer mount and on tmpfs, with the
ratios. With --profile, the node runs under cProfile and the top functions are
printed, to show where the time goes.

    python -m benchmarks.single_node [--size-mib 256] [--files 5000] [--profile]
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from scenarios.harness import NodeProcess, new_secret

CHUNK = 1 << 20


def drop_caches() -> None:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def seq_write(path: Path, size_mib: int) -> float:
    # Distinct random data, made before the clock starts: repeating one chunk
    # would measure deduplication (equal blocks have equal ids), not writing.
    data = memoryview(os.urandom(size_mib * CHUNK))
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for i in range(size_mib):
            f.write(data[i * CHUNK : (i + 1) * CHUNK])
        f.flush()
        os.fsync(f.fileno())
    return size_mib / (time.perf_counter() - t0)


def seq_read(path: Path, size_mib: int) -> float:
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(CHUNK):
            pass
    return size_mib / (time.perf_counter() - t0)


def small_files(root: Path, n: int) -> tuple[float, float]:
    d = root / "small"
    d.mkdir()
    payload = b"x" * 100
    t0 = time.perf_counter()
    for i in range(n):
        with open(d / f"f{i:05d}", "wb") as f:
            f.write(payload)
    created = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n):
        os.stat(d / f"f{i:05d}")
    stated = time.perf_counter() - t0
    return created, stated


def run_suite(
    root: Path, size_mib: int, files: int, remount: Callable[[], None]
) -> dict[str, float]:
    big = root / "big.bin"
    w = seq_write(big, size_mib)
    remount()
    drop_caches()
    r = seq_read(big, size_mib)
    created, stated = small_files(root, files)
    return {"write MB/s": w, "read MB/s": r, "create s": created, "stat s": stated}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--profile", action="store_true", help="profile the node with cProfile")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dfs-bench-"))
    tmpfs = work / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", str(tmpfs)], check=True)
    secret = work / "secret"
    secret.write_text(new_secret())
    prof = work / "node.prof"
    if args.profile:
        os.environ["DFS_PEER_PROFILE"] = str(prof)
    node = NodeProcess(
        secret,
        work / "data",
        work / "mnt",
        name="bench",
        extra=["--no-mdns", "--listen", "127.0.0.1:0"],
    )
    try:
        node.start()

        def remount() -> None:
            node.stop()
            node.start()

        results = {
            "dfs-peer": run_suite(node.mountpoint, args.size_mib, args.files, remount),
            "tmpfs": run_suite(tmpfs, args.size_mib, args.files, lambda: None),
        }
        node.stop()
    finally:
        node.stop()
        subprocess.run(["umount", str(tmpfs)], check=False)
    store = sum(p.stat().st_size for p in (work / "data").rglob("*") if p.is_file())
    print(f"\nsingle node, {args.size_mib} MiB file, {args.files} small files")
    print(f"{'':14}{'dfs-peer':>12}{'tmpfs':>12}{'ratio':>10}")
    for key in results["dfs-peer"]:
        a, b = results["dfs-peer"][key], results["tmpfs"][key]
        ratio = a / b if b else float("inf")
        print(f"{key:14}{a:12.2f}{b:12.2f}{ratio:10.2f}")
    print(f"store size after the run: {store / 2**20:.1f} MiB")
    profiles = sorted(str(p) for p in work.glob("node.prof.*"))
    if args.profile and profiles:
        print("\nwhere the node's time went (cProfile over every node run, by own time):")
        pstats.Stats(*profiles, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
