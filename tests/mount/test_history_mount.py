"""History on real mounts: `join --read-only --at`, `history` and `restore`.

A live node writes three versions of a file, a short pause apart; a second
process mounts the same data dir as it was between the first two versions,
beside the live node and then instead of it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from scenarios.harness import NodeProcess, dfs_peer_command, is_mounted

pytestmark = pytest.mark.mount

PAUSE_S = 0.05  # versions a pause apart get distinct stamps (ms)


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*dfs_peer_command(), *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _rewrite(path: Path, data: bytes) -> None:
    """Replace a file's content as one new version (`open(.., "wb")` would
    first make an empty one: O_TRUNC is a version of its own)."""
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()


def _at_node(node: NodeProcess, tmp_path: Path, at: str, label: str = "past") -> NodeProcess:
    return NodeProcess(
        secret_file=node.secret_file,
        data_dir=node.data_dir,
        mountpoint=tmp_path / f"{label}-mnt",
        name=label,
        extra=["--read-only", "--at", at],
    )


def _store_files(data_dir: Path) -> dict[str, str]:
    # -wal and -shm belong to SQLite's WAL protocol: a reader may make them
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(data_dir.iterdir())
        if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    }


@pytest.fixture
def versions(node: NodeProcess) -> dict[str, float]:
    """notes.txt v1, v2, v3 a pause apart; gone.txt deleted and later.txt made
    after v1. Returns the unix times between them."""
    mnt = node.mountpoint
    _write(mnt / "notes.txt", b"version one\n")
    _write(mnt / "gone.txt", b"deleted after v1\n")
    os.mkdir(mnt / "docs")
    _write(mnt / "docs" / "inner.txt", b"inside\n")
    time.sleep(PAUSE_S)
    t1 = time.time()
    time.sleep(PAUSE_S)
    _rewrite(mnt / "notes.txt", b"version two, longer\n")
    os.unlink(mnt / "gone.txt")
    _write(mnt / "later.txt", b"made after v1\n")
    time.sleep(PAUSE_S)
    t2 = time.time()
    time.sleep(PAUSE_S)
    _rewrite(mnt / "notes.txt", b"v3\n")
    return {"t1": t1, "t2": t2}


def test_at_mounts_the_past_read_only_beside_the_live_node(
    node: NodeProcess, versions: dict[str, float], tmp_path: Path
) -> None:
    past = _at_node(node, tmp_path, f"@{versions['t1']:.3f}").start()
    try:
        pm = past.mountpoint
        assert (pm / "notes.txt").read_bytes() == b"version one\n"
        assert (pm / "gone.txt").read_bytes() == b"deleted after v1\n"
        assert not (pm / "later.txt").exists()
        assert sorted(os.listdir(pm)) == ["docs", "gone.txt", "notes.txt"]
        assert (pm / "docs" / "inner.txt").read_bytes() == b"inside\n"
        assert (pm / "notes.txt").stat().st_size == len(b"version one\n")

        for attempt in (
            lambda: open(pm / "new.txt", "wb"),  # noqa: SIM115
            lambda: open(pm / "notes.txt", "r+b"),  # noqa: SIM115
            lambda: os.mkdir(pm / "d"),
            lambda: os.unlink(pm / "notes.txt"),
            lambda: os.rename(pm / "notes.txt", pm / "n.txt"),
            lambda: os.chmod(pm / "notes.txt", 0o600),
        ):
            with pytest.raises(OSError, match="Read-only file system") as caught:
                attempt()
            assert caught.value.errno == errno.EROFS

        # the live node goes on beside it, and answers `status`, not the past node
        live = node.mountpoint
        _write(live / "while-past.txt", b"live\n")
        assert (live / "while-past.txt").read_bytes() == b"live\n"
        assert (live / "notes.txt").read_bytes() == b"v3\n"
        assert not (pm / "while-past.txt").exists()
        out = _run("status", "--json", "--data-dir", str(node.data_dir))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["mountpoint"] == str(node.mountpoint)
    finally:
        code = past.stop()
    assert code == 0, past.log_text()
    assert not is_mounted(past.mountpoint)
    assert "Traceback" not in past.log_text()
    assert "mounted read-only" in past.log_text()


def test_at_mounts_instead_of_the_live_node_and_writes_nothing(
    node: NodeProcess, versions: dict[str, float], tmp_path: Path
) -> None:
    assert node.stop() == 0
    before = _store_files(node.data_dir)
    at = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(versions["t2"]))
    at += f".{int(versions['t2'] * 1000) % 1000:03d}"  # local time, no zone
    past = _at_node(node, tmp_path, at).start()
    try:
        pm = past.mountpoint
        assert (pm / "notes.txt").read_bytes() == b"version two, longer\n"
        assert sorted(os.listdir(pm)) == ["docs", "later.txt", "notes.txt"]
        for path in pm.rglob("*"):  # every lookup hands out an inode number
            path.stat()
    finally:
        assert past.stop() == 0
    assert _store_files(node.data_dir) == before
    # and the live node starts again on it as usual
    node.start()
    assert (node.mountpoint / "notes.txt").read_bytes() == b"v3\n"


def test_history_and_restore_from_the_command_line(
    node: NodeProcess, versions: dict[str, float]
) -> None:
    mnt = node.mountpoint
    out = _run("history", str(mnt / "notes.txt"), "--data-dir", str(node.data_dir))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "/notes.txt: 3 version(s), oldest first"
    assert [line.split()[-1] for line in lines[2:]] == ["write", "write", "current"]

    # a path relative to a directory inside the mount
    out = _run("history", "notes.txt", "--json", "--data-dir", str(node.data_dir), cwd=mnt)
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert [v["size"] for v in listed] == [12, 20, 3]
    assert all(v["node_name"] == node.name for v in listed)
    assert listed[0]["unix"] < versions["t1"] < listed[1]["unix"] < versions["t2"]

    out = _run(
        "restore", "notes.txt", "--at", f"@{versions['t1']:.3f}", "--data-dir", str(node.data_dir)
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("dfs-peer: restored /notes.txt with its content of ")
    # the kernel's cached pages of the old content were dropped
    assert (mnt / "notes.txt").read_bytes() == b"version one\n"

    out = _run(
        "restore", "gone.txt", "--at", f"@{versions['t1']:.3f}", "--data-dir", str(node.data_dir)
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("dfs-peer: made again /gone.txt")
    assert (mnt / "gone.txt").read_bytes() == b"deleted after v1\n"

    out = _run("restore", "docs", "--at", "-1s", "--data-dir", str(node.data_dir))
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "dfs-peer: /docs is a directory: history and restore work on files only "
        "(restoring a directory is not supported: restore the files in it one by one)."
    ]


def test_at_refuses_what_it_cannot_show(
    make_node: Callable[..., NodeProcess], secret_file: Path, tmp_path: Path
) -> None:
    (tmp_path / "m").mkdir()
    empty = tmp_path / "empty-data"
    out = _run(
        "join",
        "--secret-file",
        str(secret_file),
        "--data-dir",
        str(empty),
        "--read-only",
        "--at",
        "-1h",
        str(tmp_path / "m"),
    )
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"dfs-peer: {empty} holds no volume: --at shows the history a node kept there "
        "(check --data-dir)."
    ]
    assert not empty.exists()
    out = _run("join", "--secret-file", str(secret_file), "--at", "-1h", str(tmp_path / "m"))
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "dfs-peer: --at mounts the volume as it was, which cannot be written: add --read-only."
    ]
