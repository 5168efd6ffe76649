"""The merge rules of DESIGN §4, one example each, written as their specification.

Every test plays a short story between simulated nodes (`tests.crdt.model.SimNode`)
that make operations the way a real node does, exchange them, and then must
show the same, expected tree.
"""

from __future__ import annotations

from crdt.clock import MAX_FORWARD_MS
from crdt.merge import Replica
from crdt.names import conflict_copy_id
from crdt.ops import BLOCK_SIZE, NAME_MAX, ROOT, TRASH, Forget, Member, Move, Write
from tests.crdt.model import (
    EPOCH_MS,
    SimNode,
    block,
    moves_of,
    places_of,
    replay,
    shown,
    walk,
)


def sync(*nodes: SimNode) -> None:
    """Everyone receives everything, then all must show the same tree."""
    for node in nodes:
        node.sync_from(*nodes)
    first = nodes[0].replica.snapshot()
    for node in nodes[1:]:
        assert node.replica.snapshot() == first, f"{node.name} differs from {nodes[0].name}"


def names(node: SimNode, parent: bytes = ROOT) -> dict[bytes, bytes]:
    return dict(node.replica.listing(parent))


def alice_and_bob() -> tuple[SimNode, SimNode]:
    """Two nodes whose clocks agree; bob's stamps sort after alice's at equal times."""
    alice, bob = SimNode.named("alice"), SimNode.named("bob")
    assert alice.node < bob.node
    sync(alice, bob)
    return alice, bob


# --- rule 1: the tree -----------------------------------------------------------------------------


def test_concurrent_moves_never_form_a_cycle() -> None:
    alice, bob = alice_and_bob()
    x, y = alice.mkdir(ROOT, b"x"), alice.mkdir(ROOT, b"y")
    sync(alice, bob)
    alice.rename(x, y, b"x")  # x into y
    bob.rename(y, x, b"y")  # concurrently, y into x: later, so it is the one skipped
    sync(alice, bob)
    assert names(alice) == {b"y": y}
    assert names(alice, y) == {b"x": x}
    assert names(alice, x) == {}


def test_late_move_is_placed_by_undo_and_redo() -> None:
    alice, bob = alice_and_bob()
    carol = SimNode.named("carol")
    a, b = alice.mkdir(ROOT, b"a"), alice.mkdir(ROOT, b"b")
    sync(alice, bob, carol)
    early = alice.rename(a, b, b"a")
    late = bob.rename(b, a, b"b")
    assert early.hlc < late.hlc
    carol.receive([late])  # b into a: applied for now
    assert names(carol, a) == {b"b": b}
    carol.receive([early])  # undo b-into-a, apply a-into-b, redo b-into-a: skipped
    assert names(carol) == {b"b": b}
    assert names(carol, b) == {b"a": a}
    applied = {e.move.hlc: e.applied for e in carol.replica.tree.log}
    assert (applied[early.hlc], applied[late.hlc]) == (True, False)
    assert places_of(carol.replica.tree) == replay(moves_of(carol.held.values()))
    sync(alice, bob, carol)


def test_rename_is_a_move_and_the_latest_move_wins() -> None:
    alice, bob = alice_and_bob()
    f = alice.create(ROOT, b"draft.txt")
    d = alice.mkdir(ROOT, b"docs")
    sync(alice, bob)
    alice.rename(f, d, b"draft.txt")
    bob.rename(f, ROOT, b"final.txt")  # later: wins
    sync(alice, bob)
    assert names(alice) == {b"docs": d, b"final.txt": f}
    assert names(alice, d) == {}


# --- rule 2: names ---------------------------------------------------------------------------------


def test_same_name_both_shown_newest_keeps_name() -> None:
    alice, bob = alice_and_bob()
    older = alice.create(ROOT, b"a.txt")
    newer = bob.create(ROOT, b"a.txt")
    sync(alice, bob)
    assert names(bob) == {b"a.txt": newer, b"a~" + older[:4].hex().encode() + b".txt": older}
    assert alice.view(older).name == b"a~" + older[:4].hex().encode() + b".txt"


