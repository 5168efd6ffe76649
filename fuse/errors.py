"""Errors a volume raises, and the one place they become errno replies.

Invariant: every request handler of `fuse.adapter.FuseOperations` is wrapped by
`translate` (and `forget` by `swallow`), so nothing but `pyfuse3.FUSEError`
ever leaves a handler. Why it matters: pyfuse3 replies to the kernel only for
`FUSEError`; in asyncio mode any other exception leaves the syscall unanswered,
the caller stuck in D state (even SIGKILL cannot free it) and the mount wedged,
with nothing logged (libfuse/pyfuse3#45).

pyfuse3 is imported only when a handler is wrapped, so a volume and its tests
can raise these errors on a machine without libfuse.
"""

from __future__ import annotations

import errno
import functools
import logging
import reprlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ClassVar, ParamSpec, TypeVar

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


class VolumeError(Exception):
    """The volume refuses a request; `errno` is what the caller's syscall returns."""

    errno: ClassVar[int] = errno.EIO


class NotFound(VolumeError):
    """No such entry."""

    errno = errno.ENOENT


class Exists(VolumeError):
    """The name (or xattr) already exists."""

    errno = errno.EEXIST


class NotEmpty(VolumeError):
    """The directory is not empty."""

    errno = errno.ENOTEMPTY


class NotADirectory(VolumeError):
    """A directory was needed."""

    errno = errno.ENOTDIR


class IsADirectory(VolumeError):
    """The entry is a directory."""

    errno = errno.EISDIR


class NameTooLong(VolumeError):
    """The name is longer than 255 bytes."""

    errno = errno.ENAMETOOLONG


class InvalidArgument(VolumeError):
    """The request makes no sense here (e.g. a directory moved into itself)."""

    errno = errno.EINVAL


class ReadOnly(VolumeError):
    """The volume is mounted read-only."""

    errno = errno.EROFS


class NotPermitted(VolumeError):
    """The operation is not supported for this kind of entry (hard links, devices)."""

    errno = errno.EPERM


class AccessDenied(VolumeError):
    """The caller may not do this."""

    errno = errno.EACCES


class NoSpace(VolumeError):
    """No space left for the data."""

    errno = errno.ENOSPC


class NoAttribute(VolumeError):
    """No such extended attribute (ENODATA is ENOATTR on Linux)."""

    errno = errno.ENODATA


class BadHandle(VolumeError):
    """The file handle is not open."""

    errno = errno.EBADF


class TooBig(VolumeError):
    """The file (or xattr value) would be too large."""

    errno = errno.EFBIG


class RangeError(VolumeError):
    """A value is out of range (e.g. an empty or over-long xattr name)."""

    errno = errno.ERANGE


class Unsupported(VolumeError):
    """The volume does not support this (e.g. `system.*` xattrs)."""

    errno = errno.EOPNOTSUPP


class Retry(VolumeError):
    """The data is not here yet but may be soon (e.g. a damaged block being
    fetched again from a peer): `wait()` waits for it, bounded, and says
    whether to retry the request once. EIO if the adapter cannot wait."""

    errno = errno.EIO

    def __init__(self, wait: Callable[[], Awaitable[bool]] | None = None) -> None:
        super().__init__("retry")
        self.wait = wait or _no_wait


async def _no_wait() -> bool:
    return False


def _errno_name(number: int) -> str:
    return errno.errorcode.get(number, str(number))


def translate(handler: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Wrap a request handler so that it can only raise `pyfuse3.FUSEError`.

    `FUSEError` passes; a `VolumeError` becomes its `errno` (logged at DEBUG:
    refusals are normal); an `OSError` its own errno, or EIO (logged at
    WARNING: the node's disk failed us); anything else is a bug, logged with
    its traceback, and becomes EIO. `CancelledError` (a BaseException)
    propagates: it means the mount is shutting down.

    If the handler's object (the first argument) has an `on_request`
    callable, it is told each request's handler name and seconds taken,
    whatever the outcome (for latency metrics).
    """
    from pyfuse3 import FUSEError  # here, not at import: see the module docstring

    name = handler.__name__

    @functools.wraps(handler)
    async def translated(*args: P.args, **kwargs: P.kwargs) -> R:
        t0 = time.perf_counter()
        try:
            return await handler(*args, **kwargs)
        except FUSEError:
            raise
        except VolumeError as exc:
            # Refusals are everyday answers (every lookup of a name not there
            # yet is one): the arguments are rendered only for a debug log.
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "refused: handler=%s errno=%s error=%s args=%s",
                    name,
                    _errno_name(exc.errno),
                    type(exc).__name__,
                    reprlib.repr(args[1:]),
                )
            raise FUSEError(exc.errno) from exc
        except OSError as exc:
            number = exc.errno or errno.EIO
            log.warning("OS error: handler=%s errno=%s error=%s", name, _errno_name(number), exc)
            raise FUSEError(number) from exc
        except Exception:
            log.exception(
                "unexpected error, replying EIO: handler=%s args=%s",
                name,
                reprlib.repr(args[1:]),
            )
            raise FUSEError(errno.EIO) from None
        finally:
            observe = getattr(args[0], "on_request", None) if args else None
            if observe is not None:
                try:
                    observe(name, time.perf_counter() - t0)
                except Exception:
                    log.exception("request observer failed: handler=%s", name)

    return translated


def swallow(
    handler: Callable[P, Coroutine[Any, Any, None]],
) -> Callable[P, Coroutine[Any, Any, None]]:
    """Wrap a handler that must never raise (`forget`): log any error and go on.

    `forget` answers no request, so there is no errno to carry an error, and
    pyfuse3 says it must not raise, not even `FUSEError`.
    """
    name = handler.__name__

    @functools.wraps(handler)
    async def swallowed(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            await handler(*args, **kwargs)
        except Exception:
            log.exception(
                "error ignored (no reply to carry it): handler=%s args=%s",
                name,
                reprlib.repr(args[1:]),
            )

    return swallowed
