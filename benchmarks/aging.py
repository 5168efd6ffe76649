"""Costs that grow with the volume's age, each beside its young baseline.

Prints, in one run, four figures and their targets:

1. revival: the cost of one file operation (create, write, unlink) on a node
   after N deletes and one delete that lost to a concurrent write (rule 4),
   beside the same on a fresh node (target <= 1.5x);
2. versions: an fsync'd rewrite of a file that has N versions, beside one
   with 10 (target <= 1.5x);
3. listing: the first `os.listdir` of an N-entry directory on a fresh mount,
   beside gocryptfs (tmpfs if gocryptfs is missing; target <= 2x);
4. stall: the longest wait of a `stat` loop on a node's mount while it merges
   an N-file volume from a peer (adopting its checkpoint, folding, collecting),
   and on the peer's mount while it serves (target < 100 ms).

1 and 2 run nodes in this process (the `Volume` a mount calls, no kernel);
the aged state is made with batched operations, as a peer's would arrive.
3 and 4 run `dfs-peer join` processes with real mounts.

    python -m benchmarks.aging [--entries 100000] [--versions 10000] [--only revival,...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from benchmarks.scale import gocryptfs
from crdt.clock import Hlc
from crdt.ops import ROOT, TRASH, Create, Move, Op, Write
from fuse.protocol import Caller
from peer.fs.volume import ROOT_INODE
from peer.identity import load_or_create
from peer.keys import VolumeKeys
from peer.node import CHECK_NAME, Node, NodeConfig, write_check
from peer.secret import parse_secret
from scenarios.harness import (
    NodeProcess,
    dfs_peer_command,
    free_port,
    new_secret,
    query_status,
    wait_for,
)

CALLER = Caller(uid=0, gid=0, pid=0, umask=0o022)
BATCH = 2000  # operations per commit when ageing a volume
ROUNDS = 5
MOUNT_TIMEOUT_S = 600.0


def make_node(work: Path, name: str, keys: VolumeKeys, keep_history_s: float = 0.0) -> Node:
    data = work / f"{name}-data"
    data.mkdir(parents=True, exist_ok=True)
    config = NodeConfig(
        mountpoint=work / f"{name}-mnt",
        data_dir=data,
        name=name,
        mdns=False,
        keep_history_s=keep_history_s,
    )
    if not (data / CHECK_NAME).exists():
        write_check(data, keys)
    node = Node(config, keys, load_or_create(data))
    node.start()
    return node


def commit_batches(node: Node, make: Callable[[Callable[[], Hlc], int], Op], count: int) -> None:
    """Commit `count` ops made by `make(stamp, i)`, BATCH to a transaction."""
    for start in range(0, count, BATCH):
        end = min(count, start + BATCH)
        node.journal.commit(lambda stamp, s=start, e=end: [make(stamp, i) for i in range(s, e)])


def new_id(i: int, tag: bytes) -> bytes:
    return tag + i.to_bytes(16 - len(tag), "big")


def mkdir(node: Node, parent: bytes, name: bytes, entry: bytes) -> None:
    node.journal.commit(lambda stamp: [Create(stamp(), entry, parent, name, "dir", 0o755, 0, 0)])


_probes = 0


def per_op_ms(node: Node, count: int) -> float:
    """Mean milliseconds of create + write + release + unlink of a new file."""
    global _probes
    vol = node.volume
    t0 = time.perf_counter()
    for _ in range(count):
        _probes += 1
        name = f"probe-{_probes}".encode()
        fh, _ = vol.create(ROOT_INODE, name, 0o644, os.O_RDWR, CALLER)
        vol.write(fh, 0, b"probe")
        vol.release(fh)
        vol.unlink(ROOT_INODE, name)
    return (time.perf_counter() - t0) * 1000 / count


def sync_entries(src: Node, dst: Node) -> None:
    """Hand `src`'s log entries (and their blocks) that `dst` lacks to `dst`."""
    for node_id, top in src.journal.vv.items():
        after = dst.journal.vv.get(node_id, 0)
        entries = src.store.log_after(node_id, after, top - after)
        blocks = [(bid, src.store.get_block(bid)) for bid in src.store.block_ids()]
        dst.journal.merge_remote(entries, blocks=[(b, s) for b, s in blocks if s is not None])