def test_changes_name_every_shown_name_that_now_means_another_entry() -> None:
    alice, bob = alice_and_bob()
    older = alice.create(ROOT, b"a.txt")
    newer = bob.create(ROOT, b"a.txt")
    sync(alice, bob)
    suffixed = b"a~" + older[:4].hex().encode() + b".txt"
    # Deleting the name's holder gives it to the sibling, whose suffix goes.
    op = alice.delete(newer)
    changes = bob.receive([op])
    assert changes.names == {(ROOT, b"a.txt"), (ROOT, suffixed)}
    assert names(bob) == {b"a.txt": older}
    # A rename reports the name it left and the name it took.
    op = alice.rename(older, ROOT, b"b.txt")
    assert bob.receive([op]).names == {(ROOT, b"a.txt"), (ROOT, b"b.txt")}


def test_renames_onto_one_name_show_both() -> None:
    alice, bob = alice_and_bob()
    one, two = alice.create(ROOT, b"one"), alice.create(ROOT, b"two")
    sync(alice, bob)
    alice.rename(one, ROOT, b"report")
    bob.rename(two, ROOT, b"report")
    sync(alice, bob)
    assert names(alice) == {b"report": two, b"report~" + one[:4].hex().encode(): one}


def test_suffixes_that_collide_with_real_names_grow_longer() -> None:
    alice, bob = alice_and_bob()
    older = alice.create(ROOT, b"a")
    taken = b"a~" + older[:4].hex().encode()
    squatter = alice.create(ROOT, taken)
    newer = bob.create(ROOT, b"a")
    sync(alice, bob)
    assert names(alice) == {
        b"a": newer,
        taken: squatter,
        b"a~" + older[:8].hex().encode(): older,
    }


def test_a_suffix_grown_for_a_taken_name_shrinks_when_that_name_goes() -> None:
    """A replica that merged live shows what a fresh one given the same
    operations shows: the names a suffix avoided are no history."""
    alice, bob = alice_and_bob()
    older = alice.create(ROOT, b"a")
    short = b"a~" + older[:4].hex().encode()
    squatter = alice.create(ROOT, short)
    newer = bob.create(ROOT, b"a")
    sync(alice, bob)
    assert names(alice)[b"a~" + older[:8].hex().encode()] == older
    alice.rename(squatter, ROOT, b"z")
    sync(alice, bob)
    assert names(alice) == {b"a": newer, short: older, b"z": squatter}
    fresh = Replica()
    fresh.apply(alice.held.values())
    assert fresh.snapshot() == alice.replica.snapshot() == bob.replica.snapshot()


def test_shown_names_are_never_longer_than_name_max() -> None:
    """A long name whose last dot is early must still leave room for the
    suffix or the conflict marker (the extension gives way)."""
    long_name = b"1." + b"e" * (NAME_MAX - 2)
    alice, bob = alice_and_bob()
    older = alice.create(ROOT, long_name)
    bob.create(ROOT, long_name)
    sync(alice, bob)
    alice.write(older, {0: block(1)}, 10)
    sync(alice, bob)
    bob.write(older, {0: block(2)}, 10)
    alice.write(older, {0: block(3)}, 10)
    sync(alice, bob)
    listed = names(alice)
    assert len(listed) == 3, listed  # the file, its conflict copy, the other file
    for name in listed:
        assert len(name) <= NAME_MAX, (len(name), name)


# --- rule 3: content --------------------------------------------------------------------------------


def test_block_map_patches_base() -> None:
    alice, bob = alice_and_bob()
    f = alice.create(ROOT, b"data.bin")
    alice.write(f, {0: block(1), 1: block(2), 2: block(3)}, 3 * BLOCK_SIZE)
    alice.write(f, {1: block(9)}, 3 * BLOCK_SIZE)  # a partial write changes one block
    alice.write(f, {2: None}, 3 * BLOCK_SIZE)  # and a hole
    sync(alice, bob)
    assert bob.content(f) == {0: block(1), 1: block(9)}
    assert bob.size(f) == 3 * BLOCK_SIZE


