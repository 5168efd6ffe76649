"""History: A's old versions are listed, mounted with --at and restored on B.

A writes three versions of notes.txt a pause apart (the file grows across
three blocks, then shrinks), deletes gone.txt and makes later.txt after the
first version. Expected: B lists the three versions with `dfs-peer history`
(sizes right, each written by A); a second process on B's data dir, `join
--read-only --at` a time between the first two versions, mounts beside B's
live node and shows the first version, gone.txt present and later.txt absent,
and refuses writes with EROFS; `dfs-peer restore --at` that time on B brings
the first version back (as a new write reusing the old blocks) and recreates
gone.txt, and A shows both. The mounts then converge.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path

from scenarios.cluster import Cluster, ClusterNode
from scenarios.harness import HarnessError, NodeProcess, dfs_peer_command
from scenarios.workload import payload, write_file

NEEDS_REAL_LAN = False
PAUSE_S = 0.2  # between versions, so a time falls cleanly between them
CLI_TIMEOUT_S = 60


def _dfs_peer(node: ClusterNode, *args: str) -> str:
    """Run a `dfs-peer` command against `node`; its stdout, or HarnessError."""
    out = subprocess.run(
        [*dfs_peer_command(), *args, "--data-dir", str(node.process.data_dir)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    if out.returncode != 0:
        raise HarnessError(f"dfs-peer {' '.join(args)} on {node.name} failed: {out.stderr}")
    return out.stdout


def _rewrite(path: Path, data: bytes) -> None:
    """One new version with exactly `data` (no empty version from O_TRUNC)."""
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()


def run(c: Cluster) -> None:
    a, b = c.start_nodes("A", "B")
    with c.report.step("A and B connected to each other"):
        c.wait_connected([a, b])

    v1 = payload("history-v1", 300_000)  # three blocks
    v2 = v1[:150_000] + payload("history-v2", 50_000)
    v3 = b"the third version is short\n"
    gone = b"deleted after the first version\n"
    with c.report.step("A wrote notes.txt three times, deleted gone.txt, made later.txt"):
        write_file(a.path("notes.txt"), v1)
        write_file(a.path("gone.txt"), gone)
        time.sleep(PAUSE_S)
        t1 = time.time()
        time.sleep(PAUSE_S)
        _rewrite(a.path("notes.txt"), v2)
        os.unlink(a.path("gone.txt"))
        write_file(a.path("later.txt"), b"made after the first version\n")
        time.sleep(PAUSE_S)
        _rewrite(a.path("notes.txt"), v3)
    with c.report.step("B caught up"):
        c.wait_file(b, "notes.txt", v3)
        c.wait_file(b, "later.txt", b"made after the first version\n")

    with c.report.step("B listed A's versions of notes.txt (dfs-peer history)") as step:
        listed = json.loads(_dfs_peer(b, "history", str(b.path("notes.txt")), "--json"))
        sizes = [v["size"] for v in listed]
        writers = {v["node_name"] for v in listed}
        step.text = f"B listed {len(listed)} versions of notes.txt: sizes {sizes}, by {writers}"
    if sizes != [len(v1), len(v2), len(v3)] or writers != {"A"}:
        raise HarnessError(f"B's history of notes.txt is not A's three versions: {listed}")
    if not listed[0]["unix"] < t1 < listed[1]["unix"]:
        raise HarnessError(f"the time {t1} is not between the first two versions: {listed}")

    past = NodeProcess(
        secret_file=c.secret_file,
        data_dir=b.process.data_dir,
        mountpoint=c.workdir / "B-past" / "mnt",
        name="B-past",
        extra=["--read-only", "--at", f"@{t1:.3f}"],
        log_path=c.workdir / "B-past.log",
    )
    try:
        with c.report.step("B mounted the volume as it was (--at), beside its live node"):
            past.start()
            _check_past(past.mountpoint, v1, gone)
            c.wait_file(b, "notes.txt", v3)  # the live mount is unchanged
    finally:
        code = past.stop()
    if code != 0 or "Traceback" in past.log_text():
        raise HarnessError(f"the --at node exited with {code}:\n{past.log_text()[-3000:]}")

    with c.report.step("B restored notes.txt and gone.txt (--at); A shows them") as step:
        _dfs_peer(b, "restore", "notes.txt", "--at", f"@{t1:.3f}")
        seen = c.wait_file(a, "notes.txt", v1)
        c.wait_file(b, "notes.txt", v1)
        _dfs_peer(b, "restore", "gone.txt", "--at", f"@{t1:.3f}")
        c.wait_file(a, "gone.txt", gone)
        step.text = f"B restored notes.txt and gone.txt (--at); A showed them {seen:.2f} s later"

    with c.report.step("A and B converged") as step:
        tree = c.wait_converged([a, b])
        step.text = f"A and B converged ({len(tree)} entries)"
    assert sorted(tree) == ["gone.txt", "later.txt", "notes.txt"], f"unexpected: {sorted(tree)}"
    listed = json.loads(_dfs_peer(a, "history", "notes.txt", "--json"))
    last = listed[-1]
    assert (last["size"], last["node_name"], last["current"]) == (len(v1), "B", True), last


def _check_past(mount: Path, v1: bytes, gone: bytes) -> None:
    shown = sorted(os.listdir(mount))
    if shown != ["gone.txt", "notes.txt"]:
        raise HarnessError(f"the --at mount shows {shown}, not gone.txt and notes.txt")
    if (mount / "notes.txt").read_bytes() != v1:
        raise HarnessError("the --at mount does not show the first version of notes.txt")
    if (mount / "gone.txt").read_bytes() != gone:
        raise HarnessError("the --at mount does not show gone.txt as it was")
    try:
        write_file(mount / "new.txt", b"x")
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise HarnessError(f"a write to the --at mount failed with {exc!r}, not EROFS") from exc
    else:
        raise HarnessError("a write to the --at mount succeeded")
