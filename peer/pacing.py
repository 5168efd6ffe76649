"""Long pure-Python work in a worker thread that leaves the event loop its turns.

The loop answers FUSE. A worker thread that runs Python for seconds (opening a
peer's 100,000-entry checkpoint, folding one) holds the GIL whenever the loop
does not, and every time the loop lets go of it (each `select`, each SQLite
call) it waits up to the interpreter's switch interval (5 ms) to get it back:
a `stat` that takes a dozen such turns waited 100-200 ms while a fresh node
caught up. Threads gain nothing here (the GIL serialises the work anyway);
what matters is that the loop is never kept waiting long.

So such work runs through `to_thread`, and its inner loops call `pace()` for
each item. Every `SLICE_S` of work, `pace()` hands the loop a turn and waits,
holding no GIL, until the loop has run what was ready then (FUSE requests
included). Outside `to_thread` (tests, the CLI, replay at start) `pace()` costs
a context variable lookup and does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import threading
import time
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# Work between two turns of the loop; a FUSE request waits about this long.
SLICE_S = 0.004
# How many `pace()` calls pass between two looks at the clock.
CHECK_EVERY = 32
# The longest a worker waits for its turn (the loop is busy or gone).
TURN_WAIT_MAX_S = 1.0


class _Pacer:
    __slots__ = ("count", "loop", "since", "turns")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.count = 0
        self.since = time.perf_counter()
        self.turns = 0

    def pace(self) -> None:
        self.count += 1
        if self.count % CHECK_EVERY:
            return
        now = time.perf_counter()
        if now - self.since < SLICE_S:
            return
        turn = threading.Event()
        try:
            self.loop.call_soon_threadsafe(turn.set)
        except RuntimeError:  # the loop is closing: no turns to give
            return
        # (bounded: a loop that closes meanwhile never runs the callback)
        turn.wait(TURN_WAIT_MAX_S)
        self.turns += 1
        self.since = time.perf_counter()


_current: contextvars.ContextVar[_Pacer | None] = contextvars.ContextVar("pacer", default=None)


def pace() -> None:
    """Give the loop a turn if this worker has held the GIL for a slice."""
    pacer = _current.get()
    if pacer is not None:
        pacer.pace()


async def to_thread(func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`asyncio.to_thread` for work whose loops call `pace()`."""
    pacer = _Pacer(asyncio.get_running_loop())

    def run() -> T:
        _current.set(pacer)
        return func(*args, **kwargs)

    return await asyncio.to_thread(run)


def _settle() -> None:
    """Move every object alive now out of the cyclic collector's reach after a
    bulk build (replay, a checkpoint): the replica is long-lived and holds no
    garbage cycles, and a full collection walking all of it stalls the loop
    that answers FUSE for a time that grows with the volume."""
    gc.freeze()


_paused_lock = threading.Lock()
_paused = 0  # bulk builds under way (the loop's and worker threads')
_was_enabled = True


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic collection during a bulk build, then `_settle`. Counted, so a
    rebuild in a worker thread and a merge on the loop can overlap: the
    collector comes back on when the last one ends, not the first."""
    global _paused, _was_enabled
    with _paused_lock:
        if _paused == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _paused += 1
    try:
        yield
    finally:
        with _paused_lock:
            _paused -= 1
            if _paused == 0 and _was_enabled:
                gc.enable()
        _settle()