def test_truncate_is_write_without_blocks() -> None:
    alice, bob = alice_and_bob()
    f = alice.create(ROOT, b"log.txt")
    alice.write(f, {0: block(1), 1: block(2), 2: block(3)}, 2 * BLOCK_SIZE + 5)
    cut = alice.write(f, {}, BLOCK_SIZE + 1)
    assert cut.blocks == ()
    sync(alice, bob)
    assert bob.content(f) == {0: block(1), 1: block(2)}
    assert bob.size(f) == BLOCK_SIZE + 1
    alice.write(f, {}, 4 * BLOCK_SIZE)  # growing again leaves holes, not old blocks
    sync(alice, bob)
    assert bob.content(f) == {0: block(1), 1: block(2)}
    assert bob.size(f) == 4 * BLOCK_SIZE


def test_a_version_waits_for_its_base() -> None:
    alice, bob = alice_and_bob()
    f = alice.create(ROOT, b"f")
    first = alice.write(f, {0: block(1)}, 10)
    second = alice.write(f, {1: block(2)}, BLOCK_SIZE + 10)
    bob.receive([op for op in alice.held.values() if op is not first])
    assert bob.view(f).version is None  # second's content needs first's map
    bob.receive([first])
    assert bob.view(f).version == second.hlc
    assert bob.content(f) == {0: block(1), 1: block(2)}


def test_concurrent_writes_make_a_conflict_copy_named_after_node_and_time() -> None:
    alice, bob = alice_and_bob()
    f = alice.create(ROOT, b"notes.txt")
    alice.write(f, {0: block(1)}, 100)
    sync(alice, bob)
    alice.wall_ms = bob.wall_ms = EPOCH_MS + 60_000
    mine = alice.write(f, {0: block(2)}, 100)
    theirs = bob.write(f, {0: block(3)}, 200)  # later stamp: keeps the file
    sync(alice, bob)
    copy = conflict_copy_id(f, mine.hlc)
    assert names(alice) == {b"notes.txt": f, b"notes.conflict-alice-20240102-030505.txt": copy}
    assert alice.content(f) == {0: block(3)}
    assert alice.content(copy) == {0: block(2)}
    view = alice.view(copy)
    assert (view.conflict_of, view.version, view.size) == (f, mine.hlc, 100)
    assert alice.view(f).version == theirs.hlc
    assert alice.replica.heads(f) == (theirs.hlc, mine.hlc)


def test_conflict_copy_takes_the_node_name_once_known() -> None:
    """Until a node's Member operation arrives, its copies carry its short id."""
    alice, bob = alice_and_bob()
    carol = SimNode.named("carol")
    f = alice.create(ROOT, b"a.txt")
    sync(alice, bob, carol)
    older = carol.write(f, {0: block(1)}, 1)
    alice.wall_ms += 60_000
    alice.write(f, {0: block(2)}, 1)
    introduction = carol.made[0]
    assert isinstance(introduction, Member)
    late = Replica()
    late.apply(op for op in [*alice.held.values(), *carol.held.values()] if op != introduction)
    copy = conflict_copy_id(f, older.hlc)
    short = carol.node[:4].hex()
    assert dict(late.listing(ROOT)) == {
        b"a.txt": f,
        f"a.conflict-{short}-20240102-030405.txt".encode(): copy,
    }
    late.apply([introduction])
    assert dict(late.listing(ROOT)) == {b"a.txt": f, b"a.conflict-carol-20240102-030405.txt": copy}


def test_deleting_conflict_copy_resolves_it() -> None:
    alice, bob = alice_and_bob()
    f = alice.create(ROOT, b"notes.txt")
    sync(alice, bob)
    loser = alice.write(f, {0: block(1)}, 10)
    winner = bob.write(f, {0: block(2)}, 20)
    sync(alice, bob)
    copy = conflict_copy_id(f, loser.hlc)
    resolution = alice.delete(copy)
    assert isinstance(resolution, Write)
    assert resolution.bases == (winner.hlc, loser.hlc)
    assert (resolution.size, resolution.blocks) == (20, ())
    sync(alice, bob)
    assert names(bob) == {b"notes.txt": f}
    assert bob.content(f) == {0: block(2)}
    assert bob.size(f) == 20
    assert bob.replica.heads(f) == (resolution.hlc,)


