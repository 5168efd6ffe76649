"""Sync benchmark: a fresh node catching up, beside Syncthing, in one run.

A corpus of 2,000 x 4 KiB files in 8 directories plus 8 x 25 MiB files
(~208 MiB) is put on one side; then a fresh second side starts, and the clock
runs from its start until it holds everything:

- dfs-peer: node A holds the corpus (written through its mount); fresh node F,
  with A as its static peer, holds every operation and block (its status);
- Syncthing (Debian's package, installed with apt-get if missing): instance A
  has the corpus in a shared folder, scanned; fresh instance B, configured
  with A and the folder in its config.xml, holds every file (its REST API).

Both run on loopback, alternating over `--reps` repetitions. Memory: each
side's resident set idle (A, three seconds after it started with nothing to
do) and after the sync (the fresh side, current and peak).

Targets (issue 11): the fresh node in <= 0.5x Syncthing's time; node memory
<= Syncthing's, idle and after the sync.

    python -m benchmarks.sync [--quick] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.network import holds_all_of
from benchmarks.single_node import ensure_installed, precompile, rss_mib
from scenarios.cluster import Cluster
from scenarios.harness import free_port, wait_for
from scenarios.report import Report
from scenarios.trees import human_bytes
from scenarios.workload import make_corpus, write_large

IDLE_S = 3.0
TIMEOUT_S = 600.0
POLL_S = 0.02
FOLDER = "bench"


@dataclass(frozen=True, slots=True)
class Corpus:
    small_files: int
    large_files: int
    large_mib: int

    def write(self, root: Path) -> int:
        """Write the corpus under `root`; return its bytes."""
        made = make_corpus(root, self.small_files, dirs=8, size=4096, seed=1)
        (root / "large").mkdir()
        for i in range(self.large_files):
            write_large(root / f"large/{i}.bin", self.large_mib << 20, seed=f"large-{i}")
        return made.bytes + self.large_files * (self.large_mib << 20)

    @property
    def files(self) -> int:
        return self.small_files + self.large_files


FULL = Corpus(small_files=2000, large_files=8, large_mib=25)
QUICK = Corpus(small_files=500, large_files=2, large_mib=25)


@dataclass(frozen=True, slots=True)
class Outcome:
    seconds: float
    idle_mib: float
    after_mib: float
    peak_mib: float


# --- dfs-peer ---------------------------------------------------------------


def dfs_peer_run(workdir: Path, corpus: Corpus) -> Outcome:
    with (
        open(os.devnull, "w") as quiet,
        Cluster(workdir, Report("sync", quiet), loopback=True) as c,
    ):
        a = c.add("A", mdns=False, peers=[])
        fresh = c.add("F", mdns=False, peers=[a])
        a.peers = [fresh]
        c.start(a)
        time.sleep(IDLE_S)
        assert a.process.proc is not None
        idle = rss_mib(a.process.proc.pid)
        corpus.write(a.mount)
        started = time.monotonic()
        c.start(fresh, wait=False)

        def holds_everything() -> bool:
            try:
                s, ref = fresh.status(), a.status()
            except OSError:
                return False
            return holds_all_of(s, ref)

        c.wait_until(
            holds_everything, "the fresh node F to hold everything", TIMEOUT_S, [a, fresh], POLL_S
        )
        held = time.monotonic() - started
        assert fresh.process.proc is not None
        pid = fresh.process.proc.pid
        after, peak = rss_mib(pid), rss_mib(pid, "VmHWM")
        c.wait_started(fresh)
        c.wait_converged([a, fresh], timeout=TIMEOUT_S)
    return Outcome(held, idle, after, peak)


# --- Syncthing --------------------------------------------------------------


def ensure_syncthing() -> str:
    """The syncthing binary, installed from Debian's package if missing."""
    return ensure_installed("syncthing", "syncthing", "benchmarks.sync")


