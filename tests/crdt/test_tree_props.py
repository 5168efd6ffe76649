"""The move-op tree (`crdt.tree`), checked theorem by theorem.

Each test is named after a lemma of the move-op paper's Isabelle theory
(trvedata/move-op): `do_undo_op_inv`, `interp_op_unique_parent`, the acyclicity
of `Move_Acyclic.thy`, `interp_ops_commutes`, and `Move_Code.thy`'s proof that
the efficient engine equals the naive one (here `tests/crdt/model.py`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from crdt.clock import Hlc
from crdt.ops import ROOT, TRASH
from crdt.tree import LogMove, Tree, TreeMove
from tests.crdt.model import ModelMove, ancestors, places_of, replay

NODES = [bytes([n]) * 32 for n in (1, 2, 3)]
ENTRIES = [bytes([0x10 + n]) * 16 for n in range(6)]
NAMES = [b"a", b"b", b"c.txt"]

# Small ranges on purpose: equal wall times and counters are common, so the node
# id often decides the order, as it does between real nodes.
hlcs = st.builds(Hlc, st.integers(0, 12), st.integers(0, 2), st.sampled_from(NODES))
parents = st.sampled_from([ROOT, ROOT, TRASH, *ENTRIES])


def tree_move(hlc: Hlc, child: bytes, parent: bytes, name: bytes) -> TreeMove:
    return TreeMove(hlc, child, parent, name)


# Any child, ROOT and TRASH included: moving them must be skipped.
tree_moves = st.builds(
    tree_move,
    hlcs,
    st.sampled_from([*ENTRIES, *ENTRIES, ROOT, TRASH]),
    parents,
    st.sampled_from(NAMES),
)
# The premise of every theorem: no two operations share a stamp.
move_lists = st.lists(tree_moves, max_size=24, unique_by=lambda m: m.hlc)


def as_model(moves: Sequence[TreeMove]) -> list[ModelMove]:
    return [ModelMove(m.hlc, m.child, m.parent, m.name) for m in moves]


def built(moves: Sequence[TreeMove]) -> Tree:
    tree = Tree()
    tree.apply(moves)
    return tree


def state(tree: Tree) -> tuple[object, ...]:
    """Everything `Tree` keeps, with empty sets dropped (an emptied directory and
    one that never had children are the same state)."""
    return (
        dict(tree.places),
        {k: set(v) for k, v in tree.children.items() if v},
        {k: set(v) for k, v in tree.events.items() if v},
    )


def assert_unique_stamps(moves: Sequence[TreeMove]) -> None:
    stamps = [m.hlc for m in moves]
    assert len(set(stamps)) == len(stamps), "premise broken: two moves share a stamp"


@given(move_lists.filter(bool))
def test_undo_inverts_do(moves: list[TreeMove]) -> None:
    """do_op of a move with a fresh stamp, then undo_op, leaves every field as it was."""
    *earlier, move = moves
    tree = built(earlier)
    before = copy.deepcopy(state(tree))
    entry = tree.do_op(move)
    tree.undo_op(entry)
    assert state(tree) == before


@given(move_lists)
def test_redo_of_an_undone_log_restores_the_tree(moves: list[TreeMove]) -> None:
    tree = built(moves)
    after = copy.deepcopy(state(tree))
    log = list(tree.log)
    for entry in reversed(log):
        tree.undo_op(entry)
    assert state(tree) == ({}, {}, {})
    redone: list[LogMove] = [tree.redo_op(entry) for entry in log]
    assert redone == log
    assert state(tree) == after


@given(move_lists)
def test_single_parent(moves: list[TreeMove]) -> None:
    """Every child is in exactly one parent's set of children, the parent its
    place names, and nothing else is in any set of children."""
    tree = built(moves)
    holders: dict[bytes, list[bytes]] = {}
    for parent, kids in tree.children.items():
        for kid in kids:
            holders.setdefault(kid, []).append(parent)
    assert holders == {child: [place.parent] for child, place in tree.places.items()}


@given(move_lists)
def test_no_cycles(moves: list[TreeMove]) -> None:
    tree = built(moves)
    places = places_of(tree)
    for child in places:
        up = ancestors(places, child)  # fails on a cycle
        assert child not in up
        assert not tree.is_ancestor(child, child)
    assert ROOT not in places
    assert TRASH not in places


@given(st.data(), move_lists)
def test_any_order_same_tree(data: st.DataObject, moves: list[TreeMove]) -> None:
    assert_unique_stamps(moves)
    reference = built(moves)
    shuffled = data.draw(st.permutations(moves), label="delivery order")
    tree = Tree()
    for move in shuffled:
        tree.apply([move])
    assert places_of(tree) == places_of(reference)
    assert tree.log == reference.log
    assert state(tree) == state(reference)


@given(st.data(), move_lists)
def test_late_arrival_equals_model(data: st.DataObject, moves: list[TreeMove]) -> None:
    """Batches in any order, with repeats, placed by undo/redo: after every
    batch the tree equals the naive replay of everything received so far."""
    assert_unique_stamps(moves)
    order = data.draw(st.permutations(moves), label="delivery order")
    tree = Tree()
    received: list[TreeMove] = []
    while order:
        size = data.draw(st.integers(1, len(order)), label="batch size")
        batch, order = order[:size], order[size:]
        again = data.draw(st.lists(st.sampled_from(received or batch), max_size=3))
        tree.apply([*batch, *again, *batch[:1]])
        received.extend(batch)
        assert places_of(tree) == replay(as_model(received))
        assert [e.move.hlc for e in tree.log] == sorted({m.hlc for m in received})


@given(move_lists, move_lists)
def test_apply_reports_every_change(first: list[TreeMove], second: list[TreeMove]) -> None:
    """`apply` names every entry whose place changed and every directory that
    gained or lost a child: the merge refreshes exactly those."""
    tree = built(first)
    places, children = dict(tree.places), copy.deepcopy(tree.children)
    touched = tree.apply(second)
    for child in set(places) | set(tree.places):
        if places.get(child) != tree.places.get(child):
            assert child in touched, f"{child.hex()} moved but was not reported"
    for parent in set(children) | set(tree.children):
        if children.get(parent, set()) != tree.children.get(parent, set()):
            assert parent in touched, f"{parent.hex()}'s children changed unreported"


@given(move_lists)
def test_log_records_arrivals_departures_and_current_moves(moves: list[TreeMove]) -> None:
    tree = built(moves)
    events: dict[bytes, set[Hlc]] = {}
    for entry in tree.log:
        if entry.applied:
            events.setdefault(entry.move.parent, set()).add(entry.move.hlc)
            if entry.old is not None:
                events.setdefault(entry.old.parent, set()).add(entry.move.hlc)
    assert {k: v for k, v in tree.events.items() if v} == events
    for parent, stamps in events.items():
        assert tree.latest_event(parent) == max(stamps)
    for child, place in tree.places.items():
        current = tree.current(child)
        assert current is not None
        assert current.move.hlc == place.hlc
        assert tree.contains(place.hlc)
    assert tree.last_move() == (max(m.hlc for m in moves) if moves else None)


def test_move_into_own_descendant_is_skipped_and_logged() -> None:
    a, b = ENTRIES[:2]
    h = [Hlc(t, 0, NODES[0]) for t in range(4)]
    tree = built(
        [
            TreeMove(h[0], a, ROOT, b"a"),
            TreeMove(h[1], b, a, b"b"),
            TreeMove(h[2], a, b, b"a"),  # a into its own child: skipped
        ]
    )
    assert places_of(tree) == {a: (ROOT, b"a"), b: (a, b"b")}
    assert [e.applied for e in tree.log] == [True, True, False]
    # an earlier move of b out of a arrives late: now the move of a applies
    tree.apply([TreeMove(Hlc(1, 1, NODES[0]), b, ROOT, b"b")])
    assert places_of(tree) == {a: (b, b"a"), b: (ROOT, b"b")}