def test_concurrent_edits_of_a_conflicted_file_keep_every_head() -> None:
    alice, bob = alice_and_bob()
    carol = SimNode.named("carol")
    f = alice.create(ROOT, b"f")
    sync(alice, bob, carol)
    heads = [n.write(f, {0: block(i)}, 1) for i, n in enumerate((alice, bob, carol))]
    sync(alice, bob, carol)
    copies = {v.id for v in shown(alice.replica).values() if v.conflict_of == f}
    newest = max(w.hlc for w in heads)
    assert copies == {conflict_copy_id(f, w.hlc) for w in heads if w.hlc != newest}
    assert alice.view(f).version == newest


# --- rule 4: delete versus write --------------------------------------------------------------------


def test_delete_loses_to_concurrent_write() -> None:
    alice, bob = alice_and_bob()
    d = alice.mkdir(ROOT, b"docs")
    f = alice.create(d, b"plan.txt")
    alice.write(f, {0: block(1)}, 10)
    sync(alice, bob)
    alice.delete(f)
    edit = bob.write(f, {0: block(2)}, 20)
    sync(alice, bob)
    assert names(alice, d) == {b"plan.txt": f}  # back where it was
    assert alice.view(f).version == edit.hlc
    assert alice.content(f) == {0: block(2)}


def save_by_rename(node: SimNode, f: bytes, blocks: dict[int, bytes | None], size: int) -> bytes:
    """What an editor does to save `f`: write a temporary file, rename it over `f`."""
    tmp = node.create(ROOT, b".notes.txt.swp")
    node.write(tmp, blocks, size)
    node.delete(f)  # rename(2) onto an existing name replaces it: a delete
    node.rename(tmp, ROOT, b"notes.txt")
    return tmp


def test_an_editor_save_racing_an_edit_in_place_keeps_both_as_writes_do() -> None:
    """Alice saves by rename while Bob writes the file in place; Bob's is newer.

    Rule 4 brings Bob's file back (Alice's delete did not see his write), to
    the name Alice's saved file now holds. The two race as two writes to one
    file do (rule 3): the newest content keeps the name, the other is shown
    as `<stem>.conflict-<node>-<time><ext>` after its writer and time."""
    alice, bob = alice_and_bob()
    f = alice.create(ROOT, b"notes.txt")
    alice.write(f, {0: block(1)}, 100)
    sync(alice, bob)
    alice.wall_ms, bob.wall_ms = EPOCH_MS + 60_000, EPOCH_MS + 120_000
    tmp = save_by_rename(alice, f, {0: block(2)}, 100)
    bob.write(f, {0: block(3)}, 100)
    sync(alice, bob)
    assert names(alice) == {b"notes.txt": f, b"notes.conflict-alice-20240102-030505.txt": tmp}
    assert alice.content(f) == {0: block(3)}
    assert alice.content(tmp) == {0: block(2)}


def test_an_editor_save_newer_than_an_edit_in_place_keeps_the_name() -> None:
    alice, bob = alice_and_bob()
    f = alice.create(ROOT, b"notes.txt")
    alice.write(f, {0: block(1)}, 100)
    sync(alice, bob)
    alice.wall_ms, bob.wall_ms = EPOCH_MS + 120_000, EPOCH_MS + 60_000
    tmp = save_by_rename(alice, f, {0: block(2)}, 100)
    bob.write(f, {0: block(3)}, 100)
    sync(alice, bob)
    assert names(alice) == {b"notes.txt": tmp, b"notes.conflict-bob-20240102-030505.txt": f}
    assert alice.content(tmp) == {0: block(2)}
    assert alice.content(f) == {0: block(3)}
    # Deleting the conflict-named file settles it (a delete that saw the write).
    alice.delete(f)
    sync(alice, bob)
    assert names(bob) == {b"notes.txt": tmp}


def test_a_file_made_under_the_name_before_the_delete_keeps_its_suffix() -> None:
    """Only a file placed at the name after the delete replaced the revived
    one: two files created under one name stay apart as rule 2 says."""
    alice, bob = alice_and_bob()
    one = alice.create(ROOT, b"a.txt")
    two = bob.create(ROOT, b"a.txt")
    alice.write(one, {0: block(1)}, 10)
    sync(alice, bob)
    alice.delete(one)
    bob.write(one, {0: block(2)}, 10)
    sync(alice, bob)
    assert names(alice) == {b"a.txt": two, b"a~" + one[:4].hex().encode() + b".txt": one}


