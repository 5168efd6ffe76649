"""Two nodes: a write on A shows on B and back, and a rename and a delete propagate.

Expected: B shows A's new file with A's bytes, then A shows B's; a file A
moves into a new directory shows on B under its new path with the same bytes,
and its old name is gone; a file B deletes is gone from A; both mounts end
identical. Each step reports how long the other side took to see it.
"""

from __future__ import annotations

import os

from scenarios.cluster import Cluster
from scenarios.workload import write_file

NEEDS_REAL_LAN = False


def run(c: Cluster) -> None:
    a, b = c.start_nodes("A", "B")
    with c.report.step("A and B connected to each other"):
        c.wait_connected([a, b])

    hello = b"hello from A\n"
    with c.report.step("B saw A's write (hello.txt)"):
        write_file(a.path("hello.txt"), hello)
        c.wait_file(b, "hello.txt", hello)

    reply = b"and hello back from B\n"
    with c.report.step("A saw B's write (reply.txt)"):
        write_file(b.path("reply.txt"), reply)
        c.wait_file(a, "reply.txt", reply)

    with c.report.step("B saw A's rename (hello.txt -> docs/greeting.txt)"):
        os.mkdir(a.path("docs"))
        os.rename(a.path("hello.txt"), a.path("docs/greeting.txt"))
        c.wait_file(b, "docs/greeting.txt", hello)
        c.wait_gone(b, "hello.txt")

    with c.report.step("A saw B's delete (reply.txt)"):
        os.unlink(b.path("reply.txt"))
        c.wait_gone(a, "reply.txt")

    with c.report.step("A and B converged") as step:
        tree = c.wait_converged([a, b])
        step.text = f"A and B converged ({len(tree)} entries)"
    assert sorted(tree) == ["docs", "docs/greeting.txt"], f"unexpected tree: {sorted(tree)}"
