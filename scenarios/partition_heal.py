"""A partition and its heal: concurrent changes on both sides merge without loss.

Three nodes; C's link goes down. While cut off, A and C each make conflicting
changes: both edit `doc.txt`; A moves `x` into `y` while C moves `y` into `x`;
A deletes `victim.txt` while C edits it; both create a different `same.txt`.
A and B keep syncing meanwhile. Then C's link comes back up.

Expected once all three converge (identical mounts): `doc.txt` holds one edit
and exactly one conflict copy `doc.conflict-<member>-<UTC time>.txt` holds the
other, named for the node whose edit it keeps; `x` and `y` do not form a cycle
(exactly one is inside the other, one of the moves skipped); the edit beats the
delete (`victim.txt` is there with C's content); both `same.txt` files are
visible, one under the plain name and one as `same.txt~<hex>` (or
`same~<hex>.txt`), holding the two contents. Nothing else appears.
"""

from __future__ import annotations

import os
import re

from scenarios.cluster import Cluster, ClusterNode
from scenarios.harness import HarnessError
from scenarios.trees import Tree
from scenarios.workload import write_file

NEEDS_REAL_LAN = True

CONFLICT = re.compile(r"doc\.conflict-(?P<member>.+)-(?P<time>\d{8}-\d{6})\.txt")
# The contract says `name~<hex>`; a suffix before the extension (as conflict
# copies are named) is the same rule keeping the file's type, so both pass.
SAME = re.compile(r"same\.txt(~[0-9a-f]+)?|same~[0-9a-f]+\.txt")


def run(c: Cluster) -> None:
    a, b, cc = c.start_nodes("A", "B", "C")
    with c.report.step("A, B and C connected"):
        c.wait_connected([a, b, cc])

    with c.report.step("shared starting point written on A, converged on all three"):
        write_file(a.path("doc.txt"), b"first version\n")
        write_file(a.path("victim.txt"), b"original\n")
        os.mkdir(a.path("x"))
        os.mkdir(a.path("y"))
        c.wait_converged([a, b, cc])

    with c.report.step("C cut off (link down)"):
        # zeroconf logs a send on a downed link as a warning with a traceback.
        c.allow_errors(cc, r"zeroconf: Error with socket .*Network is unreachable")
        c.cut(cc)

    edit = {n.name: f"edit made on {n.name}\n".encode() for n in (a, cc)}
    made = {n.name: f"same.txt made on {n.name}\n".encode() for n in (a, cc)}
    victim_edit = b"C's edit of the victim\n"
    with c.report.step("concurrent changes on A and on C"):
        write_file(a.path("doc.txt"), edit["A"])
        write_file(cc.path("doc.txt"), edit["C"])
        os.rename(a.path("x"), a.path("y/x"))
        os.rename(cc.path("y"), cc.path("x/y"))
        os.unlink(a.path("victim.txt"))
        write_file(cc.path("victim.txt"), victim_edit)
        write_file(a.path("same.txt"), made["A"])
        write_file(cc.path("same.txt"), made["C"])

    with c.report.step("A and B converged while C was cut off"):
        c.wait_converged([a, b])
    if a.path("victim.txt").exists() or not cc.path("victim.txt").exists():
        raise HarnessError("C was not cut off: A's delete of victim.txt reached it")

    with c.report.step("C's link up again"):
        c.heal(cc)
    with c.report.step("A, B and C converged after the heal") as step:
        tree = c.wait_converged([a, b, cc])
        step.text = f"A, B and C converged after the heal ({len(tree)} entries)"

    check_merge(c, a, tree, edit, made, victim_edit)


def check_merge(
    c: Cluster,
    a: ClusterNode,
    tree: Tree,
    edit: dict[str, bytes],
    made: dict[str, bytes],
    victim_edit: bytes,
) -> None:
    def read(rel: str) -> bytes:
        return a.path(rel).read_bytes()

    listing = f"the merged tree: {sorted(tree)}"

    # Concurrent edits: both kept, the copy named for the node whose edit it holds.
    conflicts = [p for p in tree if CONFLICT.fullmatch(p)]
    assert "doc.txt" in tree, f"doc.txt is gone; {listing}"
    assert len(conflicts) == 1, f"expected one conflict copy of doc.txt, got {conflicts}; {listing}"
    copy = conflicts[0]
    kept, copied = read("doc.txt"), read(copy)
    assert {kept, copied} == set(edit.values()), (
        f"doc.txt holds {kept!r} and {copy} holds {copied!r}; expected the two edits {sorted(edit.values())}"
    )
    match = CONFLICT.fullmatch(copy)
    assert match is not None
    member = match["member"]
    owner = next(name for name, data in edit.items() if data == copied)
    assert member == owner, f"{copy} holds {owner}'s edit but is named for {member!r}"
    winner = next(name for name, data in edit.items() if data == kept)
    c.report.note(f"doc.txt kept {winner}'s edit; {copy} holds {owner}'s")

    # Cross-moves: no cycle, exactly one inside the other.
    xy = {p for p in tree if p in ("x", "y", "x/y", "y/x") or p.startswith(("x/", "y/"))}
    assert xy in ({"x", "x/y"}, {"y", "y/x"}), f"x and y ended as {sorted(xy)}; {listing}"
    inner, outer = ("y", "x") if "x/y" in xy else ("x", "y")
    c.report.note(f"{inner} ended inside {outer}: the other move was skipped, no cycle")

    # Edit beats delete.
    assert "victim.txt" in tree, f"A's delete won over C's concurrent edit; {listing}"
    assert read("victim.txt") == victim_edit, f"victim.txt holds {read('victim.txt')!r}"
    c.report.note("victim.txt survived A's delete with C's edit")

    # Same name, two files: both visible.
    same = sorted(p for p in tree if SAME.fullmatch(p))
    expected_same = f"expected same.txt and same.txt~<hex>, got {same}; {listing}"
    assert len(same) == 2, expected_same
    assert "same.txt" in same, expected_same
    assert {read(p) for p in same} == set(made.values()), (
        f"{same} hold {[read(p) for p in same]}; expected {sorted(made.values())}"
    )
    c.report.note(f"both same.txt files visible: {', '.join(same)}")

    expected = {"doc.txt", copy, "victim.txt", *same, *xy}
    assert set(tree) == expected, f"unexpected entries {sorted(set(tree) - expected)}; {listing}"