def _revival_checks_per_op_after(deletes: int) -> int:
    """Rule 4's work for one create and one delete, on a replica that holds
    `deletes` deleted files and one delete that lost to a concurrent write."""
    alice, bob = alice_and_bob()
    kept = alice.create(ROOT, b"kept.txt")
    alice.write(kept, {0: block(1)}, 10)
    sync(alice, bob)
    for i in range(deletes):
        alice.delete(alice.create(ROOT, f"old-{i}".encode()))
    alice.delete(kept)
    bob.write(kept, {0: block(2)}, 20)
    sync(alice, bob)
    assert names(alice)[b"kept.txt"] == kept  # revived
    before = alice.replica.revival_checks
    alice.delete(alice.create(ROOT, b"new.txt"))
    return alice.replica.revival_checks - before


def test_rule_4_looks_only_at_what_a_batch_changed_not_at_the_whole_trash() -> None:
    # The same work after 50 deletes as after 2,000: it does not grow with the trash.
    assert _revival_checks_per_op_after(2000) == _revival_checks_per_op_after(50)
    assert _revival_checks_per_op_after(50) < 20


def test_delete_that_saw_the_write_wins() -> None:
    alice, bob = alice_and_bob()
    f = alice.create(ROOT, b"plan.txt")
    sync(alice, bob)
    edit = bob.write(f, {0: block(2)}, 20)
    sync(alice, bob)
    delete = alice.delete(f)
    assert isinstance(delete, Move)
    assert delete.seen == (edit.hlc,)
    sync(alice, bob)
    assert names(bob) == {}
    assert bob.replica.entry(f) is None


def test_deleting_a_file_that_was_never_written_sees_nothing_and_wins() -> None:
    alice, bob = alice_and_bob()
    f = alice.create(ROOT, b"empty")
    sync(alice, bob)
    bob.rename(f, ROOT, b"still-empty")
    alice.wall_ms += 1
    alice.delete(f)
    sync(alice, bob)
    assert names(alice) == {}


def test_write_through_deleted_handle_does_not_resurrect() -> None:
    """A write whose base is the tombstone was made after the delete, through
    a handle still open on the deleted file: it does not bring the file back."""
    alice, bob = alice_and_bob()
    f = alice.create(ROOT, b"tmp")
    alice.write(f, {0: block(1)}, 10)
    tombstone = alice.delete(f)
    late = Write(alice.stamp(), f, (tombstone.hlc,), 20, ((0, block(2)),))
    alice.commit(late)
    sync(alice, bob)
    assert names(bob) == {}
    assert bob.replica.heads(f) == (late.hlc,)


def test_deleted_dir_comes_back_for_concurrent_child() -> None:
    alice, bob = alice_and_bob()
    d = alice.mkdir(ROOT, b"photos")
    sync(alice, bob)
    alice.delete(d)  # empty on alice
    child = bob.create(d, b"new.jpg")
    sync(alice, bob)
    assert names(alice) == {b"photos": d}
    assert names(alice, d) == {b"new.jpg": child}


def test_deleted_dir_stays_deleted_when_the_concurrent_child_is_deleted_too() -> None:
    alice, bob = alice_and_bob()
    d = alice.mkdir(ROOT, b"photos")
    sync(alice, bob)
    alice.delete(d)
    child = bob.create(d, b"new.jpg")
    bob.delete(child)
    sync(alice, bob)
    assert names(alice) == {}


def test_recursive_delete_loses_to_a_write_inside() -> None:
    """`rm -r docs` on one node while another edits docs/sub/plan.txt: the file
    comes back, and so do the directories that hold it."""
    alice, bob = alice_and_bob()
    docs = alice.mkdir(ROOT, b"docs")
    sub = alice.mkdir(docs, b"sub")
    f = alice.create(sub, b"plan.txt")
    other = alice.create(docs, b"other.txt")
    sync(alice, bob)
    for entry in (f, other, sub, docs):
        alice.delete(entry)
    bob.write(f, {0: block(7)}, 7)
    sync(alice, bob)
    assert names(alice) == {b"docs": docs}
    assert names(alice, docs) == {b"sub": sub}
    assert names(alice, sub) == {b"plan.txt": f}
    assert alice.content(f) == {0: block(7)}


