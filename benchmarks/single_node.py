"""Single-node benchmark: work inside the mount, beside gocryptfs, in one run.

Seven workloads run through a dfs-peer mount and through a gocryptfs mount (an
encrypted FUSE file system people use for the same job on one machine). Each
workload runs on every file system back to back before the next one starts,
in an order that alternates between the `--reps` repetitions, and each row is
printed with the range over the repetitions and the median of the
repetitions' ratios: the two figures of a ratio are seconds apart, not the
minutes a whole suite takes, since this machine's speed drifts by two to
three times within minutes.

- sequential write of a 256 MiB file, fsync'd at the end (`dd conv=fsync`);
- sequential read of it after a remount (the benchmark never writes
  /proc/sys/vm/drop_caches: the machines are shared; a remount drops the
  mount's cache);
- create 2,000 x 4 KiB files, then `sync`;
- `find` + stat of those 2,000 files after a remount;
- 4 KiB random writes into a 64 MiB file, fsync every 100;
- `tar x` of a ~700-file, ~16 MB source-like tree, then `sync`;
- `git init && git add -A && git commit` of that tree.

Targets (issue 11): rates at >= 0.5x gocryptfs, times at <= 2x. With
`--floor` a third file system runs the same workloads: the in-memory volume of
the adapter's tests (`tests.fuse.memvolume`, no storage, no crypto, no log)
behind dfs-peer's own FUSE adapter, pyfuse3 and asyncio: the best any volume
behind that stack can do on this machine. It keeps nothing across a remount,
so its reads come after a reopen instead (the adapter asks the kernel to drop
a file's cached pages at each open) and its stat row is not measured. With
`--profile` the node runs under cProfile and the top functions are printed;
`--quick` runs one repetition of smaller sizes, for iteration.

    python -m benchmarks.single_node [--quick] [--reps 3] [--profile] [--floor]
"""

from __future__ import annotations

import argparse
import compileall
import io
import os
import pstats
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from scenarios.harness import NodeProcess, new_secret

CHUNK = 1 << 20
SMALL = 4096
RANDOM_FILE_MIB = 64
FSYNC_EVERY = 100
GIT_ENV = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}


@dataclass(frozen=True, slots=True)
class Sizes:
    seq_mib: int
    files: int
    random_writes: int
    tree_files: int
    tree_mb: float


FULL = Sizes(seq_mib=256, files=2000, random_writes=2000, tree_files=729, tree_mb=15.8)
QUICK = Sizes(seq_mib=64, files=500, random_writes=500, tree_files=200, tree_mb=4.0)


@dataclass(frozen=True, slots=True)
class Row:
    key: str
    label: str
    unit: str
    higher_is_better: bool  # a rate; else a time in seconds


ROWS = [
    Row("write", "sequential write {seq} MiB, conv=fsync", "MB/s", True),
    Row("read", "sequential read {seq} MiB after a remount", "MB/s", True),
    Row("create", "create {files:,} x 4 KiB files, then sync", "files/s", True),
    Row("stat", "find + stat {files:,} files after a remount", "files/s", True),
    Row("random", "4 KiB random writes, fsync every 100", "writes/s", True),
    Row("tar", "tar x of {tree_files} files ({tree_mb} MB), then sync", "s", False),
    Row("git", "git init && git add -A && git commit of that tree", "s", False),
]


