"""The FUSE adapter: error translation, attribute conversion, and real mounts of
an in-memory volume (`tests.fuse.memvolume`) served by `fuse.mount.serve` in a
child process.

Mounts follow pyfuse3's `test/util.py`: wait for the mount with a deadline and
fail fast if the daemon died; always tear down with `fusermount3 -u -z`, then
terminate, then kill. A daemon whose log shows a traceback, an ERROR or a
WARNING fails the test unless the test said it expects one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import errno
import functools
import inspect
import json
import logging
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import pytest

from fuse import errors
from fuse.adapter import BLOCK_SIZE, FuseOperations
from fuse.errors import swallow, translate
from fuse.mount import _unescape, check_fuse_device, is_mountpoint, mount_options, terminate
from fuse.protocol import Attrs
from tests.fuse.memvolume import MemVolume

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
ExpectLogs = Callable[..., None]  # the `expect_logs` fixture of tests/conftest.py
DEADLINE_S = 10.0
# A mount test that takes longer than this is wedged: the watchdog kills the
# daemon, which fails the stuck syscalls (even in D state) so the test can end.
WATCHDOG_S = 60.0
T = TypeVar("T")


# -- error translation (no mount) ------------------------------------------------------
ERRNO_OF = [
    (errors.VolumeError, errno.EIO),
    (errors.NotFound, errno.ENOENT),
    (errors.Exists, errno.EEXIST),
    (errors.NotEmpty, errno.ENOTEMPTY),
    (errors.NotADirectory, errno.ENOTDIR),
    (errors.IsADirectory, errno.EISDIR),
    (errors.NameTooLong, errno.ENAMETOOLONG),
    (errors.InvalidArgument, errno.EINVAL),
    (errors.ReadOnly, errno.EROFS),
    (errors.NotPermitted, errno.EPERM),
    (errors.AccessDenied, errno.EACCES),
    (errors.NoSpace, errno.ENOSPC),
    (errors.NoAttribute, errno.ENODATA),
    (errors.BadHandle, errno.EBADF),
    (errors.TooBig, errno.EFBIG),
    (errors.RangeError, errno.ERANGE),
    (errors.Unsupported, errno.EOPNOTSUPP),
    (errors.Retry, errno.EIO),
]


def raising(exc: BaseException) -> Callable[[], Any]:
    async def handler() -> None:
        raise exc

    return handler


def raises_errno(number: int) -> contextlib.AbstractContextManager[Any]:
    """Expect an OSError with exactly this errno (its message starts `[Errno n]`)."""
    return pytest.raises(OSError, match=rf"^\[Errno {number}\] ")


def errno_of(exc_info: pytest.ExceptionInfo[pyfuse3.FUSEError]) -> str:
    return errno.errorcode.get(exc_info.value.errno, str(exc_info.value.errno))


@pytest.mark.parametrize(("error", "number"), ERRNO_OF, ids=lambda v: getattr(v, "__name__", v))
def test_volume_error_becomes_its_errno(error: type[errors.VolumeError], number: int) -> None:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        asyncio.run(translate(raising(error()))())
    assert caught.value.errno == number, f"{error.__name__} gave {errno_of(caught)}"


def test_every_volume_error_is_in_the_table() -> None:
    def all_subclasses(cls: type) -> set[type]:
        found = {cls}
        subclasses: list[type] = cls.__subclasses__()
        for sub in subclasses:
            found |= all_subclasses(sub)
        return found

    ours = {c for c in all_subclasses(errors.VolumeError) if c.__module__ == errors.__name__}
    assert ours == {error for error, _ in ERRNO_OF}


def test_os_error_keeps_its_errno(expect_logs: ExpectLogs) -> None:
    expect_logs(r"OS error: handler=handler errno=ENOSPC", logger="fuse.errors")
    with pytest.raises(pyfuse3.FUSEError) as caught:
        asyncio.run(translate(raising(OSError(errno.ENOSPC, "disk full")))())
    assert caught.value.errno == errno.ENOSPC


def test_os_error_without_errno_becomes_eio(expect_logs: ExpectLogs) -> None:
    expect_logs(r"OS error: handler=handler errno=EIO", logger="fuse.errors")
    with pytest.raises(pyfuse3.FUSEError) as caught:
        asyncio.run(translate(raising(OSError("no errno")))())
    assert caught.value.errno == errno.EIO


def test_unexpected_exception_is_logged_with_traceback_and_becomes_eio(
    caplog: pytest.LogCaptureFixture, expect_logs: ExpectLogs
) -> None:
    expect_logs(r"unexpected error, replying EIO", logging.ERROR, logger="fuse.errors")
    with pytest.raises(pyfuse3.FUSEError) as caught:
        asyncio.run(translate(raising(RuntimeError("a bug")))())
    assert caught.value.errno == errno.EIO
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info is not None, "the traceback must be logged"
    assert isinstance(record.exc_info[1], RuntimeError)
    assert "handler=handler" in record.getMessage()


def test_fuse_error_passes_unchanged() -> None:
    original = pyfuse3.FUSEError(errno.EXDEV)
    with pytest.raises(pyfuse3.FUSEError) as caught:
        asyncio.run(translate(raising(original))())
    assert caught.value is original


def test_cancellation_is_not_translated() -> None:
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(translate(raising(asyncio.CancelledError()))())


def test_swallow_logs_and_never_raises(
    caplog: pytest.LogCaptureFixture, expect_logs: ExpectLogs
) -> None:
    expect_logs(r"error ignored \(no reply to carry it\)", logging.ERROR, logger="fuse.errors")
    for exc in (RuntimeError("bug"), pyfuse3.FUSEError(errno.EIO), errors.NotFound()):
        asyncio.run(swallow(raising(exc))())
    assert [type(r.exc_info[1]) for r in caplog.records if r.exc_info] == [
        RuntimeError,
        pyfuse3.FUSEError,
        errors.NotFound,
    ]


def test_forget_never_raises(caplog: pytest.LogCaptureFixture, expect_logs: ExpectLogs) -> None:
    expect_logs(r"handler=forget", logging.ERROR, logger="fuse.errors")
    volume = MemVolume()
    volume.fail("forget")
    operations = FuseOperations(volume)
    asyncio.run(operations.forget([(1, 1)]))
    asyncio.run(operations.forget([(12345, 1)]))  # healed or not: unknown inode, still no raise
    assert "injected failure in forget" in caplog.text


def test_every_handler_translates_errors() -> None:
    translated = translate(raising(RuntimeError())).__code__
    swallowed = swallow(raising(RuntimeError())).__code__
    handlers = {
        name
        for name, member in vars(pyfuse3.Operations).items()
        if inspect.iscoroutinefunction(member)
    }
    overridden = {name for name in handlers if name in vars(FuseOperations)}
    assert overridden >= {
        "lookup", "forget", "getattr", "setattr", "readlink", "opendir", "readdir",
        "releasedir", "fsyncdir", "mkdir", "mknod", "symlink", "link", "unlink", "rmdir",
        "rename", "create", "open", "read", "write", "flush", "fsync", "release", "statfs",
        "getxattr", "setxattr", "listxattr", "removexattr",
    }  # fmt: skip
    for name in overridden:
        code = getattr(FuseOperations, name).__code__
        expected = swallowed if name == "forget" else translated
        assert code is expected, f"FuseOperations.{name} is not wrapped by the error translation"


def test_entry_attributes_carry_type_size_blocks_and_timeouts() -> None:
    attrs = Attrs(
        inode=7,
        kind="file",
        mode=0o640,
        nlink=1,
        uid=1000,
        gid=100,
        size=1025,
        atime_ns=1_700_000_000_123_456_789,
        mtime_ns=1_700_000_001_000_000_001,
        ctime_ns=1_700_000_002_999_999_999,
    )
    entry = FuseOperations(MemVolume(), entry_timeout=5, attr_timeout=7).entry(attrs)
    assert entry.st_ino == 7
    assert entry.st_mode == stat.S_IFREG | 0o640
    assert (entry.st_nlink, entry.st_uid, entry.st_gid) == (1, 1000, 100)
    assert (entry.st_size, entry.st_blocks, entry.st_blksize) == (1025, 3, BLOCK_SIZE)
    assert entry.st_atime_ns == attrs.atime_ns
    assert entry.st_mtime_ns == attrs.mtime_ns
    assert entry.st_ctime_ns == attrs.ctime_ns
    assert (entry.entry_timeout, entry.attr_timeout, entry.generation) == (5, 7, 0)
    kinds = {"dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}
    for kind, bits in kinds.items():
        other = Attrs(8, kind, 0o755, 2, 0, 0, 0, 0, 0, 0)  # type: ignore[arg-type]
        assert stat.S_IFMT(FuseOperations(MemVolume()).entry(other).st_mode) == bits


def test_invalidate_without_a_mount_does_nothing() -> None:
    # pyfuse3 itself would dereference its unset session and crash the process.
    asyncio.run(FuseOperations(MemVolume()).invalidate([1], [(1, b"x")]))


def test_is_mountpoint_reads_mountinfo(tmp_path: Path) -> None:
    assert is_mountpoint("/")
    assert not is_mountpoint(tmp_path)
    assert _unescape(rb"/mnt/with\040space\134x") == rb"/mnt/with space\x"


def test_terminate_without_a_mount_does_nothing() -> None:
    terminate()  # pyfuse3.terminate() would dereference its unset session


def test_mount_options() -> None:
    assert mount_options(read_only=False, debug_fuse=False) == {
        "fsname=dfs-peer",
        "subtype=dfs-peer",
        "default_permissions",
    }
    assert {"ro", "debug", "allow_other"} <= mount_options(
        read_only=True, debug_fuse=True, allow_other=True
    )


# -- real mounts -----------------------------------------------------------------------
needs_fuse = pytest.mark.skipif(
    not check_fuse_device() or shutil.which("fusermount3") is None,
    reason="needs /dev/fuse and fusermount3",
)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.02)


class Mount:
    """A MemVolume served by a child process at `path`, with its control channel."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "mnt"
        self.path.mkdir()
        self.log_path = tmp_path / "daemon.log"
        self.expect_errors = False
        self._replies: queue.Queue[str | None] = queue.Queue()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.fuse.memvolume", str(self.path)],
                cwd=REPO,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
            )
        self._reader = threading.Thread(target=self._read_stdout, name="daemon-stdout")
        self._reader.start()
        self.wedged = False
        self._watchdog = threading.Timer(WATCHDOG_S, self._kill_wedged)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _kill_wedged(self) -> None:
        self.wedged = True
        self.proc.kill()
        log.error("mount wedged: the watchdog killed its daemon after %s s", WATCHDOG_S)

    def within_deadline(self, call: Callable[[], T], what: str) -> T:
        """Run a file-system call in a thread, so a wedged mount fails the test
        instead of hanging it (the teardown's kill of the daemon then frees the
        call, stuck in D state)."""
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["value"] = call()
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=run, name=what, daemon=True)
        thread.start()
        thread.join(DEADLINE_S)
        if thread.is_alive():
            self.wedged = True
            pytest.fail(f"{what}: no answer within {DEADLINE_S} s, the mount is wedged")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]  # type: ignore[no-any-return]

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._replies.put(line.rstrip("\n"))
        self._replies.put(None)  # EOF: the daemon is gone

    def _next_line(self, what: str) -> str:
        try:
            line = self._replies.get(timeout=DEADLINE_S)
        except queue.Empty:
            pytest.fail(f"{what}: no answer from the daemon within {DEADLINE_S} s")
        if line is None:
            self.proc.wait(DEADLINE_S)
            pytest.fail(f"{what}: daemon exited with {self.proc.returncode}:\n{self.log()}")
        return line

    def wait_mounted(self) -> None:
        assert self._next_line("mount") == "ready"
        assert is_mountpoint(self.path)

    def command(self, line: str) -> Any:
        """Send one control command (see tests.fuse.memvolume) and return its result."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self._next_line(line)
        assert reply.startswith("ok"), f"{line!r} -> {reply}"
        return json.loads(reply[3:])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str) -> None:
        wait_until(lambda: text in self.log(), f"{text!r} in the daemon's log")

    def assert_log_clean(self) -> None:
        if self.expect_errors:
            return
        for word in ("Traceback", " ERROR ", " WARNING ", " CRITICAL "):
            assert word not in self.log(), f"daemon logged {word.strip()}:\n{self.log()}"

    def unmount(self) -> None:
        """Unmount as a user would; the daemon must then exit cleanly by itself."""
        umount = fusermount(self.path)
        try:
            umount.wait(DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"fusermount3 -u got no answer within {DEADLINE_S} s: the mount is wedged")
        assert umount.returncode == 0, f"fusermount3 -u failed with {umount.returncode}"
        self.wait_exit()
        assert self.proc.returncode == 0, f"daemon exited with {self.proc.returncode}"

    def wait_exit(self) -> None:
        try:
            self.proc.wait(DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"daemon did not exit within {DEADLINE_S} s:\n{self.log()}")
        assert not is_mountpoint(self.path), "the mount outlived its daemon"

    def cleanup(self) -> None:
        """Whatever happened: lazy unmount, then terminate, then kill.

        fusermount3 itself looks at the mount point, so on a wedged mount it
        blocks in D state too; killing the daemon aborts the FUSE connection,
        which fails every pending request and lets it finish.
        """
        self._watchdog.cancel()
        umount = fusermount(self.path, lazy=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            umount.wait(DEADLINE_S / 2)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(DEADLINE_S / 2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        umount.wait()
        if is_mountpoint(self.path):
            fusermount(self.path, lazy=True).wait()
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self._reader.join(DEADLINE_S)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def fusermount(path: Path, *, lazy: bool = False) -> subprocess.Popen[bytes]:
    """Start `fusermount3 -u [-z]`; the caller decides how long to wait for it."""
    return subprocess.Popen(
        ["fusermount3", "-u", *(["-z"] if lazy else []), str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    served = Mount(tmp_path)
    try:
        served.wait_mounted()
        yield served
        if not served.wedged:  # else the test has failed already; cleanup() frees the mount
            if served.proc.poll() is None:
                served.unmount()
            served.assert_log_clean()
    finally:
        served.cleanup()


def write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.mount
@needs_fuse
def test_file_lifecycle(mount: Mount) -> None:
    mnt = mount.path
    write(mnt / "a.txt", b"hello")
    with open(mnt / "a.txt", "ab") as f:
        f.write(b", world")
    assert read(mnt / "a.txt") == b"hello, world"
    st = os.stat(mnt / "a.txt")
    assert (st.st_size, stat.S_ISREG(st.st_mode), st.st_uid) == (12, True, os.getuid())
    assert st.st_blksize == BLOCK_SIZE
    assert sorted(os.listdir(mnt)) == ["a.txt"]

    os.rename(mnt / "a.txt", mnt / "b.txt")
    assert sorted(os.listdir(mnt)) == ["b.txt"]
    assert read(mnt / "b.txt") == b"hello, world"

    os.truncate(mnt / "b.txt", 5)
    assert read(mnt / "b.txt") == b"hello"
    with open(mnt / "b.txt", "r+b") as f:
        f.seek(8)
        f.write(b"!")  # past the end: a hole reads as zeros
    assert read(mnt / "b.txt") == b"hello\0\0\0!"

    os.unlink(mnt / "b.txt")
    assert os.listdir(mnt) == []
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "b.txt")


@pytest.mark.mount
@needs_fuse
def test_new_entries_take_the_callers_umask(mount: Mount) -> None:
    old = os.umask(0o027)
    try:
        os.mkdir(mount.path / "d", 0o777)
        write(mount.path / "f", b"")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(mount.path / "d").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(mount.path / "f").st_mode) == 0o640


@pytest.mark.mount
@needs_fuse
def test_directories_and_symlinks(mount: Mount) -> None:
    mnt = mount.path
    os.makedirs(mnt / "d" / "e")
    write(mnt / "d" / "e" / "f", b"x")
    assert os.stat(mnt / "d").st_nlink == 3
    os.symlink("d/e/f", mnt / "link")
    assert os.readlink(mnt / "link") == "d/e/f"
    assert stat.S_ISLNK(os.lstat(mnt / "link").st_mode)
    assert read(mnt / "link") == b"x"
    os.rename(mnt / "d" / "e", mnt / "e")
    assert sorted(os.listdir(mnt)) == ["d", "e", "link"]
    with raises_errno(errno.ENOTEMPTY):
        os.rmdir(mnt / "e")
    os.unlink(mnt / "e" / "f")
    os.rmdir(mnt / "e")
    os.rmdir(mnt / "d")
    os.unlink(mnt / "link")
    assert os.listdir(mnt) == []


@pytest.mark.mount
@needs_fuse
def test_setattr_mode_and_times(mount: Mount) -> None:
    path = mount.path / "f"
    write(path, b"data")
    os.chmod(path, 0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.utime(path, ns=(1_000_000_000_123, 2_000_000_000_456))
    st = os.stat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000_123, 2_000_000_000_456)
    before = time.time_ns()
    os.utime(path)  # UTIME_NOW: pyfuse3 fills in the time
    assert os.stat(path).st_mtime_ns >= before - 10_000_000


@pytest.mark.mount
@needs_fuse
def test_xattrs(mount: Mount) -> None:
    path = mount.path / "f"
    write(path, b"")
    os.setxattr(path, "user.colour", b"blue")
    assert os.getxattr(path, "user.colour") == b"blue"
    assert os.listxattr(path) == ["user.colour"]
    with raises_errno(errno.EEXIST):
        os.setxattr(path, "user.colour", b"red", os.XATTR_CREATE)
    with raises_errno(errno.ENODATA):
        os.setxattr(path, "user.size", b"9", os.XATTR_REPLACE)
    os.setxattr(path, "user.colour", b"red", os.XATTR_REPLACE)
    assert os.getxattr(path, "user.colour") == b"red"
    os.removexattr(path, "user.colour")
    assert os.listxattr(path) == []
    with raises_errno(errno.ENODATA):
        os.getxattr(path, "user.colour")


@pytest.mark.mount
@needs_fuse
def test_volume_refusals_become_errno(mount: Mount) -> None:
    mnt = mount.path
    write(mnt / "f", b"")
    refusals: list[tuple[Callable[[], object], int]] = [
        (lambda: write(mnt / ("n" * 256), b""), errno.ENAMETOOLONG),
        (lambda: os.link(mnt / "f", mnt / "g"), errno.EPERM),
        (lambda: os.rmdir(mnt / "f"), errno.ENOTDIR),
        (lambda: os.stat(mnt / "missing"), errno.ENOENT),
    ]
    for call, expected in refusals:
        with raises_errno(expected):
            call()
    assert os.statvfs(mnt).f_namemax == 255


@pytest.mark.mount
@needs_fuse
def test_mknod_types_and_rdev_reach_stat(mount: Mount) -> None:
    mnt = mount.path
    os.mkfifo(mnt / "fifo")
    os.mknod(mnt / "tty", 0o600 | stat.S_IFCHR, os.makedev(4, 1))
    os.mknod(mnt / "disk", 0o600 | stat.S_IFBLK, os.makedev(7, 2))
    os.mknod(mnt / "sock", 0o600 | stat.S_IFSOCK)
    shown = {}
    for name in ("fifo", "tty", "disk", "sock"):
        st = os.stat(mnt / name)
        shown[name] = (stat.S_IFMT(st.st_mode), st.st_rdev)
    assert shown == {
        "fifo": (stat.S_IFIFO, 0),
        "tty": (stat.S_IFCHR, os.makedev(4, 1)),
        "disk": (stat.S_IFBLK, os.makedev(7, 2)),
        "sock": (stat.S_IFSOCK, 0),
    }


def renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, bytes(old), at_fdcwd, bytes(new), flags) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


@pytest.mark.mount
@needs_fuse
def test_rename_flags_reach_the_volume(mount: Mount) -> None:
    a, b = mount.path / "a", mount.path / "b"
    write(a, b"A")
    write(b, b"B")
    with raises_errno(errno.EEXIST):
        renameat2(a, b, pyfuse3.RENAME_NOREPLACE)
    renameat2(a, b, pyfuse3.RENAME_EXCHANGE)
    assert (read(a), read(b)) == (b"B", b"A")


def posix_fallocate(path: Path, length: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, length)
    finally:
        os.close(fd)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


@pytest.mark.mount
@needs_fuse
def test_fallocate_reaches_the_volume(mount: Mount) -> None:
    # pyfuse3 has no fallocate handler: `fuse.fallocate` installs one.
    path = mount.path / "f"
    write(path, b"0123456789")
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, 0x02 | 0x01, 2, 3)  # PUNCH_HOLE | KEEP_SIZE: nothing emulates it
        fallocate(fd, 0, 0, 20)
    finally:
        os.close(fd)
    assert read(path) == b"01" + bytes(3) + b"56789" + bytes(10)


# The regression this module exists for: in asyncio mode an exception other than
# FUSEError leaves the syscall unanswered and wedges the mount, silently.
FAILURES: dict[str, tuple[str, Callable[[Path], object]]] = {
    "fallocate": ("", lambda mnt: posix_fallocate(mnt / "data", 100)),
    "lookup": ("boom", lambda mnt: os.stat(mnt / "boom")),
    "readdir": ("", lambda mnt: os.listdir(mnt)),
    "read": ("", lambda mnt: read(mnt / "data")),
    "write": ("", lambda mnt: write(mnt / "data", b"more")),
    "getxattr": ("", lambda mnt: os.getxattr(mnt / "data", "user.x")),
}


@pytest.mark.mount
@needs_fuse
@pytest.mark.parametrize("method", sorted(FAILURES))
def test_handler_raising_runtime_error_gives_eio_and_mount_still_answers(
    mount: Mount, method: str
) -> None:
    mnt = mount.path
    write(mnt / "data", b"payload")
    name, syscall = FAILURES[method]
    mount.command(f"fail {method} {name}".strip())
    mount.expect_errors = True

    with raises_errno(errno.EIO):
        mount.within_deadline(lambda: syscall(mnt), f"{method} that raises")

    # The same mount still answers: at once, for requests the fault does not touch...
    mount.within_deadline(lambda: write(mnt / "empty", b""), "create while the fault is armed")
    # ...and for everything once the volume is healed (a wedged mount would not).
    mount.command("heal")
    mount.within_deadline(lambda: write(mnt / "after", b"still here"), "write after the error")
    assert mount.within_deadline(lambda: read(mnt / "after"), "read after") == b"still here"
    assert mount.within_deadline(lambda: sorted(os.listdir(mnt)), "list after") == [
        "after",
        "data",
        "empty",
    ]

    log = mount.log()
    assert "Traceback" in log, "the unexpected exception must be logged with its traceback"
    assert f"RuntimeError: injected failure in {method}" in log
    assert f"handler={method}" in log


@pytest.mark.mount
@needs_fuse
def test_forget_that_raises_is_logged_and_swallowed(mount: Mount) -> None:
    mount.command("fail forget")
    mount.expect_errors = True

    def create_and_unlink(path: Path) -> None:
        write(path, b"x")
        os.unlink(path)

    for i in range(10):
        mount.within_deadline(functools.partial(create_and_unlink, mount.path / f"f{i}"), "unlink")
    # The kernel forgets an unlinked inode once nothing holds it any more.
    mount.wait_for_log("RuntimeError: injected failure in forget")
    assert "handler=forget" in mount.log()
    mount.within_deadline(lambda: write(mount.path / "after", b"ok"), "create after forget")
    assert mount.within_deadline(lambda: read(mount.path / "after"), "read after forget") == b"ok"


@pytest.mark.mount
@needs_fuse
def test_readdir_of_2000_entries_lists_each_once_and_counts_lookups(mount: Mount) -> None:
    # Made behind the kernel's back, named in an order unlike their inodes: the
    # listing takes many READDIRPLUS rounds resuming at next_id.
    mount.command("populate /big 2000")
    names = os.listdir(mount.path / "big")
    repeated = [name for name, n in collections.Counter(names).items() if n > 1]
    assert not repeated, f"listed more than once: {repeated[:10]}"
    assert sorted(names) == [f"f{i:05d}" for i in range(2000)]

    # Every entry readdir_reply accepted is a lookup the kernel will forget...
    counts = mount.command("lookups /big")
    assert min(counts.values()) >= 1, "an entry handed over by readdir was not counted"
    # ...and once all are unlinked the kernel forgets exactly that many: no
    # LookupCountError in the log (checked at teardown), and the volume frees them.
    for name in names:
        os.unlink(mount.path / "big" / name)
    os.rmdir(mount.path / "big")
    wait_until(lambda: mount.command("nodes") == 1, "the kernel forgot every unlinked entry")


@pytest.mark.mount
@needs_fuse
def test_remote_write_is_seen_after_invalidate(mount: Mount) -> None:
    path = mount.path / "f"
    write(path, b"old")
    assert os.stat(path).st_size == 3
    # Without invalidation the kernel keeps answering from its cache (300 s)...
    mount.command("remote-write /f brand-new-content quiet")
    assert os.stat(path).st_size == 3
    # ...with it, the next stat and read see the peer's version.
    mount.command("remote-write /f brand-new-content")
    assert os.stat(path).st_size == len(b"brand-new-content")
    assert read(path) == b"brand-new-content"


@pytest.mark.mount
@needs_fuse
def test_remote_unlink_is_seen_after_invalidate(mount: Mount) -> None:
    write(mount.path / "stale", b"")
    write(mount.path / "gone", b"")
    assert (mount.path / "stale").exists()
    assert (mount.path / "gone").exists()
    mount.command("remote-unlink /stale quiet")
    assert (mount.path / "stale").exists(), "the dentry cache should still hold it"
    mount.command("remote-unlink /gone")  # answers once the kernel dropped the entry
    assert not (mount.path / "gone").exists()


@pytest.mark.mount
@needs_fuse
def test_a_mount_serving_requests_never_imports_trio(mount: Mount) -> None:
    # pyfuse3 imports trio, which it never uses in asyncio mode: 2.8 MiB of a
    # node's resident memory. `fuse` puts the import off until something uses it.
    write(mount.path / "f", b"data")
    assert read(mount.path / "f") == b"data"
    assert os.listdir(mount.path) == ["f"]
    mount.command("remote-write /f other")  # a kernel notification, from a thread
    assert read(mount.path / "f") == b"other"
    os.unlink(mount.path / "f")
    assert mount.command("imported trio") is True  # what pyfuse3 holds: the stand-in
    assert mount.command("imported trio._core") is False


def test_trio_put_off_by_fuse_is_whole_when_used() -> None:
    code = (
        "import sys, fuse.mount; assert 'trio._core' not in sys.modules; "
        "import trio; print(trio.lowlevel.current_task.__name__, "
        "type(sys.modules['trio']).__name__, 'trio._core' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["current_task", "module", "True"]


@pytest.mark.mount
@needs_fuse
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT], ids=["cancel serve", "fuse.mount.terminate"]
)
def test_stopping_serve_unmounts_and_exits_cleanly(mount: Mount, sig: signal.Signals) -> None:
    # A request still in flight (the RELEASE after close) when the stop comes is
    # what made pyfuse3.terminate() fail half-way; serve then freed the session
    # under its workers and the process crashed.
    write(mount.path / "f", b"x")
    mount.proc.send_signal(sig)
    mount.wait_exit()
    assert mount.proc.returncode == 0
    assert "unmounted" in mount.log()