class Syncthing:
    """One Syncthing instance on loopback, with its own home, GUI port and API key."""

    def __init__(self, binary: str, home: Path, folder: Path) -> None:
        self.binary, self.home, self.folder = binary, home, folder
        self.api_key = secrets.token_hex(16)
        self.gui = f"127.0.0.1:{free_port()}"
        self.listen = f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None
        subprocess.run(
            [binary, "generate", f"--home={home}", "--no-default-folder"],
            check=True,
            capture_output=True,
        )
        self.device_id = ET.parse(home / "config.xml").getroot().findall("device")[0].get("id", "")

    def configure(self, other: Syncthing) -> None:
        """Share FOLDER with `other` at its fixed address; no discovery, relays, NAT,
        usage or crash reports, upgrades or lowered priority."""
        path = self.home / "config.xml"
        tree = ET.parse(path)
        root = tree.getroot()
        gui = root.find("gui")
        assert gui is not None
        gui.find("address").text = self.gui  # type: ignore[union-attr]
        gui.find("apikey").text = self.api_key  # type: ignore[union-attr]
        options = root.find("options")
        assert options is not None
        for name, value in {
            "listenAddress": f"tcp://{self.listen}",
            "globalAnnounceEnabled": "false",
            "localAnnounceEnabled": "false",
            "relaysEnabled": "false",
            "natEnabled": "false",
            "startBrowser": "false",
            "urAccepted": "-1",
            "crashReportingEnabled": "false",
            "autoUpgradeIntervalH": "0",
            "setLowPriority": "false",
        }.items():
            el = options.find(name)
            if el is None:
                el = ET.SubElement(options, name)
            el.text = value
        dev = ET.SubElement(
            root,
            "device",
            {
                "id": other.device_id,
                "name": "other",
                "compression": "metadata",
                "introducer": "false",
            },
        )
        ET.SubElement(dev, "address").text = f"tcp://{other.listen}"
        folder = ET.Element(
            "folder",
            {
                "id": FOLDER,
                "label": FOLDER,
                "path": str(self.folder),
                "type": "sendreceive",
                "rescanIntervalS": "3600",
                "fsWatcherEnabled": "false",
            },
        )
        ET.SubElement(folder, "device", {"id": self.device_id})
        ET.SubElement(folder, "device", {"id": other.device_id})
        root.insert(0, folder)
        tree.write(path)

    def start(self, log: Path) -> None:
        # STMONITORED: run as the one process that does the work, without the
        # monitor process Syncthing otherwise starts it under.
        env = {**os.environ, "STNOUPGRADE": "1", "STNORESTART": "1", "STMONITORED": "yes"}
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, "serve", f"--home={self.home}", "--no-browser", "--no-restart"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def api(self, path: str) -> Any:
        req = urllib.request.Request(
            f"http://{self.gui}{path}", headers={"X-API-Key": self.api_key}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def status(self) -> dict[str, Any] | None:
        try:
            return dict(self.api(f"/rest/db/status?folder={FOLDER}"))
        except OSError:
            return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def syncthing_run(binary: str, workdir: Path, corpus: Corpus) -> Outcome:
    (workdir / "a-folder").mkdir(parents=True)
    (workdir / "b-folder").mkdir()
    a = Syncthing(binary, workdir / "a-home", workdir / "a-folder")
    b = Syncthing(binary, workdir / "b-home", workdir / "b-folder")
    a.configure(b)
    b.configure(a)
    try:
        a.start(workdir / "a.log")
        wait_for(lambda: a.status() is not None, 60, "Syncthing A's REST API")
        time.sleep(IDLE_S)
        assert a.proc is not None
        idle = rss_mib(a.proc.pid)
        corpus.write(a.folder)
        req = urllib.request.Request(
            f"http://{a.gui}/rest/db/scan?folder={FOLDER}",
            method="POST",
            headers={"X-API-Key": a.api_key},
        )
        urllib.request.urlopen(req, timeout=60).close()

        def a_scanned() -> bool:
            s = a.status()
            return bool(s and s["state"] == "idle" and s["localFiles"] == corpus.files)

        wait_for(a_scanned, TIMEOUT_S, "Syncthing A to scan the corpus", 0.1)
        ref = a.status()
        assert ref is not None
        started = time.monotonic()
        b.start(workdir / "b.log")

        def b_holds_everything() -> bool:
            s = b.status()
            return bool(
                s
                and s["localFiles"] == ref["localFiles"]
                and s["localBytes"] == ref["localBytes"]
                and s["needTotalItems"] == 0
                and s["state"] == "idle"
            )

        wait_for(b_holds_everything, TIMEOUT_S, "Syncthing B to hold everything", POLL_S)
        held = time.monotonic() - started
        assert b.proc is not None
        after, peak = rss_mib(b.proc.pid), rss_mib(b.proc.pid, "VmHWM")
    finally:
        b.stop()
        a.stop()
    if not same_tree(workdir / "a-folder", workdir / "b-folder"):
        raise RuntimeError("Syncthing B's folder differs from A's")
    return Outcome(held, idle, after, peak)


def same_tree(x: Path, y: Path) -> bool:
    def listing(root: Path) -> dict[str, int]:
        return {
            str(p.relative_to(root)): p.stat().st_size
            for p in root.rglob("*")
            if p.is_file() and ".stfolder" not in p.parts
        }

    return listing(x) == listing(y)


# --- report -----------------------------------------------------------------


def span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    a, b = format(lo, fmt), format(hi, fmt)
    return a if a == b else f"{a}-{b}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="one repetition of a smaller corpus")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    args = ap.parse_args(argv)
    corpus = QUICK if args.quick else FULL
    reps = args.reps or (1 if args.quick else 3)
    binary = ensure_syncthing()
    precompile()
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.split()[
        1
    ]

    work = Path(tempfile.mkdtemp(prefix="dfs-bench-sync-", dir="/var/tmp"))
    results: dict[str, list[Outcome]] = {"dfs-peer": [], "syncthing": []}
    load0 = os.getloadavg()[0]
    ok = False
    try:
        for rep in range(reps):
            order = ["dfs-peer", "syncthing"] if rep % 2 == 0 else ["syncthing", "dfs-peer"]
            for name in order:
                print(f"rep {rep + 1}/{reps}: {name} ...", file=sys.stderr, flush=True)
                d = work / f"{name}-{rep}"
                d.mkdir()
                if name == "dfs-peer":
                    results[name].append(dfs_peer_run(d, corpus))
                else:
                    results[name].append(syncthing_run(binary, d, corpus))
                shutil.rmtree(d, ignore_errors=True)
        ok = True
    finally:
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs and data kept in {work}", file=sys.stderr)
    total = corpus.small_files * 4096 + corpus.large_files * (corpus.large_mib << 20)
    load = f"load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    print(
        f"\nsync beside Syncthing {version} on loopback: {corpus.small_files:,} x 4 KiB + "
        f"{corpus.large_files} x {corpus.large_mib} MiB ({human_bytes(total)}), "
        f"{reps} alternating repetitions ({load})"
    )
    print("| | dfs-peer | Syncthing | dfs-peer / Syncthing | target |")
    print("| --- | ---: | ---: | ---: | ---: |")
    ours, theirs = results["dfs-peer"], results["syncthing"]

    def row(label: str, attr: str, unit: str, fmt: str, target: float) -> None:
        x = [getattr(o, attr) for o in ours]
        y = [getattr(o, attr) for o in theirs]
        ratio = statistics.median(x) / statistics.median(y)
        verdict = "ok" if ratio <= target else "misses"
        print(
            f"| {label} | {span(x, fmt)} {unit} | {span(y, fmt)} {unit} | {ratio:.2f}x | "
            f"≤ {target}x ({verdict}) |"
        )

    row("fresh side holds the corpus, from its start", "seconds", "s", ".2f", 0.5)
    row("memory idle (RSS)", "idle_mib", "MiB", ".0f", 1.0)
    row("memory after the sync (RSS)", "after_mib", "MiB", ".0f", 1.0)
    row("peak memory during the sync (VmHWM)", "peak_mib", "MiB", ".0f", 1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
