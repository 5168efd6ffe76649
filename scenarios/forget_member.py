"""A member that leaves for good holds collection back until it is forgotten.

A, B and C (with `--keep-history 0`) share a volume; C writes a small file,
then stops for good. A overwrites a 20 MiB file five times. Expected: `gc`
frees nothing and names C as holding collection back; `dfs-peer forget C`
refuses ambiguity and the node itself with one clear line; on A it records
A's vote only (one member alone forgets no one in a team of three); on B it
makes the majority of the others and C is gone on both; `gc` on A and B then frees the old versions and each
store shrinks to near the live data (the 20 MiB file and C's small one). The
report gives the store sizes before and after.
"""

from __future__ import annotations

from typing import Any

from scenarios.cluster import Cluster, ClusterNode
from scenarios.gc_safety import BLOCK, cli, gc, held_back_by, start_nodes, store
from scenarios.trees import human_bytes
from scenarios.workload import write_file, write_large

NEEDS_REAL_LAN = False
SIZE = 20 << 20
OVERWRITES = 5


def run(c: Cluster) -> None:
    with c.report.step("start A, B, C (--keep-history 0)"):
        a, b, nc = start_nodes(c, "A", "B", "C")
        c.wait_connected([a, b, nc])
    with c.report.step("C wrote notes.txt; all three converged"):
        write_file(nc.path("notes.txt"), b"C was here\n")
        c.wait_converged([a, b, nc])
    with c.report.step("C stopped for good"):
        c.stop(nc)

    with c.report.step(f"A wrote and overwrote big.bin {OVERWRITES} times") as step:
        for i in range(OVERWRITES + 1):
            write_large(a.path("big.bin"), SIZE, seed=f"forget-{i}")
        c.wait_converged([a, b], timeout=120)
        step.text = (
            f"A wrote big.bin and overwrote it {OVERWRITES} times "
            f"({human_bytes((OVERWRITES + 1) * SIZE)} written)"
        )
    with c.report.step("gc on A frees nothing: C holds collection back") as step:
        c.wait_until(lambda: held_back_by(a) == ["C"], "A to name C as behind")
        result = gc(a)
        assert result["blocks_freed"] == 0, f"A freed blocks while C is a member: {result}"
        held = [m["name"] for m in result["held_back_by"]]
        assert held == ["C"], f"A's gc says collection is held back by {held}"
        step.text = f"gc on A freed nothing: held back by {', '.join(held)}"
    before = {n.name: store(n)[1] for n in (a, b)}

    with c.report.step("forget refuses this node itself and unknown names, in one line") as step:
        own = cli(a, "forget", "A")
        unknown = cli(a, "forget", "nobody")
        for done in (own, unknown):
            assert done.returncode != 0, f"forget should have failed: {done}"
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1, f"expected one line, got: {done.stderr!r}"
            assert lines[0].startswith("dfs-peer: "), lines
        step.text = f"forget refused: {own.stderr.strip()!r}; {unknown.stderr.strip()!r}"
    with c.report.step("dfs-peer forget C on A, then on B") as step:
        done = cli(a, "forget", "C")
        assert done.returncode == 0, f"forget C failed: {done.stderr}"
        assert "voted to forget" in done.stdout, done.stdout
        second = cli(b, "forget", "C")
        assert second.returncode == 0, f"forget C on B failed: {second.stderr}"
        step.text = f"dfs-peer forget C on A: {done.stdout.strip()}; on B: {second.stdout.strip()}"
    with c.report.step("B learnt that C is forgotten; nobody holds collection back"):
        c.wait_until(
            lambda: not held_back_by(a) and not held_back_by(b),
            "A and B to stop waiting for C",
            detail=lambda: f"  A: {held_back_by(a)}  B: {held_back_by(b)}",
        )

    live = SIZE + len(b"C was here\n")
    with c.report.step("gc on A and B freed the old versions") as step:
        lines = []
        for n in (a, b):
            results = []

            def collected(n: ClusterNode = n, results: list[dict[str, Any]] = results) -> bool:
                # Another run when the first ran beside the node's own work
                # (enforcing the forget, merging the other's votes), which
                # leaves pages free or the write-ahead log long after it.
                results.append(gc(n))
                blocks, size = store(n)
                return blocks == SIZE // BLOCK + 1 and size < live * 1.25

            c.wait_until(
                collected,
                f"gc on {n.name} to leave the live blocks and a store near the live size",
                timeout=30,
                interval=1.0,
                detail=lambda n=n: f"  {n.name}: (blocks, bytes) = {store(n)}",
            )
            freed = sum(r["blocks_freed"] for r in results)
            freed_bytes = sum(r["bytes_freed"] for r in results)
            size = store(n)[1]
            lines.append(
                f"{n.name}: freed {freed} blocks ({human_bytes(freed_bytes)}) in "
                f"{len(results)} run(s), store {human_bytes(before[n.name])} -> {human_bytes(size)}"
            )
            c.report.figure(f"store_bytes_before_{n.name}", before[n.name])
            c.report.figure(f"store_bytes_after_{n.name}", size)
        step.text = f"gc freed the old versions (live data {human_bytes(live)}): " + "; ".join(
            lines
        )
    with c.report.step("A and B still converge, C's file included") as step:
        tree = c.wait_converged([a, b])
        assert "notes.txt" in tree, sorted(tree)
        step.text = f"A and B converged ({len(tree)} entries, C's notes.txt included)"