def test_a_delete_losing_again_restores_the_place_before_both_deletes() -> None:
    alice, bob = alice_and_bob()
    d = alice.mkdir(ROOT, b"docs")
    f = alice.create(d, b"plan.txt")
    alice.write(f, {0: block(1)}, 1)
    sync(alice, bob)
    alice.delete(f)
    bob.write(f, {0: block(2)}, 2)
    sync(alice, bob)
    assert names(alice, d) == {b"plan.txt": f}  # back, the first time
    alice.delete(f)  # the same again
    bob.write(f, {0: block(3)}, 3)
    sync(alice, bob)
    assert names(alice) == {b"docs": d}
    assert names(alice, d) == {b"plan.txt": f}
    assert alice.content(f) == {0: block(3)}


def test_writes_to_a_file_whose_rename_beat_a_delete_are_live() -> None:
    """A rename that sorts after a concurrent delete keeps the file; later
    edits of it are ordinary edits: concurrent ones make a conflict copy, and a
    delete that did not see one loses to it."""
    alice, bob = alice_and_bob()
    f = alice.create(ROOT, b"a.txt")
    alice.write(f, {0: block(1)}, 1)
    sync(alice, bob)
    alice.delete(f)
    bob.rename(f, ROOT, b"b.txt")  # later: the file stays, as b.txt
    sync(alice, bob)
    assert names(alice) == {b"b.txt": f}
    assert alice.content(f) == {0: block(1)}
    mine = alice.write(f, {0: block(2)}, 2)
    bob.write(f, {0: block(3)}, 3)
    sync(alice, bob)
    assert names(alice) == {
        b"b.txt": f,
        b"b.conflict-alice-20240102-030405.txt": conflict_copy_id(f, mine.hlc),
    }
    alice.delete(conflict_copy_id(f, mine.hlc))
    sync(alice, bob)
    alice.delete(f)
    edit = bob.write(f, {0: block(4)}, 4)
    sync(alice, bob)
    assert names(alice) == {b"b.txt": f}
    assert alice.view(f).version == edit.hlc


def test_a_delete_that_sorts_before_the_create_does_not_doom_the_file() -> None:
    """A node whose clock runs more than MAX_FORWARD_MS ahead creates a file;
    a node that deletes it at once stamps the delete before the creation (its
    clock follows only up to the bound), so the file stays. Edits to it are
    ordinary edits: concurrent ones still make a conflict copy."""
    alice = SimNode.named("alice")
    bob = SimNode.named("bob", wall_ms=EPOCH_MS + MAX_FORWARD_MS + 60_000)
    sync(alice, bob)
    f = bob.create(ROOT, b"f.txt")
    sync(alice, bob)
    delete = alice.delete(f)
    assert delete.hlc < bob.replica.tree.places[f].hlc
    sync(alice, bob)
    assert names(alice) == {b"f.txt": f}
    mine = alice.write(f, {0: block(1)}, 1)
    bob.write(f, {0: block(2)}, 1)
    sync(alice, bob)
    assert names(alice) == {
        b"f.txt": f,
        # alice's stamps follow bob's clock up to the bound: 03:04:05 + 5 min
        b"f.conflict-alice-20240102-030905.txt": conflict_copy_id(f, mine.hlc),
    }