def alternating(
    young: Callable[[int], float], old: Callable[[int], float], probes: int
) -> tuple[float, float]:
    """The best of `ROUNDS` rounds of each, taken in turn: on a shared machine a
    round can lose the CPU for a while, and the minimum is the cost itself."""
    count = max(1, probes // ROUNDS)
    young(2)
    old(2)
    ys, os_ = [], []
    for _ in range(ROUNDS):
        ys.append(young(count))
        os_.append(old(count))
    return min(ys), min(os_)


def revival(work: Path, keys: VolumeKeys, entries: int, probes: int) -> tuple[float, float]:
    fresh = make_node(work, "young", keys)
    a = make_node(work, "old", keys)
    b = make_node(work, "other", keys)
    try:
        vol = a.volume
        fh, _ = vol.create(ROOT_INODE, b"kept.txt", 0o644, os.O_RDWR, CALLER)
        vol.write(fh, 0, b"first")
        vol.release(fh)
        sync_entries(a, b)
        # b edits the file while a deletes it: the delete loses (rule 4).
        attrs = b.volume.lookup(ROOT_INODE, b"kept.txt")
        fh = b.volume.open(attrs.inode, os.O_RDWR, CALLER)
        b.volume.write(fh, 0, b"second")
        b.volume.release(fh)
        d = new_id(0, b"D")
        mkdir(a, ROOT, b"old", d)
        commit_batches(
            a,
            lambda s, i: Create(s(), new_id(i, b"O"), d, f"f{i}".encode(), "file", 0o644, 0, 0),
            entries,
        )
        commit_batches(a, lambda s, i: Move(s(), new_id(i, b"O"), TRASH, f"f{i}".encode()), entries)
        vol.unlink(ROOT_INODE, b"kept.txt")
        sync_entries(b, a)
        assert a.replica.lookup(ROOT, b"kept.txt") is not None, "the file did not come back"
        return alternating(lambda n: per_op_ms(fresh, n), lambda n: per_op_ms(a, n), probes)
    finally:
        fresh.close()
        a.close()
        b.close()


def rewrite_ms(node: Node, name: bytes, count: int) -> float:
    vol = node.volume
    attrs = vol.lookup(ROOT_INODE, name)
    t0 = time.perf_counter()
    for i in range(count):
        fh = vol.open(attrs.inode, os.O_RDWR, CALLER)
        vol.write(fh, 0, f"version {i}".encode().ljust(4096, b"."))
        vol.fsync(fh, False)
        vol.release(fh)
    return (time.perf_counter() - t0) * 1000 / count


def age_file(node: Node, name: bytes, versions: int) -> None:
    """Give `name` `versions` versions, BATCH to a commit, as a peer's would arrive."""
    entry = node.replica.lookup(ROOT, name)
    assert entry is not None
    made = len(node.replica.contents.of(entry))
    while made < versions:
        n = min(BATCH, versions - made)

        def make(stamp: Callable[[], Hlc], n: int = n) -> list[Op]:
            base = node.replica.contents.shown(entry)
            ops: list[Op] = []
            for _ in range(n):
                w = Write(stamp(), entry, (base,) if base else (), 4096, ())
                ops.append(w)
                base = w.hlc
            return ops

        node.journal.commit(make)
        made += n


def versions(work: Path, keys: VolumeKeys, count: int, probes: int) -> tuple[float, float]:
    node = make_node(work, "versions", keys, keep_history_s=86400)
    try:
        for name, n in ((b"young.txt", 10), (b"old.txt", count)):
            fh, _ = node.volume.create(ROOT_INODE, name, 0o644, os.O_RDWR, CALLER)
            node.volume.release(fh)
            age_file(node, name, n - 1)
        return alternating(
            lambda n: rewrite_ms(node, b"young.txt", n),
            lambda n: rewrite_ms(node, b"old.txt", n),
            probes,
        )
    finally:
        node.close()


def build_volume(work: Path, secret_text: str, name: str, dirs: int, per_dir: int) -> Path:
    """A data dir whose volume holds `dirs` directories of `per_dir` empty files."""
    keys = VolumeKeys.from_root(parse_secret(secret_text))
    node = make_node(work, name, keys)
    try:
        for d in range(dirs):
            did = new_id(d, b"D")
            mkdir(node, ROOT, f"d{d:04d}".encode(), did)
            commit_batches(
                node,
                lambda s, i, d=d, did=did: Create(
                    s(),
                    new_id(d * per_dir + i, b"F"),
                    did,
                    f"f{i:06d}".encode(),
                    "file",
                    0o644,
                    0,
                    0,
                ),
                per_dir,
            )
        node.collector.collect()  # a single member: folds all of it into a checkpoint
    finally:
        node.close()
    return work / f"{name}-data"


def list_s(path: Path) -> float:
    t0 = time.perf_counter()
    names = os.listdir(path)
    elapsed = time.perf_counter() - t0
    assert names, f"{path} is empty"
    return elapsed


def listing(work: Path, entries: int) -> tuple[float, float, str]:
    secret = work / "secret"
    data = build_volume(work, secret.read_text(), "list", 1, entries)
    node = NodeProcess(
        secret, data, work / "list-mnt", name="list", extra=["--no-mdns", "--listen", "127.0.0.1:0"]
    )
    try:
        node.start(wait=False)
        node.wait_mounted(timeout=MOUNT_TIMEOUT_S)  # replay of a large volume, a loaded machine
        ours = list_s(node.mountpoint / "d0000")
    finally:
        node.stop()
    with gocryptfs(work) as g:
        other, label = g, "gocryptfs"
        if g is None:
            other, label = work / "tmpfs", "tmpfs (gocryptfs is not installed)"
            other.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(other)], check=True)
        try:
            target = other / "d0000"
            target.mkdir()
            for i in range(entries):
                os.close(os.open(target / f"f{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644))
            if g is not None:  # a cold kernel cache, as for dfs-peer
                subprocess.run(["fusermount3", "-u", "-z", str(g)], check=True)
                pw = work / "gc.pw"
                subprocess.run(
                    ["gocryptfs", "-q", "-passfile", str(pw), str(work / "gc.cipher"), str(g)],
                    check=True,
                )
            theirs = list_s(target)
        finally:
            if g is None:
                subprocess.run(["umount", "-l", str(other)], check=False)
    return ours, theirs, label


class StatLoop:
    """A thread stat-ing names the kernel cannot have cached (each lookup goes
    to the node) and keeping the longest wait."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.longest = 0.0
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            t0 = time.perf_counter()
            with suppress(FileNotFoundError):
                os.stat(self.mount / f"absent-{i}")
            self.longest = max(self.longest, time.perf_counter() - t0)
            self.count += 1
            time.sleep(0.002)

    def __enter__(self) -> StatLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stall(work: Path, entries: int) -> tuple[float, float, float, int]:
    secret = work / "secret"
    per_dir = 100
    data = build_volume(work, secret.read_text(), "full", max(1, entries // per_dir), per_dir)
    pa = free_port()
    a = NodeProcess(
        secret,
        data,
        work / "full-mnt",
        name="full",
        extra=["--no-mdns", "--listen", f"127.0.0.1:{pa}"],
    )
    fresh = NodeProcess(
        secret,
        work / "fresh-data",
        work / "fresh-mnt",
        name="fresh",
        extra=["--no-mdns", "--listen", "127.0.0.1:0", "--peer", f"127.0.0.1:{pa}"],
    )
    try:
        a.start(wait=False)
        a.wait_mounted(timeout=MOUNT_TIMEOUT_S)
        fresh.start()
        t0 = time.perf_counter()
        with StatLoop(fresh.mountpoint) as mine, StatLoop(a.mountpoint) as theirs:

            def caught_up() -> bool:
                # The default 10 s timeout, as benchmarks/scale.py: a node
                # whose loop is stuck that long fails here.
                m = query_status(fresh.data_dir)
                t = query_status(a.data_dir)
                # the same log, and every entry merged into the replica
                # (which goes on after the vector is reached: in pieces)
                same_log = m["version_vector"] == t["version_vector"]
                return same_log and m["files"] >= t["files"]

            wait_for(caught_up, 1800, "the fresh node to merge everything", interval=0.2)
            took = time.perf_counter() - t0
            # then its collection and fold of what it merged
            subprocess.run(
                [*dfs_peer_command(), "gc", "--data-dir", str(fresh.data_dir)],
                check=True,
                capture_output=True,
            )
        return mine.longest, theirs.longest, took, mine.count
    finally:
        fresh.stop()
        a.stop()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--versions", type=int, default=10_000)
    ap.add_argument("--probes", type=int, default=50)
    ap.add_argument("--only", default="revival,versions,listing,stall")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (nodes' logs)")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="dfs-aging-"))
    secret_text = new_secret()
    (work / "secret").write_text(secret_text)
    keys = VolumeKeys.from_root(parse_secret(secret_text))
    rows: list[tuple[str, str, str, str, str]] = []

    def row(what: str, young: float, old: float, unit: str, target: str) -> None:
        ratio = old / young if young else float("inf")
        rows.append((what, f"{young:.2f} {unit}", f"{old:.2f} {unit}", f"{ratio:.2f}x", target))
        print(
            f"{what}: {young:.2f} vs {old:.2f} {unit} ({ratio:.2f}x; target {target})", flush=True
        )

    try:
        if "revival" in parts:
            young, old = revival(work / "revival", keys, args.entries, args.probes)
            row(
                f"file op, fresh vs {args.entries} deletes + 1 revival", young, old, "ms", "<= 1.5x"
            )
        if "versions" in parts:
            young, old = versions(work / "versions", keys, args.versions, args.probes)
            row(f"fsync'd rewrite, version 10 vs {args.versions}", young, old, "ms", "<= 1.5x")
        if "listing" in parts:
            ours, theirs, label = listing(work, args.entries)
            rows.append(
                (
                    f"list {args.entries} entries, {label} vs dfs-peer",
                    f"{theirs:.3f} s",
                    f"{ours:.3f} s",
                    f"{ours / theirs:.2f}x",
                    "<= 2x",
                )
            )
            print(rows[-1], flush=True)
        if "stall" in parts:
            mine, theirs, took, count = stall(work, args.entries)
            rows.append(
                (
                    f"longest stat wait, {args.entries}-file catch-up ({took:.0f} s, {count} stats)",
                    f"peer {theirs * 1000:.0f} ms",
                    f"fresh {mine * 1000:.0f} ms",
                    "",
                    "< 100 ms",
                )
            )
            print(rows[-1], flush=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\naging (entries={args.entries}, versions={args.versions})")
    print(f"{'':62}{'young/other':>16}{'old/dfs-peer':>16}{'ratio':>8}  target")
    for what, young, old, ratio, target in rows:
        print(f"{what:62}{young:>16}{old:>16}{ratio:>8}  {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
