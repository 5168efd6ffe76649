"""Efficiency at scale: a volume of many small files, beside tmpfs and gocryptfs.

Prints, in one run: creating N small files in N/100 directories, `find` over
them, `dfs-peer status`, node restart time and resident memory, a fresh node
merging all of those files' operations (and blocks) from a peer, sequential
read of a large file (cold: right after a restart; warm: read again), and a
4 KiB random-write workload. Each filesystem figure is shown beside a tmpfs
directory and, when `gocryptfs` is installed, a gocryptfs mount on disk.

    python -m benchmarks.scale [--files 100000] [--big-mib 1024] [--writes 2000]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from scenarios.harness import NodeProcess, free_port, new_secret, query_status, wait_for

CHUNK = 1 << 20


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def create_tree(root: Path, files: int) -> None:
    per_dir = 100
    payload = b"x" * 200
    for d in range((files + per_dir - 1) // per_dir):
        sub = root / "tree" / f"d{d:04d}"
        sub.mkdir(parents=True)
        for i in range(min(per_dir, files - d * per_dir)):
            with open(sub / f"f{i:03d}.txt", "wb") as f:
                f.write(payload + str((d, i)).encode())


def find(root: Path) -> int:
    out = subprocess.run(
        ["find", str(root / "tree"), "-type", "f"], check=True, capture_output=True
    )
    return out.stdout.count(b"\n")


def write_big(path: Path, mib: int) -> None:
    block = bytearray(os.urandom(CHUNK))
    with open(path, "wb") as f:
        for i in range(mib):
            block[:8] = i.to_bytes(8, "big")  # distinct blocks, no dedup
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def read_big(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(CHUNK):
            pass


def random_writes(path: Path, count: int, file_mib: int = 64) -> None:
    rng = random.Random(7)
    page = os.urandom(4096)
    with open(path, "r+b", buffering=0) as f:
        for n in range(count):
            f.seek(rng.randrange(file_mib * 256) * 4096)
            f.write(page)
            if n % 100 == 99:
                os.fsync(f.fileno())
        os.fsync(f.fileno())


@contextmanager
def tmpfs(work: Path) -> Iterator[Path]:
    path = work / "tmpfs"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextmanager
def gocryptfs(work: Path) -> Iterator[Path | None]:
    if shutil.which("gocryptfs") is None:
        yield None
        return
    cipher, plain, pw = work / "gocrypt.cipher", work / "gocrypt.plain", work / "gocrypt.pw"
    cipher.mkdir()
    plain.mkdir()
    pw.write_text("benchmark passphrase\n")
    subprocess.run(
        ["gocryptfs", "-init", "-q", "-passfile", str(pw), "-scryptn", "10", str(cipher)],
        check=True,
    )
    subprocess.run(["gocryptfs", "-q", "-passfile", str(pw), str(cipher), str(plain)], check=True)
    try:
        yield plain
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(plain)], check=False)


def remount_gocryptfs(work: Path) -> None:
    """Drop the gocryptfs mount's page cache the way the dfs-peer side does:
    by remounting it (never /proc/sys/vm/drop_caches: the machines are shared)."""
    cipher, plain, pw = work / "gocrypt.cipher", work / "gocrypt.plain", work / "gocrypt.pw"
    subprocess.run(["fusermount3", "-u", str(plain)], check=True)
    subprocess.run(["gocryptfs", "-q", "-passfile", str(pw), str(cipher), str(plain)], check=True)


def baseline(
    root: Path, args: argparse.Namespace, remount: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """`remount` drops the file system's cache (a no-op for tmpfs, whose pages
    are the data itself)."""
    r: dict[str, float] = {}
    r["create s"] = timed(lambda: create_tree(root, args.files))
    remount()
    r["find s"] = timed(lambda: find(root))
    big = root / "big.bin"
    write_big(big, args.big_mib)
    remount()
    r["read cold MB/s"] = args.big_mib / timed(lambda: read_big(big))
    r["read warm MB/s"] = args.big_mib / timed(lambda: read_big(big))
    r["4k writes/s"] = args.writes / timed(lambda: random_writes(big, args.writes))
    return r


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--writes", type=int, default=2000)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dfs-scale-"))
    secret = work / "secret"
    secret.write_text(new_secret())
    pa, pf = free_port(), free_port()
    a = NodeProcess(
        secret,
        work / "a-data",
        work / "a-mnt",
        name="a",
        extra=["--no-mdns", "--listen", f"127.0.0.1:{pa}"],
    )
    fresh = NodeProcess(
        secret,
        work / "f-data",
        work / "f-mnt",
        name="fresh",
        extra=["--no-mdns", "--listen", f"127.0.0.1:{pf}", "--peer", f"127.0.0.1:{pa}"],
    )
    dfs: dict[str, float] = {}
    others: dict[str, dict[str, float]] = {}
    try:
        a.start()
        mnt = a.mountpoint
        dfs["create s"] = timed(lambda: create_tree(mnt, args.files))
        a.stop()
        t0 = time.perf_counter()
        a.start()
        dfs["restart s"] = time.perf_counter() - t0
        assert a.proc is not None
        dfs["find s"] = timed(lambda: find(mnt))
        dfs["status s"] = timed(lambda: query_status(a.data_dir))
        dfs["RSS MiB"] = rss_mib(a.proc.pid)

        t0 = time.perf_counter()
        fresh.start()

        def caught_up() -> bool:
            mine = query_status(fresh.data_dir)
            theirs = query_status(a.data_dir)
            return (
                mine["version_vector"] == theirs["version_vector"]
                and mine["sync"]["blocks_missing"] == 0
            )

        wait_for(caught_up, 1800, "the fresh node to merge everything", interval=0.2)
        dfs["fresh merge s"] = time.perf_counter() - t0
        assert fresh.proc is not None
        dfs["fresh RSS MiB"] = rss_mib(fresh.proc.pid)
        fresh.stop()

        big = mnt / "big.bin"
        write_big(big, args.big_mib)
        a.stop()
        a.start()  # a remount: the mount's page cache starts empty
        dfs["read cold MB/s"] = args.big_mib / timed(lambda: read_big(big))
        dfs["read warm MB/s"] = args.big_mib / timed(lambda: read_big(big))
        dfs["4k writes/s"] = args.writes / timed(lambda: random_writes(big, args.writes))
        a.stop()
        with tmpfs(work) as t:
            others["tmpfs"] = baseline(t, args)
        with gocryptfs(work) as g:
            if g is not None:
                others["gocryptfs"] = baseline(g, args, lambda: remount_gocryptfs(work))
    finally:
        a.stop()
        fresh.stop()
    store = sum(p.stat().st_size for p in (work / "a-data").rglob("*") if p.is_file())
    names = ["dfs-peer", *others]
    print(
        f"\nscale: {args.files} files in {args.files // 100} directories, {args.big_mib} MiB file"
    )
    print(f"{'':18}" + "".join(f"{n:>12}" for n in names))
    for key, value in dfs.items():
        row = f"{key:18}{value:12.2f}"
        for n in others:
            other = others[n].get(key)
            row += f"{other:12.2f}" if other is not None else f"{'-':>12}"
        print(row)
    print(f"store of the {args.files}-file node: {store / 2**20:.1f} MiB")
    print("targets: restart < 5 s, RSS < 300 MiB, fresh merge < 60 s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