def test_a_subtree_cut_off_by_a_skipped_create_comes_back() -> None:
    """No delete, yet a whole subtree fell out of view, with a write inside.

    carol's clock runs more than MAX_FORWARD_MS ahead; she makes directory c
    inside a. bob sees c and moves b into it, but his clock follows carol's
    only up to the bound, so his move sorts *before* c's creation. alice,
    concurrently, moves a into b. In clock order (rule 1): a goes into b, b
    goes into c (not created yet, so no cycle is seen), then creating c inside
    a would close the cycle c -> a -> b -> c and is skipped. c never gets a
    place, so c, b, a and the file f in a, with content no delete ever saw,
    hung off nothing and were shown nowhere, on every replica. A created
    entry that the tree leaves with no place is cut off by no delete, so it
    comes back like a deleted entry does (rule 4): where its creation put it,
    or in ROOT when that is inside its own subtree, as here.
    """
    alice, bob = alice_and_bob()
    carol = SimNode.named("carol", wall_ms=EPOCH_MS + MAX_FORWARD_MS + 60_000)
    a, b = alice.mkdir(ROOT, b"a"), alice.mkdir(ROOT, b"b")
    f = alice.create(a, b"f.txt")
    alice.write(f, {0: block(1)}, 1)
    sync(alice, bob, carol)
    c = carol.mkdir(a, b"c")
    bob.sync_from(carol)
    into_c = bob.rename(b, c, b"b")
    assert into_c.hlc < carol.replica.tree.places[c].hlc
    alice.rename(a, b, b"a")
    sync(alice, bob, carol)
    assert c not in replay(moves_of(alice.held.values()))  # rule 1 skipped c's creation
    assert names(alice) == {b"c": c}
    assert names(alice, c) == {b"b": b}
    assert names(alice, b) == {b"a": a}
    assert names(alice, a) == {b"f.txt": f}
    assert alice.content(f) == {0: block(1)}


def test_an_entry_placed_in_a_file_is_shown_in_root() -> None:
    """Only a faulty peer puts an entry in a file (a node refuses with
    ENOTDIR), but what is written to it must not vanish: it shows in ROOT."""
    alice, bob = alice_and_bob()
    f, g = alice.create(ROOT, b"f"), alice.create(ROOT, b"g.txt")
    edit = alice.write(g, {0: block(1)}, 1)
    sync(alice, bob)
    alice.commit(Move(alice.stamp(), g, f, b"g.txt"))
    sync(alice, bob)
    assert names(bob) == {b"f": f, b"g.txt": g}
    assert bob.view(g).version == edit.hlc


# --- rule 5: attributes ---------------------------------------------------------------------------


def test_attributes_last_writer_wins() -> None:
    alice, bob = alice_and_bob()
    f = alice.create(ROOT, b"run.sh")
    sync(alice, bob)
    bob.set_attr(f, "mode", 0o700)  # earlier wall clock: loses
    alice.wall_ms += 1_000
    alice.set_attr(f, "mode", 0o755)
    alice.set_attr(f, "xattr:user.tag", b"red")
    bob.wall_ms += 2_000
    bob.set_attr(f, "xattr:user.tag", b"blue")
    bob.set_attr(f, "uid", 0)
    sync(alice, bob)
    view = alice.view(f)
    assert (view.mode, view.uid, view.gid) == (0o755, 0, 1000)
    assert alice.replica.xattrs(f) == {"user.tag": b"blue"}
    alice.wall_ms += 5_000
    alice.set_attr(f, "xattr:user.tag", None)  # removing is a write too
    sync(alice, bob)
    assert bob.replica.xattrs(f) == {}


def test_explicit_mtime_wins_only_over_older_changes() -> None:
    alice, bob = alice_and_bob()
    f = alice.create(ROOT, b"f")
    alice.set_attr(f, "mtime_ns", 42)
    assert alice.view(f).mtime_ns == 42
    alice.wall_ms += 1_000
    edit = alice.write(f, {0: block(1)}, 1)
    assert alice.view(f).mtime_ns == edit.hlc.wall_ms * 1_000_000
    sync(alice, bob)


def test_apply_is_idempotent_and_order_independent() -> None:
    alice, bob = alice_and_bob()
    d = alice.mkdir(ROOT, b"d")
    f = bob.create(ROOT, b"f")
    alice.rename(d, ROOT, b"e")
    bob.write(f, {0: block(1)}, 1)
    sync(alice, bob)
    ops = [*alice.held.values()]
    once, twice, backwards = Replica(), Replica(), Replica()
    once.apply(ops)
    twice.apply(ops)
    twice.apply(ops)
    for op in reversed(ops):
        backwards.apply([op, op])
    assert once.snapshot() == twice.snapshot() == backwards.snapshot()
    assert [name for _, name, _ in walk(once)] == [b"e", b"f"]
    assert once.has(ops[0].hlc)
    assert once.latest() == max(op.hlc for op in ops)
    assert once.counts() == (len(ops), 2)
    assert once.members() == {alice.node: "alice", bob.node: "bob"}


