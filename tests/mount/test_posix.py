"""Every file-system call through a real mount, with its errno cases."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fuse.mount import READAHEAD_KB
from scenarios.harness import NodeProcess

pytestmark = pytest.mark.mount


def _errno_of(fn: Callable[..., object], *args: object, **kwargs: object) -> int:
    """The errno `fn(*args)` fails with (failing the test if it succeeds)."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        return exc.errno or 0
    raise AssertionError(f"{fn.__name__}{args} succeeded; an error was expected")


def test_create_write_read_back(mnt: Path) -> None:
    p = mnt / "hello.txt"
    p.write_bytes(b"hello world\n")
    assert p.read_bytes() == b"hello world\n"
    assert p.stat().st_size == 12
    assert stat.S_ISREG(p.stat().st_mode)


def test_lookup_missing_is_enoent(mnt: Path) -> None:
    assert _errno_of(os.stat, mnt / "nope") == errno.ENOENT
    assert _errno_of(open, mnt / "nope") == errno.ENOENT


def test_create_exclusive_existing_is_eexist(mnt: Path) -> None:
    (mnt / "a").write_bytes(b"x")
    assert _errno_of(os.open, mnt / "a", os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST


def test_mkdir_rmdir_and_their_errors(mnt: Path) -> None:
    d = mnt / "d"
    d.mkdir()
    assert stat.S_ISDIR(d.stat().st_mode)
    assert _errno_of(os.mkdir, d) == errno.EEXIST
    (d / "f").write_bytes(b"1")
    assert _errno_of(os.rmdir, d) == errno.ENOTEMPTY
    assert _errno_of(os.rmdir, d / "f") == errno.ENOTDIR
    assert _errno_of(os.mkdir, d / "f" / "x") == errno.ENOTDIR
    (d / "f").unlink()
    d.rmdir()
    assert not d.exists()


def test_unlink_of_directory_is_eisdir(mnt: Path) -> None:
    (mnt / "d").mkdir()
    assert _errno_of(os.unlink, mnt / "d") in (errno.EISDIR, errno.EPERM)


def test_open_directory_for_writing_is_eisdir(mnt: Path) -> None:
    (mnt / "d").mkdir()
    assert _errno_of(os.open, mnt / "d", os.O_WRONLY) == errno.EISDIR


def test_name_longer_than_255_bytes_is_enametoolong(mnt: Path) -> None:
    assert _errno_of(os.open, mnt / ("x" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    assert _errno_of(os.mkdir, mnt / ("y" * 300)) == errno.ENAMETOOLONG
    ok = mnt / ("z" * 255)
    ok.write_bytes(b"max")
    assert ok.read_bytes() == b"max"


def test_readdir_lists_each_entry_once(mnt: Path) -> None:
    names = {f"f{i:04d}" for i in range(300)}
    for n in names:
        (mnt / n).write_bytes(n.encode())
    (mnt / "sub").mkdir()
    assert set(os.listdir(mnt)) == names | {"sub"}
    assert len(os.listdir(mnt)) == len(names) + 1


def test_rename_moves_and_replaces_atomically(mnt: Path) -> None:
    (mnt / "a").write_bytes(b"A")
    (mnt / "b").write_bytes(b"B")
    os.rename(mnt / "a", mnt / "b")
    assert not (mnt / "a").exists()
    assert (mnt / "b").read_bytes() == b"A"
    (mnt / "d").mkdir()
    os.rename(mnt / "b", mnt / "d" / "c")
    assert (mnt / "d" / "c").read_bytes() == b"A"
    assert os.listdir(mnt / "d") == ["c"]


def test_rename_directory_errors(mnt: Path) -> None:
    (mnt / "d").mkdir()
    (mnt / "d" / "sub").mkdir()
    (mnt / "e").mkdir()
    (mnt / "e" / "x").write_bytes(b"")
    (mnt / "f").write_bytes(b"")
    assert _errno_of(os.rename, mnt / "d", mnt / "d" / "sub" / "in") == errno.EINVAL
    assert _errno_of(os.rename, mnt / "d", mnt / "e") == errno.ENOTEMPTY
    assert _errno_of(os.rename, mnt / "d", mnt / "f") == errno.ENOTDIR
    assert _errno_of(os.rename, mnt / "f", mnt / "d") == errno.EISDIR
    (mnt / "empty").mkdir()
    os.rename(mnt / "d", mnt / "empty")
    assert os.listdir(mnt / "empty") == ["sub"]


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    rc = libc.renameat2(at_fdcwd, bytes(src), at_fdcwd, bytes(dst), flags)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_rename_noreplace_is_honoured(mnt: Path) -> None:
    (mnt / "a").write_bytes(b"A")
    (mnt / "b").write_bytes(b"B")
    assert _errno_of(_renameat2, mnt / "a", mnt / "b", 1) == errno.EEXIST
    assert (mnt / "b").read_bytes() == b"B"
    _renameat2(mnt / "a", mnt / "c", 1)
    assert (mnt / "c").read_bytes() == b"A"


def test_rename_exchange_is_refused_with_einval(mnt: Path) -> None:
    (mnt / "a").write_bytes(b"A")
    (mnt / "b").write_bytes(b"B")
    assert _errno_of(_renameat2, mnt / "a", mnt / "b", 2) == errno.EINVAL
    assert (mnt / "a").read_bytes() == b"A"


def test_symlink_and_readlink(mnt: Path) -> None:
    (mnt / "target").write_bytes(b"T")
    os.symlink("target", mnt / "link")
    assert os.readlink(mnt / "link") == "target"
    assert (mnt / "link").read_bytes() == b"T"
    assert stat.S_ISLNK(os.lstat(mnt / "link").st_mode)
    assert _errno_of(os.readlink, mnt / "target") == errno.EINVAL
    assert _errno_of(os.symlink, "x", mnt / "link") == errno.EEXIST


def test_hard_links_are_refused_with_eperm(mnt: Path) -> None:
    (mnt / "a").write_bytes(b"A")
    assert _errno_of(os.link, mnt / "a", mnt / "b") == errno.EPERM
    # pjdfstest link/10.t: onto an existing name of any type, EEXIST first.
    (mnt / "file").write_bytes(b"")
    (mnt / "dir").mkdir()
    os.mkfifo(mnt / "fifo")
    os.symlink("a", mnt / "symlink")
    for name in ("file", "dir", "fifo", "symlink"):
        assert _errno_of(os.link, mnt / "a", mnt / name) == errno.EEXIST, name


def test_mknod_makes_regular_files_fifos_sockets_and_device_nodes(mnt: Path) -> None:
    os.mknod(mnt / "plain", 0o644 | stat.S_IFREG)
    assert stat.S_ISREG((mnt / "plain").stat().st_mode)
    os.mkfifo(mnt / "fifo", 0o640)
    st = os.stat(mnt / "fifo")
    assert (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode)) == (stat.S_IFIFO, 0o640)
    os.mknod(mnt / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.stat(mnt / "null")
    assert (stat.S_IFMT(st.st_mode), st.st_rdev) == (stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(mnt / "disk", 0o600 | stat.S_IFBLK, os.makedev(8, 1))
    st = os.stat(mnt / "disk")
    assert (stat.S_IFMT(st.st_mode), st.st_rdev) == (stat.S_IFBLK, os.makedev(8, 1))
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(mnt / "sock"))
        assert stat.S_ISSOCK(os.stat(mnt / "sock").st_mode)
    assert sorted(os.listdir(mnt)) == ["disk", "fifo", "null", "plain", "sock"]
    assert _errno_of(os.mkfifo, mnt / "fifo") == errno.EEXIST
    os.unlink(mnt / "fifo")
    assert not (mnt / "fifo").exists()


def test_a_fifo_on_the_mount_carries_data_between_processes(mnt: Path) -> None:
    os.mkfifo(mnt / "pipe")
    reader = subprocess.Popen(["cat", str(mnt / "pipe")], stdout=subprocess.PIPE)
    with open(mnt / "pipe", "wb") as w:
        w.write(b"through the pipe\n")
    out, _ = reader.communicate(timeout=10)
    assert out == b"through the pipe\n"
    assert os.stat(mnt / "pipe").st_size == 0


def test_chmod_chown_and_utimens(mnt: Path) -> None:
    p = mnt / "f"
    p.write_bytes(b"x")
    os.chmod(p, 0o600)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    os.chown(p, 1234, 5678)
    st = p.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.utime(p, ns=(1_000_000_000, 1_500_000_000_123))
    assert p.stat().st_mtime_ns == 1_500_000_000_123


def test_truncate_shrinks_and_extends_with_zeros(mnt: Path) -> None:
    p = mnt / "t"
    p.write_bytes(b"abcdefgh" * 40000)  # 320,000 bytes: spans three blocks
    os.truncate(p, 5)
    assert p.read_bytes() == b"abcde"
    os.truncate(p, 200_000)
    data = p.read_bytes()
    assert data[:5] == b"abcde"
    assert data[5:] == bytes(200_000 - 5)


def test_truncate_to_huge_size_is_a_hole(mnt: Path, node) -> None:  # type: ignore[no-untyped-def]
    p = mnt / "sparse"
    p.write_bytes(b"start")
    os.truncate(p, 1 << 40)  # 1 TiB
    assert p.stat().st_size == 1 << 40
    with open(p, "rb") as f:
        f.seek((1 << 40) - 10)
        assert f.read() == bytes(10)
    store = sum(f.stat().st_size for f in node.data_dir.iterdir())
    assert store < 64 << 20


def test_write_past_end_leaves_a_hole_of_zeros(mnt: Path) -> None:
    p = mnt / "h"
    with open(p, "wb") as f:
        f.write(b"A")
        f.seek(1_000_000)
        f.write(b"B")
    data = p.read_bytes()
    assert len(data) == 1_000_001
    assert data[0:1] == b"A"
    assert data[-1:] == b"B"
    assert data[1:-1] == bytes(999_999)


def test_append_mode_appends(mnt: Path) -> None:
    p = mnt / "log"
    for i in range(5):
        with open(p, "ab") as f:
            f.write(f"{i}\n".encode())
    assert p.read_bytes() == b"0\n1\n2\n3\n4\n"


def test_two_handles_see_each_others_unflushed_writes(mnt: Path) -> None:
    p = mnt / "shared"
    p.write_bytes(b"........")
    with open(p, "r+b", buffering=0) as w, open(p, "rb", buffering=0) as r:
        w.seek(2)
        w.write(b"XY")
        r.seek(0)
        assert r.read() == b"..XY...."


def test_unlinked_open_file_stays_readable_and_writable(mnt: Path) -> None:
    p = mnt / "tmp"
    p.write_bytes(b"keep me")
    with open(p, "r+b", buffering=0) as f:
        p.unlink()
        assert not p.exists()
        assert f.read() == b"keep me"
        f.write(b"!")
        f.seek(0)
        assert f.read() == b"keep me!"
    assert not p.exists()
    assert "tmp" not in os.listdir(mnt)


def test_xattrs_set_get_list_remove(mnt: Path) -> None:
    p = mnt / "x"
    p.write_bytes(b"")
    os.setxattr(p, "user.color", b"blue")
    assert os.getxattr(p, "user.color") == b"blue"
    assert "user.color" in os.listxattr(p)
    assert _errno_of(os.setxattr, p, "user.color", b"red", os.XATTR_CREATE) == errno.EEXIST
    assert _errno_of(os.setxattr, p, "user.size", b"1", os.XATTR_REPLACE) == errno.ENODATA
    os.removexattr(p, "user.color")
    assert _errno_of(os.getxattr, p, "user.color") == errno.ENODATA
    assert _errno_of(os.removexattr, p, "user.color") == errno.ENODATA


def test_statfs_reports_namemax_255(mnt: Path) -> None:
    st = os.statvfs(mnt)
    assert st.f_namemax == 255
    assert st.f_bsize > 0
    assert st.f_blocks > 0


def test_directory_mtime_changes_when_entries_do(mnt: Path) -> None:
    d = mnt / "d"
    d.mkdir()
    os.utime(d, ns=(0, 0))
    assert d.stat().st_mtime_ns == 0
    (d / "new").write_bytes(b"")
    assert d.stat().st_mtime_ns > 0
    os.utime(d, ns=(0, 0))
    (d / "new").unlink()
    assert d.stat().st_mtime_ns > 0


def test_new_entries_take_the_callers_uid_and_gid(mnt: Path) -> None:
    os.chmod(mnt, 0o777)
    (mnt / "pub").mkdir()
    os.chmod(mnt / "pub", 0o777)
    # The directory is opened first: pytest's temp dirs are private to root, so
    # the other user could not walk the path to the mount.
    pub = os.open(mnt / "pub", os.O_RDONLY | os.O_DIRECTORY)
    pid = os.fork()
    if pid == 0:  # child: become another user and create a file
        code = 1
        try:
            os.setgid(4321)
            os.setuid(1234)
            os.close(os.open("mine", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=pub))
            code = 0
        finally:
            os._exit(code)
    os.close(pub)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    st = (mnt / "pub" / "mine").stat()
    assert (st.st_uid, st.st_gid) == (1234, 4321)


def test_default_permissions_give_eacces(mnt: Path) -> None:
    os.chmod(mnt, 0o755)
    (mnt / "secret").write_bytes(b"s")
    os.chmod(mnt / "secret", 0o600)
    (mnt / "open").write_bytes(b"o")
    os.chmod(mnt / "open", 0o644)
    root = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)  # see the uid test above
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.setuid(1234)
            os.close(os.open("open", os.O_RDONLY, dir_fd=root))  # allowed
            try:
                os.open("secret", os.O_RDONLY, dir_fd=root)
                code = 1
            except PermissionError:
                code = 0
        finally:
            os._exit(code)
    os.close(root)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_o_trunc_on_an_existing_file_truncates_it(mnt: Path) -> None:
    # The kernel negotiates atomic O_TRUNC: it sends no setattr, open must truncate.
    subprocess.run(
        ["sh", "-c", "printf 'hello world\\n' > f; printf 'hi\\n' > f"], cwd=mnt, check=True
    )
    assert (mnt / "f").read_bytes() == b"hi\n"
    os.utime(mnt / "f", ns=(1_000_000_000, 1_000_000_000))
    before = os.stat(mnt / "f")
    # Times are kept to the millisecond: let the clock move past ctime's,
    # or an update within the same millisecond would look like none.
    time.sleep(0.005)
    os.close(os.open(mnt / "f", os.O_WRONLY | os.O_TRUNC))
    after = os.stat(mnt / "f")
    assert after.st_size == 0
    assert after.st_mtime_ns > before.st_mtime_ns, "O_TRUNC must update mtime"
    assert after.st_ctime_ns > before.st_ctime_ns, "O_TRUNC must update ctime"


def test_an_unlinked_open_file_keeps_size_and_content_until_the_last_close(mnt: Path) -> None:
    # pjdfstest unlink/14.t: written through the descriptor, then unlinked.
    fd = os.open(mnt / "new", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"Hello, World!")
        os.unlink(mnt / "new")
        st = os.fstat(fd)
        assert (st.st_size, st.st_nlink) == (13, 0)
        assert os.pread(fd, 13, 0) == b"Hello, World!"
    finally:
        os.close(fd)
    # Written and closed first, then opened and unlinked.
    (mnt / "old").write_bytes(b"keep me")
    fd = os.open(mnt / "old", os.O_RDWR)
    try:
        os.unlink(mnt / "old")
        assert os.fstat(fd).st_size == 7
        assert os.pread(fd, 100, 0) == b"keep me"
        os.pwrite(fd, b"!", 7)
        assert os.fstat(fd).st_size == 8
        assert os.pread(fd, 100, 0) == b"keep me!"
    finally:
        os.close(fd)
    assert os.listdir(mnt) == []


def test_a_file_renamed_over_while_open_keeps_its_content(mnt: Path) -> None:
    (mnt / "target").write_bytes(b"old content")
    (mnt / "new").write_bytes(b"new")
    fd = os.open(mnt / "target", os.O_RDONLY)
    try:
        os.rename(mnt / "new", mnt / "target")
        assert os.fstat(fd).st_size == 11
        assert os.pread(fd, 100, 0) == b"old content"
    finally:
        os.close(fd)
    assert (mnt / "target").read_bytes() == b"new"


def test_an_atime_set_on_purpose_is_kept_and_reads_never_change_it(mnt: Path) -> None:
    p = mnt / "f"
    p.write_bytes(b"content")
    os.utime(p, ns=(1_000_000_123, 2_000_000_456))
    st = p.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    assert p.read_bytes() == b"content"  # like noatime: a read sets nothing
    assert p.stat().st_atime_ns == 1_000_000_123
    subprocess.run(["touch", "-a", "-d", "@3", str(p)], check=True)  # atime only
    st = p.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (3_000_000_000, 2_000_000_456)
    subprocess.run(["touch", "-m", str(p)], check=True)  # mtime to now, atime omitted
    st = p.stat()
    assert st.st_atime_ns == 3_000_000_000
    assert st.st_mtime_ns > 2_000_000_456


def _fallocate(path: Path, *args: str) -> None:
    """util-linux fallocate(1): fallocate(2) itself, with no fallback."""
    subprocess.run(["fallocate", *args, str(path)], check=True, capture_output=True)


def test_fallocate_extends_punches_holes_and_zeroes_ranges(mnt: Path) -> None:
    p = mnt / "f"
    data = bytearray(os.urandom(300_000))  # three blocks, the last one partial
    p.write_bytes(data)
    _fallocate(p, "-l", "400000")  # mode 0: the size grows, the new bytes read as zeros
    data += bytes(100_000)
    assert p.stat().st_size == 400_000
    _fallocate(p, "-n", "-l", "900000")  # KEEP_SIZE: nothing shows
    assert p.stat().st_size == 400_000
    _fallocate(p, "-p", "-o", "1000", "-l", "2000")  # PUNCH_HOLE (with KEEP_SIZE)
    data[1000:3000] = bytes(2000)
    _fallocate(p, "-p", "-o", str(128 * 1024), "-l", str(128 * 1024))  # a whole block
    data[128 * 1024 : 256 * 1024] = bytes(128 * 1024)
    _fallocate(p, "-z", "-o", "250000", "-l", "200000")  # ZERO_RANGE past the end grows it
    data[250_000:] = bytes(150_000)
    data += bytes(50_000)
    assert p.stat().st_size == 450_000
    assert p.read_bytes() == bytes(data)
    with open(p, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, 500_000)
    assert p.stat().st_size == 500_000


def test_the_mount_reads_ahead_in_large_requests_and_a_big_file_reads_back(
    node: NodeProcess,
) -> None:
    """Read-ahead raised from the kernel's 128 KiB (`fuse.mount.READAHEAD_KB`),
    so a sequential read asks for 1 MiB at a time, several at once; read back
    across block and request boundaries, the bytes are the ones written."""
    if os.geteuid() != 0:
        pytest.skip("only root may set a mount's read-ahead")

    def read_ahead_kb() -> int:
        dev = os.stat(node.mountpoint).st_dev
        return int(
            Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text()
        )

    def set_by_now() -> bool:  # (set once the mount answers, beside the start)
        for _ in range(100):
            if read_ahead_kb() == READAHEAD_KB:
                return True
            time.sleep(0.05)
        return False

    assert set_by_now(), read_ahead_kb()
    data = os.urandom(9 * 1024 * 1024 + 12345)
    (node.mountpoint / "big").write_bytes(data)
    node.stop()
    node.start()  # a new mount: nothing in the page cache
    assert set_by_now(), read_ahead_kb()
    with open(node.mountpoint / "big", "rb") as f:
        parts = [f.read(777_777)]
        f.seek(3 * 1024 * 1024 - 5)
        parts.append(f.read(10))
    assert parts[0] == data[:777_777]
    assert parts[1] == data[3 * 1024 * 1024 - 5 : 3 * 1024 * 1024 + 5]
    assert (node.mountpoint / "big").read_bytes() == data
