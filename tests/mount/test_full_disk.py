"""A full disk: the data dir on a real 64 MiB tmpfs, a real node, a real mount.

What must hold when the disk fills: deletes and `dfs-peer gc` still work, a
write that failed never shows up later, one WARNING per episode, a restart
works while full, and a shutdown that cannot flush says so in one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scenarios.harness import NodeProcess
from tests.mount.conftest import LONE

CHUNK = os.urandom(1 << 20)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture
def full_node(
    tmp_path: Path, secret_file: Path, small_disk: Path
) -> Iterator[Callable[[], NodeProcess]]:
    made: list[NodeProcess] = []

    def make() -> NodeProcess:
        node = NodeProcess(
            secret_file=secret_file,
            data_dir=small_disk / "data",
            mountpoint=tmp_path / "mnt",
            name="full",
            extra=[*LONE, "--keep-history", "0"],
            log_path=tmp_path / "node.log",
        )
        made.append(node)
        return node.start()

    yield make
    for node in made:
        node.stop()


def write_all(path: Path, chunks: list[bytes]) -> int | None:
    """Write `chunks` to a new file and close it; the errno of a failure."""
    try:
        with open(path, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
    except OSError as exc:
        return exc.errno
    return None


def fill(mnt: Path, prefix: str) -> tuple[list[Path], Path, list[bytes]]:
    """Write 4 MiB files of random bytes until the disk is full; (the files
    that were written, the one whose write or close failed, its chunks)."""
    done: list[Path] = []
    for i in range(100):
        path = mnt / f"{prefix}{i}"
        chunks = [os.urandom(1 << 20) for _ in range(4)]
        failure = write_all(path, chunks)
        if failure is not None:
            assert failure == errno.ENOSPC, os.strerror(failure)
            return done, path, chunks
        done.append(path)
    raise AssertionError("the 64 MiB disk never filled")


def shows_any(path: Path, chunks: list[bytes]) -> bool:
    if not path.exists():
        return False
    data = path.read_bytes()
    return any(c[:4096] in data for c in chunks)


def gc(node: NodeProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peer.cli", "gc", "--data-dir", str(node.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def warnings(node: NodeProcess) -> list[str]:
    return [
        line
        for line in node.log_text().splitlines()
        if " WARNING " in line or " ERROR " in line or "Traceback" in line
    ]


def test_a_full_disk_still_deletes_collects_and_never_shows_a_failed_write(
    full_node: Callable[[], NodeProcess],
) -> None:
    node = full_node()
    mnt = node.mountpoint
    (mnt / "empty-dir").mkdir()
    written, failed, attempted = fill(mnt, "f")
    assert written, "not even one file fit"
    # More writes keep failing, cleanly.
    more = [os.urandom(1 << 20) for _ in range(2)]
    assert write_all(mnt / "more", more) == errno.ENOSPC
    attempted += more
    # Deletes work on the full disk, and so does collection.
    for path in written[: len(written) // 2 + 1]:
        path.unlink()
    (mnt / "empty-dir").rmdir()
    done = gc(node)
    assert done.returncode == 0, done.stdout + done.stderr
    # Space came back: writes work again.
    with open(mnt / "after", "wb") as f:
        f.write(CHUNK)
    assert (mnt / "after").read_bytes() == CHUNK
    # The writes that failed never show up, now or after a restart.
    for path in (failed, mnt / "more"):
        assert not shows_any(path, attempted), path
    assert node.stop() == 0
    node = full_node()
    for path in (failed, mnt / "more"):
        assert not shows_any(path, attempted), path
    lines = warnings(node)
    assert len(lines) == 1, lines
    assert "full" in lines[0]


def test_restart_and_shutdown_on_a_full_disk(full_node: Callable[[], NodeProcess]) -> None:
    node = full_node()
    mnt = node.mountpoint
    # A file with writes buffered (not yet flushed) when SIGTERM comes.
    held = open(mnt / "buffered", "wb")  # noqa: SIM115 - held open across the stop
    written, _, _ = fill(mnt, "f")
    try:
        held.write(os.urandom(1 << 20))
        held.flush()  # into the node's buffer, not flushed to the store
        code = node.stop()
    finally:
        with contextlib.suppress(OSError):
            held.close()
    log = node.log_text()
    assert "Traceback" not in log, log[-3000:]
    told = [line for line in log.splitlines() if line.startswith("dfs-peer: stopped")]
    assert len(told) == 1, log[-3000:]
    assert "1 file(s)" in told[0]
    assert code == 1
    # Restart while still full: it mounts, reads what was kept, and deletes work.
    node = full_node()
    assert len(written[0].read_bytes()) == 4 << 20
    written[0].unlink()
    assert not written[0].exists()
    assert node.stop() in (0, 1)
    assert os.path.ismount(mnt) is False
