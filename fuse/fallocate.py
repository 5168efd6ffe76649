"""fallocate(2) on the mount, though pyfuse3 (3.5) has no handler for it.

pyfuse3 leaves libfuse's `fallocate` slot empty, so libfuse answers the
kernel's FUSE_FALLOCATE with ENOSYS, after which the kernel refuses every
fallocate on the mount with EOPNOTSUPP (and fsx turns those operations off).
`install` puts a handler in that slot of the live session: a ctypes callback
that runs the adapter's `fallocate` (wrapped by `fuse.errors.translate`, like
every handler) and replies with `fuse_reply_err`, 0 for success.

Invariant: the slot is written only when everything checks out: pyfuse3's
symbols are where its ELF symbol table says, its own `fuse_ops` has
`forget_multi` and `readdirplus` set and `fallocate` empty at the offsets of
libfuse 3's stable ABI, and the session holds a copy of `fuse_ops`. Otherwise
nothing is written and fallocate stays unsupported, as before. The callback
never raises (an exception in a ctypes callback would leave the request
unanswered and its caller stuck): it always replies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import struct
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pyfuse3

log = logging.getLogger(__name__)

# Slots of `struct fuse_lowlevel_ops` (libfuse 3: only ever appended to).
_PTR = ctypes.sizeof(ctypes.c_void_p)
_FORGET_MULTI = 38
_FALLOCATE = 40
_READDIRPLUS = 41
_COMPARED = 42  # slots compared to find the session's copy of the table
_SESSION_SEARCH = 512  # bytes of `struct fuse_session` searched for that copy

# void (*fallocate)(fuse_req_t, fuse_ino_t, int mode, off_t, off_t, struct fuse_file_info *)
_CALLBACK = ctypes.CFUNCTYPE(
    None,
    ctypes.c_void_p,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_void_p,
)

Handler = Callable[[int, int, int, int], Coroutine[Any, Any, None]]

# The installed callback: referenced here for as long as a session may call it.
_installed: Any = None


def _symbols(path: Path, names: set[str]) -> dict[str, int]:
    """The values of `names` in the ELF64 symbol table (.symtab) of `path`."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    found: dict[str, int] = {}
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 2 or not entsize:  # SHT_SYMTAB
            continue
        strtab = sections[link]
        str_off = strtab[4]
        for i in range(size // entsize):
            name_off, _, _, _, value, _ = struct.unpack_from("<IBBHQQ", data, offset + i * entsize)
            end = data.index(b"\0", str_off + name_off)
            name = data[str_off + name_off : end].decode("ascii", "replace")
            if name in names:
                found[name] = value
    return found


def install(handler: Handler) -> bool:
    """Route FUSE_FALLOCATE of the live session to `handler(inode, mode,
    offset, length)`; call after `pyfuse3.init`. False (and a log line) if
    this pyfuse3 or libfuse does not look as expected: nothing is changed."""
    global _installed
    so = Path(pyfuse3.__file__)
    session_sym, ops_sym = "__pyx_v_7pyfuse3_session", "__pyx_v_7pyfuse3_fuse_ops"
    try:
        symbols = _symbols(so, {"PyInit_pyfuse3", session_sym, ops_sym})
        lib = ctypes.CDLL(str(so))
        libfuse = ctypes.CDLL(ctypes.util.find_library("fuse3") or "libfuse3.so.3")
    except (OSError, ValueError, struct.error) as exc:
        log.info("fallocate not available: cannot read pyfuse3 (%s)", exc)
        return False
    if len(symbols) != 3:
        log.info("fallocate not available: pyfuse3's symbols not found")
        return False
    init = ctypes.cast(lib.PyInit_pyfuse3, ctypes.c_void_p).value
    assert init is not None
    base = init - symbols["PyInit_pyfuse3"]
    session = ctypes.c_void_p.from_address(base + symbols[session_sym]).value
    ops = (ctypes.c_void_p * _COMPARED).from_address(base + symbols[ops_sym])
    if not session or not ops[_FORGET_MULTI] or not ops[_READDIRPLUS] or ops[_FALLOCATE]:
        log.info("fallocate not available: pyfuse3's operation table is not as expected")
        return False
    table = ctypes.string_at(ctypes.addressof(ops), _COMPARED * _PTR)
    here = ctypes.string_at(session, _SESSION_SEARCH + len(table))
    at = next(
        (o for o in range(0, _SESSION_SEARCH, _PTR) if here[o : o + len(table)] == table), None
    )
    if at is None:
        log.info("fallocate not available: libfuse's session is not as expected")
        return False
    reply = libfuse.fuse_reply_err
    reply.argtypes = [ctypes.c_void_p, ctypes.c_int]
    reply.restype = ctypes.c_int

    def fallocate(req: int, ino: int, mode: int, offset: int, length: int, fi: int) -> None:
        number = errno.EIO
        try:
            number = _run(handler(ino, mode, offset, length))
        except BaseException:  # never out of a ctypes callback: the caller would hang
            log.exception("fallocate handler failed: inode=%d", ino)
        reply(req, number)

    callback = _CALLBACK(fallocate)
    slot = ctypes.c_void_p.from_address(session + at + _FALLOCATE * _PTR)
    _installed = callback
    slot.value = ctypes.cast(callback, ctypes.c_void_p).value
    log.debug("fallocate handler installed")
    return True


def _run(call: Coroutine[Any, Any, None]) -> int:
    """Run a handler that never waits to its end: 0, or the errno it raised."""
    try:
        call.send(None)
    except StopIteration:
        return 0
    except pyfuse3.FUSEError as exc:
        return exc.errno
    call.close()
    log.error("fallocate handler tried to wait; replying EIO")
    return errno.EIO
