"""The lifetime of a mount: mount, serve requests until the end, unmount.

Invariant: once `pyfuse3.init` has mounted the file system, `serve` returns or
raises only after `pyfuse3.close(unmount=True)`, and `close` frees pyfuse3's
session only after everything that uses it has stopped (pyfuse3's worker tasks,
our cache invalidations), whichever way the loop ended: an external unmount,
`terminate()`, an error or cancellation. `close(unmount=False)` (what pyfuse3's
examples do) would leave a dead "Transport endpoint is not connected" mount
behind; freeing the session under a user crashes the process.

To stop a mount, cancel `serve` or call this module's `terminate()` (fine in a
signal handler), not `pyfuse3.terminate()`, which crashes when nothing is
mounted.

`serve` switches pyfuse3 to asyncio mode itself (`pyfuse3.asyncio.enable()`,
idempotent), so a caller need not remember to; it must only run in an asyncio
event loop.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import stat
import threading
from collections.abc import Callable
from typing import Any

import pyfuse3
import pyfuse3.asyncio

from fuse import fallocate

log = logging.getLogger(__name__)

FSNAME = "dfs-peer"
# How far the kernel reads ahead in a file on this mount (its default is 128
# KiB). Each read request then asks for up to 1 MiB (max_write's size) and
# several are in flight, where 128 KiB requests one after another paid the
# per-request cost eight times: a sequential read after a remount went from
# 140-180 MB/s to 290-355 MB/s. Reading ahead only follows sequential reads.
READAHEAD_KB = 4096
FUSE_DEVICE = "/dev/fuse"
FUSE_CONF = "/etc/fuse.conf"

# pyfuse3 keeps one global session, and its functions dereference it unchecked:
# a crash, not an error, once `close()` has freed it. `_live` is True between
# init and close; `_notifying` counts kernel notifications in flight, which
# `serve` waits for (under `_guard`) before it frees the session.
_guard = threading.Condition()
_live = False
_notifying = 0
# How long `serve` waits at the end for a notification the kernel holds back
# (it waits for a related request, which may never be answered once we stop).
NOTIFY_DRAIN_S = 5.0


class MountFailed(Exception):
    """The kernel refused the mount (missing mount point, already mounted, no FUSE)."""


def _mount_device(mountpoint: str) -> str | None:
    """The "major:minor" of the file system mounted at `mountpoint`, from
    /proc/self/mountinfo (a stat would ask our own file system, which does
    not answer before it serves)."""
    # Resolve the parent only: resolving the mount point itself would stat it,
    # which asks this very process (not serving yet): a deadlock.
    where = os.path.abspath(mountpoint)
    want = os.fsencode(
        os.path.join(os.path.realpath(os.path.dirname(where)), os.path.basename(where))
    )
    found = None
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split(b" ")
                if len(fields) > 4 and _unescape(fields[4]) == want:
                    found = fields[2].decode()  # the last one: mounted over the others
    except OSError:
        return None
    return found


async def _tune_once_answering(mountpoint: str) -> None:
    """`set_readahead` once the kernel has our answer to FUSE_INIT (which
    lowers read-ahead to what libfuse offered): after a stat of the mount
    point comes back (served by this loop, so asked from a thread). Returns
    then, or at once if the mount died, or after 30 s."""
    try:
        async with asyncio.timeout(30):
            await asyncio.to_thread(os.stat, mountpoint)
    except (TimeoutError, OSError) as exc:
        log.debug("read-ahead left as it was: %s", exc)
        return
    set_readahead(mountpoint)


def set_readahead(mountpoint: str, kb: int = READAHEAD_KB) -> bool:
    """Best effort (root, a writable /sys): the mount reads ahead `kb` KiB."""
    device = _mount_device(mountpoint)
    if device is None:
        return False
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as exc:
        log.debug("read-ahead left as it was: %s", exc)
        return False
    return True


def mount_options(*, read_only: bool, debug_fuse: bool, allow_other: bool = False) -> set[str]:
    """libfuse options: `fsname` and `subtype` name us in /proc/mounts
    (`dfs-peer on /mnt type fuse.dfs-peer`); the kernel checks permissions
    against the modes we report (`default_permissions`), which is what makes
    `allow_other` (users other than the one who mounted) safe."""
    options = {f"fsname={FSNAME}", f"subtype={FSNAME}", "default_permissions"}
    if allow_other:
        options.add("allow_other")
    if read_only:
        options.add("ro")
    if debug_fuse:
        options.add("debug")  # libfuse prints every request and reply to stderr
    return options


async def serve(
    operations: pyfuse3.Operations,
    mountpoint: str,
    *,
    read_only: bool,
    debug_fuse: bool,
    allow_other: bool | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    """Mount `operations` at `mountpoint` and serve requests until unmounted.

    `allow_other`: let other users use the mount (FUSE refuses them by
    default); None means "if permitted" (see `may_allow_other`).

    `ready` is called once the mount exists (requests are answered from the
    next event-loop step on). Ends when the file system is unmounted from
    outside (`fusermount3 -u`) or `terminate()` is called; if the task is
    cancelled, stops pyfuse3's workers, unmounts, and re-raises.
    Raises `MountFailed` if the kernel refuses the mount.
    """
    pyfuse3.asyncio.enable()
    _harden_asyncio_shim()
    if not faulthandler.is_enabled():
        faulthandler.enable()  # a wedged request then at least dumps its stacks on SIGABRT
    global _live
    options = mount_options(
        read_only=read_only,
        debug_fuse=debug_fuse,
        allow_other=may_allow_other() if allow_other is None else allow_other,
    )
    try:
        pyfuse3.init(operations, mountpoint, options)
    except RuntimeError as exc:
        raise MountFailed(f"cannot mount {mountpoint}: {exc}") from exc
    _live = True
    handler = getattr(operations, "fallocate", None)
    if handler is not None and not read_only:
        fallocate.install(handler)
    log.info("mounted: mountpoint=%s options=%s", mountpoint, ",".join(sorted(options)))
    try:
        # pyfuse3's asyncio "nursery" never cancels its workers: if `main()` itself
        # were cancelled they would go on using the session that `close()` frees.
        # So main runs as its own task, and a cancellation stops it the way an
        # unmount does, via `terminate()`, and waits for it before freeing anything.
        main = asyncio.create_task(pyfuse3.main(), name="pyfuse3.main")
        try:
            # Ready once the mount answers, read-ahead set (files opened
            # before would keep the kernel's 128 KiB).
            await _tune_once_answering(mountpoint)
            if ready is not None:
                ready()
            await asyncio.shield(main)
        except BaseException:
            if not main.done():
                log.debug("stopping pyfuse3 workers")
                await _stop(main)
            raise
    finally:
        _end_notifications()
        pyfuse3.close(unmount=True)
        log.info("unmounted: mountpoint=%s", mountpoint)


def notify_kernel(send: Callable[[], None]) -> bool:
    """Call `send` (a `pyfuse3.invalidate_*` call) if a session is live, keeping
    `serve` from freeing the session until it returns. False if nothing is
    mounted (then `send` is not called). Blocks: call it from a worker thread.
    """
    global _notifying
    with _guard:
        if not _live:
            return False
        _notifying += 1
    try:
        send()
    finally:
        with _guard:
            _notifying -= 1
            _guard.notify_all()
    return True


def _end_notifications() -> None:
    """No new notifications; wait (bounded) for those in flight.

    Blocks the event loop, on purpose: the requests a held-back notification
    waits for can no longer be answered (the workers have stopped), and
    nothing else may free the session meanwhile.
    """
    global _live
    with _guard:
        _live = False
        if not _guard.wait_for(lambda: _notifying == 0, timeout=NOTIFY_DRAIN_S):
            log.warning(
                "unmounting with %d cache invalidations still blocked in the kernel", _notifying
            )


def terminate() -> None:
    """Make a running `serve` return, as an external unmount would (it still
    unmounts). Safe to call from a signal handler on the event loop; a no-op
    when nothing is mounted, where `pyfuse3.terminate()` would crash.
    """
    if not _live:
        log.debug("terminate: no live FUSE session")
        return
    pyfuse3.terminate()


def _harden_asyncio_shim() -> None:
    """Replace two functions of pyfuse3's asyncio shim with race-free ones.

    pyfuse3 (3.5) stops its workers with `notify_closing`, which fails each
    pending "fd readable" future. When a request has just arrived, one of those
    futures is already resolved: `notify_closing` then raises InvalidStateError
    half-way (the workers after it sleep on, and `serve` would never return),
    or the resolving reader callback, already queued, raises it instead and
    asyncio logs a traceback. These versions only touch a future that is not
    done. Same behaviour otherwise; idempotent.
    """
    shim = pyfuse3.asyncio
    if getattr(shim, "_dfs_peer_hardened", False):
        return
    futures = shim._read_futures  # a defaultdict(set): fd -> pending futures

    async def wait_readable(fd: int) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def readable() -> None:
            if not future.done():
                future.set_result(None)

        futures[fd].add(future)
        try:
            loop.add_reader(fd, readable)
            future.add_done_callback(lambda _: loop.remove_reader(fd))
            await future
        finally:
            futures[fd].discard(future)
            if not futures[fd]:
                del futures[fd]

    def notify_closing(fd: int) -> None:
        for future in list(futures.get(fd, ())):
            if not future.done():
                future.set_exception(shim.ClosedResourceError())

    shim.wait_readable = wait_readable
    shim.notify_closing = notify_closing
    shim._dfs_peer_hardened = True  # type: ignore[attr-defined]


async def _stop(main: asyncio.Task[None]) -> None:
    """Make `main` end and wait for it, even if cancelled again meanwhile."""
    if not main.done():
        terminate()
    while not main.done():
        try:
            await asyncio.wait({main})
        except asyncio.CancelledError:
            # The workers stop at their next read; freeing the session before
            # that would crash the process. The caller re-raises the cancel.
            continue
    if not main.cancelled() and main.exception() is not None:
        log.error("FUSE main loop failed while stopping", exc_info=main.exception())


def check_fuse_device() -> bool:
    """True if /dev/fuse exists, is a character device, and we may open it."""
    try:
        mode = os.stat(FUSE_DEVICE).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) and os.access(FUSE_DEVICE, os.R_OK | os.W_OK)


def may_allow_other() -> bool:
    """True if we may mount with `allow_other`: as root, or when /etc/fuse.conf
    says `user_allow_other` (else fusermount3 refuses the whole mount)."""
    if os.geteuid() == 0:
        return True
    try:
        with open(FUSE_CONF) as conf:
            return any(line.split("#")[0].strip() == "user_allow_other" for line in conf)
    except OSError:
        return False


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    """True if something is mounted at `path`, even a dead FUSE mount.

    Reads /proc/self/mountinfo rather than calling `os.path.ismount`, which
    says False for a mount whose daemon died (stat fails with ENOTCONN).
    """
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if len(fields) > 4 and _unescape(fields[4]) == os.fsencode(target):
                return True
    return False


def _unescape(field: bytes) -> bytes:
    r"""Undo mountinfo's octal escapes (`\040` for a space, `\134` for a backslash)."""
    if b"\\" not in field:
        return field
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and len(field) >= i + 4:
            try:
                out.append(int(field[i + 1 : i + 4], 8))
                i += 4
                continue
            except ValueError:
                pass
        out.append(field[i])
        i += 1
    return bytes(out)
