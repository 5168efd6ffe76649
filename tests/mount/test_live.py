"""Two real nodes on loopback: what one changes shows in the other's mount at once.

The kernel caches entries and attributes for 300 s here, so without the
invalidations a remote change triggers, these reads would see the old state.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from scenarios.harness import NodeProcess, free_port, wait_for

pytestmark = pytest.mark.mount


def read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def test_remote_create_write_chmod_rename_delete_show_without_remount(
    pair: tuple[Path, Path],
) -> None:
    a, b = pair
    assert read(b / "f") is None  # B has looked the name up: ENOENT
    (a / "f").write_bytes(b"one")
    wait_for(lambda: read(b / "f") == b"one", 10, "B to read A's new file")
    # Same size, new content: B's page cache and attributes must be dropped.
    (a / "f").write_bytes(b"two")
    wait_for(lambda: read(b / "f") == b"two", 10, "B to read A's overwrite")
    os.chmod(a / "f", 0o600)
    wait_for(lambda: stat.S_IMODE(os.stat(b / "f").st_mode) == 0o600, 10, "B to see the chmod")
    os.rename(a / "f", a / "g")
    wait_for(lambda: sorted(os.listdir(b)) == ["g"], 10, "B's listing to show the rename")
    assert read(b / "f") is None
    assert read(b / "g") == b"two"
    (a / "g").unlink()
    wait_for(lambda: os.listdir(b) == [], 10, "B to see the delete")
    # The listing is B's merged state; the kernel's cached entry for `g` is
    # dropped by the invalidation that follows the merge, moments later (a
    # loaded machine showed the window): wait for it too, never remount.
    wait_for(lambda: not (b / "g").exists(), 10, "B's kernel to drop the deleted entry")


def test_an_open_handle_reads_the_latest_version(pair: tuple[Path, Path]) -> None:
    a, b = pair
    (a / "log").write_bytes(b"x" * 100)
    wait_for(lambda: read(b / "log") == b"x" * 100, 10, "B to have the file")
    with open(b / "log", "rb", buffering=0) as handle:
        assert handle.read() == b"x" * 100
        (a / "log").write_bytes(b"y" * 100)
        deadline = time.monotonic() + 10
        while True:
            handle.seek(0)
            if handle.read() == b"y" * 100:
                break
            assert time.monotonic() < deadline, "B's open handle never saw A's write"
            time.sleep(0.02)


def test_a_file_rewritten_with_o_trunc_replicates_truncated(pair: tuple[Path, Path]) -> None:
    a, b = pair
    subprocess.run(
        ["sh", "-c", "printf 'hello world\\n' > f; printf 'hi\\n' > f"], cwd=a, check=True
    )
    assert (a / "f").read_bytes() == b"hi\n"
    wait_for(lambda: read(b / "f") == b"hi\n", 10, "B to read exactly 'hi\\n'")


def test_special_files_replicate_with_type_mode_and_rdev(pair: tuple[Path, Path]) -> None:
    a, b = pair
    os.mkfifo(a / "fifo", 0o620)
    os.mknod(a / "tty", 0o660 | stat.S_IFCHR, os.makedev(5, 0))
    os.mknod(a / "disk", 0o600 | stat.S_IFBLK, os.makedev(8, 16))
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(a / "sock"))
    for name, mode in (("fifo", 0o620), ("tty", 0o660), ("sock", 0o701)):
        os.chmod(a / name, mode)  # what the umask took away
    expected = {
        "fifo": (stat.S_IFIFO, 0o620, 0),
        "tty": (stat.S_IFCHR, 0o660, os.makedev(5, 0)),
        "disk": (stat.S_IFBLK, 0o600, os.makedev(8, 16)),
        "sock": (stat.S_IFSOCK, 0o701, 0),
    }

    def kinds() -> dict[str, tuple[int, int, int]]:
        out = {}
        for name in sorted(os.listdir(b)):
            st = os.stat(b / name)
            out[name] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_rdev)
        return out

    wait_for(lambda: kinds() == expected, 10, "B to show A's special files")


def test_writes_to_an_unlinked_open_file_do_not_bring_it_back(pair: tuple[Path, Path]) -> None:
    a, b = pair
    (a / "f").write_bytes(b"first")
    wait_for(lambda: read(b / "f") == b"first", 10, "B to have the file")
    fd = os.open(a / "f", os.O_RDWR)
    try:
        os.unlink(a / "f")
        os.pwrite(fd, b"written after the unlink", 0)
        os.fsync(fd)
        assert os.pread(fd, 100, 0) == b"written after the unlink"
    finally:
        os.close(fd)
    (a / "marker").write_bytes(b"m")
    wait_for(lambda: read(b / "marker") == b"m", 10, "B to see the marker")
    assert sorted(os.listdir(b)) == ["marker"]
    assert sorted(os.listdir(a)) == ["marker"]


def test_an_atime_set_on_purpose_replicates(pair: tuple[Path, Path]) -> None:
    a, b = pair
    (a / "f").write_bytes(b"x")
    os.utime(a / "f", ns=(1_111_000_000, 2_222_000_000))

    def times() -> tuple[int, int] | None:
        try:
            st = os.stat(b / "f")
        except FileNotFoundError:
            return None
        return st.st_atime_ns, st.st_mtime_ns

    wait_for(lambda: times() == (1_111_000_000, 2_222_000_000), 10, "B to show A's atime")


def test_a_name_renamed_here_and_deleted_there_is_gone_here(pair: tuple[Path, Path]) -> None:
    a, b = pair
    (a / "f.txt").write_bytes(b"text")
    wait_for(lambda: read(b / "f.txt") == b"text", 10, "B to have the file")
    os.rename(b / "f.txt", b / "g.txt")  # the kernel on B now holds g.txt
    wait_for(lambda: read(a / "g.txt") == b"text", 10, "A to see B's rename")
    (a / "g.txt").unlink()
    wait_for(lambda: not os.path.lexists(b / "g.txt"), 10, "B's kernel to forget g.txt")
    (b / "g.txt").write_bytes(b"new")  # the name is free again on B
    assert read(b / "g.txt") == b"new"


def test_a_suffix_that_a_local_delete_removes_is_forgotten_by_the_kernel(
    make_node: Callable[..., NodeProcess],
) -> None:
    pa, pb = free_port(), free_port()
    a = make_node("a", ["--listen", f"127.0.0.1:{pa}", "--peer", f"127.0.0.1:{pb}"])
    b = make_node("b", ["--listen", f"127.0.0.1:{pb}", "--peer", f"127.0.0.1:{pa}"])
    # Two files named x made apart: once the nodes meet, both are shown,
    # the later one as x, the other as x~<hex>.
    a.start()
    (a.mountpoint / "x").write_bytes(b"from a")
    a.stop()
    b.start()
    (b.mountpoint / "x").write_bytes(b"from b")
    a.start()
    wait_for(lambda: len(os.listdir(b.mountpoint)) == 2, 20, "B to show both files named x")
    suffixed = next(n for n in os.listdir(b.mountpoint) if n != "x")
    assert read(b.mountpoint / suffixed) == b"from a"  # the kernel on B holds x~<hex>
    (b.mountpoint / "x").unlink()  # A's file takes the name back, here on B
    assert read(b.mountpoint / "x") == b"from a"
    wait_for(
        lambda: not os.path.lexists(b.mountpoint / suffixed), 10, f"B's kernel to forget {suffixed}"
    )


def test_a_punched_hole_replicates(pair: tuple[Path, Path]) -> None:
    a, b = pair
    data = bytearray(os.urandom(200_000))
    (a / "f").write_bytes(data)
    subprocess.run(["fallocate", "-p", "-o", "100", "-l", "150000", str(a / "f")], check=True)
    data[100:150_100] = bytes(150_000)
    wait_for(lambda: read(b / "f") == bytes(data), 10, "B to read the file with its hole")
