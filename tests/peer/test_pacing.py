"""`peer.pacing`: long Python work in a worker thread waits for the loop's turns."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from peer import pacing


async def wait_for_progress(done: list[float]) -> None:
    """Until the worker has gone round 1,000 times (polled: it is a thread)."""
    for _ in range(2000):
        if len(done) >= 1000:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the worker never ran")


def test_pace_outside_a_paced_thread_does_nothing() -> None:
    started = time.perf_counter()
    for _ in range(100_000):
        pacing.pace()
    assert time.perf_counter() - started < 2.0  # no loop to wait for, no waiting


@pytest.mark.asyncio
async def test_a_paced_worker_makes_no_progress_while_the_loop_is_busy() -> None:
    """The loop runs one long step (as when it answers a request); a paced
    worker stops within a slice and waits for it, instead of taking the GIL
    turn by turn (each turn the loop then waited for, up to 5 ms)."""
    done: list[float] = []
    stop = False

    def work() -> int:
        while not stop:
            pacing.pace()
            done.append(time.perf_counter())
        return len(done)

    worker = asyncio.ensure_future(pacing.to_thread(work))
    await wait_for_progress(done)
    busy_from = time.perf_counter()
    while time.perf_counter() - busy_from < 0.3:  # the loop busy, holding no await
        pass
    busy_to = time.perf_counter()
    stop = True
    await worker
    settle = busy_from + 3 * pacing.SLICE_S + 0.02  # the slice under way may end
    during = [t for t in done if settle < t < busy_to]
    assert during == [], f"the worker went on {len(during)} times while the loop was busy"
    assert any(t > busy_to for t in done) or len(done) > 1000


@pytest.mark.asyncio
async def test_without_pacing_the_worker_does_progress_meanwhile() -> None:
    """The control for the test above: plain `asyncio.to_thread` shares the
    GIL turn by turn, so the check there can fail."""
    done: list[float] = []
    stop = False

    def work() -> None:
        while not stop:
            done.append(time.perf_counter())

    worker = asyncio.ensure_future(asyncio.to_thread(work))
    await wait_for_progress(done)
    busy_from = time.perf_counter()
    while time.perf_counter() - busy_from < 0.3:
        pass
    busy_to = time.perf_counter()
    stop = True
    await worker
    assert [t for t in done if busy_from + 0.05 < t < busy_to]


def test_the_collector_comes_back_when_the_last_bulk_build_ends() -> None:
    assert gc.isenabled()
    with pacing.collector_paused():
        assert not gc.isenabled()
        with pacing.collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