class Target:
    """A mounted file system the workloads run in, and how to remount it."""

    name = ""
    root: Path

    def remount(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def pid(self) -> int | None:
        """The process serving the mount now (it changes with a remount)."""
        raise NotImplementedError


class DfsPeer(Target):
    name = "dfs-peer"

    def __init__(self, work: Path) -> None:
        secret = work / "secret"
        secret.write_text(new_secret())
        self.node = NodeProcess(
            secret,
            work / "data",
            work / "mnt",
            name="bench",
            extra=["--no-mdns", "--listen", "127.0.0.1:0"],
        )
        self.node.start()
        self.root = self.node.mountpoint

    def remount(self) -> None:
        self.node.stop()
        self.node.start()

    def rss_mib(self) -> float:
        proc = self.node.proc
        return rss_mib(proc.pid) if proc is not None else 0.0

    def pid(self) -> int | None:
        return self.node.proc.pid if self.node.proc is not None else None

    def close(self) -> None:
        self.node.stop()


class Gocryptfs(Target):
    name = "gocryptfs"

    def __init__(self, work: Path) -> None:
        ensure_installed("gocryptfs", "gocryptfs", "benchmarks.single_node")
        self.cipher, self.root, self.pw = work / "gc.cipher", work / "gc.plain", work / "gc.pw"
        self.cipher.mkdir()
        self.root.mkdir()
        self.pw.write_text("benchmark passphrase\n")
        subprocess.run(
            [
                "gocryptfs",
                "-init",
                "-q",
                "-passfile",
                str(self.pw),
                "-scryptn",
                "10",
                str(self.cipher),
            ],
            check=True,
        )
        self._mount()

    def _mount(self) -> None:
        subprocess.run(
            [
                "gocryptfs",
                "-q",
                "-nosyslog",
                "-passfile",
                str(self.pw),
                str(self.cipher),
                str(self.root),
            ],
            check=True,
        )

    def remount(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.root)], check=True)
        self._mount()

    def pid(self) -> int | None:
        """The gocryptfs daemon of this mount (it forks away from its starter)."""
        want = str(self.root).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if args and args[0].endswith(b"gocryptfs") and want in args:
                return int(entry.name)
        return None

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.root)], check=False)