def test_trash_is_never_shown() -> None:
    alice, _ = alice_and_bob()
    f = alice.create(ROOT, b"f")
    alice.delete(f)
    assert alice.replica.listing(TRASH) == []
    assert alice.replica.entry(TRASH) is None
    assert alice.replica.lookup(ROOT, b"f") is None
    assert alice.replica.tree.places[f].parent == TRASH  # where the tree keeps it


# --- members and Forget -----------------------------------------------------------------------


def test_forget_removes_a_member_in_any_order_and_the_greatest_cut_wins() -> None:
    alice, bob = alice_and_bob()
    carol = SimNode.named("carol")
    sync(alice, bob, carol)
    early = Forget(alice.stamp(), carol.node, 3)
    late = Forget(bob.stamp(), carol.node, 5)
    alice.commit(early)
    bob.commit(late)
    ops = [*alice.held.values(), *bob.held.values(), *carol.held.values(), early, late]
    replicas = [Replica() for _ in range(3)]
    replicas[0].apply(ops)
    replicas[1].apply(reversed(ops))
    for op in ops[::2] + ops[1::2] + ops:
        replicas[2].apply([op])
    for replica in replicas:
        assert replica.forgotten() == {carol.node: 5}
        assert replica.current_members() == {alice.node: "alice", bob.node: "bob"}
        assert replica.members()[carol.node] == "carol"  # its name still names its copies
        assert replica.snapshot() == replicas[0].snapshot()


def test_one_member_alone_cannot_forget_another_in_a_team_of_three() -> None:
    """A `Forget` is a vote: it takes more than half of the other members (or
    the node itself, leaving), whatever order the votes and members arrive in."""
    alice, bob = alice_and_bob()
    carol = SimNode.named("carol")
    sync(alice, bob, carol)
    liar = Forget(carol.stamp(), alice.node, 7)
    carol.commit(liar)
    members = [*alice.held.values(), *bob.held.values(), *carol.held.values()]
    for ops in (members, list(reversed(members))):
        replica = Replica()
        replica.apply(ops)
        assert replica.forgotten() == {}
        assert set(replica.current_members()) == {alice.node, bob.node, carol.node}
        assert replica.forget_votes() == {alice.node: {carol.node: 7}}
    # Carol forgetting Alice, and Alice forgetting Carol, cancel nothing: Bob
    # decides. With Bob's vote against Carol, Carol is forgotten, and her vote
    # no longer counts.
    counter = Forget(alice.stamp(), carol.node, 4)
    second = Forget(bob.stamp(), carol.node, 3)
    for ops in ([*members, counter], [*members, counter, second]):
        replica = Replica()
        for op in reversed(ops):
            replica.apply([op])
        expected = {carol.node: 4} if second in ops else {}
        assert replica.forgotten() == expected
    leaving = Forget(bob.stamp(), bob.node, 2)  # a node may forget itself
    replica = Replica()
    replica.apply([op for op in members if op != liar] + [leaving])
    assert replica.forgotten() == {bob.node: 2}
    # ... and then two are left, and in a team of two either may forget the
    # other (the one forgotten ignores it: only the one who voted refuses it).
    replica.apply([liar])
    assert replica.forgotten() == {bob.node: 2, alice.node: 7}


def _head_scans_for_one_more_write(versions: int) -> int:
    alice = SimNode.named("alice")
    f = alice.create(ROOT, b"log.txt")
    for i in range(versions):
        alice.write(f, {0: block(i % 200)}, 10)
        alice.view(f)  # read back after each write, as a commit does
    before = alice.replica.contents.head_scans
    alice.write(f, {0: block(1)}, 10)
    assert alice.view(f).version is not None
    return alice.replica.contents.head_scans - before


def test_a_new_version_does_not_rescan_the_files_older_versions() -> None:
    assert _head_scans_for_one_more_write(1000) == _head_scans_for_one_more_write(10) == 0
