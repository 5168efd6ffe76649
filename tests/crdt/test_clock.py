"""Hybrid logical clocks (`crdt.clock`): ticks only go up, observed stamps are
overtaken, far-future stamps drag us at most MAX_FORWARD_MS ahead, and two
nodes can never hand out the same stamp."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from crdt.clock import MAX_COUNTER, MAX_FORWARD_MS, Clock, Hlc

A = b"\x0a" * 32
B = b"\x0b" * 32

walls = st.integers(0, 10**13)
stamps = st.builds(Hlc, walls, st.integers(0, MAX_COUNTER), st.sampled_from([A, B]))
# A node's life: ("tick", wall) reads its wall clock; ("observe", wall, stamp)
# receives a remote stamp. Wall readings jump back and forth (NTP steps).
events = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), walls),
        st.tuples(st.just("observe"), walls, stamps),
    ),
    max_size=40,
)


@given(st.lists(walls, max_size=50))
def test_ticks_strictly_increase_whatever_the_wall_clock_does(readings: list[int]) -> None:
    clock = Clock(A)
    out = [clock.tick(w) for w in readings]
    assert out == sorted(out)
    assert len(set(out)) == len(out)
    assert all(h.node == A for h in out)


@given(st.integers(1, 10**13))
def test_tick_follows_a_wall_clock_that_moves_forward(wall: int) -> None:
    clock = Clock(A)
    assert clock.tick(wall) == Hlc(wall, 0, A)
    assert clock.tick(wall) == Hlc(wall, 1, A)
    assert clock.tick(wall + 5) == Hlc(wall + 5, 0, A)
    assert clock.last() == Hlc(wall + 5, 0, A)


@given(events)
def test_each_tick_is_after_everything_handed_out_or_observed(
    events: list[tuple[object, ...]],
) -> None:
    """The module invariant, with the bound: a stamp more than MAX_FORWARD_MS
    ahead of our wall clock when observed need not be overtaken."""
    clock = Clock(A)
    must_follow: list[Hlc] = []
    for event in events:
        if event[0] == "tick":
            wall = event[1]
            assert isinstance(wall, int)
            stamp = clock.tick(wall)
            assert all(stamp > before for before in must_follow), (stamp, must_follow)
            must_follow.append(stamp)
        else:
            _, wall, remote = event
            assert isinstance(wall, int)
            assert isinstance(remote, Hlc)
            clock.observe(remote, wall)
            if remote.wall_ms <= wall + MAX_FORWARD_MS:
                must_follow.append(remote)


@given(walls, st.integers(MAX_FORWARD_MS + 1, 10**12), st.integers(0, MAX_COUNTER))
def test_a_far_future_stamp_drags_the_clock_at_most_max_forward(
    wall: int, ahead: int, counter: int
) -> None:
    clock = Clock(A)
    clock.tick(wall)
    future = Hlc(wall + ahead, counter, B)
    clock.observe(future, wall)
    assert clock.last().wall_ms <= wall + MAX_FORWARD_MS
    nxt = clock.tick(wall)
    assert nxt.wall_ms <= wall + MAX_FORWARD_MS
    # the documented price: a local event right after may sort before it
    assert nxt < future
    # but the clock did move as far as the bound allows
    assert nxt > Hlc(wall + MAX_FORWARD_MS - 1, MAX_COUNTER, B)


def test_observing_a_stamp_within_the_bound_is_followed() -> None:
    clock = Clock(A)
    clock.tick(1_000)
    remote = Hlc(1_000 + MAX_FORWARD_MS, 7, B)
    clock.observe(remote, 1_000)
    assert clock.tick(1_000) == Hlc(1_000 + MAX_FORWARD_MS, 8, A)


def test_observing_an_older_stamp_changes_nothing() -> None:
    clock = Clock(A)
    clock.tick(5_000)
    clock.observe(Hlc(4_000, 99, B), 5_000)
    assert clock.tick(5_000) == Hlc(5_000, 1, A)


def test_counter_overflow_advances_the_logical_wall_time() -> None:
    clock = Clock(A, last=Hlc(100, MAX_COUNTER, A))
    assert clock.tick(100) == Hlc(101, 0, A)
    clock = Clock(A)
    clock.observe(Hlc(200, MAX_COUNTER, B), 200)
    stamp = clock.tick(200)
    assert stamp == Hlc(201, 0, A)
    assert stamp > Hlc(200, MAX_COUNTER, B)


@given(st.integers(0, 10**13), st.integers(0, MAX_COUNTER), walls)
def test_a_restarted_clock_continues_after_its_last_stamp(
    wall: int, counter: int, now: int
) -> None:
    last = Hlc(wall, counter, A)
    clock = Clock(A, last=last)
    assert clock.last() == last
    assert clock.tick(now) > last


@given(st.lists(st.tuples(st.booleans(), walls), max_size=60))
def test_two_nodes_never_hand_out_the_same_stamp(steps: list[tuple[bool, int]]) -> None:
    """The premise of the tree's commutativity: stamps are unique across nodes
    (the node id is the last field of the order), even at equal wall times and
    counters, and every pair is ordered."""
    clocks = {True: Clock(A), False: Clock(B)}
    out = [clocks[which].tick(wall) for which, wall in steps]
    assert len(set(out)) == len(out)
    for x in out:
        for y in out:
            assert (x < y) + (x == y) + (x > y) == 1


def test_equal_wall_and_counter_are_ordered_by_node() -> None:
    a, b = Clock(A).tick(7), Clock(B).tick(7)
    assert (a.wall_ms, a.counter) == (b.wall_ms, b.counter)
    assert a != b
    assert a < b
    assert a.short() == f"7.0@{A[:4].hex()}"