class Floor(Target):
    """The in-memory volume of the adapter's tests behind dfs-peer's FUSE
    adapter: what the FUSE stack alone costs (see the module's docstring)."""

    name = "floor"

    def __init__(self, work: Path) -> None:
        self.root = work / "mnt"
        self.root.mkdir()
        repo = Path(__file__).resolve().parents[1]
        self.log = open(work / "floor.log", "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fuse.memvolume", str(self.root)],
            cwd=repo,
            env={**os.environ, "PYTHONPATH": str(repo)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise SystemExit(f"benchmarks.single_node: the in-memory volume did not mount ({work})")

    def remount(self) -> None:
        pass  # it would lose everything; reads after a reopen reach it all the same

    def pid(self) -> int | None:
        return self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        subprocess.run(  # in case it is still mounted; it unmounts itself when it ends
            ["fusermount3", "-u", "-z", str(self.root)], check=False, capture_output=True
        )
        self.log.close()


def ensure_installed(binary: str, package: str, by: str) -> str:
    """The path of `binary`, installed from Debian's `package` if missing
    (as root; else a clear error naming the package). `by` names the caller."""
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit(f"{by}: {binary} is missing; apt-get install {package} (as root)")
    print(f"installing {package} with apt-get ...", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-q"]
    subprocess.run([*apt, "update"], check=True, env=env, capture_output=True)
    subprocess.run(
        [*apt, "install", "-y", "--no-install-recommends", package],
        check=True,
        env=env,
        capture_output=True,
    )
    found = shutil.which(binary)
    if not found:
        raise SystemExit(f"{by}: apt-get installed {package} but {binary} is not on PATH")
    return found


def precompile() -> None:
    """Byte-compile dfs-peer's own modules, as an installed package has them.

    A checkout run with PYTHONDONTWRITEBYTECODE (as on the test machines)
    would otherwise compile every module again at each node start (~0.7 s of
    CPU), which the sync benchmark would count as catching up."""
    root = Path(__file__).resolve().parents[1]
    for package in ("crdt", "discovery", "fuse", "peer"):
        compileall.compile_dir(root / package, quiet=1)


def cpu_s(pid: int | None) -> float:
    """The CPU time (user and system, all threads) a process has used, in s."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (or `VmHWM`, its peak) in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_tree_tarball(path: Path, files: int, total_mb: float) -> None:
    """A source-like tree: text files of skewed sizes in nested directories.

    Words from a small vocabulary, so git's zlib and delta work look like a
    real tree's; seeded, so every run extracts the same bytes.
    """
    rng = random.Random(729)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 12)))
        for _ in range(4000)
    ]
    sizes = [rng.lognormvariate(0, 1.2) for _ in range(files)]
    scale = total_mb * 1e6 / sum(sizes)
    dirs = [f"src/pkg{i // 8}/mod{i % 8}" for i in range(files // 20 + 1)]
    with tarfile.open(path, "w") as tar:
        for i, s in enumerate(sizes):
            n = max(16, int(s * scale))
            text = io.StringIO()
            while text.tell() < n:
                line = " ".join(rng.choices(words, k=rng.randint(1, 12)))
                text.write("    " * rng.randint(0, 3) + line + "\n")
            data = text.getvalue()[:n].encode()
            info = tarfile.TarInfo(f"tree/{rng.choice(dirs)}/file{i:04d}.py")
            info.size = len(data)
            info.mtime = 1_700_000_000
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Clock:
    """Times workloads on a target, and the CPU its serving process used
    meanwhile (`cpu[key]`): a figure the machine's drift in speed moves less."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.cpu: dict[str, float] = {}

    def __call__(self, key: str, fn: Callable[[], object]) -> float:
        pid = self.target.pid()
        before = cpu_s(pid)
        took = timed(fn)
        self.cpu[key] = cpu_s(pid) - before
        return took


def seq_write(path: Path, data: memoryview) -> None:
    with open(path, "wb") as f:
        for i in range(0, len(data), CHUNK):
            f.write(data[i : i + CHUNK])
        f.flush()
        os.fsync(f.fileno())


def seq_read(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(CHUNK):
            pass


def create_files(d: Path, n: int) -> None:
    d.mkdir()
    payload = os.urandom(SMALL)
    for i in range(n):
        with open(d / f"f{i:05d}", "wb") as f:
            f.write(payload[i % 64 :] + payload[: i % 64])  # distinct content per file
    os.sync()


def find_stat(d: Path, expected: int) -> None:
    seen = 0
    for top, _dirs, names in os.walk(d):
        for name in names:
            os.lstat(os.path.join(top, name))
            seen += 1
    if seen != expected:
        raise RuntimeError(f"find saw {seen} files in {d}, not {expected}")


def fill(path: Path, file_mib: int) -> None:
    """A file of `file_mib` MiB of random bytes, synced (outside the clock)."""
    with open(path, "wb") as f:
        for _ in range(file_mib):
            f.write(os.urandom(CHUNK))
        os.fsync(f.fileno())


def random_writes(path: Path, n: int, file_mib: int) -> None:
    """`n` 4 KiB writes at random aligned offsets of the file `fill` made,
    fsync every 100."""
    size = file_mib * CHUNK
    rng = random.Random(4096)
    offsets = [rng.randrange(size // SMALL) * SMALL for _ in range(n)]
    blocks = [os.urandom(SMALL) for _ in range(16)]
    fd = os.open(path, os.O_WRONLY)
    try:
        for i, off in enumerate(offsets, 1):
            os.pwrite(fd, blocks[i % 16], off)
            if i % FSYNC_EVERY == 0:
                os.fsync(fd)
        os.fsync(fd)
    finally:
        os.close(fd)


def untar(tarball: Path, d: Path) -> None:
    d.mkdir()
    subprocess.run(["tar", "xf", str(tarball), "-C", str(d)], check=True)
    os.sync()


def git_commit(tree: Path) -> None:
    env = {**os.environ, **GIT_ENV}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "tree"]):
        subprocess.run(cmd, cwd=tree, env=env, check=True)


def run_rep(
    targets: list[Target], rep: int, sizes: Sizes, data: memoryview, tarball: Path
) -> dict[str, dict[str, float]]:
    """One repetition: each workload runs on every target in turn, in the
    order given, before the next workload starts, so the figures a ratio
    compares were taken seconds apart (this machine's speed drifts by two to
    three times within minutes). Per target, each workload's rate (or time)
    under its row's key, and the CPU its process used under `cpu:` and the key."""
    base = {t.name: t.root / f"rep{rep}" for t in targets}
    clocks = {t.name: Clock(t) for t in targets}
    r: dict[str, dict[str, float]] = {t.name: {} for t in targets}
    mib = len(data) / CHUNK

    def each(
        key: str, work: Callable[[Target, Path], object], value: Callable[[float], float]
    ) -> None:
        for t in targets:
            if key == "stat" and isinstance(t, Floor):
                continue  # its kernel caches still hold every entry: nothing to measure
            print(f"rep {rep + 1}: {key} on {t.name}", file=sys.stderr, flush=True)
            r[t.name][key] = value(clocks[t.name](key, partial(work, t, base[t.name])))

    for t in targets:
        base[t.name].mkdir()
    each("write", lambda t, b: seq_write(b / "big.bin", data), lambda s: mib * CHUNK / 1e6 / s)
    for t in targets:
        t.remount()
    each("read", lambda t, b: seq_read(b / "big.bin"), lambda s: mib * CHUNK / 1e6 / s)
    each("create", lambda t, b: create_files(b / "small", sizes.files), lambda s: sizes.files / s)
    for t in targets:
        (base[t.name] / "big.bin").unlink()
        t.remount()
    each("stat", lambda t, b: find_stat(b / "small", sizes.files), lambda s: sizes.files / s)

    def randomly(t: Target, b: Path) -> None:
        random_writes(b / "random.bin", sizes.random_writes, RANDOM_FILE_MIB)

    for t in targets:
        fill(base[t.name] / "random.bin", RANDOM_FILE_MIB)  # outside the clock
    each("random", randomly, lambda s: sizes.random_writes / s)
    for t in targets:
        (base[t.name] / "random.bin").unlink()
    each("tar", lambda t, b: untar(tarball, b / "x"), lambda s: s)
    each("git", lambda t, b: git_commit(b / "x" / "tree"), lambda s: s)
    for t in targets:
        r[t.name].update({f"cpu:{key}": used for key, used in clocks[t.name].cpu.items()})
    return r


def paired_ratio(ours: list[float], theirs: list[float]) -> float:
    """The median of each repetition's ratio: the two figures of a ratio were
    taken back to back, so the machine's drift between repetitions cancels."""
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True) if b > 0)


def fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)}-{fmt(hi)}"


