"""Room on the disk that holds the data dir: a full disk must not lock the user in.

Invariant: while the disk has room, the data dir holds a reserve file of
`RESERVE_BYTES` (allocated, not sparse). The first time the store cannot
write for lack of space, the reserve is released and the node enters a *full
episode*: one WARNING says so; from then on only operations that free space
(deletes, collection, shutdown) may write, in the room the reserve left, and
every other write is refused with ENOSPC before it touches the store. The
episode ends (INFO) once the disk has room again for the reserve and as much
more, and the reserve is taken back.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path

from fuse.errors import NoSpace

log = logging.getLogger("peer.space")

RESERVE_NAME = "reserve"
RESERVE_BYTES = 8 * 1024 * 1024
# At start, with less room than this the reserve is released before the store
# is opened (SQLite needs some room for its WAL and shared memory to open at all).
START_ROOM_BYTES = 2 * 1024 * 1024


class Space:
    """The reserve of one data dir and the full episodes (see the module docstring)."""

    def __init__(self, data_dir: Path | None, reserve_bytes: int = RESERVE_BYTES) -> None:
        self.data_dir = data_dir
        self.path = data_dir / RESERVE_NAME if data_dir is not None else None
        self.reserve_bytes = reserve_bytes
        self.full = False
        self.episodes = 0

    def free_bytes(self) -> int | None:
        """Bytes available to us on the data dir's file system (None: unknown)."""
        if self.data_dir is None:
            return None
        try:
            st = os.statvfs(self.data_dir)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def start(self) -> None:
        """Before the store opens: take the reserve, or release it if the disk
        is already (nearly) full, entering a full episode."""
        if self.path is None:
            return
        room = self.free_bytes()
        if self.path.exists():
            if room is not None and room < START_ROOM_BYTES:
                self.exhausted()
            return
        self._hold()

    def _hold(self) -> bool:
        assert self.path is not None
        fd = -1
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(fd, 0)  # no fallocate here: write it out
                chunk = b"\0" * (1 << 20)
                for _ in range(0, self.reserve_bytes, len(chunk)):
                    os.write(fd, chunk)
            os.fsync(fd)
            return True
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.path.unlink()
            if exc.errno != errno.ENOSPC:
                log.warning("cannot keep a space reserve in %s: %s", self.data_dir, exc)
                return False
            self.exhausted()
            return False
        finally:
            if fd >= 0:
                os.close(fd)

    def exhausted(self) -> None:
        """The store could not write for lack of space: release the reserve and,
        once per episode, say so."""
        released = 0
        if self.path is not None:
            with contextlib.suppress(OSError):
                released = self.path.stat().st_size
                self.path.unlink()
        if self.full:
            return
        self.full = True
        self.episodes += 1
        log.warning(
            "the disk holding %s is full: writes fail with ENOSPC until space is freed; "
            "deleting files and `dfs-peer gc` still work (released a %d MiB reserve)",
            self.data_dir if self.data_dir is not None else "the store",
            released >> 20,
        )

    def room_again(self) -> bool:
        """In a full episode: end it if the disk has room again (taking the
        reserve back); True if not full (any more)."""
        if not self.full:
            return True
        room = self.free_bytes()
        if room is None or room < 2 * self.reserve_bytes:
            return False
        self.full = False
        if self.path is not None and not self._hold():
            return not self.full
        log.info("the disk has room again: writes work again")
        return True

    def refuse_if_full(self) -> None:
        """`NoSpace` for a write that would eat the room deletes need."""
        if self.full and not self.room_again():
            raise NoSpace()