def print_table(
    results: dict[str, list[dict[str, float]]], sizes: Sizes, reps: int, load: str
) -> None:
    names = {
        "seq": sizes.seq_mib,
        "files": sizes.files,
        "tree_files": sizes.tree_files,
        "tree_mb": sizes.tree_mb,
    }
    floor = results.get("floor")
    print(f"\nsingle node, dfs-peer beside gocryptfs: {reps} alternating repetitions ({load})")
    extra = " FUSE floor | floor / gocryptfs |" if floor else ""
    print(
        f"| workload (through the mount) | dfs-peer | gocryptfs | dfs-peer / gocryptfs |{extra} target |"
    )
    print("| --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if floor else ""))
    for row in ROWS:
        ours = [r[row.key] for r in results["dfs-peer"]]
        theirs = [r[row.key] for r in results["gocryptfs"]]
        ratio = paired_ratio(ours, theirs)
        if floor:
            best = [r[row.key] for r in floor if row.key in r]
            if best:
                fr = paired_ratio(best, theirs)
                ftext = f"{fr:.2f}x" if row.higher_is_better else f"{fr:.1f}x the time"
                extra = f" {span(best)} {row.unit} | {ftext} |"
            else:
                extra = " not measured | |"
        if row.higher_is_better:
            verdict = "ok" if ratio >= 0.5 else "misses"
            rtext, target = f"{ratio:.2f}x", f"≥ 0.5x ({verdict})"
        else:
            verdict = "ok" if ratio <= 2 else "misses"
            rtext, target = f"{ratio:.1f}x the time", f"≤ 2x ({verdict})"
        print(
            f"| {row.label.format(**names)} | {span(ours)} {row.unit} | "
            f"{span(theirs)} {row.unit} | {rtext} |{extra} {target} |"
        )
    print_cpu_table(results, names)


def print_cpu_table(results: dict[str, list[dict[str, float]]], names: dict[str, Any]) -> None:
    """The CPU each file system's process used per workload: what it costs,
    whatever the machine's speed at the moment (the kernel's work for the
    program, copying and page cache, is not in it)."""
    floor = results.get("floor")
    print("\nCPU of the serving process per workload (s; user + system, all threads)")
    extra = " FUSE floor | floor / gocryptfs |" if floor else ""
    print(f"| workload | dfs-peer | gocryptfs | dfs-peer / gocryptfs |{extra}")
    print("| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if floor else ""))
    for row in ROWS:
        key = f"cpu:{row.key}"
        ours = [r[key] for r in results["dfs-peer"] if key in r]
        theirs = [r[key] for r in results["gocryptfs"] if key in r]
        if not ours or not theirs:
            continue
        mid = statistics.median(theirs)
        ratio = f"{paired_ratio(ours, theirs):.1f}x" if mid > 0 else "—"
        extra = ""
        if floor:
            best = [r[key] for r in floor if key in r]
            fr = f"{paired_ratio(best, theirs):.1f}x" if best and mid > 0 else ""
            extra = f" {span(best)} | {fr} |" if best else " not measured | |"
        label = row.label.format(**names)
        print(f"| {label} | {span(ours)} | {span(theirs)} | {ratio} |{extra}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="one repetition of smaller sizes")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    ap.add_argument("--profile", action="store_true", help="profile the node with cProfile")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also run an in-memory volume behind the same FUSE stack (what the stack allows)",
    )
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    reps = args.reps or (1 if args.quick else 3)
    precompile()

    work = Path(tempfile.mkdtemp(prefix="dfs-bench-", dir="/var/tmp"))
    prof = work / "node.prof"
    if args.profile:
        os.environ["DFS_PEER_PROFILE"] = str(prof)
    tarball = work / "tree.tar"
    make_tree_tarball(tarball, sizes.tree_files, sizes.tree_mb)
    # Distinct random data, made before the clock starts: repeating one chunk
    # would measure deduplication (equal blocks have equal ids), not writing.
    data = memoryview(os.urandom(sizes.seq_mib * CHUNK))
    (work / "dfs").mkdir()
    (work / "gc").mkdir()
    targets: list[Target] = []
    results: dict[str, list[dict[str, float]]] = {"dfs-peer": [], "gocryptfs": []}
    if args.floor:
        (work / "floor").mkdir()
        results["floor"] = []
    rss: list[float] = []
    load0 = os.getloadavg()[0]
    try:
        dfs = DfsPeer(work / "dfs")
        targets.append(dfs)
        targets.append(Gocryptfs(work / "gc"))
        if args.floor:
            targets.append(Floor(work / "floor"))
        for rep in range(reps):
            order = targets if rep % 2 == 0 else targets[::-1]
            for name, figures in run_rep(order, rep, sizes, data, tarball).items():
                results[name].append(figures)
            rss.append(dfs.rss_mib())
    finally:
        for t in targets:
            t.close()
    load = f"load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    print_table(results, sizes, reps, load)
    print(f"\nnode resident memory after each repetition: {', '.join(f'{m:.0f}' for m in rss)} MiB")
    store = sum(p.stat().st_size for p in (work / "dfs" / "data").rglob("*") if p.is_file())
    print(f"node store after the run: {store / 2**20:.1f} MiB")
    profiles = sorted(str(p) for p in work.glob("node.prof.*"))
    if args.profile and profiles:
        print("\nwhere the node's time went (cProfile over every node run, by own time):")
        pstats.Stats(*profiles, stream=sys.stdout).sort_stats("tottime").print_stats(30)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
